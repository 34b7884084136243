"""What both backends' reconcilers share: engine liveness, the resync loop, refusals, probes.

Requests are answered from memory; a reconciler is the only thing that looks at what runs
and at health in the background, so no request waits for a probe. Each backend's
reconciler says what a pass is (`resync`) and what start-up adopts (`start_up`); this base
runs the passes, tells "the engine is unreachable" from "the engine refused one thing",
and probes. Its loops run under the supervisor: one that fails is logged, counted and
restarted.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import cattrs

from deploy_agent.backends.engine import Engine
from deploy_agent.errors import AgentError, EngineUnavailable
from deploy_agent.events import EventLog
from deploy_agent.models import LIVE_STATUSES, HealthWarning, JSONObject, Service
from deploy_agent.probe import HealthProbe
from deploy_agent.state import StateFile, lease_of
from deploy_agent.table import ServiceTable

_LOGGER = logging.getLogger(__name__)

UNHEALTHY_AFTER = 3  # consecutive failed probes
PROBE_TIMEOUT_S = 1.0
LIVENESS_INTERVAL_S = 1.0


class ReconcilerBase(abc.ABC):
    """Start-up adoption and resync passes (the backend's), run on an interval or when woken."""

    def __init__(self, table: ServiceTable, engine: Engine, probe: HealthProbe,
                 state_file: StateFile, converter: cattrs.Converter, events: EventLog,
                 resync_interval_s: float, instance: str) -> None:
        self._table = table
        self._engine = engine
        self._probe = probe
        self._state_file = state_file
        self._converter = converter
        self._events = events
        self._recorded: dict[str, Service] = {}  # by its engine id: what services.json said
        self._engine_lost = False
        self._interval = resync_interval_s
        self._instance = instance
        self._failures: dict[str, int] = {}
        self._wake = asyncio.Event()  # resync now: the engine came back, or events were missed
        self.engine_reachable = False
        self.resyncs = 0  # completed, for /metrics
        self.resync_seconds = 0.0
        # What the engine refused in the last pass, by what it was about (a service, a
        # container): retried on the next pass, shown in /health; never "engine lost".
        self.refusals: dict[str, str] = {}
        self._refused_now: dict[str, str] = {}
        self.refusals_total = 0
        self.displaced = asyncio.Event()  # never set on one engine: nothing can take its place

    @abc.abstractmethod
    async def start_up(self) -> None:
        """Rebuild the table from what runs (and services.json), before the API serves."""

    @abc.abstractmethod
    async def resync(self) -> None:
        """One pass: compare the table with what runs, adopt or drop, probe."""

    def loops(self) -> dict[str, Callable[[], Awaitable[None]]]:
        """The background loops to supervise, by name."""
        return {"engine-watch": self.watch_engine, "resync": self.resync_forever}

    def warnings(self) -> list[HealthWarning]:
        """What /health should say about this backend, besides refusals."""
        return []

    async def close(self) -> None:  # noqa: B027 - a backend with nothing to let go of keeps it
        """Let go of what the reconciler holds beyond the table, at shutdown."""

    def _restore_holders(self, service: Service, labels: JSONObject) -> None:
        """Whether it runs until stopped, and its leases: as services.json recorded them. A
        leased service left with no lease there (the file lost, or written before its first
        holder was) gets back the lease it was created with, from its labels, for a full
        lease_s: never stopped early, never made permanent."""
        recorded = self._recorded.get(service.container_id)
        if recorded is not None:
            service.pinned, service.keep_warm_s = recorded.pinned, recorded.keep_warm_s
            service.idle_since, service.idle_until = recorded.idle_since, recorded.idle_until
        created_with = lease_of(labels)
        if (created_with is not None and not service.pinned and service.idle_until is None
                and not self._table.leases_of(service.spec.name)):
            lease_id, lease_s = created_with
            self._table.add_lease(service.spec.name, lease_s, lease_id)

    # -- engine liveness -----------------------------------------------------------------

    async def watch_engine(self) -> None:
        """Ping every second (2 s bound), so /health knows within seconds that the engine froze."""
        while True:
            self._engine_is(reachable=await self._engine.ping())
            await asyncio.sleep(LIVENESS_INTERVAL_S)

    def _engine_is(self, reachable: bool) -> None:
        """Record what the last engine call showed; a return triggers a resync."""
        if reachable == self.engine_reachable:
            return
        _LOGGER.log(logging.INFO if reachable else logging.WARNING,
                    "The Docker engine is %s", "answering" if reachable else "not answering")
        self.engine_reachable = reachable
        if reachable:
            self._wake.set()
        if not reachable:
            self._engine_lost = True
            self._events.emit("engine_lost")
        elif self._engine_lost:
            self._engine_lost = False
            self._events.emit("engine_back")

    def _remove(self, service: Service, reason: str) -> None:
        """Its container is gone, not by the agent's hand: forget it and its holders."""
        if self._table.forget(service):
            self._table.drop_leases(service.spec.name)
            self._failures.pop(service.spec.name, None)
            self._events.emit("removed", service.spec.name, reason, image=service.spec.image)

    # -- resync --------------------------------------------------------------------------

    async def resync_forever(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._interval)
            self._wake.clear()
            await self.resync_logged()

    async def resync_logged(self) -> None:
        """One pass. Only an engine that doesn't answer is "engine lost"; an engine that
        refused the pass itself (a listing) is logged and counted, and tried again."""
        started = time.monotonic()
        self._refused_now = {}
        try:
            await self.resync()
        except EngineUnavailable as err:
            if self.engine_reachable:
                _LOGGER.warning("Resync failed: %s", err.message)
            self._engine_is(reachable=False)
            return
        except AgentError as err:
            self._refused("resync", err)
        finally:
            self.refusals = self._refused_now
        self.resyncs += 1
        self.resync_seconds += time.monotonic() - started

    def _refused(self, subject: str, err: AgentError) -> None:
        """The engine refused one thing about `subject`: log (once while it lasts), count,
        and try again on the next pass."""
        if self.refusals.get(subject) != err.message:
            _LOGGER.warning("Resync: the engine refused %s: %s", subject, err.message)
        self._refused_now[subject] = err.message
        self.refusals_total += 1

    @contextlib.asynccontextmanager
    async def _each(self, subject: str) -> AsyncIterator[None]:
        """One item of a pass: an engine refusal stays with it; an engine that is gone ends
        the pass (EngineUnavailable goes on up). A call about this item that timed out while
        the engine still answers a ping (it hangs on one container) is this item's refusal."""
        try:
            yield
        except EngineUnavailable as err:
            if not await self._engine.ping():
                raise
            self._refused(subject, err)
        except AgentError as err:
            self._refused(subject, err)

    async def _probe_all(self) -> None:
        """Probe every running service, several at a time, each with a short timeout."""
        running = [s for s in self._table.services()
                   if s.status in LIVE_STATUSES
                   and not self._table.busy(s.spec.name)]
        results = await self._probe.healthy_all(
            [(s.node_addr, s.host_port, s.spec.health) for s in running], PROBE_TIMEOUT_S)
        for service, healthy in zip(running, results, strict=True):
            self._record_probe(service, healthy)

    def _record_probe(self, service: Service, healthy: bool) -> None:
        name = service.spec.name
        if service.status not in LIVE_STATUSES:
            return  # it exited while the probe was out
        if healthy:
            self._failures.pop(name, None)
            service.status = "healthy"
            return
        self._failures[name] = self._failures.get(name, 0) + 1
        if self._failures[name] >= UNHEALTHY_AFTER:
            service.status = "unhealthy"
