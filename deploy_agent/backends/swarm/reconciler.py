"""Keeps the service table true in front of a swarm: Swarm is the store, polled.

At start the table is rebuilt from the Swarm services' labels (and services.json for
leases). Every resync looks at the nodes (their GPUs, whether they are up), the services
and their tasks (crashes and restarts become events), places again the services of a node
down longer than --node-grace (or waits, pending, for room), and probes each service's
health on its node's address.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

import cattrs

from deploy_agent.backends.reconcile import ReconcilerBase
from deploy_agent.backends.swarm.engine import SwarmEngine, SwarmNode, exit_code, latest_task, port_error
from deploy_agent.backends.swarm.lock import SwarmLock
from deploy_agent.backends.swarm.runtime import (
    ENDING_LABEL,
    STOPPING_REASON,
    SwarmRuntime,
    service_from_swarm,
)
from deploy_agent.errors import AgentError, EngineUnavailable
from deploy_agent.events import EventLog
from deploy_agent.models import CONTAINER_PREFIX, LIVE_STATUSES, HealthWarning, JSONObject, Service
from deploy_agent.probe import HealthProbe
from deploy_agent.state import StateFile, attempt_of, parse_docker_time
from deploy_agent.table import Observation, ServiceTable

_LOGGER = logging.getLogger(__name__)

ENDED_TASK_STATES = ("failed", "rejected", "complete", "shutdown", "orphaned", "remove")
CRASHED_TASK_STATES = ("failed", "complete", "rejected")  # "shutdown": the agent ended it


def service_name(found: JSONObject) -> str:
    """The agent's name for a Swarm service (its own name less the prefix)."""
    return str((found.get("Spec") or {}).get("Name") or "").removeprefix(CONTAINER_PREFIX)


