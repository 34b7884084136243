"""A minute of mixed traffic against a real agent, with faults under it; then the books balance.

Several clients deploy, replace, stop, list, tail, follow and drop follows at once, while
service containers are killed under them, the engine is frozen and thawed once (only
where the test may do that to dockerd: DEPLOY_AGENT_TEST_ENGINE_RESTART=1, as in CI), and
finally the agent itself is SIGKILLed under load and restarted. Afterwards: no 500 was
ever answered, the service table equals the engine's containers, host ports are unique,
GPU reservations equal what the services declare, and file descriptors and memory are
back near a warmed-up baseline.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.agent_process import AgentProcess, get_json
from tests.conftest import TEST_IMAGE, remove_test_containers
from tests.test_restarts import wait_until

pytestmark = pytest.mark.docker

SOAK_SECONDS = float(os.environ.get("DEPLOY_AGENT_SOAK_SECONDS", "45"))
NAMES = [f"t-soak-{i}" for i in range(8)]
MAY_FREEZE = os.environ.get("DEPLOY_AGENT_TEST_ENGINE_RESTART") == "1"


class Traffic:
    """Every answer's status, from every worker; the workers run until the deadline."""

    def __init__(self, agent: AgentProcess, seconds: float) -> None:
        self.agent = agent
        self.deadline = time.monotonic() + seconds
        self.statuses: Counter[int] = Counter()
        self.errors: list[str] = []
        self._lock = threading.Lock()

    def running(self) -> bool:
        return time.monotonic() < self.deadline

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.agent.url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as err:
            status, raw = err.code, err.read()
        with self._lock:
            self.statuses[status] += 1
            if status >= 500 and status not in (502, 503, 504):
                self.errors.append(f"{method} {path} -> {status}: {raw[:300]!r}")
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw

    def worker(self, step: Callable[[random.Random], None], seed: int) -> threading.Thread:
        rng = random.Random(seed)

        def loop() -> None:
            while self.running():
                try:
                    step(rng)
                except OSError as err:  # a connection cut by the agent would be a finding
                    with self._lock:
                        self.errors.append(f"{step.__name__}: {err!r}")

        thread = threading.Thread(target=loop, daemon=True, name=step.__name__)
        thread.start()
        return thread


def spec(rng: random.Random, name: str) -> dict[str, Any]:
    body: dict[str, Any] = {"name": name, "image": TEST_IMAGE, "env": {"V": str(rng.randint(0, 1))},
                            "ready_timeout": 10}
    if int(name.rsplit("-", 1)[1]) % 2:  # odd names take a GPU
        body.update(gpu=True, vram_gb=rng.choice([4, 8]))
    if rng.random() < 0.5:
        body["replace"] = True
    return body


def follow_and_drop(agent: AgentProcess, name: str, hold_s: float) -> None:
    with socket.create_connection(("127.0.0.1", agent.port), timeout=10) as sock:
        sock.sendall(f"GET /services/{name}/logs?follow=1&tail=5 HTTP/1.1\r\n"
                     "Host: 127.0.0.1\r\n\r\n".encode())
        sock.settimeout(hold_s + 0.5)
        deadline = time.monotonic() + hold_s
        while time.monotonic() < deadline:
            try:
                if not sock.recv(4096):
                    break
            except TimeoutError:
                break
    # closed without reading the end: a client that crashed while tailing


def engine_containers(instance: str) -> dict[str, str]:
    """Name -> state of the agent instance's containers, as the engine reports them."""
    out = subprocess.run(["docker", "ps", "-a", "--filter", f"label=tidybot.deploy-agent={instance}",
                          "--format", "{{.Names}} {{.State}}"], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    return dict(line.split(" ", 1) for line in out.splitlines())


def published_ports(names: list[str]) -> dict[str, int]:
    ports = {}
    for name in names:
        out = subprocess.run(["docker", "inspect", "-f", "{{json .HostConfig.PortBindings}}",
                              f"tidybot-{name}"], capture_output=True, text=True, timeout=60).stdout
        if out.strip():
            bindings = json.loads(out)
            ports[name] = int(next(iter(bindings.values()))[0]["HostPort"])
    return ports


def resources(agent: AgentProcess) -> tuple[int, int]:
    """(open file descriptors, resident memory in KiB) of the agent process."""
    assert agent.process is not None
    pid = agent.process.pid
    rss = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
               if line.startswith("VmRSS:"))
    return sum(1 for _ in Path(f"/proc/{pid}/fd").iterdir()), rss


