"""The deploy and stop flows on one Docker engine, through the service table."""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncGenerator, Callable
from typing import Any

import attrs
import cattrs

from deploy_agent.config import Config
from deploy_agent.engine import Engine, container_config
from deploy_agent.errors import (
    AgentError,
    Conflict,
    ContainerExited,
    EngineUnavailable,
    HealthTimeout,
    InvalidRequest,
    LeaseNotFound,
    NoPortAvailable,
    PortTaken,
    ServiceNotFound,
)
from deploy_agent.events import EventLog
from deploy_agent.gpus import Assignment
from deploy_agent.models import CONTAINER_PREFIX, DeployRequest, DeploySpec, JSONObject, Lease, Service
from deploy_agent.policy import check_deploy
from deploy_agent.probe import HealthProbe
from deploy_agent.state import labels_for, service_from_container
from deploy_agent.table import ServiceTable

_LOGGER = logging.getLogger(__name__)

PORT_ATTEMPTS = 5
LOG_TAIL_LINES = 20
MIN_POLL_S = 0.02
MAX_POLL_S = 1.0
ENFORCE_INTERVAL_S = 0.5


def poll_interval(elapsed_s: float) -> float:
    """Health polls start every 20 ms and back off to 1 s, at about 5% of the time waited."""
    return min(MAX_POLL_S, max(MIN_POLL_S, elapsed_s / 20))


Progress = Callable[[JSONObject], None]
"""Receives deploy progress events ({"event": "pull" | "created" | "started" | "health", ...})."""


def no_progress(event: JSONObject) -> None:
    del event


@attrs.frozen
class DeployOutcome:
    service: Service
    already_running: bool
    lease: Lease | None = None  # the caller's, when it deployed with lease_s


@attrs.frozen
class DryRunOutcome:
    """Where a deploy would land now: its host port and GPU, and whether it would pull."""

    host_port: int
    gpu: int | None
    already_running: bool
    pull_needed: bool
    service: Service | None = None  # the running one, when already_running


@attrs.define
class _Attempt:
    """One try at creating a service's container, and what it holds so far."""

    spec: DeploySpec
    host_port: int
    lease: Lease | None  # the lease the container is created under (in its labels)
    id: str = attrs.field(factory=lambda: secrets.token_hex(8))
    service: Service | None = None  # set once the engine has created the container
    created_unknown: bool = False  # the create call failed in a way that may still create it