class SwarmReconciler(ReconcilerBase):
    """The shared loops (engine liveness, resync, probes), fed from the swarm's services,
    tasks and nodes; it holds the swarm's one agent lock while it runs."""

    def __init__(self, table: ServiceTable, swarm: SwarmEngine, probe: HealthProbe,
                 state_file: StateFile, converter: cattrs.Converter, events: EventLog,
                 resync_interval_s: float, instance: str, *, runtime: SwarmRuntime,
                 node_grace_s: float, lock: SwarmLock) -> None:
        super().__init__(table, swarm, probe, state_file, converter, events, resync_interval_s,
                         instance)
        self._swarm = swarm
        self._runtime = runtime
        self._node_grace_s = node_grace_s
        self._lock = lock  # taken at start-up, kept fresh by a loop, released by close()
        self.displaced = lock.lost
        self._down_since: dict[str, float] = {}  # node id -> when it was first seen down
        self._running_task: dict[str, str] = {}  # service id -> the task last seen running
        self._reported_crashes: set[str] = set()  # tasks already reported as crashed
        self._crashed_since: set[str] = set()  # services that crashed and have not run since

    async def start_up(self) -> None:
        """Be the swarm's one agent, then rebuild the table from the Swarm services."""
        info = await self._swarm.swarm_info()
        if not info.get("ControlAvailable"):
            raise SystemExit("deploy-agent: --swarm needs a swarm manager's engine; "
                             f"this one is {info.get('LocalNodeState') or 'not in a swarm'}")
        await self._lock.take(str(info.get("NodeID")))
        recorded = self._table.restore(await asyncio.to_thread(self._state_file.load))
        self._recorded = {service.container_id: service for service in recorded}
        await self._look_at_nodes()
        self._engine_is(reachable=True)
        with self._table.observe() as seen:
            for found in await self._swarm.managed_services():
                with contextlib.suppress(AgentError):
                    await self._adopt_or_remove_service(found, "start_up", seen)
        with contextlib.suppress(AgentError):  # crashes from before this start are history
            tasks = await self._tasks_of(self._table.services())
            self._reported_crashes = {t["ID"] for of_one in tasks.values() for t in of_one
                                      if (t.get("Status") or {}).get("State") in CRASHED_TASK_STATES}
        _LOGGER.info("Adopted %d service(s) from the swarm", len(self._table.services()))
        await self._table.persist()

    def loops(self) -> dict[str, Callable[[], Awaitable[None]]]:
        """Remote containers' events come from the task list, polled by the resync."""
        return {**super().loops(), "swarm-lock": self._lock.keep_held}

    def warnings(self) -> list[HealthWarning]:
        found = self._lock.warnings()
        refused = self._runtime.memlock_refusals
        if refused:
            names = sorted(node.hostname if (node := self._runtime.nodes.get(node_id)) else node_id
                           for node_id in refused)
            found.append(HealthWarning(
                "memlock_refused", f"The engines of {', '.join(names)} cannot raise a container's "
                "locked-memory limit; GPU services there run with their default memlock. Give "
                "dockerd CAP_SYS_RESOURCE there, or say --gpu-memlock off."))
        return found

    async def close(self) -> None:
        """Let the lock go, so another agent may take over at once."""
        await self._lock.release()

    async def _look_at_nodes(self) -> list[SwarmNode]:
        nodes = await self._swarm.nodes()
        self._runtime.saw(nodes)
        now = time.monotonic()
        for node in nodes:
            if node.ready:
                self._down_since.pop(node.id, None)
            else:
                self._down_since.setdefault(node.id, now)
        await self._table.refresh_gpus()
        return nodes

    async def _adopt_or_remove_service(self, found: JSONObject, reason: str,
                                       seen: Observation) -> str | None:
        """Adopt a Swarm service the table lacks, or remove it if its create was abandoned
        (it may hold a port and GPU given to someone since); the attempt it removed."""
        labels = (found.get("Spec") or {}).get("Labels") or {}
        attempt = attempt_of(labels)
        if self._table.is_abandoned(attempt):
            _LOGGER.info("Removing the Swarm service %s of an abandoned deploy", found["ID"][:12])
            await self._swarm.remove_service(found["ID"])
            return attempt
        if ENDING_LABEL in labels:  # a stop that was cut off: finish it, never start it again
            name = service_name(found)
            _LOGGER.info("Removing the Swarm service %s (%s): its stop was cut off",
                         found["ID"][:12], name)
            await self._swarm.remove_service(found["ID"])
            self._events.emit("removed", name, "stop_finished")
            return None
        service = service_from_swarm(self._converter, found, self._instance, self._runtime.nodes)
        if service is None or not seen.current(service.spec.name):
            return None
        self._restore_holders(service, labels)
        self._table.adopt(service)
        self._events.emit("adopted", service.spec.name, reason, image=service.spec.image,
                          node=service.node_name, node_id=service.node_id)
        return None

    async def resync(self) -> None:
        listed_at = time.monotonic()
        with self._table.observe() as seen:
            await self._look_at_nodes()
            found = {s["ID"]: s for s in await self._swarm.managed_services()}
            updated_at = {sid: parse_docker_time(s.get("UpdatedAt")) or 0.0 for sid, s in found.items()}
            self._engine_is(reachable=True)
            ending: list[Service] = []  # stops that could not finish: their tasks still ran
            for service in self._table.services():
                in_swarm = found.pop(service.container_id, None)
                if not seen.current(service.spec.name):
                    continue
                if in_swarm is None:
                    self._remove(service, "service_gone")
                elif ENDING_LABEL in ((in_swarm.get("Spec") or {}).get("Labels") or {}):
                    ending.append(service)
            attempts = {a for s in found.values()
                        if (a := attempt_of((s.get("Spec") or {}).get("Labels") or {})) is not None}
            removed = set()
            for untracked in found.values():
                name = service_name(untracked)
                if not seen.current(name):
                    continue
                async with self._each(f"Swarm service {untracked['ID'][:12]} ({name})"):
                    if gone := await self._adopt_or_remove_service(untracked, "resync", seen):
                        removed.add(gone)
        self._table.settle(attempts, removed, listed_at)
        for service in ending:
            async with self._each(service.spec.name):
                await self._finish_stop(service)
        services = [s for s in self._table.services() if s not in ending]
        tasks = await self._tasks_of(services)
        for service in services:
            if not self._table.busy(service.spec.name) and service.container_id in tasks:
                async with self._each(service.spec.name):
                    await self._follow_tasks(service, tasks[service.container_id],
                                             updated_at.get(service.container_id, 0.0))
        tracked = {s.container_id for s in services}
        self._running_task = {k: v for k, v in self._running_task.items() if k in tracked}
        self._crashed_since &= tracked
        if tasks.keys() >= tracked:  # every task seen: forget the crashes of tasks gone
            self._reported_crashes &= {task["ID"] for of_one in tasks.values() for task in of_one}
        await self._probe_all()
        await self._table.persist_if_dirty()

    async def _finish_stop(self, service: Service) -> None:
        """A stop (or a rollback) that found its task still running: it keeps its port and
        GPU, shown as exited and stopping, until its task is gone; then it is removed."""
        name = service.spec.name
        async with self._table.locked(name):
            if self._table.get(name) is not service:
                return  # stopped or deployed anew meanwhile
            if await self._runtime.still_running(service.container_id):
                self._table.set_status(service, "exited", STOPPING_REASON)
                return
            await self._swarm.remove_service(service.container_id)
            _LOGGER.info("Removed %s: its task is gone, the stop is finished", name)
            self._remove(service, "stop_finished")

    async def _tasks_of(self, services: list[Service]) -> dict[str, list[JSONObject]]:
        """Each service's tasks, by service ID: in one call, or (when the manager refuses
        that one, e.g. for a service removed since the listing) one call each, so that one
        refusal stays with its service and the others are still followed."""
        ids = [s.container_id for s in services]
        try:
            everyone = await self._swarm.tasks(ids)
        except EngineUnavailable:
            raise
        except AgentError:
            found: dict[str, list[JSONObject]] = {}
            for service in services:
                async with self._each(service.spec.name):
                    found[service.container_id] = await self._swarm.tasks([service.container_id])
            return found
        return {sid: [t for t in everyone if t.get("ServiceID") == sid] for sid in ids}

    async def _follow_tasks(self, service: Service, tasks: list[JSONObject], updated_at: float) -> None:
        """Status, crashes and restarts from its tasks; placed again when its node is lost,
        or when its port is taken there (by tasks of its current spec: since `updated_at`)."""
        name, service_id = service.spec.name, service.container_id
        node = self._runtime.nodes.get(service.node_id or "")
        now = time.monotonic()
        down_for = now - self._down_since.get(node.id, now) if node is not None else float("inf")
        latest = latest_task(tasks)
        port_taken = any(port_error(t) for t in tasks
                         if (parse_docker_time(t.get("CreatedAt")) or 0.0) >= updated_at)
        if service.status == "pending" or down_for > self._node_grace_s or port_taken:
            why = "pending" if service.status == "pending" else "port_taken" if port_taken else "node_down"
            async with self._table.locked(name):
                # The record may have been stopped and deployed anew while the lock was awaited.
                if self._table.get(name) is service and service.container_id == service_id:
                    await self._runtime.place_again(service, why)
            return
        for task in tasks:  # the task that failed may already have a successor: look at all
            state = (task.get("Status") or {}).get("State")
            if state in CRASHED_TASK_STATES and task["ID"] not in self._reported_crashes \
                    and not port_error(task):
                self._reported_crashes.add(task["ID"])
                self._crashed_since.add(service_id)
                service.exit_code = exit_code(task)
                self._events.emit("crashed", name, exit_code=service.exit_code, node=service.node_name,
                                  node_id=service.node_id)
        if latest is None:
            return
        state = (latest.get("Status") or {}).get("State")
        if state == "running":
            if self._running_task.get(service_id) != latest["ID"] and service_id in self._crashed_since:
                self._crashed_since.discard(service_id)
                service.restarts += 1
                service.started_at = time.time()
                self._events.emit("restarted", name, "engine", restarts=service.restarts,
                                  node=service.node_name, node_id=service.node_id)
            self._running_task[service_id] = latest["ID"]
            if service.status not in LIVE_STATUSES:
                self._table.set_status(service, "starting")
                service.exit_code = None
        elif state in ENDED_TASK_STATES and service.status != "rescheduling":
            self._table.set_status(service, "exited")
        elif service.status not in LIVE_STATUSES and service.status != "rescheduling":
            self._table.set_status(service, "starting")

