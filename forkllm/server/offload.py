"""A small thread pool for the CPU-heavy parts of a request (tokenizing, rendering the chat
template, detokenizing), so the event loop keeps answering /health and feeding streams while a
megabyte prompt is tokenized. The Rust tokenizer releases the GIL, so this is real parallelism
for the biggest cost; template rendering at least yields the loop every switch interval."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")


class Offload:
    def __init__(self, threads: int) -> None:
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="forkllm-offload")

    async def run(self, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        """`fn(*args, **kwargs)` on a pool thread; its exception, if any, is raised here."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))

    def shutdown(self) -> None:
        """Drop queued work and wait for what is running (bounded: one input's tokenization)."""
        self._pool.shutdown(wait=True, cancel_futures=True)
