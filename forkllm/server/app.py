"""OpenAI-compatible HTTP server over an EngineClient (FastAPI, server-sent events).

The routes (forkllm.server.routes) see only the EngineClient protocol, so one local engine or
a router over replicas can stand behind them. Each HTTP request becomes one engine request per
prompt; a client that goes away (stream closed, or a non-streaming request whose connection
drops) aborts its requests, freeing their KV pages before the engine's next step. Every user
error is an OpenAI-shaped JSON error naming the field; an internal error fails only the request
it happened in.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from forkllm.engine.async_engine import AsyncEngine
from forkllm.server.client import EngineClient
from forkllm.server.errors import APIError, from_validation_errors
from forkllm.server.routes import ROUTERS
from forkllm.server.state import ServerConfig, ServerState

__all__ = ["ServerConfig", "create_app"]

logger = logging.getLogger("forkllm.server")


def create_app(
    config: ServerConfig,
    engine: EngineClient | AsyncEngine | None = None,
    engine_factory: Callable[[], EngineClient | AsyncEngine] | None = None,
) -> FastAPI:
    """The app over `engine`, or over what `engine_factory` builds in a background thread at
    start-up (/health and every request answer 503 until it is ready). A bare AsyncEngine is
    wrapped in a LocalEngineClient."""
    state = ServerState(config, engine, engine_factory)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if state.engine is None:
            state.start_loading()
        yield
        if state.engine is not None:
            state.engine.shutdown()

    app = FastAPI(title="forkllm", lifespan=lifespan)
    app.state.forkllm = state
    for error in (APIError, RequestValidationError, Exception):
        app.add_exception_handler(error, _error_response)
    app.middleware("http")(_auth_and_count)
    for router in ROUTERS:
        app.include_router(router)
    return app


async def _error_response(_: Request, e: Exception) -> JSONResponse:
    """Every error as an OpenAI-shaped JSON body; an unexpected one is logged as a 500."""
    if isinstance(e, APIError):
        return e.response()
    if isinstance(e, RequestValidationError):
        return from_validation_errors(list(e.errors())).response()
    logger.exception("internal error")
    return APIError(500, f"internal error: {type(e).__name__}: {e}").response()


async def _auth_and_count(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
    """/v1 routes: the API key check, then a request count by endpoint and status."""
    if not request.url.path.startswith("/v1"):
        return await call_next(request)
    state: ServerState = request.app.state.forkllm
    key = state.config.api_key
    if key is not None and request.headers.get("authorization") != f"Bearer {key}":
        resp: Response = APIError(
            401, "invalid or missing API key (send 'Authorization: Bearer <key>')", code="invalid_api_key"
        ).response()
    else:
        resp = await call_next(request)
    state.metrics.requests.labels(request.url.path, str(resp.status_code)).inc()
    return resp
