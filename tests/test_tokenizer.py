"""GGUF tokenizer against an independent reference: transformers' own GGUF loader.

``transformers.AutoTokenizer.from_pretrained(dir, gguf_file=name)`` builds its
tokenizer from the same metadata with its own code, so identical ids on a
corpus of awkward text (and on hypothesis-generated text) show the
rebuild is faithful. Real models: Qwen2.5 (byte-level BPE, pre "qwen2") and
Gemma 3 (SentencePiece, no prefix space). Llama-2-style SentencePiece (prefix
space, byte fallback) and the Llama 3 / GPT-2 regexes have no real model here,
so small synthetic GGUFs written with ``GGUFWriter`` stand in, checked against
transformers loading the very same files.
"""

from __future__ import annotations

import importlib
import random
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worker_orcd.errors import ErrorCode, InvalidParams, ModelLoadError
from worker_orcd.gguf import ValueType, parse_buffer, parse_file
from worker_orcd.gguf.writer import GGUFWriter
from worker_orcd.tokenizer import GGUFTokenizer, TokenType
from worker_orcd.tokenizer.bpe import BYTE_CHARS
from worker_orcd.tokenizer.spm import derive_merges



def _transformers() -> ModuleType:
    """The oracle. It is a [test] dependency, so a missing one fails the test that needs it, never
    skips it (as in test_engine_hf_parity.py); imported lazily so `-m gpu` runs still collect."""
    try:
        import transformers
    except ImportError as e:
        pytest.fail(f"transformers, this module's oracle, is not installed ({e}): pip install -e '.[test]'")
    return transformers


REPLACEMENT = "\ufffd"


def _random_unicode(seed: int, n: int) -> str:
    """Mixed scripts, emoji, whitespace and digits; no surrogates, no U+FFFD."""
    ranges = [
        (0x20, 0x7E), (0xA0, 0x24F), (0x370, 0x3FF), (0x400, 0x4FF), (0x590, 0x6FF),
        (0x900, 0x97F), (0x3040, 0x30FF), (0x4E00, 0x4FFF), (0xAC00, 0xAD00),
        (0x1F300, 0x1F64F), (0x1F900, 0x1F9FF), (0x10000, 0x1007F), (0x1D400, 0x1D4FF),
    ]
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        r = rng.random()
        if r < 0.08:
            out.append(rng.choice([" ", "  ", "\n", "\t", "\r\n", "\u200d", "\u0301"]))
        elif r < 0.12:
            out.append(str(rng.randrange(10**6)))
        else:
            lo, hi = rng.choice(ranges)
            out.append(chr(rng.randint(lo, hi)))
    return "".join(out)


