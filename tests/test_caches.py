"""Caches on the real engine (#24, point 3): weights written by one service are found by its
redeploy, by a second service naming the cache, and after the agent restarts; listing,
removal, and pruning least recently used first."""

from __future__ import annotations

import asyncio
import subprocess
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from deploy_agent.api import CACHES_KEY
from deploy_agent.app import create_app
from tests.conftest import TEST_IMAGE, make_config, remove_test_containers

pytestmark = pytest.mark.docker
Client = TestClient[web.Request, web.Application]
INSTANCE = "tcache"
KB = 1024


def writer(kb: int, path: str = "/cache") -> list[str]:
    """A service that writes `kb` KiB of weights into its cache unless they are there, and
    serves what it did at /state."""
    return ["sh", "-c", f"if [ -f {path}/weights ]; then echo reused > /www/state; else "
            f"dd if=/dev/urandom of={path}/weights bs=1k count={kb} 2>/dev/null && "
            "echo wrote > /www/state; fi; exec httpd -f -p 8000 -h /www"]


def volumes() -> list[str]:
    return subprocess.run(["docker", "volume", "ls", "-q", "--filter",
                           f"label=tidybot.deploy-agent={INSTANCE}"],
                          capture_output=True, text=True, check=True).stdout.split()


@pytest.fixture
async def caches_agent(aiohttp_client: Any, tmp_path: Path, test_image: str
                       ) -> AsyncIterator[Callable[..., Awaitable[Client]]]:
    """Start (and restart) in-process agents of one instance and state dir; their containers
    and volumes are removed afterwards."""
    remove_test_containers()
    started: list[Client] = []

    async def start(**overrides: Any) -> Client:
        if started:
            await started[-1].close()
        config = make_config(tmp_path / "state", instance=INSTANCE, **overrides)
        config.state_dir.mkdir(exist_ok=True)
        client: Client = await aiohttp_client(create_app(config))
        started.append(client)
        return client

    try:
        yield start
    finally:
        remove_test_containers()
        for volume in volumes():
            subprocess.run(["docker", "volume", "rm", "-f", volume], capture_output=True)


async def deploy(client: Client, name: str, **body: Any) -> dict[str, Any]:
    response = await client.post("/deploy", json={"name": name, "image": TEST_IMAGE, **body})
    answer: dict[str, Any] = await response.json()
    assert response.status == 200, answer
    return answer


async def stop(client: Client, name: str) -> None:
    assert (await client.post("/stop", json={"name": name})).status == 200


def state_of(answer: dict[str, Any]) -> str:
    with urllib.request.urlopen(f"{answer['host']}/state", timeout=5) as response:
        return str(response.read().decode().strip())


async def listed(client: Client) -> dict[str, dict[str, Any]]:
    return {cache["name"]: cache for cache in await (await client.get("/caches")).json()}


