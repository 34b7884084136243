"""One Docker engine: services are containers on this node, its GPUs read through NVML."""

from __future__ import annotations

import asyncio

import aiodocker
import cattrs

from deploy_agent.backends.docker.hostview import HostView
from deploy_agent.backends.docker.reconciler import DockerReconciler
from deploy_agent.backends.docker.runtime import DockerRuntime
from deploy_agent.backends.engine import Engine, open_engine
from deploy_agent.config import Config
from deploy_agent.events import EventLog
from deploy_agent.gpus import GpuInventory, GpuPool, open_inventory
from deploy_agent.ports import NodePorts
from deploy_agent.probe import HealthProbe
from deploy_agent.runtime import Backend
from deploy_agent.state import StateFile
from deploy_agent.table import ServiceTable


async def build(config: Config, converter: cattrs.Converter, events: EventLog, *,
                docker: aiodocker.Docker | None = None, gpus: GpuInventory | None = None) -> Backend:
    """The table, runtime and reconciler of one engine; `docker` and `gpus` are tests' seams."""
    inventory = gpus if gpus is not None else await asyncio.to_thread(open_inventory, config.fake_gpus)
    pool = GpuPool(inventory)
    await pool.refresh({})
    engine, close_engine = open_engine(Engine, config, docker)
    probe = HealthProbe(config.health_host)
    state_file = StateFile(config.state_dir, converter)
    table = ServiceTable(NodePorts(config.port_range), pool, state_file)
    runtime = DockerRuntime(config, engine, probe, table, converter)
    reconciler = DockerReconciler(table, engine, probe, state_file, converter, events,
                                  config.resync_interval_s, config.instance, HostView(),
                                  config.allow_host_paths)

    async def close() -> None:
        probe.close()
        await asyncio.to_thread(inventory.close)
        await close_engine()

    return Backend(table, runtime, reconciler, close)
