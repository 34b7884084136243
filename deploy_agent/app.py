"""create_app: wiring of config, engine, service table, deployer and reconciler.

One cleanup_ctx per resource: set up before `yield`, closed after it.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator

import aiodocker
from aiohttp import web
from aiohttp.typedefs import Middleware

from deploy_agent.api import (
    CONFIG_KEY,
    CONVERTER_KEY,
    DEPLOYER_KEY,
    EVENTS_KEY,
    METRICS_KEY,
    RECONCILER_KEY,
    STREAMS_KEY,
    SWARM_LOCK_KEY,
    TABLE_KEY,
    add_routes,
    error_middleware,
)
from deploy_agent.auth import auth_middleware
from deploy_agent.browsers import host_middleware, own_host_names
from deploy_agent.config import Config
from deploy_agent.convert import make_converter
from deploy_agent.deployer import Deployer
from deploy_agent.engine import Engine, close_docker, open_docker
from deploy_agent.events import EventLog
from deploy_agent.gpus import GpuInventory, GpuPool, open_inventory
from deploy_agent.hostview import HostView
from deploy_agent.local import LocalRuntime
from deploy_agent.metrics import AgentMetrics
from deploy_agent.page import add_page
from deploy_agent.ports import NodePorts
from deploy_agent.probe import HealthProbe
from deploy_agent.reconciler import Reconciler
from deploy_agent.runtime import Runtime
from deploy_agent.state import StateFile
from deploy_agent.streams import Streams
from deploy_agent.supervise import Supervisor
from deploy_agent.swarm import SwarmEngine, SwarmGpus, SwarmRuntime
from deploy_agent.swarm_lock import SwarmLock
from deploy_agent.swarm_reconciler import SwarmReconciler
from deploy_agent.table import ServiceTable

_LOGGER = logging.getLogger(__name__)

ENGINE_KEY = web.AppKey("engine", Engine)
GPUS_KEY = web.AppKey("gpus", GpuPool)
# Control calls are short and bounded; streams have a pool of their own, capped by --max-streams.
CONTROL_CONNECTIONS = 100


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
    add_page(app)

    async def engine_ctx(app: web.Application) -> AsyncIterator[None]:
        if docker is not None:
            control = streams = docker
            owned = []
        else:
            control = open_docker(config.docker_host, CONTROL_CONNECTIONS)
            streams = open_docker(config.docker_host, 0)  # no limit: --max-streams bounds it
            owned = [control, streams]
        kind = SwarmEngine if config.swarm else Engine
        app[ENGINE_KEY] = kind(control, streams, instance=config.instance,
                               timeout_s=config.engine_timeout_s,
                               pull_stall_s=config.pull_stall_timeout_s)
        yield
        for client in owned:
            await close_docker(client)

    async def gpus_ctx(app: web.Application) -> AsyncIterator[None]:
        inventory: GpuInventory
        if gpus is not None:
            inventory = gpus
        elif config.swarm:
            inventory = SwarmGpus()  # from the nodes' engine labels, read by the reconciler
        else:
            inventory = await asyncio.to_thread(open_inventory, config.fake_gpus)
        pool = GpuPool(inventory)
        await pool.refresh({})
        app[GPUS_KEY] = pool
        yield
        await asyncio.to_thread(inventory.close)

    async def services_ctx(app: web.Application) -> AsyncIterator[None]:
        probe = HealthProbe(config.health_host)
        converter = app[CONVERTER_KEY]
        state_file = StateFile(config.state_dir, converter)
        table = ServiceTable(NodePorts(config.port_range, remote=config.swarm), app[GPUS_KEY],
                             state_file)
        events = EventLog(config.state_dir)
        await asyncio.to_thread(events.load)
        engine = app[ENGINE_KEY]
        common = (table, engine, probe, state_file, converter, events, config.resync_interval_s,
                  config.instance, HostView(), config.allow_host_paths)
        runtime: Runtime
        reconciler: Reconciler
        lock: SwarmLock | None = None
        if isinstance(engine, SwarmEngine):
            inventory = app[GPUS_KEY].inventory
            assert isinstance(inventory, SwarmGpus)
            runtime = swarm = SwarmRuntime(config, engine, probe, table, converter, inventory, events)
            lock = SwarmLock(engine, config.state_dir, config.instance,
                             f"{socket.gethostname()} port {config.port}")
            app[SWARM_LOCK_KEY] = lock
            reconciler = SwarmReconciler(*common, swarm=engine, runtime=swarm,
                                         node_grace_s=config.node_grace_s, lock=lock)
        else:
            runtime = LocalRuntime(config, engine, probe, table, converter)
            reconciler = Reconciler(*common)
        deployer = Deployer(config, runtime, table, events)
        supervisor = Supervisor()
        app[TABLE_KEY] = table
        app[EVENTS_KEY] = events
        app[DEPLOYER_KEY] = deployer
        app[RECONCILER_KEY] = reconciler
        app[METRICS_KEY] = AgentMetrics(table, reconciler, supervisor, app[STREAMS_KEY], events)
        await reconciler.start_up()
        supervisor.start("engine-watch", reconciler.watch_engine)
        supervisor.start("events", reconciler.follow_events)
        supervisor.start("resync", reconciler.resync_forever)
        supervisor.start("state-file", table.keep_written)
        supervisor.start("stream-watch", app[STREAMS_KEY].watch)
        supervisor.start("event-log", events.keep_written)
        supervisor.start("enforce", deployer.enforce)
        if lock is not None:
            supervisor.start("swarm-lock", lock.keep_held)
        yield
        await supervisor.close()
        await deployer.close()
        await events.flush()
        probe.close()
        if lock is not None:
            await lock.release()  # last: the agent no longer touches the swarm

    async def end_streams(app: web.Application) -> None:
        app[STREAMS_KEY].end_all()

    app.cleanup_ctx.append(engine_ctx)
    app.cleanup_ctx.append(gpus_ctx)
    app.cleanup_ctx.append(services_ctx)
    app.on_shutdown.append(end_streams)  # before the server waits for handlers to finish
    return app
