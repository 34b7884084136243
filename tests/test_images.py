"""The image store without an engine: records by the reference `docker images` lists,
bounded, surviving a full disk; pulls ahead bounded. On the engine: test_cold_starts.py."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

import pytest

from deploy_agent.convert import make_converter
from deploy_agent.images import MAX_PULLS, ImageStore, listed_as
from deploy_agent.models import ColdStart
from deploy_agent.registry_auth import RegistryCredentials
from tests.conftest import make_config

COLD = ColdStart(1.0, 1.0, 1.0, pulled=True)


@pytest.mark.parametrize(("image", "listed"), [
    ("busybox", "busybox:latest"), ("docker.io/library/busybox:1", "busybox:1"),
    ("library/busybox", "busybox:latest"), ("docker.io/user/x", "user/x:latest"),
    ("localhost:5000/x", "localhost:5000/x:latest"),
    ("localhost:5000/library/x:2", "localhost:5000/library/x:2"),
    ("registry.lab/x@sha256:" + "a" * 64, "registry.lab/x@sha256:" + "a" * 64),
])
def test_image_records_are_kept_by_the_reference_docker_lists(image: str, listed: str) -> None:
    assert listed_as(image) == listed


async def test_image_records_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("deploy_agent.images.MAX_RECORDS", 3)
    store = ImageStore(None, make_config(tmp_path), make_converter())  # type: ignore[arg-type]
    for i in range(5):
        await store.deployed(f"img{i}", "svc", ColdStart(1.0, 1.0, 1.0, pulled=True))
    assert [store.cold_start_of(f"img{i}") is not None for i in range(5)] == [False, False, True, True, True]
    assert store.cold_start_of("img4:latest") == ColdStart(1.0, 1.0, 1.0, pulled=True)
    reloaded = ImageStore(None, make_config(tmp_path), make_converter())  # type: ignore[arg-type]
    reloaded.load()
    assert reloaded.cold_start_of("img2") is not None and reloaded.cold_start_of("img0") is None


async def test_pulls_ahead_are_bounded(tmp_path: Path) -> None:
    """More POST /images/pull at once than MAX_PULLS wait their turn, and say so."""
    class SlowEngine:
        running, most = 0, 0

        async def pull(self, ref: str, on_progress: object) -> None:
            SlowEngine.running += 1
            SlowEngine.most = max(SlowEngine.most, SlowEngine.running)
            await asyncio.sleep(0.05)
            SlowEngine.running -= 1

        async def inspect_image(self, ref: str) -> dict[str, object]:
            return {"RepoDigests": [f"{ref}@sha256:{'b' * 64}"], "Size": 10}

    store = ImageStore(SlowEngine(), make_config(tmp_path), make_converter())  # type: ignore[arg-type]
    said: list[dict[str, object]] = []
    answers = await asyncio.gather(*(store.pull(f"registry.lab/x{i}:1", said.append)
                                     for i in range(MAX_PULLS + 3)))
    assert SlowEngine.most == MAX_PULLS and all(a.digest == "sha256:" + "b" * 64 for a in answers)
    assert [e["reason"] for e in said if e.get("event") == "waiting"] == ["pulls_busy"] * 3


async def test_a_full_disk_keeps_records_in_memory_and_says_so(tmp_path: Path) -> None:
    (tmp_path / "images.json").mkdir()  # it can't be replaced, as on a full disk
    engine = SimpleNamespace(credentials=RegistryCredentials(tmp_path / "no-config.json"))
    store = ImageStore(engine, make_config(tmp_path), make_converter())
    await store.deployed("img:1", "svc", COLD)  # the deploy stands
    assert store.cold_start_of("img:1") == COLD
    assert [w.code for w in store.warnings()] == ["images_not_writable"]
    (tmp_path / "images.json").rmdir()
    await store.deployed("img:2", "svc", COLD)  # written again with the next change
    assert store.warnings() == []
    reloaded = ImageStore(engine, make_config(tmp_path), make_converter())
    reloaded.load()
    assert reloaded.cold_start_of("img:1") == COLD and reloaded.cold_start_of("img:2") == COLD
