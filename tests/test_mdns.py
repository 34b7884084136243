"""mDNS discovery, run only inside a network namespace the test makes, so no packet leaves."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from deploy_agent.config import parse_config

HERE = Path(__file__).parent
# The namespace's one address beside loopback: a client drops adverts of loopback addresses
# (any host may send them), so the agent advertises this one.
NETNS_ADDRESS = "10.200.0.1"
NETNS_SETUP = ("ip link set lo up && ip link set lo multicast on && ip route add 224.0.0.0/4 dev lo"
               f" && ip addr add {NETNS_ADDRESS}/32 dev lo")


def can_unshare() -> bool:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return False
    return subprocess.run(["unshare", "--net", "true"], capture_output=True).returncode == 0


class TestFlag:
    """--mdns is off by default."""

    def test_off_by_default(self) -> None:
        assert parse_config([], {}).mdns is False
        assert parse_config(["--mdns"], {}).mdns is True
        assert parse_config([], {"DEPLOY_AGENT_MDNS": "1"}).mdns is True


@pytest.mark.docker
@pytest.mark.skipif(not can_unshare(), reason="needs root to make a network namespace (unshare --net)")
class TestDiscoveryInANamespace:
    """An agent started with --mdns is found by ComputeNodes.from_env() without COMPUTE_NODES."""

    def test_agent_is_discovered(self, tmp_path: Path) -> None:
        script = f"{NETNS_SETUP} && exec {sys.executable} {HERE / 'mdns_in_netns.py'} {tmp_path / 'state'}"
        env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
        result = subprocess.run(["unshare", "--net", "sh", "-c", script], capture_output=True,
                                text=True, timeout=120, env=env)
        assert result.returncode == 0, result.stderr
        found = json.loads(result.stdout.strip().splitlines()[-1])
        assert found == {"found": [f"http://{NETNS_ADDRESS}:9000"], "reachable": [True]}
