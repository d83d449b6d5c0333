"""Every endpoint and dependency of the HTTP API runs on the event loop (none on a worker thread).

FastAPI runs a sync ``def`` endpoint or dependency through ``run_in_threadpool``: a thread hop per
request whose GIL hand-offs stall the event loop that writes every running stream's tokens (a sync
``get_worker`` cost ~25 % of the requests per second the server took on the CPU bench,
``bench_http.py --tokens 8``). This walks the real routers' dependency trees.
"""

from __future__ import annotations

import inspect
from typing import Any

from fastapi.routing import APIRoute

from worker_orcd.http import openai_routes, routes_execute, routes_ops, routes_worker


def _calls(dependant: Any) -> list[Any]:
    out = [dependant.call] if dependant.call is not None else []
    for sub in dependant.dependencies:
        out += _calls(sub)
    return out


def _on_loop(call: Any) -> bool:
    return inspect.iscoroutinefunction(call) or inspect.iscoroutinefunction(getattr(call, "__call__", None))


def test_no_endpoint_or_dependency_runs_on_a_worker_thread() -> None:
    routes = [r for m in (openai_routes, routes_execute, routes_ops, routes_worker) for r in m.router.routes
              if isinstance(r, APIRoute)]
    assert len(routes) >= 10
    threaded = sorted({f"{r.path}: {getattr(c, '__qualname__', c)}" for r in routes for c in _calls(r.dependant)
                       if not _on_loop(c)})
    assert threaded == [], threaded
