"""The backends: what runs the services. `docker/` on one engine, `swarm/` in front of a
Docker Swarm, each with its runtime and reconciler behind deploy_agent.runtime's protocols;
`engine.py` is the Docker Engine API adapter both speak through and `reconcile.py` the loops
their reconcilers share. The app reaches them only through build()."""

from __future__ import annotations

import aiodocker
import cattrs

from deploy_agent.config import Config
from deploy_agent.events import EventLog
from deploy_agent.gpus import GpuInventory
from deploy_agent.runtime import Backend


async def build(config: Config, converter: cattrs.Converter, events: EventLog, *,
                docker: aiodocker.Docker | None = None, gpus: GpuInventory | None = None) -> Backend:
    """The backend the config asks for (--swarm or not), built; the app needs nothing else."""
    if config.swarm:
        from deploy_agent.backends import swarm
        return await swarm.build(config, converter, events, docker=docker, gpus=gpus)
    from deploy_agent.backends import docker as one_engine
    return await one_engine.build(config, converter, events, docker=docker, gpus=gpus)
