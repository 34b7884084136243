"""The deploy and stop flows, whatever runs the services: locks, idempotency, leases, events.

The backend (one engine, or a swarm) is a Runtime; this module knows only that boundary
and the service table.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

import attrs

from deploy_agent.admission import Admission, Grant
from deploy_agent.config import Config
from deploy_agent.errors import (
    AgentError,
    CallerGone,
    Conflict,
    InvalidRequest,
    LeaseNotFound,
    NoGpuCapacity,
    ServiceNotFound,
)
from deploy_agent.events import EventLog
from deploy_agent.eviction import Eviction
from deploy_agent.models import (
    ColdStart,
    DeployRequest,
    DeploySpec,
    Lease,
    Service,
    VramGb,
    new_lease_id,
    rfc3339,
)
from deploy_agent.policy import check_deploy
from deploy_agent.runtime import ColdStartClock, DryRunOutcome, Progress, Runtime, no_progress
from deploy_agent.table import ServiceTable

_LOGGER = logging.getLogger(__name__)

ENFORCE_INTERVAL_S = 0.5
DEFAULT_PRIORITY = 5
RETRY_ROOM_S = 0.1  # a waiting deploy whose room went to another looks again after this
MAX_ENFORCING = 8  # lease-expiry and VRAM-overuse stops in flight at once, one per name


@attrs.frozen
class DeployOutcome:
    service: Service
    already_running: bool
    lease: Lease | None = None  # the caller's, when it deployed with lease_s


def running_differently(name: str, differing: list[str]) -> Conflict:
    """The 409 for a deploy whose spec differs from the healthy service of its name."""
    return Conflict(f"{name} is running with a different {', '.join(differing)}; stop it first "
                    'or send "replace": true.', name=name, differing_fields=differing)


class RoomTaken(Exception):
    """The GPU room a deploy found before its lock went to another deploy before it could
    reserve it; `refusal` is the 503 to answer if it may not wait on."""

    def __init__(self, refusal: NoGpuCapacity) -> None:
        super().__init__(refusal.message)
        self.refusal = refusal


def _waiting_for(name: str, progress: Progress) -> Callable[[float], None]:
    """Keep-alive progress while a deploy waits for another deploy or stop of its name, so a
    caller's stall timer measures a node that went away, not one that is busy."""
    def say(waited_s: float) -> None:
        progress({"event": "waiting", "reason": "name_busy", "waited_s": round(waited_s, 1),
                  "message": f"another deploy or stop of {name} is under way"})
    return say


ServiceHook = Callable[[Service], Awaitable[None]]


async def _nothing(service: Service) -> None:
    del service


