"""Nothing a caller or the engine does wedges the agent: real agent processes, real engine.

pytest-aiohttp's test server cancels a handler when its client disconnects; the daemon's
runner does not. So what happens when clients leave is tested against `deploy-agent`
processes here, never against the in-process test server.
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.agent_process import AgentProcess, AgentProcesses, get_json, post_json
from tests.conftest import TEST_IMAGE
from tests.test_api_docker import test_containers
from tests.test_restarts import wait_until

pytestmark = pytest.mark.docker


@pytest.fixture
def agent_factory(agent_processes: AgentProcesses) -> Callable[..., AgentProcess]:
    """Start agent processes with extra flags; all are killed and their containers removed."""
    return agent_processes.start


def metric(agent: AgentProcess, name: str) -> float:
    with urllib.request.urlopen(agent.url + "/metrics", timeout=5) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    raise AssertionError(f"{name} not in /metrics")


def open_follow(agent: AgentProcess, name: str) -> tuple[socket.socket, int, bytes]:
    """A raw follow of a service's logs: the socket, the answer's status, what came with it."""
    sock = socket.create_connection(("127.0.0.1", agent.port), timeout=10)
    sock.sendall(f"GET /services/{name}/logs?follow=1&tail=0 HTTP/1.1\r\n"
                 f"Host: 127.0.0.1:{agent.port}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        assert chunk, "the agent closed the follow before answering"
        head += chunk
    return sock, int(head.split(b" ", 2)[1]), head


def timed_deploy(agent: AgentProcess, name: str, **body: Any) -> float:
    started = time.monotonic()
    status, answer = post_json(agent.url + "/deploy", {"name": name, "image": TEST_IMAGE, **body},
                               timeout=60)
    assert status == 200, answer
    return time.monotonic() - started


def open_fds(agent: AgentProcess) -> int:
    assert agent.process is not None
    return sum(1 for _ in Path(f"/proc/{agent.process.pid}/fd").iterdir())


class TestFollows:
    """Follows end when their client leaves and never starve control calls."""

    def test_150_open_then_abandoned_follows_leave_deploys_fast(self, agent_factory: Any) -> None:
        agent = agent_factory()
        timed_deploy(agent, "t-quiet")  # busybox httpd prints nothing: the follows stay silent
        baseline = min(timed_deploy(agent, f"t-base-{i}") for i in range(2))
        fds_before = open_fds(agent)

        follows = [open_follow(agent, "t-quiet") for _ in range(150)]
        try:
            assert {status for _, status, _ in follows} == {200}
            wait_until(lambda: metric(agent, "deploy_agent_streams_open") == 150)
            during = timed_deploy(agent, "t-during")
            listing = []
            for _ in range(20):
                started = time.monotonic()
                get_json(agent.url + "/services")
                listing.append(time.monotonic() - started)
            started = time.monotonic()
            with urllib.request.urlopen(agent.url + "/services/t-quiet/logs?tail=5", timeout=10):
                pass
            tail_s = time.monotonic() - started
        finally:
            for sock, _, _ in follows:
                sock.close()  # 150 clients that crash while tailing

        assert during < max(5.0, 3 * baseline), (during, baseline)
        # Bounds a starved call (queued behind 150 follows for an engine connection) can't meet,
        # with room for a loaded CI machine: one slow answer of 20 is not starvation.
        assert max(listing) < 2, max(listing)
        assert tail_s < 5, tail_s
        # Abandoned: every follow notices, and gives its engine connection back.
        wait_until(lambda: metric(agent, "deploy_agent_streams_open") == 0, timeout=10)
        after = timed_deploy(agent, "t-after")
        assert after < max(5.0, 3 * baseline), (after, baseline)
        wait_until(lambda: open_fds(agent) <= fds_before + 10, timeout=5)

    def test_follows_beyond_the_cap_get_429(self, agent_factory: Any) -> None:
        agent = agent_factory("--max-streams", "3")
        timed_deploy(agent, "t-capped")
        follows = [open_follow(agent, "t-capped") for _ in range(3)]
        try:
            refused, status, answer = open_follow(agent, "t-capped")
            refused.close()
            assert status == 429 and b"too_many_streams" in answer
            assert metric(agent, "deploy_agent_streams_refused_total") == 1
            follows.pop()[0].close()
            wait_until(lambda: metric(agent, "deploy_agent_streams_open") == 2, timeout=5)
            follows.append(open_follow(agent, "t-capped"))
            assert follows[-1][1] == 200
            assert post_json(agent.url + "/stop", {"name": "t-capped"})[0] == 200  # control still answers
        finally:
            for sock, _, _ in follows:
                sock.close()

    def test_shutdown_ends_follows_at_once(self, agent_factory: Any) -> None:
        agent = agent_factory()
        timed_deploy(agent, "t-follow-stop")
        follows = [open_follow(agent, "t-follow-stop") for _ in range(5)]
        started = time.monotonic()
        assert agent.stop(signal.SIGTERM) == 0
        assert time.monotonic() - started < 5  # not the 30 s shutdown timeout
        for sock, _, _ in follows:
            sock.close()


class TestStateFileFailure:
    """A state file that can't be written never drops the reservation of a running service."""

    def test_deploy_succeeds_reservation_holds_write_retried(self, agent_factory: Any) -> None:
        agent = agent_factory("--fake-gpus", "RTX 4090:24")
        blocker = agent.state_dir / "services.json"
        blocker.unlink(missing_ok=True)  # written at start; nothing changes while the agent idles
        blocker.mkdir()  # every write of services.json now fails (it can't be replaced), as on a full disk
        status, answer = post_json(agent.url + "/deploy", {"name": "t-disk", "image": TEST_IMAGE,
                                                            "gpu": True, "vram_gb": 20})
        assert status == 200, answer
        warnings = get_json(agent.url + "/health")["warnings"]
        # (memlock_refused: this machine's engine can't give the GPU service unlimited memlock)
        assert [w["code"] for w in warnings if w["code"] != "memlock_refused"] == ["state_not_writable"]
        assert metric(agent, "deploy_agent_state_write_failures_total") >= 1
        status, refused = post_json(agent.url + "/deploy", {"name": "t-disk-2", "image": TEST_IMAGE,
                                                             "gpu": True, "vram_gb": 8})
        assert (status, refused["error"]) == (503, "no_gpu_capacity")  # no over-commit
        assert test_containers() == ["tidybot-t-disk"]

        blocker.rmdir()
        wait_until(lambda: [w for w in get_json(agent.url + "/health")["warnings"]
                            if w["code"] != "memlock_refused"] == [], timeout=10)
        saved = json.loads((agent.state_dir / "services.json").read_text())
        assert [s["spec"]["name"] for s in saved["services"]] == ["t-disk"]


