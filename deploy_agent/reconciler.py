"""Keeps the service table true: adopt at start, follow Docker events, resync and probe.

Requests are answered from memory; this is the only place that looks at containers
and health in the background, so no request waits for a probe. Its loops run under the
supervisor: one that fails is logged, counted and restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import cattrs

from deploy_agent.engine import Engine
from deploy_agent.errors import AgentError, EngineUnavailable, PortTaken
from deploy_agent.events import EventLog
from deploy_agent.hostview import HostView, own_container_id
from deploy_agent.models import CONTAINER_PREFIX, LIVE_STATUSES, JSONObject, Service
from deploy_agent.probe import HealthProbe
from deploy_agent.state import (
    StateFile,
    apply_container_state,
    attempt_of,
    lease_of,
    service_from_container,
    summary_name,
    summary_state,
)
from deploy_agent.table import Observation, ServiceTable

_LOGGER = logging.getLogger(__name__)

UNHEALTHY_AFTER = 3  # consecutive failed probes
PROBE_TIMEOUT_S = 1.0
RECONNECT_MAX_S = 5.0
LIVENESS_INTERVAL_S = 1.0


class Reconciler:
    """Adoption at start-up, then three loops: engine liveness, events, periodic resync."""

    def __init__(self, table: ServiceTable, engine: Engine, probe: HealthProbe,
                 state_file: StateFile, converter: cattrs.Converter, events: EventLog,
                 resync_interval_s: float, instance: str, host_view: HostView,
                 allowed_host_paths: tuple[Path, ...] = ()) -> None:
        self._table = table
        self._engine = engine
        self._probe = probe
        self._state_file = state_file
        self._converter = converter
        self._events = events
        self._recorded: dict[str, Service] = {}  # by container id: what services.json said
        self._engine_lost = False
        self._interval = resync_interval_s
        self._instance = instance
        self.host_view = host_view
        self._allowed_host_paths = allowed_host_paths
        self._failures: dict[str, int] = {}
        self._died: set[str] = set()  # containers that exited and have not started since
        self._overusing: set[str] = set()  # reported as above their VRAM declaration
        self._wake = asyncio.Event()  # resync now: the engine came back, or events were missed
        self.engine_reachable = False
        self.resyncs = 0  # completed, for /metrics
        self.resync_seconds = 0.0
        # What the engine refused in the last pass, by what it was about (a service, a
        # container): retried on the next pass, shown in /health; never "engine lost".
        self.refusals: dict[str, str] = {}
        self._refused_now: dict[str, str] = {}
        self.refusals_total = 0

    async def start_up(self) -> None:
        """Adopt every container the agent created; drop records whose container is gone."""
        recorded = self._table.restore(await asyncio.to_thread(self._state_file.load))
        self._recorded = {service.container_id: service for service in recorded}
        try:
            infos = await self._engine.list_managed()
        except AgentError as err:
            _LOGGER.warning("Cannot list containers at start (%s); serving the %d service(s) of "
                            "%s until the engine is back", err.message, len(recorded),
                            self._state_file.path)
            for service in recorded:
                self._table.adopt(service)
            return
        self._engine_is(reachable=True)
        with self._table.observe() as seen:
            for summary in infos:
                with contextlib.suppress(AgentError):  # what can't be read now, the resync reads
                    await self._adopt_or_remove(summary, "start_up", seen)
        with contextlib.suppress(AgentError):
            await self._check_host_paths()
        with contextlib.suppress(AgentError):
            await self._check_pids()
        adopted = {s.spec.name for s in self._table.services()}
        for lost in {s.spec.name for s in recorded} - adopted:
            _LOGGER.info("Dropping %s: its container is gone", lost)
        _LOGGER.info("Adopted %d service(s) from their containers", len(adopted))
        await self._probe_all()
        await self._table.persist()

    async def _adopt_or_remove(self, summary: JSONObject, reason: str,
                               seen: Observation) -> str | None:
        """Adopt a container the table lacks, or remove it if its deploy was abandoned;
        the abandoned attempt it removed, if any."""
        attempt = attempt_of(summary["Labels"])
        if self._table.is_abandoned(attempt):
            _LOGGER.info("Removing the container %s of an abandoned deploy", summary["Id"][:12])
            await self._engine.remove(summary["Id"])
            return attempt
        info = await self._engine.inspect(summary["Id"])
        if info is None:
            return None
        found = service_from_container(self._converter, info, self._instance)
        # Re-checked after the await: a deploy or stop of the name may have come and gone.
        if found is None or not seen.current(found.spec.name):
            return None
        if info.get("State", {}).get("Status") == "created":
            await self._start_created(found)
            if not seen.current(found.spec.name):
                return None
        self._restore_holders(found, info["Config"].get("Labels") or {})
        self._table.adopt(found)
        self._events.emit("adopted", found.spec.name, reason, image=found.spec.image,
                          status=found.status)
        return None

    async def _start_created(self, service: Service) -> None:
        """Its deploy ended (the agent was killed) between create and start: finish that.
        A start the engine refuses (its port taken meanwhile, say) leaves it adopted as
        exited, for a deploy to replace or a stop to remove."""
        name = service.spec.name
        _LOGGER.info("Starting %s: its deploy stopped before it started the container", name)
        try:
            await self._engine.start(service.container_id)
        except EngineUnavailable:
            raise
        except (AgentError, PortTaken) as err:
            _LOGGER.warning("Cannot start %s, left created by a deploy that was cut off (%s); it "
                            "shows as exited", name, getattr(err, "message", err))
            service.status, service.exit_code = "exited", None
            return
        service.status, service.exit_code = "starting", None

    def _restore_holders(self, service: Service, labels: JSONObject) -> None:
        """Whether it runs until stopped, and its leases: as services.json recorded them. A
        leased service left with no lease there (the file lost, or written before its first
        holder was) gets back the lease it was created with, from its labels, for a full
        lease_s: never stopped early, never made permanent."""
        recorded = self._recorded.get(service.container_id)
        if recorded is not None:
            service.pinned = recorded.pinned
        created_with = lease_of(labels)
        if created_with is not None and not service.pinned and not self._table.leases_of(service.spec.name):
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

    # -- events --------------------------------------------------------------------------

    async def follow_events(self) -> None:
        """Apply container events as they come; resubscribe (and resync) when the stream ends."""
        backoff = 0.1
        while True:
            try:
                async for event in self._engine.events():
                    backoff = 0.1
                    self._on_event(event)
            except AgentError as err:
                _LOGGER.debug("Event stream ended: %s", err.message)
            self._wake.set()  # events may have been missed meanwhile
            await asyncio.sleep(backoff)
            backoff = min(RECONNECT_MAX_S, backoff * 2)

    def _on_event(self, event: JSONObject) -> None:
        actor = event.get("Actor") or {}
        attributes = actor.get("Attributes", {}) if isinstance(actor, dict) else {}
        name = str(attributes.get("name", "")).removeprefix(CONTAINER_PREFIX)
        service = self._tracked(name, str(actor.get("ID", "")) if isinstance(actor, dict) else "")
        if service is None:
            return
        action = str(event.get("Action", ""))
        if action == "die":
            service.status = "exited"
            with contextlib.suppress(ValueError):
                service.exit_code = int(str(attributes.get("exitCode", "")))
            self._crashed(service)
        elif action == "start":
            # Counted from the die it follows, not from the status: a resync may already
            # have seen the container running again.
            if service.container_id in self._died:
                self._died.discard(service.container_id)
                service.restarts += 1
                service.started_at = time.time()  # uptime counts from the latest start
                self._events.emit("restarted", name, "engine", restarts=service.restarts)
            service.status = "starting"
            service.exit_code = None
            self._failures.pop(name, None)
        elif action == "destroy":
            self._remove(service, "container_destroyed")
        elif action == "health_status: unhealthy":
            service.status = "unhealthy"

    def _crashed(self, service: Service) -> None:
        """Its container exited without the agent asking: once per exit."""
        if service.container_id not in self._died:
            self._died.add(service.container_id)
            self._events.emit("crashed", service.spec.name, exit_code=service.exit_code)

    def _remove(self, service: Service, reason: str) -> None:
        """Its container is gone, not by the agent's hand: forget it and its holders."""
        if self._table.forget(service):
            self._died.discard(service.container_id)
            self._table.drop_leases(service.spec.name)
            self._failures.pop(service.spec.name, None)
            self._events.emit("removed", service.spec.name, reason, image=service.spec.image)

    def _tracked(self, name: str, container_id: str) -> Service | None:
        """The service this event is about, unless a deploy or stop of it is under way."""
        service = self._table.get(name)
        if service is None or self._table.busy(name) or service.container_id != container_id:
            return None
        return service

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
        the pass (EngineUnavailable goes on up)."""
        try:
            yield
        except EngineUnavailable:
            raise
        except AgentError as err:
            self._refused(subject, err)

    async def resync(self) -> None:
        """Compare the table with the containers, adopt or drop, then probe every service.

        Names that a deploy or stop touched while the containers were being listed are
        left alone: the listing is already stale for them.
        """
        with self._table.observe() as seen:
            infos = await self._engine.list_managed()
            self._engine_is(reachable=True)
            by_id = {info["Id"]: info for info in infos}
            attempts = {a for info in infos if (a := attempt_of(info["Labels"])) is not None}
            for service in self._table.services():
                info = by_id.pop(service.container_id, None)
                if not seen.current(service.spec.name):
                    continue
                if info is None:
                    _LOGGER.info("Dropping %s: its container is gone", service.spec.name)
                    self._remove(service, "container_gone")
                    continue
                was_down = service.status == "exited"
                apply_container_state(service, summary_state(info["State"]))
                if service.status == "exited" and not was_down:  # its die event was missed
                    async with self._each(service.spec.name):
                        await self._refresh_from_inspect(service)
                    self._crashed(service)
            removed = set()
            for summary in by_id.values():
                name = summary_name(summary)
                if not name or not seen.current(name):
                    continue
                async with self._each(f"container {summary['Id'][:12]} ({name})"):
                    if gone := await self._adopt_or_remove(summary, "resync", seen):
                        removed.add(gone)
        self._table.settle(attempts, removed)
        async with self._each("the PID namespace check"):
            await self._check_pids()
        for name in [n for n in self._failures if self._table.get(n) is None]:
            del self._failures[name]
        self._died &= {s.container_id for s in self._table.services()}
        await self._table.refresh_gpus()
        self._table.gpus.tally_overuse()
        self._report_overuse()
        await self._probe_all()
        await self._table.persist_if_dirty()

    def _report_overuse(self) -> None:
        """An event for each service that has just been seen above its VRAM declaration."""
        gpus = self._table.gpus
        for name in sorted(gpus.over - self._overusing):
            service = self._table.get(name)
            used = gpus.observed_gb(name)
            self._events.emit("vram_overuse", name, None,
                              declared_gb=service.spec.vram_gb if service else None,
                              used_gb=None if used is None else round(used, 2))
        self._overusing = set(gpus.over)

    async def _check_host_paths(self) -> None:
        """In a container, the allowed host paths must be mounted at the same paths."""
        own = own_container_id()
        if own is None or not self._allowed_host_paths:
            return
        info = await self._engine.inspect(own)
        if info is not None:
            self.host_view.check_paths(self._allowed_host_paths, info)

    async def _check_pids(self) -> None:
        """Until it is known, look at one running service: are PIDs here the host's?"""
        if self.host_view.shares_host_pids is not None:
            return
        running = next((s for s in self._table.services() if s.status in ("starting", "healthy")), None)
        if running is not None:
            await self.host_view.check_pids(lambda: self._engine.inspect(running.container_id))

    async def _refresh_from_inspect(self, service: Service) -> None:
        """Exit code and restart count, which `docker ps` does not give."""
        info = await self._engine.inspect(service.container_id)
        if info is not None:
            apply_container_state(service, info.get("State", {}))
            service.restarts = int(info.get("RestartCount", service.restarts))

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
