"""The daemon moves its start-up heap out of the cyclic collector's reach after each load
(serve.settle_heap): a full collection would otherwise walk ~330k objects (torch, Triton, the
model) while streams wait. The hook runs after a sealed load only, and never fails one."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

from test_http_fakes import MODEL_NAME, Knobs, fake_binding, write_tiny_model

from worker_orcd.config import load_config
from worker_orcd.errors import ErrorCode, WorkerError
from worker_orcd.lifecycle import Worker
from worker_orcd.serve import model_commit


def _worker(tmp_path: Path, knobs: Knobs, on_loaded: object) -> Worker:
    root = tmp_path / "models"
    root.mkdir(exist_ok=True)
    write_tiny_model(root / MODEL_NAME)
    tok = tmp_path / "token"
    tok.write_text("t" * 40 + "\n")
    tok.chmod(0o600)
    config = load_config({"worker_id": "w", "device": "cpu", "bind": "127.0.0.1:0", "model_root": str(root),
                          "api_token_file": str(tok), "model": MODEL_NAME}, env={})
    return Worker(config, fake_binding(knobs), force_exit=lambda code: None, on_loaded=on_loaded)  # type: ignore[arg-type]


def test_after_load_hook_runs_once_per_sealed_load_only(tmp_path: Path) -> None:
    calls: list[int] = []

    async def run(knobs: Knobs) -> None:
        w = _worker(tmp_path, knobs, lambda: calls.append(1))
        await w.open_device()
        await w.commit(model_commit(w.config))

    asyncio.run(run(Knobs()))
    assert calls == [1]
    failing = Knobs(load_error=WorkerError("no", code=ErrorCode.MODEL_LOAD_FAILED))
    try:
        asyncio.run(run(failing))
    except WorkerError:
        pass
    assert calls == [1], "a failed load runs no hook"

    def broken() -> None:
        raise RuntimeError("hook")

    async def run_broken() -> None:
        w = _worker(tmp_path, Knobs(), broken)
        await w.open_device()
        handle, fresh = await w.commit(model_commit(w.config))
        assert fresh and w.sealed is not None

    asyncio.run(run_broken())  # a failing hook never fails the sealed load


def test_settle_heap_freezes_what_is_alive() -> None:
    code = ("import gc; from worker_orcd.serve import settle_heap; before = gc.get_freeze_count(); settle_heap(); "
            "assert gc.get_freeze_count() > before + 1000, gc.get_freeze_count(); "
            "assert gc.get_threshold() == (700, 10, 100), gc.get_threshold(); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
