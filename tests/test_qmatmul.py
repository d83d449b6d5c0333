"""Fused dequant-matmul (issue 13): y = x·Wᵀ with W as GGUF blocks, for every fused type.

Oracle: gguf-py's dequantizer (llama.cpp's Python port) + float64 matmul. Batch invariance: a row's
result is bitwise identical whatever M is and wherever the row sits (the batching engine rests on it).
On the CPU the kernel runs in Triton's interpreter; the ``gpu`` tests repeat it compiled.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import REQUIRE_REAL_GPU
from kernel_testing import rel
from test_dequant import F16_FIELDS, oracle
from worker_orcd.engine.errors import KernelDimensionError
from worker_orcd.engine.kernels import qmatmul_tiled as tiled
from worker_orcd.engine.kernels.matmul_dense import dense_matmul
from worker_orcd.engine.kernels.qmatmul import qlinear, qmatmul, qmatmul_reference
from worker_orcd.engine.qlayout import PLANAR_TYPES, to_planes
from worker_orcd.engine.qweight import FUSED_TYPES, QWeight, WeightGroup
from worker_orcd.gguf.constants import BLOCK_LAYOUT, GGMLType

TYPES = sorted(FUSED_TYPES)
FLOAT_NP = {GGMLType.F32: np.float32, GGMLType.F16: np.float16}


def random_weight(t: GGMLType, n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """Random rows of type t as file bytes, scales small so fp16 never overflows (|w| <~ 2)."""
    if t in FLOAT_NP:
        return (rng.standard_normal((n, k)) * 0.05).astype(FLOAT_NP[t]).view(np.uint8).reshape(-1)
    if t == GGMLType.BF16:
        f = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
        return (f.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8).reshape(-1)
    layout = BLOCK_LAYOUT[t]
    nb = n * k // layout.block_size
    blocks = rng.integers(0, 256, size=(nb, layout.type_size), dtype=np.uint8)
    for off in F16_FIELDS[t]:
        scale = (rng.random(nb) * 0.004 + 0.0005).astype(np.float16)
        blocks[:, off : off + 2] = scale.view(np.uint8).reshape(nb, 2)
    return blocks.reshape(-1)


def make(t: GGMLType, n: int, k: int, rng: np.random.Generator, device: str) -> tuple[QWeight, torch.Tensor]:
    raw = random_weight(t, n, k, rng)
    w = QWeight(torch.from_numpy(raw).to(device), t, n, k)
    return w, oracle(raw, t).view(n, k)


@pytest.fixture
def rowwise_dot(monkeypatch: pytest.MonkeyPatch) -> None:
    """Model the tensor core's per-element property in the interpreter: C[m, n] = acc continued by
    a[m, k] * b[k, n] for k in order, in fp32, whatever the other rows hold.

    The interpreter's own ``tl.dot`` is ``np.matmul(a, b) + acc``, whose result for a row changes with
    the row's position and the operand shape (numpy's kernels; checked: all 50 of 50 random tiles).
    With this model, what remains under test is the kernel's own structure: tiling, masking, the K
    loop, GROUP_M, nothing depending on M. The GPU test checks the compiled mma for real.
    """
    if not REQUIRE_REAL_GPU:
        from triton.runtime import interpreter

        def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):  # noqa: ANN001, ARG001
            a32, b32 = a.data.astype(np.float32), b.data.astype(np.float32)
            c = d.data.astype(np.float32).copy()
            for k in range(a32.shape[-1]):
                c += a32[..., :, k, None] * b32[..., None, k, :]
            return interpreter.TensorHandle(c.astype(d.data.dtype), d.dtype.scalar)

        monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", create_dot)


def k_for(t: GGMLType) -> int:
    return 512 if BLOCK_LAYOUT[t].block_size == 256 else 320  # 320: a ragged last K tile


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_worker_4701_qmatmul_matches_gguf_float64(t: GGMLType, gen: torch.Generator, device: str) -> None:
    rng = np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=gen)))
    n, k = 40, k_for(t)
    w, wf = make(t, n, k, rng, device)
    x = torch.randn(5, k, generator=gen).to(device=device, dtype=torch.float16)
    bias = torch.randn(n, generator=gen).to(device)
    y = qmatmul(x, w, bias)
    assert y.dtype == torch.float16 and y.shape == (5, n)
    ref = x.double().cpu() @ wf.to(torch.float16).double().t() + bias.double().cpu()
    assert rel(y.cpu(), ref) < 2e-3
    y32 = qmatmul(x, w, out_dtype=torch.float32)  # logits: fp32 output
    assert y32.dtype == torch.float32
    assert rel(y32.cpu(), ref - bias.double().cpu()) < 1e-5
    assert torch.equal(qmatmul(x, w, bias), y), "not deterministic"


@pytest.mark.parametrize("t", [GGMLType.Q4_K, GGMLType.Q8_0, GGMLType.F16], ids=lambda t: t.name)
def test_worker_4711_qmatmul_batch_invariant(rowwise_dot: None, t: GGMLType, gen: torch.Generator, device: str) -> None:
    """Rows of M = 1..70 (one, two and four 16-row dots per program) equal the same rows at M = 70."""
    rng = np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=gen)))
    n, k = 40, k_for(t)
    w, _ = make(t, n, k, rng, device)
    pool = torch.randn(70, k, generator=gen).to(device=device, dtype=torch.float16)
    full = qmatmul(pool, w)
    for m in (1, 2, 7, 16, 17, 33, 50):
        idx = torch.randperm(70, generator=gen)[:m].to(device)
        assert torch.equal(qmatmul(pool[idx], w), full[idx]), f"M={m}"


def test_worker_4701_qmatmul_fp32_activations_and_bf16(gen: torch.Generator, device: str) -> None:
    rng = np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=gen)))
    w, wf = make(GGMLType.Q6_K, 33, 256, rng, device)
    cases = [(torch.float32, 1e-6)]
    if device == "cuda":  # the interpreter's tl.dot multiplies bf16 as raw uint16 bits
        cases.append((torch.bfloat16, 2e-2))
    for dt, tol in cases:
        x = torch.randn(3, 256, generator=gen).to(device=device, dtype=dt)
        y = qmatmul(x, w)
        assert y.dtype == dt
        assert rel(y.cpu(), qmatmul_reference(x.cpu(), QWeight(w.raw.cpu(), w.ggml_type, 33, 256))) < tol


def test_worker_4701_mixed_type_group_writes_each_part(gen: torch.Generator, device: str) -> None:
    """Q4_K_M's fused QKV: Q and K in Q4_K, V in Q6_K; one output, each part its columns (+ bias)."""
    rng = np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=gen)))
    parts = [make(GGMLType.Q4_K, 32, 256, rng, device), make(GGMLType.Q4_K, 16, 256, rng, device),
             make(GGMLType.Q6_K, 16, 256, rng, device)]  # fmt: skip
    g = WeightGroup(tuple(p for p, _ in parts))
    assert g.shape == (64, 256)
    x = torch.randn(4, 256, generator=gen).to(device=device, dtype=torch.float16)
    bias = torch.randn(64, generator=gen).to(device)
    y = qlinear(x, g, bias)
    wf = torch.cat([f for _, f in parts]).to(torch.float16).double()
    assert rel(y.cpu(), x.double().cpu() @ wf.t() + bias.double().cpu()) < 2e-3
    assert torch.equal(y[:, 48:], qmatmul(x, parts[2][0], bias[48:]))


