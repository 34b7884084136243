"""`deploy-agent --swarm` in front of a real two-node Docker Swarm on this machine.

The swarm is two dockerds in network namespaces (tests/swarm_lab.py), each with two fake
24 GB GPUs in its engine label. The agent runs as a process in the root namespace with
`--docker-host` on the manager's socket; it and the tests reach the nodes' addresses over
a veth of the lab's own. Only those addresses are used; the main dockerd is not touched.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from deploy_agent.backends.swarm.lock import HEARTBEAT_S, LOCK_CONFIG, STALE_BEATS, WATCH_BEATS
from tests.agent_process import COMMAND, AgentProcess, AgentProcesses, free_port, get_json, post_json
from tests.conftest import TEST_IMAGE
from tests.swarm_lab import NODES, SwarmLab, can_build
from tests.test_restarts import wait_until

pytestmark = [pytest.mark.docker,
              pytest.mark.skipif(not can_build(), reason="needs root, ip and unshare (network namespaces)")]


@contextlib.contextmanager
def running_lab(test_image: str, gpus_per_node: int = 2) -> Iterator[SwarmLab]:
    """A swarm lab, up; torn down afterwards and checked to have left nothing on the machine."""
    lab = SwarmLab(gpus_per_node=gpus_per_node)
    lab.up(test_image)
    try:
        yield lab
    except BaseException:
        print(lab.log_tails())  # the report shows it; down() removes the logs
        raise
    finally:
        lab.down()
    assert lab.leftovers() == {"namespaces": [], "links": [], "mounts": [], "cgroups": [], "processes": []}


@pytest.fixture(scope="module")
def lab(test_image: str) -> Iterator[SwarmLab]:
    with running_lab(test_image) as swarm:
        yield swarm


@pytest.fixture
def agents(lab: SwarmLab, tmp_path: Path) -> Iterator[Callable[..., AgentProcess]]:
    """Agents in front of the lab's swarm; their Swarm services are removed afterwards."""
    processes = AgentProcesses(tmp_path, "--swarm", "--docker-host", lab.socket("manager"))
    try:
        yield processes.start
    finally:
        processes.close()
        remove_services(lab)


def remove_services(lab: SwarmLab) -> None:
    names = lab.docker("manager", "service", "ls", "-q", "--filter", "label=tidybot.deploy-agent",
                       check=False).stdout.split()
    if names:
        lab.docker("manager", "service", "rm", *names, check=False)
    lab.docker("manager", "config", "rm", "deploy-agent.lock", check=False)
    lab.wait(lambda: not lab.docker("manager", "ps", "-aq").stdout.strip()
             and not lab.docker("worker", "ps", "-aq").stdout.strip(), 30, "service containers gone")


DEPLOY_WAIT_S = 120  # beyond the default ready_timeout (60 s): a deploy that fails says why


def deploy(agent: AgentProcess, name: str, **body: Any) -> tuple[int, dict[str, Any]]:
    status, answer = post_json(agent.url + "/deploy", {"name": name, "image": TEST_IMAGE, **body},
                               timeout=DEPLOY_WAIT_S)
    return status, dict(answer)


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