CORPUS: dict[str, str] = {
    "empty": "",
    "plain": "Hello, World! How are you doing today?",
    "cjk": "你好，世界！こんにちは世界。안녕하세요 세계",
    "accents": "café naïve façade Ångström crème brûlée Œuvre",
    "rtl": "مرحبا بالعالم — שלום עולם",
    "combining": "e\u0301 a\u0308 Z̤͔ͧ̑̓ä͖̭̈̇lͮ̒ͫǫ̗͉ n\u0303",
    "zwj": "a\u200db\u200cc \ufeffbom",
    "emoji": "🎉🔥😀 party 🦩 𝄞 𓀀",
    "emoji_family": "👩‍💻 👨‍👩‍👧‍👦 👍🏽 1️⃣",
    "flags": "🇺🇸🇯🇵🇩🇪 🏳️‍🌈",
    "python": (
        'def main(argv):\n\tif not argv:\n\t\treturn 1\n'
        '    for i, x in enumerate(argv):  # loop\n        print(f"{i}: {x!r}")\n'
    ),
    "c": "#include <stdio.h>\nint main(void) {\n\tprintf(\"%d\\n\", 42);\n\treturn 0;\n}\n",
    "json": '{"key": [1, 2.5, -3e10], "nested": {"a": null, "b": true},\t"s": "x\\ty"}',
    "spaces": "a  b   c    d     e",
    "newlines": "one\n\n\ntwo\n\n\n\n\nthree",
    "crlf": "line1\r\nline2\r\n\r\nline3",
    "trailing": "trailing spaces   ",
    "leading": " leading space",
    "leading_many": "    four leading",
    "only_ws": " \t \n  ",
    "digits": "1234567890 3.14159 2024-01-01 1,000,000 x=12345678901234567890",
    "contractions": "don't I'M we'll they've she'd it's DON'T You'Re",
    "qwen_chat": (
        "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ),
    "qwen_special_inline": "text<|endoftext|>more <|im_start|>x <|im_start",
    "gemma_chat": "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n",
    "gemma_special_inline": "<bos>a<eos>b<pad> <start_of_turn",
    "llama_chat": "<s>[INST] What is 2+2? [/INST] 4</s>",
    "markdown": "# Title\n\n* item **bold** _it_\n\n```py\nx = 1\n```\n| a | b |\n|---|---|\n",
    "mixed_scripts": "English русский ελληνικά हिन्दी ไทย 日本語 한국어",
    "control_chars": "bell\x07 esc\x1b[0m tab\tvt\x0b ff\x0c del\x7f nbsp\xa0end",
    "random_unicode": _random_unicode(4242, 1500),
}


# --- references ------------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf_ref() -> Callable[[Path], Any]:
    """transformers' tokenizer for a GGUF, built once per file (it is slow)."""
    cache: dict[Path, Any] = {}

    def load(path: Path) -> Any:
        if path not in cache:
            cache[path] = _transformers().AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        return cache[path]

    return load


@pytest.fixture(scope="module")
def qwen(qwen05_path: Path) -> GGUFTokenizer:
    return GGUFTokenizer.from_gguf(parse_file(qwen05_path))


@pytest.fixture(scope="module")
def gemma(gemma_path: Path) -> GGUFTokenizer:
    return GGUFTokenizer.from_gguf(parse_file(gemma_path))


# --- synthetic vocabularies ------------------------------------------------------

TRAIN_TEXT = (
    "the quick brown fox jumps over the lazy dog. hello world, hello there! the then there "
    "these those thing things def main(): return 42 café naïve 中文 中文 1234 12345 don't"
)


def _learn_merges(words: list[str], n: int) -> list[tuple[str, str]]:
    """A tiny BPE trainer: the most frequent adjacent pair, n times."""
    seqs = [list(w) for w in words]
    merges: list[tuple[str, str]] = []
    for _ in range(n):
        pairs = Counter((a, b) for s in seqs for a, b in zip(s, s[1:]))
        if not pairs:
            break
        best = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))[0]
        merges.append(best)
        for k, s in enumerate(seqs):
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    out.append(s[i] + s[i + 1])
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            seqs[k] = out
    return merges


def _tokenizer_keys(w: GGUFWriter, *, arch: str = "llama") -> None:
    w.add("general.architecture", arch)
    for key, value in (("context_length", 128), ("embedding_length", 64), ("block_count", 1),
                       ("feed_forward_length", 128), ("attention.head_count", 2)):
        w.add(f"{arch}.{key}", value)


