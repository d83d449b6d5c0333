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
from typing import TYPE_CHECKING

import pytest

from ci_gate import need

if TYPE_CHECKING:
    import torch

REPO = Path(__file__).resolve().parents[1]
FETCH = REPO.parent / "shared" / "models" / "fetch_model.py"
MODEL_CACHE = Path(os.environ.get("WORKER_ORCD_MODEL_CACHE", Path.home() / ".cache" / "worker-orcd-models"))
REQUIRE_REAL_GPU = os.environ.get("REQUIRE_REAL_GPU") == "1"
REQUIRE_MULTI_GPU = os.environ.get("REQUIRE_MULTI_GPU") == "1"
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
    need(FETCH.exists(), f"real model {name} not cached and {FETCH} is missing")
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
    """SPEC 4998: with REQUIRE_REAL_GPU=1 GPU tests must run (and fail without a GPU); with
    REQUIRE_MULTI_GPU=1 the two-GPU tests too (the one-GPU machine's suite leaves them out)."""
    multi = pytest.mark.skip(reason="two-GPU test: set REQUIRE_MULTI_GPU=1 on a machine with two CUDA GPUs")
    for item in items:
        if "multi_gpu" in item.keywords and not REQUIRE_MULTI_GPU:
            item.add_marker(multi)
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


@pytest.fixture(scope="session")
def tokenizer_donor() -> Path:
    """A GGUF holding the real Qwen2.5 tokenizer metadata: the real model, or on the GPU machine
    (where the 491 MB model cannot be carried) the header-only copy named by
    ``WORKER_ORCD_TOKENIZER_DONOR`` (made from the real model's header; see benchmarks/bench_serve.py)."""
    real = MODEL_CACHE / f"{QWEN_05B}.gguf"
    donor = os.environ.get("WORKER_ORCD_TOKENIZER_DONOR")
    if not real.exists() and donor and Path(donor).is_file():
        return Path(donor).resolve()
    return real_model(QWEN_05B)


@pytest.fixture(scope="session")
def serve_model_path(tmp_path_factory: pytest.TempPathFactory, tokenizer_donor: Path) -> Path:
    """The model the end-to-end tests serve: the real Qwen2.5-Coder-0.5B when it is cached; on the
    GPU machine without it, a random-weight model of the same shape carrying the real tokenizer."""
    real = MODEL_CACHE / f"{QWEN_05B}.gguf"
    if real.exists() or tokenizer_donor == real:
        return real_model(QWEN_05B)
    from synthetic import synth

    out = tmp_path_factory.mktemp("serve-model") / "synthetic-qwen2.5-0.5b.gguf"
    return synth().write_synthetic_model(out, "qwen2.5-0.5b", "F16", tokenizer_from=tokenizer_donor)


@pytest.fixture
def gen(request: pytest.FixtureRequest) -> "torch.Generator":
    """A fresh seed per test, printed (shown on failure); KERNEL_TEST_SEED replays one."""
    seed = int(os.environ.get("KERNEL_TEST_SEED") or int.from_bytes(os.urandom(8), "little") >> 1)
    print(f"{request.node.name}: seed={seed}")
    request.node.user_properties.append(("seed", seed))
    import torch

    return torch.Generator().manual_seed(seed)
