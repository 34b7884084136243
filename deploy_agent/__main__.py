"""`deploy-agent`: parse flags, set up logging, check the state dir, serve the API."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import resource
import signal
import sys
from collections.abc import Coroutine, Sequence
from typing import Any

from aiohttp import http_exceptions, web

from deploy_agent.api import RECONCILER_KEY
from deploy_agent.app import create_app
from deploy_agent.auth import settle_auth
from deploy_agent.config import Config, config_from, parse_args
from deploy_agent.errors import StartingUp, SwarmTaken
from deploy_agent.gpus import gpu_label, open_inventory
from deploy_agent.systemd import notify
from deploy_agent.tokens import TOKEN_FILE, TokenError, read_token_file

_LOGGER = logging.getLogger("deploy_agent")


class QuietMalformedRequests(logging.Filter):
    """aiohttp logs each malformed HTTP request at ERROR with a traceback, though it has
    already answered it with 400; that is the client's mistake, not the agent's."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not isinstance(error, http_exceptions.BadHttpMessage)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "token":
        return print_token(args)
    if args.command == "gpus":
        return print_gpus(args.label)
    config = config_from(args, os.environ)
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
    config = settle_auth(config)
    raise_open_files_limit()
    try:
        asyncio.run(serve(config))
    except SwarmTaken as err:
        raise SystemExit(f"deploy-agent: {err}") from None
    _LOGGER.info("Stopped; services keep running")
    return 0


def print_token(args: argparse.Namespace) -> int:
    """`deploy-agent token`: the token callers need, on stdout, nothing else."""
    path = args.token_file or args.state_dir / TOKEN_FILE
    try:
        sys.stdout.write(read_token_file(path) + "\n")
    except TokenError as err:
        hint = "" if args.token_file else (
            "; the agent makes it on its first start beyond loopback (not with --no-auth)")
        raise SystemExit(f"deploy-agent: {err}{hint}") from None
    return 0


def print_gpus(as_label: bool) -> int:
    """`deploy-agent gpus [--label]`: this node's GPUs from NVML; with --label, the engine
    label line a swarm manager reads them from."""
    inventory = open_inventory(None)
    try:
        readings = inventory.read()
    finally:
        inventory.close()
    if as_label:
        sys.stdout.write(gpu_label(readings) + "\n")
        return 0
    for r in readings:
        sys.stdout.write(f"{r.index}  {r.uuid}  {r.name}  {r.total_gb:.1f} GB\n")
    if not readings:
        sys.stdout.write("no GPUs (no NVIDIA driver, or no GPU)\n")
    return 0


def raise_open_files_limit() -> None:
    """Each follow holds two sockets (its client's and the engine's): lift the soft
    open-files limit to the hard one, as servers do, so --max-streams fits."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        _LOGGER.debug("Open-files limit raised from %s to %s", soft, hard)


async def serve(config: Config) -> None:
    """Serve until SIGTERM or SIGINT, telling systemd when ready and when stopping.

    READY=1 goes out only once start-up reconcile is done and the port accepts requests.
    On a signal: stop accepting, give deploys in flight shutdown_timeout_s, roll back what
    is left and flush state (the app's cleanup). Services keep running.
    """
    runner = web.AppRunner(create_app(config), access_log=None,
                           shutdown_timeout=config.shutdown_timeout_s)
    placeholder = await answer_starting(config)
    try:
        await runner.setup()  # runs the cleanup contexts' start-up: engine, GPUs, reconcile
    finally:
        await placeholder.cleanup()
    try:
        await web.TCPSite(runner, config.host, config.port).start()
        _LOGGER.info("Serving on %s:%s", config.host, config.port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        async with contextlib.AsyncExitStack() as stack:
            if config.mdns:
                from deploy_agent.mdns import advertised  # zeroconf only when asked for

                await stack.enter_async_context(advertised(config.advertise_host, config.port))
            notify("READY=1")
            displaced = runner.app[RECONCILER_KEY].displaced
            await _first(stop.wait(), displaced.wait())
            notify("STOPPING=1")
            _LOGGER.info("Shutting down")
    finally:
        stopping = await stop_serving(runner, config)
        try:
            await runner.cleanup()  # deploys in flight get shutdown_timeout_s; rollback; flush
        finally:
            if stopping is not None:
                await stopping.cleanup()
    if displaced.is_set():
        told = "; ".join(w.message for w in runner.app[RECONCILER_KEY].warnings())
        raise SystemExit(f"deploy-agent: stopped serving: {told or 'another agent took its place'}")


async def stop_serving(runner: web.AppRunner, config: Config) -> web.AppRunner | None:
    """Stop taking requests; while shutdown lets deploys in flight finish, the port answers
    503 `starting_up` (the agent is restarting, as far as a caller can tell), not a refusal."""
    for site in list(runner.sites):
        await site.stop()
    try:
        return await answer_starting(config, "The agent is stopping (to restart, most likely); "
                                             "ask again in a moment.")
    except OSError:
        return None  # the port went to someone else: callers see it refused


async def answer_starting(config: Config, message: str | None = None) -> web.AppRunner:
    """While start-up runs (adopting what the engine runs can take a while), the port answers
    503 `starting_up` to everything, so a caller can tell a restarting agent, which may run
    the service it looks for, from a node that is down."""
    body = StartingUp(message or "The agent is starting: it is adopting what runs on this "
                      "node; ask again in a moment.").to_json()

    async def starting(request: web.Request) -> web.Response:
        return web.json_response(body, status=StartingUp.status, headers={"Retry-After": "1"})

    app = web.Application()
    app.router.add_route("*", "/{path:.*}", starting)
    placeholder = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await placeholder.setup()
    try:
        await web.TCPSite(placeholder, config.host, config.port).start()
    except BaseException:
        await placeholder.cleanup()
        raise
    return placeholder


async def _first(*waits: Coroutine[Any, Any, Any]) -> None:
    """Until the first of `waits` is done; the others are cancelled."""
    tasks = [asyncio.ensure_future(wait) for wait in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


if __name__ == "__main__":
    sys.exit(main())
