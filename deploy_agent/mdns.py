"""mDNS (the spec's discovery option 3): agents advertise `_tidybot-compute._tcp`.

zeroconf is imported only here, and only when --mdns is on or a client browses, so it
stays out of the daemon's memory otherwise (pip install 'deploy-agent[mdns]').
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from collections.abc import AsyncIterator
from typing import Any

from deploy_agent import __version__

_LOGGER = logging.getLogger(__name__)

SERVICE_TYPE = "_tidybot-compute._tcp.local."


def _service_info(advertise_host: str, port: int) -> Any:
    from zeroconf import ServiceInfo

    hostname = socket.gethostname().split(".")[0] or "deploy-agent"
    url = f"http://{advertise_host}:{port}"
    addresses = []
    with contextlib.suppress(ValueError):
        addresses.append(ipaddress.ip_address(advertise_host).packed)
    return ServiceInfo(
        SERVICE_TYPE, f"{hostname}-{port}.{SERVICE_TYPE}", port=port, addresses=addresses,
        server=f"{hostname}.local.", properties={"url": url, "version": __version__},
    )


@contextlib.asynccontextmanager
async def advertised(advertise_host: str, port: int) -> AsyncIterator[None]:
    """Advertise this agent for as long as the context lasts."""
    from zeroconf import IPVersion
    from zeroconf.asyncio import AsyncZeroconf

    info = _service_info(advertise_host, port)
    zeroconf = AsyncZeroconf(ip_version=IPVersion.V4Only)
    await zeroconf.async_register_service(info)
    _LOGGER.info("Advertising %s over mDNS as %s", info.properties[b"url"].decode(), info.name)
    try:
        yield
    finally:
        await zeroconf.async_unregister_service(info)
        await zeroconf.async_close()


async def discover(timeout_s: float = 2.0) -> list[str]:
    """The URLs of agents that answer on mDNS within timeout_s, sorted."""
    from zeroconf import IPVersion, ServiceStateChange
    from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

    zeroconf = AsyncZeroconf(ip_version=IPVersion.V4Only)
    names: set[str] = set()

    def on_change(zeroconf: Any, service_type: str, name: str, state_change: Any) -> None:
        if state_change is not ServiceStateChange.Removed:
            names.add(name)

    browser = AsyncServiceBrowser(zeroconf.zeroconf, SERVICE_TYPE, handlers=[on_change])
    try:
        await asyncio.sleep(timeout_s)
        urls = set()
        for name in names:
            info = AsyncServiceInfo(SERVICE_TYPE, name)
            if await info.async_request(zeroconf.zeroconf, 1000):
                url = (info.properties or {}).get(b"url")
                if url:
                    urls.add(url.decode())
        return sorted(urls)
    finally:
        await browser.async_cancel()
        await zeroconf.async_close()
