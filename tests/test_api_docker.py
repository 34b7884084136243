"""The HTTP API against the real Docker engine: real containers, ports, registry pulls."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import aiodocker
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from deploy_agent.app import create_app
from tests.conftest import TEST_IMAGE, make_config

pytestmark = pytest.mark.docker

Client = TestClient[web.Request, web.Application]


async def deploy(client: Client, **body: Any) -> tuple[int, dict[str, Any]]:
    body.setdefault("image", TEST_IMAGE)
    response = await client.post("/deploy", json=body)
    return response.status, await response.json()


async def stop(client: Client, name: str) -> tuple[int, dict[str, Any]]:
    response = await client.post("/stop", json={"name": name})
    return response.status, await response.json()


def test_containers() -> list[str]:
    """Names of every container a test could have created, running or not."""
    out = subprocess.run(["docker", "ps", "-a", "--format", "{{.Names}}",
                          "--filter", "name=^/tidybot-t-"], capture_output=True, text=True,
                         check=True).stdout
    return sorted(out.split())


test_containers.__test__ = False  # type: ignore[attr-defined]


async def inspect(docker: aiodocker.Docker, name: str) -> dict[str, Any]:
    info: dict[str, Any] = await docker.containers.container(f"tidybot-{name}").show()
    return info


async def wait_for(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


class TestShapes:
    """Each endpoint answers with the spec's shape."""

    async def test_health(self, agent: Client) -> None:
        response = await agent.get("/health")
        body = await response.json()
        assert response.status == 200
        assert body["status"] == "ok" and body["engine"] == "reachable"
        assert body["gpus"] == 0 and body["services_running"] == 0 and body["hostname"]

    async def test_deploy_services_and_single_service(self, agent: Client) -> None:
        status, answer = await deploy(agent, name="t-shape")
        assert status == 200, answer
        assert answer == {"ok": True, "name": "t-shape", "host": f"http://127.0.0.1:{answer['port']}",
                          "port": answer["port"], "gpu": None, "status": "healthy",
                          "already_running": False}
        listing = await (await agent.get("/services")).json()
        assert [entry["name"] for entry in listing] == ["t-shape"]
        entry = listing[0]
        for key in ("name", "host", "port", "gpu", "status", "uptime", "image"):
            assert key in entry
        assert entry["image"] == TEST_IMAGE and entry["status"] == "healthy"
        assert isinstance(entry["uptime"], int)
        single = await agent.get("/services/t-shape")
        assert single.status == 200 and (await single.json())["host"] == answer["host"]
        health = await (await agent.get("/health")).json()
        assert health["services_running"] == 1

    async def test_deployed_host_answers_health(self, agent: Client) -> None:
        _, answer = await deploy(agent, name="t-reach")
        async with agent.session.get(f"{answer['host']}/health") as response:
            assert response.status == 200

    async def test_unknown_service_is_404(self, agent: Client) -> None:
        response = await agent.get("/services/t-nothing")
        assert response.status == 404
        assert (await response.json())["error"] == "not_found"

    async def test_gpus_is_empty_without_gpus(self, agent: Client) -> None:
        assert await (await agent.get("/gpus")).json() == []

    async def test_gpu_deploy_is_503_no_gpu(self, agent: Client) -> None:
        status, answer = await deploy(agent, name="t-gpu", gpu=True, vram_gb=8)
        assert (status, answer["error"]) == (503, "no_gpu")
        assert test_containers() == []