def llama_spm_writer(*, add_space_prefix: bool = True) -> GGUFWriter:
    """A Llama-2-style SentencePiece vocabulary: <unk>/<s>/</s>, 256 byte pieces,
    [INST] controls, learned ▁-pieces with tied scores (three per score level,
    so the tie-break order is exercised), then the single characters."""
    pieces = [a + b for a, b in _learn_merges(["\u2581" + w for w in TRAIN_TEXT.split(" ")], 90)]
    chars = sorted({c for w in TRAIN_TEXT.split(" ") for c in "\u2581" + w})
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), "[INST]", "[/INST]"]
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL, *[TokenType.BYTE] * 256,
             TokenType.CONTROL, TokenType.CONTROL]
    scores = [0.0] * len(tokens)
    for k, piece in enumerate(pieces):
        tokens.append(piece)
        types.append(TokenType.NORMAL)
        scores.append(-float(k // 3))
    for c in chars:
        if c not in tokens:
            tokens.append(c)
            types.append(TokenType.NORMAL)
            scores.append(-1000.0 - len(scores))
    w = GGUFWriter()
    _tokenizer_keys(w)
    w.add("tokenizer.ggml.model", "llama")
    w.add("tokenizer.ggml.tokens", tokens)
    w.add("tokenizer.ggml.scores", scores, element_type=ValueType.FLOAT32)
    w.add("tokenizer.ggml.token_type", [int(t) for t in types], element_type=ValueType.INT32)
    w.add("tokenizer.ggml.bos_token_id", 1)
    w.add("tokenizer.ggml.eos_token_id", 2)
    w.add("tokenizer.ggml.unknown_token_id", 0)
    w.add("tokenizer.ggml.add_bos_token", True)
    w.add("tokenizer.ggml.add_eos_token", False)
    w.add("tokenizer.ggml.add_space_prefix", add_space_prefix)
    return w


UNREACHABLE = "\u0120unreachable"  # a whole word in the vocabulary that no merge builds


def byte_level_writer(pre: str) -> GGUFWriter:
    """A byte-level vocabulary: the 256 byte characters, merges learned on
    GPT-2-spelled words (Ġ = space), Llama 3 style special tokens."""
    spell = {b: c for b, c in enumerate(BYTE_CHARS)}
    words = ["".join(spell[b] for b in (" " + w).encode()) for w in TRAIN_TEXT.split(" ")]
    words += ["".join(spell[b] for b in w.encode()) for w in ("123", "12", "45", "\n\n", "  ")]
    merges = _learn_merges(words, 120)
    tokens = list(BYTE_CHARS) + [a + b for a, b in merges] + [UNREACHABLE]
    types = [TokenType.NORMAL] * len(tokens)
    # <|endoftext|> too: transformers' GPT2Tokenizer mints it as an extra id when it is missing.
    for special in ("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|im_end|>", "<|endoftext|>"):
        tokens.append(special)
        types.append(TokenType.CONTROL)
    w = GGUFWriter()
    _tokenizer_keys(w)
    w.add("tokenizer.ggml.model", "gpt2")
    w.add("tokenizer.ggml.pre", pre)
    w.add("tokenizer.ggml.tokens", tokens)
    w.add("tokenizer.ggml.token_type", [int(t) for t in types], element_type=ValueType.INT32)
    w.add("tokenizer.ggml.merges", [f"{a} {b}" for a, b in merges])
    w.add("tokenizer.ggml.bos_token_id", tokens.index("<|begin_of_text|>"))
    w.add("tokenizer.ggml.eos_token_id", tokens.index("<|end_of_text|>"))
    w.add("tokenizer.ggml.add_bos_token", True)
    return w


def _file(w: GGUFWriter, tmp: Path, name: str) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)  # one file per directory: transformers reads the folder
    return w.write(tmp / name)


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("synthetic_gguf")


@pytest.fixture(scope="module")
def llama_spm_path(synth_dir: Path) -> Path:
    return _file(llama_spm_writer(), synth_dir / "spm", "llama-spm.gguf")


SYNTH_PRES = ("llama-bpe", "qwen2", "default", "gpt2")


@pytest.fixture(scope="module")
def byte_level_paths(synth_dir: Path) -> dict[str, Path]:
    return {pre: _file(byte_level_writer(pre), synth_dir / pre, f"bpe-{pre}.gguf") for pre in SYNTH_PRES}


def _from_writer(w: GGUFWriter) -> GGUFTokenizer:
    return GGUFTokenizer.from_gguf(parse_buffer(w.header_bytes()))


# --- shared checks -----------------------------------------------------------------


def check_against_reference(tok: GGUFTokenizer, ref: Any, text: str) -> list[int]:
    ids = tok.encode(text)
    assert ids == ref.encode(text, add_special_tokens=True), "ids differ with BOS/EOS per metadata"
    bare = tok.encode(text, add_bos=False)
    assert bare == ref.encode(text, add_special_tokens=False), "ids differ without special tokens"
    for skip in (False, True):
        assert tok.decode(ids, skip_special=skip) == ref.decode(ids, skip_special_tokens=skip)
    return ids


def check_stream(tok: GGUFTokenizer, ids: list[int], *, skip_special: bool = False) -> str:
    """Token-at-a-time: no U+FFFD for valid text, and the pieces add up to decode()."""
    stream = tok.stream(skip_special=skip_special)
    pieces = [stream.push(i) for i in ids]
    tail = stream.flush()
    assert all(REPLACEMENT not in p for p in pieces), pieces
    assert tail == ""
    assert "".join(pieces) == tok.decode(ids, skip_special=skip_special)
    return "".join(pieces)


# --- real models: ids and text identical to transformers --------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CORPUS))
def test_qwen2_matches_transformers(qwen: GGUFTokenizer, qwen05_path: Path, gguf_ref: Callable, name: str) -> None:
    text = CORPUS[name]
    ids = check_against_reference(qwen, gguf_ref(qwen05_path), text)
    assert qwen.decode(ids) == text  # byte-level BPE round-trips exactly
    assert check_stream(qwen, ids) == text


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CORPUS))
def test_gemma3_matches_transformers(gemma: GGUFTokenizer, gemma_path: Path, gguf_ref: Callable, name: str) -> None:
    text = CORPUS[name]
    ids = check_against_reference(gemma, gguf_ref(gemma_path), text)
    assert ids[:1] == [gemma.bos_id]
    assert gemma.decode(ids[1:]) == text  # no prefix space, byte fallback: exact round trip
    assert check_stream(gemma, ids[1:]) == text
    check_stream(gemma, ids, skip_special=True)


