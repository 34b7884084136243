"""Restarts, crashes, lost state and signals, with real agent processes and the real engine."""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.agent_process import AgentProcess, get_json, post_json
from tests.conftest import TEST_IMAGE, remove_test_containers
from tests.test_api_docker import test_containers

pytestmark = pytest.mark.docker


@pytest.fixture
def agent(tmp_path: Path, test_image: str) -> Iterator[AgentProcess]:
    remove_test_containers()
    process = AgentProcess(tmp_path / "state")
    process.start()
    try:
        yield process
    finally:
        process.close()
        remove_test_containers()


def deploy(agent: AgentProcess, name: str, **body: Any) -> dict[str, Any]:
    status, answer = post_json(agent.url + "/deploy", {"name": name, "image": TEST_IMAGE, **body})
    assert status == 200, answer
    return dict(answer)


def wait_until(condition: Any, timeout: float = 10.0) -> float:
    """Seconds until condition() is true; fails after timeout."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, "condition not reached in time"
        time.sleep(0.02)
    return time.monotonic() - started


def state_document(agent: AgentProcess) -> dict[str, Any]:
    return dict(json.loads((agent.state_dir / "services.json").read_text()))


class TestRestart:
    """A restarted agent adopts its containers: nothing lost, nothing doubled."""

    def test_sigkill_with_20_services_keeps_them_and_idempotency(self, agent: AgentProcess) -> None:
        names = [f"t-keep-{i}" for i in range(20)]
        with ThreadPoolExecutor(max_workers=8) as pool:
            first = dict(zip(names, pool.map(lambda name: deploy(agent, name), names), strict=True))
        agent.stop(signal.SIGKILL)
        agent.start()
        services = agent.services()
        assert set(services) == set(names)
        for name, answer in first.items():
            assert services[name]["host"] == answer["host"] and services[name]["status"] == "healthy"
        again = deploy(agent, "t-keep-0")
        assert again["already_running"] is True and again["host"] == first["t-keep-0"]["host"]
        fresh = deploy(agent, "t-keep-new")  # the adopted ports stay reserved
        assert fresh["port"] not in {a["port"] for a in first.values()}
        assert len(test_containers()) == 21

    def test_container_removed_while_down_is_dropped(self, agent: AgentProcess) -> None:
        deploy(agent, "t-gone")
        deploy(agent, "t-stay")
        agent.stop(signal.SIGKILL)
        subprocess.run(["docker", "rm", "-f", "tidybot-t-gone"], check=True, capture_output=True)
        agent.start()
        assert set(agent.services()) == {"t-stay"}
        assert [s["spec"]["name"] for s in state_document(agent)["services"]] == ["t-stay"]

    def test_lost_state_file_is_rebuilt_from_labels(self, agent: AgentProcess) -> None:
        deploy(agent, "t-lost", env={"MODEL": "m.pt"}, port=8000)
        agent.stop()
        (agent.state_dir / "services.json").unlink()
        agent.start()
        assert agent.services()["t-lost"]["status"] == "healthy"
        assert deploy(agent, "t-lost", env={"MODEL": "m.pt"})["already_running"] is True
        assert [s["spec"]["name"] for s in state_document(agent)["services"]] == ["t-lost"]

    def test_corrupt_state_file_is_kept_aside_and_rebuilt(self, agent: AgentProcess) -> None:
        deploy(agent, "t-corrupt")
        agent.stop()
        (agent.state_dir / "services.json").write_text('{"version": 1, "services": [{"trunc')
        agent.start()
        assert "t-corrupt" in agent.services()
        kept = list(agent.state_dir.glob("services.json.corrupt-*"))
        assert len(kept) == 1 and kept[0].read_text().endswith('{"trunc')
        assert [s["spec"]["name"] for s in state_document(agent)["services"]] == ["t-corrupt"]


def kill_and_see_it_exited(agent: AgentProcess, name: str) -> None:
    """docker kill its container; the agent must show it exited (or restarting), within a bound."""
    subprocess.run(["docker", "kill", f"tidybot-{name}"], check=True, capture_output=True)
    wait_until(lambda: agent.services()[name]["status"] in ("exited", "restarting"), timeout=10)


class TestLiveReconcile:
    """Container events show in /services at once."""

    def test_killed_service_shows_exited_from_its_event(self, tmp_path: Path, test_image: str) -> None:
        # No periodic resync within the test (the later flag wins): only the engine's "die"
        # event can tell the agent, and a bound on the wait, not a timing, says it did.
        remove_test_containers()
        agent = AgentProcess(tmp_path / "events-only", "--resync-interval", "3600")
        agent.start()
        try:
            deploy(agent, "t-killed")
            kill_and_see_it_exited(agent, "t-killed")
        finally:
            agent.close()
            remove_test_containers()

    def test_stopped_service_shows_exit_code_then_recovers_on_restart(
        self, agent: AgentProcess
    ) -> None:
        deploy(agent, "t-cycle")
        subprocess.run(["docker", "stop", "-t", "0", "tidybot-t-cycle"], check=True, capture_output=True)
        wait_until(lambda: agent.services()["t-cycle"]["status"] == "exited")
        assert agent.services()["t-cycle"]["exit_code"] is not None
        subprocess.run(["docker", "start", "tidybot-t-cycle"], check=True, capture_output=True)
        wait_until(lambda: agent.services()["t-cycle"]["status"] == "healthy")
        assert agent.services()["t-cycle"]["restarts"] >= 1
        assert agent.services()["t-cycle"]["exit_code"] is None

    def test_removed_behind_its_back_is_dropped(self, agent: AgentProcess) -> None:
        deploy(agent, "t-rm")
        subprocess.run(["docker", "rm", "-f", "tidybot-t-rm"], check=True, capture_output=True)
        wait_until(lambda: "t-rm" not in agent.services(), timeout=3)


class TestCrashMidDeploy:
    """SIGKILL during a deploy leaves nothing the restarted agent doesn't track or remove."""

    def test_sigkill_during_health_wait(self, agent: AgentProcess) -> None:
        pending = agent.deploy_in_background(
            {"name": "t-mid", "image": TEST_IMAGE, "env": {"DELAY": "2"}})
        wait_until(lambda: test_containers() == ["tidybot-t-mid"])
        agent.stop(signal.SIGKILL)
        pending["thread"].join(5)
        agent.start()
        assert "t-mid" in agent.services()  # tracked again
        wait_until(lambda: agent.services()["t-mid"]["status"] == "healthy")
        assert deploy(agent, "t-mid", env={"DELAY": "2"})["already_running"] is True
        assert post_json(agent.url + "/stop", {"name": "t-mid"})[0] == 200
        assert test_containers() == []

    def test_killed_between_create_and_start_is_started_on_restart(self, agent: AgentProcess) -> None:
        agent.stop(signal.SIGKILL)
        spec = json.dumps({"name": "t-created", "image": TEST_IMAGE, "port": 8000})
        subprocess.run(  # as the deploy left it: created with the agent's labels, never started
            ["docker", "create", "--name", "tidybot-t-created", "-p", "127.0.0.1:28598:8000",
             "--label", f"tidybot.deploy-agent=test-{agent.port}", "--label",
             "tidybot.attempt=killed-attempt", "--label", f"tidybot.spec={spec}",
             "--label", "tidybot.host-port=28598", TEST_IMAGE],
            capture_output=True, text=True, check=True)
        agent.start()
        assert agent.services()["t-created"]["status"] != "exited"  # no exit happened
        wait_until(lambda: agent.services()["t-created"]["status"] == "healthy")
        assert deploy(agent, "t-created")["already_running"] is True
        assert post_json(agent.url + "/stop", {"name": "t-created"})[0] == 200
        assert test_containers() == []


