"""`deployctl` through its installed entry point, against real agents."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.agent_process import AgentProcess, free_port, installed
from tests.test_client import manifest

pytestmark = pytest.mark.docker
DEPLOYCTL = installed("deployctl")


def ctl(*args: str, nodes: str | None = None, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("COMPUTE_NODES", "DEPLOY_AGENT_TOKEN")}
    if nodes:
        env["COMPUTE_NODES"] = nodes
    return subprocess.run([DEPLOYCTL, *args], capture_output=True, text=True, timeout=120,
                          env=env, input=stdin)


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
        assert bad.returncode == 1
        assert "invalid" in bad.stderr and "name:" in bad.stderr and "image:" in bad.stderr
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

    def test_several_nodes(self, two_nodes: tuple[AgentProcess, AgentProcess, str], tmp_path: Path) -> None:
        small, big, dead = two_nodes
        nodes = f"{dead},{small.url},{big.url}"
        path = tmp_path / "service.yaml"
        path.write_text(yaml.safe_dump(manifest("t-ctl-multi", gpu=True, vram_gb=40)))
        placed = ctl("--json", "deploy", str(path), nodes=nodes)
        assert json.loads(placed.stdout)["node"] == big.url, placed.stderr
        listing = ctl("ps", nodes=nodes)
        assert listing.returncode == 0 and "NODE" in listing.stdout.splitlines()[0]
        assert "did not answer" in listing.stderr
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
