"""GPU inventories (NVML, fake, none) and VRAM-aware placement that never over-commits.

An inventory reads the hardware (blocking; run it in a thread). The GpuPool keeps the
agent's reservations and the latest reading, and places a service on the GPU with the
lowest committed fraction that still has room:

    reserved  = declared vram_gb of the agent's services on it, deploys in flight included
    foreign   = memory used by processes outside the agent's containers
    free      = total - reserved - foreign
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import re
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

import attrs

from deploy_agent.errors import NoGpu, NoGpuCapacity
from deploy_agent.models import JSONObject

_LOGGER = logging.getLogger(__name__)

GIB = 1024**3
CONTAINER_ID_RE = re.compile(r"[0-9a-f]{64}")


@attrs.frozen
class GpuProcess:
    """A process using GPU memory; container_id is set when it runs in a container."""

    pid: int
    used_gb: float
    container_id: str | None = None


@attrs.frozen
class GpuReading:
    """One GPU as the inventory saw it. processes is None when the driver can't tell."""

    index: int
    uuid: str
    name: str
    total_gb: float
    used_gb: float
    utilization_pct: float | None = None
    processes: tuple[GpuProcess, ...] | None = None
    mig: bool = False


class GpuInventory(Protocol):
    """Something that reports the node's GPUs."""

    simulated: bool

    def read(self) -> list[GpuReading]:
        """The GPUs now; blocking, so callers run it in a thread."""

    def close(self) -> None:
        """Release the driver."""


class NoGpus:
    """A node without GPUs (no driver, no NVML)."""

    simulated = False

    def read(self) -> list[GpuReading]:
        return []

    def close(self) -> None:
        pass


class FakeGpus:
    """Simulated GPUs from `NAME:GB,NAME:GB`: placement and accounting are real, nothing else."""

    simulated = True

    def __init__(self, description: str) -> None:
        self._gpus = parse_fake_gpus(description)

    def read(self) -> list[GpuReading]:
        return list(self._gpus)

    def close(self) -> None:
        pass


def parse_fake_gpus(description: str) -> tuple[GpuReading, ...]:
    """`"RTX 4090:24,RTX 4090:24"` -> two 24 GB readings; ValueError when malformed."""
    gpus = []
    for index, item in enumerate(part.strip() for part in description.split(",") if part.strip()):
        name, sep, size = item.rpartition(":")
        try:
            total = float(size)
        except ValueError:
            total = -1.0
        if not sep or not name or total <= 0:
            raise ValueError(f"expected NAME:GB, like 'RTX 4090:24', got {item!r}")
        gpus.append(GpuReading(index=index, uuid=f"GPU-fake-{index}", name=name,
                               total_gb=total, used_gb=0.0, processes=()))
    return tuple(gpus)


class NvmlGpus:
    """The node's NVIDIA GPUs through NVML (the `pynvml` module of nvidia-ml-py)."""

    simulated = False

    def __init__(self, nvml: ModuleType, proc: Path = Path("/proc")) -> None:
        self._nvml = nvml
        self._proc = proc
        nvml.nvmlInit()

    def read(self) -> list[GpuReading]:
        nvml = self._nvml
        return [self._read_one(index, nvml.nvmlDeviceGetHandleByIndex(index))
                for index in range(nvml.nvmlDeviceGetCount())]

    def _read_one(self, index: int, handle: Any) -> GpuReading:
        nvml = self._nvml
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        return GpuReading(
            index=index,
            uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
            name=_text(nvml.nvmlDeviceGetName(handle)),
            total_gb=memory.total / GIB,
            used_gb=memory.used / GIB,
            utilization_pct=self._optional(lambda: float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)),
            processes=self._optional(lambda: self._processes(handle)),
            mig=bool(self._optional(lambda: nvml.nvmlDeviceGetMigMode(handle)[0]
                                    == nvml.NVML_DEVICE_MIG_ENABLE)),
        )

    def _optional(self, query: Any) -> Any:
        """A query some devices don't support (MIG, older boards): None instead of an error."""
        try:
            return query()
        except self._nvml.NVMLError:
            return None

    def _processes(self, handle: Any) -> tuple[GpuProcess, ...] | None:
        found = []
        for process in self._nvml.nvmlDeviceGetComputeRunningProcesses(handle):
            used = getattr(process, "usedGpuMemory", None)
            if used is None:
                return None  # memory per process is hidden (e.g. inside some VMs)
            found.append(GpuProcess(pid=process.pid, used_gb=used / GIB,
                                    container_id=self._container_of(process.pid)))
        return tuple(found)

    def _container_of(self, pid: int) -> str | None:
        return container_of_pid(pid, self._proc)

    def close(self) -> None:
        with contextlib.suppress(self._nvml.NVMLError):
            self._nvml.nvmlShutdown()


def container_of_pid(pid: int, proc: Path = Path("/proc")) -> str | None:
    """The container a process runs in, from its cgroup path; None outside containers.

    Only meaningful where /proc shows the host's PIDs: the agent on the host, or in a
    container started with --pid host.
    """
    try:
        text = (proc / str(pid) / "cgroup").read_text()
    except OSError:
        return None
    match = CONTAINER_ID_RE.search(text)
    return match.group(0) if match else None


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def open_inventory(fake_gpus: str | None, nvml: ModuleType | None = None) -> GpuInventory:
    """Fake GPUs when configured; else NVML; else (no driver, no library) no GPUs."""
    if fake_gpus:
        return FakeGpus(fake_gpus)
    try:
        return NvmlGpus(nvml or importlib.import_module("pynvml"))
    except Exception as err:  # NVMLError subclasses, or an import failure
        _LOGGER.info("No NVIDIA GPUs available (%s); GPU deploys will be refused", err)
        return NoGpus()


