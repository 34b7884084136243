"""One Docker engine: services as containers on this node."""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncGenerator
from typing import Any

import attrs
import cattrs

from deploy_agent.backends.engine import Engine, container_config, memlock_refused, memlock_ulimits
from deploy_agent.config import Config
from deploy_agent.errors import (
    ContainerExited,
    EngineError,
    EngineUnavailable,
    MountNotAllowed,
    may_have_happened,
)
from deploy_agent.gpus import Assignment
from deploy_agent.models import CONTAINER_PREFIX, DeploySpec, JSONObject, Lease, Owner, Service, new_attempt
from deploy_agent.probe import HealthProbe
from deploy_agent.runtime import (
    LOG_TAIL_LINES,
    NO_GPU_ENV,
    DryRunOutcome,
    Progress,
    not_ours,
    on_a_free_port,
    wait_healthy,
)
from deploy_agent.state import labels_for, service_from_container
from deploy_agent.table import ServiceTable
from deploy_agent.volumes import Mount, engine_mount, is_ours, mounts_of, volume_labels

_LOGGER = logging.getLogger(__name__)



@attrs.frozen
class _ContainerWatch:
    """A container being started, its exit watched the whole time: an exit ends the wait at
    once, even in the middle of a probe."""

    engine: Engine
    probes: HealthProbe
    service: Service
    exited: asyncio.Future[int]  # the engine's wait for its next exit

    async def ready(self) -> bool:
        if self.exited.done():  # exited, or the engine failed under the watch
            await self._raise_exited()
        return True

    async def probe(self, timeout_s: float) -> bool:
        service = self.service
        probe = asyncio.ensure_future(self.probes.healthy(service.host_port, service.spec.health,
                                                          timeout_s))
        either: set[asyncio.Future[Any]] = {probe, self.exited}
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        if self.exited.done():
            probe.cancel()
            await self._raise_exited()
        return probe.result()

    async def pause(self, seconds: float) -> None:
        await asyncio.wait({self.exited}, timeout=seconds)

    async def logs(self) -> list[str]:
        return await self.engine.logs_tail(self.service.container_id, LOG_TAIL_LINES)

    async def _raise_exited(self) -> None:
        exit_code = self.exited.result()
        raise ContainerExited(
            f"{self.service.spec.name} exited with code {exit_code} before it became healthy.",
            name=self.service.spec.name, exit_code=exit_code, logs=await self.logs())


@attrs.define
class _Attempt:
    """One try at creating a service's container, and what it holds so far."""

    spec: DeploySpec
    owner: Owner  # of the launch's reservations (one for all its tries)
    host_port: int
    lease: Lease | None  # the lease the container is created under (in its labels)
    id: str = attrs.field(factory=lambda: secrets.token_hex(8))  # this try's container label
    service: Service | None = None  # set once the engine has created the container
    created_unknown: bool = False  # the create call failed in a way that may still create it


