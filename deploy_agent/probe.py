"""HTTP health probes of services, through their published host ports.

A probe is one `GET {path}` on a fresh connection; only the status line is read. That is
all a 2xx check needs, and it costs a fraction of a full HTTP client's CPU, which matters
when every service is probed every few seconds.
"""

from __future__ import annotations

import asyncio
import urllib.parse

# Characters a health path may carry as they are; the rest is percent-encoded.
_SAFE = "/?&=%:@!$'()*+,;~-._"


class HealthProbe:
    """One GET of a service's health path; any 2xx is healthy, anything else is not."""

    def __init__(self, host: str) -> None:
        self._host = host

    async def healthy(self, host_port: int, path: str, timeout_s: float) -> bool:
        request = (f"GET {urllib.parse.quote(path, safe=_SAFE)} HTTP/1.1\r\n"
                   f"Host: {self._host}:{host_port}\r\nUser-Agent: deploy-agent\r\n"
                   "Connection: close\r\n\r\n").encode()
        try:
            async with asyncio.timeout(timeout_s):
                reader, writer = await asyncio.open_connection(self._host, host_port)
                try:
                    writer.write(request)
                    status_line = await reader.readline()
                finally:
                    writer.transport.abort()  # nothing more to read or say
        except (OSError, TimeoutError, ValueError):
            return False
        parts = status_line.split(None, 2)  # b"HTTP/1.1", b"200", b"OK\r\n"
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/"):
            return False
        return len(parts[1]) == 3 and parts[1].startswith(b"2") and parts[1].isdigit()
