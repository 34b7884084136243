"""The OpenAPI document, generated: schemas from the attrs models and the converter's rules,
operations from the route table.

`python -m deploy_agent.openapi` writes `deploy_agent/openapi.json`, the file the agent
serves; `tests/test_openapi.py` fails when the two differ. What a field accepts (patterns,
limits, defaults) comes from `convert.FIELD_SCHEMAS`, beside the rule that enforces it;
what an answer holds comes from its attrs class; which routes exist comes from the app.
Only prose (summaries, descriptions) and the statuses each operation may answer are
written here.
"""

from __future__ import annotations

import json
import sys
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import attrs

from deploy_agent import __version__
from deploy_agent.api import EVENTS_LIMIT_DEFAULT, FLAG_VALUES, LOG_TAIL_DEFAULT, LOG_TAIL_MAX
from deploy_agent.caches import CacheView
from deploy_agent.convert import (
    FIELD_SCHEMAS,
    MANIFEST_DEPLOY,
    MANIFEST_EXTRA_SCHEMAS,
    MANIFEST_REQUIRES,
    REQUEST_KEY_SCHEMAS,
)
from deploy_agent.events import MEMORY_EVENTS, Event
from deploy_agent.gpus import GpuView, ServiceVram
from deploy_agent.images import ImageView
from deploy_agent.models import (
    CacheRemoved,
    ColdStart,
    DeployAnswer,
    DeploySpec,
    DryRunAnswer,
    HealthAnswer,
    HealthWarning,
    JSONObject,
    LeaseAnswer,
    PullAnswer,
    QueueEntry,
    ReleaseAnswer,
    ServiceView,
    StopAnswer,
)

DOCUMENT = Path(__file__).with_name("openapi.json")
ERROR = {"$ref": "#/components/schemas/Error"}
FLAG = {"type": "string", "enum": list(FLAG_VALUES), "default": "0"}

# The answers, by the component name the document gives them.
ANSWERS: dict[str, type] = {
    "Health": HealthAnswer, "HealthWarning": HealthWarning, "Service": ServiceView,
    "DeployAnswer": DeployAnswer, "DryRunAnswer": DryRunAnswer, "StopAnswer": StopAnswer,
    "LeaseAnswer": LeaseAnswer, "ReleaseAnswer": ReleaseAnswer, "Gpu": GpuView,
    "ServiceVram": ServiceVram, "Event": Event, "QueueEntry": QueueEntry,
    "ColdStart": ColdStart, "PullAnswer": PullAnswer, "Image": ImageView, "Cache": CacheView,
    "CacheRemoved": CacheRemoved,
}
COMPONENT_OF = {model: name for name, model in ANSWERS.items()}