@pytest.mark.slow
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(st.characters(exclude_categories=("Cs",)), max_size=60))
def test_random_text_matches_transformers(
    qwen: GGUFTokenizer, gemma: GGUFTokenizer, qwen05_path: Path, gemma_path: Path, gguf_ref: Callable, text: str
) -> None:
    for tok, path in ((qwen, qwen05_path), (gemma, gemma_path)):
        ref = gguf_ref(path)
        ids = tok.encode(text, add_bos=False)
        assert ids == ref.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == ref.decode(ids) == text
        stream = tok.stream()
        assert "".join(stream.push(i) for i in ids) + stream.flush() == text


def test_qwen2_splits_digits_one_by_one(qwen: GGUFTokenizer) -> None:
    ids = qwen.encode("12345")
    assert [qwen.token_bytes(i) for i in ids] == [b"1", b"2", b"3", b"4", b"5"]


def test_special_tokens_are_single_ids(qwen: GGUFTokenizer, gemma: GGUFTokenizer) -> None:
    im_start, im_end = qwen.encode("<|im_start|><|im_end|>")
    assert qwen.token_bytes(im_start) == b"<|im_start|>" and qwen.token_bytes(im_end) == b"<|im_end|>"
    start, user = gemma.encode("<start_of_turn>user", add_bos=False)
    assert gemma.token_bytes(start) == b"<start_of_turn>" and gemma.token_bytes(user) == b"user"
    assert gemma.decode([start, user], skip_special=True) == "user"


