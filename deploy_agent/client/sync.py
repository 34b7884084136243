"""AgentClient and ComputeNodes: the async clients for synchronous code.

Every call goes through one event loop on a thread of the client's own, so a client can be
shared by threads, used inside a running event loop (Jupyter) and inside its own
follow_events() loop, and keeps one session (with its keep-alive connections) until
close(). Ctrl-C in a call cancels that call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar, Unpack

from deploy_agent.client.errors import AgentRequestError
from deploy_agent.client.lease import Lease, LeaseCallback
from deploy_agent.client.manifests import Intent, Manifest
from deploy_agent.client.node import DEFAULT_NODE, AsyncAgentClient
from deploy_agent.client.nodes import AsyncComputeNodes, discover_nodes, nodes_from_env
from deploy_agent.client.results import Event, Gpu, Service

T = TypeVar("T")
CLOSE_TIMEOUT_S = 5.0
WAIT_STEP_S = 0.5  # how often a waiting call looks whether the client's loop still runs
_LOGGER = logging.getLogger("deploy_agent.client")


class LoopThread:
    """An event loop on a daemon thread, started at the first call; stop() ends both."""

    def __init__(self, close: Callable[[], Coroutine[Any, Any, None]], name: str) -> None:
        self._close, self._name = close, name
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._holding = 0  # leases held through this loop: a stop waits for the last to end
        self._stop_when_free = False

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
        loop = self._running()
        thread = self._thread
        finished = threading.Event()
        future = asyncio.run_coroutine_threadsafe(_awaited(awaitable, finished), loop)
        try:
            while True:
                try:
                    return future.result(timeout=WAIT_STEP_S)
                except TimeoutError:
                    if future.done():
                        raise  # the call itself timed out
                    if thread is None or not thread.is_alive() or loop.is_closed():
                        raise RuntimeError("the deploy-agent client was closed during the call") from None
        except BaseException:
            if future.cancel():  # let its clean-up (a lease's release) run, bounded
                finished.wait(CLOSE_TIMEOUT_S)
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

    @contextlib.contextmanager
    def holding(self) -> Iterator[None]:
        """A lease is held through this loop: stop() waits until it ends."""
        with self._lock:
            self._holding += 1
        try:
            yield
        finally:
            with self._lock:
                self._holding -= 1
                stop_now = self._holding == 0 and self._stop_when_free
            if stop_now:
                self.stop()

    def stop(self) -> None:
        """Cancel what still runs, close the sessions, end the loop and its thread; while a
        lease is held, only once it ends. The next call starts them again."""
        with self._lock:
            if self._holding:
                self._stop_when_free = True
                return
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
            self._stop_when_free = False
        if loop is None or thread is None:
            return
        if threading.current_thread() is not thread:
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self._shut(), loop).result(CLOSE_TIMEOUT_S)
        loop.call_soon_threadsafe(loop.stop)
        if threading.current_thread() is not thread:
            thread.join(CLOSE_TIMEOUT_S)
            if not thread.is_alive():
                loop.close()


    async def _shut(self) -> None:
        """Every other task cancelled (a call under way raises in its caller), then the
        sessions closed."""
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)
        await self._close()


async def _awaited(awaitable: Awaitable[T], finished: threading.Event) -> T:
    try:
        return await awaitable
    finally:
        finished.set()


def _in_thread(callback: LeaseCallback | None) -> LeaseCallback | None:
    """A sync holder's callback, run off the loop thread so it may call the sync client."""
    if callback is None:
        return None

    def guarded(lease: Lease) -> None:
        try:
            callback(lease)
        except BaseException:  # SystemExit too: it would end this worker, never the program
            _LOGGER.exception("A lease callback for %s failed", lease.name)

    async def call(lease: Lease) -> None:
        await asyncio.to_thread(guarded, lease)
    return call