class TestSharedAndKept:
    async def test_found_by_its_redeploy_a_second_service_and_after_a_restart(
            self, caches_agent: Callable[..., Awaitable[Client]]) -> None:
        client = await caches_agent()
        first = await deploy(client, "t-c1", command=writer(300), cache={"t-hf": "/cache"})
        assert state_of(first) == "wrote"
        await stop(client, "t-c1")
        redeployed = await deploy(client, "t-c1", command=writer(300), cache={"t-hf": "/cache"})
        assert state_of(redeployed) == "reused"
        second = await deploy(client, "t-c2", command=writer(300, "/w"), cache={"t-hf": "/w"})
        assert state_of(second) == "reused"

        entry = (await listed(client))["t-hf"]
        assert entry["services"] == ["t-c1", "t-c2"] and entry["volume"] == f"tidybot-{INSTANCE}-t-hf"
        assert entry["cache"] is True
        await client.app[CACHES_KEY].measure()
        assert (await listed(client))["t-hf"]["size_bytes"] >= 300 * KB

        await stop(client, "t-c1")
        await stop(client, "t-c2")
        stopped = (await listed(client))["t-hf"]
        assert stopped["services"] == [] and stopped["last_used"] is not None
        client = await caches_agent()  # the agent restarts: the cache and its record stay
        again = (await listed(client))["t-hf"]
        assert again["last_used"] == stopped["last_used"]
        after_restart = await deploy(client, "t-c1", command=writer(300), cache={"t-hf": "/cache"})
        assert state_of(after_restart) == "reused"

    async def test_cache_is_part_of_the_spec_and_checked(
            self, caches_agent: Callable[..., Awaitable[Client]]) -> None:
        client = await caches_agent()
        await deploy(client, "t-c3", cache={"t-a": "/a"})
        response = await client.post("/deploy", json={"name": "t-c3", "image": TEST_IMAGE,
                                                       "cache": {"t-b": "/a"}})
        assert (response.status, (await response.json())["differing_fields"]) == (409, ["cache"])
        manifest = {"name": "t-c4", "deploy": {"image": TEST_IMAGE, "cache": {"t-a": "/models"}}}
        assert (await client.post("/deploy", json=manifest)).status == 200
        assert (await listed(client))["t-a"]["services"] == ["t-c3", "t-c4"]
        for cache, field in (({"../x": "/a"}, "cache"), ({"ok": "relative"}, "cache"),
                             ({"ok": "/"}, "cache"), ({"ok": "/a:ro"}, "cache"), ([], "cache"),
                             ({"ok": 3}, "cache")):
            response = await client.post("/deploy", json={"name": "t-bad", "image": TEST_IMAGE,
                                                          "cache": cache})
            answer = await response.json()
            assert response.status == 400 and answer["details"][0]["field"] == field, cache
        for cache in ({"ok": "/dev/shm"}, {"ok": "/proc/x"}, {"ok": "/sys"}, {"ok": "/dev"},
                      {f"c{i}": f"/c{i}" for i in range(17)}):
            response = await client.post("/deploy", json={"name": "t-bad", "image": TEST_IMAGE,
                                                          "cache": cache})
            assert response.status == 400, cache
        for named, cache, said in ((["t-v:/data"], {"t-a": "/data/"}, "more than once"),
                                     (["t-v:/data"], {"t-a": "/data/."}, "more than once"),
                                     (["t-v:/data/models"], {"t-a": "/data"}, "inside the cache"),
                                     (["t-v:/data"], {"t-a": "/data/cache"}, "inside the cache"),
                                     ([], {"t-a": "/x", "t-b": "/x/y"}, "inside the cache")):
            clash = await client.post("/deploy", json={"name": "t-bad", "image": TEST_IMAGE,
                                                       "volumes": named, "cache": cache})
            assert clash.status == 400 and said in (await clash.json())["details"][0]["message"], cache
        assert sorted(volumes()) == [f"tidybot-{INSTANCE}-t-a"]  # nothing made for the refused


class TestRemoveAndPrune:
    async def test_delete_refused_while_mounted_then_removed(
            self, caches_agent: Callable[..., Awaitable[Client]]) -> None:
        client = await caches_agent()
        await deploy(client, "t-c5", command=writer(10), cache={"t-del": "/cache"})
        busy = await client.delete("/caches/t-del")
        answer = await busy.json()
        assert (busy.status, answer["error"], answer["services"]) == (409, "conflict", ["t-c5"])
        missing = await client.delete("/caches/t-nothing")
        assert (missing.status, (await missing.json())["error"]) == (404, "not_found")
        await stop(client, "t-c5")
        removed = await client.delete("/caches/t-del")
        assert removed.status == 200 and await removed.json() == {"name": "t-del", "ok": True}
        assert volumes() == [] and await listed(client) == {}
        events = await (await client.get("/events")).json()
        assert [(e["kind"], e["details"]["cache"]) for e in events if e["kind"] == "cache_removed"] == [
            ("cache_removed", "t-del")]

    async def test_prune_takes_the_least_recently_used_unmounted_first(
            self, caches_agent: Callable[..., Awaitable[Client]]) -> None:
        # Three caches and a volume of about 300 KiB each, the limit at about 1000 KiB: one
        # cache must go.
        client = await caches_agent(cache_max_gb=1000 * KB / 1e9)
        for name in ("t-old", "t-new"):
            await deploy(client, f"t-{name}-svc", command=writer(300), cache={name: "/cache"})
            await stop(client, f"t-{name}-svc")
            await asyncio.sleep(0.05)  # last used: t-old before t-new
        await deploy(client, "t-busy-svc", command=writer(300), cache={"t-busy": "/cache"})
        # A named volume (a database's data, say) is never a cache to prune, stopped or not.
        await deploy(client, "t-data-svc", command=writer(300, "/data"), volumes=["t-data:/data"])
        await stop(client, "t-data-svc")
        caches = client.app[CACHES_KEY]
        await caches.measure()
        assert await caches.prune() == ["t-old"]
        assert sorted(await listed(client)) == ["t-busy", "t-data", "t-new"]
        assert (await listed(client))["t-data"]["cache"] is False
        client = await caches_agent(cache_max_gb=1 * KB / 1e9)  # after a restart: all unmounted go
        caches = client.app[CACHES_KEY]
        await caches.measure()  # the agent's own loop may have pruned already
        await caches.prune()
        assert sorted(await listed(client)) == ["t-busy", "t-data"]  # mounted, or not a cache
        events = await (await client.get("/events")).json()
        assert [(e["details"]["cache"], e["reason"]) for e in events if e["kind"] == "cache_removed"] == [
            ("t-old", "cache_max_gb"), ("t-new", "cache_max_gb")]


