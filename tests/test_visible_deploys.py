"""What other callers can see of a node: a restarting agent says so, a first deploy is listed
from its first moment, and a deploy waiting for its name says so while it waits."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deploy_agent.client import AsyncAgentClient
from tests.agent_process import AgentProcess, AgentProcesses, get_json
from tests.standins import SlowRegistry


def wait_for(check: Any, timeout: float = 30, every: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        assert time.monotonic() < deadline, "timed out"
        time.sleep(every)


@pytest.fixture
def silent_engine(tmp_path: Path) -> Iterator[str]:
    """A unix socket that takes connections and never answers: an engine that hangs."""
    path = tmp_path / "engine.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen(64)
    held: list[socket.socket] = []

    def accept() -> None:
        for _ in range(64):  # bounded: start-up makes a few calls
            try:
                held.append(server.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    yield f"unix://{path}"
    server.close()
    for connection in held:
        connection.close()


class TestStartingUp:
    """While start-up adopts what runs, the port answers 503 starting_up: a restarting node
    is not mistaken for one that is down."""

    def test_starting_then_serving(self, tmp_path: Path, silent_engine: str) -> None:
        agent = AgentProcess(tmp_path / "state", "--docker-host", silent_engine, "--engine-timeout", "3")
        agent.start(wait=False)
        try:
            def answer() -> tuple[int, dict[str, Any], str | None] | None:
                try:
                    with urllib.request.urlopen(agent.url + "/services", timeout=1) as response:
                        return response.status, json.loads(response.read()), None
                except urllib.error.HTTPError as err:
                    return err.code, json.loads(err.read()), err.headers.get("Retry-After")
                except OSError:
                    return None
            status, body, retry = wait_for(answer, timeout=20)
            assert (status, body["error"], retry) == (503, "starting_up", "1"), body
            # once the engine's list call has timed out, start-up ends and it serves
            wait_for(lambda: (a := answer()) is not None and a[0] == 200, timeout=20)
        finally:
            agent.close()




@pytest.fixture
def slow_image(pushed_image: str, registry: str) -> Iterator[tuple[str, SlowRegistry]]:
    """The pushed image, pulled through a front that holds its manifest 4 s."""
    front = SlowRegistry(registry, delay_s=4)
    try:
        yield pushed_image.replace(registry, front.address), front
    finally:
        front.close()


@pytest.mark.docker
class TestInFlight:
    """A first deploy is in /services as `starting` (reason `deploying`) from its start, with
    the GPU it reserved, before its container exists."""

    def test_listed_while_it_pulls(self, agent_processes: AgentProcesses,
                                   slow_image: tuple[str, SlowRegistry]) -> None:
        agent = agent_processes.start("--fake-gpus", "RTX 4090:24")
        image, front = slow_image
        deploying = agent.deploy_in_background({"name": "t-inflight", "image": image, "gpu": True,
                                                "vram_gb": 8})
        wait_for(lambda: front.manifests_asked, timeout=10)  # pulling: no container yet
        entry = agent.services().get("t-inflight")
        assert entry is not None
        assert (entry["status"], entry["reason"], entry["gpu"]) == ("starting", "deploying", 0), entry
        assert (entry["host"], entry["port"], entry["image"]) == (None, None, image)
        assert get_json(agent.url + "/services/t-inflight")["reason"] == "deploying"
        assert get_json(agent.url + "/gpus")[0]["vram_reserved_gb"] == 8
        deploying["thread"].join(60)
        assert deploying["status"] == 200, deploying
        entry = agent.services()["t-inflight"]
        assert (entry["status"], entry["reason"]) == ("healthy", None)
        assert entry["port"] == deploying["answer"]["port"]

    def test_a_failed_first_deploy_leaves_no_entry(self, agent_processes: AgentProcesses,
                                                   registry: str) -> None:
        agent = agent_processes.start("--fake-gpus", "RTX 4090:24")
        front = SlowRegistry(registry, delay_s=2)
        try:
            deploying = agent.deploy_in_background(
                {"name": "t-inflight-bad", "image": f"{front.address}/nothing/here:1", "gpu": True,
                 "vram_gb": 4})
            wait_for(lambda: "t-inflight-bad" in agent.services(), timeout=10)
            deploying["thread"].join(60)
            assert (deploying["status"], deploying["answer"]["error"]) == (422, "image_not_found")
            assert agent.services() == {}
            assert get_json(agent.url + "/gpus")[0]["vram_reserved_gb"] == 0
        finally:
            front.close()

    async def test_a_deploy_waiting_for_its_name_keeps_talking(
            self, agent_processes: AgentProcesses, pushed_image: str, registry: str) -> None:
        """The second deploy of a name waits for the first's 8 s pull; with 6 s of silence
        the client would give up on a node that is only busy. It hears `waiting` instead."""
        agent = agent_processes.start()
        front = SlowRegistry(registry, delay_s=8)
        try:
            body = {"name": "t-waiting", "image": pushed_image.replace(registry, front.address)}
            first = agent.deploy_in_background(body)
            wait_for(lambda: "t-waiting" in agent.services(), timeout=10)
            async with AsyncAgentClient(agent.url, stall_timeout=6) as client:
                seen = [event async for event in client.deploy_events(body)]
            waiting = [e for e in seen if e.get("event") == "waiting"]
            assert waiting and waiting[0]["reason"] == "name_busy" and waiting[0]["waited_s"] >= 4.9
            assert seen[-1]["ok"] is True and seen[-1]["already_running"] is True
            first["thread"].join(30)
            assert first["status"] == 200
        finally:
            front.close()


RACER = """
import json, sys
from deploy_agent.client import ComputeNodes
nodes = ComputeNodes(sys.argv[1].split(","))
print(json.dumps(nodes.ensure(json.loads(sys.argv[2]))))
"""


@pytest.mark.docker
class TestOneCopyAcrossNodes:
    """Two callers in two processes ensure the same service on two agents: one container."""

    def test_second_caller_sees_the_first_in_flight(self, agent_processes: AgentProcesses,
                                                    slow_image: tuple[str, SlowRegistry]) -> None:
        one = agent_processes.start("--fake-gpus", "RTX 4090:24")
        two = agent_processes.start("--fake-gpus", "RTX 4090:24")
        image, front = slow_image
        nodes = f"{one.url},{two.url}"
        body = json.dumps({"name": "t-race", "image": image, "gpu": True, "vram_gb": 8})
        env = {k: v for k, v in os.environ.items() if k != "COMPUTE_NODES"}

        def racer() -> subprocess.Popen[str]:
            return subprocess.Popen([sys.executable, "-c", RACER, nodes, body], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, env=env)
        first = racer()
        try:
            # Once its pull has begun, the first has reserved 8 GB on one node, which by free
            # VRAM alone makes the other look better; its container doesn't exist yet.
            wait_for(lambda: front.manifests_asked, timeout=15)
            second = racer()
            answers = [json.loads(p.communicate(timeout=90)[0]) for p in (first, second)]
        finally:
            for process in (first, second) if "second" in locals() else (first,):
                process.kill()
        assert answers[0]["node"] == answers[1]["node"], answers
        assert sorted(a["already_running"] for a in answers) == [False, True]
        placed = [agent for agent in (one, two) if "t-race" in agent.services()]
        assert len(placed) == 1
        names = subprocess.run(["docker", "ps", "-a", "--format", "{{.Names}}"], capture_output=True,
                               text=True, check=True).stdout.split()
        assert len([n for n in names if n.endswith("t-race")]) == 1, names
