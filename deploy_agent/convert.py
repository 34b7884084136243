"""The one cattrs converter: JSON bodies to models, models to JSON, failures to 400 details.

Hooks are strict: `"8000"` is not a port and `1` is not a string. Each rule raises
FieldError, and `transform_error` turns a whole failed body into one detail per bad field.
"""

from __future__ import annotations

import math
import posixpath
import re
import shlex
from collections.abc import Callable
from pathlib import PurePosixPath
from typing import Any

import attrs
import cattrs
from cattrs.errors import ForbiddenExtraKeysError
from cattrs.gen import make_dict_unstructure_fn, override

from deploy_agent.errors import InvalidRequest
from deploy_agent.models import (
    CacheMap,
    Command,
    DeployRequest,
    DeploySpec,
    EnvMap,
    HealthPath,
    ImageRef,
    JSONObject,
    MemoryGb,
    Port,
    ReadyTimeout,
    ServiceName,
    VolumeList,
    VramGb,
)

NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
# Docker's reference grammar: [registry[:port]/]path[:tag][@digest]
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
# A first component is a registry only with a dot, a port, or as localhost (as Docker reads it).
_REGISTRY = r"(?:localhost|[a-zA-Z0-9-]+(?:\.[a-zA-Z0-9-]+)+|[a-zA-Z0-9-]+:[0-9]+)(?::[0-9]+)?"
IMAGE_RE = re.compile(
    rf"^(?:{_REGISTRY}/)?{_COMPONENT}(?:/{_COMPONENT})*"
    r"(?::[\w][\w.-]{0,127})?(?:@sha256:[a-f0-9]{64})?$"
)
VOLUME_NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,63}$")
MAX_CACHES = 16  # per deploy
SYSTEM_TARGETS = (PurePosixPath("/dev"), PurePosixPath("/proc"), PurePosixPath("/sys"))
ENV_KEY_RE = re.compile(r"^[^=\x00]+$")
TOOLKIT_ENV_PREFIX = "NVIDIA_"
LEASE_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
HEALTH_PATH_RE = re.compile(r"^/\S*$")
IMAGE_MAX_LENGTH = 255
PORT_MIN, PORT_MAX = 1, 65535

# The nested service.yaml form: where each manifest key lands in the flat body.
MANIFEST_REQUIRES = {"gpu": "gpu", "vram_gb": "vram_gb", "ram_gb": None}
MANIFEST_DEPLOY = {
    "image": "image", "port": "port", "env": "env", "volumes": "volumes", "health": "health",
    "ready_timeout": "ready_timeout", "command": "command", "memory_gb": "memory_gb", "shm_gb": "shm_gb",
    "cache": "cache", "runtime": None,
}
# Top-level keys of a deploy that are not the service's spec: the caller's intent.
REQUEST_KEYS = ("replace", "lease_s", "lease_id", "keep_warm_s", "wait_s", "priority")
MANIFEST_TOP = {"name", "version", "description", "client", "requires", "deploy", *REQUEST_KEYS}


class FieldError(ValueError):
    """A value breaks its field's rule; the message says which rule."""


def _strict_str(value: Any, _: Any) -> str:
    if not isinstance(value, str):
        raise FieldError(f"must be a string, not {_json_type(value)}")
    return value


def _strict_int(value: Any, _: Any) -> int:
    if type(value) is not int:
        raise FieldError(f"must be an integer, not {_json_type(value)}")
    return value


def _strict_float(value: Any, _: Any) -> float:
    if type(value) not in (int, float) or not math.isfinite(value):
        raise FieldError(f"must be a number, not {_json_type(value)}")
    return float(value)


def _strict_bool(value: Any, _: Any) -> bool:
    if type(value) is not bool:
        raise FieldError(f"must be true or false, not {_json_type(value)}")
    return value


def _service_name(value: Any, _: Any) -> ServiceName:
    name = _strict_str(value, _)
    if not NAME_RE.fullmatch(name):
        raise FieldError(
            "must be a DNS label: 1-63 lowercase letters, digits or '-', "
            "starting and ending with a letter or digit"
        )
    return ServiceName(name)


