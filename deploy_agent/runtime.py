"""The backend boundary: what the deployer asks of whatever runs the services.

One Docker engine (local.py) or a Docker Swarm (swarm.py). The HTTP layer, validation,
policy, leases, events and the page sit above this line and don't know which runs.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable
from typing import Protocol

import attrs

from deploy_agent.models import DeploySpec, JSONObject, Lease, Service

# Capabilities every service container goes without, in both backends (`CapDrop` on one
# engine, `CapabilityDrop` in a Swarm spec): raw sockets (spoofing), device nodes, file
# capabilities, chroot, audit writes. What ML servers do (bind ports, chown their files,
# drop to a user) keeps working.
DROPPED_CAPABILITIES = ("CAP_AUDIT_WRITE", "CAP_MKNOD", "CAP_NET_RAW", "CAP_SETFCAP", "CAP_SETPCAP",
                        "CAP_SYS_CHROOT")
# The container toolkit's "no GPU" setting, for services that asked for none: without it, a
# node whose default runtime is nvidia gives whatever an image's own ENV asks (often "all").
NO_GPU_ENV = {"NVIDIA_VISIBLE_DEVICES": "void"}
PORT_ATTEMPTS = 5  # host ports a launch tries when the engine refuses one that looked free
LOG_TAIL_LINES = 20  # of a service that failed to start, in its error

Progress = Callable[[JSONObject], None]
"""Receives deploy progress events ({"event": "pull" | "created" | "started" | "health", ...})."""


def no_progress(event: JSONObject) -> None:
    del event


@attrs.frozen
class DryRunOutcome:
    """Where a deploy would land now: its host port, node and GPU, and whether it would pull
    (None when the agent can't know: the image is pulled by another node)."""

    host_port: int
    gpu: int | None
    already_running: bool
    pull_needed: bool | None
    service: Service | None = None  # the running one, when already_running
    node_name: str | None = None
    node_addr: str | None = None
    node_id: str | None = None


class Runtime(Protocol):
    """Runs services for the deployer; every reservation goes through the service table."""

    async def remove_stray(self, spec: DeploySpec) -> None:
        """Before a launch: remove a leftover of ours under this name; Conflict for a foreign one."""

    async def launch(self, spec: DeploySpec, progress: Progress, lease: Lease | None) -> Service:
        """Reserve, create, start, wait healthy; tracked in the table. On any failure nothing
        is left and nothing stays reserved; the caller gets the original error."""

    async def place(self, spec: DeploySpec, replacing: Service | None) -> DryRunOutcome:
        """Where launch() would put it now, reserving nothing; the errors launch() would raise."""

    async def stop(self, service: Service, grace_s: int) -> None:
        """Stop it (grace, then kill) and return only once nothing of it runs: its VRAM and
        port are free on the node. One engine: the container has exited. A swarm: its task
        is gone (a node that is down bounds the wait; one that is up and still runs it past
        the grace is an EngineError, and the service keeps what it holds). A stop cut off
        half-way is finished by the next pass or start, never undone. It is removed by
        discard()."""

    async def discard(self, service: Service) -> None:
        """Remove what runs the service, returning only once nothing of it runs (so a
        replacement never runs beside it); a service already gone is fine."""

    async def remove_untracked(self, name: str) -> bool:
        """Remove a leftover of ours under this name the table lacks; whether there was one."""

    async def logs(self, service: Service, tail: int) -> str:
        """Its recent output."""

    def follow_logs(self, service: Service, tail: int) -> AsyncGenerator[str, None]:
        """Its output as it comes, after its last `tail` lines."""

    async def close(self) -> None:
        """Wait for rollbacks still running."""
