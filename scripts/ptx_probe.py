"""Compile the tiled quantized matmul and the dense matmul for sm_90 on any machine (no GPU) and list
the tensor-core and conversion instructions each uses; writes PTX/TTGIR to --out for diffing.

Why: on the H200 the tiled kernel's 16-row form gave rows that differ from the dense kernel's 16-row
form (benchmarks/RESULTS.md, fourth session); this shows both lower to the same
``mma.sync.m16n8k16.f32.f16.f16.f32`` chain, so the difference is to be found elsewhere.

    python scripts/ptx_probe.py --out /tmp/ptx
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from worker_orcd.engine.kernels import matmul_dense as D  # noqa: E402
from worker_orcd.engine.kernels import qmatmul_tiled as T  # noqa: E402

OPS = re.compile(r"(mma\.sync[^ ]*|wgmma\.mma_async[^ ]*|fma\.rn\.f32|cvt\.rn\.f16x2\.f32|cvt\.rn\.f16\.f32)")
SIG_T = {"x_ptr": "*fp16", "w_ptr": "*u8", "w16_ptr": "*fp16", "w32_ptr": "*i32", "b_ptr": "*fp16", "y_ptr": "*fp16",
         "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "stride_ym": "i32", "RB": "i32", "P1": "i32",
         "P2": "i32", "P3": "i32", "WTYPE": "constexpr", "HAS_BIAS": "constexpr", "GROUP": "constexpr",
         "BR": "constexpr", "BN": "constexpr", "KD": "constexpr"}  # fmt: skip
SIG_D = {"x_ptr": "*fp16", "w_ptr": "*fp16", "b_ptr": "*fp16", "y_ptr": "*fp16", "part_ptr": "*fp32", "lock_ptr": "*i32",
         "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "stride_ym": "i32", "K_SPLIT": "i32",
         "HAS_BIAS": "constexpr", "SPLIT": "constexpr", "GROUP_M": "constexpr", "BMc": "constexpr", "BN": "constexpr",
         "BK": "constexpr"}  # fmt: skip


def compile_one(fn, sig: dict, consts: dict, out: Path, name: str) -> None:  # noqa: ANN001
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": 4, "num_stages": 3, "enable_fp_fusion": False})
    ptx = k.asm["ptx"]
    (out / f"{name}.ptx").write_text(ptx)
    (out / f"{name}.ttgir").write_text(k.asm["ttgir"])
    print(f"{name}: {sorted(set(OPS.findall(ptx)))}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("/tmp/ptx"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for br in (16, 64):
        compile_one(T.qmatmul_tiled_kernel, SIG_T,
                    {"WTYPE": 8, "HAS_BIAS": False, "GROUP": 1, "BR": br, "BN": 32, "KD": 32}, args.out, f"tiled_q8_0_br{br}")
    compile_one(D.dense_matmul_kernel, SIG_D,
                {"HAS_BIAS": False, "SPLIT": 1, "GROUP_M": 1, "BMc": 16, "BN": 32, "BK": 32}, args.out, "dense_br16_bk32")
    return 0


if __name__ == "__main__":
    sys.exit(main())
