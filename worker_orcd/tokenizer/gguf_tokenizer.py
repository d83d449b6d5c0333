"""The model's own tokenizer, rebuilt from its GGUF metadata.

A GGUF carries no tokenizer.json; its vocabulary, merges and flags are enough
to rebuild one on HF ``tokenizers`` (Rust BPE and added-token matching), with
no transformers at runtime. Encoding goes through that backend. Decoding is
done here on bytes (``token_bytes``), the same way the streaming
detokenizer works, so a streamed answer and ``decode`` of its ids never differ.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

from tokenizers import Tokenizer

from ..errors import InvalidParams
from ..gguf.reader import GGUFFile
from . import bpe, spm
from .stream import StreamingDetokenizer
from .vocab import GGUFVocab, read_vocab


def _as_id(value: object) -> int:
    """Integer-like ids (numpy, torch scalars) are fine; bools, floats and the rest are not."""
    if isinstance(value, bool):
        raise InvalidParams(f"token id must be an integer, got {value!r}")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise InvalidParams(f"token id must be an integer, got {type(value).__name__}") from None


class GGUFTokenizer:
    def __init__(self, vocab: GGUFVocab, backend: Tokenizer, pieces: list[bytes], chat_template: str | None = None) -> None:
        self._vocab = vocab
        self._chat_template = chat_template
        self._backend = backend
        self._pieces = pieces
        self._special_ids = vocab.special_ids
        self._eos_ids = vocab.eos_ids

    @classmethod
    def from_gguf(cls, gguf: GGUFFile) -> GGUFTokenizer:
        """Raises ``ModelLoadError`` naming the key for any metadata it cannot use."""
        vocab = read_vocab(gguf)
        template = gguf.metadata.get("tokenizer.chat_template")
        template = template if isinstance(template, str) and template.strip() else None
        if vocab.kind == "gpt2":
            return cls(vocab, bpe.build_byte_level(vocab), bpe.piece_bytes(vocab), template)
        return cls(vocab, spm.build_sentencepiece(vocab), spm.piece_bytes(vocab), template)

    # --- properties -------------------------------------------------------------
    @property
    def kind(self) -> str:
        """Either "gpt2" (byte-level BPE) or "llama" (SentencePiece)."""
        return self._vocab.kind

    @property
    def pre(self) -> str:
        return self._vocab.pre

    @property
    def vocab_size(self) -> int:
        return len(self._pieces)

    @property
    def bos_id(self) -> int | None:
        return self._vocab.bos_id

    @property
    def eos_id(self) -> int | None:
        """The file's one eos token (``eos_token`` of a chat template)."""
        return self._vocab.eos_id

    @property
    def chat_template(self) -> str | None:
        """``tokenizer.chat_template`` of the file: untrusted Jinja source (see chat_template.py)."""
        return self._chat_template

    @property
    def eos_ids(self) -> frozenset[int]:
        """Ids that end generation (eos, eot, and the family's end-of-turn tokens)."""
        return self._eos_ids

    @property
    def special_ids(self) -> frozenset[int]:
        return self._special_ids

    @property
    def add_bos(self) -> bool:
        return self._vocab.add_bos

    @property
    def strips_leading_space(self) -> bool:
        """SentencePiece with a prefix space: decode drops the one it added."""
        return self._vocab.add_space_prefix

    @property
    def backend(self) -> Tokenizer:
        return self._backend

    # --- encode / decode ----------------------------------------------------------
    def encode(self, text: str, add_bos: bool | None = None, add_eos: bool | None = None) -> list[int]:
        """Token ids of ``text``; BOS/EOS follow the file's add_*_token flags unless forced."""
        if not isinstance(text, str):
            raise InvalidParams(f"text to tokenize must be a str, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidParams(f"text is not valid Unicode: {exc.reason} at index {exc.start}") from exc
        ids = self._backend.encode(text, add_special_tokens=False).ids
        if self._vocab.add_bos if add_bos is None else add_bos:
            if self._vocab.bos_id is None:
                raise InvalidParams("add_bos requested but the model has no BOS token")
            ids.insert(0, self._vocab.bos_id)
        if self._vocab.add_eos if add_eos is None else add_eos:
            if self._vocab.eos_id is None:
                raise InvalidParams("add_eos requested but the model has no EOS token")
            ids.append(self._vocab.eos_id)
        return ids

    def token_bytes(self, token_id: int) -> bytes:
        """The exact bytes ``token_id`` adds to the text (special tokens: their text)."""
        if type(token_id) is not int:
            token_id = _as_id(token_id)
        if not 0 <= token_id < len(self._pieces):
            raise InvalidParams(f"token id {token_id} is outside the vocabulary (0..{len(self._pieces) - 1})")
        return self._pieces[token_id]

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        """Invalid UTF-8 (only possible from an unfinished or made-up sequence) becomes U+FFFD."""
        parts = [self.token_bytes(i) for i in ids]
        if skip_special:
            parts = [p for i, p in zip(ids, parts) if i not in self._special_ids]
        data = b"".join(parts)
        if self.strips_leading_space and data[:1] == b" ":
            data = data[1:]
        return data.decode("utf-8", errors="replace")

    def stream(self, skip_special: bool = False) -> StreamingDetokenizer:
        return StreamingDetokenizer(self, skip_special=skip_special)

    def __repr__(self) -> str:
        return f"GGUFTokenizer(kind={self.kind!r}, pre={self.pre!r}, vocab_size={self.vocab_size})"
