"""Deploy bodies from what callers hold: a dict, a service.yaml, stdin."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypedDict

import yaml

Manifest = Mapping[str, Any] | str | Path


class Intent(TypedDict, total=False):
    """What a caller asks of a deploy besides its spec (never part of it)."""

    wait_s: float  # a GPU deploy that fits nowhere may wait this long for room
    priority: int  # 0-9: its place in the queue
    keep_warm_s: float  # with a lease: how long it stays warm once the last lease ends


def load_manifest(manifest: Manifest) -> dict[str, Any]:
    """A deploy body from a dict (flat or nested), a service.yaml path, or '-' for stdin YAML.

    ValueError for YAML that is not a mapping (or not YAML); OSError for an unreadable file.
    """
    if isinstance(manifest, Mapping):
        return dict(manifest)
    text = sys.stdin.read() if str(manifest) == "-" else Path(manifest).read_text()
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ValueError(f"{manifest} is not valid YAML{where}: "
                         f"{getattr(err, 'problem', None) or err}") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"{manifest} does not hold a YAML mapping")
    return loaded


def image_of(body: Mapping[str, Any]) -> str:
    """The image of a flat or nested body ('' when it has none: the agent will say so)."""
    nested = body.get("deploy")
    return str((nested if isinstance(nested, Mapping) else body).get("image", ""))


def requirements(body: Mapping[str, Any]) -> tuple[bool, float]:
    """(gpu, vram_gb) of a flat or nested body, as the agent will read them."""
    nested = body.get("requires")
    source = nested if isinstance(nested, Mapping) else body
    try:
        return bool(source.get("gpu", False)), float(source.get("vram_gb", 0) or 0)
    except (TypeError, ValueError):
        return bool(source.get("gpu", False)), 0.0  # the agent will say what is wrong with it


def deploy_body(manifest: Manifest, replace: bool = False, lease_s: float | None = None,
                lease_id: str | None = None, intent: Intent | None = None) -> dict[str, Any]:
    body = {**load_manifest(manifest), **(intent or {})}
    if replace:
        body["replace"] = True
    if lease_s is not None:
        body["lease_s"] = lease_s
    if lease_id is not None:
        body["lease_id"] = lease_id
    return body
