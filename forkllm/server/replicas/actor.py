"""One engine replica as a Ray actor: an AsyncEngine with its own model and KV cache, driven on
the actor's event loop. Outputs stream back one RequestOutput per item of a Ray streaming
generator (nothing is buffered whole), with its tree events between them when watched;
cancelling the generator, or `abort`, aborts the request in the engine. A policy streams too:
the calls of its callbacks, collected here (replicas/callbacks.py), then its result; cancelling
that generator stops the policy and frees its tree."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from typing import Any

from forkllm.engine.async_engine import AsyncEngine
from forkllm.engine.config import EngineConfig
from forkllm.engine.events import TreeEvent
from forkllm.engine.inputs import PromptInput
from forkllm.engine.llm_engine import LLMEngine
from forkllm.engine.outputs import RequestOutput
from forkllm.engine.policy import TreePolicy
from forkllm.engine.sampling_params import SamplingParams
from forkllm.server.replicas.callbacks import Path, PolicyEvents, PolicyResult, install


class EngineReplica:
    """The actor's class (replicas/client.py wraps it with `ray.remote` and its resources)."""

    def __init__(self, engine_kwargs: dict[str, Any], index: int, threads: int | None) -> None:
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.index = index
        self.engine = AsyncEngine(LLMEngine(EngineConfig(**engine_kwargs)))

    def info(self) -> dict[str, Any]:
        """What the front end needs to validate and render requests without a model."""
        e = self.engine.engine
        return {
            "tokenizer": e.tokenizer,
            "vocab_size": e.model_config.vocab_size,
            "max_model_len": e.max_model_len,
            "eos_token_ids": list(e.eos_token_ids),
            "describe": e.describe(),
            "pid": os.getpid(),
        }

    async def generate(
        self, prompt: PromptInput, params: SamplingParams, request_id: str, priority: int, watch: bool = False
    ) -> AsyncIterator[RequestOutput | list[TreeEvent]]:
        """The request's outputs; with `watch`, its tree events too, as lists between them in
        the order they happened (an engine step reports its events before its outputs)."""
        if not watch:
            async for out in self.engine.generate(prompt, params, request_id, priority):
                yield out
            return
        loop = asyncio.get_running_loop()
        events: list[TreeEvent] = []

        def feed(event: TreeEvent) -> None:  # on the engine's thread
            loop.call_soon_threadsafe(events.append, event)

        def take() -> list[TreeEvent]:
            # taken before the yield: events appended while the consumer holds it are kept
            batch = events[:]
            events.clear()
            return batch

        async for out in self.engine.generate(prompt, params, request_id, priority, feed):
            if events:
                yield take()
            yield out
        await asyncio.sleep(0)  # events handed over with the last output
        if events:
            yield take()

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)

    async def run_policy(
        self, policy: TreePolicy[Any], prompt_ids: list[int], question: str, paths: list[Path] | None = None
    ) -> AsyncIterator[PolicyEvents | PolicyResult]:
        """The policy's result, last; before it, batches of the calls made to collectors put in
        place of its callbacks at `paths` (stripped by the client), in the order they happened."""
        loop = asyncio.get_running_loop()
        calls: list[tuple[int, Any]] = []
        arrived = asyncio.Event()

        def put(call: tuple[int, Any]) -> None:
            calls.append(call)
            arrived.set()

        def sink(k: int, event: Any) -> None:  # on the engine's thread, before the result
            loop.call_soon_threadsafe(put, (k, event))

        def take() -> PolicyEvents:
            batch = PolicyEvents(calls[:])
            calls.clear()
            return batch

        install(policy, paths or [], sink)
        task = asyncio.ensure_future(self.engine.run_policy(policy, prompt_ids, question))
        woken = asyncio.ensure_future(arrived.wait())
        try:
            while not task.done():
                await asyncio.wait({task, woken}, return_when=asyncio.FIRST_COMPLETED)
                if woken.done():
                    arrived.clear()
                    woken = asyncio.ensure_future(arrived.wait())
                if calls:
                    yield take()
            if calls:  # those made just before the result was settled
                yield take()
            yield PolicyResult(task.result())
        finally:
            woken.cancel()
            if not task.done():  # cancelled (the client left): stop the policy, free its tree
                task.cancel()

    def metrics(self) -> dict[str, float]:
        return dict(self.engine.metrics_snapshot)

    def load(self) -> dict[str, int]:
        return {"waiting": self.engine.num_waiting, "pending_tokens": self.engine.pending_tokens}

    def healthy(self) -> bool:
        return self.engine.is_running

    def shutdown(self) -> None:
        self.engine.shutdown()
