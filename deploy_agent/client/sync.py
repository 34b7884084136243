"""AgentClient and ComputeNodes: the async clients for synchronous code.

Every call goes through one event loop on a thread of the client's own, so a client can be
shared by threads, used inside a running event loop (Jupyter) and inside its own
follow_events() loop, and keeps one session (with its keep-alive connections) until
close(). Ctrl-C in a call cancels that call.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from deploy_agent.client.lease import Lease, LeaseCallback
from deploy_agent.client.manifests import Manifest
from deploy_agent.client.node import DEFAULT_NODE, AsyncAgentClient
from deploy_agent.client.nodes import AsyncComputeNodes, discover_nodes, nodes_from_env
from deploy_agent.client.results import Event, Gpu, Service

T = TypeVar("T")
CLOSE_TIMEOUT_S = 5.0


class LoopThread:
    """An event loop on a daemon thread, started at the first call; stop() ends both."""

    def __init__(self, close: Callable[[], Coroutine[Any, Any, None]], name: str) -> None:
        self._close, self._name = close, name
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def _running(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name=self._name, daemon=True)
                thread.start()
                self._loop, self._thread = loop, thread
            return self._loop

    def run(self, awaitable: Awaitable[T]) -> T:
        """Run on the loop and wait; a KeyboardInterrupt while waiting cancels it."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("a sync deploy-agent client was called from its own loop (a "
                               "callback?): use the async client there")
        future = asyncio.run_coroutine_threadsafe(_awaited(awaitable), self._running())
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise

    def iterate(self, iterator: AsyncIterator[T]) -> Iterator[T]:
        """Each item of an async iterator, each step run on the loop; closed when left."""
        try:
            while True:
                try:
                    yield self.run(anext(iterator))
                except StopAsyncIteration:
                    return
        finally:
            with contextlib.suppress(Exception):
                self.run(iterator.aclose())  # type: ignore[attr-defined]

    def stop(self) -> None:
        """Close the sessions, end the loop and its thread. The next call starts them again."""
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is None or thread is None:
            return
        if threading.current_thread() is not thread:
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self._close(), loop).result(CLOSE_TIMEOUT_S)
        loop.call_soon_threadsafe(loop.stop)
        if threading.current_thread() is not thread:
            thread.join(CLOSE_TIMEOUT_S)
            if not thread.is_alive():
                loop.close()


async def _awaited(awaitable: Awaitable[T]) -> T:
    return await awaitable


def _in_thread(callback: LeaseCallback | None) -> LeaseCallback | None:
    """A sync holder's callback, run off the loop thread so it may call the sync client."""
    if callback is None:
        return None

    async def call(lease: Lease) -> None:
        await asyncio.to_thread(callback, lease)
    return call


@contextlib.contextmanager
def _held(loop: LoopThread, manager: contextlib.AbstractAsyncContextManager[Lease]) -> Iterator[Lease]:
    """An async lease context, entered and left on the loop: the same behaviour, not awaited."""
    lease = loop.run(manager.__aenter__())
    try:
        yield lease
    except BaseException as err:
        if not loop.run(_exit(manager, err)):
            raise
    else:
        loop.run(_exit(manager, None))


async def _exit(manager: contextlib.AbstractAsyncContextManager[Lease], err: BaseException | None) -> bool:
    """__aexit__, with the block's own exception (a KeyboardInterrupt too) coming back as
    False instead of raising through the loop's thread."""
    try:
        return bool(await manager.__aexit__(type(err) if err else None, err,
                                            err.__traceback__ if err else None))
    except BaseException as raised:
        if err is not None and raised is err:
            return False
        raise


class AgentClient:
    """One agent, from synchronous code: the same methods as AsyncAgentClient, not awaited."""

    def __init__(self, url: str = DEFAULT_NODE, token: str | None = None, timeout: float = 300.0,
                 stall_timeout: float = 150.0, token_file: str | Path | None = None,
                 connect_timeout: float = 10.0) -> None:
        self._async = AsyncAgentClient(url, token, timeout, stall_timeout=stall_timeout,
                                       token_file=token_file, connect_timeout=connect_timeout)
        self.url = self._async.url
        self._loop = LoopThread(self._async.close, f"deploy-agent client {self.url}")
        self._finalizer = weakref.finalize(self, self._loop.stop)

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Close the session and the client's thread (also done when it is collected)."""
        self._finalizer()
        self._finalizer = weakref.finalize(self, self._loop.stop)  # a later call starts anew

    def _run(self, call: Coroutine[Any, Any, T]) -> T:
        return self._loop.run(call)

    def health(self, timeout: float | None = None) -> dict[str, Any]:
        return self._run(self._async.health(timeout))

    def services(self, timeout: float | None = None) -> list[Service]:
        return self._run(self._async.services(timeout))

    def service(self, name: str, timeout: float | None = None) -> Service:
        return self._run(self._async.service(name, timeout))

    def gpus(self, timeout: float | None = None) -> list[Gpu]:
        return self._run(self._async.gpus(timeout))

    def deploy(self, manifest: Manifest, replace: bool = False, lease_s: float | None = None,
               lease_id: str | None = None) -> dict[str, Any]:
        return self._run(self._async.deploy(manifest, replace, lease_s, lease_id))

    def deploy_events(self, manifest: Manifest, replace: bool = False, lease_s: float | None = None,
                      lease_id: str | None = None) -> Iterator[dict[str, Any]]:
        return self._loop.iterate(self._async.deploy_events(manifest, replace, lease_s, lease_id))

    def stop(self, name: str, timeout: float | None = None) -> dict[str, Any]:
        return self._run(self._async.stop(name, timeout))

    def dry_run(self, manifest: Manifest, replace: bool = False,
                timeout: float | None = None) -> dict[str, Any]:
        return self._run(self._async.dry_run(manifest, replace, timeout))

    def renew(self, name: str, lease_id: str, lease_s: float | None = None,
              timeout: float | None = None) -> dict[str, Any]:
        return self._run(self._async.renew(name, lease_id, lease_s, timeout))

    def release(self, name: str, lease_id: str, timeout: float | None = None) -> dict[str, Any]:
        return self._run(self._async.release(name, lease_id, timeout))

    def events(self, since: int | None = None, limit: int | None = None,
               timeout: float | None = None) -> list[Event]:
        return self._run(self._async.events(since, limit, timeout))

    def follow_events(self, since: int | None = None) -> Iterator[Event]:
        return self._loop.iterate(self._async.follow_events(since))

    def logs(self, name: str, tail: int = 100, timeout: float | None = None) -> str:
        return self._run(self._async.logs(name, tail, timeout))

    def follow_logs(self, name: str, tail: int = 100) -> Iterator[str]:
        return self._loop.iterate(self._async.follow_logs(name, tail))

    def leased(self, manifest: Manifest, lease_s: float = 60.0, *, retake: bool = False,
               on_lost: LeaseCallback | None = None,
               on_retake: LeaseCallback | None = None) -> contextlib.AbstractContextManager[Lease]:
        """As AsyncAgentClient.leased(); the callbacks run on a worker thread."""
        return _held(self._loop, self._async.leased(manifest, lease_s, retake=retake,
                                                    on_lost=_in_thread(on_lost),
                                                    on_retake=_in_thread(on_retake)))


