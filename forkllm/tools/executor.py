"""ToolExecutor: runs tool calls off the engine's thread, several at once, each under a deadline.

A call is submitted the moment its sequence closes it (the engine keeps stepping); plain callables
run on a thread pool, coroutine functions on one event loop in a background thread. A call's
outcome is always a `ToolCallRecord` with text the model can read: the tool's return value
(a string as is, anything else as JSON), or an error message when the tool raised, timed out, or
was never found. Nothing a tool does reaches the engine's thread as an exception.

Threads cannot be killed: a timed-out synchronous tool keeps its worker until it returns, and its
late result is dropped. The pool is sized for that (`max_workers`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import inspect
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ToolCallRecord:
    """One tool call of one sequence: what the model asked, what the tool answered, and when."""

    call_id: str
    name: str
    arguments: dict[str, Any]
    round: int  # which assistant message (0-based) made the call
    submitted: float  # time.perf_counter() when the engine dispatched it
    started: float | None = None  # when the tool began running (in its worker)
    finished: float | None = None  # when its outcome was known (returned, raised, or timed out)
    result: str | None = None  # the text given to the model as the tool's message
    error: str | None = None  # set when the tool raised, timed out, or could not be called
    timed_out: bool = False
    future: cf.Future[Any] | None = field(default=None, repr=False)
    deadline: float | None = field(default=None, repr=False)

    @property
    def done(self) -> bool:
        return self.result is not None

    @property
    def seconds(self) -> float | None:
        if self.started is None or self.finished is None:
            return None
        return self.finished - self.started

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.call_id,
            "name": self.name,
            "arguments": self.arguments,
            "round": self.round,
            "result": self.result,
            "error": self.error,
            "timed_out": self.timed_out,
            "seconds": self.seconds,  # how long it ran (till it returned, raised or timed out)
        }


def _is_async(fn: Callable[..., Any]) -> bool:
    """A coroutine function (or an object whose __call__ is one)."""
    if inspect.iscoroutinefunction(fn):
        return True
    return not inspect.isroutine(fn) and inspect.iscoroutinefunction(type(fn).__call__)


def result_text(value: Any) -> str:
    """What the model reads for a tool's return value."""
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return str(value)


def error_text(message: str) -> str:
    return json.dumps({"error": message}, ensure_ascii=False)


class ToolExecutor:
    """Runs tool calls concurrently. One per LLM (or per server); safe to share between policies.

    `completions` counts settled calls, and `wait_for_completion` blocks until it moves: a policy
    whose sequences all wait on tools, with nothing else to run, waits there instead of spinning
    the engine's loop."""

    def __init__(self, max_workers: int = 32) -> None:
        self.max_workers = max_workers
        self._pool: cf.ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self.completions = 0

    # ---- submitting ----------------------------------------------------------------------------
    def submit(
        self,
        fn: Callable[..., Any] | None,
        record: ToolCallRecord,
        timeout: float | None,
        unknown: str = "",
    ) -> ToolCallRecord:
        """Start `fn(**record.arguments)` now; `record` receives its outcome. `fn` None: the call
        names no registered tool, and `unknown` is the error the model reads."""
        record.deadline = None if timeout is None else record.submitted + timeout
        if fn is None:
            now = time.perf_counter()
            record.started = record.finished = now
            self._settle(record, None, unknown or f"unknown tool {record.name!r}")
            return record
        if _is_async(fn):
            fut: cf.Future[Any] = asyncio.run_coroutine_threadsafe(
                self._run_async(fn, record), self._event_loop()
            )
        else:
            fut = self._thread_pool().submit(self._run_sync, fn, record)
        record.future = fut
        return record

    def _run_sync(self, fn: Callable[..., Any], record: ToolCallRecord) -> None:
        record.started = time.perf_counter()
        try:
            value = fn(**record.arguments)
        except Exception as e:
            self._settle(record, None, f"{type(e).__name__}: {e}")
        else:
            self._settle(record, value, None)

    async def _run_async(self, fn: Callable[..., Any], record: ToolCallRecord) -> None:
        record.started = time.perf_counter()
        try:
            value = await fn(**record.arguments)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self._settle(record, None, f"{type(e).__name__}: {e}")
        else:
            self._settle(record, value, None)

    def _settle(self, record: ToolCallRecord, value: Any, error: str | None) -> None:
        """Record an outcome once (a timeout may have settled the call already)."""
        now = time.perf_counter()
        with self._lock:
            if record.result is not None:
                return
            record.finished = now
            if error is None:
                try:
                    record.result = result_text(value)
                except Exception as e:  # a __str__ that raises
                    error = f"{type(e).__name__} while formatting the result: {e}"
            if error is not None:
                record.error = error
                record.result = error_text(error)
            self.completions += 1
            self._changed.notify_all()

    # ---- deadlines and waiting -----------------------------------------------------------------
    def expire(self, record: ToolCallRecord, now: float | None = None) -> bool:
        """Settle a call past its deadline as a timeout (True if it just timed out)."""
        if record.done or record.deadline is None:
            return False
        now = time.perf_counter() if now is None else now
        if now < record.deadline:
            return False
        timeout = record.deadline - record.submitted
        with self._lock:
            if record.result is not None:
                return False
            record.timed_out = True
            record.finished = now
            record.error = f"timed out after {timeout:g}s"
            record.result = error_text(record.error)
            self.completions += 1
            self._changed.notify_all()
        if record.future is not None:
            record.future.cancel()  # stops a coroutine; a running thread finishes on its own
        return True

    def cancel(self, record: ToolCallRecord) -> None:
        """The caller went away: drop the call (a coroutine is cancelled; a thread runs out)."""
        if record.future is not None and not record.done:
            record.future.cancel()

    def wait_for_completion(self, seen: int, timeout: float) -> int:
        """Block until more than `seen` calls have settled, or `timeout` seconds; returns the
        count now."""
        with self._changed:
            if self.completions == seen:
                self._changed.wait(timeout)
            return self.completions

    # ---- resources -----------------------------------------------------------------------------
    def _thread_pool(self) -> cf.ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = cf.ThreadPoolExecutor(self.max_workers, thread_name_prefix="forkllm-tool")
            return self._pool

    def _event_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name="forkllm-tool-loop", daemon=True)
                thread.start()
                self._loop, self._loop_thread = loop, thread
            return self._loop

    def shutdown(self) -> None:
        with self._lock:
            pool, loop, thread = self._pool, self._loop, self._loop_thread
            self._pool = self._loop = self._loop_thread = None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        if loop is not None and thread is not None:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(5)
            loop.close()
