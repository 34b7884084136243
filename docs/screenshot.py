"""Regenerate docs/status-page.png: the status page of an agent with fake GPUs and a few services.

    python3 docs/screenshot.py

Needs what the tests need: a running Docker engine with the test image
(tests/images/build.sh), and Debian's chromium and chromium-driver. Everything it deploys
is removed afterwards.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.agent_process import AgentProcess, post_json  # noqa: E402 - needs the path above
from tests.browser import chromium, console_errors  # noqa: E402

IMAGE = "deploy-agent-test/httpd:1"
SERVICES = [
    {"name": "yolo-service", "gpu": True, "vram_gb": 8},
    {"name": "sam-segmentation", "gpu": True, "vram_gb": 14, "lease_s": 3600},
    {"name": "grasp-planner", "gpu": True, "vram_gb": 6},
    {"name": "speech-to-text", "lease_s": 1800},
]


def main() -> int:
    with tempfile.TemporaryDirectory() as workdir:
        agent = AgentProcess(Path(workdir) / "state", "--fake-gpus", "RTX 4090:24,RTX 4090:24",
                             "--instance", "docs-screenshot")
        agent.start()
        browser = chromium(Path(workdir) / "chromium", width=1280, height=900)
        try:
            for service in SERVICES:
                status, answer = post_json(agent.url + "/deploy", {"image": IMAGE, **service})
                assert status == 200, answer
            browser.get(agent.url + "/")
            time.sleep(3)  # a few refreshes: everything rendered
            height = browser.execute_script("return document.documentElement.scrollHeight")
            browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {  # the whole page
                "width": 1280, "height": height, "deviceScaleFactor": 1, "mobile": False})
            time.sleep(1)
            target = ROOT / "docs" / "status-page.png"
            browser.save_screenshot(str(target))
            errors = console_errors(browser)
            print(f"wrote {target}" + (f"; console errors: {errors}" if errors else ""))
            return 1 if errors else 0
        finally:
            browser.quit()
            for service in SERVICES:
                post_json(agent.url + "/stop", {"name": service["name"]})
            agent.close()


if __name__ == "__main__":
    sys.exit(main())
