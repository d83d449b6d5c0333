"""Tensor parallel planning and commit (issue 12, SPEC 4210-4226, 4500): /worker/plan's shard_plan and
/worker/commit's shard_index/total_shards. CPU only; the real Qwen2.5-Coder-0.5B header for the numbers.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_http_fakes import TOKEN_A, WorkerHarness

from worker_orcd.config import WorkerConfig, load_config
from worker_orcd.errors import ModelLoadError
from worker_orcd.lifecycle import Worker
from worker_orcd.serve import real_binding

REPO = Path(__file__).resolve().parents[1]
KV_MB = 64  # the README example's --kv-cache-size-mb
# /worker/plan of the real 0.5B on --device cpu --kv-cache-size-mb 64, computed by main at 7446f60
# (before tensor-parallel planning existed): T=1 must not move.
SINGLE_0_5B = {"vram_required": 3315731312, "weights_bytes": 2520669696, "kv_cache_bytes": 67239936,
               "scratch_bytes": 407628032, "margin_bytes": 320193648, "max_seq_len": 2720}
SPLIT = ("attn_q.", "attn_k.", "attn_v.", "ffn_gate.", "ffn_up.", "attn_output.", "ffn_down.")


def _secret(tmp: Path) -> Path:
    path = tmp / "g1.secret"
    path.write_text("s" * 32)
    path.chmod(0o600)
    return path


def _tp_flags(tmp: Path, rank: int = 0) -> dict[str, Any]:
    return {"tp_degree": 2, "tp_rank": rank, "tp_group_id": "g1", "tp_members": "w-test,w1",
            "tp_master": "127.0.0.1:29555", "tp_secret_file": str(_secret(tmp))}


def _config(tmp: Path, model_root: Path, **over: Any) -> WorkerConfig:
    token = tmp / "token"
    token.write_text(TOKEN_A + "\n")
    token.chmod(0o600)
    flags = {"worker_id": "w-test", "device": "cpu", "model_root": str(model_root), "api_token_file": str(token),
             "kv_cache_size_mb": KV_MB, **over}
    return load_config(flags, env={})


def _plan(config: WorkerConfig, model: str, *degrees: int) -> list[dict[str, Any] | Exception]:
    """Worker.plan (what the route calls) with the real CPU engine, one answer per degree."""

    async def run() -> list[dict[str, Any] | Exception]:
        worker = Worker(config, real_binding(config))
        await worker.open_device()
        out: list[dict[str, Any] | Exception] = []
        for t in degrees:
            try:
                out.append(await worker.plan(model, t))
            except ModelLoadError as e:
                out.append(e)
        return out

    return asyncio.run(run())


@pytest.fixture(scope="module")
def real_plans(qwen05_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, Any]:
    """Plans at T = 1, 2, 3, 4 from rank 0 of a group of 2 (T=2 is this worker's own degree)."""
    tmp = tmp_path_factory.mktemp("tp-plan")
    config = _config(tmp, qwen05_path.parent, **_tp_flags(tmp))
    return dict(zip((1, 2, 3, 4), _plan(config, qwen05_path.name, 1, 2, 3, 4), strict=True))


def _tensor_bytes(path: Path, itemsize: int) -> tuple[int, int]:
    """(split, replicated) dense bytes of the file's tensors, classified by name here, not by the code under test."""
    from worker_orcd.gguf import parse_file

    split = replicated = 0
    for t in parse_file(path).tensors:
        n = 1
        for d in t.shape:
            n *= d
        if any(t.name.split(".", 2)[-1].startswith(p) for p in SPLIT):
            split += n * itemsize
        else:
            replicated += n * itemsize
    return split, replicated


def test_tp_plan_degree_1_equals_the_single_device_plan(real_plans: dict[int, Any]) -> None:
    one = real_plans[1]
    assert one["vram_required"] == SINGLE_0_5B["vram_required"]
    assert {k: one["plan"][k] for k in SINGLE_0_5B if k != "vram_required"} == {
        k: v for k, v in SINGLE_0_5B.items() if k != "vram_required"
    }
    assert len(one["shard_plan"]) == 1 and one["shard_plan"][0]["vram_bytes"] == SINGLE_0_5B["vram_required"]
    assert one["shard_plan"][0]["load_peak_bytes"] == SINGLE_0_5B["vram_required"]
    # rank 0 of a group of 2 cannot hold a single-device model: a reason, with the numbers
    assert one["feasible"] is False and any("--tp-degree 2" in r for r in one["reasons"])


def test_tp_plan_degree_2_splits_weights_and_kv_exactly(real_plans: dict[int, Any], qwen05_path: Path) -> None:
    one, two = real_plans[1], real_plans[2]
    split, replicated = _tensor_bytes(qwen05_path, itemsize=4)  # CPU development mode: float32
    assert two["reasons"] == [] or all("bytes" in r for r in two["reasons"])  # only memory could say no
    ranks = two["shard_plan"]
    assert [r["shard_index"] for r in ranks] == [0, 1]
    assert ranks[0]["gpu_device"] == 0 and ranks[1]["gpu_device"] is None  # this worker is rank 0
    assert sum(r["weights_sharded_bytes"] for r in ranks) == split  # the split part, once over the group
    assert all(r["weights_replicated_bytes"] == replicated for r in ranks)  # the rest, whole on every rank
    assert one["shard_plan"][0]["weights_sharded_bytes"] + one["shard_plan"][0]["weights_replicated_bytes"] == (
        split + replicated
    )
    for r in ranks:
        assert r == ranks[0] | {"shard_index": r["shard_index"], "gpu_device": r["gpu_device"]}  # an even split
        assert r["kv_cache_bytes"] * 2 == one["plan"]["kv_cache_bytes"]  # KV heads 2 -> 1 per rank
        # the aligned arena: at least the bytes, at most one alignment step per resident slot more
        assert split // 2 + replicated <= r["weights_bytes"] <= split // 2 + replicated + 256 * 24 * 10
        assert r["weights_bytes"] < 0.75 * one["plan"]["weights_bytes"]
        p = two["plan"]
        assert r["vram_bytes"] == p["weights_bytes"] + p["kv_cache_bytes"] + p["scratch_bytes"] + p["margin_bytes"]
        # loading stages the split slots open in file order at full size where the KV cache will be:
        # at least the largest split slot, at most one layer's split slots; never the full arena
        staged = r["load_peak_bytes"] - (r["vram_bytes"] - r["kv_cache_bytes"])
        assert staged == _staging_peak(qwen05_path)
        assert 896 * 2 * 4864 * 4 <= staged <= 4 * (1152 + 2 * 4864 + 4864) * 896 + 4 * (2 << 20)
        assert staged < 0.02 * one["plan"]["weights_bytes"]
    assert two["vram_required"] == max(ranks[0]["vram_bytes"], ranks[0]["load_peak_bytes"])
    assert two["plan"]["max_seq_len"] == one["plan"]["max_seq_len"]


def _staging_peak(path: Path) -> int:
    import torch

    from worker_orcd.engine.config import model_config
    from worker_orcd.engine.shard import staging_peak_bytes
    from worker_orcd.engine.weights import weight_layout
    from worker_orcd.gguf import parse_file

    g = parse_file(path)
    return staging_peak_bytes(weight_layout(model_config(g), g, torch.float32), g)


def test_tp_plan_arena_equals_the_engines_shard_layout(qwen05_path: Path) -> None:
    """The torch-free per-rank arena == what shard.py really allocates (so the plan is the load's)."""
    import torch

    from worker_orcd.engine.config import model_config
    from worker_orcd.engine.shard import shard_layout
    from worker_orcd.engine.vram_budget import tp_weight_bytes
    from worker_orcd.engine.weights import weight_layout
    from worker_orcd.gguf import parse_file

    g = parse_file(qwen05_path)
    cfg = model_config(g)
    full = weight_layout(cfg, g, torch.float32)
    assert tp_weight_bytes(g, 1, 4)["arena_bytes"] == full.total_bytes
    assert tp_weight_bytes(g, 2, 4)["arena_bytes"] == shard_layout(full, cfg, 2).total_bytes


@pytest.mark.parametrize(("degree", "rule"), [(3, "num_heads % 3 == 0; this model has num_heads=14"),
                                              (4, "num_heads % 4 == 0; this model has num_heads=14")])
def test_tp_plan_refuses_a_degree_that_does_not_divide(real_plans: dict[int, Any], degree: int, rule: str) -> None:
    err = real_plans[degree]
    assert isinstance(err, ModelLoadError) and err.code.value == "MODEL_LOAD_FAILED", err
    assert rule in err.message and f"tensor parallel over {degree} ranks" in err.message
    assert "pick a tp degree that divides 2" in err.message  # its 2 KV heads are never replicated


def _readme_json(marker: str) -> Any:
    text = (REPO / "README.md").read_text()
    block = re.search(rf"```json {marker}\n(.*?)```", text, re.S)
    assert block, f"README has no ```json {marker} block"
    return json.loads(block.group(1))


def test_tp_plan_readme_example_is_what_the_worker_answers(real_plans: dict[int, Any]) -> None:
    req, resp = _readme_json("tp-plan-request"), _readme_json("tp-plan-response")
    assert (req["shard_layout"], req["tp_degree"]) == ("tensor_parallel", 2)
    assert real_plans[2]["shard_plan"] == resp["shard_plan"]
    assert real_plans[2]["vram_required"] == resp["vram_required"]


# --- over HTTP (fake engine) ------------------------------------------------------------------


@pytest.fixture(scope="module")
def rank0(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerHarness]:
    """Rank 0 of group g1 (2 ranks), started without --model: it takes its shard from a commit."""
    tmp = tmp_path_factory.mktemp("rank0")
    with WorkerHarness(tmp, model=False, **_tp_flags(tmp)) as harness:
        yield harness


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerHarness]:
    with WorkerHarness(tmp_path_factory.mktemp("single"), model=False) as harness:
        yield harness