def test_worker_4400_qmatmul_bad_shapes_rejected(gen: torch.Generator, device: str) -> None:
    rng = np.random.default_rng(1)
    w, _ = make(GGMLType.Q8_0, 8, 64, rng, device)
    x = torch.randn(2, 64, generator=gen).to(device=device, dtype=torch.float16)
    bad = {
        "K mismatch": lambda: qmatmul(torch.zeros(2, 96, dtype=torch.float16, device=device), w),
        "x rank": lambda: qmatmul(x[0], w),
        "x dtype": lambda: qmatmul(x.to(torch.int32), w),
        "x stride": lambda: qmatmul(torch.zeros(64, 2, dtype=torch.float16, device=device).t(), w),
        "out shape": lambda: qmatmul(x, w, out=torch.empty(2, 9, dtype=torch.float16, device=device)),
        "bias shape": lambda: qmatmul(x, w, torch.zeros(7, device=device)),
        "weight not QWeight": lambda: qmatmul(x, torch.zeros(8, 64)),  # type: ignore[arg-type]
        "no rows": lambda: qmatmul(x[:0], w),
    }
    for what, call in bad.items():
        with pytest.raises(KernelDimensionError, match="qmatmul"):
            call()
            pytest.fail(what)
    with pytest.raises(ValueError):
        QWeight(w.raw[:-1], GGMLType.Q8_0, 8, 64)
    with pytest.raises(ValueError):
        QWeight(w.raw, GGMLType.Q8_0, 8, 48)