# Prose for fields, by model and field name; a field without an entry has none.
FIELD_DOCS: dict[tuple[type, str], str] = {
    (DeploySpec, "name"): "DNS label",
    (DeploySpec, "image"): "Image reference.",
    (DeploySpec, "port"): "Port the service listens on inside the container.",
    (DeploySpec, "env"): "Environment variables; numbers and booleans are stringified. "
                         "NVIDIA_* keys are the agent's alone. Never echoed back.",
    (DeploySpec, "volumes"): "source:target[:ro|:rw]; a named volume (the agent's own) or a host "
                             "path under --allow-host-path.",
    (DeploySpec, "command"): "A string (split like a shell would) or a list; null or absent for "
                             "the image's own.",
    (DeploySpec, "shm_gb"): "Size of /dev/shm in GB (PyTorch data loaders, NCCL); counted within "
                            "memory_gb when set. Default: --default-shm-gb for GPU services (2), "
                            "else the engine's 64 MB.",
    (DeploySpec, "memory_gb"): "Hard memory limit in GB (no swap beyond it); none by default. "
                               "Part of the spec: a change is a different service.",
    (ServiceView, "port"): "host port",
    (ServiceView, "status"): "rescheduling and pending only in front of a swarm: its node was "
                             "lost, and it is being placed again, or waits for room (see reason).",
    (ServiceView, "uptime"): "seconds",
    (ServiceView, "leases"): "Holders' leases on it.",
    (ServiceView, "lease_expires_at"): "The latest holder's expiry; null without leases.",
    (ServiceView, "vram_used_gb"): "VRAM NVML attributes to the service's container; null when "
                                   "unknown (fake GPUs, a driver hiding per-process memory).",
    (ServiceView, "vram_over"): "Seen above its declared vram_gb by more than max(0.5 GB, 10 %) "
                                "in 3 readings in a row.",
    (ServiceView, "node_name"): "The node it runs on: this node's hostname, or in front of a "
                                "swarm, the swarm node's.",
    (ServiceView, "node_id"): "In front of a swarm, the swarm node's ID: a node's identity; "
                              "else null.",
    (ServiceView, "reason"): "Why it is pending; else null.",
    (DeployAnswer, "lease_id"): "Only when deployed with lease_s: the caller's lease.",
    (DryRunAnswer, "status"): "The running service's status when already_running; else null.",
    (DryRunAnswer, "pull_needed"): "The image is not on the node (no registry is asked); null "
                                   "when another node would pull it.",
    (HealthAnswer, "warnings"): "Every degraded condition the agent knows of; empty when all is well.",
    (HealthAnswer, "auth"): "Whether requests other than GET /health need the bearer token.",
    (ReleaseAnswer, "stopped"): "The service stopped: this was its last lease.",
    (GpuView, "vram_used_gb"): "The whole GPU's use; null where the agent can't see it "
                               "(another node's GPU).",
    (GpuView, "vram_committed_gb"): "What placement counts: each service's max(declared, "
                                    "observed), in-flight reservations, and foreign use.",
    (GpuView, "node_name"): "In front of a swarm: the node it is on (id is its index there); else null.",
    (GpuView, "node_id"): "In front of a swarm: the swarm ID of the node it is on; else null.",
    (GpuView, "vram_accounting"): "How foreign use is known: per_process (NVML per process), "
                                  "whole_gpu (the driver hides processes: all use counts as "
                                  "foreign), declared (fake GPUs, another node's).",
    (Event, "id"): "Increasing, across restarts and file rotation.",
    (DeploySpec, "cache"): "Caches to mount: name -> container path. Each is one of the agent's "
                           "own volumes, shared by every service naming it, kept across stops, "
                           "evictions and restarts (GET /caches).",
    (ServiceView, "cold_start"): "Its deploy's phases in seconds (null when adopted, not deployed, "
                                 "by this agent process).",
    (ImageView, "last_deployed"): "When a deploy last started a service from it (kept across "
                                  "restarts); null when never.",
    (ImageView, "services"): "The services that deployed it, most recent last.",
    (ImageView, "cold_start"): "The last deploy's phases: what the queue and eviction expect.",
    (CacheView, "size_bytes"): "Measured in the background (--cache-measure-interval); null "
                               "until the first measurement.",
    (CacheView, "last_used"): "When a service last mounted it (now, while one does).",
}


def type_schema(hint: Any) -> JSONObject:
    """The JSON Schema of a field's type as the converter reads or writes it."""
    if hint in FIELD_SCHEMAS:
        return dict(FIELD_SCHEMAS[hint])
    if attrs.has(hint):
        return {"$ref": f"#/components/schemas/{COMPONENT_OF[hint]}"}
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return {"enum": list(args)}
    if origin in (typing.Union, types.UnionType):
        options = [type_schema(arg) for arg in args if arg is not type(None)]
        nullable = type(None) in args
        if len(options) == 1 and nullable:
            return _or_null(options[0])
        return {"anyOf": options + ([{"type": "null"}] if nullable else [])}
    if origin in (list, tuple):
        return {"type": "array", "items": type_schema(args[0])}
    if origin is dict:
        return {"type": "object", "additionalProperties": type_schema(args[1])}
    simple = {str: "string", int: "integer", float: "number", bool: "boolean"}
    if hint in simple:
        return {"type": simple[hint]}
    if hint is Any:
        return {}
    supertype = getattr(hint, "__supertype__", None)  # a NewType without a rule of its own
    if supertype is not None:
        return type_schema(supertype)
    raise TypeError(f"no JSON Schema for {hint!r}")


def _or_null(schema: JSONObject) -> JSONObject:
    if "enum" in schema:
        return {**schema, "enum": [*schema["enum"], None]}
    if isinstance(schema.get("type"), str):
        return {**schema, "type": [schema["type"], "null"]}
    return {"anyOf": [schema, {"type": "null"}]}


def _field_schema(model: type, field: attrs.Attribute[Any], hint: Any) -> JSONObject:
    schema = type_schema(hint)
    schema.update(field.metadata.get("schema", {}))
    if (model, field.name) in FIELD_DOCS:
        schema["description"] = FIELD_DOCS[(model, field.name)]
    return schema


