"""The engine on a real GPU (REQUIRE_REAL_GPU=1): numerics vs the CPU reference path, determinism,
CUDA graph == eager, seal over VRAM, attestation, synthetic models of real shapes (SPEC 4100-4122,
4400-4423, 4700-4713, 4998)."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from worker_orcd.engine.api import Engine, GenerationEnd, ResidentModel, SamplingParams, TokenEvent
from worker_orcd.engine.device import DeviceContext
from worker_orcd.errors import ErrorCode, SealVerificationError, WorkerError
from worker_orcd.loader import LoadOptions, ValidatedModel, validate_model
from worker_orcd.seal import Sealer
from worker_orcd.tokenizer import GGUFTokenizer

pytestmark = pytest.mark.gpu
REPO = Path(__file__).resolve().parents[1]


def _synth():
    spec = importlib.util.spec_from_file_location("worker_orcd_bench_synth", REPO / "benchmarks" / "synth.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _validated(path: Path) -> ValidatedModel:
    return validate_model(str(path), LoadOptions(model_root=path.parent))


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine.open("cuda", 0)


@pytest.fixture(scope="module")
def cpu_engine() -> Engine:
    """The float32 reference path in the same process (the device rule is per CUDA context)."""
    return Engine(DeviceContext(kind="cpu", index=0, name="cpu reference", total_bytes=0))


@pytest.fixture(scope="module")
def qwen(engine: Engine, qwen05_path: Path) -> Iterator[ResidentModel]:
    rm = engine.load(_validated(qwen05_path), shard_id="gpu-qwen", sealer=Sealer(), kv_cache_mb=256)
    yield rm
    rm.close()


@pytest.fixture(scope="module")
def qwen_tok(qwen05_path: Path) -> GGUFTokenizer:
    return GGUFTokenizer.from_gguf(_validated(qwen05_path).gguf)


def _tokens(rm: ResidentModel, ids: list[int], **params: object) -> list[int]:
    events = list(rm.generate(ids, SamplingParams(**params)))  # type: ignore[arg-type]
    assert isinstance(events[-1], GenerationEnd)
    return [e.token_id for e in events if isinstance(e, TokenEvent)]


PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "import numpy as np\n\n# multiply two matrices\n"]


def _compare_logits(gpu: ResidentModel, cpu: ResidentModel, ids: list[int], rel_tol: float) -> None:
    with torch.no_grad():
        a = gpu._gen.prefill(torch.tensor(ids, device="cuda")).float().cpu()
        b = cpu._gen.prefill(torch.tensor(ids))
    rel = float((a - b).norm() / b.norm())
    assert torch.isfinite(a).all()
    assert rel < rel_tol, f"relative L2 error GPU vs CPU {rel:.2e}"
    top = b.topk(2).values
    if float(top[0] - top[1]) > 0.5:  # a clear winner must not flip with fp16 rounding
        assert int(a.argmax()) == int(b.argmax())


def test_worker_4700_gpu_logits_match_cpu_reference(
    qwen: ResidentModel, cpu_engine: Engine, qwen05_path: Path, qwen_tok: GGUFTokenizer
) -> None:
    """fp16 weights/activations vs the float32 CPU path on the same file: rel. L2 < 2e-2."""
    cpu = cpu_engine.load(
        _validated(qwen05_path), shard_id="cpu-ref", sealer=Sealer(), kv_cache_mb=16, capture_graph=False
    )
    try:
        for text in PROMPTS:
            _compare_logits(qwen, cpu, qwen_tok.encode(text), 2e-2)
    finally:
        cpu.close()


def test_worker_4700_gpu_gemma3_matches_cpu_reference(engine: Engine, cpu_engine: Engine, gemma_path: Path) -> None:
    vm = _validated(gemma_path)
    tok = GGUFTokenizer.from_gguf(vm.gguf)
    gpu = engine.load(vm, shard_id="gpu-gemma", sealer=Sealer(), kv_cache_mb=128)
    cpu = cpu_engine.load(vm, shard_id="cpu-gemma", sealer=Sealer(), kv_cache_mb=64, capture_graph=False)
    try:
        for text in PROMPTS + [PROMPTS[2] * 60]:  # the last one is past the 512-token window
            _compare_logits(gpu, cpu, tok.encode(text), 5e-2)  # bf16 resident weights
        assert len(_tokens(gpu, tok.encode(PROMPTS[0]), max_tokens=16)) == 16
    finally:
        gpu.close()
        cpu.close()


def test_worker_4710_gpu_same_request_same_stream_three_runs(qwen: ResidentModel, qwen_tok: GGUFTokenizer) -> None:
    ids = qwen_tok.encode(PROMPTS[1])
    for params in (
        {"max_tokens": 48},
        {"max_tokens": 48, "temperature": 0.8, "top_k": 40, "top_p": 0.95, "seed": 7, "repetition_penalty": 1.1},
    ):
        runs = [_tokens(qwen, ids, **params) for _ in range(3)]
        assert runs[0] == runs[1] == runs[2]


def test_worker_4700_cuda_graph_decode_equals_eager(qwen: ResidentModel, qwen_tok: GGUFTokenizer) -> None:
    assert qwen.graph_captured
    ids = qwen_tok.encode(PROMPTS[2])
    params = [{"max_tokens": 40}, {"max_tokens": 40, "temperature": 1.0, "top_p": 0.9, "seed": 3}]
    graphed = [_tokens(qwen, ids, **p) for p in params]
    gen = qwen._gen
    graph, logits = gen.graph, gen.graph_logits
    gen.graph = None  # eager launches of the very same step function
    try:
        eager = [_tokens(qwen, ids, **p) for p in params]
    finally:
        gen.graph, gen.graph_logits = graph, logits
    assert graphed == eager


def test_worker_4121_seal_detects_one_flipped_byte_in_vram(qwen: ResidentModel) -> None:
    ms = qwen.verify_seal()
    assert ms < 50, f"seal verification took {ms:.1f} ms on a 0.5B model"
    arena = qwen._weights.arena
    i = arena.numel() // 2 + 12345
    old = int(arena[i])
    arena[i] = old ^ 0x80
    try:
        with pytest.raises(SealVerificationError) as e:
            qwen.verify_seal()
        assert e.value.code is ErrorCode.SEAL_VERIFICATION_FAILED
    finally:
        arena[i] = old
    qwen.verify_seal()


def test_worker_4101_attestation_every_buffer_is_device_memory(qwen: ResidentModel) -> None:
    report = qwen.attest()
    assert report["resident"] is True and report["gpu_device"] == 0
    assert set(report["groups"]) == {"weights", "kv_cache", "scratch"}
    assert all(g["memory_type"] == "device" and g["buffers"] >= 1 for g in report["groups"].values())
    assert report["groups"]["weights"]["bytes"] == qwen._weights.arena.numel()
    assert "0x" not in repr(report)
    assert qwen.vram_bytes() >= report["groups"]["weights"]["bytes"] + report["groups"]["kv_cache"]["bytes"]


def test_worker_4101_attestation_refuses_host_memory(engine: Engine) -> None:
    from worker_orcd.engine.attest import _pointer_query, attest_buffers

    pinned = torch.empty(1 << 20, dtype=torch.uint8, pin_memory=True)
    with pytest.raises(WorkerError):
        attest_buffers(engine.ctx, {"scratch": [pinned]})
    query, _ = _pointer_query()
    mem_type, _, has_host = query(pinned.data_ptr())  # the runtime itself calls it host memory
    assert mem_type == 1 and has_host
    mem_type, device, has_host = query(torch.empty(16, device="cuda").data_ptr())
    assert mem_type == 2 and device == 0 and not has_host


def test_worker_4103_insufficient_vram_before_any_allocation(engine: Engine, qwen05_path: Path) -> None:
    before = torch.cuda.memory_allocated()
    with pytest.raises(WorkerError) as e:
        engine.load(_validated(qwen05_path), shard_id="too-big", sealer=Sealer(), kv_cache_mb=10**7)
    assert e.value.code is ErrorCode.INSUFFICIENT_VRAM and "device id 0" in e.value.message
    assert torch.cuda.memory_allocated() == before


@pytest.mark.parametrize(
    "shape,wtype",
    [
        ("qwen2.5-0.5b", "F16"),
        ("qwen2.5-0.5b", "Q8_0"),
        ("qwen2.5-0.5b", "Q4_K_M"),
        ("qwen2.5-1.5b", "Q4_K_M"),
        ("tiny-llama", "F16"),
        ("tiny-gemma3", "Q4_K_M"),
    ],
)
def test_worker_4700_synthetic_real_shapes_load_and_generate(
    engine: Engine, tmp_path: Path, shape: str, wtype: str
) -> None:
    path = _synth().write_synthetic_model(tmp_path / f"{shape}-{wtype}.gguf", shape, wtype)
    rm = engine.load(_validated(path), shard_id=f"syn-{shape}", sealer=Sealer(), kv_cache_mb=64)
    try:
        assert rm.load_stats.gb_per_s > 0 and rm.graph_captured
        ids = list(range(5, 40))
        with torch.no_grad():
            assert torch.isfinite(rm._gen.prefill(torch.tensor(ids, device="cuda"))).all()
        toks = _tokens(rm, ids, max_tokens=16)
        assert len(toks) == 16 and all(0 <= t < rm.config.vocab_size for t in toks)
        assert _tokens(rm, ids, max_tokens=16) == toks
        rm.verify_seal()
        rm.attest()
    finally:
        rm.close()


def test_worker_4013_close_releases_every_device_buffer(engine: Engine, tmp_path: Path) -> None:
    """After a first load/close (which creates process-wide caches: cuBLAS workspaces, RoPE
    tables, compiled kernels), another load/close cycle returns memory to where it was."""
    path = _synth().write_synthetic_model(tmp_path / "cycle.gguf", "qwen2.5-0.5b", "Q8_0")
    vm = _validated(path)
    engine.load(vm, shard_id="cycle-0", sealer=Sealer(), kv_cache_mb=64).close()
    before = torch.cuda.memory_allocated()
    rm = engine.load(vm, shard_id="cycle-1", sealer=Sealer(), kv_cache_mb=64)
    assert torch.cuda.memory_allocated() - before >= rm._weights.arena.numel()
    rm.close()
    assert torch.cuda.memory_allocated() - before < 1 << 20


def test_worker_4421_long_prompt_chunked_prefill(engine: Engine, tmp_path: Path) -> None:
    """A prompt longer than the prefill chunk runs in chunks and matches one more decode step."""
    path = _synth().write_synthetic_model(tmp_path / "long.gguf", "qwen2.5-0.5b", "Q8_0")
    rm = engine.load(_validated(path), shard_id="long", sealer=Sealer(), kv_cache_mb=512)
    try:
        ids = [(i * 7919) % 150000 for i in range(3000)]
        toks = _tokens(rm, ids, max_tokens=4)
        assert toks == _tokens(rm, ids, max_tokens=4)
    finally:
        rm.close()


def test_worker_4711_device_opened_in_deterministic_mode(engine: Engine) -> None:
    import os

    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] in (":4096:8", ":16:8")
    assert torch.are_deterministic_algorithms_enabled()
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    desc = engine.describe()
    assert desc["kind"] == "cuda" and desc["dev_mode"] is False and desc["vram_resident"] is True
    assert 0 < desc["free_bytes"] <= desc["total_bytes"]


def test_worker_4400_generation_from_another_thread(qwen: ResidentModel, qwen_tok: GGUFTokenizer) -> None:
    """The HTTP layer calls from worker threads: graph replay and Triton launches must work there."""
    import threading

    ids = qwen_tok.encode(PROMPTS[0])
    want = _tokens(qwen, ids, max_tokens=12)
    got: list[list[int]] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            got.append(_tokens(qwen, ids, max_tokens=12))
            qwen.verify_seal()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
            errors.append(exc)

    t = threading.Thread(target=run)
    t.start()
    t.join(timeout=120)
    assert not errors, errors
    assert got == [want]
