"""Everything that talks to Docker. aiodocker errors are translated here and nowhere else."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiodocker
import aiodocker.events

from deploy_agent.errors import (
    AgentError,
    Conflict,
    EngineError,
    EngineUnavailable,
    ImageNotFound,
    PortTaken,
)
from deploy_agent.models import JSONObject

_LOGGER = logging.getLogger(__name__)

UNREACHABLE = 900  # aiodocker's status for "cannot connect to the engine"
MANAGED_LABEL = "tidybot.deploy-agent"


@contextlib.contextmanager
def _translated(action: str) -> Any:
    """Turn aiodocker's errors into the agent's, naming what was being done."""
    try:
        yield
    except aiodocker.DockerError as err:
        if err.status == UNREACHABLE:
            raise EngineUnavailable(
                "The Docker engine is not reachable; is dockerd running?", action=action
            ) from err
        raise EngineError(f"Docker refused to {action}: {err.message}") from err


class Engine:
    """A thin, typed face over one aiodocker client."""

    def __init__(self, docker: aiodocker.Docker, instance: str = "default") -> None:
        self._docker = docker
        self._ours = f"{MANAGED_LABEL}={instance}"  # label filter: this agent's containers only

    async def close(self) -> None:
        await self._docker.close()

    async def ping(self) -> bool:
        """Whether the engine answers right now."""
        try:
            await self._docker.system.info()
        except aiodocker.DockerError:
            return False
        return True

    async def has_image(self, ref: str) -> bool:
        with _translated(f"inspect image {ref}"):
            try:
                await self._docker.images.inspect(ref)
            except aiodocker.DockerError as err:
                if err.status == 404:
                    return False
                raise
        return True

    async def pull(self, ref: str, on_progress: Callable[[JSONObject], None]) -> None:
        """Pull `ref`, reporting each progress message (per layer: status, current, total).

        ImageNotFound when no registry has it or it can't be reached.
        """
        try:
            async for message in self._docker.images.pull(ref, stream=True):
                detail = message.get("progressDetail") or {}
                step = {"status": message.get("status", ""), "layer": message.get("id")}
                if detail.get("total"):
                    step.update(current=detail.get("current", 0), total=detail["total"])
                on_progress(step)
        except aiodocker.DockerError as err:
            if err.status == UNREACHABLE:
                raise EngineUnavailable("The Docker engine is not reachable; is dockerd running?") from err
            raise ImageNotFound(
                f"Image {ref} is not on this node and could not be pulled: {err.message}",
                image=ref,
            ) from err

    async def published_ports(self) -> set[int]:
        """Host ports that running containers publish, as the engine reports them."""
        with _translated("list containers"):
            containers = await self._docker.containers.list()
        return {
            port["PublicPort"]
            for container in containers
            for port in container["Ports"]
            if "PublicPort" in port
        }

    async def create(self, name: str, config: JSONObject) -> str:
        """Create the container; Conflict when the name is taken."""
        try:
            container = await self._docker.containers.create(config, name=name)
        except aiodocker.DockerError as err:
            if err.status == 409:
                raise Conflict(f"A container named {name} already exists.", container=name) from err
            if err.status == 404:
                raise ImageNotFound(f"Image {config['Image']} is not on this node.",
                                    image=config["Image"]) from err
            with _translated(f"create {name}"):
                raise
        container_id: str = container.id
        return container_id

    async def start(self, container_id: str) -> None:
        """Start it; PortTaken when the engine finds the host port already allocated."""
        try:
            await self._docker.containers.container(container_id).start()
        except aiodocker.DockerError as err:
            if "port is already allocated" in err.message or "address already in use" in err.message:
                raise PortTaken(err.message) from err
            with _translated("start the container"):
                raise

    async def wait_exit(self, container_id: str) -> int:
        """Block until the container next exits; its exit code."""
        with _translated("wait for the container"):
            result = await self._docker.containers.container(container_id).wait(
                condition="next-exit"
            )
        return int(result.get("StatusCode", -1))

    async def inspect(self, name_or_id: str) -> JSONObject | None:
        """The container's inspect document, or None when it does not exist."""
        with _translated(f"inspect {name_or_id}"):
            try:
                info: JSONObject = await self._docker.containers.container(name_or_id).show()
            except aiodocker.DockerError as err:
                if err.status == 404:
                    return None
                raise
        return info

    async def list_managed(self) -> list[JSONObject]:
        """One `docker ps -a` summary (Id, State, Labels) per container the agent created.

        A single cheap call, for resyncs; inspect() gives the details when they are needed.
        """
        with _translated("list containers"):
            containers = await self._docker.containers.list(
                all=True, filters={"label": [self._ours]}
            )
        return [{"Id": c.id, "State": c["State"], "Labels": c["Labels"] or {}} for c in containers]

    async def logs(self, container_id: str, tail: int) -> str:
        """The last `tail` lines the container wrote, stdout and stderr interleaved."""
        with _translated("read the container's logs"):
            chunks = await self._docker.containers.container(container_id).log(
                stdout=True, stderr=True, tail=tail)
        return "".join(chunks)

    async def follow_logs(self, container_id: str, tail: int) -> AsyncIterator[str]:
        """The container's output as it is written, after its last `tail` lines."""
        with _translated("follow the container's logs"):
            async for chunk in self._docker.containers.container(container_id).log(
                    stdout=True, stderr=True, follow=True, tail=tail):
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
        with _translated("stop the container"):
            try:
                await self._docker.containers.container(container_id).stop(t=grace_s)
            except aiodocker.DockerError as err:
                if err.status not in (304, 404):
                    raise

    async def remove(self, container_id: str) -> None:
        """Force-remove; a container that is already gone is fine."""
        with _translated("remove the container"):
            try:
                await self._docker.containers.container(container_id).delete(force=True)
            except aiodocker.DockerError as err:
                if err.status == 404 or "already in progress" in err.message:
                    return
                raise

    async def events(self) -> AsyncIterator[JSONObject]:
        """Container events for the agent's containers, until the stream ends."""
        events = aiodocker.events.DockerEvents(self._docker)
        subscriber = events.subscribe(filters=json.dumps(
            {"type": ["container"], "label": [self._ours]}))
        try:
            while True:
                event = await subscriber.get()
                if event is None:
                    return
                yield event
        finally:
            await events.stop()


def container_config(
    spec_image: str,
    container_port: int,
    host_port: int,
    env: dict[str, str],
    volumes: tuple[str, ...],
    command: tuple[str, ...] | None,
    labels: dict[str, str],
    device_requests: list[JSONObject] | None = None,
) -> JSONObject:
    """The Engine API create body: one published port, restart unless stopped, no privileges."""
    port_key = f"{container_port}/tcp"
    config: JSONObject = {
        "Image": spec_image,
        "Env": [f"{key}={value}" for key, value in env.items()],
        "Labels": labels,
        "ExposedPorts": {port_key: {}},
        "HostConfig": {
            "PortBindings": {port_key: [{"HostIp": "", "HostPort": str(host_port)}]},
            "RestartPolicy": {"Name": "unless-stopped"},
            "Binds": list(volumes),
            # Never more than a plain `docker run`: no privileges, no added capabilities,
            # no host network, pid or ipc namespace.
            "Privileged": False,
            "CapAdd": [],
            "PidMode": "",
            "IpcMode": "private",
            "Init": True,  # signals reach the service and zombies are reaped, even as PID 1
            "NetworkMode": "bridge",
        },
    }
    if command is not None:
        config["Cmd"] = list(command)
    if device_requests:
        config["HostConfig"]["DeviceRequests"] = device_requests
    return config
