"""Bearer-token authentication: every request but GET /health and the status page's files
carries the node's token."""

from __future__ import annotations

import hmac
import logging

import attrs
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from deploy_agent.config import Config
from deploy_agent.errors import Unauthorized
from deploy_agent.page import is_page
from deploy_agent.tokens import TOKEN_FILE, TokenError, is_loopback, load_or_create

_LOGGER = logging.getLogger(__name__)

PUBLIC = {("GET", "/health")}


def auth_middleware(token: str) -> Middleware:
    """A middleware that refuses requests without `Authorization: Bearer <token>`."""
    expected = token.encode()

    @web.middleware
    async def check_token(request: web.Request, handler: Handler) -> web.StreamResponse:
        if (request.method, request.path) not in PUBLIC and not is_page(request.path):
            scheme, _, offered = request.headers.get("Authorization", "").partition(" ")
            # compare_digest: the time taken must not tell how much of the token was right.
            if scheme.lower() != "bearer" or not hmac.compare_digest(offered.strip().encode(), expected):
                raise Unauthorized(
                    "This agent needs 'Authorization: Bearer <token>'; the request had no token "
                    "or a wrong one. On the node, `deploy-agent token` prints it."
                )
        return await handler(request)

    return check_token


def settle_auth(config: Config) -> Config:
    """Decide whether requests need a token, making one if the agent listens beyond loopback.

    A configured token always applies. Beyond loopback without one, the agent uses the
    token in STATE_DIR/token, made on first start; --no-auth is the only way to run open
    there. A loopback-only agent stays open unless a token is configured.
    """
    if config.token is not None:
        return config
    if config.no_auth:
        if not is_loopback(config.host):
            _LOGGER.warning(
                "NO AUTHENTICATION (--no-auth): anyone who can reach %s:%s can run containers on "
                "this node, which means root on it.", config.host, config.port)
        return config
    if is_loopback(config.host):
        return config
    try:
        token, made = load_or_create(config.state_dir)
    except (OSError, TokenError) as err:
        raise SystemExit(f"deploy-agent: cannot use the token in {config.state_dir / TOKEN_FILE}: "
                         f"{getattr(err, 'strerror', None) or err}") from None
    _LOGGER.info("Authentication is on: requests need the bearer token %s %s; "
                 "`deploy-agent token` prints it for DEPLOY_AGENT_TOKEN on callers",
                 "made and kept in" if made else "kept in", config.state_dir / TOKEN_FILE)
    return attrs.evolve(config, token=token)