def test_properties_of_real_models(qwen: GGUFTokenizer, gemma: GGUFTokenizer) -> None:
    assert (qwen.kind, qwen.pre, qwen.vocab_size, qwen.add_bos) == ("gpt2", "qwen2", 151936, False)
    assert qwen.eos_ids == frozenset({151643, 151645})  # <|endoftext|>, <|im_end|>
    assert qwen.bos_id == 151643
    assert (gemma.kind, gemma.vocab_size, gemma.add_bos, gemma.bos_id) == ("llama", 262144, True, 2)
    assert gemma.eos_ids == frozenset({1, 106})  # <eos>, <end_of_turn>
    assert not gemma.strips_leading_space
    assert qwen.encode("") == [] and gemma.encode("") == [2] and gemma.encode("", add_bos=False) == []


# --- streaming detokenizer (SPEC 4247: each SSE "token" event carries text) ------------------


def _assert_partial_then_whole(tok: GGUFTokenizer, text: str) -> None:
    ids = tok.encode(text, add_bos=False)
    partial = [i for i in ids if _is_partial_utf8(tok.token_bytes(i))]
    assert partial, f"test premise: {text!r} should be split inside a character by {tok}"
    stream = tok.stream()
    out = []
    for i in ids:
        piece = stream.push(i)
        assert REPLACEMENT not in piece
        out.append(piece)
    assert "" in out  # at least one push held its bytes back
    assert "".join(out) + stream.flush() == text


def _is_partial_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def test_worker_4247_stream_holds_back_split_emoji_qwen(qwen: GGUFTokenizer) -> None:
    _assert_partial_then_whole(qwen, "ok 𓀀🦩𝄞 done")


def test_worker_4247_stream_holds_back_byte_fallback_gemma(gemma: GGUFTokenizer) -> None:
    _assert_partial_then_whole(gemma, "ok 𓀀𓀁 done")


def test_worker_4247_stream_emits_each_emoji_when_complete(qwen: GGUFTokenizer) -> None:
    """The emoji comes out with the token that completes it, not later."""
    text = "𓀀"
    ids = qwen.encode(text)
    stream = qwen.stream()
    outs = [stream.push(i) for i in ids]
    assert outs[-1] == text and all(o == "" for o in outs[:-1])
    assert stream.flush() == ""


def test_worker_4247_flush_reports_unfinished_bytes(qwen: GGUFTokenizer) -> None:
    """A stream cut inside a character ends in U+FFFD, never silently short."""
    first = qwen.encode("𓀀")[0]
    assert _is_partial_utf8(qwen.token_bytes(first))
    stream = qwen.stream()
    assert stream.push(first) == ""
    assert stream.flush() == REPLACEMENT
    assert qwen.decode([first]) == REPLACEMENT


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=st.lists(st.integers(0, 262143), max_size=40), skip=st.booleans())
def test_stream_equals_decode_for_any_ids(
    gemma: GGUFTokenizer, qwen: GGUFTokenizer, ids: list[int], skip: bool
) -> None:
    """Even for made-up (invalid UTF-8) sequences the stream and decode agree."""
    for tok in (gemma, qwen):
        seq = [i % tok.vocab_size for i in ids]
        stream = tok.stream(skip_special=skip)
        assert "".join(stream.push(i) for i in seq) + stream.flush() == tok.decode(seq, skip_special=skip)


def test_token_bytes(qwen: GGUFTokenizer, gemma: GGUFTokenizer) -> None:
    (space,) = qwen.encode(" ")
    assert qwen.token_bytes(space) == b" "
    assert gemma.bos_id == 2 and gemma.token_bytes(2) == b"<bos>"
    byte_a = next(i for i in range(gemma.vocab_size) if gemma.backend.id_to_token(i) == "<0x41>")
    assert gemma.token_bytes(byte_a) == b"A"
    (hello,) = gemma.encode(" hello", add_bos=False)
    assert gemma.token_bytes(hello) == b" hello"


