"""The deploy flow (deployer and local runtime) when the engine misbehaves, with a stand-in engine.

What crosses into Docker is tested against the real engine elsewhere; these tests drive
the engine into failures it won't produce on cue (a removal that fails mid-rollback, a
create whose outcome is unknown) and check that nothing leaks and nothing is hidden.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any
from unittest.mock import AsyncMock, MagicMock

import pytest

from deploy_agent.backends.docker.runtime import DockerRuntime
from deploy_agent.backends.engine import Engine
from deploy_agent.convert import make_converter, parse_deploy_request
from deploy_agent.deployer import Deployer
from deploy_agent.errors import AgentError, EngineError, EngineUnavailable
from deploy_agent.events import EventLog
from deploy_agent.gpus import FakeGpus, GpuPool
from deploy_agent.models import Owner
from deploy_agent.ports import NodePorts
from deploy_agent.probe import HealthProbe
from deploy_agent.state import SavedState, StateFile
from deploy_agent.table import ServiceTable
from tests.conftest import make_config

CONVERTER = make_converter()
PORTS = (29400, 29409)


async def never_exits(container_id: str) -> int:
    await asyncio.sleep(3600)
    return 0


def stand_in_engine(**overrides: Any) -> Any:
    """An Engine whose calls succeed at once unless a test overrides them."""
    engine = MagicMock(spec=Engine)
    engine.inspect = AsyncMock(return_value=None)
    engine.has_image = AsyncMock(return_value=True)
    engine.published_ports = AsyncMock(return_value=set())
    engine.create = AsyncMock(return_value="c" * 64)
    engine.start = AsyncMock(return_value=None)
    engine.wait_exit = AsyncMock(side_effect=never_exits)
    engine.logs_tail = AsyncMock(return_value=["last line"])
    engine.remove = AsyncMock(return_value=None)
    for name, value in overrides.items():
        setattr(engine, name, value)
    return engine


async def deployer_with(engine: Any, tmp_path: Path, healthy: bool = True) -> tuple[Deployer, ServiceTable]:
    gpus = GpuPool(FakeGpus("RTX 4090:24"))
    await gpus.refresh({})
    table = ServiceTable(NodePorts(PORTS), gpus, StateFile(tmp_path, CONVERTER))
    probe = MagicMock(spec=HealthProbe)
    probe.healthy = AsyncMock(return_value=healthy)
    config = make_config(tmp_path, port_range=PORTS)
    runtime = DockerRuntime(config, engine, probe, table, CONVERTER)
    return Deployer(config, runtime, table, EventLog(tmp_path)), table


def request(name: str = "svc", **body: Any) -> Any:
    return parse_deploy_request(CONVERTER, {"name": name, "image": "img:1", "port": PORTS[0],
                                            "gpu": True, "vram_gb": 20, "ready_timeout": 1, **body})


async def assert_everything_released(table: ServiceTable) -> None:
    assert table.services() == []
    assert await table.reserve_port(Owner("probe", "t"), PORTS[0], set()) == PORTS[0]
    assert table.reserve_gpu(Owner("probe", "t"), 24).index == 0


class TestRollback:
    """Whatever fails during a rollback, reservations come back and the cause is kept."""

    async def test_failed_removal_keeps_the_original_error(self, tmp_path: Path) -> None:
        engine = stand_in_engine(
            wait_exit=AsyncMock(return_value=3),  # the service crashes at once: 502
            remove=AsyncMock(side_effect=EngineError("Docker refused to remove the container")))
        deployer, table = await deployer_with(engine, tmp_path, healthy=False)
        with pytest.raises(AgentError) as caught:
            await deployer.deploy(request())
        assert (caught.value.status, caught.value.code) == (502, "container_exited")
        assert caught.value.extra["exit_code"] == 3
        await assert_everything_released(table)
        await table.persist()
        saved = json.loads((tmp_path / "services.json").read_text())
        assert [entry["name"] for entry in saved["abandoned"]] == ["svc"]

    async def test_create_that_timed_out_is_abandoned_not_forgotten(self, tmp_path: Path) -> None:
        engine = stand_in_engine(create=AsyncMock(side_effect=EngineUnavailable("timed out")))
        deployer, table = await deployer_with(engine, tmp_path)
        with pytest.raises(EngineUnavailable):
            await deployer.deploy(request())
        await assert_everything_released(table)
        labels = engine.create.call_args.args[1]["Labels"]
        assert table.is_abandoned(labels["tidybot.attempt"])  # removed when the engine is back
        engine.remove.assert_not_called()

    async def test_engine_away_during_start_is_not_waited_on(self, tmp_path: Path) -> None:
        engine = stand_in_engine(start=AsyncMock(side_effect=EngineUnavailable("timed out")))
        deployer, table = await deployer_with(engine, tmp_path)
        with pytest.raises(EngineUnavailable):
            await deployer.deploy(request())
        engine.remove.assert_not_called()  # it would only wait out another time-out
        await assert_everything_released(table)
        assert table.is_abandoned(engine.create.call_args.args[1]["Labels"]["tidybot.attempt"])

    async def test_state_write_failure_keeps_the_deploy_and_its_gpu(self, tmp_path: Path) -> None:
        deployer, table = await deployer_with(stand_in_engine(), tmp_path)
        (tmp_path / "services.json").mkdir()  # services.json can't be written
        outcome = await deployer.deploy(request())
        assert outcome.service.status == "healthy" and table.state_error is not None
        assert table.gpus.views()[0].vram_reserved_gb == 20  # still held: no over-commit


class TestStateWrites:
    """services.json is written once per change, holding everything that change made."""

    async def test_one_write_per_leased_deploy_and_per_release(self, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
        deployer, _ = await deployer_with(stand_in_engine(stop=AsyncMock(return_value=None)), tmp_path)
        saved: list[SavedState] = []
        real_save = StateFile.save

        async def recorded_save(state_file: StateFile, state: SavedState) -> None:
            saved.append(state)
            await real_save(state_file, state)

        monkeypatch.setattr(StateFile, "save", recorded_save)
        outcome = await deployer.deploy(request(lease_s=60, keep_warm_s=0))
        assert outcome.lease is not None
        assert len(saved) == 1  # the service and its holder's lease, together
        assert [s.spec.name for s in saved[0].services] == ["svc"]
        assert [lease.id for lease in saved[0].leases] == [outcome.lease.id]
        stopped, _ = await deployer.release("svc", outcome.lease.id)  # the last holder: it stops
        assert stopped
        assert len(saved) == 2 and saved[1].services == [] and saved[1].leases == []
        warm = await deployer.deploy(request(lease_s=60, keep_warm_s=30))
        assert warm.lease is not None and len(saved) == 3
        stopped, idle_until = await deployer.release("svc", warm.lease.id)  # kept warm: idle
        assert not stopped and idle_until is not None
        assert len(saved) == 4 and saved[3].leases == []
        assert [s.idle_until for s in saved[3].services] == [idle_until]


class TestOwnedDeploys:
    """A deploy whose caller leaves runs on; close() rolls back what is still in flight."""

    async def test_caller_cancelled_deploy_goes_on(self, tmp_path: Path) -> None:
        deployer, table = await deployer_with(stand_in_engine(), tmp_path)
        caller = asyncio.create_task(deployer.deploy(request()))
        await asyncio.sleep(0)
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        for _ in range(100):
            if table.get("svc") is not None and table.get("svc").status == "healthy":  # type: ignore[union-attr]
                break
            await asyncio.sleep(0.01)
        assert table.get("svc") is not None and table.get("svc").status == "healthy"  # type: ignore[union-attr]

    async def test_close_rolls_back_deploys_in_flight(self, tmp_path: Path) -> None:
        engine = stand_in_engine()
        deployer, table = await deployer_with(engine, tmp_path, healthy=False)
        caller = asyncio.create_task(deployer.deploy(request(ready_timeout=60)))
        for _ in range(100):
            if engine.start.await_count:
                break
            await asyncio.sleep(0.01)
        await deployer.close()
        engine.remove.assert_awaited_once_with("c" * 64)
        await assert_everything_released(table)
        with pytest.raises(asyncio.CancelledError):
            await caller


class TestEnforcement:
    """Stops that enforce leases run per name: one that hangs delays no other, and close() ends it."""

    async def test_a_stuck_stop_does_not_delay_another_expiry(self, tmp_path: Path) -> None:
        stuck = "a" * 64

        async def stop(container_id: str, grace_s: int) -> None:
            if container_id == stuck:
                await asyncio.sleep(3600)  # the engine hangs on this one; its name stays locked

        ids = iter([stuck, "b" * 64])
        engine = stand_in_engine(create=AsyncMock(side_effect=lambda *args: next(ids)),
                                 stop=AsyncMock(side_effect=stop))
        deployer, table = await deployer_with(engine, tmp_path)
        for name in ("a", "b"):  # both lapse by the first pass; "a" comes first
            await deployer.deploy(request(name, gpu=False, vram_gb=0, lease_s=0.05, keep_warm_s=0))
        enforcing = asyncio.create_task(deployer.enforce())
        try:
            for _ in range(300):
                if table.get("b") is None:
                    break
                await asyncio.sleep(0.01)
            assert table.get("b") is None  # stopped while the stop of "a" hangs
            assert table.get("a") is not None and table.busy("a")
        finally:
            enforcing.cancel()
            await asyncio.gather(enforcing, return_exceptions=True)
        await asyncio.wait_for(deployer.close(), 5)  # the stuck stop is cancelled, not waited on
        assert not table.busy("a")


class TestOffTheLoop:
    """Resolving host paths touches the file system: it never stalls the event loop."""

    async def test_host_paths_resolve_in_a_thread(self, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
        import threading

        real_realpath = os.path.realpath
        resolved_on: list[int] = []

        loop = asyncio.get_running_loop()

        def slow_realpath(path: Any, **kwargs: Any) -> Any:
            resolved_on.append(threading.get_ident())
            # A host path on a hung NFS mount, say; meanwhile the loop still runs a task (one
            # that waited for this thread would time out here).
            asyncio.run_coroutine_threadsafe(asyncio.sleep(0), loop).result(timeout=10)
            return real_realpath(path, **kwargs)

        monkeypatch.setattr(os.path, "realpath", slow_realpath)
        gpus = GpuPool(FakeGpus("RTX 4090:24"))
        await gpus.refresh({})
        table = ServiceTable(NodePorts(PORTS), gpus, StateFile(tmp_path, CONVERTER))
        probe = MagicMock(spec=HealthProbe)
        probe.healthy = AsyncMock(return_value=True)
        config = make_config(tmp_path, port_range=PORTS, allow_host_paths=(tmp_path,))
        runtime = DockerRuntime(config, stand_in_engine(), probe, table, CONVERTER)
        deployer = Deployer(config, runtime, table, EventLog(tmp_path))
        await deployer.deploy(request(gpu=False, vram_gb=0, volumes=[f"{tmp_path}:/data"]))
        # Where each resolution ran, not how long the loop waited: a timing fails on a loaded machine.
        assert resolved_on and threading.get_ident() not in resolved_on


class TestReviewFindings:
    async def test_a_stop_during_a_first_deploys_start_is_409_not_404(self, tmp_path: Path) -> None:
        """Listed as starting from its first moment, it can't be answered 'no such service'."""
        deployer, table = await deployer_with(stand_in_engine(), tmp_path)
        with table.deploying(request().spec):
            with pytest.raises(AgentError) as caught:
                await deployer.stop("svc")
            assert caught.value.status == 409 and "under way" in caught.value.message

    async def test_a_lease_let_go_while_its_deploy_runs_is_never_made(self, tmp_path: Path) -> None:
        deployer, table = await deployer_with(stand_in_engine(), tmp_path)
        said: list[str] = []

        def progress(event: dict[str, Any]) -> None:
            if event.get("event") == "lease":
                said.append(event["lease_id"])
                # the caller leaves at once and lets go of it: before it exists
                asyncio.get_running_loop().call_soon(
                    lambda: asyncio.ensure_future(deployer.release("svc", event["lease_id"])))
        outcome = await deployer.deploy(request(lease_s=60, keep_warm_s=0), progress)
        assert said and outcome.lease is None and table.leases_of("svc") == []
        assert table.stop_reason("svc") == "lease_expired"  # held by no one: it goes


def test_cold_start_phases_count_refused_tries_in_the_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """pull: up to the first create (a pull reported); start: from there to the start of the
    try that worked (a refused try included); healthy: from that start to the end."""
    from deploy_agent.runtime import ColdStartClock
    clock_at = iter([0.0, 4.0, 5.0, 6.0, 7.0, 9.0, 10.0, 11.0])
    monkeypatch.setattr("deploy_agent.runtime.time.monotonic", lambda: next(clock_at))
    seen: list[dict[str, Any]] = []
    clock = ColdStartClock(seen.append)
    for event in ({"event": "pull", "status": "Downloading"}, {"event": "created"},
                  {"event": "started"}, {"event": "created"}, {"event": "started"},
                  {"event": "health", "healthy": True}):
        clock.progress(event)
    phases = clock.finish()
    assert (phases.pull_s, phases.start_s, phases.healthy_s, phases.pulled) == (5.0, 4.0, 2.0, True)
    assert len(seen) == 6  # every event passed on
