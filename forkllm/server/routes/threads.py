"""The chat route's `threads` extension: run a thread tree (forkllm.threads) inside the engine
from the rendered messages and answer with the context's final text, plus the tree under an
extra `threads` field.

`"threads": {"fanout": ["List the facts.", "List the unknowns."], "join": "kv_concat"}`, or
`{"map_reduce": [chunks...], "map": "...", "reduce": "..."}`, `{"subtasks": [...], "prune": true}`,
or `{"protocol": "multiverse", "outline": [...]}` (the model's own <Parallel> blocks; "apr": its
spawn/join calls)
(threads/spec.py: `spec_from_dict`). The request's max_tokens bounds the final answer (the
spec's `final_max_tokens`); temperature, top_p and seed apply to every thread. `n` runs n trees
of the messages (one prefill, forked as n samples are: threads/trees.py): n choices, each with
its own tree under `threads` (n = 1 keeps the tree at the top level); the server's width and
budget limits count all n trees.

With stream=true the tree streams as it runs: each spawn / join / prune / end, and each thread's
new text (`delta`), is a chunk with no choices and a `thread_event` object (with n > 1, its
`index` says whose tree); the context's answer streams as ordinary content deltas; the last chunk
carries the finish reasons and the whole tree under `threads` (n > 1: in each choice). A client
that leaves (or stops reading) aborts the tree.
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
from forkllm.threads.factory import ThreadSpec, make_trees
from forkllm.threads.result import ThreadEvent, ThreadResult
from forkllm.threads.spec import spec_from_dict

# Request fields a thread tree honours (or that shaped the prompt); any other field sent with a
# non-default value is refused.
_HONOURED = TREE_FIELDS | {"threads", "n"}


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
    n = req.n
    if width * n > limits.max_scaling_width:
        times = f" x n={n}" if n > 1 else ""
        raise APIError(
            400,
            f"threads: {width}{times} threads at once, over this server's limit of "
            f"{limits.max_scaling_width} (--max-scaling-width)",
            param="n" if n > 1 and width <= limits.max_scaling_width else "threads",
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
    if tokens * n > limits.max_scaling_budget:
        over_alone = tokens > limits.max_scaling_budget
        raise APIError(
            400,
            f"threads could generate {tokens * n} tokens{f' (n={n} trees)' if n > 1 else ''}, over "
            f"this server's limit of {limits.max_scaling_budget} (--max-scaling-budget); lower "
            f"{'threads.max_tokens' if over_alone else 'n or threads.max_tokens'}",
            param="threads.max_tokens" if over_alone else "n",
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
        n=req.n,
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
    run = engine.run_policy(make_trees(spec, params, chunks), ids, question)
    try:
        results = await unless_disconnected(raw, run)
    except (ValueError, RuntimeError) as e:
        raise APIError(400, f"threads: {e}", param="threads") from e
    generated = sum(r.generated_tokens for r in results)
    state.metrics.generation_tokens.inc(generated)
    choices = [chat_choice(i, r.text, None, r.finish_reason) for i, r in enumerate(results)]
    if len(results) == 1:
        body = env.body(choices, len(ids), generated, threads=tree_field(results[0]))
    else:
        for c, r in zip(choices, results):
            c["threads"] = tree_field(r)
        body = env.body(choices, len(ids), generated)
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
    queue: asyncio.Queue[tuple[int, ThreadEvent] | TreeEvent] = asyncio.Queue()
    feed = TreeEventFeed(env)  # renders the engine's tree events, when asked for
    n = params.n

    def put(item: tuple[int, ThreadEvent] | TreeEvent) -> None:  # on the engine's thread
        with contextlib.suppress(RuntimeError):  # the stream's loop is gone
            loop.call_soon_threadsafe(queue.put_nowait, item)

    def on_event(i: int, ev: ThreadEvent) -> None:
        put((i, ev))

    stream = env.stream(len(ids), req.stream_options)
    policy = make_trees(spec, params, chunks, on_event=on_event, watch=put if req.tree_events else None)
    task = asyncio.ensure_future(engine.run_policy(policy, ids, question))
    try:
        yield stream.chunk(
            [chat_delta(i, {"role": "assistant", "content": ""}, None, None) for i in range(n)]
        )
        async for item in while_running(task, queue):
            if isinstance(item, TreeEvent):
                yield feed.chunk(item)
                continue
            i, ev = item
            if ev.event == "delta" and ev.thread == 0:  # the context writes only its answer
                yield stream.chunk([chat_delta(i, {"content": ev.text}, None, None)])
                continue
            tagged = {**asdict(ev), "index": i} if n > 1 else asdict(ev)
            yield sse({**env.head(env.chunk_object), "choices": [], "thread_event": tagged})
        try:
            results = task.result()
        except (ValueError, RuntimeError) as e:
            raise APIError(400, f"threads: {e}", param="threads") from e
        generated = sum(r.generated_tokens for r in results)
        state.metrics.generation_tokens.inc(generated)
        stream.count(generated)
        ends = [chat_delta(i, {}, None, r.finish_reason) for i, r in enumerate(results)]
        last = {**env.head(env.chunk_object), "choices": ends}
        if n == 1:
            last["threads"] = tree_field(results[0])
        else:
            for c, r in zip(ends, results):
                c["threads"] = tree_field(r)
        yield sse(last)
        for event in stream.end():
            yield event
    finally:
        await cancel_unfinished(task)
