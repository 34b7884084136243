"""The status page: one HTML page, its script, style and icon, served from package data.

The page reads the agent's own JSON API, so it is served without a token (it asks for
one in the browser when the agent needs it) and outside the JSON error answers. A
Content-Security-Policy keeps it to this agent: nothing loads from another host.
"""

from __future__ import annotations

from importlib import resources

from aiohttp import web

ASSETS = {  # file in deploy_agent/static -> content type
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
HEADERS = {
    "Cache-Control": "no-cache",
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "img-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'none'; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
PAGE_KEY = web.AppKey("page", dict)


def is_page(path: str) -> bool:
    """The paths the page is served on: open to all, like GET /health."""
    return path == "/" or path.startswith("/static/")


async def index(request: web.Request) -> web.Response:
    return _asset(request, "index.html")


async def static(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in ASSETS or name == "index.html":
        return web.Response(status=404, text="Not found.\n", headers=HEADERS)
    return _asset(request, name)


def _asset(request: web.Request, name: str) -> web.Response:
    body: bytes = request.app[PAGE_KEY][name]
    return web.Response(body=body, headers={**HEADERS, "Content-Type": ASSETS[name]})


def add_page(app: web.Application) -> None:
    folder = resources.files("deploy_agent").joinpath("static")
    app[PAGE_KEY] = {name: folder.joinpath(name).read_bytes() for name in ASSETS}
    app.router.add_routes([web.get("/", index), web.get("/static/{name}", static)])