def _image_ref(value: Any, _: Any) -> ImageRef:
    image = _strict_str(value, _)
    if not image:
        raise FieldError("must not be empty")
    if len(image) > IMAGE_MAX_LENGTH or not IMAGE_RE.fullmatch(image):
        raise FieldError("is not a valid image reference, e.g. registry:5000/team/image:tag")
    return ImageRef(image)


def _port(value: Any, _: Any) -> Port:
    port = _strict_int(value, _)
    if not PORT_MIN <= port <= PORT_MAX:
        raise FieldError(f"must be between {PORT_MIN} and {PORT_MAX}")
    return Port(port)


def _vram_gb(value: Any, _: Any) -> VramGb:
    vram = _strict_float(value, _)
    if vram < 0:
        raise FieldError("must be 0 or more")
    return VramGb(vram)


def _memory_gb(value: Any, _: Any) -> MemoryGb:
    memory = _strict_float(value, _)
    if memory <= 0:
        raise FieldError("must be more than 0 (GB of memory the service may use)")
    return MemoryGb(memory)


def _health_path(value: Any, _: Any) -> HealthPath:
    path = _strict_str(value, _)
    if not HEALTH_PATH_RE.fullmatch(path):
        raise FieldError("must be a URL path starting with '/', e.g. /health")
    return HealthPath(path)


def _ready_timeout(value: Any, _: Any) -> ReadyTimeout:
    timeout = _strict_float(value, _)
    if timeout <= 0:
        raise FieldError("must be more than 0 seconds")
    return ReadyTimeout(timeout)


def _env_map(value: Any, _: Any) -> EnvMap:
    if not isinstance(value, dict):
        raise FieldError(f"must be a map of names to values, not {_json_type(value)}")
    env = {}
    for key, item in value.items():
        if not ENV_KEY_RE.fullmatch(key):
            raise FieldError(f"has an invalid variable name {key!r}")
        if isinstance(item, bool):
            env[key] = "true" if item else "false"
        elif isinstance(item, str | int | float):
            env[key] = str(item)
        else:
            raise FieldError(f"value of {key!r} must be a string, number or boolean, not {_json_type(item)}")
    return EnvMap(env)


def _volume_list(value: Any, _: Any) -> VolumeList:
    if not isinstance(value, list):
        raise FieldError(f"must be a list of 'source:target[:ro|:rw]' strings, not {_json_type(value)}")
    for entry in value:
        if not isinstance(entry, str):
            raise FieldError(f"entries must be strings, not {_json_type(entry)}")
        _check_volume(entry)
    return VolumeList(tuple(value))


def _cache_map(value: Any, _: Any) -> CacheMap:
    if not isinstance(value, dict):
        raise FieldError(f"must be a map of cache names to container paths, not {_json_type(value)}")
    if len(value) > MAX_CACHES:
        raise FieldError(f"names {len(value)} caches; at most {MAX_CACHES}")
    for name, target in value.items():
        if not VOLUME_NAME_RE.fullmatch(name):
            raise FieldError(f"{name!r} is not a cache name (letters, digits, '_', '.', '-')")
        if not isinstance(target, str):
            raise FieldError(f"path of {name!r} must be a string, not {_json_type(target)}")
        _check_target(f"{name}: {target}", target)
    return CacheMap(dict(value))


def _check_target(entry: str, target: str) -> None:
    if not target.startswith("/") or target == "/" or ".." in target.split("/") or ":" in target:
        raise FieldError(f"{entry!r}: target must be an absolute path other than '/', without "
                         "'..' or ':'")
    path = PurePosixPath(posixpath.normpath(target))
    for system in SYSTEM_TARGETS:
        if path == system or system in path.parents:
            raise FieldError(f"{entry!r}: nothing is mounted at or under {system} (the runtime's "
                             "own; /dev/shm is shm_gb)")