class ComputeNodes:
    """Several agents from synchronous code: the same methods as AsyncComputeNodes."""

    def __init__(self, urls: list[str], token: str | None = None, probe_timeout: float = 2.0,
                 stall_timeout: float = 150.0, token_file: str | Path | None = None,
                 discovered: bool = False, *, timeout: float = 300.0,
                 locate_timeout: float = 15.0) -> None:
        self._async = AsyncComputeNodes(urls, token, probe_timeout, stall_timeout, token_file,
                                        discovered, timeout=timeout, locate_timeout=locate_timeout)
        self._loop = LoopThread(self._async.close, "deploy-agent nodes")
        self._finalizer = weakref.finalize(self, self._loop.stop)

    @classmethod
    def from_env(cls, token: str | None = None, timeout_s: float = 2.0, **knobs: Any) -> ComputeNodes:
        """COMPUTE_NODES when set, else the agents advertising over mDNS (--mdns), which get
        no token unless DEPLOY_AGENT_TRUST_MDNS=1; `knobs`: the constructor's other
        arguments (probe_timeout, locate_timeout, stall_timeout, timeout, token_file)."""
        listed = nodes_from_env()
        if listed:
            return cls(listed, token, **knobs)
        finder = LoopThread(_nothing, "deploy-agent mDNS")
        try:
            found = finder.run(discover_nodes(timeout_s))
        finally:
            finder.stop()
        return cls(found, token, discovered=True, **knobs)

    @property
    def urls(self) -> list[str]:
        return self._async.urls

    def __enter__(self) -> ComputeNodes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._finalizer()
        self._finalizer = weakref.finalize(self, self._loop.stop)

    def _run(self, call: Coroutine[Any, Any, T]) -> T:
        return self._loop.run(call)

    def status(self) -> list[dict[str, Any]]:
        return self._run(self._async.status())

    def events(self, limit: int = 50) -> list[Event]:
        return self._run(self._async.events(limit))

    def locate(self, name: str, statuses: tuple[str, ...] | None = None) -> tuple[str, Service] | None:
        """The URL of the node that has `name` (any live status, or one of `statuses`; all
        when empty), and its entry."""
        found = self._run(self._async.locate(name) if statuses is None
                          else self._async.locate(name, statuses))
        return (found[0].url, found[1]) if found else None

    def find(self, name: str) -> Service | None:
        return self._run(self._async.find(name))

    def ensure(self, manifest: Manifest, replace: bool = False,
               lease_s: float | None = None) -> dict[str, Any]:
        return self._run(self._async.ensure(manifest, replace, lease_s))

    def stop(self, name: str) -> dict[str, Any]:
        return self._run(self._async.stop(name))

    def renew(self, name: str, lease_id: str, lease_s: float | None = None) -> dict[str, Any]:
        return self._run(self._async.renew(name, lease_id, lease_s))

    def release(self, name: str, lease_id: str) -> dict[str, Any]:
        return self._run(self._async.release(name, lease_id))

    def logs(self, name: str, tail: int = 100) -> str:
        return self._run(self._async.logs(name, tail))

    def leased(self, manifest: Manifest, lease_s: float = 60.0, *, retake: bool = False,
               on_lost: LeaseCallback | None = None,
               on_retake: LeaseCallback | None = None) -> contextlib.AbstractContextManager[Lease]:
        """As AsyncComputeNodes.leased(); the callbacks run on a worker thread."""
        return _held(self._loop, self._async.leased(manifest, lease_s, retake=retake,
                                                    on_lost=_in_thread(on_lost),
                                                    on_retake=_in_thread(on_retake)))


async def _nothing() -> None:
    return None
