"""Placement in front of a swarm, as logic: owned reservations, placing again, node identity.

The manager is a small fake (the real swarm is in tests/test_swarm.py): it keeps the
services' specs as the manager would and answers no tasks. What is checked is the agent's
books: who holds which port and GPU on which node, through every re-placement.
"""

from __future__ import annotations

import asyncio
import copy
from pathlib import Path
from typing import Any
from unittest.mock import AsyncMock, MagicMock

import attrs
import pytest
from aiodocker.exceptions import DockerError

from deploy_agent.backends.swarm.engine import SwarmEngine, SwarmGpus, SwarmNode
from deploy_agent.backends.swarm.lock import SwarmLock
from deploy_agent.backends.swarm.reconciler import SwarmReconciler
from deploy_agent.backends.swarm.runtime import ENDING_LABEL, SwarmRuntime, service_from_swarm
from deploy_agent.convert import make_converter
from deploy_agent.errors import (
    EngineError,
    EngineUnavailable,
    HealthTimeout,
    NoGpuCapacity,
    TaskStillRunning,
)
from deploy_agent.events import EventLog
from deploy_agent.gpus import GpuPool
from deploy_agent.models import DeploySpec, JSONObject, Lease, Owner, Service
from deploy_agent.ports import NodePorts
from deploy_agent.probe import HealthProbe
from deploy_agent.registry_auth import RegistryCredentials
from deploy_agent.state import ATTEMPT_LABEL, StateFile
from deploy_agent.table import ServiceTable
from tests.conftest import make_config

CONVERTER = make_converter()
PORT_RANGE = (8000, 8002)


def node(node_id: str, hostname: str, ready: bool = True, gpus: int = 1) -> SwarmNode:
    return SwarmNode(id=node_id, hostname=hostname, addr=f"addr-{node_id}", ready=ready,
                     gpus=tuple({"uuid": f"GPU-{node_id}-{i}", "name": "RTX 4090", "vram_gb": 24.0}
                                for i in range(gpus)))


@attrs.define
class FakeManager:
    """The manager's side of SwarmEngine: services by ID, their specs, no tasks."""

    services: dict[str, JSONObject] = attrs.field(factory=dict)
    create_fails: BaseException | None = None
    update_fails: BaseException | None = None
    created: int = 0
    task_list: dict[str, list[JSONObject]] = attrs.field(factory=dict)  # by service ID
    create_waits: asyncio.Event | None = None  # the manager has the body, the answer waits
    create_received: asyncio.Event = attrs.field(factory=asyncio.Event)
    remove_waits: asyncio.Event | None = None
    swarm_nodes: list[SwarmNode] = attrs.field(factory=list)
    vanishing: str | None = None  # removed right after the next listing of services

    async def nodes(self) -> list[SwarmNode]:
        return list(self.swarm_nodes)

    async def managed_services(self) -> list[JSONObject]:
        listed = copy.deepcopy(list(self.services.values()))
        if self.vanishing is not None:
            self.services.pop(self.vanishing)
        return listed

    async def service(self, name_or_id: str) -> JSONObject | None:
        found = self.services.get(name_or_id) or next(
            (s for s in self.services.values() if s["Spec"]["Name"] == name_or_id), None)
        return copy.deepcopy(found)

    async def create_service(self, body: JSONObject) -> str:
        if self.create_waits is not None:
            service_id = self._store(body)
            self.create_received.set()
            await self.create_waits.wait()
            return service_id
        if self.create_fails is not None:
            if isinstance(self.create_fails, EngineUnavailable):  # it happened all the same
                self._store(body)
            raise self.create_fails
        return self._store(body)

    def _store(self, body: JSONObject) -> str:
        self.created += 1
        service_id = f"svc{self.created}".ljust(25, "0")
        self.services[service_id] = {"ID": service_id, "Version": {"Index": 1}, "Spec": copy.deepcopy(body)}
        return service_id

    async def update_service(self, service_id: str, version: int, spec: JSONObject) -> None:
        if self.update_fails is not None:
            raise self.update_fails
        found = self.services[service_id]
        assert found["Version"]["Index"] == version
        found["Spec"], found["Version"] = copy.deepcopy(spec), {"Index": version + 1}

    async def remove_service(self, service_id: str) -> None:
        if self.remove_waits is not None:
            await self.remove_waits.wait()
        self.services.pop(service_id, None)

    async def tasks(self, service_ids: list[str]) -> list[JSONObject]:
        """As dockerd does: a filter naming a service that is gone is a 404 for the whole call."""
        if missing := [sid for sid in service_ids if sid not in self.services]:
            raise EngineError(f"service {missing[0]} not found")
        return [task for sid in service_ids for task in self.task_list.get(sid, [])]

    def replicas(self, service_id: str) -> int:
        return int(self.services[service_id]["Spec"]["Mode"]["Replicated"]["Replicas"])

    def node_of(self, service_id: str) -> str:
        return str(self.services[service_id]["Spec"]["TaskTemplate"]["Placement"]["Constraints"][0])