def _check_volume(entry: str) -> None:
    parts = entry.split(":")
    if len(parts) == 3 and parts[2] in ("ro", "rw"):
        parts = parts[:2]
    if len(parts) != 2:
        raise FieldError(f"{entry!r} is not 'source:target[:ro|:rw]'")
    source, target = parts
    if not (source.startswith("/") or VOLUME_NAME_RE.fullmatch(source)):
        raise FieldError(f"{entry!r}: source must be a volume name or an absolute host path")
    _check_target(entry, target)


def _command(value: Any, _: Any) -> Command:
    if isinstance(value, str):
        try:
            argv = shlex.split(value)
        except ValueError as err:
            raise FieldError(f"cannot be split into arguments: {err}") from None
    elif isinstance(value, list) and all(isinstance(arg, str) for arg in value):
        argv = value
    else:
        raise FieldError("must be a string or a list of strings")
    if not argv:
        raise FieldError("must not be empty")
    return Command(tuple(argv))


def _json_type(value: Any) -> str:
    names = {type(None): "null", bool: "boolean", int: "integer", float: "number",
             str: "string", list: "array", dict: "object"}
    return names.get(type(value), type(value).__name__)


# What each rule-carrying type accepts, as JSON Schema: the OpenAPI document's field schemas
# (deploy_agent/openapi.py), written beside the hooks above that enforce them.
FIELD_SCHEMAS: dict[Any, JSONObject] = {
    ServiceName: {"type": "string", "pattern": NAME_RE.pattern},
    ImageRef: {"type": "string", "minLength": 1, "maxLength": IMAGE_MAX_LENGTH},
    Port: {"type": "integer", "minimum": PORT_MIN, "maximum": PORT_MAX},
    VramGb: {"type": "number", "minimum": 0},
    MemoryGb: {"type": "number", "exclusiveMinimum": 0},
    HealthPath: {"type": "string", "pattern": HEALTH_PATH_RE.pattern},
    ReadyTimeout: {"type": "number", "exclusiveMinimum": 0},
    EnvMap: {"type": "object", "propertyNames": {"pattern": ENV_KEY_RE.pattern},
             "additionalProperties": {"type": ["string", "number", "boolean"]}},
    VolumeList: {"type": "array", "items": {"type": "string"}},
    CacheMap: {"type": "object", "propertyNames": {"pattern": VOLUME_NAME_RE.pattern},
               "maxProperties": MAX_CACHES,
               "additionalProperties": {"type": "string", "pattern": "^/"}},
    Command: {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1}]},
}
# The deploy keys that are the caller's intent, not the spec (parse_deploy_request).
REQUEST_KEY_SCHEMAS: dict[str, JSONObject] = {
    "replace": {"type": "boolean", "default": False},
    "lease_s": {"type": ["number", "null"], "exclusiveMinimum": 0,
                "description": "Seconds the caller's lease keeps the service; at most --max-lease. "
                               "Not part of the spec: renewing never conflicts."},
    "lease_id": {"type": ["string", "null"], "pattern": LEASE_ID_RE.pattern,
                 "description": "Renew this lease (from an earlier leased deploy) instead of taking "
                                "a new one; needs lease_s."},
    "wait_s": {"type": ["number", "null"], "minimum": 0,
               "description": "Seconds a GPU deploy that fits nowhere may wait in the node's queue "
                              "for room (default 0: answer at once); at most --max-wait."},
    "priority": {"type": ["integer", "null"], "minimum": 0, "maximum": 9,
                 "description": "0-9 (default 5): its place in the queue, before later and lower "
                                "ones; capped by --max-priority."},
    "keep_warm_s": {"type": ["number", "null"], "minimum": 0,
                    "description": "Seconds the service stays running (idle) after its last lease "
                                   "ends; default --keep-warm, capped by --max-keep-warm, 0 stops it "
                                   "then; the largest of its holders' applies. Needs lease_s."},
}
# Manifest keys that land nowhere in the flat body: accepted, never an error.
MANIFEST_EXTRA_SCHEMAS: dict[str, JSONObject] = {
    "client": {"description": "Known manifest key (the service's client module); accepted and ignored."},
    "ram_gb": {"description": "Known manifest key; accepted and ignored."},
    "runtime": {"description": "Known manifest key; accepted and ignored."},
}


