"""Host port allocation: the preferred port if free, else the next free one in the range."""

from __future__ import annotations

import socket
from collections.abc import Iterator

from deploy_agent.errors import NoPortAvailable


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
    """Reserves host ports for services; a reservation lasts until released.

    Reservations are taken synchronously, with no await in between, so concurrent
    deploys on the event loop never receive the same port.
    """

    def __init__(self, port_range: tuple[int, int]) -> None:
        self._low, self._high = port_range
        self._reserved: set[int] = set()

    def candidates(self, preferred: int) -> Iterator[int]:
        """`preferred` first when it is in the range, then the rest of the range in order."""
        if self._low <= preferred <= self._high:
            yield from range(preferred, self._high + 1)
            yield from range(self._low, preferred)
        else:
            yield from range(self._low, self._high + 1)

    def reserve(self, preferred: int, published: set[int], skip: frozenset[int] = frozenset()) -> int:
        """Take the first candidate not reserved, not published by a container, not bound."""
        for port in self.candidates(preferred):
            if port in self._reserved or port in published or port in skip:
                continue
            if bound_on_host(port):
                continue
            self._reserved.add(port)
            return port
        raise NoPortAvailable(
            f"No free host port in {self._low}-{self._high}; stop a service or widen --port-range."
        )

    def claim(self, port: int) -> None:
        """Record a port already in use by a service the agent adopted."""
        self._reserved.add(port)

    def release(self, port: int) -> None:
        self._reserved.discard(port)
