"""Waiting for room (#23, point 3): the node's queue of GPU deploys, on the real engine with
simulated GPUs. Each rule: order, the room earmarked for the head, the bound, the wait that
runs out, the deploy that can never fit, callers that leave, shutdown."""

from __future__ import annotations

import json
import math
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import pytest

from tests.agent_process import AgentProcess, AgentProcesses, get_json, post_json
from tests.conftest import TEST_IMAGE
from tests.test_holds import deploy, release
from tests.test_restarts import wait_until

pytestmark = pytest.mark.docker


@pytest.fixture
def one_gpu(agent_processes: AgentProcesses) -> AgentProcess:
    return agent_processes.start("--fake-gpus", "RTX 4090:24", "--min-resident", "0")


def gpu_body(name: str, vram_gb: float, **more: Any) -> dict[str, Any]:
    return {"name": name, "image": TEST_IMAGE, "gpu": True, "vram_gb": vram_gb, **more}


def streamed(agent: AgentProcess, body: dict[str, Any]) -> dict[str, Any]:
    """POST /deploy with NDJSON progress from a thread; the dict gets 'lines', then 'done'."""
    result: dict[str, Any] = {"lines": []}

    def run() -> None:
        request = urllib.request.Request(agent.url + "/deploy", data=json.dumps(body).encode(),
                                         method="POST", headers={"Content-Type": "application/json",
                                                                 "Accept": "application/x-ndjson"})
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                for line in response:
                    if line.strip():
                        result["lines"].append(json.loads(line))
                        result["at"] = time.monotonic()
        except urllib.error.HTTPError as err:
            result["status"], result["answer"] = err.code, json.loads(err.read())
            result["retry_after"] = err.headers.get("Retry-After")
        result["done"] = True

    threading.Thread(target=run, daemon=True).start()
    return result


def queue(agent: AgentProcess) -> list[dict[str, Any]]:
    return list(get_json(agent.url + "/queue"))


