"""examples/hello works as the README walks a newcomer through it."""

from __future__ import annotations

import os
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.agent_process import AgentProcess, installed
from tests.conftest import remove_test_containers

pytestmark = pytest.mark.docker
ROOT = Path(__file__).parent.parent
HELLO = ROOT / "examples" / "hello"
IMAGE = "deploy-agent-example/hello:1"


@pytest.fixture
def hello_image(test_image: str) -> Iterator[str]:
    """The example built as the README says, on the local busybox image (no registry here)."""
    subprocess.run(["docker", "build", "-q", "-f", str(HELLO / "Containerfile"), "--build-arg",
                    f"BASE={test_image}", "-t", IMAGE, str(HELLO)], check=True, capture_output=True)
    yield IMAGE
    subprocess.run(["docker", "rmi", "-f", IMAGE], capture_output=True)


def test_hello_deploys_with_deployctl(hello_image: str, tmp_path: Path) -> None:
    agent = AgentProcess(tmp_path / "state")
    agent.start()
    env = {**os.environ, "COMPUTE_NODES": agent.url}
    deployctl = installed("deployctl")
    try:
        deployed = subprocess.run([deployctl, "--json", "deploy", str(HELLO / "service.yaml")],
                                  capture_output=True, text=True, env=env, timeout=120)
        assert deployed.returncode == 0, deployed.stderr
        host = deployed.stdout.split('"host": "')[1].split('"')[0]
        with urllib.request.urlopen(host + "/", timeout=5) as response:
            assert response.read().decode().strip() == "hello from deploy-agent"
        assert starts(host) == "1"
        stopped = subprocess.run([deployctl, "stop", "hello"], capture_output=True, text=True, env=env)
        assert stopped.returncode == 0, stopped.stderr
        again = subprocess.run([deployctl, "--json", "deploy", str(HELLO / "service.yaml")],
                               capture_output=True, text=True, env=env, timeout=120)
        assert again.returncode == 0, again.stderr
        assert starts(again.stdout.split('"host": "')[1].split('"')[0]) == "2"  # its cache was kept
        assert subprocess.run([deployctl, "stop", "hello"], capture_output=True, env=env).returncode == 0
    finally:
        agent.close()
        leftover = subprocess.run(  # only this test agent's own container, whatever happened
            ["docker", "ps", "-aq", "--filter", "name=^/tidybot-hello$", "--filter",
             f"label=tidybot.deploy-agent=test-{agent.port}"], capture_output=True, text=True).stdout.split()
        if leftover:
            subprocess.run(["docker", "rm", "-f", *leftover], capture_output=True)
        remove_test_containers()
        subprocess.run(["docker", "volume", "rm", "-f", f"tidybot-test-{agent.port}-hello-cache"],
                       capture_output=True)


def starts(host: str) -> str:
    with urllib.request.urlopen(host + "/starts", timeout=5) as response:
        return str(response.read().decode().strip())
