"""Running one HTTP request's prompts through the EngineClient: prompt and max_tokens checks, the
interleaved delta stream of all its prompts (with latency metrics), the non-streaming collector
and `unless_disconnected` (both abort the engine work when the client leaves), and the guard that
turns a mid-stream error into an SSE event."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from fastapi import Request

from forkllm.engine.events import TreeWatcher
from forkllm.engine.inputs import PromptInput
from forkllm.engine.outputs import RequestOutput
from forkllm.engine.sampling_params import RequestOutputKind, SamplingParams
from forkllm.server.client import EngineClient
from forkllm.server.errors import APIError, from_value_error
from forkllm.server.logprobs import Decode
from forkllm.server.protocol import CompletionPrompt, SamplingRequest
from forkllm.server.responses import sse
from forkllm.server.state import ServerState
from forkllm.tokenizer import Tokenizer

logger = logging.getLogger("forkllm.server")

T = TypeVar("T")


def tokenizer_of(engine: EngineClient) -> Tokenizer:
    tok = engine.tokenizer
    if tok is None:
        raise APIError(400, "this model has no tokenizer; send token ids", param="prompt")
    return tok


def token_decoder(engine: EngineClient) -> Decode:
    tok = engine.tokenizer
    return (lambda t: tok.decode([t], skip_special_tokens=False)) if tok is not None else str


def completion_prompts(engine: EngineClient, prompt: CompletionPrompt) -> list[tuple[str, list[int]]]:
    """The request's prompts as (text, token ids)."""
    if isinstance(prompt, str) or (
        isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt)
    ):
        items: list[Any] = [prompt]
    else:
        items = list(prompt)
    if not items:
        raise APIError(400, "prompt is empty", param="prompt")
    out = []
    for item in items:
        try:
            text, ids = engine.tokenize_prompt(item)
        except ValueError as e:
            raise APIError(400, str(e), param="prompt") from e
        if text is None:
            tok = engine.tokenizer
            text = tok.decode(ids, skip_special_tokens=False) if tok is not None else ""
        out.append((text, ids))
    return out


