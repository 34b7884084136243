"""Tests for deploy_agent.ports: the preferred port if free, else the next free in range."""

from __future__ import annotations

import socket

import pytest

from deploy_agent.errors import NoPortAvailable
from deploy_agent.models import Owner
from deploy_agent.ports import PortAllocator, bound_on_host

OWNER = Owner("svc", "attempt")


@pytest.fixture
def listener() -> socket.socket:
    """A real socket listening on a free port in the test range."""
    for port in range(29000, 29100):
        sock = socket.socket()
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            sock.close()
            continue
        sock.listen()
        return sock
    pytest.skip("no free port to listen on")


class TestPortAllocator:
    """Reservations never collide with each other, published ports, or bound sockets."""

    async def test_preferred_port_when_free(self) -> None:
        assert await PortAllocator((29200, 29210)).reserve(OWNER, 29205, set()) == 29205

    async def test_reserved_port_goes_to_the_next(self) -> None:
        ports = PortAllocator((29200, 29210))
        assert [await ports.reserve(OWNER, 29205, set()) for _ in range(3)] == [29205, 29206, 29207]

    async def test_published_port_is_skipped(self) -> None:
        assert await PortAllocator((29200, 29210)).reserve(OWNER, 29205, {29205, 29206}) == 29207

    async def test_port_bound_on_host_is_skipped(self, listener: socket.socket) -> None:
        port = listener.getsockname()[1]
        with listener:
            assert bound_on_host(port)
            assert await PortAllocator((port, port + 5)).reserve(OWNER, port, set()) == port + 1
        assert not bound_on_host(port)

    async def test_wraps_to_the_start_of_the_range(self) -> None:
        ports = PortAllocator((29200, 29202))
        assert [await ports.reserve(OWNER, 29202, set()) for _ in range(3)] == [29202, 29200, 29201]

    async def test_preferred_outside_range_starts_at_range_low(self) -> None:
        assert await PortAllocator((29200, 29210)).reserve(OWNER, 80, set()) == 29200

    async def test_refused_ports_are_skipped(self) -> None:
        assert await PortAllocator((29200, 29210)).reserve(OWNER, 29200, set(), frozenset({29200})) == 29201

    async def test_exhausted_range_is_503(self) -> None:
        ports = PortAllocator((29200, 29201))
        await ports.reserve(OWNER, 29200, set())
        await ports.reserve(OWNER, 29200, set())
        with pytest.raises(NoPortAvailable) as caught:
            await ports.reserve(OWNER, 29200, set())
        assert caught.value.status == 503

    async def test_release_frees_the_port(self) -> None:
        ports = PortAllocator((29200, 29210))
        port = await ports.reserve(OWNER, 29200, set())
        ports.release(OWNER, port)
        assert await ports.reserve(OWNER, 29200, set()) == port


class TestOffTheLoop:
    """bind() probes run in a thread: a slow probe never stalls the event loop."""

    async def test_slow_probes_leave_the_loop_free(self) -> None:
        import asyncio
        import threading
        import time

        loop = asyncio.get_running_loop()
        probed_on: list[int] = []

        def slow_probe(port: int) -> bool:
            probed_on.append(threading.get_ident())
            # A probe stuck in the kernel, say; meanwhile the loop still runs a task (a probe
            # in a thread the loop waited for would time out here).
            asyncio.run_coroutine_threadsafe(asyncio.sleep(0), loop).result(timeout=10)
            time.sleep(0.1)
            return port < 29205  # the first five are taken

        port = await PortAllocator((29200, 29210), probe=slow_probe).reserve(OWNER, 29200, set())
        assert port == 29205
        # Where each probe ran, not how long the loop waited: a timing fails on a loaded machine.
        assert len(probed_on) == 6 and threading.get_ident() not in probed_on


class TestNodePorts:
    """Each node has its own ports; another node's are never probed here."""

    async def test_nodes_are_independent(self, listener: socket.socket) -> None:
        from deploy_agent.ports import NodePorts

        port = listener.getsockname()[1]
        with listener:
            remote = NodePorts((port, port + 5))
            assert await remote.on("node-a").reserve(OWNER, port, set()) == port  # bound here, not there
            assert await remote.on("node-b").reserve(OWNER, port, set()) == port
            assert await remote.on("node-a").reserve(OWNER, port, set()) == port + 1
            local = NodePorts((port, port + 5))
            assert await local.on(None).reserve(OWNER, port, set()) == port + 1
