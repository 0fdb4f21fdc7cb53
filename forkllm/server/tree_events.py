"""`"tree_events": true` on a streamed chat request (forkllm extension): the engine's operations
on the request's generation tree (engine/events.py) stream as extra chunks with no choices and a
`tree_event` object, in the order they happened, interleaved with the content chunks: what the
web page draws its live tree from. Plain requests (n samples), tool calls, scaling strategies and
thread trees all have one.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from dataclasses import asdict
from typing import Any

from forkllm.engine.events import TreeEvent
from forkllm.server.responses import Envelope, sse


class TreeEventFeed:
    """A TreeWatcher (called on the engine's thread) that hands each event to the request's event
    loop; the route drains it into the response between its own chunks."""

    def __init__(self, env: Envelope) -> None:
        self.env = env
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[TreeEvent] = asyncio.Queue()

    def __call__(self, event: TreeEvent) -> None:
        with contextlib.suppress(RuntimeError):  # the stream's loop is gone
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    def chunk(self, event: TreeEvent) -> str:
        head = self.env.head(self.env.chunk_object)
        return sse({**head, "choices": [], "tree_event": event_json(event)})

    def drain(self) -> list[str]:
        """The chunks of every event that has arrived. An engine step reports its tree events
        before its outputs, so draining before a content chunk keeps the order they happened in."""
        chunks = []
        while not self.queue.empty():
            chunks.append(self.chunk(self.queue.get_nowait()))
        return chunks


def event_json(event: TreeEvent) -> dict[str, Any]:
    """The event as JSON, unset fields left out; a score of +-inf (a reward that rules a particle
    out) is null, since JSON has no infinity."""
    body = {k: v for k, v in asdict(event).items() if v is not None and v != {}}
    if event.value is not None and not math.isfinite(event.value):
        body["value"] = None
    return body
