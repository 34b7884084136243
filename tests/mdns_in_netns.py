"""Run inside a private network namespace by test_mdns.py: an agent advertises, a client finds it.

Usage: python3 mdns_in_netns.py STATE_DIR. Prints one JSON line with what was found.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from deploy_agent.client import ComputeNodes
from tests.agent_process import installed

state_dir = Path(sys.argv[1])
port = 9000  # the namespace is ours alone: no other listener can be on it, no one else reaches it
address = "10.200.0.1"  # test_mdns.py gives the namespace's loopback this address too
agent = subprocess.Popen(
    [installed("deploy-agent"), "--mdns", "--host", address, "--port", str(port), "--no-auth",
     "--state-dir", str(state_dir), "--advertise-host", address, "--instance", "mdns-test"],
    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    env={k: v for k, v in os.environ.items() if k != "COMPUTE_NODES"},
)
try:
    for _ in range(200):
        try:
            urllib.request.urlopen(f"http://{address}:{port}/health", timeout=1).close()
            break
        except OSError:
            time.sleep(0.05)
    os.environ.pop("COMPUTE_NODES", None)
    # An agent announces itself once it serves; on a loaded machine the announcement can miss
    # one 2 s browse, so a few browses are allowed before "not found" is the answer.
    for attempt in range(5):
        try:
            with ComputeNodes.from_env(timeout_s=2.0) as nodes:
                found = nodes.urls
                reachable = [s["reachable"] for s in nodes.status()]
            break
        except ValueError:  # no compute nodes found
            if attempt == 4:
                raise
    print(json.dumps({"found": found, "reachable": reachable}))
finally:
    agent.terminate()
    agent.wait(timeout=30)
