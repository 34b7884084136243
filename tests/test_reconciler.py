"""The resync as logic: a pass that awaited the engine re-checks what it saw before it acts.

The engine is a spec'd fake whose inspect() the test holds open, so a stop and a new
deploy of the same name land exactly in the window between the listing and the adoption.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any
from unittest.mock import AsyncMock, MagicMock

from deploy_agent.backends.docker.hostview import HostView
from deploy_agent.backends.docker.reconciler import DockerReconciler
from deploy_agent.backends.engine import Engine
from deploy_agent.convert import make_converter
from deploy_agent.errors import EngineError, EngineUnavailable, PortTaken
from deploy_agent.events import EventLog
from deploy_agent.gpus import FakeGpus, GpuPool
from deploy_agent.models import DeploySpec, Owner, Service
from deploy_agent.ports import NodePorts
from deploy_agent.probe import HealthProbe
from deploy_agent.state import StateFile, labels_for
from deploy_agent.table import ServiceTable

CONVERTER = make_converter()
INSTANCE = "default"


def spec() -> DeploySpec:
    return CONVERTER.structure({"name": "a", "image": "img:1", "gpu": True, "vram_gb": 16}, DeploySpec)


def container(container_id: str) -> dict[str, Any]:
    labels = labels_for(CONVERTER, spec(), 29300, 0, INSTANCE, "old-attempt")
    return {"Id": container_id, "Name": "/tidybot-a", "State": {"Running": True, "StartedAt": ""},
            "Config": {"Labels": labels}, "Labels": labels}


class TestIdentityRechecks:
    """A stop and a redeploy during the pass's await: the new record and its GPU stay."""

    async def test_adoption_after_a_redeploy_in_the_window_is_skipped(self, tmp_path: Path) -> None:
        gpus = GpuPool(FakeGpus("RTX 4090:24"))
        await gpus.refresh({})
        table = ServiceTable(NodePorts((29300, 29310)), gpus, StateFile(tmp_path, CONVERTER))
        engine = MagicMock(spec=Engine)
        old = "1" * 64
        summary = {"Id": old, "State": "running", "Labels": container(old)["Labels"]}
        engine.list_managed = AsyncMock(return_value=[summary])
        inspecting, go_on = asyncio.Event(), asyncio.Event()

        async def inspect(name_or_id: str) -> dict[str, Any]:
            inspecting.set()
            await go_on.wait()
            return container(name_or_id)

        engine.inspect = AsyncMock(side_effect=inspect)
        probe = MagicMock(spec=HealthProbe)
        probe.healthy_all = AsyncMock(side_effect=lambda targets, timeout: [True] * len(targets))
        reconciler = DockerReconciler(table, engine, probe, StateFile(tmp_path, CONVERTER), CONVERTER,
                                EventLog(tmp_path), 5.0, INSTANCE, HostView())
        reconciler._check_pids = AsyncMock()  # type: ignore[method-assign]  # no PID look here
        resync = asyncio.create_task(reconciler.resync())
        await inspecting.wait()
        async with table.locked("a"):  # a deploy of "a" comes and goes while the pass waits
            owner = Owner("a", "new-attempt")
            table.reserve_gpu(owner, 16)
            port = await table.reserve_port(owner, 29300, set())
            table.track(Service(spec=spec(), container_id="2" * 64, host_port=port, gpu=0,
                                attempt=owner.attempt, status="healthy"))
        go_on.set()
        await resync
        record = table.service("a")
        assert record.container_id == "2" * 64  # the pass did not adopt what it saw before
        [view] = gpus.views()
        assert view.vram_reserved_gb == 16 and view.services == ["a"]
        assert table.port_holder(port) == owner

    async def test_adopt_over_a_record_releases_what_it_held(self, tmp_path: Path) -> None:
        gpus = GpuPool(FakeGpus("RTX 4090:24"))
        await gpus.refresh({})
        table = ServiceTable(NodePorts((29300, 29310)), gpus, StateFile(tmp_path, CONVERTER))
        first = Service(spec=spec(), container_id="1" * 64, host_port=29300, gpu=0, attempt="one")
        second = Service(spec=spec(), container_id="2" * 64, host_port=29301, gpu=0, attempt="two")
        table.adopt(first)
        table.adopt(second)
        [view] = gpus.views()
        assert view.vram_reserved_gb == 16  # not 32: the first let go when it was replaced
        assert table.port_holder(29300) is None and table.port_holder(29301) == second.owner