def answer_schema(model: type) -> JSONObject:
    """An answer: every field, always present, nothing else; a field written only when set
    (metadata omit_if_default) is not required."""
    hints = typing.get_type_hints(model)
    properties, required = {}, []
    for field in attrs.fields(model):
        schema = _field_schema(model, field, hints[field.name])
        if field.metadata.get("omit_if_default"):
            schema = _without_null(schema)
        else:
            required.append(field.name)
        properties[field.name] = schema
    described: JSONObject = {"type": "object", "additionalProperties": False, "required": required,
                             "properties": properties}
    if model.__doc__:  # its first paragraph, on one line
        described["description"] = " ".join(model.__doc__.split("\n\n")[0].split())
    return described


def _without_null(schema: JSONObject) -> JSONObject:
    kind = schema.get("type")
    if isinstance(kind, list) and "null" in kind:
        rest = [k for k in kind if k != "null"]
        return {**schema, "type": rest[0] if len(rest) == 1 else rest}
    return schema


def spec_properties() -> dict[str, JSONObject]:
    """The flat deploy body's fields: the spec's, by the converter's rules, with their defaults."""
    hints = typing.get_type_hints(DeploySpec)
    properties = {}
    for field in attrs.fields(DeploySpec):
        schema = _field_schema(DeploySpec, field, hints[field.name])
        if field.default is not attrs.NOTHING and not isinstance(field.default, attrs.Factory):  # type: ignore[arg-type]
            default = field.default
            schema["default"] = list(default) if isinstance(default, tuple) else default
        properties[field.name] = schema
    return properties


def deploy_schemas() -> dict[str, JSONObject]:
    """The two deploy forms, flat and service.yaml, from one set of field schemas."""
    flat = spec_properties()
    required = [f.name for f in attrs.fields(DeploySpec) if f.default is attrs.NOTHING]
    request_keys = {key: dict(schema) for key, schema in REQUEST_KEY_SCHEMAS.items()}

    def section(mapping: dict[str, str | None]) -> JSONObject:
        """A manifest section's keys: each the flat field it lands in, or a known extra."""
        properties = {}
        for key, target in mapping.items():
            if target is None:
                properties[key] = dict(MANIFEST_EXTRA_SCHEMAS[key])
            elif mapping is MANIFEST_REQUIRES:  # `requires` states needs: no defaults shown
                properties[key] = _without_default(flat[target])
            else:
                properties[key] = flat[target]
        return properties

    manifest_top = {"name": flat["name"], "version": flat["version"],
                    "description": flat["description"], "client": dict(MANIFEST_EXTRA_SCHEMAS["client"])}
    return {
        "DeployRequest": {"anyOf": [{"$ref": "#/components/schemas/FlatDeploy"},
                                    {"$ref": "#/components/schemas/ManifestDeploy"}]},
        "FlatDeploy": {"type": "object", "additionalProperties": False, "required": required,
                       "properties": {**flat, **request_keys}},
        "ManifestDeploy": {
            "type": "object", "additionalProperties": False, "required": ["name", "deploy"],
            "description": "The nested service.yaml form, as JSON.",
            "properties": {
                **manifest_top, **request_keys,
                "requires": {"type": "object", "additionalProperties": False,
                             "properties": section(MANIFEST_REQUIRES)},
                "deploy": {"type": "object", "additionalProperties": False, "required": ["image"],
                           "properties": section(MANIFEST_DEPLOY)},
            },
        },
        "StopRequest": {"type": "object", "additionalProperties": False, "required": ["name"],
                        "properties": {"name": flat["name"]}},
        "PullRequest": {"type": "object", "additionalProperties": False, "required": ["image"],
                        "properties": {"image": flat["image"]}},
        "RenewRequest": {"type": "object", "additionalProperties": False, "required": ["lease_id"],
                         "properties": {
                             "lease_id": {**_without_null(request_keys["lease_id"]),
                                          "description": "The lease to extend: the id a leased "
                                                         "deploy answered."},
                             "lease_s": {**request_keys["lease_s"],
                                         "description": "Its new length in seconds, at most "
                                                        "--max-lease; its own length when absent."}}},
    }


def _without_default(schema: JSONObject) -> JSONObject:
    return {k: v for k, v in schema.items() if k != "default"}


