"""One Docker engine: services are containers on this node, its GPUs read through NVML."""

from __future__ import annotations

import asyncio

import aiodocker
import cattrs

from deploy_agent.backends.docker.hostview import HostView
from deploy_agent.backends.docker.reconciler import DockerReconciler
from deploy_agent.backends.docker.runtime import DockerRuntime
from deploy_agent.backends.engine import Engine
from deploy_agent.backends.parts import common_parts
from deploy_agent.config import Config
from deploy_agent.events import EventLog
from deploy_agent.gpus import GpuInventory, open_inventory
from deploy_agent.runtime import Backend


async def build(config: Config, converter: cattrs.Converter, events: EventLog, *,
                docker: aiodocker.Docker | None = None, gpus: GpuInventory | None = None) -> Backend:
    """The table, runtime and reconciler of one engine; `docker` and `gpus` are tests' seams."""
    inventory = gpus if gpus is not None else await asyncio.to_thread(open_inventory, config.fake_gpus)
    engine, parts = await common_parts(Engine, config, converter, inventory, docker, events)
    runtime = DockerRuntime(config, engine, parts.probe, parts.table, converter)
    reconciler = DockerReconciler(parts.table, engine, parts.probe, parts.state_file, converter, events,
                                  config.resync_interval_s, config.instance, HostView(),
                                  config.allow_host_paths)
    return Backend(parts.table, runtime, reconciler, parts.images, parts.caches, parts.close)
