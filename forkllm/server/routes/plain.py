"""Routes that generate nothing: /health, /metrics, /v1/models, /tokenize, /detokenize."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from forkllm.server.errors import APIError, from_value_error
from forkllm.server.protocol import DetokenizeRequest, TokenizeRequest
from forkllm.server.requests import tokenizer_of
from forkllm.server.state import AppState

router = APIRouter()


@router.get("/health")
async def health(state: AppState) -> Response:
    if state.engine is not None and state.engine.is_running and state.load_error is None:
        return JSONResponse({"status": "ok"})
    status = "failed" if state.load_error is not None else "loading"
    return JSONResponse({"status": status}, status_code=503)


@router.get("/metrics")
async def metrics(state: AppState) -> Response:
    if state.engine is not None:
        state.metrics.update_engine(state.engine.metrics())
    return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4")


@router.get("/v1/models")
async def models(state: AppState) -> dict[str, Any]:
    engine = state.ready()
    name = state.config.served_model_name
    return {
        "object": "list",
        "data": [
            {
                "id": name,
                "object": "model",
                "created": int(time.time()),
                "owned_by": "forkllm",
                "root": name,
                "max_model_len": engine.max_model_len,
            }
        ],
    }


@router.post("/tokenize")
async def tokenize(req: TokenizeRequest, state: AppState) -> dict[str, Any]:
    """vLLM's helper. Defaults follow the input: a prompt gets special tokens; rendered messages
    already carry theirs, so they get none unless asked."""
    engine = state.ready()
    state.check_model(req.model)
    tok = tokenizer_of(engine)
    if (req.prompt is None) == (req.messages is None):
        raise APIError(400, "give exactly one of prompt or messages", param="prompt")
    try:
        if req.messages is not None:
            text = tok.apply_chat_template(
                [m.model_dump(exclude_none=True) for m in req.messages],
                add_generation_prompt=req.add_generation_prompt is not False,
            )
            ids = tok.encode(text, add_special_tokens=bool(req.add_special_tokens))
        else:
            if req.add_generation_prompt is not None:
                raise APIError(
                    400,
                    "add_generation_prompt applies to messages, not prompt",
                    param="add_generation_prompt",
                )
            ids = tok.encode(req.prompt or "", add_special_tokens=req.add_special_tokens is not False)
    except ValueError as e:
        raise from_value_error(e) from e
    return {"count": len(ids), "max_model_len": engine.max_model_len, "tokens": ids}


@router.post("/detokenize")
async def detokenize(req: DetokenizeRequest, state: AppState) -> dict[str, Any]:
    engine = state.ready()
    state.check_model(req.model)
    vocab = engine.vocab_size
    bad = [t for t in req.tokens if not 0 <= t < vocab]
    if bad:
        raise APIError(400, f"tokens: id {bad[0]} is out of range for vocab_size {vocab}", param="tokens")
    return {"prompt": tokenizer_of(engine).decode(req.tokens, skip_special_tokens=False)}