def make_converter() -> cattrs.Converter:
    """The converter: simple types first, then each rule-carrying NewType."""
    converter = cattrs.Converter(forbid_extra_keys=True)
    # A deploy answer names the caller's lease only when it deployed with one.
    # A field marked omit_if_default (its metadata) is written only when set, in any answer.
    def omits(cls: Any) -> bool:
        return attrs.has(cls) and any(f.metadata.get("omit_if_default") for f in attrs.fields(cls))

    def unstructure_omitting(cls: Any) -> Callable[[Any], Any]:
        omitted: dict[str, Any] = {f.name: override(omit_if_default=True) for f in attrs.fields(cls)
                                   if f.metadata.get("omit_if_default")}
        return make_dict_unstructure_fn(cls, converter, **omitted)

    converter.register_unstructure_hook_factory(omits, unstructure_omitting)
    for simple, hook in ((str, _strict_str), (int, _strict_int), (float, _strict_float),
                         (bool, _strict_bool)):
        converter.register_structure_hook(simple, hook)
    rules: tuple[tuple[Any, Callable[[Any, Any], Any]], ...] = (
        (ServiceName, _service_name), (ImageRef, _image_ref), (Port, _port),
        (VramGb, _vram_gb), (MemoryGb, _memory_gb), (HealthPath, _health_path),
        (ReadyTimeout, _ready_timeout),
        (EnvMap, _env_map), (VolumeList, _volume_list), (CacheMap, _cache_map),
        (Command, _command),
    )
    for newtype, rule in rules:
        converter.register_structure_hook(newtype, rule)
    return converter


def _format_exception(exc: BaseException, type_: Any) -> str:
    if isinstance(exc, FieldError):
        return str(exc)
    if isinstance(exc, ForbiddenExtraKeysError):
        return f"unknown field(s): {', '.join(sorted(exc.extra_fields))}"
    if isinstance(exc, KeyError):
        return "is required"
    return cattrs.v.format_exception(exc, type_)


def _detail(message: str, origin: dict[str, str]) -> JSONObject:
    """'must be an integer @ $.port' -> {"field": "deploy.port", "message": ...}."""
    text, _, path = message.rpartition(" @ ")
    field = path.removeprefix("$").removeprefix(".")
    return {"field": origin.get(field, field) or "$", "message": text}


def flatten_manifest(body: JSONObject) -> tuple[JSONObject, dict[str, str], list[JSONObject]]:
    """The nested service.yaml form -> the flat body, where each flat field came from, errors."""
    flat: JSONObject = {}
    origin: dict[str, str] = {}
    details: list[JSONObject] = []
    unknown = sorted(set(body) - MANIFEST_TOP)
    if unknown:
        details.append({"field": "$", "message": f"unknown field(s): {', '.join(unknown)}"})
    for key in ("name", "version", "description", *REQUEST_KEYS):
        if key in body:
            flat[key] = body[key]
    for section, mapping in (("requires", MANIFEST_REQUIRES), ("deploy", MANIFEST_DEPLOY)):
        nested = body.get(section, {})
        if not isinstance(nested, dict):
            details.append({"field": section, "message": "must be an object"})
            continue
        for key, value in nested.items():
            if key not in mapping:
                details.append({"field": section, "message": f"unknown field(s): {key}"})
                continue
            target = mapping[key]
            if target is not None:
                flat[target] = value
                origin[target] = f"{section}.{key}"
    if "deploy" in body and isinstance(body["deploy"], dict) and "image" not in body["deploy"]:
        details.append({"field": "deploy.image", "message": "is required"})
    return flat, origin, details