class TestGracefulShutdown:
    """SIGTERM lets a deploy in flight finish, flushes state, exits 0; services keep running."""

    def test_deploy_in_flight_finishes(self, agent: AgentProcess) -> None:
        deploy(agent, "t-before")
        pending = agent.deploy_in_background(
            {"name": "t-during", "image": TEST_IMAGE, "env": {"DELAY": "1"}})
        wait_until(lambda: "tidybot-t-during" in test_containers())
        assert agent.stop(signal.SIGTERM) == 0
        pending["thread"].join(5)
        assert pending.get("status") == 200, pending
        running = subprocess.run(["docker", "ps", "--format", "{{.Names}}"], capture_output=True,
                                 text=True, check=True).stdout.split()
        assert {"tidybot-t-before", "tidybot-t-during"} <= set(running)
        names = {s["spec"]["name"] for s in state_document(agent)["services"]}
        assert names == {"t-before", "t-during"}

    def test_deploy_past_the_bound_is_rolled_back(self, tmp_path: Path, test_image: str) -> None:
        agent = AgentProcess(tmp_path / "state", "--shutdown-timeout", "0.5")
        agent.start()
        try:
            pending = agent.deploy_in_background(
                {"name": "t-slowstop", "image": TEST_IMAGE, "env": {"DELAY": "20"}})
            wait_until(lambda: "tidybot-t-slowstop" in test_containers())
            started = time.monotonic()
            assert agent.stop(signal.SIGTERM) == 0
            assert time.monotonic() - started < 10
            pending["thread"].join(5)
            assert test_containers() == []
        finally:
            agent.close()
            remove_test_containers()

    def test_sigint_exits_0(self, agent: AgentProcess) -> None:
        assert agent.stop(signal.SIGINT) == 0
        assert (agent.state_dir / "services.json").exists()


