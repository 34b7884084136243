"""The swarm's one agent: a Swarm config that its holder keeps fresh.

The lock is the config `deploy-agent.lock`. Its labels name the holder (an id created once
in the agent's state dir and guarded there by an exclusive file lock, so a restart is told
from a second process), say who that is for people, and carry a heartbeat that the holder
refreshes every `heartbeat_s`: labels are the one part of a config that can be updated,
and every update names the version it read, so two writers can't both succeed.

A second agent is refused while the heartbeat is fresh. A lock silent for `stale_s` is
watched once more for a while (so a clock that runs ahead can't take a live agent's lock)
and then taken over. A clean stop releases the lock; a kill leaves it to go stale.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import attrs

from deploy_agent.errors import AgentError, SwarmTaken
from deploy_agent.models import HealthWarning, JSONObject

_LOGGER = logging.getLogger(__name__)

LOCK_CONFIG = "deploy-agent.lock"
HOLDER_FILE = "swarm-holder"  # in the state dir: this agent's holder id, flock'ed while it runs
HEARTBEAT_S = 5.0
STALE_BEATS = 3  # heartbeats missed before a lock counts as abandoned
WATCH_BEATS = 2  # how long a lock that looks abandoned is watched before it is taken over
TAKE_ATTEMPTS = 4  # reads of a lock that keeps changing under us before giving up


class LockStore(Protocol):
    """The engine calls the lock needs (SwarmEngine's)."""

    async def config_named(self, name: str) -> JSONObject | None: ...

    async def create_config(self, name: str, data: str, labels: dict[str, str]) -> bool: ...

    async def update_config_labels(self, config_id: str, version: int, labels: dict[str, str]) -> bool: ...


@attrs.frozen
class Claim:
    """What the lock config says: who holds it and when that one last said so."""

    config_id: str
    version: int
    holder: str | None  # None: a lock without a holder id (an older agent's); "": released
    describe: str
    instance: str
    node: str
    heartbeat: float | None

    @classmethod
    def of(cls, config: JSONObject) -> Claim:
        labels = (config.get("Spec") or {}).get("Labels") or {}
        try:
            heartbeat: float | None = float(labels.get("heartbeat") or "")
        except ValueError:
            heartbeat = None
        return cls(config_id=str(config["ID"]), version=int((config.get("Version") or {}).get("Index", 0)),
                   holder=labels.get("holder"), describe=str(labels.get("describe") or "unknown"),
                   instance=str(labels.get("instance") or "?"), node=str(labels.get("node") or "?"),
                   heartbeat=heartbeat)

    def who(self) -> str:
        return f"{self.describe} (instance {self.instance} on node {self.node})"


class HolderFile:
    """This agent's holder id, created once in the state dir; the file stays flock'ed while
    the agent holds it, so two processes sharing a state dir can't both be its holder."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / HOLDER_FILE
        self.id = ""
        self._fd: int | None = None

    def open(self) -> None:
        """Lock the file (blocking I/O: run it in a thread); SwarmTaken if another holds it."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SwarmTaken(f"another deploy-agent runs with the state dir {self.path.parent} "
                             f"(it holds {self.path}); give each agent its own --state-dir") from None
        try:
            found = os.read(fd, 100).decode(errors="replace").strip()
            if not found:
                found = uuid.uuid4().hex
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{found}\n".encode(), 0)
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self.id, self._fd = found, fd

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # and with it the flock
            self._fd = None


