"""The event log: every change to what runs leaves a record, kept in memory and on disk.

Events are appended to `<state-dir>/events.jsonl` by a background writer (a full disk
delays the record, never a deploy), rotated by size to `events.jsonl.1`, and read back at
start, so ids keep increasing across restarts and rotations and the history survives.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import time
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

import attrs

from deploy_agent.models import rfc3339

_LOGGER = logging.getLogger(__name__)

MEMORY_EVENTS = 1000  # what GET /events can return
FILE_BYTES = 1024 * 1024  # events.jsonl is rotated beyond this
UNWRITTEN_MAX = 10_000  # events waiting for a disk that is full: the oldest go first
WRITE_RETRY_S = 2.0
KEEPALIVE_S = 15.0  # a follow that has had nothing to say this long says an empty line

KINDS = ("deployed", "replaced", "stopped", "crashed", "restarted", "adopted", "removed",
         "deploy_failed", "engine_lost", "engine_back", "vram_overuse", "rescheduled", "pending",
         "idle", "evicted", "preempting", "cache_removed")


@attrs.frozen
class Event:
    """One record: what happened to which service, and why."""

    id: int = attrs.field(metadata={"schema": {"minimum": 1}})
    time: str = attrs.field(metadata={"schema": {"format": "date-time"}})
    service: str | None
    kind: str = attrs.field(metadata={"schema": {"enum": list(KINDS)}})
    reason: str | None
    details: dict[str, Any]

    def line(self) -> str:
        return json.dumps(attrs.asdict(self), separators=(",", ":"))


class EventLog:
    """Recent events in memory (bounded), all of them appended to a rotated file."""

    def __init__(self, state_dir: Path, memory: int = MEMORY_EVENTS, file_bytes: int = FILE_BYTES) -> None:
        self.path = state_dir / "events.jsonl"
        self._file_bytes = file_bytes
        self._recent: collections.deque[Event] = collections.deque(maxlen=memory)
        self._unwritten: collections.deque[Event] = collections.deque(maxlen=UNWRITTEN_MAX)
        self._last_id = 0
        self._new = asyncio.Event()  # replaced on every emit: followers wait on the current one
        self._pending = asyncio.Event()  # something to write
        self.write_error: str | None = None
        self.write_failures = 0

    # -- start-up ------------------------------------------------------------------------

    def load(self) -> None:
        """Read the history back: the last events into memory, the last id for the next."""
        for path in (self.path.with_name(self.path.name + ".1"), self.path):
            try:
                lines = path.read_text(errors="replace").splitlines()
            except OSError:
                continue
            for line in lines:
                event = _parse(line)
                if event is not None and event.id > self._last_id:
                    self._recent.append(event)
                    self._last_id = event.id

    # -- writing -------------------------------------------------------------------------

    def emit(self, kind: str, service: str | None = None, reason: str | None = None,
             **details: Any) -> Event:
        """Record an event now; it is written to disk in the background."""
        self._last_id += 1
        event = Event(id=self._last_id, time=rfc3339(time.time()), service=service, kind=kind,
                      reason=reason, details=details)
        self._recent.append(event)
        self._unwritten.append(event)
        self._pending.set()
        self._new.set()
        self._new = asyncio.Event()
        _LOGGER.debug("Event %s", event.line())
        return event

    async def keep_written(self) -> None:
        """Append what was emitted to the file; on a write error keep it and retry. Runs
        until cancelled, and flushes at close()."""
        while True:
            await self._pending.wait()
            self._pending.clear()
            if not await self.flush():
                await asyncio.sleep(WRITE_RETRY_S)
                self._pending.set()

    async def flush(self) -> bool:
        """Write every unwritten event; False when the disk refused."""
        batch = list(self._unwritten)
        if not batch:
            return True
        try:
            await asyncio.to_thread(self._append, batch)
        except OSError as err:
            self.write_failures += 1
            if self.write_error is None:
                _LOGGER.error("Cannot write %s (%s); events are kept in memory and retried",
                              self.path, err)
            self.write_error = f"{self.path}: {err.strerror or err}"
            return False
        while self._unwritten and self._unwritten[0].id <= batch[-1].id:
            self._unwritten.popleft()
        if self.write_error is not None:
            _LOGGER.info("%s is written again", self.path)
            self.write_error = None
        return True

    def _append(self, batch: list[Event]) -> None:
        data = "".join(event.line() + "\n" for event in batch).encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            size = 0
        if size and size + len(data) > self._file_bytes:
            self.path.replace(self.path.with_name(self.path.name + ".1"))
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)

    # -- reading -------------------------------------------------------------------------

    def since(self, cursor: int | None, limit: int) -> list[Event]:
        """Oldest first: the events after `cursor`, or the latest `limit` without one."""
        if cursor is None:
            return list(self._recent)[-limit:] if limit else []
        return [event for event in self._recent if event.id > cursor][:limit]

    async def follow(self, cursor: int | None, backlog: int) -> AsyncGenerator[str, None]:
        """NDJSON lines: the backlog, then each event as it is emitted, until closed; an
        empty line after KEEPALIVE_S of quiet, so a follower can tell a quiet node from a
        gone one."""
        for event in self.since(cursor, backlog):
            cursor = event.id
            yield event.line() + "\n"
        cursor = self._last_id if cursor is None else cursor
        while True:
            new = self._new
            fresh = self.since(cursor, MEMORY_EVENTS)
            if not fresh:
                try:
                    await asyncio.wait_for(new.wait(), KEEPALIVE_S)
                except TimeoutError:
                    yield "\n"
                continue
            for event in fresh:
                cursor = event.id
                yield event.line() + "\n"


def _parse(line: str) -> Event | None:
    try:
        data = json.loads(line)
        return Event(id=int(data["id"]), time=str(data["time"]), service=data.get("service"),
                     kind=str(data["kind"]), reason=data.get("reason"),
                     details=dict(data.get("details") or {}))
    except (ValueError, KeyError, TypeError):
        return None  # a line cut short by a crash: skipped
