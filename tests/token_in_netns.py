"""Run inside a private network namespace by test_secure_by_default.py.

An agent listens on 0.0.0.0 (so it makes and requires a token); a second "node" at
192.0.2.10, an address on this namespace's own loopback device, records the headers it
gets. deployctl runs against both with no token given: it must find the local agent's
token by itself and never send it to the other node. Then with --token: sent to both.

Usage: python3 token_in_netns.py STATE_DIR. Prints one JSON line with what was seen.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from tests.agent_process import installed

OTHER = "192.0.2.10"  # TEST-NET-1, on this namespace's lo: nothing leaves it
seen: list[str | None] = []


class Recorder(BaseHTTPRequestHandler):
    """Answers like an empty agent, and notes every Authorization header it is sent."""

    def do_GET(self) -> None:  # the name http.server calls
        seen.append(self.headers.get("Authorization"))
        body = {"/health": {"status": "ok", "hostname": "other", "gpus": 0, "services_running": 0,
                            "engine": "reachable", "version": "x", "auth": "off", "warnings": []},
                "/services": [], "/gpus": []}.get(self.path, {})
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


state_dir = Path(sys.argv[1])
env = {k: v for k, v in os.environ.items()
       if k not in ("COMPUTE_NODES", "DEPLOY_AGENT_TOKEN", "DEPLOY_AGENT_TOKEN_FILE")}
agent = subprocess.Popen([installed("deploy-agent"), "--host", "0.0.0.0", "--port", "9000",
                          "--state-dir", str(state_dir), "--instance", "token-netns-test"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
server = ThreadingHTTPServer((OTHER, 9001), Recorder)  # 9000 is the agent's, on 0.0.0.0
threading.Thread(target=server.serve_forever, daemon=True).start()
try:
    for _ in range(200):
        try:
            urllib.request.urlopen("http://127.0.0.1:9000/health", timeout=1).close()
            break
        except OSError:
            time.sleep(0.05)
    nodes = {**env, "COMPUTE_NODES": f"http://127.0.0.1:9000,http://{OTHER}:9001",
             "DEPLOY_AGENT_STATE_DIR": str(state_dir)}
    found = subprocess.run([installed("deployctl"), "ps", "--json"], capture_output=True,
                           text=True, env=nodes, timeout=60)
    headers_found = list(seen)
    seen.clear()
    given = subprocess.run([installed("deployctl"), "ps", "--json", "--token", "given-token"],
                           capture_output=True, text=True, env=nodes, timeout=60)
    print(json.dumps({"found_rc": found.returncode, "found_err": found.stderr,
                      "other_saw_when_found": headers_found,
                      "given_rc": given.returncode, "other_saw_when_given": list(seen)}))
finally:
    server.shutdown()
    agent.terminate()
    agent.wait(timeout=30)
