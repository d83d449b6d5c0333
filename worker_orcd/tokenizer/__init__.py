"""GGUF metadata -> tokenizers.Tokenizer; UTF-8-safe streaming detokenizer."""

from .gguf_tokenizer import GGUFTokenizer
from .stream import StreamingDetokenizer
from .vocab import GGUFVocab, TokenType, read_vocab

__all__ = ["GGUFTokenizer", "GGUFVocab", "StreamingDetokenizer", "TokenType", "read_vocab"]
