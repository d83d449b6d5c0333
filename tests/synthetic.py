"""benchmarks/synth.py (synthetic GGUFs of real shapes) imported once for every test module."""

from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

SYNTH = Path(__file__).resolve().parents[1] / "benchmarks" / "synth.py"


@functools.cache
def synth() -> ModuleType:
    spec = importlib.util.spec_from_file_location("worker_orcd_bench_synth", SYNTH)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod
