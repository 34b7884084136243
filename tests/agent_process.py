"""The installed `deploy-agent` run as a real process, for restart, signal and CLI tests."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def installed(name: str) -> str:
    """A console script of this environment: beside the running interpreter (a venv need
    not be activated to run the tests), else on PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name) or name


COMMAND = installed("deploy-agent")


def get_json(url: str, timeout: float = 5) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def post_json(url: str, body: object, timeout: float = 60,
              headers: dict[str, str] | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


class AgentProcess:
    """One agent process on a free loopback port; restartable with the same state dir."""

    def __init__(self, state_dir: Path, *args: str, wrapper: tuple[str, ...] = ()) -> None:
        self.state_dir = state_dir
        self.wrapper = wrapper  # a command the agent runs under, e.g. unshare
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = args
        self.process: subprocess.Popen[bytes] | None = None
        self.log = state_dir.parent / f"agent-{self.port}.log"
        self.start_env: dict[str, str] = {}

    def start(self, timeout: float = 20, wait: bool = True) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [*self.wrapper, COMMAND, "--host", "127.0.0.1", "--port", str(self.port),
                 "--state-dir", str(self.state_dir), "--advertise-host", "127.0.0.1",
                 "--port-range", "28500-28599", "--resync-interval", "0.5",
                 "--instance", f"test-{self.port}", *self.args],
                stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **self.start_env},
            )
        if not wait:
            return
        deadline = time.monotonic() + timeout
        while True:
            try:
                get_json(self.url + "/health", timeout=1)
                return
            except OSError:
                assert self.process.poll() is None, self.log.read_text()
                assert time.monotonic() < deadline, "agent did not start"
                time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        """Signal it and wait; its exit code."""
        assert self.process is not None
        self.process.send_signal(sig)
        code = self.process.wait(timeout=timeout)
        self.process = None
        return code

    def deploy_in_background(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST /deploy from a thread; the dict gets 'status'/'answer' or 'error' when done."""
        result: dict[str, Any] = {}

        def run() -> None:
            try:
                result["status"], result["answer"] = post_json(self.url + "/deploy", body)
            except OSError as err:
                result["error"] = err

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        result["thread"] = thread
        return result

    def services(self) -> dict[str, dict[str, Any]]:
        return {s["name"]: s for s in get_json(self.url + "/services")}

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None


class AgentProcesses:
    """The agent processes one test starts, each in its own state directory under `root`,
    with `common` arguments first; `close()` kills them all."""

    def __init__(self, root: Path, *common: str) -> None:
        self.root = root
        self.common = common
        self.started: list[AgentProcess] = []

    def start(self, *args: str, wrapper: tuple[str, ...] = (),
              env: dict[str, str] | None = None) -> AgentProcess:
        agent = AgentProcess(self.root / f"state-{len(self.started)}", *self.common, *args, wrapper=wrapper)
        agent.start_env = dict(env or {})
        agent.start()
        self.started.append(agent)
        return agent

    def close(self) -> None:
        for agent in self.started:
            agent.close()
