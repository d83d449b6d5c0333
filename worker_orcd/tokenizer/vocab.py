"""The tokenizer a GGUF describes, read and checked from its metadata.

GGUF metadata comes from untrusted files, so everything the tokenizer builders
rely on (array lengths agree, ids are in range, flags are booleans) is checked
here once, and every problem is a ``ModelLoadError`` naming the key. The
builders then work on a ``GGUFVocab`` they can trust.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum
from functools import cached_property
from typing import Any

from ..errors import ModelLoadError
from ..gguf.reader import GGUFFile

log = logging.getLogger(__name__)

KEY = "tokenizer.ggml."
SUPPORTED_MODELS = ("gpt2", "llama")


class TokenType(IntEnum):
    """llama.cpp's ``tokenizer.ggml.token_type`` values."""

    UNDEFINED = 0
    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


# Tokens that end a turn without being the file's eos_token_id: chat models
# stop on them, and llama.cpp treats them as end-of-generation the same way.
_END_OF_TURN_NAMES = (
    "<|endoftext|>",  # qwen2
    "<|im_end|>",  # qwen2 (ChatML)
    "<|eot_id|>",  # llama 3
    "<|eom_id|>",  # llama 3.1 tool calls
    "<|end_of_text|>",  # llama 3
    "<end_of_turn>",  # gemma
)


@dataclass(frozen=True)
class GGUFVocab:
    kind: str  # tokenizer.ggml.model: "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    pre: str  # tokenizer.ggml.pre ("default" when the file has none)
    architecture: str | None
    tokens: tuple[str, ...]
    types: tuple[int, ...]  # TokenType per id (NORMAL where the file gives none)
    scores: tuple[float, ...] | None
    merges: tuple[str, ...] | None
    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    pad_id: int | None
    eot_id: int | None
    eom_id: int | None
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool

    @cached_property
    def special_ids(self) -> frozenset[int]:
        """Ids matched whole in text and dropped by ``skip_special``: control and
        unknown tokens plus the named bos/eos/unk/pad (as transformers does)."""
        named = {self.bos_id, self.eos_id, self.unk_id, self.pad_id} - {None}
        typed = {i for i, t in enumerate(self.types) if t in (TokenType.CONTROL, TokenType.UNKNOWN)}
        return frozenset(typed | named)  # type: ignore[arg-type]

    @cached_property
    def eos_ids(self) -> frozenset[int]:
        """Every id that ends generation: eos, eot, eom and the family's end-of-turn tokens."""
        ids = {self.eos_id, self.eot_id, self.eom_id} - {None}
        wanted = set(_END_OF_TURN_NAMES)
        ids |= {i for i, tok in enumerate(self.tokens) if tok in wanted}
        return frozenset(ids)  # type: ignore[arg-type]


def _fail(key: str, reason: str) -> ModelLoadError:
    return ModelLoadError(f"tokenizer metadata {key}: {reason}")


def _string_list(md: Mapping[str, Any], key: str, *, required: bool) -> tuple[str, ...] | None:
    value = md.get(key)
    if value is None:
        if required:
            raise _fail(key, "missing")
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _fail(key, "must be an array of strings")
    return tuple(value)


def _number_list(md: Mapping[str, Any], key: str, n: int, kind: type) -> tuple[Any, ...] | None:
    value = md.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != n:
        raise _fail(key, f"must be an array of {n} numbers (one per token), got {_describe(value)}")
    if kind is int:
        ok = all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    else:
        ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    if not ok:
        raise _fail(key, f"must hold only {kind.__name__} values")
    return tuple(value)


def _describe(value: Any) -> str:
    return f"an array of {len(value)}" if isinstance(value, list) else type(value).__name__


def _token_id(md: Mapping[str, Any], key: str, n_tokens: int) -> int | None:
    value = md.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise _fail(key, f"must be an integer token id, got {type(value).__name__}")
    if not 0 <= value < n_tokens:
        raise _fail(key, f"token id {value} is outside the vocabulary (0..{n_tokens - 1})")
    return value


