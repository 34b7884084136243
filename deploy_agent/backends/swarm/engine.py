"""The Swarm side of the Docker Engine API: nodes and their GPUs, services, tasks, configs.

What a node's GPUs are comes from its engine label (`deploy-agent gpu-label` prints it);
the rest is the manager's API, bounded and translated like every other engine call.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncGenerator
from typing import Any

import attrs

from deploy_agent.backends.engine import Engine, translated
from deploy_agent.errors import Conflict, EngineError
from deploy_agent.gpus import GPU_ENGINE_LABEL, Assignment, GpuReading
from deploy_agent.models import JSONObject

_LOGGER = logging.getLogger(__name__)

# Task states in which a task may hold a container, with its port and VRAM.
LIVE_TASK_STATES = ("new", "pending", "assigned", "accepted", "ready", "preparing", "starting",
                    "running")


def _engine_gpus(node: JSONObject) -> list[dict[str, Any]]:
    """A node's GPUs from its engine label; [] without one (or with one that can't be read)."""
    labels = ((node.get("Description") or {}).get("Engine") or {}).get("Labels") or {}
    try:
        gpus = json.loads(labels.get(GPU_ENGINE_LABEL, "[]"))
        return [{"uuid": str(g["uuid"]), "name": str(g["name"]), "vram_gb": float(g["vram_gb"])}
                for g in gpus]
    except (ValueError, KeyError, TypeError):
        _LOGGER.warning("Node %s has an unreadable %s label", node.get("ID"), GPU_ENGINE_LABEL)
        return []


@attrs.frozen
class SwarmNode:
    """A node as the manager reports it."""

    id: str
    hostname: str
    addr: str
    ready: bool
    gpus: tuple[dict[str, Any], ...]

    @classmethod
    def of(cls, node: JSONObject) -> SwarmNode:
        status = node.get("Status") or {}
        manager = node.get("ManagerStatus") or {}
        addr = status.get("Addr") or ""
        if addr in ("", "0.0.0.0"):  # a manager reports its address in ManagerStatus
            addr = str(manager.get("Addr", "")).rsplit(":", 1)[0]
        availability = (node.get("Spec") or {}).get("Availability", "active")
        hostname = str((node.get("Description") or {}).get("Hostname") or node["ID"])
        return cls(id=node["ID"], hostname=hostname,
                   addr=addr, ready=status.get("State") == "ready" and availability == "active",
                   gpus=tuple(_engine_gpus(node)))


class SwarmGpus:
    """The swarm's GPUs, from the nodes' engine labels: declarations only (use is not seen
    from the manager), handed over by UUID in NVIDIA_VISIBLE_DEVICES."""

    simulated = False

    def __init__(self) -> None:
        self._readings: list[GpuReading] = []
        self._indexes: dict[tuple[str, int], int] = {}  # (node ID, index there) -> a stable index

    def update(self, nodes: list[SwarmNode]) -> None:
        readings = []
        for node in sorted(nodes, key=lambda n: (n.hostname, n.id)):
            for local, gpu in enumerate(node.gpus):
                key = (node.id, local)  # a node that re-joined under its hostname is a new node
                index = self._indexes.setdefault(key, len(self._indexes))
                readings.append(GpuReading(index=index, uuid=gpu["uuid"], name=gpu["name"],
                                           total_gb=gpu["vram_gb"], used_gb=None, node=node.id,
                                           node_index=local, node_name=node.hostname,
                                           available=node.ready))
        self._readings = readings

    def read(self) -> list[GpuReading]:
        return list(self._readings)

    def handoff(self, assignment: Assignment) -> tuple[dict[str, str], list[JSONObject]]:
        return {"NVIDIA_VISIBLE_DEVICES": assignment.uuid}, []

    def close(self) -> None:
        pass


class SwarmEngine(Engine):
    """The manager's Swarm API, every call bounded like the engine's control calls."""

    async def swarm_info(self) -> JSONObject:
        info = await self._bounded("read the swarm", self._docker.system.info())
        return dict(info.get("Swarm") or {})

    async def nodes(self) -> list[SwarmNode]:
        nodes = await self._bounded("list the swarm's nodes", self._docker.nodes.list())
        return [SwarmNode.of(dict(node)) for node in nodes]

    async def managed_services(self) -> list[JSONObject]:
        found = await self._bounded("list services", self._docker.services.list(
            filters={"label": [self._ours]}))
        return [dict(service) for service in found]

    async def service(self, name_or_id: str) -> JSONObject | None:
        try:
            found = dict(await self._bounded(f"inspect service {name_or_id}",
                                             self._docker.services.inspect(name_or_id)))
        except EngineError as err:
            if err.engine_status == 404:
                return None
            raise
        return found

    async def create_service(self, body: JSONObject) -> str:
        name = body["Name"]
        try:
            # The registry's credentials go with the spec, so whichever node runs the task
            # pulls with them (the CLI's --with-registry-auth).
            auth = await self.registry_auth(body["TaskTemplate"]["ContainerSpec"]["Image"])
            created = await self.post_json(f"create service {name}", "services/create", body,
                                           headers=auth)
        except EngineError as err:
            if err.engine_status == 409:
                raise Conflict(f"A service named {name} already exists.", service=name) from err
            raise
        return str(created["ID"])

    async def update_service(self, service_id: str, version: int, spec: JSONObject) -> None:
        await self.post_json(f"update service {service_id}", f"services/{service_id}/update", spec,
                             params={"version": version})

    async def remove_service(self, service_id: str) -> None:
        try:
            await self._bounded(f"remove service {service_id}", self._docker.services.delete(service_id))
        except EngineError as err:
            if err.engine_status != 404:
                raise

    async def tasks(self, service_ids: list[str]) -> list[JSONObject]:
        if not service_ids:
            return []
        found = await self._bounded("list tasks", self._docker.tasks.list(
            filters={"service": service_ids}))
        return [dict(task) for task in found]

    async def service_logs(self, service_id: str, tail: int) -> str:
        reading: Any = self._docker.services.logs(service_id, stdout=True, stderr=True, tail=str(tail))
        lines: list[str] = await self._bounded("read the service's logs", reading)  # (a coroutine)
        return "".join(lines)

    async def follow_service_logs(self, service_id: str, tail: int) -> AsyncGenerator[str, None]:
        stream: AsyncGenerator[str, None] = self._streams.services.logs(  # type: ignore[assignment]
            service_id, stdout=True, stderr=True, follow=True, tail=str(tail))  # (an async generator)
        with translated("follow the service's logs"):
            async with contextlib.aclosing(stream):
                async for chunk in stream:
                    yield chunk

    async def config_named(self, name: str) -> JSONObject | None:
        """The Swarm config of exactly that name (the agent's lock), or None."""
        configs = await self._bounded("list configs", self._docker.configs.list(filters={"name": [name]}))
        return next((dict(c) for c in configs if c["Spec"]["Name"] == name), None)

    async def create_config(self, name: str, data: str, labels: dict[str, str]) -> bool:
        """Create it; False when one of that name exists already (another agent was first)."""
        try:
            await self._bounded(f"create config {name}", self._docker.configs.create(
                name, data, labels=labels))
        except EngineError as err:
            if err.engine_status == 409:
                return False
            raise
        return True

    async def update_config_labels(self, config_id: str, version: int, labels: dict[str, str]) -> bool:
        """Set its labels if it is still at `version`; False when it changed or is gone."""
        try:
            await self._bounded(f"update config {config_id}", self._docker.configs.update(
                config_id, str(version), labels=labels))
        except EngineError as err:
            if err.engine_status == 404 or "out of sequence" in err.message:
                return False
            raise
        return True


def task_error(task: JSONObject) -> str:
    return str((task.get("Status") or {}).get("Err") or "")


def port_error(task: JSONObject) -> bool:
    """Whether the task failed because its host port is taken on its node."""
    text = task_error(task).lower()
    return "port" in text and ("allocated" in text or "in use" in text)


def exit_code(task: JSONObject) -> int | None:
    code = ((task.get("Status") or {}).get("ContainerStatus") or {}).get("ExitCode")
    return int(code) if isinstance(code, int) else None


def latest_task(tasks: list[JSONObject]) -> JSONObject | None:
    return max(tasks, key=lambda t: (t.get("Version", {}).get("Index", 0), t.get("CreatedAt", "")),
               default=None)