class TestPlacement:
    """GPUs from the nodes' labels, spread across GPUs and nodes, never over-committed."""

    def test_gpus_spread_reachable_and_full(self, lab: SwarmLab, agents: Any) -> None:
        agent = agents()
        gpus = get_json(agent.url + "/gpus")
        assert sorted((g["node_name"], g["id"]) for g in gpus) == sorted(
            (lab.hostname(node), i) for node in NODES for i in range(2))
        assert {g["vram_used_gb"] for g in gpus} == {None}  # not seen from the manager

        placed = [deploy(agent, f"t-sw-{i}", gpu=True, vram_gb=16) for i in range(4)]
        assert [status for status, _ in placed] == [200] * 4, placed
        assert sorted((a["host"].split("//")[1].split(":")[0], a["gpu"]) for _, a in placed) == sorted(
            (lab.addr(node), i) for node in NODES for i in range(2))  # one per GPU, both nodes
        for _, answer in placed:
            assert answers(answer["host"]), answer
        listed = {s["name"]: s for s in get_json(agent.url + "/services")}
        assert {s["node_name"] for s in listed.values()} == {lab.hostname(n) for n in NODES}

        status, refused = deploy(agent, "t-sw-fifth", gpu=True, vram_gb=16)
        assert (status, refused["error"]) == (503, "no_gpu_capacity")
        assert sorted(refused["free_gb"]) == sorted(f"{lab.hostname(n)}/{i}" for n in NODES for i in range(2))

        service = lab.docker("manager", "service", "inspect", "tidybot-t-sw-0").stdout
        spec = json.loads(service)[0]["Spec"]
        assert spec["EndpointSpec"]["Mode"] == "dnsrr"
        assert spec["EndpointSpec"]["Ports"][0]["PublishMode"] == "host"
        assert spec["TaskTemplate"]["Placement"]["Constraints"][0].startswith("node.id==")
        env = spec["TaskTemplate"]["ContainerSpec"]["Env"]
        assert any(e.startswith("NVIDIA_VISIBLE_DEVICES=GPU-") for e in env)
        # Unlimited memlock where a node's engine can give it; these nodes' engines (in this
        # machine's sandbox) can't: each was found out once, its services started without.
        memlock = [w for w in get_json(agent.url + "/health")["warnings"] if w["code"] == "memlock_refused"]
        ulimits = spec["TaskTemplate"]["ContainerSpec"].get("Ulimits")
        assert bool(memlock) != bool(ulimits), (memlock, ulimits)
        if memlock:
            assert all(lab.hostname(node) in memlock[0]["message"] for node in NODES)

        assert post_json(agent.url + "/stop", {"name": "t-sw-0"})[0] == 200
        assert "tidybot-t-sw-0" not in lab.docker("manager", "service", "ls", "--format", "{{.Name}}").stdout

    def test_parallel_deploys_never_over_commit(self, lab: SwarmLab, agents: Any) -> None:
        agent = agents()
        with ThreadPoolExecutor(10) as pool:
            results = list(pool.map(lambda i: deploy(agent, f"t-par-{i}", gpu=True, vram_gb=10), range(10)))
        statuses = sorted(status for status, _ in results)
        assert statuses == [200] * 8 + [503] * 2, results
        for gpu in get_json(agent.url + "/gpus"):
            assert gpu["vram_reserved_gb"] <= 24 and len(gpu["services"]) == 2


