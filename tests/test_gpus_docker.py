"""GPU placement through the API on the real engine, with two simulated 24 GB GPUs."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiodocker
import pytest

from deploy_agent.config import Config
from tests.conftest import make_config
from tests.test_api_docker import Client, deploy, stop, test_containers

pytestmark = pytest.mark.docker

TWO_4090S = "RTX 4090:24,RTX 4090:24"


@pytest.fixture
def agent_config(tmp_path: Path) -> Config:
    return make_config(tmp_path / "state", fake_gpus=TWO_4090S)


async def gpus(client: Client) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = await (await client.get("/gpus")).json()
    return result


class TestFakeGpuPlacement:
    """Concurrent deploys never over-commit; placement follows the least-loaded GPU."""

    async def test_inventory_in_health_and_gpus(self, agent: Client) -> None:
        assert (await (await agent.get("/health")).json())["gpus"] == 2
        listing = await gpus(agent)
        assert [(g["id"], g["name"], g["vram_total_gb"], g["vram_free_gb"]) for g in listing] == [
            (0, "RTX 4090", 24, 24), (1, "RTX 4090", 24, 24)]
        assert [g["vram_accounting"] for g in listing] == ["declared", "declared"]  # simulated
        for key in ("uuid", "vram_used_gb", "vram_reserved_gb", "utilization_pct", "services"):
            assert key in listing[0]

    async def test_ten_concurrent_8gb_deploys(self, agent: Client, docker: aiodocker.Docker) -> None:
        results = await asyncio.gather(*(
            deploy(agent, name=f"t-gpu-{i}", gpu=True, vram_gb=8) for i in range(10)))
        placed = [answer for status, answer in results if status == 200]
        refused = [answer for status, answer in results if status != 200]
        assert len(placed) == 6 and len(refused) == 4
        assert {a["error"] for a in refused} == {"no_gpu_capacity"}
        assert all("GPU 0" in a["message"] and "GPU 1" in a["message"] for a in refused)
        assert sorted(a["gpu"] for a in placed) == [0, 0, 0, 1, 1, 1]
        listing = await gpus(agent)
        assert [g["vram_reserved_gb"] for g in listing] == [24, 24]
        assert [len(g["services"]) for g in listing] == [3, 3]
        assert len(test_containers()) == 6
        for answer in placed:
            info = await docker.containers.container(f"tidybot-{answer['name']}").show()
            assert f"NVIDIA_VISIBLE_DEVICES={answer['gpu']}" in info["Config"]["Env"]
            assert not any(e.startswith("CUDA_VISIBLE_DEVICES") for e in info["Config"]["Env"])
            assert not info["HostConfig"].get("DeviceRequests")
            assert info["Config"]["Labels"]["tidybot.gpu"] == str(answer["gpu"])
        entries = await (await agent.get("/services")).json()
        assert {(e["gpu"], e["vram_gb"]) for e in entries} == {(0, 8), (1, 8)}

        await asyncio.gather(*(stop(agent, a["name"]) for a in placed))
        assert [g["vram_reserved_gb"] for g in await gpus(agent)] == [0, 0]

        _, first = await deploy(agent, name="t-gpu-a", gpu=True, vram_gb=8)
        _, second = await deploy(agent, name="t-gpu-b", gpu=True, vram_gb=8)
        assert {first["gpu"], second["gpu"]} == {0, 1}
        status, big = await deploy(agent, name="t-gpu-c", gpu=True, vram_gb=16)
        assert status == 200, big
        status, too_big = await deploy(agent, name="t-gpu-d", gpu=True, vram_gb=40)
        assert (status, too_big["error"]) == (503, "no_gpu_capacity")
        assert "t-gpu-d" not in str(await gpus(agent))

    async def test_after_two_eights_16_fits_and_20_does_not(self, agent: Client) -> None:
        # Least-loaded placement spreads the two 8 GB services, leaving 16 GB on each GPU:
        # a 20 GB service would over-commit either one, so it is refused with the free GB.
        await deploy(agent, name="t-gpu-x", gpu=True, vram_gb=8)
        await deploy(agent, name="t-gpu-y", gpu=True, vram_gb=8)
        status, refused = await deploy(agent, name="t-gpu-w", gpu=True, vram_gb=20)
        assert (status, refused["free_gb"]) == (503, {"0": 16, "1": 16})
        status, answer = await deploy(agent, name="t-gpu-z", gpu=True, vram_gb=16)
        assert status == 200, answer

    async def test_failed_deploy_releases_its_gpu(self, agent: Client) -> None:
        status, answer = await deploy(agent, name="t-gpu-crash", gpu=True, vram_gb=20,
                                      command=["sh", "-c", "exit 4"])
        assert (status, answer["error"]) == (502, "container_exited")
        assert [g["vram_reserved_gb"] for g in await gpus(agent)] == [0, 0]
        assert test_containers() == []
        status, _ = await deploy(agent, name="t-gpu-after", gpu=True, vram_gb=20)
        assert status == 200
