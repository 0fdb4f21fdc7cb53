"""Graceful shutdown's deadline, shared by the signal handler and every in-flight request.

uvicorn, asked to stop, waits up to its graceful timeout for requests to finish and then cancels
them, which cuts a stream mid-body with neither an error event nor [DONE]. So the server starts
a `Drain` when the signal arrives, due a little before uvicorn's timeout; at that moment every
request still running is ended by the app itself (server/middleware.py): a stream with an
OpenAI-shaped error event and `data: [DONE]`, a request not yet answered with a 503.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable


class Drain:
    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._expired: asyncio.Future[None] | None = None
        self.begun = False

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """At app start-up, on the serving loop."""
        self._loop = loop
        self._expired = loop.create_future()

    def begin(self, seconds: float) -> None:
        """Expire in `seconds`. Safe from any thread (a signal handler calls it); only the first
        call counts."""
        loop = self._loop
        if loop is None or self.begun:
            return
        self.begun = True
        loop.call_soon_threadsafe(loop.call_later, max(seconds, 0.0), self._expire)

    @property
    def expired(self) -> bool:
        return self._expired is not None and self._expired.done()

    def _expire(self) -> None:
        if self._expired is not None and not self._expired.done():
            self._expired.set_result(None)

    async def run(self, call: Awaitable[None]) -> bool:
        """Await `call`; if the deadline comes first, cancel it and return False."""
        expired = self._expired
        if expired is None:
            await call
            return True
        task = asyncio.ensure_future(call)
        try:
            done, _ = await asyncio.wait({task, expired}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # our caller was cancelled: take the request down with it
            task.cancel()
            raise
        if task in done:
            task.result()
            return True
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return False
