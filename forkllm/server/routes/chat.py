"""/v1/chat/completions: render the messages with the chat template, then sample (n, logprobs,
streamed or whole, constrained by a grammar when asked, with tool calls parsed when there are
tools) or, with the `scaling` extension, run a strategy inside the engine."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from forkllm.engine.sampling_params import MAX_LOGPROBS, SamplingParams
from forkllm.server.client import EngineClient
from forkllm.server.errors import APIError, from_value_error
from forkllm.server.limits import Limits, check_count, check_prompt_bytes, check_scaling_spec
from forkllm.server.logprobs import Decode, chat_logprobs
from forkllm.server.protocol import ChatCompletionRequest
from forkllm.server.requests import (
    check_stream_options,
    generation_unless_disconnected,
    guard_stream,
    max_tokens_for,
    merged_outputs,
    run_to_completion,
    token_decoder,
    tokenizer_of,
)
from forkllm.server.responses import ChunkStream, Envelope, chat_choice, chat_delta
from forkllm.server.routes.scaling import scaled_chat
from forkllm.server.routes.threads import parse_threads, threaded_chat
from forkllm.server.state import AppState, ServerState
from forkllm.server.structured import StructuredRequest, check_compiles, structured_request
from forkllm.server.tool_calls import (
    ChoiceEvent,
    ChoiceResult,
    ToolPlan,
    call_deltas,
    check_grammar,
    choice_events,
    tool_plan,
)
from forkllm.server.tree_events import TreeEventFeed
from forkllm.tokenizer import ChatTemplateError
from forkllm.tools.formats import get_format
from forkllm.tools.prompt import render_chat

router = APIRouter()


@router.post("/v1/chat/completions")
async def chat_completions(req: ChatCompletionRequest, raw: Request, state: AppState) -> Response:
    engine = state.ready()
    state.check_model(req.model)
    state.check_capacity(engine)
    check_stream_options(req)
    state.check_chat_template(req.chat_template)
    limits = state.config.limits
    _check_fields(req, limits)
    tool_format = state.config.tool_call_parser
    plan = tool_plan(req, get_format(tool_format))
    asked = structured_request(req)
    _check_combination(req, plan, asked)
    if req.scaling is not None:
        _check_scaling_limits(req, limits)
    check_prompt_bytes(_message_texts(req), limits, "messages")
    check_prompt_bytes([req.chat_template or ""], limits, "chat_template")
    if req.tools:
        check_prompt_bytes([json.dumps(req.tools, ensure_ascii=False)], limits, "tools")
    await state.offload.run(_check_grammars, asked, plan)
    if req.threads is not None:
        parse_threads(req, limits)  # a bad spec is a 400 before any rendering
    text, ids = await state.offload.run(_render, engine, req, plan, tool_format)
    state.check_expected_ttft(engine, len(ids))
    if req.scaling is not None:
        return await scaled_chat(state, engine, req, text, ids, raw)
    if req.threads is not None:
        return await threaded_chat(state, engine, req, ids, raw, limits)
    field = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    limit = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    max_tokens = max_tokens_for(engine, len(ids), limit, field, "messages")
    k = (req.top_logprobs or 0) if req.logprobs else None
    structured = asked.params if asked is not None else plan.structured() if plan is not None else None
    try:
        sp = req.sampling_params(
            max_tokens, k, structured=structured, extra_stop=plan.stop() if plan is not None else None
        )
        sp.check_vocab(engine.vocab_size)
    except ValueError as e:
        raise from_value_error(e) from e
    state.metrics.prompt_tokens.inc(len(ids))
    env = Envelope.chat(state.config.served_model_name)
    if plan is not None:
        return await _chat_with_tools(state, engine, req, (text, ids), sp, env, k, plan, raw)
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
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs requires logprobs=true", param="top_logprobs")
    if req.top_logprobs is not None and not 0 <= req.top_logprobs <= MAX_LOGPROBS:
        raise APIError(
            400,
            f"top_logprobs must be an integer in [0, {MAX_LOGPROBS}], got {req.top_logprobs}",
            param="top_logprobs",
        )
    check_count(req.n, limits.max_n, "n", "--max-n")
    if req.tree_events and not req.stream:
        raise APIError(
            400, "tree_events needs stream=true (the events stream with the answer)", param="tree_events"
        )
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


def _check_combination(
    req: ChatCompletionRequest, plan: ToolPlan | None, asked: StructuredRequest | None
) -> None:
    """Two things that each want to shape the output cannot both have it."""
    if req.scaling is not None and (asked is not None or plan is not None):
        param = asked.field.split(".")[0] if asked is not None else "tools"
        raise APIError(
            400,
            f"{param} cannot be combined with scaling (strategies sample on their own terms)",
            param=param,
        )
    if plan is not None and plan.forced and asked is not None:
        param = asked.field.split(".")[0]
        forced = "'required'" if plan.choice == "required" else f"function {plan.function!r}"
        raise APIError(
            400,
            f"{param} and tool_choice {forced} both constrain the output (a grammar forces the "
            "tool calls); give one of them",
            param=param,
        )


def _check_grammars(asked: StructuredRequest | None, plan: ToolPlan | None) -> None:
    if asked is not None:
        check_compiles(asked)
    if plan is not None:
        check_grammar(plan)


def _render(
    engine: EngineClient, req: ChatCompletionRequest, plan: ToolPlan | None, tool_format: str
) -> tuple[str, list[int]]:
    """The prompt text and ids; with continue_final_message the text ends inside the last
    message, so the model continues it instead of starting a new turn. Tools are in the prompt
    unless tool_choice is 'none' (forkllm.tools.prompt writes them for templates without tools)."""
    tok = tokenizer_of(engine)
    messages = [m.for_template() for m in req.messages]
    try:
        text = render_chat(
            tok,
            messages,
            tools=req.tools if plan is not None else None,
            tool_format=tool_format,
            chat_template=req.chat_template,
            add_generation_prompt=req.add_generation_prompt and not req.continue_final_message,
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
    feed = TreeEventFeed(env) if req.tree_events else None
    yield stream.chunk(
        [chat_delta(j, {"role": "assistant", "content": ""}, None, None) for j in range(req.n)]
    )
    outputs = merged_outputs(state, engine, [(text, ids)], [sp], env.id, req.priority, feed)
    async for _, out in outputs:
        for chunk in feed.drain() if feed is not None else ():
            yield chunk
        for c in out.outputs:
            lp = chat_logprobs(c.token_ids, c.logprobs or [], k, decode) if k is not None else None
            delta = {"content": c.text} if c.text or c.finish_reason is None else {}
            yield stream.chunk([chat_delta(c.index, delta, lp, c.finish_reason)], len(c.token_ids))
    for chunk in feed.drain() if feed is not None else ():
        yield chunk
    for event in stream.end():
        yield event


async def _chat_with_tools(
    state: ServerState,
    engine: EngineClient,
    req: ChatCompletionRequest,
    prompt: tuple[str, list[int]],
    sp: SamplingParams,
    env: Envelope,
    k: int | None,
    plan: ToolPlan,
    raw: Request,
) -> Response:
    """A request with tools: every choice's text goes through its own tool-call parser, streamed
    or gathered from the same events."""
    feed = TreeEventFeed(env) if req.tree_events else None
    outputs = merged_outputs(state, engine, [prompt], [sp], env.id, req.priority, feed)
    events = choice_events(outputs, plan, req.n)
    decode = token_decoder(engine)
    if req.stream:
        stream = env.stream(len(prompt[1]), req.stream_options)
        chunks = _tool_stream(events, stream, req.n, k, decode, feed)
        return StreamingResponse(
            guard_stream(chunks), media_type="text/event-stream", headers={"x-request-id": env.id}
        )
    results = [ChoiceResult() for _ in range(req.n)]

    async def gather() -> None:
        async for event in events:
            results[event.index].add(event)

    await generation_unless_disconnected(raw, gather())
    choices = [
        chat_choice(
            j,
            r.content,
            chat_logprobs(r.token_ids, r.logprobs, k, decode) if k is not None else None,
            r.finish_reason,
            [c.as_openai() for c in r.calls],
        )
        for j, r in enumerate(results)
    ]
    completion_tokens = sum(len(r.token_ids) for r in results)
    return JSONResponse(
        env.body(choices, len(prompt[1]), completion_tokens), headers={"x-request-id": env.id}
    )


async def _tool_stream(
    events: AsyncIterator[ChoiceEvent],
    stream: ChunkStream,
    n: int,
    k: int | None,
    decode: Decode,
    feed: TreeEventFeed | None,
) -> AsyncIterator[str]:
    """A role chunk per choice; then per event its content, each complete call (id and name,
    then arguments) and, when the choice ends, a chunk with its finish_reason."""
    yield stream.chunk([chat_delta(j, {"role": "assistant"}, None, None) for j in range(n)])
    calls_sent = [0] * n
    async for ev in events:
        for chunk in feed.drain() if feed is not None else ():
            yield chunk
        lp = chat_logprobs(ev.token_ids, ev.logprobs or [], k, decode) if k is not None else None
        deltas: list[dict[str, Any]] = [{"content": ev.parsed.content}] if ev.parsed.content else []
        deltas += call_deltas(ev.parsed.calls, calls_sent[ev.index])
        calls_sent[ev.index] += len(ev.parsed.calls)
        if not deltas and lp is not None:
            deltas = [{}]  # the logprobs of tokens whose text the parser still holds
        if not deltas:
            stream.count(len(ev.token_ids))
        for i, delta in enumerate(deltas):
            first = i == 0
            yield stream.chunk(
                [chat_delta(ev.index, delta, lp if first else None, None)], len(ev.token_ids) if first else 0
            )
        if ev.finish_reason is not None:
            yield stream.chunk([chat_delta(ev.index, {}, None, ev.finish_reason)])
    for chunk in feed.drain() if feed is not None else ():
        yield chunk
    for event in stream.end():
        yield event
