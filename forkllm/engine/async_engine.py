"""AsyncEngine: one background thread steps the LLMEngine; asyncio callers stream outputs.

The engine is not thread-safe, so only the engine thread touches it: callers validate and
tokenize a request in their own thread (pure), then hand it over through a command queue, as
they do aborts. Outputs travel back through one asyncio.Queue per request. A caller that stops
iterating (client gone, task cancelled) aborts its request; the engine thread applies the abort
before its next step, so the pages are free within one step.

The loop steps while requests are unfinished, and also while a tree policy is driven with none:
a policy whose tree ended outside a step (pruned by its own budget) gets its next call at once,
as under `run_policies`, instead of waiting for someone else's request to wake the loop; if it
still neither finishes nor asks for work it is stalled and fails. Only with no request and no
policy does the loop sleep (`num_idle_waits` counts those sleeps). The metrics snapshot is
published when a batch is scheduled as well as after the step, so /metrics shows a long step's
batch while it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TypeVar

from forkllm.engine.events import TreeWatcher
from forkllm.engine.inputs import PromptInput
from forkllm.engine.llm_engine import LLMEngine
from forkllm.engine.outputs import RequestOutput
from forkllm.engine.policy import (
    PolicyHandle,
    TreePolicy,
    drive,
    driven_policies,
    fail_policies,
    fail_stalled,
)
from forkllm.engine.sampling_params import SamplingParams
from forkllm.engine.sequence import Request
from forkllm.engine.step_cost import FirstTokenLoad

R = TypeVar("R")

logger = logging.getLogger("forkllm")


class EngineDeadError(RuntimeError):
    pass


@dataclass(frozen=True)
class AddRequest:
    request: Request


@dataclass(frozen=True)
class AbortRequest:
    request_id: str


@dataclass(frozen=True)
class CallOnEngine:
    fn: Callable[[LLMEngine], None]


Command = AddRequest | AbortRequest | CallOnEngine


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestOutput | BaseException]


def request_work(req: Request, max_model_len: int) -> int:
    """A request's whole cost in tokens: its prompt plus n times the most it may generate."""
    prompt = len(req.prompt_token_ids)
    max_new = req.params.max_tokens or max(0, max_model_len - prompt)
    return prompt + req.params.n * max_new


