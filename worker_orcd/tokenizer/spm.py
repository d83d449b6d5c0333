"""SentencePiece-style BPE (``tokenizer.ggml.model == "llama"``): Llama 2,
TinyLlama, Mistral, Gemma.

SentencePiece BPE repeatedly joins the adjacent pair whose joined piece ranks
best. The file stores pieces and their rank (scores, or for Gemma the order of
the pieces) but no merge list, so the merges are recovered from the vocabulary:
every way of cutting a piece into two pieces that both exist is a merge, ranked
by the piece it makes. That is the construction transformers' GGUF loader uses,
so ids match it exactly. Spaces become ``▁``; characters with no piece fall
back to ``<0xXX>`` byte pieces.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from ..errors import ModelLoadError
from .specials import add_special_tokens
from .vocab import GGUFVocab

SPACE = "\u2581"  # ▁, SentencePiece's visible space
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def respelled(tokens: Sequence[str]) -> list[str]:
    """llama.cpp stores runs of ▁ (Gemma's indentation pieces) as real spaces,
    so it can match them whole; the model sees ``▁`` and needs them spelled so."""
    return [SPACE * len(t) if " " in t and not t.strip() else t for t in tokens]


def merge_rank_keys(vocab: GGUFVocab) -> Sequence[float]:
    """Higher joins first. Gemma's scores do not follow its merge order, the
    order of the pieces does; elsewhere the score is the rank (and position
    when a file has no scores)."""
    gemma = bool(vocab.architecture and vocab.architecture.startswith("gemma"))
    if gemma or vocab.scores is None:
        return [-float(i) for i in range(len(vocab.tokens))]
    return vocab.scores


def derive_merges(tokens: Sequence[str], rank: Sequence[float]) -> list[tuple[str, str]]:
    """Every (left, right) cut of a piece into two pieces, best first.

    Order: the joined piece's rank, then the longer left part, then the longer
    right part, then vocabulary order. Where a text occurs twice the later id
    wins, as in every loader.
    """
    ids: dict[str, int] = {}
    for i, token in enumerate(tokens):
        ids[token] = i
    keys = list(ids)  # first-seen order breaks ties
    by_rank = sorted(range(len(keys)), key=lambda k: -rank[ids[keys[k]]])
    merges: list[tuple[str, str]] = []
    start = 0
    while start < len(by_rank):
        level = rank[ids[keys[by_rank[start]]]]
        end = start + 1
        while end < len(by_rank) and rank[ids[keys[by_rank[end]]]] == level:
            end += 1
        tied: list[tuple[int, int, int, str, str]] = []
        for pos in range(start, end):
            piece = keys[by_rank[pos]]
            for cut in range(len(piece) - 1, 0, -1):  # longer left part first
                left, right = piece[:cut], piece[cut:]
                if left in ids and right in ids:
                    tied.append((-cut, cut - len(piece), pos, left, right))
        if end - start > 1:
            tied.sort()
        merges.extend((left, right) for *_, left, right in tied)
        start = end
    return merges


def piece_bytes(vocab: GGUFVocab) -> list[bytes]:
    """The bytes each token stands for: ``<0xXX>`` is that byte, ``▁`` a space."""
    out: list[bytes] = []
    for token in vocab.tokens:
        m = _BYTE_PIECE.fullmatch(token)
        out.append(bytes((int(m.group(1), 16),)) if m else token.replace(SPACE, " ").encode("utf-8"))
    return out


def build_sentencepiece(vocab: GGUFVocab) -> Tokenizer:
    tokens = respelled(vocab.tokens)
    table = {token: i for i, token in enumerate(tokens)}
    if vocab.merges is not None:
        merges = [tuple(m.split(" ")) for m in vocab.merges]
    else:
        merges = derive_merges(tokens, merge_rank_keys(vocab))
    try:
        model = models.BPE(
            vocab=table,
            merges=merges,
            unk_token=None if vocab.unk_id is None else tokens[vocab.unk_id],
            fuse_unk=True,
            byte_fallback=True,
        )
    except Exception as exc:  # tokenizers raises a bare Exception for a merge naming an unknown token
        raise ModelLoadError(f"tokenizer metadata tokenizer.ggml.merges: {exc}") from exc
    tok = Tokenizer(model)
    # "first": the prefix space goes before the text only, not after every special token.
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement=SPACE, prepend_scheme="first" if vocab.add_space_prefix else "never", split=False
    )
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if vocab.add_space_prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(steps)
    add_special_tokens(tok, vocab)
    return tok
