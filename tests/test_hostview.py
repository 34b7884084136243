"""The PID-namespace check as logic, over a /proc of the test's making."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deploy_agent.backends.docker.hostview import MISSES_FOR_VERDICT, HostView

CONTAINER = "c" * 64


def inspect_of(pid: int) -> Any:
    async def inspect() -> dict[str, Any]:
        return {"Id": CONTAINER, "State": {"Pid": pid, "Running": True}}
    return inspect


class TestPidNamespace:
    """Seen as itself once: host PIDs; missed on several passes in a row: a namespace of its own."""

    async def test_a_process_seen_as_itself_means_host_pids(self, tmp_path: Path) -> None:
        (tmp_path / "42").mkdir()
        (tmp_path / "42" / "cgroup").write_text(f"0::/system.slice/docker-{CONTAINER}.scope\n")
        view = HostView(proc=tmp_path)
        await view.check_pids(inspect_of(42))
        assert view.shares_host_pids is True and view.warnings() == []

    async def test_one_miss_is_no_verdict(self, tmp_path: Path) -> None:
        """A process that exited a moment before the engine noticed is not a namespace."""
        view = HostView(proc=tmp_path)  # /proc/42 is not there
        await view.check_pids(inspect_of(42))
        assert view.shares_host_pids is None and view.warnings() == []
        (tmp_path / "43").mkdir()
        (tmp_path / "43" / "cgroup").write_text(f"0::/docker/{CONTAINER}\n")
        await view.check_pids(inspect_of(43))  # the next pass sees the new one as itself
        assert view.shares_host_pids is True

    async def test_misses_in_a_row_are_a_namespace_of_its_own(self, tmp_path: Path) -> None:
        view = HostView(proc=tmp_path)
        for _ in range(MISSES_FOR_VERDICT):
            await view.check_pids(inspect_of(42))
        assert view.shares_host_pids is False
        assert [w.code for w in view.warnings()] == ["pid_namespace"]