class TestStreamedDeployAtShutdown:
    """An NDJSON deploy is owned like a plain one: rolled back when shutdown runs out."""

    def test_streamed_deploy_past_the_bound_is_rolled_back(self, agent_factory: Any) -> None:
        agent = agent_factory("--shutdown-timeout", "0.5")
        lines: list[bytes] = []

        def stream() -> None:
            body = json.dumps({"name": "t-stream-stop", "image": TEST_IMAGE, "env": {"DELAY": "20"}})
            with socket.create_connection(("127.0.0.1", agent.port), timeout=30) as sock:
                sock.sendall(f"POST /deploy HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: application/x-ndjson\r\n"
                             f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                             f"{body}".encode())
                while chunk := sock.recv(65536):
                    lines.append(chunk)

        thread = threading.Thread(target=stream, daemon=True)
        thread.start()
        wait_until(lambda: "tidybot-t-stream-stop" in test_containers())
        started = time.monotonic()
        assert agent.stop(signal.SIGTERM) == 0
        assert time.monotonic() - started < 10
        thread.join(5)
        assert test_containers() == []  # rolled back, not left behind


class TestPullStall:
    """A registry that goes silent is a 504 pull_stalled, not a deploy that never answers."""

    def test_silent_registry(self, agent_factory: Any) -> None:
        agent = agent_factory("--pull-stall-timeout", "2", "--engine-timeout", "5")
        with silent_registry() as port:
            started = time.monotonic()
            status, answer = post_json(agent.url + "/deploy", {
                "name": "t-stall", "image": f"localhost:{port}/stall/img:1"}, timeout=60)
            elapsed = time.monotonic() - started
        assert (status, answer["error"]) == (504, "pull_stalled"), answer
        assert elapsed < 20
        assert get_json(agent.url + "/health")["engine"] == "reachable"


class silent_registry:  # a context manager, named as one reads in a `with`
    """A registry on 127.0.0.1 that answers the version check, then never says another word."""

    def __enter__(self) -> int:
        self._server = socket.create_server(("127.0.0.1", 0))
        self._held: list[socket.socket] = []
        self._stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()
        return int(self._server.getsockname()[1])

    def _serve(self) -> None:
        self._server.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        conn.settimeout(30)
        self._held.append(conn)
        try:
            request = conn.recv(65536)
        except OSError:
            return
        if request.startswith(b"GET /v2/ "):
            conn.sendall(b"HTTP/1.1 200 OK\r\nDocker-Distribution-API-Version: registry/2.0\r\n"
                         b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
        # anything else: silence until the test ends

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._server.close()
        for conn in self._held:
            conn.close()
