"""`deployctl` through its installed entry point, against real agents."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.agent_process import AgentProcess, AgentProcesses, free_port, installed
from tests.standins import stand_in_node
from tests.test_client import manifest

pytestmark = pytest.mark.docker
DEPLOYCTL = installed("deployctl")


def ctl(*args: str, nodes: str | None = None, stdin: str | None = None,
        token: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("COMPUTE_NODES", "DEPLOY_AGENT_TOKEN")}
    if nodes:
        env["COMPUTE_NODES"] = nodes
    if token:
        env["DEPLOY_AGENT_TOKEN"] = token
    return subprocess.run([DEPLOYCTL, *args], capture_output=True, text=True, timeout=timeout,
                          env=env, input=stdin)


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    """The failure's stderr: one line, no traceback."""
    assert "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    return result.stderr


class TestDeployctl:
    """Each command: human tables, --json, exit status and messages."""

    def test_full_cycle(self, node: AgentProcess, tmp_path: Path) -> None:
        path = tmp_path / "service.yaml"
        path.write_text(yaml.safe_dump(manifest("t-ctl", gpu=True, vram_gb=8)))
        deployed = ctl("deploy", str(path), nodes=node.url)
        assert deployed.returncode == 0, deployed.stderr
        assert "t-ctl deployed at http://127.0.0.1:" in deployed.stdout
        assert "created container" in deployed.stderr and "healthy" in deployed.stderr

        again = ctl("--json", "deploy", str(path), nodes=node.url)
        assert json.loads(again.stdout)["already_running"] is True

        table = ctl("ps", nodes=node.url)
        assert table.returncode == 0
        header, row = table.stdout.splitlines()[:2]
        assert header.split()[:3] == ["NAME", "STATUS", "HOST"]
        assert row.split()[:2] == ["t-ctl", "healthy"]

        listing = json.loads(ctl("--json", "ps", nodes=node.url).stdout)
        assert [(s["name"], s["node"]) for s in listing] == [("t-ctl", node.url)]

        gpus = ctl("gpus", nodes=node.url).stdout
        assert "RTX 4090" in gpus and "t-ctl" in gpus
        assert json.loads(ctl("--json", "gpus", nodes=node.url).stdout)[0]["vram_reserved_gb"] == 8

        logs = ctl("logs", "t-ctl", "--tail", "50", nodes=node.url)
        assert logs.returncode == 0 and "listening on 8000" in logs.stdout

        nodes = json.loads(ctl("--json", "nodes", nodes=node.url).stdout)
        assert nodes == [{"node": node.url, "reachable": True, "engine": "reachable", "gpus": 1,
                          "services": 1, "free_vram_gb": 16.0, "version": nodes[0]["version"]}]

        stopped = ctl("stop", "t-ctl", nodes=node.url)
        assert stopped.returncode == 0 and "stopped t-ctl" in stopped.stdout
        assert json.loads(ctl("--json", "ps", nodes=node.url).stdout) == []

    def test_a_changed_spec_is_never_called_already_running(self, node: AgentProcess,
                                                            tmp_path: Path) -> None:
        path = tmp_path / "service.yaml"
        path.write_text(yaml.safe_dump(manifest("t-drift", env={"V": "1"})))
        assert ctl("deploy", str(path), nodes=node.url).returncode == 0
        path.write_text(yaml.safe_dump(manifest("t-drift", env={"V": "2"})))
        changed = ctl("deploy", str(path), nodes=node.url)
        assert changed.returncode == 1 and "already running" not in changed.stdout
        assert "different env" in changed.stderr and "replace" in changed.stderr
        replaced = ctl("--json", "deploy", "--replace", str(path), nodes=node.url)
        assert replaced.returncode == 0 and json.loads(replaced.stdout)["already_running"] is False
        assert ctl("stop", "t-drift", nodes=node.url).returncode == 0

    def test_stop_unknown_fails_with_message(self, node: AgentProcess) -> None:
        result = ctl("stop", "t-nothing", nodes=node.url)
        assert result.returncode == 1
        assert "No service named 't-nothing'" in result.stderr

    def test_deploy_from_stdin_and_agent_errors(self, node: AgentProcess) -> None:
        good = ctl("--node", node.url, "deploy", "-", stdin=yaml.safe_dump(manifest("t-stdin")))
        assert good.returncode == 0, good.stderr
        bad = ctl("--node", node.url, "deploy", "-", stdin=json.dumps({"name": "Bad", "image": ""}))
        assert bad.returncode == 2  # bad input
        assert "invalid" in bad.stderr and "name:" in bad.stderr and "image:" in bad.stderr
        one_line(bad)
        crash = ctl("--node", node.url, "deploy", "-",
                    stdin=yaml.safe_dump(manifest("t-crash", command="sh -c 'echo boom; exit 9'")))
        assert crash.returncode == 1 and "exited with code 9" in crash.stderr and "boom" in crash.stderr

    def test_unreadable_file_and_dead_node(self, tmp_path: Path) -> None:
        missing = ctl("deploy", str(tmp_path / "nope.yaml"), nodes="http://127.0.0.1:1")
        assert missing.returncode == 2 and "nope.yaml" in missing.stderr
        dead = ctl("ps", nodes=f"http://127.0.0.1:{free_port()}")
        assert dead.returncode == 1 and "No node answered" in dead.stderr

    def test_deploy_shows_pull_progress(self, node: AgentProcess, pushed_image: str, tmp_path: Path) -> None:
        path = tmp_path / "service.yaml"
        body = manifest("t-ctl-pull")
        body["deploy"]["image"] = pushed_image
        path.write_text(yaml.safe_dump(body))
        result = ctl("deploy", str(path), nodes=node.url)
        assert result.returncode == 0, result.stderr
        assert "MB" in result.stderr or "kB" in result.stderr  # the per-layer byte bar
        assert "created container" in result.stderr

    def test_pull_on_one_node_then_all(self, agent_processes: AgentProcesses, pushed_image: str,
                                       registry: str) -> None:
        first = agent_processes.start()
        second = agent_processes.start("--allow-image", "deploy-agent-test/*")
        nodes = f"{first.url},{second.url}"
        pulled = ctl("pull", pushed_image, nodes=nodes)
        assert pulled.returncode == 0, pulled.stderr
        assert f"pulled {pushed_image} (sha256:" in pulled.stdout and first.url in pulled.stdout
        assert "MB" in pulled.stderr or "kB" in pulled.stderr  # the per-layer byte bar
        every = ctl("--json", "pull", "--all", pushed_image, nodes=nodes)
        rows = {row["node"]: row for row in json.loads(every.stdout)}
        assert every.returncode == 1  # the second node's policy refuses it
        assert rows[first.url]["ok"] is True and rows[first.url]["digest"].startswith("sha256:")
        assert (rows[second.url]["ok"], rows[second.url]["error"]) == (False, "image_not_allowed")
        plain = ctl("pull", "--all", pushed_image, nodes=nodes)
        assert plain.returncode == 1 and "image_not_allowed" in plain.stdout
        assert "the pull failed on 1 of 2 node(s)" in plain.stderr
        missing = ctl("pull", f"{registry}/deploy-agent-test/absent:1", nodes=first.url)
        assert missing.returncode == 1 and "could not be pulled" in missing.stderr
        bad = ctl("pull", "Not An Image", nodes=first.url)
        assert bad.returncode == 2, bad.stderr

    def test_several_nodes(self, two_nodes: tuple[AgentProcess, AgentProcess, str], tmp_path: Path) -> None:
        small, big, dead = two_nodes
        nodes = f"{dead},{small.url},{big.url}"
        path = tmp_path / "service.yaml"
        path.write_text(yaml.safe_dump(manifest("t-ctl-multi", gpu=True, vram_gb=40)))
        placed = ctl("--json", "deploy", str(path), nodes=nodes)
        assert json.loads(placed.stdout)["node"] == big.url, placed.stderr
        listing = ctl("ps", nodes=nodes)
        assert listing.returncode == 0 and "NODE" in listing.stdout.splitlines()[0]
        assert f"warning: {dead} could not be reached" in listing.stderr
        assert ctl("stop", "t-ctl-multi", nodes=nodes).returncode == 0