class TestDeployFlow:
    """A deploy creates tidybot-{name} as asked: labels, port, env, volumes, command, restart."""

    async def test_container_is_configured_from_the_spec(
        self, agent: Client, docker: aiodocker.Docker
    ) -> None:
        volume = f"t-models-{time.monotonic_ns()}"
        try:
            status, answer = await deploy(
                agent, name="t-flow", env={"MODEL": "yolo.pt", "DEBUG": True},
                volumes=[f"{volume}:/models:ro"],
                command="sh -c 'echo started; exec httpd -f -p 8000 -h /www'",
            )
            assert status == 200, answer
            info = await inspect(docker, "t-flow")
            assert "MODEL=yolo.pt" in info["Config"]["Env"] and "DEBUG=true" in info["Config"]["Env"]
            assert info["Config"]["Cmd"] == ["sh", "-c", "echo started; exec httpd -f -p 8000 -h /www"]
            assert info["HostConfig"]["RestartPolicy"]["Name"] == "unless-stopped"
            assert info["HostConfig"]["PortBindings"]["8000/tcp"][0]["HostPort"] == str(answer["port"])
            assert info["Mounts"][0]["Name"] == f"tidybot-default-{volume}"  # the agent's own
            assert info["Mounts"][0]["RW"] is False
            labels = info["Config"]["Labels"]
            assert labels["tidybot.deploy-agent"] == "default"
            assert json.loads(labels["tidybot.spec"])["env"]["MODEL"] == "yolo.pt"
            assert labels["tidybot.host-port"] == str(answer["port"])
            assert info["HostConfig"]["Privileged"] is False
        finally:
            await stop(agent, "t-flow")
            subprocess.run(["docker", "volume", "rm", "-f", f"tidybot-default-{volume}"],
                           capture_output=True)

    async def test_preferred_port_is_used_when_free(self, agent: Client) -> None:
        status, answer = await deploy(agent, name="t-pref", port=28050, env={"PORT": 28050})
        assert (status, answer["port"]) == (200, 28050)

    async def test_next_port_when_preferred_is_bound_on_host(self, agent: Client) -> None:
        with socket.socket() as squatter:
            squatter.bind(("0.0.0.0", 28060))
            squatter.listen()
            status, answer = await deploy(agent, name="t-next", port=28060, env={"PORT": 28060})
        assert (status, answer["port"]) == (200, 28061)

    async def test_host_path_outside_allowed_roots_is_403(self, agent: Client) -> None:
        status, answer = await deploy(agent, name="t-mount", volumes=["/etc:/host-etc"])
        assert (status, answer["error"]) == (403, "mount_not_allowed")
        assert test_containers() == []

    async def test_twenty_sequential_deploys_get_distinct_ports(self, agent: Client) -> None:
        ports = []
        for i in range(20):
            status, answer = await deploy(agent, name=f"t-seq-{i}")
            assert status == 200, answer
            ports.append(answer["port"])
        assert len(set(ports)) == 20
        assert len(await (await agent.get("/services")).json()) == 20
        for i in range(20):
            assert (await stop(agent, f"t-seq-{i}"))[0] == 200
        assert test_containers() == []
        assert await (await agent.get("/services")).json() == []

    async def test_stop_removes_and_frees_the_port(self, agent: Client) -> None:
        _, first = await deploy(agent, name="t-stop")
        status, answer = await stop(agent, "t-stop")
        assert (status, answer) == (200, {"ok": True, "name": "t-stop"})
        assert test_containers() == []
        _, again = await deploy(agent, name="t-stop2")
        assert again["port"] == first["port"]

    async def test_stop_unknown_is_404(self, agent: Client) -> None:
        status, answer = await stop(agent, "t-never")
        assert (status, answer["error"]) == (404, "not_found")

    async def test_state_file_records_the_service(self, agent: Client, agent_config: Any) -> None:
        await deploy(agent, name="t-state", env={"SECRET": "x"})
        document = json.loads((agent_config.state_dir / "services.json").read_text())
        assert document["version"] == 1
        assert [s["spec"]["name"] for s in document["services"]] == ["t-state"]
        assert (agent_config.state_dir / "services.json").stat().st_mode & 0o077 == 0


