"""Keeps the service table true on one engine: adopt containers at start, follow the
engine's container events, and resync (the passes and probes are ReconcilerBase's)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import cattrs

from deploy_agent.backends.docker.hostview import HostView, own_container_id
from deploy_agent.backends.engine import Engine
from deploy_agent.backends.reconcile import ReconcilerBase
from deploy_agent.errors import AgentError, EngineUnavailable, PortTaken
from deploy_agent.events import EventLog
from deploy_agent.models import CONTAINER_PREFIX, LIVE_STATUSES, HealthWarning, JSONObject, Service
from deploy_agent.probe import HealthProbe
from deploy_agent.state import (
    StateFile,
    apply_container_state,
    attempt_of,
    service_from_container,
    summary_name,
    summary_state,
)
from deploy_agent.table import Observation, ServiceTable

_LOGGER = logging.getLogger(__name__)

RECONNECT_MAX_S = 5.0


class DockerReconciler(ReconcilerBase):
    """Adoption at start-up, then three loops: engine liveness, container events, resyncs."""

    def __init__(self, table: ServiceTable, engine: Engine, probe: HealthProbe,
                 state_file: StateFile, converter: cattrs.Converter, events: EventLog,
                 resync_interval_s: float, instance: str, host_view: HostView,
                 allowed_host_paths: tuple[Path, ...] = ()) -> None:
        super().__init__(table, engine, probe, state_file, converter, events, resync_interval_s,
                         instance)
        self.host_view = host_view
        self._allowed_host_paths = allowed_host_paths
        self._died: set[str] = set()  # containers that exited and have not started since
        self._overusing: set[str] = set()  # reported as above their VRAM declaration

    def loops(self) -> dict[str, Callable[[], Awaitable[None]]]:
        return {**super().loops(), "events": self.follow_events}

    def warnings(self) -> list[HealthWarning]:
        found = self.host_view.warnings()
        if self._engine.rlimit_refusal is not None:
            found.append(HealthWarning(
                "memlock_refused", "The engine cannot raise a container's locked-memory limit "
                f"({self._engine.rlimit_refusal}); GPU services run with its default memlock. "
                "Give dockerd CAP_SYS_RESOURCE, or say --gpu-memlock off."))
        return found

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
            elif service.status not in LIVE_STATUSES:  # its exit went unseen: it runs again
                service.status = "starting"
            # else: the start its deploy made, reported late; it was found healthy since.
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
        self._died.discard(service.container_id)
        super()._remove(service, reason)

    def _tracked(self, name: str, container_id: str) -> Service | None:
        """The service this event is about, unless a deploy or stop of it is under way."""
        service = self._table.get(name)
        if service is None or self._table.busy(name) or service.container_id != container_id:
            return None
        return service

    # -- resync --------------------------------------------------------------------------

    async def resync(self) -> None:
        """Compare the table with the containers, adopt or drop, then probe every service.

        Names that a deploy or stop touched while the containers were being listed are
        left alone: the listing is already stale for them.
        """
        listed_at = time.monotonic()
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
        self._table.settle(attempts, removed, listed_at)
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

