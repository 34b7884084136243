"""The caller's token stays secret: no error text carries it, mDNS-found nodes don't get it,
and plain HTTP beyond loopback is called out. Stand-in servers on 127.0.0.1 play the nodes."""

from __future__ import annotations

import logging
import socket
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from deploy_agent.client import (
    AgentClient,
    AgentRequestError,
    AsyncAgentClient,
    AsyncComputeNodes,
    AuthError,
    ComputeNodes,
    LeaseLost,
    NodeUncertain,
    PlainHttpToken,
)
from tests.standins import stand_in_node

MARKER = "tok-MARKER-5f0c1e"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@pytest.fixture
def raw_server() -> Iterator[Callable[[bytes], int]]:
    """A TCP server on 127.0.0.1 that answers each connection with fixed bytes and closes."""
    servers: list[socket.socket] = []

    def start(reply: bytes) -> int:
        server = socket.socket()
        server.bind(("127.0.0.1", 0))
        server.listen()
        servers.append(server)

        def serve() -> None:
            for _ in range(20):  # bounded: a test makes a few connections at most
                try:
                    connection, _ = server.accept()
                except OSError:
                    return
                with connection:
                    connection.settimeout(2)
                    try:
                        connection.recv(65536)
                        connection.sendall(reply)
                    except OSError:
                        pass

        threading.Thread(target=serve, daemon=True).start()
        port: int = server.getsockname()[1]
        return port

    yield start
    for server in servers:
        server.close()


def texts_of(err: BaseException) -> str:
    """Everything a caller might log of an error: str, repr, the whole traceback and chain,
    and the repr of what it was raised from (aiohttp's carries the request's headers)."""
    chained = [repr(link) for link in (err.__cause__, err.__context__) if link is not None]
    return "\n".join([str(err), repr(err), *traceback.format_exception(err), *chained])


class TestNoTokenInErrors:
    """Every way a node can fail: the error's text never holds the token."""

    @pytest.mark.parametrize("reply", [
        b"",  # accepts and closes
        b"SSH-2.0-OpenSSH_9.6\r\n",  # another protocol on the port
        b"HTTP/1.1 500 Oops\r\nContent-Type: text/html\r\nContent-Length: 5\r\n\r\n<b/>\n",
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 3\r\n\r\n{x}",
    ])
    async def test_a_node_that_answers_badly(self, raw_server: Callable[[bytes], int],
                                             reply: bytes) -> None:
        url = f"http://127.0.0.1:{raw_server(reply)}"
        async with AsyncAgentClient(url, token=MARKER, timeout=5, stall_timeout=2) as client:
            for call in (client.services(), client.deploy({"name": "t-x", "image": "img:1"})):
                with pytest.raises(AgentRequestError) as caught:
                    await call
                assert MARKER not in texts_of(caught.value), reply

    async def test_nothing_listening_and_a_node_that_hangs(self) -> None:
        async with AsyncAgentClient(f"http://127.0.0.1:{closed_port()}", token=MARKER) as client:
            with pytest.raises(AgentRequestError) as caught:
                await client.health()
            assert MARKER not in texts_of(caught.value)
        hanging = socket.socket()
        hanging.bind(("127.0.0.1", 0))
        hanging.listen()  # accepts into its backlog, never answers
        with hanging:
            url = f"http://127.0.0.1:{hanging.getsockname()[1]}"
            async with AsyncAgentClient(url, token=MARKER, timeout=0.5) as client:
                with pytest.raises(AgentRequestError) as caught:
                    await client.services()
                assert MARKER not in texts_of(caught.value) and "did not answer" in str(caught.value)


