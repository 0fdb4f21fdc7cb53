"""`forkllm serve`: build the engine, start uvicorn, shut down cleanly on SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import logging
import os
import signal
from pathlib import Path
from typing import Any

from forkllm.engine.args import add_engine_args, engine_kwargs

logger = logging.getLogger("forkllm.server")


def served_name(model: Any) -> str:
    """The model id clients send: a GGUF file's stem, a directory's name, or the model string."""
    if model is None:
        return "SmolLM2-135M-Instruct"
    p = Path(str(model))
    name = p.stem if p.suffix == ".gguf" else p.name
    return name or str(model)


def add_serve_parser(sub: Any) -> None:
    s = sub.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions, /v1/models, ...)",
        description="Serve a model over an OpenAI-compatible API. Point the openai client at "
        "http://HOST:PORT/v1. /health answers 200 once the model is loaded (503 before); /metrics is "
        "Prometheus text; /tokenize and /detokenize are vLLM-style helpers.",
    )
    add_engine_args(s, positional_model=True)
    s.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 for all interfaces)")
    s.add_argument("--port", type=int, default=8000, help="port to bind")
    s.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on every /v1 route (default: $FORKLLM_API_KEY)",
    )
    s.add_argument(
        "--served-model-name",
        default=None,
        help="the model id clients send and /v1/models lists (default: the model file's name)",
    )
    s.add_argument(
        "--max-num-waiting",
        type=int,
        default=None,
        help="reject new requests with 503 + Retry-After when this many are waiting to be scheduled",
    )
    s.add_argument(
        "--graceful-shutdown-timeout",
        type=float,
        default=30.0,
        help="seconds to let in-flight requests finish on SIGINT/SIGTERM before aborting them",
    )
    s.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from forkllm.engine.async_engine import AsyncEngine
    from forkllm.engine.config import EngineConfig
    from forkllm.engine.llm_engine import LLMEngine
    from forkllm.server.app import ServerConfig, create_app
    from forkllm.server.client import EngineClient, LocalEngineClient

    kw = engine_kwargs(args)
    name = args.served_model_name or served_name(kw.get("model"))
    config = ServerConfig(
        served_model_name=name,
        api_key=args.api_key or os.environ.get("FORKLLM_API_KEY") or None,
        max_num_waiting=args.max_num_waiting,
    )

    def factory() -> EngineClient:
        client = LocalEngineClient(AsyncEngine(LLMEngine(EngineConfig(**kw))))
        print(f"forkllm serve: {client.describe()}", flush=True)
        print(
            f"forkllm serve: model '{name}' ready on http://{args.host}:{args.port}/v1"
            + (" (API key required)" if config.api_key else ""),
            flush=True,
        )
        return client

    app = create_app(config, engine_factory=factory)
    print(
        f"forkllm serve: loading {kw.get('model') or 'the embedded default model'}; listening on "
        f"http://{args.host}:{args.port} (/health is 503 until the model is ready)",
        flush=True,
    )
    server = _Server(
        uvicorn.Config(
            app,
            host=args.host,
            port=args.port,
            log_level=str(args.log_level).lower(),
            timeout_graceful_shutdown=args.graceful_shutdown_timeout,
        )
    )
    server.run()
    print("forkllm serve: shut down cleanly", flush=True)
    return 0


def _make_server_class() -> Any:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn re-raises SIGINT/SIGTERM after its graceful shutdown, so the process would die of
        the signal; a server asked to stop that stopped cleanly should exit 0."""

        def handle_exit(self, sig: int, frame: Any) -> None:
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True  # a second Ctrl-C
            else:
                self.should_exit = True

    return Server


def _Server(config: Any) -> Any:  # noqa: N802 (a class factory: uvicorn is imported lazily)
    return _make_server_class()(config)
