"""Waiting for room: the node's queue of GPU deploys that fit nowhere now.

A deploy with `wait_s` that fits on no GPU, even by evicting idle services, waits here
before it takes its name's lock, so it holds nothing a stop of that name needs and a
waiting replace has not removed the old service yet. Waiters are served in order of
priority, then arrival, whenever room may have appeared (serve() is called when a lease
ends, a service stops or is evicted, a deploy fails, and on every enforcement pass): the
first that fits, now or by evicting idle services, is granted its room at once (earmarked
for it, or passed from its victims). The head waiter that still doesn't fit earmarks the
free room on the GPU where it is closest to fitting, so later, smaller deploys can't starve
it there, while they may use any other GPU. The queue lives in memory: a restart empties it.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections.abc import Callable

import attrs

from deploy_agent.errors import NO_ROOM_RETRY_AFTER_S, CallerGone, Conflict, NoGpuCapacity, QueueFull
from deploy_agent.events import EventLog
from deploy_agent.eviction import Eviction
from deploy_agent.models import DeploySpec, rfc3339
from deploy_agent.runtime import Progress
from deploy_agent.table import ServiceTable

HEAD_TOKEN = "queue-head"  # the earmark of what is free on the head waiter's GPU
QUEUED_EVERY_S = 5.0  # a waiting streamed deploy says where it stands at least this often
LOOK_EVERY_S = 0.5  # how often a waiter looks whether its caller is still there
RETRY_AFTER_S = NO_ROOM_RETRY_AFTER_S  # what a caller refused for want of room is told to wait
MAX_RETRY_AFTER_S = 600


@attrs.define
class Grant:
    """Room given to a waiter: earmarked under `token` (its deploy activates it under its
    name's lock), taken from `eviction`'s victims when there are any (the deploy stops them
    before it starts). `used` once a deploy of the name has taken it."""

    eviction: Eviction | None
    token: str
    used: bool = False


@attrs.define(eq=False)
class Waiter:
    """One place in the queue, shared by every deploy of its name that waits."""

    spec: DeploySpec
    priority: int
    seq: int
    since: float  # wall clock
    granted: asyncio.Future[Grant] = attrs.field(factory=lambda: asyncio.get_running_loop().create_future())
    callers: list[Callable[[], bool]] = attrs.field(factory=list)  # each: is it still there?
    handed: bool = False  # its grant went to a deploy, which gives the room back if unused
    deadline: float = 0.0  # loop time its longest-waiting caller gives up

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def needs_gb(self) -> float:
        return float(self.spec.vram_gb)


class Admission:
    """The queue: who waits, in what order, and who gets room when it appears."""

    def __init__(self, table: ServiceTable, events: EventLog, min_resident_s: float, max_queue: int,
                 preempt_grace_s: float,
                 expected_start_s: Callable[[DeploySpec], float | None] = lambda spec: None) -> None:
        self._table = table
        self._expected_start_s = expected_start_s  # its image's last recorded cold start
        self._events = events
        self._min_resident_s = min_resident_s
        self._max_queue = max_queue
        self._preempt_grace_s = preempt_grace_s
        self._waiters: dict[str, Waiter] = {}
        self._seq = itertools.count()
        self._closed = False

    def _queue_retry_s(self) -> int:
        """When a full queue may have a place: not before its head has deployed, which takes
        at least its image's recorded cold start; never sooner than RETRY_AFTER_S (the head
        waits for room first, which no record tells)."""
        head = self.waiting()[0] if self._waiters else None
        expected = self._expected_start_s(head.spec) if head is not None else None
        return max(RETRY_AFTER_S, min(MAX_RETRY_AFTER_S, math.ceil(expected or 0)))

    def waiting(self) -> list[Waiter]:
        """The waiters, first served first."""
        return sorted(self._waiters.values(), key=lambda w: (-w.priority, w.seq))

    def queued(self, name: str) -> bool:
        return name in self._waiters

    def never_fits(self, spec: DeploySpec) -> str | None:
        """Why a GPU deploy could never fit on this node, if so: more than any GPU holds
        beside what nothing here can free (pinned services and foreign use)."""
        room = self._table.room_at_best(beside=spec.name)
        if room is not None and spec.vram_gb > room:
            return (f"{spec.name} needs {spec.vram_gb:g} GB of VRAM, and no GPU here can ever have "
                    f"more than {max(room, 0.0):.1f} GB free for it (beside pinned services and "
                    "what other programs use): it is refused whatever its wait_s.")
        return None

    async def admit(self, spec: DeploySpec, wait_s: float, priority: int, progress: Progress,
                    still_there: Callable[[], bool]) -> Grant | None:
        """Room for a GPU deploy that may wait: None when it fits now (or can't wait: it is
        placed, or refused, as ever); else the room it was granted after waiting.

        NoGpuCapacity (503) when it can never fit here, when wait_s runs out, or at
        shutdown; QueueFull (429) when --max-queue deploys wait already; CallerGone when
        every caller of its name has left.
        """
        if self._fits_now(spec) or wait_s <= 0:
            return None
        never = self.never_fits(spec)
        if never is not None:
            raise NoGpuCapacity(never, retry_after_s=None, free_gb=self._table.free_gb_by_gpu())
        if self._closed:
            raise _refused("The agent is shutting down; deploy again when it is back.")
        waiter = self._waiters.get(spec.name)
        if waiter is not None and waiter.spec != spec:
            raise Conflict(f"A deploy of {spec.name} with another spec waits for room already; "
                           "wait for its answer, or stop it.", name=spec.name)
        if waiter is None:
            if len(self._waiters) >= self._max_queue:
                raise QueueFull(f"{len(self._waiters)} deploys already wait for room on this node "
                                "(--max-queue); try again later.", retry_after_s=self._queue_retry_s())
            waiter = Waiter(spec=spec, priority=priority, seq=next(self._seq), since=time.time())
            self._waiters[spec.name] = waiter
        else:
            waiter.priority = max(waiter.priority, priority)  # deploys of one name wait together
        waiter.callers.append(still_there)
        waiter.deadline = max(waiter.deadline, asyncio.get_running_loop().time() + wait_s)
        self.serve()
        try:
            grant = await self._wait(waiter, wait_s, progress, still_there)
            waiter.handed = True
            return grant
        finally:
            waiter.callers.remove(still_there)
            if not waiter.callers:
                self._leave(waiter)

    async def _wait(self, waiter: Waiter, wait_s: float, progress: Progress,
                    still_there: Callable[[], bool]) -> Grant:
        loop = asyncio.get_running_loop()
        deadline, said_at, said_position = loop.time() + wait_s, -QUEUED_EVERY_S, 0
        while not waiter.granted.done():
            if not still_there():
                raise CallerGone(f"The caller of {waiter.name} left while it waited for room.",
                                 name=waiter.name)  # the place stays while another caller waits
            if loop.time() >= deadline:
                raise _refused(f"No GPU had {waiter.needs_gb:g} GB of VRAM for {waiter.name} within "
                               f"its wait_s ({wait_s:g} s); try again later.")
            position = self.position(waiter.name)
            if position != said_position or loop.time() - said_at >= QUEUED_EVERY_S:
                progress({"event": "queued", "position": position, "needs_gb": waiter.needs_gb})
                said_at, said_position = loop.time(), position
            await asyncio.wait({waiter.granted}, timeout=min(LOOK_EVERY_S, deadline - loop.time()))
        return waiter.granted.result()

    def position(self, name: str) -> int:
        return next(i for i, w in enumerate(self.waiting(), start=1) if w.name == name)

    def _fits_now(self, spec: DeploySpec) -> bool:
        existing = self._table.get(spec.name)
        return self._table.fits(spec.name, spec.vram_gb, self._min_resident_s,
                                freeing=existing.owner if existing is not None else None)

    def _leave(self, waiter: Waiter) -> None:
        """Its last caller went (answered, refused or gone): its place and unused room go."""
        self._waiters.pop(waiter.name, None)
        self._call_off(waiter.name)
        if waiter.granted.done() and not waiter.granted.cancelled():
            if waiter.granted.exception() is None and not waiter.handed:
                self.give_back(waiter.granted.result())  # granted as its callers left
            return  # else its deploy took the room and lets go of it when done
        waiter.granted.cancel()
        self.serve()

    def give_back(self, grant: Grant) -> None:
        """A granted deploy that didn't use its room (its callers left, or it answered
        otherwise): the victims not yet stopped hold theirs again, the earmark goes."""
        self._table.gpus.drop_earmark(grant.token)
        for victim in grant.eviction.victims if grant.eviction else ():
            service = self._table.get(victim.name)
            if service is not None and service.owner == victim.owner:
                self._table.restore_gpu(service)
        self.serve()

    def serve(self) -> None:
        """Grant room to every waiter that fits now, in order, with no await; earmark what is
        free on the head waiter's closest GPU for it."""
        self._table.gpus.drop_earmark(HEAD_TOKEN)
        self._table.head_gpu = None
        head_placed = False
        for waiter in self.waiting():
            if waiter.granted.done():
                continue
            never = self.never_fits(waiter.spec)
            if never is not None:  # pinned services came since it began to wait
                waiter.granted.set_exception(NoGpuCapacity(never, retry_after_s=None))
                waiter.granted.exception()  # retrieved: its callers raise it
                self._call_off(waiter.name)
                continue
            existing = self._table.get(waiter.name)
            freeing = existing.owner if existing is not None else None  # a waiting replace
            token = f"grant-{waiter.name}-{next(self._seq)}"
            if self._table.fits(waiter.name, waiter.needs_gb, self._min_resident_s, evicting=False,
                                freeing=freeing):
                gpu = self._table.gpus.place(waiter.needs_gb, freeing, waiter.name).index
                self._table.gpus.earmark(token, gpu, self._table.beside(waiter.needs_gb, freeing, gpu))
                self._grant(waiter, Grant(None, token))
                continue
            eviction = self._table.make_room(waiter.name, waiter.needs_gb, self._min_resident_s, token,
                                             freeing)
            if eviction is not None:
                self._grant(waiter, Grant(eviction, token))
                continue
            if not head_placed:
                head_placed = True
                self._preempt_for(waiter)
                closest = self._table.closest_gpu(waiter.name)
                if closest is not None:  # its room there, now and as it comes, is the head's
                    self._table.head_gpu = (waiter.name, closest[0])
                    if closest[1] > 0:
                        self._table.gpus.earmark(HEAD_TOKEN, closest[0], min(closest[1], waiter.needs_gb))

    def _grant(self, waiter: Waiter, grant: Grant) -> None:
        waiter.granted.set_result(grant)
        self._call_off(waiter.name)  # what it preempted is no longer needed

    def _call_off(self, name: str) -> None:
        for preempted in self._table.preempted_for(name):
            self._table.call_off(preempted)
            self._events.emit("preempting", preempted, "called_off", **{"for": name})

    def _preempt_for(self, waiter: Waiter) -> None:
        """The head waiter fits nowhere even by evicting: announce the stop of the cheapest
        leased services (every holder of lower priority) that, with idle ones, make it fit,
        if its wait outlasts the grace and nothing is announced for it yet."""
        if self._table.preempted_for(waiter.name):
            return
        left = waiter.deadline - asyncio.get_running_loop().time()
        if left <= self._preempt_grace_s:
            return
        chosen = self._table.plan_preemption(waiter.name, waiter.needs_gb, waiter.priority,
                                             self._min_resident_s)
        for victim in chosen.victims if chosen is not None else ():
            if victim.held:
                at = self._table.preempt(victim.name, waiter.name, waiter.priority, self._preempt_grace_s)
                self._events.emit("preempting", victim.name, waiter.name, at=rfc3339(at),
                                  priority=waiter.priority, gpu=victim.gpu, **{"for": waiter.name})

    def close(self) -> None:
        """At shutdown: every waiter is refused at once (503), and no one else may wait."""
        self._closed = True
        self._table.gpus.drop_earmark(HEAD_TOKEN)
        self._table.head_gpu = None
        for waiter in list(self._waiters.values()):
            if not waiter.granted.done():
                waiter.granted.set_exception(_refused("The agent is shutting down; deploy again "
                                                      "when it is back."))
                waiter.granted.exception()  # retrieved: every caller raises it anyway

def _refused(message: str) -> NoGpuCapacity:
    return NoGpuCapacity(message, free_gb={})