@pytest.mark.gpu
@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_worker_4711_gpu_qmatmul_batch_invariant_large(t: GGMLType, gen: torch.Generator, device: str) -> None:
    """Compiled: rows at M = 1..2048 bitwise equal to the same rows at M = 2048 (7B-ish K), and exact."""
    rng = np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=gen)))
    w, wf = make(t, 1000, 3584, rng, device)
    pool = torch.randn(2048, 3584, generator=gen).to(device=device, dtype=torch.float16)
    full = qmatmul(pool, w)
    ref = pool.double() @ wf.to(device=device, dtype=torch.float16).double().t()
    assert rel(full, ref) < 2e-3
    for m in (1, 2, 3, 8, 15, 16, 17, 31, 32, 33, 64, 100, 128, 512, 1999):
        idx = torch.randperm(2048, generator=gen)[:m].to(device)
        assert torch.equal(qmatmul(pool[idx], w), full[idx]), f"M={m}"
        assert torch.equal(qmatmul(pool[:m], w), full[:m]), f"M={m} prefix"


# --- qmatmul_tiled: Q4_K as file blocks, Q8_0 / Q6_K in qlayout's planes -------------------------

TILED = [GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K,
         GGMLType.Q8_0]


def make_resident(t: GGMLType, n: int, k: int, rng: np.random.Generator, device: str) -> tuple[QWeight, torch.Tensor]:
    """A weight as the quantized residency holds it (planar where qlayout repacks the type)."""
    w, wf = make(t, n, k, rng, device)
    if t in PLANAR_TYPES:
        w = QWeight(to_planes(w.raw, t, n, k), t, n, k, planar=True)
    return w, wf


def test_worker_4701_k_segments_depend_on_the_shape_only() -> None:
    assert tiled.k_segments(152_064, 3584) == (3584, 1)  # a head fills the GPU by columns
    assert tiled.k_segments(3584, 18_944) == (2560, 8)  # 7B down: 56 column tiles, 8 segments
    assert tiled.k_segments(4608, 3584) == (512, 7)  # super-block multiples: the last one shorter
    assert tiled.k_segments(37_888, 3584) == (1792, 2)
    for n, k in ((24, 512), (896, 4864), (1152, 896)):
        ks, nseg = tiled.k_segments(n, k)
        assert ks % tiled.SEG_UNIT == 0 and (nseg - 1) * ks < k <= nseg * ks and nseg <= tiled.MAX_SEGMENTS


@pytest.mark.parametrize("t", TILED, ids=lambda t: t.name)
def test_worker_4701_tiled_matches_gguf_float64(t: GGMLType, gen: torch.Generator, device: str) -> None:
    rng = np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=gen)))
    n, k = 40, 512
    w, wf = make_resident(t, n, k, rng, device)
    assert tiled.supports(w)
    assert torch.equal(w.dequantize().cpu(), wf.float()), "planar bytes dequantize to the file's values"
    bias = torch.randn(n, generator=gen).to(device)
    for m in (1, 5, 40):
        x = torch.randn(m, k, generator=gen).to(device=device, dtype=torch.float16)
        y = qmatmul(x, w, bias)
        ref = x.double().cpu() @ wf.to(torch.float16).double().t() + bias.double().cpu()
        assert rel(y.cpu(), ref) < 2e-3, f"M={m}"
        x32 = x.float()
        assert rel(qmatmul(x32, w).cpu(), x32.double().cpu() @ wf.double().t()) < 1e-6, f"M={m} fp32"


