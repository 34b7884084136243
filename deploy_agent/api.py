"""The HTTP API: routes, thin handlers, and the middleware that answers every error as JSON."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Hashable
from importlib import resources
from typing import Any

import attrs
import cattrs
from aiohttp import ClientConnectionResetError, web
from aiohttp.typedefs import Handler

from deploy_agent import __version__
from deploy_agent.browsers import JSON
from deploy_agent.caches import Caches
from deploy_agent.config import Config
from deploy_agent.convert import parse_deploy_request, parse_renew_request, parse_stop_request
from deploy_agent.deployer import Deployer, DeployOutcome
from deploy_agent.errors import AgentError, InvalidRequest, UnsupportedMediaType
from deploy_agent.events import MEMORY_EVENTS, EventLog
from deploy_agent.images import ImageStore
from deploy_agent.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from deploy_agent.metrics import AgentMetrics
from deploy_agent.models import (
    LIVE_STATUSES,
    DeployAnswer,
    DeployRequest,
    DryRunAnswer,
    HealthAnswer,
    HealthWarning,
    JSONObject,
    LeaseAnswer,
    QueueEntry,
    ReleaseAnswer,
    Service,
    ServiceView,
    StopAnswer,
    rfc3339,
    service_url,
)
from deploy_agent.runtime import Progress, Reconciler, no_progress
from deploy_agent.streams import Streams, relay
from deploy_agent.table import InFlight, ServiceTable

_LOGGER = logging.getLogger(__name__)

@attrs.define
class ListingCache:
    """The last rendered GET /services body and what it was rendered from."""

    key: Hashable = None
    body: bytes = b""


CONFIG_KEY = web.AppKey("config", Config)
CONVERTER_KEY = web.AppKey("converter", cattrs.Converter)
DEPLOYER_KEY = web.AppKey("deployer", Deployer)
RECONCILER_KEY = web.AppKey("reconciler", Reconciler)
TABLE_KEY = web.AppKey("table", ServiceTable)
STREAMS_KEY = web.AppKey("streams", Streams)
EVENTS_KEY = web.AppKey("events", EventLog)
OPENAPI_KEY = web.AppKey("openapi", bytes)
METRICS_KEY = web.AppKey("metrics", AgentMetrics)
LISTING_KEY = web.AppKey("listing", ListingCache)
IMAGES_KEY = web.AppKey("images", ImageStore)
CACHES_KEY = web.AppKey("caches", Caches)

INTERNAL_ERROR = {"ok": False, "error": "internal_error",
                  "message": "The agent failed unexpectedly; its log has the details."}
HTTP_ERROR_CODES = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}
NDJSON = "application/x-ndjson"


# Query parameters' rules, for the handlers and the OpenAPI document alike.
FLAG_VALUES = ("0", "1", "true", "false")
LOG_TAIL_DEFAULT, LOG_TAIL_MAX = 100, 100_000
EVENTS_LIMIT_DEFAULT = 100


def answer(request: web.Request, payload: Any, status: int = 200) -> web.Response:
    """A JSON answer of an attrs value (or a list of them) through the app's converter."""
    return json_response(request.app[CONVERTER_KEY].unstructure(payload), status)


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """Every JSON answer, errors included, in one compact form."""
    return web.json_response(body, status=status, headers=headers, dumps=_dumps)


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """AgentErrors and HTTP errors become JSON answers; anything else is a logged 500."""
    try:
        return await handler(request)
    except AgentError as err:
        headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else {}
        if "retry_after_s" in err.extra:
            headers["Retry-After"] = str(err.extra["retry_after_s"])
        return json_response(err.to_json(), err.status, headers or None)
    except web.HTTPException as err:
        if err.status < 400:
            raise
        code = HTTP_ERROR_CODES.get(err.status, "http_error")
        message = err.reason
        if err.status == 413:
            limit = request.app[CONFIG_KEY].max_body_bytes
            message = f"The request body is larger than {limit} bytes."
        elif err.status == 404:
            message = f"No such endpoint: {request.method} {request.path}."
        elif err.status == 405:
            message = f"{request.method} is not allowed on {request.path}."
        return json_response({"ok": False, "error": code, "message": message}, err.status,
                             _allow_header(err))
    except Exception:
        _LOGGER.exception("Unhandled error answering %s %s", request.method, request.path)
        return json_response(INTERNAL_ERROR, status=500)


def _allow_header(err: web.HTTPException) -> dict[str, str]:
    allow = err.headers.get("Allow")
    return {"Allow": allow} if allow else {}


