"""What every backend's build() makes the same way: the GPU pool over its inventory, the
engine adapter, the health probe, services.json and the service table, the images and caches,
and how to close them."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import aiodocker
import attrs
import cattrs

from deploy_agent.backends.engine import E, open_engine
from deploy_agent.caches import Caches
from deploy_agent.config import Config
from deploy_agent.events import EventLog
from deploy_agent.gpus import GpuInventory, GpuPool
from deploy_agent.images import ImageStore
from deploy_agent.ports import NodePorts
from deploy_agent.probe import HealthProbe
from deploy_agent.state import StateFile
from deploy_agent.table import ServiceTable


@attrs.frozen
class Parts:
    """The parts around a backend's engine adapter that its runtime and reconciler share."""

    probe: HealthProbe
    state_file: StateFile
    table: ServiceTable
    images: ImageStore
    caches: Caches
    close: Callable[[], Awaitable[None]]  # the probe, the inventory, the engine clients


async def common_parts(kind: type[E], config: Config, converter: cattrs.Converter,
                       inventory: GpuInventory, docker: aiodocker.Docker | None,
                       events: EventLog, *, can_pull: bool = True) -> tuple[E, Parts]:
    """The engine adapter of `kind` and the parts around it."""
    pool = GpuPool(inventory)
    await pool.refresh({})
    engine, close_engine = open_engine(kind, config, docker)
    probe = HealthProbe(config.health_host)
    state_file = StateFile(config.state_dir, converter)
    table = ServiceTable(NodePorts(config.port_range), pool, state_file)
    images = ImageStore(engine, config, converter, can_pull=can_pull)
    caches = Caches(engine, table, config, events)
    await asyncio.gather(asyncio.to_thread(images.load), asyncio.to_thread(caches.load))

    async def close() -> None:
        probe.close()
        await asyncio.to_thread(inventory.close)
        await close_engine()

    return engine, Parts(probe, state_file, table, images, caches, close)
