"""How a skill agent uses the hello service once deploy-agent has placed it."""

from __future__ import annotations

import sys
import urllib.request

from deploy_agent.client import ComputeNodes

if __name__ == "__main__":
    with ComputeNodes.from_env() as nodes:
        placed = nodes.ensure("examples/hello/service.yaml")
    with urllib.request.urlopen(placed["host"] + "/", timeout=5) as response:
        sys.stdout.write(response.read().decode())