class FakeVolumes:
    """The engine's side of the caches, in memory: volumes with labels and creation times."""

    def __init__(self, instance: str, created: dict[str, str]) -> None:
        self.volumes = {f"tidybot-{instance}-{name}": {
            "Name": f"tidybot-{instance}-{name}", "CreatedAt": when,
            "Labels": {"tidybot.deploy-agent": instance, "tidybot.volume": name, "tidybot.cache": "1"}}
            for name, when in created.items()}
        self.removed: list[str] = []
        self.listing: asyncio.Event | None = None  # set: list_volumes waits for it
        self.gone_under_us: set[str] = set()

    async def list_volumes(self, labels: dict[str, str]) -> list[dict[str, Any]]:
        if self.listing is not None:
            await self.listing.wait()
        return list(self.volumes.values())

    async def volume_sizes(self) -> dict[str, int]:
        return dict.fromkeys(self.volumes, 100 * KB)

    async def remove_volume(self, name: str) -> bool:
        self.volumes.pop(name, None)
        if name in self.gone_under_us:
            return False
        self.removed.append(name)
        return True


class FakeTable:
    def __init__(self) -> None:
        self.specs: list[Any] = []

    def specs_in_use(self) -> list[Any]:
        return list(self.specs)


def caches_of(tmp_path: Path, engine: FakeVolumes, table: FakeTable, **config: Any) -> Any:
    from deploy_agent.caches import Caches
    from deploy_agent.events import EventLog
    return Caches(engine, table, make_config(tmp_path, instance=INSTANCE, **config),  # type: ignore[arg-type]
                  EventLog(tmp_path))


class TestCachesInProcess:
    """Orders and races that the engine can't be made to show on demand."""

    async def test_without_records_the_oldest_made_goes_first(self, tmp_path: Path) -> None:
        engine = FakeVolumes(INSTANCE, {"young": "2026-12-01T10:00:00Z", "old": "2026-01-01T10:00:00Z",
                                        "middle": "2026-06-01T10:00:00Z"})
        caches = caches_of(tmp_path, engine, FakeTable(), cache_max_gb=150 * KB / 1e9)
        await caches.measure()
        assert await caches.prune() == ["old", "middle"]

    async def test_one_removed_by_another_meanwhile_counts_silently(self, tmp_path: Path) -> None:
        engine = FakeVolumes(INSTANCE, {"a": "2026-01-01T10:00:00Z", "b": "2026-02-01T10:00:00Z"})
        engine.gone_under_us.add(f"tidybot-{INSTANCE}-a")
        caches = caches_of(tmp_path, engine, FakeTable(), cache_max_gb=100 * KB / 1e9)
        await caches.measure()
        assert await caches.prune() == []  # a was gone already: its room freed, b stays
        assert f"tidybot-{INSTANCE}-b" in engine.volumes
        assert [e.kind for e in caches._events.since(None, 10)] == []

    async def test_a_deploy_that_begins_during_a_delete_keeps_its_cache(self, tmp_path: Path) -> None:
        from deploy_agent.convert import make_converter
        from deploy_agent.errors import Conflict
        from deploy_agent.models import DeploySpec
        engine = FakeVolumes(INSTANCE, {"hf": "2026-01-01T10:00:00Z"})
        table = FakeTable()
        caches = caches_of(tmp_path, engine, table)
        engine.listing = asyncio.Event()
        deleting = asyncio.ensure_future(caches.remove("hf"))
        await asyncio.sleep(0.01)  # the DELETE is listing the volumes
        table.specs.append(make_converter().structure(
            {"name": "t-x", "image": "img:1", "cache": {"hf": "/c"}}, DeploySpec))  # a deploy begins
        engine.listing.set()
        with pytest.raises(Conflict):
            await deleting
        assert engine.removed == [] and f"tidybot-{INSTANCE}-hf" in engine.volumes

    async def test_a_full_disk_keeps_last_use_in_memory_and_says_so(self, tmp_path: Path) -> None:
        from deploy_agent.convert import make_converter
        from deploy_agent.models import DeploySpec
        (tmp_path / "caches.json").mkdir()  # it can't be replaced, as on a full disk
        engine = FakeVolumes(INSTANCE, {"hf": "2026-01-01T10:00:00Z"})
        caches = caches_of(tmp_path, engine, FakeTable())
        await caches.touch(make_converter().structure(
            {"name": "t-x", "image": "img:1", "cache": {"hf": "/c"}}, DeploySpec))
        assert [w.code for w in caches.warnings()] == ["caches_not_writable"]
        [view] = await caches.views()
        assert view.last_used is not None and view.last_used > "2026-06"  # known now, not written
        (tmp_path / "caches.json").rmdir()
        await caches.remove("hf")  # the next change writes it
        assert caches.warnings() == []