@pytest.fixture
async def recording_node() -> Iterator[tuple[str, list[str | None]]]:  # type: ignore[misc]
    """A stand-in node on 127.0.0.1 that records each request's Authorization header."""
    seen: list[str | None] = []

    async def services(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization"))
        return web.json_response([])

    app = web.Application()
    app.router.add_get("/services", services)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/"), seen
    finally:
        await server.close()


class TestMdnsNodes:
    """A node nobody listed gets no token; the operator can trust the LAN explicitly."""

    async def test_a_discovered_node_gets_no_token(
            self, recording_node: tuple[str, list[str | None]], tmp_path: Path,
            monkeypatch: pytest.MonkeyPatch) -> None:
        url, seen = recording_node
        monkeypatch.setenv("DEPLOY_AGENT_TOKEN", MARKER)
        monkeypatch.setenv("DEPLOY_AGENT_STATE_DIR", str(tmp_path))  # no local agent token here
        monkeypatch.delenv("DEPLOY_AGENT_TRUST_MDNS", raising=False)
        # The stand-in is on loopback, which an advert may never name (those are dropped):
        # here it plays a LAN address.
        monkeypatch.setattr("deploy_agent.client.nodes.is_loopback", lambda host: False)
        async with AsyncComputeNodes([url], discovered=True) as nodes:
            await nodes.clients[0].services()
        async with AsyncComputeNodes([url]) as listed:  # listed by the operator: it gets it
            await listed.clients[0].services()
        monkeypatch.setenv("DEPLOY_AGENT_TRUST_MDNS", "1")
        async with AsyncComputeNodes([url], discovered=True) as trusted:
            await trusted.clients[0].services()
        assert seen == [None, f"Bearer {MARKER}", f"Bearer {MARKER}"]

    def test_a_discovered_node_never_gets_the_local_agents_token(self, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
        (tmp_path / "token").write_text("LOCAL-AGENT-SECRET\n")
        monkeypatch.setenv("DEPLOY_AGENT_STATE_DIR", str(tmp_path))
        for name in ("DEPLOY_AGENT_TOKEN", "DEPLOY_AGENT_TOKEN_FILE"):
            monkeypatch.delenv(name, raising=False)
        assert AsyncAgentClient("http://127.0.0.1:9", trusted=False).token is None
        assert AsyncAgentClient("http://127.0.0.1:9").token == "LOCAL-AGENT-SECRET"


class TestPlainHttp:
    """A token over plain HTTP beyond loopback is called out; TLS and loopback are not."""

    def test_warned_beyond_loopback_only(self) -> None:
        with pytest.warns(PlainHttpToken, match="gpu-7.lab"):
            AsyncAgentClient("http://gpu-7.lab:9000", token=MARKER)
        with warnings.catch_warnings():
            warnings.simplefilter("error", PlainHttpToken)
            AsyncAgentClient("https://gpu-7.lab", token=MARKER)
            AsyncAgentClient("http://127.0.0.1:9000", token=MARKER)
            AsyncAgentClient("http://gpu-7.lab:9000")  # no token, nothing to leak

    def test_the_warning_never_shows_the_token(self) -> None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            AsyncAgentClient("http://10.0.0.5:9000", token=MARKER)
        assert caught and all(MARKER not in str(w.message) for w in caught)



class TestNoTokenInLeaseAndPlacementErrors:
    """The newer failure paths: a lease lost, a node unsure, a token refused, and the log
    lines they write."""

    def test_every_path(self, caplog: pytest.LogCaptureFixture) -> None:
        caplog.set_level(logging.DEBUG)
        with stand_in_node() as node:
            node.renew = "garbage"
            with pytest.raises(LeaseLost) as lost, AgentClient(node.url, token=MARKER) as client, \
                    client.leased({"name": "t-x", "image": "img:1"}, lease_s=1) as lease:
                deadline = time.monotonic() + 5
                while not lease.lost and time.monotonic() < deadline:
                    time.sleep(0.05)
            node.starting = True
            with pytest.raises(NodeUncertain) as unsure:
                ComputeNodes([node.url], token=MARKER, locate_timeout=1).ensure({"name": "t-x", "image": "i"})
            node.starting, node.refuse_token = False, True
            with pytest.raises(AuthError) as refused:
                ComputeNodes([node.url], token=MARKER).ensure({"name": "t-x", "image": "i"})
        for caught in (lost, unsure, refused):
            assert MARKER not in texts_of(caught.value)
        assert "refused the token" in str(refused.value)
        assert caplog.records and all(MARKER not in r.getMessage() for r in caplog.records)