class AsyncEngine:
    def __init__(self, engine: LLMEngine, start: bool = True) -> None:
        self.engine = engine
        self._commands: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._pending_work: dict[str, int] = {}  # request id -> request_work, until it ends
        # request id -> prompt tokens, from hand-over until the engine thread takes it in
        self._queued_prompts: dict[str, int] = {}
        self._streams_lock = threading.Lock()
        self._ids = itertools.count()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.errored: BaseException | None = None
        # engine.metrics() as of the last step, published by the engine thread (readers never
        # touch engine state from another thread).
        self.metrics_snapshot: dict[str, float] = engine.metrics()
        # engine.first_token_load() as of the last step, published with the metrics (expected_ttft)
        self.first_token_load: FirstTokenLoad = engine.first_token_load()
        engine.on_batch_scheduled = self._publish_metrics
        self.num_idle_waits = 0  # times the loop slept with nothing to do (tests count them)
        # Requests handed over / taken in by the engine thread: each counter has one writer.
        self._handed_over = 0
        self._taken_in = 0
        if start:
            self.start()

    # ---- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="forkllm-engine", daemon=True)
            self._thread.start()

    def shutdown(self, timeout: float | None = 10.0) -> None:
        """Stop the loop; requests still in flight get an EngineDeadError."""
        self._stop = True
        self._wakeup.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ---- requests -----------------------------------------------------------------------------
    async def generate(
        self,
        prompt: PromptInput,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        priority: int = 0,
        watch: TreeWatcher | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream RequestOutputs for one request (their shape follows params.output_kind).
        `priority`: lower is scheduled sooner. `watch` is called on the engine's thread with the
        request's tree operations (engine/events.py).

        Raises ValueError at once for invalid input; the engine keeps serving others."""
        if not self.is_running:
            raise EngineDeadError("the engine loop is not running")
        rid = request_id or f"areq-{next(self._ids)}"
        req = self.engine.make_request(prompt, params, rid, priority=priority)
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        with self._streams_lock:
            if rid in self._streams:
                raise ValueError(f"request_id {rid!r} is already in use")
            self._streams[rid] = stream
            self._pending_work[rid] = request_work(req, self.engine.max_model_len)
            self._queued_prompts[rid] = len(req.prompt_token_ids)
        if watch is not None:
            self._commands.put(CallOnEngine(lambda engine: engine.watch(rid, watch)))
        self._commands.put(AddRequest(req))
        self._handed_over += 1
        self._wakeup.set()
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    break
        finally:
            with self._streams_lock:
                self._streams.pop(rid, None)
                self._pending_work.pop(rid, None)
                self._queued_prompts.pop(rid, None)
            if not finished:
                self.abort(rid)

    @property
    def num_waiting(self) -> int:
        """Requests not yet admitted to the running batch (queued here plus the engine's waiting)."""
        return self._handed_over - self._taken_in + int(self.metrics_snapshot.get("waiting_seqs", 0))

    @property
    def pending_tokens(self) -> int:
        """Work admitted and not finished, in tokens: each streaming request's prompt plus n times
        its max_tokens (the server's --max-pending-tokens admission reads it)."""
        with self._streams_lock:
            return sum(self._pending_work.values())

    def expected_ttft(self, prompt_tokens: int) -> float | None:
        """Seconds until a new prompt of this many tokens would get its first token, at this
        machine's measured step speed; None while nothing is ahead of it (it starts at once) or
        before the engine has timed enough steps (the server's --max-expected-ttft reads it)."""
        load = self.first_token_load
        with self._streams_lock:
            queued = float(sum(self._queued_prompts.values()))
        if load.ahead + queued <= 0:
            return None
        return load.expected_ttft(float(prompt_tokens), queued)

    def abort(self, request_id: str) -> None:
        self._commands.put(AbortRequest(request_id))
        self._wakeup.set()

    async def run_policy(self, policy: TreePolicy[R], prompt_ids: list[int], question: str = "") -> R:
        """Run a tree policy on the engine thread (its sequences join every step's batch) with the
        same driver as the synchronous engine; returns its result. Cancelling the caller stops
        the policy and frees its pages."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[R] = loop.create_future()
        handle: list[PolicyHandle[R]] = []

        def settle(outcome: R | BaseException) -> None:
            if fut.done():
                return
            if isinstance(outcome, BaseException):
                fut.set_exception(outcome)
            else:
                fut.set_result(outcome)

        def report(outcome: R | BaseException) -> None:
            with contextlib.suppress(RuntimeError):  # the caller's event loop is closed
                loop.call_soon_threadsafe(settle, outcome)

        def start(engine: LLMEngine) -> None:
            try:
                handle.append(drive(engine, policy, prompt_ids, question, report))
            except BaseException as e:
                report(e)

        def stop(engine: LLMEngine) -> None:
            if handle:
                handle[0].cancel(engine)

        self.call(start)
        try:
            return await fut
        except asyncio.CancelledError:
            self.call(stop)
            raise

    def call(self, fn: Callable[[LLMEngine], None]) -> None:
        """Run fn(engine) on the engine thread before its next step (tree operations, stats)."""
        self._commands.put(CallOnEngine(fn))
        self._wakeup.set()

    # ---- the engine thread --------------------------------------------------------------------
    def _apply_commands(self) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            try:
                if isinstance(cmd, AddRequest):
                    self._taken_in += 1
                    with self._streams_lock:
                        self._queued_prompts.pop(cmd.request.request_id, None)
                    self.engine.add_prepared(cmd.request)
                elif isinstance(cmd, AbortRequest):
                    self.engine.abort_request(cmd.request_id)
                else:
                    cmd.fn(self.engine)
            except Exception as e:  # a bad command fails its own request only
                logger.exception("engine command %s failed", type(cmd).__name__)
                if isinstance(cmd, AddRequest):
                    self._deliver_error(cmd.request.request_id, e)

    def _loop(self) -> None:
        engine = self.engine
        while not self._stop:
            self._apply_commands()
            idle = not engine.has_unfinished_requests()
            if idle and not driven_policies(engine):
                self._publish_metrics(engine)
                self.num_idle_waits += 1
                self._wakeup.wait(timeout=1.0)
                self._wakeup.clear()
                continue
            try:
                outputs = engine.step()  # runs the policies' hooks even when nothing is scheduled
                if idle and not engine.has_unfinished_requests():
                    fail_stalled(engine)
            except Exception as e:
                # Fail the requests of this step, keep the loop alive for everyone else.
                logger.exception("engine step failed; aborting the requests in flight")
                failed = list(engine.requests)
                engine.abort_request(failed)
                for rid in failed:
                    self._deliver_error(rid, RuntimeError(f"internal engine error: {e}"))
                continue
            self._publish_metrics(engine)
            for out in outputs:
                self._deliver(out.request_id, out)
        dead = EngineDeadError("the engine was shut down")
        fail_policies(engine, dead)
        with self._streams_lock:
            rids = list(self._streams)
        for rid in rids:
            self._deliver_error(rid, dead)

    def _publish_metrics(self, engine: LLMEngine) -> None:
        """Engine thread only: readers take the snapshot, never the engine's state."""
        self.metrics_snapshot = engine.metrics()
        self.first_token_load = engine.first_token_load()

    def _deliver(self, rid: str, item: RequestOutput | BaseException) -> None:
        with self._streams_lock:
            stream = self._streams.get(rid)
        if stream is not None:
            with contextlib.suppress(RuntimeError):  # RuntimeError: the caller's event loop is closed
                stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)

    def _deliver_error(self, rid: str, err: BaseException) -> None:
        self._deliver(rid, err)
