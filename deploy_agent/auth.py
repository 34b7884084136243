"""Bearer-token authentication: every request but GET /health carries the node's token."""

from __future__ import annotations

import hmac
import ipaddress
import logging

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from deploy_agent.errors import Unauthorized

_LOGGER = logging.getLogger(__name__)

PUBLIC = {("GET", "/health")}


def auth_middleware(token: str) -> Middleware:
    """A middleware that refuses requests without `Authorization: Bearer <token>`."""
    expected = token.encode()

    @web.middleware
    async def check_token(request: web.Request, handler: Handler) -> web.StreamResponse:
        if (request.method, request.path) not in PUBLIC:
            scheme, _, offered = request.headers.get("Authorization", "").partition(" ")
            # compare_digest: the time taken must not tell how much of the token was right.
            if scheme.lower() != "bearer" or not hmac.compare_digest(offered.strip().encode(), expected):
                raise Unauthorized(
                    "This agent needs 'Authorization: Bearer <token>' (see --token-file); "
                    "the request had no token or a wrong one."
                )
        return await handler(request)

    return check_token


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def warn_if_open(host: str, port: int, token: str | None) -> None:
    """Say loudly that anyone on the network can deploy when there is no token."""
    if token is None and not is_loopback(host):
        _LOGGER.warning(
            "NO AUTHENTICATION: anyone who can reach %s:%s can deploy containers on this node, "
            "which means root on it. Set --token-file or DEPLOY_AGENT_TOKEN, or listen on "
            "127.0.0.1.", host, port,
        )