# --- synthetic Llama-2-style SentencePiece (prefix space, byte fallback) --------------------


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_llama_spm_matches_transformers(llama_spm_path: Path, gguf_ref: Callable, name: str) -> None:
    tok = GGUFTokenizer.from_gguf(parse_file(llama_spm_path))
    text = CORPUS[name]
    ids = check_against_reference(tok, gguf_ref(llama_spm_path), text)
    check_stream(tok, ids)
    check_stream(tok, ids, skip_special=True)


def test_llama_spm_prefix_space_and_byte_fallback(llama_spm_path: Path) -> None:
    tok = GGUFTokenizer.from_gguf(parse_file(llama_spm_path))
    assert tok.kind == "llama" and tok.strips_leading_space and tok.eos_ids == frozenset({2})
    ids = tok.encode("hello 🎉")
    assert ids[0] == 1 and tok.token_bytes(ids[1]) == b" hello"  # prefix space, as "▁hello"
    emoji = ids[-4:]
    assert [tok.token_bytes(i) for i in emoji] == [bytes([b]) for b in "🎉".encode()]  # <0xF0> <0x9F> ...
    assert tok.decode(ids, skip_special=True) == "hello 🎉"  # the added space is dropped again
    assert tok.decode(ids) == "<s> hello 🎉"  # as transformers: it is not the first character then
    stream = tok.stream(skip_special=True)
    assert [stream.push(i) for i in ids] == ["", "hello", " ", "", "", "", "🎉"]
    # Only the text's start gets the prefix space, not the text after a special token.
    inst = tok.encode("[INST]hello", add_bos=False)
    assert tok.token_bytes(inst[0]) == b"[INST]" and tok.token_bytes(inst[1])[:1] != b" "


def _llama_reference_honouring_flags(path: Path) -> Any:
    """transformers' LlamaTokenizer on the file's vocabulary, merges and flags.

    Its GGUF loader hands LlamaTokenizer only the vocabulary and merges, so it
    adds the prefix space even where the file says add_space_prefix=false
    (llama.cpp, which defines the key, honours it). Building the same class
    with the flag passed on keeps transformers as the reference here.
    """
    _transformers()
    mapping = importlib.import_module("transformers.integrations.gguf.gguf_tokenizer_mapping")
    add_gguf_special_tokens, get_gguf_tokenizer, get_merges = (
        mapping.add_gguf_special_tokens,
        mapping.get_gguf_tokenizer,
        mapping.get_merges,
    )

    _, spec, config = get_gguf_tokenizer(str(path))
    ref = _transformers().LlamaTokenizer(
        vocab={t: i for i, t in enumerate(spec["tokens"])},
        merges=get_merges(spec),
        add_prefix_space=spec["add_prefix_space"],
        bos_token=config["bos_token"],
        eos_token=config["eos_token"],
        unk_token=config["unk_token"],
        add_bos_token=config["add_bos_token"],
    )
    return add_gguf_special_tokens(ref, spec)


@pytest.fixture(scope="module")
def llama_spm_noprefix(synth_dir: Path) -> tuple[GGUFTokenizer, Any]:
    path = _file(llama_spm_writer(add_space_prefix=False), synth_dir / "spm-noprefix", "llama-spm-np.gguf")
    return GGUFTokenizer.from_gguf(parse_file(path)), _llama_reference_honouring_flags(path)


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_llama_spm_without_prefix_space(llama_spm_noprefix: tuple[GGUFTokenizer, Any], name: str) -> None:
    tok, ref = llama_spm_noprefix
    assert not tok.strips_leading_space
    ids = check_against_reference(tok, ref, CORPUS[name])
    assert tok.decode(tok.encode(CORPUS[name], add_bos=False)) == CORPUS[name]  # exact round trip
    check_stream(tok, ids)