class TestCreatedContainers:
    """A container its deploy left created (the agent killed before start): started, or, when
    the engine refuses that, adopted as exited; never a crash of the start-up or the resync."""

    @staticmethod
    async def reconciler_over(tmp_path: Path, start: AsyncMock) -> tuple[DockerReconciler, ServiceTable]:
        gpus = GpuPool(FakeGpus("RTX 4090:24"))
        await gpus.refresh({})
        table = ServiceTable(NodePorts((29300, 29310)), gpus, StateFile(tmp_path, CONVERTER))
        engine = MagicMock(spec=Engine)
        created = "3" * 64
        info = container(created)
        info["State"] = {"Status": "created", "Running": False, "ExitCode": 0, "StartedAt": ""}
        engine.list_managed = AsyncMock(
            return_value=[{"Id": created, "State": "created", "Labels": info["Labels"]}])
        engine.inspect = AsyncMock(return_value=info)
        engine.start = start
        probe = MagicMock(spec=HealthProbe)
        probe.healthy_all = AsyncMock(side_effect=lambda targets, timeout: [False] * len(targets))
        reconciler = DockerReconciler(table, engine, probe, StateFile(tmp_path, CONVERTER), CONVERTER,
                                EventLog(tmp_path), 5.0, INSTANCE, HostView())
        return reconciler, table

    async def test_started_at_start_up(self, tmp_path: Path) -> None:
        start = AsyncMock()
        reconciler, table = await self.reconciler_over(tmp_path, start)
        await reconciler.start_up()
        start.assert_awaited_once_with("3" * 64)
        assert table.service("a").status == "starting"

    async def test_a_refused_start_is_adopted_as_exited(self, tmp_path: Path) -> None:
        for refusal in (PortTaken("port is already allocated"), EngineError("no such device")):
            reconciler, table = await self.reconciler_over(tmp_path, AsyncMock(side_effect=refusal))
            await reconciler.start_up()  # neither raises nor leaves it out
            service = table.service("a")
            assert (service.status, service.exit_code) == ("exited", None), refusal

    async def test_a_refused_start_never_breaks_a_resync(self, tmp_path: Path) -> None:
        reconciler, table = await self.reconciler_over(
            tmp_path, AsyncMock(side_effect=PortTaken("port is already allocated")))
        await reconciler.resync_logged()
        assert reconciler.resyncs == 1 and table.service("a").status == "exited"


class TestLateEvents:
    """The engine's event stream lags under load: a start reported after the deploy found the
    service healthy is no news, and never makes its answer say "starting"."""

    async def test_a_late_start_event_keeps_a_healthy_service_healthy(self, tmp_path: Path) -> None:
        gpus = GpuPool(FakeGpus("RTX 4090:24"))
        await gpus.refresh({})
        table = ServiceTable(NodePorts((29300, 29310)), gpus, StateFile(tmp_path, CONVERTER))
        running = Service(spec=spec(), container_id="4" * 64, host_port=29300, gpu=0,
                          attempt="a1", status="healthy")
        table.adopt(running)
        seen = asyncio.Event()

        async def events() -> Any:
            yield {"Action": "start", "Actor": {"ID": running.container_id,
                                                "Attributes": {"name": "tidybot-a"}}}
            seen.set()
            await asyncio.Event().wait()

        engine = MagicMock(spec=Engine)
        engine.events = events
        reconciler = DockerReconciler(table, engine, MagicMock(spec=HealthProbe),
                                      StateFile(tmp_path, CONVERTER), CONVERTER, EventLog(tmp_path),
                                      5.0, INSTANCE, HostView())
        following = asyncio.create_task(reconciler.follow_events())
        await asyncio.wait_for(seen.wait(), 5)
        following.cancel()
        assert running.status == "healthy" and running.restarts == 0


class TestOneContainerHangs:
    """The engine answers but hangs on one container: that container's refusal, not
    "engine lost", and the rest of the pass goes on."""

    async def test_a_removal_that_times_out_is_a_refusal(self, tmp_path: Path) -> None:
        gpus = GpuPool(FakeGpus("RTX 4090:24"))
        await gpus.refresh({})
        table = ServiceTable(NodePorts((29300, 29310)), gpus, StateFile(tmp_path, CONVERTER))
        table.abandon("stuck-attempt", "stuck")
        labels = labels_for(CONVERTER, spec(), 29300, 0, INSTANCE, "stuck-attempt")
        engine = MagicMock(spec=Engine)
        engine.list_managed = AsyncMock(return_value=[{"Id": "5" * 64, "State": "created",
                                                       "Labels": labels}])
        engine.remove = AsyncMock(side_effect=EngineUnavailable("The Docker engine did not answer"))
        engine.ping = AsyncMock(return_value=True)
        probe = MagicMock(spec=HealthProbe)
        probe.healthy_all = AsyncMock(side_effect=lambda targets, timeout: [True] * len(targets))
        events = EventLog(tmp_path)
        reconciler = DockerReconciler(table, engine, probe, StateFile(tmp_path, CONVERTER), CONVERTER,
                                      events, 5.0, INSTANCE, HostView())
        for _ in range(2):
            await reconciler.resync_logged()
        assert reconciler.resyncs == 2 and list(reconciler.refusals) == [f"container {'5' * 12} (a)"]
        assert not {"engine_lost", "engine_back"} & {e.kind for e in events.since(None, 100)}
        engine.ping = AsyncMock(return_value=False)  # now the engine itself is gone
        await reconciler.resync_logged()
        assert reconciler.resyncs == 2 and "engine_lost" in {e.kind for e in events.since(None, 100)}
