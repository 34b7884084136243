"""attrs models: the deploy spec a caller sends, the service the agent tracks, its answers.

Field types that carry a rule are NewTypes; convert.py registers one checking hook for each,
so every rule is enforced in one place and reported with the field's path.
"""

from __future__ import annotations

import secrets
import time
from datetime import UTC, datetime
from typing import Any, Literal, NewType

import attrs

ServiceName = NewType("ServiceName", str)
ImageRef = NewType("ImageRef", str)
Port = NewType("Port", int)
VramGb = NewType("VramGb", float)
MemoryGb = NewType("MemoryGb", float)
HealthPath = NewType("HealthPath", str)
ReadyTimeout = NewType("ReadyTimeout", float)
EnvMap = NewType("EnvMap", dict[str, str])
VolumeList = NewType("VolumeList", tuple[str, ...])
CacheMap = NewType("CacheMap", dict[str, str])  # cache (an agent volume) name -> container path
Command = NewType("Command", tuple[str, ...])

Status = Literal["starting", "healthy", "unhealthy", "exited", "restarting",
                 "rescheduling", "pending"]  # the last two only in front of a swarm
LIVE_STATUSES = ("starting", "healthy", "unhealthy")
# Who keeps a service running: someone deployed it unleased (until stopped), live leases,
# or no one (idle: kept warm until idle_until, then stopped or evicted).
Hold = Literal["pinned", "leased", "idle"]

CONTAINER_PREFIX = "tidybot-"
DATE_TIME = {"format": "date-time"}  # a field's schema metadata: an RFC 3339 time (rfc3339())
URI = {"format": "uri"}


def always(value: bool) -> Any:
    """An answer's field that always holds `value` (its schema says so)."""
    return attrs.field(default=value, metadata={"schema": {"const": value}})
MANAGED_LABEL = "tidybot.deploy-agent"  # on what the agent made: the instance that made it


@attrs.frozen
class DeploySpec:
    """What a caller asks to run: the flat body of `POST /deploy`."""

    name: ServiceName
    image: ImageRef
    port: Port = Port(8000)
    gpu: bool = False
    vram_gb: VramGb = VramGb(0.0)
    env: EnvMap = attrs.field(factory=lambda: EnvMap({}))
    volumes: VolumeList = VolumeList(())
    health: HealthPath = HealthPath("/health")
    ready_timeout: ReadyTimeout = ReadyTimeout(60.0)
    command: Command | None = None
    memory_gb: MemoryGb | None = None  # a hard memory limit; none by default
    shm_gb: MemoryGb | None = None  # /dev/shm size; GPU services get --default-shm-gb
    cache: CacheMap = attrs.field(factory=lambda: CacheMap({}))
    version: str | None = None
    description: str | None = None

    @property
    def container_name(self) -> str:
        return CONTAINER_PREFIX + self.name

    def differing_fields(self, other: DeploySpec) -> list[str]:
        """The fields that change what runs; ready_timeout and metadata don't count."""
        return [
            field
            for field in RUNTIME_FIELDS
            if getattr(self, field) != getattr(other, field)
        ]


RUNTIME_FIELDS = ("image", "port", "gpu", "vram_gb", "env", "volumes", "health", "command",
                  "memory_gb", "shm_gb", "cache")


@attrs.frozen
class DeployRequest:
    """A parsed `POST /deploy`: the spec, whether a different running spec may be replaced,
    and the caller's lease: for `lease_s` seconds, a new one or (with `lease_id`) renewed."""

    spec: DeploySpec
    replace: bool = False
    lease_s: float | None = None
    lease_id: str | None = None
    keep_warm_s: float | None = None  # with lease_s: warm time after the last lease; default --keep-warm
    wait_s: float = 0.0  # how long a GPU deploy may wait for room (0: answer at once)
    priority: int | None = None  # 0-9: its place in the queue (5 when not said)


@attrs.define
class Lease:
    """One holder's claim on a service: it keeps the service running until `expires_at`."""

    id: str
    service: str
    lease_s: float
    expires_at: float
    keep_warm_s: float = 0.0  # how long its service stays warm once no lease is left
    priority: int = 5  # its holder's: a waiting deploy of higher priority may preempt it


@attrs.frozen
class Owner:
    """Who holds a reservation: a service name and one deploy (or placement) of it, so that
    a service placed again can hold its old and its new reservation at once."""

    name: str
    attempt: str

    def __str__(self) -> str:
        return f"{self.name}#{self.attempt[:8]}"


def new_attempt() -> str:
    return secrets.token_hex(8)


