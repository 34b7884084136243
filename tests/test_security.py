"""Auth, deploy policy and secrecy: who may do what, and what never leaks."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
from pathlib import Path
from typing import Any

import aiodocker
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from deploy_agent.app import create_app
from deploy_agent.auth import settle_auth
from deploy_agent.config import parse_config
from deploy_agent.tokens import load_or_create
from tests.conftest import TEST_IMAGE, make_config, remove_test_containers
from tests.test_api_docker import deploy, test_containers

TOKEN = "tok-0123456789abcdef"
Client = TestClient[web.Request, web.Application]


@pytest.fixture
async def guarded(aiohttp_client: Any, tmp_path: Path, test_image: str) -> Any:
    """An agent with a token and an image allowlist that admits only the test images."""
    config = make_config(tmp_path / "state", token=TOKEN, allow_images=("deploy-agent-test/*",),
                         max_ready_timeout=1.0)
    config.state_dir.mkdir()
    remove_test_containers()
    client = await aiohttp_client(create_app(config))
    client.session.headers["Authorization"] = f"Bearer {TOKEN}"
    yield client
    remove_test_containers()


class TestBearerToken:
    """With a token, only GET /health is open; the rest needs 'Authorization: Bearer'."""

    @pytest.mark.parametrize("header", [None, "Bearer wrong", f"Basic {TOKEN}", "Bearer", TOKEN,
                                        f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}"])
    @pytest.mark.parametrize(("method", "path"), [
        ("GET", "/services"), ("GET", "/services/x"), ("POST", "/deploy"), ("POST", "/stop"),
        ("GET", "/gpus"), ("GET", "/openapi.json"),
    ])
    async def test_missing_or_wrong_token_is_401(
        self, aiohttp_client: Any, tmp_path: Path, method: str, path: str, header: str | None
    ) -> None:
        client = await aiohttp_client(create_app(make_config(tmp_path, token=TOKEN)))
        headers = {"Authorization": header} if header else {}
        response = await client.request(method, path, headers=headers, json={"name": "t-x"})
        assert response.status == 401
        assert (await response.json())["error"] == "unauthorized"
        assert response.headers["WWW-Authenticate"] == "Bearer"

    @pytest.mark.docker
    async def test_refused_deploy_creates_nothing(self, aiohttp_client: Any, tmp_path: Path,
                                                  test_image: str) -> None:
        remove_test_containers()
        client = await aiohttp_client(create_app(make_config(tmp_path, token=TOKEN)))
        response = await client.post("/deploy", json={"name": "t-x", "image": TEST_IMAGE})
        assert response.status == 401
        assert test_containers() == []

    async def test_the_page_is_open_and_holds_no_data(self, aiohttp_client: Any, tmp_path: Path) -> None:
        client = await aiohttp_client(create_app(make_config(tmp_path, token=TOKEN)))
        for path, kind in (("/", "text/html"), ("/static/app.js", "text/javascript"),
                           ("/static/style.css", "text/css"), ("/static/favicon.svg", "image/svg+xml")):
            response = await client.get(path)
            assert response.status == 200 and response.content_type == kind, path
            assert "default-src 'none'" in response.headers["Content-Security-Policy"]
        missing = await client.get("/static/secrets.json")
        assert missing.status == 404 and missing.content_type == "text/plain"
        assert (await client.get("/services")).status == 401  # the data still needs the token

    async def test_health_is_open(self, aiohttp_client: Any, tmp_path: Path) -> None:
        client = await aiohttp_client(create_app(make_config(tmp_path, token=TOKEN)))
        assert (await client.get("/health")).status == 200

    @pytest.mark.docker
    async def test_right_token_works(self, guarded: Client) -> None:
        assert (await guarded.get("/services")).status == 200
        status, answer = await deploy(guarded, name="t-authed")
        assert status == 200, answer

    @pytest.mark.docker
    async def test_token_never_logged(self, guarded: Client, caplog: pytest.LogCaptureFixture) -> None:
        caplog.set_level(logging.DEBUG)
        await deploy(guarded, name="t-logged")
        await guarded.get("/services", headers={"Authorization": "Bearer wrong-" + TOKEN})
        await guarded.post("/stop", json={"name": "t-logged"})
        assert caplog.records and TOKEN not in caplog.text

    def test_token_not_in_config_repr(self) -> None:
        assert TOKEN not in repr(make_config(Path("/tmp"), token=TOKEN))


class TestSettleAuth:
    """Beyond loopback a token is made and required; --no-auth is the loud way to run open."""

    @pytest.mark.parametrize(("host", "required"), [
        ("0.0.0.0", True), ("10.0.0.5", True), ("::", True),
        ("127.0.0.1", False), ("localhost", False), ("::1", False),
    ])
    def test_token_made_only_beyond_loopback(self, tmp_path: Path, host: str, required: bool) -> None:
        config = settle_auth(make_config(tmp_path, host=host))
        assert (config.auth == "token") is required
        assert (tmp_path / "token").exists() is required

    def test_made_once_0600_and_reused(self, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
        caplog.set_level(logging.DEBUG)
        first = settle_auth(make_config(tmp_path, host="0.0.0.0")).token
        assert first and len(first) >= 40
        assert (tmp_path / "token").stat().st_mode & 0o777 == 0o600
        assert (tmp_path / "token").stat().st_uid == os.geteuid()
        (tmp_path / "token").chmod(0o644)  # widened by someone: narrowed again on use
        assert settle_auth(make_config(tmp_path, host="0.0.0.0")).token == first
        assert (tmp_path / "token").stat().st_mode & 0o777 == 0o600
        assert str(tmp_path / "token") in caplog.text and first not in caplog.text

    def test_configured_token_applies_on_loopback_too(self, tmp_path: Path) -> None:
        config = settle_auth(make_config(tmp_path, host="127.0.0.1", token=TOKEN))
        assert (config.auth, config.token) == ("token", TOKEN)
        assert not (tmp_path / "token").exists()

    def test_no_auth_is_open_and_loud(self, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
        caplog.set_level(logging.WARNING)
        config = settle_auth(make_config(tmp_path, host="0.0.0.0", no_auth=True))
        assert config.auth == "off" and not (tmp_path / "token").exists()
        assert "NO AUTHENTICATION" in caplog.text

    def test_no_auth_with_a_token_is_refused(self, tmp_path: Path) -> None:
        (tmp_path / "t").write_text("abc\n")
        with pytest.raises(SystemExit, match="contradict"):
            parse_config(["--no-auth", "--token-file", str(tmp_path / "t")], {})

    def test_half_written_token_files_never_happen(self, tmp_path: Path) -> None:
        """Many agents racing on one state dir agree on one whole token."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(8) as pool:
            tokens = set(pool.map(lambda _: load_or_create(tmp_path)[0], range(16)))
        assert len(tokens) == 1 and (tmp_path / "token").read_text().strip() in tokens
        assert [p.name for p in tmp_path.iterdir()] == ["token"]


