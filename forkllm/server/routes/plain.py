"""Routes that generate nothing: /health, /metrics, /v1/models(/{id}), /tokenize, /detokenize.
Tokenizing and detokenizing run on the offload pool: a large input must not stall the loop."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from forkllm.server.client import EngineClient
from forkllm.server.errors import APIError
from forkllm.server.limits import check_prompt_bytes
from forkllm.server.protocol import DetokenizeRequest, TokenizeRequest
from forkllm.server.requests import tokenizer_of
from forkllm.server.state import AppState, ServerState
from forkllm.tools.prompt import render_chat

router = APIRouter()


@router.get("/health")
async def health(state: AppState) -> Response:
    if state.engine is not None and state.engine.is_running and state.load_error is None:
        replicas = getattr(state.engine, "replica_status", None)  # forkllm serve --replicas
        return JSONResponse({"status": "ok", **({"replicas": replicas()} if replicas else {})})
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
    return {"object": "list", "data": [_model_card(state, engine)]}


@router.get("/v1/models/{model_id:path}")
async def model(model_id: str, state: AppState) -> dict[str, Any]:
    engine = state.ready()
    state.check_model(model_id)
    return _model_card(state, engine)


def _model_card(state: ServerState, engine: EngineClient) -> dict[str, Any]:
    name = state.config.served_model_name
    return {
        "id": name,
        "object": "model",
        "created": int(time.time()),
        "owned_by": "forkllm",
        "root": name,
        "max_model_len": engine.max_model_len,
    }


@router.post("/tokenize")
async def tokenize(req: TokenizeRequest, state: AppState) -> dict[str, Any]:
    """vLLM's helper. Defaults follow the input: a prompt gets special tokens; rendered messages
    already carry theirs, so they get none unless asked."""
    engine = state.ready()
    state.check_model(req.model)
    if (req.prompt is None) == (req.messages is None):
        raise APIError(400, "give exactly one of prompt or messages", param="prompt")
    if req.prompt is not None and req.add_generation_prompt is not None:
        raise APIError(
            400, "add_generation_prompt applies to messages, not prompt", param="add_generation_prompt"
        )
    if req.prompt is not None:
        check_prompt_bytes([req.prompt], state.config.limits, "prompt")
    else:
        texts = [m.content for m in req.messages or () if isinstance(m.content, str)]
        check_prompt_bytes(texts, state.config.limits, "messages")
    ids = await state.offload.run(_tokenize, engine, req, state)
    return {"count": len(ids), "max_model_len": engine.max_model_len, "tokens": ids}


def _tokenize(engine: EngineClient, req: TokenizeRequest, state: ServerState) -> list[int]:
    tok = tokenizer_of(engine)
    try:
        if req.messages is not None:
            text = render_chat(  # tool turns written as the chat route writes them
                tok,
                [m.for_template() for m in req.messages],
                tool_format=state.config.tool_call_parser,
                add_generation_prompt=req.add_generation_prompt is not False,
            )
            return tok.encode(text, add_special_tokens=bool(req.add_special_tokens))
        return tok.encode(req.prompt or "", add_special_tokens=req.add_special_tokens is not False)
    except ValueError as e:  # a chat template's error included: the model's own, so the messages
        raise APIError(400, str(e), param="messages" if req.messages is not None else "prompt") from e


@router.post("/detokenize")
async def detokenize(req: DetokenizeRequest, state: AppState) -> dict[str, Any]:
    engine = state.ready()
    state.check_model(req.model)
    vocab = engine.vocab_size
    bad = [t for t in req.tokens if not 0 <= t < vocab]
    if bad:
        raise APIError(400, f"tokens: id {bad[0]} is out of range for vocab_size {vocab}", param="tokens")
    tok = tokenizer_of(engine)
    return {"prompt": await state.offload.run(tok.decode, req.tokens, skip_special_tokens=False)}
