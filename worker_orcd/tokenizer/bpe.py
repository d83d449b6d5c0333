"""Byte-level BPE (``tokenizer.ggml.model == "gpt2"``): Qwen2, Llama 3, GPT-2.

The vocabulary spells every byte as one printable character (GPT-2's byte
alphabet), so merges work on bytes and any text round-trips exactly. Which
regex first cuts text into words is not in the vocabulary: llama.cpp records
it by name in ``tokenizer.ggml.pre``, and a vocabulary tokenized with the
wrong regex silently gives the model inputs it never saw. So an unknown name
is refused rather than guessed.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

from ..errors import ModelLoadError
from .specials import add_special_tokens
from .vocab import GGUFVocab, TokenType


def _byte_alphabet() -> tuple[str, ...]:
    """GPT-2's reversible byte -> character map: printable Latin-1 bytes stand
    for themselves, the other 68 are moved to U+0100.. in byte order."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    chars: list[str] = []
    shifted = 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(0x100 + shifted))
            shifted += 1
    return tuple(chars)


BYTE_CHARS = _byte_alphabet()
CHAR_BYTE = {c: b for b, c in enumerate(BYTE_CHARS)}

_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# None: GPT-2's own regex, built into the ByteLevel pre-tokenizer.
PRE_SPLITS: dict[str, str | None] = {
    "default": None,
    "gpt2": None,
    "qwen2": _QWEN2,
    "deepseek-r1-qwen": _QWEN2,
    "llama-bpe": _LLAMA3,
    "llama3": _LLAMA3,
    "llama-v3": _LLAMA3,
}
# Llama 3 takes a whole word straight from the vocabulary when it is there
# (its tokenizer.json sets ignore_merges; llama.cpp does the same), because
# some of its tokens are not reachable through the merges.
_WHOLE_WORD_FIRST = {"llama-bpe", "llama3", "llama-v3"}


def _is_literal(vocab: GGUFVocab, token_id: int) -> bool:
    """Special and user-defined tokens are stored as plain text, not byte-spelled."""
    return token_id in vocab.special_ids or vocab.types[token_id] == TokenType.USER_DEFINED


def _spelled(token: str) -> str:
    """A token in the byte alphabet; one stored as plain UTF-8 text is re-spelled."""
    if all(c in CHAR_BYTE for c in token):
        return token
    return "".join(BYTE_CHARS[b] for b in token.encode("utf-8"))


def piece_bytes(vocab: GGUFVocab) -> list[bytes]:
    """The bytes each token stands for (special tokens: their text)."""
    out: list[bytes] = []
    for i, token in enumerate(vocab.tokens):
        if _is_literal(vocab, i):
            out.append(token.encode("utf-8"))
        else:
            out.append(bytes(CHAR_BYTE[c] for c in _spelled(token)))
    return out


def build_byte_level(vocab: GGUFVocab) -> Tokenizer:
    if vocab.pre not in PRE_SPLITS:
        raise ModelLoadError(
            f"tokenizer metadata tokenizer.ggml.pre: byte-level BPE pre-tokenizer {vocab.pre!r} is not supported "
            f"(supported: {', '.join(sorted(PRE_SPLITS))})"
        )
    assert vocab.merges is not None  # read_vocab refuses a gpt2 vocabulary without merges
    # Literal tokens keep their text as the key, so the added-token matcher
    # below finds them under their own id instead of minting a new one.
    table = {
        (token if _is_literal(vocab, i) else _spelled(token)): i for i, token in enumerate(vocab.tokens)
    }
    merges = [tuple(m.split(" ")) for m in vocab.merges]
    try:
        model = models.BPE(
            vocab=table,
            merges=merges,
            fuse_unk=False,
            ignore_merges=vocab.pre in _WHOLE_WORD_FIRST,
        )
    except Exception as exc:  # tokenizers raises a bare Exception for a merge naming an unknown token
        raise ModelLoadError(f"tokenizer metadata tokenizer.ggml.merges: {exc}") from exc
    tok = Tokenizer(model)
    split = PRE_SPLITS[vocab.pre]
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tok.decoder = decoders.ByteLevel()
    add_special_tokens(tok, vocab)
    return tok