@attrs.frozen
class Assignment:
    """Where a service's GPU reservation lives."""

    index: int
    uuid: str
    vram_gb: float


@attrs.frozen
class GpuView:
    """A `GET /gpus` entry."""

    id: int
    name: str
    uuid: str
    vram_total_gb: float
    vram_used_gb: float
    vram_reserved_gb: float
    vram_free_gb: float
    utilization_pct: float | None
    services: list[str]


class GpuPool:
    """Reservations per service and the latest reading; placement decides from both.

    reserve() and release() never await, so concurrent deploys on the event loop see each
    other's reservations and can never over-commit a GPU.
    """

    def __init__(self, inventory: GpuInventory) -> None:
        self.inventory = inventory
        self._readings: list[GpuReading] = []
        self._reservations: dict[str, Assignment] = {}
        self._agent_containers: frozenset[str] = frozenset()

    @property
    def count(self) -> int:
        return len(self._readings)

    async def refresh(self, agent_containers: frozenset[str]) -> None:
        """Read the GPUs again (in a thread); on a driver error keep the last reading.

        agent_containers is a snapshot taken by the caller: the service table may change
        while the driver is read.
        """
        try:
            readings = await asyncio.to_thread(self.inventory.read)
        except Exception as err:  # NVMLError and friends: a flaky driver must not stop the agent
            _LOGGER.warning("Reading the GPUs failed: %s", err)
            return
        self._readings = readings
        self._agent_containers = agent_containers

    def reserved_gb(self, index: int) -> float:
        return sum(a.vram_gb for a in self._reservations.values() if a.index == index)

    def services_on(self, index: int) -> list[str]:
        return sorted(name for name, a in self._reservations.items() if a.index == index)

    def foreign_gb(self, reading: GpuReading) -> float:
        """Memory used by others: per process when known, else used minus reserved."""
        if reading.processes is None:
            return max(0.0, reading.used_gb - self.reserved_gb(reading.index))
        return sum(p.used_gb for p in reading.processes
                   if p.container_id not in self._agent_containers)

    def free_gb(self, reading: GpuReading) -> float:
        return reading.total_gb - self.reserved_gb(reading.index) - self.foreign_gb(reading)

    def reserve(self, name: str, vram_gb: float) -> Assignment:
        """Place `name` on the least-committed GPU that fits; NoGpu/NoGpuCapacity otherwise."""
        if not self._readings:
            raise NoGpu("This node has no GPU; deploy it without gpu: true or on a GPU node.")
        fitting = [r for r in self._readings if self.free_gb(r) >= vram_gb]
        if not fitting:
            free = ", ".join(f"GPU {r.index} ({r.name}) has {max(0.0, self.free_gb(r)):.1f} GB free"
                             for r in self._readings)
            raise NoGpuCapacity(
                f"No GPU has {vram_gb:g} GB of VRAM free: {free}.",
                free_gb={str(r.index): round(max(0.0, self.free_gb(r)), 2) for r in self._readings},
            )
        best = min(fitting, key=lambda r: (
            (r.total_gb - self.free_gb(r)) / r.total_gb, len(self.services_on(r.index)), r.index))
        assignment = Assignment(index=best.index, uuid=best.uuid, vram_gb=vram_gb)
        self._reservations[name] = assignment
        return assignment

    def claim(self, name: str, index: int, vram_gb: float) -> None:
        """Record the reservation of a service adopted from its container labels."""
        uuid = next((r.uuid for r in self._readings if r.index == index), "")
        self._reservations[name] = Assignment(index=index, uuid=uuid, vram_gb=vram_gb)

    def release(self, name: str) -> None:
        self._reservations.pop(name, None)

    def handoff(self, assignment: Assignment) -> tuple[dict[str, str], list[JSONObject]]:
        """Env and DeviceRequests that give the container this GPU, as `--gpus device=UUID` does.

        Inside the container the GPU is device 0, so CUDA_VISIBLE_DEVICES is never set.
        Fake GPUs get only NVIDIA_VISIBLE_DEVICES, since there is no device to request.
        """
        if self.inventory.simulated:
            return {"NVIDIA_VISIBLE_DEVICES": str(assignment.index)}, []
        return {}, [{"Driver": "", "Count": 0, "DeviceIDs": [assignment.uuid],
                     "Capabilities": [["gpu"]], "Options": {}}]

    def views(self) -> list[GpuView]:
        views = []
        for r in self._readings:
            reserved = self.reserved_gb(r.index)
            used = reserved if self.inventory.simulated else r.used_gb
            views.append(GpuView(
                id=r.index, name=r.name, uuid=r.uuid, vram_total_gb=round(r.total_gb, 2),
                vram_used_gb=round(used, 2), vram_reserved_gb=round(reserved, 2),
                vram_free_gb=round(max(0.0, self.free_gb(r)), 2),
                utilization_pct=r.utilization_pct, services=self.services_on(r.index),
            ))
        return views
