"""GPU inventories (NVML, fake, none) and VRAM-aware placement that never over-commits.

An inventory reads the hardware (blocking; run it in a thread). The GpuPool keeps the
agent's reservations and the latest reading, and places a service on the GPU with the
lowest committed fraction that still has room:

    reserved  = declared vram_gb of the agent's services on it, deploys in flight included
    foreign   = memory used by processes outside the agent's containers (all the GPU's
                use when the driver hides memory per process: a safe bound)
    free      = total - reserved - foreign
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import logging
import re
from pathlib import Path
from types import ModuleType
from typing import Any, Literal, Protocol

import attrs

from deploy_agent.errors import NoGpu, NoGpuCapacity
from deploy_agent.models import JSONObject, Owner

_LOGGER = logging.getLogger(__name__)

GPU_ENGINE_LABEL = "deploy-agent.gpus"  # on each Swarm node's engine: [{"uuid", "name", "vram_gb"}]

GIB = 1024**3
CONTAINER_ID_RE = re.compile(r"[0-9a-f]{64}")
# Overuse: observed above declared by more than max(0.5 GB, 10 %), in 3 readings in a row
# (one spike while a model loads is not overuse).
OVERUSE_MIN_GB = 0.5
OVERUSE_FRACTION = 0.10
OVERUSE_READINGS = 3


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
    used_gb: float | None  # None: not known here (another node's GPU)
    utilization_pct: float | None = None
    processes: tuple[GpuProcess, ...] | None = None
    mig: bool = False
    # The node it is on: None for the agent's own node, else another node's ID (a swarm's).
    node: str | None = None
    node_index: int | None = None  # its index on that node, where `index` is the pool's own
    node_name: str | None = None  # that node's hostname, for people
    available: bool = True  # False while its node is down: nothing new is placed there

    @property
    def local_index(self) -> int:
        return self.index if self.node_index is None else self.node_index

    @property
    def label(self) -> str:
        """How people and free_gb maps name it: `0` on the agent's own node, else `node/0`."""
        return str(self.local_index) if self.node is None else f"{self.node_name}/{self.local_index}"


class GpuInventory(Protocol):
    """Something that reports GPUs, and knows how a container is given one of them."""

    simulated: bool  # fake GPUs: their use is what services declared

    def read(self) -> list[GpuReading]:
        """The GPUs now; blocking, so callers run it in a thread."""

    def handoff(self, assignment: Assignment) -> tuple[dict[str, str], list[JSONObject]]:
        """Env and DeviceRequests that give a container this GPU."""

    def close(self) -> None:
        """Release the driver."""


class NoGpus:
    """A node without GPUs (no driver, no NVML)."""

    simulated = False

    def read(self) -> list[GpuReading]:
        return []

    def handoff(self, assignment: Assignment) -> tuple[dict[str, str], list[JSONObject]]:
        raise NoGpu("This node has no GPU.")

    def close(self) -> None:
        pass


class FakeGpus:
    """Simulated GPUs from `NAME:GB,NAME:GB`: placement and accounting are real, nothing else."""

    simulated = True

    def __init__(self, description: str) -> None:
        self._gpus = parse_fake_gpus(description)

    def read(self) -> list[GpuReading]:
        return list(self._gpus)

    def handoff(self, assignment: Assignment) -> tuple[dict[str, str], list[JSONObject]]:
        """Only NVIDIA_VISIBLE_DEVICES: there is no device to request."""
        return {"NVIDIA_VISIBLE_DEVICES": str(assignment.local_index)}, []

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

    def handoff(self, assignment: Assignment) -> tuple[dict[str, str], list[JSONObject]]:
        """A DeviceRequest by UUID, as `docker run --gpus device=UUID` makes: inside the
        container the GPU is device 0, so CUDA_VISIBLE_DEVICES is never set."""
        return {}, [{"Driver": "", "Count": 0, "DeviceIDs": [assignment.uuid],
                     "Capabilities": [["gpu"]], "Options": {}}]

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
    node: str | None = None  # as GpuReading.node: None for the agent's own node
    node_index: int | None = None

    @property
    def local_index(self) -> int:
        return self.index if self.node_index is None else self.node_index


