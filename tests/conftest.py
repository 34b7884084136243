"""Fixtures shared by the suite: the real engine, the test image, a local registry, an agent.

Docker-marked tests need a running engine. Under CI (CI=true) a missing engine fails the
run; elsewhere those tests are skipped so the unit tests still run alone. Everything a
test creates is removed: containers named tidybot-t-*, the registry, temp files.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Generator, Iterator
from pathlib import Path

import aiodocker
import pytest
from aiohttp.test_utils import TestClient

from deploy_agent.app import create_app
from deploy_agent.config import Config
from tests.agent_process import AgentProcess, AgentProcesses, free_port
from tests.swarm_lab import SwarmLab

HERE = Path(__file__).parent
TEST_IMAGE = "deploy-agent-test/httpd:1"
TEST_PORT_RANGE = (28000, 28999)
NO_LOCAL_AGENT = Path("/nonexistent/deploy-agent-test-state")  # whose token no test finds
TEST_NAME_PREFIX = "t-"  # every service a test deploys is named t-..., so cleanup is exact


def engine_available() -> bool:
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def pytest_configure(config: pytest.Config) -> None:
    """The suite starts from no caller's settings: a shell that followed the README (an
    exported DEPLOY_AGENT_TOKEN, COMPUTE_NODES), an agent installed on this machine (its
    token in /var/lib/deploy-agent) or a `docker login` would otherwise answer for the
    tests' own agents. DEPLOY_AGENT_TEST_* and DEPLOY_AGENT_SOAK_* configure the suite."""
    for name in list(os.environ):
        if name == "COMPUTE_NODES" or (name.startswith("DEPLOY_AGENT_")
                                       and not name.startswith(("DEPLOY_AGENT_TEST_", "DEPLOY_AGENT_SOAK_"))):
            del os.environ[name]
    os.environ["DEPLOY_AGENT_STATE_DIR"] = str(NO_LOCAL_AGENT)
    docker_config = Path(tempfile.mkdtemp(prefix="deploy-agent-tests-docker-config-"))
    plugins = Path(os.environ.get("DOCKER_CONFIG") or Path.home() / ".docker") / "cli-plugins"
    if plugins.is_dir():  # a user's own buildx, say: the CLI looks for it in DOCKER_CONFIG
        (docker_config / "cli-plugins").symlink_to(plugins)
    os.environ["DOCKER_CONFIG"] = str(docker_config)
    config.add_cleanup(lambda: shutil.rmtree(docker_config, ignore_errors=True))