ERROR_SCHEMA: JSONObject = {
    "type": "object", "required": ["ok", "error", "message"],
    "properties": {
        "ok": {"const": False}, "error": {"type": "string"}, "message": {"type": "string"},
        "details": {"type": "array", "items": {
            "type": "object", "required": ["field", "message"],
            "properties": {"field": {"type": "string"}, "message": {"type": "string"}}}},
        "logs": {"type": "array", "items": {"type": "string"}},
        "exit_code": {"type": "integer"},
        "differing_fields": {"type": "array", "items": {"type": "string"}},
    },
}


@attrs.frozen
class Operation:
    """One route's description: prose, query parameters, body, answers by status."""

    operation_id: str
    summary: str
    answers: dict[int, tuple[str, JSONObject]]  # status -> (description, content)
    errors: dict[int, str] = attrs.field(factory=dict)  # status -> description (an Error body)
    query: tuple[JSONObject, ...] = ()
    body: str | None = None  # the component schema of its JSON body
    public: bool = False  # no token needed
    description: str | None = None


def json_of(schema: JSONObject) -> JSONObject:
    return {"application/json": {"schema": schema}}


def ref(name: str) -> JSONObject:
    return {"$ref": f"#/components/schemas/{name}"}


def array_of(name: str) -> JSONObject:
    return {"type": "array", "items": ref(name)}


TEXT = {"text/plain": {"schema": {"type": "string"}}}
NOT_HERE = "Not deployed here."
BAD_BODY = {400: "Invalid request; `details` has one entry per bad field.", 413: "Body larger than 1 MiB.",
            415: "The body is not sent as Content-Type: application/json (unsupported_media_type); "
                 "nothing was done."}
STREAMS = 429, "follow=1 while --max-streams follows are open (too_many_streams)."

