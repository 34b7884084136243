"""create_app: wiring of config, engine, deployer and reconciler, with one cleanup_ctx each."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import aiodocker
from aiohttp import web
from aiohttp.typedefs import Middleware

from deploy_agent.api import (
    CONFIG_KEY,
    CONVERTER_KEY,
    DEPLOYER_KEY,
    GPUS_KEY,
    METRICS_KEY,
    RECONCILER_KEY,
    add_routes,
    error_middleware,
)
from deploy_agent.auth import auth_middleware
from deploy_agent.config import Config
from deploy_agent.convert import make_converter
from deploy_agent.deployer import Deployer
from deploy_agent.engine import Engine
from deploy_agent.gpus import GpuInventory, GpuPool, open_inventory
from deploy_agent.metrics import AgentMetrics
from deploy_agent.probe import HealthProbe
from deploy_agent.reconciler import Reconciler
from deploy_agent.state import StateFile

_LOGGER = logging.getLogger(__name__)

ENGINE_KEY = web.AppKey("engine", Engine)


def create_app(config: Config, *, docker: aiodocker.Docker | None = None,
               gpus: GpuInventory | None = None) -> web.Application:
    """The aiohttp app; `docker` and `gpus` let tests hand in their own engine client and GPUs."""
    middlewares: list[Middleware] = [error_middleware]
    if config.token is not None:
        middlewares.append(auth_middleware(config.token))
    app = web.Application(client_max_size=config.max_body_bytes, middlewares=middlewares)
    app[CONFIG_KEY] = config
    app[CONVERTER_KEY] = make_converter()
    add_routes(app)

    async def engine_ctx(app: web.Application) -> AsyncIterator[None]:
        engine = Engine(docker or aiodocker.Docker(url=config.docker_host), config.instance)
        app[ENGINE_KEY] = engine
        yield
        if docker is None:
            await engine.close()

    async def gpus_ctx(app: web.Application) -> AsyncIterator[None]:
        inventory: GpuInventory = (
            gpus if gpus is not None else await asyncio.to_thread(open_inventory, config.fake_gpus))
        pool = GpuPool(inventory)
        await pool.refresh(frozenset())
        app[GPUS_KEY] = pool
        yield
        await asyncio.to_thread(inventory.close)

    async def services_ctx(app: web.Application) -> AsyncIterator[None]:
        probe = HealthProbe(config.health_host)
        converter = app[CONVERTER_KEY]
        state_file = StateFile(config.state_dir, converter)
        deployer = Deployer(config, app[ENGINE_KEY], probe, app[GPUS_KEY], state_file, converter)
        reconciler = Reconciler(deployer, app[ENGINE_KEY], probe, state_file, converter,
                                config.resync_interval_s, config.instance)
        app[DEPLOYER_KEY] = deployer
        app[RECONCILER_KEY] = reconciler
        app[METRICS_KEY] = AgentMetrics(deployer, app[GPUS_KEY], reconciler)
        await reconciler.start_up()
        task = asyncio.create_task(reconciler.run(), name="reconciler")
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await deployer.close()
        probe.close()

    app.cleanup_ctx.append(engine_ctx)
    app.cleanup_ctx.append(gpus_ctx)
    app.cleanup_ctx.append(services_ctx)
    return app
