"""Everything that talks to Docker. Engine-client errors are translated here and nowhere else.

Every control call (create, start, inspect, remove, list, the start of a pull) is bounded
by `timeout_s`; stop by its grace period plus that. Long waits (a container's exit, the
event stream, log follows, a pull's progress) run on a second client with connections of
their own, so a hundred open streams never make a deploy queue for a connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TypeVar

import aiodocker
import aiodocker.events
import aiodocker.volumes
import aiohttp
from aiodocker.jsonstream import json_stream_stream

from deploy_agent.config import Config
from deploy_agent.errors import (
    AgentError,
    Conflict,
    EngineError,
    EngineUnavailable,
    ImageNotFound,
    PortTaken,
    PullStalled,
    RegistryDenied,
)
from deploy_agent.models import MANAGED_LABEL, DeploySpec, JSONObject
from deploy_agent.registry_auth import RegistryCredentials, registry_of
from deploy_agent.runtime import DROPPED_CAPABILITIES

_LOGGER = logging.getLogger(__name__)

T = TypeVar("T")
E = TypeVar("E", bound="Engine")

# Control calls are short and bounded; streams have a pool of their own, capped by --max-streams.
CONTROL_CONNECTIONS = 100
UNREACHABLE = 900  # aiodocker's status for "cannot connect to the engine"
PING_TIMEOUT_S = 2.0
GIB = 1024**3
DISK_USAGE_TIMEOUT_S = 300.0  # the engine walks every volume to size it
DISK_USAGE_RETRY_S = 0.5  # while another disk-usage walk runs (the engine allows one)
# What the engine client can raise besides DockerError: time-outs, dropped connections,
# a half-read body, JSON it cannot parse.
_TRANSPORT_ERRORS = (TimeoutError, aiohttp.ClientError, OSError)
_PAYLOAD_ERRORS = (ValueError, KeyError, TypeError)
# How the engine words a registry's refusal (its errors are text): no or wrong credentials,
# or no access to the repository. Docker Hub says "denied" for a repository that doesn't
# exist too, which is why the answer names both.
_DENIED_MARKS = ("no basic auth credentials", "unauthorized", "access denied", "denied: ",
                 "is denied", "authentication required", "403 forbidden")


_URL_QUERY = re.compile(r"(\w+://[^\s\"'?#]*)[?#][^\s\"']*")
_URL_USERINFO = re.compile(r"(\w+://)[^/\s\"'@]+@")


def redacted(text: str) -> str:
    """An engine's error text without what URLs may carry: a query (signed blob URLs hold
    tokens: X-Amz-Security-Token=, verify=) or a user:password@."""
    return _URL_USERINFO.sub(r"\1***@", _URL_QUERY.sub(r"\1?***", text))


def refused_by_registry(reason: str) -> bool:
    """Whether the engine's pull error is a registry's refusal (not, say, "permission denied"
    on the node's own disk)."""
    lowered = reason.lower().replace("permission denied", "")
    return any(mark in lowered for mark in _DENIED_MARKS)


def _unavailable(action: str, reason: str) -> EngineUnavailable:
    return EngineUnavailable(f"The Docker engine did not answer ({reason}) while trying to "
                             f"{action}; is dockerd running and responsive?", action=action)


@contextlib.contextmanager
def translated(action: str) -> Iterator[None]:
    """Turn every engine-client failure into an AgentError naming what was being done."""
    try:
        yield
    except AgentError:
        raise
    except aiodocker.DockerError as err:
        if err.status == UNREACHABLE:
            raise _unavailable(action, "connection refused") from err
        raise EngineError(f"Docker refused to {action}: {err.message}") from err
    except TimeoutError as err:
        raise _unavailable(action, "timed out") from err
    except _TRANSPORT_ERRORS as err:
        raise _unavailable(action, type(err).__name__) from err
    except _PAYLOAD_ERRORS as err:
        raise EngineError(f"The Docker engine's answer could not be read while trying to "
                          f"{action}: {err!r}") from err


class _Docker(aiodocker.Docker):
    """aiodocker's client, except that a response is closed when its reader leaves.

    aiodocker's `_query` hands out the response and never closes it, so a read cancelled
    half-way (a time-out, a follow whose client left, an exit wait no longer needed) kept
    its engine connection open until garbage collection. Every call goes through here.
    """

    @contextlib.asynccontextmanager
    async def _query(self, path: Any, method: str = "GET", **kwargs: Any
                     ) -> AsyncIterator[aiohttp.ClientResponse]:
        response = await self._do_query(path, method, **kwargs)
        try:
            yield response
        finally:
            response.close()  # after a full read the connection is already back in the pool


def open_docker(url: str, connection_limit: int) -> aiodocker.Docker:
    """An engine client whose pool holds at most `connection_limit` connections (0: no limit)."""
    if url.startswith("unix://"):
        connector = aiohttp.UnixConnector(url.removeprefix("unix://"), limit=connection_limit)
        return _Docker(url="http://docker", connector=connector)
    if url.startswith(("tcp://", "http://")):
        return _Docker(url="http://" + url.split("://", 1)[1],
                       connector=aiohttp.TCPConnector(limit=connection_limit))
    return _Docker(url=url)  # TLS, ssh: aiodocker's own connector


def plaintext_remote(url: str) -> bool:
    """Whether an engine URL is unencrypted TCP to another machine."""
    if not url.startswith(("tcp://", "http://")):
        return False
    host = url.split("://", 1)[1].rsplit(":", 1)[0].strip("[]")
    return host not in ("localhost", "::1") and not host.startswith("127.")


async def close_docker(docker: aiodocker.Docker) -> None:
    await docker.close()
    await docker.connector.close()  # ours when open_docker made it; closing twice is harmless


class Engine:
    """A thin, typed face over the engine: one client for control calls, one for streams."""

    credentials: RegistryCredentials
    rlimit_refusal: str | None = None  # why the engine can't set a service's memlock

    def __init__(self, control: aiodocker.Docker, streams: aiodocker.Docker, *,
                 instance: str = "default", timeout_s: float = 30.0,
                 pull_stall_s: float = 120.0, credentials: RegistryCredentials | None = None,
                 plaintext_remote: bool = False) -> None:
        self._docker = control
        self.credentials = credentials or RegistryCredentials()
        self.plaintext_remote = plaintext_remote  # tcp:// or http:// to another machine
        self._streams = streams
        self._ours = f"{MANAGED_LABEL}={instance}"  # label filter: this agent's containers only
        self.timeout_s = timeout_s
        self._pull_stall_s = pull_stall_s

    async def _bounded(self, action: str, call: Awaitable[T], timeout_s: float | None = None) -> T:
        with translated(action):
            async with asyncio.timeout(self.timeout_s if timeout_s is None else timeout_s):
                return await call

    async def post_json(self, action: str, path: str, body: JSONObject,
                        params: dict[str, Any] | None = None,
                        headers: dict[str, str] | None = None) -> Any:
        """POST `body` as it is to an Engine API path, bounded; its JSON answer. For the calls
        aiodocker's own methods reshape (a Swarm service's Env on create, a whole spec on
        update): the one place that reaches below aiodocker's public API."""
        return await self._bounded(action, self._docker._query_json(
            path, method="POST", data=json.dumps(body), params=params, headers=headers))

    async def ping(self) -> bool:
        """Whether the engine answers within a couple of seconds, right now."""
        try:
            await self._bounded("ping", self._docker.system.info(), PING_TIMEOUT_S)
        except AgentError:
            return False
        return True

    async def has_image(self, ref: str) -> bool:
        return await self.inspect_image(ref) is not None

    async def inspect_image(self, ref: str) -> JSONObject | None:
        """The image's inspect document (RepoDigests, Size...); None when the node lacks it."""
        try:
            found: JSONObject = await self._bounded(f"inspect image {ref}",
                                                    self._docker.images.inspect(ref))
        except EngineError as err:
            if err.engine_status == 404:
                return None
            raise
        return found

    async def registry_auth(self, ref: str) -> dict[str, str]:
        """The X-Registry-Auth header for `ref`'s registry; {} when it has no credential, or
        when the engine is reached in clear text beyond this machine (it would cross the
        network as base64)."""
        credential = await self.credentials.lookup(ref)
        if credential is None:
            return {}
        if self.plaintext_remote:
            self.credentials.problems["engine"] = (
                "--docker-host is reached over plain TCP beyond this machine: registry "
                "credentials are not sent to it (use the unix socket, ssh:// or TLS)")
            return {}
        return {"X-Registry-Auth": credential.header()}

    async def pull(self, ref: str, on_progress: Callable[[JSONObject], None]) -> None:
        """Pull `ref` with its registry's credentials, reporting each progress message (per
        layer: status, current, total).

        Bounded by progress, not by the clock: the engine must answer within timeout_s and
        then say something at least every pull_stall_s. RegistryDenied when the registry
        refuses it, ImageNotFound when no registry has it; PullStalled when the engine
        answers pings but the pull goes quiet.
        """
        loop = asyncio.get_running_loop()
        action = f"pull {ref}"
        headers = await self.registry_auth(ref)
        try:
            with translated(action):
                async with asyncio.timeout(self.timeout_s) as deadline:
                    async for message in self._pull_stream(ref, headers):
                        deadline.reschedule(loop.time() + self._pull_stall_s)
                        detail = message.get("progressDetail") or {}
                        step = {"status": message.get("status", ""), "layer": message.get("id")}
                        if detail.get("total"):
                            step.update(current=detail.get("current", 0), total=detail["total"])
                        on_progress(step)
        except EngineUnavailable as err:
            if not isinstance(err.__cause__, TimeoutError) or not await self.ping():
                raise
            raise PullStalled(f"The pull of {ref} made no progress for {self._pull_stall_s:g} s "
                              "although the engine answers; is the registry reachable?",
                              image=ref) from err
        except EngineError as err:
            cause = err.__cause__
            reason = redacted(cause.message if isinstance(cause, aiodocker.DockerError) else repr(cause))
            if refused_by_registry(reason):
                registry, sent = registry_of(ref), bool(headers)
                raise RegistryDenied(
                    f"The registry {registry} refused the pull of {ref} "
                    f"({'with the credentials the agent has' if sent else 'no credentials sent'}"
                    f"): {reason}. Log in as the agent's user (docker login {registry}) or name "
                    "a Docker config with --registry-auth; check that the image exists.",
                    image=ref, registry=registry, credentials_sent=sent) from err
            raise ImageNotFound(f"Image {ref} is not on this node and could not be pulled: {reason}",
                                image=ref) from err

    async def _pull_stream(self, ref: str, headers: dict[str, str]) -> AsyncIterator[JSONObject]:
        """The engine's pull progress, one message at a time. Not aiodocker's images.pull:
        it guesses the registry of an authenticated pull from the first path component,
        which is wrong for Docker Hub names (`library/x`, `user/x`)."""
        params = {"fromImage": ref}
        name_part = ref.rsplit("/", 1)[-1]
        if ":" not in name_part and "@" not in ref:
            params["tag"] = "latest"
        async with self._streams._query("images/create", "POST", params=params, headers=headers,
                                        timeout=self._streams._resolve_long_running_timeout(None)
                                        ) as response:
            # An in-band {"error": ...} line (the registry refused) raises DockerStreamError
            # (aiodocker >= 0.27: earlier ones yield it as progress).
            async for message in json_stream_stream(response):
                yield message

    async def list_images(self) -> list[JSONObject]:
        """`docker images`: Id, RepoTags, RepoDigests, Size per image."""
        found = await self._bounded("list images", self._docker.images.list())
        return [dict(image) for image in found]

    async def published_ports(self) -> set[int]:
        """Host ports that running containers publish, as the engine reports them."""
        containers = await self._bounded("list containers", self._docker.containers.list())
        return {
            port["PublicPort"]
            for container in containers
            for port in container["Ports"]
            if "PublicPort" in port
        }

    async def volume_labels(self, name: str) -> dict[str, str] | None:
        """The labels of the named volume; None when there is no such volume."""
        try:
            volume = await self._bounded(f"inspect volume {name}", self._docker.volumes.get(name))
            found = await self._bounded(f"inspect volume {name}", volume.show())
        except EngineError as err:
            if err.engine_status == 404:
                return None
            raise
        return dict(found.get("Labels") or {})

    async def ensure_volume(self, name: str, labels: dict[str, str]) -> dict[str, str]:
        """Create the named volume with these labels unless it exists; the labels it has."""
        volume = await self._bounded(f"create volume {name}",
                                     self._docker.volumes.create({"Name": name, "Labels": labels}))
        found = await self._bounded(f"inspect volume {name}", volume.show())
        return dict(found.get("Labels") or {})

    async def list_volumes(self, labels: dict[str, str]) -> list[JSONObject]:
        """The volumes carrying all these labels: Name, Labels, CreatedAt."""
        found = await self._bounded("list volumes", self._docker.volumes.list(
            filters={"label": [f"{key}={value}" for key, value in labels.items()]}))
        return [dict(volume) for volume in found.get("Volumes") or []]

    async def volume_sizes(self) -> dict[str, int]:
        """Each volume's size in bytes, by name, from the engine's disk-usage call (slow: it
        walks every volume; -1 where the engine doesn't know)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(self.timeout_s, DISK_USAGE_TIMEOUT_S)
        while True:  # the engine runs one disk-usage walk at a time, whoever asked for it
            try:
                # type=volume: only the volumes are walked (API 1.42+; older engines ignore it)
                usage = await self._bounded("measure disk usage", self._docker._query_json(
                    "system/df", params={"type": "volume"}), max(1.0, deadline - loop.time()))
                break
            except EngineError as err:
                if "already running" not in err.message or loop.time() + DISK_USAGE_RETRY_S > deadline:
                    raise
                await asyncio.sleep(DISK_USAGE_RETRY_S)
        return {volume["Name"]: int((volume.get("UsageData") or {}).get("Size", -1))
                for volume in usage.get("Volumes") or []}

    async def remove_volume(self, name: str) -> bool:
        """Remove the named volume; False when there was none. Conflict while a container (even
        a stopped one) uses it."""
        try:
            await self._bounded(f"remove volume {name}",
                                aiodocker.volumes.DockerVolume(self._docker, name).delete())
        except EngineError as err:
            if err.engine_status == 404:
                return False
            if err.engine_status == 409:
                raise Conflict(f"Volume {name} is in use by a container.", volume=name) from err
            raise
        return True

    async def create(self, name: str, config: JSONObject) -> str:
        """Create the container; Conflict when the name is taken."""
        try:
            container = await self._bounded(f"create {name}",
                                            self._docker.containers.create(config, name=name))
        except EngineError as err:
            status = err.engine_status
            if status == 409:
                raise Conflict(f"A container named {name} already exists.", container=name) from err
            if status == 404:
                raise ImageNotFound(f"Image {config['Image']} is not on this node.",
                                    image=config["Image"]) from err
            raise
        container_id: str = container.id
        return container_id

    async def start(self, container_id: str) -> None:
        """Start it; PortTaken when the engine finds the host port already allocated."""
        try:
            await self._bounded("start the container",
                                self._docker.containers.container(container_id).start())
        except EngineError as err:
            if "port is already allocated" in err.message or "address already in use" in err.message:
                raise PortTaken(err.message) from err
            raise

    async def wait_exit(self, container_id: str) -> int:
        """Block until the container next exits; its exit code. Not bounded: it may run for days."""
        with translated("wait for the container"):
            result = await self._streams.containers.container(container_id).wait(
                condition="next-exit")
        return int(result.get("StatusCode", -1))

    async def inspect(self, name_or_id: str) -> JSONObject | None:
        """The container's inspect document, or None when it does not exist."""
        try:
            info: JSONObject = await self._bounded(
                f"inspect {name_or_id}", self._docker.containers.container(name_or_id).show())
        except EngineError as err:
            if err.engine_status == 404:
                return None
            raise
        return info

    async def list_managed(self) -> list[JSONObject]:
        """One `docker ps -a` summary (Id, State, Labels) per container the agent created.

        A single cheap call, for resyncs; inspect() gives the details when they are needed.
        """
        containers = await self._bounded("list containers", self._docker.containers.list(
            all=True, filters={"label": [self._ours]}))
        return [{"Id": c.id, "State": c["State"], "Labels": c["Labels"] or {}} for c in containers]

    async def logs(self, container_id: str, tail: int) -> str:
        """The last `tail` lines the container wrote, stdout and stderr interleaved."""
        chunks = await self._bounded("read the container's logs",
                                     self._docker.containers.container(container_id).log(
                                         stdout=True, stderr=True, tail=tail))
        return "".join(chunks)

    async def follow_logs(self, container_id: str, tail: int) -> AsyncGenerator[str, None]:
        """The container's output as it is written, after its last `tail` lines.

        Not bounded: it ends when the container stops or the caller closes the iterator.
        """
        # aiodocker annotates this as an AsyncIterator; it is an async generator, closable.
        stream: AsyncGenerator[str, None] = self._streams.containers.container(container_id).log(
            stdout=True, stderr=True, follow=True, tail=tail)  # type: ignore[assignment]
        with translated("follow the container's logs"):
            async with contextlib.aclosing(stream):  # gives the engine connection back at once
                async for chunk in stream:
                    yield chunk

    async def logs_tail(self, container_id: str, lines: int = 20) -> list[str]:
        """The last lines as a list, for error answers; [] when they can't be read."""
        try:
            text = await self.logs(container_id, lines)
        except AgentError:
            return []
        return text.splitlines()[-lines:]

    async def stop(self, container_id: str, grace_s: int) -> None:
        """Stop (SIGTERM, then SIGKILL after grace_s); a missing container is fine."""
        try:
            await self._bounded("stop the container",
                                self._docker.containers.container(container_id).stop(t=grace_s),
                                grace_s + self.timeout_s)
        except EngineError as err:
            if err.engine_status not in (304, 404):
                raise

    async def remove(self, container_id: str) -> None:
        """Force-remove; a container that is already gone is fine."""
        try:
            await self._bounded("remove the container",
                                self._docker.containers.container(container_id).delete(force=True))
        except EngineError as err:
            if err.engine_status == 404 or "already in progress" in err.message:
                return
            raise

    async def events(self) -> AsyncIterator[JSONObject]:
        """Container events for the agent's containers, until the stream ends."""
        events = aiodocker.events.DockerEvents(self._streams)
        subscriber = events.subscribe(filters=json.dumps(
            {"type": ["container"], "label": [self._ours]}))
        try:
            while (event := await subscriber.get()) is not None:
                yield event
        finally:
            # Stopping re-raises what ended the stream (the engine went away, say); the
            # caller resubscribes and resyncs either way.
            with contextlib.suppress(Exception):
                await events.stop()


def shm_bytes(spec: DeploySpec, default_shm_gb: float) -> int | None:
    """/dev/shm for the service: its shm_gb, else for a GPU service the node's default (ML
    frameworks fail in the engine's 64 MB), else the engine's own."""
    shm_gb = spec.shm_gb if spec.shm_gb is not None else default_shm_gb if spec.gpu else None
    return int(shm_gb * GIB) if shm_gb is not None else None


UNLIMITED_MEMLOCK: JSONObject = {"Name": "memlock", "Soft": -1, "Hard": -1}


def memlock_ulimits(spec: DeploySpec, gpu_memlock: bool) -> list[JSONObject]:
    """Unlimited locked memory for a GPU service (CUDA pinned memory, NCCL), unless the node
    says --gpu-memlock off; [] for the rest."""
    return [dict(UNLIMITED_MEMLOCK)] if spec.gpu and gpu_memlock else []


def memlock_refused(err: AgentError) -> bool:
    """The runtime could not raise RLIMIT_MEMLOCK (type 8): the engine lacks CAP_SYS_RESOURCE
    (rootless, some sandboxes). Not any failure that mentions rlimits (a command of that
    name, another limit)."""
    return "error setting rlimit type 8: operation not permitted" in err.message


def container_config(spec: DeploySpec, *, host_port: int, env: dict[str, str],
                     labels: dict[str, str], device_requests: list[JSONObject], binds: list[str],
                     publish_host: str = "", pids_limit: int = 4096,
                     default_shm_gb: float = 2.0, ulimits: list[JSONObject] | None = None,
                     mounts: list[JSONObject] | None = None) -> JSONObject:
    """The Engine API create body: one published port, restart unless stopped, hardened."""
    port_key = f"{spec.port}/tcp"
    host_config: JSONObject = {
        "PortBindings": {port_key: [{"HostIp": publish_host, "HostPort": str(host_port)}]},
        "RestartPolicy": {"Name": "unless-stopped"},
        "Binds": binds,
        # Never more than a plain `docker run`, and less where it costs a service nothing:
        # no privileges, no added capabilities, no host network, pid or ipc namespace, no
        # setuid gains, a bounded number of processes.
        "Privileged": False,
        "CapAdd": [],
        "CapDrop": list(DROPPED_CAPABILITIES),
        "PidMode": "",
        "IpcMode": "private",
        "SecurityOpt": ["no-new-privileges"],
        "PidsLimit": pids_limit,
        "Init": True,  # signals reach the service and zombies are reaped, even as PID 1
        "NetworkMode": "bridge",
    }
    if spec.memory_gb is not None:
        limit = int(spec.memory_gb * GIB)
        host_config.update(Memory=limit, MemorySwap=limit)  # no swap beyond the limit
    if device_requests:
        host_config["DeviceRequests"] = device_requests
    shm = shm_bytes(spec, default_shm_gb)
    if shm is not None:
        host_config["ShmSize"] = shm
    if ulimits:
        host_config["Ulimits"] = ulimits
    if mounts:
        host_config["Mounts"] = mounts
    config: JSONObject = {
        "Image": spec.image,
        "Env": [f"{key}={value}" for key, value in env.items()],
        "Labels": labels,
        "ExposedPorts": {port_key: {}},
        "HostConfig": host_config,
    }
    if spec.command is not None:
        config["Cmd"] = list(spec.command)
    return config


def open_engine(kind: type[E], config: Config, docker: aiodocker.Docker | None = None
                ) -> tuple[E, Callable[[], Awaitable[None]]]:
    """An engine adapter of `kind` on --docker-host, with a control client and a client for
    streams; and how to close them. `docker` (a test's client) serves both and stays open."""
    if docker is not None:
        control = streams = docker
        owned = []
    else:
        control = open_docker(config.docker_host, CONTROL_CONNECTIONS)
        streams = open_docker(config.docker_host, 0)  # no limit: --max-streams bounds it
        owned = [control, streams]

    async def close() -> None:
        for client in owned:
            await close_docker(client)

    engine = kind(control, streams, instance=config.instance, timeout_s=config.engine_timeout_s,
                  pull_stall_s=config.pull_stall_timeout_s,
                  credentials=RegistryCredentials(config.registry_auth),
                  plaintext_remote=plaintext_remote(config.docker_host))
    return engine, close
