"""Host port allocation: the preferred port if free, else the next free one in the range."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable, Iterator

from deploy_agent.errors import NoPortAvailable
from deploy_agent.models import Owner

_LOGGER = logging.getLogger(__name__)

REFUSED_COOLDOWN_S = 300.0  # a port the engine refused on a node is not offered there again for this long


def bound_on_host(port: int) -> bool:
    """Whether something on this host already listens on `port` (any address)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("0.0.0.0", port))
        except OSError:
            return True
    return False


class PortAllocator:
    """Reserves host ports for their owners; a reservation lasts until its owner releases it.

    The bind() probes (up to one per port in the range) run in a thread; the port they
    find is then re-checked and reserved with no await in between, so concurrent deploys
    never receive the same port and the event loop never waits on a probe.
    """

    def __init__(self, port_range: tuple[int, int],
                 probe: Callable[[int], bool] | None = bound_on_host) -> None:
        self._low, self._high = port_range
        self._probe = probe  # None: the ports are another node's, nothing to probe here
        self._reserved: dict[int, Owner] = {}
        self._refused: dict[int, float] = {}  # port -> until when (monotonic) it is not offered

    def candidates(self, preferred: int) -> Iterator[int]:
        """`preferred` first when it is in the range, then the rest of the range in order."""
        if self._low <= preferred <= self._high:
            yield from range(preferred, self._high + 1)
            yield from range(self._low, preferred)
        else:
            yield from range(self._low, self._high + 1)

    def _first_unbound(self, preferred: int, excluded: frozenset[int],
                       freed: frozenset[int] = frozenset()) -> int | None:
        """Blocking: the first candidate not excluded that nothing on the host listens on
        (a `freed` port counts as unbound: its container is about to go)."""
        probe = self._probe or (lambda port: False)
        return next((port for port in self.candidates(preferred)
                     if port not in excluded and (port in freed or not probe(port))), None)

    async def reserve(self, owner: Owner, preferred: int, published: set[int],
                      skip: frozenset[int] = frozenset()) -> int:
        """Take the first candidate not reserved, not published by a container, not bound,
        not refused lately, and hold it for `owner`."""
        while True:
            port = await self.first_free(preferred, published | skip, set())
            if port not in self._reserved:  # another deploy may have taken it during the probe
                self._reserved[port] = owner
                return port

    async def first_free(self, preferred: int, published: set[int], freed: set[int]) -> int:
        """The port reserve() would take now, reserving nothing; `freed` count as free."""
        excluded = frozenset((set(self._reserved) | published | self._refused_now()) - freed)
        port = await asyncio.to_thread(self._first_unbound, preferred, excluded, frozenset(freed))
        if port is None:
            raise NoPortAvailable(f"No free host port in {self._low}-{self._high}; "
                                  "stop a service or widen --port-range.")
        return port

    def claim(self, owner: Owner, port: int) -> bool:
        """Record a port already in use by a service the agent adopted; False (and nothing
        taken) when another owner holds it."""
        holder = self._reserved.setdefault(port, owner)
        if holder != owner:
            _LOGGER.warning("Host port %s is held by %s; %s can't claim it too", port, holder, owner)
            return False
        return True

    def release(self, owner: Owner, port: int) -> bool:
        """Free `port` if `owner` holds it; whether it did. What another owner holds stays held."""
        holder = self._reserved.get(port)
        if holder != owner:
            _LOGGER.info("Not releasing host port %s for %s: %s", port, owner,
                         "it is not reserved" if holder is None else f"{holder} holds it")
            return False
        del self._reserved[port]
        return True

    def holder(self, port: int) -> Owner | None:
        return self._reserved.get(port)

    def reserved_for(self, name: str) -> int | None:
        """A port some deploy of `name` holds (its lowest), if any."""
        return min((port for port, owner in self._reserved.items() if owner.name == name), default=None)

    def refuse(self, port: int, for_s: float = REFUSED_COOLDOWN_S) -> None:
        """The engine refused `port` here: don't offer it again for a while."""
        self._refused[port] = time.monotonic() + for_s

    def _refused_now(self) -> set[int]:
        now = time.monotonic()
        for port in [p for p, until in self._refused.items() if until <= now]:
            del self._refused[port]
        return set(self._refused)


class NodePorts:
    """Host-port allocators by node. A node is None (the agent's own: one engine) or another
    node's ID (a swarm's); the agent's own node is also probed with bind(), another node's
    ports are known only from the services placed there."""

    def __init__(self, port_range: tuple[int, int]) -> None:
        self._range = port_range
        self._allocators: dict[str | None, PortAllocator] = {}

    def own_reserved_for(self, name: str) -> int | None:
        """A port reserved for `name` on the agent's own node (None in front of a swarm, where
        the node isn't known before placement), looking only: nothing is made."""
        own = self._allocators.get(None)
        return own.reserved_for(name) if own is not None else None

    def on(self, node: str | None) -> PortAllocator:
        allocator = self._allocators.get(node)
        if allocator is None:
            probe = bound_on_host if node is None else None  # only the own node is here to ask
            allocator = self._allocators[node] = PortAllocator(self._range, probe)
        return allocator