async def read_json(request: web.Request) -> Any:
    """The decoded body; 415 unless it is declared JSON (a web page can send a "simple"
    cross-site POST as text/plain, never as application/json), 400 when it is not JSON,
    413 (from aiohttp) when it is too large."""
    if request.content_type != JSON:
        raise UnsupportedMediaType(
            f"Send the body as 'Content-Type: {JSON}' (this request said "
            f"{request.headers.get('Content-Type', 'nothing')!r}); nothing was done.")
    raw = await request.read()
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InvalidRequest(f"The body is not valid JSON: {err}.",
                             details=[{"field": "$", "message": "is not valid JSON"}]) from None


async def health(request: web.Request) -> web.Response:
    table = request.app[TABLE_KEY]
    reachable = request.app[RECONCILER_KEY].engine_reachable
    running = sum(1 for s in table.services() if s.status in LIVE_STATUSES)
    return answer(request, HealthAnswer(
        status="ok" if reachable else "degraded",
        hostname=socket.gethostname(),
        gpus=table.gpus.count,
        services_running=running,
        engine="reachable" if reachable else "unreachable",
        version=__version__,
        auth=request.app[CONFIG_KEY].auth,
        warnings=health_warnings(request.app),
        queued=len(request.app[DEPLOYER_KEY].admission.waiting()),
    ))


def health_warnings(app: web.Application) -> list[HealthWarning]:
    """Every degraded condition the agent knows of; [] when all is well."""
    warnings = []
    if not app[RECONCILER_KEY].engine_reachable:
        warnings.append(HealthWarning(
            "engine_unreachable", "The Docker engine does not answer; deploys and stops get 503 "
            "until it does. Services are served from memory meanwhile."))
    state_error = app[TABLE_KEY].state_error
    if state_error is not None:
        warnings.append(HealthWarning(
            "state_not_writable", f"services.json cannot be written ({state_error}); retrying. "
            "Services keep running and their containers' labels still record them."))
    event_error = app[EVENTS_KEY].write_error
    if event_error is not None:
        warnings.append(HealthWarning(
            "event_log_not_writable", f"events.jsonl cannot be written ({event_error}); events "
            "are kept in memory and retried."))
    warnings += app[IMAGES_KEY].warnings() + app[CACHES_KEY].warnings()
    refusals = app[RECONCILER_KEY].refusals
    if refusals:
        listed = "; ".join(f"{subject}: {message}" for subject, message in sorted(refusals.items()))
        warnings.append(HealthWarning(
            "engine_refused", f"The engine refused {len(refusals)} thing(s) on the last resync, "
            f"tried again on every pass: {listed}"))
    return warnings + app[RECONCILER_KEY].warnings()


async def list_services(request: web.Request) -> web.Response:
    """Every service, re-rendered only when something it shows has changed.

    A container id fixes a service's spec, port and GPU; the rest that can change is in
    the key (leases and GPU readings by their change counters), with the current second
    for uptime.
    """
    table, now = request.app[TABLE_KEY], time.time()
    services, gpus, in_flight = table.services(), table.gpus, table.in_flight()
    key = (int(now), table.leases_changed, gpus.readings_taken, tuple(in_flight),
           tuple((s.container_id, s.status, s.restarts, s.exit_code, s.started_at) for s in services))
    cache = request.app[LISTING_KEY]
    if cache.key != key:
        views = sorted([*(service_view(request, s, now) for s in services),
                        *(deploying_view(request, entry) for entry in in_flight)],
                       key=lambda view: view.name)
        cache.body = _dumps(request.app[CONVERTER_KEY].unstructure(views)).encode()
        cache.key = key
    return web.Response(body=cache.body, content_type="application/json")


def service_view(request: web.Request, service: Service, now: float | None = None) -> ServiceView:
    table, name = request.app[TABLE_KEY], service.spec.name
    view = ServiceView.of(service, request.app[CONFIG_KEY].advertise_host, now or time.time(),
                          table.leases_of(name), table.gpus.observed_gb(name), name in table.gpus.over,
                          socket.gethostname())
    preempt_at = table.preempt_at(name)
    return view if preempt_at is None else attrs.evolve(view, preempt_at=rfc3339(preempt_at))


def deploying_view(request: web.Request, entry: InFlight) -> ServiceView:
    view = ServiceView.deploying(entry.spec, entry.gpu, entry.host_port,
                                 request.app[CONFIG_KEY].advertise_host, socket.gethostname())
    if request.app[DEPLOYER_KEY].admission.queued(entry.spec.name):
        view = attrs.evolve(view, reason="queued")
    return view


async def get_service(request: web.Request) -> web.Response:
    table, name = request.app[TABLE_KEY], request.match_info["name"]
    deploying = next((entry for entry in table.in_flight() if entry.spec.name == name), None)
    if deploying is not None:
        return answer(request, deploying_view(request, deploying))
    return answer(request, service_view(request, table.service(name)))


