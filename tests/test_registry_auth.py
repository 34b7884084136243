"""Registry credentials from the Docker client config: which registry an image is pulled
from, where its credential is found, what the engine's header says, and that a secret never
shows in a repr. The real registry with TLS and a login is in test_cold_starts.py."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path

import pytest

from deploy_agent.registry_auth import (
    DOCKER_HUB,
    HUB_SERVER,
    Credential,
    RegistryCredentials,
    default_config_path,
    registry_of,
)


@pytest.mark.parametrize(("image", "registry"), [
    ("ubuntu", DOCKER_HUB), ("ubuntu:22.04", DOCKER_HUB), ("library/ubuntu", DOCKER_HUB),
    ("nvidia/cuda:12.4.0-base", DOCKER_HUB), ("docker.io/nvidia/cuda", DOCKER_HUB),
    ("index.docker.io/user/x", DOCKER_HUB), ("registry-1.docker.io/user/x:1", DOCKER_HUB),
    ("localhost/x", "localhost"), ("localhost:5000/x:1", "localhost:5000"),
    ("registry.lab:5000/vision/yolo:1", "registry.lab:5000"), ("ghcr.io/org/x", "ghcr.io"),
    ("10.0.0.5:5000/x@sha256:" + "a" * 64, "10.0.0.5:5000"), ("lab:5000/x", "lab:5000"),
])
def test_registry_of_normalises_like_docker(image: str, registry: str) -> None:
    assert registry_of(image) == registry


def auth(user: str, secret: str) -> str:
    return base64.b64encode(f"{user}:{secret}".encode()).decode()


def decoded(header: str) -> dict[str, str]:
    return dict(json.loads(base64.urlsafe_b64decode(header)))


def write_config(path: Path, config: object) -> Path:
    path.write_text(json.dumps(config))
    return path


class TestLookup:
    async def test_no_config_means_no_credentials_and_no_warning(self, tmp_path: Path) -> None:
        credentials = RegistryCredentials(tmp_path / "absent.json")
        assert await credentials.lookup("registry.lab:5000/x") is None
        assert credentials.problems == {}

    async def test_auths_by_host_or_url_key(self, tmp_path: Path) -> None:
        credentials = RegistryCredentials(write_config(tmp_path / "c.json", {"auths": {
            "https://registry.lab:5000": {"auth": auth("lab", "s3cret:with:colons")},
            HUB_SERVER: {"auth": auth("hubuser", "hubpass")},
        }}))
        lab = await credentials.lookup("registry.lab:5000/vision/yolo:1")
        assert lab is not None and (lab.username, lab.secret) == ("lab", "s3cret:with:colons")
        assert decoded(lab.header()) == {"username": "lab", "password": "s3cret:with:colons",
                                         "serveraddress": "registry.lab:5000"}
        hub = await credentials.lookup("nvidia/cuda:12")  # aiodocker would guess "nvidia"
        assert hub is not None and decoded(hub.header())["serveraddress"] == HUB_SERVER
        assert await credentials.lookup("other.lab/x") is None

    async def test_identity_token(self, tmp_path: Path) -> None:
        credentials = RegistryCredentials(write_config(tmp_path / "c.json", {"auths": {
            "ghcr.io": {"identitytoken": "tok-123"}}}))
        found = await credentials.lookup("ghcr.io/org/x")
        assert found is not None
        assert decoded(found.header()) == {"identitytoken": "tok-123", "serveraddress": "ghcr.io"}

    async def test_a_missing_helper_is_no_credentials_and_a_problem(self, tmp_path: Path) -> None:
        credentials = RegistryCredentials(write_config(tmp_path / "c.json", {
            "credsStore": "surely-not-installed", "auths": {"registry.lab": {"auth": auth("a", "b")}}}))
        assert await credentials.lookup("registry.lab/x") is None  # the store wins over auths
        assert "docker-credential-surely-not-installed" in credentials.problems["helper surely-not-installed"]

    async def test_helpers_per_registry_and_their_answers(self, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
        asked = tmp_path / "asked"
        helper = tmp_path / "bin" / "docker-credential-standin"
        helper.parent.mkdir()
        helper.write_text(f"""#!/bin/sh
