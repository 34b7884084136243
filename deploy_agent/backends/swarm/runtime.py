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
import logging
from collections.abc import AsyncGenerator

import attrs
import cattrs

from deploy_agent.backends.engine import memlock_refused, memlock_ulimits, shm_bytes
from deploy_agent.backends.swarm.engine import (
    LIVE_TASK_STATES,
    SwarmEngine,
    SwarmGpus,
    SwarmNode,
    exit_code,
    latest_task,
    port_error,
    task_error,
)
from deploy_agent.config import Config
from deploy_agent.errors import (
    AgentError,
    ContainerExited,
    EngineError,
    EngineUnavailable,
    NoGpu,
    NoGpuCapacity,
    NoPortAvailable,
    PortTaken,
    TaskStillRunning,
    may_have_happened,
)
from deploy_agent.events import EventLog
from deploy_agent.gpus import GIB, Assignment
from deploy_agent.models import (
    CONTAINER_PREFIX,
    MANAGED_LABEL,
    DeploySpec,
    JSONObject,
    Lease,
    Owner,
    Service,
    new_attempt,
)
from deploy_agent.probe import HealthProbe
from deploy_agent.runtime import (
    DROPPED_CAPABILITIES,
    LOG_TAIL_LINES,
    NO_GPU_ENV,
    DryRunOutcome,
    Progress,
    not_ours,
    on_a_free_port,
    wait_healthy,
)
from deploy_agent.state import attempt_of, labels_for, lease_of, recorded_in
from deploy_agent.table import Held, ServiceTable
from deploy_agent.volumes import engine_mount, mounts_of

_LOGGER = logging.getLogger(__name__)

NODE_LABEL = "tidybot.node"  # the node id a service is pinned to
STOPPING_REASON = "stopping: its task still runs; removed once it is gone"
# On a Swarm service the agent is stopping: scaled to nothing on its way out, never waiting
# for room. A stop cut off (a crash, a shutdown) is finished by the next agent, not undone.
ENDING_LABEL = "tidybot.ending"
TASK_POLL_S = 0.2
TASK_GONE_MARGIN_S = 10.0  # past the stop grace, for the node to report its task stopped


@attrs.frozen
class _Launch:
    """One launch of a service: who holds its reservations, and where they are."""

    spec: DeploySpec
    owner: Owner
    node: SwarmNode
    assignment: Assignment | None
    lease: Lease | None
    memlock: bool = True  # asks for unlimited memlock, if a GPU service (--gpu-memlock)


