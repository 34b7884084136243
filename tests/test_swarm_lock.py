"""The swarm's one agent lock, against a small fake of the engine's config calls.

The fake yields to the loop in every call, as the engine does, so that agents started
together interleave their reads and writes. tests/test_swarm.py runs the same rules
against a real swarm.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import attrs
import pytest

from deploy_agent.backends.swarm.lock import (
    HOLDER_FILE,
    LOCK_CONFIG,
    STALE_BEATS,
    WATCH_BEATS,
    SwarmLock,
)
from deploy_agent.errors import SwarmTaken

BEAT_S = 0.05
BOUND_S = 10  # a bound on waits that must end, never a timing: CI machines are loaded
POLL_S = BEAT_S / 5
LOCK_LOGGER = "deploy_agent.backends.swarm.lock"


async def at_once(take: Awaitable[None], caplog: pytest.LogCaptureFixture) -> None:
    """Await `take` and check it decided without watching the lock for a silent holder."""
    caplog.set_level(logging.INFO, LOCK_LOGGER)
    before = len(caplog.records)
    try:
        await asyncio.wait_for(take, BOUND_S)
    finally:
        watched = [r.getMessage() for r in caplog.records[before:] if "looks abandoned" in r.getMessage()]
        assert not watched, watched


async def eventually(condition: Callable[[], bool]) -> None:
    """Wait (bounded) until `condition` holds: for the heartbeat task, not for a number of beats."""
    polls = round(BOUND_S / POLL_S)
    for _ in range(polls):
        if condition():
            return
        await asyncio.sleep(POLL_S)
    raise AssertionError(f"still not so after {BOUND_S} s")


@attrs.define
class FakeConfigs:
    """Swarm configs by name: create refuses a taken name, label updates name their version."""

    configs: dict[str, dict[str, Any]] = attrs.field(factory=dict)
    next_index: int = 10
    creates: int = 0

    async def config_named(self, name: str) -> dict[str, Any] | None:
        await asyncio.sleep(0)
        found = self.configs.get(name)
        return None if found is None else {**found, "Spec": dict(found["Spec"])}

    async def create_config(self, name: str, data: str, labels: dict[str, str]) -> bool:
        await asyncio.sleep(0)
        if name in self.configs:
            return False  # the engine's 409
        self.creates += 1
        self.next_index += 1
        self.configs[name] = {"ID": f"id-{self.creates}", "Version": {"Index": self.next_index},
                              "Spec": {"Name": name, "Labels": dict(labels)}}
        return True

    async def update_config_labels(self, config_id: str, version: int, labels: dict[str, str]) -> bool:
        await asyncio.sleep(0)
        found = next((c for c in self.configs.values() if c["ID"] == config_id), None)
        if found is None or found["Version"]["Index"] != version:
            return False  # gone, or the engine's "update out of sequence"
        self.next_index += 1
        found["Version"] = {"Index": self.next_index}
        found["Spec"] = {**found["Spec"], "Labels": dict(labels)}
        return True

    def labels(self) -> dict[str, str]:
        return dict(self.configs[LOCK_CONFIG]["Spec"]["Labels"])


@attrs.define
class Clock:
    now: float = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def store() -> FakeConfigs:
    return FakeConfigs()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def new_lock(store: FakeConfigs, clock: Clock, tmp_path: Path) -> Callable[..., SwarmLock]:
    """A lock for an agent with its own state dir (or the one named), same instance name."""

    def make(state: str, describe: str | None = None, lock_clock: Callable[[], float] | None = None
             ) -> SwarmLock:
        state_dir = tmp_path / state
        state_dir.mkdir(exist_ok=True)
        return SwarmLock(store, state_dir, "default", describe or f"host-{state} port 8080",
                         heartbeat_s=BEAT_S, clock=lock_clock or clock)

    return make


@contextlib.asynccontextmanager
async def beating(lock: SwarmLock) -> AsyncIterator[None]:
    task = asyncio.create_task(lock.keep_held())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


class TestTaking:
    """One agent takes the lock; another is refused by name, unless the lock was its own."""

    async def test_a_second_agent_is_refused_naming_the_first(self, new_lock: Any) -> None:
        first, second = new_lock("a", "alpha port 8080"), new_lock("b")
        await first.take("node-1")
        with pytest.raises(SwarmTaken, match="another deploy-agent serves this swarm: alpha port 8080 "
                                             r"\(instance default on node node-1\)"):
            await second.take("node-1")

    async def test_a_refused_agent_lets_its_state_dir_go(self, new_lock: Any) -> None:
        await new_lock("a").take("node-1")
        for _ in range(2):  # the second try gets the same refusal, not "state dir in use"
            with pytest.raises(SwarmTaken, match="serves this swarm"):
                await new_lock("b").take("node-1")

    async def test_a_restarted_agent_takes_its_own_lock_back(self, new_lock: Any, store: FakeConfigs,
                                                             clock: Clock, tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
        (tmp_path / "a").mkdir()
        (tmp_path / "a" / HOLDER_FILE).write_text("holder-from-before\n")
        store.configs[LOCK_CONFIG] = {  # as the killed process left it, a second ago
            "ID": "id-old", "Version": {"Index": 3}, "Spec": {"Name": LOCK_CONFIG, "Labels": {
                "holder": "holder-from-before", "describe": "alpha port 8080", "instance": "default",
                "node": "node-1", "heartbeat": str(clock.now - 1)}}}
        restarted = new_lock("a", "alpha port 9090")
        await at_once(restarted.take("node-2"), caplog)  # no watching: it is its own
        assert store.labels()["describe"] == "alpha port 9090"
        assert store.labels()["holder"] == "holder-from-before"

    async def test_two_agents_sharing_a_state_dir_are_refused(self, new_lock: Any) -> None:
        await new_lock("a").take("node-1")
        with pytest.raises(SwarmTaken, match="another deploy-agent runs with the state dir"):
            await new_lock("a").take("node-1")

    async def test_a_holder_id_is_made_once(self, new_lock: Any, tmp_path: Path) -> None:
        lock = new_lock("a")
        await lock.take("node-1")
        made = (tmp_path / "a" / HOLDER_FILE).read_text()
        await lock.release()
        await new_lock("a").take("node-1")
        assert (tmp_path / "a" / HOLDER_FILE).read_text() == made and made.strip()

    @pytest.mark.parametrize("held_before", [False, True], ids=["no lock", "stale lock"])
    async def test_agents_starting_at_once_one_wins(self, new_lock: Any, clock: Clock,
                                                    store: FakeConfigs, held_before: bool) -> None:
        if held_before:
            await new_lock("dead").take("node-0")
            clock.now += BEAT_S * STALE_BEATS + 1
        locks = [new_lock(f"s{i}") for i in range(4)]
        results = await asyncio.gather(*(lock.take("node-1") for lock in locks), return_exceptions=True)
        refused = [r for r in results if isinstance(r, SwarmTaken)]
        assert results.count(None) == 1 and len(refused) == 3, results
        winner = store.labels()["describe"]
        assert all(f"serves this swarm: {winner}" in str(r) for r in refused)
        assert store.creates == 1


class TestTakeOver:
    """A lock whose holder stopped beating is taken over after a bound, and only then."""

    async def test_a_silent_lock_is_taken_over(self, new_lock: Any, clock: Clock, store: FakeConfigs,
                                               caplog: pytest.LogCaptureFixture) -> None:
        await new_lock("dead", "alpha port 8080").take("node-1")  # killed: no release, no heartbeat
        clock.now += BEAT_S * STALE_BEATS + 1
        caplog.set_level(logging.INFO, LOCK_LOGGER)
        started = time.monotonic()
        async with asyncio.timeout(BOUND_S):
            await new_lock("b", "beta port 8080").take("node-2")
        assert time.monotonic() - started >= BEAT_S * WATCH_BEATS  # watched before taking it
        assert store.labels()["describe"] == "beta port 8080"
        assert "Took over the swarm's agent lock from alpha port 8080" in caplog.text

    async def test_a_fresh_lock_is_refused_at_once(self, new_lock: Any, clock: Clock,
                                                   caplog: pytest.LogCaptureFixture) -> None:
        await new_lock("a").take("node-1")
        clock.now += BEAT_S * STALE_BEATS - 0.01
        with pytest.raises(SwarmTaken):
            await at_once(new_lock("b").take("node-1"), caplog)

    async def test_a_live_holder_with_a_slow_clock_keeps_it(self, new_lock: Any, clock: Clock,
                                                           store: FakeConfigs) -> None:
        holder = new_lock("a", "alpha port 8080", lambda: clock.now - 3600)  # an hour behind
        await holder.take("node-1")
        async with beating(holder):
            with pytest.raises(SwarmTaken, match="alpha port 8080"):
                await new_lock("b").take("node-2")
        assert store.labels()["describe"] == "alpha port 8080"

    async def test_an_older_agents_lock_is_taken_over(self, new_lock: Any, store: FakeConfigs) -> None:
        store.configs[LOCK_CONFIG] = {"ID": "id-old", "Version": {"Index": 3}, "Spec": {
            "Name": LOCK_CONFIG, "Labels": {"instance": "default", "node": "node-1", "describe": "old"}}}
        await new_lock("b", "beta port 8080").take("node-1")
        assert store.labels()["describe"] == "beta port 8080"


class TestHeartbeat:
    """The holder keeps its lock fresh, gives it back at a clean stop, says when it lost it."""

    async def test_the_heartbeat_keeps_a_lock_fresh(self, new_lock: Any, clock: Clock,
                                                    store: FakeConfigs,
                                                    caplog: pytest.LogCaptureFixture) -> None:
        holder = new_lock("a")
        await holder.take("node-1")
        async with beating(holder):
            for _ in range(5):
                clock.now += BEAT_S * STALE_BEATS  # stale, were it not for the heartbeat
                await eventually(lambda: abs(float(store.labels()["heartbeat"]) - clock.now) < 0.01)
                with pytest.raises(SwarmTaken):
                    await at_once(new_lock("b").take("node-1"), caplog)

    async def test_a_clean_stop_lets_the_next_agent_take_it_at_once(
            self, new_lock: Any, caplog: pytest.LogCaptureFixture) -> None:
        holder = new_lock("a")
        await holder.take("node-1")
        await holder.release()
        await at_once(new_lock("b").take("node-2"), caplog)

    async def test_a_lock_removed_by_hand_is_put_back(self, new_lock: Any, store: FakeConfigs) -> None:
        holder = new_lock("a", "alpha port 8080")
        await holder.take("node-1")
        del store.configs[LOCK_CONFIG]
        async with beating(holder):
            await eventually(lambda: LOCK_CONFIG in store.configs)
        assert store.labels()["describe"] == "alpha port 8080"

    async def test_an_agent_whose_lock_was_taken_says_so(self, new_lock: Any, clock: Clock,
                                                         caplog: pytest.LogCaptureFixture) -> None:
        frozen = new_lock("a")
        await frozen.take("node-1")
        clock.now += BEAT_S * STALE_BEATS + 1
        await new_lock("b", "beta port 8080").take("node-2")
        assert frozen.warnings() == [] and not frozen.lost.is_set()
        caplog.set_level(logging.ERROR, "deploy_agent.backends.swarm.lock")
        async with beating(frozen):  # it thaws
            await eventually(frozen.lost.is_set)  # it must stop serving
            await asyncio.sleep(BEAT_S * 3)  # and says so once, however many beats follow
        [warning] = frozen.warnings()
        assert warning.code == "swarm_lock_lost" and "beta port 8080" in warning.message
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1 and "beta port 8080" in errors[0].getMessage()