@attrs.define
class Lab:
    manager: FakeManager
    runtime: SwarmRuntime
    table: ServiceTable
    events: EventLog

    def see(self, *nodes: SwarmNode) -> None:
        self.runtime.saw(list(nodes))

    async def up(self, *nodes: SwarmNode) -> None:
        """These nodes, as the manager lists them and the runtime and GPU pool saw them."""
        self.manager.swarm_nodes = list(nodes)
        self.see(*nodes)
        await self.refresh()

    async def refresh(self) -> None:
        await self.table.refresh_gpus()

    def adopt(self, name: str, node_id: str, port: int, gpu: int | None = None,
              vram_gb: float = 0) -> Service:
        """A service running on `node_id`, as the manager has it and the table adopted it."""
        spec = spec_of(name, gpu is not None, vram_gb)
        nodes = self.runtime.nodes
        body = self.runtime.service_body(spec, nodes[node_id], None, port, "a-" + name, None)
        if gpu is not None:
            body["Labels"]["tidybot.gpu"] = str(gpu)
        service_id = self.manager._store(body)
        found = service_from_swarm(CONVERTER, self.manager.services[service_id], "default", nodes)
        assert found is not None
        found.status = "healthy"
        self.table.adopt(found)
        return found


def spec_of(name: str, gpu: bool = False, vram_gb: float = 0) -> DeploySpec:
    return CONVERTER.structure({"name": name, "image": "img:1", "gpu": gpu, "vram_gb": vram_gb},
                               DeploySpec)


@pytest.fixture
async def lab(tmp_path: Path) -> Lab:
    gpus = SwarmGpus()
    pool = GpuPool(gpus)
    table = ServiceTable(NodePorts(PORT_RANGE), pool, StateFile(tmp_path, CONVERTER))
    manager = FakeManager()
    events = EventLog(tmp_path)
    probe = MagicMock(spec=HealthProbe)
    config = make_config(tmp_path, port_range=PORT_RANGE, swarm=True)
    engine: Any = manager  # the SwarmEngine calls SwarmRuntime makes, nothing else
    runtime = SwarmRuntime(config, engine, probe, table, CONVERTER, gpus, events)
    return Lab(manager, runtime, table, events)


def kinds(lab: Lab, name: str) -> list[tuple[str, str | None]]:
    return [(e.kind, e.reason) for e in lab.events.since(None, 1000) if e.service == name]


