"""The installed `deploy-agent` command: help, start-up errors, and serving the API."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.agent_process import COMMAND, AgentProcess, free_port, get_json, post_json
from tests.conftest import TEST_IMAGE, remove_test_containers


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([COMMAND, *args], capture_output=True, text=True, timeout=30,
                          env={**os.environ, **(env or {})})


class TestCommandLine:
    """Help explains every flag; a bad state dir is one clear line, not a traceback."""

    def test_help_lists_every_flag(self) -> None:
        out = run("--help").stdout
        for flag in ("--host", "--port", "--state-dir", "--advertise-host", "--port-range",
                     "--docker-host", "--log-level"):
            assert flag in out
        assert "DEPLOY_AGENT_" in out

    def test_uncreatable_state_dir_is_one_line(self, tmp_path: Path) -> None:
        blocker = tmp_path / "file"
        blocker.write_text("")
        result = run("--state-dir", str(blocker / "state"), "--port", str(free_port()))
        assert result.returncode != 0
        assert result.stderr.strip().count("\n") == 0, result.stderr
        assert "cannot create state dir" in result.stderr and "Traceback" not in result.stderr


@pytest.fixture
def running_agent(tmp_path: Path) -> Iterator[str]:
    """The installed command serving on a free loopback port, stopped with SIGTERM after."""
    agent = AgentProcess(tmp_path / "s")
    agent.start()
    try:
        yield agent.url
    finally:
        agent.close()
        remove_test_containers()


@pytest.mark.docker
class TestServing:
    """`deploy-agent --host --port --state-dir --advertise-host` serves the API."""

    def test_deploy_list_stop(self, running_agent: str, test_image: str, tmp_path: Path) -> None:
        assert get_json(running_agent + "/health")["status"] == "ok"
        status, answer = post_json(running_agent + "/deploy", {"name": "t-cli", "image": TEST_IMAGE})
        assert status == 200, answer
        assert answer["host"].startswith("http://127.0.0.1:285")
        assert [s["name"] for s in get_json(running_agent + "/services")] == ["t-cli"]
        assert (tmp_path / "s" / "services.json").exists()
        assert post_json(running_agent + "/stop", {"name": "t-cli"})[0] == 200
        assert get_json(running_agent + "/services") == []


class TestDaemonFootprint:
    """The daemon never loads what only deployctl and the client need."""

    def test_cli_and_client_modules_stay_out(self, tmp_path: Path) -> None:
        probe = (
            "import sys\n"
            "from deploy_agent.__main__ import main\n"
            "from deploy_agent.app import create_app\n"
            "from deploy_agent.config import parse_config\n"
            f"create_app(parse_config(['--state-dir', {str(tmp_path)!r}], {{}}))\n"
            "print(sorted(m for m in ('rich', 'zeroconf', 'yaml', 'deploy_agent.client', "
            "'deploy_agent.cli', 'schemathesis') if m in sys.modules))\n"
        )
        result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
        assert result.stdout.strip() == "[]"


class TestGpusCommand:
    """`deploy-agent gpus --label` prints the engine label a swarm manager reads GPUs from."""

    def test_label_round_trip(self, tmp_path: Path) -> None:
        import json

        from deploy_agent.backends.swarm.engine import SwarmNode

        described = tmp_path / "nvml.json"
        described.write_text(json.dumps({"gpus": [
            {"uuid": "GPU-a", "name": "NVIDIA H100", "total_gb": 80, "processes": []},
            {"uuid": "GPU-b", "name": "NVIDIA L4", "total_gb": 24, "processes": []}]}))
        env = {"PYTHONPATH": str(Path(__file__).parent / "nvml_standin"),
               "DEPLOY_AGENT_TEST_NVML": str(described)}
        line = run("gpus", "--label", env=env).stdout.strip()
        assert line.startswith("deploy-agent.gpus=[")
        key, _, value = line.partition("=")
        engine = {"Labels": {key: value}}
        node = SwarmNode.of({"ID": "n1", "Description": {"Hostname": "gpu-2", "Engine": engine},
                             "Status": {"State": "ready", "Addr": "10.0.0.6"}})
        assert [(g["uuid"], g["name"], g["vram_gb"]) for g in node.gpus] == [
            ("GPU-a", "NVIDIA H100", 80), ("GPU-b", "NVIDIA L4", 24)]
        listed = run("gpus", env=env).stdout
        assert "GPU-a" in listed and "80.0 GB" in listed

    def test_no_gpus_is_an_empty_label(self) -> None:
        env = {"PYTHONPATH": "/nonexistent"}  # no NVML at all: no GPUs, still a usable line
        assert run("gpus", "--label", env=env).stdout.strip() == "deploy-agent.gpus=[]"
