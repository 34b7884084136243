"""The queue, eviction and preemption in-process (a real Deployer, DockerRuntime and table over
a stand-in engine and one simulated 24 GB GPU): each finding of the attacker's and fault
injector's review of #23, as a test that failed before its fix."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path
from typing import Any
from unittest.mock import AsyncMock, MagicMock

import pytest

from deploy_agent.backends.docker.runtime import DockerRuntime
from deploy_agent.backends.engine import Engine
from deploy_agent.client.nodes import AsyncComputeNodes
from deploy_agent.convert import make_converter, parse_deploy_request
from deploy_agent.deployer import Deployer
from deploy_agent.errors import NO_ROOM_RETRY_AFTER_S, AgentError, EngineError, QueueFull, ServiceNotFound
from deploy_agent.events import EventLog
from deploy_agent.gpus import FakeGpus, GpuPool
from deploy_agent.models import ColdStart, DeployRequest
from deploy_agent.ports import NodePorts
from deploy_agent.probe import HealthProbe
from deploy_agent.state import StateFile
from deploy_agent.table import ServiceTable
from tests.conftest import make_config
from tests.standins import stand_in_node

CONVERTER = make_converter()
PORTS = (29450, 29499)
IDS = itertools.count()


def engine(**overrides: Any) -> Any:
    async def never_exits(container_id: str) -> int:
        await asyncio.sleep(3600)
        return 0
    stand_in = MagicMock(spec=Engine)
    stand_in.inspect = AsyncMock(return_value=None)
    stand_in.has_image = AsyncMock(return_value=True)
    stand_in.published_ports = AsyncMock(return_value=set())
    stand_in.create = AsyncMock(side_effect=lambda *args, **kwargs: f"{next(IDS):064x}")
    stand_in.start = AsyncMock(return_value=None)
    stand_in.wait_exit = AsyncMock(side_effect=never_exits)
    stand_in.logs_tail = AsyncMock(return_value=[])
    stand_in.remove = AsyncMock(return_value=None)
    stand_in.stop = AsyncMock(return_value=None)
    for key, value in overrides.items():
        setattr(stand_in, key, value)
    return stand_in


class Node:
    """One node in-process: its deployer, table, events and stand-in engine."""

    def __init__(self, deployer: Deployer, table: ServiceTable, events: EventLog, stand_in: Any) -> None:
        self.deployer, self.table, self.events, self.engine = deployer, table, events, stand_in

    def reserved(self) -> float:
        return self.table.gpus.views()[0].vram_reserved_gb

    def kinds(self, name: str) -> list[tuple[str, str | None]]:
        return [(e.kind, e.reason) for e in self.events.since(None, 500) if e.service == name]

    async def close(self) -> None:
        await self.deployer.close()


@pytest.fixture
async def make(tmp_path: Path) -> Any:
    made: list[Node] = []

    async def build(stand_in: Any = None, cold_start_of: Any = lambda image: None,
                    on_deployed: Any = None, **config: Any) -> Node:
        pool = GpuPool(FakeGpus("RTX 4090:24"))
        await pool.refresh({})
        state = tmp_path / f"node{len(made)}"
        state.mkdir()
        table = ServiceTable(NodePorts(PORTS), pool, StateFile(state, CONVERTER))
        probe = MagicMock(spec=HealthProbe)
        probe.healthy = AsyncMock(return_value=True)
        settings = make_config(state, port_range=PORTS, **{"min_resident_s": 0.0, **config})
        stand_in = stand_in or engine()
        events = EventLog(state)
        node = Node(Deployer(settings, DockerRuntime(settings, stand_in, probe, table, CONVERTER), table,
                             events, cold_start_of=cold_start_of,
                             **({"on_deployed": on_deployed} if on_deployed else {})),
                    table, events, stand_in)
        made.append(node)
        return node
    yield build
    for node in made:
        await node.close()


def req(name: str, vram_gb: float, **body: Any) -> DeployRequest:
    return parse_deploy_request(CONVERTER, {"name": name, "image": body.pop("image", "img:1"),
                                            "port": 8000, "gpu": True, "vram_gb": vram_gb,
                                            "ready_timeout": 1, **body})


async def outcome(call: Any) -> tuple[str, Any]:
    try:
        done = await call
        return "ok", done.service.spec.name
    except AgentError as err:
        return "err", err.code


async def idle(node: Node, name: str, vram_gb: float) -> None:
    held = await node.deployer.deploy(req(name, vram_gb, lease_s=600, keep_warm_s=300))
    assert held.lease is not None
    await node.deployer.release(name, held.lease.id)


async def until(condition: Any, bound_s: float = 10) -> None:
    """Until `condition()` holds, within a bound: for what a task did, not for a time it took."""
    for _ in range(int(bound_s / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"not so within {bound_s} s")


async def until_queued(node: Node, name: str) -> None:
    await until(lambda: node.deployer.admission.queued(name))


class TestRecordedColdStarts:
    """The queue's Retry-After and eviction's cost use what was measured, not constants."""

    async def test_a_full_queue_says_when_its_head_could_have_started(self, make: Any) -> None:
        recorded = {"slow:1": ColdStart(pull_s=40.0, start_s=2.0, healthy_s=0.5, pulled=True)}
        node = await make(cold_start_of=recorded.get, max_queue=1)
        await node.deployer.deploy(req("held", 20, lease_s=60))
        head = asyncio.ensure_future(outcome(node.deployer.deploy(req("head", 8, image="slow:1", wait_s=30))))
        await until_queued(node, "head")
        with pytest.raises(QueueFull) as full:
            await node.deployer.deploy(req("next", 8, wait_s=30))
        assert full.value.extra["retry_after_s"] == 43  # ceil(42.5)
        node.deployer.admission.close()  # the head is refused, as at shutdown
        assert await head == ("err", "no_gpu_capacity")

    async def test_an_unrecorded_head_gets_the_default(self, make: Any) -> None:
        node = await make(max_queue=1)
        await node.deployer.deploy(req("held", 20, lease_s=60))
        head = asyncio.ensure_future(outcome(node.deployer.deploy(req("head", 8, wait_s=30))))
        await until_queued(node, "head")
        with pytest.raises(QueueFull) as full:
            await node.deployer.deploy(req("next", 8, wait_s=30))
        assert full.value.extra["retry_after_s"] == NO_ROOM_RETRY_AFTER_S
        node.deployer.admission.close()
        assert await head == ("err", "no_gpu_capacity")

    async def test_eviction_keeps_the_service_whose_cold_start_was_longest(self, make: Any) -> None:
        node = await make()
        await idle(node, "heavy", 10)
        await idle(node, "light", 10)
        node.table.service("heavy").cold_start = ColdStart(300.0, 5.0, 60.0, pulled=True)
        node.table.service("light").cold_start = ColdStart(0.0, 0.5, 0.5, pulled=False)
        node.table.service("light").idle_since = node.table.service("heavy").idle_since
        assert (await node.deployer.deploy(req("new", 10))).service.spec.name == "new"
        assert node.kinds("light")[-1][0] in ("evicted", "stopped")
        assert node.table.service("heavy").status == "healthy"
        with pytest.raises(ServiceNotFound):
            node.table.service("light")


class TestRecordsAfterTheFact:
    async def test_a_record_that_fails_leaves_the_deploy_standing(self, make: Any) -> None:
        async def broken(service: Any) -> None:
            raise OSError(28, "No space left on device")
        node = await make(on_deployed=broken)
        done = await node.deployer.deploy(req("svc", 4, lease_s=60))
        assert done.lease is not None and node.table.service("svc").status == "healthy"
        assert node.kinds("svc")[-1] == ("deployed", None)
        assert node.deployer.renew("svc", done.lease.id, 60).id == done.lease.id  # its lease holds


class TestEarmarks:
    async def test_only_the_deploy_granted_the_room_takes_it(self, make: Any) -> None:
        """A second deploy of the waiter's name, without wait_s, must not use the room the
        waiter was granted while its victims still run."""
        async def slow_inspect(name: str) -> None:
            await asyncio.sleep(0.3)
        node = await make(engine(inspect=AsyncMock(side_effect=slow_inspect)))
        v = await node.deployer.deploy(req("v", 20, lease_s=60, keep_warm_s=300))
        assert v.lease is not None
        waiter = asyncio.ensure_future(outcome(node.deployer.deploy(req("w", 20, wait_s=30))))
        await until_queued(node, "w")
        same = asyncio.ensure_future(outcome(node.deployer.deploy(req("w", 20))))
        await asyncio.sleep(0.1)
        await node.deployer.release("v", v.lease.id)
        results = await asyncio.gather(waiter, same)
        assert ("ok", "w") in results and node.reserved() <= 24
        assert node.table.get("v") is None and ("evicted", "w") in node.kinds("v")

    async def test_while_victims_stop_their_room_is_not_free(self, make: Any) -> None:
        stopping, stopped = asyncio.Event(), asyncio.Event()

        async def slow_stop(container_id: str, grace_s: int) -> None:
            stopping.set()
            await stopped.wait()  # until the test has looked: no timing to miss
        node = await make(engine(stop=AsyncMock(side_effect=slow_stop)))
        await idle(node, "v", 20)
        newcomer = asyncio.ensure_future(outcome(node.deployer.deploy(req("w", 10))))
        await asyncio.wait_for(stopping.wait(), 10)
        assert node.table.get("v") is not None  # still stopping
        assert node.reserved() == 20 and node.table.gpus.views()[0].vram_free_gb == 4
        assert await outcome(node.deployer.deploy(req("x", 12))) == ("err", "no_gpu_capacity")
        stopped.set()
        assert await newcomer == ("ok", "w") and node.reserved() == 10

    async def test_an_eviction_that_fails_gives_every_victim_its_room_back(self, make: Any) -> None:
        failing = AsyncMock(side_effect=EngineError("Docker refused to remove the container"))
        node = await make()
        await idle(node, "a", 10)
        await idle(node, "b", 10)
        node.engine.remove = failing
        assert await outcome(node.deployer.deploy(req("w", 24))) == ("err", "engine_error")
        assert node.reserved() == 20 and node.table.gpus.earmarked_gb("x") == 0
        assert not node.table.busy("a") and not node.table.busy("b")


class TestVictims:
    async def test_a_waiting_replace_never_evicts_itself(self, make: Any) -> None:
        node = await make()
        await idle(node, "w", 10)
        p = await node.deployer.deploy(req("p", 10, lease_s=60, keep_warm_s=300))
        assert p.lease is not None
        waiter = asyncio.ensure_future(outcome(node.deployer.deploy(req("w", 20, image="img:2", wait_s=30))))
        await until_queued(node, "w")
        await node.deployer.release("p", p.lease.id)
        assert await waiter == ("ok", "w")
        assert node.table.get("p") is None and node.reserved() == 20
        assert ("replaced", "spec_changed") in node.kinds("w")

    async def test_a_deploy_of_a_victim_waits_and_starts_anew(self, make: Any) -> None:
        stopping = asyncio.Event()

        async def slow_stop(container_id: str, grace_s: int) -> None:
            stopping.set()
            await asyncio.sleep(0.5)
        node = await make(engine(stop=AsyncMock(side_effect=slow_stop)))
        await idle(node, "v", 8)
        old = node.table.service("v").container_id
        newcomer = asyncio.ensure_future(outcome(node.deployer.deploy(req("w", 20))))
        await asyncio.wait_for(stopping.wait(), 10)  # the eviction of v has begun
        again = await node.deployer.deploy(req("v", 4, lease_s=60))
        assert await newcomer == ("ok", "w")
        assert again.already_running is False and again.service.container_id != old

    async def test_a_big_head_waiter_keeps_the_idle_room_on_its_gpu(self, make: Any) -> None:
        node = await make()
        held = await node.deployer.deploy(req("l", 10, lease_s=600, keep_warm_s=0))
        await idle(node, "i", 10)
        big = asyncio.ensure_future(outcome(node.deployer.deploy(req("big", 20, wait_s=10, priority=9))))
        await until_queued(node, "big")
        assert await outcome(node.deployer.deploy(req("small", 8))) == ("err", "no_gpu_capacity")
        assert node.table.get("i") is not None  # not evicted for the later, smaller deploy
        assert held.lease is not None
        await node.deployer.release("l", held.lease.id)
        assert await big == ("ok", "big")


class TestQueueRules:
    async def test_a_waiter_may_wait_though_its_room_went_to_another(self, make: Any) -> None:
        node = await make()
        first = asyncio.ensure_future(outcome(node.deployer.deploy(req("a", 20, wait_s=30, lease_s=60))))
        second = asyncio.ensure_future(outcome(node.deployer.deploy(req("b", 20, wait_s=30, lease_s=60))))
        winner = await asyncio.wait({first, second}, return_when=asyncio.FIRST_COMPLETED)
        assert next(task.result() for task in winner[0])[0] == "ok"
        other = second if first in winner[0] else first
        await until_queued(node, "a" if other is first else "b")
        assert not other.done()  # waiting, not an immediate 503
        name = "a" if other is first else "b"
        winner_name = "b" if name == "a" else "a"
        lease = node.table.leases_of(winner_name)[0]
        await node.deployer.release(winner_name, lease.id)
        assert await other == ("ok", name)

    async def test_a_head_that_can_never_fit_any_more_is_refused_at_once(self, make: Any) -> None:
        node = await make()
        held = await node.deployer.deploy(req("l", 10, lease_s=600, keep_warm_s=0))
        await node.deployer.deploy(req("p", 10, lease_s=600, keep_warm_s=0))
        waiter = asyncio.ensure_future(outcome(node.deployer.deploy(req("w", 20, wait_s=600))))
        await until_queued(node, "w")
        await node.deployer.deploy(req("p", 10))  # pinned now: 24 - 10 < 20, for good
        assert held.lease is not None
        await node.deployer.release("l", held.lease.id)
        assert await asyncio.wait_for(waiter, 2) == ("err", "no_gpu_capacity")
        assert node.table.gpus.views()[0].vram_free_gb == 14  # nothing still earmarked for it

    async def test_waiters_of_one_name_merge_only_with_one_spec(self, make: Any) -> None:
        node = await make()
        await node.deployer.deploy(req("h", 20, lease_s=600))
        first = asyncio.ensure_future(outcome(node.deployer.deploy(req("w", 10, wait_s=30))))
        await until_queued(node, "w")
        assert await outcome(node.deployer.deploy(req("w", 12, image="img:2", wait_s=30))) == (
            "err", "conflict")
        first.cancel()

    async def test_a_caller_gone_after_its_grant_gets_nothing(self, make: Any) -> None:
        node = await make()
        held = await node.deployer.deploy(req("l", 20, lease_s=600, keep_warm_s=0))
        there = [True]
        waiter = asyncio.ensure_future(outcome(node.deployer.deploy(
            req("w", 20, wait_s=30), still_there=lambda: there[0])))
        await until_queued(node, "w")
        assert held.lease is not None
        there[0] = False  # it left just as the room comes
        await node.deployer.release("l", held.lease.id)
        assert await waiter == ("err", "caller_gone")
        assert node.table.get("w") is None and node.reserved() == 0

    async def test_close_during_a_wait_leaks_no_room(self, make: Any) -> None:
        node = await make()
        await node.deployer.deploy(req("l", 20, lease_s=600, keep_warm_s=0))
        waiter = asyncio.ensure_future(outcome(node.deployer.deploy(req("w", 20, wait_s=30))))
        await until_queued(node, "w")
        node.deployer.admission.close()
        assert await waiter == ("err", "no_gpu_capacity")
        assert node.reserved() == 20 and node.table.head_gpu is None


class TestHoldsAcrossReplaceAndPreemption:
    async def test_keep_warm_survives_a_replace(self, make: Any) -> None:
        node = await make()
        first = await node.deployer.deploy(req("s", 4, lease_s=60, keep_warm_s=300))
        assert first.lease is not None
        await node.deployer.deploy(req("s", 4, image="img:2", lease_s=60, lease_id=first.lease.id,
                                       replace=True))
        stopped, idle_until = await node.deployer.release("s", first.lease.id)
        assert not stopped and idle_until is not None

    @pytest.mark.parametrize("how", ["pinned", "renewed higher"])
    async def test_a_preemption_is_called_off(self, make: Any, how: str) -> None:
        node = await make(preempt_grace_s=2)  # room for a stalled loop before the call-off
        enforcing = asyncio.ensure_future(node.deployer.enforce())
        try:
            low = await node.deployer.deploy(req("l", 20, lease_s=600, priority=3, keep_warm_s=0))
            assert low.lease is not None
            waiter = asyncio.ensure_future(outcome(node.deployer.deploy(req("w", 20, wait_s=5, priority=7))))
            await until_queued(node, "w")
            await until(lambda: node.table.preempt_at("l") is not None)
            if how == "pinned":
                await node.deployer.deploy(req("l", 20))
            else:
                await node.deployer.deploy(req("l", 20, lease_s=600, lease_id=low.lease.id, priority=9))
            assert node.table.preempt_at("l") is None
            await asyncio.sleep(2.5)  # past the grace
            assert node.table.get("l") is not None and ("stopped", "preempted") not in node.kinds("l")
            await asyncio.gather(waiter, return_exceptions=True)
        finally:
            enforcing.cancel()
            await asyncio.gather(enforcing, return_exceptions=True)


class TestClientPlacement:
    async def test_a_waiting_deploy_goes_where_a_gpu_is_big_enough(self) -> None:
        with stand_in_node() as small, stand_in_node() as big:
            small.gpus = [{"id": 0, "name": "small", "vram_total_gb": 16, "vram_free_gb": 8,
                           "vram_idle_gb": 0}]
            big.gpus = [{"id": 0, "name": "big", "vram_total_gb": 48, "vram_free_gb": 0, "vram_idle_gb": 0}]
            async with AsyncComputeNodes([small.url, big.url]) as nodes:
                chosen = await nodes.candidates({"name": "t", "image": "i", "gpu": True, "vram_gb": 20},
                                                waiting=True)
                assert [c.url for c in chosen] == [big.url]