@contextlib.contextmanager
def _held(client: object, loop: LoopThread,
          manager: contextlib.AbstractAsyncContextManager[Lease]) -> Iterator[Lease]:
    """An async lease context, entered and left on the loop: the same behaviour, not awaited.
    `client` is kept alive (its collection would stop the loop) until the block ends."""
    with loop.holding():
        lease = loop.run(manager.__aenter__())
        try:
            yield lease
        except BaseException as err:
            if not loop.run(_exit(manager, err)):
                raise
        else:
            loop.run(_exit(manager, None))
    del client


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

    def _each(self, items: AsyncIterator[T]) -> Iterator[T]:
        """Iterate on the loop; the client stays alive while the iteration does."""
        yield from self._loop.iterate(items)

    def health(self, timeout: float | None = None) -> dict[str, Any]:
        return self._run(self._async.health(timeout))

    def services(self, timeout: float | None = None) -> list[Service]:
        return self._run(self._async.services(timeout))

    def service(self, name: str, timeout: float | None = None) -> Service:
        return self._run(self._async.service(name, timeout))

    def gpus(self, timeout: float | None = None) -> list[Gpu]:
        return self._run(self._async.gpus(timeout))

    def deploy(self, manifest: Manifest, replace: bool = False, lease_s: float | None = None,
               lease_id: str | None = None, **intent: Unpack[Intent]) -> dict[str, Any]:
        return self._run(self._async.deploy(manifest, replace, lease_s, lease_id, **intent))

    def deploy_events(self, manifest: Manifest, replace: bool = False, lease_s: float | None = None,
                      lease_id: str | None = None, **intent: Unpack[Intent]) -> Iterator[dict[str, Any]]:
        return self._each(self._async.deploy_events(manifest, replace, lease_s, lease_id, **intent))

    def stop(self, name: str, timeout: float | None = None) -> dict[str, Any]:
        return self._run(self._async.stop(name, timeout))

    def dry_run(self, manifest: Manifest, replace: bool = False,
                timeout: float | None = None, **intent: Unpack[Intent]) -> dict[str, Any]:
        return self._run(self._async.dry_run(manifest, replace, timeout, **intent))

    def queue(self, timeout: float | None = None) -> list[dict[str, Any]]:
        return self._run(self._async.queue(timeout))

    def pull(self, image: str, on_progress: Callable[[dict[str, Any]], None] | None = None
             ) -> dict[str, Any]:
        """Pull `image` on the node now; `on_progress` hears each event (in the client's
        worker thread)."""
        return self._run(self._async.pull(image, on_progress))

    def renew(self, name: str, lease_id: str, lease_s: float | None = None,
              timeout: float | None = None) -> dict[str, Any]:
        return self._run(self._async.renew(name, lease_id, lease_s, timeout))

    def release(self, name: str, lease_id: str, timeout: float | None = None) -> dict[str, Any]:
        return self._run(self._async.release(name, lease_id, timeout))

    def events(self, since: int | None = None, limit: int | None = None,
               timeout: float | None = None) -> list[Event]:
        return self._run(self._async.events(since, limit, timeout))

    def follow_events(self, since: int | None = None) -> Iterator[Event]:
        return self._each(self._async.follow_events(since))

    def logs(self, name: str, tail: int = 100, timeout: float | None = None) -> str:
        return self._run(self._async.logs(name, tail, timeout))

    def follow_logs(self, name: str, tail: int = 100) -> Iterator[str]:
        return self._each(self._async.follow_logs(name, tail))

    def leased(self, manifest: Manifest, lease_s: float = 60.0, *, retake: bool = False,
               on_lost: LeaseCallback | None = None, on_retake: LeaseCallback | None = None,
               **intent: Unpack[Intent]) -> contextlib.AbstractContextManager[Lease]:
        """As AsyncAgentClient.leased(); the callbacks run on a worker thread."""
        return _held(self, self._loop, self._async.leased(manifest, lease_s, retake=retake,
                                                          on_lost=_in_thread(on_lost),
                                                          on_retake=_in_thread(on_retake), **intent))


class ComputeNodes:
    """Several agents from synchronous code: the same methods as AsyncComputeNodes."""

    def __init__(self, urls: list[str], token: str | None = None, probe_timeout: float = 2.0,
                 stall_timeout: float = 150.0, token_file: str | Path | None = None,
                 discovered: bool = False, *, timeout: float = 300.0,
                 locate_timeout: float = 15.0, down_after: float = 3.0) -> None:
        self._async = AsyncComputeNodes(urls, token, probe_timeout, stall_timeout, token_file,
                                        discovered, timeout=timeout, locate_timeout=locate_timeout,
                                        down_after=down_after)
        self._loop = LoopThread(self._async.close, "deploy-agent nodes")
        self._finalizer = weakref.finalize(self, self._loop.stop)

    @classmethod
    def from_env(cls, token: str | None = None, timeout_s: float = 2.0, **knobs: Any) -> ComputeNodes:
        """COMPUTE_NODES when set, else the agents advertising over mDNS (--mdns), which get
        no token unless DEPLOY_AGENT_TRUST_MDNS=1; `knobs`: the constructor's other
        arguments (probe_timeout, locate_timeout, down_after, stall_timeout, timeout,
        token_file)."""
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
               lease_s: float | None = None, **intent: Unpack[Intent]) -> dict[str, Any]:
        return self._run(self._async.ensure(manifest, replace, lease_s, **intent))

    def pull(self, image: str) -> dict[str, dict[str, Any] | AgentRequestError]:
        """Pull `image` on every node at once; by node URL, its answer or its error."""
        return self._run(self._async.pull(image))

    def prepull(self, manifest: Manifest) -> dict[str, dict[str, Any] | AgentRequestError]:
        """Pull its image on every node that could run it (see AsyncComputeNodes.prepull)."""
        return self._run(self._async.prepull(manifest))

    def stop(self, name: str) -> dict[str, Any]:
        return self._run(self._async.stop(name))

    def renew(self, name: str, lease_id: str, lease_s: float | None = None) -> dict[str, Any]:
        return self._run(self._async.renew(name, lease_id, lease_s))

    def release(self, name: str, lease_id: str) -> dict[str, Any]:
        return self._run(self._async.release(name, lease_id))

    def logs(self, name: str, tail: int = 100) -> str:
        return self._run(self._async.logs(name, tail))

    def leased(self, manifest: Manifest, lease_s: float = 60.0, *, retake: bool = False,
               on_lost: LeaseCallback | None = None, on_retake: LeaseCallback | None = None,
               **intent: Unpack[Intent]) -> contextlib.AbstractContextManager[Lease]:
        """As AsyncComputeNodes.leased(); the callbacks run on a worker thread."""
        return _held(self, self._loop, self._async.leased(manifest, lease_s, retake=retake,
                                                          on_lost=_in_thread(on_lost),
                                                          on_retake=_in_thread(on_retake), **intent))


async def _nothing() -> None:
    return None
