"""`forkllm serve`: build the engine, start uvicorn, shut down cleanly on SIGINT/SIGTERM.

Shutdown, with a graceful timeout T: the signal stops new connections (uvicorn) and starts the
app's drain (server/shutdown.py), due at T minus a margin; requests still running then are ended
by the app (a 503, or a stream's error event and [DONE]) before uvicorn would cut them. The app
then stops the engine, joining its thread with a timeout. A watchdog makes the exit certain: at
T + WATCHDOG_SECONDS the process leaves with status 0 whatever is still running, and a thread
left alive at the end (an engine stuck in a step, a model still loading) is not waited for: the
process exits at once, instead of tearing the interpreter down under a thread inside C++ code
(which aborts with `terminate called without an active exception`).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from forkllm.engine.args import add_engine_args, engine_kwargs
from forkllm.engine.config import parse_bytes
from forkllm.server.limits import Limits
from forkllm.tools.formats import DEFAULT_FORMAT, FORMATS

logger = logging.getLogger("forkllm.server")

WATCHDOG_SECONDS = 5.0
_WATCHDOG = "forkllm-shutdown-watchdog"


def drain_seconds(graceful_timeout: float) -> float:
    """When running requests are ended: a margin before uvicorn's own timeout cancels them, so
    their last events are written first."""
    return max(graceful_timeout - min(1.0, graceful_timeout / 10), 0.0)


def _size(text: str) -> int:
    try:
        return parse_bytes(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size like 8MiB or 8388608, got {text!r}") from None


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
    s.add_argument(
        "--tools",
        action="append",
        default=None,
        metavar="MODULE:ATTR",
        help="register Python tools (a callable, a list or a dict of them) that run inside the engine, "
        "served at /v1/tools/chat/completions (server/tools_mode.py); repeatable",
    )
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
        "--max-expected-ttft",
        type=float,
        default=None,
        metavar="SECONDS",
        help="reject a new request with 503 + Retry-After when its first token is expected later "
        "than this, behind the prompt work already admitted, at the engine's measured step speed "
        "(a request with nothing ahead of it is always admitted)",
    )
    s.add_argument(
        "--trust-request-chat-template",
        action="store_true",
        help="accept a chat_template in requests (it is template code run on this server; "
        "refused with a 400 by default, as vLLM does)",
    )
    s.add_argument(
        "--max-pending-tokens",
        type=int,
        default=None,
        help="reject new requests with 503 + Retry-After while the work admitted and not finished "
        "(each request's prompt tokens + n x max_tokens) is at least this many tokens",
    )
    s.add_argument(
        "--graceful-shutdown-timeout",
        type=float,
        default=30.0,
        help="seconds to let in-flight requests finish on SIGINT/SIGTERM; then running streams end "
        "with an error event and [DONE], other requests get a 503, and the process exits 0",
    )
    s.add_argument(
        "--tool-call-parser",
        choices=sorted(FORMATS),
        default=DEFAULT_FORMAT,
        help="how the model writes tool calls: hermes (<tool_call>{json}</tool_call>, the default "
        'model\'s), llama3_json ({"name": ..., "parameters": ...}) or pythonic ([f(a=1)]); '
        "templates without tools get the tools and past calls written in this format",
    )
    r = s.add_argument_group(
        "replicas (one engine per Ray actor behind this endpoint; pip install 'forkllm[replicas]')"
    )
    r.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="engine replicas (default 1: one engine in this process, no Ray)",
    )
    r.add_argument(
        "--ray-address",
        default=None,
        help="an existing Ray cluster ('auto' or host:port; default: start a local one on this machine)",
    )
    r.add_argument(
        "--router",
        choices=["prefix", "least_loaded", "round_robin"],
        default="prefix",
        help="how requests are spread: by prompt prefix while loads are balanced (default), to the "
        "least loaded replica, or in turn; a request's whole tree stays on one replica",
    )
    r.add_argument("--cpus-per-replica", type=float, default=1.0, help="CPUs each replica actor reserves")
    r.add_argument("--gpus-per-replica", type=float, default=0.0, help="GPUs each replica actor reserves")
    _add_limit_args(s)
    s.set_defaults(func=cmd_serve)


def _add_limit_args(s: argparse.ArgumentParser) -> None:
    g = s.add_argument_group("request limits (a request over one gets a 400 naming the field)")
    d = Limits()
    g.add_argument("--max-n", type=int, default=d.max_n, help="most samples per prompt (n)")
    g.add_argument(
        "--max-best-of", type=int, default=d.max_best_of, help="most samples ranked per prompt (best_of)"
    )
    g.add_argument(
        "--max-request-sequences",
        type=int,
        default=d.max_request_sequences,
        help="most sequences of one completion request: prompts x best_of (or n)",
    )
    g.add_argument(
        "--max-scaling-width",
        type=int,
        default=d.max_scaling_width,
        help="most parallel sequences of a scaling run (scaling.n, .particles, .width x .expand)",
    )
    g.add_argument(
        "--max-scaling-budget",
        type=int,
        default=d.max_scaling_budget,
        help="most tokens one scaling run may generate (scaling.budget, or width x max_tokens)",
    )
    g.add_argument(
        "--max-prompt-bytes",
        type=_size,
        default=d.max_prompt_bytes,
        help="most UTF-8 bytes of prompt text (all prompts or messages) in one request, checked "
        "before tokenizing; prompt tokens are limited by the context length (default 2MiB)",
    )
    g.add_argument(
        "--max-request-body",
        type=_size,
        default=d.max_request_bytes,
        help="largest HTTP request body, e.g. 8MiB; larger ones get a 413 before parsing (default 8MiB)",
    )


def limits_from_args(args: argparse.Namespace) -> Limits:
    return Limits(
        max_n=args.max_n,
        max_best_of=args.max_best_of,
        max_request_sequences=args.max_request_sequences,
        max_scaling_width=args.max_scaling_width,
        max_scaling_budget=args.max_scaling_budget,
        max_prompt_bytes=args.max_prompt_bytes,
        max_request_bytes=args.max_request_body,
    )


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
        max_pending_tokens=args.max_pending_tokens,
        max_expected_ttft=args.max_expected_ttft,
        trust_request_chat_template=args.trust_request_chat_template,
        limits=limits_from_args(args),
        tool_call_parser=args.tool_call_parser,
    )

    if args.replicas < 1:
        raise SystemExit(f"forkllm serve: --replicas must be >= 1, got {args.replicas}")
    if args.max_expected_ttft is not None:
        if not args.max_expected_ttft > 0:
            raise SystemExit(f"forkllm serve: --max-expected-ttft must be > 0, got {args.max_expected_ttft}")
        if args.replicas > 1 or args.ray_address is not None:
            raise SystemExit("forkllm serve: --max-expected-ttft is not supported with --replicas yet")

    def factory() -> EngineClient:
        client: EngineClient
        if args.replicas > 1 or args.ray_address is not None:
            from forkllm.server.replicas.client import RayEngineClient

            client = RayEngineClient(
                kw,
                args.replicas,
                router=args.router,
                ray_address=args.ray_address,
                cpus_per_replica=args.cpus_per_replica,
                gpus_per_replica=args.gpus_per_replica,
            )
        else:
            client = LocalEngineClient(AsyncEngine(LLMEngine(EngineConfig(**kw))))
        print(f"forkllm serve: {client.describe()}", flush=True)
        print(
            f"forkllm serve: model '{name}' ready on http://{args.host}:{args.port}/v1"
            + (" (API key required)" if config.api_key else ""),
            flush=True,
        )
        return client

    app = create_app(config, engine_factory=factory)
    if args.tools:
        from forkllm.server.tools_mode import enable_tools_mode, load_tools

        enable_tools_mode(app, load_tools(args.tools))
    print(
        f"forkllm serve: loading {kw.get('model') or 'the embedded default model'}; listening on "
        f"http://{args.host}:{args.port} (/health is 503 until the model is ready)",
        flush=True,
    )
    timeout = args.graceful_shutdown_timeout
    state = app.state.forkllm

    def on_stop() -> None:
        state.drain.begin(drain_seconds(timeout))
        _start_watchdog(timeout + WATCHDOG_SECONDS)

    server = _Server(
        uvicorn.Config(
            app,
            host=args.host,
            port=args.port,
            log_level=str(args.log_level).lower(),
            timeout_graceful_shutdown=timeout,
        ),
        on_stop=on_stop,
    )
    server.run()
    print("forkllm serve: shut down cleanly", flush=True)
    _exit_if_threads_linger()
    return 0


def _start_watchdog(seconds: float) -> None:
    timer = threading.Timer(seconds, _hard_exit, args=(f"still running {seconds:g}s after the signal",))
    timer.name = _WATCHDOG
    timer.daemon = True
    timer.start()


def _exit_if_threads_linger() -> None:
    """After a clean stop, any thread still alive would run on through interpreter teardown."""
    alive = [
        t.name
        for t in threading.enumerate()
        if t is not threading.current_thread() and t.name != _WATCHDOG and t.is_alive()
    ]
    if alive:
        _hard_exit(f"threads still running: {', '.join(sorted(alive))}")


def _hard_exit(why: str) -> None:
    print(f"forkllm serve: exiting now ({why})", flush=True)
    logging.shutdown()
    sys.stderr.flush()
    os._exit(0)


def _make_server_class() -> Any:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn re-raises SIGINT/SIGTERM after its graceful shutdown, so the process would die of
        the signal; a server asked to stop that stopped cleanly should exit 0. The first signal
        also calls `on_stop` (the app's drain and the watchdog)."""

        def __init__(self, config: Any, on_stop: Callable[[], None]) -> None:
            super().__init__(config)
            self.on_stop = on_stop

        def handle_exit(self, sig: int, frame: Any) -> None:
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True  # a second Ctrl-C
            elif not self.should_exit:
                self.should_exit = True
                self.on_stop()

    return Server


def _Server(config: Any, on_stop: Callable[[], None]) -> Any:  # noqa: N802 (a class factory: uvicorn is imported lazily)
    return _make_server_class()(config, on_stop)
