"""Holds (#23, point 1): pinned, leased, idle. A service whose last lease ends is kept warm
(idle) for keep_warm_s, then stops with reason idle_expired; a deploy of it meanwhile is
instant. Real agent processes on the real engine, with a simulated GPU."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

import pytest

from tests.agent_process import AgentProcess, AgentProcesses, get_json, post_json
from tests.conftest import TEST_IMAGE
from tests.test_leases_events import kinds, request
from tests.test_restarts import wait_until

pytestmark = pytest.mark.docker


@pytest.fixture
def agent(agent_processes: AgentProcesses) -> AgentProcess:
    return agent_processes.start("--fake-gpus", "RTX 4090:24", "--max-keep-warm", "2m")


def deploy(agent: AgentProcess, name: str, **fields: Any) -> dict[str, Any]:
    status, answer = post_json(agent.url + "/deploy", {"name": name, "image": TEST_IMAGE, **fields})
    assert status == 200, answer
    return dict(answer)


def seconds_until(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp() - time.time()


def release(agent: AgentProcess, name: str, lease_id: str) -> dict[str, Any]:
    status, answer = request(agent, "DELETE", f"/services/{name}/leases/{lease_id}")
    assert status == 200, answer
    return dict(answer)


class TestKeptWarm:
    def test_released_service_stays_warm_and_comes_back_at_once(self, agent: AgentProcess) -> None:
        first = deploy(agent, "t-warm", gpu=True, vram_gb=6, lease_s=30, keep_warm_s=60)
        assert agent.services()["t-warm"]["hold"] == "leased"
        released = release(agent, "t-warm", first["lease_id"])
        assert released["stopped"] is False and 55 < seconds_until(released["idle_until"]) <= 60
        entry = agent.services()["t-warm"]
        assert (entry["hold"], entry["idle_until"], entry["status"]) == (
            "idle", released["idle_until"], "healthy")
        gpu = get_json(agent.url + "/gpus")[0]
        assert (gpu["vram_idle_gb"], gpu["vram_reserved_gb"]) == (6, 6)
        assert kinds(agent, "t-warm")[-1] == ("idle", "released")
        again = deploy(agent, "t-warm", gpu=True, vram_gb=6, lease_s=30)
        assert again["already_running"] is True and again["port"] == first["port"]  # no new start
        entry = agent.services()["t-warm"]
        assert (entry["hold"], entry["idle_until"], entry["leases"]) == ("leased", None, 1)
        assert get_json(agent.url + "/gpus")[0]["vram_idle_gb"] == 0

    def test_idle_expires_and_stops(self, agent: AgentProcess) -> None:
        answer = deploy(agent, "t-expire", lease_s=30, keep_warm_s=1.5)
        release(agent, "t-expire", answer["lease_id"])
        assert agent.services()["t-expire"]["hold"] == "idle"
        wait_until(lambda: kinds(agent, "t-expire")[-1] == ("stopped", "idle_expired"), timeout=6)
        assert kinds(agent, "t-expire")[-2] == ("idle", "released")
        assert "t-expire" not in agent.services()

    def test_a_lapsed_lease_turns_it_idle(self, agent: AgentProcess) -> None:
        deploy(agent, "t-lapse", lease_s=1, keep_warm_s=30)
        wait_until(lambda: agent.services()["t-lapse"]["hold"] == "idle", timeout=5)
        assert kinds(agent, "t-lapse")[-1] == ("idle", "lease_expired")

    def test_default_keep_warm_and_the_cap(self, agent: AgentProcess,
                                          agent_processes: AgentProcesses) -> None:
        plain = agent_processes.start()  # the defaults: --keep-warm 5m, --max-keep-warm 1h
        default = deploy(plain, "t-default", lease_s=30)
        assert 295 < seconds_until(release(plain, "t-default", default["lease_id"])["idle_until"]) <= 300
        again = deploy(agent, "t-default-2", lease_s=30)  # this agent's --max-keep-warm 2m caps it
        assert 115 < seconds_until(release(agent, "t-default-2", again["lease_id"])["idle_until"]) <= 120
        capped = deploy(agent, "t-capped", lease_s=30, keep_warm_s=3600)  # --max-keep-warm 2m
        assert 115 < seconds_until(release(agent, "t-capped", capped["lease_id"])["idle_until"]) <= 120

    def test_the_largest_holder_value_applies(self, agent: AgentProcess) -> None:
        short = deploy(agent, "t-most", lease_s=30, keep_warm_s=1)
        long = deploy(agent, "t-most", lease_s=30, keep_warm_s=90)
        assert release(agent, "t-most", long["lease_id"])["idle_until"] is None  # still held
        assert 85 < seconds_until(release(agent, "t-most", short["lease_id"])["idle_until"]) <= 90

    def test_unleased_deploy_pins_an_idle_service(self, agent: AgentProcess) -> None:
        answer = deploy(agent, "t-pin-idle", lease_s=30, keep_warm_s=1)
        release(agent, "t-pin-idle", answer["lease_id"])
        assert deploy(agent, "t-pin-idle")["already_running"] is True
        time.sleep(2)
        entry = agent.services()["t-pin-idle"]
        assert (entry["hold"], entry["idle_until"]) == ("pinned", None)

    def test_a_different_spec_replaces_an_idle_service_without_replace(self, agent: AgentProcess) -> None:
        answer = deploy(agent, "t-swap", lease_s=30)
        assert post_json(agent.url + "/deploy", {"name": "t-swap", "image": TEST_IMAGE,
                                                 "env": {"V": "2"}})[0] == 409  # held: no
        release(agent, "t-swap", answer["lease_id"])
        swapped = deploy(agent, "t-swap", env={"V": "2"})
        assert swapped["already_running"] is False
        assert agent.services()["t-swap"]["hold"] == "pinned"
        assert ("replaced", "spec_changed") in kinds(agent, "t-swap")

    def test_idle_until_survives_a_restart(self, agent: AgentProcess) -> None:
        answer = deploy(agent, "t-restart-idle", lease_s=30, keep_warm_s=60)
        idle_until = release(agent, "t-restart-idle", answer["lease_id"])["idle_until"]
        agent.stop()
        agent.start()
        entry = agent.services()["t-restart-idle"]
        assert (entry["hold"], entry["idle_until"], entry["leases"]) == ("idle", idle_until, 0)

    def test_keep_warm_is_checked(self, agent: AgentProcess) -> None:
        for body, field in (({"keep_warm_s": 10}, "keep_warm_s"),
                            ({"lease_s": 10, "keep_warm_s": -1}, "keep_warm_s"),
                            ({"lease_s": 10, "keep_warm_s": "long"}, "keep_warm_s")):
            status, answer = post_json(agent.url + "/deploy", {"name": "t-kw", "image": TEST_IMAGE, **body})
            assert status == 400 and [d["field"] for d in answer["details"]] == [field], answer
        assert agent.services() == {}


@pytest.fixture
def roomy(agent_processes: AgentProcesses) -> AgentProcess:
    """One 24 GB GPU; idle services may be evicted as soon as they are idle."""
    return agent_processes.start("--fake-gpus", "RTX 4090:24", "--min-resident", "0")


def events_of(agent: AgentProcess, name: str) -> list[dict[str, Any]]:
    return [e for e in get_json(agent.url + "/events?limit=1000") if e["service"] == name]


class TestEviction:
    """A GPU deploy that fits nowhere evicts the cheapest idle services, and only those."""

    def test_evicts_exactly_the_least_recently_released(self, roomy: AgentProcess) -> None:
        old = deploy(roomy, "t-old", gpu=True, vram_gb=10, lease_s=30, keep_warm_s=60)
        new = deploy(roomy, "t-new", gpu=True, vram_gb=10, lease_s=30, keep_warm_s=60)
        release(roomy, "t-old", old["lease_id"])
        time.sleep(2)
        release(roomy, "t-new", new["lease_id"])
        planned = post_json(roomy.url + "/deploy?dry_run=1",
                            {"name": "t-big", "image": TEST_IMAGE, "gpu": True, "vram_gb": 12})
        assert planned[0] == 200 and planned[1]["evicts"] == ["t-old"], planned
        assert set(roomy.services()) == {"t-old", "t-new"}  # a dry run evicts nothing
        placed = deploy(roomy, "t-big", gpu=True, vram_gb=12)
        assert placed["gpu"] == 0
        assert set(roomy.services()) == {"t-new", "t-big"}
        last = events_of(roomy, "t-old")[-1]
        assert (last["kind"], last["reason"]) == ("evicted", "t-big")
        assert (last["details"]["gpu"], last["details"]["freed_gb"]) == (0, 10)
        gpu = get_json(roomy.url + "/gpus")[0]
        assert (gpu["vram_reserved_gb"], gpu["vram_idle_gb"]) == (22, 10)

    def test_never_leased_or_pinned_and_nothing_when_it_cannot_fit(self, roomy: AgentProcess) -> None:
        deploy(roomy, "t-pinned", gpu=True, vram_gb=8)
        deploy(roomy, "t-leased", gpu=True, vram_gb=8, lease_s=60)
        idle = deploy(roomy, "t-idle", gpu=True, vram_gb=6, lease_s=30, keep_warm_s=60)
        release(roomy, "t-idle", idle["lease_id"])
        status, answer = post_json(roomy.url + "/deploy", {"name": "t-huge", "image": TEST_IMAGE,
                                                           "gpu": True, "vram_gb": 10})
        assert (status, answer["error"]) == (503, "no_gpu_capacity")  # 2 free + 6 idle < 10
        assert set(roomy.services()) == {"t-pinned", "t-leased", "t-idle"}
        assert not [e for e in get_json(roomy.url + "/events?limit=1000") if e["kind"] == "evicted"]
        assert get_json(roomy.url + "/gpus")[0]["vram_reserved_gb"] == 22

    def test_a_young_idle_service_stays(self, agent: AgentProcess) -> None:
        """--min-resident (60 s by default) keeps two callers from swapping each other out."""
        first = deploy(agent, "t-young", gpu=True, vram_gb=16, lease_s=30, keep_warm_s=60)
        release(agent, "t-young", first["lease_id"])
        status, _ = post_json(agent.url + "/deploy", {"name": "t-other", "image": TEST_IMAGE,
                                                      "gpu": True, "vram_gb": 16})
        assert status == 503 and set(agent.services()) == {"t-young"}
