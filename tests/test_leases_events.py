"""Leases and the event log, with real agent processes on the real engine."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from deploy_agent.client import AgentClient, AsyncAgentClient, LeaseNotFoundError
from tests.agent_process import AgentProcess, AgentProcesses, get_json, installed, post_json
from tests.conftest import TEST_IMAGE
from tests.test_api_docker import test_containers
from tests.test_restarts import deploy, wait_until

pytestmark = pytest.mark.docker


@pytest.fixture
def agent(agent_processes: AgentProcesses) -> AgentProcess:
    return agent_processes.start("--fake-gpus", "RTX 4090:24")


def events(agent: AgentProcess, query: str = "") -> list[dict[str, Any]]:
    return list(get_json(agent.url + "/events" + query))


def kinds(agent: AgentProcess, service: str) -> list[tuple[str, str | None]]:
    return [(e["kind"], e["reason"]) for e in events(agent, "?limit=1000") if e["service"] == service]


def request(agent: AgentProcess, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    call = urllib.request.Request(agent.url + path, data=data, method=method,
                                  headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(call, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


class TestEventKinds:
    """Each change leaves its event, with its reason."""

    def test_deploy_replace_crash_restart_stop(self, agent: AgentProcess) -> None:
        deploy(agent, "t-ev")
        deploy(agent, "t-ev", env={"V": "2"}, replace=True)
        # The service crashes from the inside (`docker kill` would count as a stop): the
        # engine restarts it, by its restart policy.
        subprocess.run(["docker", "exec", "tidybot-t-ev", "sh", "-c", "kill -9 $(pidof httpd)"],
                       check=True, capture_output=True)
        wait_until(lambda: ("restarted", "engine") in kinds(agent, "t-ev"), timeout=15)
        assert post_json(agent.url + "/stop", {"name": "t-ev"})[0] == 200
        seen = kinds(agent, "t-ev")
        assert seen[:3] == [("deployed", None), ("replaced", "spec_changed"), ("deployed", None)]
        assert ("crashed", None) in seen and seen[-1] == ("stopped", "request")
        crashed = next(e for e in events(agent, "?limit=1000") if e["kind"] == "crashed")
        assert crashed["details"]["exit_code"] == 137
        assert all(set(e) == {"id", "time", "service", "kind", "reason", "details"}
                   for e in events(agent))

    def test_failed_deploy_and_removed_behind_the_back(self, agent: AgentProcess) -> None:
        status, _ = post_json(agent.url + "/deploy", {"name": "t-ev-fail", "image": TEST_IMAGE,
                                                      "command": ["sh", "-c", "exit 3"]})
        assert status == 502
        assert kinds(agent, "t-ev-fail") == [("deploy_failed", "container_exited")]
        assert post_json(agent.url + "/deploy", {"name": "Bad!", "image": TEST_IMAGE})[0] == 400
        assert not [e for e in events(agent) if e["service"] == "Bad!"]  # invalid: no event
        deploy(agent, "t-ev-rm")
        subprocess.run(["docker", "rm", "-f", "tidybot-t-ev-rm"], check=True, capture_output=True)
        wait_until(lambda: kinds(agent, "t-ev-rm")[-1][0] == "removed")
        assert kinds(agent, "t-ev-rm")[-1] == ("removed", "container_destroyed")

    def test_adopted_at_start_and_ids_keep_increasing(self, agent: AgentProcess) -> None:
        deploy(agent, "t-ev-adopt")
        last = events(agent)[-1]["id"]
        agent.stop()
        agent.start()
        assert kinds(agent, "t-ev-adopt")[-1] == ("adopted", "start_up")
        after = [e["id"] for e in events(agent, f"?since={last}")]
        assert after and min(after) > last  # nothing reused, the old history still there
        assert kinds(agent, "t-ev-adopt")[0] == ("deployed", None)
        lines = (agent.state_dir / "events.jsonl").read_text().splitlines()
        assert json.loads(lines[-1])["kind"] == "adopted"
        assert (agent.state_dir / "events.jsonl").stat().st_mode & 0o077 == 0


class TestEventQueries:
    """since, limit, and a follow that streams and ends when its client leaves."""

    def test_cursor_and_limit(self, agent: AgentProcess) -> None:
        for index in range(3):
            deploy(agent, f"t-cur-{index}")
        every = events(agent, "?limit=1000")
        assert [e["id"] for e in every] == sorted(e["id"] for e in every)
        assert events(agent, "?limit=2") == every[-2:]
        assert events(agent, f"?since={every[-3]['id']}") == every[-2:]
        assert request(agent, "GET", "/events?limit=x")[0] == 400

    def test_follow_streams_new_events(self, agent: AgentProcess) -> None:
        sock = socket.create_connection(("127.0.0.1", agent.port), timeout=10)
        sock.sendall(b"GET /events?follow=1&limit=0 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        head = sock.recv(4096)
        assert b" 200 " in head.split(b"\r\n")[0] and b"application/x-ndjson" in head
        deploy(agent, "t-follow-ev")
        received = b""
        while b'"deployed"' not in received:
            received += sock.recv(4096)
        assert b'"t-follow-ev"' in received
        sock.close()
        metrics = urllib.request.urlopen(agent.url + "/metrics", timeout=5).read().decode()
        wait_until(lambda: "deploy_agent_streams_open 0.0" in
                   urllib.request.urlopen(agent.url + "/metrics", timeout=5).read().decode(), timeout=5)
        assert "deploy_agent_streams_open" in metrics


class TestLeases:
    """Caller-owned leases: expiry frees the GPU, holders renew and release independently."""

    def test_lease_expiry_stops_and_frees_the_gpu(self, agent: AgentProcess) -> None:
        answer = deploy(agent, "t-lease", gpu=True, vram_gb=20, lease_s=2, keep_warm_s=0)
        assert answer["lease_id"] and answer["lease_expires_at"].endswith("Z")
        listed = agent.services()["t-lease"]
        assert listed["leases"] == 1 and listed["lease_expires_at"] == answer["lease_expires_at"]
        assert get_json(agent.url + "/gpus")[0]["vram_reserved_gb"] == 20
        wait_until(lambda: "t-lease" not in agent.services(), timeout=6)
        assert test_containers() == []
        assert get_json(agent.url + "/gpus")[0]["vram_reserved_gb"] == 0
        assert kinds(agent, "t-lease")[-1] == ("stopped", "lease_expired")

    def test_second_holder_keeps_it_alive_then_it_goes(self, agent: AgentProcess) -> None:
        """The issue's check: lease_s 3, a second leased deploy at 2 s, alive at 4 s, then gone."""
        first = deploy(agent, "t-two", lease_s=3, keep_warm_s=0)
        started = time.monotonic()
        time.sleep(2)
        second = deploy(agent, "t-two", lease_s=3, keep_warm_s=0)
        assert second["already_running"] is True and second["lease_id"] != first["lease_id"]
        assert agent.services()["t-two"]["leases"] == 2
        time.sleep(max(0.0, 4 - (time.monotonic() - started)))
        assert agent.services()["t-two"]["status"] == "healthy"  # the first lapsed, not the service
        assert agent.services()["t-two"]["leases"] == 1
        wait_until(lambda: "t-two" not in agent.services(), timeout=5)
        assert test_containers() == []

    def test_renew_and_redeploy_with_the_lease_id_extend(self, agent: AgentProcess) -> None:
        answer = deploy(agent, "t-renew", lease_s=4, keep_warm_s=0)
        lease_id = answer["lease_id"]
        for _ in range(3):  # 6 s in all, past the 4 s lease: only the renewals keep it
            time.sleep(2)
            status, renewed = request(agent, "POST", "/services/t-renew/renew",
                                      {"lease_id": lease_id, "lease_s": 4})
            assert status == 200 and renewed["lease_id"] == lease_id
        again = deploy(agent, "t-renew", lease_s=2, lease_id=lease_id)
        assert again["lease_id"] == lease_id and again["already_running"] is True
        assert agent.services()["t-renew"]["leases"] == 1  # the same holder, renewed
        assert request(agent, "POST", "/services/t-renew/renew", {"lease_id": "unknown"})[0] == 404
        assert request(agent, "POST", "/services/t-renew/renew",
                       {"lease_id": lease_id, "lease_s": 10**6})[0] == 400  # above --max-lease
        status, _ = post_json(agent.url + "/deploy", {"name": "t-renew", "image": TEST_IMAGE,
                                                      "lease_s": 10**6})
        assert status == 400
        status, _ = post_json(agent.url + "/deploy", {"name": "t-renew", "image": TEST_IMAGE,
                                                      "lease_s": 2, "lease_id": "unknown"})
        assert status == 404
        assert request(agent, "DELETE", f"/services/t-renew/leases/{lease_id}") == (
            200, {"ok": True, "name": "t-renew", "lease_id": lease_id, "stopped": True, "idle_until": None})
        assert "t-renew" not in agent.services() and test_containers() == []

    def test_unleased_deploy_pins_a_leased_service(self, agent: AgentProcess) -> None:
        deploy(agent, "t-pin", lease_s=1)
        deploy(agent, "t-pin")  # someone wants it for good
        time.sleep(2.5)
        assert agent.services()["t-pin"]["status"] == "healthy"
        assert agent.services()["t-pin"]["leases"] == 0
        deploy(agent, "t-pinned-first")
        leased = deploy(agent, "t-pinned-first", lease_s=1)
        assert leased["lease_id"]  # a lease, though it won't stop the service
        time.sleep(2.5)
        assert "t-pinned-first" in agent.services()