def _error(r: httpx.Response, status: int, code: str, field: str) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["code"] == code and body["message"].startswith(f"{field}: "), body
    return str(body["message"])


@pytest.mark.parametrize("bad", [0, -1, 65, 10**30, "2", 2.0, True, None, [2]])
def test_tp_plan_bad_tp_degree_is_400(single: WorkerHarness, bad: Any) -> None:
    r = single.client().post("/worker/plan", json={"model_ref": "tiny.gguf", "shard_layout": "tensor_parallel",
                                                  "tp_degree": bad})
    _error(r, 400, "INVALID_PARAMS", "tp_degree")


def test_tp_commit_on_a_worker_outside_any_group_is_refused(single: WorkerHarness) -> None:
    r = single.client().post("/worker/commit", json={"model_ref": "tiny.gguf", "shard_index": 0, "total_shards": 2})
    msg = _error(r, 400, "INVALID_PARAMS", "total_shards")
    assert "not started as a member of a tensor-parallel group of 2" in msg and "--tp-degree 2" in msg
    assert single.worker is not None and single.worker.handle is None and single.worker.state.value == "starting"


@pytest.mark.parametrize(
    ("body", "field"),
    [({"shard_index": 2, "total_shards": 2}, "body"),  # schema: index below total
     ({"shard_index": 64, "total_shards": 64}, "shard_index"),
     ({"shard_index": 0, "total_shards": 65}, "total_shards"),
     ({"shard_index": "1", "total_shards": 2}, "shard_index")],
)
def test_tp_commit_schema_bounds_are_400(rank0: WorkerHarness, body: dict[str, Any], field: str) -> None:
    r = rank0.client().post("/worker/commit", json={"model_ref": "tiny.gguf", **body})
    assert r.status_code == 400 and r.json()["code"] == "INVALID_PARAMS", r.text


