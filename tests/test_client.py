"""The Python client and ComputeNodes against real agents on the real engine."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient

from deploy_agent.client import (
    AgentClient,
    AsyncAgentClient,
    AsyncComputeNodes,
    AuthError,
    CapacityError,
    ComputeNodes,
    ConflictError,
    DeployInterrupted,
    HealthTimeoutError,
    ImageError,
    InvalidRequestError,
    NodeUnreachable,
    PolicyError,
    PullStalledError,
    ServiceNotFoundError,
    StartError,
    TooManyStreamsError,
    error_from,
    nodes_from_env,
)
from tests.agent_process import AgentProcess, free_port
from tests.conftest import TEST_IMAGE

pytestmark = pytest.mark.docker
Client = TestClient[web.Request, web.Application]


def manifest(name: str, gpu: bool = False, vram_gb: float = 0, **deploy: Any) -> dict[str, Any]:
    """A nested service.yaml, as skill agents read it."""
    return {"name": name, "version": "0.1.0", "description": "test service",
            "requires": {"gpu": gpu, "vram_gb": vram_gb, "ram_gb": 1},
            "deploy": {"image": TEST_IMAGE, "port": 8000, "health": "/health", **deploy},
            "client": "client.py"}


class TestSyncClient:
    """AgentClient from a plain script: every call, typed errors."""

    def test_service_yaml_round_trip(self, node: AgentProcess, tmp_path: Path) -> None:
        path = tmp_path / "service.yaml"
        path.write_text(yaml.safe_dump(manifest("t-cli-yaml", gpu=True, vram_gb=8)))
        with AgentClient(node.url) as agent:
            first = agent.deploy(path)
            assert (first["already_running"], first["gpu"], first["status"]) == (False, 0, "healthy")
            assert agent.deploy(path)["already_running"] is True
            assert [s.name for s in agent.services()] == ["t-cli-yaml"]
            assert agent.service("t-cli-yaml").host == first["host"]
            assert agent.gpus()[0].services == ["t-cli-yaml"]
            assert agent.health()["services_running"] == 1
            assert "listening on 8000" in agent.logs("t-cli-yaml", tail=50)
            assert agent.stop("t-cli-yaml") == {"ok": True, "name": "t-cli-yaml"}
            with pytest.raises(ServiceNotFoundError) as caught:
                agent.service("t-cli-yaml")
            assert (caught.value.status, caught.value.code) == (404, "not_found")

    def test_typed_errors(self, node: AgentProcess) -> None:
        with AgentClient(node.url) as agent:
            with pytest.raises(InvalidRequestError) as invalid:
                agent.deploy({"name": "Bad", "image": TEST_IMAGE})
            assert invalid.value.body["details"][0]["field"] == "name"
            agent.deploy({"name": "t-cli-c", "image": TEST_IMAGE})
            with pytest.raises(ConflictError) as conflict:
                agent.deploy({"name": "t-cli-c", "image": TEST_IMAGE, "env": {"A": "1"}})
            assert conflict.value.body["differing_fields"] == ["env"]
            with pytest.raises(StartError) as start:
                agent.deploy({"name": "t-cli-x", "image": TEST_IMAGE, "command": "sh -c 'exit 7'"})
            assert (start.value.status, start.value.body["exit_code"]) == (502, 7)
            with pytest.raises(PolicyError):
                agent.deploy({"name": "t-cli-m", "image": TEST_IMAGE, "volumes": ["/etc:/e"]})
            with pytest.raises(CapacityError) as capacity:
                agent.deploy(manifest("t-cli-big", gpu=True, vram_gb=99))
            assert capacity.value.code == "no_gpu_capacity"

    def test_follow_logs_streams_new_output(self, node: AgentProcess) -> None:
        ticking = ["sh", "-c", "(i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.1; done) & "
                   "exec httpd -f -p 8000 -h /www"]
        with AgentClient(node.url) as agent:
            agent.deploy({"name": "t-cli-tick", "image": TEST_IMAGE, "command": ticking})
            seen = ""
            for chunk in agent.follow_logs("t-cli-tick", tail=1):
                seen += chunk
                if seen.count("tick") >= 5:
                    break
            numbers = [int(line.split()[1]) for line in seen.splitlines() if line.startswith("tick")]
            assert numbers == sorted(numbers) and len(numbers) >= 5

    def test_token(self, tmp_path: Path, test_image: str, monkeypatch: pytest.MonkeyPatch) -> None:
        agent = AgentProcess(tmp_path / "tok")
        agent.start_env = {"DEPLOY_AGENT_TOKEN": "client-token"}
        agent.start()
        try:
            monkeypatch.delenv("DEPLOY_AGENT_TOKEN", raising=False)
            with AgentClient(agent.url) as anonymous, pytest.raises(AuthError):
                anonymous.services()
            with AgentClient(agent.url, token="client-token") as explicit:
                assert explicit.services() == []
            monkeypatch.setenv("DEPLOY_AGENT_TOKEN", "client-token")
            with AgentClient(agent.url) as from_env:
                assert from_env.services() == []
        finally:
            agent.close()

    def test_unreachable_node(self) -> None:
        with AgentClient(f"http://127.0.0.1:{free_port()}") as agent, pytest.raises(NodeUnreachable):
            agent.health()


class TestAsyncClient:
    """AsyncAgentClient from asyncio code, including deploy progress events."""

    async def test_round_trip(self, agent: Client) -> None:
        async with AsyncAgentClient(str(agent.make_url(""))) as client:
            answer = await client.deploy({"name": "t-async", "image": TEST_IMAGE})
            assert answer["status"] == "healthy"
            assert [s.name for s in await client.services()] == ["t-async"]
            assert (await client.service("t-async")).port == answer["port"]
            assert (await client.health())["services_running"] == 1
            await client.stop("t-async")
            assert await client.services() == []

    async def test_deploy_events_with_a_real_pull(self, agent: Client, pushed_image: str) -> None:
        async with AsyncAgentClient(str(agent.make_url(""))) as client:
            events = [e async for e in client.deploy_events({"name": "t-events", "image": pushed_image})]
        kinds = [e.get("event") for e in events]
        assert "pull" in kinds and "created" in kinds and "started" in kinds and "health" in kinds
        assert kinds.index("created") < kinds.index("started") < kinds.index("health")
        sized = [e for e in events if e.get("event") == "pull" and "total" in e]
        assert sized and all(0 <= e["current"] <= e["total"] for e in sized)
        assert events[-1]["ok"] is True and events[-1]["already_running"] is False
        assert [e for e in events if e.get("event") == "health"][-1]["healthy"] is True

    async def test_error_is_the_last_event_then_raised(self, agent: Client) -> None:
        seen: list[dict[str, Any]] = []
        async with AsyncAgentClient(str(agent.make_url(""))) as client:
            with pytest.raises(StartError):
                async for event in client.deploy_events(
                        {"name": "t-events-x", "image": TEST_IMAGE, "command": ["sh", "-c", "exit 3"]}):
                    seen.append(event)
        assert seen[-1]["error"] == "container_exited" and seen[-1]["exit_code"] == 3


class TestNdjsonStream:
    """POST /deploy with Accept: application/x-ndjson, read as raw HTTP."""

    async def test_stream_ends_with_the_plain_answer(self, agent: Client, pushed_image: str) -> None:
        response = await agent.post("/deploy", json={"name": "t-nd", "image": pushed_image},
                                    headers={"Accept": "application/x-ndjson"})
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in (await response.text()).splitlines()]
        assert {"pull", "created", "started", "health"} <= {line.get("event") for line in lines}
        plain = await (await agent.post("/deploy", json={"name": "t-nd", "image": pushed_image})).json()
        assert set(lines[-1]) == set(plain) and lines[-1]["host"] == plain["host"]
        assert lines[-1]["already_running"] is False and plain["already_running"] is True

    async def test_bad_input_is_still_a_plain_400(self, agent: Client) -> None:
        response = await agent.post("/deploy", json={"name": "Bad"},
                                    headers={"Accept": "application/x-ndjson"})
        assert response.status == 400 and (await response.json())["error"] == "invalid_request"

    async def test_plain_json_stays_the_default(self, agent: Client) -> None:
        response = await agent.post("/deploy", json={"name": "t-nd-plain", "image": TEST_IMAGE})
        assert response.headers["Content-Type"].startswith("application/json")


class TestLogsEndpoint:
    """GET /services/{name}/logs: tail, follow, refusals."""

    async def test_tail(self, agent: Client) -> None:
        await agent.post("/deploy", json={"name": "t-logs", "image": TEST_IMAGE,
                                          "command": ["sh", "-c", "for i in 1 2 3 4 5; do echo line$i; done; "
                                                      "exec httpd -f -p 8000 -h /www"]})
        response = await agent.get("/services/t-logs/logs?tail=2")
        assert response.status == 200 and response.content_type == "text/plain"
        text = await response.text()
        assert "line5" in text or "response:200" in text
        assert "line1" not in text
        everything = await (await agent.get("/services/t-logs/logs")).text()
        assert "line1" in everything and "line5" in everything

    @pytest.mark.parametrize("query", ["tail=-1", "tail=x", "tail=999999999", "follow=maybe"])
    async def test_bad_query_is_400(self, agent: Client, query: str) -> None:
        await agent.post("/deploy", json={"name": "t-logs-q", "image": TEST_IMAGE})
        response = await agent.get(f"/services/t-logs-q/logs?{query}")
        assert response.status == 400 and (await response.json())["error"] == "invalid_request"

    async def test_unknown_service_is_404(self, agent: Client) -> None:
        assert (await agent.get("/services/t-none/logs")).status == 404


class TestComputeNodes:
    """ensure() finds or places a service across nodes, skipping dead ones."""

    def test_prepull_on_every_node_that_could_run_it(
        self, two_nodes: tuple[AgentProcess, AgentProcess, str], pushed_image: str
    ) -> None:
        small, big, dead = two_nodes
        on_disk = ["docker", "image", "inspect", pushed_image]
        with ComputeNodes([dead, small.url, big.url], probe_timeout=10) as nodes:
            # 40 GB: only the 80 GB node could ever run it (both share this engine, so the
            # answers say where it was pulled).
            pulled = nodes.prepull(manifest("t-pre", gpu=True, vram_gb=40, image=pushed_image))
            assert list(pulled) == [big.url]
            answer = pulled[big.url]
            assert isinstance(answer, dict) and answer["digest"].startswith("sha256:")
            assert subprocess.run(on_disk, capture_output=True).returncode == 0
            anywhere = nodes.prepull(manifest("t-pre", image=pushed_image))
            assert sorted(anywhere) == sorted([small.url, big.url])
        with AgentClient(small.url) as client:
            seen: list[dict[str, Any]] = []
            done = client.pull(pushed_image, seen.append)  # the sync client, with progress
            assert done["image"] == pushed_image and seen and seen[0]["event"] == "pull"
            with pytest.raises(ImageError):
                client.pull(f"{pushed_image.rsplit(':', 1)[0]}:absent")

    def test_places_where_it_fits_and_is_idempotent(
        self, two_nodes: tuple[AgentProcess, AgentProcess, str]
    ) -> None:
        small, big, dead = two_nodes
        with ComputeNodes([dead, small.url, big.url], probe_timeout=10) as nodes:
            first = nodes.ensure(manifest("t-multi", gpu=True, vram_gb=40))
            assert (first["node"], first["already_running"]) == (big.url, False)
            again = nodes.ensure(manifest("t-multi", gpu=True, vram_gb=40))
            assert (again["node"], again["already_running"], again["host"]) == (big.url, True, first["host"])
            found = nodes.find("t-multi")
            assert found is not None and found.node == big.url
            assert nodes.find("t-nowhere") is None

    def test_a_changed_spec_gets_the_agents_409(
        self, two_nodes: tuple[AgentProcess, AgentProcess, str]
    ) -> None:
        """ensure always asks the node that has it: a changed spec is never 'already running'."""
        small, big, _dead = two_nodes
        with ComputeNodes([small.url, big.url], probe_timeout=10) as nodes:
            first = nodes.ensure(manifest("t-drift", env={"V": "1"}))
            with pytest.raises(ConflictError) as conflict:
                nodes.ensure(manifest("t-drift", env={"V": "2"}))
            assert conflict.value.body["differing_fields"] == ["env"]
            assert conflict.value.node == first["node"]
            moved = nodes.ensure(manifest("t-drift", env={"V": "2"}), replace=True)
            assert (moved["node"], moved["already_running"]) == (first["node"], False)

    def test_gpu_service_goes_to_most_free_vram(
        self, two_nodes: tuple[AgentProcess, AgentProcess, str]
    ) -> None:
        small, big, _ = two_nodes
        with ComputeNodes([small.url, big.url]) as nodes:
            assert nodes.ensure(manifest("t-vram", gpu=True, vram_gb=8))["node"] == big.url

    def test_cpu_service_goes_to_fewest_services(
        self, two_nodes: tuple[AgentProcess, AgentProcess, str]
    ) -> None:
        small, big, _ = two_nodes
        with AgentClient(big.url) as agent:
            agent.deploy({"name": "t-busy", "image": TEST_IMAGE})
        with ComputeNodes([big.url, small.url]) as nodes:
            assert nodes.ensure(manifest("t-cpu"))["node"] == small.url

    def test_nothing_fits(self, two_nodes: tuple[AgentProcess, AgentProcess, str]) -> None:
        small, big, dead = two_nodes
        with ComputeNodes([dead, small.url, big.url], probe_timeout=10) as nodes, \
                pytest.raises(CapacityError):
            nodes.ensure(manifest("t-huge", gpu=True, vram_gb=200))

    def test_all_dead(self) -> None:
        with ComputeNodes([f"http://127.0.0.1:{free_port()}"], probe_timeout=0.5) as nodes, \
                pytest.raises(NodeUnreachable):
            nodes.ensure(manifest("t-dead"))

    async def test_async_variant(self, two_nodes: tuple[AgentProcess, AgentProcess, str]) -> None:
        small, big, dead = two_nodes
        async with AsyncComputeNodes([dead, small.url, big.url], probe_timeout=10) as nodes:
            placed = await nodes.ensure(manifest("t-async-multi", gpu=True, vram_gb=20))
            assert placed["node"] == big.url
            statuses = await nodes.status()
            assert [s["reachable"] for s in statuses] == [False, True, True]

    def test_from_env(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("COMPUTE_NODES", "http://a:9000, http://b:9000/")
        assert nodes_from_env() == ["http://a:9000", "http://b:9000"]
        assert ComputeNodes.from_env().urls == ["http://a:9000", "http://b:9000"]


class TestNeverTwice:
    """ensure() places one service on one node, whatever the node's answer does."""

    def test_slow_deploy_is_never_placed_on_another_node(
        self, two_nodes: tuple[AgentProcess, AgentProcess, str]
    ) -> None:
        import threading

        small, big, _ = two_nodes
        slow = manifest("t-twice", env={"DELAY": "4"})
        first = threading.Thread(target=lambda: AgentClient(small.url).deploy(slow), daemon=True)
        first.start()  # someone else's deploy, still waiting for health on `small`
        with AgentClient(small.url) as agent:
            for _ in range(200):
                if any(s.name == "t-twice" for s in agent.services()):
                    break
                time.sleep(0.02)
        with ComputeNodes([big.url, small.url], stall_timeout=1.0) as nodes, \
                pytest.raises(DeployInterrupted) as caught:
            nodes.ensure(slow)  # small answers nothing while the first deploy holds the name
        assert caught.value.node == small.url
        assert caught.value.body["service"]["status"] == "starting"
        with AgentClient(big.url) as agent:
            assert agent.services() == []  # not placed twice
        first.join(15)
        with ComputeNodes([big.url, small.url]) as nodes:
            assert nodes.ensure(slow)["node"] == small.url

    def test_live_but_unhealthy_service_is_redeployed_where_it_is(
        self, two_nodes: tuple[AgentProcess, AgentProcess, str]
    ) -> None:
        small, big, _ = two_nodes
        body = manifest("t-where")
        with AgentClient(small.url) as agent:
            agent.deploy(body)
        subprocess.run(["docker", "exec", "tidybot-t-where", "rm", "/www/health"], check=True)
        with AgentClient(small.url) as agent:
            for _ in range(100):
                if agent.service("t-where").status == "unhealthy":
                    break
                time.sleep(0.1)
            assert agent.service("t-where").status == "unhealthy"
        with ComputeNodes([big.url, small.url]) as nodes:
            assert nodes.find("t-where") is None  # find() means healthy, as before
            placed = nodes.ensure(body)  # big is emptier, but small has it: replaced there
        assert (placed["node"], placed["already_running"]) == (small.url, False)
        with AgentClient(big.url) as agent:
            assert agent.services() == []