AGENT_LOG_LINES = 40  # of each agent's log, in the report of a test that failed


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                             ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failed test's report ends with what its agents logged (tests/agent_process.py writes
    them beside their state dirs): CI keeps no files, and a hang says nothing by itself."""
    report: pytest.TestReport = yield
    if not report.failed or report.when != "call":
        return report
    funcargs = getattr(item, "funcargs", {})
    tmp_path = funcargs.get("tmp_path")
    if isinstance(tmp_path, Path):
        for log in sorted(tmp_path.glob("**/agent-*.log")):
            tail = log.read_text(errors="replace").splitlines()[-AGENT_LOG_LINES:]
            report.sections.append((f"{log.name}, last {AGENT_LOG_LINES} lines", "\n".join(tail)))
    for lab in (value for value in funcargs.values() if isinstance(value, SwarmLab)):
        report.sections.append(("swarm lab dockerd logs", lab.log_tails()))  # still up: a module's
    return report


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not any(item.get_closest_marker("docker") for item in items) or engine_available():
        return
    if os.environ.get("CI") == "true":
        raise pytest.UsageError("CI=true but no Docker engine answers: .ci/run must start dockerd")
    skip = pytest.mark.skip(reason="no Docker engine running (start dockerd to run these)")
    for item in items:
        if item.get_closest_marker("docker"):
            item.add_marker(skip)


def remove_test_containers() -> None:
    """Remove every test container; bounded, so an engine wedged on one fails the test at
    once instead of hanging the run."""
    names = subprocess.run(
        ["docker", "ps", "-aq", "--filter", f"name=^/tidybot-{TEST_NAME_PREFIX}"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout.split()
    if names:
        subprocess.run(["docker", "rm", "-f", *names], capture_output=True, check=True, timeout=120)


@pytest.fixture(scope="session")
def test_image() -> str:
    """The busybox service image, built once if this engine lacks it."""
    present = subprocess.run(["docker", "image", "inspect", TEST_IMAGE], capture_output=True)
    if present.returncode != 0:
        subprocess.run([str(HERE / "images" / "build.sh"), TEST_IMAGE], check=True)
    return TEST_IMAGE


@pytest.fixture(scope="session")
def registry(test_image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A docker-registry on 127.0.0.1 holding the test image; yields 'localhost:PORT'."""
    binary = shutil.which("docker-registry")
    if binary is None:
        pytest.skip("docker-registry is not installed (.ci/run installs it)")
    root = tmp_path_factory.mktemp("registry")
    port = free_port()
    (root / "config.yml").write_text(json.dumps({
        "version": 0.1,
        "storage": {"filesystem": {"rootdirectory": str(root / "data")}},
        "http": {"addr": f"127.0.0.1:{port}"},
        "log": {"level": "error"},
    }))
    process = subprocess.Popen([binary, "serve", str(root / "config.yml")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield f"localhost:{port}"
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture
def pushed_image(registry: str, test_image: str, tmp_path: Path) -> Iterator[str]:
    """An image only the local registry has, so a deploy must really pull it.

    It adds a 2 MiB layer of random bytes to the test image: the engine has the base
    layers already, but this one it must download (with progress to report).
    """
    ref = f"{registry}/deploy-agent-test/pullme:{time.monotonic_ns()}"
    context = tmp_path / "pullme"
    context.mkdir()
    (context / "blob").write_bytes(os.urandom(2 * 1024 * 1024))
    (context / "Dockerfile").write_text(f"FROM {test_image}\nCOPY blob /blob\n")
    for command in (["docker", "build", "-q", "-t", ref, str(context)], ["docker", "push", ref],
                    ["docker", "rmi", ref]):
        subprocess.run(command, check=True, capture_output=True)
    yield ref
    remove_test_containers()
    subprocess.run(["docker", "rmi", "-f", ref], capture_output=True)


def make_config(state_dir: Path, **overrides: object) -> Config:
    values: dict[str, object] = {
        "host": "127.0.0.1", "port": 0, "state_dir": state_dir,
        "advertise_host": "127.0.0.1", "port_range": TEST_PORT_RANGE, "stop_timeout": 2,
        "resync_interval_s": 0.5,
    }
    values.update(overrides)
    return Config(**values)  # type: ignore[arg-type]


@pytest.fixture
def agent_config(tmp_path: Path) -> Config:
    return make_config(tmp_path / "state")


@pytest.fixture
async def agent(
    aiohttp_client: object, agent_config: Config, test_image: str
) -> AsyncIterator[TestClient]:  # type: ignore[type-arg]
    """The app against the real engine; its test containers are removed afterwards."""
    agent_config.state_dir.mkdir(parents=True, exist_ok=True)
    remove_test_containers()
    client = await aiohttp_client(create_app(agent_config))  # type: ignore[operator]
    try:
        yield client
    finally:
        remove_test_containers()


@pytest.fixture
async def docker() -> AsyncIterator[aiodocker.Docker]:
    client = aiodocker.Docker()
    yield client
    await client.close()


@pytest.fixture
def agent_processes(tmp_path: Path, test_image: str) -> Iterator[AgentProcesses]:
    """Agent processes a test starts: all killed, and the test containers removed, afterwards."""
    remove_test_containers()
    processes = AgentProcesses(tmp_path)
    try:
        yield processes
    finally:
        processes.close()
        remove_test_containers()


@pytest.fixture
def node(agent_processes: AgentProcesses) -> AgentProcess:
    """An agent process with one simulated 24 GB GPU."""
    return agent_processes.start("--fake-gpus", "RTX 4090:24")


@pytest.fixture
def two_nodes(agent_processes: AgentProcesses) -> tuple[AgentProcess, AgentProcess, str]:
    """A node with one 24 GB GPU, one with an 80 GB GPU, and an address nobody answers on."""
    small = agent_processes.start("--fake-gpus", "RTX 4090:24")
    big = agent_processes.start("--fake-gpus", "A100 80GB:80")
    return small, big, f"http://127.0.0.1:{free_port()}"
