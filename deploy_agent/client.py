"""Python client for deploy-agent: one node (AgentClient) or several (ComputeNodes).

For plain scripts::

    from deploy_agent.client import AgentClient, ComputeNodes
    with AgentClient("http://10.0.0.5:9000") as agent:
        answer = agent.deploy("services/yolo/service.yaml")
    placed = ComputeNodes.from_env().ensure("services/yolo/service.yaml")
    print(placed["node"], placed["host"])

For asyncio code, AsyncAgentClient and AsyncComputeNodes have the same methods, awaited.
Failures raise AgentRequestError subclasses carrying the agent's code, status and message.
The token comes from `token`, `token_file`, DEPLOY_AGENT_TOKEN or DEPLOY_AGENT_TOKEN_FILE, and
is sent to every node; with none of them, a loopback URL gets the local agent's token from
its state dir (never another host).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import threading
import urllib.parse
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import aiohttp
import yaml

from deploy_agent import errors
from deploy_agent.models import LIVE_STATUSES
from deploy_agent.tokens import is_loopback, token_for

T = TypeVar("T")
Manifest = Mapping[str, Any] | str | Path
DEFAULT_NODE = "http://127.0.0.1:9000"
NDJSON = "application/x-ndjson"


# -- errors ---------------------------------------------------------------------------------


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
    """401: missing or wrong token."""


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
    """503: no GPU, no GPU room, no port, or no Docker engine."""


class HealthTimeoutError(AgentRequestError):
    """504: not healthy within ready_timeout (`body["logs"]`)."""


class TooManyStreamsError(AgentRequestError):
    """429: the node already serves its --max-streams follows."""


class PullStalledError(AgentRequestError):
    """504 pull_stalled: the image pull made no progress while the engine still answered."""


class NodeUnreachable(AgentRequestError):
    """The node could not be reached: the request never got to it."""


class BadAnswer(AgentRequestError):
    """The node answered, but not as a deploy-agent does: no JSON where JSON was due (another
    program on that port, a proxy's error page)."""


def _bad_answer(url: str, status: int) -> BadAnswer:
    return BadAnswer(status, "bad_answer", f"{url} answered {status or 'a stream'} with something "
                     "that is not a deploy-agent's JSON; is the URL right?", node=url)


class DeployInterrupted(AgentRequestError):
    """The deploy reached the node, then its answer stalled or the connection dropped.

    It may still finish there: look on `node` (it is never placed on another node for you).
    """


ERRORS_BY_STATUS: dict[int, type[AgentRequestError]] = {
    400: InvalidRequestError, 401: AuthError, 403: PolicyError, 404: ServiceNotFoundError,
    409: ConflictError, 413: InvalidRequestError, 422: ImageError, 429: TooManyStreamsError,
    502: StartError, 503: CapacityError, 504: HealthTimeoutError,
}
ERRORS_BY_CODE: dict[str, type[AgentRequestError]] = {"pull_stalled": PullStalledError,
                                                      "lease_not_found": LeaseNotFoundError}
# Statuses of a service that is placed (or, in front of a swarm, being placed again): ensure()
# never puts a second one elsewhere.
LIVE = (*LIVE_STATUSES, "rescheduling", "pending")


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


# -- manifests ------------------------------------------------------------------------------


def load_manifest(manifest: Manifest) -> dict[str, Any]:
    """A deploy body from a dict (flat or nested), a service.yaml path, or '-' for stdin YAML."""
    if isinstance(manifest, Mapping):
        return dict(manifest)
    text = sys.stdin.read() if str(manifest) == "-" else Path(manifest).read_text()
    loaded = yaml.safe_load(text)
    if not isinstance(loaded, dict):
        raise ValueError(f"{manifest} does not hold a YAML mapping")
    return loaded


def requirements(body: Mapping[str, Any]) -> tuple[bool, float]:
    """(gpu, vram_gb) of a flat or nested body, as the agent will read them."""
    nested = body.get("requires")
    source = nested if isinstance(nested, Mapping) else body
    return bool(source.get("gpu", False)), float(source.get("vram_gb", 0) or 0)


# -- one node -------------------------------------------------------------------------------


class AsyncAgentClient:
    """One agent, from asyncio code. Use `async with`, or call close().

    `timeout` bounds each plain request. A deploy has no wall-clock bound (a pull and a
    slow model load may take long): it follows the NDJSON progress and gives up only when
    the node says nothing for `stall_timeout` seconds, longer than any silence the agent
    allows itself (--pull-stall-timeout, 120 s by default).
    """

    def __init__(self, url: str = DEFAULT_NODE, token: str | None = None, timeout: float = 300.0,
                 session: aiohttp.ClientSession | None = None, stall_timeout: float = 150.0,
                 token_file: str | Path | None = None, trusted: bool = True) -> None:
        """`trusted`: whether the node may get the caller's token. A node nobody listed (one
        found over mDNS, which any host on the LAN can advertise) gets at most the local
        agent's own token, when it is on loopback."""
        self.url = url.rstrip("/")
        if trusted:
            token = token_for(self.url, token, token_file, os.environ)
        else:
            token = token_for(self.url, None, None, {k: v for k, v in os.environ.items()
                                                     if not k.startswith("DEPLOY_AGENT_TOKEN")})
        self._token = token
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        parts = urllib.parse.urlsplit(self.url)
        if token and parts.scheme == "http" and not is_loopback(parts.hostname or ""):
            warnings.warn(f"The agent token goes to {parts.hostname} over plain HTTP, readable on the "
                          "network: put TLS in front of the agent (README, Security).",
                          PlainHttpToken, stacklevel=2)
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._stall_timeout = stall_timeout
        self._session = session
        self._owns_session = session is None

    async def __aenter__(self) -> AsyncAgentClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None and self._owns_session:
            await self._session.close()
            self._session = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession()
            self._owns_session = True
        return self._session

    async def _request(self, method: str, path: str, body: Any = None) -> Any:
        try:
            async with self._client().request(method, self.url + path, json=body,
                                              headers=self._headers, timeout=self._timeout) as response:
                text = await response.text()
                content_type = response.content_type
                status = response.status
        except (TimeoutError, aiohttp.ClientError, OSError) as err:
            raise NodeUnreachable(0, "unreachable", f"{self.url} did not answer: {said(err, self._token)}",
                                  node=self.url) from err
        try:
            payload = json.loads(text) if content_type == "application/json" and text else text
        except ValueError:
            raise _bad_answer(self.url, status) from None
        if status >= 400:
            raise error_from(status, payload, self.url)
        return payload

    async def health(self) -> dict[str, Any]:
        result: dict[str, Any] = await self._request("GET", "/health")
        return result

    async def services(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = await self._request("GET", "/services")
        return result

    async def service(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._request("GET", f"/services/{name}")
        return result

    async def gpus(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = await self._request("GET", "/gpus")
        return result

    async def deploy(self, manifest: Manifest, replace: bool = False, lease_s: float | None = None,
                     lease_id: str | None = None) -> dict[str, Any]:
        """Deploy and wait until healthy; the answer has host, port, gpu, already_running,
        and with `lease_s` the caller's `lease_id` (or renews `lease_id`).

        DeployInterrupted when the node goes quiet for stall_timeout or the connection drops
        after the request reached it (the deploy may still finish there).
        """
        answer: dict[str, Any] | None = None
        async for event in self.deploy_events(manifest, replace, lease_s, lease_id):
            answer = event
        if answer is None or "event" in answer:
            raise DeployInterrupted(0, "interrupted", f"{self.url} closed the deploy stream "
                                    "without an answer.", node=self.url)
        return answer

    async def stop(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._request("POST", "/stop", {"name": name})
        return result

    async def dry_run(self, manifest: Manifest, replace: bool = False) -> dict[str, Any]:
        """Where a deploy would go now (port, gpu, pull_needed), deploying and reserving
        nothing; the same errors a deploy would raise."""
        result: dict[str, Any] = await self._request("POST", "/deploy?dry_run=1",
                                                     _deploy_body(manifest, replace))
        return result

    async def renew(self, name: str, lease_id: str, lease_s: float | None = None) -> dict[str, Any]:
        """Extend a lease to lease_s from now (its own lease_s when not given)."""
        body: dict[str, Any] = {"lease_id": lease_id}
        if lease_s is not None:
            body["lease_s"] = lease_s
        result: dict[str, Any] = await self._request("POST", f"/services/{name}/renew", body)
        return result

    async def release(self, name: str, lease_id: str) -> dict[str, Any]:
        """Drop a lease; `stopped` says whether it was the service's last one."""
        result: dict[str, Any] = await self._request("DELETE", f"/services/{name}/leases/{lease_id}")
        return result

    @contextlib.asynccontextmanager
    async def leased(self, manifest: Manifest, lease_s: float = 60.0) -> AsyncIterator[dict[str, Any]]:
        """Deploy with a lease, renew it in the background, release it on exit (also on an
        exception). The service runs while you hold it; it stops when no one holds it."""
        holder = _Holder(await self.deploy(manifest, lease_s=lease_s), lease_s)
        renewing = asyncio.create_task(self._keep_renewed(manifest, holder))
        try:
            yield holder.answer
        finally:
            renewing.cancel()
            await asyncio.gather(renewing, return_exceptions=True)
            with contextlib.suppress(AgentRequestError):
                await self.release(holder.name, holder.lease_id)

    async def _keep_renewed(self, manifest: Manifest, holder: _Holder) -> None:
        while True:
            await asyncio.sleep(holder.interval)
            await self._renew_or_retake(manifest, holder)

    async def _renew_or_retake(self, manifest: Manifest, holder: _Holder) -> None:
        try:
            await self.renew(holder.name, holder.lease_id, holder.lease_s)
        except LeaseNotFoundError:  # lapsed (a long pause, a lost state file): take a new one
            holder.answer = await self.deploy(manifest, lease_s=holder.lease_s)
        except AgentRequestError:
            pass  # the node is busy or away for a moment: try again next time

    async def events(self, since: int | None = None, limit: int | None = None) -> list[dict[str, Any]]:
        """Recent events, oldest first: after `since` when given, else the latest `limit`."""
        query = "&".join(f"{key}={value}" for key, value in (("since", since), ("limit", limit))
                         if value is not None)
        result: list[dict[str, Any]] = await self._request("GET", "/events" + (f"?{query}" if query else ""))
        return result

    async def follow_events(self, since: int | None = None) -> AsyncIterator[dict[str, Any]]:
        """Events as they happen (after `since`, else from now), until you stop reading."""
        query = f"&since={since}" if since is not None else "&limit=0"
        async with self._stream("GET", f"/events?follow=1{query}") as response:
            async for line in response.content:
                if line.strip():
                    yield json.loads(line)

    async def logs(self, name: str, tail: int = 100) -> str:
        result: str = await self._request("GET", f"/services/{name}/logs?tail={tail}")
        return result

    async def follow_logs(self, name: str, tail: int = 100) -> AsyncIterator[str]:
        """The service's output as it is written, until the service stops or you stop reading."""
        async with self._stream("GET", f"/services/{name}/logs?tail={tail}&follow=1") as response:
            async for chunk in response.content.iter_any():
                yield chunk.decode(errors="replace")

    async def deploy_events(self, manifest: Manifest, replace: bool = False, lease_s: float | None = None,
                            lease_id: str | None = None) -> AsyncIterator[dict[str, Any]]:
        """Progress events of a deploy (pull, created, started, health); the last is the answer.

        An error answer as the last event raises its AgentRequestError after being yielded;
        silence for stall_timeout, or a dropped connection, raises DeployInterrupted.
        """
        async with self._stream("POST", "/deploy", _deploy_body(manifest, replace, lease_s, lease_id),
                                accept=NDJSON, stall_timeout=self._stall_timeout) as response:
            try:
                async for line in response.content:
                    if not line.strip():
                        continue
                    try:
                        event: dict[str, Any] = json.loads(line)
                    except ValueError:
                        raise _bad_answer(self.url, 0) from None
                    yield event
                    if event.get("ok") is False:
                        code = str(event.get("error", "error"))
                        raise error_from(STATUS_BY_CODE.get(code, 500), event, self.url)
            except (TimeoutError, aiohttp.ClientError, OSError) as err:
                raise _interrupted(self.url, err, self._token) from err

    def _stream(self, method: str, path: str, body: Any = None, accept: str | None = None,
                stall_timeout: float | None = None) -> _StreamContext:
        headers = {**self._headers, **({"Accept": accept} if accept else {})}
        return _StreamContext(self, method, path, body, headers, stall_timeout)


def _interrupted(url: str, err: BaseException, token: str | None) -> DeployInterrupted:
    return DeployInterrupted(0, "interrupted", f"{url} stopped answering during the deploy "
                             f"({said(err, token)}); it may still finish there.", node=url)


def said(err: BaseException, token: str | None) -> str:
    """What went wrong, for a message: the error's type and text, never its repr (aiohttp's
    carries the request's headers, the token among them), and never the token itself."""
    text = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
    return text.replace(token, "***") if token else text


class _StreamContext:
    """`async with` a streamed response; errors before the stream starts raise as usual."""

    def __init__(self, client: AsyncAgentClient, method: str, path: str, body: Any,
                 headers: dict[str, str], stall_timeout: float | None) -> None:
        self._client, self._method, self._path = client, method, path
        self._body, self._headers = body, headers
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=stall_timeout)
        self._response: aiohttp.ClientResponse | None = None

    async def __aenter__(self) -> aiohttp.ClientResponse:
        client = self._client
        try:
            self._response = await client._client().request(
                self._method, client.url + self._path, json=self._body, headers=self._headers,
                timeout=self._timeout)
        except aiohttp.ClientConnectorError as err:  # it never got to the node
            raise NodeUnreachable(0, "unreachable",
                                  f"{client.url} did not answer: {said(err, client._token)}",
                                  node=client.url) from err
        except (TimeoutError, aiohttp.ClientError, OSError) as err:
            if self._method == "POST":
                raise _interrupted(client.url, err, client._token) from err
            raise NodeUnreachable(0, "unreachable",
                                  f"{client.url} did not answer: {said(err, client._token)}",
                                  node=client.url) from err
        if self._response.status >= 400:
            try:
                body = await self._response.json(content_type=None)
            except ValueError:
                raise _bad_answer(client.url, self._response.status) from None
            finally:
                self._response.release()
            raise error_from(self._response.status, body, client.url)
        return self._response

    async def __aexit__(self, *exc: object) -> None:
        if self._response is not None:
            self._response.release()


def _deploy_body(manifest: Manifest, replace: bool, lease_s: float | None = None,
                 lease_id: str | None = None) -> dict[str, Any]:
    body = load_manifest(manifest)
    if replace:
        body["replace"] = True
    if lease_s is not None:
        body["lease_s"] = lease_s
    if lease_id is not None:
        body["lease_id"] = lease_id
    return body


class _Holder:
    """A caller's lease as leased() keeps it: the answer it got, renewed every third of it."""

    def __init__(self, answer: dict[str, Any], lease_s: float) -> None:
        self.answer, self.lease_s = answer, lease_s
        self.interval = max(0.2, lease_s / 3)

    @property
    def name(self) -> str:
        return str(self.answer["name"])

    @property
    def lease_id(self) -> str:
        return str(self.answer["lease_id"])


class _SyncRunner:
    """Runs each call on a fresh event loop and then closes the sessions it opened, so a
    sync client holds nothing between calls and never leaves a session unclosed."""

    def __init__(self, close: Callable[[], Awaitable[None]]) -> None:
        self._close = close

    def run(self, awaitable: Awaitable[T]) -> T:
        async def call() -> T:
            try:
                return await awaitable
            finally:
                await self._close()

        return asyncio.run(call())

    def iterate(self, iterator: AsyncIterator[T]) -> Iterator[T]:
        async def step() -> T:
            return await anext(iterator)

        async def finish() -> None:
            try:
                await iterator.aclose()  # type: ignore[attr-defined]
            finally:
                await self._close()

        with asyncio.Runner() as runner:
            try:
                while True:
                    try:
                        yield runner.run(step())
                    except StopAsyncIteration:
                        return
            finally:
                runner.run(finish())


class AgentClient:
    """One agent, from synchronous code: the same methods as AsyncAgentClient, not awaited."""

    def __init__(self, url: str = DEFAULT_NODE, token: str | None = None, timeout: float = 300.0,
                 stall_timeout: float = 150.0, token_file: str | Path | None = None) -> None:
        self._async = AsyncAgentClient(url, token, timeout, stall_timeout=stall_timeout,
                                       token_file=token_file)
        self._runner = _SyncRunner(self._async.close)
        self.url = self._async.url

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Nothing stays open between calls; kept so `with` and close() read naturally."""

    def health(self) -> dict[str, Any]:
        return self._runner.run(self._async.health())

    def services(self) -> list[dict[str, Any]]:
        return self._runner.run(self._async.services())

    def service(self, name: str) -> dict[str, Any]:
        return self._runner.run(self._async.service(name))

    def gpus(self) -> list[dict[str, Any]]:
        return self._runner.run(self._async.gpus())

    def deploy(self, manifest: Manifest, replace: bool = False, lease_s: float | None = None,
               lease_id: str | None = None) -> dict[str, Any]:
        return self._runner.run(self._async.deploy(manifest, replace, lease_s, lease_id))

    def deploy_events(self, manifest: Manifest, replace: bool = False, lease_s: float | None = None,
                      lease_id: str | None = None) -> Iterator[dict[str, Any]]:
        return self._runner.iterate(self._async.deploy_events(manifest, replace, lease_s, lease_id))

    def stop(self, name: str) -> dict[str, Any]:
        return self._runner.run(self._async.stop(name))

    def dry_run(self, manifest: Manifest, replace: bool = False) -> dict[str, Any]:
        return self._runner.run(self._async.dry_run(manifest, replace))

    def renew(self, name: str, lease_id: str, lease_s: float | None = None) -> dict[str, Any]:
        return self._runner.run(self._async.renew(name, lease_id, lease_s))

    def release(self, name: str, lease_id: str) -> dict[str, Any]:
        return self._runner.run(self._async.release(name, lease_id))

    def events(self, since: int | None = None, limit: int | None = None) -> list[dict[str, Any]]:
        return self._runner.run(self._async.events(since, limit))

    def follow_events(self, since: int | None = None) -> Iterator[dict[str, Any]]:
        return self._runner.iterate(self._async.follow_events(since))

    @contextlib.contextmanager
    def leased(self, manifest: Manifest, lease_s: float = 60.0) -> Iterator[dict[str, Any]]:
        """Deploy with a lease, renewed from a thread of its own (with its own event loop and
        session) while the block runs, released on exit, also on an exception."""
        holder = _Holder(self.deploy(manifest, lease_s=lease_s), lease_s)
        done = threading.Event()

        def renew_until_done() -> None:
            mine = self._async
            agent = AsyncAgentClient(self.url, mine._token, mine._timeout.total or 300.0,
                                     stall_timeout=mine._stall_timeout)
            runner = _SyncRunner(agent.close)
            while not done.wait(holder.interval):
                runner.run(agent._renew_or_retake(manifest, holder))

        renewer = threading.Thread(target=renew_until_done, name=f"lease {holder.name}", daemon=True)
        renewer.start()
        try:
            yield holder.answer
        finally:
            done.set()
            renewer.join()
            with contextlib.suppress(AgentRequestError):
                self.release(holder.name, holder.lease_id)

    def logs(self, name: str, tail: int = 100) -> str:
        return self._runner.run(self._async.logs(name, tail))

    def follow_logs(self, name: str, tail: int = 100) -> Iterator[str]:
        return self._runner.iterate(self._async.follow_logs(name, tail))


# -- several nodes --------------------------------------------------------------------------


def nodes_from_env(environ: Mapping[str, str] | None = None) -> list[str]:
    """COMPUTE_NODES=http://a:9000,http://b:9000 (the spec's discovery option 1)."""
    environ = os.environ if environ is None else environ
    return [url.strip().rstrip("/") for url in environ.get("COMPUTE_NODES", "").split(",") if url.strip()]


async def discover_nodes(timeout_s: float = 2.0) -> list[str]:
    """Agents advertising `_tidybot-compute._tcp` over mDNS; [] without zeroconf installed."""
    from deploy_agent.mdns import discover  # imports zeroconf only when called

    try:
        return await discover(timeout_s)
    except ImportError:
        return []


def already_running_answer(found: Mapping[str, Any]) -> dict[str, Any]:
    """What a deploy answers for a service `find()` found running, plus its node."""
    return {"ok": True, "name": found["name"], "host": found["host"], "port": found["port"],
            "gpu": found["gpu"], "status": found["status"], "already_running": True,
            "node": found["node"]}


class AsyncComputeNodes:
    """Several agents: find a service, or deploy it where it fits best. Dead nodes are skipped."""

    def __init__(self, urls: list[str], token: str | None = None, probe_timeout: float = 2.0,
                 stall_timeout: float = 150.0, token_file: str | Path | None = None,
                 discovered: bool = False) -> None:
        """`discovered`: the urls came from mDNS, not from the operator; their nodes get no
        token unless DEPLOY_AGENT_TRUST_MDNS=1 says the LAN is trusted."""
        if not urls:
            raise ValueError("no compute nodes: set COMPUTE_NODES=http://host:9000,... "
                             "or run the agents with --mdns")
        trusted = not discovered or os.environ.get("DEPLOY_AGENT_TRUST_MDNS") == "1"
        self._clients = [AsyncAgentClient(url, token, stall_timeout=stall_timeout,
                                          token_file=token_file, trusted=trusted) for url in urls]
        self._probe_timeout = probe_timeout

    @classmethod
    def from_env(cls, token: str | None = None) -> AsyncComputeNodes:
        """COMPUTE_NODES; use `await discover()` where nodes advertise over mDNS instead."""
        return cls(nodes_from_env(), token)

    @classmethod
    async def discover(cls, token: str | None = None, timeout_s: float = 2.0) -> AsyncComputeNodes:
        """COMPUTE_NODES when set, else the agents advertising over mDNS (--mdns), which get
        no token unless DEPLOY_AGENT_TRUST_MDNS=1."""
        listed = nodes_from_env()
        if listed:
            return cls(listed, token)
        return cls(await discover_nodes(timeout_s), token, discovered=True)

    @property
    def urls(self) -> list[str]:
        return [client.url for client in self._clients]

    @property
    def clients(self) -> list[AsyncAgentClient]:
        return list(self._clients)

    async def __aenter__(self) -> AsyncComputeNodes:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await asyncio.gather(*(client.close() for client in self._clients))

    async def _ask_all(self, ask: Callable[[AsyncAgentClient], Awaitable[T]]) -> list[T | None]:
        """Ask every node at once; None for nodes that don't answer in time.

        NodeUnreachable when not one of them answered.
        """
        async def one(client: AsyncAgentClient) -> T | None:
            try:
                return await asyncio.wait_for(ask(client), self._probe_timeout)
            except (TimeoutError, AgentRequestError):
                return None
        answers = list(await asyncio.gather(*(one(client) for client in self._clients)))
        if all(answer is None for answer in answers):
            raise NodeUnreachable(0, "unreachable", f"No node answered ({', '.join(self.urls)}).")
        return answers

    async def events(self, limit: int = 50) -> list[dict[str, Any]]:
        """The latest `limit` events of all nodes together, oldest first, each with its `node`.
        Nodes that don't answer in time are left out; NodeUnreachable when none answers."""
        async def of(client: AsyncAgentClient) -> list[dict[str, Any]]:
            return [{**event, "node": client.url} for event in await client.events(limit=limit)]
        answers = await self._ask_all(of)
        return sorted((e for events in answers if events for e in events), key=lambda e: e["time"])[-limit:]

    async def status(self) -> list[dict[str, Any]]:
        """Each node's health, services and GPUs (`reachable: false` for dead ones)."""
        async def describe(client: AsyncAgentClient) -> dict[str, Any]:
            health, services, gpus = await asyncio.gather(client.health(), client.services(), client.gpus())
            return {"node": client.url, "reachable": True, "health": health, "services": services,
                    "gpus": gpus}
        try:
            answers = await self._ask_all(describe)
        except NodeUnreachable:
            answers = [None] * len(self._clients)
        return [answer or {"node": client.url, "reachable": False}
                for client, answer in zip(self._clients, answers, strict=True)]

    async def locate(self, name: str, statuses: tuple[str, ...] = LIVE
                     ) -> tuple[AsyncAgentClient, dict[str, Any]] | None:
        """The node that has `name` in one of `statuses` (any, when empty), and its entry."""
        for client, listing in zip(self._clients, await self._ask_all(lambda c: c.services()), strict=True):
            for entry in listing or []:
                if entry["name"] == name and (not statuses or entry["status"] in statuses):
                    return client, entry
        return None

    async def find(self, name: str) -> dict[str, Any] | None:
        """Where `name` runs healthy: its /services entry plus `node`; None if nowhere."""
        located = await self.locate(name, statuses=("healthy",))
        return {**located[1], "node": located[0].url} if located else None

    async def ensure(self, manifest: Manifest, replace: bool = False,
                     lease_s: float | None = None) -> dict[str, Any]:
        """A deploy on the node that has the service, else on the best node.

        A node that has it in any live status (starting, healthy, unhealthy) is the only
        place it is deployed: one service is never placed on two nodes. The deploy is always
        sent (instant, `already_running`, when the spec matches), so a changed spec gets the
        agent's ConflictError with `differing_fields`, or with `replace` a new one. Elsewhere, best
        is, for GPU services, the node whose GPU has the most free VRAM that fits; for the
        rest, the node running the fewest services. The answer includes `node`. With
        `lease_s` the caller takes a lease on it wherever it runs (`lease_id` in the answer).
        """
        body = load_manifest(manifest)
        name = str(body.get("name", ""))
        located = await self.locate(name)
        if located is not None:
            return await self._deploy_on(located[0], name, body, replace, lease_s)
        last_error: AgentRequestError | None = None
        for client in await self.candidates(body):
            try:
                return await self._deploy_on(client, name, body, replace, lease_s)
            except (CapacityError, NodeUnreachable) as err:
                last_error = err  # refused, or never reached: nothing placed there, try the next
        if last_error is not None:
            raise last_error
        reason = "no GPU with enough free VRAM" if requirements(body)[0] else "none answered"
        raise CapacityError(503, "no_capacity", f"No reachable node can run {name!r}: {reason}.")

    async def _deploy_on(self, client: AsyncAgentClient, name: str, body: Mapping[str, Any],
                         replace: bool, lease_s: float | None = None) -> dict[str, Any]:
        """Deploy on this node. If its answer stalls, look again there, never elsewhere."""
        try:
            return {**await client.deploy(body, replace, lease_s), "node": client.url}
        except DeployInterrupted as err:
            try:
                entry = await client.service(name)
            except AgentRequestError:
                raise err from None
            if entry["status"] != "healthy":
                err.body["service"] = entry
                raise
            return {**already_running_answer({**entry, "node": client.url}), "already_running": False}

    async def candidates(self, body: Mapping[str, Any]) -> list[AsyncAgentClient]:
        """Reachable nodes that could run `body`, best first."""
        gpu, vram_gb = requirements(body)
        if gpu:
            scored = []
            for client, gpus in zip(self._clients, await self._ask_all(lambda c: c.gpus()), strict=True):
                best = max((g["vram_free_gb"] for g in gpus or []), default=-1.0)
                if best >= vram_gb:
                    scored.append((-best, client.url, client))
            return [client for _, _, client in sorted(scored, key=lambda item: item[:2])]
        counted = [(len(services), client.url, client)
                   for client, services in zip(self._clients, await self._ask_all(lambda c: c.services()),
                                               strict=True)
                   if services is not None]
        return [client for _, _, client in sorted(counted, key=lambda item: item[:2])]


class ComputeNodes:
    """Several agents from synchronous code: find, ensure, status."""

    def __init__(self, urls: list[str], token: str | None = None, probe_timeout: float = 2.0,
                 stall_timeout: float = 150.0, token_file: str | Path | None = None,
                 discovered: bool = False) -> None:
        self._async = AsyncComputeNodes(urls, token, probe_timeout, stall_timeout, token_file,
                                        discovered)
        self._runner = _SyncRunner(self._async.close)

    @classmethod
    def from_env(cls, token: str | None = None, timeout_s: float = 2.0) -> ComputeNodes:
        """COMPUTE_NODES when set, else the agents advertising over mDNS (--mdns), which get
        no token unless DEPLOY_AGENT_TRUST_MDNS=1."""
        listed = nodes_from_env()
        if listed:
            return cls(listed, token)
        return cls(asyncio.run(discover_nodes(timeout_s)), token, discovered=True)

    @property
    def urls(self) -> list[str]:
        return self._async.urls

    def __enter__(self) -> ComputeNodes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Nothing stays open between calls; kept so `with` and close() read naturally."""

    def status(self) -> list[dict[str, Any]]:
        return self._runner.run(self._async.status())

    def find(self, name: str) -> dict[str, Any] | None:
        return self._runner.run(self._async.find(name))

    def ensure(self, manifest: Manifest, replace: bool = False,
               lease_s: float | None = None) -> dict[str, Any]:
        return self._runner.run(self._async.ensure(manifest, replace, lease_s))
