"""HTTP/SSE surface of the worker (SPEC 4200-4253); built on FastAPI + uvicorn."""

from .app import create_app

__all__ = ["create_app"]