class TestClientHygiene:
    """No session left unclosed; errors mapped to their own types."""

    def test_no_unclosed_sessions_even_without_close(self, node: AgentProcess) -> None:
        script = (
            "from deploy_agent.client import AgentClient, ComputeNodes\n"
            f"print(ComputeNodes([{node.url!r}, 'http://127.0.0.1:{free_port()}']).status()[0]['reachable'])\n"
            f"print(len(AgentClient({node.url!r}).services()))\n"
            f"body = {{'name': 't-hygiene', 'image': {TEST_IMAGE!r}}}\n"
            f"print(ComputeNodes([{node.url!r}]).ensure(body)['ok'])\n"
        )
        result = subprocess.run([sys.executable, "-X", "dev", "-W", "always", "-c", script],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert result.stdout.split() == ["True", "0", "True"]
        assert "Unclosed" not in result.stderr and "unclosed" not in result.stderr, result.stderr

    def test_429_and_pull_stalled_have_their_types(self) -> None:
        assert isinstance(error_from(429, {"error": "too_many_streams", "message": "m"}),
                          TooManyStreamsError)
        assert isinstance(error_from(504, {"error": "pull_stalled", "message": "m"}), PullStalledError)
        assert isinstance(error_from(504, {"error": "health_timeout", "message": "m"}),
                          HealthTimeoutError)
