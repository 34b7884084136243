"""The Docker engine stops and comes back: the agent stays up, says so, and recovers.

This restarts the machine's dockerd, so it runs only where that is wanted: CI sets
DEPLOY_AGENT_TEST_ENGINE_RESTART=1 (.ci/run), and so can a developer on a disposable engine.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.agent_process import AgentProcess, get_json, post_json
from tests.conftest import TEST_IMAGE, remove_test_containers
from tests.test_restarts import deploy, wait_until

pytestmark = [
    pytest.mark.docker,
    pytest.mark.engine_restart,
    pytest.mark.skipif(os.environ.get("DEPLOY_AGENT_TEST_ENGINE_RESTART") != "1",
                       reason="restarts dockerd; set DEPLOY_AGENT_TEST_ENGINE_RESTART=1"),
]


def dockerd_pid() -> int | None:
    found = subprocess.run(["pgrep", "-xo", "dockerd"], capture_output=True, text=True).stdout
    return int(found) if found.strip() else None


def engine_up() -> bool:
    return subprocess.run(["docker", "info"], capture_output=True).returncode == 0


@pytest.fixture
def restartable_engine(tmp_path: Path) -> Iterator[list[str]]:
    """dockerd's command line; whatever the test does, an engine answers again afterwards."""
    pid = dockerd_pid()
    if pid is None:
        pytest.skip("dockerd is not a process on this machine (remote or socket-activated engine)")
    command = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
    yield [part.decode() for part in command]
    if not engine_up():
        start_dockerd([part.decode() for part in command], tmp_path)


def start_dockerd(command: list[str], log_dir: Path) -> None:
    if dockerd_pid() is None:
        Path("/var/run/docker.pid").unlink(missing_ok=True)
        with (log_dir / "dockerd.log").open("ab") as log:
            subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    wait_until(engine_up, timeout=60)


class TestEngineOutage:
    """dockerd stops: /health says so, deploys get 503, records stay; it returns: all recovers."""

    def test_stop_and_start_dockerd(self, restartable_engine: list[str], tmp_path: Path,
                                    test_image: str) -> None:
        remove_test_containers()
        agent = AgentProcess(tmp_path / "state")
        agent.start()
        try:
            first = deploy(agent, "t-outage")
            os.kill(dockerd_pid() or 0, signal.SIGTERM)
            wait_until(lambda: dockerd_pid() is None, timeout=60)

            wait_until(lambda: get_json(agent.url + "/health")["engine"] == "unreachable", timeout=10)
            assert get_json(agent.url + "/health")["status"] == "degraded"
            status, answer = post_json(agent.url + "/deploy", {"name": "t-while-down", "image": TEST_IMAGE})
            assert (status, answer["error"]) == (503, "engine_unavailable")
            assert "t-outage" in agent.services()  # no record lost

            start_dockerd(restartable_engine, tmp_path)
            wait_until(lambda: get_json(agent.url + "/health")["engine"] == "reachable", timeout=30)
            wait_until(lambda: agent.services()["t-outage"]["status"] == "healthy", timeout=30)
            assert agent.services()["t-outage"]["host"] == first["host"]
            assert deploy(agent, "t-outage")["already_running"] is True

            subprocess.run(["docker", "kill", "tidybot-t-outage"], check=True, capture_output=True)
            started = time.monotonic()
            wait_until(lambda: agent.services()["t-outage"]["status"] in ("exited", "restarting"))
            assert time.monotonic() - started < 1.0  # events resubscribed
        finally:
            agent.close()
            remove_test_containers()
