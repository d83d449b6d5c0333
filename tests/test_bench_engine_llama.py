"""benchmarks/bench_engine.py's llama-bench leg: the JSON it parses (llama.cpp 0c1e570's
``json_printer``: one object per test with n_prompt, n_gen, avg_ts, ...) and what it refuses."""

from __future__ import annotations

import importlib.util
import json
import stat
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _bench_engine():  # noqa: ANN202 - a module loaded from benchmarks/
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location("bench_engine", REPO / "benchmarks" / "bench_engine.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _record(n_prompt: int, n_gen: int, ts: float) -> dict[str, object]:
    return {"model_type": "qwen2 7B Q4_K - Medium", "n_prompt": n_prompt, "n_gen": n_gen, "n_depth": 0,
            "avg_ns": 1, "stddev_ns": 0, "avg_ts": ts, "stddev_ts": 0.5, "samples_ns": [1], "samples_ts": [ts]}


def test_llama_bench_json_gives_pp_and_tg() -> None:
    be = _bench_engine()
    out = json.dumps([_record(512, 0, 11234.5), _record(0, 128, 257.25)], indent=2)
    assert be.parse_llama_bench(out) == {"pp": 11234.5, "tg": 257.25}


@pytest.mark.parametrize("records", [[_record(512, 0, 1.0)], [_record(0, 128, 1.0)], [_record(512, 128, 1.0)], []])
def test_llama_bench_without_both_tests_is_an_error(records: list[dict[str, object]]) -> None:
    with pytest.raises(ValueError, match="lacks"):
        _bench_engine().parse_llama_bench(json.dumps(records))


def test_llama_bench_failure_is_reported(tmp_path: Path) -> None:
    """A llama-bench that exits non-zero (no GPU, a file it cannot load) fails the row with its stderr."""
    fake = tmp_path / "llama-bench"
    fake.write_text("#!/bin/sh\necho 'error: failed to load model' >&2\nexit 3\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    with pytest.raises(RuntimeError, match="exited 3: error: failed to load model"):
        _bench_engine().llama_bench(str(fake), tmp_path / "m.gguf", 512, 128)
    with pytest.raises(json.JSONDecodeError):
        _bench_engine().parse_llama_bench("not json")
