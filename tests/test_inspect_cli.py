"""`worker-orcd inspect|pull|sign|keygen` as an operator runs them: a real process, exit codes, output."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from worker_orcd import __version__
from worker_orcd.cli import build_parser, main
from worker_orcd.gguf import GGMLType
from worker_orcd.gguf.writer import GGUFWriter, tensor_nbytes
from worker_orcd.inspect import default_root_for

REPO = Path(__file__).resolve().parents[1]
QWEN05_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"


def cli(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker_orcd", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess[str], code: str, needle: str) -> str:
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"worker-orcd: error: {code}: "), lines[0]
    assert needle in lines[0]
    assert proc.stdout == ""
    return lines[0]


def write_model(path: Path, gtype: GGMLType = GGMLType.Q8_0, **meta: Any) -> Path:
    w = GGUFWriter()
    base: dict[str, Any] = {
        "general.architecture": "llama",
        "general.name": "tiny",
        "llama.block_count": 2,
        "llama.context_length": 512,
        "llama.embedding_length": 256,
        "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": [4, 1],
        "llama.rope.freq_base": 10000.0,
        "llama.attention.layer_norm_rms_epsilon": 1e-5,
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": ["a", "b", "c"],
        **meta,
    }
    for key, value in base.items():
        w.add(key, value)
    w.add_tensor("token_embd.weight", (256, 3), gtype, bytes(tensor_nbytes((256, 3), gtype)))
    w.add_tensor("output_norm.weight", (256,), GGMLType.F32, bytes(1024))
    return w.write(path)


# --- inspect on the real 0.5B model ---------------------------------------------------------


@pytest.mark.slow
def test_worker_4320_inspect_json_real_model(qwen05_path: Path) -> None:
    proc = cli("inspect", qwen05_path, "--json", "--expected-sha256", QWEN05_SHA256)
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(proc.stdout)
    assert list(rep) == [
        "model_ref", "path", "source_kind", "size", "sha256", "signature", "gguf_version", "metadata_keys",
        "architecture", "name", "file_type", "hyperparameters", "tokenizer", "tensors", "mcd", "ecp", "match",
        "vram_plan",
    ]  # fmt: skip
    # the real 0.5B Q4_K_M-ish file stays quantized: resident bytes within 5% of its tensor bytes
    assert rep["vram_plan"]["weights_bytes_quantized"] <= 1.05 * rep["vram_plan"]["file_tensor_bytes"]
    assert rep["vram_plan"]["resident_weights"] == "dense"  # the default: dequantized once at load
    assert rep["sha256"] == QWEN05_SHA256 and rep["size"] == qwen05_path.stat().st_size
    assert (rep["architecture"], rep["signature"], rep["gguf_version"]) == ("qwen2", "unsigned", 3)
    hp = rep["hyperparameters"]
    assert (hp["block_count"], hp["embedding_length"], hp["feed_forward_length"]) == (24, 896, 4864)
    assert (hp["head_count"], hp["head_count_kv"], hp["head_dim"]) == (14, 2, 64)
    assert hp["rope_freq_base"] == 1000000.0 and hp["rms_norm_eps"] == 1e-06 and hp["context_length"] == 32768
    assert hp["sliding_window"] is None
    tok = rep["tokenizer"]
    assert (tok["model"], tok["pre"], tok["vocab_size"], tok["merges"]) == ("gpt2", "qwen2", 151936, 151387)
    assert tok["chat_template"] is True
    types = {t["type"]: t["count"] for t in rep["tensors"]["types"]}
    assert types == {"F32": 121, "Q4_K": 12, "Q5_0": 133, "Q6_K": 12, "Q8_0": 13}
    assert [t["type"] for t in rep["tensors"]["types"]] == sorted(types)
    assert rep["tensors"]["count"] == 291
    assert sum(t["bytes"] for t in rep["tensors"]["types"]) == rep["tensors"]["bytes"]
    assert rep["mcd"]["positional"] == "rope_neox" and rep["mcd"]["attention"] == "gqa"
    assert rep["match"] == {"accepted": True, "rejections": []}


@pytest.mark.slow
def test_worker_4320_inspect_human_real_model(qwen05_path: Path) -> None:
    proc = cli("inspect", qwen05_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"  sha256        {QWEN05_SHA256}\n" in out
    assert "  architecture  qwen2\n" in out
    assert "  head_count_kv        2\n" in out
    assert "  rms_norm_eps         1e-06\n" in out
    assert "  Q5_0  133 tensors  " in out
    assert "  attention     gqa\n" in out
    assert out.rstrip().endswith("capability: accepted by this engine (MCD within ECP)")


# --- inspect: refusals are one line, exit 1 ----------------------------------------------------


def test_worker_4312_inspect_corrupt_file_one_line_error(tmp_path: Path) -> None:
    path = write_model(tmp_path / "m.gguf")
    path.write_bytes(path.read_bytes()[:200])
    line = assert_one_line_error(cli("inspect", path), "MODEL_LOAD_FAILED", "invalid GGUF: ")
    assert "at byte offset" in line


def test_worker_4312_inspect_not_gguf(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    assert_one_line_error(cli("inspect", path, "--json"), "MODEL_LOAD_FAILED", "not a GGUF file (bad magic number) (expected b'GGUF', found b'hell')")


def test_worker_4321_inspect_digest_mismatch(tmp_path: Path) -> None:
    path = write_model(tmp_path / "m.gguf")
    assert_one_line_error(cli("inspect", path, "--expected-sha256", "ab" * 32), "MODEL_LOAD_FAILED", "SHA-256 mismatch")


def test_worker_4341_inspect_with_model_root_confines(tmp_path: Path) -> None:
    (tmp_path / "root").mkdir()
    path = write_model(tmp_path / "m.gguf")
    assert_one_line_error(
        cli("inspect", path, "--model-root", tmp_path / "root"), "MODEL_LOAD_FAILED", "outside the model root"
    )


def test_worker_4340_inspect_missing_file(tmp_path: Path) -> None:
    assert_one_line_error(cli("inspect", tmp_path / "nope.gguf"), "MODEL_LOAD_FAILED", "not found")
    line = assert_one_line_error(cli("inspect", tmp_path / "no-dir" / "m.gguf"), "MODEL_LOAD_FAILED", "not found")
    assert "--model-root" not in line  # the operator gave no root; don't blame one


def test_worker_4983_inspect_usage_errors_exit_2(tmp_path: Path) -> None:
    proc = cli("inspect", tmp_path / "m.gguf", "--expected-sha256", "xyz")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--expected-sha256 must be a SHA-256 digest of 64 hex characters" in proc.stderr
    assert cli("inspect").returncode == 2
    assert cli("frobnicate").returncode == 2


# --- inspect: rejected models are reported, not errors -----------------------------------------


def test_worker_4622_inspect_reports_rejections(tmp_path: Path) -> None:
    path = write_model(tmp_path / "m.gguf", gtype=GGMLType.IQ2_XS, **{"llama.context_length": 1 << 20})
    proc = cli("inspect", path, "--json")
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(proc.stdout)
    assert rep["mcd"]["attention"] == "gqa"  # per-layer kv heads [4, 1]
    assert rep["match"]["accepted"] is False
    assert [r["rule"] for r in rep["match"]["rejections"]] == ["context", "quant_all"]
    assert rep["match"]["rejections"][0]["message"] == (
        'model "tiny" needs context_max 1048576; this engine supports up to 131072'
    )
    human = cli("inspect", path).stdout
    assert "capability: REJECTED by this engine\n" in human
    assert '  - [context] model "tiny" needs context_max 1048576; this engine supports up to 131072\n' in human
    assert re.search(r"^  head_count_kv +\[4, 1\] \(per layer\)$", human, re.M)


def test_worker_4600_inspect_human_alignment(tmp_path: Path) -> None:
    out = cli("inspect", write_model(tmp_path / "m.gguf")).stdout
    section = out.split("hyper-parameters\n")[1].split("tokenizer\n")[0].splitlines()
    assert section and len({line.index(line.split()[1]) for line in section}) == 1  # one value column
    # float32 metadata shown as written (1e-05), not as its double expansion 9.999999747378752e-06
    assert any(re.fullmatch(r"  rms_norm_eps +1e-05", line) for line in section)


def test_worker_4312_inspect_escapes_terminal_control_from_file(tmp_path: Path) -> None:
    path = write_model(tmp_path / "m.gguf", **{"general.name": "evil\x1b]0;pwned\x07", "tokenizer.ggml.pre": "a\rb"})
    proc = cli("inspect", path)
    assert proc.returncode == 0, proc.stderr
    assert "\x1b" not in proc.stdout and "\r" not in proc.stdout and "\x07" not in proc.stdout
    assert re.search(r"^  pre +a\\rb$", proc.stdout, re.M)
    assert json.loads(cli("inspect", path, "--json").stdout)["name"] == "evil\x1b]0;pwned\x07"


# --- sign / keygen / pull / version ------------------------------------------------------------


def test_worker_4330_keygen_sign_then_inspect_verified(tmp_path: Path) -> None:
    priv, pub = tmp_path / "k.pem", tmp_path / "k.pub"
    proc = cli("keygen", "--private-out", priv, "--public-out", pub)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ed25519:") and (priv.stat().st_mode & 0o777) == 0o600
    model = write_model(tmp_path / "m.gguf")
    proc = cli("sign", model, "--private-key", priv)
    assert proc.returncode == 0 and proc.stdout.strip() == f"{model}.sig"
    rep = json.loads(cli("inspect", model, "--model-public-key", pub, "--json").stdout)
    assert rep["signature"] == "verified"
    model.write_bytes(model.read_bytes() + b"\0" * 32)
    assert_one_line_error(cli("inspect", model, "--model-public-key", pub), "MODEL_LOAD_FAILED", "does not verify")
    assert_one_line_error(
        cli("keygen", "--private-out", priv, "--public-out", tmp_path / "new.pub"), "INVALID_PARAMS", "already exists"
    )


def test_worker_4950_pull_unknown_model_one_line(tmp_path: Path) -> None:
    proc = cli("pull", "no-such-model", "--dest", tmp_path)
    assert_one_line_error(proc, "NOT_FOUND", "unknown model 'no-such-model'")


def test_worker_4980_main_in_process() -> None:
    assert main(["--version"]) == 0
    assert main([]) == 2
    assert main(["pull"]) == 2  # NAME required unless --list
    assert main(["pull", "--list"]) == 0
    assert build_parser().parse_args(["inspect", "m.gguf", "--json"]).json is True


def test_worker_4980_version() -> None:
    proc = cli("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"worker-orcd {__version__}"


# --- default root ------------------------------------------------------------------------------


def test_worker_4340_default_root_is_model_directory(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    target = write_model(tmp_path / "real" / "m.gguf")
    (tmp_path / "link.gguf").symlink_to(target)
    assert default_root_for(str(tmp_path / "link.gguf")) == (str(target), target.parent)
    assert default_root_for(f"file://{target}") == (f"file://{target}", target.parent)
    ref, _ = default_root_for("shm:segment")
    assert ref == "shm:segment"
