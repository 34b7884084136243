"""Tests for deploy_agent.gpus: inventories, accounting and placement."""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deploy_agent.errors import NoGpu, NoGpuCapacity
from deploy_agent.gpus import (
    GIB,
    OVERUSE_READINGS,
    Assignment,
    FakeGpus,
    GpuPool,
    GpuProcess,
    GpuReading,
    NoGpus,
    NvmlGpus,
    ServiceVram,
    open_inventory,
    overuse_margin_gb,
    parse_fake_gpus,
)
from deploy_agent.models import Owner


class StaticGpus:
    """An inventory whose readings a test sets directly; hands over GPUs as NVML does."""

    simulated = False

    def __init__(self, readings: list[GpuReading]) -> None:
        self.readings = readings

    def read(self) -> list[GpuReading]:
        return self.readings

    def handoff(self, assignment: Assignment) -> tuple[dict[str, str], list[dict[str, object]]]:
        return NvmlGpus.handoff(NvmlGpus.__new__(NvmlGpus), assignment)

    def close(self) -> None:
        pass


def reading(index: int, total: float = 24, used: float = 0,
            processes: tuple[GpuProcess, ...] | None = ()) -> GpuReading:
    return GpuReading(index=index, uuid=f"GPU-{index}", name="RTX 4090", total_gb=total,
                      used_gb=used, processes=processes)


async def pool_of(*readings: GpuReading, agent: dict[str, str] | None = None) -> GpuPool:
    """A pool over these readings; `agent` maps the agent's service names to container ids."""
    pool = GpuPool(StaticGpus(list(readings)))
    await pool.refresh(agent or {})
    return pool


class TestPlacement:
    """The least-committed GPU that fits; ties go to fewer services, then the lower index."""

    async def test_lowest_committed_fraction_wins(self) -> None:
        pool = await pool_of(reading(0), reading(1))
        assert [pool.reserve(Owner(f"s{i}", "t"), 8).index for i in range(4)] == [0, 1, 0, 1]

    async def test_fraction_not_absolute_free(self) -> None:
        pool = await pool_of(reading(0, total=80), reading(1, total=24))
        pool.reserve(Owner("big", "t"), 40)  # GPU 0: 50% committed, 40 GB free
        assert pool.reserve(Owner("next", "t"), 8).index == 1  # 0% committed beats 40 GB free

    async def test_tie_goes_to_fewer_services(self) -> None:
        pool = await pool_of(reading(0, total=24), reading(1, total=48))
        pool.claim(Owner("a", "t"), 0, 6)
        pool.claim(Owner("b", "t"), 0, 6)  # GPU 0: 50%, 2 services
        pool.claim(Owner("c", "t"), 1, 24)  # GPU 1: 50%, 1 service
        assert pool.reserve(Owner("d", "t"), 1).index == 1

    async def test_tie_goes_to_lower_index(self) -> None:
        pool = await pool_of(reading(0), reading(1))
        assert pool.reserve(Owner("a", "t"), 0).index == 0

    async def test_no_fit_is_503_listing_free_per_gpu(self) -> None:
        pool = await pool_of(reading(0), reading(1))
        pool.reserve(Owner("a", "t"), 20)
        with pytest.raises(NoGpuCapacity) as caught:
            pool.reserve(Owner("b", "t"), 30)
        assert caught.value.status == 503
        assert "GPU 0 (RTX 4090) has 4.0 GB free" in caught.value.message
        assert "GPU 1 (RTX 4090) has 24.0 GB free" in caught.value.message
        assert caught.value.extra["free_gb"] == {"0": 4.0, "1": 24.0}

    async def test_no_gpus_is_no_gpu(self) -> None:
        with pytest.raises(NoGpu):
            (await pool_of()).reserve(Owner("a", "1"), 1)

    async def test_release_frees_the_reservation(self) -> None:
        pool = await pool_of(reading(0))
        pool.reserve(Owner("a", "t"), 24)
        pool.release(Owner("a", "t"))
        assert pool.reserve(Owner("b", "t"), 24).index == 0

    async def test_claimed_reservation_counts(self) -> None:
        pool = await pool_of(reading(0), reading(1))
        pool.claim(Owner("adopted", "t"), 0, 20)
        assert pool.reserve(Owner("new", "t"), 8).index == 1
        assert pool.views()[0].services == ["adopted"]