class TestOwnedPorts:
    """A release names its owner: nothing frees a port that another service holds."""

    async def test_a_pending_service_never_frees_a_port_twice(self, lab: Lab) -> None:
        """The scenario: a service goes pending, each resync releases its old port again,
        and two services end up on port 8000 of the same node."""
        lab.see(node("n1", "host1"), node("n2", "host2"))
        await lab.refresh()
        waiting = lab.adopt("waiting", "n2", 8000, gpu=0, vram_gb=20)
        lab.adopt("full", "n1", 8000, gpu=0, vram_gb=20)
        lab.see(node("n1", "host1"), node("n2", "host2", ready=False))
        await lab.refresh()
        await lab.runtime.place_again(waiting, "node_down")  # no GPU has 20 GB: pending
        assert waiting.status == "pending"
        lab.see(node("n1", "host1"), node("n2", "host2"))  # n2 is back: someone else takes 8000
        newcomer = Owner("newcomer", "x")
        assert await lab.table.reserve_port(newcomer, 8000, set(), node="n2") == 8000
        lab.see(node("n1", "host1"), node("n2", "host2", ready=False))
        await lab.refresh()
        for _ in range(3):  # resyncs: still no room
            await lab.runtime.place_again(waiting, "pending")
        assert lab.table.port_holder(8000, "n2") == newcomer
        assert await lab.table.reserve_port(Owner("third", "y"), 8000, set(), node="n2") == 8001
        assert kinds(lab, "waiting") == [("pending", "node_down")]  # once, not once per pass

    async def test_releasing_what_another_holds_does_nothing(self, tmp_path: Path) -> None:
        ports = NodePorts(PORT_RANGE).on("n1")
        holder, other = Owner("a", "1"), Owner("a", "2")  # the same name, another deploy of it
        port = await ports.reserve(holder, 8000, set())
        assert not ports.release(other, port)
        assert ports.holder(port) == holder
        assert ports.release(holder, port) and ports.holder(port) is None
        assert not ports.release(holder, port)  # twice: logged, nothing happens


class TestPlacingAgain:
    """The old reservation is kept until the new one is held; no room leaks nothing."""

    async def test_no_port_leaks_nothing_and_parks_the_service(self, lab: Lab) -> None:
        lab.see(node("n1", "host1", gpus=2), node("n2", "host2"))
        await lab.refresh()
        moving = lab.adopt("moving", "n2", 8000, gpu=0, vram_gb=8)
        for port in PORT_RANGE[0], PORT_RANGE[0] + 1, PORT_RANGE[1]:  # n1 has no port left
            await lab.table.reserve_port(Owner(f"p{port}", "x"), port, set(), node="n1")
        lab.see(node("n1", "host1", gpus=2), node("n2", "host2", ready=False))
        await lab.refresh()
        await lab.runtime.place_again(moving, "node_down")  # NoPortAvailable: no exception
        assert moving.status == "pending" and "port" in (moving.reason or "")
        assert lab.manager.replicas(moving.container_id) == 0  # runs nowhere
        assert all(view.vram_reserved_gb == 0 for view in lab.table.gpus.views())  # none leaked
        assert lab.table.port_holder(8000, "n2") is None  # and it let go of its old port

    async def test_a_refused_port_is_not_offered_again_on_that_node(self, lab: Lab) -> None:
        lab.see(node("n1", "host1"))
        await lab.refresh()
        service = lab.adopt("squatted", "n1", 8000)
        await lab.runtime.place_again(service, "port_taken")
        assert service.host_port == 8001 and service.status == "rescheduling"
        assert lab.table.port_holder(8000, "n1") is None  # the old one let go, after the new
        assert await lab.table.reserve_port(Owner("next", "x"), 8000, set(), node="n1") == 8002
        body = lab.manager.services[service.container_id]["Spec"]
        assert body["EndpointSpec"]["Ports"][0]["PublishedPort"] == 8001
        assert body["Mode"]["Replicated"]["Replicas"] == 1

    async def test_a_full_gpu_moves_with_old_and_new_held_at_once(self, lab: Lab) -> None:
        """Port taken on a node whose only GPU it fills: it may stay on that GPU."""
        lab.see(node("n1", "host1"))
        await lab.refresh()
        service = lab.adopt("big", "n1", 8000, gpu=0, vram_gb=24)
        await lab.runtime.place_again(service, "port_taken")
        assert (service.gpu, service.host_port) == (0, 8001)
        [view] = lab.table.gpus.views()
        assert view.vram_reserved_gb == 24  # the old reservation is gone, the new one held

    async def test_a_refused_update_keeps_what_it_held(self, lab: Lab) -> None:
        lab.see(node("n1", "host1", gpus=2), node("n2", "host2"))
        await lab.refresh()
        service = lab.adopt("kept", "n2", 8000, gpu=0, vram_gb=8)
        lab.see(node("n1", "host1", gpus=2), node("n2", "host2", ready=False))
        await lab.refresh()
        lab.manager.update_fails = EngineError("Docker refused to update service")
        with pytest.raises(EngineError):
            await lab.runtime.place_again(service, "node_down")
        assert (service.node_id, service.host_port) == ("n2", 8000)
        assert lab.table.port_holder(8000, "n2") == service.owner
        assert lab.table.port_holder(8000, "n1") is None  # the new one was let go of
        assert sum(v.vram_reserved_gb for v in lab.table.gpus.views()) == 8

    async def test_a_pending_service_starts_again_when_there_is_room(self, lab: Lab) -> None:
        lab.see(node("n1", "host1"), node("n2", "host2"))
        await lab.refresh()
        waiting = lab.adopt("waiting", "n2", 8000, gpu=0, vram_gb=20)
        blocker = lab.adopt("blocker", "n1", 8000, gpu=0, vram_gb=20)
        lab.see(node("n1", "host1"), node("n2", "host2", ready=False))
        await lab.refresh()
        await lab.runtime.place_again(waiting, "node_down")
        assert waiting.status == "pending"
        lab.table.forget(blocker)
        await lab.runtime.place_again(waiting, "pending")
        assert (waiting.status, waiting.node_id) == ("rescheduling", "n1")
        assert lab.manager.replicas(waiting.container_id) == 1
        assert lab.manager.node_of(waiting.container_id) == "node.id==n1"
        assert ("rescheduled", "pending") in kinds(lab, "waiting")


