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


def cpu_arena(path: Path, dtype: "torch.dtype", quantized: bool = True):  # noqa: ANN201, F821
    """(GGUFFile, ModelConfig, WeightLayout, arena): ``path``'s weights streamed into a CPU arena as the engine
    uploads them (hashed, in order), before ``make_planar``."""
    import torch

    from worker_orcd.engine.config import model_config
    from worker_orcd.engine.device import DeviceContext
    from worker_orcd.engine.upload import upload
    from worker_orcd.engine.weights import weight_layout
    from worker_orcd.gguf.reader import parse_file
    from worker_orcd.integrity import sha256_path

    g = parse_file(path)
    cfg = model_config(g)
    lay = weight_layout(cfg, g, dtype, quantized=quantized)
    arena = torch.empty(lay.total_bytes, dtype=torch.uint8)
    with open(path, "rb") as fh:
        upload(fh, g, lay, arena, sha256_path(path), DeviceContext("cpu", 0, "cpu", 0), chunk_bytes=1 << 16)
    return g, cfg, lay, arena