class TestAccounting:
    """Foreign memory counts against free; the agent's own processes do not count twice."""

    async def test_foreign_processes_count(self) -> None:
        mine, theirs = "a" * 64, "b" * 64
        processes = (GpuProcess(1, 6, mine), GpuProcess(2, 10, theirs), GpuProcess(3, 2, None))
        pool = await pool_of(reading(0, used=18, processes=processes), agent={"svc": mine})
        pool.claim(Owner("svc", "t"), 0, 8)
        view = pool.views()[0]
        assert (view.vram_foreign_gb, view.vram_committed_gb) == (12, 8 + 12)
        assert view.vram_free_gb == 24 - 8 - 12

    async def test_without_process_info_all_use_is_foreign(self) -> None:
        pool = await pool_of(reading(0, used=10, processes=None))
        pool.claim(Owner("svc", "t"), 0, 8)
        view = pool.views()[0]
        assert (view.vram_foreign_gb, view.vram_committed_gb) == (10, 8 + 10)
        assert view.service_vram[0].used_gb is None  # unknown, not 0

    async def test_hidden_processes_never_over_commit(self) -> None:
        """The issue's case: a service declaring 10 GB uses 2 beside 8 GB foreign, unseen."""
        pool = await pool_of(reading(0, used=2 + 8, processes=None))
        pool.reserve(Owner("svc", "t"), 10)
        assert pool.views()[0].vram_free_gb == 4  # not 14: its untouched 8 GB can't hide foreign use
        with pytest.raises(NoGpuCapacity):
            pool.reserve(Owner("next", "t"), 12)
        assert pool.reserve(Owner("small", "t"), 4).index == 0

    async def test_foreign_use_steers_placement(self) -> None:
        pool = await pool_of(reading(0, used=20, processes=(GpuProcess(9, 20, None),)), reading(1))
        assert pool.reserve(Owner("a", "t"), 2).index == 1
        with pytest.raises(NoGpuCapacity):
            pool.reserve(Owner("b", "t"), 23)

    async def test_views(self) -> None:
        pool = await pool_of(reading(0, used=3, processes=(GpuProcess(9, 3, None),)))
        pool.reserve(Owner("svc", "t"), 8)
        view = pool.views()[0]
        assert (view.id, view.vram_total_gb, view.vram_used_gb) == (0, 24, 3)
        assert (view.vram_reserved_gb, view.vram_free_gb, view.services) == (8, 13, ["svc"])

    @pytest.mark.parametrize(("gpu", "accounting"), [
        (reading(0, used=3), "per_process"),
        (reading(0, used=3, processes=None), "whole_gpu"),
        (GpuReading(index=0, uuid="GPU-0", name="H100", total_gb=80, used_gb=None,
                    node="n1", node_index=0, node_name="n1"), "declared"),  # a swarm's GPU
    ])
    async def test_views_say_which_accounting(self, gpu: GpuReading, accounting: str) -> None:
        assert (await pool_of(gpu)).views()[0].vram_accounting == accounting

    async def test_fake_gpus_count_declarations(self) -> None:
        pool = GpuPool(FakeGpus("RTX 4090:24"))
        await pool.refresh({})
        assert pool.views()[0].vram_accounting == "declared"


class TestObservedMemory:
    """A service commits max(declared, observed): a declaration can't hide real use."""

    async def test_service_above_its_declaration_commits_what_it_uses(self) -> None:
        big, small = "b" * 64, "s" * 64
        pool = await pool_of(reading(0, used=18, processes=(GpuProcess(1, 18, big),)), reading(1),
                             agent={"big": big, "small": small})
        pool.claim(Owner("big", "t"), 0, 6)  # declared 6, uses 18: GPU 0 has 6 GB really free
        view = pool.views()[0]
        assert (view.vram_reserved_gb, view.vram_committed_gb, view.vram_free_gb) == (6, 18, 6)
        assert view.service_vram[0] == ServiceVram("big", 6, 18)
        assert pool.observed_gb("big") == 18 and pool.observed_gb("small") == 0
        assert pool.reserve(Owner("next", "t"), 7).index == 1  # where there really is room

    async def test_service_below_its_declaration_commits_the_declaration(self) -> None:
        mine = "m" * 64
        pool = await pool_of(reading(0, used=2, processes=(GpuProcess(1, 2, mine),)), agent={"a": mine})
        pool.claim(Owner("a", "t"), 0, 10)
        assert pool.views()[0].vram_committed_gb == 10

    async def test_memory_of_a_gone_container_counts_until_released(self) -> None:
        gone = "g" * 64  # the driver still reports its process: it counts, as foreign
        pool = await pool_of(reading(0, used=18, processes=(GpuProcess(1, 18, gone),)))
        assert pool.views()[0].vram_foreign_gb == 18
        with pytest.raises(NoGpuCapacity):
            pool.reserve(Owner("next", "t"), 7)

    async def test_fake_gpus_observe_nothing(self) -> None:
        pool = GpuPool(FakeGpus("RTX 4090:24"))
        await pool.refresh({"a": "a" * 64})
        pool.claim(Owner("a", "t"), 0, 8)
        assert pool.observed_gb("a") is None and pool.views()[0].service_vram[0].used_gb is None

    async def test_dry_placement_reserves_nothing_and_frees_a_replaced_service(self) -> None:
        old = "o" * 64
        pool = await pool_of(reading(0, used=20, processes=(GpuProcess(1, 20, old),)),
                             agent={"svc": old})
        pool.claim(Owner("svc", "t"), 0, 16)
        with pytest.raises(NoGpuCapacity):
            pool.place(10)
        assert pool.place(10, freeing=Owner("svc", "t")).index == 0  # its reservation and memory go first
        assert pool.views()[0].services == ["svc"] and pool.views()[0].vram_committed_gb == 20


