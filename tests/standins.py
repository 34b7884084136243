"""Stand-ins the client's failure tests need, each on 127.0.0.1 in a thread of its own (so
sync and async clients alike can use them): a programmable agent, a proxy that can go
silent, and a registry front that holds every manifest request for a while."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from aiohttp import web


class ServedInThread:
    """An aiohttp app served from a thread of its own; `url` once started."""

    def __init__(self, app: web.Application, port: int = 0) -> None:
        self.app = app
        self.loop = asyncio.new_event_loop()
        self.port = port
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._runner = web.AppRunner(app, shutdown_timeout=0.1)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServedInThread:
        self._thread.start()

        async def serve() -> int:
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", self.port)
            await site.start()
            port: int = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            return port
        self.port = asyncio.run_coroutine_threadsafe(serve(), self.loop).result(10)
        return self

    def close(self) -> None:
        async def shut() -> None:
            await self._runner.cleanup()
            pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in pending:  # handlers told to hang
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        asyncio.run_coroutine_threadsafe(shut(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


class StandInNode:
    """An agent that answers as told. `listing`: its /services; `delay_s`: how long each
    /services waits; `starting`: answer 503 starting_up to everything; `renew`: "ok",
    "hang", "garbage" (200 with a JSON list), "lost" (404 lease_not_found) or "gone" (404
    not_found); `deploy_status`: the HTTP status a deploy gets (503: no room); `events`: its
    /events. `calls` records (method, path) of every request."""

    def __init__(self, port: int = 0) -> None:
        self.listing: list[dict[str, Any]] = []
        self.delay_s = 0.0
        self.starting = False
        self.refuse_token = False
        self.renew = "ok"
        self.deploy_status = 200
        self.events: list[dict[str, Any]] = []
        self.gpus: list[dict[str, Any]] = []
        self.calls: list[tuple[str, str]] = []
        self.leases = 0
        self.deploy_s = 0.0  # how long a deploy takes; it is listed `starting` meanwhile
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", self._handle)
        self._served = ServedInThread(app, port).start()
        self.url = self._served.url

    def close(self) -> None:
        self._served.close()

    def called(self, method: str, prefix: str) -> int:
        return sum(1 for m, p in self.calls if m == method and p.startswith(prefix))

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path_qs
        self.calls.append((request.method, path))
        if self.refuse_token:
            return web.json_response({"ok": False, "error": "unauthorized", "message": "wrong"}, status=401)
        if self.starting:
            return web.json_response({"ok": False, "error": "starting_up", "message": "starting"},
                                     status=503, headers={"Retry-After": "1"})
        if path.startswith("/services") and request.method == "GET" and path.count("/") == 1:
            await asyncio.sleep(self.delay_s)
            return web.json_response(self.listing)
        if path.startswith("/health"):
            await asyncio.sleep(self.delay_s)
            return web.json_response({"ok": True, "services_running": len(self.listing)})
        if path.startswith("/gpus"):
            return web.json_response(self.gpus)
        if path.startswith("/events"):
            return web.json_response(self.events)
        if path.startswith("/deploy") and request.method == "POST":
            return await self._deploy(request)
        if path.endswith("/renew"):
            return await self._renew(request)
        if request.method == "DELETE" and "/leases/" in path:
            return web.json_response({"ok": True, "stopped": False})
        return web.json_response({"ok": False, "error": "not_found", "message": "no"}, status=404)

    async def _deploy(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if self.deploy_status != 200:
            return web.json_response({"ok": False, "error": "no_gpu_capacity", "message": "full"},
                                     status=self.deploy_status)
        self.leases += 1
        known = next((entry for entry in self.listing if entry["name"] == body["name"]), None)
        if known is None:
            known = {**listed(body["name"]), "status": "starting"}
            self.listing.append(known)
            await asyncio.sleep(self.deploy_s)
            known["status"] = "healthy"
        answer = {"ok": True, "name": body["name"], "host": "http://127.0.0.1:28999", "port": 28999,
                  "gpu": None, "status": "healthy", "already_running": True}
        if "lease_s" in body:
            answer.update(lease_id=f"lease-{self.leases}", lease_expires_at="2026-12-06T00:00:00Z")
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        await response.write((json.dumps(answer) + "\n").encode())
        await response.write_eof()
        return response

    async def _renew(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if self.renew == "hang":
            await asyncio.sleep(3600)
        if self.renew == "garbage":
            return web.json_response(["not", "an", "answer"])
        if self.renew == "lost":
            return web.json_response({"ok": False, "error": "lease_not_found", "message": "lapsed"},
                                     status=404)
        if self.renew == "gone":
            return web.json_response({"ok": False, "error": "not_found", "message": "none"}, status=404)
        return web.json_response({"ok": True, "name": request.match_info.get("path", ""),
                                  "lease_id": body["lease_id"],
                                  "lease_expires_at": "2026-12-06T00:00:00Z"})


def listed(name: str, status: str = "healthy") -> dict[str, Any]:
    """A /services entry of a stand-in node."""
    return {"name": name, "host": "http://127.0.0.1:28999", "port": 28999, "status": status,
            "gpu": None}


@contextlib.contextmanager
def stand_in_node(port: int = 0) -> Iterator[StandInNode]:
    node = StandInNode(port)
    try:
        yield node
    finally:
        node.close()


class SilentProxy:
    """A TCP proxy to `target` that can go silent: while `silent`, it drops what it carries
    and takes new connections without answering (a node that froze, or a network that did)."""

    def __init__(self, target_port: int) -> None:
        self._target = target_port
        self.silent = False
        self._open: set[asyncio.StreamWriter] = set()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, "127.0.0.1", 0), self.loop).result(10)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    def go_silent(self, silent: bool = True) -> None:
        def switch() -> None:
            self.silent = silent
            if silent:
                for writer in list(self._open):
                    writer.close()
        self.loop.call_soon_threadsafe(switch)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._open.add(writer)
        try:
            while self.silent:  # hold the connection, answer nothing
                await asyncio.sleep(0.1)
                if writer.is_closing():
                    return
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._target)
            self._open.add(up_writer)

            async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
                with contextlib.suppress(OSError):
                    while data := await source.read(65536):
                        if self.silent:
                            break
                        sink.write(data)
                        await sink.drain()
                sink.close()
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        finally:
            self._open.discard(writer)
            writer.close()

    def close(self) -> None:
        async def shut() -> None:
            self._server.close()
            for writer in list(self._open):
                writer.close()
            pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        asyncio.run_coroutine_threadsafe(shut(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


class SlowRegistry:
    """A registry front on 127.0.0.1 that holds each manifest request `delay_s`, then passes
    it (and every other request) to the real registry at `upstream` (host:port)."""

    def __init__(self, upstream: str, delay_s: float) -> None:
        front = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _forward(self) -> None:
                if "/manifests/" in self.path:
                    front.manifests_asked += 1
                    time.sleep(front.delay_s)
                request = urllib.request.Request(
                    f"http://{upstream}{self.path}", method=self.command,
                    headers={k: v for k, v in self.headers.items()
                             if k.lower() not in ("host", "connection")})
                try:
                    with urllib.request.urlopen(request, timeout=30) as answer:
                        status, headers, body = answer.status, answer.headers, answer.read()
                except urllib.error.HTTPError as err:
                    status, headers, body = err.code, err.headers, err.read()
                self.send_response(status)
                for key, value in headers.items():
                    if key.lower() not in ("connection", "transfer-encoding", "content-length"):
                        self.send_header(key, value)
                length = headers.get("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_HEAD = _forward

        self.delay_s = delay_s
        self.manifests_asked = 0  # a pull has begun: the deploy has reserved what it needs
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = f"localhost:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