async def deploy(request: web.Request) -> web.StreamResponse:
    deploy_request = parse_deploy_request(request.app[CONVERTER_KEY], await read_json(request))
    if _query_flag(request, "dry_run"):
        return answer(request, await dry_run(request, deploy_request))
    if NDJSON in request.headers.get("Accept", ""):
        return await stream_deploy(request, deploy_request)
    outcome = await run_deploy(request, deploy_request)
    return answer(request, deploy_answer(request, outcome))


async def run_deploy(request: web.Request, deploy_request: DeployRequest,
                     progress: Progress = no_progress) -> DeployOutcome:
    """The deploy, counted and timed by outcome for /metrics."""
    started, outcome_label = time.monotonic(), "internal_error"
    try:
        outcome = await request.app[DEPLOYER_KEY].deploy(deploy_request, progress,
                                                          lambda: _connected(request))
        outcome_label = "already_running" if outcome.already_running else "deployed"
        return outcome
    except AgentError as err:
        outcome_label = err.code
        raise
    finally:
        request.app[METRICS_KEY].deploy_finished(outcome_label, time.monotonic() - started)


def _connected(request: web.Request) -> bool:
    """Whether the caller is still there (aiohttp never cancels a handler whose client left)."""
    transport = request.transport
    return transport is not None and not transport.is_closing()


async def dry_run(request: web.Request, deploy_request: DeployRequest) -> DryRunAnswer:
    outcome = await request.app[DEPLOYER_KEY].dry_run(deploy_request)
    return DryRunAnswer(
        name=deploy_request.spec.name,
        host=service_url(outcome.node_addr or request.app[CONFIG_KEY].advertise_host, outcome.host_port),
        port=outcome.host_port, gpu=outcome.gpu,
        status=outcome.service.status if outcome.service else None,
        already_running=outcome.already_running, pull_needed=outcome.pull_needed,
        evicts=list(outcome.evicts), queued=outcome.queued)


def deploy_answer(request: web.Request, outcome: DeployOutcome) -> DeployAnswer:
    service, lease = outcome.service, outcome.lease
    host = service_url(service.node_addr or request.app[CONFIG_KEY].advertise_host, service.host_port)
    return DeployAnswer(name=service.spec.name, host=host, port=service.host_port, gpu=service.gpu,
                        status=service.status, already_running=outcome.already_running,
                        lease_id=lease.id if lease else None,
                        lease_expires_at=rfc3339(lease.expires_at) if lease else None)


async def stream_deploy(request: web.Request, deploy_request: DeployRequest) -> web.StreamResponse:
    """One JSON event per line while deploying; the last line is the plain answer (or error).

    The deploy runs to its end even if the caller goes away, so nothing is left half-done.
    """
    async def work(progress: Progress) -> Any:
        outcome = await run_deploy(request, deploy_request, progress)
        return request.app[CONVERTER_KEY].unstructure(deploy_answer(request, outcome))
    return await stream_progress(request, work, f"deploy of {deploy_request.spec.name}")


async def stream_progress(request: web.Request, work: Callable[[Progress], Awaitable[Any]],
                          what: str) -> web.StreamResponse:
    """NDJSON: each progress event `work` reports, then its answer (or error) as the last line.
    Once the stream has begun, every outcome is a line: never a second response."""
    response = web.StreamResponse(headers={"Content-Type": NDJSON, "Cache-Control": "no-cache"})
    await response.prepare(request)
    events: asyncio.Queue[JSONObject | None] = asyncio.Queue()
    writer = asyncio.ensure_future(_write_lines(response, events))
    final: Any
    try:
        final = await work(events.put_nowait)
    except AgentError as err:
        final = err.to_json()
    except Exception:
        _LOGGER.exception("Unhandled error in the streamed %s", what)
        final = INTERNAL_ERROR
    finally:
        events.put_nowait(None)
        listening = await writer
    if listening and await _write_line(response, final):
        await response.write_eof()
    return response


async def _write_lines(response: web.StreamResponse, events: asyncio.Queue[JSONObject | None]) -> bool:
    """Write each event until None; False when the caller left on the way."""
    listening = True
    while (event := await events.get()) is not None:
        listening = listening and await _write_line(response, event)
    return listening


async def _write_line(response: web.StreamResponse, payload: Any) -> bool:
    """Write one NDJSON line; False once the caller has gone."""
    try:
        await response.write((_dumps(payload) + "\n").encode())
    except (ConnectionResetError, ClientConnectionResetError):
        return False
    return True


async def service_logs(request: web.Request) -> web.StreamResponse:
    """`?tail=N` (default 100) recent lines as text; `&follow=1` streams new ones as they come."""
    name, deployer = request.match_info["name"], request.app[DEPLOYER_KEY]
    tail = _query_int(request, "tail", default=LOG_TAIL_DEFAULT, maximum=LOG_TAIL_MAX)
    if not _query_follow(request):
        return web.Response(text=await deployer.logs(name, tail), content_type="text/plain")
    chunks = deployer.follow_logs(name, tail)
    async with request.app[STREAMS_KEY].opened(request) as gone:
        response = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
        await response.prepare(request)
        await relay(response, chunks, gone)
    return response