@attrs.frozen
class ServiceVram:
    """One service's memory on a GPU: what it declared, what NVML sees it use (None: unknown)."""

    name: str
    declared_gb: float
    used_gb: float | None


# How a GPU's foreign use is known: per process from NVML; the whole GPU's use when the
# driver hides memory per process (a safe bound); or not at all (fake GPUs, another
# node's GPU), when placement counts only declarations.
VramAccounting = Literal["per_process", "whole_gpu", "declared"]


@attrs.frozen
class GpuView:
    """A `GET /gpus` entry."""

    id: int
    name: str
    uuid: str
    vram_total_gb: float
    vram_used_gb: float | None
    vram_reserved_gb: float
    vram_committed_gb: float
    vram_foreign_gb: float | None
    vram_free_gb: float
    vram_idle_gb: float  # held by idle services: reclaimable by eviction
    utilization_pct: float | None
    services: list[str]
    service_vram: list[ServiceVram]
    node_name: str | None
    node_id: str | None
    vram_accounting: VramAccounting


def overuse_margin_gb(declared_gb: float) -> float:
    """How far above its declaration a service may go before it counts as overusing."""
    return max(OVERUSE_MIN_GB, OVERUSE_FRACTION * declared_gb)


class GpuPool:
    """Reservations by owner and the latest reading; placement decides from both.

    A service commits max(declared, observed) on its GPU: a declaration can't hide what a
    service really uses. reserve() and release() never await, so concurrent deploys on the
    event loop see each other's reservations and can never over-commit a GPU. A service
    placed again holds its old and its new reservation (two owners) until it lets go of one.
    """

    def __init__(self, inventory: GpuInventory) -> None:
        self.inventory = inventory
        self._readings: list[GpuReading] = []
        self._reservations: dict[Owner, Assignment] = {}
        # Room held, by a token of its own, for a deploy (one that evicted for it, or waited);
        # counted as taken for everyone but the deploy that activated the token under its
        # name's lock, whose reservation takes it.
        self._earmarks: dict[str, Assignment] = {}
        self._active: dict[str, str] = {}  # name -> the token its deploy under way took
        self._containers: dict[str, str] = {}  # name -> container id, as of the last reading
        self._over_streak: dict[str, int] = {}
        self.over: frozenset[str] = frozenset()  # services above their declaration, persistently
        self.readings_taken = 0  # bumped on every reading, for caches of what shows them
        self._attribute([])

    @property
    def count(self) -> int:
        return len(self._readings)

    async def refresh(self, containers: dict[str, str]) -> None:
        """Read the GPUs again (in a thread); on a driver error keep the last reading.

        `containers` (service name -> container id) is a snapshot taken by the caller: the
        service table may change while the driver is read.
        """
        try:
            readings = await asyncio.to_thread(self.inventory.read)
        except Exception as err:  # NVMLError and friends: a flaky driver must not stop the agent
            _LOGGER.warning("Reading the GPUs failed: %s", err)
            return
        self._readings = readings
        self._containers = dict(containers)
        self._attribute(readings)
        self.readings_taken += 1

    def tally_overuse(self) -> None:
        """Count the last reading towards overuse: OVERUSE_READINGS in a row above declaration
        + margin flag a service. Only the periodic resync calls this, so readings a deploy or
        a dry run takes (any number, in quick succession) never make a spike look persistent."""
        streaks = {}
        for owner, assignment in self._reservations.items():
            used = self.observed_gb(owner.name, assignment.index)
            above = used is not None and used > assignment.vram_gb + overuse_margin_gb(assignment.vram_gb)
            if above:
                streaks[owner.name] = self._over_streak.get(owner.name, 0) + 1
        self._over_streak = streaks
        self.over = frozenset(name for name, streak in streaks.items() if streak >= OVERUSE_READINGS)

    def _attribute(self, readings: list[GpuReading]) -> None:
        """Sum each reading's process memory per container, once, so that every question
        after it (per service, per GPU, per request) is a lookup."""
        self._used: dict[str | None, dict[int, float]] = {}
        self._process_total: dict[int, float] = {}
        self._hidden = {r.index for r in readings if r.processes is None}
        for reading in readings:
            for process in reading.processes or ():
                per_gpu = self._used.setdefault(process.container_id, {})
                per_gpu[reading.index] = per_gpu.get(reading.index, 0.0) + process.used_gb
                self._process_total[reading.index] = (
                    self._process_total.get(reading.index, 0.0) + process.used_gb)

    def observed_gb(self, name: str, index: int | None = None) -> float | None:
        """Memory NVML attributes to the service's container (on one GPU, or on all).

        None when unknown: simulated GPUs, or a driver that hides per-process memory.
        """
        if self.inventory.simulated or not self._readings:
            return None
        hidden = index in self._hidden if index is not None else bool(self._hidden)
        if hidden:
            return None
        per_gpu = self._used.get(self._containers.get(name, ""), {})
        return per_gpu.get(index, 0.0) if index is not None else sum(per_gpu.values())

    def reserved_gb(self, index: int) -> float:
        """Declared on this GPU: reservations and earmarked room."""
        return sum(a.vram_gb for a in [*self._reservations.values(), *self._earmarks.values()]
                   if a.index == index)

    def services_on(self, index: int) -> list[str]:
        return sorted({owner.name for owner, a in self._reservations.items() if a.index == index})

    def declared_gb(self, name: str, index: int) -> float:
        """What `name` declared on this GPU (both reservations, while it is placed again)."""
        return sum(a.vram_gb for owner, a in self._reservations.items()
                   if owner.name == name and a.index == index)

    def _mine_on(self, index: int) -> set[str]:
        """Container ids of the services reserved on this GPU."""
        return {self._containers[name] for name in self.services_on(index) if name in self._containers}

    def foreign_gb(self, reading: GpuReading, freeing: Owner | None = None) -> float:
        """Memory used by anything but the services reserved on this GPU: per process when
        known (a process whose container is gone counts until the driver frees it), else
        all the GPU's use: which of it is the services' is unknown, and memory they declared
        but haven't touched yet must not hide foreign use (this counts their use twice).
        `freeing`: a service counted as gone, memory and all (its memory only where it is
        known per process)."""
        if reading.processes is None:
            if reading.used_gb is None:
                return 0.0  # not known: placement counts declarations
            return reading.used_gb
        mine = self._mine_on(reading.index)
        if freeing is not None and freeing.name in self._containers:
            mine.add(self._containers[freeing.name])
        ours = sum(self._used.get(container, {}).get(reading.index, 0.0) for container in mine)
        return max(0.0, self._process_total.get(reading.index, 0.0) - ours)

    def committed_gb(self, reading: GpuReading, freeing: Owner | None = None,
                     for_name: str | None = None) -> float:
        """What placement counts as taken: each reservation's max(declared, observed), plus
        foreign, plus room earmarked for any name but `for_name`."""
        services = sum(max(a.vram_gb, self.observed_gb(owner.name, reading.index) or 0.0)
                       for owner, a in self._reservations.items()
                       if a.index == reading.index and owner != freeing)
        own = self._active.get(for_name or "")
        earmarked = sum(a.vram_gb for token, a in self._earmarks.items()
                        if a.index == reading.index and token != own)
        return services + earmarked + self.foreign_gb(reading, freeing)

    def free_gb(self, reading: GpuReading, freeing: Owner | None = None,
                for_name: str | None = None) -> float:
        return reading.total_gb - self.committed_gb(reading, freeing, for_name)

    def free_by_gpu(self, for_name: str | None = None) -> dict[int, float]:
        """Free memory of each available GPU now, as placement counts it for `for_name`."""
        return {r.index: self.free_gb(r, None, for_name) for r in self._readings if r.available}

    def room_beside(self, kept: set[Owner]) -> float | None:
        """The most any one available GPU could offer if every reservation but `kept`'s went."""
        rooms = [r.total_gb - self.foreign_gb(r) - sum(
                     max(a.vram_gb, self.observed_gb(owner.name, r.index) or 0.0)
                     for owner, a in self._reservations.items() if a.index == r.index and owner in kept)
                 for r in self._readings if r.available]
        return max(rooms) if rooms else None

    def free_by_label(self) -> dict[str, float]:
        return {r.label: round(max(0.0, self.free_gb(r)), 2) for r in self._readings}

    def earmark(self, token: str, index: int, vram_gb: float) -> None:
        """Hold room on GPU `index` under `token`, until activate()d by a deploy and taken by
        its reservation, or dropped."""
        reading = next(r for r in self._readings if r.index == index)
        self._earmarks[token] = Assignment(index=index, uuid=reading.uuid, vram_gb=vram_gb,
                                           node=reading.node, node_index=reading.node_index)

    def activate(self, name: str, token: str) -> None:
        """The deploy of `name` under way (holding its name's lock) takes the room of `token`."""
        self._active[name] = token

    def drop_earmark(self, token: str) -> None:
        self._earmarks.pop(token, None)
        for name in [n for n, t in self._active.items() if t == token]:
            del self._active[name]

    def shrink_earmark(self, token: str, gb: float) -> None:
        """A victim keeps its room after all: the earmark no longer holds it."""
        found = self._earmarks.get(token)
        if found is not None:
            self._earmarks[token] = attrs.evolve(found, vram_gb=max(0.0, found.vram_gb - gb))

    def earmarked_gb(self, token: str) -> float:
        found = self._earmarks.get(token)
        return found.vram_gb if found is not None else 0.0

    def place(self, vram_gb: float, freeing: Owner | None = None,
              for_name: str | None = None) -> Assignment:
        """Where a service of vram_gb would go now, reserving nothing (a dry run, or the
        first half of reserve()). `freeing`: a reservation whose memory would be released
        first (a replacement); `for_name`: the deploy's name, for which room earmarked for it
        is free (and where it goes). NoGpu/NoGpuCapacity when nothing fits."""
        if not self._readings:
            raise NoGpu("This node has no GPU; deploy it without gpu: true or on a GPU node.")
        free = {r.index: self.free_gb(r, freeing, for_name) for r in self._readings}
        earmarked = self._earmarks.get(self._active.get(for_name or "", ""))
        if earmarked is not None:
            reading = next((r for r in self._readings if r.index == earmarked.index), None)
            if reading is not None and reading.available and free[reading.index] >= vram_gb:
                return attrs.evolve(earmarked, vram_gb=vram_gb)
        counts = {r.index: len({o for o, a in self._reservations.items()
                                if a.index == r.index and o != freeing}) for r in self._readings}
        fitting = [r for r in self._readings if r.available and free[r.index] >= vram_gb]
        if not fitting:
            listed = ", ".join(f"GPU {r.label} ({r.name}) has {max(0.0, free[r.index]):.1f} GB free"
                               for r in self._readings)
            raise NoGpuCapacity(
                f"No GPU has {vram_gb:g} GB of VRAM free: {listed}.",
                free_gb={r.label: round(max(0.0, free[r.index]), 2) for r in self._readings},
            )
        best = min(fitting, key=lambda r: (
            (r.total_gb - free[r.index]) / r.total_gb, counts[r.index], r.index))
        return Assignment(index=best.index, uuid=best.uuid, vram_gb=vram_gb, node=best.node,
                          node_index=best.node_index)

    def reserve(self, owner: Owner, vram_gb: float, freeing: Owner | None = None) -> Assignment:
        """Place on the least-committed GPU that fits, and hold it there for `owner`
        (`freeing`: a reservation about to be released, counted as free already)."""
        if owner in self._reservations:
            raise ValueError(f"{owner} already holds a GPU reservation")
        assignment = self.place(vram_gb, freeing, owner.name)
        self._reservations[owner] = assignment  # the room its deploy took passes to it here
        token = self._active.pop(owner.name, None)
        if token is not None:
            self._earmarks.pop(token, None)
        return assignment

    def claim(self, owner: Owner, local_index: int, vram_gb: float, node: str | None = None) -> None:
        """Record the reservation of a service adopted from its labels (GPU local_index on
        the node with ID `node`, or on this node)."""
        reading = next((r for r in self._readings
                        if r.node == node and r.local_index == local_index), None)
        index = reading.index if reading is not None else local_index
        self._reservations[owner] = Assignment(index=index, uuid=reading.uuid if reading else "",
                                               vram_gb=vram_gb, node=node,
                                               node_index=local_index if node is not None else None)

    def holds(self, owner: Owner) -> bool:
        return owner in self._reservations

    def local_index(self, index: int) -> int:
        """The node's own number of pool GPU `index`."""
        return next((r.local_index for r in self._readings if r.index == index), index)

    def index_of(self, owner: Owner) -> int | None:
        """The GPU (pool index) `owner` holds memory on, if any."""
        found = self._reservations.get(owner)
        return found.index if found is not None else None

    def reserved_for(self, name: str) -> int | None:
        """The GPU some deploy of `name` has reserved (the lowest index), if any."""
        return min((a.index for owner, a in self._reservations.items() if owner.name == name),
                   default=None)

    def release(self, owner: Owner) -> bool:
        """Free what `owner` holds; whether it held anything. Other owners' reservations stay."""
        if self._reservations.pop(owner, None) is None:
            _LOGGER.info("Not releasing a GPU for %s: it holds none", owner)
            return False
        if not any(o.name == owner.name for o in self._reservations):
            self._over_streak.pop(owner.name, None)
            self.over = self.over - {owner.name}
        return True

    def handoff(self, assignment: Assignment) -> tuple[dict[str, str], list[JSONObject]]:
        """Env and DeviceRequests that give the container this GPU (the inventory knows how)."""
        return self.inventory.handoff(assignment)

    def views(self, idle: frozenset[str] | set[str] = frozenset()) -> list[GpuView]:
        """Each GPU as `/gpus` shows it; `idle`: the services kept warm that no one holds,
        whose memory is reclaimable."""
        views = []
        for r in self._readings:
            reserved = self.reserved_gb(r.index)
            used = reserved if self.inventory.simulated else r.used_gb
            services = self.services_on(r.index)
            views.append(GpuView(
                id=r.local_index, name=r.name, uuid=r.uuid, vram_total_gb=_gb(r.total_gb),
                vram_used_gb=_gb_or_none(used), vram_reserved_gb=_gb(reserved),
                vram_committed_gb=_gb(self.committed_gb(r)),
                vram_foreign_gb=None if used is None else _gb(self.foreign_gb(r)),
                vram_free_gb=_gb(max(0.0, self.free_gb(r))),
                vram_idle_gb=_gb(sum(max(self.declared_gb(name, r.index),
                                         self.observed_gb(name, r.index) or 0.0)
                                     for name in services if name in idle)),
                utilization_pct=r.utilization_pct, services=services,
                service_vram=[ServiceVram(name, self.declared_gb(name, r.index),
                                          _gb_or_none(self.observed_gb(name, r.index)))
                              for name in services],
                node_name=r.node_name, node_id=r.node,
                vram_accounting=("declared" if self.inventory.simulated or r.used_gb is None
                                 else "whole_gpu" if r.processes is None else "per_process"),
            ))
        return views


def _gb(value: float) -> float:
    return round(value, 2)


def _gb_or_none(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def gpu_label(readings: list[GpuReading]) -> str:
    """The engine label a node carries so that a --swarm agent knows its GPUs."""
    gpus = [{"uuid": r.uuid, "name": r.name, "vram_gb": round(r.total_gb, 2)} for r in readings]
    return f"{GPU_ENGINE_LABEL}={json.dumps(gpus, separators=(',', ':'))}"
