"""Check NVML readings and a GPU deploy on a machine with a real NVIDIA GPU.

Not part of the test suite (CI has no GPU): run it by hand where there is one, with the
NVIDIA driver and the NVIDIA Container Toolkit installed and the busybox test image built
(tests/images/build.sh):

    python3 tests/gpu/check_real_gpu.py [--cuda-image IMAGE --cuda-command CMD]

It reads the GPUs through the agent's own NVML inventory, starts an agent on 127.0.0.1
(a temporary state dir, instance `gpu-check`), deploys a GPU service, and checks that the
engine handed over the GPU the agent chose (NVIDIA_VISIBLE_DEVICES=<uuid> in the
container's /proc/1/environ, /dev/nvidia* inside). With --cuda-image (an image with
CUDA, say a PyTorch one) and a command that allocates GPU memory and then serves
/health, it also checks that the memory NVML sees is attributed to the service. Exit 0
when every check passes; everything it creates is removed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from deploy_agent.gpus import NvmlGpus, open_inventory
from tests.agent_process import AgentProcess, get_json, post_json

TEST_IMAGE = "deploy-agent-test/httpd:1"


def check(condition: bool, what: str) -> bool:
    print(f"{'ok  ' if condition else 'FAIL'} {what}")
    return condition


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cuda-image", help="an image with CUDA, for the per-process check")
    parser.add_argument("--cuda-command", help="its command: allocate GPU memory, serve /health")
    args = parser.parse_args()

    inventory = open_inventory(None)
    if not check(isinstance(inventory, NvmlGpus), "NVML opens (driver and nvidia-ml-py present)"):
        return 1
    readings = inventory.read()
    for reading in readings:
        print(f"     GPU {reading.index} {reading.name} {reading.uuid}: {reading.used_gb:.1f} of "
              f"{reading.total_gb:.1f} GB, {len(reading.processes or ())} processes "
              f"(per-process memory {'hidden' if reading.processes is None else 'visible'})")
    ok = check(bool(readings), "at least one GPU")
    inventory.close()

    with tempfile.TemporaryDirectory() as workdir:
        agent = AgentProcess(Path(workdir) / "state", "--instance", "gpu-check")
        agent.start()
        try:
            ok &= check(get_json(agent.url + "/health")["gpus"] == len(readings), "/health counts them")
            status, answer = post_json(agent.url + "/deploy", {"name": "gpu-check", "image": TEST_IMAGE,
                                                               "gpu": True, "vram_gb": 1})
            ok &= check(status == 200, f"a GPU deploy succeeds ({answer.get('error', 'ok')})")
            if status == 200:
                uuid = readings[answer["gpu"]].uuid
                environ = subprocess.run(["docker", "exec", "tidybot-gpu-check", "cat", "/proc/1/environ"],
                                         capture_output=True).stdout.split(b"\0")
                ok &= check(f"NVIDIA_VISIBLE_DEVICES={uuid}".encode() in environ,
                            f"the engine handed over GPU {answer['gpu']} ({uuid})")
                devices = subprocess.run(["docker", "exec", "tidybot-gpu-check", "ls", "/dev"],
                                         capture_output=True, text=True).stdout.split()
                ok &= check(any(d.startswith("nvidia") for d in devices), "/dev/nvidia* inside")
                post_json(agent.url + "/stop", {"name": "gpu-check"})
            if args.cuda_image and args.cuda_command:
                status, answer = post_json(agent.url + "/deploy", {
                    "name": "gpu-check-cuda", "image": args.cuda_image, "command": args.cuda_command,
                    "gpu": True, "vram_gb": 1, "ready_timeout": 300}, timeout=600)
                ok &= check(status == 200, f"the CUDA service deploys ({answer.get('error', 'ok')})")
                if status == 200:
                    time.sleep(3 * 5 + 1)  # a few resyncs: readings are taken there
                    used = agent.services()["gpu-check-cuda"]["vram_used_gb"]
                    ok &= check(used is not None and used > 0, f"its memory is attributed ({used} GB)")
                    print("     /gpus:", json.dumps(get_json(agent.url + "/gpus")))
                    post_json(agent.url + "/stop", {"name": "gpu-check-cuda"})
        finally:
            agent.close()
            subprocess.run(["docker", "rm", "-f", "tidybot-gpu-check", "tidybot-gpu-check-cuda"],
                           capture_output=True)
    print("all checks passed" if ok else "some checks FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
