"""A two-node Docker Swarm on this machine, for the --swarm tests: real dockerds, real Raft.

Each node is a dockerd in a network namespace of its own (started under `ip netns exec`
and `unshare --uts`, with the host's cgroup hierarchies mounted again inside: `ip netns
exec` remounts /sys, and dockerd needs them). The nodes' veths meet on a bridge in a third
namespace (a bridge in the root namespace would meet the host's FORWARD policy); the root
namespace gets one veth onto that bridge too, so the tests and the agent under test reach
the nodes' addresses, which exist only in namespaces the test made. Each dockerd has its
own config file (with its fake-GPU engine label), data-root, exec-root, pidfile, socket
and cgroup parent, and DOCKER_SERVICE_PREFER_OFFLINE_IMAGE=1 so that no task reaches for
a registry; the test image is loaded into each. The main dockerd is never touched.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

CGROUP_CONTROLLERS = ("cpu", "cpuacct", "cpuset", "memory", "devices", "freezer", "blkio", "pids",
                      "net_cls", "net_prio", "perf_event", "hugetlb")
NODES = {"manager": 1, "worker": 2}  # the last byte of each node's address
ROOT = 254  # the root namespace's address on the lab's network


def run(*command: str, check: bool = True, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, check=check, **kwargs)


def can_build() -> bool:
    """Root, and the tools: ip, unshare, dockerd."""
    return os.geteuid() == 0 and all(shutil.which(t) for t in ("ip", "unshare", "dockerd", "docker"))


def gpu_label(node: str, count: int, vram_gb: float) -> str:
    gpus = [{"uuid": f"GPU-{node}-{i}", "name": "RTX 4090", "vram_gb": vram_gb} for i in range(count)]
    return f"deploy-agent.gpus={json.dumps(gpus, separators=(',', ':'))}"


class SwarmLab:
    """Two swarm nodes in namespaces; up() in about 4 s, down() leaves nothing behind."""

    def __init__(self, gpus_per_node: int = 2, vram_gb: float = 24) -> None:
        self.tag = "dasw" + secrets.token_hex(2)  # names of every namespace, link, cgroup
        self.subnet = f"10.231.{int(self.tag[-2:], 16)}"  # its own: two labs may be up at once
        # Short: containerd's sockets live under it, and a unix socket path has 108 bytes.
        self.workdir = Path("/tmp") / self.tag
        self.gpus_per_node, self.vram_gb = gpus_per_node, vram_gb
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    # -- names ---------------------------------------------------------------------------

    def ns(self, node: str) -> str:
        return f"{self.tag}-{node[0]}"

    @property
    def bridge_ns(self) -> str:
        return f"{self.tag}-br"

    def addr(self, node: str) -> str:
        return f"{self.subnet}.{NODES[node]}"

    def socket(self, node: str) -> str:
        return f"unix://{self.workdir / node / 'docker.sock'}"

    def hostname(self, node: str) -> str:
        return f"{self.tag}-{node}"

    def docker(self, node: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run("docker", "-H", self.socket(node), *args, check=check)

    # -- up ------------------------------------------------------------------------------

    def up(self, image: str) -> None:
        try:
            self._network()
            for node in NODES:
                self._start_dockerd(node)
            for node in NODES:
                self._wait_for(node)
            self.docker("manager", "swarm", "init", "--advertise-addr", self.addr("manager"),
                        "--listen-addr", f"{self.addr('manager')}:2377")
            token = self.docker("manager", "swarm", "join-token", "-q", "worker").stdout.strip()
            self.docker("worker", "swarm", "join", "--token", token, "--advertise-addr", self.addr("worker"),
                        f"{self.addr('manager')}:2377")
            saved = self.workdir / "image.tar"
            run("docker", "save", "-o", str(saved), image)
            for node in NODES:
                self.docker(node, "load", "-q", "-i", str(saved))
            saved.unlink()
            self.wait(lambda: len(self.ready_nodes()) == 2, 30, "both nodes ready")
        except BaseException:
            print(self.log_tails())  # the test's report shows it; down() removes the logs
            self.down()
            raise

    def _network(self) -> None:
        ip = ("ip",)
        for name in (self.bridge_ns, *(self.ns(node) for node in NODES)):
            run(*ip, "netns", "add", name)
            run(*ip, "-n", name, "link", "set", "lo", "up")
        run(*ip, "-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
        run(*ip, "-n", self.bridge_ns, "link", "set", "br0", "up")
        for node in NODES:
            addr = self.addr(node)
            inside, outside = f"{self.tag}{node[0]}0", f"{self.tag}{node[0]}1"
            run(*ip, "link", "add", inside, "type", "veth", "peer", "name", outside)
            run(*ip, "link", "set", inside, "netns", self.ns(node))
            run(*ip, "link", "set", outside, "netns", self.bridge_ns)
            run(*ip, "-n", self.bridge_ns, "link", "set", outside, "master", "br0", "up")
            run(*ip, "-n", self.ns(node), "link", "set", inside, "name", "eth0")
            run(*ip, "-n", self.ns(node), "addr", "add", f"{addr}/24", "dev", "eth0")
            run(*ip, "-n", self.ns(node), "link", "set", "eth0", "up")
        root, peer = f"{self.tag}r0", f"{self.tag}r1"
        run(*ip, "link", "add", root, "type", "veth", "peer", "name", peer)
        run(*ip, "link", "set", peer, "netns", self.bridge_ns)
        run(*ip, "-n", self.bridge_ns, "link", "set", peer, "master", "br0", "up")
        run(*ip, "addr", "add", f"{self.subnet}.{ROOT}/24", "dev", root)
        run(*ip, "link", "set", root, "up")

    def _start_dockerd(self, node: str) -> None:
        home = self.workdir / node
        home.mkdir(parents=True)
        (home / "daemon.json").write_text(json.dumps(
            {"labels": [gpu_label(self.hostname(node), self.gpus_per_node, self.vram_gb)]}))
        mounts = "; ".join([
            "mount -t tmpfs cgroup_root /sys/fs/cgroup",
            *(f"mkdir -p /sys/fs/cgroup/{c} && mount -t cgroup -o {c} cgroup /sys/fs/cgroup/{c}"
              for c in CGROUP_CONTROLLERS if Path(f"/sys/fs/cgroup/{c}").is_dir()),
            "mkdir -p /sys/fs/cgroup/systemd"
            " && mount -t cgroup -o none,name=systemd cgroup /sys/fs/cgroup/systemd",
            "mkdir -p /sys/fs/cgroup/unified && mount -t cgroup2 none /sys/fs/cgroup/unified",
        ]) if Path("/sys/fs/cgroup/memory").is_dir() else (
            "mount -t cgroup2 none /sys/fs/cgroup")  # a cgroup v2 host: one hierarchy
        script = (f"hostname {self.hostname(node)}; {mounts}; exec dockerd "
                  f"--config-file {home / 'daemon.json'} --data-root {home / 'data'} "
                  f"--exec-root {home / 'exec'} --pidfile {home / 'docker.pid'} -H {self.socket(node)} "
                  f"--cgroup-parent {self.tag}-{node}")
        with (home / "dockerd.log").open("wb") as log:
            self.processes[node] = subprocess.Popen(
                ["ip", "netns", "exec", self.ns(node), "unshare", "--uts", "--fork", "sh", "-c", script],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, "DOCKER_SERVICE_PREFER_OFFLINE_IMAGE": "1"})

    def _wait_for(self, node: str) -> None:
        self.wait(lambda: self.docker(node, "info", check=False).returncode == 0, 30, f"{node}'s dockerd",
                  log=self.workdir / node / "dockerd.log")

    def ready_nodes(self) -> list[str]:
        out = self.docker("manager", "node", "ls", "--format", "{{.Hostname}} {{.Status}}",
                          check=False).stdout
        return [line.split()[0] for line in out.splitlines() if line.endswith(" Ready")]

    @staticmethod
    def wait(condition: Any, timeout: float, what: str, log: Path | None = None) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                tail = log.read_text()[-2000:] if log and log.exists() else ""
                raise AssertionError(f"swarm lab: {what} not reached in {timeout:g} s\n{tail}")
            time.sleep(0.2)

    # -- faults --------------------------------------------------------------------------

    def kill(self, node: str) -> None:
        """Lose a node: its dockerd and every process in its namespace, at once."""
        _kill_all(self._pids(node))
        process = self.processes.pop(node, None)
        if process is not None:
            process.wait(timeout=10)

    def _pids(self, node: str) -> set[int]:
        """Every process of the node: in its network namespace (dockerd, containerd, shims),
        and in its cgroups (the containers, which have network namespaces of their own)."""
        out = run("ip", "netns", "pids", self.ns(node), check=False).stdout
        pids = {int(pid) for pid in out.split()}
        for group in Path("/sys/fs/cgroup").glob(f"*/{self.tag}-{node}"):
            for procs in group.rglob("cgroup.procs"):
                try:
                    pids |= {int(pid) for pid in procs.read_text().split()}
                except OSError:
                    continue
        return pids

    # -- down ----------------------------------------------------------------------------

    def log_tails(self, lines: int = 30) -> str:
        """The end of each node's dockerd log: for the report of a test that failed."""
        tails = []
        for node in NODES:
            log = self.workdir / node / "dockerd.log"
            if log.exists():
                tail = log.read_text(errors="replace").splitlines()[-lines:]
                tails.append(f"--- {node} dockerd, last {lines} lines\n" + "\n".join(tail))
        return "\n".join(tails)

    def down(self) -> None:
        """Leave nothing: services, processes, namespaces, links, mounts, cgroups, files."""
        for node in NODES:
            if node in self.processes:
                self.docker(node, "swarm", "leave", "--force", check=False)
        for node in NODES:
            self.wait(lambda node=node: not _kill_all(self._pids(node)), 15, f"{node}'s processes gone")
            process = self.processes.pop(node, None)
            if process is not None:
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()
        run("ip", "link", "del", f"{self.tag}r0", check=False)
        for name in (*(self.ns(node) for node in NODES), self.bridge_ns):
            run("ip", "netns", "del", name, check=False)
        for mounted in reversed(self.mounts()):
            run("umount", "-l", mounted, check=False)
        for group in self.cgroups():
            for child in sorted(group.rglob("*"), key=lambda p: len(p.parts), reverse=True):
                if child.is_dir():
                    self.wait(lambda child=child: _rmdir(child), 10, f"{child} removed")
            self.wait(lambda group=group: _rmdir(group), 10, f"{group} removed")
        shutil.rmtree(self.workdir, ignore_errors=True)

    # -- what is left ----------------------------------------------------------------------

    def leftovers(self) -> dict[str, list[str]]:
        """Anything of this lab still on the machine (all empty after down())."""
        namespaces = [n for n in run("ip", "netns", "list").stdout.split() if n.startswith(self.tag)]
        links = [line for line in run("ip", "-o", "link").stdout.splitlines() if self.tag in line]
        processes = [str(pid) for pid in _pids_mentioning(str(self.workdir))]
        return {"namespaces": namespaces, "links": links, "mounts": self.mounts(),
                "cgroups": [str(g) for g in self.cgroups()], "processes": processes}

    def mounts(self) -> list[str]:
        return [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()
                if str(self.workdir) in line.split()[4]]

    def cgroups(self) -> list[Path]:
        return [group for group in Path("/sys/fs/cgroup").glob(f"*/{self.tag}-*") if group.is_dir()]


def _kill_all(pids: set[int]) -> set[int]:
    """SIGKILL each; the ones that were still there."""
    alive = set()
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
            alive.add(pid)
        except ProcessLookupError:
            pass
    return alive


def _rmdir(group: Path) -> bool:
    """Remove an empty cgroup; False while its last process is still exiting."""
    try:
        group.rmdir()
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True


def _pids_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found