def max_tokens_for(
    engine: EngineClient, prompt_len: int, asked: int | None, field: str, prompt_field: str
) -> int:
    limit = engine.max_model_len
    if asked is not None and (not isinstance(asked, int) or asked < 1):
        raise APIError(400, f"{field} must be at least 1, got {asked}", param=field)
    if prompt_len >= limit:
        raise APIError(
            400,
            f"This model's maximum context length is {limit} tokens. However, your {prompt_field} "
            f"has {prompt_len} tokens, leaving no room for a completion. Please shorten it.",
            param=prompt_field,
            code="context_length_exceeded",
        )
    if asked is None:
        return limit - prompt_len
    if prompt_len + asked > limit:
        raise APIError(
            400,
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{prompt_len + asked} tokens ({prompt_len} in the {prompt_field}, {asked} in the "
            f"completion). Please reduce the length of the {prompt_field} or completion.",
            param=field,
            code="context_length_exceeded",
        )
    return asked


async def while_running(task: asyncio.Future[Any], queue: asyncio.Queue[T]) -> AsyncIterator[T]:
    """The items put on `queue` while `task` runs, in order, then those left when it is done (a
    streamed policy's events: the engine's thread puts them, the route writes them out)."""
    while True:
        getter = asyncio.ensure_future(queue.get())
        await asyncio.wait({task, getter}, return_when=asyncio.FIRST_COMPLETED)
        if getter.done():
            yield getter.result()
            continue
        getter.cancel()
        while not queue.empty():
            yield queue.get_nowait()
        return


async def cancel_unfinished(task: asyncio.Future[Any]) -> None:
    """A stream's end: a policy still running is cancelled (its client left: the tree is
    aborted, its pages freed) and waited for."""
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def merged_outputs(
    state: ServerState,
    engine: EngineClient,
    prompts: list[tuple[str, list[int]]],
    params: list[SamplingParams],
    rid: str,
    priority: int = 0,
    watch: TreeWatcher | None = None,
) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Stream (prompt index, delta output) from all of a request's prompts, interleaved; records
    latency metrics. Cancelling the consumer cancels the producers, which abort their requests.
    `priority`: lower is scheduled sooner; `watch` gets every prompt's tree events."""
    queue: asyncio.Queue[tuple[int, RequestOutput] | BaseException | None] = asyncio.Queue()
    arrival = time.perf_counter()

    async def produce(i: int, text: str, ids: list[int], sp: SamplingParams) -> None:
        last: float | None = None
        try:
            prompt: PromptInput = {"prompt": text, "prompt_token_ids": ids}
            async for out in engine.generate(prompt, sp, f"{rid}-{i}", priority, watch):
                ntok = sum(len(c.token_ids) for c in out.outputs)
                t = time.perf_counter()
                if ntok:
                    if last is None:
                        state.metrics.ttft.observe(t - arrival)
                    else:
                        for _ in range(ntok):
                            state.metrics.itl.observe((t - last) / ntok)
                    last = t
                    state.metrics.generation_tokens.inc(ntok)
                await queue.put((i, out))
        except BaseException as e:
            await queue.put(e)
            if isinstance(e, asyncio.CancelledError):
                raise
        finally:
            await queue.put(None)

    tasks = [
        asyncio.create_task(produce(i, t, ids, sp)) for i, ((t, ids), sp) in enumerate(zip(prompts, params))
    ]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()


async def run_to_completion(
    state: ServerState,
    engine: EngineClient,
    prompts: list[tuple[str, list[int]]],
    params: list[SamplingParams],
    rid: str,
    raw: Request,
    priority: int = 0,
) -> list[RequestOutput]:
    """Non-streaming: final outputs of every prompt; aborts everything if the client disconnects."""
    finals: dict[int, RequestOutput] = {}
    params = [p.clone(output_kind=RequestOutputKind.FINAL_ONLY) for p in params]

    async def consume() -> None:
        async for i, out in merged_outputs(state, engine, prompts, params, rid, priority):
            if out.finished:
                finals[i] = out

    await generation_unless_disconnected(raw, consume())
    return [finals[i] for i in range(len(prompts))]


async def generation_unless_disconnected(raw: Request, work: Awaitable[T]) -> T:
    """`unless_disconnected` for a non-streaming generation: invalid input the engine found is a
    400 naming the field, an engine failure a 500."""
    try:
        return await unless_disconnected(raw, work)
    except ValueError as e:
        raise from_value_error(e) from e
    except RuntimeError as e:
        raise APIError(500, str(e), code="internal_error") from e


async def unless_disconnected(raw: Request, work: Awaitable[T]) -> T:
    """Await `work`; if the client disconnects first, cancel it (cancelling a generation aborts
    its engine requests, cancelling a policy run aborts its whole tree, so the pages are free
    before the engine's next step) and answer 499.

    The disconnect is awaited, not polled: after the body, the ASGI server's next message on the
    request's channel is http.disconnect, sent when the client leaves (or once the response is
    complete). Polling `Request.is_disconnected()` can miss it for good: under Starlette's
    BaseHTTPMiddleware its zero-timeout receive is always cancelled before the message is read."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_client_gone(raw))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)  # the abort is on its way
            raise APIError(499, "client disconnected", code="client_closed_request")
        return task.result()
    finally:
        for t in (task, watcher):
            if not t.done():
                t.cancel()
        if watcher.done() and not watcher.cancelled():
            watcher.exception()  # a broken receive channel counts as gone; nothing to log twice


async def _client_gone(raw: Request) -> None:
    while (await raw.receive())["type"] != "http.disconnect":
        pass


# Chat fields an in-engine tree (a scaling strategy, a thread tree) honours, or that shaped its
# prompt; each extension adds its own.
TREE_FIELDS = frozenset(
    {
        "model",
        "messages",
        "temperature",
        "top_p",
        "seed",
        "max_tokens",
        "max_completion_tokens",
        "stream",
        "stream_options",
        "user",
        "add_generation_prompt",
        "continue_final_message",
        "chat_template",
        "tree_events",
    }
)


def refuse_unapplied(req: SamplingRequest, honoured: frozenset[str], message: str) -> None:
    """400 for the first field sent with a non-default value that is not in `honoured`:
    `message` formatted with the field's name. Nothing a user sent is silently ignored."""
    fields = type(req).model_fields
    for name in sorted(req.model_fields_set - honoured):
        if getattr(req, name) != fields[name].default:
            raise APIError(400, message.format(name=name), param=name)


async def guard_stream(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """Turn an error in the middle of a stream into an error event plus [DONE]."""
    try:
        async for e in events:
            yield e
    except APIError as e:
        yield sse(e.body())
        yield sse("[DONE]")
    except ValueError as e:
        yield sse(from_value_error(e).body())
        yield sse("[DONE]")
    except RuntimeError as e:
        logger.exception("stream failed")
        yield sse(APIError(500, str(e), code="internal_error").body())
        yield sse("[DONE]")


def check_stream_options(req: SamplingRequest) -> None:
    """stream_options only shape a stream; like OpenAI and vLLM, refuse them on a plain request."""
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "stream_options is only allowed when stream=true", param="stream_options")
