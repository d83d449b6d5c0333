"""SPEC 4010-4013: the host layer imports (and so runs its tests) without torch or triton.

A fresh interpreter marks torch and triton as unimportable *before* anything of
ours loads, then imports every module under ``worker_orcd`` except the GPU
layer's internals. Discovery is by ``pkgutil.walk_packages``, so a module added
later is covered without touching this test.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# GPU layer: worker_orcd.engine.* may import torch, except these (host-readable data).
HOST_READABLE_ENGINE = (
    "worker_orcd.engine",
    "worker_orcd.engine.profile",
    "worker_orcd.engine.config",  # the ECP's registries (architectures, RoPE, attention, context)
    "worker_orcd.engine.interface",  # the engine's Protocols, which the host is typed against
    "worker_orcd.engine.events",  # what crosses the boundary per request (SamplingParams, TokenEvent, ...)
    "worker_orcd.engine.dequant",  # lazy package: only its formats module is read by the host
    "worker_orcd.engine.dequant.formats",  # the ECP's tensor types
    "worker_orcd.engine.vram_budget",
    "worker_orcd.engine.tp_plan",  # tensor-parallel membership and shard shapes, validated by the host
)

PROBE = textwrap.dedent(
    """
    import importlib, json, pkgutil, sys, traceback
    sys.modules["torch"] = None      # `import torch` now raises ImportError
    sys.modules["triton"] = None
    HOST_READABLE_ENGINE = __HOST_READABLE_ENGINE__

    def is_gpu_layer(name):
        return name.startswith("worker_orcd.engine.") and name not in HOST_READABLE_ENGINE

    import worker_orcd
    failures, names = {}, ["worker_orcd"]

    def onerror(name):  # a package that failed to import while walking
        if not is_gpu_layer(name):
            failures[name] = traceback.format_exc(limit=-3)

    for info in pkgutil.walk_packages(worker_orcd.__path__, "worker_orcd.", onerror=onerror):
        if not is_gpu_layer(info.name):
            names.append(info.name)
    for name in names:
        try:
            importlib.import_module(name)
        except BaseException:
            failures[name] = traceback.format_exc(limit=-3)
    try:
        import torch  # noqa: F401
        blocked = False
    except ImportError:
        blocked = True
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "triton") and sys.modules[m] is not None)
    print(json.dumps({"names": names, "failures": failures, "blocked": blocked, "heavy": heavy}))
    """
).replace("__HOST_READABLE_ENGINE__", repr(HOST_READABLE_ENGINE))


def run_probe() -> dict[str, object]:
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_worker_4010_host_layer_imports_without_torch() -> None:
    result = run_probe()
    assert result["blocked"] is True  # the block itself works
    assert result["failures"] == {}, "\n\n".join(f"{k}:\n{v}" for k, v in result["failures"].items())  # type: ignore[union-attr]
    assert result["heavy"] == []
    names = set(result["names"])  # type: ignore[arg-type]
    # Discovery really walked the tree (subpackages included), and the GPU layer was left out.
    expected = {
        "worker_orcd.capability",
        "worker_orcd.loader",
        "worker_orcd.inspect",
        "worker_orcd.cli",
        "worker_orcd.__main__",
        "worker_orcd.gguf.reader",
        "worker_orcd.engine",
        "worker_orcd.engine.profile",
        "worker_orcd.engine.interface",
        "worker_orcd.engine.dequant.formats",
        "worker_orcd.residency",
    }
    assert expected <= names, expected - names
    assert not any(n.startswith("worker_orcd.engine.") and n not in HOST_READABLE_ENGINE for n in names)
