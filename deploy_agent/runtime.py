"""The backend boundary: what the deployer asks of whatever runs the services (Runtime),
what keeps the service table true in the background (Reconciler), and what a backend's
build() hands the app (Backend).

One Docker engine (backends/docker) or a Docker Swarm (backends/swarm). The HTTP layer,
validation, policy, leases, events and the page sit above this line and don't know which
runs; nothing above it imports a backend but the app, through backends.build().
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import TYPE_CHECKING, Protocol

import attrs

from deploy_agent.errors import Conflict, HealthTimeout, NoPortAvailable, PortTaken
from deploy_agent.models import (
    CONTAINER_PREFIX,
    ColdStart,
    DeploySpec,
    HealthWarning,
    JSONObject,
    Lease,
    Service,
)
from deploy_agent.table import ServiceTable

if TYPE_CHECKING:
    from deploy_agent.caches import Caches
    from deploy_agent.images import ImageStore

_LOGGER = logging.getLogger(__name__)

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
MIN_POLL_S = 0.02
MAX_POLL_S = 1.0
LOG_TAIL_LINES = 20  # of a service that failed to start, in its error

Progress = Callable[[JSONObject], None]
"""Receives deploy progress events: {"event": "lease" | "waiting" | "pull" | "created" |
"started" | "health", ...}."""


def no_progress(event: JSONObject) -> None:
    del event


class ColdStartClock:
    """Times a launch's phases from the progress it reports, whichever backend runs it: the
    pull ends at the first `created`, the start at the (last try's) `started` or its first
    health probe, and the wait for health when the launch returns. Tries the engine refused
    (a port taken, memlock) count in the start."""

    def __init__(self, progress: Progress) -> None:
        self._progress = progress
        self._began = time.monotonic()
        self._created: float | None = None
        self._started: float | None = None
        self._pulled = False

    def progress(self, event: JSONObject) -> None:
        now, kind = time.monotonic(), event.get("event")
        if kind == "pull":
            self._pulled = True
        elif kind == "created":  # again after a try the engine refused: that try's start
            self._created = now if self._created is None else self._created
            self._started = None
        elif kind in ("started", "health") and self._created is not None and self._started is None:
            self._started = now
        self._progress(event)

    def finish(self) -> ColdStart:
        now = time.monotonic()
        created = self._created if self._created is not None else now
        started = self._started if self._started is not None else created
        return ColdStart(pull_s=round(created - self._began, 3), start_s=round(started - created, 3),
                         healthy_s=round(now - started, 3), pulled=self._pulled)


async def on_a_free_port(reserve: Callable[[frozenset[int]], Awaitable[int]],
                         run: Callable[[int], Awaitable[Service]], refuser: str, name: str,
                         refuse: Callable[[int], None] = lambda port: None) -> Service:
    """`run` on the host port `reserve` holds for it, skipping the ports refused so far; the
    next port each time the engine finds the port taken after all (PortTaken, where `refuse`
    hears of it); NoPortAvailable, naming the `refuser`, after PORT_ATTEMPTS. Both backends
    launch through here."""
    refused: set[int] = set()
    for _ in range(PORT_ATTEMPTS):
        port = await reserve(frozenset(refused))
        try:
            return await run(port)
        except PortTaken:
            _LOGGER.info("Host port %s was taken under us (%s); trying the next", port, refuser)
            refused.add(port)
            refuse(port)
    raise NoPortAvailable(f"{refuser} refused {PORT_ATTEMPTS} host ports in a row for {name}.")


def not_ours(what: str, name: str) -> Conflict:
    """The 409 for a container or Swarm service of a deploy's name that the agent didn't make."""
    return Conflict(f"A {what} named {CONTAINER_PREFIX}{name} exists that this agent does not "
                    "manage; remove or rename it first.", name=name)


class HealthWatch(Protocol):
    """What the health wait asks of the backend about one service it is starting."""

    async def ready(self) -> bool:
        """Whether it runs, so a probe makes sense; ContainerExited (or PortTaken) once it
        failed."""

    async def probe(self, timeout_s: float) -> bool:
        """Whether its health path answers 2xx; ContainerExited when it exits meanwhile."""

    async def pause(self, seconds: float) -> None:
        """Wait between probes, cut short when it exits."""

    async def logs(self) -> list[str]:
        """Its last lines, for the error."""


async def wait_healthy(service: Service, timeout_s: float, progress: Progress, watch: HealthWatch,
                       min_pause_s: float = 0.0) -> None:
    """Probe until healthy, fast at first, backing off (poll_interval); HealthTimeout with
    its logs after `timeout_s`. Both backends wait through here, each with its own watch."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    attempt = 0
    while True:
        elapsed = loop.time() - started
        remaining = timeout_s - elapsed
        if remaining <= 0:
            raise HealthTimeout(f"{service.spec.name} did not answer {service.spec.health} with "
                                f"2xx within {timeout_s:g} s.", name=service.spec.name,
                                logs=await watch.logs())
        if await watch.ready():
            attempt += 1
            healthy = await watch.probe(min(1.0, remaining))
            progress({"event": "health", "attempt": attempt, "healthy": healthy,
                      "elapsed_s": round(loop.time() - started, 3)})
            if healthy:
                return
        await watch.pause(min(max(min_pause_s, poll_interval(elapsed)),
                              max(0.0, timeout_s - (loop.time() - started))))


def poll_interval(elapsed_s: float) -> float:
    """Health polls start every 20 ms and back off to 1 s, at about 5% of the time waited."""
    return min(MAX_POLL_S, max(MIN_POLL_S, elapsed_s / 20))


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
    evicts: tuple[str, ...] = ()  # the idle services it would stop to make room
    queued: bool = False  # it fits nowhere now, and would wait for room


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


class Reconciler(Protocol):
    """Keeps the service table true in the background, whatever runs the services: what a
    start adopts, the loops the app supervises, and what /health and /metrics show."""

    engine_reachable: bool  # as the last engine call found it
    resyncs: int  # passes completed
    resync_seconds: float  # their time, added up
    refusals: dict[str, str]  # what the engine refused in the last pass, by what it was about
    refusals_total: int
    # Set when another agent took this one's place (a swarm's lock taken over while this
    # agent was frozen or cut off): it must stop serving at once.
    displaced: asyncio.Event

    async def start_up(self) -> None:
        """Rebuild the table from what runs (and services.json), before the API serves;
        SystemExit when this agent must not serve (another one holds the swarm)."""

    def loops(self) -> dict[str, Callable[[], Awaitable[None]]]:
        """The background loops to run under the supervisor until shutdown, by name."""

    def warnings(self) -> list[HealthWarning]:
        """What /health should say about this backend (besides refusals and the engine)."""

    async def close(self) -> None:
        """At shutdown, after the deployer: let go of what it holds beyond the table."""


@attrs.frozen
class Backend:
    """What a backend's build() gives the app."""

    table: ServiceTable  # its records and reservations, with the GPUs it places on
    runtime: Runtime
    reconciler: Reconciler
    images: ImageStore  # pulls ahead of deploys, what the node has
    caches: Caches  # the agent's volumes
    close: Callable[[], Awaitable[None]]  # its engine clients and GPU inventory, last