class TestIdempotency:
    """Same spec -> already running; different -> 409 unless replace; broken -> replaced."""

    async def test_same_spec_is_already_running(self, agent: Client) -> None:
        _, first = await deploy(agent, name="t-idem", env={"A": "1"})
        status, second = await deploy(agent, name="t-idem", env={"A": 1})
        assert status == 200 and second["already_running"] is True
        assert second["host"] == first["host"]

    async def test_nested_manifest_matches_flat_deploy(self, agent: Client) -> None:
        await deploy(agent, name="t-nest", port=8000)
        response = await agent.post("/deploy", json={
            "name": "t-nest", "version": "1", "requires": {"gpu": False},
            "deploy": {"image": TEST_IMAGE, "port": 8000}, "client": "client.py"})
        assert (await response.json())["already_running"] is True

    async def test_different_spec_is_409_naming_fields(
        self, agent: Client, docker: aiodocker.Docker
    ) -> None:
        await deploy(agent, name="t-diff")
        before = (await inspect(docker, "t-diff"))["Id"]
        status, answer = await deploy(agent, name="t-diff", env={"X": "1"}, health="/health")
        assert (status, answer["error"], answer["differing_fields"]) == (409, "conflict", ["env"])
        assert (await inspect(docker, "t-diff"))["Id"] == before

    async def test_replace_true_replaces(self, agent: Client, docker: aiodocker.Docker) -> None:
        await deploy(agent, name="t-repl")
        before = (await inspect(docker, "t-repl"))["Id"]
        status, answer = await deploy(agent, name="t-repl", env={"X": "1"}, replace=True)
        assert status == 200 and answer["already_running"] is False
        info = await inspect(docker, "t-repl")
        assert info["Id"] != before and "X=1" in info["Config"]["Env"]
        assert test_containers() == ["tidybot-t-repl"]

    async def test_exited_service_is_replaced(self, agent: Client, docker: aiodocker.Docker) -> None:
        await deploy(agent, name="t-dead")
        before = (await inspect(docker, "t-dead"))["Id"]
        await docker.containers.container(before).stop(t=0)

        async def shows_exited() -> bool:
            entry = await (await agent.get("/services/t-dead")).json()
            return bool(entry["status"] == "exited")

        await wait_for(shows_exited)
        status, answer = await deploy(agent, name="t-dead")
        assert status == 200 and answer["already_running"] is False
        assert (await inspect(docker, "t-dead"))["Id"] != before

    async def test_unhealthy_service_is_replaced(self, agent: Client, docker: aiodocker.Docker) -> None:
        await deploy(agent, name="t-sick")
        before = (await inspect(docker, "t-sick"))["Id"]
        subprocess.run(["docker", "exec", "tidybot-t-sick", "rm", "/www/health"], check=True)

        async def shows_unhealthy() -> bool:
            entry = await (await agent.get("/services/t-sick")).json()
            return bool(entry["status"] == "unhealthy")

        await wait_for(shows_unhealthy, timeout=10)
        status, answer = await deploy(agent, name="t-sick")
        assert (status, answer["already_running"], answer["status"]) == (200, False, "healthy")
        assert (await inspect(docker, "t-sick"))["Id"] != before


class TestConcurrency:
    """Parallel requests never share a port, duplicate a container, or leak one."""

    async def test_eight_deploys_of_one_name(self, agent: Client) -> None:
        results = await asyncio.gather(*(deploy(agent, name="t-race") for _ in range(8)))
        assert [status for status, _ in results] == [200] * 8
        assert sorted(a["already_running"] for _, a in results) == [False] + [True] * 7
        assert len({a["host"] for _, a in results}) == 1
        assert test_containers() == ["tidybot-t-race"]

    async def test_eight_names_same_preferred_port(self, agent: Client) -> None:
        results = await asyncio.gather(*(deploy(agent, name=f"t-par-{i}") for i in range(8)))
        assert [status for status, _ in results] == [200] * 8
        assert {a["status"] for _, a in results} == {"healthy"}
        assert len({a["port"] for _, a in results}) == 8
        for _, answer in results:
            async with agent.session.get(f"{answer['host']}/health") as response:
                assert response.status == 200
        stops = await asyncio.gather(*(stop(agent, f"t-par-{i}") for i in range(8)))
        assert [status for status, _ in stops] == [200] * 8
        assert test_containers() == []
        assert await (await agent.get("/services")).json() == []


