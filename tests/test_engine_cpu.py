"""The GPU boundary in CPU development mode (SPEC 4100-4122, 4400-4423, 4700-4713).

Tiny synthetic models of each architecture (written with ``benchmarks/synth.py``)
keep these fast; the real-model numerics are in ``test_engine_hf_parity.py``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading
from pathlib import Path

import pytest
import torch

from worker_orcd.engine import api as api_mod
from worker_orcd.engine import device as device_mod
from worker_orcd.engine import fused, ops, reference
from worker_orcd.engine.api import Engine, GenerationEnd, ResidentModel, SamplingParams, TokenEvent
from worker_orcd.engine.config import SUPPORTED_ARCHS, model_config
from worker_orcd.engine.device import device_errors
from worker_orcd.engine.kv_cache import check_capacity
from worker_orcd.errors import ErrorCode, InvalidParams, ModelLoadError, SealVerificationError, WorkerError
from worker_orcd.gguf import GGMLType, parse_file
from worker_orcd.gguf.writer import GGUFWriter
from worker_orcd.loader import LoadOptions, ValidatedModel, validate_model
from worker_orcd.residency import SealedModel, load_resident, load_sealed
from worker_orcd.seal import Sealer
from synthetic import synth as _synth

REPO = Path(__file__).resolve().parents[1]




synth = _synth()


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine.open("cpu")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("engine-models")


def _validated(path: Path) -> ValidatedModel:
    return validate_model(str(path), LoadOptions(model_root=path.parent))


def _load(engine: Engine, path: Path, **kw: object) -> ResidentModel:
    return load_resident(engine, _validated(path), kv_cache_mb=kw.pop("kv_cache_mb", 1), **kw)  # type: ignore[return-value]


@pytest.fixture(scope="module")
def qwen_sealed(engine: Engine, model_dir: Path) -> SealedModel:
    path = synth.write_synthetic_model(model_dir / "tiny-qwen2.gguf", "tiny-qwen2", "Q4_K_M")
    return load_sealed(engine, _validated(path), shard_id="shard-test", sealer=Sealer(), kv_cache_mb=1)


@pytest.fixture(scope="module")
def qwen(qwen_sealed: SealedModel) -> ResidentModel:
    return qwen_sealed.resident  # type: ignore[return-value]


def _run(rm: ResidentModel, prompt: list[int], **params: object) -> tuple[list[int], GenerationEnd]:
    events = list(rm.generate(prompt, SamplingParams(**params)))  # type: ignore[arg-type]
    end = events[-1]
    assert isinstance(end, GenerationEnd)
    toks = [e for e in events[:-1] if isinstance(e, TokenEvent)]
    assert len(toks) == len(events) - 1
    assert [e.index for e in toks] == list(range(len(toks)))
    return [e.token_id for e in toks], end


PROMPT = [3, 17, 99, 250, 4, 8, 15, 16, 23, 42]


# --- forward pass consistency --------------------------------------------------------------------


@pytest.mark.parametrize("shape,wtype", [("tiny-qwen2", "Q4_K_M"), ("tiny-llama", "F16"), ("tiny-gemma3", "Q8_0")])
def test_worker_4700_decode_matches_full_prefill(engine: Engine, model_dir: Path, shape: str, wtype: str) -> None:
    """Each greedy token from the KV-cache decode path equals the argmax of a from-scratch prefill of
    the whole sequence (in small chunks, so chunked prefill and Gemma's 8-token window are exercised)."""
    path = synth.write_synthetic_model(model_dir / f"{shape}-{wtype}.gguf", shape, wtype)
    rm = _load(engine, path)
    try:
        toks, end = _run(rm, PROMPT, max_tokens=12)
        assert end.stop_reason == "max_tokens" and end.tokens_out == 12 and end.tokens_in == len(PROMPT)
        seq = list(PROMPT)
        for t in toks:
            logits = rm.runner.prefill_logits(seq, chunk=4)
            assert int(torch.argmax(logits)) == t
            seq.append(t)
    finally:
        rm.close()


def test_worker_4421_chunked_prefill_decodes_what_one_piece_does(
    engine: Engine, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A prompt longer than the CPU prefill chunk (256) decodes, token by token, what the same prompt
    prefilled in one piece decodes (a model loaded with a chunk longer than the prompt)."""
    # untied lm head: the next token depends on the whole context (a tied tiny model echoes its last token)
    shape = dataclasses.replace(synth.SHAPES["tiny-llama"], context=1024, output_norm_gain=4.0)
    vm = _validated(synth.write_synthetic_model(model_dir / "chunked-prefill.gguf", shape, "Q8_0"))
    ids = [(i * 7919 + 17) % shape.vocab for i in range(600)]
    assert len(ids) > engine.prefill_chunk
    runs = []
    for chunk in (engine.prefill_chunk, 1024):
        monkeypatch.setattr(api_mod, "PREFILL_CHUNK_CPU", chunk)
        rm = load_resident(engine, vm, kv_cache_mb=8)
        try:
            runs.append(_run(rm, ids, max_tokens=8)[0])
        finally:
            rm.close()
    chunked, whole = runs
    for i, (a, b) in enumerate(zip(chunked, whole, strict=True)):
        assert a == b, f"token {i}: chunked prefill {a}, one-piece prefill {b} (streams {chunked} vs {whole})"


def test_worker_4700_fused_qkv_rows_are_the_file_tensors(engine: Engine, model_dir: Path) -> None:
    """The fused QKV / gate-up matrices hold q, k, v (gate, up) rows in that order, dequantized."""
    import gguf.quants as gguf_quants
    path = synth.write_synthetic_model(model_dir / "fused.gguf", "tiny-qwen2", "Q8_0")
    g = parse_file(path)
    rm = _load(engine, path)
    try:
        raw = path.read_bytes()

        def ref(name: str) -> torch.Tensor:
            t = g.tensor(name)
            blob = __import__("numpy").frombuffer(raw[t.data_offset : t.data_offset + t.n_bytes], dtype="uint8")
            arr = gguf_quants.dequantize(blob, t.ggml_type.value)
            return torch.from_numpy(arr.astype("float32").reshape(-1)).reshape(t.shape[::-1])

        lw = rm._weights.layers[1]
        expect = torch.cat([ref("blk.1.attn_q.weight"), ref("blk.1.attn_k.weight"), ref("blk.1.attn_v.weight")])
        assert torch.equal(lw.wqkv, expect)
        expect = torch.cat([ref("blk.1.ffn_gate.weight"), ref("blk.1.ffn_up.weight")])
        assert torch.equal(lw.w_gate_up, expect)
        assert rm._weights.lm_head.data_ptr() == rm._weights.embed.data_ptr()  # tied head
    finally:
        rm.close()


# --- request limits (SPEC 4420-4423) -------------------------------------------------------------


def test_worker_4421_kv_capacity_refused_before_any_work(qwen: ResidentModel, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_work(*a: object) -> None:
        raise AssertionError("prefill ran for a request that cannot fit")

    monkeypatch.setattr(qwen.runner, "step", no_work)
    s_max = qwen.max_seq_len
    with pytest.raises(InvalidParams) as e:
        qwen.generate([1] * (s_max - 3), SamplingParams(max_tokens=4))  # refused at call time
    assert e.value.code is ErrorCode.INVALID_PARAMS
    assert (
        f"prompt ({s_max - 3} tokens) + max_tokens (4) exceeds the KV cache capacity S_max ({s_max}" in e.value.message
    )


def test_worker_4421_capacity_arithmetic() -> None:
    check_capacity(10, 6, 16)
    for prompt, out in ((0, 1), (1, 0), (10, 7)):
        with pytest.raises(InvalidParams):
            check_capacity(prompt, out, 16)


@pytest.mark.parametrize(
    "prompt,params",
    [
        ([512], {}),  # vocab is 512: id 512 does not exist
        ([-1], {}),
        ([1, "2"], {}),
        ([1, True], {}),
        ([1], {"temperature": -0.1}),
        ([1], {"temperature": float("nan")}),
        ([1], {"top_p": 0.0}),
        ([1], {"min_p": 1.0}),
        ([1], {"temperature": 2.5}),
        ([1], {"top_k": -1}),
        ([1], {"repetition_penalty": 0.0}),
        ([1], {"seed": 2**64}),
        ([1], {"max_tokens": 0}),
        ([1], {"stop_ids": frozenset({-5})}),
    ],
)
def test_worker_4400_bad_input_is_invalid_params_never_a_raw_exception(
    qwen: ResidentModel, prompt: list, params: dict
) -> None:
    kw = {"max_tokens": 2} | params
    with pytest.raises(WorkerError) as e:
        list(qwen.generate(prompt, SamplingParams(**kw)))
    assert e.value.code is ErrorCode.INVALID_PARAMS


# --- stopping ------------------------------------------------------------------------------------


def test_worker_4700_max_tokens(qwen: ResidentModel) -> None:
    toks, end = _run(qwen, PROMPT, max_tokens=5)
    assert len(toks) == 5 and end.tokens_out == 5 and end.stop_reason == "max_tokens"
    assert end.ttft_ms > 0 and end.prefill_ms > 0 and end.decode_time_ms >= 0
    toks1, end1 = _run(qwen, PROMPT, max_tokens=1)
    assert toks1 == toks[:1] and end1.stop_reason == "max_tokens"


def test_worker_4700_stops_on_any_eos_id(qwen: ResidentModel) -> None:
    toks, _ = _run(qwen, PROMPT, max_tokens=10)
    stop = toks[3]
    first = toks.index(stop)
    got, end = _run(qwen, PROMPT, max_tokens=10, stop_ids=frozenset({stop, 100000}))
    assert got == toks[: first + 1]  # the stop token is the last one streamed
    assert end.stop_reason == "eos" and end.tokens_out == first + 1


def test_worker_4252_cancel_honoured_within_one_step(qwen: ResidentModel) -> None:
    cancel = threading.Event()
    seen: list[TokenEvent] = []
    end = None
    for ev in qwen.generate(PROMPT, SamplingParams(max_tokens=50), cancel):
        if isinstance(ev, GenerationEnd):
            end = ev
            break
        seen.append(ev)
        if len(seen) == 2:
            cancel.set()
    assert end is not None and end.stop_reason == "cancelled"
    assert len(seen) == 2  # nothing after the cancel was acknowledged
    # a callable works too, and the model serves the next request normally
    flag = {"n": 0}

    def cancelled() -> bool:
        flag["n"] += 1
        return flag["n"] > 3

    events = list(qwen.generate(PROMPT, SamplingParams(max_tokens=50), cancelled))
    assert events[-1].stop_reason == "cancelled" and len(events) - 1 < 5
    toks, end2 = _run(qwen, PROMPT, max_tokens=3)
    assert end2.stop_reason == "max_tokens" and len(toks) == 3


def test_worker_4400_generations_overlap_and_match_their_lone_runs(qwen: ResidentModel) -> None:
    """Continuous batching: a second generation starts while the first runs; each stream is the lone one."""
    sampled = {"max_tokens": 6, "temperature": 0.9, "top_k": 40, "seed": 3}
    alone = (_run(qwen, PROMPT, max_tokens=6)[0], _run(qwen, PROMPT[:4], **sampled)[0])
    first = qwen.generate(PROMPT, SamplingParams(max_tokens=6))
    assert isinstance(next(first), TokenEvent)
    second = qwen.generate(PROMPT[:4], SamplingParams(**sampled))  # type: ignore[arg-type]
    got_second = [e.token_id for e in second if isinstance(e, TokenEvent)]
    got_first = [e.token_id for e in first if isinstance(e, TokenEvent)]
    assert got_second == alone[1]
    assert got_first == alone[0][1:]


# --- determinism (SPEC 4710-4712) ----------------------------------------------------------------


def test_worker_4710_same_seed_same_stream_three_runs(qwen: ResidentModel) -> None:
    params = {
        "max_tokens": 12,
        "temperature": 0.9,
        "top_k": 50,
        "top_p": 0.95,
        "min_p": 0.01,
        "repetition_penalty": 1.1,
        "seed": 1234,
    }
    runs = [_run(qwen, PROMPT, **params)[0] for _ in range(3)]
    assert runs[0] == runs[1] == runs[2]
    other = _run(qwen, PROMPT, **(params | {"seed": 99}))[0]
    assert other != runs[0]  # 4712: the seed really drives the draw


def test_worker_4712_cpu_sampler_is_the_kernel_scheme() -> None:
    """The CPU reference sampler draws exactly what the Triton kernel (interpreter) draws."""
    from worker_orcd.engine.kernels import sampling

    if not sampling.v.TRITON_INTERPRETED:
        pytest.skip("needs TRITON_INTERPRET=1 to run the kernel on CPU tensors")
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3000, generator=gen) * 3
    ids = torch.tensor([5, 17, 17, 2999, 1000])
    cases = [
        dict(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.3, penalty_ids=ids),
        dict(temperature=0.7, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0, penalty_ids=None),
        dict(temperature=1.3, top_k=40, top_p=0.9, min_p=0.0, repetition_penalty=1.2, penalty_ids=ids),
        dict(temperature=1.0, top_k=0, top_p=0.8, min_p=0.05, repetition_penalty=1.0, penalty_ids=None),
    ]
    for case in cases:
        for seed, step in ((0, 0), (2**64 - 1, 7), (123456789012, 2**33 + 5)):
            want = sampling.sample(logits, seed=seed, step=step, **case)  # type: ignore[arg-type]
            got = reference.sample_reference(logits, seed=seed, step=step, **case)  # type: ignore[arg-type]
            assert int(got) == int(want), (case, seed, step)


def test_worker_4711_kv_write_kernel_matches_index_copy() -> None:
    from worker_orcd.engine.kernels import validate

    if not validate.TRITON_INTERPRETED:
        pytest.skip("needs TRITON_INTERPRET=1 to run the kernel on CPU tensors")
    kc = torch.zeros(9, 2, 8)
    vc = torch.zeros(9, 2, 8)
    k, v = torch.randn(2, 8), torch.randn(2, 8)
    pos = torch.tensor([6])
    fused.kv_write_(kc, vc, k, v, pos)  # the Triton kernel, run by the interpreter
    ek, ev = torch.zeros(9, 2, 8), torch.zeros(9, 2, 8)
    ops.kv_write_(ek, ev, k, v, pos)  # the CPU path
    assert torch.equal(kc, ek) and torch.equal(vc, ev) and torch.equal(kc[6], k)
    with pytest.raises(WorkerError):
        ops.kv_write_(kc, vc, k[:1], v, pos)


@pytest.mark.parametrize("neox", [True, False])
def test_worker_4700_cpu_rope_matches_kernel(neox: bool) -> None:
    from worker_orcd.engine.kernels import rope, validate

    if not validate.TRITON_INTERPRETED:
        pytest.skip("needs TRITON_INTERPRET=1")
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(5, 4 * 16 + 2 * 2 * 16, generator=g)
    q, k = qkv[:, :64].reshape(5, 4, 16), qkv[:, 64:96].reshape(5, 2, 16)
    q2, k2 = q.clone(), k.clone()
    pos = torch.tensor([0, 1, 7, 100, 3000])
    ops.rope_(q, k, pos, 10000.0, neox)  # CPU reference, on strided views of the fused output
    rope.rope_(q2, k2, pos, 10000.0, neox)
    # same convention; the tolerance is the naive fp32 angle's error at position 3000 (~3e-4 rad)
    torch.testing.assert_close(q, q2, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(k, k2, atol=1e-3, rtol=1e-3)


def test_worker_4700_cpu_attention_matches_kernel() -> None:
    from worker_orcd.engine.kernels import attention, validate

    if not validate.TRITON_INTERPRETED:
        pytest.skip("needs TRITON_INTERPRET=1")
    g = torch.Generator().manual_seed(2)
    q, k, v = (
        torch.randn(6, 4, 16, generator=g),
        torch.randn(13, 2, 16, generator=g),
        torch.randn(13, 2, 16, generator=g),
    )
    for window in (None, 4):
        want = attention.attention_prefill(q, k, v, 0.25, sliding_window=window, q_offset=7)
        got = ops.attention_prefill(q, k, v, 0.25, sliding_window=window, q_offset=7)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# --- seal (SPEC 4110-4122) -----------------------------------------------------------------------


def test_worker_4122_seal_tamper_one_byte(qwen_sealed: SealedModel, qwen: ResidentModel) -> None:
    sealed = qwen_sealed
    assert sealed.handle.sealed and len(sealed.handle.digest) == 64
    assert sealed.verify_seal() >= 0
    arena = qwen._weights.arena
    i = arena.numel() // 3
    old = int(arena[i])
    arena[i] = old ^ 0x01
    try:
        with pytest.raises(SealVerificationError) as e:
            sealed.verify_seal()
        assert e.value.code is ErrorCode.SEAL_VERIFICATION_FAILED
        check = sealed.verify_seal_start()  # the engine loop's two-part form
        with pytest.raises(SealVerificationError):
            check()
    finally:
        arena[i] = old
    sealed.verify_seal()
    sealed.verify_seal_start()()
    good = sealed.handle
    sealed.handle = dataclasses.replace(good, vram_bytes=good.vram_bytes + 1)
    try:
        with pytest.raises(SealVerificationError):
            sealed.verify_seal()
    finally:
        sealed.handle = good


def test_worker_4100_cpu_mode_never_claims_residency(
    engine: Engine, qwen_sealed: SealedModel, qwen: ResidentModel
) -> None:
    report = qwen.attest()
    assert report["resident"] is False and report["status"] == "not resident (CPU development mode)"
    assert qwen.vram_bytes() == 0 and qwen_sealed.handle.vram_bytes == 0
    desc = engine.describe()
    assert desc["dev_mode"] is True and desc["vram_resident"] is False and "DEVELOPMENT MODE" in desc["warning"]
    assert "0x" not in repr(report) and "0x" not in repr(qwen_sealed.handle.public())  # no pointers (4111)


def test_worker_4100_cpu_mode_load_log_never_says_resident(
    engine: Engine, model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = synth.write_synthetic_model(model_dir / "log-tiny.gguf", "tiny-llama", "F16")
    with caplog.at_level("INFO", logger="worker_orcd.engine"):
        rm = _load(engine, path)
        stages, seconds = rm.load_stages, rm.load_stats.seconds
        rm.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "worker_orcd.engine" and "log-tiny" in r.getMessage()]
    (line,) = [m for m in lines if "load stages" not in m]
    assert "CPU development mode" in line and "resident" not in line
    # where the time to ready goes (issue 13): one line, the same seconds the model keeps
    (stage_line,) = [m for m in lines if "load stages" in m]
    # on one device the warm-up and graph capture run beside the upload (upload.UploadThread)
    assert list(stages) == ["bind+kv", "warmup", "graphs", "upload-wait", "fingerprint-plan"]
    assert all(v >= 0 for v in stages.values()) and f"upload-wait {stages['upload-wait']:.2f}" in stage_line
    assert f"the upload beside them {seconds:.2f}" in stage_line


# --- loading ---------------------------------------------------------------------------------------


def test_worker_4113_bytes_changed_after_verification_refused(engine: Engine, model_dir: Path) -> None:
    path = synth.write_synthetic_model(model_dir / "toctou.gguf", "tiny-qwen2", "F16")
    vm = _validated(path)
    with open(path, "r+b") as fh:  # rewrite one weight byte after the digest was taken
        t = vm.gguf.tensor("blk.0.ffn_up.weight")
        fh.seek(t.data_offset + 10)
        b = fh.read(1)
        fh.seek(t.data_offset + 10)
        fh.write(bytes([b[0] ^ 0x40]))
    with pytest.raises(ModelLoadError) as e:
        load_resident(engine, vm, kv_cache_mb=1)
    assert e.value.code is ErrorCode.MODEL_LOAD_FAILED and "changed after verification" in e.value.message
    assert all(m.name != vm.source.ref for m in engine._models)


def test_worker_4113_one_pass_load_seals_the_streamed_digest(engine: Engine, model_dir: Path) -> None:
    """No expected digest, no key: the upload is the only hash pass; the handle carries its digest,
    and the model's tokens are those of the two-pass load."""
    path = synth.write_synthetic_model(model_dir / "onepass.gguf", "tiny-qwen2", "Q8_0")
    vm = validate_model(str(path), LoadOptions(model_root=path.parent), one_pass=True)
    assert vm.digest is None
    sealed = load_sealed(engine, vm, shard_id="one-pass", sealer=Sealer(), kv_cache_mb=1)
    two = load_resident(engine, _validated(path), kv_cache_mb=1)
    try:
        assert sealed.handle.digest == hashlib.sha256(path.read_bytes()).hexdigest()
        assert sealed.verify_seal() >= 0
        one_toks, _ = _run(sealed.resident, [1, 2, 3], max_tokens=6)  # type: ignore[arg-type]
        assert one_toks == _run(two, [1, 2, 3], max_tokens=6)[0]  # type: ignore[arg-type]
    finally:
        sealed.close()
        two.close()
    with pytest.raises(InvalidParams, match="either the verified digest or an on_digest"):
        with open(path, "rb") as fh:
            engine.load(vm.gguf, fh, digest=hashlib.sha256(path.read_bytes()).hexdigest(), on_digest=print)


def test_worker_4113_one_pass_refuses_a_header_rewritten_after_parsing(engine: Engine, model_dir: Path) -> None:
    """The layout comes from the header parsed before the upload; the digest from the bytes streamed.
    A header rewritten in between (same size) would pair one file's layout with another's digest."""
    path = synth.write_synthetic_model(model_dir / "header-toctou.gguf", "tiny-qwen2", "Q8_0")
    vm = validate_model(str(path), LoadOptions(model_root=path.parent), one_pass=True)
    data = path.read_bytes()
    at = data.index(b"general.architecture")
    with open(path, "r+b") as fh:
        fh.seek(at)
        fh.write(b"General")  # same length: only the bytes differ
    heard: list[str] = []
    with pytest.raises(ModelLoadError, match="header changed after it was parsed"):
        with open(path, "rb") as fh:
            engine.load(vm.gguf, fh, on_digest=heard.append, kv_cache_mb=1)
    assert not heard and all(m.name != "model" for m in engine._models)


def test_worker_4103_insufficient_vram_plan(engine: Engine, model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = synth.write_synthetic_model(model_dir / "plan.gguf", "tiny-qwen2", "F16")
    g = parse_file(path)
    cfg = model_config(g)
    plan = engine.plan(g, kv_cache_mb=1, free_bytes=10**12)
    assert plan.feasible
    assert plan.weights_bytes >= sum(t.n_elements for t in g.tensors) * 4  # fp32 in CPU mode
    from worker_orcd.engine.paged_kv import BLOCK_SIZE, kv_tokens

    pool = kv_tokens(cfg, torch.float32, 1, dev_mode=True)  # the paged pool + its scratch block
    assert plan.kv_cache_bytes == (pool + BLOCK_SIZE) * 2 * cfg.n_layers * cfg.kv_dim * 4
    assert plan.required_bytes == plan.weights_bytes + plan.kv_cache_bytes + plan.scratch_bytes + plan.margin_bytes
    tight = engine.plan(g, kv_cache_mb=1, free_bytes=plan.required_bytes - 1)
    assert not tight.feasible
    with pytest.raises(WorkerError) as e:
        tight.require()
    assert e.value.code is ErrorCode.INSUFFICIENT_VRAM
    assert str(plan.required_bytes) in e.value.message and str(plan.required_bytes - 1) in e.value.message
    assert "device id 0" in e.value.message
    # load refuses before allocating anything
    monkeypatch.setattr(engine.ctx.__class__, "mem_get_info", lambda self: (1000, 2000))
    with pytest.raises(WorkerError) as e:
        load_resident(engine, _validated(path), kv_cache_mb=1)
    assert e.value.code is ErrorCode.INSUFFICIENT_VRAM and "1000 bytes free" in e.value.message


def test_worker_4420_kv_budget_bounds_s_max(engine: Engine, model_dir: Path) -> None:
    path = synth.write_synthetic_model(model_dir / "budget.gguf", "tiny-llama", "F16")
    g = parse_file(path)
    cfg = model_config(g)
    per_token = 2 * cfg.n_layers * cfg.kv_dim * 4
    assert engine.plan(g, kv_cache_mb=None).max_seq_len == cfg.context_length
    assert engine.plan(g, kv_cache_mb=1).max_seq_len == min(cfg.context_length, (1 << 20) // per_token)
    with pytest.raises(WorkerError) as e:
        engine.plan(g, kv_cache_mb=0)
    assert e.value.code is ErrorCode.INVALID_PARAMS


def _tiny_gguf(path: Path, arch: str, extra_tensor: str | None = None, drop: str | None = None) -> Path:
    """A copy of tiny-qwen2 relabelled as ``arch``, with one tensor dropped or one added."""
    base = synth.write_synthetic_model(path.with_suffix(".base.gguf"), "tiny-qwen2", "F16")
    g = parse_file(base)
    raw = base.read_bytes()
    w = GGUFWriter()
    for key, value in g.metadata.items():
        new_key = f"{arch}." + key.removeprefix("qwen2.") if key.startswith("qwen2.") else key
        w.add(new_key, arch if key == "general.architecture" else value, g.value_types[key], g.array_types.get(key))
    for t in g.tensors:
        if t.name != drop:
            w.add_tensor(t.name, t.shape, t.ggml_type, raw[t.data_offset : t.data_offset + t.n_bytes])
    if extra_tensor:
        w.add_tensor(extra_tensor, (32,), GGMLType.F32, b"\0" * 128)
    return w.write(path)


def test_worker_4620_unsupported_architecture(model_dir: Path) -> None:
    g = parse_file(_tiny_gguf(model_dir / "mamba.gguf", "mamba"))
    with pytest.raises(ModelLoadError) as e:
        model_config(g)
    assert all(a in e.value.message for a in SUPPORTED_ARCHS) and "'mamba'" in e.value.message


def test_worker_4310_missing_or_unknown_tensors_refused(engine: Engine, model_dir: Path) -> None:
    g = parse_file(_tiny_gguf(model_dir / "missing.gguf", "qwen2", drop="blk.1.ffn_down.weight"))
    with pytest.raises(ModelLoadError, match="blk.1.ffn_down.weight is missing"):
        engine.plan(g)
    g = parse_file(_tiny_gguf(model_dir / "extra.gguf", "qwen2", extra_tensor="blk.0.mystery.weight"))
    with pytest.raises(ModelLoadError, match="blk.0.mystery.weight"):
        engine.plan(g)
    g = parse_file(_tiny_gguf(model_dir / "ropefreq.gguf", "llama", extra_tensor="rope_freqs.weight"))
    with pytest.raises(ModelLoadError, match="rope_freqs"):
        model_config(g)


def test_worker_gemma3_constants_documented(model_dir: Path) -> None:
    g = parse_file(synth.write_synthetic_model(model_dir / "g3.gguf", "tiny-gemma3", "F16"))
    cfg = model_config(g)
    assert cfg.local_layers == (True, True, True, True, True, False)  # 5 local : 1 global
    assert cfg.rope_theta_local == 10_000.0 and cfg.rope_theta == 1e6 and cfg.sliding_window == 8
    assert cfg.attn_scale == 64**-0.5 and cfg.embed_scale == 16.0 and cfg.activation == "gelu_tanh"
    assert cfg.tied_embeddings and cfg.qk_norm and cfg.post_norms and cfg.rope_neox


# --- the device and error translation (SPEC GPU only, 4950-4952) -----------------------------------


def test_worker_gpu_only_open_cuda_without_gpu_fails_clearly() -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    with pytest.raises(WorkerError) as e:
        Engine.open("cuda", 0)
    assert e.value.code is ErrorCode.CUDA_ERROR
    assert "no CUDA device visible; use --device cpu only for development/testing" in e.value.message
    with pytest.raises(WorkerError) as e:
        Engine.open("tpu")  # type: ignore[arg-type]
    assert e.value.code is ErrorCode.INVALID_PARAMS


def test_worker_4952_errors_translated_with_distinct_oom_codes() -> None:
    cases = [
        (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"), ErrorCode.VRAM_OOM),
        (MemoryError(), ErrorCode.HOST_OOM),
        (
            RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 10 bytes"),
            ErrorCode.HOST_OOM,
        ),
        (RuntimeError("CUDA error: an illegal memory access was encountered"), ErrorCode.CUDA_ERROR),
        (ValueError("boom"), ErrorCode.INTERNAL),
    ]
    for exc, code in cases:
        with pytest.raises(WorkerError) as e:
            with device_errors("testing", 3):
                raise exc
        assert e.value.code is code, (exc, e.value)
    with pytest.raises(InvalidParams):  # typed errors pass through unchanged
        with device_errors("testing"):
            raise InvalidParams("x")


def test_worker_4020_one_device_per_process() -> None:
    Engine.open("cpu")  # the same device again is fine
    saved = device_mod._opened
    try:
        device_mod._opened = ("cuda", 1)
        with pytest.raises(WorkerError) as e:
            device_mod.open_device("cpu", 0)
        assert e.value.code is ErrorCode.CUDA_ERROR and "one device per process" in e.value.message
    finally:
        device_mod._opened = saved


def test_worker_4121_cpu_fingerprint_is_the_kernel_definition(monkeypatch: pytest.MonkeyPatch) -> None:
    """CPU mode computes the same checksum function as the GPU kernel (chunked; chunk seams included)."""
    from worker_orcd.engine.kernels.checksum import checksum_reference

    monkeypatch.setattr(reference, "_CHECKSUM_CHUNK_WORDS", 1000)
    g = torch.Generator().manual_seed(3)
    bufs = [torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g) for n in (13, 4 * 2500 + 3, 4000)]
    bufs.append(torch.randn(77, generator=g))
    assert reference.checksum_cpu(bufs) == checksum_reference(bufs)
    assert ops.checksum_hex(bufs) == f"{checksum_reference(bufs):016x}"
    bufs[1][4 * 1000 + 1] ^= 1  # one bit, right after a chunk seam
    assert reference.checksum_cpu(bufs) == checksum_reference(bufs)


@pytest.mark.parametrize("shape,wtype", [("tiny-qwen2", "F16"), ("tiny-llama", "Q8_0"), ("tiny-gemma3", "Q4_K_M")])
def test_worker_4700_triton_path_matches_torch_path(engine: Engine, model_dir: Path, shape: str, wtype: str) -> None:
    """The GPU code path (every Triton kernel, run by the interpreter on CPU tensors) computes what the
    CPU reference path computes: same logits to fp32 rounding, same greedy and sampled tokens."""
    from worker_orcd.engine.kernels import validate

    if not validate.TRITON_INTERPRETED:
        pytest.skip("needs TRITON_INTERPRET=1")
    path = synth.write_synthetic_model(model_dir / f"triton-{shape}.gguf", shape, wtype)
    rm = _load(engine, path)
    prompt = PROMPT[:6]
    sampled = {"max_tokens": 3, "temperature": 1.0, "top_k": 20, "seed": 5}
    try:
        ref_logits = rm.runner.prefill_logits(prompt)
        ref = (_run(rm, prompt, max_tokens=3)[0], _run(rm, prompt, **sampled)[0])
        ops.use_kernels_on_cpu(True)
        try:
            logits = rm.runner.prefill_logits(prompt)
            got = (_run(rm, prompt, max_tokens=3)[0], _run(rm, prompt, **sampled)[0])
        finally:
            ops.use_kernels_on_cpu(False)
        torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
        assert got == ref
    finally:
        rm.close()


@pytest.mark.parametrize("shape,dtype", [("tiny-qwen2", torch.float16), ("tiny-gemma3", torch.bfloat16)])
def test_worker_4700_half_precision_path(
    engine: Engine, model_dir: Path, monkeypatch: pytest.MonkeyPatch, shape: str, dtype: torch.dtype
) -> None:
    """The GPU's 16-bit resident dtypes through the Triton path: close to the fp32 reference."""
    from worker_orcd.engine import api
    from worker_orcd.engine.kernels import validate

    if not validate.TRITON_INTERPRETED:
        pytest.skip("needs TRITON_INTERPRET=1")
    path = synth.write_synthetic_model(model_dir / f"half-{shape}.gguf", shape, "Q8_0")
    prompt = PROMPT[:6]
    ref_model = _load(engine, path)
    try:
        ref = ref_model.runner.prefill_logits(prompt)
    finally:
        ref_model.close()
    monkeypatch.setattr(api, "resident_dtype", lambda cfg, ctx: dtype)
    rm = _load(engine, path)
    ops.use_kernels_on_cpu(True)
    try:
        assert rm._weights.embed.dtype == dtype and rm._kv.k.dtype == dtype
        got = rm.runner.prefill_logits(prompt)
        assert got.dtype == torch.float32 and torch.isfinite(got).all()
        rel = float((got - ref).norm() / ref.norm())
        assert rel < (2e-2 if dtype == torch.float16 else 6e-2), rel
        assert len(_run(rm, PROMPT[:6], max_tokens=2)[0]) == 2
    finally:
        ops.use_kernels_on_cpu(False)
        rm.close()


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # the interpreter's numpy exp
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_worker_4700_gated_act_kernel_matches_torch(activation: str) -> None:
    from worker_orcd.engine.kernels import validate

    if not validate.TRITON_INTERPRETED:
        pytest.skip("needs TRITON_INTERPRET=1")
    gu = torch.randn(3, 2 * 1500, generator=torch.Generator().manual_seed(4)) * 4
    want = ops.gated_act(gu, activation)
    ops.use_kernels_on_cpu(True)
    try:
        got = ops.gated_act(gu, activation)
    finally:
        ops.use_kernels_on_cpu(False)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(WorkerError):
        ops.gated_act(gu, "relu")


def test_worker_4102_chunked_streaming_is_exact(engine: Engine, model_dir: Path) -> None:
    """Tiny staging chunks (many per tensor, cut on block boundaries) give the same resident bytes."""
    from worker_orcd.engine.upload import upload
    from worker_orcd.engine.weights import resident_dtype, weight_layout

    path = synth.write_synthetic_model(model_dir / "chunks.gguf", "tiny-gemma3", "Q4_K_M")
    vm = _validated(path)
    cfg = model_config(vm.gguf)
    lay = weight_layout(cfg, vm.gguf, resident_dtype(cfg, engine.ctx))
    arenas = []
    for chunk in (1 << 20, 1000, 3 * 144 + 5):
        arena = torch.zeros(lay.total_bytes, dtype=torch.uint8)
        with open(path, "rb") as fh:
            stats = upload(fh, vm.gguf, lay, arena, vm.digest, engine.ctx, chunk_bytes=chunk)
        assert stats.file_bytes == vm.size and stats.uploaded_bytes <= vm.size
        arenas.append(arena)
    assert torch.equal(arenas[0], arenas[1]) and torch.equal(arenas[0], arenas[2])


def test_worker_4102_upload_reports_progress_and_ignores_a_failing_observer(engine: Engine, model_dir: Path) -> None:
    """Issue 13: /health shows the upload's progress; an observer that raises never breaks the load."""
    from worker_orcd.engine.upload import upload
    from worker_orcd.engine.weights import resident_dtype, weight_layout

    path = synth.write_synthetic_model(model_dir / "progress.gguf", "tiny-qwen2", "Q8_0")
    vm = _validated(path)
    cfg = model_config(vm.gguf)
    lay = weight_layout(cfg, vm.gguf, resident_dtype(cfg, engine.ctx))
    seen: list[tuple[int, int]] = []
    with open(path, "rb") as fh:
        stats = upload(fh, vm.gguf, lay, torch.zeros(lay.total_bytes, dtype=torch.uint8), vm.digest, engine.ctx,
                       chunk_bytes=4096, progress=lambda done, total: seen.append((done, total)))
    total = seen[0][1]
    assert seen[0] == (0, total) and seen[-1] == (total, total) == (stats.uploaded_bytes, total)
    assert len(seen) > 3 and [d for d, _ in seen] == sorted(d for d, _ in seen)  # per chunk, monotonic

    def broken(done: int, total: int) -> None:
        raise RuntimeError("observer bug")

    rm = load_resident(engine, vm, kv_cache_mb=1, progress=broken)
    try:
        assert _run(rm, PROMPT[:3], max_tokens=2)[1].tokens_out == 2
    finally:
        rm.close()


def test_worker_4102_warmup_runs_beside_the_upload(engine: Engine, model_dir: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 13 (time to ready): the runner warms up while the weights still stream in. The upload here
    waits for the warm-up before its first chunk, so a load that ran them one after the other would warm
    up with no upload thread alive (and the wait would time out)."""
    from worker_orcd.engine.runner import ModelRunner

    path = synth.write_synthetic_model(model_dir / "overlap.gguf", "tiny-qwen2", "Q8_0")
    vm = _validated(path)
    warmed = threading.Event()
    beside: list[bool] = []
    real = ModelRunner.warmup

    def warmup(self: ModelRunner, force: bool = False) -> None:
        beside.append(any(t.name == "weights-upload" and t.is_alive() for t in threading.enumerate()))
        real(self, force)
        warmed.set()

    def progress(done: int, total: int) -> None:
        if done == 0:
            warmed.wait(10)

    from worker_orcd.engine import upload as upload_mod

    threads: list[str] = []  # where the slots dequantized at load were: never the upload's thread (Triton's JIT)
    real_dequantize = upload_mod.dequantize

    def dequantize(*a: object, **kw: object) -> torch.Tensor:
        threads.append(threading.current_thread().name)
        return real_dequantize(*a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(ModelRunner, "warmup", warmup)
    monkeypatch.setattr(upload_mod, "dequantize", dequantize)
    rm = load_resident(engine, vm, kv_cache_mb=1, progress=progress)
    try:
        assert beside == [True]
        assert rm.load_stats.digest == vm.digest and rm.load_stats.uploaded_bytes > 0
        assert threads and set(threads) == {threading.current_thread().name}
    finally:
        rm.close()


@pytest.mark.parametrize("resident", ["dense", "quantized"])
def test_worker_4102_the_overlapped_load_holds_the_sequential_loads_bytes(model_dir: Path, resident: str,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The arena after a load beside the warm-up (deferred dense slots; quantized: planned, then repacked
    after the upload) is byte for byte the one a stage-after-stage load leaves, and so are its first tokens."""
    path = synth.write_synthetic_model(model_dir / f"overlap-{resident}.gguf", "tiny-gemma3", "Q4_K_M")
    vm = _validated(path)
    eng = Engine.open("cpu", resident_weights=resident)
    arenas, stages, tokens = [], [], []
    for limit in (api_mod.OVERLAP_DENSE_BYTES, -1):  # -1: every model loads one stage after another
        monkeypatch.setattr(api_mod, "OVERLAP_DENSE_BYTES", limit)
        rm = load_resident(eng, vm, kv_cache_mb=1)
        try:
            arenas.append(rm._weights.arena.clone())
            stages.append(list(rm.load_stages))
            tokens.append(_run(rm, PROMPT, max_tokens=4)[0])
        finally:
            rm.close()
    assert "upload-wait" in stages[0] and "upload" in stages[1] and "upload-wait" not in stages[1]
    assert torch.equal(arenas[0], arenas[1]) and tokens[0] == tokens[1]


def test_worker_4102_a_failed_warmup_stops_the_upload_beside_it(engine: Engine, model_dir: Path,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """The load fails with the warm-up's error, logged with whether the upload was still streaming; no upload or
    reader thread outlives it, and the engine loads the model afterwards."""
    from worker_orcd.engine.runner import ModelRunner

    path = synth.write_synthetic_model(model_dir / "overlap-fail.gguf", "tiny-qwen2", "F16")
    vm = _validated(path)
    streaming = threading.Event()

    def warmup(self: ModelRunner, force: bool = False) -> None:
        streaming.wait(10)  # the upload is under way
        raise RuntimeError("warm-up broke")

    monkeypatch.setattr(ModelRunner, "warmup", warmup)
    with caplog.at_level(logging.WARNING, logger="worker_orcd.engine"), pytest.raises(Exception, match="warm-up broke"):
        load_resident(engine, vm, kv_cache_mb=1, progress=lambda done, total: streaming.set())
    assert streaming.is_set()
    failed = [r.getMessage() for r in caplog.records if "graph capture failed while the weights' upload" in r.getMessage()]
    assert len(failed) == 1 and "warm-up broke" in failed[0], failed
    assert not [t.name for t in threading.enumerate() if t.name in ("weights-upload", "weights-reader")]
    monkeypatch.undo()
    load_resident(engine, vm, kv_cache_mb=1).close()


def test_worker_4102_a_cancelled_upload_stops_at_the_next_chunk(engine: Engine, model_dir: Path) -> None:
    from worker_orcd.engine.upload import UploadThread
    from worker_orcd.engine.weights import resident_dtype, weight_layout

    path = synth.write_synthetic_model(model_dir / "cancel.gguf", "tiny-qwen2", "F16")
    vm = _validated(path)
    cfg = model_config(vm.gguf)
    lay = weight_layout(cfg, vm.gguf, resident_dtype(cfg, engine.ctx))
    chunks: list[int] = []
    with open(path, "rb") as fh:
        up = UploadThread(fh, vm.gguf, lay, torch.zeros(lay.total_bytes, dtype=torch.uint8), vm.digest, engine.ctx,
                          lambda done, total: chunks.append(done), chunk_bytes=4096)
        up.cancel.set()
        up.start()
        with pytest.raises(ModelLoadError, match="cancelled"):
            up.result()
    assert chunks == [0]  # told of nothing uploaded: it stopped before its first chunk


def test_worker_4113_truncated_or_grown_file_refused(engine: Engine, model_dir: Path) -> None:
    path = synth.write_synthetic_model(model_dir / "grown.gguf", "tiny-qwen2", "F16")
    vm = _validated(path)
    with open(path, "ab") as fh:
        fh.write(b"\0" * 64)
    with pytest.raises(ModelLoadError) as e:
        load_resident(engine, vm, kv_cache_mb=1)
    assert e.value.code is ErrorCode.MODEL_LOAD_FAILED and "when it was verified" in e.value.message


def test_worker_4710_load_time_warmup_leaves_no_trace(qwen: ResidentModel) -> None:
    """The load-time warm-up (prefill + every sampler variant) does not change later streams."""
    params = {"max_tokens": 6, "temperature": 0.8, "top_k": 30, "seed": 11}
    before = _run(qwen, PROMPT[:3], **params)[0]
    qwen.runner.warmup(force=True)
    assert _run(qwen, PROMPT[:3], **params)[0] == before


# --- the CPU half of test_engine_gpu.py's GPU-vs-CPU comparison, and the CPU-mode seal's cost -------

import test_engine_gpu as gpu_cmp  # noqa: E402 - its comparison helpers and cases (this section only)


@pytest.mark.slow  # ~20 s here: three mid-size models, each loaded twice
@pytest.mark.parametrize("case", gpu_cmp.SYNTH_LOGITS_CASES, ids=lambda c: c.model)
def test_worker_4700_gpu_comparison_cases_hold_on_the_cpu(
    engine: Engine, model_dir: Path, monkeypatch: pytest.MonkeyPatch, case: gpu_cmp.LogitsCase
) -> None:
    """What the GPU test takes for granted, checked where it can be: each synthetic comparison model
    loads on the CPU engine with logits spread like a trained model's (finite, std 1-10), enough
    prompts have a clear top-1 that the GPU's top-1 check is never vacuous, the CPU path run in the
    GPU's resident dtype (pure rounding) passes the GPU tolerance, and a wrong answer does not."""
    from worker_orcd.engine import api
    from worker_orcd.engine.weights import resident_dtype

    assert case.weight_type is not None
    path = synth.write_synthetic_model(model_dir / f"cmp-{case.model}.gguf", case.model, case.weight_type)
    ref_model = _load(engine, path, kv_cache_mb=64)
    try:
        prompts = [gpu_cmp.synthetic_prompt(ref_model.config.vocab_size, n) for n in case.lengths]
        want = gpu_cmp.prefill_logits(ref_model, prompts)
        gpu_dtype = resident_dtype(ref_model.config, dataclasses.replace(engine.ctx, kind="cuda"))
    finally:
        ref_model.close()
    for b in want:
        assert torch.isfinite(b).all() and 1.0 < float(b.std()) < 10.0, float(b.std())
    monkeypatch.setattr(api, "resident_dtype", lambda cfg, ctx: gpu_dtype)
    half = _load(engine, path, kv_cache_mb=64)
    try:
        assert half._weights.embed.dtype == gpu_dtype
        got = gpu_cmp.prefill_logits(half, prompts)
    finally:
        half.close()
    tol = gpu_cmp.REL_TOL[gpu_dtype]
    decisive = gpu_cmp.assert_logits_agree(got, want, tol, f"{case.model} in {gpu_dtype}")
    assert decisive >= gpu_cmp.MIN_DECISIVE, f"only {decisive} of {len(prompts)} prompts have a clear top-1"
    with pytest.raises(AssertionError, match="relative L2 error"):
        gpu_cmp.assert_logits_agree(want[1:] + want[:1], want, tol, "shuffled")


@pytest.mark.slow  # loads the real 0.5B model (~2.5 GB of fp32 weights)
def test_worker_4121_cpu_mode_seal_check_is_cheap_on_a_real_model(qwen05_path: Path) -> None:
    """verify_seal runs before every request, so in CPU mode (CI's integration tests) it must stay
    well under a second for the 0.5B model (it took 6-10 s before the host checksum was vectorised),
    and it still sees one flipped byte."""
    engine = Engine.open("cpu")
    sealed = load_sealed(
        engine, _validated(qwen05_path), shard_id="seal-cost", sealer=Sealer(), kv_cache_mb=1, capture_graph=False
    )
    arena = sealed.resident._weights.arena  # type: ignore[attr-defined]
    try:
        ms = min(sealed.verify_seal() for _ in range(3))
        assert ms < 2000, f"CPU-mode seal check took {ms:.0f} ms for {arena.numel() / 1e9:.2f} GB"
        i = arena.numel() - 5
        arena[i] ^= 0x20
        try:
            with pytest.raises(SealVerificationError):
                sealed.verify_seal()
        finally:
            arena[i] ^= 0x20
        sealed.verify_seal()
    finally:
        del arena
        sealed.close()


def test_worker_4712_cpu_sampler_noise_is_finite_for_the_top_random_word() -> None:
    """Seed 7, step 368 draws Philox word 0xFFFFFFxx for token 40327: the reference once mapped it to
    u = 1.0 (24 bits), i.e. +inf Gumbel noise, so a token with a hopeless logit won the draw; the
    kernel's 23-bit uniform keeps u < 1 and the reference now draws what the kernel draws."""
    import numpy as np

    r = reference.philox_x0(7, np.arange(40327, 40328, dtype=np.uint32), 368, 0, reference._SAMPLE_TAG)
    assert int(r[0]) >> 8 == 0xFFFFFF
    logits = torch.zeros(40328)
    logits[40327] = -40.0
    kw = dict(top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0, penalty_ids=None, seed=7, step=368)
    got = int(reference.sample_reference(logits, temperature=1.0, **kw))  # type: ignore[arg-type]
    assert got != 40327
    from worker_orcd.engine.kernels import sampling

    if sampling.v.TRITON_INTERPRETED:
        assert int(sampling.sample(logits, temperature=1.0, **kw)) == got  # type: ignore[arg-type]
