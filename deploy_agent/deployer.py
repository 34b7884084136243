"""The deploy and stop flows, the per-name locks, and the in-memory service table."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import AsyncIterator, Callable

import attrs
import cattrs

from deploy_agent.config import Config
from deploy_agent.engine import Engine, container_config
from deploy_agent.errors import (
    Conflict,
    ContainerExited,
    EngineUnavailable,
    HealthTimeout,
    NoPortAvailable,
    PortTaken,
    ServiceNotFound,
)
from deploy_agent.gpus import Assignment, GpuPool
from deploy_agent.models import CONTAINER_PREFIX, DeployRequest, DeploySpec, JSONObject, Service
from deploy_agent.policy import check_deploy
from deploy_agent.ports import PortAllocator
from deploy_agent.probe import HealthProbe
from deploy_agent.state import StateFile, labels_for, service_from_container

_LOGGER = logging.getLogger(__name__)

PORT_ATTEMPTS = 5
LOG_TAIL_LINES = 20
MIN_POLL_S = 0.02
MAX_POLL_S = 1.0


def poll_interval(elapsed_s: float) -> float:
    """Health polls start every 20 ms and back off to 1 s, at about 5% of the time waited."""
    return min(MAX_POLL_S, max(MIN_POLL_S, elapsed_s / 20))


Progress = Callable[[JSONObject], None]
"""Receives deploy progress events ({"event": "pull" | "created" | "started" | "health", ...})."""


def no_progress(event: JSONObject) -> None:
    del event


def _not_found(name: str) -> ServiceNotFound:
    return ServiceNotFound(f"No service named {name!r} is deployed on this node.", name=name)


@attrs.frozen
class DeployOutcome:
    service: Service
    already_running: bool


class Deployer:
    """Owns the service table; serialises work per name, runs different names in parallel."""

    def __init__(self, config: Config, engine: Engine, probe: HealthProbe, gpus: GpuPool,
                 state_file: StateFile, converter: cattrs.Converter) -> None:
        self._config = config
        self._gpus = gpus
        self._engine = engine
        self._probe = probe
        self._state_file = state_file
        self._converter = converter
        self._ports = PortAllocator(config.port_range)
        self._services: dict[str, Service] = {}
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._generations: defaultdict[str, int] = defaultdict(int)
        self._rollbacks: set[asyncio.Task[None]] = set()

    # -- reading -------------------------------------------------------------------------

    def services(self) -> list[Service]:
        return sorted(self._services.values(), key=lambda s: s.spec.name)

    def service(self, name: str) -> Service:
        try:
            return self._services[name]
        except KeyError:
            raise _not_found(name) from None

    def lock(self, name: str) -> asyncio.Lock:
        """The lock that serialises deploy, stop and reconcile of one name."""
        return self._locks[name]

    def generations(self) -> dict[str, int]:
        """A counter per name, bumped on every change to its record.

        A background pass that read the engine earlier compares these to know whether its
        view of a name is still current, or a deploy or stop has overtaken it.
        """
        return dict(self._generations)

    def generation(self, name: str) -> int:
        return self._generations.get(name, 0)

    def _track(self, service: Service) -> None:
        self._services[service.spec.name] = service
        self._generations[service.spec.name] += 1

    def _untrack(self, service: Service) -> bool:
        if self._services.get(service.spec.name) is not service:
            return False
        del self._services[service.spec.name]
        self._generations[service.spec.name] += 1
        return True

    # -- deploy --------------------------------------------------------------------------

    async def deploy(self, request: DeployRequest, progress: Progress = no_progress) -> DeployOutcome:
        """Answer an existing healthy deployment, or replace/launch one; never half-done."""
        spec = request.spec
        check_deploy(spec, self._config)
        async with self._locks[spec.name]:
            existing = self._services.get(spec.name)
            if existing is not None:
                if existing.status == "healthy":
                    differing = existing.spec.differing_fields(spec)
                    if not differing:
                        return DeployOutcome(existing, already_running=True)
                    if not request.replace:
                        raise Conflict(
                            f"{spec.name} is running with a different {', '.join(differing)}; "
                            'stop it first or send "replace": true.',
                            name=spec.name, differing_fields=differing,
                        )
                _LOGGER.info("Replacing %s (status %s)", spec.name, existing.status)
                await self._discard(existing)
            else:
                await self._remove_stray(spec)
            return DeployOutcome(await self._launch(spec, progress), already_running=False)

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

    async def _launch(self, spec: DeploySpec, progress: Progress) -> Service:
        """Reserve a GPU (before a long pull, so a full node answers at once), then a port."""
        assignment = None
        if spec.gpu:
            await self.refresh_gpus()
            assignment = self._gpus.reserve(spec.name, spec.vram_gb)
        try:
            await self._ensure_image(spec.image, progress)
            published = await self._engine.published_ports()
            refused: set[int] = set()
            for _ in range(PORT_ATTEMPTS):
                host_port = self._ports.reserve(spec.port, published, frozenset(refused))
                try:
                    service = await self._create_and_start(spec, host_port, assignment, progress)
                except PortTaken:
                    _LOGGER.info("Host port %s was taken under us; trying the next", host_port)
                    refused.add(host_port)
                    continue
                await self._save()
                return service
            raise NoPortAvailable(
                f"The engine refused {PORT_ATTEMPTS} host ports in a row for {spec.name}.")
        except BaseException:
            self._gpus.release(spec.name)
            raise

    async def _create_and_start(self, spec: DeploySpec, host_port: int,
                                assignment: Assignment | None, progress: Progress) -> Service:
        """Create, start, wait healthy. On any failure nothing is left: container, port, record."""
        service: Service | None = None
        try:
            gpu = assignment.index if assignment else None
            gpu_env, device_requests = self._gpus.handoff(assignment) if assignment else ({}, [])
            labels = labels_for(self._converter, spec, host_port, gpu, self._config.instance)
            config = container_config(spec.image, spec.port, host_port, {**spec.env, **gpu_env},
                                      tuple(spec.volumes), spec.command, labels, device_requests)
            container_id = await self._engine.create(spec.container_name, config)
            service = Service(spec=spec, container_id=container_id, host_port=host_port, gpu=gpu)
            self._track(service)
            progress({"event": "created", "container": container_id[:12], "port": host_port,
                      "gpu": gpu})
            await self._engine.start(container_id)
            progress({"event": "started"})
            await self._wait_healthy(service, progress)
        except BaseException:
            # Shielded and tracked: a deploy cancelled at shutdown still removes its container,
            # and close() waits for that before the process exits.
            rollback = asyncio.ensure_future(self._roll_back(spec, service, host_port))
            self._rollbacks.add(rollback)
            rollback.add_done_callback(self._rollbacks.discard)
            await asyncio.shield(rollback)
            raise
        service.status = "healthy"
        _LOGGER.info("Deployed %s on host port %s%s", spec.name, host_port,
                     f", GPU {gpu}" if gpu is not None else "")
        return service

    async def _roll_back(self, spec: DeploySpec, service: Service | None, host_port: int) -> None:
        _LOGGER.info("Deploy of %s failed or was cancelled; removing its container and "
                     "releasing host port %s", spec.name, host_port)
        if service is not None:
            self._untrack(service)
            with contextlib.suppress(EngineUnavailable):
                await self._engine.remove(service.container_id)
        self._ports.release(host_port)

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
                if exited.done():
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
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await exited

    async def _raise_exited(self, service: Service, exit_code: int) -> None:
        raise ContainerExited(
            f"{service.spec.name} exited with code {exit_code} before it became healthy.",
            name=service.spec.name, exit_code=exit_code, logs=await self._logs(service),
        )

    async def _logs(self, service: Service) -> list[str]:
        return await self._engine.logs_tail(service.container_id, LOG_TAIL_LINES)

    # -- stop ----------------------------------------------------------------------------

    async def stop(self, name: str) -> None:
        """Stop (grace, then kill), remove, release, persist. 404 when nothing is deployed."""
        async with self._locks[name]:
            service = self._services.get(name)
            if service is None:
                info = await self._engine.inspect(CONTAINER_PREFIX + name)
                if info is None or self._foreign(info):
                    raise _not_found(name)
                await self._engine.remove(info["Id"])
                return
            await self._engine.stop(service.container_id, self._config.stop_timeout)
            await self._discard(service)
            _LOGGER.info("Stopped %s", name)

    async def _discard(self, service: Service) -> None:
        """Remove the container and forget the service, releasing what it held."""
        await self._engine.remove(service.container_id)
        self._untrack(service)
        self._release(service)
        await self._save()

    async def logs(self, name: str, tail: int) -> str:
        """The service's recent output."""
        return await self._engine.logs(self.service(name).container_id, tail)

    def follow_logs(self, name: str, tail: int) -> AsyncIterator[str]:
        """The service's output as it comes, starting with the last `tail` lines."""
        return self._engine.follow_logs(self.service(name).container_id, tail)

    async def close(self) -> None:
        """Finish rollbacks of cancelled deploys and flush the state file."""
        if self._rollbacks:
            await asyncio.gather(*self._rollbacks, return_exceptions=True)
        await self._save()

    async def refresh_gpus(self) -> None:
        """Re-read the GPUs, telling the pool which containers are the agent's own."""
        await self._gpus.refresh(frozenset(s.container_id for s in self._services.values()))

    # -- state ---------------------------------------------------------------------------

    async def _save(self) -> None:
        await self._state_file.save(list(self._services.values()))

    def adopt(self, service: Service) -> None:
        """Track a service found running at start-up or by a resync."""
        self._track(service)
        self._ports.claim(service.host_port)
        if service.gpu is not None:
            self._gpus.claim(service.spec.name, service.gpu, service.spec.vram_gb)

    def forget(self, service: Service) -> None:
        """Drop a record whose container is gone."""
        if self._untrack(service):
            self._release(service)

    def _release(self, service: Service) -> None:
        self._ports.release(service.host_port)
        self._gpus.release(service.spec.name)
