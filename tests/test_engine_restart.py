"""The Docker engine stops, freezes, comes back: the agent stays up, says so, and recovers.

This restarts and freezes the machine's dockerd, so it runs only where that is wanted: CI sets
DEPLOY_AGENT_TEST_ENGINE_RESTART=1 (.ci/run), and so can a developer on a disposable engine.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from tests.agent_process import AgentProcess, get_json, post_json
from tests.conftest import TEST_IMAGE, remove_test_containers
from tests.test_api_docker import test_containers
from tests.test_restarts import deploy, kill_and_see_it_exited, wait_until

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


@attrs.frozen
class Dockerd:
    """How this machine's dockerd was started: its command line and environment (its PATH
    decides, for one, whether it finds an NVIDIA hook and registers its GPU driver)."""

    command: list[str]
    environ: dict[str, str]


@pytest.fixture
def restartable_engine(tmp_path: Path) -> Iterator[Dockerd]:
    """dockerd as it runs; whatever the test does, an engine answers again afterwards."""
    pid = dockerd_pid()
    if pid is None:
        pytest.skip("dockerd is not a process on this machine (remote or socket-activated engine)")
    command = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
    environ = dict(entry.decode().split("=", 1)
                   for entry in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in entry)
    dockerd = Dockerd([part.decode() for part in command], environ)
    yield dockerd
    if not engine_up():
        start_dockerd(dockerd, tmp_path)


def start_dockerd(dockerd: Dockerd, log_dir: Path) -> None:
    if dockerd_pid() is None:
        Path("/var/run/docker.pid").unlink(missing_ok=True)
        with (log_dir / "dockerd.log").open("ab") as log:
            subprocess.Popen(dockerd.command, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True, env=dockerd.environ)
    wait_until(engine_up, timeout=60)


class TestEngineOutage:
    """dockerd stops: /health says so, deploys get 503, records stay; it returns: all recovers."""

    def test_stop_and_start_dockerd(self, restartable_engine: Dockerd, tmp_path: Path,
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

            # Still tracked after the outage (that events alone report it: test_restarts.py).
            kill_and_see_it_exited(agent, "t-outage")
        finally:
            agent.close()
            remove_test_containers()


@contextlib.contextmanager
def frozen(process: str) -> Iterator[None]:
    """SIGSTOP a daemon (dockerd, containerd) for the block; it is thawed whatever happens."""
    pid = int(subprocess.run(["pgrep", "-xo", process], capture_output=True, text=True,
                             check=True).stdout)
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def timed_post(agent: AgentProcess, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any], float]:
    started = time.monotonic()
    status, answer = post_json(agent.url + path, body, timeout=60)
    return status, answer, time.monotonic() - started


class TestFrozenEngine:
    """dockerd frozen (SIGSTOP): answers are bounded, /health tells, reads stay fast."""

    def test_frozen_dockerd(self, tmp_path: Path, test_image: str) -> None:
        remove_test_containers()
        agent = AgentProcess(tmp_path / "state", "--engine-timeout", "5", "--stop-timeout", "1")
        agent.start()
        try:
            deploy(agent, "t-frozen")
            with frozen("dockerd"):
                unnoticed = wait_until(lambda: get_json(agent.url + "/health")["engine"] != "reachable",
                                       timeout=10)
                health = get_json(agent.url + "/health")
                assert health["status"] == "degraded" and unnoticed < 5
                assert "engine_unreachable" in [w["code"] for w in health["warnings"]]
                started = time.monotonic()
                assert "t-frozen" in agent.services()  # reads come from memory
                assert time.monotonic() - started < 2  # not the 5 s --engine-timeout
                status, answer, took = timed_post(agent, "/deploy", {"name": "t-frozen-new",
                                                                     "image": TEST_IMAGE})
                assert (status, answer["error"]) == (503, "engine_unavailable") and took < 15, took
                # A stop of a name the agent doesn't track asks the engine too (a stray of it?);
                # one of t-frozen would be carried out when the engine wakes, and end it.
                status, answer, took = timed_post(agent, "/stop", {"name": "t-frozen-stray"})
                assert (status, answer["error"]) == (503, "engine_unavailable") and took < 15, took
            wait_until(lambda: get_json(agent.url + "/health")["engine"] == "reachable", timeout=15)
            assert get_json(agent.url + "/health")["warnings"] == []
            engine_events = [e["kind"] for e in get_json(agent.url + "/events")
                             if e["kind"].startswith("engine_")]
            assert engine_events == ["engine_lost", "engine_back"]
            assert agent.services()["t-frozen"]["status"] == "healthy"  # nothing lost
            deploy(agent, "t-frozen-after")
            assert post_json(agent.url + "/stop", {"name": "t-frozen"})[0] == 200
            assert test_containers() == ["tidybot-t-frozen-after"]
        finally:
            agent.close()
            remove_test_containers()

    def test_start_timed_out_leaves_no_adopted_stranger(self, tmp_path: Path, test_image: str) -> None:
        """containerd frozen: the create works, the start hangs past --engine-timeout, and on
        thaw the engine starts the container anyway. It must be removed, never adopted."""
        remove_test_containers()
        agent = AgentProcess(tmp_path / "state", "--engine-timeout", "3")
        agent.start()
        try:
            with frozen("containerd"):
                status, answer, _ = timed_post(agent, "/deploy", {"name": "t-abandoned",
                                                                  "image": TEST_IMAGE})
                assert (status, answer["error"]) == (503, "engine_unavailable"), answer
                assert test_containers() == ["tidybot-t-abandoned"]  # left by the engine
                saved = json.loads((agent.state_dir / "services.json").read_text())
                assert [entry["name"] for entry in saved["abandoned"]] == ["t-abandoned"]

            def removed() -> bool:
                assert "t-abandoned" not in agent.services()  # never adopted on the way
                return test_containers() == []

            wait_until(removed, timeout=30)
            wait_until(lambda: json.loads(
                (agent.state_dir / "services.json").read_text())["abandoned"] == [], timeout=10)
            assert post_json(agent.url + "/deploy", {"name": "t-abandoned", "image": TEST_IMAGE})[0] == 200
        finally:
            agent.close()
            remove_test_containers()
