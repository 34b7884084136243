"""Typed answers: `Service`, `Gpu`, `Event` (and `Lease`, in lease.py), attrs classes built
from the agent's JSON.

Each keeps that JSON in `raw`. For one release they still read like the dicts the client
used to return (`service["port"]`, `dict(service)`), with a DeprecationWarning: use the
attributes. Fields an older agent doesn't send are None; ones a newer agent adds are in
`raw`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from typing import Any, TypeVar

import attrs

A = TypeVar("A", bound="Answer")


@attrs.define(eq=False)
class Answer(Mapping[str, Any]):
    """The JSON an answer was built from, and the deprecated dict reading of it."""

    raw: dict[str, Any] = attrs.field(repr=False, kw_only=True)

    @classmethod
    def of(cls: type[A], raw: Mapping[str, Any], **extra: Any) -> A:
        """From the agent's JSON (plus fields the client adds, such as `node`)."""
        merged = {**raw, **extra}
        known = {f.name: merged.get(f.name) for f in attrs.fields(cls) if f.name != "raw" and f.init}
        return cls(**known, raw=merged)

    def __getitem__(self, key: str) -> Any:
        warnings.warn(f"{type(self).__name__}[{key!r}]: the client's answers are attrs classes now; "
                      f"read .{key} (or .raw[{key!r}]). Dict access goes in the next release.",
                      DeprecationWarning, stacklevel=2)
        return self.raw[key]

    def __contains__(self, key: object) -> bool:
        return key in self.raw

    def __iter__(self) -> Iterator[str]:
        return iter(self.raw)

    def __len__(self) -> int:
        return len(self.raw)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Answer):
            return type(self) is type(other) and self.raw == other.raw
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]


@attrs.define(eq=False)
class Service(Answer):
    """A `/services` entry. `node`: the agent it came from, when asked through ComputeNodes.
    A first deploy still on its way is `starting` with reason `deploying`, and host and port
    None until the node has reserved a port for it."""

    name: str
    host: str | None
    port: int | None
    container_port: int | None
    gpu: int | None
    vram_gb: float | None
    status: str
    uptime: int | None
    image: str | None
    restarts: int | None
    exit_code: int | None
    leases: int | None
    lease_expires_at: str | None
    vram_used_gb: float | None
    vram_over: bool | None
    node_name: str | None
    node_id: str | None
    reason: str | None
    hold: str | None = None  # pinned, leased, idle (kept warm until idle_until)
    idle_until: str | None = None
    preempt_at: str | None = None  # when a waiting deploy of higher priority stops it
    cold_start: dict[str, Any] | None = None  # its deploy's pull_s, start_s, healthy_s, pulled
    node: str | None = None


@attrs.define(eq=False)
class Gpu(Answer):
    """A `/gpus` entry; `node` as for Service."""

    id: int
    name: str
    uuid: str | None
    vram_total_gb: float
    vram_used_gb: float | None
    vram_reserved_gb: float | None
    vram_committed_gb: float | None
    vram_foreign_gb: float | None
    vram_free_gb: float
    vram_idle_gb: float | None
    utilization_pct: float | None
    services: list[str] | None
    service_vram: list[dict[str, Any]] | None
    node_name: str | None
    node_id: str | None
    vram_accounting: str | None
    node: str | None = None


@attrs.define(eq=False)
class Event(Answer):
    """An `/events` entry: what happened to which service, and why; `node` as for Service."""

    id: int
    time: str
    service: str | None
    kind: str
    reason: str | None
    details: dict[str, Any] | None
    node: str | None = None
