"""Tests for deploy_agent.table: locks, generations, reservations and the state file."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import attrs
import pytest

from deploy_agent.convert import make_converter
from deploy_agent.errors import NoGpuCapacity
from deploy_agent.gpus import FakeGpus, GpuPool
from deploy_agent.models import DeploySpec, Lease, Owner, Service
from deploy_agent.ports import NodePorts
from deploy_agent.state import SavedState, StateFile
from deploy_agent.table import ServiceTable

CONVERTER = make_converter()


def service(name: str, host_port: int, gpu: int | None = None, vram_gb: float = 0,
            container_id: str | None = None) -> Service:
    spec = CONVERTER.structure({"name": name, "image": "img:1", "gpu": gpu is not None,
                                "vram_gb": vram_gb}, DeploySpec)
    return Service(spec=spec, container_id=container_id or name.ljust(64, "0"),
                   host_port=host_port, gpu=gpu)


@pytest.fixture
async def table(tmp_path: Path) -> ServiceTable:
    gpus = GpuPool(FakeGpus("RTX 4090:24"))
    await gpus.refresh({})
    return ServiceTable(NodePorts((29300, 29310)), gpus, StateFile(tmp_path, CONVERTER))


class TestLocks:
    """A name's lock serialises its work and lives only while someone holds or waits on it."""

    async def test_lock_is_dropped_when_unused(self, table: ServiceTable) -> None:
        async with table.locked("a"):
            assert table.busy("a")
        assert not table.busy("a")

    async def test_lock_stays_while_a_waiter_remains(self, table: ServiceTable) -> None:
        order: list[str] = []
        releases = {"first": asyncio.Event(), "second": asyncio.Event()}

        async def hold(tag: str) -> None:
            async with table.locked("a"):
                order.append(tag)
                await releases[tag].wait()

        first = asyncio.create_task(hold("first"))
        await asyncio.sleep(0)
        second = asyncio.create_task(hold("second"))
        await asyncio.sleep(0.01)
        assert order == ["first"]  # serialised
        releases["first"].set()
        await first
        await asyncio.sleep(0.01)
        assert order == ["first", "second"] and table.busy("a")  # the second holds it now
        releases["second"].set()
        await second
        assert not table.busy("a")

    async def test_a_thousand_names_leave_no_locks(self, table: ServiceTable) -> None:
        for index in range(1000):
            async with table.locked(f"name-{index}"):
                pass
        assert not any(table.busy(f"name-{index}") for index in range(1000))


class TestGenerations:
    """One counter for the agent: a pass that began earlier sees every change since."""

    async def test_gone_and_back_is_not_unchanged(self, table: ServiceTable) -> None:
        first = service("a", 29300)
        table.adopt(first)
        with table.observe() as seen:
            assert seen.current("a")
            table.forget(first)
            table.adopt(service("a", 29301))  # redeployed under the pass's feet
            assert not seen.current("a")

    async def test_busy_name_is_not_current(self, table: ServiceTable) -> None:
        with table.observe() as seen:
            async with table.locked("a"):
                assert not seen.current("a")
            assert seen.current("a")

    async def test_names_long_gone_are_forgotten(self, table: ServiceTable) -> None:
        for index in range(50):
            record = service(f"s{index}", 29300)
            table.adopt(record)
            table.forget(record)
        with table.observe():
            pass
        assert all(table.changed_at(f"s{index}") == 0 for index in range(50))

    async def test_tombstones_kept_while_a_pass_runs(self, table: ServiceTable) -> None:
        record = service("a", 29300)
        table.adopt(record)
        with table.observe() as outer:
            table.forget(record)
            with table.observe():
                pass  # an inner pass ending must not erase what the outer one needs
            assert not outer.current("a")


class TestReservations:
    """Adopt claims, forget releases; GPUs never over-commit."""

    async def test_adopt_claims_port_and_gpu(self, table: ServiceTable) -> None:
        table.adopt(service("a", 29300, gpu=0, vram_gb=20))
        assert await table.reserve_port(Owner("probe", "t"), 29300, set()) == 29301
        with pytest.raises(NoGpuCapacity):
            table.reserve_gpu(Owner("b", "t"), 8)

    async def test_forget_releases_both(self, table: ServiceTable) -> None:
        record = service("a", 29300, gpu=0, vram_gb=20)
        table.adopt(record)
        assert table.forget(record)
        assert not table.forget(record)  # already gone: nothing released twice
        assert await table.reserve_port(Owner("probe", "t"), 29300, set()) == 29300
        assert table.reserve_gpu(Owner("b", "t"), 24).index == 0

    async def test_concurrent_port_reservations_never_collide(self, table: ServiceTable) -> None:
        ports = await asyncio.gather(*(table.reserve_port(Owner("probe", "t"), 29300, set())
                                       for _ in range(11)))
        assert sorted(ports) == list(range(29300, 29311))


