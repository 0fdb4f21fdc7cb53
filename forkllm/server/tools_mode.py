"""Opt-in server mode: tools registered at start-up run inside the engine.

`forkllm serve --tools MODULE:ATTR` (ATTR: a callable, a list of callables / `Tool`s /
(OpenAI tool dict, callable) pairs, or a dict of them; repeatable) mounts
`POST /v1/tools/chat/completions`. Point the openai SDK at `base_url=http://HOST:PORT/v1/tools`
and call `client.chat.completions.create(...)` unchanged: the server lists the registered tools in
the prompt, runs every call the model makes in-engine (forkllm/tools/runtime.py: dispatched as
each call closes, calls of one message concurrent, the sequence resumed from its own KV with the
results) and answers with the last assistant message. Each choice also carries `tool_history`:
the exchange OpenAI-shaped (`messages`) and the calls with their results and timings (`calls`).

The body is the chat-completions body without `tools` / `tool_choice` (the server's tools are the
tools), plus `max_tool_rounds` and `tool_timeout`. A field it does not honour is a 400 naming it.
The client going away aborts the whole run (its tools' results are dropped).

With `stream: true` the run streams as it goes (forkllm/tools/events.py): the content of every
assistant message arrives as ordinary content deltas of its choice, in order (the text a chat
shows while the run goes on; a message's call markup never does); each call as it is dispatched,
each result as it settles and each resume come as chunks with empty `choices` and a `tool_event`
object; each choice's finish chunk carries its `tool_history`, as the whole response does. The
non-streamed `message.content` is the last assistant message only: the streamed content equals
it when the earlier messages held nothing but calls (how tool calls are usually written).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import Any, cast

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from forkllm.engine.sampling_params import SamplingParams
from forkllm.server.errors import APIError, from_value_error
from forkllm.server.limits import check_count
from forkllm.server.protocol import StreamOptions
from forkllm.server.requests import (
    cancel_unfinished,
    guard_stream,
    max_tokens_for,
    unless_disconnected,
    while_running,
)
from forkllm.server.responses import Envelope, chat_delta, finish_reason, sse
from forkllm.server.state import AppState
from forkllm.tools.events import ToolEvent
from forkllm.tools.executor import ToolExecutor
from forkllm.tools.formats import get_format
from forkllm.tools.prompt import render_chat
from forkllm.tools.runtime import ToolCompletionOutput, ToolPolicy, ToolTurnRenderer
from forkllm.tools.runtime_schema import Tool, ToolLike, as_tools

router = APIRouter()


class ToolsMode:
    """The registered tools and the executor that runs them (one per server)."""

    def __init__(self, tools: Iterable[ToolLike], max_workers: int = 32) -> None:
        self.tools: dict[str, Tool] = as_tools(tools)
        if not self.tools:
            raise ValueError("--tools registered no tool")
        self.executor = ToolExecutor(max_workers)

    def specs(self) -> list[dict[str, Any]]:
        return [t.spec() for t in self.tools.values()]


def load_tools(paths: Iterable[str]) -> list[ToolLike]:
    """`module:attr` -> the tools it names (a callable, a list of tool-likes, or a dict)."""
    out: list[ToolLike] = []
    for path in paths:
        module, sep, attr = path.partition(":")
        if not sep or not module or not attr:
            raise ValueError(f"--tools {path!r}: expected MODULE:ATTR")
        obj: Any = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
        if isinstance(obj, Mapping):
            out += list(obj.values())
        elif isinstance(obj, (list, tuple)) and not (len(obj) == 2 and isinstance(obj[0], Mapping)):
            out += list(obj)
        else:
            out.append(obj)
    return out


def enable_tools_mode(app: FastAPI, tools: Iterable[ToolLike]) -> ToolsMode:
    """Register the tools and mount /v1/tools/chat/completions on `app`."""
    mode = ToolsMode(tools)
    app.state.forkllm_tools = mode
    app.include_router(router)
    return mode


class ToolsChatRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    messages: list[dict[str, Any]] = Field(min_length=1)
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    chat_template: str | None = None
    max_tool_rounds: int = 8
    tool_timeout: float | None = 60.0


@router.post("/v1/tools/chat/completions")
async def tools_chat(req: ToolsChatRequest, raw: Request, state: AppState) -> Response:
    mode = cast(ToolsMode, raw.app.state.forkllm_tools)
    engine = state.ready()
    state.check_model(req.model)
    state.check_capacity(engine)
    state.check_chat_template(req.chat_template)
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "stream_options is only allowed when stream=true", param="stream_options")
    check_count(req.n, state.config.limits.max_n, "n", "--max-n")
    tok = engine.tokenizer
    if tok is None:
        raise APIError(
            400, "this model has no tokenizer: in-engine tools need a chat template", param="messages"
        )
    fmt = get_format(state.config.tool_call_parser)

    def render() -> tuple[str, list[int]]:
        text = render_chat(
            tok, req.messages, tools=mode.specs(), tool_format=fmt.name, chat_template=req.chat_template
        )
        return text, tok.encode(text, add_special_tokens=False)

    try:
        text, ids = await state.offload.run(render)
        renderer = ToolTurnRenderer(tok, fmt, req.chat_template)
    except ValueError as e:
        raise APIError(400, str(e), param="messages") from e
    field = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    limit = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    max_tokens = max_tokens_for(engine, len(ids), limit, field, "messages")
    try:
        sp = SamplingParams(
            n=req.n,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            seed=req.seed,
            max_tokens=max_tokens,
            stop=req.stop,
        )
        policy = ToolPolicy(
            sp, mode.tools, mode.executor, renderer, req.max_tool_rounds, req.tool_timeout, prompt=text
        )
    except ValueError as e:
        raise from_value_error(e) from e
    env = Envelope.chat(state.config.served_model_name)
    state.metrics.prompt_tokens.inc(len(ids))
    if req.stream:
        events = _stream(engine, env, policy, ids, req)
        return StreamingResponse(
            guard_stream(events), media_type="text/event-stream", headers={"x-request-id": env.id}
        )
    # EngineClient.run_policy drives any tree policy (it is typed for the scaling ones).
    run = cast(Callable[..., Any], engine.run_policy)(policy, ids, "")
    out = await unless_disconnected(raw, run)
    choices = []
    completion_tokens = 0
    for o in out.outputs:
        assert isinstance(o, ToolCompletionOutput)
        completion_tokens += o.generated_tokens
        choices.append(
            {
                "index": o.index,
                "message": {"role": "assistant", "content": o.text},
                "finish_reason": o.finish_reason,
                "tool_history": _history(o),
            }
        )
    return JSONResponse(env.body(choices, len(ids), completion_tokens), headers={"x-request-id": env.id})


def _history(o: ToolCompletionOutput) -> dict[str, Any]:
    return {"messages": o.messages, "calls": [c.as_dict() for c in o.tool_calls]}


async def _stream(
    engine: Any, env: Envelope, policy: ToolPolicy, ids: list[int], req: ToolsChatRequest
) -> AsyncIterator[str]:
    """The run's SSE events (see the module docstring); leaving mid-stream aborts the run."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[ToolEvent] = asyncio.Queue()

    def on_event(ev: ToolEvent) -> None:  # on the engine's thread
        with contextlib.suppress(RuntimeError):  # the stream's loop is gone
            loop.call_soon_threadsafe(queue.put_nowait, ev)

    policy.on_event = on_event
    stream = env.stream(len(ids), req.stream_options)
    task = asyncio.ensure_future(cast(Callable[..., Any], engine.run_policy)(policy, ids, ""))
    try:
        yield stream.chunk(
            [chat_delta(i, {"role": "assistant", "content": ""}, None, None) for i in range(req.n)]
        )
        async for ev in while_running(task, queue):
            if ev.event == "content":
                yield stream.chunk([chat_delta(ev.index, {"content": ev.text}, None, None)])
            else:
                yield sse({**env.head(env.chunk_object), "choices": [], "tool_event": ev.as_dict()})
        out = task.result()
        for o in out.outputs:
            assert isinstance(o, ToolCompletionOutput)
            stream.count(o.generated_tokens)
            choice = {
                "index": o.index,
                "delta": {},
                "logprobs": None,
                "finish_reason": finish_reason(o.finish_reason),
            }
            yield stream.chunk([{**choice, "tool_history": _history(o)}])
        for event in stream.end():
            yield event
    finally:
        await cancel_unfinished(task)