class TestLeasesAcrossRestarts:
    """Expiries live in the state file; a lost file neither pins nor kills early."""

    def test_agent_down_longer_than_the_lease(self, agent: AgentProcess) -> None:
        answer = deploy(agent, "t-down", lease_s=5, keep_warm_s=0)
        agent.stop()
        time.sleep(6)  # the lease ran out while nobody could renew it
        agent.start()
        assert agent.services()["t-down"]["leases"] == 1  # a full lease_s from the restart
        status, _ = request(agent, "POST", "/services/t-down/renew", {"lease_id": answer["lease_id"]})
        assert status == 200
        wait_until(lambda: "t-down" not in agent.services(), timeout=12)

    def test_lost_state_file_restores_the_creators_lease(self, agent: AgentProcess) -> None:
        creator = deploy(agent, "t-lost-lease", lease_s=30)
        later = deploy(agent, "t-lost-lease", lease_s=30)
        deploy(agent, "t-lost-pinned")
        agent.stop(signal.SIGKILL)
        (agent.state_dir / "services.json").unlink()
        agent.start()
        services = agent.services()
        assert services["t-lost-lease"]["leases"] == 1 and services["t-lost-pinned"]["leases"] == 0
        assert request(agent, "POST", "/services/t-lost-lease/renew",
                       {"lease_id": creator["lease_id"], "lease_s": 1})[0] == 200
        assert request(agent, "POST", "/services/t-lost-lease/renew",
                       {"lease_id": later["lease_id"]})[0] == 404  # documented: deploy again
        wait_until(lambda: "t-lost-lease" not in agent.services(), timeout=5)
        assert "t-lost-pinned" in agent.services()  # created unleased: never stopped by leases


