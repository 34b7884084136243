"""Keeps the service table true: adopt at start, follow Docker events, resync and probe.

Requests are answered from memory; this is the only place that looks at containers
and health in the background, so no request waits for a probe.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import cattrs

from deploy_agent.deployer import Deployer
from deploy_agent.engine import Engine
from deploy_agent.errors import AgentError
from deploy_agent.models import CONTAINER_PREFIX, Service
from deploy_agent.probe import HealthProbe
from deploy_agent.state import (
    StateFile,
    apply_container_state,
    service_from_container,
    summary_name,
    summary_state,
)

_LOGGER = logging.getLogger(__name__)

UNHEALTHY_AFTER = 3  # consecutive failed probes
PROBE_TIMEOUT_S = 1.0
RECONNECT_MAX_S = 5.0


class Reconciler:
    """Adoption at start-up, then two background loops: events and periodic resync."""

    def __init__(self, deployer: Deployer, engine: Engine, probe: HealthProbe,
                 state_file: StateFile, converter: cattrs.Converter,
                 resync_interval_s: float, instance: str) -> None:
        self._deployer = deployer
        self._engine = engine
        self._probe = probe
        self._state_file = state_file
        self._converter = converter
        self._interval = resync_interval_s
        self._instance = instance
        self._failures: dict[str, int] = {}
        self.engine_reachable = False
        self.resyncs = 0  # completed, for /metrics
        self.resync_seconds = 0.0

    async def start_up(self) -> None:
        """Adopt every container the agent created; drop records whose container is gone."""
        recorded = await asyncio.to_thread(self._state_file.load)
        try:
            infos = await self._engine.list_managed()
        except AgentError as err:
            _LOGGER.warning("Cannot list containers at start (%s); serving the %d service(s) of "
                            "%s until the engine is back", err.message, len(recorded or []),
                            self._state_file.path)
            for service in recorded or []:
                self._deployer.adopt(service)
            return
        self.engine_reachable = True
        for summary in infos:
            info = await self._engine.inspect(summary["Id"])
            found = service_from_container(self._converter, info, self._instance) if info else None
            if found is not None:
                self._deployer.adopt(found)
        adopted = {s.spec.name for s in self._deployer.services()}
        for lost in {s.spec.name for s in recorded or []} - adopted:
            _LOGGER.info("Dropping %s: its container is gone", lost)
        _LOGGER.info("Adopted %d service(s) from their containers", len(adopted))
        await self._probe_all()
        await self._state_file.save(self._deployer.services())

    async def run(self) -> None:
        """Follow events and resync until cancelled."""
        async with asyncio.TaskGroup() as group:
            group.create_task(self._follow_events())
            group.create_task(self._resync_forever())

    # -- events --------------------------------------------------------------------------

    async def _follow_events(self) -> None:
        backoff = 0.1
        while True:
            try:
                async for event in self._engine.events():
                    backoff = 0.1
                    self._on_event(event)
            except asyncio.CancelledError:
                raise
            except Exception as err:  # a broken stream must never end the loop
                _LOGGER.debug("Event stream ended: %s", err)
            self.engine_reachable = await self._engine.ping()
            if self.engine_reachable:
                await self._resync_logged()
            await asyncio.sleep(backoff)
            backoff = min(RECONNECT_MAX_S, backoff * 2)

    def _on_event(self, event: dict[str, object]) -> None:
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
        elif action == "start":
            if service.status in ("exited", "restarting"):
                service.restarts += 1
                service.started_at = time.time()  # uptime counts from the latest start
            service.status = "starting"
            service.exit_code = None
            self._failures.pop(name, None)
        elif action == "destroy":
            self._deployer.forget(service)
        elif action == "health_status: unhealthy":
            service.status = "unhealthy"

    def _tracked(self, name: str, container_id: str) -> Service | None:
        """The service this event is about, unless a deploy or stop of it is under way."""
        if self._deployer.lock(name).locked():
            return None
        try:
            service = self._deployer.service(name)
        except AgentError:
            return None
        return service if service.container_id == container_id else None

    # -- resync --------------------------------------------------------------------------

    async def _resync_forever(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self._resync_logged()

    async def _resync_logged(self) -> None:
        started = time.monotonic()
        try:
            await self.resync()
            self.resyncs += 1
            self.resync_seconds += time.monotonic() - started
        except asyncio.CancelledError:
            raise
        except AgentError as err:
            if self.engine_reachable:
                _LOGGER.warning("Resync failed: %s", err.message)
            self.engine_reachable = False
        except Exception:
            _LOGGER.exception("Resync failed")

    async def resync(self) -> None:
        """Compare the table with the containers, adopt or drop, then probe every service.

        Names that a deploy or stop touched while the containers were being listed are
        left alone: the listing is already stale for them.
        """
        before = self._deployer.generations()
        infos = await self._engine.list_managed()
        self.engine_reachable = True

        def current(name: str) -> bool:
            unchanged = self._deployer.generation(name) == before.get(name, 0)
            return unchanged and not self._deployer.lock(name).locked()

        by_id = {info["Id"]: info for info in infos}
        changed = False
        for service in self._deployer.services():
            info = by_id.pop(service.container_id, None)
            if not current(service.spec.name):
                continue
            if info is None:
                _LOGGER.info("Dropping %s: its container is gone", service.spec.name)
                self._deployer.forget(service)
                changed = True
                continue
            was_down = service.status == "exited"
            apply_container_state(service, summary_state(info["State"]))
            if service.status == "exited" and not was_down:
                await self._refresh_from_inspect(service)
        tracked = {s.spec.name for s in self._deployer.services()}
        for summary in by_id.values():
            name = summary_name(summary)
            if not name or name in tracked or not current(name):
                continue
            info = await self._engine.inspect(summary["Id"])
            adopted = service_from_container(self._converter, info, self._instance) if info else None
            if adopted is not None and current(adopted.spec.name):
                self._deployer.adopt(adopted)
                changed = True
        await self._deployer.refresh_gpus()
        await self._probe_all()
        if changed:
            await self._state_file.save(self._deployer.services())

    async def _refresh_from_inspect(self, service: Service) -> None:
        """Exit code and restart count, which `docker ps` does not give."""
        info = await self._engine.inspect(service.container_id)
        if info is not None:
            apply_container_state(service, info.get("State", {}))
            service.restarts = int(info.get("RestartCount", service.restarts))

    async def _probe_all(self) -> None:
        """Probe every running service, several at a time, each with a short timeout."""
        running = [s for s in self._deployer.services()
                   if s.status in ("starting", "healthy", "unhealthy")
                   and not self._deployer.lock(s.spec.name).locked()]
        results = await self._probe.healthy_all(
            [(s.host_port, s.spec.health) for s in running], PROBE_TIMEOUT_S)
        for service, healthy in zip(running, results, strict=True):
            self._record_probe(service, healthy)

    def _record_probe(self, service: Service, healthy: bool) -> None:
        name = service.spec.name
        if service.status not in ("starting", "healthy", "unhealthy"):
            return  # it exited while the probe was out
        if healthy:
            self._failures.pop(name, None)
            service.status = "healthy"
            return
        self._failures[name] = self._failures.get(name, 0) + 1
        if self._failures[name] >= UNHEALTHY_AFTER:
            service.status = "unhealthy"
