"""Token-by-token detokenization that never splits a character.

One token may carry only part of a UTF-8 character (an emoji spread over
byte-fallback pieces, or over byte-level BPE tokens), so text is released
only once it is complete. Work is per token, on bytes, with Python's
incremental UTF-8 decoder: the concatenation of everything released equals
``bytes.decode(errors="replace")`` of the whole stream, which is exactly what
``GGUFTokenizer.decode`` returns.
"""

from __future__ import annotations

import codecs
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .gguf_tokenizer import GGUFTokenizer


class StreamingDetokenizer:
    def __init__(self, tokenizer: GGUFTokenizer, *, skip_special: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip = tokenizer.special_ids if skip_special else frozenset()
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        # SentencePiece's prefix space: decode drops one leading space of the whole text.
        self._strip_first_space = tokenizer.strips_leading_space

    def push(self, token_id: int) -> str:
        """The text that became complete with this token ("" while a character is still open)."""
        data = self._tokenizer.token_bytes(token_id)
        if token_id in self._skip or not data:
            return ""
        if self._strip_first_space:
            self._strip_first_space = False
            if data[:1] == b" ":
                data = data[1:]
        return self._utf8.decode(data, final=False)

    def flush(self) -> str:
        """End of stream: bytes of an unfinished character come out as U+FFFD, not lost."""
        return self._utf8.decode(b"", final=True)
