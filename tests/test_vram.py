"""VRAM truth on the real engine, with a stand-in NVML that reports real container PIDs.

The agent runs as a process with tests/nvml_standin first on its PYTHONPATH, so its GPUs
look real: GPU deploys send DeviceRequests by UUID, which the engine honours because
.ci/run gives dockerd a stand-in `nvidia-container-runtime-hook` (so it registers its
nvidia device driver). The stand-in NVML reports the host PIDs of running test
containers, so the agent's PID -> cgroup -> container mapping runs for real.
"""

from __future__ import annotations

import json
import os
import subprocess
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.agent_process import AgentProcess, AgentProcesses, get_json, post_json
from tests.conftest import TEST_IMAGE
from tests.test_api_docker import test_containers
from tests.test_restarts import wait_until

pytestmark = pytest.mark.docker
HERE = Path(__file__).parent
UUIDS = ("GPU-5e1d7a1c-0000-4000-8000-00000000a001", "GPU-5e1d7a1c-0000-4000-8000-00000000b002")
HOOK = "nvidia-container-runtime-hook"


def engine_has_the_nvidia_driver() -> bool:
    """Whether dockerd found an NVIDIA hook on its PATH at start (a real toolkit, or CI's stand-in)."""
    pid = subprocess.run(["pgrep", "-xo", "dockerd"], capture_output=True, text=True).stdout.strip()
    if not pid:
        return False
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    path = next((e[5:].decode() for e in environ if e.startswith(b"PATH=")), os.defpath)
    return any((Path(d) / HOOK).exists() for d in path.split(":") if d)


needs_driver = pytest.mark.skipif(
    not engine_has_the_nvidia_driver() and os.environ.get("CI") != "true",
    reason=f"dockerd has no {HOOK} on its PATH (.ci/run starts it with a stand-in)")


