"""The tokenizer donor the GPU runs carry must encode exactly like the real model it came from."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from worker_orcd.gguf import parse_file
from worker_orcd.tokenizer import GGUFTokenizer

REPO = Path(__file__).resolve().parents[1]


def test_donor_holds_the_real_tokenizer(qwen05_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "donor.gguf"
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_tokenizer_donor.py"), str(qwen05_path), str(out)], check=True)
    real, donor = parse_file(qwen05_path), parse_file(out)
    assert not donor.tensors and out.stat().st_size < 16 << 20
    for key, value in real.metadata.items():
        if key.startswith("tokenizer."):
            assert donor.metadata[key] == value and donor.value_types[key] == real.value_types[key], key
    text = "def f(x):\n    return x ** 2  # π ≈ 3.14 🚀 <|im_start|>"
    assert GGUFTokenizer.from_gguf(donor).encode(text) == GGUFTokenizer.from_gguf(real).encode(text)
