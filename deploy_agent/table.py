"""The service table: the one owner of what the agent runs.

It holds the records, the per-name locks, the generations, the host-port and GPU
reservations, the abandoned deploy attempts, and their copy in services.json. The
deployer and the reconciler both work through its methods; neither touches the other.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterator

import attrs

from deploy_agent.errors import LeaseNotFound, NoGpuCapacity, ServiceNotFound
from deploy_agent.eviction import Candidate, Eviction, plan
from deploy_agent.gpus import Assignment, GpuPool
from deploy_agent.models import DeploySpec, Hold, Lease, Owner, Service, Status, new_lease_id
from deploy_agent.ports import NodePorts
from deploy_agent.state import Abandoned, SavedState, StateFile

_LOGGER = logging.getLogger(__name__)

# An abandoned attempt whose container never showed up is forgotten after this long: the
# engine that was away when it was created has long since answered or dropped the request.
ABANDONED_TTL_S = 3600.0
STATE_RETRY_S = 2.0
WAITING_EVERY_S = 5.0  # how often a deploy waiting for its name's lock says so


async def _acquire(lock: asyncio.Lock, waiting: Callable[[float], None] | None, every_s: float) -> None:
    """lock.acquire(), telling `waiting` how long it has waited, every `every_s`."""
    if waiting is None or not lock.locked():
        await lock.acquire()
        return
    started = time.monotonic()
    acquiring = asyncio.ensure_future(lock.acquire())
    try:
        while not (await asyncio.wait({acquiring}, timeout=every_s))[0]:
            waiting(time.monotonic() - started)
    except BaseException:
        if not acquiring.cancel() and not acquiring.cancelled() and acquiring.exception() is None:
            lock.release()  # it was taken just as this wait was cancelled
        raise


@attrs.define
class _NameLock:
    lock: asyncio.Lock = attrs.field(factory=asyncio.Lock)
    users: int = 0  # holding or waiting


@attrs.frozen
class Held:
    """What an abandoned attempt reserved: its owner, and its port on a node (None: this one)."""

    owner: Owner
    node: str | None
    port: int


@attrs.frozen
class Preemption:
    """A leased service announced to stop at `at` (wall clock; `deadline` monotonic) for a
    waiting deploy of `for_name` with `priority`."""

    for_name: str
    priority: int
    at: float
    deadline: float


@attrs.frozen
class InFlight:
    """A first deploy of a name, before its record exists: what it has reserved so far."""

    spec: DeploySpec
    gpu: int | None
    host_port: int | None


@attrs.define
class Observation:
    """A background pass's view of the table: which names changed since it began."""

    _table: ServiceTable
    mark: int

    def current(self, name: str) -> bool:
        """Whether nothing touched `name` since the pass began, and nothing is touching it now."""
        return not self._table.busy(name) and self._table.changed_at(name) <= self.mark