class Deployer:
    """Deploys and stops; serialises work per name, runs different names in parallel.

    Each deploy runs as a task the deployer owns, so a caller that leaves (or a handler
    cancelled at shutdown) never abandons it half-way: close() waits for it or rolls it back.
    """

    def __init__(self, config: Config, runtime: Runtime, table: ServiceTable, events: EventLog,
                 on_deployed: ServiceHook = _nothing, on_stopped: ServiceHook = _nothing,
                 cold_start_of: Callable[[str], ColdStart | None] = lambda image: None) -> None:
        self._config = config
        self._on_deployed = on_deployed  # the image records and the caches' use
        self._on_stopped = on_stopped
        self._runtime = runtime
        self._table = table
        self._events = events
        self._inflight: set[asyncio.Task[DeployOutcome]] = set()
        self._enforcing: dict[str, asyncio.Task[None]] = {}  # by name: the stops enforce() runs
        def expected_start_s(spec: DeploySpec) -> float | None:
            recorded = cold_start_of(spec.image)
            return recorded.total_s if recorded is not None else None

        self.admission = Admission(table, events, config.min_resident_s, config.max_queue,
                                   config.preempt_grace_s, expected_start_s)

    # -- deploy --------------------------------------------------------------------------

    async def deploy(self, request: DeployRequest, progress: Progress = no_progress,
                     still_there: Callable[[], bool] = lambda: True) -> DeployOutcome:
        """Answer an existing healthy deployment, or replace/launch one; never half-done.
        `still_there`: whether its caller is still connected (a deploy waiting for room
        leaves the queue when not)."""
        task = asyncio.create_task(self._deploy(request, progress, still_there),
                                   name=f"deploy {request.spec.name}")
        self._inflight.add(task)
        task.add_done_callback(self._deploy_done)
        return await asyncio.shield(task)

    def _deploy_done(self, task: asyncio.Task[DeployOutcome]) -> None:
        self._inflight.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: its caller may have gone and will never see it

    async def _deploy(self, request: DeployRequest, progress: Progress,
                      still_there: Callable[[], bool]) -> DeployOutcome:
        spec = request.spec
        self._check_request(request)
        lease_id = None
        if request.lease_s is not None:  # said at once: a caller cut off can release or renew it
            lease_id = request.lease_id or new_lease_id()
            progress({"event": "lease", "lease_id": lease_id})
        with self._table.announcing(spec.name, lease_id) if lease_id else contextlib.nullcontext():
            return await self._deploy_announced(request, lease_id, progress, still_there)

    async def _deploy_announced(self, request: DeployRequest, lease_id: str | None,
                                progress: Progress, still_there: Callable[[], bool]) -> DeployOutcome:
        spec = request.spec
        loop = asyncio.get_running_loop()
        wait_until = loop.time() + min(request.wait_s, self._config.max_wait_s)
        try:
            others = self._table.volumes_beside(spec.name)
            with self._table.deploying(spec):  # no await in between: racing deploys see each other
                await asyncio.to_thread(check_deploy, spec, self._config, others)  # resolves host paths
                while True:
                    try:
                        service, already_running, lease = await self._place(
                            request, lease_id, progress, still_there, max(0.0, wait_until - loop.time()))
                        break
                    except RoomTaken as taken:
                        # Room it found went to another deploy before it could reserve: wait on,
                        # if it may (never for a refusal from the queue itself).
                        if request.wait_s <= 0 or loop.time() + RETRY_ROOM_S >= wait_until:
                            raise taken.refusal from None
                        await asyncio.sleep(RETRY_ROOM_S)
            return DeployOutcome(service, already_running, lease)
        except AgentError as err:
            self._events.emit("deploy_failed", spec.name, err.code, image=spec.image,
                              status=err.status)
            raise
        finally:  # one write of what changed (launched, replaced, a new holder), before the answer
            self.admission.serve()  # what a failed deploy held may be a waiter's now
            await self._table.persist_if_dirty()

    async def _place(self, request: DeployRequest, lease_id: str | None, progress: Progress,
                     still_there: Callable[[], bool],
                     wait_s: float) -> tuple[Service, bool, Lease | None]:
        """Room (waiting for it, when the deploy may), then the deploy under its name's lock."""
        spec = request.spec
        await self._table.eviction_over(spec.name)  # a victim being evicted starts anew after
        grant = await self._admit(request, wait_s, progress, still_there)  # before the lock
        try:
            if grant is not None and not still_there():
                raise CallerGone(f"The caller of {spec.name} left while it waited for room.",
                                 name=spec.name)
            async with self._table.locked(spec.name, _waiting_for(spec.name, progress)):
                try:
                    service, already_running = await self._deploy_locked(request, lease_id, progress,
                                                                         grant)
                except NoGpuCapacity as err:
                    raise RoomTaken(err) from None
                return service, already_running, self._hold(service, request, lease_id)
        finally:
            if grant is not None and not grant.used:
                self.admission.give_back(grant)

    async def _admit(self, request: DeployRequest, wait_s: float, progress: Progress,
                     still_there: Callable[[], bool]) -> Grant | None:
        """For a GPU deploy with wait_s that fits nowhere now: wait in the queue for room."""
        spec = request.spec
        existing = self._table.get(spec.name)
        if not spec.gpu or (existing is not None and existing.status == "healthy"
                            and not existing.spec.differing_fields(spec)):
            return None  # no room needed: it runs already, as asked
        return await self.admission.admit(spec, wait_s, self._priority(request), progress, still_there)

    async def _deploy_locked(self, request: DeployRequest, lease_id: str | None,
                             progress: Progress, grant: Grant | None = None) -> tuple[Service, bool]:
        """The service, and whether it was already running; launched under `lease_id`."""
        spec = request.spec
        existing = self._table.get(spec.name)
        if existing is not None:
            differing = existing.spec.differing_fields(spec)
            if existing.status == "healthy":
                if not differing:
                    return existing, True
                if not request.replace and self._table.hold_of(existing) != "idle":
                    raise running_differently(spec.name, differing)  # idle: no one holds it
            _LOGGER.info("Replacing %s (status %s)", spec.name, existing.status)
            await self._discard(existing)
            self._events.emit("replaced", spec.name, "spec_changed" if differing else existing.status,
                              image=existing.spec.image, differing_fields=differing)
        else:
            await self._runtime.remove_stray(spec)
        lease = None
        if lease_id is not None and request.lease_s is not None:  # the creator's, into the labels
            lease = Lease(id=lease_id, service=spec.name, lease_s=request.lease_s, expires_at=0.0)
        token = None
        try:
            if spec.gpu:
                token = await self._make_room(spec, grant)
            clock = ColdStartClock(progress)
            service = await self._runtime.launch(spec, clock.progress, lease)
        finally:
            if token is not None:
                self._table.gpus.drop_earmark(token)  # taken by the launch, or unused
        service.cold_start = clock.finish()
        self._table.carry_holds(service, existing)
        self._events.emit("deployed", spec.name, image=spec.image, port=service.host_port,
                          gpu=service.gpu)
        await self._after(self._on_deployed, service)
        return service, False

    async def _after(self, hook: ServiceHook, service: Service) -> None:
        """A hook on a deploy or stop that has happened: what it fails to record is logged, and
        the deploy or stop stands."""
        try:
            await hook(service)
        except Exception:
            _LOGGER.exception("Recording what %s did failed; it stands", service.spec.name)

    async def _make_room(self, spec: DeploySpec, grant: Grant | None) -> str:
        """Room for a GPU deploy under its name's lock: the room its wait was granted, else,
        if it fits nowhere now, the cheapest set of idle services on one GPU that makes it
        fit, whose room is the deploy's from the moment they are chosen. The earmark's
        token (the caller drops it once the launch has reserved, or failed)."""
        if grant is not None and not grant.used:  # (another deploy of the name may have used it)
            grant.used = True
            token, eviction = grant.token, grant.eviction
        else:
            await self._table.refresh_gpus()
            token = f"deploy-{secrets.token_hex(6)}"
            eviction = self._table.make_room(spec.name, spec.vram_gb, self._config.min_resident_s, token)
        self._table.gpus.activate(spec.name, token)
        if eviction is not None:
            try:
                await self._evict(spec, eviction, token)
            except BaseException:
                self._table.gpus.drop_earmark(token)  # the victims that still run hold theirs
                raise
        return token

    async def _evict(self, spec: DeploySpec, eviction: Eviction, token: str) -> None:
        """Stop the victims, each under its lock, if each is still the idle service chosen
        (one deployed, leased, pinned or stopped meanwhile keeps or has its room). What
        can't be stopped holds its room again; then the error goes to the deploy."""
        async with contextlib.AsyncExitStack() as locks:
            for chosen in eviction.victims:
                await locks.enter_async_context(self._table.locked(chosen.name))
            left = list(eviction.victims)
            try:
                while left:
                    chosen = left[0]
                    victim = self._table.get(chosen.name)
                    if victim is None or victim.owner != chosen.owner:
                        self._table.end_evicting(chosen.name)  # gone already: its room is free
                    elif self._table.hold_of(victim) != "idle":
                        self._table.gpus.shrink_earmark(token, chosen.gb)  # held again: it stays,
                        self._table.restore_gpu(victim)  # with its room (never counted twice)
                    else:
                        await self._runtime.stop(victim, self._config.stop_timeout)
                        await self._discard(victim)
                        self._table.drop_leases(victim.spec.name)
                        self._events.emit("evicted", victim.spec.name, spec.name, gpu=victim.gpu,
                                          freed_gb=round(chosen.gb, 2), needed_gb=spec.vram_gb)
                        _LOGGER.info("Evicted %s (idle) to make room for %s", victim.spec.name, spec.name)
                    left.pop(0)
            finally:
                for chosen in left:  # not stopped (an engine error, a cancellation): they keep it
                    victim = self._table.get(chosen.name)
                    if victim is not None and victim.owner == chosen.owner:
                        self._table.gpus.shrink_earmark(token, chosen.gb)
                        self._table.restore_gpu(victim)
                    else:
                        self._table.end_evicting(chosen.name)
                await self._table.persist()

    def _check_request(self, request: DeployRequest) -> None:
        """Before anything runs: a lease_s within --max-lease, a lease_id that is held, and
        under --vram-overuse stop, a GPU service that declares its VRAM."""
        spec = request.spec
        if spec.gpu and spec.vram_gb <= 0 and self._config.vram_overuse == "stop":
            raise InvalidRequest(
                "This node stops services that use more VRAM than they declare "
                "(--vram-overuse stop): a GPU service must declare vram_gb above 0.",
                details=[{"field": "vram_gb", "message": "must be more than 0 for a GPU service here"}])
        self._check_lease_length(request.lease_s)
        if request.lease_id is not None:
            self._table.lease(request.spec.name, request.lease_id)  # 404 when not held

    def _check_lease_length(self, lease_s: float | None) -> None:
        limit = self._config.max_lease_s
        if lease_s is not None and lease_s > limit:
            raise InvalidRequest(f"lease_s {lease_s:g} is above this node's --max-lease ({limit:g} s).",
                                 details=[{"field": "lease_s", "message": f"must be at most {limit:g}"}])

    def renew(self, name: str, lease_id: str, lease_s: float | None) -> Lease:
        """Extend a lease held on `name` (by its own length, or by `lease_s` within --max-lease)."""
        self._check_lease_length(lease_s)
        return self._table.renew_lease(name, lease_id, lease_s)

    def _hold(self, service: Service, request: DeployRequest, lease_id: str | None) -> Lease | None:
        """The caller's claim after a deploy: a lease (new, or renewed), or none (pinned).

        A container launched for this deploy carries the lease's id in its labels; the
        lease recorded here has that id, so it can come back from the labels alone.
        """
        name = service.spec.name
        if request.lease_s is None or lease_id is None:
            self._table.pin(service)  # deployed without a lease: runs until stopped
            return None
        if self._table.withdrawn(lease_id):
            return None  # its caller let go while it deployed: held by no one, unless others
        try:
            return self._table.renew_lease(name, lease_id, request.lease_s,
                                           None if request.priority is None else self._priority(request))
        except LeaseNotFound:  # new, or lapsed during a long deploy: the same holder, again
            return self._table.add_lease(name, request.lease_s, lease_id, self._keep_warm(request),
                                         self._priority(request))

    def _priority(self, request: DeployRequest) -> int:
        """The deploy's priority (5 when not said), within --max-priority."""
        return min(DEFAULT_PRIORITY if request.priority is None else request.priority,
                   self._config.max_priority)

    def _keep_warm(self, request: DeployRequest) -> float:
        """The warm time a leased deploy asks for, within --max-keep-warm; else --keep-warm."""
        asked = request.keep_warm_s if request.keep_warm_s is not None else self._config.keep_warm_s
        return min(asked, self._config.max_keep_warm_s)

    # -- dry run -------------------------------------------------------------------------

    async def dry_run(self, request: DeployRequest) -> DryRunOutcome:
        """What a deploy would do now, creating and reserving nothing; the same 4xx/409/503."""
        spec = request.spec
        self._check_request(request)
        await asyncio.to_thread(check_deploy, spec, self._config, self._table.volumes_beside(spec.name))
        existing = self._table.get(spec.name)
        if existing is not None:
            differing = existing.spec.differing_fields(spec)
            if existing.status == "healthy" and not differing:
                return DryRunOutcome(existing.host_port, existing.gpu, already_running=True,
                                     pull_needed=False, service=existing,
                                     node_name=existing.node_name, node_addr=existing.node_addr,
                                     node_id=existing.node_id)
            if existing.status == "healthy" and not request.replace and \
                    self._table.hold_of(existing) != "idle":
                raise running_differently(spec.name, differing)
        try:
            return await self._runtime.place(spec, existing)
        except NoGpuCapacity:
            if not spec.gpu:
                raise
            eviction = self._table.plan_room(spec.name, spec.vram_gb, self._config.min_resident_s)
            waits = (eviction is None and request.wait_s > 0 and self._config.max_wait_s > 0
                     and self.admission.never_fits(spec) is None)
            if eviction is None and not waits:
                raise
        outcome = await self._runtime.place(attrs.evolve(spec, gpu=False, vram_gb=VramGb(0.0)), existing)
        if eviction is None:
            return attrs.evolve(outcome, gpu=None, queued=True)
        return attrs.evolve(outcome, gpu=self._table.gpus.local_index(eviction.gpu),
                            evicts=tuple(victim.name for victim in eviction.victims))

    # -- stop ----------------------------------------------------------------------------

    async def stop(self, name: str, reason: str = "request") -> None:
        """Stop (grace, then kill), remove, release, persist. 404 when nothing is deployed."""
        async with self._table.locked(name):
            service = self._table.get(name)
            if service is None:
                if any(entry.spec.name == name for entry in self._table.in_flight()):
                    raise Conflict(f"A first deploy of {name} is under way; stop it once it has "
                                   "answered.", name=name)
                if not await self._runtime.remove_untracked(name):
                    raise ServiceNotFound(f"No service named {name!r} is deployed here.", name=name)
                return
            await self._stop_locked(service, reason)

    async def _stop_locked(self, service: Service, reason: str, **details: Any) -> None:
        await self._runtime.stop(service, self._config.stop_timeout)
        await self._discard(service)
        self._table.drop_leases(service.spec.name)
        self._events.emit("stopped", service.spec.name, reason, **details)  # before the await
        self.admission.serve()  # its room may be a waiter's
        await self._table.persist()
        await self._after(self._on_stopped, service)
        _LOGGER.info("Stopped %s (%s)", service.spec.name, reason)

    async def _discard(self, service: Service) -> None:
        """Remove what runs it and forget the service, releasing what it held."""
        await self._runtime.discard(service)
        self._table.forget(service)

    # -- leases --------------------------------------------------------------------------

    async def release(self, name: str, lease_id: str) -> tuple[bool, float | None]:
        """A holder lets go. If that was the service's last lease it turns idle (kept warm),
        or stops when no holder wanted it kept warm. Whether it stopped, and until when it
        is kept warm. A lease a deploy under way announced is never made."""
        if self._table.withdraw(name, lease_id):
            return False, None
        self._table.release_lease(name, lease_id)  # 404 when not held
        if self._table.idle_if_unheld(name):
            self._events.emit("idle", name, "released", released=lease_id,
                              idle_until=rfc3339(self._table.service(name).idle_until or 0))
        stopped = await self._stop_if_unheld(name, released=lease_id)
        self.admission.serve()  # idle now: a waiter may evict it
        await self._table.persist_if_dirty()  # the stop wrote it already
        service = self._table.get(name)
        return stopped, service.idle_until if service is not None and not stopped else None

    async def enforce(self) -> None:
        """Stop each leased service whose last lease ran out, and (--vram-overuse stop) each
        service persistently above its VRAM declaration, each name in a stop of its own; runs
        until cancelled. What can't be stopped now (the engine is away) is tried again on the
        next pass."""
        while True:
            await asyncio.sleep(ENFORCE_INTERVAL_S)
            idle_before = self._table.idle_names()
            to_stop = self._table.settle_leases()
            for name in sorted(self._table.idle_names() - idle_before):
                self._events.emit("idle", name, "lease_expired",
                                  idle_until=rfc3339(self._table.service(name).idle_until or 0))
            for name in to_stop:
                self._enforce_stop(name, "no one holds", self._stop_if_unheld)
            for name in self._table.due_preemptions():
                self._enforce_stop(name, "preempted", self._stop_if_preempted)
            self.admission.serve()  # room from exits, leases ended, readings that fell
            if self._config.vram_overuse == "stop":
                for name in sorted(self._table.gpus.over):
                    self._enforce_stop(name, "above its VRAM", self._stop_if_overusing)

    def _enforce_stop(self, name: str, why: str, stop: Callable[[str], Awaitable[object]]) -> None:
        """Stop `name` in a task of its own, so that a slow stop or a lock held by a slow deploy
        delays only that name. One per name, MAX_ENFORCING at once: the rest wait for a pass."""
        if name in self._enforcing or len(self._enforcing) >= MAX_ENFORCING:
            return
        task = asyncio.create_task(self._run_enforced(name, why, stop), name=f"enforce {name}")
        self._enforcing[name] = task
        task.add_done_callback(lambda _: self._enforcing.pop(name, None))

    async def _run_enforced(self, name: str, why: str, stop: Callable[[str], Awaitable[object]]) -> None:
        """Log what goes wrong: the name is derived again on the next pass and tried again."""
        try:
            await stop(name)
        except AgentError as err:
            _LOGGER.warning("Could not stop %s, %s: %s", name, why, err.message)
        except Exception:
            _LOGGER.exception("Stopping %s, %s, failed", name, why)

    async def _stop_if_overusing(self, name: str) -> None:
        async with self._table.locked(name):
            service = self._table.get(name)
            if service is None or name not in self._table.gpus.over:
                return
            used = self._table.gpus.observed_gb(name)
            await self._stop_locked(service, "vram_overuse", declared_gb=service.spec.vram_gb,
                                    used_gb=None if used is None else round(used, 2))

    async def _stop_if_preempted(self, name: str) -> None:
        """Its preemption's grace is over, and no one called it off: stop it for the waiter."""
        async with self._table.locked(name):
            service = self._table.get(name)
            preempted_for = self._table.preempting_for(name)
            if service is None or preempted_for is None:
                return
            if not self._table.still_preemptible(name) or not self.admission.queued(preempted_for):
                self._table.call_off(name)  # pinned, held as high, or its waiter is gone
                return
            await self._stop_locked(service, "preempted", **{"for": preempted_for})

    async def _stop_if_unheld(self, name: str, **details: Any) -> bool:
        """Stop `name` if no one holds it and its warm time (if any) is over; whether it did."""
        async with self._table.locked(name):  # a deploy may have renewed or pinned it meanwhile
            service, reason = self._table.get(name), self._table.stop_reason(name)
            if service is None or reason is None:
                return False
            await self._stop_locked(service, reason, **details)
            return True

    async def logs(self, name: str, tail: int) -> str:
        """The service's recent output."""
        return await self._runtime.logs(self._table.service(name), tail)

    def follow_logs(self, name: str, tail: int) -> AsyncGenerator[str, None]:
        """The service's output as it comes, starting with the last `tail` lines."""
        return self._runtime.follow_logs(self._table.service(name), tail)

    async def close(self) -> None:
        """Roll back deploys still in flight (shutdown already gave them their time), cancel
        the stops enforce() started, wait for every rollback, flush the state file."""
        tasks = [*self._inflight, *self._enforcing.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._runtime.close()
        await self._table.persist()
