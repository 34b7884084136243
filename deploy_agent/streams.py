"""Open follows (logs, events): a cap, and a watch that ends each one when its client leaves.

aiohttp does not cancel a handler when its client disconnects (the daemon's runner keeps
handler_cancellation off, so a deploy outlives a caller that left), and a follow of a
quiet service never writes, so it would never notice. One watcher looks at every open
stream's connection a few times a second instead.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator

import attrs
from aiohttp import web

from deploy_agent.errors import TooManyStreams

WATCH_INTERVAL_S = 0.2


@attrs.define(eq=False)  # identity: one per open follow
class _Follow:
    request: web.BaseRequest
    gone: asyncio.Event = attrs.field(factory=asyncio.Event)


class Streams:
    """The follows that are open now; at most `cap` at once."""

    def __init__(self, cap: int) -> None:
        self._cap = cap
        self._open: set[_Follow] = set()
        self.refused = 0  # for /metrics

    @property
    def count(self) -> int:
        return len(self._open)

    @contextlib.asynccontextmanager
    async def opened(self, request: web.BaseRequest) -> AsyncIterator[asyncio.Event]:
        """A slot for one follow; the event is set when its client leaves or the agent stops.

        TooManyStreams (429) when all `cap` slots are taken.
        """
        if len(self._open) >= self._cap:
            self.refused += 1
            raise TooManyStreams(f"This agent already serves {self._cap} follows (--max-streams); "
                                 "close one, or read without follow.", max_streams=self._cap)
        follow = _Follow(request)
        self._open.add(follow)
        try:
            yield follow.gone
        finally:
            self._open.discard(follow)

    async def watch(self) -> None:
        """Set the event of every stream whose client has disconnected; runs until cancelled."""
        while True:
            await asyncio.sleep(WATCH_INTERVAL_S)
            for follow in self._open:
                transport = follow.request.transport
                if transport is None or transport.is_closing():
                    follow.gone.set()

    def end_all(self) -> None:
        """At shutdown: end every follow, so the server need not wait out its timeout."""
        for follow in self._open:
            follow.gone.set()


async def relay(response: web.StreamResponse, chunks: AsyncGenerator[str, None],
                gone: asyncio.Event) -> None:
    """Write chunks until they end or the client leaves; the source is closed either way,
    which gives its engine connection back at once."""

    async def copy() -> None:
        async for chunk in chunks:
            await response.write(chunk.encode())

    copying = asyncio.ensure_future(copy())
    leaving = asyncio.ensure_future(gone.wait())
    try:
        await asyncio.wait({copying, leaving}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (copying, leaving):
            task.cancel()
        await asyncio.gather(copying, leaving, return_exceptions=True)
        await chunks.aclose()