@pytest.mark.parametrize("t", TILED, ids=lambda t: t.name)
def test_worker_4711_tiled_rows_equal_dense_and_invariant(
    rowwise_dot: None, t: GGMLType, gen: torch.Generator, device: str
) -> None:
    """Each row equals the dense kernel's chains over the same K segments (on the dequantized fp16
    weight) added in order, bit for bit, and its own row at M = 70: the swapped form (M <= 64, one
    program per segment, the sums in a second launch) and the unswapped one (segments in one
    program; one, two and four 16-row dots per program), with a bias."""
    rng = np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=gen)))
    n, k = 24, 512
    assert tiled.k_segments(n, k)[1] == 2
    w, _ = make_resident(t, n, k, rng, device)
    w16 = w.dequantize(torch.float32).to(device=device, dtype=torch.float16)
    bias = torch.randn(n, generator=gen).to(device=device, dtype=torch.float16)
    pool = torch.randn(70, k, generator=gen).to(device=device, dtype=torch.float16)
    full = qmatmul(pool, w, bias)
    assert torch.equal(full, tiled.segments_reference(pool, w16, bias))
    for m in (1, 2, 16, 17, 33, 50, 64, 65):
        idx = torch.randperm(70, generator=gen)[:m].to(device)
        assert torch.equal(qmatmul(pool[idx], w, bias), full[idx]), f"M={m}"
    out = torch.empty(5, n, dtype=torch.float16, device=device)
    swapped = tiled.qmatmul_tiled(pool[:5], w, bias, out.clone(), swap=True)
    assert torch.equal(swapped, tiled.qmatmul_tiled(pool[:5], w, bias, out.clone(), swap=False))


def test_worker_4400_planar_weights_checked(gen: torch.Generator, device: str) -> None:
    rng = np.random.default_rng(2)
    w, _ = make(GGMLType.Q4_K, 8, 256, rng, device)
    with pytest.raises(ValueError, match="no planar layout"):
        QWeight(w.raw, GGMLType.Q4_K, 8, 256, planar=True)
    q, _ = make(GGMLType.Q8_0, 8, 64, rng, device)
    p = QWeight(to_planes(q.raw, GGMLType.Q8_0, 8, 64), GGMLType.Q8_0, 8, 64, planar=True)
    x = torch.randn(2, 64, generator=gen).to(device=device, dtype=torch.float16)
    with pytest.raises(KernelDimensionError, match="qmatmul"):
        qmatmul(torch.zeros(2, 96, dtype=torch.float16, device=device), p)
    # the same matrix through the planes (tiled kernel) and the file's blocks (the per-element kernel)
    assert rel(qmatmul(x, p).cpu(), qmatmul(x, q).double().cpu()) < 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("t", TILED, ids=lambda t: t.name)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_worker_4711_gpu_tiled_equals_dense_every_m(t: GGMLType, dtype: torch.dtype, gen: torch.Generator, device: str) -> None:
    """Compiled: rows at M = 1..1100 (the swapped form to 64 rows: wgmma with the weight as A from
    registers, one program per K segment; wgmma tiles above, segments in one program) bitwise equal
    to the dense kernel's chains over the same segments on the dequantized weight, and to the same
    rows at M = 1100."""
    rng = np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=gen)))
    w, wf = make_resident(t, 1000, 3584, rng, device)
    assert tiled.k_segments(1000, 3584)[1] > 1
    wd = wf.to(device=device).to(dtype)
    pool = torch.randn(1100, 3584, generator=gen).to(device=device, dtype=dtype)
    full = qmatmul(pool, w)
    assert torch.equal(full, tiled.segments_reference(pool, wd))
    assert rel(full, pool.double() @ wd.double().t()) < 2e-2
    for m in (1, 2, 8, 16, 17, 33, 63, 64, 65, 127, 128, 300, 1099):
        idx = torch.randperm(1100, generator=gen)[:m].to(device)
        assert torch.equal(qmatmul(pool[idx], w), full[idx]), f"M={m}"


