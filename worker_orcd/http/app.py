"""The FastAPI application: routes, the error model and the per-request middleware."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.types import Scope

from .. import __version__
from ..auth import BearerAuth
from ..errors import ErrorCode, WorkerError
from ..lifecycle import Worker
from . import deps, errors, openai_routes, routes_execute, routes_ops, routes_worker, schemas
from .middleware import RequestContext

JSON_BODY_FLOOR = 64 * 1024
# Authenticated routes that still answer while a model loads: the readiness question and the way out.
OPEN_WHILE_LOADING = frozenset({"/worker/ready", "/shutdown"})


def create_app(worker: Worker, auth: BearerAuth) -> FastAPI:
    app = FastAPI(
        title="worker-orcd",
        version=__version__,
        summary="Sealed, deterministic GGUF inference worker: one GPU, one model, one job at a time.",
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json",
        # A trailing-slash redirect built its Location from the client's Host header, before
        # authentication (issue 10, defect 8): a wrong path is simply 404.
        redirect_slashes=False,
    )
    app.state.worker = worker
    app.state.auth = auth
    app.state.openai_tools = openai_routes.ModelTools(worker.config.chat_template)
    errors.install(app)
    routers = (routes_worker.router, routes_execute.router, routes_ops.router, openai_routes.router)
    for router in routers:
        app.include_router(router)
    # A JSON prompt of N characters is at most 12N bytes (two \uXXXX escapes per astral character).
    json_limit = 12 * worker.config.max_prompt_chars + JSON_BODY_FLOOR

    def body_limit(scope: Scope) -> int | None:
        if scope["path"] == "/worker/commit":
            return None  # the route caps JSON at 64 KiB and streamed bytes at MAX_MODEL_SIZE itself
        return json_limit

    # The request log names only these paths; any other request target is logged as "(unmatched)".
    routes = [r for router in routers for r in router.routes if isinstance(r, APIRoute)]
    paths = {str(app.openapi_url)} | {r.path for r in routes}
    # Routes that need a caller are authenticated before their body is read or parsed (issue 10, defect 6).
    protected = {r.path for r in routes if _needs_caller(r)}
    def not_ready(scope: Scope) -> WorkerError | None:
        """While a model loads (issue 13: the port is open, /health says 503 loading) nothing else is served."""
        if worker.loading_model and scope.get("path") not in OPEN_WHILE_LOADING:
            return WorkerError("worker is not ready (loading a model; no sealed model is serving yet)",
                               code=ErrorCode.WORKER_NOT_READY)
        return None

    app.add_middleware(
        RequestContext, metrics=worker.metrics, body_limit=body_limit, paths=paths, auth=auth, protected=protected,
        not_ready=not_ready,
    )
    app.openapi = _openapi_builder(app)  # type: ignore[method-assign]
    return app


def _needs_caller(route: APIRoute) -> bool:
    stack = [route.dependant]
    while stack:
        dep = stack.pop()
        if dep.call is deps.require_caller:
            return True
        stack.extend(dep.dependencies)
    return False


_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
_INVALID = {"description": "INVALID_PARAMS: the message names the field",
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}}


def _openapi_builder(app: FastAPI) -> Callable[[], dict[str, Any]]:
    """FastAPI's OpenAPI model stores numeric bounds as floats, turning seed's 2**64-1 into 2**64.

    The document is built as usual, then each integer bound is restored from pydantic's own schema.
    """

    def build() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        doc = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        components = doc.get("components", {}).get("schemas", {})
        # FastAPI documents a 422 HTTPValidationError on every route with a body; this worker answers
        # validation failures 400 INVALID_PARAMS in ErrorBody shape (issue 10, defect 10).
        for ops in doc.get("paths", {}).values():
            for op in ops.values():
                responses = op.get("responses", {})
                default = responses.get("422", {})
                if "HTTPValidationError" in str(default.get("content", "")):
                    del responses["422"]
                    responses.setdefault("400", _INVALID)
        for unused in ("HTTPValidationError", "ValidationError"):
            components.pop(unused, None)
        for model in vars(schemas).values():
            if not (isinstance(model, type) and issubclass(model, BaseModel)) or model.__name__ not in components:
                continue
            exact = model.model_json_schema().get("properties", {})
            target = components[model.__name__].get("properties", {})
            for name, spec in exact.items():
                for key in _BOUNDS:
                    if isinstance(spec.get(key), int) and key in target.get(name, {}):
                        target[name][key] = spec[key]
        app.openapi_schema = doc
        return doc

    return build
