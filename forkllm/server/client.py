"""EngineClient: the one interface the server's routes talk to.

Routes never reach into an engine; they see this protocol, so one local engine, or a router
over several replicas, can stand behind the same routes. `LocalEngineClient` is the one-process
implementation over an AsyncEngine and the only place in the server that touches the engine
inside it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol, TypeVar

from forkllm.engine.async_engine import AsyncEngine
from forkllm.engine.events import TreeWatcher
from forkllm.engine.llm_engine import PromptInput
from forkllm.engine.outputs import RequestOutput
from forkllm.engine.policy import TreePolicy
from forkllm.engine.sampling_params import SamplingParams
from forkllm.tokenizer import Tokenizer

R = TypeVar("R")


class EngineClient(Protocol):
    """What serving a model needs from whatever generates: requests, policies, facts, health."""

    @property
    def tokenizer(self) -> Tokenizer | None:
        """None when the model has none (prompts must then be token ids)."""

    @property
    def max_model_len(self) -> int: ...

    @property
    def vocab_size(self) -> int: ...

    @property
    def is_running(self) -> bool:
        """False once shut down or dead: requests get a 503."""

    @property
    def num_waiting(self) -> int:
        """Requests not yet admitted to a running batch (the overload check reads it)."""

    @property
    def pending_tokens(self) -> int:
        """Admitted, unfinished work in tokens (prompt + n x max_tokens per request)."""

    def expected_ttft(self, prompt_tokens: int) -> float | None:
        """Seconds until a new prompt of this many tokens would get its first token; None when
        nothing is ahead of it or there is no estimate (the --max-expected-ttft check reads it)."""

    def generate(
        self,
        prompt: PromptInput,
        params: SamplingParams,
        request_id: str,
        priority: int = 0,
        watch: TreeWatcher | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream one request's outputs; closing the iterator early aborts the request.
        `priority`: lower is scheduled sooner (vLLM's convention); `watch` gets its tree's
        operations (engine/events.py). Raises ValueError for invalid input."""

    def abort(self, request_id: str) -> None: ...

    async def run_policy(self, policy: TreePolicy[R], prompt_ids: list[int], question: str) -> R:
        """Run a tree policy (a scaling strategy, a thread tree) to its end; cancelling stops it."""

    def tokenize_prompt(self, prompt: PromptInput) -> tuple[str | None, list[int]]:
        """Text, token ids or {"prompt"/"prompt_token_ids": ...} -> (text or None, checked ids).
        Raises ValueError naming what is wrong."""

    def metrics(self) -> dict[str, float]:
        """A snapshot of the engine gauges (running/waiting sequences, KV pages, ...)."""

    def shutdown(self) -> None: ...

    def describe(self) -> str:
        """One line for logs: model, dtype, KV cache, context length."""


class LocalEngineClient:
    """An EngineClient over one in-process AsyncEngine."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._async = engine
        self._engine = engine.engine  # read-only facts: tokenizer, limits, prompt checks

    @property
    def tokenizer(self) -> Tokenizer | None:
        return self._engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self._engine.max_model_len

    @property
    def vocab_size(self) -> int:
        return self._engine.model_config.vocab_size

    @property
    def is_running(self) -> bool:
        return self._async.is_running

    @property
    def num_waiting(self) -> int:
        return self._async.num_waiting

    @property
    def pending_tokens(self) -> int:
        return self._async.pending_tokens

    def expected_ttft(self, prompt_tokens: int) -> float | None:
        return self._async.expected_ttft(prompt_tokens)

    def generate(
        self,
        prompt: PromptInput,
        params: SamplingParams,
        request_id: str,
        priority: int = 0,
        watch: TreeWatcher | None = None,
    ) -> AsyncIterator[RequestOutput]:
        return self._async.generate(prompt, params, request_id, priority, watch)

    def abort(self, request_id: str) -> None:
        self._async.abort(request_id)

    async def run_policy(self, policy: TreePolicy[R], prompt_ids: list[int], question: str) -> R:
        return await self._async.run_policy(policy, prompt_ids, question)

    def tokenize_prompt(self, prompt: PromptInput) -> tuple[str | None, list[int]]:
        return self._engine.tokenize_prompt(prompt)

    def metrics(self) -> dict[str, float]:
        return self._async.metrics_snapshot

    def shutdown(self) -> None:
        self._async.shutdown()

    def describe(self) -> str:
        return self._engine.describe()


def as_client(engine: EngineClient | AsyncEngine) -> EngineClient:
    """Callers may still hand the server a bare AsyncEngine; wrap it."""
    return LocalEngineClient(engine) if isinstance(engine, AsyncEngine) else engine
