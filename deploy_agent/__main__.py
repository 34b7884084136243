"""`deploy-agent`: parse flags, set up logging, check the state dir, serve the API."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

from aiohttp import http_exceptions, web

from deploy_agent.app import create_app
from deploy_agent.auth import warn_if_open
from deploy_agent.config import parse_config

_LOGGER = logging.getLogger("deploy_agent")


class QuietMalformedRequests(logging.Filter):
    """aiohttp logs each malformed HTTP request at ERROR with a traceback, though it has
    already answered it with 400; that is the client's mistake, not the agent's."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not isinstance(error, http_exceptions.BadHttpMessage)


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_config(argv)
    logging.basicConfig(
        level=config.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("aiohttp.server").addFilter(QuietMalformedRequests())
    try:
        config.state_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SystemExit(f"deploy-agent: cannot create state dir {config.state_dir}: "
                         f"{err.strerror}") from None
    if not os.access(config.state_dir, os.W_OK):
        raise SystemExit(f"deploy-agent: state dir {config.state_dir} is not writable")
    warn_if_open(config.host, config.port, config.token)
    # SIGTERM and SIGINT: stop accepting, give deploys in flight shutdown_timeout_s, then
    # roll back what is left and flush state (app cleanup); services keep running.
    web.run_app(create_app(config), host=config.host, port=config.port, print=None,
                access_log=None, shutdown_timeout=config.shutdown_timeout_s)
    _LOGGER.info("Stopped; services keep running")
    return 0


if __name__ == "__main__":
    sys.exit(main())