def _query_follow(request: web.Request) -> bool:
    return _query_flag(request, "follow")


def _query_flag(request: web.Request, key: str) -> bool:
    value = request.query.get(key, "0").lower()
    if value not in FLAG_VALUES:
        raise InvalidRequest(f"{key} must be 1 or 0.",
                             details=[{"field": key, "message": "must be 1 or 0"}])
    return value in ("1", "true")


def _query_int(request: web.Request, key: str, default: int, maximum: int) -> int:
    text = request.query.get(key)
    if text is None:
        return default
    if not text.isdigit() or int(text) > maximum:
        raise InvalidRequest(f"{key} must be a whole number from 0 to {maximum}.",
                             details=[{"field": key, "message": f"must be 0..{maximum}"}])
    return int(text)


async def stop(request: web.Request) -> web.Response:
    name = parse_stop_request(request.app[CONVERTER_KEY], await read_json(request))
    await request.app[DEPLOYER_KEY].stop(name)
    return answer(request, StopAnswer(name))


async def renew(request: web.Request) -> web.Response:
    """Extend the caller's lease: `{"lease_id": ..., "lease_s": ...}` (lease_s optional)."""
    name = request.match_info["name"]
    lease_id, lease_s = parse_renew_request(await read_json(request))
    lease = request.app[DEPLOYER_KEY].renew(name, lease_id, lease_s)
    preempt_at = request.app[TABLE_KEY].preempt_at(name)
    return answer(request, LeaseAnswer(name, lease.id, lease.lease_s, rfc3339(lease.expires_at),
                                       rfc3339(preempt_at) if preempt_at is not None else None))


async def release(request: web.Request) -> web.Response:
    """Drop the caller's lease; the service stops when it was the last one."""
    name, lease_id = request.match_info["name"], request.match_info["lease_id"]
    stopped, idle_until = await request.app[DEPLOYER_KEY].release(name, lease_id)
    return answer(request, ReleaseAnswer(name, lease_id, stopped,
                                         rfc3339(idle_until) if idle_until is not None else None))


async def events(request: web.Request) -> web.StreamResponse:
    """`?since=ID&limit=N` (oldest first); `&follow=1` streams new events as NDJSON."""
    log = request.app[EVENTS_KEY]
    since = _query_int(request, "since", default=-1, maximum=2**63)
    limit = _query_int(request, "limit", default=EVENTS_LIMIT_DEFAULT, maximum=MEMORY_EVENTS)
    cursor = None if since < 0 else since
    if not _query_follow(request):
        return answer(request, log.since(cursor, limit))
    async with request.app[STREAMS_KEY].opened(request) as gone:
        response = web.StreamResponse(headers={"Content-Type": NDJSON, "Cache-Control": "no-cache"})
        await response.prepare(request)
        await relay(response, log.follow(cursor, limit), gone)
    return response


async def gpus(request: web.Request) -> web.Response:
    table = request.app[TABLE_KEY]
    return answer(request, table.gpus.views(table.idle_names()))


async def queue(request: web.Request) -> web.Response:
    return answer(request, [QueueEntry(name=w.name, position=position, priority=w.priority,
                                       since=rfc3339(w.since), needs_gb=w.needs_gb,
                                       callers=len(w.callers))
                            for position, w in enumerate(
                                request.app[DEPLOYER_KEY].admission.waiting(), start=1)])


async def metrics(request: web.Request) -> web.Response:
    body = request.app[METRICS_KEY].render()
    return web.Response(body=body, headers={"Content-Type": METRICS_CONTENT_TYPE})


async def openapi(request: web.Request) -> web.Response:
    return web.Response(body=request.app[OPENAPI_KEY], content_type="application/json")


def openapi_document() -> bytes:
    """The OpenAPI 3.1 description shipped in the package."""
    return resources.files("deploy_agent").joinpath("openapi.json").read_bytes()


def add_routes(app: web.Application) -> None:
    app[OPENAPI_KEY] = openapi_document()
    app[LISTING_KEY] = ListingCache()
    app.router.add_routes([
        web.get("/openapi.json", openapi),
        web.get("/metrics", metrics),
        web.get("/health", health),
        web.get("/services", list_services),
        web.get("/services/{name}", get_service),
        web.get("/services/{name}/logs", service_logs),
        web.post("/deploy", deploy),
        web.post("/stop", stop),
        web.post("/services/{name}/renew", renew),
        web.delete("/services/{name}/leases/{lease_id}", release),
        web.get("/events", events),
        web.get("/gpus", gpus),
        web.get("/queue", queue),
    ])