class TestOnTheNodes:
    """What happens on the nodes reaches the agent: taken ports, crashes and restarts."""

    def test_port_taken_on_the_node_goes_to_the_next(self, lab: SwarmLab, agents: Any) -> None:
        agent = agents()
        squatters = [lab.docker(node, "run", "-d", "-p", "28500:8000", TEST_IMAGE).stdout.strip()
                     for node in NODES]  # outside the swarm: its scheduler can't know
        try:
            status, answer = deploy(agent, "t-port", ready_timeout=30)
            assert status == 200, answer
            assert answer["port"] == 28501 and answers(answer["host"])
        finally:
            for node, container in zip(NODES, squatters, strict=True):
                lab.docker(node, "rm", "-f", container)

    def test_a_port_taken_on_restart_moves_once(self, lab: SwarmLab, agents: Any) -> None:
        """A squatter takes the port while the task restarts: placed again on another port of
        that node, once; the refused port is not offered there again at once."""
        agent = agents()
        status, answer = deploy(agent, "t-squat")
        assert status == 200, answer
        taken = answer["port"]
        node = next(n for n in NODES if answer["host"].startswith(f"http://{lab.addr(n)}:"))
        node_id = get_json(agent.url + "/services/t-squat")["node_id"]
        container = lab.docker(node, "ps", "-q", "--filter",
                               "label=com.docker.swarm.service.name=tidybot-t-squat").stdout.split()[0]
        lab.docker(node, "kill", container)  # Swarm starts it again after its 1 s restart delay
        squatter = lab.docker(node, "run", "-d", "-p", f"{taken}:8000", TEST_IMAGE).stdout.strip()
        try:
            def moved() -> bool:
                found = get_json(agent.url + "/services/t-squat")
                return bool(found["port"] != taken and found["status"] == "healthy")

            wait_until(moved, timeout=60)
            time.sleep(2)  # a few resyncs more: it must stay where it is
            found = get_json(agent.url + "/services/t-squat")
            assert found["node_id"] == node_id and answers(found["host"]), found
            moves = [e for e in get_json(agent.url + "/events")
                     if e["service"] == "t-squat" and e["kind"] == "rescheduled"]
            assert [(e["reason"], e["details"]["port"]) for e in moves] == [("port_taken", found["port"])]
        finally:
            lab.docker(node, "rm", "-f", squatter)

    def test_a_replace_never_runs_old_and_new_at_once(self, lab: SwarmLab, agents: Any) -> None:
        """A GPU service filling its GPU, replaced: its task is gone before the new one starts."""
        agent = agents("--stop-timeout", "3")
        stubborn = ["sh", "-c", "trap '' TERM; exec httpd -f -p 8000 -h /www"]  # killed after the grace
        since = str(int(time.time()) - 1)
        status, first = deploy(agent, "t-swap", gpu=True, vram_gb=24, env={"V": "1"}, command=stubborn)
        assert status == 200, first
        status, second = deploy(agent, "t-swap", gpu=True, vram_gb=24, env={"V": "2"}, replace=True,
                                command=stubborn)
        assert status == 200, second
        label = "label=com.docker.swarm.service.name=tidybot-t-swap"
        running = [c for n in NODES for c in lab.docker(n, "ps", "-q", "--filter", label).stdout.split()]
        assert len(running) == 1, running  # the new one only: the old one is gone already
        until = str(int(time.time()) + 1)
        actions = sorted((int(stamp), action) for n in NODES for stamp, action in (
            line.split() for line in lab.docker(
                n, "events", "--since", since, "--until", until, "--filter", "type=container",
                "--filter", label, "--format", "{{.TimeNano}} {{.Action}}").stdout.splitlines()
            if line.strip()))
        died = [stamp for stamp, action in actions if action == "die"]
        created = [stamp for stamp, action in actions if action == "create"]
        assert died and len(created) >= 2, actions
        assert died[0] < created[-1], actions  # the old one died before the new one was created

    def test_task_containers_are_hardened(self, lab: SwarmLab, agents: Any) -> None:
        """Capabilities dropped and no GPU for a service that asked for none, on the node."""
        agent = agents()
        status, answer = deploy(agent, "t-hard")
        assert status == 200, answer
        node = next(n for n in NODES if answer["host"].startswith(f"http://{lab.addr(n)}:"))
        container = lab.docker(node, "ps", "-q", "--filter",
                               "label=com.docker.swarm.service.name=tidybot-t-hard").stdout.split()[0]
        info = json.loads(lab.docker(node, "inspect", container).stdout)[0]
        assert {"CAP_NET_RAW", "CAP_MKNOD"} <= set(info["HostConfig"]["CapDrop"] or [])
        assert "NVIDIA_VISIBLE_DEVICES=void" in info["Config"]["Env"]

    def test_a_crash_on_a_node_is_an_event(self, lab: SwarmLab, agents: Any) -> None:
        agent = agents()
        status, answer = deploy(agent, "t-crash")
        assert status == 200, answer
        node = next(n for n in NODES if answer["host"].startswith(f"http://{lab.addr(n)}:"))
        container = lab.docker(node, "ps", "-q", "--filter",
                               "label=com.docker.swarm.service.name=tidybot-t-crash").stdout.split()[0]
        lab.docker(node, "exec", container, "sh", "-c", "kill -9 $(pidof httpd)")

        def seen() -> set[str]:
            return {e["kind"] for e in get_json(agent.url + "/events") if e["service"] == "t-crash"}

        wait_until(lambda: {"crashed", "restarted"} <= seen(), timeout=30)
        wait_until(lambda: get_json(agent.url + "/services/t-crash")["status"] == "healthy", timeout=30)
        assert get_json(agent.url + "/services/t-crash")["restarts"] == 1


