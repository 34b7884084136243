"""Tests for deploy_agent.state: services.json written whole, by one writer at a time."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pytest

from deploy_agent.convert import make_converter
from deploy_agent.state import Abandoned, SavedState, StateFile

CONVERTER = make_converter()
T = TypeVar("T")


def saved(tag: str) -> SavedState:
    """A state big enough that writing it takes a while, told apart by `tag`."""
    return SavedState(services=[], abandoned=[Abandoned(attempt=f"{tag}-{i}", name=tag, since=0.0)
                                              for i in range(500)])


def names(directory: Path) -> list[str]:
    return sorted(entry.name for entry in directory.iterdir())


class LateFirstJob(ThreadPoolExecutor):
    """An executor that starts the first job it is given late, like a thread scheduled last."""

    def __init__(self) -> None:
        super().__init__(max_workers=4)
        self._first = True

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        if not self._first:
            return super().submit(fn, *args, **kwargs)
        self._first = False

        def late(*args: Any, **kwargs: Any) -> T:
            time.sleep(0.2)
            return fn(*args, **kwargs)

        return super().submit(late, *args, **kwargs)


class TestInterleavedWrites:
    """Writes cancelled mid-flight never interleave: the last state saved is what the file holds."""

    async def test_cancelled_writes_leave_the_last_state_whole(self, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
        real_fsync = os.fsync

        def slow_fsync(fd: int) -> None:
            time.sleep(0.02)  # a slow disk: each write is still in its thread when cancelled
            real_fsync(fd)

        monkeypatch.setattr(os, "fsync", slow_fsync)  # what deploy_agent.state calls
        state_file = StateFile(tmp_path, CONVERTER)
        cancelled: list[asyncio.Task[None]] = []
        for round_ in range(6):
            writes = [asyncio.create_task(state_file.save(saved(f"r{round_}w{i}"))) for i in range(3)]
            await asyncio.sleep(0.01)  # the first of them is writing now
            for write in writes:
                write.cancel()
            cancelled += writes
        await asyncio.gather(*cancelled, return_exceptions=True)
        await state_file.save(saved("last"))
        await asyncio.get_running_loop().shutdown_default_executor()  # every write's thread is done
        assert StateFile(tmp_path, CONVERTER).load() == saved("last")
        assert names(tmp_path) == ["services.json"]  # no temp file left behind

    async def test_a_write_finishing_late_never_replaces_a_later_one(self, tmp_path: Path) -> None:
        loop = asyncio.get_running_loop()
        loop.set_default_executor(LateFirstJob())
        state_file = StateFile(tmp_path, CONVERTER)
        older = asyncio.create_task(state_file.save(saved("older")))
        await asyncio.sleep(0.05)  # its thread is under way, and late
        older.cancel()  # as at shutdown: the asyncio task goes, the thread writes on
        await asyncio.gather(older, return_exceptions=True)
        await state_file.save(saved("newer"))
        await loop.shutdown_default_executor()
        assert StateFile(tmp_path, CONVERTER).load() == saved("newer")
        assert names(tmp_path) == ["services.json"]

    async def test_failed_write_leaves_no_temp_file(self, tmp_path: Path) -> None:
        state_file = StateFile(tmp_path, CONVERTER)
        (tmp_path / "services.json").mkdir()  # it can't be replaced
        with pytest.raises(OSError):
            await state_file.save(saved("a"))
        assert names(tmp_path) == ["services.json"]
        (tmp_path / "services.json").rmdir()
        await state_file.save(saved("b"))
        assert (tmp_path / "services.json").stat().st_mode & 0o777 == 0o600

    async def test_temp_files_of_a_crash_are_removed_at_load(self, tmp_path: Path) -> None:
        state_file = StateFile(tmp_path, CONVERTER)
        await state_file.save(saved("a"))
        (tmp_path / ".services.json.k1ll3d.tmp").write_text("{")  # a write the process died in
        assert state_file.load() == saved("a")
        assert names(tmp_path) == ["services.json"]


def test_a_services_json_written_before_cold_starts_loads_whole(tmp_path: Path) -> None:
    """An agent upgraded from one that recorded `deploy_s` keeps its services and leases
    (the field is dropped), instead of setting the file aside as unreadable."""
    import json

    from deploy_agent.state import FORMAT_VERSION, StateFile
    spec = {"name": "svc", "image": "img:1", "port": 8000, "gpu": False, "vram_gb": 0.0, "env": {},
            "volumes": [], "health": "/health", "ready_timeout": 60.0}
    (tmp_path / "services.json").write_text(json.dumps({
        "version": FORMAT_VERSION,
        "services": [{"spec": spec, "container_id": "c1", "host_port": 8000, "status": "healthy",
                      "started_at": 1.0, "pinned": False, "deploy_s": 2.5, "attempt": "a1"}],
        "leases": [{"id": "l1", "service": "svc", "lease_s": 60.0, "expires_at": 2e9}]}))
    loaded = StateFile(tmp_path, make_converter()).load()
    assert loaded is not None
    assert [s.spec.name for s in loaded.services] == ["svc"] and loaded.services[0].cold_start is None
    assert [lease.id for lease in loaded.leases] == ["l1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["services.json"]  # nothing set aside