class SwarmLock:
    """Holds the swarm's one agent lock: take() at start, keep_held() as a background loop,
    release() at a clean stop. `heartbeat_s` and `clock` are seams for tests."""

    def __init__(self, store: LockStore, state_dir: Path, instance: str, describe: str, *,
                 heartbeat_s: float = HEARTBEAT_S, clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._holder = HolderFile(state_dir)
        self._instance = instance
        self._describe = describe
        self._node = ""
        self.heartbeat_s = heartbeat_s
        self.stale_s = heartbeat_s * STALE_BEATS
        self._watch_s = heartbeat_s * WATCH_BEATS
        self._clock = clock
        self.taken_by: Claim | None = None  # who took the lock from this running agent
        self.lost = asyncio.Event()  # set once another agent took it: this one must stop serving

    def _labels(self) -> dict[str, str]:
        return {"holder": self._holder.id, "describe": self._describe, "instance": self._instance,
                "node": self._node, "heartbeat": f"{self._clock():.3f}"}

    def _fresh(self, claim: Claim) -> bool:
        return claim.heartbeat is not None and self._clock() - claim.heartbeat <= self.stale_s

    def _refusal(self, claim: Claim) -> SwarmTaken:
        heard = ("never" if claim.heartbeat is None
                 else f"{max(0.0, self._clock() - claim.heartbeat):.0f} s ago")
        return SwarmTaken(f"another deploy-agent serves this swarm: {claim.who()}, last heard from "
                          f"{heard}. Stop it first; if it is gone, its lock is taken over once it has "
                          f"been silent for {self.stale_s:.0f} s.")

    async def _read(self) -> Claim | None:
        found = await self._store.config_named(LOCK_CONFIG)
        return None if found is None else Claim.of(found)

    async def take(self, node_id: str) -> None:
        """Become the swarm's one agent, or raise SwarmTaken naming the one that is."""
        self._node = node_id
        await asyncio.to_thread(self._holder.open)
        try:
            await self._take()
        except BaseException:
            self._holder.close()
            raise

    async def _take(self) -> None:
        claim = None
        for _ in range(TAKE_ATTEMPTS):
            claim = await self._read()
            if claim is None:
                if await self._store.create_config(LOCK_CONFIG, self._describe, self._labels()):
                    _LOGGER.info("Holding the swarm's agent lock (%s)", LOCK_CONFIG)
                    return
                continue  # another agent created it first: read whose it is
            if claim.holder in (self._holder.id, ""):  # ours from before a restart, or released
                if await self._store.update_config_labels(claim.config_id, claim.version, self._labels()):
                    _LOGGER.info("Holding the swarm's agent lock (%s) again", LOCK_CONFIG)
                    return
                continue
            if self._fresh(claim):
                raise self._refusal(claim)
            _LOGGER.info("The swarm's agent lock of %s looks abandoned; watching it for %.0f s",
                         claim.who(), self._watch_s)
            await asyncio.sleep(self._watch_s)
            again = await self._read()
            if again is None or (again.config_id, again.version) != (claim.config_id, claim.version):
                continue  # its holder spoke (or it was released or removed): decide afresh
            if await self._store.update_config_labels(claim.config_id, claim.version, self._labels()):
                _LOGGER.warning("Took over the swarm's agent lock from %s, silent for %.0f s or more",
                                claim.who(), self.stale_s + self._watch_s)
                return
        assert claim is not None  # TAKE_ATTEMPTS > 0, and every None was followed by a read
        raise self._refusal(claim)

    async def keep_held(self) -> None:
        """Refresh the heartbeat every heartbeat_s; say loudly if another agent took the lock."""
        while True:
            await asyncio.sleep(self.heartbeat_s)
            try:
                await self._beat()
            except AgentError as err:
                _LOGGER.warning("Cannot refresh the swarm's agent lock: %s", err.message)

    async def _beat(self) -> None:
        claim = await self._read()
        if claim is None:  # removed by hand while this agent runs: put it back
            _LOGGER.warning("The swarm's agent lock %s was removed; taking it again", LOCK_CONFIG)
            if await self._store.create_config(LOCK_CONFIG, self._describe, self._labels()):
                return
            claim = await self._read()
            if claim is None:
                return
        if claim.holder not in (self._holder.id, ""):
            if self.taken_by is None or self.taken_by.holder != claim.holder:
                _LOGGER.error("ANOTHER AGENT HOLDS THIS SWARM'S LOCK: %s took it over (this agent "
                              "was silent too long, frozen or cut off). This agent stops serving, "
                              "so that one agent places services on this swarm.", claim.who())
            self.taken_by = claim
            self.lost.set()
            return
        if await self._store.update_config_labels(claim.config_id, claim.version, self._labels()) \
                and self.taken_by is not None:
            _LOGGER.warning("Holding the swarm's agent lock again (%s released it)", self.taken_by.who())
            self.taken_by = None

    async def release(self) -> None:
        """Let the lock go at a clean stop, so that another agent may take it at once."""
        try:
            claim = await self._read()
            if claim is not None and claim.holder == self._holder.id:
                await self._store.update_config_labels(claim.config_id, claim.version,
                                                       {**self._labels(), "holder": "", "heartbeat": ""})
        except AgentError as err:
            _LOGGER.warning("Cannot release the swarm's agent lock (it goes stale in %.0f s): %s",
                            self.stale_s, err.message)
        finally:
            self._holder.close()

    def warnings(self) -> list[HealthWarning]:
        if self.taken_by is None:
            return []
        return [HealthWarning(
            "swarm_lock_lost", f"Another agent took over this swarm's lock: {self.taken_by.who()}. "
            "This agent is stopping; that one serves the swarm.")]

