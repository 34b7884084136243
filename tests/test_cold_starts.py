"""Cold starts on the real engine (#24): a private registry with TLS and a login, pulls ahead
of the call, the phases each deploy records. Caches are in test_caches.py."""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.agent_process import AgentProcess, AgentProcesses, get_json, post_json
from tests.conftest import TEST_IMAGE
from tests.private_registry import PrivateRegistry, private_registry
from tests.test_restarts import wait_until

pytestmark = pytest.mark.docker


@pytest.fixture(scope="module")
def lab_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRegistry]:
    if os.geteuid() != 0:
        pytest.skip("the private registry's bridge and CA need root (CI runs as root)")
    subprocess.run(["docker", "image", "inspect", TEST_IMAGE], check=True, capture_output=True)
    with private_registry(tmp_path_factory.mktemp("private-registry"), TEST_IMAGE) as registry:
        yield registry


@pytest.fixture
def forget_image(lab_registry: PrivateRegistry) -> Iterator[str]:
    """The private image, absent from the engine before and after the test."""
    subprocess.run(["docker", "rmi", "-f", lab_registry.image], capture_output=True)
    yield lab_registry.image
    subprocess.run(["docker", "rmi", "-f", lab_registry.image], capture_output=True)


def everything_said(agent: AgentProcess, *answers: Any) -> str:
    """Every answer, the agent's log, its events and its metrics, as one text."""
    with urllib.request.urlopen(agent.url + "/metrics", timeout=10) as response:
        metrics = response.read().decode()
    events = json.dumps(get_json(agent.url + "/events?limit=1000"))
    health = json.dumps(get_json(agent.url + "/health"))
    return "\n".join([json.dumps(answers), agent.log.read_text(), events, metrics, health])


def secrets_of(password: str) -> list[str]:
    """The password as itself and in the encodings a careless log line would show."""
    return [password, base64.b64encode(password.encode()).decode()[:16],
            base64.b64encode(f"lab:{password}".encode()).decode()]


def deploy_private(agent: AgentProcess, image: str, name: str = "t-private") -> tuple[int, Any]:
    return post_json(agent.url + "/deploy", {"name": name, "image": image, "ready_timeout": 30})


class TestPrivateRegistry:
    """Against a registry with TLS and a login, on a non-loopback address."""

    def test_denied_before_docker_login_deployed_after(self, agent_processes: AgentProcesses,
                                                       lab_registry: PrivateRegistry,
                                                       forget_image: str, tmp_path: Path) -> None:
        docker_config = tmp_path / "agent-docker"
        agent = agent_processes.start(env={"DOCKER_CONFIG": str(docker_config)})
        status, denied = deploy_private(agent, forget_image)
        assert (status, denied["error"], denied["registry"], denied["credentials_sent"]) == (
            403, "registry_denied", lab_registry.host, False), denied
        assert "docker login" in denied["message"]
        assert agent.services() == {}

        lab_registry.login(docker_config)  # the operator logs in as the agent's user
        status, deployed = deploy_private(agent, forget_image)
        assert status == 200, deployed
        said = everything_said(agent, denied, deployed)
        assert not any(secret in said for secret in secrets_of(lab_registry.password))

    def test_a_wrong_password_is_403_and_never_repeated(self, agent_processes: AgentProcesses,
                                                        lab_registry: PrivateRegistry,
                                                        forget_image: str, tmp_path: Path) -> None:
        wrong = "wrong-" + lab_registry.password[::-1]
        config = tmp_path / "wrong.json"
        config.write_text(json.dumps({"auths": {f"https://{lab_registry.host}": {
            "auth": base64.b64encode(f"lab:{wrong}".encode()).decode()}}}))
        agent = agent_processes.start("--registry-auth", str(config), env={"HOME": str(tmp_path)})
        status, denied = deploy_private(agent, forget_image)
        assert (status, denied["error"], denied["credentials_sent"]) == (
            403, "registry_denied", True), denied
        status, pulled = post_json(agent.url + "/images/pull", {"image": forget_image})
        assert (status, pulled["error"]) == (403, "registry_denied")
        said = everything_said(agent, denied, pulled)
        assert not any(secret in said for secret in secrets_of(wrong))

    def test_a_credential_helper_and_a_missing_one(self, agent_processes: AgentProcesses,
                                                   lab_registry: PrivateRegistry,
                                                   forget_image: str, tmp_path: Path) -> None:
        asked = tmp_path / "asked"
        helper = tmp_path / "bin" / "docker-credential-standin"
        helper.parent.mkdir()
        helper.write_text(f"#!/bin/sh\nread server\necho \"$server\" >> {asked}\n"
                          f"echo '{{\"Username\":\"{lab_registry.user}\","
                          f"\"Secret\":\"{lab_registry.password}\"}}'\n")
        helper.chmod(helper.stat().st_mode | stat.S_IXUSR)
        docker_config = tmp_path / "helped"
        docker_config.mkdir()
        (docker_config / "config.json").write_text(json.dumps({"credHelpers": {
            lab_registry.host: "standin"}}))
        path = f"{helper.parent}:{os.environ['PATH']}"
        agent = agent_processes.start(env={"DOCKER_CONFIG": str(docker_config), "PATH": path})
        status, deployed = deploy_private(agent, forget_image)
        assert status == 200, deployed
        assert asked.read_text().split() == [lab_registry.host]
        assert get_json(agent.url + "/health")["warnings"] == []

        (docker_config / "config.json").write_text(json.dumps({"credsStore": "not-installed"}))
        post_json(agent.url + "/stop", {"name": "t-private"})
        subprocess.run(["docker", "rmi", "-f", forget_image], capture_output=True)
        status, denied = deploy_private(agent, forget_image)
        assert (status, denied["error"], denied["credentials_sent"]) == (403, "registry_denied", False)
        warnings = get_json(agent.url + "/health")["warnings"]
        assert [w["code"] for w in warnings] == ["registry_credentials"]
        assert "docker-credential-not-installed" in warnings[0]["message"]
        said = everything_said(agent, deployed, denied)
        assert not any(secret in said for secret in secrets_of(lab_registry.password))


