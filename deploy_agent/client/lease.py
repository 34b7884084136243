"""Leases a caller holds with `leased()`: renewed in the background, never undoing a stop.

The keeper renews every third of the lease, each renewal bounded well inside the time
left, a failed one retried with backoff. A 404 ends the lease (unless the holder asked
for retakes, and only when no one stopped the service on purpose): the holder sees it in
`lease.lost`, a callback, and LeaseLost as the block ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, Protocol, Unpack

import attrs

from deploy_agent.client.errors import (
    AgentRequestError,
    CapacityError,
    DeployInterrupted,
    LeaseLost,
    NodeUnreachable,
    ServiceNotFoundError,
    TooManyStreamsError,
    said,
)
from deploy_agent.client.manifests import Intent, Manifest, load_manifest
from deploy_agent.client.results import Answer, Event, Service


class LeaseNode(Protocol):
    """What a lease keeper needs of the client of the node the lease is held on."""

    url: str
    timeout: float

    async def deploy(self, manifest: Manifest, replace: bool = False, lease_s: float | None = None,
                     lease_id: str | None = None, **intent: Unpack[Intent]) -> dict[str, Any]: ...

    async def renew(self, name: str, lease_id: str, lease_s: float | None = None,
                    timeout: float | None = None) -> dict[str, Any]: ...

    async def release(self, name: str, lease_id: str, timeout: float | None = None) -> dict[str, Any]: ...

    async def service(self, name: str, timeout: float | None = None) -> Service: ...

    def deploy_events(self, manifest: Manifest, replace: bool = False, lease_s: float | None = None,
                      lease_id: str | None = None, **intent: Unpack[Intent]
                      ) -> AsyncIterator[dict[str, Any]]: ...

    async def events(self, since: int | None = None, limit: int | None = None,
                     timeout: float | None = None) -> list[Event]: ...

_LOGGER = logging.getLogger("deploy_agent.client")

LeaseCallback = Callable[["Lease"], object]  # may return an awaitable, which is awaited
RELEASE_TIMEOUT_S = 5.0  # leaving the block waits at most this for the release
FIRST_RETRY_S = 0.5  # a failed renewal is tried again after this, then twice as long each time
MIN_RENEW_TIMEOUT_S = 0.5
EVENTS_LOOKED_AT = 500  # how far back the event log is read for why a service stopped
# Stops whose reason is the lease's own running out: the one case a retake may bring the
# service back. Any other stop (request, vram_overuse, replaced, ...) was someone's decision.
LAPSED = "lease_expired"
STOP_KINDS = ("stopped", "evicted", "replaced")


@attrs.define(eq=False)
class Lease(Answer):
    """A lease held by `leased()`, kept current: after a retake it has the new lease_id,
    host and port. `lost` turns True when it has ended; `error` says why (LeaseLost)."""

    name: str
    lease_id: str
    host: str
    port: int
    gpu: int | None
    status: str | None
    lease_expires_at: str | None
    already_running: bool | None
    node: str | None = None
    lease_s: float = attrs.field(default=60.0, init=False)
    lost: bool = attrs.field(default=False, init=False)
    error: LeaseLost | None = attrs.field(default=None, init=False)
    retakes: int = attrs.field(default=0, init=False)
    preempt_at: str | None = attrs.field(default=None, init=False)
    """When a waiting deploy of higher priority will stop the service (from renewals)."""
    trouble: AgentRequestError | None = attrs.field(default=None, init=False)
    """The last renewal's failure while it is being retried; None once one succeeds."""

    def check(self) -> None:
        """Raise the lease's error (LeaseLost) if it has ended; else nothing."""
        if self.error is not None:
            raise self.error

    def take(self, answer: Mapping[str, Any]) -> None:
        """After a retake: the new answer's lease, host and port."""
        fresh = Lease.of(answer, node=self.node)
        for field in ("name", "lease_id", "host", "port", "gpu", "status", "lease_expires_at",
                      "already_running", "raw"):
            setattr(self, field, getattr(fresh, field))


