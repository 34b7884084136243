"""AsyncAgentClient: one agent, from asyncio code."""

from __future__ import annotations

import contextlib
import json
import os
import urllib.parse
import warnings
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Unpack

import aiohttp

from deploy_agent.client.errors import (
    STATUS_BY_CODE,
    AgentRequestError,
    DeployInterrupted,
    NodeUnreachable,
    PlainHttpToken,
    ServiceNotFoundError,
    bad_answer,
    error_from,
    interrupted,
    refused_token,
    said,
)
from deploy_agent.client.lease import Lease, LeaseCallback, hold
from deploy_agent.client.manifests import Intent, Manifest, deploy_body
from deploy_agent.client.results import A, Event, Gpu, Service
from deploy_agent.tokens import is_loopback, token_for

DEFAULT_NODE = "http://127.0.0.1:9000"
NDJSON = "application/x-ndjson"
NEVER_CONNECTED = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)
# An event follow hears at least an empty line every 15 s: silence this long means the node
# is gone (it died without closing the connection).
FOLLOW_SILENCE_S = 45.0


def node_url(url: str) -> str:
    """`url` without a trailing slash; `host:port` (no scheme) taken as http://host:port.
    ValueError for what can't be an agent's URL."""
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = f"http://{url}"
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{url!r} is not an agent's URL: write it as http://HOST:PORT "
                         "(or https:// behind TLS)")
    try:
        parts.port  # noqa: B018 - raises for a port out of range
    except ValueError:
        raise ValueError(f"{url!r} has no valid port: write it as http://HOST:PORT") from None
    return url