class TestStateFile:
    """A failed write is remembered and retried; reservations and records stay."""

    async def test_write_failure_keeps_reservations_and_recovers(self, tmp_path: Path) -> None:
        gpus = GpuPool(FakeGpus("RTX 4090:24"))
        await gpus.refresh({})
        state_dir = tmp_path / "state"
        table = ServiceTable(NodePorts((29300, 29310)), gpus, StateFile(state_dir, CONVERTER))
        state_dir.mkdir()
        (state_dir / "services.json").mkdir()  # it can't be replaced: writes fail, as on a full disk
        table.adopt(service("a", 29300, gpu=0, vram_gb=20))
        await table.persist()  # must not raise
        assert table.state_error is not None and table.state_write_failures == 1
        assert table.get("a") is not None
        with pytest.raises(NoGpuCapacity):
            table.reserve_gpu(Owner("b", "t"), 8)
        (state_dir / "services.json").rmdir()
        await table.persist_if_dirty()
        assert table.state_error is None
        saved = json.loads((state_dir / "services.json").read_text())
        assert [s["spec"]["name"] for s in saved["services"]] == ["a"]

    async def test_abandoned_attempts_survive_a_restart(self, table: ServiceTable,
                                                        tmp_path: Path) -> None:
        table.abandon("attempt-1", "a")
        await table.persist()
        fresh = ServiceTable(NodePorts((29300, 29310)), table.gpus, StateFile(tmp_path, CONVERTER))
        fresh.restore(StateFile(tmp_path, CONVERTER).load())
        assert fresh.is_abandoned("attempt-1") and not fresh.is_abandoned("attempt-2")
        fresh.settle(attempts_seen={"attempt-1"}, removed={"attempt-1"})
        assert not fresh.is_abandoned("attempt-1")

    async def test_abandoned_attempt_not_seen_is_kept_for_a_while(self, table: ServiceTable) -> None:
        table.abandon("attempt-1", "a")
        table.settle(attempts_seen=set(), removed=set())  # the engine may still create it
        assert table.is_abandoned("attempt-1")


@attrs.define
class Clocks:
    """Stands in for the time module: a wall clock and a monotonic one, moved by the test."""

    wall: float = 1_000_000.0
    monotonic_s: float = 50.0

    def time(self) -> float:
        return self.wall

    def monotonic(self) -> float:
        return self.monotonic_s


class TestLeases:
    """Leases belong to holders; a leased service lapses only when its last lease does."""

    def unpinned(self, table: ServiceTable, name: str, port: int) -> Service:
        record = service(name, port)
        record.pinned = False
        table.adopt(record)
        return record

    async def test_last_lease_lapsing_lapses_the_service(self, table: ServiceTable) -> None:
        self.unpinned(table, "a", 29300)
        short = table.add_lease("a", 0.05)
        table.add_lease("a", 60)
        await asyncio.sleep(0.1)
        assert table.settle_leases() == []  # one holder is still there
        assert [lease.id for lease in table.leases_of("a")] != [short.id]
        for lease in table.leases_of("a"):
            table.release_lease("a", lease.id)
        assert table.settle_leases() == ["a"]

    async def test_pinned_and_busy_services_never_lapse(self, table: ServiceTable) -> None:
        self.unpinned(table, "a", 29300)
        table.pin(table.service("a"))
        self.unpinned(table, "b", 29301)
        async with table.locked("b"):  # a deploy of it is under way
            assert table.settle_leases() == []
        assert table.settle_leases() == ["b"]

    async def test_unknown_or_lapsed_lease_is_404(self, table: ServiceTable) -> None:
        from deploy_agent.errors import LeaseNotFound

        self.unpinned(table, "a", 29300)
        lease = table.add_lease("a", 0.01)
        await asyncio.sleep(0.05)
        for lease_id, name in ((lease.id, "a"), ("nope", "a"), (table.add_lease("a", 60).id, "b")):
            with pytest.raises(LeaseNotFound) as caught:
                table.renew_lease(name, lease_id, 10)
            assert caught.value.status == 404

    async def test_restart_gives_each_lease_a_full_term(self, table: ServiceTable,
                                                         tmp_path: Path) -> None:
        import time

        lease = Lease(id="l1", service="a", lease_s=30, expires_at=time.time() - 100)
        await StateFile(tmp_path, CONVERTER).save(SavedState([], leases=[lease]))  # the agent down since
        fresh = ServiceTable(NodePorts((29300, 29310)), table.gpus, StateFile(tmp_path, CONVERTER))
        fresh.restore(StateFile(tmp_path, CONVERTER).load())
        restored = fresh.lease("a", lease.id)
        assert time.time() + 29 < restored.expires_at <= time.time() + 30

    async def test_wall_clock_step_never_expires_a_lease(self, table: ServiceTable, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
        from deploy_agent import table as table_module
        from deploy_agent.errors import LeaseNotFound

        clocks = Clocks()
        monkeypatch.setattr(table_module, "time", clocks)
        self.unpinned(table, "a", 29300)
        lease = table.add_lease("a", 60)
        clocks.wall += 3600  # the clock is stepped an hour forward
        clocks.monotonic_s += 1
        assert table.settle_leases() == [] and table.lease("a", lease.id) is lease
        await table.persist()  # the file says when in wall-clock time: from the time left
        saved = StateFile(tmp_path, CONVERTER).load()
        assert saved is not None and saved.leases[0].expires_at == pytest.approx(clocks.wall + 59)
        clocks.monotonic_s += 59  # its time is up
        assert table.settle_leases() == ["a"]
        with pytest.raises(LeaseNotFound):
            table.lease("a", lease.id)

