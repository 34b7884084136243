"""AsyncComputeNodes: several agents, from asyncio code. Find a service, or place it once."""

from __future__ import annotations

import asyncio
import contextlib
import os
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar, Unpack

from deploy_agent.client.errors import (
    AgentRequestError,
    AuthError,
    BadAnswer,
    CapacityError,
    DeployInterrupted,
    NodeUncertain,
    NodeUnreachable,
    ServiceNotFoundError,
)
from deploy_agent.client.lease import Lease, LeaseCallback, deploy_holding, hold
from deploy_agent.client.manifests import Intent, Manifest, image_of, load_manifest, requirements
from deploy_agent.client.node import AsyncAgentClient, node_url
from deploy_agent.client.results import Event, Gpu, Service
from deploy_agent.models import LIVE_STATUSES
from deploy_agent.tokens import is_loopback

T = TypeVar("T")
# Statuses of a service that is placed (or, in front of a swarm, being placed again).
LIVE = (*LIVE_STATUSES, "restarting", "rescheduling", "pending")
RETRY_S = 0.5  # how often a node that is starting, slow or refusing is asked again


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


def already_running_answer(found: Service) -> dict[str, Any]:
    """What a deploy answers for a service found running, plus its node."""
    return {"ok": True, "name": found.name, "host": found.host, "port": found.port,
            "gpu": found.gpu, "status": found.status, "already_running": True, "node": found.node}


