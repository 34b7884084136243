"""Background loops that cannot die silently: each failure is logged, counted, restarted."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable

_LOGGER = logging.getLogger(__name__)

MIN_BACKOFF_S = 0.5
MAX_BACKOFF_S = 30.0
HEALTHY_RUN_S = 60.0  # a loop that ran this long before failing starts its backoff afresh


class Supervisor:
    """Runs the agent's background loops until close(); restarts each one that ends."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()
        self.failures: Counter[str] = Counter()  # per loop, for /metrics

    def start(self, name: str, loop: Callable[[], Awaitable[None]], once: bool = False) -> None:
        """Run `loop` until shutdown, restarted with backoff when it ends or fails; with
        `once`, a job that is done when it returns (and retried only when it raises)."""
        task = asyncio.create_task(self._run(name, loop, once), name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, name: str, loop: Callable[[], Awaitable[None]], once: bool) -> None:
        backoff = MIN_BACKOFF_S
        while True:
            started = time.monotonic()
            try:
                await loop()
                if once:
                    return
                _LOGGER.error("Background task %s ended by itself; restarting it in %.1f s",
                              name, backoff)
            except asyncio.CancelledError:
                raise
            except Exception:
                _LOGGER.exception("Background task %s failed; restarting it in %.1f s",
                                  name, backoff)
            self.failures[name] += 1
            if time.monotonic() - started > HEALTHY_RUN_S:
                backoff = MIN_BACKOFF_S
            await asyncio.sleep(backoff)
            backoff = min(MAX_BACKOFF_S, backoff * 2)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
