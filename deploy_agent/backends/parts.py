"""What every backend's build() makes the same way: the GPU pool over its inventory, the
engine adapter, the health probe, services.json and the service table, and how to close them."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import aiodocker
import attrs
import cattrs

from deploy_agent.backends.engine import E, open_engine
from deploy_agent.config import Config
from deploy_agent.gpus import GpuInventory, GpuPool
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
    close: Callable[[], Awaitable[None]]  # the probe, the inventory, the engine clients


async def common_parts(kind: type[E], config: Config, converter: cattrs.Converter,
                       inventory: GpuInventory, docker: aiodocker.Docker | None) -> tuple[E, Parts]:
    """The engine adapter of `kind` and the parts around it."""
    pool = GpuPool(inventory)
    await pool.refresh({})
    engine, close_engine = open_engine(kind, config, docker)
    probe = HealthProbe(config.health_host)
    state_file = StateFile(config.state_dir, converter)
    table = ServiceTable(NodePorts(config.port_range), pool, state_file)

    async def close() -> None:
        probe.close()
        await asyncio.to_thread(inventory.close)
        await close_engine()

    return engine, Parts(probe, state_file, table, close)
