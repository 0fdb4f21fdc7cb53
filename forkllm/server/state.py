"""What the server's routes share: config (with its request limits), the engine client (None
while loading), metrics, the offload pool, the shutdown drain, and the checks every request
passes (ready, capacity, model name)."""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from forkllm.engine.async_engine import AsyncEngine
from forkllm.server.client import EngineClient, as_client
from forkllm.server.errors import APIError
from forkllm.server.limits import Limits
from forkllm.server.metrics import ServerMetrics
from forkllm.server.offload import Offload
from forkllm.server.shutdown import Drain

logger = logging.getLogger("forkllm.server")


@dataclass
class ServerConfig:
    served_model_name: str
    api_key: str | None = None
    max_num_waiting: int | None = None  # beyond this many unadmitted requests: 503 + Retry-After
    # beyond this much admitted, unfinished work (prompt + n x max_tokens, in tokens): 503 + Retry-After
    max_pending_tokens: int | None = None
    # 503 + Retry-After when a new request's first token is expected later than this (seconds)
    max_expected_ttft: float | None = None
    # a request's own chat_template is template code run on this server: refused unless trusted
    trust_request_chat_template: bool = False
    retry_after_seconds: int = 1
    limits: Limits = field(default_factory=Limits)
    offload_threads: int = 2  # threads tokenizing / rendering / detokenizing off the event loop
    tool_call_parser: str = "hermes"  # how tool calls look in generated text (forkllm.tools.formats)


class ServerState:
    """What the routes share: the engine client (None while loading), config, metrics."""

    def __init__(
        self,
        config: ServerConfig,
        engine: EngineClient | AsyncEngine | None,
        engine_factory: Callable[[], EngineClient | AsyncEngine] | None,
    ) -> None:
        self.config = config
        self.metrics = ServerMetrics()
        self.engine: EngineClient | None = as_client(engine) if engine is not None else None
        self._factory = engine_factory
        self.load_error: BaseException | None = None
        self.offload = Offload(config.offload_threads)
        self.drain = Drain()
        self.closed = False
        self._closing = threading.Lock()  # a model finishing its load as the server closes

    def start_loading(self) -> None:
        def load() -> None:
            try:
                assert self._factory is not None
                engine = as_client(self._factory())
            except BaseException as e:  # reported by /health and every request
                logger.exception("model failed to load")
                self.load_error = e
                return
            with self._closing:
                if not self.closed:
                    self.engine = engine
                    return
            engine.shutdown()  # the server stopped while this loaded: stop its engine thread too

        threading.Thread(target=load, name="forkllm-load", daemon=True).start()

    def ready(self) -> EngineClient:
        if self.load_error is not None:
            raise APIError(503, f"the model failed to load: {self.load_error}", code="model_load_failed")
        if self.engine is None:
            raise APIError(
                503,
                "the model is still loading; retry shortly",
                code="loading",
                headers={"Retry-After": str(self.config.retry_after_seconds)},
            )
        if not self.engine.is_running:
            raise APIError(503, "the engine is shutting down", code="shutting_down")
        return self.engine

    def check_capacity(self, engine: EngineClient) -> None:
        cap = self.config.max_pending_tokens
        if cap is not None and (work := engine.pending_tokens) >= cap:
            raise APIError(
                503,
                f"server overloaded: {work} tokens of admitted work are unfinished (limit {cap}); retry later",
                code="overloaded",
                headers={"Retry-After": str(self.config.retry_after_seconds)},
            )
        limit = self.config.max_num_waiting
        if limit is not None and engine.num_waiting >= limit:
            raise APIError(
                503,
                f"server overloaded: {engine.num_waiting} requests are waiting (limit {limit}); retry later",
                code="overloaded",
                headers={"Retry-After": str(self.config.retry_after_seconds)},
            )

    def check_expected_ttft(self, engine: EngineClient, prompt_tokens: int) -> None:
        """Load shedding by time: refuse a request whose first token, behind the prompt work
        already admitted, is expected later than --max-expected-ttft (at the engine's measured
        step speed). A request with nothing ahead of it is always admitted."""
        limit = self.config.max_expected_ttft
        if limit is None:
            return
        expected = engine.expected_ttft(prompt_tokens)
        if expected is not None and expected > limit:
            retry = max(self.config.retry_after_seconds, math.ceil(expected - limit))
            raise APIError(
                503,
                f"server overloaded: this request's first token is expected in {expected:.1f} s "
                f"(limit {limit:g} s, --max-expected-ttft); retry later",
                code="overloaded",
                headers={"Retry-After": str(retry)},
            )

    def close(self) -> None:
        """At app shutdown: the offload pool, then the engine (its thread joined with a timeout)."""
        with self._closing:
            self.closed = True
        self.offload.shutdown()
        if self.engine is not None:
            self.engine.shutdown()

    def check_chat_template(self, template: str | None) -> None:
        if template is not None and not self.config.trust_request_chat_template:
            raise APIError(
                400,
                "a request's chat_template runs template code on the server and is refused here; "
                "start the server with --trust-request-chat-template to allow it",
                param="chat_template",
            )

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.config.served_model_name:
            raise APIError(
                404,
                f"The model `{model}` does not exist; this server serves `{self.config.served_model_name}`.",
                param="model",
                code="model_not_found",
            )


def state_of(request: Request) -> ServerState:
    """The FastAPI dependency routes declare (as `AppState`) to get the shared state."""
    state: ServerState = request.app.state.forkllm
    return state


AppState = Annotated[ServerState, Depends(state_of)]