class TestOveruse:
    """Above declared + max(0.5 GB, 10 %) in 3 readings in a row; a spike is not overuse."""

    async def test_three_readings_in_a_row(self) -> None:
        mine = "m" * 64
        gpus = StaticGpus([reading(0, processes=(GpuProcess(1, 9, mine),))])
        pool = GpuPool(gpus)
        await pool.refresh({"a": mine})
        pool.claim(Owner("a", "t"), 0, 8)  # 8 + max(0.5, 0.8) = 8.8 allowed; 9 is over
        for expected in (set(), set(), {"a"}):
            await pool.refresh({"a": mine})
            pool.tally_overuse()
            assert pool.over == expected
        gpus.readings = [reading(0, processes=(GpuProcess(1, 8.7, mine),))]  # back within bounds
        await pool.refresh({"a": mine})
        pool.tally_overuse()
        assert pool.over == set()

    async def test_a_spike_is_not_overuse(self) -> None:
        mine = "m" * 64
        gpus = StaticGpus([reading(0, processes=(GpuProcess(1, 20, mine),))])
        pool = GpuPool(gpus)
        pool.claim(Owner("a", "t"), 0, 4)
        for used in (20, 20, 3, 20, 20):
            gpus.readings = [reading(0, processes=(GpuProcess(1, used, mine),))]
            await pool.refresh({"a": mine})
            pool.tally_overuse()
        assert pool.over == set()

    async def test_readings_for_requests_do_not_count(self) -> None:
        """Deploys and dry runs read the GPUs too: however many, they are not periodic readings."""
        mine = "m" * 64
        pool = GpuPool(StaticGpus([reading(0, processes=(GpuProcess(1, 20, mine),))]))
        pool.claim(Owner("a", "t"), 0, 4)
        for _ in range(OVERUSE_READINGS + 2):
            await pool.refresh({"a": mine})
        assert pool.over == set()
        pool.tally_overuse()
        assert pool.over == set()  # one periodic reading above, not OVERUSE_READINGS

    def test_margin(self) -> None:
        assert overuse_margin_gb(2) == 0.5 and overuse_margin_gb(40) == 4


@st.composite
def operations(draw: st.DrawFn) -> list[tuple[str, str, float]]:
    names = [f"s{i}" for i in range(8)]
    return draw(st.lists(st.tuples(
        st.sampled_from(["deploy", "fail", "stop"]), st.sampled_from(names),
        st.floats(min_value=0, max_value=30, allow_nan=False)), max_size=60))


class TestNeverOverCommits:
    """No sequence of deploys, failures and stops reserves more than a GPU holds."""

    @settings(max_examples=300, deadline=None)
    @given(ops=operations(), sizes=st.lists(st.sampled_from([8.0, 16.0, 24.0, 80.0]),
                                             min_size=1, max_size=4))
    def test_property(self, ops: list[tuple[str, str, float]], sizes: list[float]) -> None:
        pool = GpuPool(StaticGpus([]))
        pool._readings = [reading(i, total=size) for i, size in enumerate(sizes)]
        running: set[str] = set()
        for action, name, vram in ops:
            if action in ("deploy", "fail") and name not in running:
                try:
                    pool.reserve(Owner(name, "t"), vram)
                except NoGpuCapacity:
                    continue
                if action == "fail":
                    pool.release(Owner(name, "t"))
                else:
                    running.add(name)
            elif action == "stop":
                pool.release(Owner(name, "t"))
                running.discard(name)
            for r in pool._readings:
                assert pool.reserved_gb(r.index) <= r.total_gb + 1e-9
                assert pool.free_gb(r) >= -1e-9