def test_derived_merges_match_transformers_order() -> None:
    """Same merge list as transformers' generate_merges, ties included."""
    _transformers()
    generate_merges = importlib.import_module("transformers.tokenization_utils_base").generate_merges

    rng = random.Random(7)
    tokens = sorted({"".join(rng.choice("ab▁c") for _ in range(rng.randint(1, 4))) for _ in range(120)})
    rng.shuffle(tokens)
    scores = [float(-(rng.randrange(12))) for _ in tokens]
    ours = derive_merges(tokens, scores)
    theirs = generate_merges({t: i for i, t in enumerate(tokens)}, dict(zip(tokens, scores)))
    assert ours == theirs and len(ours) > 50


# --- synthetic byte-level vocabularies: the pre-tokenizer regexes ------------------------


@pytest.mark.parametrize("pre", SYNTH_PRES)
@pytest.mark.parametrize("name", sorted(CORPUS))
def test_byte_level_pre_matches_transformers(
    byte_level_paths: dict[str, Path], gguf_ref: Callable, pre: str, name: str
) -> None:
    path = byte_level_paths[pre]
    tok = GGUFTokenizer.from_gguf(parse_file(path))
    text = CORPUS[name]
    ids = check_against_reference(tok, gguf_ref(path), text)
    assert tok.decode(tok.encode(text, add_bos=False)) == text
    check_stream(tok, ids)


def test_byte_level_digit_grouping_differs_by_pre(byte_level_paths: dict[str, Path]) -> None:
    """qwen2: one digit per word; llama-bpe: up to three, space apart; gpt2/default: " 12345" is one word."""

    def pieces(pre: str) -> list[bytes]:
        tok = GGUFTokenizer.from_gguf(parse_file(byte_level_paths[pre]))
        return [tok.token_bytes(i) for i in tok.encode(" 12345", add_bos=False)]

    assert pieces("qwen2") == [b" ", b"1", b"2", b"3", b"4", b"5"]
    assert pieces("llama-bpe") == [b" ", b"123", b"45"]
    assert pieces("gpt2") == pieces("default") == [b" 12345"]


def test_llama_bpe_takes_whole_words_from_vocab(byte_level_paths: dict[str, Path]) -> None:
    """Llama 3 (ignore_merges, as its tokenizer.json and llama.cpp): a word that
    is in the vocabulary is one token even if no merge builds it. transformers'
    GGUF loader drops that flag, so this case is checked on its own."""
    llama3 = GGUFTokenizer.from_gguf(parse_file(byte_level_paths["llama-bpe"]))
    qwen2 = GGUFTokenizer.from_gguf(parse_file(byte_level_paths["qwen2"]))
    (whole,) = llama3.encode(" unreachable", add_bos=False)
    assert llama3.token_bytes(whole) == b" unreachable"
    assert len(qwen2.encode(" unreachable", add_bos=False)) > 1
    # eos_token_id plus the end-of-turn names present in the vocabulary (any family's)
    names = ("<|end_of_text|>", "<|eot_id|>", "<|im_end|>", "<|endoftext|>")
    assert llama3.eos_ids == frozenset(llama3.encode(n, add_bos=False)[0] for n in names)


# --- bad input: typed errors, never a fallback --------------------------------------------


def _set(
    w: GGUFWriter, key: str, value: Any, vtype: ValueType | None = None, element_type: ValueType | None = None
) -> GGUFWriter:
    w.kv = [kv for kv in w.kv if kv[0] != key]
    if value is not None:
        w.add(key, value, vtype, element_type)
    return w


def _load_error(w: GGUFWriter) -> ModelLoadError:
    with pytest.raises(ModelLoadError) as info:
        _from_writer(w)
    assert info.value.code is ErrorCode.MODEL_LOAD_FAILED
    return info.value


def test_worker_4310_unknown_pre_names_value_and_supported() -> None:
    """SPEC 4620-4623 spirit: name what was given and what is supported; no silent fallback."""
    msg = str(_load_error(byte_level_writer("mystery-bpe")))
    assert "'mystery-bpe'" in msg and "tokenizer.ggml.pre" in msg
    for supported in ("qwen2", "llama-bpe", "default", "gpt2"):
        assert supported in msg


