"""The chat route's `scaling` extension: run an inference-time strategy inside the engine and
answer with the chosen candidate, plus candidates and votes under an extra `scaling` field."""

from __future__ import annotations

from fastapi.responses import JSONResponse, Response

from forkllm.engine.async_engine import AsyncEngine
from forkllm.server import formatting as fmt
from forkllm.server.errors import APIError
from forkllm.server.protocol import ChatCompletionRequest
from forkllm.server.requests import max_tokens_for
from forkllm.server.state import ServerState


async def scaled_chat(
    state: ServerState, engine: AsyncEngine, req: ChatCompletionRequest, text: str, ids: list[int]
) -> Response:
    """Inference-time scaling inside the engine: the chosen candidate is the message; candidates,
    votes and token counts go under an extra `scaling` field."""
    from forkllm.scaling.factory import make_policy

    if req.stream:
        raise APIError(400, "scaling cannot be combined with stream=true", param="stream")
    assert req.scaling is not None
    spec = dict(req.scaling)
    if req.temperature is not None:
        spec.setdefault("temperature", req.temperature)
    if req.seed is not None:
        spec.setdefault("seed", req.seed)
    limit = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    if limit is not None:
        spec.setdefault("max_tokens", max_tokens_for(engine, len(ids), limit, "max_tokens", "messages"))
    try:
        policy = make_policy(spec)
    except ValueError as e:
        msg = str(e)
        param = msg.split(" ", 1)[0] if msg.startswith("scaling.") else "scaling"
        raise APIError(400, msg, param=param) from e
    question = str(req.messages[-1].content or "") if req.messages else ""
    try:
        result = await engine.run_policy(policy, ids, question)
    except ValueError as e:
        raise APIError(400, f"scaling: {e}", param="scaling") from e
    state.metrics.prompt_tokens.inc(len(ids))
    state.metrics.generation_tokens.inc(result.tokens_generated)
    return JSONResponse(
        {
            "id": fmt.new_id("chatcmpl"),
            "object": "chat.completion",
            "created": fmt.now(),
            "model": state.config.served_model_name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": result.text},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": fmt.usage(len(ids), result.tokens_generated),
            "scaling": {
                "strategy": result.strategy,
                "answer": result.answer,
                "votes": result.votes,
                "candidates": [
                    {
                        "text": c.text,
                        "answer": c.answer,
                        "score": c.score,
                        "tokens": c.num_tokens,
                        "finish_reason": fmt.finish_reason(c.finish_reason),
                    }
                    for c in result.candidates
                ],
                "tokens_generated": result.tokens_generated,
                "seconds": round(result.seconds, 4),
                "forks": result.forks,
                "prunes": result.prunes,
            },
        }
    )
