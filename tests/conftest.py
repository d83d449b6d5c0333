"""Shared fixtures: real GGUF models (fetched once into a cache) and the GPU gate.

Real models come from ``../shared/models/fetch_model.py`` into
``$WORKER_ORCD_MODEL_CACHE`` (default ``~/.cache/worker-orcd-models``), which CI
pre-fills; a test never downloads on its own unless the cache is empty.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FETCH = REPO.parent / "shared" / "models" / "fetch_model.py"
MODEL_CACHE = Path(os.environ.get("WORKER_ORCD_MODEL_CACHE", Path.home() / ".cache" / "worker-orcd-models"))
REQUIRE_REAL_GPU = os.environ.get("REQUIRE_REAL_GPU") == "1"
if not REQUIRE_REAL_GPU:
    # No GPU here: Triton kernels run in the interpreter, on CPU tensors (set before triton loads).
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Proof bundles (SPEC 4996): the `proof_bundle` fixture, written under .proof_bundle/<suite>/<run-id>/.
pytest_plugins = ("proof_bundle",)

QWEN_05B = "qwen2.5-coder-0.5b-instruct"
QWEN_15B = "qwen2.5-coder-1.5b-instruct"
GEMMA_270M = "gemma3-270m"


def real_model(name: str) -> Path:
    path = MODEL_CACHE / f"{name}.gguf"
    if path.exists():
        return path
    if not FETCH.exists():
        pytest.skip(f"real model {name} not cached and {FETCH} is missing")
    subprocess.run([sys.executable, str(FETCH), name, "--dest", str(MODEL_CACHE)], check=True)
    return path


@pytest.fixture(scope="session")
def qwen05_path() -> Path:
    return real_model(QWEN_05B)


@pytest.fixture(scope="session")
def qwen15_path() -> Path:
    return real_model(QWEN_15B)


@pytest.fixture(scope="session")
def gemma_path() -> Path:
    return real_model(GEMMA_270M)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """SPEC 4998: with REQUIRE_REAL_GPU=1 GPU tests must run (and fail without a GPU)."""
    if REQUIRE_REAL_GPU:
        return
    skip = pytest.mark.skip(reason="GPU test: set REQUIRE_REAL_GPU=1 on a machine with a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def device() -> str:
    """'cuda' under REQUIRE_REAL_GPU=1 (fails if there is none), else 'cpu' (Triton interpreter)."""
    if not REQUIRE_REAL_GPU:
        return "cpu"
    import torch

    assert torch.cuda.is_available(), "REQUIRE_REAL_GPU=1 but torch sees no CUDA device"
    return "cuda"