class TestStore:
    """Swarm is the store: a restarted agent rebuilds its table; a second agent is refused."""

    def test_restart_rebuilds_the_table(self, lab: SwarmLab, agents: Any) -> None:
        agent = agents()
        for i in range(3):
            assert deploy(agent, f"t-keep-{i}", gpu=True, vram_gb=12)[0] == 200

        def placements() -> dict[str, tuple[str, int, int]]:
            services = get_json(agent.url + "/services")
            return {s["name"]: (s["node_name"], s["gpu"], s["port"]) for s in services}

        def reservations() -> list[tuple[str, int, float]]:
            return [(g["node_name"], g["id"], g["vram_reserved_gb"]) for g in get_json(agent.url + "/gpus")]

        before, reserved = placements(), reservations()
        agent.stop(signal.SIGKILL)
        (agent.state_dir / "services.json").unlink()  # the swarm alone must be enough
        agent.start()
        assert placements() == before and reservations() == reserved
        wait_until(lambda: {s["status"] for s in get_json(agent.url + "/services")} == {"healthy"},
                   timeout=15)
        assert deploy(agent, "t-keep-0", gpu=True, vram_gb=12)[1]["already_running"] is True

    def test_a_stop_cut_off_is_finished_not_undone(self, lab: SwarmLab, agents: Any) -> None:
        """Killed while a stop waited for the task to go: the next agent removes the service,
        never adopts it as pending and starts it again."""
        agent = agents()
        assert deploy(agent, "t-halfstop")[0] == 200
        agent.stop(signal.SIGKILL)
        # Where the stop was when the agent died: scaled to nothing, marked as ending.
        lab.docker("manager", "service", "update", "--detach", "--replicas", "0",
                   "--label-add", "tidybot.ending=1", "tidybot-t-halfstop")
        agent.start()
        assert "t-halfstop" not in {s["name"] for s in get_json(agent.url + "/services")}
        assert not lab.docker("manager", "service", "ls", "-q", "--filter",
                              "name=tidybot-t-halfstop").stdout.strip()
        since_start = [(e["kind"], e["reason"]) for e in get_json(agent.url + "/events")
                       if e["service"] == "t-halfstop" and e["kind"] != "deployed"]
        assert since_start == [("removed", "stop_finished")]

    def test_a_second_swarm_agent_is_refused(self, lab: SwarmLab, agents: Any, tmp_path: Path) -> None:
        agents()
        second = subprocess.run(
            [COMMAND, "--swarm", "--docker-host", lab.socket("manager"), "--host", "127.0.0.1",
             "--port", str(free_port()), "--state-dir", str(tmp_path / "second"), "--instance", "other"],
            capture_output=True, text=True, timeout=60)
        assert second.returncode != 0
        assert "another deploy-agent serves this swarm" in second.stderr and "Traceback" not in second.stderr


@pytest.fixture
def unstarted(lab: SwarmLab, agents: Any, tmp_path: Path) -> Iterator[Callable[..., AgentProcess]]:
    """Agents in front of the lab's swarm with the default instance name, each in a state
    dir of its own (or the one named), not started yet; killed afterwards."""
    made: list[AgentProcess] = []

    def make(state: str | None = None) -> AgentProcess:
        agent = AgentProcess(tmp_path / (state or f"lock-{len(made)}"), "--swarm", "--docker-host",
                             lab.socket("manager"), "--instance", "default")
        made.append(agent)
        return agent

    try:
        yield make
    finally:
        for agent in made:
            agent.close()


def outcome(agent: AgentProcess, timeout: float) -> int | None:
    """None once it serves; its exit code if it exits first."""
    assert agent.process is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if answers(agent.url):
            return None
        if (code := agent.process.poll()) is not None:
            agent.process = None
            return code
        time.sleep(0.1)
    raise AssertionError(f"agent neither served nor exited in {timeout} s: {agent.log.read_text()}")