def test_worker_4310_unknown_tokenizer_model() -> None:
    msg = str(_load_error(_set(byte_level_writer("qwen2"), "tokenizer.ggml.model", "bert")))
    assert "'bert'" in msg and "gpt2" in msg and "llama" in msg
    assert "missing" in str(_load_error(_set(byte_level_writer("qwen2"), "tokenizer.ggml.model", None)))


@pytest.mark.parametrize(
    ("key", "value", "vtype", "etype", "expect"),
    [
        ("tokenizer.ggml.tokens", None, None, None, "tokenizer.ggml.tokens: missing"),
        ("tokenizer.ggml.tokens", [1, 2], None, ValueType.INT32, "array of strings"),
        ("tokenizer.ggml.token_type", [1, 1, 1], None, ValueType.INT32, "one per token"),
        ("tokenizer.ggml.bos_token_id", 10**6, None, None, "outside the vocabulary"),
        ("tokenizer.ggml.bos_token_id", None, None, None, "bos_token_id: missing although add_bos_token"),
        ("tokenizer.ggml.eos_token_id", "x", None, None, "must be an integer"),
        ("tokenizer.ggml.add_bos_token", 1, ValueType.UINT8, None, "must be a boolean"),
        ("tokenizer.ggml.pre", 7, None, None, "must be a string"),
    ],
)
def test_worker_4310_bad_spm_metadata(
    key: str, value: Any, vtype: ValueType | None, etype: ValueType | None, expect: str
) -> None:
    err = _load_error(_set(llama_spm_writer(), key, value, vtype, etype))
    assert expect in str(err) and key in str(err)


def _value(w: GGUFWriter, key: str) -> Any:
    return next(kv[2] for kv in w.kv if kv[0] == key)


def test_worker_4310_bad_token_type_value() -> None:
    w = llama_spm_writer()
    types = [9, *_value(w, "tokenizer.ggml.token_type")[1:]]
    err = _load_error(_set(w, "tokenizer.ggml.token_type", types, element_type=ValueType.INT32))
    assert "unknown token type 9" in str(err)


def test_worker_4310_nan_score() -> None:
    w = llama_spm_writer()
    scores = [float("nan")] * len(_value(w, "tokenizer.ggml.scores"))
    assert "NaN" in str(_load_error(_set(w, "tokenizer.ggml.scores", scores, element_type=ValueType.FLOAT32)))


@pytest.mark.parametrize(
    ("merges", "expect"),
    [
        (None, "needs its merges"),
        (["a b c"], "not two tokens"),
        (["a"], "not two tokens"),
        (["zz qq"], "out of vocabulary"),
    ],
)
def test_worker_4310_bad_merges(merges: list[str] | None, expect: str) -> None:
    assert expect in str(_load_error(_set(byte_level_writer("qwen2"), "tokenizer.ggml.merges", merges)))


def test_worker_4300_bad_text_and_ids(llama_spm_path: Path) -> None:
    tok = GGUFTokenizer.from_gguf(parse_file(llama_spm_path))
    for bad_text in (b"bytes", None, "lone \ud800 surrogate"):
        with pytest.raises(InvalidParams) as info:
            tok.encode(bad_text)  # type: ignore[arg-type]
        assert info.value.code is ErrorCode.INVALID_PARAMS
    for bad_id in (-1, tok.vocab_size, True, 1.0, "3"):
        with pytest.raises(InvalidParams):
            tok.decode([bad_id])  # type: ignore[list-item]
        with pytest.raises(InvalidParams):
            tok.stream().push(bad_id)  # type: ignore[arg-type]


def test_integer_like_ids_are_accepted(llama_spm_path: Path) -> None:
    import numpy as np
    tok = GGUFTokenizer.from_gguf(parse_file(llama_spm_path))
    ids = tok.encode("hello world")
    assert tok.decode([np.int64(i) for i in ids]) == tok.decode(ids) == "<s> hello world"
