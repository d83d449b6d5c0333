"""Structured output: OpenAI ``response_format`` -> a grammar matcher that masks sampling.

llguidance (the grammar engine of llama.cpp's and vLLM's guided decoding) is used
because its matcher fills a packed int32 bitmask through a numpy pointer, with no
torch import on the host, and it builds its token trie from our own GGUF
tokenizer's byte pieces (no HF tokenizer.json needed). The mask covers the
model's embedding rows: ids past the tokenizer's vocabulary are never allowed.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import llguidance
import llguidance.numpy as llg_np
import numpy as np

from .errors import InvalidParams

# Compact, single-line JSON: no free whitespace runs the model could loop on until max_tokens.
_JSON_OPTIONS: llguidance.JsonCompileOptions = {
    "whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ",
}
MAX_SCHEMA_BYTES = 64 * 1024


class _Pieces:
    """What llguidance.TokenizerWrapper reads: each id's bytes, the specials, and an encoder."""

    def __init__(self, tokenizer: Any, n_vocab: int) -> None:
        n_tok = int(tokenizer.vocab_size)
        special = frozenset(tokenizer.special_ids)
        # Control tokens are marked with a leading 0xFF (llguidance's convention): grammars never produce
        # them as text; ids past the tokenizer (embedding padding rows) are empty and never allowed.
        self.tokens = [
            (b"\xff" + tokenizer.token_bytes(i)) if i in special else tokenizer.token_bytes(i) for i in range(n_tok)
        ] + [b""] * max(0, n_vocab - n_tok)
        eos = sorted(tokenizer.eos_ids)
        self.eos_token_id = eos[0] if eos else 0
        self.bos_token_id = getattr(tokenizer, "bos_id", None)
        self.special_token_ids = sorted(special)
        self._tokenizer = tokenizer

    def __call__(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return list(self._tokenizer.encode(text, add_bos=False, add_eos=False))


class GrammarConstraint:
    """One request's matcher (engine/events.py TokenConstraint): ``allowed()`` then ``accept()`` per token."""

    def __init__(self, matcher: llguidance.LLMatcher, n_vocab: int, eos_ids: frozenset[int], grammar: str) -> None:
        self._matcher = matcher
        self.grammar = grammar  # what rebuilds it in the engine process (engine_process/child.py)
        self._mask = llg_np.allocate_token_bitmask(1, n_vocab)
        self._eos_only = np.zeros_like(self._mask[0])
        for t in eos_ids:
            if t < n_vocab:
                self._eos_only[t // 32] |= np.int32(np.uint32(1 << (t % 32)).view(np.int32))
        self.tokens_accepted = 0

    def allowed(self) -> np.ndarray:
        if self._matcher.is_error():  # cannot happen with a masked sampler; end the answer rather than raise
            return self._eos_only.copy()
        llg_np.fill_next_token_bitmask(self._matcher, self._mask, 0)
        return self._mask[0].copy()

    def accept(self, token_id: int) -> None:
        self._matcher.consume_token(int(token_id))
        self.tokens_accepted += 1

    @property
    def error(self) -> str | None:
        return self._matcher.get_error() if self._matcher.is_error() else None


class StructuredOutput:
    """Per model: the llguidance tokenizer (built once, ~1 s) and grammar compilation per request."""

    def __init__(self, tokenizer: Any, n_vocab: int) -> None:
        self._tokenizer, self.n_vocab = tokenizer, max(int(n_vocab), int(tokenizer.vocab_size))
        self._ll: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()

    def _lltokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._ll is None:
                pieces = _Pieces(self._tokenizer, self.n_vocab)
                self._ll = llguidance.LLTokenizer(
                    llguidance.TokenizerWrapper(pieces), n_vocab=self.n_vocab,
                    eos_token=sorted(self._tokenizer.eos_ids) or None,
                )
            return self._ll

    @staticmethod
    def grammar_for(response_format: dict[str, Any]) -> str | None:
        """The llguidance grammar of an OpenAI response_format (None for plain text); 400 on a bad one."""
        kind = response_format.get("type")
        if kind == "text":
            return None
        if kind == "json_object":
            schema: Any = {"type": "object"}
        elif kind == "json_schema":
            spec = response_format.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict | bool):
                raise InvalidParams("response_format.json_schema: must be an object with a 'schema' object")
            schema = spec.get("schema", {})
        else:
            raise InvalidParams(f"response_format.type: {kind!r} is not supported (text, json_object, json_schema)")
        if len(json.dumps(schema)) > MAX_SCHEMA_BYTES:
            raise InvalidParams(f"response_format.json_schema.schema: larger than {MAX_SCHEMA_BYTES} bytes")
        try:
            return llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=_JSON_OPTIONS)
        except (ValueError, TypeError) as e:
            raise InvalidParams(f"response_format.json_schema.schema: {e}") from None

    def constraint(self, response_format: dict[str, Any]) -> GrammarConstraint | None:
        """Compile (blocking: call it off the event loop); an unsupported schema is a 400 naming why."""
        grammar = self.grammar_for(response_format)
        if grammar is None:
            return None
        return self.compile(grammar)

    def compile(self, grammar: str) -> GrammarConstraint:
        """A matcher for an llguidance grammar (``grammar_for``); 400 when it cannot run."""
        ll = self._lltokenizer()
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, ll)
        if is_error:
            raise InvalidParams(f"response_format.json_schema.schema: unsupported: {messages[0] if messages else 'invalid'}")
        matcher = llguidance.LLMatcher(ll, grammar, log_level=0)
        if matcher.is_error():
            raise InvalidParams(f"response_format.json_schema.schema: unsupported: {matcher.get_error()}")
        return GrammarConstraint(matcher, self.n_vocab, frozenset(self._tokenizer.eos_ids), grammar)
