"""A Docker Swarm: services are Swarm services the agent places on its nodes and GPUs."""

from __future__ import annotations

import socket

import aiodocker
import cattrs

from deploy_agent.backends.parts import common_parts
from deploy_agent.backends.swarm.engine import SwarmEngine, SwarmGpus
from deploy_agent.backends.swarm.lock import SwarmLock
from deploy_agent.backends.swarm.reconciler import SwarmReconciler
from deploy_agent.backends.swarm.runtime import SwarmRuntime
from deploy_agent.config import Config
from deploy_agent.events import EventLog
from deploy_agent.gpus import GpuInventory
from deploy_agent.runtime import Backend


async def build(config: Config, converter: cattrs.Converter, events: EventLog, *,
                docker: aiodocker.Docker | None = None, gpus: GpuInventory | None = None) -> Backend:
    """The table, runtime and reconciler in front of the swarm whose manager --docker-host
    names. The GPUs are the nodes' (their engine labels), so `gpus` is not used."""
    del gpus
    inventory = SwarmGpus()  # filled from the nodes' engine labels by the reconciler
    engine, parts = await common_parts(SwarmEngine, config, converter, inventory, docker, events,
                                       can_pull=False)  # the engine can't pull onto other nodes
    runtime = SwarmRuntime(config, engine, parts.probe, parts.table, converter, inventory, events)
    lock = SwarmLock(engine, config.state_dir, config.instance,
                     f"{socket.gethostname()} port {config.port}")
    reconciler = SwarmReconciler(parts.table, engine, parts.probe, parts.state_file, converter, events,
                                 config.resync_interval_s, config.instance, runtime=runtime,
                                 node_grace_s=config.node_grace_s, lock=lock)
    return Backend(parts.table, runtime, reconciler, parts.images, parts.caches, parts.close)