@pytest.mark.parametrize("t", TILED, ids=lambda t: t.name)
def test_worker_4711_tiled_64_input_dots_same_rows(rowwise_dot: None, t: GGMLType, gen: torch.Generator, device: str) -> None:
    """The 64-input-dot form (two sub-tiles dequantized into one operand) builds the same operand
    values in the same k order as the 32-input form: equal rows under the per-element dot model."""
    rng = np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=gen)))
    w, _ = make_resident(t, 24, 512, rng, device)
    x = torch.randn(5, 512, generator=gen).to(device=device, dtype=torch.float16)
    out = torch.empty(5, 24, dtype=torch.float16, device=device)
    y32 = tiled.qmatmul_tiled(x, w, None, out.clone(), config=(16, 1, 16, 4, 1, 32))
    y64 = tiled.qmatmul_tiled(x, w, None, out.clone(), config=(16, 1, 16, 4, 1, 64))
    assert torch.equal(y32, y64)


@pytest.mark.parametrize("t", sorted(tiled.HALF2_TYPES), ids=lambda t: t.name)
def test_worker_4711_tiled_half2_rows_are_its_reference_and_invariant(
    rowwise_dot: None, t: GGMLType, gen: torch.Generator, device: str
) -> None:
    """``half2=True`` (Q4_K/Q6_K in packed fp16 arithmetic): each row equals the dense chains over the
    same K segments on ``half2_weight`` bit for bit, in both forms and at every M; those weights are
    ggml's values up to the fp16 rounding of each sub-block's scale (and min)."""
    rng = np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=gen)))
    n, k = 24, 512
    w, _ = make_resident(t, n, k, rng, device)
    wh = tiled.half2_weight(w)
    ggml = w.dequantize(torch.float32).to(device)
    err = (wh.float() - ggml).abs().max().item()
    assert 0 < err <= 2.0**-9 * ggml.abs().max().item(), err  # differs (the test can fail), by little
    pool = torch.randn(70, k, generator=gen).to(device=device, dtype=torch.float16)
    out = torch.empty(70, n, dtype=torch.float16, device=device)
    full = tiled.qmatmul_tiled(pool, w, None, out.clone(), swap=False, half2=True)
    assert torch.equal(full, tiled.segments_reference(pool, wh))
    for m in (1, 5, 16, 33, 64):
        idx = torch.randperm(70, generator=gen)[:m].to(device)
        got = tiled.qmatmul_tiled(pool[idx], w, None, out[:m].clone(), swap=True, half2=True)
        assert torch.equal(got, full[idx]), f"M={m}"
    with pytest.raises(KernelDimensionError, match="half2"):
        tiled.qmatmul_tiled(pool.float(), w, None, out.float(), half2=True)


@pytest.mark.gpu
@pytest.mark.parametrize("t", sorted(tiled.HALF2_TYPES), ids=lambda t: t.name)
def test_worker_4711_gpu_tiled_half2_equals_its_reference_every_m(t: GGMLType, gen: torch.Generator, device: str) -> None:
    """Compiled (the inline f16x2 PTX, which the interpreter does not run): rows at M = 1..300 bitwise
    equal to the dense chains over the same K segments on ``half2_weight``, both forms."""
    rng = np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=gen)))
    w, _ = make_resident(t, 1000, 3584, rng, device)
    wh = tiled.half2_weight(w)
    pool = torch.randn(300, 3584, generator=gen).to(device=device, dtype=torch.float16)
    out = torch.empty(300, 1000, dtype=torch.float16, device=device)
    full = tiled.qmatmul_tiled(pool, w, None, out.clone(), swap=False, half2=True)
    assert torch.equal(full, tiled.segments_reference(pool, wh))
    for m in (1, 2, 16, 17, 33, 64, 65, 299):
        idx = torch.randperm(300, generator=gen)[:m].to(device)
        assert torch.equal(tiled.qmatmul_tiled(pool[idx], w, None, out[:m].clone(), half2=True), full[idx]), f"M={m}"
