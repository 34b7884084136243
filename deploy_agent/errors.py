"""The agent's exception tree: each class carries its HTTP status and error code."""

from __future__ import annotations

from typing import Any

NO_ROOM_RETRY_AFTER_S = 10  # what a deploy refused for want of GPU room is told to wait


class AgentError(Exception):
    """A failure the caller can act on; answered as `{"ok": false, "error": code, ...}`."""

    status = 500
    code = "internal_error"

    def __init__(self, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.extra = extra

    def to_json(self) -> dict[str, Any]:
        return {"ok": False, "error": self.code, "message": self.message, **self.extra}


class InvalidRequest(AgentError):
    """The request body is malformed or a field breaks a rule (`details` lists each)."""

    status = 400
    code = "invalid_request"


class Unauthorized(AgentError):
    """The request lacks the agent's bearer token, or carries a wrong one."""

    status = 401
    code = "unauthorized"


class HostNotAllowed(AgentError):
    """The request's Host names a host that is not this agent's (DNS rebinding, say)."""

    status = 403
    code = "host_not_allowed"


class UnsupportedMediaType(AgentError):
    """A request body that is not declared `Content-Type: application/json`."""

    status = 415
    code = "unsupported_media_type"


class ImageNotAllowed(AgentError):
    """The image does not match the node's --allow-image patterns."""

    status = 403
    code = "image_not_allowed"


class MountNotAllowed(AgentError):
    """A volume names a host path outside the allowed roots."""

    status = 403
    code = "mount_not_allowed"


class ServiceNotFound(AgentError):
    """No service of that name is deployed on this node."""

    status = 404
    code = "not_found"


class LeaseNotFound(AgentError):
    """No lease of that id is held on that service (it lapsed, was released, or never was)."""

    status = 404
    code = "lease_not_found"


class Conflict(AgentError):
    """The name is deployed with a different spec, or taken by a foreign container."""

    status = 409
    code = "conflict"


class TooManyStreams(AgentError):
    """Every one of the --max-streams log or event follows is taken."""

    status = 429
    code = "too_many_streams"


class ImageNotFound(AgentError):
    """The image is neither present nor pullable."""

    status = 422
    code = "image_not_found"


class RegistryDenied(AgentError):
    """The registry refused the pull: no credentials, wrong ones, or no access to the image."""

    status = 403
    code = "registry_denied"


class NotSupported(AgentError):
    """What this backend cannot do (a pull ahead of time onto a swarm's nodes)."""

    status = 501
    code = "not_supported"


class ContainerExited(AgentError):
    """The container exited before it became healthy."""

    status = 502
    code = "container_exited"


class EngineError(AgentError):
    """The Docker engine refused an operation for a reason the agent did not expect."""

    status = 502
    code = "engine_error"

    @property
    def engine_status(self) -> int | None:
        """The HTTP status the engine refused with (404, 409, ...); None when it didn't answer one."""
        status = getattr(self.__cause__, "status", None)
        return status if isinstance(status, int) else None


class TaskStillRunning(EngineError):
    """A Swarm task told to stop still runs on a node that is up: its port and GPU stay held."""


class EngineUnavailable(AgentError):
    """The Docker engine cannot be reached."""

    status = 503
    code = "engine_unavailable"


class CallerGone(AgentError):
    """Every caller of a deploy waiting for room left: it leaves the queue, nothing placed."""

    status = 503
    code = "caller_gone"


class QueueFull(AgentError):
    """--max-queue deploys already wait for room on this node."""

    status = 429
    code = "queue_full"


class StartingUp(AgentError):
    """The agent is starting (adopting what runs): it answers every request so until it serves."""

    status = 503
    code = "starting_up"


def may_have_happened(err: BaseException) -> bool:
    """Whether a create that raised `err` may still take effect: the engine didn't answer
    (or answered a server error), or the call was cancelled on its way. Only a refusal the
    engine answered (4xx) or the agent raised before sending says it did not happen."""
    if isinstance(err, EngineError):
        status = err.engine_status
        return status is None or status >= 500
    return isinstance(err, EngineUnavailable) or not isinstance(err, AgentError)


class NoGpu(AgentError):
    """The request needs a GPU and this node has none."""

    status = 503
    code = "no_gpu"


class NoGpuCapacity(AgentError):
    """No GPU has enough free VRAM for the request. It says when to try again (room comes
    back as leases end), unless `retry_after_s` is None: the deploy can never fit here."""

    status = 503
    code = "no_gpu_capacity"

    def __init__(self, message: str, retry_after_s: int | None = NO_ROOM_RETRY_AFTER_S,
                 **extra: Any) -> None:
        if retry_after_s is not None:
            extra["retry_after_s"] = retry_after_s
        super().__init__(message, **extra)


class NoPortAvailable(AgentError):
    """Every host port in the configured range is taken."""

    status = 503
    code = "no_port_available"


class HealthTimeout(AgentError):
    """The service did not answer its health check within ready_timeout."""

    status = 504
    code = "health_timeout"


class PullStalled(AgentError):
    """The pull made no progress for --pull-stall-timeout while the engine still answered."""

    status = 504
    code = "pull_stalled"


class SwarmTaken(Exception):
    """Another agent already serves this swarm, or runs with this agent's state dir: this
    one must not start (not an HTTP answer: the process exits saying so)."""


class PortTaken(Exception):
    """Internal: the engine says the host port is already allocated; try the next one."""