def test_tp_commit_mismatched_shard_is_refused_then_own_shard_loads(rank0: WorkerHarness) -> None:
    c = rank0.client()
    req, want = _readme_json("tp-commit-request"), _readme_json("tp-commit-response")
    r = c.post("/worker/commit", json=req)  # the README example: shard 1 asked of rank 0
    assert r.status_code == 400 and r.json() == want
    msg = _error(c.post("/worker/commit", json={"model_ref": "tiny.gguf", "shard_index": 0, "total_shards": 4}),
                 400, "INVALID_PARAMS", "total_shards")
    assert "rank 0 of tensor-parallel group 'g1' of 2 ranks" in msg
    single_commit = c.post("/worker/commit", json={"model_ref": "tiny.gguf"})  # total_shards 1 on a group member
    _error(single_commit, 400, "INVALID_PARAMS", "total_shards")
    msg = _error(c.post("/worker/commit", json={"model_ref": "tiny.gguf", "shard_index": 0, "total_shards": 2,
                                                "shard_id": "mine"}), 400, "INVALID_PARAMS", "shard_id")
    assert "'g1-shard0of2'" in msg
    streamed = c.post("/worker/commit?model_ref=tiny.gguf&shard_index=1&total_shards=2", content=b"GGUF",
                      headers={"Content-Type": "application/octet-stream"})
    _error(streamed, 400, "INVALID_PARAMS", "shard_index")
    assert rank0.worker is not None and rank0.worker.handle is None  # nothing loaded by a refused commit
    ok = c.post("/worker/commit", json={"model_ref": "tiny.gguf", "shard_index": 0, "total_shards": 2})
    assert ok.status_code == 200, ok.text
    handle = ok.json()["handle"]
    assert (handle["shard_id"], handle["shard_index"], handle["total_shards"]) == ("g1-shard0of2", 0, 2)
    again = c.post("/worker/commit", json={"model_ref": "tiny.gguf", "shard_index": 0, "total_shards": 2})
    assert again.status_code == 200 and again.json()["handle"] == handle  # a repeat returns the handle
    _error(c.post("/worker/commit", json={"model_ref": "tiny.gguf", "shard_index": 1, "total_shards": 2}),
           400, "INVALID_PARAMS", "shard_index")
    ready = c.get("/worker/ready").json()
    assert ready["nccl_group_id"] == "g1" and ready["handles"][0]["shard_id"] == "g1-shard0of2"


def test_tp_plan_over_http_lists_every_rank(rank0: WorkerHarness) -> None:
    body = rank0.client().post("/worker/plan", json={"model_ref": "tiny.gguf", "shard_layout": "tensor_parallel",
                                                     "tp_degree": 2}).json()
    assert [(s["shard_index"], s["gpu_device"]) for s in body["shard_plan"]] == [(0, 0), (1, None)], body
    other = rank0.client().post("/worker/plan", json={"model_ref": "tiny.gguf", "shard_layout": "tensor_parallel",
                                                      "tp_degree": 1}).json()
    assert other["feasible"] is False and any("--tp-degree 2" in r for r in other["reasons"])
