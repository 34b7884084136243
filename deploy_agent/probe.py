"""HTTP health probes of services, through their published host ports.

A probe is one `GET {path}` on a fresh connection; only the status line is read, which
is all a 2xx check needs. Probing every service every few seconds is the agent's main
steady cost, so the two users get the cheapest form for their need:

- a deploy's health wait probes one service at a time, cancellably, on the event loop;
- a resync probes them all as one batch on worker threads with blocking sockets: four
  system calls a probe and no event-loop bookkeeping, about a third less CPU, and the
  loop stays free to answer requests meanwhile.
"""

from __future__ import annotations

import asyncio
import socket
import urllib.parse
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

# Characters a health path may carry as they are; the rest is percent-encoded.
_SAFE = "/?&=%:@!$'()*+,;~-._"
# Probes of one batch in flight at once: a hung service holds one worker for its timeout.
# More workers only add contention for the interpreter lock with the API (measured).
BATCH_WORKERS = 8


class HealthProbe:
    """GETs of services' health paths; any 2xx is healthy, anything else is not."""

    def __init__(self, host: str) -> None:
        self._host = host
        self._workers = ThreadPoolExecutor(BATCH_WORKERS, thread_name_prefix="probe")

    async def healthy(self, host_port: int, path: str, timeout_s: float,
                      host: str | None = None) -> bool:
        """One probe on the event loop; cancelling it abandons the connection at once.

        `host`: where the port is published, when not on this node (a swarm node's address).
        """
        host = host or self._host
        loop = asyncio.get_running_loop()
        try:
            with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
                sock.setblocking(False)
                async with asyncio.timeout(timeout_s):
                    await loop.sock_connect(sock, (host, host_port))
                    await loop.sock_sendall(sock, _request(host, host_port, path))
                    head = await loop.sock_recv(sock, 64)
        except (OSError, TimeoutError):
            return False
        return _is_2xx(head)

    async def healthy_all(self, targets: Sequence[Target], timeout_s: float) -> list[bool]:
        """Probe every (host or None, host_port, path) on the worker threads; one answer each."""
        if not targets:
            return []
        return await asyncio.to_thread(self._probe_batch, targets, timeout_s)

    def _probe_batch(self, targets: Sequence[Target], timeout_s: float) -> list[bool]:
        return list(self._workers.map(
            lambda target: self._probe_blocking(target[0] or self._host, target[1], target[2],
                                                timeout_s), targets))

    def _probe_blocking(self, host: str, host_port: int, path: str, timeout_s: float) -> bool:
        try:
            with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
                sock.settimeout(timeout_s)
                sock.connect((host, host_port))
                sock.sendall(_request(host, host_port, path))
                head = sock.recv(64)
        except OSError:  # refused, reset, timed out
            return False
        return _is_2xx(head)

    def close(self) -> None:
        self._workers.shutdown(wait=False, cancel_futures=True)


Target = tuple[str | None, int, str]
"""(host, or None for the default, host_port, path)"""


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _request(host: str, port: int, path: str) -> bytes:
    return (f"GET {urllib.parse.quote(path, safe=_SAFE)} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            "User-Agent: deploy-agent\r\nConnection: close\r\n\r\n").encode()


def _is_2xx(head: bytes) -> bool:
    """Whether a response starts with an HTTP status line of 200-299."""
    parts = head.split(None, 2)  # b"HTTP/1.1", b"200", b"OK\r\n..."
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/"):
        return False
    return len(parts[1]) == 3 and parts[1].startswith(b"2") and parts[1].isdigit()