OPERATIONS: dict[tuple[str, str], Operation] = {
    ("get", "/health"): Operation("health", "The agent's own health", public=True,
                                  answers={200: ("Agent status", json_of(ref("Health")))}),
    ("get", "/services"): Operation("listServices", "Every service on this node",
                                    answers={200: ("Services", json_of(array_of("Service")))}),
    ("get", "/services/{name}"): Operation("getService", "One service",
                                           answers={200: ("The service", json_of(ref("Service")))},
                                           errors={404: NOT_HERE}),
    ("post", "/deploy"): Operation(
        "deploy", "Deploy a service (idempotent)", body="DeployRequest",
        description="With `Accept: application/x-ndjson` the answer streams one JSON event per line "
                    "(pull progress, created, started, health attempts) and ends with the object the "
                    "plain answer would have been, errors included.",
        query=({"name": "dry_run", "in": "query", "schema": FLAG,
                "description": "Answer what a deploy would do now (its GPU, host port, whether it would "
                               "pull), creating and reserving nothing; refusals are the same as a real "
                               "deploy's."},),
        answers={200: ("Running and healthy", {
            **json_of({"oneOf": [ref("DeployAnswer"), ref("DryRunAnswer")]}),
            "application/x-ndjson": {
                "schema": {"type": "string"},
                "description": 'Events: {"event": "lease"|"waiting"|"pull"|"created"|"started"|'
                               '"health", ...} (lease: first, with lease_s, its lease_id; waiting: '
                               "every 5 s while another deploy or stop of the name is under way); "
                               "last line: DeployAnswer or Error."}})},
        errors={**BAD_BODY,
                404: "lease_id is not a lease held on that service (lease_not_found).",
                409: "Deployed with a different spec (see differing_fields), or the name is taken.",
                403: "Mount or image not allowed by the node's policy, a Host name not the agent's "
                     "(host_not_allowed), or the registry refused the pull (registry_denied: "
                     "`registry`, `credentials_sent`).",
                422: "Image not found or not pullable.",
                502: "The container exited before becoming healthy, or the engine refused an operation.",
                503: "Engine unreachable or not answering within --engine-timeout, no GPU, no GPU "
                     "capacity, or no free port.",
                504: "Not healthy within ready_timeout (health_timeout), or the pull made no progress "
                     "for --pull-stall-timeout (pull_stalled)."}),
    ("post", "/stop"): Operation(
        "stop", "Stop and remove a service", body="StopRequest",
        answers={200: ("Stopped", json_of(ref("StopAnswer")))},
        errors={**BAD_BODY, 404: NOT_HERE,
                502: "The engine refused an operation (in front of a swarm: the task still runs "
                     "past the grace; the agent finishes the stop once it is gone).",
                503: "The Docker engine is unreachable or did not answer in time."}),
    ("get", "/gpus"): Operation("gpus", "GPUs and their VRAM accounting",
                                answers={200: ("GPUs", json_of(array_of("Gpu")))}),
    ("get", "/queue"): Operation("queue", "GPU deploys waiting for room, first served first",
                                 answers={200: ("Waiting deploys", json_of(array_of("QueueEntry")))}),
    ("get", "/openapi.json"): Operation("openapi", "This description",
                                        answers={200: ("OpenAPI 3.1 document", json_of({"type": "object"}))}),
    ("get", "/services/{name}/logs"): Operation(
        "serviceLogs", "A service's recent output; follow=1 streams it",
        query=({"name": "tail", "in": "query",
                "schema": {"type": "integer", "minimum": 0, "maximum": LOG_TAIL_MAX,
                           "default": LOG_TAIL_DEFAULT}},
               {"name": "follow", "in": "query", "schema": FLAG}),
        answers={200: ("Log text, stdout and stderr interleaved", TEXT)},
        errors={400: "Bad tail or follow.", 404: NOT_HERE, 503: "The Docker engine is unreachable.",
                STREAMS[0]: STREAMS[1]}),
    ("get", "/metrics"): Operation("metrics", "Prometheus metrics",
                                   answers={200: ("Prometheus text exposition format", TEXT)}),
    ("post", "/services/{name}/renew"): Operation(
        "renewLease", "Extend the caller's lease on a service", body="RenewRequest",
        answers={200: ("Renewed: it expires lease_s from now.", json_of(ref("LeaseAnswer")))},
        errors={**BAD_BODY, 400: "Invalid request, or lease_s above --max-lease.",
                404: "No such lease on that service (lease_not_found)."}),
    ("delete", "/services/{name}/leases/{lease_id}"): Operation(
        "releaseLease", "Drop the caller's lease; the service stops with its last one",
        answers={200: ("Released.", json_of(ref("ReleaseAnswer")))},
        errors={404: "No such lease on that service (lease_not_found).",
                502: "The engine refused to stop the service.",
                503: "The Docker engine is unreachable or did not answer in time."}),
    ("get", "/events"): Operation(
        "events", "Recent events, oldest first; follow=1 streams new ones as NDJSON",
        query=({"name": "since", "in": "query", "schema": {"type": "integer", "minimum": 0},
                "description": "Only events with a larger id."},
               {"name": "limit", "in": "query",
                "schema": {"type": "integer", "minimum": 0, "maximum": MEMORY_EVENTS,
                           "default": EVENTS_LIMIT_DEFAULT}},
               {"name": "follow", "in": "query", "schema": FLAG}),
        answers={200: ("Events (with follow=1: one JSON event per line, as they happen)", {
            **json_of(array_of("Event")), "application/x-ndjson": {"schema": ref("Event")}})},
        errors={400: "Bad since, limit or follow.", STREAMS[0]: STREAMS[1]}),
    ("post", "/images/pull"): Operation(
        "pullImage", "Pull an image now, ahead of its deploys", body="PullRequest",
        description="Always asks the registry (a moved tag is refreshed), with the node's registry "
                    "credentials, under the image policy. With `Accept: application/x-ndjson` the "
                    "answer streams pull progress and ends with the object the plain answer would "
                    "have been, errors included.",
        answers={200: ("Pulled", {**json_of(ref("PullAnswer")),
                                  "application/x-ndjson": {"schema": {"type": "string"}}})},
        errors={**BAD_BODY, 403: "Image not allowed (image_not_allowed), or the registry refused "
                                 "the pull (registry_denied).",
                422: "Image not found in its registry.",
                501: "In front of a swarm: the engine can't pull onto other nodes (not_supported).",
                503: "The Docker engine is unreachable or did not answer in time.",
                504: "The pull made no progress for --pull-stall-timeout (pull_stalled)."}),
    ("get", "/images"): Operation(
        "listImages", "The images on this node that deploys may use",
        answers={200: ("Images", json_of(array_of("Image")))},
        errors={503: "The Docker engine is unreachable or did not answer in time."}),
    ("get", "/caches"): Operation(
        "listCaches", "The agent's volumes (caches), their sizes and who mounts them",
        answers={200: ("Caches", json_of(array_of("Cache")))},
        errors={503: "The Docker engine is unreachable or did not answer in time."}),
    ("delete", "/caches/{name}"): Operation(
        "removeCache", "Remove a cache no service mounts",
        answers={200: ("Removed", json_of(ref("CacheRemoved")))},
        errors={404: "The agent has no cache of that name.",
                409: "Mounted by a service (or one being deployed): stop it first.",
                503: "The Docker engine is unreachable or did not answer in time."}),
    ("get", "/"): Operation("statusPage", "The status page (HTML; reads this same API)", public=True,
                            answers={200: ("The page", {"text/html": {"schema": {"type": "string"}}})}),
    ("get", "/static/{name}"): Operation(
        "statusPageAsset", "The status page's script, style and icon", public=True,
        answers={200: ("The file", {kind: {"schema": {"type": "string"}} for kind in
                                    ("text/javascript", "text/css", "image/svg+xml")}),
                 404: ("No such file", TEXT)}),
}