class TestNodeIdentity:
    """A node is its ID: one that re-joined under its hostname is another node."""

    async def test_a_rejoined_hostname_is_a_new_node(self, lab: Lab) -> None:
        lab.see(node("old", "gpu-box", ready=False), node("new", "gpu-box"))
        await lab.refresh()
        views = lab.table.gpus.views()
        assert sorted((v.node_id, v.id) for v in views) == [("new", 0), ("old", 0)]
        outcome = await lab.runtime.place(spec_of("svc", gpu=True, vram_gb=8), None)
        assert outcome.node_id == "new" and outcome.node_name == "gpu-box"
        service = await _launch(lab, "pinned", gpu=True, vram_gb=8)
        assert lab.manager.node_of(service.container_id) == "node.id==new"


async def _launch(lab: Lab, name: str, **fields: Any) -> Service:
    """A launch whose health wait is skipped: the fake has no tasks to watch."""
    async def healthy(service: Service, progress: Any) -> None:
        del service, progress
    lab.runtime._wait_healthy = healthy  # type: ignore[method-assign]
    return await lab.runtime.launch(spec_of(name, **fields), lambda event: None, None)


class TestUnknownCreates:
    """A create that timed out may still have happened: abandoned, never adopted."""

    async def test_a_timed_out_create_is_abandoned(self, lab: Lab, tmp_path: Path) -> None:
        """It may run a task on its node, where no reading shows it: its port and GPU stay
        held (nobody else is placed there) until the resync has removed it."""
        await lab.up(node("n1", "host1"))
        lab.manager.create_fails = EngineUnavailable("The Docker engine did not answer")
        with pytest.raises(EngineUnavailable):
            await _launch(lab, "ghost", gpu=True, vram_gb=24)
        [created] = lab.manager.services.values()  # it exists at the manager all the same
        assert lab.table.is_abandoned(created["Spec"]["Labels"][ATTEMPT_LABEL])
        assert lab.table.get("ghost") is None
        assert lab.table.port_holder(8000, "n1") is not None
        with pytest.raises(NoGpuCapacity):  # its GPU is not handed to the next deploy
            lab.table.reserve_gpu(Owner("next", "x"), 24)
        await reconciler_for(lab, tmp_path).resync_logged()
        assert not lab.manager.services  # removed, never adopted
        assert lab.table.port_holder(8000, "n1") is None
        assert all(v.vram_reserved_gb == 0 for v in lab.table.gpus.views())

    async def test_what_a_create_that_never_happened_held_comes_back(
            self, lab: Lab, tmp_path: Path) -> None:
        await lab.up(node("n1", "host1"))
        lab.manager.create_fails = engine_error(500, "context deadline exceeded")  # never stored
        with pytest.raises(EngineError):
            await _launch(lab, "never", gpu=True, vram_gb=24)
        assert lab.table.port_holder(8000, "n1") is not None
        await reconciler_for(lab, tmp_path).resync_logged()  # the manager lists no such service
        assert lab.table.port_holder(8000, "n1") is None
        assert all(v.vram_reserved_gb == 0 for v in lab.table.gpus.views())

    async def test_a_create_cancelled_on_its_way_is_abandoned(self, lab: Lab) -> None:
        """Shutdown cancels a deploy while the manager works on the create: it may still
        happen, so it is abandoned, never adopted later as a service nobody asked for."""
        lab.see(node("n1", "host1"))
        await lab.refresh()
        lab.manager.create_waits = asyncio.Event()
        launching = asyncio.create_task(_launch(lab, "cut", gpu=True, vram_gb=8))
        await lab.manager.create_received.wait()
        launching.cancel()
        with pytest.raises(asyncio.CancelledError):
            await launching
        [created] = lab.manager.services.values()
        assert lab.table.is_abandoned(created["Spec"]["Labels"][ATTEMPT_LABEL])
        assert lab.table.port_holder(8000, "n1") is not None  # held until a resync knows

    async def test_a_server_error_on_create_is_abandoned_a_refusal_is_not(
            self, lab: Lab, tmp_path: Path) -> None:
        lab.see(node("n1", "host1"))
        await lab.refresh()
        lab.manager.create_fails = engine_error(500, "context deadline exceeded")
        with pytest.raises(EngineError):
            await _launch(lab, "quorum")
        lab.manager.create_fails = engine_error(400, "invalid mount config")
        with pytest.raises(EngineError):
            await _launch(lab, "invalid")
        saved = StateFile(tmp_path, CONVERTER).load()  # what a restart will know
        assert saved is not None and [entry.name for entry in saved.abandoned] == ["quorum"]

    async def test_close_waits_for_rollbacks(self, lab: Lab) -> None:
        """A deploy cancelled while its service is removed: close() returns only once the
        removal is done."""
        lab.see(node("n1", "host1"))
        await lab.refresh()
        waiting = asyncio.Event()

        async def never_healthy(service: Service, progress: Any) -> None:
            del service, progress
            waiting.set()
            await asyncio.Event().wait()
        lab.runtime._wait_healthy = never_healthy  # type: ignore[method-assign]
        launching = asyncio.create_task(
            lab.runtime.launch(spec_of("slow-rollback"), lambda event: None, None))
        await waiting.wait()  # created and tracked; now waiting to be healthy
        lab.manager.remove_waits = asyncio.Event()
        launching.cancel()
        closing = asyncio.create_task(lab.runtime.close())
        await asyncio.sleep(0.05)
        assert not closing.done() and lab.manager.services  # the rollback is still removing
        lab.manager.remove_waits.set()
        await closing
        assert not lab.manager.services
        with pytest.raises(asyncio.CancelledError):
            await launching


