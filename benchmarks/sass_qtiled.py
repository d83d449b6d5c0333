"""Count the SASS instructions of ``qmatmul_tiled``'s and ``fragments``' kernels for sm_90 — on any machine, no GPU.

Triton compiles the kernel for an H100/H200 target (``GPUTarget("cuda", 90, 32)``) with the
divisibility the launches specialize on (pointers, N, K, strides, row bytes and plane offsets are
multiples of 16 for real shapes), and ``cuobjdump`` (shipped with Triton) lists its SASS. The main
loop is one super-block (16 HGMMA for the 64x16 swapped form), so the total is dominated by the
instructions per super-block and thread: what the ``half2`` dequantization cuts. Counting first,
measuring on the GPU second (benchmarks/probe_half2.py).

    python benchmarks/sass_qtiled.py --type Q4_K Q6_K --half2 0 1
    python benchmarks/sass_qtiled.py --fragments --type Q4_K Q6_K Q8_0   # the fragment-order kernel's main loop

With ``--fragments`` the table also gives the main loop's instructions per thread and iteration (the
longest backward branch's body: one super-block for Q4_K/Q6_K, 128 inputs for Q8_0) and its opcodes.
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

from worker_orcd.engine.kernels import fragments as FR  # noqa: E402
from worker_orcd.engine.kernels import qmatmul_tiled as T  # noqa: E402
from worker_orcd.gguf.constants import GGMLType  # noqa: E402

SIG = {"x_ptr": "*fp16", "w_ptr": "*u8", "w16_ptr": "*fp16", "w32_ptr": "*i32", "b_ptr": "*fp16", "y_ptr": "*fp16",
       "part_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "stride_ym": "i32", "RB": "i32",
       "P1": "i32", "P2": "i32", "P3": "i32", "KS": "i32", "NSEG": "i32"}
DIV16 = {"N", "K", "stride_xm", "stride_ym", "RB", "P1", "P2", "P3", "KS"}  # M, NSEG: any value


_OP = re.compile(r"^\s+/\*([0-9a-f]+)\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);", re.M)


def _cubin_sass(kernel) -> tuple[int, int, int, collections.Counter[str], collections.Counter[str]]:  # noqa: ANN001
    """(instructions, registers, main-loop instructions, all opcodes, the loop's opcodes) of a compiled kernel; the
    main loop is the longest backward branch's body (one super-block here)."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        text = subprocess.run([str(tool), "-sass", f.name], capture_output=True, text=True, check=True).stdout
        res = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    ins = [(int(m.group(1), 16), m.group(3), m.group(4)) for m in _OP.finditer(text)]
    loops = [(int(a.split("0x")[-1], 16), pc) for pc, op, a in ins if op == "BRA" and "0x" in a]
    lo, hi = max(((t, pc) for t, pc in loops if t < pc), key=lambda b: b[1] - b[0], default=(0, -1))
    ops = collections.Counter(op.split(".")[0] for _, op, _ in ins)
    body = collections.Counter(op.split(".")[0] for pc, op, _ in ins if lo <= pc <= hi)
    regs = int(re.search(r"REG:(\d+)", res).group(1)) if "REG:" in res else 0
    return len(ins), regs, sum(body.values()), ops, body


def _compile(fn, sig: dict[str, str], div16: set[str], consts: dict, stages: int):  # noqa: ANN001, ANN202
    """``fn`` compiled for sm_90 with the divisibility real launches specialize on (4 warps, no FMA contraction)."""
    sig = {**sig, **{k: "constexpr" for k in consts}}
    attrs = {(i,): [["tt.divisibility", 16]] for i, k in enumerate(sig) if sig[k].startswith("*") or k in div16}
    return triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": 4, "num_stages": stages, "enable_fp_fusion": False})


def sass(wtype: GGMLType, half2: bool, swap: bool) -> tuple[int, int, int, collections.Counter[str]]:
    """(instructions, registers, main-loop instructions, opcode counts) of one specialization."""
    consts = {"WTYPE": int(wtype), "HAS_BIAS": False, "GROUP": 1, "BR": 16 if swap else 64, "BN": 64, "KD": 32,
              "SWAP": swap, "PARTIAL": swap, "HALF2": half2, "INTERP": False}
    n, regs, loop, ops, _ = _cubin_sass(_compile(T.qmatmul_tiled_kernel, SIG, DIV16, consts, 3 if swap else 2))
    return n, regs, loop, ops


FRAG_SIG = {"x_ptr": "*fp16", "w_ptr": "*u8", "w32_ptr": "*i32", "w16_ptr": "*fp16", "b_ptr": "*fp16", "y_ptr": "*fp16",
            "part_ptr": "*fp32", "lock_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "stride_ym": "i32", "P1": "i32",
            "P2": "i32", "KS": "i32", "NSEG": "i32"}
FRAG_DIV16 = {"N", "K", "stride_xm", "stride_ym", "KS", "P1", "P2"}


def fragments_sass(wtype: GGMLType, swap: bool, third: GGMLType | None = None,
                   stages: int | None = None) -> tuple[int, int, int, collections.Counter[str], int]:
    """(instructions, registers, main-loop instructions per iteration, the loop's opcodes, shared memory bytes per
    block) of ``fragments_kernel`` (``third``: a stacked launch whose third part is of that type; the main loop is
    then the longer path's; ``stages``: the swapped form's pipeline depth, default 3)."""
    consts = {"WTYPE3": int(third) if third is not None else 0, "WTYPE": int(wtype), "HAS_BIAS": False,
              "BR": FR.swap_br(1) if swap else 128, "SWAP": swap, "PARTIAL": swap,
              "INTERP": False, "FUSE_SUM": swap, "G1": 0, "G2": 0, "O1": 0, "O2": 0, "P1B": 0, "P2B": 0, "P1C": 0,
              "P2C": 0, "NPARTS": 3 if third is not None else 1, "GDC": False, "PREFETCH": False, "K64": FR.DOT_K == 64}
    sig = FRAG_SIG
    if third is not None:  # the parts' row groups at run time, as launches pass them: both paths compiled
        sig = {**FRAG_SIG, "G1": "i32", "G2": "i32"}
        del consts["G1"], consts["G2"]
    kernel = _compile(FR.fragments_kernel, sig, FRAG_DIV16, consts, (stages or 3) if swap else 2)
    n, regs, loop, _, body = _cubin_sass(kernel)
    return n, regs, loop, body, kernel.metadata.shared


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--type", nargs="+", default=["Q4_K", "Q6_K"], choices=["Q4_K", "Q6_K", "Q8_0"])
    ap.add_argument("--half2", nargs="+", type=int, default=[0, 1], choices=(0, 1))
    ap.add_argument("--form", nargs="+", default=["swapped", "unswapped"], choices=("swapped", "unswapped"))
    ap.add_argument("--fragments", action="store_true", help="the fragment-order kernel (kernels/fragments.py)")
    ap.add_argument("--third", choices=["Q4_K", "Q6_K", "Q8_0"], default=None,
                    help="--fragments: a stacked launch whose third part is of this type (mixed q/k/v)")
    ap.add_argument("--dot-k", type=int, choices=(32, 64), default=None, help="--fragments: Q4_K inputs per dot (fragments.DOT_K)")
    ap.add_argument("--min-br", type=int, choices=(8, 16), default=None,
                    help="--fragments: tokens per decode program at M = 1 (fragments.MIN_BR)")
    ap.add_argument("--stages", type=int, default=None, help="--fragments: the swapped form's pipeline depth (default 3)")
    args = ap.parse_args()
    if args.dot_k is not None:
        FR.DOT_K = args.dot_k
    if args.min_br is not None:
        FR.MIN_BR = args.min_br
    if args.fragments:
        print(f"Triton {triton.__version__}, target sm_90; fragments_kernel")
        print("| type | form | SASS instructions | registers | shared memory per block | main loop per iteration | loop's top opcodes |")
        print("|---|---|---:|---:|---:|---:|---|")
        for name in args.type:
            for form in args.form:
                third = GGMLType[args.third] if args.third and form == "swapped" else None
                n, regs, loop, body, smem = fragments_sass(GGMLType[name], form == "swapped", third, args.stages)
                top = ", ".join(f"{k} {v}" for k, v in body.most_common(6))
                print(f"| {name} | {form} | {n:,} | {regs} | {smem:,} | {loop} | {top} |", flush=True)
        return 0
    print(f"Triton {triton.__version__}, target sm_90; one loop iteration = one super-block")
    print("| type | form | dequantization | SASS instructions | registers | main loop per iteration | top opcodes |")
    print("|---|---|---|---:|---:|---:|---|")
    for name in args.type:
        for form in args.form:
            for h in args.half2:
                n, regs, loop, ops = sass(GGMLType[name], bool(h), form == "swapped")
                top = ", ".join(f"{k} {v}" for k, v in ops.most_common(6))
                print(f"| {name} | {form} | {'half2' if h else 'ggml fp32'} | {n:,} | {regs} | {loop} | {top} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
