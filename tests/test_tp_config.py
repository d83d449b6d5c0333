"""Tensor-parallel settings (README "Tensor parallel"): validated up front, one clear line each (exit 2)."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker_orcd.config import ConfigError, load_config
from worker_orcd.serve import model_commit, tp_spec


def _secret(tmp: Path, text: str = "s" * 32, mode: int = 0o600, name: str = "group.secret") -> Path:
    path = tmp / name
    path.write_text(text)
    path.chmod(mode)
    return path


def _tp(tmp: Path, **over: object) -> dict[str, object]:
    flags: dict[str, object] = {
        "worker_id": "w1", "device": "cpu", "model": "m.gguf", "tp_degree": "2", "tp_rank": "1",
        "tp_group_id": "g1", "tp_members": "w0,w1", "tp_master": "127.0.0.1:29500",
        "tp_secret_file": str(_secret(tmp)),
    }
    flags.update(over)
    return {k: v for k, v in flags.items() if v is not None}


def test_tp_config_valid_group_gives_this_ranks_spec_and_shard(tmp_path: Path) -> None:
    cfg = load_config(_tp(tmp_path), env={})
    spec = tp_spec(cfg)
    assert spec is not None and spec.rank == 1 and spec.members == ("w0", "w1") and spec.secret == b"s" * 32
    assert (spec.master_host, spec.master_port, spec.timeout_s) == ("127.0.0.1", 29500, 60.0)
    commit = model_commit(cfg)
    assert (commit.shard_id, commit.shard_index, commit.total_shards) == ("g1-shard1of2", 1, 2)
    assert tp_spec(load_config({"worker_id": "w"}, env={})) is None


def test_tp_config_accepts_cuda_ranks(tmp_path: Path) -> None:
    """The NCCL path ran on two H200s (tests/test_tp_gpu.py): --device cuda is a valid member."""
    cfg = load_config(_tp(tmp_path, device="cuda", gpu_device="1"), env={})
    assert cfg.device == "cuda" and tp_spec(cfg) is not None
    # the quantized residency splits the GGUF blocks (engine/shard.py); a cut block is refused at load
    assert load_config(_tp(tmp_path, device="cuda", resident_weights="quantized"), env={}).resident_weights == "quantized"


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"tp_degree": None, "tp_rank": None}, "need(s) tp_degree > 1"),
        ({"tp_master": None}, "needs tp_master"),
        ({"tp_rank": "2"}, "tp_rank 2 must be below tp_degree 2"),
        ({"tp_members": "w0,w2"}, "names 'w2' as rank 1, but this worker is 'w1'"),
        ({"tp_members": "w0,w1,w2"}, "must list 2 distinct worker ids"),
        ({"tp_master": "127.0.0.1"}, "tp_master (--tp-master): must be HOST:PORT"),
        ({"model": None}, "rank 1 needs --model: a member serves no API"),
    ],
)
def test_tp_config_errors_name_the_rule(tmp_path: Path, over: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(_tp(tmp_path, **over), env={})
    assert message in str(e.value)


@pytest.mark.parametrize(("text", "mode", "message"), [("short", 0o600, "at least 16"), ("s" * 32, 0o644, "chmod 600")])
def test_tp_config_secret_file_checked(tmp_path: Path, text: str, mode: int, message: str) -> None:
    flags = _tp(tmp_path, tp_secret_file=str(_secret(tmp_path, text, mode, "bad.secret")))
    with pytest.raises(ConfigError, match=message):
        load_config(flags, env={})