def engine_error(status: int, message: str) -> EngineError:
    """An EngineError as the adapter raises it from the engine's answer."""
    try:
        raise EngineError(f"Docker refused to create service: {message}") from DockerError(
            status, message)
    except EngineError as err:
        return err


class TestStopsWaitForTheTask:
    """A stop returns once the task is gone; one that still runs on a node that is up keeps
    its port and GPU (an error, tried again), one on a node that is down does not block."""

    async def test_a_task_still_running_on_a_ready_node_fails_the_stop(
            self, lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr("deploy_agent.backends.swarm.runtime.TASK_GONE_MARGIN_S", 0.05)
        lab.see(node("n1", "host1"))
        await lab.refresh()
        stuck = lab.adopt("stuck", "n1", 8000, gpu=0, vram_gb=24)
        lab.manager.task_list[stuck.container_id] = [running_task(stuck, "n1")]
        with pytest.raises(TaskStillRunning, match="still runs on host1"):
            await lab.runtime.stop(stuck, 0)
        assert lab.table.port_holder(8000, "n1") == stuck.owner  # nothing freed
        labels = lab.manager.services[stuck.container_id]["Spec"]["Labels"]
        assert labels[ENDING_LABEL] == "1" and lab.manager.replicas(stuck.container_id) == 0

    async def test_a_task_on_a_node_that_is_down_does_not_block(
            self, lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr("deploy_agent.backends.swarm.runtime.TASK_GONE_MARGIN_S", 0.05)
        lab.see(node("n1", "host1"))
        await lab.refresh()
        lost = lab.adopt("lost", "n1", 8000)
        lab.manager.task_list[lost.container_id] = [running_task(lost, "n1")]
        lab.see(node("n1", "host1", ready=False))
        await lab.runtime.stop(lost, 0)  # returns: the node will drop it when it comes back

    async def test_parking_is_not_ending(self, lab: Lab) -> None:
        lab.see(node("n1", "host1"), node("n2", "host2", ready=False))
        await lab.refresh()
        waiting = lab.adopt("waiting", "n2", 8000, gpu=0, vram_gb=30)
        await lab.runtime.place_again(waiting, "node_down")
        assert waiting.status == "pending"
        assert ENDING_LABEL not in lab.manager.services[waiting.container_id]["Spec"]["Labels"]


def running_task(service: Service, node_id: str) -> JSONObject:
    return {"ID": f"task-{service.spec.name}", "ServiceID": service.container_id,
            "NodeID": node_id, "Status": {"State": "running"}}


class TestOneRefusalPerService:
    """A service removed between the listing and the task list is that service's refusal:
    the others are still followed in the same pass."""

    async def test_a_vanished_service_does_not_skip_the_pass(self, lab: Lab, tmp_path: Path) -> None:
        await lab.up(node("n1", "host1"))
        gone = lab.adopt("gone", "n1", 8000)
        crashing = lab.adopt("crashing", "n1", 8001)
        lab.manager.task_list[crashing.container_id] = [
            {"ID": "t1", "ServiceID": crashing.container_id, "NodeID": "n1",
             "CreatedAt": "2020-01-01T00:00:00Z", "Status": {"State": "failed", "Err": "exit 3"},
             "DesiredState": "running"}]
        lab.manager.vanishing = gone.container_id
        reconciler = reconciler_for(lab, tmp_path)
        await reconciler.resync_logged()
        assert list(reconciler.refusals) == ["gone"]
        assert ("crashed", None) in kinds(lab, "crashing")  # followed all the same
        assert reconciler.resyncs == 1
        assert not {"engine_lost", "engine_back"} & {e.kind for e in lab.events.since(None, 100)}


def lease_for(name: str) -> Lease:
    return Lease(id="l1", service=name, lease_s=60, expires_at=0.0)


def test_scaled_to_nothing_is_adopted_pending_holding_nothing(tmp_path: Path) -> None:
    nodes = {"n1": node("n1", "host1")}
    table = ServiceTable(NodePorts(PORT_RANGE), GpuPool(SwarmGpus()),
                         StateFile(tmp_path, CONVERTER))
    runtime = SwarmRuntime(make_config(tmp_path, swarm=True), MagicMock(spec=SwarmEngine),
                           MagicMock(spec=HealthProbe), table, CONVERTER, SwarmGpus(), EventLog(tmp_path))
    body = runtime.service_body(spec_of("parked"), nodes["n1"], None, 8000, "a1", lease_for("parked"))
    body["Mode"]["Replicated"]["Replicas"] = 0
    found = service_from_swarm(CONVERTER, {"ID": "s1", "Spec": body}, "default", nodes)
    assert found is not None and found.status == "pending"
    table.adopt(found)
    assert table.port_holder(8000, "n1") is None


def reconciler_for(lab: Lab, tmp_path: Path, node_grace_s: float = 60.0) -> SwarmReconciler:
    """The Swarm reconciler over the lab's fake manager; every probe answers healthy."""
    probe = MagicMock(spec=HealthProbe)
    probe.healthy_all = AsyncMock(side_effect=lambda targets, timeout: [True] * len(targets))
    engine: Any = lab.manager
    lock = MagicMock(spec=SwarmLock)
    lock.lost = asyncio.Event()
    return SwarmReconciler(
        lab.table, engine, probe, StateFile(tmp_path, CONVERTER), CONVERTER, lab.events, 1.0,
        "default", runtime=lab.runtime, node_grace_s=node_grace_s, lock=lock)


class TestStopsThatCannotFinishYet:
    """A task that outlives its stop on a node that is up keeps its port and GPU, shows as
    exited (stopping), is never started again, and is removed once the task is gone."""

    async def test_a_failed_stop_is_finished_by_the_resync(
            self, lab: Lab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr("deploy_agent.backends.swarm.runtime.TASK_GONE_MARGIN_S", 0.05)
        nodes = [node("n1", "host1"), node("n2", "host2")]
        await lab.up(*nodes)
        stuck = lab.adopt("stuck", "n1", 8000, gpu=0, vram_gb=24)
        lab.manager.task_list[stuck.container_id] = [running_task(stuck, "n1")]
        with pytest.raises(TaskStillRunning):
            await lab.runtime.stop(stuck, 0)
        assert stuck.status == "exited"  # a deploy of the same spec replaces it, not "already running"
        reconciler = reconciler_for(lab, tmp_path, node_grace_s=0.0)
        await reconciler.resync_logged()  # n1 is up and its task still runs: kept, as it is
        assert lab.table.get("stuck") is stuck and lab.manager.replicas(stuck.container_id) == 0
        assert lab.table.port_holder(8000, "n1") == stuck.owner
        assert sum(v.vram_reserved_gb for v in lab.table.gpus.views()) == 24
        lab.manager.task_list[stuck.container_id] = []  # gone at last
        await reconciler.resync_logged()
        assert lab.table.get("stuck") is None and not lab.manager.services
        assert lab.table.port_holder(8000, "n1") is None
        assert sum(v.vram_reserved_gb for v in lab.table.gpus.views()) == 0
        assert kinds(lab, "stuck") == [("removed", "stop_finished")]

    async def test_a_stopping_service_whose_node_goes_down_is_never_moved(
            self, lab: Lab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr("deploy_agent.backends.swarm.runtime.TASK_GONE_MARGIN_S", 0.05)
        nodes = [node("n1", "host1"), node("n2", "host2")]
        await lab.up(*nodes)
        stuck = lab.adopt("stuck", "n1", 8000)
        lab.manager.task_list[stuck.container_id] = [running_task(stuck, "n1")]
        with pytest.raises(TaskStillRunning):
            await lab.runtime.stop(stuck, 0)
        lab.manager.swarm_nodes = [node("n1", "host1", ready=False), nodes[1]]
        await reconciler_for(lab, tmp_path, node_grace_s=0.0).resync_logged()
        assert lab.table.get("stuck") is None and not lab.manager.services  # finished, not moved
        assert kinds(lab, "stuck") == [("removed", "stop_finished")]

    async def test_a_rollback_keeps_what_a_running_task_holds(
            self, lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr("deploy_agent.backends.swarm.runtime.TASK_GONE_MARGIN_S", 0.05)
        lab.see(node("n1", "host1"))
        await lab.refresh()

        async def unhealthy(service: Service, progress: Any) -> None:
            del progress
            lab.manager.task_list[service.container_id] = [running_task(service, "n1")]
            raise HealthTimeout("never answered", name=service.spec.name)
        lab.runtime._wait_healthy = unhealthy  # type: ignore[method-assign]
        with pytest.raises(HealthTimeout):
            await lab.runtime.launch(spec_of("slow", gpu=True, vram_gb=24), lambda event: None, None)
        kept = lab.table.service("slow")
        assert kept.status == "exited" and "stopping" in (kept.reason or "")
        assert lab.table.port_holder(8000, "n1") == kept.owner
        assert sum(v.vram_reserved_gb for v in lab.table.gpus.views()) == 24


def test_shared_memory_in_a_swarm_service(tmp_path: Path) -> None:
    """A Swarm ContainerSpec has no ShmSize: /dev/shm is a tmpfs of the size."""
    nodes = {"n1": node("n1", "host1")}
    table = ServiceTable(NodePorts(PORT_RANGE), GpuPool(SwarmGpus()), StateFile(tmp_path, CONVERTER))
    runtime = SwarmRuntime(make_config(tmp_path, swarm=True, default_shm_gb=1.5), MagicMock(spec=SwarmEngine),
                           MagicMock(spec=HealthProbe), table, CONVERTER, SwarmGpus(), EventLog(tmp_path))
    gpu = runtime.service_body(spec_of("ml", gpu=True, vram_gb=4), nodes["n1"], None, 8000, "a1", None)
    container = gpu["TaskTemplate"]["ContainerSpec"]
    assert {"Type": "tmpfs", "Target": "/dev/shm", "TmpfsOptions": {"SizeBytes": int(1.5 * 2**30)}} \
        in container["Mounts"]
    plain = runtime.service_body(spec_of("web"), nodes["n1"], None, 8001, "a2", None)["TaskTemplate"]
    assert not any(
        m["Target"] == "/dev/shm" for m in plain["ContainerSpec"]["Mounts"])
    assert container["Ulimits"] == [{"Name": "memlock", "Soft": -1, "Hard": -1}]  # GPU: unlimited
    assert "Ulimits" not in plain["ContainerSpec"]


def test_a_swarm_service_is_created_with_its_registry_credentials(tmp_path: Path) -> None:
    """The X-Registry-Auth of the image's registry goes with the create, so the node that
    runs the task pulls with it (the CLI's --with-registry-auth); none without a credential."""
    import asyncio
    import base64
    import json

    config = tmp_path / "config.json"
    config.write_text(json.dumps({"auths": {"registry.lab:5000": {
        "auth": base64.b64encode(b"lab:s3cret").decode()}}}))
    engine = SwarmEngine(MagicMock(), MagicMock(), credentials=RegistryCredentials(config))
    sent: list[dict[str, str] | None] = []

    async def post_json(action: str, path: str, body: object, params: object = None,
                        headers: dict[str, str] | None = None) -> dict[str, str]:
        sent.append(headers)
        return {"ID": "svc1"}

    engine.post_json = post_json  # type: ignore[method-assign]
    body = {"Name": "tidybot-x", "TaskTemplate": {"ContainerSpec": {"Image": "registry.lab:5000/x:1"}}}
    asyncio.run(engine.create_service(body))
    asyncio.run(engine.create_service({**body, "TaskTemplate": {"ContainerSpec": {"Image": "other.lab/x"}}}))
    assert sent[1] == {}
    assert sent[0] is not None
    header = json.loads(base64.urlsafe_b64decode(sent[0]["X-Registry-Auth"]))
    assert header == {"username": "lab", "password": "s3cret", "serveraddress": "registry.lab:5000"}