@contextlib.asynccontextmanager
async def hold(client: LeaseNode, manifest: Manifest, lease_s: float, *, retake: bool = False,
               on_lost: LeaseCallback | None = None, on_retake: LeaseCallback | None = None,
               first: Mapping[str, Any] | None = None, node: str | None = None,
               intent: Intent | None = None) -> AsyncIterator[Lease]:
    """Deploy with a lease (or take `first`, a deploy answer already holding one), keep it
    renewed while the block runs, release it on the way out. LeaseLost on leaving when the
    lease ended on the way (unless the block raised)."""
    answer = first if first is not None else await deploy_holding(client, manifest, lease_s, intent)
    lease = Lease.of(answer, node=node)
    lease.lease_s = lease_s  # the node set it running just before it answered:
    deadline = asyncio.get_running_loop().time() + lease_s
    keeper = _Keeper(client, manifest, lease, deadline, retake, on_lost, on_retake, intent or {})
    renewing = asyncio.create_task(keeper.run(), name=f"lease {lease.name}")
    try:
        yield lease
    except BaseException:
        await keeper.end(renewing)
        raise
    await keeper.end(renewing)
    lease.check()


async def deploy_holding(client: LeaseNode, manifest: Manifest, lease_s: float,
                         intent: Intent | None = None) -> dict[str, Any]:
    """A leased deploy whose lease is released if the deploy is left half-way (cancelled,
    interrupted, Ctrl-C): the node says its id first, and would hold it for lease_s."""
    announced: str | None = None
    answer: dict[str, Any] | None = None
    try:
        async for event in client.deploy_events(manifest, lease_s=lease_s, **(intent or {})):
            if event.get("event") == "lease":
                announced = str(event.get("lease_id"))
            answer = event
        if answer is None or "event" in answer:
            raise DeployInterrupted(0, "interrupted", f"{client.url} closed the deploy stream "
                                    "without an answer.", node=client.url)
        return answer
    except BaseException:
        if announced is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(client.release(str(load_manifest(manifest).get("name", "")),
                                                    announced, timeout=RELEASE_TIMEOUT_S))
        raise


