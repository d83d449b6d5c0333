"""Every kernel module imports first in a fresh interpreter.

The kernel modules import each other both ways (matmul_dense shares qmatmul's dot, qmatmul dispatches to
qmatmul_prefill, which runs matmul_dense); a name imported from a partially initialised module works in
one import order and fails in another. The engine imports them in whatever order a model needs, so each
one must stand first (a GPU run found matmul_dense -> qmatmul -> qmatmul_prefill failing)."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

KERNELS = pathlib.Path(__file__).resolve().parent.parent / "worker_orcd" / "engine" / "kernels"
MODULES = sorted(p.stem for p in KERNELS.glob("*.py") if p.stem != "__init__")


@pytest.mark.parametrize("module", MODULES)
def test_kernel_module_imports_first(module: str) -> None:
    name = f"worker_orcd.engine.kernels.{module}"
    r = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"import {name} first fails:\n{r.stderr[-2000:]}"
