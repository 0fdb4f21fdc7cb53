"""/v1/chat/completions: render the messages with the chat template, then sample (n, logprobs,
streamed or whole) or, with the `scaling` extension, run a strategy inside the engine."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from forkllm.engine.sampling_params import MAX_LOGPROBS, SamplingParams
from forkllm.server.client import EngineClient
from forkllm.server.errors import APIError, from_value_error
from forkllm.server.limits import Limits, check_count, check_prompt_bytes, check_scaling_spec
from forkllm.server.logprobs import chat_logprobs
from forkllm.server.protocol import ChatCompletionRequest
from forkllm.server.requests import (
    check_stream_options,
    guard_stream,
    max_tokens_for,
    merged_outputs,
    run_to_completion,
    token_decoder,
    tokenizer_of,
)
from forkllm.server.responses import Envelope, chat_choice, chat_delta
from forkllm.server.routes.scaling import scaled_chat
from forkllm.server.state import AppState, ServerState
from forkllm.tokenizer import ChatTemplateError

router = APIRouter()


@router.post("/v1/chat/completions")
async def chat_completions(req: ChatCompletionRequest, raw: Request, state: AppState) -> Response:
    engine = state.ready()
    state.check_model(req.model)
    state.check_capacity(engine)
    check_stream_options(req)
    _check_fields(req, state.config.limits)
    if req.scaling is not None:
        _check_scaling_limits(req, state.config.limits)
    check_prompt_bytes(_message_texts(req), state.config.limits, "messages")
    check_prompt_bytes([req.chat_template or ""], state.config.limits, "chat_template")
    text, ids = await state.offload.run(_render, engine, req)
    if req.scaling is not None:
        return await scaled_chat(state, engine, req, text, ids, raw)
    field = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    limit = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    max_tokens = max_tokens_for(engine, len(ids), limit, field, "messages")
    k = (req.top_logprobs or 0) if req.logprobs else None
    try:
        sp = req.sampling_params(max_tokens, k)
        sp.check_vocab(engine.vocab_size)
    except ValueError as e:
        raise from_value_error(e) from e
    state.metrics.prompt_tokens.inc(len(ids))
    env = Envelope.chat(state.config.served_model_name)
    if req.stream:
        events = _stream(state, engine, req, text, ids, sp, env, k)
        return StreamingResponse(
            guard_stream(events), media_type="text/event-stream", headers={"x-request-id": env.id}
        )
    out = (await run_to_completion(state, engine, [(text, ids)], [sp], env.id, raw, req.priority))[0]
    decode = token_decoder(engine)
    choices = [
        chat_choice(
            c.index,
            c.text,
            chat_logprobs(c.token_ids, c.logprobs or [], k, decode) if k is not None else None,
            c.finish_reason,
        )
        for c in sorted(out.outputs, key=lambda c: c.index)
    ]
    completion_tokens = sum(len(c.token_ids) for c in out.outputs)
    return JSONResponse(env.body(choices, len(ids), completion_tokens), headers={"x-request-id": env.id})


def _check_fields(req: ChatCompletionRequest, limits: Limits) -> None:
    """Refuse what this server cannot do rather than ignore it."""
    if req.tools:
        raise APIError(400, "tools are not supported by this server", param="tools")
    if req.tool_choice is not None and req.tool_choice != "none":
        # OpenAI refuses tool_choice without tools too; "none" (no tool calls) holds trivially.
        raise APIError(
            400,
            f"tool_choice {req.tool_choice!r} needs tools, which this server does not support; "
            "only 'none' is accepted",
            param="tool_choice",
        )
    if req.response_format and req.response_format.get("type", "text") != "text":
        raise APIError(
            400,
            f"response_format {req.response_format.get('type')!r} is not supported; only 'text'",
            param="response_format",
        )
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs requires logprobs=true", param="top_logprobs")
    if req.top_logprobs is not None and not 0 <= req.top_logprobs <= MAX_LOGPROBS:
        raise APIError(
            400,
            f"top_logprobs must be an integer in [0, {MAX_LOGPROBS}], got {req.top_logprobs}",
            param="top_logprobs",
        )
    check_count(req.n, limits.max_n, "n", "--max-n")
    if (
        req.continue_final_message
        and "add_generation_prompt" in req.model_fields_set
        and req.add_generation_prompt
    ):
        raise APIError(
            400,
            "continue_final_message and add_generation_prompt cannot both be true",
            param="add_generation_prompt",
        )


def _render(engine: EngineClient, req: ChatCompletionRequest) -> tuple[str, list[int]]:
    """The prompt text and ids; with continue_final_message the text ends inside the last
    message, so the model continues it instead of starting a new turn."""
    tok = tokenizer_of(engine)
    messages = [m.for_template() for m in req.messages]
    try:
        text = tok.apply_chat_template(
            messages,
            add_generation_prompt=req.add_generation_prompt and not req.continue_final_message,
            chat_template=req.chat_template,
        )
    except ChatTemplateError as e:
        raise APIError(400, str(e), param="chat_template" if e.from_request else "messages") from e
    except ValueError as e:
        raise APIError(400, str(e), param="messages") from e
    if req.continue_final_message:
        last = messages[-1].get("content")
        if not isinstance(last, str) or not last or (cut := text.rfind(last)) < 0:
            raise APIError(
                400,
                "continue_final_message needs the last message to have text content to continue",
                param="continue_final_message",
            )
        text = text[: cut + len(last)]
    return text, tok.encode(text, add_special_tokens=False)


def _check_scaling_limits(req: ChatCompletionRequest, limits: Limits) -> None:
    """The scaling spec as it will run (the request's max_tokens applies when the spec has
    none, and is then named as the request spelled it)."""
    spec: dict[str, object] = dict(req.scaling or {})
    field = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    limit = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    if limit is not None and "max_tokens" not in spec:
        spec["max_tokens"] = limit
        try:
            check_scaling_spec(spec, limits)
        except APIError as e:
            if e.param == "scaling.max_tokens":
                e.param = field
            raise
    else:
        check_scaling_spec(spec, limits)


def _message_texts(req: ChatCompletionRequest) -> Iterator[str]:
    """The text the messages carry (content, text parts, tool-call arguments), for the size limit."""
    for m in req.messages:
        if isinstance(m.content, str):
            yield m.content
        elif m.content is not None:
            yield from (part["text"] for part in m.content if isinstance(part.get("text"), str))
        for call in m.tool_calls or ():
            yield call.function.arguments


async def _stream(
    state: ServerState,
    engine: EngineClient,
    req: ChatCompletionRequest,
    text: str,
    ids: list[int],
    sp: SamplingParams,
    env: Envelope,
    k: int | None,
) -> AsyncIterator[str]:
    """A role chunk per choice, then content deltas; the finish chunk has an empty delta."""
    decode = token_decoder(engine)
    stream = env.stream(len(ids), req.stream_options)
    yield stream.chunk(
        [chat_delta(j, {"role": "assistant", "content": ""}, None, None) for j in range(req.n)]
    )
    async for _, out in merged_outputs(state, engine, [(text, ids)], [sp], env.id, req.priority):
        for c in out.outputs:
            lp = chat_logprobs(c.token_ids, c.logprobs or [], k, decode) if k is not None else None
            delta = {"content": c.text} if c.text or c.finish_reason is None else {}
            yield stream.chunk([chat_delta(c.index, delta, lp, c.finish_reason)], len(c.token_ids))
    for event in stream.end():
        yield event