class ServiceTable:
    """Records, locks, generations and reservations, with the methods that change them."""

    def __init__(self, ports: NodePorts, gpus: GpuPool, state_file: StateFile) -> None:
        self._ports = ports
        self._gpus = gpus
        self._state_file = state_file
        self._services: dict[str, Service] = {}
        self._locks: dict[str, _NameLock] = {}
        self._generation = 0  # one counter for the agent: a name gone and back never looks unchanged
        self._changed: dict[str, int] = {}  # name -> generation of its last change
        self._observers = 0
        self._abandoned: dict[str, Abandoned] = {}
        self._held: dict[str, tuple[Held, float]] = {}  # by attempt: what it left may use, since when
        self._in_flight: dict[str, DeploySpec] = {}  # deploys in flight, by a token of each
        self._leases: dict[str, Lease] = {}  # by id
        # Lease id -> time.monotonic() when it runs out: a wall-clock step never expires a lease.
        self._deadlines: dict[str, float] = {}
        self._idle_deadlines: dict[str, float] = {}  # name -> time.monotonic() its warm time ends
        # Leases a deploy under way has announced (id -> name), and those their caller let go
        # of before the deploy could make them.
        self._announced: dict[str, str] = {}
        self._withdrawn: set[str] = set()
        self._preempting: dict[str, Preemption] = {}  # by the name of the service to stop
        self._evicting: dict[str, asyncio.Event] = {}  # chosen victims, until stopped or restored
        self.head_gpu: tuple[str, int] | None = None  # the head waiter and the GPU it waits for
        self.leases_changed = 0  # bumped on every lease change, for caches of what shows them
        self._dirty = False
        self.state_error: str | None = None  # why the last write of services.json failed
        self.state_write_failures = 0

    # -- reading -------------------------------------------------------------------------

    def services(self) -> list[Service]:
        return sorted(self._services.values(), key=lambda s: s.spec.name)

    def get(self, name: str) -> Service | None:
        return self._services.get(name)

    def service(self, name: str) -> Service:
        """The record of `name`; ServiceNotFound (404) when there is none."""
        try:
            return self._services[name]
        except KeyError:
            raise ServiceNotFound(f"No service named {name!r} is deployed on this node.",
                                  name=name) from None

    @property
    def gpus(self) -> GpuPool:
        return self._gpus

    # -- locks and generations -----------------------------------------------------------

    @contextlib.asynccontextmanager
    async def locked(self, name: str, waiting: Callable[[float], None] | None = None,
                     every_s: float = WAITING_EVERY_S) -> AsyncIterator[None]:
        """Serialise deploy, stop and reconcile of one name; the lock lives while used.
        `waiting` is told the seconds waited so far, every `every_s` while another holds it."""
        entry = self._locks.get(name)
        if entry is None:
            entry = self._locks[name] = _NameLock()
        entry.users += 1
        try:
            await _acquire(entry.lock, waiting, every_s)
            try:
                yield
            finally:
                entry.lock.release()
        finally:
            entry.users -= 1
            if entry.users == 0:
                del self._locks[name]

    def busy(self, name: str) -> bool:
        """Whether a deploy, stop or eviction holds or waits for `name`."""
        return name in self._locks or name in self._evicting

    def changed_at(self, name: str) -> int:
        return self._changed.get(name, 0)

    @contextlib.contextmanager
    def observe(self) -> Iterator[Observation]:
        """For a pass that reads the engine, then applies what it saw to names still current."""
        self._observers += 1
        try:
            yield Observation(self, self._generation)
        finally:
            self._observers -= 1
            if not self._observers:  # no pass needs to know about names long gone
                for name in [n for n in self._changed if n not in self._services]:
                    del self._changed[name]

    def _bump(self, name: str) -> None:
        self._generation += 1
        self._changed[name] = self._generation
        self._dirty = True

    # -- records -------------------------------------------------------------------------

    def track(self, service: Service) -> None:
        """Record a service whose container exists; its reservations are already held."""
        self._services[service.spec.name] = service
        self._bump(service.spec.name)

    def untrack(self, service: Service) -> bool:
        """Drop the record, keeping its reservations (the caller releases them)."""
        if self._services.get(service.spec.name) is not service:
            return False
        del self._services[service.spec.name]
        self._bump(service.spec.name)
        return True

    def adopt(self, service: Service) -> None:
        """Track a service found running at start-up or by a resync, with its reservations
        (none for a pending one: it runs nowhere). A record it replaces lets go of its own."""
        previous = self._services.get(service.spec.name)
        if previous is not None and previous is not service:
            self.release(previous)
        self.track(service)
        if service.idle_until is not None:  # kept warm before the restart: the rest of its time
            self._idle_deadlines[service.spec.name] = time.monotonic() + max(
                0.0, service.idle_until - time.time())
        if service.status == "pending":
            return
        self._ports.on(service.node_id).claim(service.owner, service.host_port)
        if service.gpu is not None:
            self._gpus.claim(service.owner, service.gpu, service.spec.vram_gb, service.node_id)

    def set_status(self, service: Service, status: Status, reason: str | None = None) -> None:
        """What a background pass saw of it (and why it waits, when pending)."""
        service.status = status
        service.reason = reason

    def relocate(self, service: Service, owner: Owner, *, node_id: str, node_name: str,
                 node_addr: str, host_port: int, gpu: int | None) -> None:
        """It was placed again: `owner` holds the new port and GPU already; the old
        reservations are released here, after the new ones are held."""
        self.release(service)
        service.node_id, service.node_name, service.node_addr = node_id, node_name, node_addr
        service.host_port, service.gpu, service.attempt = host_port, gpu, owner.attempt
        self._bump(service.spec.name)

    def park(self, service: Service, reason: str) -> None:
        """It runs nowhere now (pending, scaled to nothing): it lets go of its port and GPU."""
        self.release(service)
        self.set_status(service, "pending", reason)
        self._bump(service.spec.name)

    def pin(self, service: Service) -> None:
        """Someone deployed it without a lease: it runs until stopped, whatever leases do
        (and no waiter may preempt it)."""
        self._wake(service)
        self.call_off(service.spec.name)
        if not service.pinned:
            service.pinned = True
            self._dirty = True

    # -- holds: pinned, leased, idle -------------------------------------------------------

    def hold_of(self, service: Service) -> Hold:
        return service.hold(bool(self.leases_of(service.spec.name)))

    def carry_holds(self, service: Service, replaced: Service | None) -> None:
        """A service launched in place of `replaced` keeps what its holders asked: the
        longest keep-warm of their leases, and of the one it replaces."""
        warm = [lease.keep_warm_s for lease in self.leases_of(service.spec.name)]
        if replaced is not None:
            warm.append(replaced.keep_warm_s)
        service.keep_warm_s = max([service.keep_warm_s, *warm])

    def idle_names(self) -> set[str]:
        """Services kept warm with no one holding them: what eviction may take."""
        held = {lease.service for lease in self._leases.values()}
        return {name for name, s in self._services.items()
                if not s.pinned and name not in held and s.idle_until is not None}

    def _wake(self, service: Service) -> None:
        """Someone holds it again: no longer idle."""
        if service.idle_until is not None or service.idle_since is not None:
            service.idle_since = service.idle_until = None
            self._idle_deadlines.pop(service.spec.name, None)
            self._lease_changed()

    def idle_if_unheld(self, name: str) -> bool:
        """Its last lease has just ended: keep it warm for the largest keep_warm_s its holders
        asked for. False (nothing changed) when it is held, pinned, idle already, or none
        of its holders wanted it kept warm."""
        service = self._services.get(name)
        if (service is None or service.pinned or self.leases_of(name) or service.idle_until is not None
                or service.keep_warm_s <= 0):
            return False
        now = time.time()
        service.idle_since, service.idle_until = now, now + service.keep_warm_s
        self._idle_deadlines[name] = time.monotonic() + service.keep_warm_s
        self._lease_changed()
        return True

    def make_room(self, name: str, vram_gb: float, min_resident_s: float, token: str,
                  freeing: Owner | None = None) -> Eviction | None:
        """For a GPU deploy of `name` that fits on no GPU now: plan_room(), carried out as far
        as the table goes. The victims' memory passes to the deploy in this one step, with no
        await: their reservations go and an earmark under `token` holds all of it (what the
        deploy needs, and while the victims still run, what they free), so no concurrent
        deploy takes it and nothing counts it twice. The victims are marked evicting (busy)
        until the caller has stopped them, or given them their room back."""
        chosen = self.plan_room(name, vram_gb, min_resident_s, freeing)
        if chosen is None:
            return None
        for victim in chosen.victims:
            self._gpus.release(victim.owner)
            self._evicting.setdefault(victim.name, asyncio.Event())
        self._gpus.earmark(token, chosen.gpu, max(chosen.freed_gb, self.beside(vram_gb, freeing, chosen.gpu)))
        return chosen

    def beside(self, vram_gb: float, freeing: Owner | None, gpu: int) -> float:
        """What a deploy of `vram_gb` must hold beside the reservation of the service it
        replaces (`freeing`) on `gpu`: that one still holds its own until it is removed."""
        return max(0.0, vram_gb - (self._freed_by(freeing, gpu) if freeing is not None else 0.0))

    def end_evicting(self, name: str) -> None:
        """The eviction of `name` is over (it is stopped, or was given its room back)."""
        done = self._evicting.pop(name, None)
        if done is not None:
            done.set()

    async def eviction_over(self, name: str) -> None:
        """Wait while `name` is being evicted: a deploy of it then starts anew."""
        while (done := self._evicting.get(name)) is not None:
            await done.wait()

    def _candidates(self, min_resident_s: float, now: float) -> list[Candidate]:
        """Idle services eviction may take: not busy, resident long enough."""
        return [self._candidate(s, gpu, s.idle_since or now)
                for s in (self._services[n] for n in sorted(self.idle_names()))
                if (gpu := self._gpus.index_of(s.owner)) is not None and not self.busy(s.spec.name)
                and now - s.started_at >= min_resident_s]

    def _candidate(self, service: Service, gpu: int, since: float, held: bool = False) -> Candidate:
        """What stopping `service` frees on `gpu` (max of declared and observed), and costs."""
        return Candidate(name=service.spec.name, owner=service.owner, gpu=gpu, idle_since=since,
                         gb=max(service.spec.vram_gb, self._gpus.observed_gb(service.spec.name, gpu) or 0.0),
                         deploy_s=service.cold_start.total_s if service.cold_start else None,
                         held=held)

    def plan_room(self, name: str, vram_gb: float, min_resident_s: float,
                  freeing: Owner | None = None) -> Eviction | None:
        """The cheapest set of idle services on one GPU whose memory makes a deploy of
        `vram_gb` fit, changing nothing; None when it fits already, or when evicting every
        eligible service would not make it fit.

        Eligible: idle (no lease, not pinned), not `name` itself (`freeing`, the service it
        replaces, counts as gone), no deploy, stop or eviction of it under way, resident at
        least `min_resident_s`, and not on the GPU the head waiter of the queue waits for
        (unless this is it).
        """
        try:
            self._gpus.place(vram_gb, freeing=freeing, for_name=name)
            return None
        except NoGpuCapacity:
            pass
        now = time.time()
        held_for_head = self.head_gpu[1] if self.head_gpu is not None and self.head_gpu[0] != name else None
        free = {gpu: room + (self._freed_by(freeing, gpu) if freeing is not None else 0.0)
                for gpu, room in self._gpus.free_by_gpu(name).items() if gpu != held_for_head}
        candidates = [c for c in self._candidates(min_resident_s, now) if c.name != name]
        return plan(vram_gb, free, candidates, now)

    def _freed_by(self, owner: Owner, gpu: int) -> float:
        found = self._services.get(owner.name)
        if found is None or found.owner != owner or self._gpus.index_of(owner) != gpu:
            return 0.0
        return max(found.spec.vram_gb, self._gpus.observed_gb(owner.name, gpu) or 0.0)

    def fits(self, name: str, vram_gb: float, min_resident_s: float, evicting: bool = True,
             freeing: Owner | None = None) -> bool:
        """Whether a GPU deploy of `name` fits now: as it is (`freeing`: a service it replaces
        counted as gone), or by evicting idle services."""
        try:
            self._gpus.place(vram_gb, freeing=freeing, for_name=name)
            return True
        except NoGpuCapacity:
            return evicting and self.plan_room(name, vram_gb, min_resident_s, freeing) is not None

    def room_at_best(self, beside: str) -> float | None:
        """The most VRAM a deploy of `beside` could ever get on one GPU here: its total,
        beside pinned services (but the one of that name, which it replaces) and foreign
        use (None without readings)."""
        pinned = {s.owner for s in self._services.values() if s.pinned and s.spec.name != beside}
        return self._gpus.room_beside(pinned)

    def free_gb_by_gpu(self) -> dict[str, float]:
        return self._gpus.free_by_label()

    def closest_gpu(self, name: str) -> tuple[int, float] | None:
        """The GPU with the most room free for `name` now, and that room."""
        free = self._gpus.free_by_gpu(name)
        return max(free.items(), key=lambda item: (item[1], -item[0])) if free else None

    def restore_gpu(self, service: Service) -> None:
        """An eviction that could not (or need not) stop `service`: it holds its GPU memory
        again, and is no longer being evicted."""
        if service.gpu is not None and not self._gpus.holds(service.owner) \
                and self._services.get(service.spec.name) is service:
            self._gpus.claim(service.owner, service.gpu, service.spec.vram_gb, service.node_id)
        self.end_evicting(service.spec.name)

    # -- preemption ----------------------------------------------------------------------

    def plan_preemption(self, name: str, vram_gb: float, priority: int,
                        min_resident_s: float) -> Eviction | None:
        """The cheapest set of idle services and leased ones whose every holder has a lower
        priority than `priority`, on one GPU, that makes a deploy of `name` fit (idle ones
        first); None when none does. Changes nothing."""
        now = time.time()
        candidates = self._candidates(min_resident_s, now)
        for service in self._services.values():
            leases = self.leases_of(service.spec.name)
            gpu = self._gpus.index_of(service.owner)
            if (service.pinned or not leases or gpu is None or self.busy(service.spec.name)
                    or max(lease.priority for lease in leases) >= priority
                    or now - service.started_at < min_resident_s):
                continue
            candidates.append(self._candidate(service, gpu, service.started_at, held=True))
        return plan(vram_gb, self._gpus.free_by_gpu(name), candidates, now)

    def preempt(self, name: str, for_name: str, priority: int, grace_s: float) -> float:
        """Announce that `name` stops in grace_s for `for_name`; when (wall clock)."""
        at = time.time() + grace_s
        self._preempting[name] = Preemption(for_name=for_name, priority=priority, at=at,
                                            deadline=time.monotonic() + grace_s)
        self._lease_changed()
        return at

    def preempt_at(self, name: str) -> float | None:
        preemption = self._preempting.get(name)
        return preemption.at if preemption is not None else None

    def preempting_for(self, name: str) -> str | None:
        """The waiting deploy `name` is announced to stop for, if any."""
        preemption = self._preempting.get(name)
        return preemption.for_name if preemption is not None else None

    def preempted_for(self, for_name: str) -> list[str]:
        return sorted(n for n, p in self._preempting.items() if p.for_name == for_name)

    def call_off(self, name: str) -> None:
        if self._preempting.pop(name, None) is not None:
            self._lease_changed()

    def still_preemptible(self, name: str) -> bool:
        """Whether the preemption announced for `name` still stands: it is unpinned, and every
        holder has a lower priority than the waiter's."""
        preemption, service = self._preempting.get(name), self._services.get(name)
        return (preemption is not None and service is not None and not service.pinned
                and all(lease.priority < preemption.priority for lease in self.leases_of(name)))

    def due_preemptions(self) -> list[str]:
        """Services whose preemption grace is over, to stop now."""
        now = time.monotonic()
        return sorted(n for n, p in self._preempting.items() if p.deadline <= now and not self.busy(n))

    def stop_reason(self, name: str) -> str | None:
        """Why `name` should stop now, if it should: no holder and no warm time
        (lease_expired), or its warm time is over (idle_expired)."""
        service = self._services.get(name)
        if service is None or service.pinned or self.leases_of(name):
            return None
        if service.idle_until is None:
            return None if service.keep_warm_s > 0 else "lease_expired"
        return "idle_expired" if self._idle_deadlines.get(name, 0.0) <= time.monotonic() else None

    def forget(self, service: Service) -> bool:
        """Drop a record whose container is gone, releasing what it held."""
        if not self.untrack(service):
            return False
        self.release(service)
        self._idle_deadlines.pop(service.spec.name, None)
        self._preempting.pop(service.spec.name, None)
        self.end_evicting(service.spec.name)
        return True

    # -- reservations --------------------------------------------------------------------
    # Each is held by an Owner (a name and one deploy of it); a release names its owner and
    # frees only what that owner holds.

    def reserve_gpu(self, owner: Owner, vram_gb: float, freeing: Owner | None = None) -> Assignment:
        """Place on a GPU now, with no await: NoGpu / NoGpuCapacity when nothing fits."""
        return self._gpus.reserve(owner, vram_gb, freeing)

    async def reserve_port(self, owner: Owner, preferred: int, published: set[int],
                           refused: frozenset[int] = frozenset(), node: str | None = None) -> int:
        """A host port on `node` (an ID; None: this node) for `owner`: NoPortAvailable when none."""
        return await self._ports.on(node).reserve(owner, preferred, published, refused)

    async def free_port(self, preferred: int, published: set[int], freed: set[int],
                        node: str | None = None) -> int:
        """The host port a deploy would get now; nothing is reserved."""
        return await self._ports.on(node).first_free(preferred, published, freed)

    def release_gpu(self, owner: Owner) -> None:
        self._gpus.release(owner)

    def release_port(self, owner: Owner, host_port: int, node: str | None = None) -> None:
        self._ports.on(node).release(owner, host_port)

    def release(self, service: Service) -> None:
        """Let go of the port and GPU the service's current owner holds (none when pending)."""
        if service.status == "pending":
            return
        self._ports.on(service.node_id).release(service.owner, service.host_port)
        if service.gpu is not None:
            self._gpus.release(service.owner)

    def refuse_port(self, host_port: int, node: str | None = None) -> None:
        """The engine refused this port on `node`: it isn't offered there again for a while."""
        self._ports.on(node).refuse(host_port)

    def port_holder(self, host_port: int, node: str | None = None) -> Owner | None:
        return self._ports.on(node).holder(host_port)

    async def refresh_gpus(self) -> None:
        """Re-read the GPUs, telling the pool which containers are the agent's own."""
        await self._gpus.refresh({name: s.container_id for name, s in self._services.items()})

    # -- host mounts -----------------------------------------------------------------------

    def volumes_beside(self, name: str) -> dict[str, tuple[str, ...]]:
        """The volumes of every other service, and of every other deploy in flight, by name."""
        found: dict[str, tuple[str, ...]] = {n: s.spec.volumes for n, s in self._services.items()
                                             if n != name and s.spec.volumes}
        for other in self._in_flight.values():
            if other.name != name and other.volumes:
                found[other.name] = found.get(other.name, ()) + other.volumes
        return found

    @contextlib.contextmanager
    def deploying(self, spec: DeploySpec) -> Iterator[None]:
        """A deploy in flight, until it is done (then its record stands for it, or it failed):
        its volumes count for volumes_beside(), and deploying() lists it. Taken with no await
        after volumes_beside(), so two deploys racing never both miss each other."""
        token = secrets.token_hex(8)
        self._in_flight[token] = spec
        try:
            yield
        finally:
            del self._in_flight[token]

    def specs_in_use(self) -> list[DeploySpec]:
        """The specs of every tracked service and of every deploy in flight (replaces too)."""
        return [s.spec for s in self._services.values()] + list(self._in_flight.values())

    def in_flight(self) -> list[InFlight]:
        """First deploys of names with no record yet, by name, with the GPU and host port
        reserved for them so far: for listings, which show them from the start."""
        found: dict[str, InFlight] = {}
        for spec in self._in_flight.values():
            if spec.name not in self._services and spec.name not in found:
                found[spec.name] = InFlight(spec, self._gpus.reserved_for(spec.name),
                                            self._ports.own_reserved_for(spec.name))
        return sorted(found.values(), key=lambda entry: entry.spec.name)

    # -- abandoned deploy attempts -------------------------------------------------------

    def abandon(self, attempt: str, name: str, holding: Held | None = None) -> None:
        """A deploy attempt that may have left a container: remove it later, never adopt it.
        `holding`: the reservations what it left may still use (a Swarm task on another node,
        where no reading shows it), kept until a resync finds it removed or never there."""
        self._abandoned[attempt] = Abandoned(attempt=attempt, name=name, since=time.time())
        if holding is not None:
            self._held[attempt] = (holding, time.monotonic())
        self._dirty = True

    def is_abandoned(self, attempt: str | None) -> bool:
        return attempt is not None and attempt in self._abandoned

    def holds(self, owner: Owner) -> bool:
        """Whether a record, or an abandoned attempt's leftover, still holds what `owner` reserved."""
        service = self._services.get(owner.name)
        return (service is not None and service.owner == owner) or any(
            held.owner == owner for held, _ in self._held.values())

    def settle(self, attempts_seen: set[str], removed: set[str], listed_at: float = 0.0) -> None:
        """After a resync whose listing began at `listed_at` (time.monotonic()): drop attempts
        whose container was removed or never showed up; let go of what an abandoned attempt
        held once it is removed, or once a listing made after it was abandoned lacks it."""
        now = time.time()
        for attempt, entry in list(self._abandoned.items()):
            gone = attempt not in attempts_seen and now - entry.since > ABANDONED_TTL_S
            if attempt in removed or gone:
                del self._abandoned[attempt]
                self._dirty = True
        for attempt, (held, since) in list(self._held.items()):
            if attempt in removed or (attempt not in attempts_seen and listed_at > since):
                del self._held[attempt]
                self._ports.on(held.node).release(held.owner, held.port)
                self._gpus.release(held.owner)

    # -- leases --------------------------------------------------------------------------

    def leases_of(self, name: str) -> list[Lease]:
        return [lease for lease in self._leases.values() if lease.service == name]

    def add_lease(self, name: str, lease_s: float, lease_id: str | None = None,
                  keep_warm_s: float = 0.0, priority: int = 5) -> Lease:
        """A new holder's lease on `name`, for lease_s seconds from now. An idle service
        wakes, kept warm afterwards as this holder asks; a leased one, as the most any asks."""
        lease = Lease(id=lease_id or new_lease_id(), service=name, lease_s=lease_s,
                      expires_at=0.0, keep_warm_s=keep_warm_s, priority=priority)
        preemption = self._preempting.get(name)
        if preemption is not None and priority >= preemption.priority:
            self.call_off(name)  # a holder as important as the waiter arrived
        service = self._services.get(name)
        if service is not None:
            was_held = bool(self.leases_of(name))
            self._wake(service)
            service.keep_warm_s = max(service.keep_warm_s, keep_warm_s) if was_held else keep_warm_s
        self._leases[lease.id] = lease
        self._run_for(lease, lease_s)
        return lease

    def renew_lease(self, name: str, lease_id: str, lease_s: float | None = None,
                    priority: int | None = None) -> Lease:
        """Extend a holder's lease to now + lease_s (its own lease_s when not given); a
        priority as high as a waiter's that preempts the service calls that off."""
        lease = self.lease(name, lease_id)
        if lease_s is not None:
            lease.lease_s = lease_s
        if priority is not None:
            lease.priority = priority
            preemption = self._preempting.get(name)
            if preemption is not None and priority >= preemption.priority:
                self.call_off(name)
        self._run_for(lease, lease.lease_s)
        return lease

    def _run_for(self, lease: Lease, seconds: float) -> None:
        """It runs out `seconds` from now on the monotonic clock; expires_at says when in
        wall-clock time, for answers."""
        self._deadlines[lease.id] = time.monotonic() + seconds
        lease.expires_at = time.time() + seconds
        self._lease_changed()

    def release_lease(self, name: str, lease_id: str) -> Lease:
        lease = self.lease(name, lease_id)
        self._drop_lease(lease)
        return lease

    def _drop_lease(self, lease: Lease) -> None:
        del self._leases[lease.id]
        self._deadlines.pop(lease.id, None)
        self._lease_changed()

    def lease(self, name: str, lease_id: str) -> Lease:
        """A live lease of `name`; LeaseNotFound (404) otherwise."""
        lease = self._leases.get(lease_id)
        if lease is None or lease.service != name or self._deadlines[lease_id] <= time.monotonic():
            raise LeaseNotFound(f"{name} has no lease {lease_id!r}: it lapsed, was released, or "
                                "never was. Deploy again with lease_s for a new one.",
                                name=name, lease_id=lease_id)
        return lease

    @contextlib.contextmanager
    def announcing(self, name: str, lease_id: str) -> Iterator[None]:
        """A deploy under way has told its caller the id of the lease it will make."""
        self._announced[lease_id] = name
        try:
            yield
        finally:
            del self._announced[lease_id]
            self._withdrawn.discard(lease_id)

    def withdraw(self, name: str, lease_id: str) -> bool:
        """Its caller lets go of an announced lease before it exists; whether it was one."""
        if self._announced.get(lease_id) != name:
            return False
        self._withdrawn.add(lease_id)
        return True

    def withdrawn(self, lease_id: str) -> bool:
        return lease_id in self._withdrawn

    def _lease_changed(self) -> None:
        self.leases_changed += 1
        self._dirty = True

    def drop_leases(self, name: str) -> None:
        """The service is gone: so are its holders' claims."""
        for lease in self.leases_of(name):
            self._drop_lease(lease)

    def settle_leases(self) -> list[str]:
        """Drop leases that ran out, keep warm the services left without a holder (those
        that asked for it), and name the services to stop: unheld with no warm time, or
        idle past it.

        Derived on each call, so a stop that failed (engine away) is simply tried again.
        """
        now = time.monotonic()
        for lease in [lease for lease in self._leases.values() if self._deadlines[lease.id] <= now]:
            self._drop_lease(lease)
        for name in sorted(self._services):
            if not self.busy(name):
                self.idle_if_unheld(name)
        return [name for name in sorted(self._services)
                if not self.busy(name) and self.stop_reason(name) is not None]

    def _saved_leases(self) -> list[Lease]:
        """The leases as services.json holds them: wall-clock ends, from the time each has left."""
        now, clock = time.time(), time.monotonic()
        return [attrs.evolve(lease, expires_at=now + self._deadlines[lease.id] - clock)
                for lease in self._leases.values()]

    # -- persistence ---------------------------------------------------------------------

    def restore(self, saved: SavedState | None) -> list[Service]:
        """Take the abandoned attempts and leases of a saved state; its services, for the
        caller to adopt. Callers could not renew while the agent was down, so each lease
        runs at least a full lease_s from now."""
        if saved is None:
            return []
        self._abandoned = {entry.attempt: entry for entry in saved.abandoned}
        self._leases, self._deadlines = {}, {}
        now = time.time()
        for lease in saved.leases:  # from here on, the monotonic clock counts its time
            self._leases[lease.id] = restored = attrs.evolve(lease)
            self._run_for(restored, max(lease.expires_at - now, lease.lease_s))
        return list(saved.services)

    async def persist(self) -> None:
        """Write services.json now. A failure is remembered and retried, never raised:
        the containers and their labels stay the truth, and reservations stay held."""
        self._dirty = False
        try:
            await self._state_file.save(SavedState(self.services(), list(self._abandoned.values()),
                                                   self._saved_leases()))
        except OSError as err:
            self._dirty = True
            self.state_write_failures += 1
            if self.state_error is None:
                _LOGGER.error("Cannot write %s (%s); retrying. The services keep running and "
                              "their containers' labels still record them.",
                              self._state_file.path, err)
            self.state_error = f"{self._state_file.path}: {err.strerror or err}"
            return
        if self.state_error is not None:
            _LOGGER.info("%s is written again", self._state_file.path)
            self.state_error = None

    async def persist_if_dirty(self) -> None:
        if self._dirty:
            await self.persist()

    async def keep_written(self) -> None:
        """Write what changed without a write of its own (or failed to write); runs until cancelled."""
        while True:
            await asyncio.sleep(STATE_RETRY_S)
            await self.persist_if_dirty()