class AsyncComputeNodes:
    """Several agents: find a service, or deploy it where it fits best, once.

    A node that is starting (or stopping), slower than `probe_timeout`, or whose connection
    doesn't complete may run the service asked for: it is waited for up to
    `locate_timeout`, and if it still hasn't said, nothing is placed elsewhere
    (NodeUncertain). One that refuses connections for `down_after` (an agent between two
    runs refuses for a moment) counts as down, and is skipped. `timeout` bounds each plain
    request; `stall_timeout` a deploy's silence.
    """

    def __init__(self, urls: list[str], token: str | None = None, probe_timeout: float = 2.0,
                 stall_timeout: float = 150.0, token_file: str | Path | None = None,
                 discovered: bool = False, *, timeout: float = 300.0,
                 locate_timeout: float = 15.0, down_after: float = 3.0) -> None:
        """`discovered`: the urls came from mDNS, not from the operator; their nodes get no
        token unless DEPLOY_AGENT_TRUST_MDNS=1 says the LAN is trusted, and loopback ones
        (an advert can name any address) are dropped."""
        if discovered:
            urls = [url for url in urls
                    if not is_loopback(urllib.parse.urlsplit(node_url(url)).hostname or "")]
        if not urls:
            raise ValueError("no compute nodes: set COMPUTE_NODES=http://host:9000,... "
                             "or run the agents with --mdns")
        trusted = not discovered or os.environ.get("DEPLOY_AGENT_TRUST_MDNS") == "1"
        self._clients = [AsyncAgentClient(url, token, timeout, stall_timeout=stall_timeout,
                                          token_file=token_file, trusted=trusted,
                                          connect_timeout=probe_timeout) for url in urls]
        self.probe_timeout = probe_timeout
        self.locate_timeout = locate_timeout
        self.down_after = down_after

    @classmethod
    def from_env(cls, token: str | None = None, **knobs: Any) -> AsyncComputeNodes:
        """COMPUTE_NODES, with any of the constructor's other arguments; use `await
        discover()` where nodes advertise over mDNS instead."""
        return cls(nodes_from_env(), token, **knobs)

    @classmethod
    async def discover(cls, token: str | None = None, timeout_s: float = 2.0,
                       **knobs: Any) -> AsyncComputeNodes:
        """COMPUTE_NODES when set, else the agents advertising over mDNS (--mdns), which get
        no token unless DEPLOY_AGENT_TRUST_MDNS=1."""
        listed = nodes_from_env()
        if listed:
            return cls(listed, token, **knobs)
        return cls(await discover_nodes(timeout_s), token, discovered=True, **knobs)

    @property
    def urls(self) -> list[str]:
        return [client.url for client in self._clients]

    @property
    def clients(self) -> list[AsyncAgentClient]:
        return list(self._clients)

    def tokens(self) -> list[str]:
        """The tokens the nodes get, for masking them in what is shown (never to print)."""
        return [token for client in self._clients if (token := client.token) is not None]

    def client(self, url: str) -> AsyncAgentClient:
        """The client of the node at `url` (as in an answer's `node`)."""
        for client in self._clients:
            if client.url == url.rstrip("/"):
                return client
        raise ValueError(f"{url} is not one of {', '.join(self.urls)}")

    async def __aenter__(self) -> AsyncComputeNodes:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await asyncio.gather(*(client.close() for client in self._clients))

    async def ask_all(self, ask: Callable[[AsyncAgentClient], Awaitable[T]]) -> list[T | None]:
        """Ask every node at once; None for nodes that don't answer within probe_timeout.

        NodeUnreachable when not one answered (AuthError when one refused the token).
        """
        async def one(client: AsyncAgentClient) -> T | AgentRequestError:
            try:
                return await asyncio.wait_for(ask(client), self.probe_timeout)
            except TimeoutError as err:
                return client.unreachable(err)
            except AgentRequestError as err:
                return err
        answers = await asyncio.gather(*(one(client) for client in self._clients))
        if all(isinstance(answer, AgentRequestError) for answer in answers):
            refused = [a for a in answers if isinstance(a, AuthError)]
            if refused:
                raise refused[0]
            raise NodeUnreachable(0, "unreachable", f"No node answered ({', '.join(self.urls)}).")
        return [None if isinstance(answer, AgentRequestError) else answer for answer in answers]

    async def events(self, limit: int = 50) -> list[Event]:
        """The latest `limit` events of all nodes together, oldest first, each with its `node`.
        Nodes that don't answer in time are left out; NodeUnreachable when none answers."""
        async def of(client: AsyncAgentClient) -> list[Event]:
            return [Event.of(event.raw, node=client.url) for event in await client.events(limit=limit)]
        answers = await self.ask_all(of)
        return sorted((e for events in answers if events for e in events), key=lambda e: e.time)[-limit:]

    async def status(self) -> list[dict[str, Any]]:
        """Each node's health, services and GPUs (`reachable: false`, with `error`, for the
        ones that didn't answer; AuthError when none answered and one refused the token)."""
        async def describe(client: AsyncAgentClient) -> dict[str, Any]:
            try:
                health, services, gpus = await asyncio.wait_for(
                    asyncio.gather(client.health(), client.services(), client.gpus()), self.probe_timeout)
            except TimeoutError as err:
                raise client.unreachable(err) from None
            return {"node": client.url, "reachable": True, "health": health,
                    "services": [s.raw for s in services], "gpus": [g.raw for g in gpus]}

        async def one(client: AsyncAgentClient) -> dict[str, Any]:
            try:
                return await describe(client)
            except AgentRequestError as err:
                return {"node": client.url, "reachable": False, "error": err.message,
                        "refused_token": isinstance(err, AuthError)}
        found = list(await asyncio.gather(*(one(client) for client in self._clients)))
        refused = [s for s in found if s.get("refused_token")]
        if refused and not any(s["reachable"] for s in found):
            raise AuthError(401, "unauthorized", refused[0]["error"], node=refused[0]["node"])
        return found

    async def _listing(self, client: AsyncAgentClient, deadline: float) -> list[Service] | str | None:
        """A node's services; None when it is down (refusing for down_after) or not an
        agent; else, when it hasn't said by `deadline` (starting, slow, failing), why not."""
        loop = asyncio.get_running_loop()
        down_at = loop.time() + min(self.down_after, self.locate_timeout)
        while True:
            try:
                return await client.services(timeout=max(0.1, deadline - loop.time()))
            except AuthError:
                raise
            except NodeUnreachable as err:
                if err.refused and loop.time() >= down_at:
                    return None
                why = err.message
            except BadAnswer:
                return None
            except AgentRequestError as err:
                why = err.message or err.code
            if loop.time() + RETRY_S >= deadline:
                return why
            await asyncio.sleep(RETRY_S)

    async def locate(self, name: str, statuses: tuple[str, ...] = LIVE
                     ) -> tuple[AsyncAgentClient, Service] | None:
        """The node that has `name` in one of `statuses` (any, when empty), and its entry
        (with `node`), as soon as one says so; None when no node has it.

        NodeUncertain when none says it has it but one didn't say (starting, or slower than
        locate_timeout); NodeUnreachable when no node can be reached; AuthError when a node
        refused the token.
        """
        deadline = asyncio.get_running_loop().time() + self.locate_timeout
        asking = {asyncio.ensure_future(self._listing(c, deadline)): c for c in self._clients}
        unsure: list[str] = []
        down, pending = 0, set(asking)
        try:
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    client, listing = asking[task], task.result()  # AuthError raises here
                    if listing is None:
                        down += 1
                    elif isinstance(listing, str):
                        unsure.append(f"{client.url} ({listing})")
                    else:
                        for entry in listing:
                            if entry.name == name and (not statuses or entry.status in statuses):
                                return client, Service.of(entry.raw, node=client.url)
        finally:
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if unsure:
            raise NodeUncertain(0, "node_uncertain", f"Not sure where {name!r} runs: "
                                f"{'; '.join(unsure)} did not list its services within "
                                f"{self.locate_timeout:g} s and may have it, so nothing is placed "
                                "elsewhere. Try again in a moment.")
        if down == len(self._clients):
            raise NodeUnreachable(0, "unreachable", f"No node answered ({', '.join(self.urls)}).")
        return None

    async def find(self, name: str) -> Service | None:
        """Where `name` runs healthy: its /services entry, with `node`; None if nowhere."""
        located = await self.locate(name, statuses=("healthy",))
        return located[1] if located else None

    async def holder(self, name: str) -> AsyncAgentClient:
        """The node that has `name` in any status; ServiceNotFoundError when none has it."""
        located = await self.locate(name, statuses=())
        if located is None:
            raise ServiceNotFoundError(404, "not_found", f"No service named {name!r} on "
                                       f"{', '.join(self.urls)}.")
        return located[0]

    async def stop(self, name: str) -> dict[str, Any]:
        """Stop `name` on the node that has it (in any status); the answer has `node`."""
        client = await self.holder(name)
        return {**await client.stop(name), "node": client.url}

    async def renew(self, name: str, lease_id: str, lease_s: float | None = None) -> dict[str, Any]:
        client = await self.holder(name)
        return {**await client.renew(name, lease_id, lease_s), "node": client.url}

    async def release(self, name: str, lease_id: str) -> dict[str, Any]:
        client = await self.holder(name)
        return {**await client.release(name, lease_id), "node": client.url}

    async def logs(self, name: str, tail: int = 100) -> str:
        return await (await self.holder(name)).logs(name, tail)

    async def ensure(self, manifest: Manifest, replace: bool = False,
                     lease_s: float | None = None, **intent: Unpack[Intent]) -> dict[str, Any]:
        """A deploy on the node that has the service, else on the best node.

        A node that has it in any live status (a deploy in flight is `starting` from its
        first moment) is the only place it is deployed: one service is never placed on two
        nodes, and a node that may have it but doesn't say raises NodeUncertain. The deploy
        is always sent (instant, `already_running`, when the spec matches), so a changed
        spec gets the agent's ConflictError with `differing_fields`, or with `replace` a new
        one. Elsewhere, best is, for GPU services, the node whose GPU has the most free VRAM
        that fits; for the rest, the node running the fewest services; ties go to the first
        URL in order, so callers racing pick the same node. A GPU service that fits nowhere
        now, even by evicting idle services, goes (with `wait_s`) to wait on the node with the
        most room free or reclaimable. The answer includes `node`. With `lease_s` the caller
        takes a lease on it wherever it runs (`lease_id` in the answer).
        """
        body = load_manifest(manifest)
        name = str(body.get("name", ""))
        located = await self.locate(name, statuses=())  # any status: an exited one is redeployed there
        if located is not None:
            return await self._deploy_on(located[0], name, body, replace, lease_s, intent)
        last_error: AgentRequestError | None = None
        loop, wait_s = asyncio.get_running_loop(), float(intent.get("wait_s") or 0.0)
        started = loop.time()
        for client in await self.candidates(body, waiting=wait_s > 0):
            left = wait_s - (loop.time() - started)  # a wait spent on one node isn't spent again
            if wait_s > 0 and left <= 0:
                break
            try:
                return await self._deploy_on(client, name, body, replace, lease_s,
                                             {**intent, "wait_s": left} if wait_s > 0 else intent)
            except (CapacityError, NodeUnreachable) as err:
                last_error = err  # refused, or never reached: nothing placed there, try the next
        if last_error is not None:
            raise last_error
        reason = "no GPU with enough free VRAM" if requirements(body)[0] else "none answered"
        raise CapacityError(503, "no_capacity", f"No reachable node can run {name!r}: {reason}.")

    async def _deploy_on(self, client: AsyncAgentClient, name: str, body: Mapping[str, Any],
                         replace: bool, lease_s: float | None = None,
                         intent: Intent | None = None) -> dict[str, Any]:
        """Deploy on this node. If its answer stalls, look again there, never elsewhere."""
        intent = intent or {}
        try:
            if lease_s is not None and not replace:  # a lease left half-way is released
                return {**await deploy_holding(client, body, lease_s, intent), "node": client.url}
            return {**await client.deploy(body, replace, lease_s, **intent), "node": client.url}
        except DeployInterrupted as err:
            try:
                entry = await client.service(name)
            except AgentRequestError:
                raise err from None
            if entry.status != "healthy" or lease_s is not None:
                err.body["service"] = entry.raw
                raise
            return {**already_running_answer(Service.of(entry.raw, node=client.url)),
                    "already_running": False}

    async def prepull(self, manifest: Manifest) -> dict[str, dict[str, Any] | AgentRequestError]:
        """Pull the manifest's image on every reachable node that could ever run it (for a
        GPU service: a GPU at least its vram_gb), all at once; by node URL, its answer or
        its error (registry_denied, image_not_allowed, ...). NodeUnreachable when none answers."""
        body = load_manifest(manifest)
        gpu, vram_gb = requirements(body)
        found = await self.ask_all(lambda client: client.gpus())
        able = [client for client, gpus in zip(self._clients, found, strict=True) if gpus is not None
                and (not gpu or max((g.vram_total_gb for g in gpus), default=0.0) >= vram_gb)]
        return await self.pull(image_of(body), able)

    async def pull(self, image: str, clients: list[AsyncAgentClient] | None = None
                   ) -> dict[str, dict[str, Any] | AgentRequestError]:
        """Pull `image` on these nodes (default: every one) at once; by node URL, its answer
        or its error."""
        chosen = self._clients if clients is None else clients

        async def one(client: AsyncAgentClient) -> dict[str, Any] | AgentRequestError:
            try:
                return await client.pull(image)
            except AgentRequestError as err:
                return err
        answers = await asyncio.gather(*(one(client) for client in chosen))
        return {client.url: answer for client, answer in zip(chosen, answers, strict=True)}

    async def candidates(self, body: Mapping[str, Any], waiting: bool = False) -> list[AsyncAgentClient]:
        """Reachable nodes that could run `body`, best first: for a GPU service, those where
        it fits now (most free VRAM first), then those where evicting idle services makes
        it fit (most reclaimable first); with `waiting`, when it fits nowhere, the one with
        the most room free or reclaimable, to wait there. A node that lists the service now
        (a deploy of it by another caller has just begun there) is the only one."""
        name = str(body.get("name", ""))
        gpu, vram_gb = requirements(body)

        async def look(client: AsyncAgentClient) -> tuple[list[Service], list[Gpu]]:
            services, gpus = await asyncio.gather(client.services(), client.gpus())
            return services, gpus
        scored: list[tuple[int, float, int]] = []  # (fits: 0 now, 1 by evicting, 2 waiting), ...
        for order, found in enumerate(await self.ask_all(look)):
            if found is None:
                continue
            services, gpus = found
            if any(s.name == name for s in services):
                return [self._clients[order]]
            if not gpu:
                scored.append((0, float(len(services)), order))
                continue
            free = max((g.vram_free_gb for g in gpus), default=-1.0)
            reclaimable = max((g.vram_free_gb + (g.vram_idle_gb or 0.0) for g in gpus), default=-1.0)
            if free >= vram_gb:
                scored.append((0, -free, order))
            elif reclaimable >= vram_gb:
                scored.append((1, -reclaimable, order))
            elif waiting and max((g.vram_total_gb for g in gpus), default=0.0) >= vram_gb:
                scored.append((2, -reclaimable, order))  # a GPU big enough, one day
        return [self._clients[order] for _, _, order in sorted(scored)]

    @contextlib.asynccontextmanager
    async def leased(self, manifest: Manifest, lease_s: float = 60.0, *, retake: bool = False,
                     on_lost: LeaseCallback | None = None, on_retake: LeaseCallback | None = None,
                     **intent: Unpack[Intent]) -> AsyncIterator[Lease]:
        """ensure() with a lease, held like AsyncAgentClient.leased() on the node it runs on
        (a retake deploys there again, never elsewhere)."""
        answer = await self.ensure(manifest, lease_s=lease_s, **intent)
        client = self.client(answer["node"])
        async with hold(client, manifest, lease_s, retake=retake, on_lost=on_lost, on_retake=on_retake,
                        first=answer, node=client.url, intent=intent) as lease:
            yield lease