class TestClientLeases:
    """The clients' leased(): renewed in the background, released on exit and on errors."""

    def test_sync_leased_renews_and_releases(self, agent: AgentProcess) -> None:
        with AgentClient(agent.url) as client:
            with client.leased({"name": "t-ctx", "image": TEST_IMAGE, "keep_warm_s": 0},
                               lease_s=3) as service:  # renewed each 1 s: room for a slow answer
                assert service.lease_id
                time.sleep(4)  # longer than the lease: only renewals keep it
                assert client.service("t-ctx").status == "healthy"
            assert "t-ctx" not in agent.services()  # released on exit: its last lease
            with pytest.raises(RuntimeError, match="boom"), \
                    client.leased({"name": "t-ctx-err", "image": TEST_IMAGE, "keep_warm_s": 0}, lease_s=30):
                raise RuntimeError("boom")
            assert "t-ctx-err" not in agent.services()
            with pytest.raises(LeaseNotFoundError):
                client.renew("t-ctx", "gone")

    async def test_async_leased(self, agent: AgentProcess) -> None:
        async with AsyncAgentClient(agent.url) as client:
            async with client.leased({"name": "t-actx", "image": TEST_IMAGE, "keep_warm_s": 0},
                                     lease_s=3) as service:
                await asyncio.sleep(4)  # longer than the lease: only renewals keep it
                assert (await client.service("t-actx")).leases == 1
                assert service.name == "t-actx"
            assert "t-actx" not in agent.services()
            assert [e.reason for e in await client.events() if e.service == "t-actx"][-1] \
                == "lease_expired"

    def test_deployctl_lease_renew_and_events(self, agent: AgentProcess, tmp_path: Path) -> None:
        env = {k: v for k, v in os.environ.items() if k not in ("COMPUTE_NODES", "DEPLOY_AGENT_TOKEN")}
        env["COMPUTE_NODES"] = agent.url
        manifest = tmp_path / "service.yaml"
        manifest.write_text(json.dumps({"name": "t-ctl-lease", "keep_warm_s": 0,
                                        "deploy": {"image": TEST_IMAGE}}))

        def ctl(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([installed("deployctl"), *args], capture_output=True, text=True,
                                  env=env, timeout=60)

        deployed = ctl("deploy", "--lease", "10s", "--json", str(manifest))
        assert deployed.returncode == 0, deployed.stderr
        lease_id = json.loads(deployed.stdout)["lease_id"]
        renewed = ctl("renew", "t-ctl-lease", lease_id, "--lease", "30s")
        assert renewed.returncode == 0 and lease_id in renewed.stdout, renewed.stderr
        assert ctl("renew", "t-ctl-lease", "nope").returncode == 1
        released = ctl("release", "t-ctl-lease", lease_id)
        assert released.returncode == 0 and "stopped" in released.stdout
        listed = ctl("events", "--json")
        kinds_seen = [json.loads(line)["kind"] for line in listed.stdout.splitlines()]
        assert kinds_seen[-2:] == ["deployed", "stopped"]
        assert ctl("deploy", "--lease", "forever", str(manifest)).returncode == 2  # usage error
        # An id that starts with '-' (an older agent's, kept across a restart) goes after `--`,
        # as deployctl's hints print it: then it reaches the node (1: no such lease), not 2.
        assert ctl("renew", "t-ctl-lease", "-7mwOld").returncode == 2
        assert ctl("renew", "t-ctl-lease", "--", "-7mwOld").returncode == 1
        assert ctl("release", "t-ctl-lease", "--", "-7mwOld").returncode == 1

    def test_deployctl_events_past_a_silent_node(self, agent: AgentProcess) -> None:
        """A node that takes the connection and never answers is left out after the probe
        time-out, not waited on; when no node answers, that is an error."""
        deploy(agent, "t-ctl-events")
        with socket.socket() as silent:
            silent.bind(("127.0.0.1", 0))
            silent.listen()
            silent_url = f"http://127.0.0.1:{silent.getsockname()[1]}"

            def events(*nodes: str) -> subprocess.CompletedProcess[str]:
                env = {k: v for k, v in os.environ.items() if k != "DEPLOY_AGENT_TOKEN"}
                env["COMPUTE_NODES"] = ",".join(nodes)
                return subprocess.run([installed("deployctl"), "events", "--json"], capture_output=True,
                                      text=True, env=env, timeout=60)

            started = time.monotonic()
            listed = events(agent.url, silent_url)
            assert listed.returncode == 0, listed.stderr
            assert time.monotonic() - started < 30
            rows = [json.loads(line) for line in listed.stdout.splitlines()]
            assert ("deployed", "t-ctl-events") in [(r["kind"], r["service"]) for r in rows]
            assert {r["node"] for r in rows} == {agent.url}
            alone = events(silent_url)
            assert alone.returncode == 1 and "No node answered" in alone.stderr
