"""Eviction: which idle services make room (the plan, pure), and the room passing from them
to the deploy that needed it in one step (the table, with a simulated GPU)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from deploy_agent.errors import NoGpuCapacity
from deploy_agent.eviction import Candidate, plan
from deploy_agent.gpus import FakeGpus, GpuPool
from deploy_agent.models import Owner
from deploy_agent.ports import NodePorts
from deploy_agent.state import StateFile
from deploy_agent.table import ServiceTable
from tests.test_table import CONVERTER, service

NOW = 1_000_000.0


def candidate(name: str, gpu: int, gb: float, released_ago: float, deploy_s: float = 5) -> Candidate:
    return Candidate(name=name, owner=Owner(name, "a"), gpu=gpu, gb=gb,
                     idle_since=NOW - released_ago, deploy_s=deploy_s)


class TestPlan:
    def test_least_recently_released_first(self) -> None:
        old, new = candidate("old", 0, 10, released_ago=60), candidate("new", 0, 10, released_ago=5)
        chosen = plan(12, {0: 4}, [new, old], NOW)
        assert chosen is not None and [v.name for v in chosen.victims] == ["old"]

    def test_a_long_cold_start_costs_more(self) -> None:
        slow = candidate("slow", 0, 10, released_ago=60, deploy_s=600)
        quick = candidate("quick", 0, 10, released_ago=5, deploy_s=2)
        chosen = plan(12, {0: 4}, [slow, quick], NOW)
        assert chosen is not None and [v.name for v in chosen.victims] == ["quick"]

    def test_the_cheapest_set_on_one_gpu(self) -> None:
        small = [candidate(f"s{i}", 0, 4, released_ago=60) for i in range(3)]
        big = candidate("big", 1, 20, released_ago=60)
        chosen = plan(12, {0: 2, 1: 0}, [*small, big], NOW)  # one redeploy costs less than three
        assert chosen is not None and chosen.gpu == 1 and [v.name for v in chosen.victims] == ["big"]
        fresh = candidate("big", 1, 20, released_ago=1)  # ...unless it was just let go
        chosen = plan(12, {0: 2, 1: 0}, [*small, fresh], NOW)
        assert chosen is not None and chosen.gpu == 0 and len(chosen.victims) == 3

    def test_nothing_when_nothing_would_make_it_fit(self) -> None:
        assert plan(20, {0: 4, 1: 4}, [candidate("a", 0, 10, 60), candidate("b", 1, 10, 60)], NOW) is None

    def test_no_more_than_needed(self) -> None:
        chosen = plan(12, {0: 4}, [candidate(n, 0, 8, 60) for n in "abc"], NOW)
        assert chosen is not None and len(chosen.victims) == 1


@pytest.fixture
async def table(tmp_path: Path) -> ServiceTable:
    gpus = GpuPool(FakeGpus("RTX 4090:24"))
    await gpus.refresh({})
    return ServiceTable(NodePorts((29300, 29310)), gpus, StateFile(tmp_path, CONVERTER))


def idle(table: ServiceTable, name: str, port: int, vram_gb: float) -> None:
    kept = service(name, port, gpu=0, vram_gb=vram_gb)
    kept.pinned, kept.keep_warm_s, kept.started_at = False, 60, time.time() - 120
    table.adopt(kept)
    assert table.idle_if_unheld(name)


class TestRoomPassesInOneStep:
    async def test_the_room_is_the_deploys_alone(self, table: ServiceTable) -> None:
        idle(table, "a", 29300, 10)
        idle(table, "b", 29301, 10)
        before = table.gpus.views()[0].vram_reserved_gb
        eviction = table.make_room("new", 12, min_resident_s=60, token="t")
        assert eviction is not None and [v.name for v in eviction.victims] == ["a"]
        assert table.gpus.views()[0].vram_reserved_gb == before - 10 + 12  # counted once
        assert table.busy("a") and not table.busy("b")  # chosen: being evicted
        with pytest.raises(NoGpuCapacity):  # another deploy can't take it meanwhile...
            table.reserve_gpu(Owner("other", "x"), 12)
        with pytest.raises(NoGpuCapacity):  # ...nor one of the same name that didn't take it
            table.reserve_gpu(Owner("new", "z"), 12)
        table.gpus.activate("new", "t")  # the deploy that evicted, under its name's lock
        placed = table.reserve_gpu(Owner("new", "y"), 12)
        assert placed.index == 0 and table.gpus.views()[0].vram_reserved_gb == before - 10 + 12

    async def test_never_a_young_busy_or_held_service(self, table: ServiceTable) -> None:
        idle(table, "young", 29300, 10)
        table.service("young").started_at = time.time()
        assert table.make_room("new", 20, min_resident_s=60, token="t") is None
        idle(table, "busy", 29301, 10)
        async with table.locked("busy"):
            assert table.make_room("new", 20, min_resident_s=60, token="t") is None
        table.add_lease("busy", 30)
        assert table.make_room("new", 20, min_resident_s=60, token="t") is None
        assert table.plan_room("new", 20, min_resident_s=0) is None  # held: never
        assert table.gpus.views()[0].vram_reserved_gb == 20  # nothing changed