@attrs.frozen
class _TaskWatch:
    """A Swarm service being started: its tasks say whether it runs, failed, or found its
    port taken on the node."""

    engine: SwarmEngine
    probes: HealthProbe
    service: Service

    async def ready(self) -> bool:
        tasks = await self.engine.tasks([self.service.container_id])
        taken = next((t for t in tasks if port_error(t)), None)
        if taken is not None:  # Swarm retries, each try failing the same way
            raise PortTaken(task_error(taken))
        failed = next((t for t in tasks if (t.get("Status") or {}).get("State") in
                       ("failed", "rejected", "complete")), None)
        if failed is not None:
            raise ContainerExited(
                f"{self.service.spec.name} exited before it became healthy: {task_error(failed)}",
                name=self.service.spec.name, exit_code=exit_code(failed), logs=await self.logs())
        task = latest_task(tasks)
        return bool((task or {}).get("Status", {}).get("State", "new") == "running")

    async def probe(self, timeout_s: float) -> bool:
        return await self.probes.healthy(self.service.host_port, self.service.spec.health, timeout_s,
                                         host=self.service.node_addr)

    async def pause(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def logs(self) -> list[str]:
        try:
            return (await self.engine.service_logs(self.service.container_id,
                                                   LOG_TAIL_LINES)).splitlines()
        except AgentError:
            return []


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
        self._rollbacks: set[asyncio.Task[None]] = set()
        # Nodes whose engine can't raise a GPU service's memlock, and what it said: their GPU
        # services start with the engine's default (found out once per node; /health says so).
        self.memlock_refusals: dict[str, str] = {}

    def saw(self, nodes: list[SwarmNode]) -> None:
        """The swarm's nodes as the reconciler just found them: where to place, and their GPUs."""
        self.nodes = {node.id: node for node in nodes}
        self._gpus.update(nodes)

    # -- placement -----------------------------------------------------------------------

    def _choose(self, spec: DeploySpec, owner: Owner | None,
                freeing: Owner | None = None) -> tuple[SwarmNode, Assignment | None]:
        """A node (and GPU) for the spec now, by the same rules as on one node and with no
        await: the GPU reserved for `owner`, or (None) only looked at, for a dry run.
        `freeing`: a reservation about to be let go of, counted as free."""
        if spec.gpu:
            assignment = (self._table.reserve_gpu(owner, spec.vram_gb, freeing) if owner is not None
                          else self._table.gpus.place(spec.vram_gb, freeing=freeing))
            node = self.nodes.get(assignment.node or "")
            if node is None:
                if owner is not None:
                    self._table.release_gpu(owner)
                raise NoGpuCapacity("The GPU's node is gone.", free_gb={})
            return node, assignment
        ready = [n for n in self.nodes.values() if n.ready]
        if not ready:
            raise NoGpuCapacity("No swarm node is ready.", free_gb={})
        counts = {n.id: 0 for n in ready}
        for service in self._table.services():
            if service.node_id in counts and service.owner != freeing and service.status != "pending":
                counts[service.node_id] += 1
        return min(ready, key=lambda n: (counts[n.id], n.hostname, n.id)), None

    async def place(self, spec: DeploySpec, replacing: Service | None) -> DryRunOutcome:
        if replacing is None:
            await self._existing_ours(spec)
        node, assignment = self._choose(spec, None, freeing=replacing.owner if replacing else None)
        same_node = replacing is not None and replacing.node_id == node.id
        freed = {replacing.host_port} if replacing is not None and same_node else set()
        port = await self._table.free_port(spec.port, set(), freed, node=node.id)
        return DryRunOutcome(port, assignment.local_index if assignment else None, already_running=False,
                             pull_needed=None, node_name=node.hostname, node_addr=node.addr,
                             node_id=node.id)

    def _ours(self, service: JSONObject) -> bool:
        labels = (service.get("Spec") or {}).get("Labels") or {}
        return labels.get(MANAGED_LABEL) == self._config.instance

    # -- launch --------------------------------------------------------------------------

    async def remove_stray(self, spec: DeploySpec) -> None:
        found = await self._existing_ours(spec)
        if found is not None:
            await self._end(found["ID"])

    async def _existing_ours(self, spec: DeploySpec) -> JSONObject | None:
        """The Swarm service of this name, if any; Conflict when it isn't this agent's."""
        found = await self._engine.service(spec.container_name)
        if found is not None and not self._ours(found):
            raise not_ours("Swarm service", spec.name)
        return found

    async def launch(self, spec: DeploySpec, progress: Progress, lease: Lease | None) -> Service:
        owner = Owner(spec.name, new_attempt())
        node, assignment = self._choose(spec, owner)
        launch = _Launch(spec, owner, node, assignment, lease,
                         memlock=node.id not in self.memlock_refusals)
        try:
            try:
                return await self._on_a_free_port(launch, progress)
            except ContainerExited as err:
                # A task the node rejected for want of memlock: once more without it (as on
                # one engine), unless the try left something behind.
                if not (launch.memlock and spec.gpu and self._config.gpu_memlock
                        and memlock_refused(err)) or self._table.holds(owner):
                    raise
                refusal = err.message
            service = await self._on_a_free_port(attrs.evolve(launch, memlock=False), progress)
            if node.id not in self.memlock_refusals:
                self.memlock_refusals[node.id] = refusal
                _LOGGER.warning("The engine of %s cannot give GPU services unlimited memlock; "
                                "starting them with its default", node.hostname)
            return service
        except BaseException:
            # A rollback that left it stopping, or abandoned it, keeps its GPU held.
            if assignment is not None and not self._table.holds(owner):
                self._table.release_gpu(owner)
            raise

    async def _on_a_free_port(self, launch: _Launch, progress: Progress) -> Service:
        spec, owner, node = launch.spec, launch.owner, launch.node
        return await on_a_free_port(  # tracked: the deployer writes services.json
            lambda refused: self._table.reserve_port(owner, spec.port, set(), refused, node=node.id),
            lambda port: self._create_and_wait(launch, port, progress),
            node.hostname, spec.name, refuse=lambda port: self._table.refuse_port(port, node.id))

    def service_body(self, spec: DeploySpec, node: SwarmNode, assignment: Assignment | None,
                     port: int, attempt: str, lease: Lease | None,
                     memlock: bool | None = None) -> JSONObject:
        """The Swarm service spec: one replica on `node`, its GPU by UUID, its port in host mode."""
        env = dict(spec.env)
        env.update(self._gpus.handoff(assignment)[0] if assignment is not None else NO_GPU_ENV)
        labels = labels_for(self._converter, spec, port, assignment.local_index if assignment else None,
                            self._config.instance, attempt, lease)
        labels[NODE_LABEL] = node.id
        container: JSONObject = {
            "Image": spec.image,
            "Env": [f"{k}={v}" for k, v in env.items()],
            "Labels": {MANAGED_LABEL: self._config.instance},
            "Init": True,
            "CapabilityDrop": list(DROPPED_CAPABILITIES),
            "StopGracePeriod": self._config.stop_timeout * 1_000_000_000,
            "Mounts": [engine_mount(mount, self._config.instance) for mount in mounts_of(spec, self._config)],
        }
        if spec.command is not None:
            container["Args"] = list(spec.command)
        shm = shm_bytes(spec, self._config.default_shm_gb)
        if shm is not None:  # a service's ContainerSpec has no ShmSize: a tmpfs of that size
            container["Mounts"].append({"Type": "tmpfs", "Target": "/dev/shm",
                                        "TmpfsOptions": {"SizeBytes": shm}})
        wanted = node.id not in self.memlock_refusals if memlock is None else memlock
        ulimits = memlock_ulimits(spec, self._config.gpu_memlock and wanted)
        if ulimits:
            container["Ulimits"] = ulimits
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

    async def _create_and_wait(self, launch: _Launch, port: int, progress: Progress) -> Service:
        """Create the Swarm service on the launch's node and port, wait until it is healthy.
        On any failure it is removed (or, when that can't be known, abandoned)."""
        spec, node = launch.spec, launch.node
        attempt = new_attempt()  # this try's label: what an abandoned create is known by
        service: Service | None = None
        created_unknown = False
        try:
            try:
                service_id = await self._engine.create_service(
                    self.service_body(spec, node, launch.assignment, port, attempt, launch.lease,
                                      launch.memlock))
            except BaseException as err:
                created_unknown = may_have_happened(err)  # a create that timed out may still happen
                raise
            service = Service(spec=spec, container_id=service_id, host_port=port,
                              gpu=launch.assignment.local_index if launch.assignment else None,
                              pinned=launch.lease is None, node_name=node.hostname,
                              node_addr=node.addr, node_id=node.id, attempt=launch.owner.attempt)
            self._table.track(service)
            progress({"event": "created", "container": service_id[:12], "port": port,
                      "gpu": service.gpu, "node": node.hostname, "node_id": node.id})
            await self._wait_healthy(service, progress)
        except BaseException as err:
            # Shielded and tracked: a deploy cancelled at shutdown still rolls back, and
            # close() waits for that before the process exits.
            rollback = asyncio.ensure_future(
                self._roll_back(launch, service, port, attempt, created_unknown, err))
            self._rollbacks.add(rollback)
            rollback.add_done_callback(self._rollbacks.discard)
            await asyncio.shield(rollback)
            raise
        service.status = "healthy"
        _LOGGER.info("Deployed %s on %s:%s%s", spec.name, node.hostname, port,
                     f", GPU {service.gpu}" if service.gpu is not None else "")
        return service

    async def _roll_back(self, launch: _Launch, service: Service | None, port: int, attempt: str,
                         created_unknown: bool, cause: BaseException) -> None:
        """Remove the Swarm service (once its task is gone) and release the port, whatever
        fails; never raises. A create whose outcome is unknown is abandoned: the resync
        removes it if it shows up, and never adopts it."""
        name = launch.spec.name
        _LOGGER.info("Deploy of %s failed or was cancelled (%s); removing its Swarm service",
                     name, type(cause).__name__)
        kept = False
        # What an abandoned service may still use on its node, where no reading shows it: held
        # until a resync finds it removed, or finds it never was.
        held = Held(launch.owner, launch.node.id, port)
        try:
            if created_unknown or (service is not None and isinstance(cause, EngineUnavailable)):
                if service is not None:
                    self._table.untrack(service)
                self._table.abandon(attempt, name, holding=held)
                kept = True
            elif service is not None:
                try:
                    await self._end(service.container_id)
                except TaskStillRunning:
                    # Its task still holds the port and GPU on a node that is up: so does its
                    # record, exited and stopping, until the reconciler sees the task gone.
                    self._table.set_status(service, "exited", STOPPING_REASON)
                    kept = True
                    return
                self._table.untrack(service)
        except Exception as err:
            _LOGGER.warning("Could not remove the service of the failed deploy of %s (%s); it will "
                            "be removed when the manager answers", name, getattr(err, "message", err))
            if service is not None:
                self._table.untrack(service)
            self._table.abandon(attempt, name, holding=held)
            kept = True
        finally:
            if not kept:
                self._table.release_port(launch.owner, port, launch.node.id)
        if self._table.is_abandoned(attempt):
            await self._table.persist()  # so a restart still knows to remove it

    async def _wait_healthy(self, service: Service, progress: Progress) -> None:
        """Wait for its task to run, then for its health path on the node's address."""
        await wait_healthy(service, min(service.spec.ready_timeout, self._config.max_ready_timeout),
                           progress, _TaskWatch(self._engine, self._probe, service),
                           min_pause_s=TASK_POLL_S)

    # -- stopping: only once the task is gone ----------------------------------------------

    async def _scale(self, service_id: str, replicas: int, ending: bool = False) -> JSONObject | None:
        """Run `replicas` copies (0 or 1), marked as ending when it is on its way out; the
        service as it was, None when it is gone."""
        found = await self._engine.service(service_id)
        if found is None:
            return None
        spec = found["Spec"]
        labels = spec.get("Labels") or {}
        marked = not ending or ENDING_LABEL in labels
        if (spec.get("Mode") or {}).get("Replicated", {}).get("Replicas") != replicas or not marked:
            spec = {**spec, "Mode": {"Replicated": {"Replicas": replicas}}}
            if ending:
                spec["Labels"] = {**labels, ENDING_LABEL: "1"}
            await self._engine.update_service(found["ID"], found["Version"]["Index"], spec)
        return found

    def _running_on(self, tasks: list[JSONObject]) -> list[str]:
        """The ready nodes (hostnames) where one of these tasks may still hold a container.
        A task on a node that is down never reports; that node drops it when it is back."""
        return sorted({node.hostname for t in tasks
                       if (t.get("Status") or {}).get("State") in LIVE_TASK_STATES
                       and (node := self.nodes.get(str(t.get("NodeID")))) is not None and node.ready})

    async def still_running(self, service_id: str) -> bool:
        """Whether a task of the service may still hold its VRAM and port on a node that is up."""
        return bool(self._running_on(await self._engine.tasks([service_id])))

    async def _wait_tasks_gone(self, service_id: str, within_s: float) -> None:
        """Until no task of the service may still hold a container (its VRAM and port), or
        `within_s` passed: a task on a node that is down never reports, and stays stale."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within_s
        while True:
            tasks = await self._engine.tasks([service_id])
            if not any((t.get("Status") or {}).get("State") in LIVE_TASK_STATES for t in tasks):
                return
            if loop.time() >= deadline:
                if on_ready := self._running_on(tasks):  # it may still hold VRAM and port there
                    raise TaskStillRunning(
                        f"The task of Swarm service {service_id[:12]} still runs on "
                        f"{', '.join(on_ready)} {within_s:.0f} s after it was told to stop. It "
                        "keeps its port and GPU; the agent removes it once the task is gone.")
                _LOGGER.warning("The task of Swarm service %s has not stopped within %.0f s; its "
                                "node is down, going on", service_id[:12], within_s)
                return
            await asyncio.sleep(TASK_POLL_S)

    async def _end(self, service_id: str, grace_s: int | None = None) -> None:
        """Scale to nothing (marked as ending), wait for the task to be gone, remove the service."""
        grace = self._config.stop_timeout if grace_s is None else grace_s
        if await self._scale(service_id, 0, ending=True) is not None:
            await self._wait_tasks_gone(service_id, grace + TASK_GONE_MARGIN_S)
        await self._engine.remove_service(service_id)

    async def stop(self, service: Service, grace_s: int) -> None:
        """Scale to nothing and return once its task is gone (grace, then kill, on the node);
        TaskStillRunning while it still runs on a node that is up: then it shows as exited,
        stopping, and the reconciler finishes the stop once the task is gone."""
        if await self._scale(service.container_id, 0, ending=True) is not None:
            try:
                await self._wait_tasks_gone(service.container_id, grace_s + TASK_GONE_MARGIN_S)
            except TaskStillRunning:
                self._table.set_status(service, "exited", STOPPING_REASON)
                raise

    async def discard(self, service: Service) -> None:
        """Remove it once its task is gone (a replacement never runs beside it)."""
        await self._end(service.container_id)

    async def remove_untracked(self, name: str) -> bool:
        found = await self._engine.service(CONTAINER_PREFIX + name)
        if found is None or not self._ours(found):
            return False
        await self._end(found["ID"])
        return True

    async def logs(self, service: Service, tail: int) -> str:
        return await self._engine.service_logs(service.container_id, tail)

    def follow_logs(self, service: Service, tail: int) -> AsyncGenerator[str, None]:
        return self._engine.follow_service_logs(service.container_id, tail)

    async def close(self) -> None:
        """Wait for rollbacks still running."""
        await asyncio.gather(*self._rollbacks, return_exceptions=True)

    # -- placing again -------------------------------------------------------------------

    async def place_again(self, service: Service, why: str) -> None:
        """Its node is lost (or a port there refused, or it waits for room): hold a new place
        first, move it there, then let go of the old one. With no room anywhere it is scaled
        to nothing and lets go (pending). EngineError when the manager refuses the move: what
        it held stays held, and the reconciler tries again."""
        spec, name = service.spec, service.spec.name
        if why == "port_taken" and service.status != "pending":
            self._table.refuse_port(service.host_port, service.node_id)
        owner = Owner(name, new_attempt())
        assignment = None
        try:
            node, assignment = self._choose(spec, owner, freeing=service.owner)
            port = await self._table.reserve_port(owner, spec.port, set(), node=node.id)
        except (NoGpu, NoGpuCapacity, NoPortAvailable) as err:
            if assignment is not None:
                self._table.release_gpu(owner)
            await self._park(service, why, err.message)
            return
        try:
            found = await self._engine.service(service.container_id)
            if found is None:
                raise EngineError(f"The Swarm service of {name} is gone.")
            labels = found["Spec"].get("Labels") or {}
            lease_label = lease_of(labels)
            lease = Lease(lease_label[0], name, lease_label[1], 0.0) if lease_label else None
            body = self.service_body(spec, node, assignment, port,
                                     attempt_of(labels) or new_attempt(), lease)
            await self._engine.update_service(found["ID"], found["Version"]["Index"], body)
        except BaseException:
            self._table.release_port(owner, port, node.id)
            if assignment is not None:
                self._table.release_gpu(owner)
            raise
        moved_from, moved_from_id = service.node_name, service.node_id
        self._table.relocate(service, owner, node_id=node.id, node_name=node.hostname,
                             node_addr=node.addr, host_port=port,
                             gpu=assignment.local_index if assignment else None)
        self._table.set_status(service, "rescheduling")
        self._events.emit("rescheduled", name, why, from_node=moved_from, to_node=node.hostname,
                          from_node_id=moved_from_id, to_node_id=node.id, port=port, gpu=service.gpu)
        _LOGGER.info("Placed %s again on %s:%s (%s)", name, node.hostname, port, why)
        await self._table.persist()

    async def _park(self, service: Service, why: str, message: str) -> None:
        """No room anywhere: it runs nowhere (0 replicas, so a node that comes back doesn't
        start it outside the agent's books) and holds nothing until there is room."""
        if service.status == "pending":
            if service.reason != message:
                self._table.set_status(service, "pending", reason=message)
            return
        await self._scale(service.container_id, 0)  # EngineError: it keeps what it holds, tried again
        self._table.park(service, message)
        self._events.emit("pending", service.spec.name, why, message=message)
        await self._table.persist()


def service_from_swarm(converter: cattrs.Converter, found: JSONObject, instance: str,
                       nodes: dict[str, SwarmNode]) -> Service | None:
    """Rebuild a Service from a Swarm service's labels; None when it is not this agent's.
    One scaled to nothing is pending: it waits for room and holds none."""
    spec_doc = found.get("Spec") or {}
    labels = spec_doc.get("Labels") or {}
    what = f"Swarm service {found.get('ID')}"
    recorded = recorded_in(converter, labels, instance, what)
    if recorded is None:
        return None
    if NODE_LABEL not in labels:
        _LOGGER.warning("%s has unusable agent labels: no %s", what, NODE_LABEL)
        return None
    spec, port, gpu = recorded
    node_id = labels[NODE_LABEL]
    node = nodes.get(node_id)
    service = Service(spec=spec, container_id=found["ID"], host_port=port, gpu=gpu,
                      pinned=lease_of(labels) is None,
                      node_name=node.hostname if node else node_id,
                      node_addr=node.addr if node else None, node_id=node_id,
                      attempt=attempt_of(labels) or new_attempt())
    if (spec_doc.get("Mode") or {}).get("Replicated", {}).get("Replicas") == 0:
        service.status, service.reason = "pending", "waiting for room (scaled to 0 replicas)"
    return service
