"""Special and user-defined tokens, matched whole in text.

A prompt like ``<|im_start|>user`` must give the single control id the model
was trained on, never the pieces of its spelling; tokenizers' added-token
matcher does that before the model sees the text.
"""

from __future__ import annotations

from tokenizers import AddedToken, Tokenizer

from .vocab import GGUFVocab, TokenType


def add_special_tokens(tok: Tokenizer, vocab: GGUFVocab) -> None:
    """Match special and user-defined tokens whole, before the model sees the text.

    Both kinds are matched on raw (unnormalized) text; only the special ones are
    dropped by ``skip_special``. A token is added only where its text already
    names its own id in the model, so no new id is ever minted; the rest (the
    whitespace tokens ``spm`` re-spells) are produced by the model itself.
    """

    specials = vocab.special_ids

    def own(i: int) -> bool:
        return tok.token_to_id(vocab.tokens[i]) == i

    tok.add_special_tokens(
        [AddedToken(vocab.tokens[i], special=True, normalized=False) for i in sorted(specials) if own(i)]
    )
    tok.add_tokens(
        [
            AddedToken(token, special=False, normalized=False)
            for i, token in enumerate(vocab.tokens)
            if vocab.types[i] == TokenType.USER_DEFINED and i not in specials and own(i)
        ]
    )
