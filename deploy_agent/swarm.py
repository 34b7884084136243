"""In front of a Docker Swarm: services become Swarm services, placed by the agent.

Swarm counts GPUs only as whole generic resources, so placement by VRAM stays the agent's:
it picks the node and GPU (from the nodes' engine labels), pins the service there with a
`node.id` constraint and `NVIDIA_VISIBLE_DEVICES=<uuid>`, and publishes its port in host
mode on that node. Swarm executes, stores (the services' labels carry everything) and
restarts. When a node is down longer than --node-grace, the agent places its services
again elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from collections.abc import AsyncGenerator
from typing import Any

import attrs
import cattrs

from deploy_agent.config import Config
from deploy_agent.engine import MANAGED_LABEL, Engine, _translated
from deploy_agent.errors import (
    AgentError,
    Conflict,
    ContainerExited,
    EngineError,
    HealthTimeout,
    NoGpuCapacity,
    NoPortAvailable,
    PortTaken,
)
from deploy_agent.events import EventLog
from deploy_agent.gpus import GIB, Assignment, GpuReading
from deploy_agent.local import poll_interval
from deploy_agent.models import CONTAINER_PREFIX, DeploySpec, JSONObject, Lease, Service
from deploy_agent.probe import HealthProbe
from deploy_agent.runtime import LOG_TAIL_LINES, PORT_ATTEMPTS, DryRunOutcome, Progress
from deploy_agent.state import attempt_of, labels_for, lease_of, recorded_in
from deploy_agent.table import ServiceTable

_LOGGER = logging.getLogger(__name__)

GPU_ENGINE_LABEL = "deploy-agent.gpus"  # on each node's engine: [{"uuid", "name", "vram_gb"}]
NODE_LABEL = "tidybot.node"  # the node id a service is pinned to
LOCK_CONFIG = "deploy-agent.lock"  # exactly one --swarm agent per swarm
TASK_POLL_S = 0.2


def gpu_label(readings: list[GpuReading]) -> str:
    """The engine label a node carries so that a --swarm agent knows its GPUs."""
    gpus = [{"uuid": r.uuid, "name": r.name, "vram_gb": round(r.total_gb, 2)} for r in readings]
    return f"{GPU_ENGINE_LABEL}={json.dumps(gpus, separators=(',', ':'))}"


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
        self._indexes: dict[tuple[str, int], int] = {}  # (node, index there) -> a stable index

    def update(self, nodes: list[SwarmNode]) -> None:
        readings = []
        for node in sorted(nodes, key=lambda n: n.hostname):
            for local, gpu in enumerate(node.gpus):
                key = (node.hostname, local)
                index = self._indexes.setdefault(key, len(self._indexes))
                readings.append(GpuReading(index=index, uuid=gpu["uuid"], name=gpu["name"],
                                           total_gb=gpu["vram_gb"], used_gb=None, node=node.hostname,
                                           node_index=local, available=node.ready))
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
            created = await self._bounded(f"create service {name}", self._docker._query_json(
                "services/create", method="POST", data=json.dumps(body)))  # aiodocker's create reshapes Env
        except EngineError as err:
            if err.engine_status == 409:
                raise Conflict(f"A service named {name} already exists.", service=name) from err
            raise
        return str(created["ID"])

    async def update_service(self, service_id: str, version: int, spec: JSONObject) -> None:
        await self._bounded(f"update service {service_id}", self._docker._query_json(
            f"services/{service_id}/update", method="POST", data=json.dumps(spec),
            params={"version": version}))  # aiodocker's update only changes the image

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
        with _translated("follow the service's logs"):
            async with contextlib.aclosing(stream):
                async for chunk in stream:
                    yield chunk

    async def hold_lock(self, instance: str, node_id: str, describe: str) -> None:
        """Take the swarm's one agent lock, or raise SwarmTaken naming its holder. The same
        instance on the same node takes it back (it is that agent, restarted)."""
        configs = await self._bounded("list configs", self._docker.configs.list(
            filters={"name": [LOCK_CONFIG]}))
        mine = {"instance": instance, "node": node_id}
        for config in configs:
            if config["Spec"]["Name"] != LOCK_CONFIG:
                continue
            labels = config["Spec"].get("Labels") or {}
            if {k: labels.get(k) for k in mine} == mine:
                return
            raise SwarmTaken(f"another deploy-agent serves this swarm: {labels.get('describe')} "
                             f"(instance {labels.get('instance')} on node {labels.get('node')}). "
                             f"Stop it, or remove its claim with `docker config rm {LOCK_CONFIG}`.")
        await self._bounded("create the agent's lock", self._docker.configs.create(
            LOCK_CONFIG, describe, labels={**mine, "describe": describe}))


class SwarmTaken(Exception):
    """Another --swarm agent already serves this swarm."""


def _task_error(task: JSONObject) -> str:
    return str((task.get("Status") or {}).get("Err") or "")


def _port_error(task: JSONObject) -> bool:
    text = _task_error(task).lower()
    return "port" in text and ("allocated" in text or "in use" in text)


def _exit_code(task: JSONObject) -> int | None:
    code = ((task.get("Status") or {}).get("ContainerStatus") or {}).get("ExitCode")
    return int(code) if isinstance(code, int) else None


def latest_task(tasks: list[JSONObject]) -> JSONObject | None:
    return max(tasks, key=lambda t: (t.get("Version", {}).get("Index", 0), t.get("CreatedAt", "")),
               default=None)


class SwarmRuntime:
    """Services as Swarm services, one replica each, pinned to a node and a GPU."""

    def __init__(self, config: Config, engine: SwarmEngine, probe: HealthProbe, table: ServiceTable,
                 converter: cattrs.Converter, gpus: SwarmGpus, events: EventLog) -> None:
        self._config = config
        self._engine = engine
        self._probe = probe
        self._table = table
        self._converter = converter
        self._gpus = gpus
        self._events = events
        self.nodes: dict[str, SwarmNode] = {}  # by id, as of the last look

    def saw(self, nodes: list[SwarmNode]) -> None:
        """The swarm's nodes as the reconciler just found them: where to place, and their GPUs."""
        self.nodes = {node.id: node for node in nodes}
        self._gpus.update(nodes)

    # -- placement -----------------------------------------------------------------------

    def node_named(self, hostname: str | None) -> SwarmNode | None:
        return next((n for n in self.nodes.values() if n.hostname == hostname), None)

    def _choose(self, spec: DeploySpec, reserve: bool,
                freeing: str | None = None) -> tuple[SwarmNode, Assignment | None]:
        """A node (and GPU) for the spec now, by the same rules as on one node and with no
        await: reserved there when `reserve`, else only looked at (a dry run)."""
        if spec.gpu:
            assignment = (self._table.reserve_gpu(spec.name, spec.vram_gb) if reserve
                          else self._table.gpus.place(spec.vram_gb, freeing=freeing))
            node = self.node_named(assignment.node)
            if node is None:
                if reserve:
                    self._table.release_gpu(spec.name)
                raise NoGpuCapacity("The GPU's node is gone.", free_gb={})
            return node, assignment
        ready = [n for n in self.nodes.values() if n.ready]
        if not ready:
            raise NoGpuCapacity("No swarm node is ready.", free_gb={})
        counts = {n.hostname: 0 for n in ready}
        for service in self._table.services():
            if service.node_name in counts and service.spec.name != freeing:
                counts[service.node_name] += 1
        return min(ready, key=lambda n: (counts[n.hostname], n.hostname)), None

    async def place(self, spec: DeploySpec, replacing: Service | None) -> DryRunOutcome:
        if replacing is None:
            await self._existing_ours(spec)
        node, assignment = self._choose(spec, reserve=False,
                                        freeing=replacing.spec.name if replacing else None)
        same_node = replacing is not None and replacing.node_name == node.hostname
        freed = {replacing.host_port} if replacing is not None and same_node else set()
        port = await self._table.free_port(spec.port, set(), freed, node=node.hostname)
        return DryRunOutcome(port, assignment.local_index if assignment else None, already_running=False,
                             pull_needed=None, node_name=node.hostname, node_addr=node.addr)

    def _ours(self, service: JSONObject) -> bool:
        labels = (service.get("Spec") or {}).get("Labels") or {}
        return labels.get(MANAGED_LABEL) == self._config.instance

    # -- launch --------------------------------------------------------------------------

    async def remove_stray(self, spec: DeploySpec) -> None:
        found = await self._existing_ours(spec)
        if found is not None:
            await self._engine.remove_service(found["ID"])

    async def _existing_ours(self, spec: DeploySpec) -> JSONObject | None:
        """The Swarm service of this name, if any; Conflict when it isn't this agent's."""
        found = await self._engine.service(spec.container_name)
        if found is not None and not self._ours(found):
            raise Conflict(f"A Swarm service named {spec.container_name} exists that this agent "
                           "does not manage; remove or rename it first.", name=spec.name)
        return found

    async def launch(self, spec: DeploySpec, progress: Progress, lease: Lease | None) -> Service:
        node, assignment = self._choose(spec, reserve=True)
        try:
            refused: set[int] = set()
            for _ in range(PORT_ATTEMPTS):
                port = await self._table.reserve_port(spec.port, set(), frozenset(refused),
                                                      node=node.hostname)
                try:
                    service = await self._create_and_wait(spec, node, assignment, port, lease, progress)
                except PortTaken:
                    _LOGGER.info("Port %s is taken on %s; trying the next", port, node.hostname)
                    refused.add(port)
                    continue
                return service  # tracked: the deployer writes services.json
            raise NoPortAvailable(f"{node.hostname} refused {PORT_ATTEMPTS} host ports in a row for "
                                  f"{spec.name}.")
        except BaseException:
            self._table.release_gpu(spec.name)
            raise

    def service_body(self, spec: DeploySpec, node: SwarmNode, assignment: Assignment | None,
                     port: int, attempt: str, lease: Lease | None) -> JSONObject:
        """The Swarm service spec: one replica on `node`, its GPU by UUID, its port in host mode."""
        env = dict(spec.env)
        if assignment is not None:
            env.update(self._gpus.handoff(assignment)[0])
        labels = labels_for(self._converter, spec, port, assignment.local_index if assignment else None,
                            self._config.instance, attempt, lease)
        labels[NODE_LABEL] = node.id
        container: JSONObject = {
            "Image": spec.image,
            "Env": [f"{k}={v}" for k, v in env.items()],
            "Labels": {MANAGED_LABEL: self._config.instance},
            "Init": True,
            "StopGracePeriod": self._config.stop_timeout * 1_000_000_000,
            "Mounts": [_mount(volume) for volume in spec.volumes],
        }
        if spec.command is not None:
            container["Args"] = list(spec.command)
        limits: JSONObject = {"Pids": self._config.service_pids_limit}
        if spec.memory_gb is not None:
            limits["MemoryBytes"] = int(spec.memory_gb * GIB)
        return {
            "Name": spec.container_name,
            "Labels": labels,
            "TaskTemplate": {
                "ContainerSpec": container,
                "Resources": {"Limits": limits},
                "RestartPolicy": {"Condition": "any", "Delay": 1_000_000_000, "MaxAttempts": 0},
                "Placement": {"Constraints": [f"node.id=={node.id}"]},
            },
            "Mode": {"Replicated": {"Replicas": 1}},
            "EndpointSpec": {"Mode": "dnsrr", "Ports": [
                {"Protocol": "tcp", "TargetPort": spec.port, "PublishedPort": port, "PublishMode": "host"}]},
        }

    async def _create_and_wait(self, spec: DeploySpec, node: SwarmNode, assignment: Assignment | None,
                               port: int, lease: Lease | None, progress: Progress) -> Service:
        attempt = secrets.token_hex(8)
        service: Service | None = None
        try:
            service_id = await self._engine.create_service(
                self.service_body(spec, node, assignment, port, attempt, lease))
            service = Service(spec=spec, container_id=service_id, host_port=port,
                              gpu=assignment.local_index if assignment else None, pinned=lease is None,
                              node_name=node.hostname, node_addr=node.addr)
            self._table.track(service)
            progress({"event": "created", "container": service_id[:12], "port": port,
                      "gpu": service.gpu, "node": node.hostname})
            await self._wait_healthy(service, progress)
        except BaseException:
            await asyncio.shield(self._roll_back(spec, service, port, node.hostname, attempt))
            raise
        service.status = "healthy"
        _LOGGER.info("Deployed %s on %s:%s%s", spec.name, node.hostname, port,
                     f", GPU {service.gpu}" if service.gpu is not None else "")
        return service

    async def _roll_back(self, spec: DeploySpec, service: Service | None, port: int, node: str,
                         attempt: str) -> None:
        """Remove the Swarm service and release the port, whatever fails; never raises."""
        try:
            if service is not None:
                self._table.untrack(service)
                await self._engine.remove_service(service.container_id)
        except Exception as err:
            _LOGGER.warning("Could not remove the service of the failed deploy of %s (%s); it will "
                            "be removed when the manager answers", spec.name, err)
            self._table.abandon(attempt, spec.name)
            await self._table.persist()
        finally:
            self._table.release_port(port, node)

    async def _wait_healthy(self, service: Service, progress: Progress) -> None:
        """Wait for its task to run, then for its health path on the node's address."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        timeout = min(service.spec.ready_timeout, self._config.max_ready_timeout)
        attempt = 0
        while True:
            elapsed = loop.time() - started
            if elapsed >= timeout:
                raise HealthTimeout(f"{service.spec.name} did not answer {service.spec.health} with "
                                    f"2xx within {timeout:g} s.", name=service.spec.name,
                                    logs=await self._logs_tail(service))
            tasks = await self._engine.tasks([service.container_id])
            taken = next((t for t in tasks if _port_error(t)), None)
            if taken is not None:  # Swarm retries, each try failing the same way
                raise PortTaken(_task_error(taken))
            failed = next((t for t in tasks if (t.get("Status") or {}).get("State") in
                           ("failed", "rejected", "complete")), None)
            if failed is not None:
                raise ContainerExited(
                    f"{service.spec.name} exited before it became healthy: {_task_error(failed)}",
                    name=service.spec.name, exit_code=_exit_code(failed),
                    logs=await self._logs_tail(service))
            task = latest_task(tasks)
            state = (task or {}).get("Status", {}).get("State", "new")
            if state == "running":
                attempt += 1
                healthy = await self._probe.healthy(service.host_port, service.spec.health,
                                                    min(1.0, timeout - elapsed), host=service.node_addr)
                progress({"event": "health", "attempt": attempt, "healthy": healthy,
                          "elapsed_s": round(loop.time() - started, 3)})
                if healthy:
                    return
            await asyncio.sleep(max(TASK_POLL_S, poll_interval(elapsed)))

    async def _logs_tail(self, service: Service) -> list[str]:
        try:
            return (await self._engine.service_logs(service.container_id, LOG_TAIL_LINES)).splitlines()
        except AgentError:
            return []

    # -- the rest of the Runtime ---------------------------------------------------------

    async def stop(self, service: Service, grace_s: int) -> None:
        """Removing a Swarm service stops its task with the stop grace period."""

    async def discard(self, service: Service) -> None:
        await self._engine.remove_service(service.container_id)

    async def remove_untracked(self, name: str) -> bool:
        found = await self._engine.service(CONTAINER_PREFIX + name)
        if found is None or not self._ours(found):
            return False
        await self._engine.remove_service(found["ID"])
        return True

    async def logs(self, service: Service, tail: int) -> str:
        return await self._engine.service_logs(service.container_id, tail)

    def follow_logs(self, service: Service, tail: int) -> AsyncGenerator[str, None]:
        return self._engine.follow_service_logs(service.container_id, tail)

    async def close(self) -> None:
        pass

    # -- placing again -------------------------------------------------------------------

    async def place_again(self, service: Service, why: str) -> None:
        """Its node is lost (or a port there refused): release what it held there, and put it
        where there is room; pending, with the reason, when nowhere has any."""
        spec, name = service.spec, service.spec.name
        self._table.release_gpu(name)
        self._table.release_port(service.host_port, service.node_name)
        try:
            node, assignment = self._choose(spec, reserve=True)
        except AgentError as err:
            if service.status != "pending":
                self._events.emit("pending", name, why, message=err.message)
            self._table.set_status(service, "pending", reason=err.message)
            return
        port = await self._table.reserve_port(spec.port, set(), frozenset(), node=node.hostname)
        try:
            found = await self._engine.service(service.container_id)
            if found is None:
                raise EngineError(f"The Swarm service of {name} is gone.")
            lease_label = lease_of(found["Spec"].get("Labels") or {})
            lease = Lease(lease_label[0], name, lease_label[1], 0.0) if lease_label else None
            attempt = attempt_of(found["Spec"].get("Labels") or {}) or secrets.token_hex(8)
            body = self.service_body(spec, node, assignment, port, attempt, lease)
            await self._engine.update_service(found["ID"], found["Version"]["Index"], body)
        except AgentError as err:
            self._table.release_gpu(name)
            self._table.release_port(port, node.hostname)
            self._table.set_status(service, "pending", reason=f"could not update the service: {err.message}")
            return
        moved_from = service.node_name
        self._table.relocate(service, node_name=node.hostname, node_addr=node.addr, host_port=port,
                             gpu=assignment.local_index if assignment else None)
        self._table.set_status(service, "rescheduling")
        self._events.emit("rescheduled", name, why, from_node=moved_from, to_node=node.hostname,
                          port=port, gpu=service.gpu)
        _LOGGER.info("Placed %s again on %s:%s (%s)", name, node.hostname, port, why)
        await self._table.persist()


def _mount(volume: str) -> JSONObject:
    parts = volume.split(":")
    read_only = len(parts) == 3 and parts[2] == "ro"
    source, target = parts[0], parts[1]
    return {"Type": "bind" if source.startswith("/") else "volume", "Source": source, "Target": target,
            "ReadOnly": read_only}


def service_from_swarm(converter: cattrs.Converter, found: JSONObject, instance: str,
                       nodes: dict[str, SwarmNode]) -> Service | None:
    """Rebuild a Service from a Swarm service's labels; None when it is not this agent's."""
    labels = (found.get("Spec") or {}).get("Labels") or {}
    what = f"Swarm service {found.get('ID')}"
    recorded = recorded_in(converter, labels, instance, what)
    if recorded is None:
        return None
    if NODE_LABEL not in labels:
        _LOGGER.warning("%s has unusable agent labels: no %s", what, NODE_LABEL)
        return None
    spec, port, gpu = recorded
    node = nodes.get(labels[NODE_LABEL])
    return Service(spec=spec, container_id=found["ID"], host_port=port, gpu=gpu,
                   pinned=lease_of(labels) is None,
                   node_name=node.hostname if node else labels[NODE_LABEL],
                   node_addr=node.addr if node else None)