read server
echo "$1 $server" >> {asked}
case "$server" in
  registry.lab:5000) echo '{{"ServerURL":"registry.lab:5000","Username":"lab","Secret":"from-helper"}}';;
  ghcr.io) echo '{{"ServerURL":"ghcr.io","Username":"<token>","Secret":"tok"}}';;
  *) echo "credentials not found in native keychain"; exit 1;;
esac
""")
        helper.chmod(helper.stat().st_mode | stat.S_IXUSR)
        monkeypatch.setenv("PATH", f"{helper.parent}:{os.environ['PATH']}")
        credentials = RegistryCredentials(write_config(tmp_path / "c.json", {"credHelpers": {
            "registry.lab:5000": "standin", "ghcr.io": "standin", "quay.io": "standin"}}))
        lab = await credentials.lookup("registry.lab:5000/x")
        assert lab is not None and (lab.username, lab.secret, lab.identity_token) == (
            "lab", "from-helper", False)
        token = await credentials.lookup("ghcr.io/org/x")
        assert token is not None and token.identity_token and token.secret == "tok"
        assert await credentials.lookup("quay.io/x") is None  # the helper has none: no problem
        assert await credentials.lookup("docker.io/x") is None  # no helper named for the hub
        assert asked.read_text().splitlines() == ["get registry.lab:5000", "get ghcr.io", "get quay.io"]
        assert credentials.problems == {}

    async def test_an_unreadable_config_is_a_problem_until_it_is_fixed(self, tmp_path: Path) -> None:
        path = write_config(tmp_path / "c.json", {"auths": {}})
        path.write_text("{not json")
        credentials = RegistryCredentials(path)
        assert await credentials.lookup("registry.lab/x") is None
        assert "not valid JSON" in credentials.problems["config"]
        write_config(path, {"auths": {"registry.lab": {"username": "u", "password": "p"}}})
        assert await credentials.lookup("registry.lab/x") is not None  # read at every pull
        assert credentials.problems == {}


def test_a_credential_never_shows_its_secret_in_a_repr() -> None:
    credential = Credential("registry.lab", "lab-user", "hunter2-secret")
    assert "hunter2-secret" not in repr(credential) and "lab-user" not in repr(credential)
    assert "hunter2-secret" not in str([credential])


def test_config_path_follows_docker_config_then_home(tmp_path: Path) -> None:
    assert default_config_path({"DOCKER_CONFIG": "/etc/deploy-agent"}) == Path(
        "/etc/deploy-agent/config.json")
    assert default_config_path({"HOME": str(tmp_path)}) == tmp_path / ".docker" / "config.json"


@pytest.mark.parametrize(("reason", "refused"), [
    ("Head \"https://10.0.0.5:5000/v2/x/manifests/1\": no basic auth credentials", True),
    ("unauthorized: authentication required", True),
    ("pull access denied for lab/x, repository does not exist or may require 'docker login': "
     "denied: requested access to the resource is denied", True),
    ("error parsing HTTP 403 response body: 403 Forbidden", True),
    ("manifest for localhost:5000/x:1 not found: manifest unknown", False),
    ("failed to register layer: open /var/lib/docker/overlay2/x: permission denied", False),
    ("Get \"https://registry.lab/v2/\": dial tcp: lookup registry.lab: no such host", False),
])
def test_the_engines_refusals_are_told_from_other_pull_failures(reason: str, refused: bool) -> None:
    from deploy_agent.backends.engine import refused_by_registry
    assert refused_by_registry(reason) is refused


def install_helper(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, script: str) -> None:
    helper = tmp_path / "bin" / f"docker-credential-{name}"
    helper.parent.mkdir(exist_ok=True)
    helper.write_text("#!/bin/sh\n" + script)
    helper.chmod(helper.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{helper.parent}:{os.environ['PATH']}")


class TestHelpersThatMisbehave:
    """A helper is a program the config names: bounded in time and output, never a path."""

    @pytest.mark.parametrize("flood", ["exec yes\n", "head -c 1000000 /dev/zero\nexec sleep 60\n"])
    async def test_one_that_floods_its_output(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              flood: str) -> None:
        """Cut off past the limit, killed, and waited for, though its pipe still holds what it
        said (asyncio counts a process done only once its pipes are drained)."""
        install_helper(tmp_path, monkeypatch, "flood", flood)
        credentials = RegistryCredentials(write_config(tmp_path / "c.json", {"credsStore": "flood"}))
        assert await credentials.lookup("registry.lab/x") is None
        assert "said more than" in credentials.problems["helper flood"]

    async def test_one_that_hangs(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        install_helper(tmp_path, monkeypatch, "hang", f"echo $$ > {tmp_path}/pid\nexec sleep 60\n")
        monkeypatch.setattr("deploy_agent.registry_auth.HELPER_TIMEOUT_S", 0.5)
        credentials = RegistryCredentials(write_config(tmp_path / "c.json", {"credsStore": "hang"}))
        assert await credentials.lookup("registry.lab/x") is None
        assert "did not answer" in credentials.problems["helper hang"]
        pid = int((tmp_path / "pid").read_text())
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # killed and reaped, not left behind

    @pytest.mark.parametrize("name", ["../../tmp/evil", "a b", "-rf", ""])
    async def test_a_name_that_is_not_a_plain_name_is_not_run(self, tmp_path: Path, name: str) -> None:
        credentials = RegistryCredentials(write_config(tmp_path / "c.json", {"credHelpers": {
            "registry.lab": name}, "credsStore": name} if name else {"credsStore": "../x"}))
        assert await credentials.lookup("registry.lab/x") is None
        assert any("not a plain name" in problem for problem in credentials.problems.values())

    @pytest.mark.parametrize("config", [{"credHelpers": ["ecr"]}, {"auths": "x"}, {"credsStore": 3},
                                        {"auths": {"registry.lab": "not an object"}}])
    async def test_a_config_of_the_wrong_shape_is_a_problem_not_a_crash(self, tmp_path: Path,
                                                                         config: object) -> None:
        credentials = RegistryCredentials(write_config(tmp_path / "c.json", config))
        assert await credentials.lookup("registry.lab/x") is None
        if "auths" not in config or isinstance(config["auths"], str):  # type: ignore[operator,index]
            assert "config" in credentials.problems


def test_what_urls_carry_is_redacted_from_engine_errors() -> None:
    from deploy_agent.backends.engine import redacted
    said = ('Get "https://bucket.s3.amazonaws.com/blob?X-Amz-Credential=AKIA&X-Amz-Security-Token='
            'SECRET123": net/http: TLS handshake timeout; https://lab:hunter2@registry.lab/v2/')
    clean = redacted(said)
    assert "SECRET123" not in clean and "AKIA" not in clean and "hunter2" not in clean
    assert "https://bucket.s3.amazonaws.com/blob?***" in clean and "https://***@registry.lab/v2/" in clean


@pytest.mark.parametrize(("url", "plain"), [
    ("unix:///var/run/docker.sock", False), ("tcp://127.0.0.1:2375", False), ("tcp://localhost:2375", False),
    ("tcp://10.0.0.9:2375", True), ("http://gpu-2:2375", True), ("https://gpu-2:2376", False),
    ("ssh://ops@gpu-2", False),
])
def test_credentials_never_cross_a_plaintext_engine_connection(url: str, plain: bool) -> None:
    from deploy_agent.backends.engine import plaintext_remote
    assert plaintext_remote(url) is plain


async def test_a_plaintext_remote_engine_gets_no_credentials(tmp_path: Path) -> None:
    from unittest.mock import MagicMock

    from deploy_agent.backends.engine import Engine
    credentials = RegistryCredentials(write_config(tmp_path / "c.json", {"auths": {
        "registry.lab": {"auth": auth("u", "p")}}}))
    engine = Engine(MagicMock(), MagicMock(), credentials=credentials)
    assert "X-Registry-Auth" in await engine.registry_auth("registry.lab/x")
    engine.plaintext_remote = True
    assert await engine.registry_auth("registry.lab/x") == {}
    assert "plain TCP" in credentials.problems["engine"]
