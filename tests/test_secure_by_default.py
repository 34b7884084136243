"""Secure by default, with real agent processes: a token beyond loopback, hardened services.

Agents here listen on 0.0.0.0 but every request goes to 127.0.0.1; the test of where
callers send the token runs in a network namespace it makes itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiodocker
import pytest

from tests.agent_process import AgentProcess, AgentProcesses, get_json, installed, post_json
from tests.conftest import TEST_IMAGE
from tests.test_mdns import can_unshare
from tests.test_restarts import wait_until

pytestmark = pytest.mark.docker
HERE = Path(__file__).parent
GIB = 1024**3


@pytest.fixture
def agents(agent_processes: AgentProcesses) -> Callable[..., AgentProcess]:
    return agent_processes.start


def request(agent: AgentProcess, path: str, token: str | None = None,
            body: Any = None) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if body is not None:
        return post_json(agent.url + path, body, headers=headers)
    import urllib.error
    import urllib.request
    try:
        with urllib.request.urlopen(urllib.request.Request(agent.url + path, headers=headers),
                                    timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


class TestTokenBeyondLoopback:
    """Listening on 0.0.0.0 with no token configured: one is made, kept and required."""

    def test_made_required_kept_and_never_logged(self, agents: Any) -> None:
        agent = agents("--host", "0.0.0.0")
        path = agent.state_dir / "token"
        token = path.read_text().strip()
        assert path.stat().st_mode & 0o777 == 0o600 and path.stat().st_uid == os.geteuid()
        assert len(token) >= 40

        assert request(agent, "/services")[0] == 401
        assert request(agent, "/services", "wrong")[0] == 401
        status, answer = request(agent, "/deploy", body={"name": "t-auth", "image": TEST_IMAGE})
        assert status == 401 and "deploy-agent token" in answer["message"]
        assert request(agent, "/services", token) == (200, [])
        health = get_json(agent.url + "/health")  # open, and says auth is on
        assert health["auth"] == "token"

        printed = subprocess.run([installed("deploy-agent"), "token", "--state-dir", str(agent.state_dir)],
                                 capture_output=True, text=True, check=True)
        assert printed.stdout == token + "\n"

        agent.stop()
        agent.start()  # reused, not replaced
        assert path.read_text().strip() == token
        assert request(agent, "/services", token)[0] == 200
        log = agent.log.read_text()
        assert str(path) in log and token not in log

    def test_no_auth_runs_open_and_says_so(self, agents: Any) -> None:
        agent = agents("--host", "0.0.0.0", "--no-auth")
        assert request(agent, "/services") == (200, [])
        assert get_json(agent.url + "/health")["auth"] == "off"
        assert not (agent.state_dir / "token").exists()
        assert "NO AUTHENTICATION" in agent.log.read_text()

    def test_loopback_stays_open(self, agents: Any) -> None:
        agent = agents()
        assert request(agent, "/services") == (200, [])
        assert get_json(agent.url + "/health")["auth"] == "off"

    def test_missing_token_file_is_one_line(self, tmp_path: Path) -> None:
        result = subprocess.run([installed("deploy-agent"), "--state-dir", str(tmp_path),
                                 "--token-file", str(tmp_path / "absent")],
                                capture_output=True, text=True, timeout=30)
        assert result.returncode != 0 and result.stderr.count("\n") == 1, result.stderr
        assert "cannot read token file" in result.stderr and "Traceback" not in result.stderr

    def test_token_command_without_a_token_says_why(self, tmp_path: Path) -> None:
        result = subprocess.run([installed("deploy-agent"), "token", "--state-dir", str(tmp_path)],
                                capture_output=True, text=True, timeout=30)
        assert result.returncode != 0 and "first start beyond loopback" in result.stderr
        assert result.stdout == ""


class TestCallersFindTheToken:
    """deployctl on the node finds the local token by itself, and sends it nowhere else."""

    def test_deployctl_on_the_node(self, agents: Any) -> None:
        agent = agents("--host", "0.0.0.0")
        env = {k: v for k, v in os.environ.items()
               if k not in ("COMPUTE_NODES", "DEPLOY_AGENT_TOKEN", "DEPLOY_AGENT_TOKEN_FILE")}
        env["DEPLOY_AGENT_STATE_DIR"] = str(agent.state_dir)
        result = subprocess.run([installed("deployctl"), "ps", "--json", "--node", agent.url],
                                capture_output=True, text=True, env=env, timeout=60)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == []
        env["DEPLOY_AGENT_STATE_DIR"] = str(agent.state_dir.parent / "elsewhere")
        refused = subprocess.run([installed("deployctl"), "ps", "--node", agent.url],
                                 capture_output=True, text=True, env=env, timeout=60)
        assert refused.returncode == 1

    @pytest.mark.skipif(not can_unshare(), reason="needs root to make a network namespace")
    def test_found_token_never_leaves_loopback(self, tmp_path: Path) -> None:
        script = (f"ip link set lo up && ip addr add 192.0.2.10/32 dev lo && "
                  f"exec {sys.executable} {HERE / 'token_in_netns.py'} {tmp_path / 'state'}")
        result = subprocess.run(["unshare", "--net", "sh", "-c", script], capture_output=True,
                                text=True, timeout=120,
                                env={**os.environ, "PYTHONPATH": str(HERE.parent)})
        assert result.returncode == 0, result.stderr
        seen = json.loads(result.stdout.strip().splitlines()[-1])
        assert seen["found_rc"] == 0, seen["found_err"]
        assert "did not answer" not in seen["found_err"]  # the local agent took the found token
        assert seen["other_saw_when_found"] and set(seen["other_saw_when_found"]) == {None}
        assert seen["given_rc"] == 0
        assert set(seen["other_saw_when_given"]) == {"Bearer given-token"}  # given: sent to all


async def host_config(name: str) -> dict[str, Any]:
    async with aiodocker.Docker() as docker:
        info: dict[str, Any] = await docker.containers.container(f"tidybot-{name}").show()
    return dict(info["HostConfig"])


class TestHardenedServices:
    """Service containers: no new privileges, a pids limit, never privileged; memory_gb."""

    async def test_host_config_shows_the_hardening(self, agents: Any) -> None:
        agent = agents()
        assert post_json(agent.url + "/deploy", {"name": "t-hard", "image": TEST_IMAGE})[0] == 200
        config = await host_config("t-hard")
        assert config["SecurityOpt"] == ["no-new-privileges"]
        assert config["PidsLimit"] == 4096
        assert config["Privileged"] is False and not config["CapAdd"]
        assert (config["PidMode"], config["IpcMode"], config["NetworkMode"]) == ("", "private", "bridge")
        assert config["Memory"] == 0  # no limit unless asked for

    async def test_pids_limit_flag_is_enforced(self, agents: Any) -> None:
        agent = agents("--service-pids-limit", "8")
        body = {"name": "t-pids", "image": TEST_IMAGE}
        assert post_json(agent.url + "/deploy", body)[0] == 200
        assert (await host_config("t-pids"))["PidsLimit"] == 8
        forks = subprocess.run(["docker", "exec", "tidybot-t-pids", "sh", "-c",
                                "for i in $(seq 20); do sleep 5 & done; wait"],
                               capture_output=True, text=True, timeout=60)
        assert "Resource temporarily unavailable" in forks.stderr or forks.returncode != 0

    async def test_memory_gb_is_a_limit_and_part_of_the_spec(self, agents: Any) -> None:
        agent = agents()
        body = {"name": "t-mem", "image": TEST_IMAGE, "memory_gb": 0.25}
        assert post_json(agent.url + "/deploy", body)[0] == 200
        config = await host_config("t-mem")
        assert config["Memory"] == config["MemorySwap"] == GIB // 4
        assert post_json(agent.url + "/deploy", body)[1]["already_running"] is True
        status, conflict = post_json(agent.url + "/deploy", {**body, "memory_gb": 0.5})
        assert (status, conflict["differing_fields"]) == (409, ["memory_gb"])
        nested = {"name": "t-mem-nested", "requires": {"ram_gb": 64},  # metadata, never a limit
                  "deploy": {"image": TEST_IMAGE, "memory_gb": 0.5}}
        assert post_json(agent.url + "/deploy", nested)[0] == 200
        assert (await host_config("t-mem-nested"))["Memory"] == GIB // 2
        assert post_json(agent.url + "/deploy", {**body, "name": "t-mem-bad", "memory_gb": 0})[0] == 400

    async def test_publish_host_pins_ports_health_and_urls(self, agents: Any) -> None:
        # 127.0.0.2: on this machine, but not where health checks go by default. A deploy
        # becomes healthy only if the pinned address is also the health host.
        agent = agents("--publish-host", "127.0.0.2", "--advertise-host", "")
        status, answer = post_json(agent.url + "/deploy", {"name": "t-pinned", "image": TEST_IMAGE,
                                                           "ready_timeout": 10})
        assert status == 200, answer
        bindings = (await host_config("t-pinned"))["PortBindings"]
        assert [b["HostIp"] for b in next(iter(bindings.values()))] == ["127.0.0.2"]
        assert answer["host"] == f"http://127.0.0.2:{answer['port']}"


class TestPidNamespace:
    """An agent in a PID namespace of its own says so; on the host it does not."""

    @pytest.mark.skipif(not can_unshare(), reason="needs root to make a PID namespace")
    def test_own_pid_namespace_is_reported(self, agents: Any) -> None:
        isolated = agents(wrapper=("unshare", "--pid", "--fork", "--mount-proc", "--kill-child"))
        assert post_json(isolated.url + "/deploy", {"name": "t-pidns", "image": TEST_IMAGE})[0] == 200
        wait_until(lambda: "pid_namespace" in
                   [w["code"] for w in get_json(isolated.url + "/health")["warnings"]], timeout=10)
        assert "--pid host" in isolated.log.read_text()

    def test_host_pid_namespace_is_not_reported(self, agents: Any) -> None:
        agent = agents()
        assert post_json(agent.url + "/deploy", {"name": "t-pidhost", "image": TEST_IMAGE})[0] == 200
        wait_until(lambda: "t-pidhost" in agent.services())
        for _ in range(3):
            assert get_json(agent.url + "/health")["warnings"] == []


class TestSharedMemory:
    """ML containers start as their frameworks expect: /dev/shm (#24, point 5)."""

    async def test_a_gpu_service_writes_a_gigabyte_into_dev_shm(self, agent_processes: Any) -> None:
        agent = agent_processes.start("--fake-gpus", "RTX 4090:24")
        writes = ("sh", "-c", "dd if=/dev/zero of=/dev/shm/batch bs=1M count=1024 2>/dev/null && "
                  "exec httpd -f -v -p 8000 -h /www")
        status, answer = post_json(agent.url + "/deploy", {"name": "t-shm", "image": TEST_IMAGE, "gpu": True,
                                                           "vram_gb": 4, "command": list(writes),
                                                           "ready_timeout": 30})
        assert status == 200, answer
        config = await host_config("t-shm")
        assert config["ShmSize"] == 2 * GIB
        plain = {"name": "t-shm-plain", "image": TEST_IMAGE, "shm_gb": 1.5}
        assert post_json(agent.url + "/deploy", plain)[0] == 200
        config = await host_config("t-shm-plain")
        assert config["ShmSize"] == int(1.5 * GIB)
        status, conflict = post_json(agent.url + "/deploy", {**plain, "shm_gb": 1})
        assert (status, conflict["differing_fields"]) == (409, ["shm_gb"])
        status, refused = post_json(agent.url + "/deploy", {"name": "t-shm-big", "image": TEST_IMAGE,
                                                            "shm_gb": 2, "memory_gb": 1})
        assert status == 400 and refused["details"][0]["field"] == "shm_gb"

    async def test_a_gpu_service_gets_unlimited_memlock_where_the_engine_can(
            self, agent_processes: Any) -> None:
        """Unlimited memlock for GPU services; an engine that can't raise it (no
        CAP_SYS_RESOURCE, like this CI's) is found out once, said on /health, and the
        service starts with the engine's default; --gpu-memlock off never asks."""
        engine_can = subprocess.run(["docker", "run", "--rm", "--ulimit", "memlock=-1:-1", TEST_IMAGE,
                                     "true"], capture_output=True).returncode == 0
        agent = agent_processes.start("--fake-gpus", "RTX 4090:24")
        # A command named like the runtime's refusal fails with or without memlock: it must
        # not turn memlock off for every GPU service.
        status, crafted = post_json(agent.url + "/deploy", {
            "name": "t-lock-crafted", "image": TEST_IMAGE, "gpu": True, "vram_gb": 2,
            "command": ["error setting rlimit type 8: operation not permitted"]})
        assert status == 502, crafted
        assert get_json(agent.url + "/health")["warnings"] == []
        for name in ("t-lock-1", "t-lock-2"):
            status, answer = post_json(agent.url + "/deploy", {"name": name, "image": TEST_IMAGE,
                                                               "gpu": True, "vram_gb": 2})
            assert status == 200, answer
            seen = subprocess.run(["docker", "exec", f"tidybot-{name}", "sh", "-c", "ulimit -l"],
                                  capture_output=True, text=True, check=True).stdout.strip()
            ulimits = (await host_config(name))["Ulimits"]
            if engine_can:
                assert seen == "unlimited" and ulimits == [{"Name": "memlock", "Soft": -1, "Hard": -1}]
            else:
                assert seen != "unlimited" and not ulimits
        warnings = [w["code"] for w in get_json(agent.url + "/health")["warnings"]]
        assert ("memlock_refused" in warnings) == (not engine_can)
        refusals = agent.log.read_text().count("cannot give GPU services unlimited memlock")
        assert refusals == (0 if engine_can else 1)  # found out once, not at every deploy

        plain = agent_processes.start("--fake-gpus", "RTX 4090:24", "--gpu-memlock", "off")
        assert post_json(plain.url + "/deploy", {"name": "t-lock-off", "image": TEST_IMAGE, "gpu": True,
                                                 "vram_gb": 2})[0] == 200
        assert not (await host_config("t-lock-off"))["Ulimits"]
        assert get_json(plain.url + "/health")["warnings"] == []
        cpu = post_json(agent.url + "/deploy", {"name": "t-lock-cpu", "image": TEST_IMAGE})
        assert cpu[0] == 200 and not (await host_config("t-lock-cpu"))["Ulimits"]