def _flag(md: Mapping[str, Any], key: str, default: bool) -> bool:
    value = md.get(key, default)
    if not isinstance(value, bool):
        raise _fail(key, f"must be a boolean, got {type(value).__name__}")
    return value


def read_vocab(gguf: GGUFFile) -> GGUFVocab:
    """Check the tokenizer metadata of ``gguf`` and return it as a ``GGUFVocab``."""
    md = gguf.metadata
    kind = md.get(KEY + "model")
    if kind is None:
        raise _fail(KEY + "model", "missing: the file describes no tokenizer")
    if kind not in SUPPORTED_MODELS:
        supported = ", ".join(SUPPORTED_MODELS)
        raise _fail(KEY + "model", f"tokenizer model {kind!r} is not supported (supported: {supported})")
    pre = md.get(KEY + "pre")
    if pre is None:
        # Files converted before llama.cpp recorded the pre-tokenizer; llama.cpp reads them as "default" too.
        # Only byte-level BPE uses it, so only there is the guess worth a warning.
        if kind == "gpt2":
            log.warning("GGUF has no %spre; using the 'default' (GPT-2) pre-tokenizer", KEY)
        pre = "default"
    if not isinstance(pre, str):
        raise _fail(KEY + "pre", f"must be a string, got {type(pre).__name__}")

    tokens = _string_list(md, KEY + "tokens", required=True)
    assert tokens is not None
    if not tokens:
        raise _fail(KEY + "tokens", "empty vocabulary")
    n = len(tokens)
    types = _number_list(md, KEY + "token_type", n, int) or (int(TokenType.NORMAL),) * n
    bad = next((t for t in types if t not in TokenType._value2member_map_), None)
    if bad is not None:
        raise _fail(KEY + "token_type", f"unknown token type {bad} (known: 0..6)")
    scores = _number_list(md, KEY + "scores", n, float)
    if scores is not None and not all(math.isfinite(v) for v in scores):
        raise _fail(KEY + "scores", "holds a NaN or infinite score")
    merges = _string_list(md, KEY + "merges", required=False)
    if kind == "gpt2" and merges is None:
        raise _fail(KEY + "merges", "missing: a gpt2 (byte-level BPE) vocabulary needs its merges")
    if merges is not None:
        broken = next((m for m in merges if len(m.split(" ")) != 2 or "" in m.split(" ")), None)
        if broken is not None:
            raise _fail(KEY + "merges", f"merge {broken!r} is not two tokens separated by one space")

    architecture = gguf.architecture
    gemma = bool(architecture and architecture.startswith("gemma"))
    names = ("bos", "eos", "unknown", "padding", "eot", "eom")
    ids = {name: _token_id(md, f"{KEY}{name}_token_id", n) for name in names}
    # llama.cpp's defaults when a flag is absent: SentencePiece vocabularies and
    # Llama 3 add BOS; SentencePiece adds the prefix space except for Gemma.
    add_bos = _flag(md, KEY + "add_bos_token", kind == "llama" or pre in ("llama-bpe", "llama3", "llama-v3"))
    add_eos = _flag(md, KEY + "add_eos_token", False)
    # Only SentencePiece uses it; byte-level BPE spells spaces inside its tokens.
    add_space_prefix = _flag(md, KEY + "add_space_prefix", not gemma) and kind == "llama"
    if add_bos and ids["bos"] is None:
        raise _fail(KEY + "bos_token_id", "missing although add_bos_token is set")
    if add_eos and ids["eos"] is None:
        raise _fail(KEY + "eos_token_id", "missing although add_eos_token is set")
    return GGUFVocab(
        kind=kind,
        pre=pre,
        architecture=architecture,
        tokens=tokens,
        types=types,
        scores=scores,
        merges=merges,
        bos_id=ids["bos"],
        eos_id=ids["eos"],
        unk_id=ids["unknown"],
        pad_id=ids["padding"],
        eot_id=ids["eot"],
        eom_id=ids["eom"],
        add_bos=add_bos,
        add_eos=add_eos,
        add_space_prefix=add_space_prefix,
    )
