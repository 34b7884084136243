"""create_app: wiring of config, the backend (built by backends.build), deployer and loops.

The services' context builds the backend, adopts what runs, starts the supervised loops
before `yield`, and after it stops them, rolls back, flushes and closes, in that order.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import aiodocker
from aiohttp import web
from aiohttp.typedefs import Middleware

from deploy_agent.api import (
    CACHES_KEY,
    CONFIG_KEY,
    CONVERTER_KEY,
    DEPLOYER_KEY,
    EVENTS_KEY,
    IMAGES_KEY,
    METRICS_KEY,
    RECONCILER_KEY,
    STREAMS_KEY,
    TABLE_KEY,
    add_routes,
    error_middleware,
)
from deploy_agent.auth import auth_middleware
from deploy_agent.backends import build
from deploy_agent.browsers import host_middleware, own_host_names
from deploy_agent.config import Config
from deploy_agent.convert import make_converter
from deploy_agent.deployer import Deployer
from deploy_agent.disk_api import add_disk_routes
from deploy_agent.events import EventLog
from deploy_agent.gpus import GpuInventory
from deploy_agent.metrics import AgentMetrics
from deploy_agent.models import Service
from deploy_agent.page import add_page
from deploy_agent.streams import Streams
from deploy_agent.supervise import Supervisor

_LOGGER = logging.getLogger(__name__)


def create_app(config: Config, *, docker: aiodocker.Docker | None = None,
               gpus: GpuInventory | None = None) -> web.Application:
    """The aiohttp app; `docker` and `gpus` let tests hand in their own engine client and GPUs."""
    middlewares: list[Middleware] = [error_middleware, host_middleware(own_host_names(config))]
    if config.token is not None:
        middlewares.append(auth_middleware(config.token))
    app = web.Application(client_max_size=config.max_body_bytes, middlewares=middlewares)
    app[CONFIG_KEY] = config
    app[CONVERTER_KEY] = make_converter()
    app[STREAMS_KEY] = Streams(config.max_streams)
    add_routes(app)
    add_disk_routes(app)
    add_page(app)

    async def services_ctx(app: web.Application) -> AsyncIterator[None]:
        events = EventLog(config.state_dir)
        await asyncio.to_thread(events.load)
        backend = await build(config, app[CONVERTER_KEY], events, docker=docker, gpus=gpus)
        table, reconciler = backend.table, backend.reconciler
        images, caches = backend.images, backend.caches

        async def deployed(service: Service) -> None:
            await caches.touch(service.spec)
            if service.cold_start is not None:
                await images.deployed(service.spec.image, service.spec.name, service.cold_start)
                app[METRICS_KEY].cold_start(service.cold_start)

        async def stopped(service: Service) -> None:
            await caches.touch(service.spec)

        deployer = Deployer(config, backend.runtime, table, events, deployed, stopped,
                            images.cold_start_of)
        supervisor = Supervisor()
        app[TABLE_KEY] = table
        app[EVENTS_KEY] = events
        app[DEPLOYER_KEY] = deployer
        app[RECONCILER_KEY] = reconciler
        app[IMAGES_KEY] = images
        app[CACHES_KEY] = caches
        app[METRICS_KEY] = AgentMetrics(table, reconciler, supervisor, app[STREAMS_KEY], events)
        try:
            await reconciler.start_up()
        except BaseException:
            await backend.close()
            raise
        for name, loop in reconciler.loops().items():
            supervisor.start(name, loop)
        supervisor.start("state-file", table.keep_written)
        supervisor.start("stream-watch", app[STREAMS_KEY].watch)
        supervisor.start("event-log", events.keep_written)
        supervisor.start("enforce", deployer.enforce)
        supervisor.start("caches", caches.keep_measured)
        if config.prepull:  # in the background: readiness does not wait for it
            supervisor.start("prepull", lambda: images.prepull(config.prepull), once=True)
        yield
        try:
            await supervisor.close()
            await deployer.close()
            await events.flush()
            await reconciler.close()  # the swarm's lock, once nothing touches the swarm any more
        finally:
            await backend.close()

    async def end_streams(app: web.Application) -> None:
        app[STREAMS_KEY].end_all()
        if DEPLOYER_KEY in app:
            app[DEPLOYER_KEY].admission.close()  # waiters are refused at once, not at the end

    app.cleanup_ctx.append(services_ctx)
    app.on_shutdown.append(end_streams)  # before the server waits for handlers to finish
    return app