@pytest.mark.docker
class TestDeployPolicy:
    """Refusals are 403 and create nothing; what is allowed still works."""

    @pytest.mark.parametrize("source", [
        "/", "/var/run/docker.sock", "/run/docker.sock", "/etc", "/etc/ssl", "/proc", "/sys",
        "/dev", "/boot", "/root", "/var/lib/docker", "/var", "/tmp/../etc", "/home",
    ])
    async def test_host_mount_refused(self, guarded: Client, source: str) -> None:
        status, answer = await deploy(guarded, name="t-mount", volumes=[f"{source}:/data"])
        assert (status, answer["error"]) == (403, "mount_not_allowed"), answer
        assert test_containers() == []

    async def test_named_volume_still_works(self, guarded: Client) -> None:
        volume = "t-policy-models"
        try:
            status, answer = await deploy(guarded, name="t-named", volumes=[f"{volume}:/models"])
            assert status == 200, answer
        finally:
            remove_test_containers()
            subprocess.run(["docker", "volume", "rm", "-f", f"tidybot-default-{volume}"], capture_output=True)

    async def test_another_applications_volume_is_never_mounted(
        self, guarded: Client, docker: aiodocker.Docker
    ) -> None:
        """A database's volume named in a deploy: the service gets the agent's own, empty one,
        labelled, shared by the services that name it and kept across stops."""
        foreign, ours = "t-appdata", "tidybot-default-t-appdata"
        subprocess.run(["docker", "volume", "create", foreign], capture_output=True, check=True)
        marker = subprocess.run(["docker", "run", "--rm", "-v", f"{foreign}:/d", TEST_IMAGE, "touch",
                                 "/d/secret"], capture_output=True, text=True)
        assert marker.returncode == 0, marker.stderr
        try:
            for name in ("t-vol-a", "t-vol-b"):
                status, answer = await deploy(guarded, name=name, volumes=[f"{foreign}:/data"])
                assert status == 200, answer
            mounts = [(await docker.containers.container(f"tidybot-{n}").show())["Mounts"][0]["Name"]
                      for n in ("t-vol-a", "t-vol-b")]
            assert mounts == [ours, ours]  # shared by the services that name it
            seen = subprocess.run(["docker", "exec", "tidybot-t-vol-a", "ls", "/data"],
                                  capture_output=True, text=True, check=True).stdout
            assert "secret" not in seen
            labels = (await (await docker.volumes.get(ours)).show())["Labels"]  # type: ignore[no-untyped-call]  # aiodocker leaves it untyped
            assert labels == {"tidybot.deploy-agent": "default", "tidybot.volume": foreign}
            assert (await guarded.post("/stop", json={"name": "t-vol-a"})).status == 200
            assert ours in subprocess.run(["docker", "volume", "ls", "-q"], capture_output=True,
                                          text=True).stdout.split()  # kept across stops
        finally:
            remove_test_containers()
            for volume in (ours, foreign):
                subprocess.run(["docker", "volume", "rm", "-f", volume], capture_output=True)

    async def test_a_squatted_volume_name_is_refused(self, guarded: Client) -> None:
        squatted = "tidybot-default-t-squat"  # made by someone else, perhaps o=bind,device=/
        subprocess.run(["docker", "volume", "create", squatted], capture_output=True, check=True)
        try:
            dry = await guarded.post("/deploy?dry_run=1", json={"name": "t-squat", "image": TEST_IMAGE,
                                                                 "volumes": ["t-squat:/data"]})
            assert dry.status == 403  # a dry run says what the deploy would
            status, answer = await deploy(guarded, name="t-squat", volumes=["t-squat:/data"])
            assert (status, answer["error"]) == (403, "mount_not_allowed"), answer
            assert test_containers() == []
        finally:
            subprocess.run(["docker", "volume", "rm", "-f", squatted], capture_output=True)

    async def test_an_allowed_volume_is_mounted_by_its_name(self, aiohttp_client: Any, tmp_path: Path,
                                                           docker: aiodocker.Docker) -> None:
        config = make_config(tmp_path / "state", allow_volumes=("t-shared",))
        config.state_dir.mkdir()
        client = await aiohttp_client(create_app(config))
        subprocess.run(["docker", "volume", "create", "t-shared"], capture_output=True, check=True)
        try:
            status, answer = await deploy(client, name="t-allowed", volumes=["t-shared:/data"])
            assert status == 200, answer
            info = await docker.containers.container("tidybot-t-allowed").show()
            assert info["Mounts"][0]["Name"] == "t-shared"
        finally:
            remove_test_containers()
            subprocess.run(["docker", "volume", "rm", "-f", "t-shared"], capture_output=True)

    async def test_image_outside_allowlist_refused_before_pull(
        self, guarded: Client, pushed_image: str, docker: aiodocker.Docker
    ) -> None:
        status, answer = await deploy(guarded, name="t-img", image=pushed_image)
        assert (status, answer["error"], answer["image"]) == (403, "image_not_allowed", pushed_image)
        with pytest.raises(aiodocker.DockerError):
            await docker.images.inspect(pushed_image)  # never pulled
        assert test_containers() == []

    async def test_container_gets_no_privileges(self, guarded: Client, docker: aiodocker.Docker) -> None:
        await deploy(guarded, name="t-plain")
        host_config = (await docker.containers.container("tidybot-t-plain").show())["HostConfig"]
        assert host_config["Privileged"] is False and not host_config["CapAdd"]
        assert host_config["NetworkMode"] == "bridge"
        assert host_config["PidMode"] == "" and host_config["IpcMode"] == "private"

    @pytest.mark.parametrize("key", ["NVIDIA_VISIBLE_DEVICES", "nvidia_visible_devices",
                                     "NVIDIA_DRIVER_CAPABILITIES", "Nvidia_Require_Cuda"])
    async def test_toolkit_env_is_refused_in_both_forms(self, guarded: Client, key: str) -> None:
        status, answer = await deploy(guarded, name="t-gpu-env", env={key: "all"})
        assert (status, answer["error"]) == (400, "invalid_request"), answer
        assert answer["details"][0]["field"] == "env" and key in answer["details"][0]["message"]
        response = await guarded.post("/deploy", json={
            "name": "t-gpu-env", "deploy": {"image": TEST_IMAGE, "env": {key: "all"}}})
        answer = await response.json()
        assert response.status == 400 and answer["details"][0]["field"] == "deploy.env", answer
        assert test_containers() == []

    async def test_a_service_without_gpu_gets_the_no_gpu_setting(self, guarded: Client,
                                                                 docker: aiodocker.Docker) -> None:
        status, answer = await deploy(guarded, name="t-no-gpu", env={"MODEL": "x"})
        assert status == 200, answer
        env = (await docker.containers.container("tidybot-t-no-gpu").show())["Config"]["Env"]
        assert "NVIDIA_VISIBLE_DEVICES=void" in env and "MODEL=x" in env
        assert not [e for e in env if e.startswith("NVIDIA_") and e != "NVIDIA_VISIBLE_DEVICES=void"]

    async def test_capabilities_are_dropped(self, guarded: Client, docker: aiodocker.Docker) -> None:
        await deploy(guarded, name="t-caps")
        container = docker.containers.container("tidybot-t-caps")
        assert set((await container.show())["HostConfig"]["CapDrop"]) >= {"CAP_NET_RAW", "CAP_MKNOD"}
        status = subprocess.run(["docker", "exec", "tidybot-t-caps", "cat", "/proc/1/status"],
                                capture_output=True, text=True, check=True).stdout
        bounding = int(next(line.split()[1] for line in status.splitlines() if line.startswith("CapBnd")), 16)
        assert not bounding & (1 << 13) and not bounding & (1 << 27)  # CAP_NET_RAW, CAP_MKNOD
        assert bounding & (1 << 10)  # CAP_NET_BIND_SERVICE stays: a server may bind port 80

    async def test_ready_timeout_is_capped(self, guarded: Client) -> None:
        status, answer = await deploy(guarded, name="t-cap", health="/missing", ready_timeout=300)
        assert (status, answer["error"]) == (504, "health_timeout")
        assert "within 1 s" in answer["message"]


