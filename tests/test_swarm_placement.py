"""Placement in front of a swarm, as logic: owned reservations, placing again, node identity.

The manager is a small fake (the real swarm is in tests/test_swarm.py): it keeps the
services' specs as the manager would and answers no tasks. What is checked is the agent's
books: who holds which port and GPU on which node, through every re-placement.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any
from unittest.mock import MagicMock

import attrs
import pytest

from deploy_agent.convert import make_converter
from deploy_agent.errors import EngineError, EngineUnavailable
from deploy_agent.events import EventLog
from deploy_agent.gpus import GpuPool
from deploy_agent.models import DeploySpec, JSONObject, Lease, Owner, Service
from deploy_agent.ports import NodePorts
from deploy_agent.probe import HealthProbe
from deploy_agent.state import ATTEMPT_LABEL, StateFile
from deploy_agent.swarm import SwarmEngine, SwarmGpus, SwarmNode, SwarmRuntime, service_from_swarm
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

    async def service(self, name_or_id: str) -> JSONObject | None:
        found = self.services.get(name_or_id) or next(
            (s for s in self.services.values() if s["Spec"]["Name"] == name_or_id), None)
        return copy.deepcopy(found)

    async def create_service(self, body: JSONObject) -> str:
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
        self.services.pop(service_id, None)

    async def tasks(self, service_ids: list[str]) -> list[JSONObject]:
        return []

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
    table = ServiceTable(NodePorts(PORT_RANGE, remote=True), pool, StateFile(tmp_path, CONVERTER))
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
        ports = NodePorts(PORT_RANGE, remote=True).on("n1")
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

    async def test_a_timed_out_create_is_abandoned(self, lab: Lab) -> None:
        lab.see(node("n1", "host1"))
        await lab.refresh()
        lab.manager.create_fails = EngineUnavailable("The Docker engine did not answer")
        with pytest.raises(EngineUnavailable):
            await _launch(lab, "ghost", gpu=True, vram_gb=8)
        [created] = lab.manager.services.values()  # it exists at the manager all the same
        assert lab.table.is_abandoned(created["Spec"]["Labels"][ATTEMPT_LABEL])
        assert lab.table.get("ghost") is None
        assert lab.table.port_holder(8000, "n1") is None
        assert all(v.vram_reserved_gb == 0 for v in lab.table.gpus.views())

    async def test_close_waits_for_rollbacks(self, lab: Lab) -> None:
        lab.see(node("n1", "host1"))
        await lab.refresh()
        lab.manager.create_fails = EngineError("Docker refused to create service")
        with pytest.raises(EngineError):
            await _launch(lab, "refused")
        await lab.runtime.close()
        assert not lab.runtime._rollbacks


def lease_for(name: str) -> Lease:
    return Lease(id="l1", service=name, lease_s=60, expires_at=0.0)


def test_scaled_to_nothing_is_adopted_pending_holding_nothing(tmp_path: Path) -> None:
    nodes = {"n1": node("n1", "host1")}
    table = ServiceTable(NodePorts(PORT_RANGE, remote=True), GpuPool(SwarmGpus()),
                         StateFile(tmp_path, CONVERTER))
    runtime = SwarmRuntime(make_config(tmp_path, swarm=True), MagicMock(spec=SwarmEngine),
                           MagicMock(spec=HealthProbe), table, CONVERTER, SwarmGpus(), EventLog(tmp_path))
    body = runtime.service_body(spec_of("parked"), nodes["n1"], None, 8000, "a1", lease_for("parked"))
    body["Mode"]["Replicated"]["Replicas"] = 0
    found = service_from_swarm(CONVERTER, {"ID": "s1", "Spec": body}, "default", nodes)
    assert found is not None and found.status == "pending"
    table.adopt(found)
    assert table.port_holder(8000, "n1") is None