def assert_books_balance(agent: AgentProcess) -> None:
    """The table equals the engine's containers; ports unique; GPU reservations declared."""
    instance = f"test-{agent.port}"

    def converged() -> bool:
        listed = {s["name"] for s in get_json(agent.url + "/services")}
        return {f"tidybot-{name}" for name in listed} == set(engine_containers(instance))

    wait_until(converged, timeout=20)
    services = get_json(agent.url + "/services")
    ports = [s["port"] for s in services]
    assert len(ports) == len(set(ports)), ports
    assert published_ports([s["name"] for s in services]) == {s["name"]: s["port"] for s in services}
    for gpu in get_json(agent.url + "/gpus"):
        declared = sum(s["vram_gb"] for s in services if s["gpu"] == gpu["id"])
        assert gpu["vram_reserved_gb"] == declared, (gpu, services)
        assert gpu["vram_reserved_gb"] <= gpu["vram_total_gb"]


class TestSoak:
    """Mixed concurrent traffic with faults under it; nothing answered 500, nothing leaked."""

    def test_mixed_traffic_with_faults(self, tmp_path: Path, test_image: str) -> None:
        remove_test_containers()
        agent = AgentProcess(tmp_path / "state", "--fake-gpus", "RTX 4090:24,RTX 4090:24",
                             "--engine-timeout", "5", "--stop-timeout", "1")
        agent.start()
        try:
            self.run_soak(agent)
        finally:
            agent.close()
            remove_test_containers()

    def run_soak(self, agent: AgentProcess) -> None:
        # Warm up every path once, then take the baseline.
        warm = Traffic(agent, 0)
        for name in NAMES[:2]:
            warm.call("POST", "/deploy", {"name": name, "image": TEST_IMAGE})
            follow_and_drop(agent, name, 0.2)
            warm.call("GET", f"/services/{name}/logs?tail=5")
            warm.call("POST", "/stop", {"name": name})
        time.sleep(1)
        fds_before, rss_before = resources(agent)

        traffic = Traffic(agent, SOAK_SECONDS)

        def deploys(rng: random.Random) -> None:
            traffic.call("POST", "/deploy", spec(rng, rng.choice(NAMES)))

        def stops(rng: random.Random) -> None:
            traffic.call("POST", "/stop", {"name": rng.choice(NAMES)})
            time.sleep(rng.uniform(0.2, 1.0))

        def reads(rng: random.Random) -> None:
            for path in ("/services", "/gpus", "/health", f"/services/{rng.choice(NAMES)}",
                         f"/services/{rng.choice(NAMES)}/logs?tail=10", "/metrics"):
                traffic.call("GET", path)

        def follows(rng: random.Random) -> None:
            follow_and_drop(agent, rng.choice(NAMES), rng.uniform(0, 0.5))

        def kills(rng: random.Random) -> None:
            time.sleep(rng.uniform(1, 3))
            with contextlib.suppress(subprocess.TimeoutExpired):  # bounded like every wait here
                subprocess.run(["docker", "kill", f"tidybot-{rng.choice(NAMES)}"], capture_output=True,
                               timeout=30)

        workers = [traffic.worker(step, seed) for seed, step in enumerate(
            [deploys, deploys, deploys, stops, reads, follows, follows, kills])]
        if MAY_FREEZE:
            time.sleep(SOAK_SECONDS / 3)
            dockerd = int(subprocess.run(["pgrep", "-xo", "dockerd"], capture_output=True,
                                         text=True, check=True).stdout)
            os.kill(dockerd, signal.SIGSTOP)
            try:
                time.sleep(4)
            finally:
                os.kill(dockerd, signal.SIGCONT)
        for worker in workers:
            worker.join(SOAK_SECONDS + 120)
            assert not worker.is_alive(), f"{worker.name} is stuck"

        assert traffic.errors == [], traffic.errors
        assert traffic.statuses[200] > 50, traffic.statuses  # it really did work meanwhile
        wait_until(lambda: get_json(agent.url + "/health")["engine"] == "reachable", timeout=30)
        assert_books_balance(agent)
        wait_until(lambda: resources(agent)[0] <= fds_before + 10, timeout=15)
        assert resources(agent)[1] <= rss_before * 1.5 + 20 * 1024, (rss_before, resources(agent))

        # SIGKILL under load, restart: the books still balance.
        load = Traffic(agent, 3)
        loaders = [load.worker(deploys, seed) for seed in (100, 101)]
        time.sleep(1)
        agent.stop(signal.SIGKILL)
        for worker in loaders:
            worker.join(70)
        agent.start()
        assert_books_balance(agent)
        for name in NAMES:
            assert traffic.call("POST", "/stop", {"name": name})[0] in (200, 404)
        assert get_json(agent.url + "/services") == []
        assert engine_containers(f"test-{agent.port}") == {}