@pytest.mark.docker
class TestSecrecy:
    """Env values (API keys) appear in no answer and no log line."""

    SECRET = "sk-live-7f3a9c1e5b"

    async def test_env_values_never_leak(self, guarded: Client, caplog: pytest.LogCaptureFixture) -> None:
        caplog.set_level(logging.DEBUG)
        answers = []
        for body in (
            {"name": "t-secret", "env": {"API_KEY": self.SECRET}},
            {"name": "t-secret", "env": {"API_KEY": self.SECRET + "2"}},  # 409
            {"name": "t-secret2", "env": {"API_KEY": self.SECRET}, "command": ["sh", "-c", "exit 2"]},
            {"name": "t-secret3", "env": {"API_KEY": {"nested": self.SECRET}}},  # 400
        ):
            response = await guarded.post("/deploy", json={"image": TEST_IMAGE, **body})
            answers.append(await response.text())
        answers.append(await (await guarded.get("/services")).text())
        answers.append(await (await guarded.get("/services/t-secret")).text())
        assert [a for a in answers if self.SECRET in a] == []
        assert self.SECRET not in caplog.text




@pytest.fixture
async def host_paths(aiohttp_client: Any, tmp_path: Path, test_image: str) -> Any:
    """An agent that allows host paths under tmp_path/data."""
    data = tmp_path / "data"
    (data / "a" / "sub").mkdir(parents=True)
    (data / "b").mkdir()
    config = make_config(tmp_path / "state", allow_host_paths=(data.resolve(),))
    config.state_dir.mkdir()
    remove_test_containers()
    client = await aiohttp_client(create_app(config))
    yield client, data.resolve()
    remove_test_containers()


