"""What the agent sees of its host, and whether that is the truth.

Run in a container, the agent sees its own PID namespace unless started with --pid host:
NVML's host PIDs then match no container, so its own services' VRAM would count as
foreign. And the host directories it may let services mount (--allow-host-path) must be
mounted into its container at the same paths, or it checks paths that are not the ones
the engine will mount. Both are checked and reported, never guessed.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from pathlib import Path

import attrs

from deploy_agent.gpus import container_of_pid
from deploy_agent.models import HealthWarning, JSONObject

_LOGGER = logging.getLogger(__name__)

# Docker bind-mounts /etc/hostname, /etc/hosts and /etc/resolv.conf from the container's
# own directory, so they name its id.
OWN_CONTAINER_RE = re.compile(r"/containers/([0-9a-f]{64})/")


MISSES_FOR_VERDICT = 3


def _pid(info: JSONObject | None) -> int:
    return int(((info or {}).get("State") or {}).get("Pid") or 0)


def own_container_id(mountinfo: Path = Path("/proc/self/mountinfo")) -> str | None:
    """The id of the Docker container this process runs in; None on a bare host."""
    try:
        match = OWN_CONTAINER_RE.search(mountinfo.read_text())
    except OSError:
        return None
    return match.group(1) if match else None


@attrs.define
class HostView:
    """The checks' results; None where a check could not run yet."""

    proc: Path = Path("/proc")
    shares_host_pids: bool | None = None
    unshared_paths: list[Path] = attrs.field(factory=list)
    _misses: int = 0  # looks in a row that found the process not here as itself

    async def check_pids(self, inspect: Callable[[], Awaitable[JSONObject | None]]) -> None:
        """Is a running managed container's process visible here as itself?

        `inspect` reads that container; it is read again after the look at /proc, and only
        a process that ran the whole time counts: one that exited meanwhile would look like
        a PID namespace of the agent's own. A process the engine still calls running may
        have exited a moment ago all the same (a stop the engine has yet to notice), so "not
        here" is the verdict only after MISSES_FOR_VERDICT looks in a row, one per pass.
        """
        if self.shares_host_pids is not None:
            return
        before = await inspect()
        pid = _pid(before)
        if before is None or pid <= 0:
            return
        seen = container_of_pid(pid, self.proc) == before.get("Id")
        if _pid(await inspect()) != pid:
            return  # it restarted under us: look again later
        self._misses = 0 if seen else self._misses + 1
        if not seen and self._misses < MISSES_FOR_VERDICT:
            return
        self.shares_host_pids = seen
        if not seen:
            _LOGGER.warning("The agent runs in a PID namespace of its own: GPU processes can't "
                            "be matched to its services. Run its container with --pid host.")

    def check_paths(self, allowed: tuple[Path, ...], own_info: JSONObject) -> None:
        """Which allowed host paths are not mounted at the same path into the agent's container."""
        binds = [(Path(m["Source"]), Path(m["Destination"])) for m in own_info.get("Mounts") or []
                 if m.get("Type") == "bind" and m.get("Source") and m.get("Destination")]
        self.unshared_paths = [
            root for root in allowed
            if not any(source == target and (root == target or target in root.parents)
                       for source, target in binds)]
        for root in self.unshared_paths:
            _LOGGER.warning("--allow-host-path %s is not mounted at the same path into the "
                            "agent's container (-v %s:%s): mounts from it are checked against "
                            "the wrong directory", root, root, root)

    def warnings(self) -> list[HealthWarning]:
        found = []
        if self.shares_host_pids is False:
            found.append(HealthWarning(
                "pid_namespace", "The agent sees its own PID namespace, not the host's: its "
                "services' GPU memory can't be told from foreign use. Run its container with "
                "--pid host."))
        if self.unshared_paths:
            paths = ", ".join(str(p) for p in self.unshared_paths)
            found.append(HealthWarning(
                "host_path_not_mounted", f"--allow-host-path {paths} is not mounted at the same "
                "path into the agent's container; add -v DIR:DIR for each."))
        return found
