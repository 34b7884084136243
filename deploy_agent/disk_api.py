"""The routes for what the node keeps on disk for its services: images (pulled ahead of a
deploy) and caches (the agent's volumes). Thin: the work is in images.py and caches.py."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from deploy_agent.api import (
    CACHES_KEY,
    CONVERTER_KEY,
    IMAGES_KEY,
    NDJSON,
    answer,
    read_json,
    stream_progress,
)
from deploy_agent.convert import parse_pull_request
from deploy_agent.models import CacheRemoved
from deploy_agent.runtime import Progress, no_progress


async def pull_image(request: web.Request) -> web.StreamResponse:
    """Pull now (the registry is always asked); NDJSON progress when the caller accepts it.
    A pull whose caller leaves goes on to its end."""
    image = parse_pull_request(await read_json(request))
    images = request.app[IMAGES_KEY]
    if NDJSON in request.headers.get("Accept", ""):
        async def work(progress: Progress) -> Any:
            return request.app[CONVERTER_KEY].unstructure(await images.pull(image, progress))
        return await stream_progress(request, work, f"pull of {image}")
    return answer(request, await images.pull(image, no_progress))


async def list_images(request: web.Request) -> web.Response:
    return answer(request, await request.app[IMAGES_KEY].views())


async def list_caches(request: web.Request) -> web.Response:
    return answer(request, await request.app[CACHES_KEY].views())


async def remove_cache(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    await request.app[CACHES_KEY].remove(name)
    return answer(request, CacheRemoved(name=name))


def add_disk_routes(app: web.Application) -> None:
    app.router.add_routes([
        web.post("/images/pull", pull_image),
        web.get("/images", list_images),
        web.get("/caches", list_caches),
        web.delete("/caches/{name}", remove_cache),
    ])