@pytest.mark.docker
class TestNestedHostPaths:
    """No host mount contains another, within a service or across the node's services."""

    async def test_nested_within_one_service_is_refused(self, host_paths: Any) -> None:
        client, data = host_paths
        status, answer = await deploy(client, name="t-nest", volumes=[f"{data}/a:/w", f"{data}/a/sub:/x:ro"])
        assert (status, answer["error"]) == (403, "mount_not_allowed"), answer
        assert test_containers() == []

    async def test_nested_across_services_is_refused_and_the_swap_goes_nowhere(
        self, host_paths: Any
    ) -> None:
        client, data = host_paths
        status, answer = await deploy(client, name="t-outer", volumes=[f"{data}/a:/w"])
        assert status == 200, answer
        for volumes in ([f"{data}/a/sub:/x"], [f"{data}:/all:ro"]):  # inside it, or around it
            status, answer = await deploy(client, name="t-inner", volumes=volumes)
            assert (status, answer["error"], answer.get("service")) == (403, "mount_not_allowed", "t-outer")
        assert (await deploy(client, name="t-beside", volumes=[f"{data}/b:/x"]))[0] == 200
        # The attack: from inside t-outer, swap the inner directory for a symlink to the host's /.
        swap = subprocess.run(["docker", "exec", "tidybot-t-outer", "sh", "-c",
                               "rmdir /w/sub && ln -s / /w/sub"], capture_output=True, text=True)
        assert swap.returncode == 0, swap.stderr
        assert (data / "a" / "sub").readlink() == Path("/")  # it really is the host's path now
        status, answer = await deploy(client, name="t-inner", volumes=[f"{data}/a/sub:/x"])
        assert (status, answer["error"]) == (403, "mount_not_allowed"), answer
        assert sorted(test_containers()) == ["tidybot-t-beside", "tidybot-t-outer"]

    async def test_racing_deploys_never_both_mount_nested_paths(self, host_paths: Any) -> None:
        client, data = host_paths
        results = await asyncio.gather(
            deploy(client, name="t-race-a", volumes=[f"{data}/a:/w"]),
            deploy(client, name="t-race-b", volumes=[f"{data}/a/sub:/x"]))
        assert sorted(status for status, _ in results) == [200, 403], results
