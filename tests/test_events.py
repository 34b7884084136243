"""Tests for deploy_agent.events: the log's memory bound, its file, rotation and restarts."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from deploy_agent.events import EventLog


class TestEventLog:
    """Recent events in memory, all of them on disk; ids increase across restarts."""

    async def test_since_limit_and_order(self, tmp_path: Path) -> None:
        log = EventLog(tmp_path)
        for index in range(5):
            log.emit("deployed", f"s{index}")
        assert [e.id for e in log.since(None, 3)] == [3, 4, 5]
        assert [e.id for e in log.since(2, 2)] == [3, 4]
        assert log.since(5, 10) == [] and log.since(None, 0) == []

    async def test_memory_is_bounded(self, tmp_path: Path) -> None:
        log = EventLog(tmp_path, memory=10)
        for _ in range(25):
            log.emit("crashed", "s")
        assert [e.id for e in log.since(None, 100)] == list(range(16, 26))

    async def test_file_rotates_and_ids_survive_a_restart(self, tmp_path: Path) -> None:
        log = EventLog(tmp_path, file_bytes=2000)
        for index in range(40):
            log.emit("deployed", f"service-{index}", image="img:1")
            assert await log.flush()
        current, rotated = tmp_path / "events.jsonl", tmp_path / "events.jsonl.1"
        assert rotated.exists() and current.stat().st_size <= 2000 and rotated.stat().st_size <= 2000
        last_on_disk = json.loads(current.read_text().splitlines()[-1])["id"]
        assert last_on_disk == 40

        again = EventLog(tmp_path, file_bytes=2000)
        again.load()
        assert again.since(None, 1)[0].id == 40
        assert again.emit("stopped", "service-0", "request").id == 41  # no id is reused

    async def test_ids_survive_even_right_after_a_rotation(self, tmp_path: Path) -> None:
        log = EventLog(tmp_path)
        log.emit("deployed", "a")
        await log.flush()
        (tmp_path / "events.jsonl").replace(tmp_path / "events.jsonl.1")  # rotated, nothing new yet
        again = EventLog(tmp_path)
        again.load()
        assert again.emit("deployed", "b").id == 2

    async def test_a_line_cut_short_is_skipped(self, tmp_path: Path) -> None:
        log = EventLog(tmp_path)
        log.emit("deployed", "a")
        await log.flush()
        with (tmp_path / "events.jsonl").open("a") as out:
            out.write('{"id": 2, "time": "x", "kin')  # the agent died mid-write
        again = EventLog(tmp_path)
        again.load()
        assert [e.service for e in again.since(None, 10)] == ["a"]

    async def test_full_disk_keeps_events_and_retries(self, tmp_path: Path) -> None:
        blocked = tmp_path / "state"
        blocked.mkdir()
        (blocked / "events.jsonl").mkdir()  # appends fail, as on a full disk
        log = EventLog(blocked)
        log.emit("deployed", "a")
        assert not await log.flush()
        assert log.write_error is not None and log.write_failures == 1
        assert [e.service for e in log.since(None, 10)] == ["a"]  # still served
        (blocked / "events.jsonl").rmdir()
        log.emit("stopped", "a", "request")
        assert await log.flush() and log.write_error is None
        lines = (blocked / "events.jsonl").read_text().splitlines()
        assert [json.loads(line)["kind"] for line in lines] == ["deployed", "stopped"]

    async def test_follow_gives_backlog_then_new_events(self, tmp_path: Path) -> None:
        log = EventLog(tmp_path)
        log.emit("deployed", "a")
        follower = log.follow(None, 10)
        assert json.loads(await anext(follower))["service"] == "a"
        waiting = asyncio.ensure_future(anext(follower))
        await asyncio.sleep(0.01)
        assert not waiting.done()
        log.emit("stopped", "a", "request")
        assert json.loads(await asyncio.wait_for(waiting, 1))["kind"] == "stopped"
        await follower.aclose()


async def test_a_quiet_follow_says_an_empty_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """So a follower can tell a quiet node from one that died without closing the connection."""
    import deploy_agent.events

    monkeypatch.setattr(deploy_agent.events, "KEEPALIVE_S", 0.05)
    log = EventLog(tmp_path)
    follower = log.follow(None, 10)
    assert await asyncio.wait_for(anext(follower), 2) == "\n"
    await follower.aclose()