class _Keeper:
    """Renews one lease until cancelled or it ends."""

    def __init__(self, client: LeaseNode, manifest: Manifest, lease: Lease, deadline: float,
                 retake: bool, on_lost: LeaseCallback | None, on_retake: LeaseCallback | None,
                 intent: Intent) -> None:
        self._client, self._manifest, self._lease, self._intent = client, manifest, lease, intent
        self._deadline = deadline  # loop time by which the node drops it, unless renewed
        self._retake, self._on_lost, self._on_retake = retake, on_lost, on_retake
        self._node_said_gone = False  # a 404 ended it: nothing left to release

    @property
    def _bound(self) -> float:
        """What one look at the node (why a lease went) may take: well inside the lease."""
        return max(1.0, min(self._client.timeout, self._lease.lease_s / 3))

    @property
    def _interval(self) -> float:
        return max(0.2, self._lease.lease_s / 3)

    async def run(self) -> None:
        """Renew every third of the lease; on any failure the lease ends, never silently."""
        try:
            while not self._lease.lost:
                await asyncio.sleep(self._interval)
                await self._renew()
        except asyncio.CancelledError:
            raise
        except Exception as err:  # a bug or a surprise: the holder hears of it
            await self._lose(LeaseLost(f"Renewing lease {self._lease.lease_id} on {self._lease.name} "
                                       f"failed: {said(err, None)}", self._client.url, "renew_failed"),
                             cause=err)

    async def _renew(self) -> None:
        loop, lease, backoff = asyncio.get_running_loop(), self._lease, FIRST_RETRY_S
        while True:
            left = self._deadline - loop.time()
            sent = loop.time()
            try:
                answer = await self._client.renew(
                    lease.name, lease.lease_id, lease.lease_s,
                    timeout=max(MIN_RENEW_TIMEOUT_S, min(self._client.timeout, left / 3)))
            except ServiceNotFoundError:  # lease_not_found, also when the service is gone
                return await self._gone()
            except (NodeUnreachable, CapacityError, TooManyStreamsError) as err:
                lease.trouble = err
            except AgentRequestError as err:
                if err.status < 500:
                    raise  # refused for good (a token, a lease_s above --max-lease): ends it
                lease.trouble = err
            else:
                self._deadline = sent + lease.lease_s
                lease.trouble = None
                lease.lease_expires_at = answer.get("lease_expires_at", lease.lease_expires_at)
                lease.preempt_at = answer.get("preempt_at")
                return None
            if loop.time() >= self._deadline + lease.lease_s and not self._retake:
                # Twice its length without a word from the node: the node let it go by now
                # (unless it restarted meanwhile; the release on leaving is tried anyway).
                trouble = lease.trouble
                return await self._lose(LeaseLost(
                    f"Lease {lease.lease_id} on {lease.name} ran out: no renewal reached "
                    f"{self._client.url} in time ({trouble.message if trouble else 'no answer'})",
                    self._client.url, "unreachable"))
            await asyncio.sleep(min(backoff, max(0.1, (self._deadline - loop.time()) / 4)))
            backoff = min(backoff * 2, self._interval)

    async def _gone(self, leaving: bool = False) -> None:
        """The node has no such lease: why, and whether to take it again. `leaving`: the
        holder is letting go anyway; only a service someone stopped is worth telling."""
        lease = self._lease
        self._node_said_gone = True
        try:
            await self._client.service(lease.name, timeout=self._bound)
            service_runs = True
        except ServiceNotFoundError:
            service_runs = False
        except AgentRequestError:  # can't tell: never brought back
            if leaving:
                return None
            return await self._lose(LeaseLost(f"{self._client.url} no longer holds lease "
                                              f"{lease.lease_id} on {lease.name}", self._client.url,
                                              "lease_not_found"))
        if leaving and service_runs:
            return None
        event = None if service_runs else await self._why_stopped()
        reason = (event or {}).get("reason") or (event or {}).get("kind") or (
            "lease_not_found" if service_runs else "not_found")
        released = bool(((event or {}).get("details") or {}).get("released"))  # by someone
        if self._retake and not leaving and (service_runs or (reason == LAPSED and not released)):
            return await self._take_again(reason)
        if service_runs:
            told = (f"{self._client.url} no longer holds lease {lease.lease_id} on {lease.name} "
                    "(it lapsed, or the node lost it); the service still runs for others")
        elif event is not None:
            told = (f"{lease.name} was stopped on {self._client.url} ({event['kind']}: {reason}, "
                    f"at {event['time']}); it is not brought back")
        else:
            told = f"{lease.name} is gone from {self._client.url}; it is not brought back"
        await self._lose(LeaseLost(told, self._client.url, reason, event))

    async def _why_stopped(self) -> dict[str, Any] | None:
        """The node's last stop of the service (stopped, evicted, replaced), else its last
        event, if its log still has one."""
        try:
            events = await self._client.events(limit=EVENTS_LOOKED_AT, timeout=self._bound)
        except AgentRequestError:
            return None
        mine = [event.raw for event in events if event.service == self._lease.name]
        stops = [event for event in mine if event.get("kind") in STOP_KINDS]
        return stops[-1] if stops else mine[-1] if mine else None

    async def _take_again(self, reason: str) -> None:
        loop, lease = asyncio.get_running_loop(), self._lease
        self._node_said_gone = False
        try:
            answer = await deploy_holding(self._client, self._manifest, lease.lease_s, self._intent)
        except AgentRequestError as err:
            return await self._lose(LeaseLost(f"Lease on {lease.name} could not be taken again "
                                              f"after {reason}: {err.message}", self._client.url,
                                              reason), cause=err)
        lease.take(answer)
        lease.retakes += 1
        lease.trouble = None
        self._deadline = loop.time() + lease.lease_s
        _LOGGER.info("Took a lease on %s again (%s): %s", lease.name, reason, lease.lease_id)
        await _call(self._on_retake, lease)
        return None

    async def _lose(self, error: LeaseLost, cause: BaseException | None = None) -> None:
        error.__cause__ = cause
        self._lease.error, self._lease.lost = error, True
        _LOGGER.warning("%s", error.message)
        await _call(self._on_lost, self._lease)

    async def end(self, renewing: asyncio.Task[None]) -> None:
        """Stop renewing; release the lease, bounded, on every path, unless the node said it
        is gone. A release that finds the service stopped by someone ends the lease (the
        holder hears of it as it leaves)."""
        renewing.cancel()
        await asyncio.gather(renewing, return_exceptions=True)
        if self._node_said_gone:
            return
        try:
            await self._client.release(self._lease.name, self._lease.lease_id, timeout=RELEASE_TIMEOUT_S)
        except ServiceNotFoundError:
            if not self._lease.lost:
                await self._gone(leaving=True)
        except AgentRequestError:
            pass


async def _call(callback: LeaseCallback | None, lease: Lease) -> None:
    """A holder's callback; what it raises is logged, and never ends the keeper."""
    if callback is None:
        return
    try:
        result = callback(lease)
        if inspect.isawaitable(result):
            await result
    except Exception:
        _LOGGER.exception("A lease callback for %s failed", lease.name)