def pull(agent: AgentProcess, image: str) -> list[dict[str, Any]]:
    """POST /images/pull as NDJSON: every line."""
    request = urllib.request.Request(agent.url + "/images/pull", data=json.dumps({"image": image}).encode(),
                                     headers={"Content-Type": "application/json",
                                              "Accept": "application/x-ndjson"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return [json.loads(line) for line in response.read().splitlines() if line.strip()]


def repush(image: str, registry_root: Path) -> None:
    """Push a different image under the same tag: the tag moves in the registry."""
    context = registry_root / f"moved-{time.monotonic_ns()}"
    context.mkdir()
    (context / "blob").write_bytes(os.urandom(256 * 1024))
    (context / "Dockerfile").write_text(f"FROM {TEST_IMAGE}\nCOPY blob /moved\n")
    for command in (["docker", "build", "-q", "-t", image, str(context)], ["docker", "push", image]):
        subprocess.run(command, check=True, capture_output=True, timeout=120)


def image_id(image: str) -> str:
    return subprocess.run(["docker", "image", "inspect", "-f", "{{.Id}}", image],
                          capture_output=True, text=True, check=True).stdout.strip()


def digest_on_engine(image: str) -> str:
    found = subprocess.run(["docker", "image", "inspect", "-f", "{{json .RepoDigests}}", image],
                           capture_output=True, text=True, check=True).stdout
    return str(json.loads(found)[0].split("@", 1)[1])


class TestPullAhead:
    """POST /images/pull, GET /images, --prepull."""

    def test_pulled_ahead_then_deployed_without_pulling(self, agent_processes: AgentProcesses,
                                                        pushed_image: str) -> None:
        agent = agent_processes.start()
        lines = pull(agent, pushed_image)
        assert any(line.get("event") == "pull" and line.get("total") for line in lines), lines
        final = lines[-1]
        assert (final["ok"], final["image"]) == (True, pushed_image)
        assert final["digest"] == digest_on_engine(pushed_image) and final["size_bytes"] > 2 * 1024**2

        status, deployed = post_json(agent.url + "/deploy", {"name": "t-prepulled", "image": pushed_image})
        assert status == 200, deployed
        cold = get_json(agent.url + "/services/t-prepulled")["cold_start"]
        assert cold["pulled"] is False and cold["pull_s"] < 1.0, cold
        assert cold["start_s"] > 0 and cold["healthy_s"] >= 0
        listed = {image["reference"]: image for image in get_json(agent.url + "/images")}
        entry = listed[pushed_image]
        assert entry["services"] == ["t-prepulled"] and entry["last_deployed"] is not None
        assert entry["digest"] == final["digest"] and entry["cold_start"] == cold

        agent.stop()
        agent.start()  # the records outlive the agent
        again = {image["reference"]: image for image in get_json(agent.url + "/images")}
        assert again[pushed_image]["services"] == ["t-prepulled"]
        assert again[pushed_image]["last_deployed"] == entry["last_deployed"]

    def test_a_pull_refreshes_a_moved_tag_a_deploy_does_not(self, agent_processes: AgentProcesses,
                                                            pushed_image: str, tmp_path: Path) -> None:
        agent = agent_processes.start()
        first = pull(agent, pushed_image)[-1]["digest"]
        old_id = image_id(pushed_image)
        repush(pushed_image, tmp_path)  # the registry's tag moves on
        subprocess.run(["docker", "tag", old_id, pushed_image], check=True)  # the node keeps the old
        status, _ = post_json(agent.url + "/deploy", {"name": "t-moved", "image": pushed_image})
        assert status == 200
        assert get_json(agent.url + "/services/t-moved")["cold_start"]["pulled"] is False
        running = subprocess.run(["docker", "inspect", "-f", "{{.Image}}", "tidybot-t-moved"],
                                 capture_output=True, text=True, check=True).stdout.strip()
        assert running == old_id  # a deploy pulls only what is missing

        moved = pull(agent, pushed_image)[-1]["digest"]
        assert moved != first and image_id(pushed_image) != old_id  # a pull asks the registry

    def test_policy_and_bad_input(self, agent_processes: AgentProcesses, pushed_image: str) -> None:
        agent = agent_processes.start("--allow-image", "deploy-agent-test/*")
        status, refused = post_json(agent.url + "/images/pull", {"image": pushed_image})
        assert (status, refused["error"]) == (403, "image_not_allowed")
        assert subprocess.run(["docker", "image", "inspect", pushed_image],
                              capture_output=True).returncode != 0  # never pulled
        for body in ({}, {"image": ""}, {"image": "UPPER/case"}, {"image": "x", "extra": 1}, ["x"]):
            status, bad = post_json(agent.url + "/images/pull", body)
            assert (status, bad["error"]) == (400, "invalid_request"), body
        listed = [image["reference"] for image in get_json(agent.url + "/images")]
        assert TEST_IMAGE in listed and all(ref.startswith("deploy-agent-test/") for ref in listed)

    def test_missing_image_is_422(self, agent_processes: AgentProcesses, registry: str) -> None:
        agent = agent_processes.start()
        status, missing = post_json(agent.url + "/images/pull",
                                    {"image": f"{registry}/deploy-agent-test/absent:1"})
        assert (status, missing["error"]) == (422, "image_not_found")

    def test_prepull_at_start_up_in_the_background(self, agent_processes: AgentProcesses,
                                                   pushed_image: str, registry: str) -> None:
        absent = f"{registry}/deploy-agent-test/never:1"
        agent = agent_processes.start("--prepull", pushed_image, "--prepull", absent)
        wait_until(lambda: subprocess.run(["docker", "image", "inspect", pushed_image],
                                          capture_output=True).returncode == 0, timeout=60)
        wait_until(lambda: any(w["code"] == "prepull_failed"
                               for w in get_json(agent.url + "/health")["warnings"]), timeout=30)
        warning = next(w for w in get_json(agent.url + "/health")["warnings"]
                       if w["code"] == "prepull_failed")
        assert absent in warning["message"] and pushed_image not in warning["message"]


class TestColdStartPhases:
    def test_recorded_shown_and_measured(self, agent_processes: AgentProcesses, pushed_image: str) -> None:
        agent = agent_processes.start()
        started = time.monotonic()
        status, deployed = post_json(agent.url + "/deploy", {"name": "t-cold", "image": pushed_image})
        took = time.monotonic() - started
        assert status == 200, deployed
        cold = get_json(agent.url + "/services/t-cold")["cold_start"]
        assert cold["pulled"] is True and cold["pull_s"] > 0
        assert 0 < cold["pull_s"] + cold["start_s"] + cold["healthy_s"] <= took
        with urllib.request.urlopen(agent.url + "/metrics", timeout=10) as response:
            metrics = response.read().decode()
        for phase in ("pull", "start", "healthy"):
            assert f'deploy_agent_cold_start_seconds_count{{phase="{phase}"}} 1.0' in metrics
        status, again = post_json(agent.url + "/deploy", {"name": "t-cold", "image": pushed_image})
        assert again["already_running"] is True  # no new cold start
        assert get_json(agent.url + "/services/t-cold")["cold_start"] == cold


def test_swarm_refuses_to_pull_ahead() -> None:
    """The swarm backend's image store says so instead of pulling onto the manager only."""
    import asyncio

    from deploy_agent.convert import make_converter
    from deploy_agent.errors import NotSupported
    from deploy_agent.images import ImageStore
    from tests.conftest import make_config

    class NoEngine:
        credentials = None

        async def pull(self, ref: str, on_progress: Any) -> None:
            raise AssertionError("never pulled")

    store = ImageStore(NoEngine(), make_config(Path("/tmp")), make_converter(),  # type: ignore[arg-type]
                       can_pull=False)
    with pytest.raises(NotSupported) as refused:
        asyncio.run(store.pull("registry.lab/x:1", lambda step: None))
    assert refused.value.status == 501 and "first deploy" in refused.value.message