class TestEngineRefusals:
    """One container the engine can't remove is that container's problem, not "engine lost"."""

    def test_an_unremovable_container_never_flaps_engine_lost(self, agent: AgentProcess) -> None:
        deploy(agent, "t-fine")
        agent.stop()
        attempt = "stuck-attempt"
        document = state_document(agent)
        document["abandoned"].append({"attempt": attempt, "name": "t-stuck", "since": time.time()})
        (agent.state_dir / "services.json").write_text(json.dumps(document))
        spec = json.dumps({"name": "t-stuck", "image": TEST_IMAGE})
        container = subprocess.run(
            ["docker", "create", "--name", "tidybot-t-stuck", "--label",
             f"tidybot.deploy-agent=test-{agent.port}", "--label", f"tidybot.attempt={attempt}",
             "--label", f"tidybot.spec={spec}", "--label", "tidybot.host-port=28599", TEST_IMAGE],
            capture_output=True, text=True, check=True).stdout.strip()
        upper = Path(subprocess.run(["docker", "inspect", "-f", "{{.GraphDriver.Data.UpperDir}}", container],
                                    capture_output=True, text=True, check=True).stdout.strip())
        stuck = upper / "stuck"
        stuck.touch()
        subprocess.run(["chattr", "+i", str(stuck)], check=True)  # the engine can't remove it now
        try:
            agent.start()
            resyncs = metric(agent, "deploy_agent_resyncs_total")
            wait_until(lambda: metric(agent, "deploy_agent_resyncs_total") >= resyncs + 4, timeout=15)
            kinds = {e["kind"] for e in get_json(agent.url + "/events")}
            assert not {"engine_lost", "engine_back"} & kinds
            health = get_json(agent.url + "/health")
            [refused] = [w for w in health["warnings"] if w["code"] == "engine_refused"]
            assert container[:12] in refused["message"] and health["engine"] == "reachable"
            assert metric(agent, "deploy_agent_resync_refusals_total") >= 4  # retried every pass
            assert get_json(agent.url + "/services/t-fine")["status"] == "healthy"  # still probed
            assert deploy(agent, "t-after")["status"] == "healthy"
        finally:
            subprocess.run(["chattr", "-i", str(stuck)], check=True)
        wait_until(lambda: not subprocess.run(["docker", "ps", "-aq", "--filter", f"id={container}"],
                                              capture_output=True, text=True).stdout.strip(), timeout=15)
        wait_until(lambda: not [w for w in get_json(agent.url + "/health")["warnings"]
                                if w["code"] == "engine_refused"], timeout=10)


def metric(agent: AgentProcess, name: str) -> float:
    """One unlabelled sample of the agent's /metrics."""
    with urllib.request.urlopen(urllib.request.Request(agent.url + "/metrics"), timeout=5) as response:
        text = response.read().decode()
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))