class TestBadInput:
    """Bad requests get a JSON 4xx, create nothing, and the agent keeps serving."""

    @pytest.mark.parametrize("body", [
        {"image": TEST_IMAGE}, {"name": "t-x"}, {"name": "T-X", "image": TEST_IMAGE},
        {"name": "t/x", "image": TEST_IMAGE}, {"name": "..", "image": TEST_IMAGE},
        {"name": "t x", "image": TEST_IMAGE}, {"name": "t" * 64, "image": TEST_IMAGE},
        {"name": "t-x", "image": TEST_IMAGE, "port": 70000},
        {"name": "t-x", "image": TEST_IMAGE, "port": "80"},
        {"name": "t-x", "image": TEST_IMAGE, "gpu": "yes"},
        {"name": "t-x", "image": TEST_IMAGE, "vram_gb": -2},
        {"name": "t-x", "image": TEST_IMAGE, "env": "A=1"},
        {"name": "t-x", "image": TEST_IMAGE, "env": {"A": {"B": 1}}},
        {"name": "t-x", "image": TEST_IMAGE, "volumes": [1]},
        {"name": "t-x", "image": TEST_IMAGE, "health": "health"},
        {"name": "t-x", "image": TEST_IMAGE, "ready_timeout": 0},
        {"name": "t-x", "image": ""},
        {"name": "t-x", "image": TEST_IMAGE, "unknown": 1},
        [1, 2], "text", 3,
    ])
    async def test_invalid_body_is_400_with_details(self, agent: Client, body: Any) -> None:
        response = await agent.post("/deploy", json=body)
        answer = await response.json()
        assert response.status == 400, answer
        assert answer["ok"] is False and answer["error"] == "invalid_request" and answer["details"]
        assert test_containers() == []
        assert (await agent.get("/health")).status == 200

    async def test_non_json_body_is_400(self, agent: Client) -> None:
        response = await agent.post("/deploy", data=b"{not json",
                                    headers={"Content-Type": "application/json"})
        assert response.status == 400 and (await response.json())["error"] == "invalid_request"

    async def test_body_over_1_mib_is_413(self, agent: Client) -> None:
        big = json.dumps({"name": "t-big", "image": TEST_IMAGE, "env": {"A": "x" * (1 << 20)}})
        response = await agent.post("/deploy", data=big, headers={"Content-Type": "application/json"})
        assert response.status == 413 and (await response.json())["error"] == "body_too_large"
        assert test_containers() == []

    async def test_unknown_path_and_wrong_method_are_json(self, agent: Client) -> None:
        missing = await agent.get("/nope")
        assert missing.status == 404 and (await missing.json())["error"] == "not_found"
        wrong = await agent.get("/deploy")
        assert wrong.status == 405 and (await wrong.json())["error"] == "method_not_allowed"


class TestFailures:
    """Failures are typed, fast, and leave no container behind."""

    async def test_missing_image_is_422_naming_it(self, agent: Client, registry: str) -> None:
        image = f"{registry}/deploy-agent-test/absent:1"
        status, answer = await deploy(agent, name="t-noimg", image=image)
        assert (status, answer["error"], answer["image"]) == (422, "image_not_found", image)
        assert image in answer["message"]
        assert test_containers() == []

    async def test_exit_at_start_is_502_at_once(self, agent: Client) -> None:
        started = time.monotonic()
        status, answer = await deploy(
            agent, name="t-crash", ready_timeout=60,
            command=["sh", "-c", "echo loading model; sleep 0.5; echo out of memory >&2; exit 3"])
        elapsed = time.monotonic() - started
        assert (status, answer["error"], answer["exit_code"]) == (502, "container_exited", 3)
        assert "out of memory" in answer["logs"] and "loading model" in answer["logs"]
        assert elapsed < 30  # not the 60 s ready_timeout: the exit ended the wait
        assert test_containers() == []

    async def test_health_timeout_is_504_with_logs(self, agent: Client) -> None:
        status, answer = await deploy(agent, name="t-slow", health="/missing", ready_timeout=1)
        assert (status, answer["error"]) == (504, "health_timeout")
        assert any("response:404" in line for line in answer["logs"]), answer
        assert test_containers() == []

    async def test_slow_start_is_answered_once_healthy(self, agent: Client) -> None:
        status, answer = await deploy(agent, name="t-late", env={"DELAY": "1.5"}, ready_timeout=10)
        assert (status, answer["status"]) == (200, "healthy")

    async def test_pull_from_local_registry(
        self, agent: Client, pushed_image: str, docker: aiodocker.Docker
    ) -> None:
        with pytest.raises(aiodocker.DockerError):
            await docker.images.inspect(pushed_image)
        status, answer = await deploy(agent, name="t-pull", image=pushed_image)
        assert status == 200, answer
        assert (await docker.images.inspect(pushed_image))["Id"]


class TestEngineUnreachable:
    """With no engine the agent keeps serving, says so, and refuses deploys with 503."""

    async def test_health_and_deploy(self, aiohttp_client: Any, tmp_path: Path) -> None:
        config = make_config(tmp_path, docker_host=f"unix://{tmp_path}/no-docker.sock")
        client = await aiohttp_client(create_app(config))
        health = await (await client.get("/health")).json()
        assert (health["status"], health["engine"]) == ("degraded", "unreachable")
        status, answer = await deploy(client, name="t-noengine")
        assert (status, answer["error"]) == (503, "engine_unavailable")
        assert (await client.get("/services")).status == 200