class TestFakeGpus:
    """--fake-gpus declares simulated GPUs; the hand-off is an env var, no device."""

    def test_parse(self) -> None:
        gpus = parse_fake_gpus("RTX 4090:24, A100 80GB:80")
        assert [(g.index, g.name, g.total_gb) for g in gpus] == [(0, "RTX 4090", 24), (1, "A100 80GB", 80)]

    @pytest.mark.parametrize("bad", ["RTX", "RTX:", ":24", "RTX:x", "RTX:0", "RTX:-1"])
    def test_parse_rejects(self, bad: str) -> None:
        with pytest.raises(ValueError, match="NAME:GB"):
            parse_fake_gpus(bad)

    async def test_fake_handoff_is_env_only(self) -> None:
        pool = GpuPool(FakeGpus("RTX 4090:24,RTX 4090:24"))
        await pool.refresh({})
        pool.reserve(Owner("a", "t"), 20)
        env, requests = pool.handoff(pool.reserve(Owner("b", "t"), 8))
        assert (env, requests) == ({"NVIDIA_VISIBLE_DEVICES": "1"}, [])
        assert pool.views()[1].vram_used_gb == 8  # simulated use is what was declared

    async def test_nvml_handoff_is_a_device_request_by_uuid(self) -> None:
        pool = await pool_of(reading(0), reading(1))
        pool.reserve(Owner("a", "t"), 20)
        env, requests = pool.handoff(pool.reserve(Owner("b", "t"), 8))
        assert env == {}
        assert requests == [{"Driver": "", "Count": 0, "DeviceIDs": ["GPU-1"],
                             "Capabilities": [["gpu"]], "Options": {}}]


# -- the NVML inventory against a fake pynvml that behaves like the real one ----------------


def fake_nvml(devices: list[dict[str, Any]], init_error: str | None = None) -> types.ModuleType:
    """A module with pynvml's names: errors as classes, bytes names on old drivers."""
    nvml = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    class NVMLError_NotSupported(NVMLError):
        pass

    class NVMLError_DriverNotLoaded(NVMLError):
        pass

    nvml.NVMLError = NVMLError  # type: ignore[attr-defined]
    nvml.NVML_DEVICE_MIG_ENABLE = 1  # type: ignore[attr-defined]
    state = {"initialised": False, "shut_down": False}

    def check() -> bool:
        if not state["initialised"]:
            raise NVMLError("Uninitialized")
        return True

    def init() -> None:
        if init_error == "driver":
            raise NVMLError_DriverNotLoaded("Driver Not Loaded")
        state["initialised"] = True

    def maybe(device: dict[str, Any], key: str) -> Any:
        check()
        value = device[key]
        if value == "unsupported":
            raise NVMLError_NotSupported("Not Supported")
        return value

    nvml.nvmlInit = init  # type: ignore[attr-defined]
    nvml.nvmlShutdown = lambda: state.update(shut_down=True)  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetCount = lambda: (check(), len(devices))[1]  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetHandleByIndex = lambda i: (check(), devices[i])[1]  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetName = lambda d: maybe(d, "name")  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetUUID = lambda d: maybe(d, "uuid")  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetMemoryInfo = lambda d: types.SimpleNamespace(  # type: ignore[attr-defined]
        total=maybe(d, "total"), used=maybe(d, "used"), free=d["total"] - d["used"])
    nvml.nvmlDeviceGetUtilizationRates = lambda d: types.SimpleNamespace(  # type: ignore[attr-defined]
        gpu=maybe(d, "util"), memory=0)
    nvml.nvmlDeviceGetComputeRunningProcesses = lambda d: [  # type: ignore[attr-defined]
        types.SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in maybe(d, "procs")]
    nvml.nvmlDeviceGetMigMode = lambda d: (maybe(d, "mig"), maybe(d, "mig"))  # type: ignore[attr-defined]
    nvml.state = state  # type: ignore[attr-defined]
    return nvml


def device(**overrides: Any) -> dict[str, Any]:
    base = {"name": "NVIDIA RTX 4090", "uuid": "GPU-aaaa", "total": 24 * GIB, "used": 2 * GIB,
            "util": 37, "procs": [], "mig": 0}
    return {**base, **overrides}