def parse_deploy_request(converter: cattrs.Converter, body: Any) -> DeployRequest:
    """A decoded JSON body, flat or nested -> DeployRequest, or InvalidRequest with details."""
    if not isinstance(body, dict):
        raise InvalidRequest(
            "The body must be a JSON object.",
            details=[{"field": "$", "message": f"must be an object, not {_json_type(body)}"}],
        )
    origin: dict[str, str] = {}
    details: list[JSONObject] = []
    if "deploy" in body or "requires" in body:
        body, origin, details = flatten_manifest(body)
    body = dict(body)
    replace = body.pop("replace", False)
    if type(replace) is not bool:
        details.append({"field": "replace", "message": "must be true or false"})
    lease_s = _optional_field(body.pop("lease_s", None), "lease_s", _lease_seconds, details)
    lease_id = _optional_field(body.pop("lease_id", None), "lease_id", _lease_id, details)
    if lease_id is not None and lease_s is None:
        details.append({"field": "lease_id", "message": "comes with lease_s (renewing for how long?)"})
    keep_warm_s = _optional_field(body.pop("keep_warm_s", None), "keep_warm_s", _keep_warm_seconds,
                                  details)
    if keep_warm_s is not None and lease_s is None:
        details.append({"field": "keep_warm_s", "message": "comes with lease_s (an unleased deploy "
                                                           "runs until stopped)"})
    wait_s = _optional_field(body.pop("wait_s", None), "wait_s", _wait_seconds, details)
    priority = _optional_field(body.pop("priority", None), "priority", _priority, details)
    spec: DeploySpec | None = None
    try:
        spec = converter.structure(body, DeploySpec)
    except cattrs.BaseValidationError as err:
        messages = cattrs.transform_error(err, format_exception=_format_exception)
        details.extend(_detail(message, origin) for message in messages)
    if spec is not None and spec.shm_gb is not None and spec.memory_gb is not None \
            and spec.shm_gb > spec.memory_gb:
        details.append({"field": origin.get("shm_gb", "shm_gb"),
                        "message": f"is counted within memory_gb ({spec.memory_gb:g}): at most that"})
    if spec is not None:
        details.extend(_mount_clashes(spec, origin))
        details.extend({"field": origin.get("env", "env"),
                        "message": f"{key!r} steers the NVIDIA container toolkit, which hands out "
                                   "GPUs: the agent sets it alone (deploy with gpu: true and vram_gb)"}
                       for key in spec.env if is_toolkit_key(key))
    if details or spec is None:
        fields = ", ".join(sorted({d["field"] for d in details}))
        raise InvalidRequest(f"The deploy request is invalid ({fields}); see details.", details=details)
    return DeployRequest(spec=spec, replace=replace, lease_s=lease_s, lease_id=lease_id,
                         keep_warm_s=keep_warm_s, wait_s=wait_s or 0.0, priority=priority)


def _mount_clashes(spec: DeploySpec, origin: dict[str, str]) -> list[JSONObject]:
    """A container path mounted twice (by volumes, caches, or both: the engine refuses it),
    or a mount inside a cache or a cache inside a mount: a cache is shared with other
    services, which could swap the inner mount point for a symlink."""
    def normal(target: str) -> PurePosixPath:
        return PurePosixPath(posixpath.normpath(target))
    volumes = [normal(entry.split(":")[1]) for entry in spec.volumes]
    caches = [normal(target) for target in spec.cache.values()]
    targets = volumes + caches
    field = origin.get("cache", "cache") if spec.cache else origin.get("volumes", "volumes")
    details: list[JSONObject] = [
        {"field": field, "message": f"{target} is mounted more than once (volumes and cache together)"}
        for target in sorted({t for t in targets if targets.count(t) > 1})]
    details += [{"field": field, "message": f"{inner} is mounted inside the cache mount {outer}, or "
                                            "the other way round: mount them side by side"}
                for cache in caches for other in targets
                for outer, inner in ((cache, other), (other, cache)) if outer in inner.parents]
    return details


