"""A stand-in for NVML's `pynvml` module, for tests of the agent as a process.

Tests put this directory first on the agent's PYTHONPATH and describe the GPUs in a JSON
file named by DEPLOY_AGENT_TEST_NVML, which is read again on every call, so a test can
change what the "driver" reports while the agent runs:

    {"gpus": [{"uuid": "GPU-...", "name": "NVIDIA H100", "total_gb": 24, "other_used_gb": 0,
               "utilization": 5, "hide_processes": false,
               "processes": [{"pid": 4242, "used_gb": 6}]}]}

The PIDs are real host PIDs of running test containers, so the agent's PID -> cgroup ->
container mapping runs for real. Only what the agent calls is here, with pynvml's names.
"""

from __future__ import annotations

import json
import os
import types
from pathlib import Path
from typing import Any

GIB = 1024**3
NVML_DEVICE_MIG_ENABLE = 1


class NVMLError(Exception):
    pass


class NVMLError_NotSupported(NVMLError):  # pynvml's names, camel case and all
    pass


_state: dict[str, Any] = {"initialised": False, "read": None, "gpus": []}


def _gpus() -> list[dict[str, Any]]:
    """The description, parsed again only when the file changed (a real driver's calls are
    cheap: the benchmark should time the agent, not this module)."""
    if not _state["initialised"]:
        raise NVMLError("Uninitialized")
    path = Path(os.environ["DEPLOY_AGENT_TEST_NVML"])
    stat = path.stat()
    if _state["read"] != (stat.st_mtime_ns, stat.st_size, stat.st_ino):
        _state["gpus"] = json.loads(path.read_text())["gpus"]
        _state["read"] = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
    gpus: list[dict[str, Any]] = _state["gpus"]
    return gpus


def nvmlInit() -> None:
    _state["initialised"] = True


def nvmlShutdown() -> None:
    _state["initialised"] = False


def nvmlDeviceGetCount() -> int:
    return len(_gpus())


def nvmlDeviceGetHandleByIndex(index: int) -> int:
    if not 0 <= index < len(_gpus()):
        raise NVMLError("Invalid Argument")
    return index


def nvmlDeviceGetUUID(handle: int) -> str:
    return str(_gpus()[handle]["uuid"])


def nvmlDeviceGetName(handle: int) -> str:
    return str(_gpus()[handle]["name"])


def nvmlDeviceGetMemoryInfo(handle: int) -> Any:
    gpu = _gpus()[handle]
    used = gpu.get("other_used_gb", 0) + sum(p["used_gb"] for p in gpu.get("processes", []))
    total = gpu["total_gb"] * GIB
    return types.SimpleNamespace(total=total, used=int(used * GIB), free=total - int(used * GIB))


def nvmlDeviceGetUtilizationRates(handle: int) -> Any:
    return types.SimpleNamespace(gpu=_gpus()[handle].get("utilization", 0), memory=0)


def nvmlDeviceGetComputeRunningProcesses(handle: int) -> list[Any]:
    gpu = _gpus()[handle]
    hidden = gpu.get("hide_processes", False)
    return [types.SimpleNamespace(pid=p["pid"], usedGpuMemory=None if hidden else int(p["used_gb"] * GIB))
            for p in gpu.get("processes", [])]


def nvmlDeviceGetMigMode(handle: int) -> tuple[int, int]:
    raise NVMLError_NotSupported("Not Supported")
