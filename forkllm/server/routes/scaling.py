"""The chat route's `scaling` extension: run an inference-time strategy inside the engine and
answer with the chosen candidate, plus candidates and votes under an extra `scaling` field. A
client that leaves stops the run: its whole tree (and any judge requests) is aborted."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from forkllm.server.client import EngineClient
from forkllm.server.errors import APIError
from forkllm.server.protocol import ChatCompletionRequest
from forkllm.server.requests import TREE_FIELDS, max_tokens_for, refuse_unapplied, unless_disconnected
from forkllm.server.responses import Envelope, chat_choice, finish_reason
from forkllm.server.state import ServerState

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

    if req.stream:
        raise APIError(400, "scaling cannot be combined with stream=true", param="stream")
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
    run = engine.run_policy(policy, ids, question)
    try:
        result = await (unless_disconnected(raw, run) if raw is not None else run)
    except ValueError as e:
        raise APIError(400, f"scaling: {e}", param="scaling") from e
    state.metrics.prompt_tokens.inc(len(ids))
    state.metrics.generation_tokens.inc(result.tokens_generated)
    env = Envelope.chat(state.config.served_model_name)
    choice = chat_choice(0, result.text, None, "stop")
    scaling: dict[str, Any] = {
        "strategy": result.strategy,
        "answer": result.answer,
        "votes": result.votes,
        "candidates": [
            {
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
    }
    return JSONResponse(env.body([choice], len(ids), result.tokens_generated, scaling=scaling))


def _spec_error(msg: str, forwarded: dict[str, Any]) -> APIError:
    """A bad scaling spec, named by its key; a top-level field we forwarded into the spec
    (temperature, top_p, seed) that the strategy does not take is named as the user sent it."""
    param = msg.split(" ", 1)[0] if msg.startswith("scaling.") else "scaling"
    key = param.removeprefix("scaling.")
    if key in forwarded:
        return APIError(400, f"{key} is not supported by this scaling strategy ({msg})", param=key)
    return APIError(400, msg, param=param)