class Deployer:
    """Deploys and stops; serialises work per name, runs different names in parallel.

    Each deploy runs as a task the deployer owns, so a caller that leaves (or a handler
    cancelled at shutdown) never abandons it half-way: close() waits for it or rolls it back.
    """

    def __init__(self, config: Config, engine: Engine, probe: HealthProbe, table: ServiceTable,
                 converter: cattrs.Converter, events: EventLog) -> None:
        self._config = config
        self._events = events
        self._engine = engine
        self._probe = probe
        self._table = table
        self._converter = converter
        self._inflight: set[asyncio.Task[DeployOutcome]] = set()
        self._rollbacks: set[asyncio.Task[None]] = set()

    # -- deploy --------------------------------------------------------------------------

    async def deploy(self, request: DeployRequest, progress: Progress = no_progress) -> DeployOutcome:
        """Answer an existing healthy deployment, or replace/launch one; never half-done."""
        task = asyncio.create_task(self._deploy(request, progress), name=f"deploy {request.spec.name}")
        self._inflight.add(task)
        task.add_done_callback(self._deploy_done)
        return await asyncio.shield(task)

    def _deploy_done(self, task: asyncio.Task[DeployOutcome]) -> None:
        self._inflight.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: its caller may have gone and will never see it

    async def _deploy(self, request: DeployRequest, progress: Progress) -> DeployOutcome:
        spec = request.spec
        self._check_request(request)
        try:
            await asyncio.to_thread(check_deploy, spec, self._config)  # resolves host paths
            async with self._table.locked(spec.name):
                service, already_running, launched_under = await self._deploy_locked(request, progress)
                lease = self._hold(service, request, launched_under)
            await self._table.persist_if_dirty()  # a new holder survives a crash right after
            return DeployOutcome(service, already_running, lease)
        except AgentError as err:
            self._events.emit("deploy_failed", spec.name, err.code, image=spec.image,
                              status=err.status)
            raise

    async def _deploy_locked(self, request: DeployRequest,
                             progress: Progress) -> tuple[Service, bool, str | None]:
        """The service, whether it was already running, and the lease it was launched under."""
        spec = request.spec
        existing = self._table.get(spec.name)
        if existing is not None:
            differing = existing.spec.differing_fields(spec)
            if existing.status == "healthy":
                if not differing:
                    return existing, True, None
                if not request.replace:
                    raise Conflict(
                        f"{spec.name} is running with a different {', '.join(differing)}; "
                        'stop it first or send "replace": true.',
                        name=spec.name, differing_fields=differing,
                    )
            _LOGGER.info("Replacing %s (status %s)", spec.name, existing.status)
            await self._discard(existing)
            self._events.emit("replaced", spec.name, "spec_changed" if differing else existing.status,
                              image=existing.spec.image, differing_fields=differing)
        else:
            await self._remove_stray(spec)
        lease = None
        if request.lease_s is not None:  # the creator's lease goes into the labels
            lease = Lease(id=request.lease_id or secrets.token_urlsafe(12), service=spec.name,
                          lease_s=request.lease_s, expires_at=0.0)
        service = await self._launch(spec, progress, lease)
        self._events.emit("deployed", spec.name, image=spec.image, port=service.host_port,
                          gpu=service.gpu)
        return service, False, lease.id if lease else None

    def _check_request(self, request: DeployRequest) -> None:
        """Before anything runs: a lease_s within --max-lease, a lease_id that is held, and
        under --vram-overuse stop, a GPU service that declares its VRAM."""
        spec = request.spec
        if spec.gpu and spec.vram_gb <= 0 and self._config.vram_overuse == "stop":
            raise InvalidRequest(
                "This node stops services that use more VRAM than they declare "
                "(--vram-overuse stop): a GPU service must declare vram_gb above 0.",
                details=[{"field": "vram_gb", "message": "must be more than 0 for a GPU service here"}])
        if request.lease_s is not None and request.lease_s > self._config.max_lease_s:
            raise InvalidRequest(
                f"lease_s {request.lease_s:g} is above this node's --max-lease "
                f"({self._config.max_lease_s:g} s).",
                details=[{"field": "lease_s", "message": f"must be at most {self._config.max_lease_s:g}"}])
        if request.lease_id is not None:
            self._table.lease(request.spec.name, request.lease_id)  # 404 when not held

    def _hold(self, service: Service, request: DeployRequest, launched_under: str | None) -> Lease | None:
        """The caller's claim after a deploy: a lease (new, or renewed), or none (pinned).

        A container launched for this deploy carries the lease's id in its labels; the
        lease recorded here has that id, so it can come back from the labels alone.
        """
        name = service.spec.name
        if request.lease_s is None:
            self._table.pin(service)  # deployed without a lease: runs until stopped
            return None
        lease_id = request.lease_id or launched_under
        if lease_id is not None:
            try:
                return self._table.renew_lease(name, lease_id, request.lease_s)
            except LeaseNotFound:  # new, or lapsed during a long deploy: the same holder, again
                pass
        return self._table.add_lease(name, request.lease_s, lease_id)

    async def _remove_stray(self, spec: DeploySpec) -> None:
        """A container of this name that the agent does not track: ours is replaced, a foreign one refused."""
        info = await self._engine.inspect(spec.container_name)
        if info is None:
            return
        if self._foreign(info):
            raise Conflict(
                f"A container named {spec.container_name} exists that this agent does not manage; "
                "remove or rename it first.", name=spec.name,
            )
        _LOGGER.info("Removing untracked container %s before deploying", spec.container_name)
        await self._engine.remove(info["Id"])

    def _foreign(self, info: JSONObject) -> bool:
        """A container this agent instance did not create (or can't read back)."""
        return service_from_container(self._converter, info, self._config.instance) is None

    async def _ensure_image(self, image: str, progress: Progress) -> None:
        if not await self._engine.has_image(image):
            _LOGGER.info("Pulling %s", image)
            await self._engine.pull(image, lambda step: progress({"event": "pull", **step}))

    async def _launch(self, spec: DeploySpec, progress: Progress, lease: Lease | None) -> Service:
        """Reserve a GPU (before a long pull, so a full node answers at once), then a port."""
        assignment = None
        if spec.gpu:
            await self._table.refresh_gpus()
            assignment = self._table.reserve_gpu(spec.name, spec.vram_gb)
        try:
            await self._ensure_image(spec.image, progress)
            published = await self._engine.published_ports()
            refused: set[int] = set()
            for _ in range(PORT_ATTEMPTS):
                host_port = await self._table.reserve_port(spec.port, published, frozenset(refused))
                try:
                    service = await self._create_and_start(_Attempt(spec, host_port, lease),
                                                           assignment, progress)
                except PortTaken:
                    _LOGGER.info("Host port %s was taken under us; trying the next", host_port)
                    refused.add(host_port)
                    continue
                await self._table.persist()
                return service
            raise NoPortAvailable(
                f"The engine refused {PORT_ATTEMPTS} host ports in a row for {spec.name}.")
        except BaseException:
            self._table.release_gpu(spec.name)
            raise

    async def _create_and_start(self, attempt: _Attempt, assignment: Assignment | None,
                                progress: Progress) -> Service:
        """Create, start, wait healthy. On any failure nothing is left: container, port, record."""
        spec, host_port = attempt.spec, attempt.host_port
        try:
            gpu = assignment.index if assignment else None
            gpu_env, device_requests = self._table.gpus.handoff(assignment) if assignment else ({}, [])
            labels = labels_for(self._converter, spec, host_port, gpu, self._config.instance,
                                attempt.id, attempt.lease)
            config = container_config(spec, host_port=host_port, env={**spec.env, **gpu_env},
                                      labels=labels, device_requests=device_requests,
                                      publish_host=self._config.publish_host,
                                      pids_limit=self._config.service_pids_limit)
            try:
                container_id = await self._engine.create(spec.container_name, config)
            except EngineUnavailable:
                attempt.created_unknown = True  # the engine may still act on the request
                raise
            attempt.service = Service(spec=spec, container_id=container_id, host_port=host_port,
                                      gpu=gpu, pinned=attempt.lease is None)
            self._table.track(attempt.service)
            progress({"event": "created", "container": container_id[:12], "port": host_port,
                      "gpu": gpu})
            await self._engine.start(container_id)
            progress({"event": "started"})
            await self._wait_healthy(attempt.service, progress)
        except BaseException as err:
            # Shielded and tracked: a deploy cancelled at shutdown still rolls back, and
            # close() waits for that before the process exits.
            rollback = asyncio.ensure_future(self._roll_back(attempt, err))
            self._rollbacks.add(rollback)
            rollback.add_done_callback(self._rollbacks.discard)
            await asyncio.shield(rollback)
            raise
        attempt.service.status = "healthy"
        _LOGGER.info("Deployed %s on host port %s%s", spec.name, host_port,
                     f", GPU {gpu}" if gpu is not None else "")
        return attempt.service

    async def _roll_back(self, attempt: _Attempt, cause: BaseException) -> None:
        """Remove what the attempt created and release its port. Never raises: whatever
        fails here, the caller gets the original error and the reservations come back."""
        spec = attempt.spec
        _LOGGER.info("Deploy of %s failed or was cancelled (%s); removing its container and "
                     "releasing host port %s", spec.name, type(cause).__name__, attempt.host_port)
        try:
            if attempt.service is not None:
                self._table.untrack(attempt.service)
            if attempt.created_unknown or (attempt.service and isinstance(cause, EngineUnavailable)):
                # Don't wait on an engine that is away: the resync removes it when it is back.
                self._table.abandon(attempt.id, spec.name)
            elif attempt.service is not None:
                await self._engine.remove(attempt.service.container_id)
        except Exception as err:
            _LOGGER.warning("Could not remove the container of the failed deploy of %s (%s); "
                            "it will be removed when the engine answers", spec.name,
                            getattr(err, "message", err))
            self._table.abandon(attempt.id, spec.name)
        finally:
            self._table.release_port(attempt.host_port)
        if self._table.is_abandoned(attempt.id):
            await self._table.persist()  # so a restart still knows to remove it

    async def _wait_healthy(self, service: Service, progress: Progress) -> None:
        """Poll health with backoff while watching for the container to exit."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        timeout = min(service.spec.ready_timeout, self._config.max_ready_timeout)
        exited = asyncio.ensure_future(self._engine.wait_exit(service.container_id))
        attempt = 0
        try:
            while True:
                elapsed = loop.time() - started
                remaining = timeout - elapsed
                if remaining <= 0:
                    raise HealthTimeout(
                        f"{service.spec.name} did not answer {service.spec.health} with 2xx "
                        f"within {timeout:g} s.",
                        name=service.spec.name, logs=await self._logs(service),
                    )
                probe = asyncio.ensure_future(self._probe.healthy(
                    service.host_port, service.spec.health, min(1.0, remaining)))
                await asyncio.wait({probe, exited}, return_when=asyncio.FIRST_COMPLETED)
                if exited.done():  # exited, or the engine failed under the watch
                    probe.cancel()
                    await self._raise_exited(service, exited.result())
                attempt += 1
                progress({"event": "health", "attempt": attempt, "healthy": probe.result(),
                          "elapsed_s": round(loop.time() - started, 3)})
                if probe.result():
                    return
                pause = min(poll_interval(elapsed), max(0.0, timeout - (loop.time() - started)))
                await asyncio.wait({exited}, timeout=pause)
        finally:
            exited.cancel()
            await asyncio.gather(exited, return_exceptions=True)

    async def _raise_exited(self, service: Service, exit_code: int) -> None:
        raise ContainerExited(
            f"{service.spec.name} exited with code {exit_code} before it became healthy.",
            name=service.spec.name, exit_code=exit_code, logs=await self._logs(service),
        )

    async def _logs(self, service: Service) -> list[str]:
        return await self._engine.logs_tail(service.container_id, LOG_TAIL_LINES)

    # -- dry run -------------------------------------------------------------------------

    async def dry_run(self, request: DeployRequest) -> DryRunOutcome:
        """What a deploy would do now, creating and reserving nothing; the same 4xx/409/503."""
        spec = request.spec
        self._check_request(request)
        await asyncio.to_thread(check_deploy, spec, self._config)
        existing = self._table.get(spec.name)
        if existing is not None:
            differing = existing.spec.differing_fields(spec)
            if existing.status == "healthy" and not differing:
                return DryRunOutcome(existing.host_port, existing.gpu, already_running=True,
                                     pull_needed=False, service=existing)
            if existing.status == "healthy" and not request.replace:
                raise Conflict(f"{spec.name} is running with a different {', '.join(differing)}; "
                               'stop it first or send "replace": true.',
                               name=spec.name, differing_fields=differing)
        else:
            info = await self._engine.inspect(spec.container_name)
            if info is not None and self._foreign(info):
                raise Conflict(f"A container named {spec.container_name} exists that this agent "
                               "does not manage; remove or rename it first.", name=spec.name)
        freeing = existing.spec.name if existing is not None else None
        gpu = None
        if spec.gpu:
            await self._table.refresh_gpus()
            gpu = self._table.gpus.place(spec.vram_gb, freeing=freeing).index
        pull_needed = not await self._engine.has_image(spec.image)
        published = await self._engine.published_ports()
        freed = {existing.host_port} if existing is not None else set()
        port = await self._table.free_port(spec.port, published - freed, freed)
        return DryRunOutcome(port, gpu, already_running=False, pull_needed=pull_needed)

    # -- stop ----------------------------------------------------------------------------

    async def stop(self, name: str, reason: str = "request") -> None:
        """Stop (grace, then kill), remove, release, persist. 404 when nothing is deployed."""
        async with self._table.locked(name):
            service = self._table.get(name)
            if service is None:
                info = await self._engine.inspect(CONTAINER_PREFIX + name)
                if info is None or self._foreign(info):
                    raise ServiceNotFound(f"No service named {name!r} is deployed on this node.",
                                          name=name)
                await self._engine.remove(info["Id"])
                return
            await self._stop_locked(service, reason)

    async def _stop_locked(self, service: Service, reason: str, **details: Any) -> None:
        await self._engine.stop(service.container_id, self._config.stop_timeout)
        await self._discard(service)
        self._table.drop_leases(service.spec.name)
        self._events.emit("stopped", service.spec.name, reason, **details)
        _LOGGER.info("Stopped %s (%s)", service.spec.name, reason)

    async def _discard(self, service: Service) -> None:
        """Remove the container and forget the service, releasing what it held."""
        await self._engine.remove(service.container_id)
        self._table.forget(service)
        await self._table.persist()

    # -- leases --------------------------------------------------------------------------

    async def release(self, name: str, lease_id: str) -> bool:
        """A holder lets go; the service stops if that was its last lease. Whether it stopped."""
        self._table.release_lease(name, lease_id)  # 404 when not held
        stopped = await self._stop_if_lapsed(name, released=lease_id)
        await self._table.persist()
        return stopped

    async def enforce(self) -> None:
        """Stop each leased service whose last lease ran out, and (--vram-overuse stop) each
        service persistently above its VRAM declaration; runs until cancelled. What can't be
        stopped now (the engine is away) is tried again on the next pass."""
        while True:
            await asyncio.sleep(ENFORCE_INTERVAL_S)
            for name in self._table.lapsed():
                try:
                    await self._stop_if_lapsed(name)
                except AgentError as err:
                    _LOGGER.warning("Could not stop %s, whose lease ran out: %s", name, err.message)
            if self._config.vram_overuse == "stop":
                for name in sorted(self._table.gpus.over):
                    try:
                        await self._stop_if_overusing(name)
                    except AgentError as err:
                        _LOGGER.warning("Could not stop %s, above its VRAM: %s", name, err.message)

    async def _stop_if_overusing(self, name: str) -> None:
        async with self._table.locked(name):
            service = self._table.get(name)
            if service is None or name not in self._table.gpus.over:
                return
            used = self._table.gpus.observed_gb(name)
            await self._stop_locked(service, "vram_overuse", declared_gb=service.spec.vram_gb,
                                    used_gb=None if used is None else round(used, 2))

    async def _stop_if_lapsed(self, name: str, **details: Any) -> bool:
        async with self._table.locked(name):  # a deploy may have renewed or pinned it meanwhile
            service = self._table.get(name)
            if service is None or service.pinned or self._table.leases_of(name):
                return False
            await self._stop_locked(service, "lease_expired", **details)
            return True

    async def logs(self, name: str, tail: int) -> str:
        """The service's recent output."""
        return await self._engine.logs(self._table.service(name).container_id, tail)

    def follow_logs(self, name: str, tail: int) -> AsyncGenerator[str, None]:
        """The service's output as it comes, starting with the last `tail` lines."""
        return self._engine.follow_logs(self._table.service(name).container_id, tail)

    async def close(self) -> None:
        """Roll back deploys still in flight (shutdown already gave them their time), wait
        for every rollback, flush the state file."""
        for task in self._inflight:
            task.cancel()
        await asyncio.gather(*self._inflight, return_exceptions=True)
        await asyncio.gather(*self._rollbacks, return_exceptions=True)
        await self._table.persist()

