"""The client's exceptions: one per agent error class, and the ways a call fails on the way."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from deploy_agent import errors


class PlainHttpToken(UserWarning):
    """The bearer token is sent to a node beyond loopback without TLS."""


class AgentRequestError(Exception):
    """The agent answered with an error (or could not be reached: status 0)."""

    def __init__(self, status: int, code: str, message: str, body: Mapping[str, Any] | None = None,
                 node: str | None = None) -> None:
        super().__init__(f"{message} ({code}, {status})" if status else message)
        self.status, self.code, self.message = status, code, message
        self.body = dict(body or {})
        self.node = node


class InvalidRequestError(AgentRequestError):
    """400: the request is malformed; `body["details"]` lists each bad field."""


class AuthError(AgentRequestError):
    """401: missing or wrong token. The message says which, and where the token comes from."""


class PolicyError(AgentRequestError):
    """403: a mount or image the node refuses."""


class ServiceNotFoundError(AgentRequestError):
    """404: no such service on that node."""


class LeaseNotFoundError(ServiceNotFoundError):
    """404 lease_not_found: that lease is not held on that service (lapsed or released)."""


class ConflictError(AgentRequestError):
    """409: deployed with a different spec (`body["differing_fields"]`)."""


class ImageError(AgentRequestError):
    """422: image not found or not pullable."""


class StartError(AgentRequestError):
    """502: the container exited before becoming healthy (`body["exit_code"]`, `body["logs"]`)."""


class CapacityError(AgentRequestError):
    """503: no GPU, no GPU room, no port, no Docker engine, or the agent is starting; 429
    queue_full: too many deploys wait for room there already."""


class HealthTimeoutError(AgentRequestError):
    """504: not healthy within ready_timeout (`body["logs"]`)."""


class TooManyStreamsError(AgentRequestError):
    """429: the node already serves its --max-streams follows."""


class PullStalledError(AgentRequestError):
    """504 pull_stalled: the image pull made no progress while the engine still answered."""


class NodeUnreachable(AgentRequestError):
    """The node could not be reached. `connected`: whether the request got to it (then it
    went quiet or dropped the connection) or never did; `refused`: the connection was
    refused or had nowhere to go (no agent listens there now, no route, no such host)."""

    def __init__(self, status: int, code: str, message: str, body: Mapping[str, Any] | None = None,
                 node: str | None = None, connected: bool = False, refused: bool = False) -> None:
        super().__init__(status, code, message, body, node)
        self.connected, self.refused = connected, refused


class NodeUncertain(AgentRequestError):
    """A node that may run the service did not say whether it does (it is starting, or slow
    past the wait): nothing is placed elsewhere, so that no second copy starts."""


class BadAnswer(AgentRequestError):
    """The node answered, but not as a deploy-agent does: no JSON where JSON was due (another
    program on that port, a proxy's error page)."""


class DeployInterrupted(AgentRequestError):
    """The deploy reached the node, then its answer stalled or the connection dropped.

    It may still finish there: look on `node` (it is never placed on another node for you).
    `lease_id`: the lease asked for, when the deploy carried one.
    """


class LeaseLost(AgentRequestError):
    """A lease that `leased()` held has ended without the holder letting go.

    `reason`: why, from the node's event log when it says (`request`: an operator stopped
    the service; `vram_overuse`; `idle_expired`; an eviction's; `lease_expired`: no
    renewal reached the node in time), else what the client saw (`lease_not_found`,
    `unreachable`: no renewal got through for twice the lease, `renew_failed`). `event`:
    that log entry, when there is one.
    The service is never brought back unless the holder asked for retakes.
    """

    def __init__(self, message: str, node: str | None, reason: str,
                 event: Mapping[str, Any] | None = None) -> None:
        super().__init__(0, "lease_lost", message, {"reason": reason, "event": event}, node)
        self.reason = reason
        self.event = dict(event) if event is not None else None


ERRORS_BY_STATUS: dict[int, type[AgentRequestError]] = {
    400: InvalidRequestError, 401: AuthError, 403: PolicyError, 404: ServiceNotFoundError,
    409: ConflictError, 413: InvalidRequestError, 422: ImageError, 429: TooManyStreamsError,
    502: StartError, 503: CapacityError, 504: HealthTimeoutError,
}
ERRORS_BY_CODE: dict[str, type[AgentRequestError]] = {"pull_stalled": PullStalledError,
                                                      "lease_not_found": LeaseNotFoundError,
                                                      "queue_full": CapacityError,
                                                      "registry_denied": ImageError}


def _status_by_code() -> dict[str, int]:
    """The agent's error codes and their HTTP statuses, from its own exception tree."""
    found, pending = {}, list(errors.AgentError.__subclasses__())
    while pending:
        kind = pending.pop()
        found[kind.code] = kind.status
        pending.extend(kind.__subclasses__())
    return found


# For streamed answers, where the HTTP status was 200 before the error was known.
STATUS_BY_CODE = _status_by_code()


def error_from(status: int, body: Any, node: str | None = None) -> AgentRequestError:
    if not isinstance(body, Mapping):
        body = {"error": "http_error", "message": str(body)}
    kind = ERRORS_BY_CODE.get(str(body.get("error")), ERRORS_BY_STATUS.get(status, AgentRequestError))
    return kind(status, str(body.get("error", "error")), str(body.get("message", "")), body, node)


def refused_token(node: str, sent: bool, body: Mapping[str, Any]) -> AuthError:
    """A 401, saying whether a token went and where the right one comes from."""
    if sent:
        told = (f"{node} refused the token (401): it is not this node's. Use the one in the "
                "agent's token file (<state dir>/token, /var/lib/deploy-agent/token as root)")
    else:
        told = (f"{node} wants a token (401) and none was sent. Set DEPLOY_AGENT_TOKEN_FILE (or "
                "DEPLOY_AGENT_TOKEN) to the agent's token file, <state dir>/token")
    return AuthError(401, str(body.get("error", "unauthorized")),
                     f"{told}; deployctl also takes --token-file.", body, node)


def bad_answer(url: str, status: int) -> BadAnswer:
    return BadAnswer(status, "bad_answer", f"{url} answered {status or 'a stream'} with something "
                     "that is not a deploy-agent's JSON; is the URL right?", node=url)


def said(err: BaseException, token: str | None) -> str:
    """What went wrong, for a message: the error's type and text, never its repr (aiohttp's
    carries the request's headers, the token among them), and never the token itself."""
    text = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
    return text.replace(token, "***") if token else text


def interrupted(url: str, err: BaseException, token: str | None,
                lease_id: str | None = None, what: str = "deploy") -> DeployInterrupted:
    return DeployInterrupted(0, "interrupted", f"{url} stopped answering during the {what} "
                             f"({said(err, token)}); it may still finish there.",
                             {"lease_id": lease_id} if lease_id else None, node=url)