class TestFlagsAnywhere:
    """--json, --node and --token work after the subcommand too, as docker and kubectl users type."""

    def test_flags_after_the_subcommand(self, node: AgentProcess) -> None:
        after = ctl("ps", "--json", "--node", node.url)
        before = ctl("--json", "--node", node.url, "ps")
        assert after.returncode == 0 and before.returncode == 0, after.stderr + before.stderr
        assert json.loads(after.stdout) == json.loads(before.stdout) == []

    def test_flag_before_is_not_undone_after(self, node: AgentProcess) -> None:
        mixed = ctl("--json", "ps", "--node", node.url)
        assert mixed.returncode == 0, mixed.stderr
        assert json.loads(mixed.stdout) == []


TOKEN = "cli-right-token-0d9f"


class TestSaysWhatIsWrong:
    """Every failure: a non-zero exit and one line that names the problem (#22, point 6)."""

    def test_token_missing_or_wrong(self, agent_processes: AgentProcesses) -> None:
        agent = agent_processes.start(env={"DEPLOY_AGENT_TOKEN": TOKEN})
        missing = ctl("ps", nodes=agent.url)
        assert missing.returncode == 1 and "wants a token (401)" in one_line(missing)
        assert "DEPLOY_AGENT_TOKEN" in missing.stderr and "No node answered" not in missing.stderr
        wrong = ctl("ps", nodes=agent.url, token="cli-wrong-token-77e1")
        assert wrong.returncode == 1 and "refused the token (401)" in one_line(wrong)
        assert "cli-wrong-token-77e1" not in wrong.stderr + wrong.stdout
        as_json = ctl("--json", "deploy", "-", nodes=agent.url, token="cli-wrong-token-77e1",
                      stdin=yaml.safe_dump(manifest("t-never")))
        assert json.loads(as_json.stdout)["error"] == "unauthorized" and as_json.returncode == 1
        assert "cli-wrong-token-77e1" not in as_json.stdout + as_json.stderr
        assert ctl("ps", nodes=agent.url, token=TOKEN).returncode == 0

    def test_bad_input_is_2(self, tmp_path: Path) -> None:
        broken = tmp_path / "service.yaml"
        broken.write_text("name: [unclosed\n")
        result = ctl("deploy", str(broken), nodes="http://127.0.0.1:1")
        assert result.returncode == 2 and "not valid YAML" in one_line(result)
        odd = ctl("ps", "--node", "ftp://somewhere")
        assert odd.returncode == 2 and "http://HOST:PORT" in one_line(odd)
        as_json = ctl("--json", "deploy", str(tmp_path / "nope.yaml"), nodes="http://127.0.0.1:1")
        assert as_json.returncode == 2 and json.loads(as_json.stdout)["error"] == "bad_input"

    def test_url_without_scheme(self, node: AgentProcess) -> None:
        plain = ctl("--json", "ps", "--node", f"127.0.0.1:{node.port}")
        assert plain.returncode == 0 and json.loads(plain.stdout) == [], plain.stderr

    def test_json_errors(self, node: AgentProcess) -> None:
        result = ctl("--json", "stop", "t-nothing", nodes=node.url)
        assert result.returncode == 1
        assert json.loads(result.stdout) | {"node": None} == {
            "ok": False, "error": "not_found", "node": None,
            "message": f"No service named 't-nothing' on {node.url}."}

    @pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
    def test_follows_fail_loudly(self, agent_processes: AgentProcesses, sig: int) -> None:
        """A node killed, or stopping (it ends its follows cleanly), is a failure of both."""
        dead = ctl("events", "-f", nodes=f"http://127.0.0.1:{free_port()}", timeout=30)
        assert dead.returncode == 1 and "could not be reached" in one_line(dead)
        agent = agent_processes.start()
        assert ctl("deploy", "-", nodes=agent.url, stdin=yaml.safe_dump(manifest("t-follow-cli"))
                   ).returncode == 0
        env = {k: v for k, v in os.environ.items() if k != "DEPLOY_AGENT_TOKEN"}
        events = subprocess.Popen([DEPLOYCTL, "events", "-f", "--node", agent.url], env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        logs = subprocess.Popen([DEPLOYCTL, "logs", "-f", "t-follow-cli", "--node", agent.url], env=env,
                                text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            time.sleep(2)  # both are following
            agent.stop(sig)
            _, events_err = events.communicate(timeout=30)
            _, logs_err = logs.communicate(timeout=30)
        finally:
            events.kill()
            logs.kill()
        for code, err in ((events.returncode, events_err), (logs.returncode, logs_err)):
            assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
            assert agent.url in err

    def test_deploy_falls_over_on_503(self, node: AgentProcess, tmp_path: Path) -> None:
        """A node with the most free VRAM that refuses (503) is followed by the next."""
        with stand_in_node() as full:
            full.gpus = [{"id": 0, "name": "A100", "vram_total_gb": 80, "vram_free_gb": 80}]
            full.deploy_status = 503
            path = tmp_path / "service.yaml"
            path.write_text(yaml.safe_dump(manifest("t-ctl-503", gpu=True, vram_gb=4)))
            placed = ctl("--json", "deploy", str(path), nodes=f"{full.url},{node.url}")
            assert placed.returncode == 0, placed.stderr
            assert json.loads(placed.stdout)["node"] == node.url
            assert full.called("POST", "/deploy") == 1 and "trying the next node" in placed.stderr
        assert ctl("stop", "t-ctl-503", nodes=node.url).returncode == 0

    def test_ctrl_c_says_the_deploy_goes_on_and_names_its_lease(self, node: AgentProcess,
                                                                tmp_path: Path) -> None:
        path = tmp_path / "service.yaml"
        path.write_text(yaml.safe_dump(manifest("t-ctl-int", env={"DELAY": "4"})))
        env = {k: v for k, v in os.environ.items() if k != "DEPLOY_AGENT_TOKEN"}
        deploying = subprocess.Popen([DEPLOYCTL, "deploy", "--lease", "5m", str(path), "--node", node.url],
                                     env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            assert deploying.stderr is not None
            seen = ""
            while "started" not in seen:  # the lease line came first
                line = deploying.stderr.readline()
                assert line, seen
                seen += line
            deploying.send_signal(signal.SIGINT)
            _, rest = deploying.communicate(timeout=30)
        finally:
            deploying.kill()
        assert deploying.returncode == 130
        said = rest.strip().splitlines()[-1]
        assert f"the deploy of t-ctl-int goes on at {node.url}" in said and "Traceback" not in rest
        lease_id = said.split("lease ")[1].split(":")[0]
        assert lease_id in seen
        deadline = time.monotonic() + 20
        while node.services().get("t-ctl-int", {}).get("status") != "healthy":
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert ctl("release", "t-ctl-int", lease_id, nodes=node.url).returncode == 0


class TestContention:
    def test_deploy_waits_and_queue_lists_it(self, agent_processes: AgentProcesses, tmp_path: Path) -> None:
        agent = agent_processes.start("--fake-gpus", "RTX 4090:24")
        holder = json.loads(ctl("--json", "deploy", "--lease", "10m", "--keep-warm", "0", "-",
                                nodes=agent.url,
                                stdin=yaml.safe_dump(manifest("t-ctl-hold", gpu=True, vram_gb=20))).stdout)
        path = tmp_path / "service.yaml"
        path.write_text(yaml.safe_dump(manifest("t-ctl-wait", gpu=True, vram_gb=16)))
        env = {k: v for k, v in os.environ.items() if k not in ("DEPLOY_AGENT_TOKEN", "COMPUTE_NODES")}
        waiting = subprocess.Popen([DEPLOYCTL, "deploy", "--wait", "1m", "--priority", "7", str(path),
                                    "--node", agent.url], env=env, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 15
            while "t-ctl-wait" not in ctl("queue", nodes=agent.url).stdout:
                assert time.monotonic() < deadline
                time.sleep(0.2)
            listed = json.loads(ctl("--json", "queue", nodes=agent.url).stdout)
            assert [(q["name"], q["priority"], q["needs_gb"]) for q in listed] == [("t-ctl-wait", 7, 16)]
            assert ctl("release", "t-ctl-hold", holder["lease_id"], nodes=agent.url).returncode == 0
            out, err = waiting.communicate(timeout=60)
        finally:
            waiting.kill()
        assert waiting.returncode == 0, err
        assert "position 1 in the queue" in err and "t-ctl-wait deployed" in out