def new_lease_id() -> str:
    """16 URL-safe characters, never a leading '-': a command line (`deployctl renew NAME
    LEASE_ID`) would take that for an option."""
    while (lease_id := secrets.token_urlsafe(12)).startswith("-"):
        pass
    return lease_id


@attrs.frozen
class ColdStart:
    """A deploy's phases, in seconds: the pull (up to the create; 0 when the image was there,
    and in front of a swarm, where the node pulls after the create), create and start, and
    start to healthy."""

    pull_s: float
    start_s: float
    healthy_s: float
    pulled: bool  # whether it pulled anything

    @property
    def total_s(self) -> float:
        return self.pull_s + self.start_s + self.healthy_s

@attrs.define
class Service:
    """A deployment the agent tracks, from reservation until stop."""

    spec: DeploySpec
    container_id: str
    host_port: int
    gpu: int | None = None
    status: Status = "starting"
    started_at: float = attrs.field(factory=time.time)
    exit_code: int | None = None
    restarts: int = 0
    pinned: bool = True  # deployed without a lease by someone: runs until stopped
    # The node it runs on: all None on the agent's own node (one engine), else that node's
    # hostname for people, the address its port is published on, and its ID, its identity.
    node_name: str | None = None
    node_addr: str | None = None
    node_id: str | None = None
    reason: str | None = None  # why it is pending
    # Leased, then unheld: kept warm until idle_until (wall clock), for the largest keep_warm_s
    # its holders asked for; idle_since orders evictions (least recently released first).
    keep_warm_s: float = 0.0
    idle_since: float | None = None
    idle_until: float | None = None
    cold_start: ColdStart | None = None  # its deploy's phases (eviction's cost)
    attempt: str = attrs.field(factory=new_attempt)  # the deploy that holds its reservations

    @property
    def owner(self) -> Owner:
        """Whose name its port and GPU reservations are held in."""
        return Owner(self.spec.name, self.attempt)

    def hold(self, leased: bool) -> Hold:
        """Who keeps it running, given whether it has live leases."""
        return "pinned" if self.pinned else "leased" if leased else "idle"


@attrs.frozen
class ServiceView:
    """A `/services` entry. A first deploy still on its way is listed `starting` with reason
    `deploying`, its host and port null until a port is reserved for it."""

    name: str
    host: str | None = attrs.field(metadata={"schema": URI})
    port: int | None
    container_port: int
    gpu: int | None
    vram_gb: float
    status: Status
    uptime: int
    image: str
    restarts: int
    exit_code: int | None
    leases: int
    lease_expires_at: str | None = attrs.field(metadata={"schema": DATE_TIME})
    vram_used_gb: float | None
    vram_over: bool
    node_name: str
    node_id: str | None
    reason: str | None
    hold: Hold | None = attrs.field(metadata={"schema": {"enum": ["pinned", "leased", "idle", None]}})
    idle_until: str | None = attrs.field(metadata={"schema": DATE_TIME})
    preempt_at: str | None = attrs.field(default=None, metadata={"schema": DATE_TIME})
    cold_start: ColdStart | None = None

    @classmethod
    def of(cls, service: Service, advertise_host: str, now: float, leases: list[Lease],
           vram_used_gb: float | None = None, vram_over: bool = False,
           node_name: str = "") -> ServiceView:
        return cls(
            name=service.spec.name,
            host=service_url(service.node_addr or advertise_host, service.host_port),
            port=service.host_port,
            container_port=service.spec.port,
            gpu=service.gpu,
            vram_gb=service.spec.vram_gb,
            status=service.status,
            uptime=max(0, int(now - service.started_at)),
            image=service.spec.image,
            restarts=service.restarts,
            exit_code=service.exit_code,
            leases=len(leases),
            lease_expires_at=rfc3339(max(lease.expires_at for lease in leases)) if leases else None,
            vram_used_gb=None if vram_used_gb is None else round(vram_used_gb, 2),
            vram_over=vram_over,
            node_name=service.node_name or node_name,
            node_id=service.node_id,
            reason=service.reason,
            hold=service.hold(bool(leases)),
            idle_until=rfc3339(service.idle_until) if service.idle_until is not None else None,
            cold_start=service.cold_start,
        )

    @classmethod
    def deploying(cls, spec: DeploySpec, gpu: int | None, host_port: int | None,
                  advertise_host: str, node_name: str = "") -> ServiceView:
        """A first deploy in flight, with what it has reserved so far."""
        return cls(
            name=spec.name,
            host=None if host_port is None else service_url(advertise_host, host_port),
            port=host_port, container_port=spec.port, gpu=gpu, vram_gb=spec.vram_gb,
            status="starting", uptime=0, image=spec.image, restarts=0, exit_code=None, leases=0,
            lease_expires_at=None, vram_used_gb=None, vram_over=False, node_name=node_name,
            node_id=None, reason="deploying", hold=None, idle_until=None,
        )


