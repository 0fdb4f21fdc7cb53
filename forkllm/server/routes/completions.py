"""/v1/completions: one or many prompts, n samples each (best_of ranks more), echo, logprobs,
streamed or whole, constrained by a grammar when asked (response_format, guided_*,
structured_outputs)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from forkllm.engine.outputs import PositionLogprobs, RequestOutput
from forkllm.engine.sampling_params import SamplingParams
from forkllm.server.client import EngineClient
from forkllm.server.errors import APIError, from_value_error
from forkllm.server.limits import check_count, check_prompt_bytes, check_request_sequences
from forkllm.server.logprobs import Decode, completion_logprobs
from forkllm.server.protocol import CompletionRequest
from forkllm.server.requests import (
    check_stream_options,
    completion_prompts,
    guard_stream,
    max_tokens_for,
    merged_outputs,
    run_to_completion,
    token_decoder,
)
from forkllm.server.responses import Envelope, completion_choice
from forkllm.server.state import AppState, ServerState
from forkllm.server.structured import check_compiles, structured_request
from forkllm.structured.params import StructuredOutputsParams

router = APIRouter()

Prompts = list[tuple[str, list[int]]]


@router.post("/v1/completions")
async def completions(req: CompletionRequest, raw: Request, state: AppState) -> Response:
    engine = state.ready()
    state.check_model(req.model)
    state.check_capacity(engine)
    check_stream_options(req)
    if req.scaling is not None:
        raise APIError(400, "scaling is only available on /v1/chat/completions", param="scaling")
    if req.threads is not None:
        raise APIError(400, "threads is only available on /v1/chat/completions", param="threads")
    if req.suffix:
        raise APIError(400, "suffix is not supported by this server", param="suffix")
    limits = state.config.limits
    n = req.n
    best_of = req.best_of if req.best_of is not None else n
    check_count(n, limits.max_n, "n", "--max-n")
    if best_of < n:
        raise APIError(400, f"best_of ({best_of}) must be >= n ({n})", param="best_of")
    check_count(best_of, limits.max_best_of, "best_of", "--max-best-of")
    if req.stream and best_of > n:
        raise APIError(400, "best_of > n cannot be streamed", param="best_of")
    texts = [req.prompt] if isinstance(req.prompt, str) else [p for p in req.prompt if isinstance(p, str)]
    check_prompt_bytes(texts, limits, "prompt")
    asked = structured_request(req)
    if asked is not None:
        await state.offload.run(check_compiles, asked)
    num_prompts = 1 if isinstance(req.prompt, str) or _token_ids(req.prompt) else len(req.prompt)
    check_request_sequences(num_prompts, best_of, limits)
    prompts = await state.offload.run(completion_prompts, engine, req.prompt)
    state.check_expected_ttft(engine, sum(len(ids) for _, ids in prompts))
    structured = asked.params if asked is not None else None
    params = [_sampling_params(engine, req, len(ids), best_of, structured) for _, ids in prompts]
    state.metrics.prompt_tokens.inc(sum(len(ids) for _, ids in prompts))
    env = Envelope.completion(state.config.served_model_name)
    decode = token_decoder(engine)
    if req.stream:
        events = _stream(state, engine, req, prompts, params, env, decode)
        return StreamingResponse(
            guard_stream(events), media_type="text/event-stream", headers={"x-request-id": env.id}
        )
    finals = await run_to_completion(state, engine, prompts, params, env.id, raw, req.priority)
    return JSONResponse(_body(req, prompts, finals, best_of, env, decode), headers={"x-request-id": env.id})


def _sampling_params(
    engine: EngineClient,
    req: CompletionRequest,
    prompt_len: int,
    best_of: int,
    structured: StructuredOutputsParams | None,
) -> SamplingParams:
    max_tokens = max_tokens_for(engine, prompt_len, req.max_tokens, "max_tokens", "prompt")
    k = req.logprobs
    try:
        # best_of > n ranks samples by cumulative logprob, which needs logprobs computed.
        sp = req.sampling_params(
            max_tokens,
            k if k is not None else (0 if best_of > req.n else None),
            n=best_of,
            structured=structured,
        )
        if req.echo and k is not None:
            sp = sp.clone(prompt_logprobs=k)
        sp.check_vocab(engine.vocab_size)
    except ValueError as e:
        raise from_value_error(e) from e
    return sp


async def _stream(
    state: ServerState,
    engine: EngineClient,
    req: CompletionRequest,
    prompts: Prompts,
    params: list[SamplingParams],
    env: Envelope,
    decode: Decode,
) -> AsyncIterator[str]:
    """Deltas as they come. An echoed prompt goes out with its prompt's first delta, which carries
    the prompt logprobs; text_offset continues across a choice's chunks."""
    n, k = req.n, req.logprobs
    stream = env.stream(sum(len(ids) for _, ids in prompts), req.stream_options)
    offsets: dict[int, int] = {}  # choice index -> characters streamed so far
    async for i, out in merged_outputs(state, engine, prompts, params, env.id, req.priority):
        if req.echo and i * n not in offsets:
            text, ids = prompts[i]
            lp = None
            if k is not None:
                lp = completion_logprobs(ids, out.prompt_logprobs or [None] * len(ids), k, decode)
            for j in range(n):
                offsets[i * n + j] = len(text)
                yield stream.chunk([completion_choice(i * n + j, text, lp, None)])
        for c in out.outputs:
            index = i * n + c.index
            offset = offsets.get(index, 0)
            lp = None
            if k is not None:
                lp = completion_logprobs(c.token_ids, c.logprobs or [], k, decode, offset)
            offsets[index] = offset + len(c.text)
            yield stream.chunk([completion_choice(index, c.text, lp, c.finish_reason)], len(c.token_ids))
    for event in stream.end():
        yield event


def _body(
    req: CompletionRequest,
    prompts: Prompts,
    finals: list[RequestOutput],
    best_of: int,
    env: Envelope,
    decode: Decode,
) -> dict[str, object]:
    n, k = req.n, req.logprobs
    choices = []
    completion_tokens = 0
    for i, out in enumerate(finals):
        comps = sorted(out.outputs, key=lambda c: c.index)
        if best_of > n:
            comps = sorted(comps, key=lambda c: c.cumulative_logprob or 0.0, reverse=True)[:n]
        prompt_text, prompt_ids = prompts[i]
        for j, c in enumerate(comps):
            completion_tokens += len(c.token_ids)
            text, ids = c.text, list(c.token_ids)
            positions: list[PositionLogprobs | None] = list(c.logprobs or [])
            if req.echo:
                text = prompt_text + text
                if k is not None:
                    ids = prompt_ids + ids
                    positions = list(out.prompt_logprobs or [None] * len(prompt_ids)) + positions
            lp = completion_logprobs(ids, positions, k, decode) if k is not None else None
            choices.append(completion_choice(i * n + j, text, lp, c.finish_reason))
    return env.body(choices, sum(len(ids) for _, ids in prompts), completion_tokens)


def _token_ids(prompt: object) -> bool:
    """One prompt given as token ids (a flat list of integers), not a list of prompts."""
    return isinstance(prompt, list) and bool(prompt) and all(isinstance(t, int) for t in prompt)
