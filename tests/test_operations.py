"""Running it as operators do: the systemd unit, sd_notify, and /metrics."""

from __future__ import annotations

import asyncio
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from tests.agent_process import COMMAND, AgentProcess, get_json, post_json
from tests.conftest import TEST_IMAGE, make_config, remove_test_containers

ROOT = Path(__file__).parent.parent
UNIT = ROOT / "contrib" / "deploy-agent.service"
Client = TestClient[web.Request, web.Application]


class TestSystemdUnit:
    """contrib/deploy-agent.service is valid and asks for what the agent needs."""

    def test_systemd_analyze_verify_accepts_it(self, tmp_path: Path) -> None:
        analyze = shutil.which("systemd-analyze")
        if analyze is None:
            pytest.skip("systemd-analyze is not installed (.ci/run installs systemd)")
        # verify checks that ExecStart exists: point it at the installed command.
        unit = tmp_path / "deploy-agent.service"
        unit.write_text(UNIT.read_text().replace("/usr/local/bin/deploy-agent", str(Path(COMMAND).resolve())))
        result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert "deploy-agent.service" not in result.stderr, result.stderr

    def test_settings(self) -> None:
        lines = {line.partition("=")[0]: line.partition("=")[2]
                 for line in UNIT.read_text().splitlines() if "=" in line and not line.startswith("#")}
        assert lines["Type"] == "notify" and lines["Restart"] == "on-failure"
        assert lines["StateDirectory"] == "deploy-agent"
        assert "docker.service" in lines["After"] and "docker.service" in lines["Wants"]
        assert lines["ProtectSystem"] == "strict" and "docker.sock" in lines["ReadWritePaths"]
        assert lines["NoNewPrivileges"] == "true" and lines["CapabilityBoundingSet"] == ""


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket standing in for systemd's $NOTIFY_SOCKET."""
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(30)
    yield sock, path
    sock.close()


@pytest.mark.docker
class TestSdNotify:
    """READY=1 only once the API serves and reconcile is done; STOPPING=1 on SIGTERM."""

    def test_ready_and_stopping(self, tmp_path: Path, test_image: str,
                                notify_socket: tuple[socket.socket, str]) -> None:
        sock, path = notify_socket
        remove_test_containers()
        agent = AgentProcess(tmp_path / "state")
        agent.start()
        try:
            assert post_json(agent.url + "/deploy", {"name": "t-notify", "image": TEST_IMAGE})[0] == 200
            agent.stop(signal.SIGKILL)
            agent.start_env = {"NOTIFY_SOCKET": path}
            agent.start(wait=False)
            assert sock.recv(256) == b"READY=1"
            # At READY the port answers at once and start-up reconcile has adopted the service.
            assert [s["name"] for s in get_json(agent.url + "/services")] == ["t-notify"]
            assert agent.stop(signal.SIGTERM) == 0
            assert sock.recv(256) == b"STOPPING=1"
        finally:
            agent.close()
            remove_test_containers()


def families(text: str) -> dict[str, Any]:
    return {family.name: family for family in text_string_to_metric_families(text)}


def sample(family: Any, **labels: str) -> float:
    values = [s.value for s in family.samples
              if all(s.labels.get(k) == v for k, v in labels.items()) and not s.name.endswith("_created")]
    assert values, f"no sample {labels} in {family.name}"
    return float(values[0])


@pytest.mark.docker
class TestMetrics:
    """GET /metrics in Prometheus text format, parsed by prometheus-client's parser."""

    @pytest.fixture
    def agent_config(self, tmp_path: Path) -> Any:
        return make_config(tmp_path / "state", fake_gpus="RTX 4090:24,RTX 4090:24")

    async def test_families_and_values(self, agent: Client) -> None:
        gpu_service = {"name": "t-metrics", "image": TEST_IMAGE, "gpu": True, "vram_gb": 8}
        await agent.post("/deploy", json=gpu_service)
        await agent.post("/deploy", json=gpu_service)
        await agent.post("/deploy", json={"name": "t-metrics-x", "image": TEST_IMAGE,
                                          "command": ["sh", "-c", "exit 1"]})
        response = await agent.get("/metrics")
        assert response.status == 200 and response.content_type == "text/plain"
        found = families(await response.text())
        deploys = found["deploy_agent_deploys"]
        assert sample(deploys, outcome="deployed") == 1
        assert sample(deploys, outcome="already_running") == 1
        assert sample(deploys, outcome="container_exited") == 1
        duration = found["deploy_agent_deploy_duration_seconds"]
        assert duration.type == "histogram"
        assert [s.value for s in duration.samples
                if s.name.endswith("_count") and s.labels["outcome"] == "deployed"] == [1]
        assert sample(found["deploy_agent_services"], status="healthy") == 1
        assert sample(found["deploy_agent_services"], status="exited") == 0
        assert sample(found["deploy_agent_gpu_vram_total_gb"], gpu="0", name="RTX 4090") == 24
        assert sample(found["deploy_agent_gpu_vram_reserved_gb"], gpu="0") == 8
        assert sample(found["deploy_agent_gpu_vram_reserved_gb"], gpu="1") == 0
        assert sample(found["deploy_agent_gpu_vram_used_gb"], gpu="0") == 8
        assert sample(found["deploy_agent_engine_reachable"]) == 1
        build = found["deploy_agent_build_info"]
        assert build.samples[0].labels["version"]

    async def test_resyncs_are_counted(self, agent: Client) -> None:
        async def resyncs() -> tuple[float, float]:
            found = families(await (await agent.get("/metrics")).text())
            return sample(found["deploy_agent_resyncs"]), sample(found["deploy_agent_resync_seconds"])
        first, _ = await resyncs()
        deadline = asyncio.get_running_loop().time() + 5
        while (await resyncs())[0] < first + 2:  # the test agent resyncs every 0.5 s
            assert asyncio.get_running_loop().time() < deadline, "resync counter did not move"
            await asyncio.sleep(0.1)
        assert (await resyncs())[1] > 0

    async def test_each_app_has_its_own_registry(self, agent: Client, aiohttp_client: Any,
                                                 tmp_path: Path) -> None:
        await agent.post("/deploy", json={"name": "t-metrics-one", "image": TEST_IMAGE})
        from deploy_agent.app import create_app
        other = await aiohttp_client(create_app(make_config(tmp_path / "other")))
        text = await (await other.get("/metrics")).text()
        assert 'deploy_agent_deploys_total{outcome="deployed"}' not in text