class DockerRuntime:
    """Services as containers of one engine: create, start, wait healthy, roll back."""

    def __init__(self, config: Config, engine: Engine, probe: HealthProbe, table: ServiceTable,
                 converter: cattrs.Converter) -> None:
        self._config = config
        self._engine = engine
        self._probe = probe
        self._table = table
        self._converter = converter
        self._rollbacks: set[asyncio.Task[None]] = set()

    async def remove_stray(self, spec: DeploySpec) -> None:
        """A container of this name that the agent does not track: ours is replaced, a foreign one refused."""
        info = await self._existing_ours(spec)
        if info is not None:
            _LOGGER.info("Removing untracked container %s before deploying", spec.container_name)
            await self._engine.remove(info["Id"])

    async def _existing_ours(self, spec: DeploySpec) -> JSONObject | None:
        """The container of this name, if any; Conflict when it isn't this agent's."""
        info = await self._engine.inspect(spec.container_name)
        if info is not None and self._foreign(info):
            raise not_ours("container", spec.name)
        return info

    def _foreign(self, info: JSONObject) -> bool:
        """A container this agent instance did not create (or can't read back)."""
        return service_from_container(self._converter, info, self._config.instance) is None

    async def _ensure_image(self, image: str, progress: Progress) -> None:
        if not await self._engine.has_image(image):
            _LOGGER.info("Pulling %s", image)
            await self._engine.pull(image, lambda step: progress({"event": "pull", **step}))

    async def launch(self, spec: DeploySpec, progress: Progress, lease: Lease | None) -> Service:
        """Reserve a GPU (before a long pull, so a full node answers at once), then a port."""
        owner = Owner(spec.name, new_attempt())
        assignment = None
        if spec.gpu:
            await self._table.refresh_gpus()
            assignment = self._table.reserve_gpu(owner, spec.vram_gb)
        try:
            await self._ensure_image(spec.image, progress)
            mounts = await self._mounts(spec)
            published = await self._engine.published_ports()
            memlock = self._memlock(spec)
            try:
                return await self._on_a_free_port(spec, owner, lease, assignment, mounts, published,
                                                  progress, memlock)
            except EngineError as err:
                if not (memlock and memlock_refused(err)):
                    raise
                refusal = err.message
            # Again without: only when that starts is the engine found out (not a command
            # that merely prints the runtime's words). From then on GPU services start with
            # the engine's memlock, and /health says so.
            service = await self._on_a_free_port(spec, owner, lease, assignment, mounts, published,
                                                  progress, memlock=False)
            if self._engine.rlimit_refusal is None:
                self._engine.rlimit_refusal = refusal
                _LOGGER.warning("The engine cannot give GPU services unlimited memlock (%s); "
                                "starting them with its default", refusal)
            return service
        except BaseException:
            if assignment is not None:
                self._table.release_gpu(owner)
            raise

    def _memlock(self, spec: DeploySpec) -> bool:
        return bool(memlock_ulimits(spec, self._config.gpu_memlock)) and self._engine.rlimit_refusal is None

    async def _on_a_free_port(self, spec: DeploySpec, owner: Owner, lease: Lease | None,
                              assignment: Assignment | None, mounts: list[Mount], published: set[int],
                              progress: Progress, memlock: bool) -> Service:
        return await on_a_free_port(  # tracked: the deployer writes services.json
            lambda refused: self._table.reserve_port(owner, spec.port, published, refused),
            lambda port: self._create_and_start(_Attempt(spec, owner, port, lease), assignment,
                                                mounts, progress, memlock),
            "The engine", spec.name)

    async def _mounts(self, spec: DeploySpec, create: bool = True) -> list[Mount]:
        """The spec's mounts, with the agent's own volumes made (labelled) on first use;
        MountNotAllowed when a volume of that name exists and is not this agent's. Without
        `create` (a dry run), only looked at."""
        mounts = mounts_of(spec, self._config)
        for mount in mounts:
            if not mount.owned:
                continue
            wanted = volume_labels(mount.name, self._config.instance, mount.cache)
            labels = (await self._engine.ensure_volume(mount.source, wanted) if create
                      else await self._engine.volume_labels(mount.source))
            if labels is not None and not is_ours(labels, mount.name, self._config.instance):
                raise MountNotAllowed(
                    f"Volume {mount.source} exists on this node but is not this agent's; it is "
                    f"never mounted for {mount.name!r}. Remove or rename it, or let services "
                    f"mount it with --allow-volume {mount.source}.", volume=mount.name)
        return mounts

    async def _create_and_start(self, attempt: _Attempt, assignment: Assignment | None,
                                mounts: list[Mount], progress: Progress, memlock: bool) -> Service:
        """Create, start, wait healthy. On any failure nothing is left: container, port, record."""
        spec, host_port = attempt.spec, attempt.host_port
        try:
            gpu = assignment.index if assignment else None
            gpu_env, device_requests = (self._table.gpus.handoff(assignment) if assignment
                                        else (dict(NO_GPU_ENV), []))
            labels = labels_for(self._converter, spec, host_port, gpu, self._config.instance,
                                attempt.id, attempt.lease)
            config = container_config(spec, host_port=host_port, env={**spec.env, **gpu_env},
                                      # Host paths as Binds (their directory is made if missing);
                                      # the agent's volumes as Mounts, with its labels.
                                      binds=[m.bind for m in mounts if not m.owned],
                                      mounts=[engine_mount(m, self._config.instance)
                                              for m in mounts if m.owned],
                                      labels=labels, device_requests=device_requests,
                                      publish_host=self._config.publish_host,
                                      pids_limit=self._config.service_pids_limit,
                                      default_shm_gb=self._config.default_shm_gb,
                                      ulimits=memlock_ulimits(spec, memlock))
            try:
                container_id = await self._engine.create(spec.container_name, config)
            except BaseException as err:
                attempt.created_unknown = may_have_happened(err)
                raise
            attempt.service = Service(spec=spec, container_id=container_id, host_port=host_port,
                                      gpu=gpu, pinned=attempt.lease is None,
                                      attempt=attempt.owner.attempt)
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
            self._table.release_port(attempt.owner, attempt.host_port)
        if self._table.is_abandoned(attempt.id):
            await self._table.persist()  # so a restart still knows to remove it

    async def _wait_healthy(self, service: Service, progress: Progress) -> None:
        """Poll health with backoff while watching for the container to exit."""
        exited = asyncio.ensure_future(self._engine.wait_exit(service.container_id))
        try:
            await wait_healthy(service, min(service.spec.ready_timeout, self._config.max_ready_timeout),
                               progress, _ContainerWatch(self._engine, self._probe, service, exited))
        finally:
            exited.cancel()
            await asyncio.gather(exited, return_exceptions=True)

    async def place(self, spec: DeploySpec, replacing: Service | None) -> DryRunOutcome:
        if replacing is None:
            await self._existing_ours(spec)
        freeing = replacing.owner if replacing is not None else None
        gpu = None
        if spec.gpu:
            await self._table.refresh_gpus()
            gpu = self._table.gpus.place(spec.vram_gb, freeing=freeing).local_index
        await self._mounts(spec, create=False)
        pull_needed = not await self._engine.has_image(spec.image)
        published = await self._engine.published_ports()
        freed = {replacing.host_port} if replacing is not None else set()
        port = await self._table.free_port(spec.port, published - freed, freed)
        return DryRunOutcome(port, gpu, already_running=False, pull_needed=pull_needed)

    async def stop(self, service: Service, grace_s: int) -> None:
        await self._engine.stop(service.container_id, grace_s)

    async def discard(self, service: Service) -> None:
        await self._engine.remove(service.container_id)

    async def remove_untracked(self, name: str) -> bool:
        info = await self._engine.inspect(CONTAINER_PREFIX + name)
        if info is None or self._foreign(info):
            return False
        await self._engine.remove(info["Id"])
        return True

    async def logs(self, service: Service, tail: int) -> str:
        return await self._engine.logs(service.container_id, tail)

    def follow_logs(self, service: Service, tail: int) -> AsyncGenerator[str, None]:
        return self._engine.follow_logs(service.container_id, tail)

    async def close(self) -> None:
        await asyncio.gather(*self._rollbacks, return_exceptions=True)
