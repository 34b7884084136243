"""HTTP health probes of services, through their published host ports."""

from __future__ import annotations

import aiohttp


class HealthProbe:
    """One GET of a service's health path; any 2xx is healthy, anything else is not."""

    def __init__(self, session: aiohttp.ClientSession, host: str) -> None:
        self._session = session
        self._host = host

    def url(self, host_port: int, path: str) -> str:
        return f"http://{self._host}:{host_port}{path}"

    async def healthy(self, host_port: int, path: str, timeout_s: float) -> bool:
        try:
            async with self._session.get(
                self.url(host_port, path),
                timeout=aiohttp.ClientTimeout(total=timeout_s),
                allow_redirects=False,
            ) as response:
                return 200 <= response.status < 300
        except (TimeoutError, aiohttp.ClientError, OSError):
            return False