class Nvml:
    """What the stand-in driver reports; every write is what the agent reads next."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.gpus = [{"uuid": uuid, "name": "NVIDIA H100 PCIe", "total_gb": 24, "other_used_gb": 0,
                      "utilization": 3, "processes": []} for uuid in UUIDS]
        self.write()

    def write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"gpus": self.gpus}))
        tmp.replace(self.path)

    def report(self, index: int, processes: list[tuple[int, float]], other_gb: float = 0,
               hide: bool = False) -> None:
        self.gpus[index].update(processes=[{"pid": pid, "used_gb": gb} for pid, gb in processes],
                                other_used_gb=other_gb, hide_processes=hide)
        self.write()


def pid_of(name: str) -> int:
    return int(subprocess.run(["docker", "inspect", "-f", "{{.State.Pid}}", f"tidybot-{name}"],
                              capture_output=True, text=True, check=True).stdout)


@pytest.fixture
def nvml_agents(tmp_path: Path, agent_processes: AgentProcesses) -> Callable[..., tuple[AgentProcess, Nvml]]:
    if not engine_has_the_nvidia_driver():
        pytest.fail(f"CI=true but dockerd has no {HOOK} on its PATH")

    def start(*args: str) -> tuple[AgentProcess, Nvml]:
        nvml = Nvml(tmp_path / f"nvml-{len(agent_processes.started)}.json")
        agent = agent_processes.start(*args, env={
            "PYTHONPATH": f"{HERE / 'nvml_standin'}:{os.environ.get('PYTHONPATH', '')}",
            "DEPLOY_AGENT_TEST_NVML": str(nvml.path)})
        return agent, nvml

    return start


def deploy(agent: AgentProcess, name: str, **body: Any) -> tuple[int, dict[str, Any]]:
    status, answer = post_json(agent.url + "/deploy", {"name": name, "image": TEST_IMAGE, **body})
    return status, dict(answer)


def gpus(agent: AgentProcess) -> list[dict[str, Any]]:
    return list(get_json(agent.url + "/gpus"))


@needs_driver
class TestHandOff:
    """A GPU deploy asks the engine for the GPU by UUID, and the engine hands it over."""

    def test_device_request_by_uuid_is_honoured(self, nvml_agents: Any) -> None:
        agent, _ = nvml_agents()
        assert get_json(agent.url + "/health")["gpus"] == 2
        status, answer = deploy(agent, "t-handoff", gpu=True, vram_gb=6)
        assert status == 200, answer
        uuid = UUIDS[answer["gpu"]]
        info = json.loads(subprocess.run(["docker", "inspect", "tidybot-t-handoff"], capture_output=True,
                                         text=True, check=True).stdout)[0]
        requests = info["HostConfig"]["DeviceRequests"]
        assert [(r["Driver"], r["DeviceIDs"], r["Capabilities"]) for r in requests] == [
            ("", [uuid], [["gpu"]])]
        environ = subprocess.run(["docker", "exec", "tidybot-t-handoff", "cat", "/proc/1/environ"],
                                 capture_output=True, check=True).stdout.split(b"\0")
        assert f"NVIDIA_VISIBLE_DEVICES={uuid}".encode() in environ  # set by the engine's driver
        assert not any(e.startswith(b"CUDA_VISIBLE_DEVICES=") for e in environ)


@needs_driver
class TestMeasured:
    """Observed memory in /services, /gpus and /metrics; placement by what is really free."""

    def test_service_above_its_declaration(self, nvml_agents: Any) -> None:
        agent, nvml = nvml_agents()
        status, big = deploy(agent, "t-big", gpu=True, vram_gb=6)
        assert status == 200 and big["gpu"] == 0, big
        nvml.report(0, [(pid_of("t-big"), 18)])
        wait_until(lambda: agent.services()["t-big"]["vram_used_gb"] == 18, timeout=5)
        gpu = gpus(agent)[0]
        assert (gpu["vram_used_gb"], gpu["vram_reserved_gb"], gpu["vram_committed_gb"]) == (18, 6, 18)
        assert (gpu["vram_foreign_gb"], gpu["vram_free_gb"]) == (0, 6)
        assert gpu["service_vram"] == [{"name": "t-big", "declared_gb": 6, "used_gb": 18}]
        wait_until(lambda: agent.services()["t-big"]["vram_over"] is True, timeout=5)
        overuse = [e for e in get_json(agent.url + "/events") if e["kind"] == "vram_overuse"]
        assert [(e["service"], e["details"]) for e in overuse] == [
            ("t-big", {"declared_gb": 6, "used_gb": 18})]
        metrics = urllib.request.urlopen(agent.url + "/metrics", timeout=5).read().decode()
        assert 'deploy_agent_service_vram_used_gb{service="t-big"} 18.0' in metrics
        assert 'deploy_agent_service_vram_over{service="t-big"} 1.0' in metrics
        assert "t-big" in agent.services()  # warn: flagged, not stopped

        status, nxt = deploy(agent, "t-next", gpu=True, vram_gb=7)
        assert status == 200 and nxt["gpu"] == 1  # GPU 0 has 6 GB really free, not 18

    def test_foreign_memory_is_avoided(self, nvml_agents: Any) -> None:
        agent, nvml = nvml_agents()
        nvml.report(0, [(1, 20)])  # PID 1 of the host: not a container, someone else's job
        wait_until(lambda: gpus(agent)[0]["vram_foreign_gb"] == 20, timeout=5)
        assert [g["vram_accounting"] for g in gpus(agent)] == ["per_process", "per_process"]
        status, answer = deploy(agent, "t-avoid", gpu=True, vram_gb=8)
        assert status == 200 and answer["gpu"] == 1

    def test_memory_held_after_a_stop_is_not_reused_until_released(self, nvml_agents: Any) -> None:
        agent, nvml = nvml_agents()
        assert deploy(agent, "t-held", gpu=True, vram_gb=20)[0] == 200
        assert deploy(agent, "t-held-2", gpu=True, vram_gb=20)[0] == 200
        nvml.report(0, [(pid_of("t-held"), 20)])
        assert post_json(agent.url + "/stop", {"name": "t-held"})[0] == 200
        # The driver still reports the dead process's memory: it counts until released.
        wait_until(lambda: gpus(agent)[0]["vram_foreign_gb"] == 20, timeout=5)
        status, refused = deploy(agent, "t-reuse", gpu=True, vram_gb=8)
        assert (status, refused["error"]) == (503, "no_gpu_capacity")
        nvml.report(0, [])  # released
        wait_until(lambda: gpus(agent)[0]["vram_foreign_gb"] == 0, timeout=5)
        status, placed = deploy(agent, "t-reuse", gpu=True, vram_gb=8)
        assert status == 200 and placed["gpu"] == 0

    def test_hidden_per_process_memory_is_unknown(self, nvml_agents: Any) -> None:
        agent, nvml = nvml_agents()
        assert deploy(agent, "t-hidden", gpu=True, vram_gb=4)[0] == 200
        nvml.report(0, [(pid_of("t-hidden"), 3)], hide=True)
        wait_until(lambda: gpus(agent)[0]["vram_used_gb"] == 3, timeout=5)
        assert agent.services()["t-hidden"]["vram_used_gb"] is None
        assert gpus(agent)[0]["service_vram"][0]["used_gb"] is None
        assert [g["vram_accounting"] for g in gpus(agent)] == ["whole_gpu", "per_process"]

    def test_hidden_per_process_memory_leaves_no_room_to_over_commit(self, nvml_agents: Any) -> None:
        """The issue's check: 10 GB declared, 2 used beside 8 foreign, unseen, leaves 4 free."""
        agent, nvml = nvml_agents()
        status, first = deploy(agent, "t-hide-10", gpu=True, vram_gb=10)
        assert status == 200 and first["gpu"] == 0, first
        nvml.report(0, [(pid_of("t-hide-10"), 2)], other_gb=8, hide=True)
        nvml.report(1, [(1, 22)])  # GPU 1 is someone else's: only GPU 0 could take 4 GB
        wait_until(lambda: [g["vram_used_gb"] for g in gpus(agent)] == [10, 22], timeout=5)
        assert [g["vram_free_gb"] for g in gpus(agent)] == [4, 2]  # GPU 0: not 14
        status, refused = deploy(agent, "t-hide-12", gpu=True, vram_gb=12)
        assert (status, refused["error"], refused["free_gb"]) == (503, "no_gpu_capacity", {"0": 4, "1": 2})
        status, placed = deploy(agent, "t-hide-4", gpu=True, vram_gb=4)
        assert status == 200 and placed["gpu"] == 0, placed


