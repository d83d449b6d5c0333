"""Count the SASS instructions of ``qmatmul_tiled``'s kernel for sm_90 — on any machine, no GPU needed.

Triton compiles the kernel for an H100/H200 target (``GPUTarget("cuda", 90, 32)``) with the
divisibility the launches specialize on (pointers, N, K, strides, row bytes and plane offsets are
multiples of 16 for real shapes), and ``cuobjdump`` (shipped with Triton) lists its SASS. The main
loop is one super-block (16 HGMMA for the 64x16 swapped form), so the total is dominated by the
instructions per super-block and thread: what the ``half2`` dequantization cuts. Counting first,
measuring on the GPU second (benchmarks/probe_half2.py).

    python benchmarks/sass_qtiled.py --type Q4_K Q6_K --half2 0 1
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from worker_orcd.engine.kernels import qmatmul_tiled as T  # noqa: E402
from worker_orcd.gguf.constants import GGMLType  # noqa: E402

SIG = {"x_ptr": "*fp16", "w_ptr": "*u8", "w16_ptr": "*fp16", "w32_ptr": "*i32", "b_ptr": "*fp16", "y_ptr": "*fp16",
       "part_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "stride_ym": "i32", "RB": "i32",
       "P1": "i32", "P2": "i32", "P3": "i32", "KS": "i32", "NSEG": "i32"}
DIV16 = {"N", "K", "stride_xm", "stride_ym", "RB", "P1", "P2", "P3", "KS"}  # M, NSEG: any value


def sass(wtype: GGMLType, half2: bool, swap: bool) -> tuple[int, int, collections.Counter[str]]:
    """(instructions, registers per thread, opcode counts) of one specialization."""
    consts = {"WTYPE": int(wtype), "HAS_BIAS": False, "GROUP": 1, "BR": 16 if swap else 64, "BN": 64, "KD": 32,
              "SWAP": swap, "PARTIAL": swap, "HALF2": half2, "INTERP": False}
    sig = {**SIG, **{k: "constexpr" for k in consts}}
    attrs = {(i,): [["tt.divisibility", 16]] for i, k in enumerate(sig) if sig[k].startswith("*") or k in DIV16}
    kernel = triton.compile(ASTSource(T.qmatmul_tiled_kernel, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": 4, "num_stages": 3 if swap else 2, "enable_fp_fusion": False})
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        text = subprocess.run([str(tool), "-sass", f.name], capture_output=True, text=True, check=True).stdout
        res = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    ops = collections.Counter(m.group(1).split(".")[0] for m in re.finditer(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", text, re.M))
    regs = int(re.search(r"REG:(\d+)", res).group(1)) if "REG:" in res else 0
    return sum(ops.values()), regs, ops


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--type", nargs="+", default=["Q4_K", "Q6_K"], choices=sorted(t.name for t in T.HALF2_TYPES))
    ap.add_argument("--half2", nargs="+", type=int, default=[0, 1], choices=(0, 1))
    ap.add_argument("--form", nargs="+", default=["swapped", "unswapped"], choices=("swapped", "unswapped"))
    args = ap.parse_args()
    print(f"Triton {triton.__version__}, target sm_90; one loop iteration = one super-block")
    print("| type | form | dequantization | SASS instructions | registers | top opcodes |")
    print("|---|---|---|---:|---:|---|")
    for name in args.type:
        for form in args.form:
            for h in args.half2:
                n, regs, ops = sass(GGMLType[name], bool(h), form == "swapped")
                top = ", ".join(f"{k} {v}" for k, v in ops.most_common(6))
                print(f"| {name} | {form} | {'half2' if h else 'ggml fp32'} | {n:,} | {regs} | {top} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
