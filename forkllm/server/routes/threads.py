"""The chat route's `threads` extension: run a thread tree (forkllm.threads) inside the engine
from the rendered messages and answer with the context's final text, plus the tree under an
extra `threads` field.

`"threads": {"fanout": ["List the facts.", "List the unknowns."], "join": "kv_concat"}`, or
`{"map_reduce": [chunks...], "map": "...", "reduce": "..."}`, `{"subtasks": [...], "prune": true}`,
or `{"protocol": "multiverse", "outline": [...]}` (the model's own <Parallel> blocks; "apr": its
spawn/join calls)
(threads/spec.py: `spec_from_dict`). The request's max_tokens bounds the final answer (the
spec's `final_max_tokens`); temperature, top_p and seed apply to every thread.

With stream=true the tree streams as it runs: each spawn / join / prune / end, and each thread's
new text (`delta`), is a chunk with no choices and a `thread_event` object; the context's answer
streams as ordinary content deltas; the last chunk carries the finish reason and the whole tree
under `threads`. A client that leaves (or stops reading) aborts the tree.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import asdict
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from forkllm.engine.events import TreeEvent
from forkllm.engine.sampling_params import SamplingParams
from forkllm.server.client import EngineClient
from forkllm.server.errors import APIError
from forkllm.server.limits import Limits
from forkllm.server.protocol import ChatCompletionRequest
from forkllm.server.requests import (
    TREE_FIELDS,
    cancel_unfinished,
    guard_stream,
    max_tokens_for,
    refuse_unapplied,
    unless_disconnected,
    while_running,
)
from forkllm.server.responses import Envelope, chat_choice, chat_delta, sse
from forkllm.server.state import ServerState
from forkllm.server.tree_events import TreeEventFeed
from forkllm.threads import MapReduce, Protocol, Subtasks
from forkllm.threads.factory import ThreadSpec, make_policy
from forkllm.threads.result import ThreadEvent, ThreadResult
from forkllm.threads.spec import spec_from_dict

# Request fields a thread tree honours (or that shaped the prompt); any other field sent with a
# non-default value is refused.
_HONOURED = TREE_FIELDS | {"threads"}


def parse_threads(req: ChatCompletionRequest, limits: Limits) -> tuple[ThreadSpec, list[str]]:
    """The request's thread spec, checked against the server's limits (400 naming the key)."""
    refuse_unapplied(req, _HONOURED, "{name} cannot be combined with threads; leave it out")
    raw = dict(req.threads or {})
    limit = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    if limit is not None:
        raw.setdefault("final_max_tokens", limit)
    try:
        spec, chunks = spec_from_dict(raw)
    except ValueError as e:
        msg = str(e)
        param = msg.split(":", 1)[0] if msg.startswith("threads.") else "threads"
        raise APIError(400, msg, param=param) from e
    if isinstance(spec, MapReduce):
        width = len(chunks)
    elif isinstance(spec, Subtasks):
        width = 1
    elif isinstance(spec, Protocol):
        width = spec.max_paths
    else:
        width = spec.num_threads
    if width > limits.max_scaling_width:
        raise APIError(
            400,
            f"threads: {width} threads at once, over this server's limit of {limits.max_scaling_width} "
            "(--max-scaling-width)",
            param="threads",
        )
    if isinstance(spec, Subtasks):
        count = len(spec.prompts)
    elif isinstance(spec, Protocol):
        count = spec.max_paths * spec.max_blocks
    else:
        count = width
    tokens = count * spec.max_tokens + spec.final_max_tokens * (
        spec.max_blocks + 1 if isinstance(spec, Protocol) else 1
    )
    if tokens > limits.max_scaling_budget:
        raise APIError(
            400,
            f"threads could generate {tokens} tokens, over this server's limit of {limits.max_scaling_budget} "
            "(--max-scaling-budget); lower threads.max_tokens",
            param="threads.max_tokens",
        )
    return spec, chunks


def tree_field(result: ThreadResult) -> dict[str, Any]:
    return {
        **result.tree,
        "prefill_tokens": result.prefill_tokens,
        "generated_tokens": result.generated_tokens,
        "critical_path_tokens": result.critical_path_tokens,
        "peak_kv_pages": result.peak_kv_pages,
        "seconds": round(result.seconds, 4),
    }


async def threaded_chat(
    state: ServerState,
    engine: EngineClient,
    req: ChatCompletionRequest,
    ids: list[int],
    raw: Request,
    limits: Limits,
) -> Response:
    spec, chunks = parse_threads(req, limits)
    max_tokens_for(engine, len(ids), spec.final_max_tokens, "threads.final_max_tokens", "messages")
    params = SamplingParams(
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        seed=req.seed,
    )
    question = str(req.messages[-1].content or "") if req.messages else ""
    env = Envelope.chat(state.config.served_model_name)
    state.metrics.prompt_tokens.inc(len(ids))
    if req.stream:
        events = _stream(state, engine, env, req, spec, chunks, params, ids, question)
        return StreamingResponse(
            guard_stream(events), media_type="text/event-stream", headers={"x-request-id": env.id}
        )
    run = engine.run_policy(make_policy(spec, params, chunks), ids, question)
    try:
        result = await unless_disconnected(raw, run)
    except (ValueError, RuntimeError) as e:
        raise APIError(400, f"threads: {e}", param="threads") from e
    state.metrics.generation_tokens.inc(result.generated_tokens)
    choice = chat_choice(0, result.text, None, result.finish_reason)
    body = env.body([choice], len(ids), result.generated_tokens, threads=tree_field(result))
    return JSONResponse(body, headers={"x-request-id": env.id})


async def _stream(
    state: ServerState,
    engine: EngineClient,
    env: Envelope,
    req: ChatCompletionRequest,
    spec: ThreadSpec,
    chunks: list[str],
    params: SamplingParams,
    ids: list[int],
    question: str,
) -> AsyncIterator[str]:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[ThreadEvent | TreeEvent] = asyncio.Queue()
    feed = TreeEventFeed(env)  # renders the engine's tree events, when asked for

    def on_event(ev: ThreadEvent | TreeEvent) -> None:  # on the engine's thread
        with contextlib.suppress(RuntimeError):  # the stream's loop is gone
            loop.call_soon_threadsafe(queue.put_nowait, ev)

    stream = env.stream(len(ids), req.stream_options)
    policy = make_policy(spec, params, chunks, on_event=on_event, watch=on_event if req.tree_events else None)
    task = asyncio.ensure_future(engine.run_policy(policy, ids, question))
    try:
        yield stream.chunk([chat_delta(0, {"role": "assistant", "content": ""}, None, None)])
        async for ev in while_running(task, queue):
            if isinstance(ev, TreeEvent):
                yield feed.chunk(ev)
                continue
            if ev.event == "delta" and ev.thread == 0:  # the context writes only its answer
                yield stream.chunk([chat_delta(0, {"content": ev.text}, None, None)])
                continue
            yield sse({**env.head(env.chunk_object), "choices": [], "thread_event": asdict(ev)})
        try:
            result = task.result()
        except (ValueError, RuntimeError) as e:
            raise APIError(400, f"threads: {e}", param="threads") from e
        state.metrics.generation_tokens.inc(result.generated_tokens)
        stream.count(result.generated_tokens)
        last = {**env.head(env.chunk_object), "choices": [chat_delta(0, {}, None, result.finish_reason)]}
        last["threads"] = tree_field(result)
        yield sse(last)
        for event in stream.end():
            yield event
    finally:
        await cancel_unfinished(task)
