"""The agent's volumes as caches: model weights that outlive the containers that wrote them.

Every volume the agent owns (a deploy's `cache` entries, and its named `volumes`) is listed
with its size, the services that mount it and when it was last used. The engine reports sizes
only through its whole-system disk-usage call, which walks every volume (slow, and one at a
time on API 1.41): it runs in the background every --cache-measure-interval and the last
figure is kept, null until known. With --cache-max-gb, each measurement is followed by a prune:
caches (volumes made for a deploy's `cache`, never its named `volumes`) that no service
mounts are removed, least recently used first, until all fit. In front
of a swarm, each node has volumes of its own; these are the manager's.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Protocol

import attrs

from deploy_agent.config import Config
from deploy_agent.errors import AgentError, Conflict, ServiceNotFound
from deploy_agent.events import EventLog
from deploy_agent.models import DATE_TIME, MANAGED_LABEL, DeploySpec, HealthWarning, JSONObject, rfc3339
from deploy_agent.records import RecordFile
from deploy_agent.state import parse_docker_time
from deploy_agent.table import ServiceTable
from deploy_agent.volumes import CACHE_LABEL, VOLUME_LABEL, engine_volume, owned_volume_names

_LOGGER = logging.getLogger(__name__)

GB = 1e9  # --cache-max-gb counts like disks do


@attrs.frozen
class CacheView:
    """A `GET /caches` entry."""

    name: str  # as deploys name it
    volume: str  # the engine's volume
    size_bytes: int | None  # the last measurement; null until the first one
    services: list[str]  # that mount it now (running, or being deployed)
    last_used: str | None = attrs.field(metadata={"schema": DATE_TIME})  # last mounted
    cache: bool  # made for a deploy's `cache` (else its `volumes`): --cache-max-gb may prune it


@attrs.frozen
class _Volume:
    cache: bool
    created: float  # wall clock


class CacheEngine(Protocol):
    """What the caches ask of the engine adapter."""

    async def list_volumes(self, labels: dict[str, str]) -> list[JSONObject]: ...

    async def volume_sizes(self) -> dict[str, int]: ...

    async def remove_volume(self, name: str) -> bool: ...


class Caches:
    """Lists, measures, removes and prunes the agent's volumes; `touch` records their use."""

    def __init__(self, engine: CacheEngine, table: ServiceTable, config: Config,
                 events: EventLog) -> None:
        self._engine = engine
        self._table = table
        self._config = config
        self._events = events
        self._file = RecordFile(config.state_dir / "caches.json")
        self._last_used: dict[str, float] = {}  # by cache name, wall clock
        self._sizes: dict[str, int] = {}  # by cache name, bytes
        self.measure_error: str | None = None
        self._measuring = asyncio.Lock()  # the loop's and a caller's, one after the other
        self._pruning = asyncio.Lock()  # likewise

    def load(self) -> None:
        """Read caches.json (blocking: run off the event loop at start-up)."""
        document = self._file.load()
        if isinstance(document, dict):
            self._last_used = {str(name): float(when) for name, when in document.items()
                               if isinstance(when, int | float)}

    def mounted(self) -> dict[str, list[str]]:
        """Cache name -> the services that mount it, tracked or being deployed."""
        found: dict[str, set[str]] = {}
        for spec in self._table.specs_in_use():
            for name in owned_volume_names(spec, self._config):
                found.setdefault(name, set()).add(spec.name)
        return {name: sorted(services) for name, services in found.items()}

    async def touch(self, spec: DeploySpec) -> None:
        """Its caches were used now (deployed, or stopped: last used until then)."""
        names = owned_volume_names(spec, self._config)
        if names:
            now = time.time()
            self._last_used.update(dict.fromkeys(names, now))
            await self._file.save(dict(self._last_used))

    async def _ours(self) -> dict[str, _Volume]:
        """This instance's volumes on the engine, by the name deploys use."""
        found = {}
        for volume in await self._engine.list_volumes({MANAGED_LABEL: self._config.instance}):
            labels = volume.get("Labels") or {}
            name = labels.get(VOLUME_LABEL)
            if name:
                found[name] = _Volume(cache=labels.get(CACHE_LABEL) == "1",
                                      created=parse_docker_time(volume.get("CreatedAt")) or 0.0)
        return found

    def _used_at(self, name: str, volume: _Volume, now: float, mounted: dict[str, list[str]]) -> float:
        """Now while mounted; else when last recorded (mounted, or unmounted at a stop), else
        when the engine made it (a volume from before the records, or records lost)."""
        return now if name in mounted else self._last_used.get(name, volume.created)

    async def views(self) -> list[CacheView]:
        mounted, now = self.mounted(), time.time()
        return [CacheView(name=name, volume=engine_volume(name, self._config.instance),
                          size_bytes=self._sizes.get(name), services=mounted.get(name, []),
                          last_used=rfc3339(self._used_at(name, volume, now, mounted)),
                          cache=volume.cache)
                for name, volume in sorted((await self._ours()).items())]

    async def remove(self, name: str, reason: str = "request") -> None:
        """Remove one cache: 404 when the agent has none of that name, 409 while mounted."""
        self._refuse_if_mounted(name)
        if name not in await self._ours():
            raise ServiceNotFound(f"This agent has no cache named {name}.", cache=name)
        # Again, with no await before the removal: a deploy naming it may have begun meanwhile.
        self._refuse_if_mounted(name)
        if not await self._engine.remove_volume(engine_volume(name, self._config.instance)):
            raise ServiceNotFound(f"This agent has no cache named {name} (removed meanwhile).",
                                  cache=name)
        size = self._sizes.pop(name, None)
        if self._last_used.pop(name, None) is not None:
            await self._file.save(dict(self._last_used))
        self._events.emit("cache_removed", None, reason, cache=name, size_bytes=size)
        _LOGGER.info("Removed cache %s (%s)", name, reason)

    def _refuse_if_mounted(self, name: str) -> None:
        services = self.mounted().get(name)
        if services:
            raise Conflict(f"Cache {name} is mounted by {', '.join(services)}; stop them first.",
                           cache=name, services=services)

    async def keep_measured(self) -> None:
        """The background loop: measure, prune, wait; failures are kept for /health."""
        while True:
            try:
                await self.measure()
                await self.prune()
                self.measure_error = None
            except AgentError as err:
                self.measure_error = err.message
                _LOGGER.warning("Measuring the caches failed: %s", err.message)
            await asyncio.sleep(self._config.cache_measure_s)

    async def measure(self) -> None:
        """Size the agent's volumes; nothing asked of the engine while it has none (the walk
        is slow, and before API 1.42 it sizes every container too)."""
        ours = await self._ours()
        sizes: dict[str, int] = {}
        if ours:
            async with self._measuring:
                sizes = await self._engine.volume_sizes()
        volume_of = {name: engine_volume(name, self._config.instance) for name in ours}
        self._sizes = {name: sizes[volume] for name, volume in volume_of.items()
                       if sizes.get(volume, -1) >= 0}

    async def prune(self) -> list[str]:
        """Remove caches (not other volumes) that no service mounts, least recently used
        first, until all the agent's volumes together fit --cache-max-gb; the names removed."""
        if self._config.cache_max_gb is None:
            return []
        async with self._pruning:
            return await self._prune(self._config.cache_max_gb * GB)

    async def _prune(self, limit: float) -> list[str]:
        total = sum(self._sizes.values())
        removed: list[str] = []
        ours, mounted, now = await self._ours(), self.mounted(), time.time()
        prunable = sorted((name for name, volume in ours.items()
                           if volume.cache and name in self._sizes and name not in mounted),
                          key=lambda name: self._used_at(name, ours[name], now, mounted))
        for name in prunable:
            if total <= limit:
                break
            size = self._sizes.get(name, 0)  # a DELETE may have taken it meanwhile
            try:
                await self.remove(name, reason="cache_max_gb")
            except Conflict:
                continue  # mounted since, or a container of ours still holds it
            except ServiceNotFound:
                pass  # removed meanwhile (a DELETE): its room is free all the same
            else:
                removed.append(name)
            total -= size
        return removed

    def warnings(self) -> list[HealthWarning]:
        found = []
        if self.measure_error is not None:
            found.append(HealthWarning("caches_not_measured", "The caches' sizes could not be "
                                       f"measured ({self.measure_error}); the last figures stand."))
        if self._file.write_error is not None:
            found.append(HealthWarning("caches_not_writable", f"caches.json cannot be written "
                                       f"({self._file.write_error}); kept in memory."))
        return found
