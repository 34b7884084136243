"""Contention soak (#23, point 7): several callers for a minute on two simulated 24 GB GPUs,
with random leases, keep-warm times, priorities, waits, releases, stops and callers that
vanish mid-wait. Throughout: no 500, no GPU over-committed at any sampled moment, every
deploy answered 200, 429 or 503 with Retry-After; at the end nothing is left."""

from __future__ import annotations

import json
import random
import socket
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import pytest

from tests.agent_process import AgentProcesses, get_json, post_json
from tests.conftest import TEST_IMAGE
from tests.test_restarts import wait_until

pytestmark = pytest.mark.docker

SOAK_S = 60.0
CALLERS = 6
NAMES = {f"t-soak-{i}": vram for i, vram in enumerate((4, 4, 8, 8, 12, 12, 20, 20))}  # one spec each


def call(url: str, method: str, body: Any = None, timeout: float = 90) -> tuple[int, Any, dict[str, str]]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, method=method, data=data,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read()), dict(response.headers)
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read()), dict(err.headers)


def vanishing_deploy(port: int, body: dict[str, Any], after_s: float) -> None:
    """A caller that sends a deploy and goes away before the answer."""
    data = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
        connection.sendall(b"POST /deploy HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                           + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
        time.sleep(after_s)


class TestContentionSoak:
    def test_many_callers_two_gpus(self, agent_processes: AgentProcesses) -> None:
        agent = agent_processes.start("--fake-gpus", "RTX 4090:24,RTX 4090:24", "--min-resident", "0",
                                      "--keep-warm", "2s", "--preempt-grace", "1s", "--max-queue", "4",
                                      "--stop-timeout", "1")
        problems: list[str] = []
        answers: dict[int, int] = {}
        samples = [0]
        stop = threading.Event()
        lock = threading.Lock()

        def note(status: int, answer: Any, headers: dict[str, str], what: str) -> None:
            with lock:
                answers[status] = answers.get(status, 0) + 1
            if status not in (200, 429, 503):
                problems.append(f"{what}: {status} {answer}")
            elif status != 200 and "Retry-After" not in headers:
                problems.append(f"{what}: {status} without Retry-After: {answer}")

        def sampler() -> None:
            while not stop.is_set():
                try:
                    for gpu in get_json(agent.url + "/gpus", timeout=5):
                        taken = max(gpu["vram_committed_gb"], gpu["vram_reserved_gb"])
                        if taken > gpu["vram_total_gb"] + 1e-6:
                            seen = {n: (s["status"], s["hold"], s["gpu"])
                                    for n, s in agent.services().items()}
                            problems.append(f"over-committed GPU {gpu['id']}: reserved "
                                            f"{gpu['vram_reserved_gb']}, committed "
                                            f"{gpu['vram_committed_gb']}, "
                                            f"services {gpu['service_vram']}; all {seen}; "
                                            f"queue {get_json(agent.url + '/queue')}")
                    samples[0] += 1
                except OSError as err:
                    problems.append(f"/gpus: {err}")
                time.sleep(0.05)

        def caller(seed: int) -> None:
            rng = random.Random(seed)
            leases: list[tuple[str, str]] = []
            deadline = time.monotonic() + SOAK_S
            for _ in range(10_000):  # bounded; the deadline ends it long before
                if time.monotonic() > deadline:
                    break
                name = rng.choice(sorted(NAMES))
                body = {"name": name, "image": TEST_IMAGE, "gpu": True, "vram_gb": NAMES[name],
                        "lease_s": rng.choice((2, 4, 8)), "keep_warm_s": rng.choice((0, 1, 3)),
                        "priority": rng.randint(0, 9), "wait_s": rng.choice((0, 0, 1, 3, 6))}
                roll = rng.random()
                if roll < 0.12:
                    vanishing_deploy(agent.port, {**body, "wait_s": 5}, after_s=rng.uniform(0.05, 1.0))
                    continue
                if roll < 0.2 and leases:
                    held_name, lease_id = leases.pop(rng.randrange(len(leases)))
                    status, answer, headers = call(f"{agent.url}/services/{held_name}/leases/{lease_id}",
                                                   "DELETE")
                    if status >= 500:
                        problems.append(f"release: {status} {answer}")
                    continue
                if roll < 0.25:
                    status, answer, headers = call(agent.url + "/stop", "POST", {"name": name})
                    if status >= 500:
                        problems.append(f"stop: {status} {answer}")
                    continue
                status, answer, headers = call(agent.url + "/deploy", "POST", body)
                note(status, answer, headers, f"deploy {name}")
                if status == 200 and answer.get("lease_id"):
                    leases.append((name, answer["lease_id"]))
                time.sleep(rng.uniform(0, 0.3))

        sampling = threading.Thread(target=sampler, daemon=True)
        sampling.start()
        callers = [threading.Thread(target=caller, args=(seed,), daemon=True) for seed in range(CALLERS)]
        for thread in callers:
            thread.start()
        for thread in callers:
            thread.join(SOAK_S + 120)
        stop.set()
        sampling.join(10)
        assert not any(thread.is_alive() for thread in callers), "a caller hung"
        assert problems == [], problems[:10]
        assert answers.get(200, 0) > 20 and samples[0] > 100, (answers, samples)

        # The end: every lease runs out (2-8 s), idle ones go (keep-warm 1-3 s), no one waits.
        for name in NAMES:
            post_json(agent.url + "/stop", {"name": name})
        wait_until(lambda: get_json(agent.url + "/queue") == [], timeout=30)
        wait_until(lambda: agent.services() == {}, timeout=30)
        assert all(g["vram_reserved_gb"] == 0 and g["vram_idle_gb"] == 0
                   for g in get_json(agent.url + "/gpus"))
        assert get_json(agent.url + "/health")["queued"] == 0