def _operation(path: str, operation: Operation) -> JSONObject:
    described: JSONObject = {"operationId": operation.operation_id, "summary": operation.summary}
    if operation.description:
        described["description"] = operation.description
    if operation.public:
        described["security"] = []
    parameters = [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                  for name in _path_names(path)]
    parameters += [dict(param) for param in operation.query]
    if parameters:
        described["parameters"] = parameters
    if operation.body is not None:
        described["requestBody"] = {"required": True, "content": json_of(ref(operation.body))}
    responses: JSONObject = {str(status): {"description": text, "content": content}
                             for status, (text, content) in operation.answers.items()}
    errors = dict(operation.errors)
    if not operation.public:
        errors[401] = "Missing or wrong bearer token (when the agent has one)."
    for status, text in sorted(errors.items()):
        responses[str(status)] = {"description": text, "content": json_of(ERROR)}
    described["responses"] = dict(sorted(responses.items()))
    return described


def _path_names(path: str) -> list[str]:
    return [part[1:-1] for part in path.split("/") if part.startswith("{") and part.endswith("}")]


def build_document(routes: Iterable[tuple[str, str]]) -> JSONObject:
    """The whole document for the app's routes ((method, path) pairs); KeyError for a route
    nobody described, ValueError for a description no route has."""
    served = {(method.lower(), path) for method, path in routes if method.upper() != "HEAD"}
    if undescribed := served - OPERATIONS.keys():
        raise KeyError(f"routes without a description in deploy_agent/openapi.py: {sorted(undescribed)}")
    if gone := OPERATIONS.keys() - served:
        raise ValueError(f"described routes the app doesn't serve: {sorted(gone)}")
    paths: JSONObject = {}
    for method, path in sorted(served, key=lambda r: (r[1], r[0])):
        paths.setdefault(path, {})[method] = _operation(path, OPERATIONS[(method, path)])
    schemas = {**deploy_schemas(), **{name: answer_schema(model) for name, model in ANSWERS.items()},
               "Error": ERROR_SCHEMA}
    return {
        "openapi": "3.1.0",
        "info": {"title": "deploy-agent", "version": __version__,
                 "description": "Deploy, find and stop containerised ML services on a GPU node. "
                                "Generated by `python -m deploy_agent.openapi`: do not edit."},
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {"schemas": dict(sorted(schemas.items())),
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                                      "description": "--token-file or DEPLOY_AGENT_TOKEN"}}},
    }


def app_routes() -> list[tuple[str, str]]:
    """The routes the app serves, read from its router (a default config; nothing starts)."""
    from deploy_agent.app import create_app
    from deploy_agent.config import parse_config

    app = create_app(parse_config(["--host", "127.0.0.1"], environ={}))
    return [(route.method, route.resource.canonical) for route in app.router.routes()
            if route.resource is not None]


def render(document: JSONObject) -> str:
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


def main() -> int:
    """Write deploy_agent/openapi.json (or, with --check, exit 1 when it differs)."""
    text = render(build_document(app_routes()))
    if sys.argv[1:] == ["--check"]:
        if DOCUMENT.read_text() != text:
            sys.stderr.write(f"{DOCUMENT} differs from the generator's output; run "
                             "python -m deploy_agent.openapi\n")
            return 1
        return 0
    DOCUMENT.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
