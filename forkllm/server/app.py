"""OpenAI-compatible HTTP server over an EngineClient (FastAPI, server-sent events).

The routes (forkllm.server.routes) see only the EngineClient protocol, so one local engine or
a router over replicas can stand behind them. Each HTTP request becomes one engine request per
prompt; a client that goes away (stream closed, or a non-streaming request whose connection
drops) aborts its requests, freeing their KV pages before the engine's next step. Every error,
ours or the framework's, is an OpenAI-shaped JSON error naming the field; an internal error
fails only the request it happened in (server/middleware.py: key, body limit, request id,
shutdown drain, the 500).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from forkllm.engine.async_engine import AsyncEngine
from forkllm.server.client import EngineClient
from forkllm.server.errors import ERROR_RESPONSES, APIError, from_http_exception, from_validation_errors
from forkllm.server.middleware import ServerMiddleware
from forkllm.server.routes import ROUTERS
from forkllm.server.state import ServerConfig, ServerState

__all__ = ["ServerConfig", "create_app"]


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
        state.drain.bind(asyncio.get_running_loop())
        if state.engine is None:
            state.start_loading()
        yield
        await asyncio.to_thread(state.close)  # joins the engine thread: not on the loop

    app = FastAPI(title="forkllm", lifespan=lifespan)
    app.state.forkllm = state
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_middleware(ServerMiddleware, state=state)
    for router in ROUTERS:
        app.include_router(router, responses=ERROR_RESPONSES)
    return app


async def _api_error(_: Request, e: Exception) -> JSONResponse:
    assert isinstance(e, APIError)
    return e.response()


async def _validation_error(_: Request, e: Exception) -> JSONResponse:
    assert isinstance(e, RequestValidationError)
    return from_validation_errors(list(e.errors())).response()


async def _http_error(request: Request, e: Exception) -> JSONResponse:
    """Starlette's own 404 / 405 / 400 (unparseable body) in the OpenAI shape, keeping its headers
    (405's Allow)."""
    assert isinstance(e, HTTPException)
    error = from_http_exception(e.status_code, str(e.detail), request.method, request.url.path)
    error.headers.update(e.headers or {})
    return error.response()
