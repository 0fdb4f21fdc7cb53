"""OpenAI-compatible HTTP server over the AsyncEngine (FastAPI, server-sent events).

One engine loop runs in its own thread; each HTTP request becomes one engine request per prompt
and reads its outputs from an asyncio queue. A client that goes away (stream closed, or a
non-streaming request whose connection drops) aborts its requests, freeing their KV pages before
the engine's next step. Every user error is an OpenAI-shaped JSON error naming the field; an
internal error fails only the request it happened in.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from forkllm.engine.async_engine import AsyncEngine
from forkllm.server import formatting as fmt
from forkllm.server.errors import APIError, from_validation_errors, from_value_error
from forkllm.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from forkllm.server.requests import (
    completion_prompts,
    guard_stream,
    max_tokens_for,
    merged_outputs,
    run_to_completion,
    token_decoder,
    tokenizer_of,
)
from forkllm.server.scaling_route import scaled_chat
from forkllm.server.state import ServerConfig, ServerState

__all__ = ["ServerConfig", "create_app"]

logger = logging.getLogger("forkllm.server")


def create_app(
    config: ServerConfig,
    engine: AsyncEngine | None = None,
    engine_factory: Callable[[], AsyncEngine] | None = None,
) -> FastAPI:
    state = ServerState(config, engine, engine_factory)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if state.engine is None:
            state.start_loading()
        yield
        if state.engine is not None:
            state.engine.shutdown()

    app = FastAPI(title="forkllm", lifespan=lifespan)
    app.state.forkllm = state

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError) -> JSONResponse:
        return from_validation_errors(list(e.errors())).response()

    @app.exception_handler(Exception)
    async def _internal(_: Request, e: Exception) -> JSONResponse:
        logger.exception("internal error")
        return APIError(500, f"internal error: {type(e).__name__}: {e}").response()

    @app.middleware("http")
    async def _auth_and_count(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        path = request.url.path
        if path.startswith("/v1"):
            key = state.config.api_key
            if key is not None and request.headers.get("authorization") != f"Bearer {key}":
                resp: Response = APIError(
                    401,
                    "invalid or missing API key (send 'Authorization: Bearer <key>')",
                    code="invalid_api_key",
                ).response()
            else:
                resp = await call_next(request)
            state.metrics.requests.labels(path, str(resp.status_code)).inc()
            return resp
        return await call_next(request)

    # ---- plain routes -------------------------------------------------------------------------
    @app.get("/health")
    async def health() -> Response:
        if state.engine is not None and state.engine.is_running and state.load_error is None:
            return JSONResponse({"status": "ok"})
        status = "failed" if state.load_error is not None else "loading"
        return JSONResponse({"status": status}, status_code=503)

    @app.get("/metrics")
    async def metrics() -> Response:
        if state.engine is not None:
            state.metrics.update_engine(state.engine.metrics_snapshot)
        return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        engine = state.ready()
        return {
            "object": "list",
            "data": [
                {
                    "id": state.config.served_model_name,
                    "object": "model",
                    "created": fmt.now(),
                    "owned_by": "forkllm",
                    "root": state.config.served_model_name,
                    "max_model_len": engine.engine.max_model_len,
                }
            ],
        }

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest) -> dict[str, Any]:
        engine = state.ready()
        state.check_model(req.model)
        tok = tokenizer_of(engine)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give exactly one of prompt or messages", param="prompt")
        try:
            if req.messages is not None:
                text = tok.apply_chat_template(
                    [m.model_dump(exclude_none=True) for m in req.messages],
                    add_generation_prompt=req.add_generation_prompt,
                )
                ids = tok.encode(text, add_special_tokens=False)
            else:
                ids = tok.encode(req.prompt or "", add_special_tokens=req.add_special_tokens)
        except ValueError as e:
            raise from_value_error(e) from e
        return {"count": len(ids), "max_model_len": engine.engine.max_model_len, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest) -> dict[str, Any]:
        engine = state.ready()
        state.check_model(req.model)
        vocab = engine.engine.model_config.vocab_size
        bad = [t for t in req.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"tokens: id {bad[0]} is out of range for vocab_size {vocab}", param="tokens")
        return {"prompt": tokenizer_of(engine).decode(req.tokens, skip_special_tokens=False)}

    # ---- generation ---------------------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, raw: Request) -> Response:
        engine = state.ready()
        state.check_model(req.model)
        state.check_capacity(engine)
        if req.scaling is not None:
            raise APIError(400, "scaling is only available on /v1/chat/completions", param="scaling")
        if req.suffix:
            raise APIError(400, "suffix is not supported by this server", param="suffix")
        n = req.n
        best_of = req.best_of if req.best_of is not None else n
        if not isinstance(n, int) or n < 1:
            raise APIError(400, f"n must be at least 1, got {n}", param="n")
        if best_of < n:
            raise APIError(400, f"best_of ({best_of}) must be >= n ({n})", param="best_of")
        if req.stream and best_of > n:
            raise APIError(400, "best_of > n cannot be streamed", param="best_of")
        prompts = completion_prompts(engine, req.prompt)
        lp_k = req.logprobs
        want_lp = lp_k is not None
        params = []
        for _, ids in prompts:
            max_tokens = max_tokens_for(engine, len(ids), req.max_tokens, "max_tokens", "prompt")
            try:
                sp = req.sampling_params(
                    max_tokens, lp_k if want_lp else (0 if best_of > n else None), n=best_of
                )
                if req.echo and want_lp:
                    sp = sp.clone(prompt_logprobs=lp_k)
            except ValueError as e:
                raise from_value_error(e) from e
            params.append(sp)
        state.metrics.prompt_tokens.inc(sum(len(ids) for _, ids in prompts))
        cid = fmt.new_id("cmpl")
        created = fmt.now()
        name = state.config.served_model_name
        decode = token_decoder(engine)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)

            async def events() -> AsyncIterator[str]:
                completion_tokens = 0
                if req.echo:
                    for i, (text, _) in enumerate(prompts):
                        for j in range(n):
                            yield fmt.sse(
                                {
                                    "id": cid,
                                    "object": "text_completion",
                                    "created": created,
                                    "model": name,
                                    "choices": [
                                        {
                                            "index": i * n + j,
                                            "text": text,
                                            "logprobs": None,
                                            "finish_reason": None,
                                        }
                                    ],
                                }
                            )
                async for i, out in merged_outputs(state, engine, prompts, params, cid):
                    for c in out.outputs:
                        completion_tokens += len(c.token_ids)
                        lp = (
                            fmt.completion_logprobs(c.token_ids, c.logprobs or [], lp_k or 0, decode)
                            if want_lp
                            else None
                        )
                        yield fmt.sse(
                            {
                                "id": cid,
                                "object": "text_completion",
                                "created": created,
                                "model": name,
                                "choices": [
                                    {
                                        "index": i * n + c.index,
                                        "text": c.text,
                                        "logprobs": lp,
                                        "finish_reason": fmt.finish_reason(c.finish_reason),
                                    }
                                ],
                            }
                        )
                if include_usage:
                    prompt_tokens = sum(len(ids) for _, ids in prompts)
                    yield fmt.sse(
                        {
                            "id": cid,
                            "object": "text_completion",
                            "created": created,
                            "model": name,
                            "choices": [],
                            "usage": fmt.usage(prompt_tokens, completion_tokens),
                        }
                    )
                yield fmt.sse("[DONE]")

            return StreamingResponse(guard_stream(events()), media_type="text/event-stream")

        finals = await run_to_completion(state, engine, prompts, params, cid, raw)
        choices = []
        completion_tokens = 0
        for i, out in enumerate(finals):
            comps = sorted(out.outputs, key=lambda c: c.index)
            if best_of > n:
                comps = sorted(comps, key=lambda c: c.cumulative_logprob or 0.0, reverse=True)[:n]
            prompt_text, prompt_ids = prompts[i]
            for j, c in enumerate(comps):
                completion_tokens += len(c.token_ids)
                text, ids, positions = c.text, list(c.token_ids), list(c.logprobs or [])
                if req.echo:
                    text = prompt_text + text
                    if want_lp:
                        ids = prompt_ids + ids
                        positions = list(out.prompt_logprobs or [None] * len(prompt_ids)) + positions
                lp = fmt.completion_logprobs(ids, positions, lp_k or 0, decode) if want_lp else None
                choices.append(
                    {
                        "index": i * n + j,
                        "text": text,
                        "logprobs": lp,
                        "finish_reason": fmt.finish_reason(c.finish_reason),
                    }
                )
        return JSONResponse(
            {
                "id": cid,
                "object": "text_completion",
                "created": created,
                "model": name,
                "choices": choices,
                "usage": fmt.usage(sum(len(ids) for _, ids in prompts), completion_tokens),
            }
        )

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, raw: Request) -> Response:
        engine = state.ready()
        state.check_model(req.model)
        state.check_capacity(engine)
        if req.tools:
            raise APIError(400, "tools are not supported by this server", param="tools")
        if req.response_format and req.response_format.get("type", "text") != "text":
            raise APIError(
                400,
                f"response_format {req.response_format.get('type')!r} is not supported; only 'text'",
                param="response_format",
            )
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs requires logprobs=true", param="top_logprobs")
        if req.n < 1:
            raise APIError(400, f"n must be at least 1, got {req.n}", param="n")
        tok = tokenizer_of(engine)
        messages = [m.model_dump(exclude_none=True) for m in req.messages]
        try:
            text = tok.apply_chat_template(
                messages,
                add_generation_prompt=req.add_generation_prompt and not req.continue_final_message,
                chat_template=req.chat_template,
            )
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from e
        if req.continue_final_message:
            last = messages[-1].get("content") or ""
            if isinstance(last, str) and last:
                text = text[: text.rfind(last) + len(last)]
        ids = tok.encode(text, add_special_tokens=False)
        if req.scaling is not None:
            return await scaled_chat(state, engine, req, text, ids)
        limit = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        max_tokens = max_tokens_for(
            engine,
            len(ids),
            limit,
            "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens",
            "messages",
        )
        k = (req.top_logprobs or 0) if req.logprobs else None
        try:
            sp = req.sampling_params(max_tokens, k)
        except ValueError as e:
            raise from_value_error(e) from e
        state.metrics.prompt_tokens.inc(len(ids))
        cid = fmt.new_id("chatcmpl")
        created = fmt.now()
        name = state.config.served_model_name
        decode = token_decoder(engine)
        prompts = [(text, ids)]
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)

            def chunk(choices: list[dict[str, Any]]) -> str:
                return fmt.sse(
                    {
                        "id": cid,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": name,
                        "choices": choices,
                    }
                )

            async def events() -> AsyncIterator[str]:
                yield chunk(
                    [
                        {
                            "index": j,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                        for j in range(req.n)
                    ]
                )
                completion_tokens = 0
                async for _, out in merged_outputs(state, engine, prompts, [sp], cid):
                    for c in out.outputs:
                        completion_tokens += len(c.token_ids)
                        lp = (
                            fmt.chat_logprobs(c.token_ids, c.logprobs or [], k or 0, decode)
                            if k is not None
                            else None
                        )
                        delta = {"content": c.text} if c.text or c.finish_reason is None else {}
                        yield chunk(
                            [
                                {
                                    "index": c.index,
                                    "delta": delta,
                                    "logprobs": lp,
                                    "finish_reason": fmt.finish_reason(c.finish_reason),
                                }
                            ]
                        )
                if include_usage:
                    yield fmt.sse(
                        {
                            "id": cid,
                            "object": "chat.completion.chunk",
                            "created": created,
                            "model": name,
                            "choices": [],
                            "usage": fmt.usage(len(ids), completion_tokens),
                        }
                    )
                yield fmt.sse("[DONE]")

            return StreamingResponse(guard_stream(events()), media_type="text/event-stream")

        out = (await run_to_completion(state, engine, prompts, [sp], cid, raw))[0]
        choices = []
        completion_tokens = 0
        for c in sorted(out.outputs, key=lambda c: c.index):
            completion_tokens += len(c.token_ids)
            choices.append(
                {
                    "index": c.index,
                    "message": {"role": "assistant", "content": c.text},
                    "logprobs": fmt.chat_logprobs(c.token_ids, c.logprobs or [], k or 0, decode)
                    if k is not None
                    else None,
                    "finish_reason": fmt.finish_reason(c.finish_reason),
                }
            )
        return JSONResponse(
            {
                "id": cid,
                "object": "chat.completion",
                "created": created,
                "model": name,
                "choices": choices,
                "usage": fmt.usage(len(ids), completion_tokens),
            }
        )

    return app
