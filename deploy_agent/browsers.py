"""Keeping web pages out: a page open in a browser on the node must not drive the agent.

Two doors close it. A body must be declared `application/json` (api.read_json), which a
page can only send with a CORS preflight the agent never allows; and a `Host` that is a
name must be one of the agent's own, so a page can't rebind a name of its own to 127.0.0.1
and read the answers (DNS rebinding needs a name; IP literals stay accepted, so callers
on any interface keep working).
"""

from __future__ import annotations

import ipaddress
import socket

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from deploy_agent.config import Config
from deploy_agent.errors import HostNotAllowed

JSON = "application/json"


def own_host_names(config: Config, hostname: str | None = None) -> frozenset[str]:
    """The names a request's Host may carry: localhost, the node's hostname (and its mDNS
    name), --advertise-host when it is a name, and every --allow-host-header."""
    node = (hostname or socket.gethostname()).lower().rstrip(".")
    short = node.split(".")[0]  # what mDNS advertises: <short hostname>.local
    names = {"localhost", node, f"{node}.local", f"{short}.local", config.advertise_host,
             *config.allow_host_headers}
    return frozenset(name.lower().rstrip(".") for name in names if name and not is_ip_literal(name))


def is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def host_of(header: str) -> str:
    """The host part of a Host header: without the port, brackets kept off IPv6."""
    header = header.strip()
    if header.startswith("["):
        return header[1:].partition("]")[0]
    return header.rpartition(":")[0] if header.count(":") == 1 else header


def host_middleware(allowed: frozenset[str]) -> Middleware:
    """Refuse (403 host_not_allowed) a request whose Host is a name not in `allowed`."""

    @web.middleware
    async def check_host(request: web.Request, handler: Handler) -> web.StreamResponse:
        header = request.headers.get("Host")
        if header is not None:
            host = host_of(header)
            if not is_ip_literal(host) and host.lower().rstrip(".") not in allowed:
                raise HostNotAllowed(
                    f"This agent does not answer to the host name {host!r}. Use an address, "
                    "this node's hostname or localhost, or start the agent with "
                    f"--allow-host-header {host}.", host=host)
        return await handler(request)

    return check_host
