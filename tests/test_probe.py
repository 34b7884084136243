"""Tests for deploy_agent.probe: 2xx is healthy; anything else, or nothing, is not."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from deploy_agent.probe import HealthProbe, _is_2xx

Reply = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Reply], Awaitable[int]]]:
    """Start a server on 127.0.0.1 that answers with `reply`; its port."""
    servers: list[asyncio.Server] = []

    async def start(reply: Reply) -> int:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await reply(reader, writer)
            finally:
                writer.close()
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        servers.append(server)
        port: int = server.sockets[0].getsockname()[1]
        return port

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


def status(code: bytes) -> Reply:
    async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 " + code + b" X\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
    return reply


class TestHealthProbe:
    """A real server on loopback answers; the probe reads its status line."""

    @pytest.mark.parametrize(("code", "healthy"), [
        (b"200", True), (b"204", True), (b"299", True), (b"301", False), (b"404", False),
        (b"500", False), (b"503", False),
    ])
    async def test_status_codes(self, serve: Any, code: bytes, healthy: bool) -> None:
        port = await serve(status(code))
        assert await HealthProbe("127.0.0.1").healthy(port, "/health", 1.0) is healthy

    async def test_sends_the_path(self, serve: Any) -> None:
        seen: list[bytes] = []

        async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            seen.append(await reader.readuntil(b"\r\n\r\n"))
            writer.write(b"HTTP/1.1 200 OK\r\n\r\n")
        port = await serve(reply)
        assert await HealthProbe("127.0.0.1").healthy(port, "/v1/ready?deep=1", 1.0)
        assert seen[0].startswith(b"GET /v1/ready?deep=1 HTTP/1.1\r\n")
        assert f"Host: 127.0.0.1:{port}".encode() in seen[0]

    async def test_closed_without_answer(self, serve: Any) -> None:
        async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
        port = await serve(reply)
        assert await HealthProbe("127.0.0.1").healthy(port, "/health", 1.0) is False

    async def test_nothing_listening(self) -> None:
        assert await HealthProbe("127.0.0.1").healthy(1, "/health", 1.0) is False

    async def test_hung_server_times_out(self, serve: Any) -> None:
        async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await asyncio.sleep(10)
        port = await serve(reply)
        started = time.monotonic()
        assert await HealthProbe("127.0.0.1").healthy(port, "/health", 0.2) is False
        assert time.monotonic() - started < 5  # the server hangs 10 s: the timeout ended it


class TestBatch:
    """A resync's batch: the same answers from worker threads; a hung service costs its timeout only."""

    async def test_mixed_batch(self, serve: Any) -> None:
        ok, missing, broken = await serve(status(b"200")), 1, await serve(status(b"500"))
        probe = HealthProbe("127.0.0.1")
        try:
            targets = [(None, ok, "/health"), (None, missing, "/"), (None, broken, "/h")]
            assert await probe.healthy_all(targets, 1.0) == [
                True, False, False]
            assert await probe.healthy_all([], 1.0) == []
        finally:
            probe.close()

    async def test_hung_service_does_not_hold_up_the_rest(self, serve: Any) -> None:
        hanging: list[int] = []
        most_at_once = [0]

        async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            hanging.append(1)
            most_at_once[0] = max(most_at_once[0], len(hanging))
            try:
                await asyncio.wait_for(reader.read(), 10)  # never answers; ends when the probe hangs up
            finally:
                hanging.pop()
        hung, ok = await serve(hang), await serve(status(b"200"))
        probe = HealthProbe("127.0.0.1")
        try:
            results = await probe.healthy_all([(None, hung, "/")] * 3 + [(None, ok, "/")] * 40, 2)
            assert results == [False] * 3 + [True] * 40
            assert most_at_once[0] == 3  # the hung ones waited side by side, not one after another
        finally:
            probe.close()


class TestStatusLine:
    """Only a well-formed 2xx status line counts."""

    @pytest.mark.parametrize(("head", "healthy"), [
        (b"HTTP/1.1 200 OK\r\n", True), (b"HTTP/1.0 204\r\n", True), (b"HTTP/1.1 2000 X\r\n", False),
        (b"HTTP/1.1 2xx X\r\n", False), (b"SSH-2.0-OpenSSH\r\n", False), (b"", False),
        (b"HTTP/1.1\r\n", False), (b"200 OK\r\n", False),
    ])
    def test_is_2xx(self, head: bytes, healthy: bool) -> None:
        assert _is_2xx(head) is healthy