class TestTheLock:
    """One agent per swarm, whatever its instance name: a restart takes its lock back, a
    second agent is refused by name, a killed holder's lock is taken over after a bound."""

    def test_a_second_agent_of_the_same_instance_is_refused(self, unstarted: Any) -> None:
        first = unstarted()
        first.start()
        second = unstarted()
        second.start(wait=False)
        assert outcome(second, 30) not in (None, 0)
        said = second.log.read_text()
        assert "another deploy-agent serves this swarm" in said and f"port {first.port}" in said
        assert "Traceback" not in said and answers(first.url)

    def test_a_restarted_agent_takes_its_lock_back(self, unstarted: Any, lab: SwarmLab) -> None:
        agent = unstarted()
        agent.start()
        holder = lock_labels(lab)["holder"]
        agent.stop(signal.SIGKILL)
        agent.start()  # at once: no waiting for the lock to go stale
        assert lock_labels(lab)["holder"] == holder

    def test_a_killed_holders_lock_is_taken_over(self, unstarted: Any, lab: SwarmLab) -> None:
        first = unstarted()
        first.start()
        first.stop(signal.SIGKILL)
        killed = time.monotonic()
        bound = HEARTBEAT_S * (STALE_BEATS + WATCH_BEATS)
        while True:  # each try refused while the killed one's heartbeat is fresh
            second = unstarted()
            second.start(wait=False)
            if outcome(second, bound + 30) is None:
                break
            assert "another deploy-agent serves this swarm" in second.log.read_text()
            assert time.monotonic() - killed < bound
        assert time.monotonic() - killed < bound + 15  # + one start and a refused try
        assert f"port {second.port}" in lock_labels(lab)["describe"]

    def test_a_thawed_holder_whose_lock_was_taken_stops_serving(self, unstarted: Any,
                                                                  lab: SwarmLab) -> None:
        """Frozen past the bound, another agent took over: thawed, it exits non-zero saying so,
        and never places services beside the one that serves now."""
        frozen = unstarted()
        frozen.start()
        assert frozen.process is not None
        frozen.process.send_signal(signal.SIGSTOP)
        try:
            bound = HEARTBEAT_S * (STALE_BEATS + WATCH_BEATS)
            deadline = time.monotonic() + bound + 60
            while True:  # refused while the frozen one's heartbeat is fresh
                second = unstarted()
                second.start(wait=False)
                if outcome(second, bound + 30) is None:
                    break
                assert time.monotonic() < deadline, second.log.read_text()
        finally:
            frozen.process.send_signal(signal.SIGCONT)
        code = frozen.process.wait(timeout=HEARTBEAT_S * 2 + 30)
        frozen.process = None
        said = frozen.log.read_text()
        assert code not in (0, None) and "stopped serving" in said and f"port {second.port}" in said
        assert answers(second.url) and f"port {second.port}" in lock_labels(lab)["describe"]

    def test_agents_started_at_once_one_serves(self, unstarted: Any) -> None:
        racers = [unstarted() for _ in range(3)]
        for agent in racers:
            agent.start(wait=False)
        outcomes = [outcome(agent, 60) for agent in racers]
        assert outcomes.count(None) == 1 and all(code not in (None, 0) for code in outcomes if code
                                                 is not None), outcomes
        [winner] = [agent for agent, code in zip(racers, outcomes, strict=True) if code is None]
        for loser in racers:
            if loser is not winner:
                said = loser.log.read_text()
                assert f"another deploy-agent serves this swarm: {socket.gethostname()} port " \
                       f"{winner.port}" in said and "Traceback" not in said and "409" not in said

    def test_a_clean_stop_lets_another_start_at_once(self, unstarted: Any) -> None:
        first = unstarted()
        first.start()
        assert first.stop() == 0
        unstarted().start()


def lock_labels(lab: SwarmLab) -> dict[str, str]:
    found = lab.docker("manager", "config", "inspect", LOCK_CONFIG, "--format", "{{json .Spec.Labels}}")
    return dict(json.loads(found.stdout))