class AsyncAgentClient:
    """One agent, from asyncio code. Use `async with`, or call close().

    `timeout` bounds each plain request (each method also takes its own `timeout`). A deploy
    has no wall-clock bound (a pull and a slow model load may take long): it follows the
    NDJSON progress and gives up only when the node says nothing for `stall_timeout`
    seconds, longer than any silence the agent allows itself (it says something at least
    every 5 s while it waits, and --pull-stall-timeout, 120 s by default, bounds a pull).
    """

    def __init__(self, url: str = DEFAULT_NODE, token: str | None = None, timeout: float = 300.0,
                 session: aiohttp.ClientSession | None = None, stall_timeout: float = 150.0,
                 token_file: str | Path | None = None, trusted: bool = True,
                 connect_timeout: float = 10.0) -> None:
        """`trusted`: whether the node may get a token. A node nobody listed (one found over
        mDNS, which any host on the LAN can advertise) gets none. `connect_timeout`: how
        long a connection may take before the call fails."""
        self.url = node_url(url)
        # A node nobody listed gets no token at all: not even the local agent's (an advert
        # may name 127.0.0.1, where another local user's program may listen).
        token = token_for(self.url, token, token_file, os.environ) if trusted else None
        self._token = token
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        parts = urllib.parse.urlsplit(self.url)
        if token and parts.scheme == "http" and not is_loopback(parts.hostname or ""):
            warnings.warn(f"The agent token goes to {parts.hostname} over plain HTTP, readable on the "
                          "network: put TLS in front of the agent (README, Security).",
                          PlainHttpToken, stacklevel=2)
        self.timeout = timeout
        self.stall_timeout = stall_timeout
        self.connect_timeout = connect_timeout
        self._session = session
        self._owns_session = session is None

    @property
    def token(self) -> str | None:
        """The token this node gets (None: none), for masking in messages; never print it."""
        return self._token

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

    def unreachable(self, err: BaseException) -> NodeUnreachable:
        """The error for a call that got no answer: never connected, or went quiet."""
        connected = not isinstance(err, NEVER_CONNECTED)
        what = "did not answer" if connected else "could not be reached"
        return NodeUnreachable(0, "unreachable", f"{self.url} {what}: {said(err, self._token)}",
                               node=self.url, connected=connected,
                               refused=isinstance(err, aiohttp.ClientConnectorError))

    def failed(self, err: BaseException) -> AgentRequestError:
        """A call that got no usable answer: something that speaks no HTTP (BadAnswer), or
        no answer at all (NodeUnreachable)."""
        if isinstance(err, aiohttp.ClientResponseError | UnicodeDecodeError | LookupError):
            return bad_answer(self.url, 0)
        return self.unreachable(err)

    def error(self, status: int, body: Any) -> AgentRequestError:
        """The typed error for an error answer; a 401 says whether a token went."""
        if status == 401 and isinstance(body, dict):
            return refused_token(self.url, bool(self._token), body)
        return error_from(status, body, self.url)

    async def _request(self, method: str, path: str, body: Any = None,
                       timeout: float | None = None, as_text: bool = False) -> Any:
        """The answer's JSON (its text, with `as_text`); BadAnswer for anything else."""
        limit = self.timeout if timeout is None else timeout
        failure: AgentRequestError | None = None
        try:
            async with self._client().request(
                    method, self.url + path, json=body, headers=self._headers,
                    timeout=aiohttp.ClientTimeout(total=limit, sock_connect=min(limit, self.connect_timeout))
            ) as response:
                text = await response.text()
                content_type = response.content_type
                status = response.status
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError, LookupError) as err:
            failure = self.failed(err)
        if failure is not None:  # raised here, outside the except: aiohttp's error (which
            raise failure        # carries the request's headers) is not even its context
        try:
            payload = json.loads(text) if content_type == "application/json" and text else text
        except ValueError:
            raise bad_answer(self.url, status) from None
        if status >= 400:
            raise self.error(status, payload)
        if not as_text and content_type != "application/json":
            raise bad_answer(self.url, status)
        return payload

    def _each(self, kind: type[A], payload: Any) -> list[A]:
        if not isinstance(payload, list) or not all(isinstance(entry, dict) for entry in payload):
            raise bad_answer(self.url, 200)
        return [kind.of(entry) for entry in payload]

    def _one(self, kind: type[A], payload: Any) -> A:
        if not isinstance(payload, dict):
            raise bad_answer(self.url, 200)
        return kind.of(payload)

    async def health(self, timeout: float | None = None) -> dict[str, Any]:
        result: dict[str, Any] = await self._request("GET", "/health", timeout=timeout)
        return result

    async def services(self, timeout: float | None = None) -> list[Service]:
        return self._each(Service, await self._request("GET", "/services", timeout=timeout))

    async def service(self, name: str, timeout: float | None = None) -> Service:
        return self._one(Service, await self._request("GET", f"/services/{_quoted(name)}", timeout=timeout))

    async def gpus(self, timeout: float | None = None) -> list[Gpu]:
        return self._each(Gpu, await self._request("GET", "/gpus", timeout=timeout))

    async def queue(self, timeout: float | None = None) -> list[dict[str, Any]]:
        """GPU deploys waiting for room here, first served first."""
        result: list[dict[str, Any]] = await self._request("GET", "/queue", timeout=timeout)
        return result

    async def deploy(self, manifest: Manifest, replace: bool = False, lease_s: float | None = None,
                     lease_id: str | None = None, **intent: Unpack[Intent]) -> dict[str, Any]:
        """Deploy and wait until healthy; the answer has host, port, gpu, already_running,
        and with `lease_s` the caller's `lease_id` (or renews `lease_id`). `intent`:
        `wait_s`, `priority`, `keep_warm_s` (see the README's Holds and queue).

        DeployInterrupted when the node goes quiet for stall_timeout or the connection drops
        after the request reached it (the deploy may still finish there; with `lease_s`, its
        `body["lease_id"]` is the lease the deploy will hold once done).
        """
        return await self._answer_of(self.deploy_events(manifest, replace, lease_s, lease_id, **intent),
                                     "deploy")

    async def stop(self, name: str, timeout: float | None = None) -> dict[str, Any]:
        result: dict[str, Any] = await self._request("POST", "/stop", {"name": name}, timeout)
        return result

    async def dry_run(self, manifest: Manifest, replace: bool = False,
                      timeout: float | None = None, **intent: Unpack[Intent]) -> dict[str, Any]:
        """Where a deploy would go now (port, gpu, pull_needed, the idle services it would
        evict, whether it would wait), deploying and reserving nothing; the same errors a
        deploy would raise."""
        result: dict[str, Any] = await self._request("POST", "/deploy?dry_run=1",
                                                     deploy_body(manifest, replace, intent=intent), timeout)
        return result

    async def renew(self, name: str, lease_id: str, lease_s: float | None = None,
                    timeout: float | None = None) -> dict[str, Any]:
        """Extend a lease to lease_s from now (its own lease_s when not given)."""
        body: dict[str, Any] = {"lease_id": lease_id}
        if lease_s is not None:
            body["lease_s"] = lease_s
        result: dict[str, Any] = await self._request("POST", f"/services/{_quoted(name)}/renew", body,
                                                     timeout)
        return result

    async def release(self, name: str, lease_id: str, timeout: float | None = None) -> dict[str, Any]:
        """Drop a lease; `stopped` says whether it was the service's last one."""
        result: dict[str, Any] = await self._request(
            "DELETE", f"/services/{_quoted(name)}/leases/{_quoted(lease_id)}", timeout=timeout)
        return result

    def leased(self, manifest: Manifest, lease_s: float = 60.0, *, retake: bool = False,
               on_lost: LeaseCallback | None = None, on_retake: LeaseCallback | None = None,
               **intent: Unpack[Intent]) -> contextlib.AbstractAsyncContextManager[Lease]:
        """Deploy with a lease and hold it while the block runs: renewed in the background,
        released on exit (an exception or a cancellation too).

        The Lease it yields is kept current: `host`, `port` and `lease_id` change if it is
        retaken; `lost` and `error` say when it has ended. A service stopped by someone (an
        operator, --vram-overuse stop, a replace) is never brought back: the lease ends,
        `on_lost(lease)` is called, and leaving the block raises LeaseLost with the reason
        from the node's event log. With `retake=True`, a lease the node no longer knows
        (it lapsed: a long pause, a lost state file) or one that ran out and stopped the
        service is taken again by deploying anew, and `on_retake(lease)` is called.
        """
        return hold(self, manifest, lease_s, retake=retake, on_lost=on_lost, on_retake=on_retake,
                    intent=intent)

    async def events(self, since: int | None = None, limit: int | None = None,
                     timeout: float | None = None) -> list[Event]:
        """Recent events, oldest first: after `since` when given, else the latest `limit`."""
        query = "&".join(f"{key}={value}" for key, value in (("since", since), ("limit", limit))
                         if value is not None)
        found = await self._request("GET", "/events" + (f"?{query}" if query else ""), timeout=timeout)
        return self._each(Event, found)

    async def follow_events(self, since: int | None = None) -> AsyncIterator[Event]:
        """Events as they happen (after `since`, else from now), until you stop reading.

        NodeUnreachable when the node can't be reached, or ends the stream (it is shutting
        down) or drops it."""
        query = f"&since={since}" if since is not None else "&limit=0"
        async with self._stream("GET", f"/events?follow=1{query}",
                                stall_timeout=FOLLOW_SILENCE_S) as response:
            async for line in self._lines(response):
                if line.strip():
                    try:
                        yield Event.of(json.loads(line))
                    except (ValueError, TypeError):
                        raise bad_answer(self.url, 0) from None
        raise NodeUnreachable(0, "stream_ended", f"{self.url} ended the event stream (shutting "
                              "down?)", node=self.url, connected=True)

    async def logs(self, name: str, tail: int = 100, timeout: float | None = None) -> str:
        result: str = await self._request("GET", f"/services/{_quoted(name)}/logs?tail={tail}",
                                          timeout=timeout, as_text=True)
        return result

    async def follow_logs(self, name: str, tail: int = 100) -> AsyncIterator[str]:
        """The service's output as it is written, until the service stops or you stop reading.
        NodeUnreachable when the node drops the stream, or ends it while the service still
        runs (the agent is stopping)."""
        async with self._stream("GET", f"/services/{_quoted(name)}/logs?tail={tail}&follow=1") as response:
            failure = None
            try:
                async for chunk in response.content.iter_any():
                    yield chunk.decode(errors="replace")
            except (TimeoutError, aiohttp.ClientError, OSError) as err:
                failure = self.unreachable(err)
            if failure is not None:
                raise failure
        try:
            entry = await self.service(name, timeout=5)
        except ServiceNotFoundError:
            return  # the service stopped: the end of its output
        except AgentRequestError as err:
            raise NodeUnreachable(0, "stream_ended", f"{self.url} ended the log stream of {name} "
                                  f"({err.message})", node=self.url, connected=True) from None
        if entry.status in ("starting", "healthy", "unhealthy"):
            raise NodeUnreachable(0, "stream_ended", f"{self.url} ended the log stream of {name}, "
                                  "which still runs", node=self.url, connected=True)

    async def _lines(self, response: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
        failure = None
        try:
            async for line in response.content:
                yield line
        except (TimeoutError, aiohttp.ClientError, OSError) as err:
            failure = self.unreachable(err)
        if failure is not None:
            raise failure

    async def deploy_events(self, manifest: Manifest, replace: bool = False, lease_s: float | None = None,
                            lease_id: str | None = None, **intent: Unpack[Intent]
                            ) -> AsyncIterator[dict[str, Any]]:
        """Progress events of a deploy (lease, waiting, pull, created, started, health); the
        last is the answer.

        An error answer as the last event raises its AgentRequestError after being yielded;
        silence for stall_timeout, or a dropped connection, raises DeployInterrupted.
        """
        body = deploy_body(manifest, replace, lease_s, lease_id, intent)
        async for event in self._progress("/deploy", body, "deploy", lease_id):
            yield event

    async def pull_events(self, image: str) -> AsyncIterator[dict[str, Any]]:
        """Progress events of a pull on the node (per layer: status, current, total); the last
        is the answer (image, digest, size_bytes), or raises its error like deploy_events."""
        async for event in self._progress("/images/pull", {"image": image}, "pull"):
            yield event

    async def pull(self, image: str, on_progress: Callable[[dict[str, Any]], None] | None = None
                   ) -> dict[str, Any]:
        """Pull `image` on the node now (its registry is asked even when the node has it), so
        a deploy of it later starts without pulling; `on_progress` hears each event."""
        return await self._answer_of(self.pull_events(image), "pull", on_progress)

    async def _answer_of(self, events: AsyncIterator[dict[str, Any]], what: str,
                         on_progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """A progress stream's last line, its answer; each event before it to `on_progress`."""
        answer: dict[str, Any] | None = None
        async for event in events:
            if "event" in event and on_progress is not None:
                on_progress(event)
            answer = event
        if answer is None or "event" in answer:
            raise DeployInterrupted(0, "interrupted", f"{self.url} closed the {what} stream "
                                    "without an answer.", node=self.url)
        return answer

    async def _progress(self, path: str, body: Any, what: str, lease_id: str | None = None
                        ) -> AsyncIterator[dict[str, Any]]:
        """A POST answered as NDJSON progress: each event, the last being the answer; an error
        answer raises after being yielded, silence or a dropped connection DeployInterrupted
        (with the lease the deploy announced, if any)."""
        held = lease_id
        async with self._stream("POST", path, body, accept=NDJSON,
                                stall_timeout=self.stall_timeout) as response:
            failure: AgentRequestError | None = None
            try:
                async for line in response.content:
                    if not line.strip():
                        continue
                    try:
                        event: dict[str, Any] = json.loads(line)
                    except ValueError:
                        raise bad_answer(self.url, 0) from None
                    if event.get("event") == "lease":
                        held = str(event.get("lease_id"))
                    yield event
                    if event.get("ok") is False:
                        code = str(event.get("error", "error"))
                        raise error_from(STATUS_BY_CODE.get(code, 500), event, self.url)
            except (TimeoutError, aiohttp.ClientError, OSError) as err:
                failure = interrupted(self.url, err, self._token, held, what)
            if failure is not None:
                raise failure

    def _stream(self, method: str, path: str, body: Any = None, accept: str | None = None,
                stall_timeout: float | None = None) -> _StreamContext:
        headers = {**self._headers, **({"Accept": accept} if accept else {})}
        return _StreamContext(self, method, path, body, headers, stall_timeout)


def _quoted(part: str) -> str:
    return urllib.parse.quote(part, safe="")


class _StreamContext:
    """`async with` a streamed response; errors before the stream starts raise as usual."""

    def __init__(self, client: AsyncAgentClient, method: str, path: str, body: Any,
                 headers: dict[str, str], stall_timeout: float | None) -> None:
        self._client, self._method, self._path = client, method, path
        self._body, self._headers = body, headers
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=client.connect_timeout,
                                              sock_read=stall_timeout)
        self._response: aiohttp.ClientResponse | None = None

    async def __aenter__(self) -> aiohttp.ClientResponse:
        client = self._client
        failure: AgentRequestError | None = None
        try:
            self._response = await client._client().request(
                self._method, client.url + self._path, json=self._body, headers=self._headers,
                timeout=self._timeout)
        except NEVER_CONNECTED as err:  # it never got to the node
            failure = client.unreachable(err)
        except (TimeoutError, aiohttp.ClientError, OSError) as err:
            failure = (interrupted(client.url, err, client._token) if self._method == "POST"
                       else client.failed(err))
        if failure is not None:  # outside the except: no aiohttp error as its context
            raise failure
        assert self._response is not None
        if self._response.status >= 400:
            try:
                body = await self._response.json(content_type=None)
            except (ValueError, aiohttp.ClientError):
                raise bad_answer(client.url, self._response.status) from None
            finally:
                self._response.release()
            raise client.error(self._response.status, body)
        return self._response

    async def __aexit__(self, *exc: object) -> None:
        if self._response is not None:
            self._response.release()