@attrs.frozen
class DeployAnswer:
    """The answer to a successful `POST /deploy`."""

    name: str
    host: str = attrs.field(metadata={"schema": URI})
    port: int
    gpu: int | None
    status: Status
    already_running: bool
    ok: bool = always(True)
    # Only in the answers to leased deploys:
    lease_id: str | None = attrs.field(default=None, metadata={"omit_if_default": True})
    lease_expires_at: str | None = attrs.field(default=None, metadata={"omit_if_default": True,
                                                                       "schema": DATE_TIME})


@attrs.frozen
class DryRunAnswer:
    """The answer to `POST /deploy?dry_run=1`: what a deploy would do now (status: the
    running service's, when already_running; else null)."""

    name: str
    host: str = attrs.field(metadata={"schema": URI})
    port: int
    gpu: int | None
    status: Status | None
    already_running: bool
    pull_needed: bool | None  # None: another node pulls it, the agent can't know
    evicts: list[str] = attrs.field(factory=list)  # idle services it would stop to fit
    queued: bool = False  # with wait_s: it fits nowhere now and would wait in the queue
    ok: bool = always(True)
    dry_run: bool = always(True)


@attrs.frozen
class StopAnswer:
    """The answer to a successful `POST /stop`."""

    name: str
    ok: bool = always(True)


@attrs.frozen
class PullAnswer:
    """The answer to a successful `POST /images/pull`: the image as the node now has it."""

    image: str
    digest: str | None
    size_bytes: int
    ok: bool = always(True)


@attrs.frozen
class CacheRemoved:
    """The answer to a successful `DELETE /caches/{name}`."""

    name: str
    ok: bool = always(True)


@attrs.frozen
class LeaseAnswer:
    """The answer to a renew: the caller's lease, and when it now runs out."""

    name: str
    lease_id: str
    lease_s: float
    lease_expires_at: str = attrs.field(metadata={"schema": DATE_TIME})
    # When a waiting deploy of higher priority will stop the service (null: it won't).
    preempt_at: str | None = attrs.field(default=None, metadata={"schema": DATE_TIME})
    ok: bool = always(True)


@attrs.frozen
class QueueEntry:
    """A `GET /queue` entry: a GPU deploy waiting for room (deploys of one name share one)."""

    name: str
    position: int = attrs.field(metadata={"schema": {"minimum": 1}})
    priority: int
    since: str = attrs.field(metadata={"schema": DATE_TIME})
    needs_gb: float
    callers: int


@attrs.frozen
class ReleaseAnswer:
    """The answer to a lease's release: whether the service stopped with it, or until when it
    is kept warm (idle) now that no one holds it."""

    name: str
    lease_id: str
    stopped: bool
    idle_until: str | None = attrs.field(metadata={"schema": DATE_TIME})
    ok: bool = always(True)


@attrs.frozen
class HealthWarning:
    """A degraded condition: a stable code for programs, a sentence for people."""

    code: str
    message: str


@attrs.frozen
class HealthAnswer:
    """The agent's own `GET /health`."""

    status: Literal["ok", "degraded"]
    hostname: str
    gpus: int
    services_running: int
    engine: Literal["reachable", "unreachable"]
    version: str
    auth: Literal["token", "off"]
    warnings: list[HealthWarning]
    queued: int = 0  # GPU deploys waiting for room


DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """`90`, `90s`, `10m`, `2h`, `1d` -> seconds; ValueError unless it is a positive duration."""
    text = text.strip()
    unit = DURATION_UNITS.get(text[-1:].lower())
    number = text[:-1] if unit else text
    seconds = float(number) * (unit or 1)
    if not seconds > 0 or seconds != seconds or seconds == float("inf"):
        raise ValueError(f"expected a duration like 90s, 10m or 2h, got {text!r}")
    return seconds


def rfc3339(epoch: float) -> str:
    """Seconds since the epoch as RFC 3339 in UTC, to the millisecond: 2026-01-02T03:04:05.678Z."""
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def service_url(advertise_host: str, host_port: int) -> str:
    host = f"[{advertise_host}]" if ":" in advertise_host else advertise_host
    return f"http://{host}:{host_port}"


JSONObject = dict[str, Any]
