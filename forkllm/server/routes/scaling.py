"""The chat route's `scaling` extension: run an inference-time strategy inside the engine and
answer with the chosen candidate, plus candidates and votes under an extra `scaling` field. A
client that leaves stops the run: its whole tree (and any judge requests) is aborted.

With stream=true the answer comes as one content chunk when the strategy has chosen it (a
strategy decides at its end), and the last chunk carries the `scaling` field; with
`"tree_events": true` the tree's forks, prunes, scores and votes stream as they happen
(server/tree_events.py) before it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from forkllm.scaling.base import Policy, ScaleResult
from forkllm.server.client import EngineClient
from forkllm.server.errors import APIError
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
from forkllm.server.responses import Envelope, chat_choice, chat_delta, finish_reason, sse
from forkllm.server.state import ServerState
from forkllm.server.tree_events import TreeEventFeed

# Request fields a strategy run honours (or that shaped the prompt, or were checked already).
# Any other field sent with a non-default value is refused: a strategy samples on its own terms.
_HONOURED = TREE_FIELDS | {"scaling", "tools", "tool_choice", "response_format"}


async def scaled_chat(
    state: ServerState,
    engine: EngineClient,
    req: ChatCompletionRequest,
    text: str,
    ids: list[int],
    raw: Request | None = None,
) -> Response:
    """Inference-time scaling inside the engine: the chosen candidate is the message; candidates,
    votes and token counts go under an extra `scaling` field. With `raw` (the HTTP request), a
    disconnect cancels the run, which aborts the tree as a whole, and answers 499."""
    from forkllm.scaling.factory import make_policy

    refuse_unapplied(
        req,
        _HONOURED,
        "{name} is not applied by scaling strategies; leave it out (strategy parameters go inside `scaling`)",
    )
    assert req.scaling is not None
    spec = dict(req.scaling)
    forwarded = {"temperature": req.temperature, "top_p": req.top_p, "seed": req.seed}
    forwarded = {key: value for key, value in forwarded.items() if value is not None and key not in spec}
    spec.update(forwarded)
    field = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    limit = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    if limit is not None:
        spec.setdefault("max_tokens", max_tokens_for(engine, len(ids), limit, field, "messages"))
    try:
        policy = make_policy(spec)
    except ValueError as e:
        raise _spec_error(str(e), forwarded) from e
    question = str(req.messages[-1].content or "") if req.messages else ""
    env = Envelope.chat(state.config.served_model_name)
    state.metrics.prompt_tokens.inc(len(ids))
    if req.stream:
        events = _stream(state, engine, env, req, policy, ids, question)
        return StreamingResponse(
            guard_stream(events), media_type="text/event-stream", headers={"x-request-id": env.id}
        )
    run = engine.run_policy(policy, ids, question)
    try:
        result = await (unless_disconnected(raw, run) if raw is not None else run)
    except ValueError as e:
        raise APIError(400, f"scaling: {e}", param="scaling") from e
    state.metrics.generation_tokens.inc(result.tokens_generated)
    choice = chat_choice(0, result.text, None, "stop")
    return JSONResponse(
        env.body([choice], len(ids), result.tokens_generated, scaling=scaling_field(result)),
        headers={"x-request-id": env.id},
    )


async def _stream(
    state: ServerState,
    engine: EngineClient,
    env: Envelope,
    req: ChatCompletionRequest,
    policy: Policy,
    ids: list[int],
    question: str,
) -> AsyncIterator[str]:
    """Role chunk; tree events as they happen (when asked); the chosen text; the finish chunk
    with the `scaling` field; usage and [DONE] as stream_options say. A client that leaves
    cancels the run (its tree is aborted)."""
    stream = env.stream(len(ids), req.stream_options)
    feed = TreeEventFeed(env) if req.tree_events else None
    policy.watch = feed
    task = asyncio.ensure_future(engine.run_policy(policy, ids, question))
    try:
        yield stream.chunk([chat_delta(0, {"role": "assistant", "content": ""}, None, None)])
        if feed is not None:
            async for tree_event in while_running(task, feed.queue):
                yield feed.chunk(tree_event)
        try:
            result = await task
        except ValueError as e:
            raise APIError(400, f"scaling: {e}", param="scaling") from e
        state.metrics.generation_tokens.inc(result.tokens_generated)
        yield stream.chunk([chat_delta(0, {"content": result.text}, None, None)], result.tokens_generated)
        last = {**env.head(env.chunk_object), "choices": [chat_delta(0, {}, None, "stop")]}
        last["scaling"] = scaling_field(result)
        yield sse(last)
        for event in stream.end():
            yield event
    finally:
        await cancel_unfinished(task)


def scaling_field(result: ScaleResult) -> dict[str, Any]:
    """The response's extra `scaling` object: the answer, votes, candidates (with their sequence
    ids, which the tree events name), the chosen sequence, the tree's token and fork counts."""
    return {
        "strategy": result.strategy,
        "answer": result.answer,
        "votes": result.votes,
        "candidates": [
            {
                "seq": c.seq_id,
                "text": c.text,
                "answer": c.answer,
                "score": c.score,
                "tokens": c.num_tokens,
                "finish_reason": finish_reason(c.finish_reason),
            }
            for c in result.candidates
        ],
        "tokens_generated": result.tokens_generated,
        "seconds": round(result.seconds, 4),
        "forks": result.forks,
        "prunes": result.prunes,
        "chosen": result.chosen,
    }


def _spec_error(msg: str, forwarded: dict[str, Any]) -> APIError:
    """A bad scaling spec, named by its key; a top-level field we forwarded into the spec
    (temperature, top_p, seed) that the strategy does not take is named as the user sent it."""
    param = msg.split(" ", 1)[0] if msg.startswith("scaling.") else "scaling"
    key = param.removeprefix("scaling.")
    if key in forwarded:
        return APIError(400, f"{key} is not supported by this scaling strategy ({msg})", param=key)
    return APIError(400, msg, param=param)