@needs_driver
class TestStopPolicy:
    """--vram-overuse stop: an overusing service is stopped; GPU deploys must declare."""

    def test_overuse_stops_and_undeclared_is_refused(self, nvml_agents: Any) -> None:
        agent, nvml = nvml_agents("--vram-overuse", "stop")
        status, refused = deploy(agent, "t-undeclared", gpu=True)
        assert status == 400 and refused["details"][0]["field"] == "vram_gb"
        assert deploy(agent, "t-hog", gpu=True, vram_gb=2)[0] == 200
        nvml.report(0, [(pid_of("t-hog"), 10)])
        wait_until(lambda: "t-hog" not in agent.services(), timeout=10)
        assert test_containers() == []
        stopped = [e for e in get_json(agent.url + "/events") if e["kind"] == "stopped"]
        assert [(e["service"], e["reason"], e["details"]["used_gb"]) for e in stopped] == [
            ("t-hog", "vram_overuse", 10)]
        assert gpus(agent)[0]["vram_reserved_gb"] == 0


class TestDryRun:
    """dry_run=1 answers where a deploy would go, creates and reserves nothing, refuses alike."""

    @pytest.fixture
    def agent(self, agent_processes: AgentProcesses) -> AgentProcess:
        return agent_processes.start("--fake-gpus", "RTX 4090:24,RTX 4090:24")

    def dry(self, agent: AgentProcess, name: str, **body: Any) -> tuple[int, dict[str, Any]]:
        status, answer = post_json(agent.url + "/deploy?dry_run=1", {"name": name, "image": TEST_IMAGE,
                                                                      **body})
        return status, dict(answer)

    def test_places_nothing(self, agent: AgentProcess) -> None:
        status, answer = self.dry(agent, "t-dry", gpu=True, vram_gb=20, port=8000)
        assert status == 200, answer
        assert (answer["dry_run"], answer["already_running"], answer["pull_needed"]) == (True, False, False)
        assert answer["gpu"] == 0 and 28500 <= answer["port"] <= 28599 and answer["status"] is None
        assert test_containers() == [] and [g["vram_reserved_gb"] for g in gpus(agent)] == [0, 0]
        assert [g["vram_accounting"] for g in gpus(agent)] == ["declared", "declared"]  # fake GPUs
        real = deploy(agent, "t-dry", gpu=True, vram_gb=20, port=8000)[1]
        assert (real["gpu"], real["port"]) == (answer["gpu"], answer["port"])  # it said the truth
        status, again = self.dry(agent, "t-dry", gpu=True, vram_gb=20, port=8000)
        assert (again["already_running"], again["status"], again["port"]) == (True, "healthy", real["port"])
        status, pull = self.dry(agent, "t-dry-pull", image="localhost:1/nowhere/img:1")
        assert status == 200 and pull["pull_needed"] is True  # no registry was asked

    def test_refuses_like_a_deploy(self, agent: AgentProcess) -> None:
        assert deploy(agent, "t-full-a", gpu=True, vram_gb=20)[0] == 200
        assert deploy(agent, "t-full-b", gpu=True, vram_gb=20)[0] == 200
        status, full = self.dry(agent, "t-dry-full", gpu=True, vram_gb=8)
        assert (status, full["error"]) == (503, "no_gpu_capacity")
        status, conflict = self.dry(agent, "t-full-a", gpu=True, vram_gb=22)
        assert (status, conflict["error"]) == (409, "conflict")
        status, bad = self.dry(agent, "t-dry-bad", volumes=["/etc:/etc"])
        assert (status, bad["error"]) == (403, "mount_not_allowed")
        status, replace = self.dry(agent, "t-full-a", gpu=True, vram_gb=22, replace=True)
        assert status == 200 and replace["gpu"] == 0  # its own 20 GB count as freed
        assert [g["vram_reserved_gb"] for g in gpus(agent)] == [20, 20]
        assert sorted(test_containers()) == ["tidybot-t-full-a", "tidybot-t-full-b"]
