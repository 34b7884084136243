"""A Docker Swarm: services are Swarm services the agent places on its nodes and GPUs."""

from __future__ import annotations

import asyncio
import socket

import aiodocker
import cattrs

from deploy_agent.backends.engine import open_engine
from deploy_agent.backends.swarm.engine import SwarmEngine, SwarmGpus
from deploy_agent.backends.swarm.lock import SwarmLock
from deploy_agent.backends.swarm.reconciler import SwarmReconciler
from deploy_agent.backends.swarm.runtime import SwarmRuntime
from deploy_agent.config import Config
from deploy_agent.events import EventLog
from deploy_agent.gpus import GpuInventory, GpuPool
from deploy_agent.ports import NodePorts
from deploy_agent.probe import HealthProbe
from deploy_agent.runtime import Backend
from deploy_agent.state import StateFile
from deploy_agent.table import ServiceTable


async def build(config: Config, converter: cattrs.Converter, events: EventLog, *,
                docker: aiodocker.Docker | None = None, gpus: GpuInventory | None = None) -> Backend:
    """The table, runtime and reconciler in front of the swarm whose manager --docker-host
    names. The GPUs are the nodes' (their engine labels), so `gpus` is not used."""
    del gpus
    inventory = SwarmGpus()  # filled from the nodes' engine labels by the reconciler
    pool = GpuPool(inventory)
    await pool.refresh({})
    engine, close_engine = open_engine(SwarmEngine, config, docker)
    probe = HealthProbe(config.health_host)
    state_file = StateFile(config.state_dir, converter)
    table = ServiceTable(NodePorts(config.port_range), pool, state_file)
    runtime = SwarmRuntime(config, engine, probe, table, converter, inventory, events)
    lock = SwarmLock(engine, config.state_dir, config.instance,
                     f"{socket.gethostname()} port {config.port}")
    reconciler = SwarmReconciler(table, engine, probe, state_file, converter, events,
                                 config.resync_interval_s, config.instance, runtime=runtime,
                                 node_grace_s=config.node_grace_s, lock=lock)

    async def close() -> None:
        probe.close()
        await asyncio.to_thread(inventory.close)
        await close_engine()

    return Backend(table, runtime, reconciler, close)