class TestNodeLoss:
    """A node down longer than --node-grace: its services run again elsewhere."""

    @staticmethod
    @contextlib.contextmanager
    def losing_a_node(tmp_path: Path, test_image: str,
                      gpus_per_node: int = 2) -> Iterator[tuple[SwarmLab, AgentProcess]]:
        """A lab of the test's own (its worker will be killed) with a 1 s dispatcher heartbeat,
        and an agent in front of it with a 2 s --node-grace."""
        with running_lab(test_image, gpus_per_node) as lab:
            lab.docker("manager", "swarm", "update", "--dispatcher-heartbeat", "1s")
            processes = AgentProcesses(tmp_path, "--swarm", "--docker-host", lab.socket("manager"),
                                       "--node-grace", "2")
            try:
                yield lab, processes.start()
            finally:
                processes.close()

    def test_worker_lost_services_rescheduled(self, tmp_path: Path, test_image: str) -> None:
        with self.losing_a_node(tmp_path, test_image) as (lab, agent):
            on_worker = []
            for i in range(4):
                status, answer = deploy(agent, f"t-lost-{i}", gpu=True, vram_gb=8)
                assert status == 200, answer
                if answer["host"].startswith(f"http://{lab.addr('worker')}:"):
                    on_worker.append(answer["name"])
            assert on_worker  # the worker has some: two GPUs each, least committed first
            lab.kill("worker")
            worker = lab.hostname("worker")

            def moved() -> bool:
                services = {s["name"]: s for s in get_json(agent.url + "/services")}
                return all(services[name]["node_name"] != worker and services[name]["status"] == "healthy"
                           for name in on_worker)

            wait_until(moved, timeout=60)
            services = {s["name"]: s for s in get_json(agent.url + "/services")}
            for name in on_worker:
                assert answers(services[name]["host"]), services[name]
            kinds = [(e["kind"], e["reason"], e["service"]) for e in get_json(agent.url + "/events")]
            for name in on_worker:
                assert ("rescheduled", "node_down", name) in kinds
            manager_gpus = [g for g in get_json(agent.url + "/gpus") if g["node_name"] != worker]
            assert all(g["vram_reserved_gb"] <= 24 for g in manager_gpus)

    def test_no_room_waits_pending(self, tmp_path: Path, test_image: str) -> None:
        with self.losing_a_node(tmp_path, test_image, gpus_per_node=1) as (lab, agent):
            names = []
            for i in range(2):
                status, answer = deploy(agent, f"t-full-{i}", gpu=True, vram_gb=20)
                assert status == 200, answer
                names.append(answer["name"])
            lab.kill("worker")
            time.sleep(0.5)

            def pending() -> list[str]:
                return [s["name"] for s in get_json(agent.url + "/services")
                        if s["status"] == "pending" and s["reason"]]

            assert len(wait_until_value(pending, timeout=60)) == 1
            waiting = pending()[0]
            assert waiting in names
            other = next(n for n in names if n != waiting)
            assert post_json(agent.url + "/stop", {"name": other})[0] == 200  # room appears
            wait_until(lambda: {s["name"]: s["status"] for s in get_json(agent.url + "/services")}
                       .get(waiting) == "healthy", timeout=30)
            kinds = [(e["kind"], e["service"]) for e in get_json(agent.url + "/events")]
            assert ("pending", waiting) in kinds and ("rescheduled", waiting) in kinds
            assert kinds.count(("pending", waiting)) == 1  # not once per resync

    def test_pending_runs_nowhere(self, tmp_path: Path, test_image: str) -> None:
        """Pending, it is scaled to 0 replicas: a node that comes back doesn't start it
        outside the agent's books, and it holds no port or GPU meanwhile."""
        with self.losing_a_node(tmp_path, test_image, gpus_per_node=1) as (lab, agent):
            for i in range(2):
                assert deploy(agent, f"t-park-{i}", gpu=True, vram_gb=20)[0] == 200
            lab.kill("worker")

            def pending() -> list[str]:
                return [s["name"] for s in get_json(agent.url + "/services") if s["status"] == "pending"]

            [waiting] = wait_until_value(pending, timeout=60)
            replicas = lab.docker("manager", "service", "inspect", f"tidybot-{waiting}", "--format",
                                  "{{.Spec.Mode.Replicated.Replicas}}").stdout.strip()
            assert replicas == "0"
            gpus = get_json(agent.url + "/gpus")
            assert sum(g["vram_reserved_gb"] for g in gpus) == 20  # only the one that runs
            assert all(g["node_id"] for g in gpus)


def wait_until_value(check: Callable[[], list[str]], timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    while not (found := check()):
        assert time.monotonic() < deadline, "not reached in time"
        time.sleep(0.2)
    return found