def is_toolkit_key(key: str) -> bool:
    """An env key the NVIDIA container toolkit reads (NVIDIA_VISIBLE_DEVICES, ..._CAPABILITIES,
    any case): one a caller could use to get GPUs the agent never accounted for."""
    return key.upper().startswith(TOOLKIT_ENV_PREFIX)


def _lease_seconds(value: Any) -> float:
    seconds = _strict_float(value, float)
    if seconds <= 0:
        raise FieldError("must be more than 0 seconds")
    return seconds


def _keep_warm_seconds(value: Any) -> float:
    seconds = _strict_float(value, float)
    if seconds < 0:
        raise FieldError("must be 0 (stop when the last lease ends) or more seconds")
    return seconds


def _wait_seconds(value: Any) -> float:
    seconds = _strict_float(value, float)
    if seconds < 0:
        raise FieldError("must be 0 (answer at once) or more seconds")
    return seconds


def _priority(value: Any) -> int:
    if type(value) is not int or not 0 <= value <= 9:
        raise FieldError("must be a whole number from 0 to 9 (default 5)")
    return value


def _lease_id(value: Any) -> str:
    lease_id = _strict_str(value, str)
    if not LEASE_ID_RE.fullmatch(lease_id):
        raise FieldError("is not a lease id this agent gives out")
    return lease_id


def _optional_field(value: Any, field: str, rule: Callable[[Any], Any],
                    details: list[JSONObject]) -> Any:
    """None stays None; anything else must pass `rule`, or adds a detail."""
    if value is None:
        return None
    try:
        return rule(value)
    except FieldError as err:
        details.append({"field": field, "message": str(err)})
        return None


def parse_renew_request(body: Any) -> tuple[str, float | None]:
    """`{"lease_id": ..., "lease_s": ...}` (lease_s optional) -> both, or InvalidRequest."""
    if not isinstance(body, dict):
        raise InvalidRequest('The body must be a JSON object like {"lease_id": "...", "lease_s": 60}.',
                             details=[{"field": "$", "message": "must be an object"}])
    details: list[JSONObject] = []
    unknown = sorted(set(body) - {"lease_id", "lease_s"})
    if unknown:
        details.append({"field": "$", "message": f"unknown field(s): {', '.join(unknown)}"})
    if "lease_id" not in body:
        details.append({"field": "lease_id", "message": "is required"})
    lease_id = _optional_field(body.get("lease_id"), "lease_id", _lease_id, details)
    lease_s = _optional_field(body.get("lease_s"), "lease_s", _lease_seconds, details)
    if details or lease_id is None:
        raise InvalidRequest("The renew request is invalid; see details.", details=details)
    return lease_id, lease_s


def parse_stop_request(converter: cattrs.Converter, body: Any) -> ServiceName:
    """`{"name": ...}` -> the name, or InvalidRequest."""
    del converter
    return ServiceName(_one_field(body, "name", _service_name, "stop", '{"name": "my-service"}'))


def parse_pull_request(body: Any) -> ImageRef:
    """`{"image": ...}` (POST /images/pull) -> the image reference, or InvalidRequest."""
    return ImageRef(_one_field(body, "image", _image_ref, "pull", '{"image": "registry:5000/team/x:1"}'))


def _one_field(body: Any, field: str, rule: Callable[[Any, Any], Any], what: str, example: str) -> Any:
    """The value of a body that is `{field: value}` and nothing else, checked by `rule`."""
    if not isinstance(body, dict):
        raise InvalidRequest(f"The body must be a JSON object like {example}.",
                             details=[{"field": "$", "message": "must be an object"}])
    details = []
    unknown = sorted(set(body) - {field})
    if unknown:
        details.append({"field": "$", "message": f"unknown field(s): {', '.join(unknown)}"})
    value = None
    if field not in body:
        details.append({"field": field, "message": "is required"})
    else:
        try:
            value = rule(body[field], None)
        except FieldError as err:
            details.append({"field": field, "message": str(err)})
    if details:
        raise InvalidRequest(f"The {what} request is invalid; see details.", details=details)
    return value