class TestNvmlInventory:
    """Readings from NVML as real drivers give them, quirks included."""

    def test_reads_every_device(self) -> None:
        nvml = fake_nvml([device(), device(name=b"Tesla V100", uuid=b"GPU-bbbb", total=16 * GIB)])
        gpus = NvmlGpus(nvml).read()
        assert [(g.index, g.name, g.uuid, g.total_gb) for g in gpus] == [
            (0, "NVIDIA RTX 4090", "GPU-aaaa", 24), (1, "Tesla V100", "GPU-bbbb", 16)]
        assert gpus[0].used_gb == 2 and gpus[0].utilization_pct == 37

    def test_processes_are_matched_to_containers(self, tmp_path: Path) -> None:
        container = "c" * 64
        (tmp_path / "100").mkdir()
        (tmp_path / "100" / "cgroup").write_text(f"0::/system.slice/docker-{container}.scope\n")
        (tmp_path / "200").mkdir()
        (tmp_path / "200" / "cgroup").write_text("0::/user.slice/session-1.scope\n")
        nvml = fake_nvml([device(procs=[(100, 4 * GIB), (200, GIB), (300, GIB)])])
        processes = NvmlGpus(nvml, proc=tmp_path).read()[0].processes
        assert processes == (GpuProcess(100, 4, container), GpuProcess(200, 1, None),
                             GpuProcess(300, 1, None))

    def test_hidden_per_process_memory_means_unknown(self) -> None:
        nvml = fake_nvml([device(procs=[(100, None)])])
        assert NvmlGpus(nvml).read()[0].processes is None

    def test_unsupported_queries_are_none(self) -> None:
        nvml = fake_nvml([device(util="unsupported", procs="unsupported", mig="unsupported")])
        gpu = NvmlGpus(nvml).read()[0]
        assert (gpu.utilization_pct, gpu.processes, gpu.mig) == (None, None, False)
        assert gpu.total_gb == 24

    def test_mig_enabled_device(self) -> None:
        nvml = fake_nvml([device(name="NVIDIA A100-SXM4-80GB", total=80 * GIB, mig=1,
                                 util="unsupported", procs="unsupported")])
        gpu = NvmlGpus(nvml).read()[0]
        assert gpu.mig is True and gpu.total_gb == 80 and gpu.processes is None

    def test_driver_not_loaded_means_no_gpus(self) -> None:
        inventory = open_inventory(None, nvml=fake_nvml([device()], init_error="driver"))
        assert isinstance(inventory, NoGpus) and inventory.read() == []

    def test_missing_library_means_no_gpus(self) -> None:
        # This machine has no NVIDIA driver: the real pynvml fails to load libnvidia-ml.
        assert open_inventory(None).read() == [] or pytest.skip("this machine has an NVIDIA GPU")

    def test_close_shuts_nvml_down(self) -> None:
        nvml = fake_nvml([device()])
        NvmlGpus(nvml).close()
        assert nvml.state["shut_down"] is True

    def test_fake_gpus_win_over_nvml(self) -> None:
        assert isinstance(open_inventory("A:1", nvml=fake_nvml([device()])), FakeGpus)


class TestRefreshWhileDeploying:
    """The service table may change while the GPUs are read (found by fuzzing)."""

    async def test_table_changes_during_a_slow_read(self, tmp_path: Path) -> None:
        import asyncio
        import time

        from deploy_agent.convert import make_converter
        from deploy_agent.models import DeploySpec, Service
        from deploy_agent.ports import NodePorts
        from deploy_agent.state import StateFile
        from deploy_agent.table import ServiceTable

        class SlowGpus(StaticGpus):
            def read(self) -> list[GpuReading]:
                time.sleep(0.2)  # a slow driver, read in a thread
                return self.readings

        converter = make_converter()
        table = ServiceTable(NodePorts((28000, 28010)), GpuPool(SlowGpus([reading(0)])),
                             StateFile(tmp_path, converter))
        spec = converter.structure({"name": "first", "image": "img:1"}, DeploySpec)
        table.adopt(Service(spec=spec, container_id="a" * 64, host_port=28000))
        refresh = asyncio.create_task(table.refresh_gpus())
        await asyncio.sleep(0.05)
        table.adopt(Service(spec=converter.structure({"name": "second", "image": "img:1"}, DeploySpec),
                            container_id="b" * 64, host_port=28001))
        await refresh  # raised "dictionary changed size during iteration" before the fix
        # The reading counts what the table held when it began: "first" and not "second".
        assert table.gpus.observed_gb("first") == 0 and table.gpus.observed_gb("second") == 0