class TestWaiting:
    def test_waiters_land_in_order_as_room_appears(self, one_gpu: AgentProcess) -> None:
        holder = deploy(one_gpu, "t-holder", gpu=True, vram_gb=20, lease_s=60, keep_warm_s=0)
        first = streamed(one_gpu, gpu_body("t-w1", 16, wait_s=60, lease_s=60, keep_warm_s=0))
        wait_until(lambda: [q["name"] for q in queue(one_gpu)] == ["t-w1"], timeout=10)
        second = streamed(one_gpu, gpu_body("t-w2", 16, wait_s=60))
        wait_until(lambda: [q["name"] for q in queue(one_gpu)] == ["t-w1", "t-w2"], timeout=10)
        assert get_json(one_gpu.url + "/health")["queued"] == 2
        listed = one_gpu.services()
        assert (listed["t-w1"]["status"], listed["t-w1"]["reason"]) == ("starting", "queued")
        assert {"event": "queued", "position": 1, "needs_gb": 16} in first["lines"]
        assert {"event": "queued", "position": 2, "needs_gb": 16} in second["lines"]
        released_at = time.monotonic()
        release(one_gpu, "t-holder", holder["lease_id"])
        wait_until(lambda: first.get("done"), timeout=30)
        answer = first["lines"][-1]
        assert answer["ok"] is True and answer["gpu"] == 0, first["lines"][-3:]
        placed = [e for e in get_json(one_gpu.url + "/events?limit=1000")
                  if (e["kind"], e["service"]) == ("deployed", "t-w1")]
        assert placed and not second.get("done")  # the second still waits: no room for both
        assert first["at"] - released_at < 10  # placed at once, then started and healthy
        assert [q["name"] for q in queue(one_gpu)] == ["t-w2"]
        release(one_gpu, "t-w1", answer["lease_id"])
        wait_until(lambda: second.get("done"), timeout=30)
        assert second["lines"][-1]["ok"] is True and queue(one_gpu) == []

    def test_the_head_waiter_keeps_the_room_that_appears(self, agent_processes: AgentProcesses) -> None:
        """A later, smaller deploy can't take what the head waits for; on another GPU it can."""
        two = agent_processes.start("--fake-gpus", "RTX 4090:24,RTX 4090:24", "--min-resident", "0")
        deploy(two, "t-a", gpu=True, vram_gb=20)  # GPU 0: 4 free
        b = deploy(two, "t-b", gpu=True, vram_gb=16, lease_s=60, keep_warm_s=0)  # GPU 1: 8 free
        big = streamed(two, gpu_body("t-big", 12, wait_s=60))
        wait_until(lambda: [q["name"] for q in queue(two)] == ["t-big"], timeout=10)
        status, answer = post_json(two.url + "/deploy", gpu_body("t-six", 6))
        assert (status, answer["error"]) == (503, "no_gpu_capacity")  # GPU 1's 8 GB: the head's
        assert deploy(two, "t-three", gpu=True, vram_gb=3)["gpu"] == 0  # fits on GPU 0: placed
        release(two, "t-b", b["lease_id"])
        wait_until(lambda: big.get("done"), timeout=30)
        assert big["lines"][-1]["ok"] is True and big["lines"][-1]["gpu"] == 1

    def test_a_wait_that_runs_out_and_a_deploy_that_can_never_fit(self, one_gpu: AgentProcess) -> None:
        deploy(one_gpu, "t-pinned", gpu=True, vram_gb=20)
        started = time.monotonic()
        status, answer = post_json(one_gpu.url + "/deploy", gpu_body("t-never", 8, wait_s=60))
        # At once: not after the 60 s wait_s (a bound a loaded machine can't miss, not a timing).
        assert (status, answer["error"]) == (503, "no_gpu_capacity") and time.monotonic() - started < 30
        assert "whatever its wait_s" in answer["message"]
        deploy(one_gpu, "t-lz", gpu=True, vram_gb=4, lease_s=60)  # 0 free now, 4 one day
        waited = streamed(one_gpu, gpu_body("t-short", 4, wait_s=1.5))
        assert queue(one_gpu) == [] or [q["name"] for q in queue(one_gpu)] == ["t-short"]
        wait_until(lambda: waited.get("done"), timeout=10)
        last = waited["lines"][-1]
        assert (last["ok"], last["error"], last["retry_after_s"]) == (False, "no_gpu_capacity", 10)
        assert queue(one_gpu) == [] and set(one_gpu.services()) == {"t-pinned", "t-lz"}
        plain = urllib.request.Request(one_gpu.url + "/deploy", method="POST",
                                       data=json.dumps(gpu_body("t-short2", 4, wait_s=0.5)).encode(),
                                       headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(plain, timeout=10)
        assert caught.value.code == 503 and caught.value.headers["Retry-After"] == "10"

    def test_a_full_queue_is_429(self, agent_processes: AgentProcesses) -> None:
        agent = agent_processes.start("--fake-gpus", "RTX 4090:24", "--max-queue", "1")
        deploy(agent, "t-full", gpu=True, vram_gb=20, lease_s=60)
        streamed(agent, gpu_body("t-q1", 8, wait_s=30))
        wait_until(lambda: len(queue(agent)) == 1, timeout=10)
        request = urllib.request.Request(agent.url + "/deploy", method="POST",
                                         data=json.dumps(gpu_body("t-q2", 8, wait_s=30)).encode(),
                                         headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(request, timeout=10)
        # Told to come back once the head waiter (t-q1, the test image) could have started:
        # that image's recorded cold start (t-full's deploy), at least 10 s.
        recorded = next(image["cold_start"] for image in get_json(agent.url + "/images")
                        if image["reference"] == TEST_IMAGE)
        total = recorded["pull_s"] + recorded["start_s"] + recorded["healthy_s"]
        assert caught.value.code == 429
        assert caught.value.headers["Retry-After"] == str(max(10, math.ceil(total)))
        assert json.loads(caught.value.read())["error"] == "queue_full"

    def test_a_caller_that_leaves_leaves_the_queue(self, one_gpu: AgentProcess) -> None:
        holder = deploy(one_gpu, "t-hold", gpu=True, vram_gb=20, lease_s=60, keep_warm_s=0)
        body = json.dumps(gpu_body("t-gone", 8, wait_s=60)).encode()
        with socket.create_connection(("127.0.0.1", one_gpu.port)) as caller:
            caller.sendall(b"POST /deploy HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                           + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            wait_until(lambda: len(queue(one_gpu)) == 1, timeout=10)
        wait_until(lambda: queue(one_gpu) == [], timeout=5)
        release(one_gpu, "t-hold", holder["lease_id"])
        time.sleep(2)
        assert "t-gone" not in one_gpu.services()  # nothing placed for a caller that left

    def test_a_waiting_deploy_holds_no_lock(self, one_gpu: AgentProcess) -> None:
        """A stop of its name answers at once; a waiting replace leaves the old one running."""
        deploy(one_gpu, "t-block", gpu=True, vram_gb=12, lease_s=60)
        deploy(one_gpu, "t-old", gpu=True, vram_gb=10)
        replace = streamed(one_gpu, gpu_body("t-old", 14, wait_s=30, replace=True))  # 12 + 14 > 24
        wait_until(lambda: len(queue(one_gpu)) == 1, timeout=10)
        assert one_gpu.services()["t-old"]["status"] == "healthy"  # not removed while it waits
        other = streamed(one_gpu, gpu_body("t-new", 8, wait_s=30))
        wait_until(lambda: len(queue(one_gpu)) == 2, timeout=10)
        started = time.monotonic()
        status, answer = post_json(one_gpu.url + "/stop", {"name": "t-new"}, timeout=10)
        assert status == 409 and time.monotonic() - started < 10, answer  # not after the 30 s wait
        assert not replace.get("done") and not other.get("done")

    def test_shutdown_refuses_waiters_at_once(self, one_gpu: AgentProcess) -> None:
        deploy(one_gpu, "t-busy", gpu=True, vram_gb=20, lease_s=60)  # pinned: it could never fit
        waiting = streamed(one_gpu, gpu_body("t-wait", 8, wait_s=120))
        wait_until(lambda: len(queue(one_gpu)) == 1, timeout=10)
        started = time.monotonic()
        one_gpu.stop(signal.SIGTERM)
        wait_until(lambda: waiting.get("done"), timeout=10)
        assert time.monotonic() - started < 10
        assert waiting["lines"][-1]["error"] == "no_gpu_capacity"
        assert "shutting down" in waiting["lines"][-1]["message"]

    def test_a_dry_run_says_it_would_wait(self, one_gpu: AgentProcess) -> None:
        deploy(one_gpu, "t-dry-hold", gpu=True, vram_gb=20, lease_s=60)
        status, answer = post_json(one_gpu.url + "/deploy?dry_run=1", gpu_body("t-dry", 8, wait_s=30))
        assert status == 200 and answer["queued"] is True and answer["gpu"] is None
        assert post_json(one_gpu.url + "/deploy?dry_run=1", gpu_body("t-dry", 8))[0] == 503


@pytest.fixture
def preempting(agent_processes: AgentProcesses) -> AgentProcess:
    return agent_processes.start("--fake-gpus", "RTX 4090:24", "--min-resident", "0",
                                 "--preempt-grace", "5s")  # room for a slow renew or deploy


def events_of(agent: AgentProcess, name: str) -> list[tuple[str, str | None]]:
    return [(e["kind"], e["reason"]) for e in get_json(agent.url + "/events?limit=1000")
            if e["service"] == name]


class TestPreemption:
    def test_announced_then_stopped_for_a_higher_priority_waiter(self, preempting: AgentProcess) -> None:
        low = deploy(preempting, "t-low", gpu=True, vram_gb=20, lease_s=60, priority=2)
        waiter = streamed(preempting, gpu_body("t-high", 12, wait_s=30, priority=7))
        wait_until(lambda: preempting.services()["t-low"].get("preempt_at"), timeout=5)
        entry = preempting.services()["t-low"]
        assert ("preempting", "t-high") in events_of(preempting, "t-low")
        status, renewed = post_json(preempting.url + "/services/t-low/renew", {"lease_id": low["lease_id"]})
        assert status == 200 and renewed["preempt_at"] == entry["preempt_at"]
        wait_until(lambda: waiter.get("done"), timeout=30)
        assert waiter["lines"][-1]["ok"] is True
        assert events_of(preempting, "t-low")[-1] == ("stopped", "preempted")
        assert "t-low" not in preempting.services()

    def test_called_off_when_an_equal_holder_arrives(self, preempting: AgentProcess) -> None:
        deploy(preempting, "t-low2", gpu=True, vram_gb=20, lease_s=60, priority=2)
        waiter = streamed(preempting, gpu_body("t-high2", 12, wait_s=12, priority=7))  # > the grace
        wait_until(lambda: preempting.services()["t-low2"].get("preempt_at"), timeout=5)
        deploy(preempting, "t-low2", gpu=True, vram_gb=20, lease_s=60, priority=7)  # as important
        wait_until(lambda: preempting.services()["t-low2"].get("preempt_at") is None, timeout=3)
        wait_until(lambda: waiter.get("done"), timeout=20)
        assert waiter["lines"][-1]["error"] == "no_gpu_capacity"  # its wait ran out instead
        assert preempting.services()["t-low2"]["status"] == "healthy"

    def test_never_pinned_equal_or_a_wait_shorter_than_the_grace(self, preempting: AgentProcess) -> None:
        deploy(preempting, "t-pin-p", gpu=True, vram_gb=10)
        deploy(preempting, "t-same", gpu=True, vram_gb=10, lease_s=60, priority=5)
        for body in (gpu_body("t-eq", 12, wait_s=10, priority=5),  # no holder is lower
                     gpu_body("t-brief", 12, wait_s=1.5, priority=9)):  # gone before the grace
            waited = streamed(preempting, body)
            wait_until(lambda waited=waited: waited.get("done"), timeout=20)
            assert waited["lines"][-1]["error"] == "no_gpu_capacity"
        assert not [e for e in get_json(preempting.url + "/events?limit=1000") if e["kind"] == "preempting"]
        assert set(preempting.services()) == {"t-pin-p", "t-same"}
