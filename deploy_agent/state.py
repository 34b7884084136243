"""Where deployments are remembered: container labels (the truth) and services.json (a copy).

The labels carry the full spec, host port and GPU, so a node whose state file is lost
or corrupt rebuilds everything from `docker ps`. services.json is written atomically:
temp file, fsync, rename, fsync of the directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import attrs
import cattrs

from deploy_agent.models import MANAGED_LABEL, DeploySpec, JSONObject, Lease, Service

_LOGGER = logging.getLogger(__name__)

FORMAT_VERSION = 1
SPEC_LABEL = "tidybot.spec"
HOST_PORT_LABEL = "tidybot.host-port"
GPU_LABEL = "tidybot.gpu"
VRAM_LABEL = "tidybot.vram-gb"
ATTEMPT_LABEL = "tidybot.attempt"  # one per deploy attempt: what an abandoned attempt is known by
LEASE_LABEL = "tidybot.lease"  # {"id", "lease_s"} of the lease that created it, if any


@attrs.frozen
class Abandoned:
    """A deploy attempt whose container could not be removed (or may yet be created):
    resyncs remove its container when the engine is back, and never adopt it."""

    attempt: str
    name: str
    since: float


@attrs.frozen
class SavedState:
    """What services.json holds."""

    services: list[Service]
    abandoned: list[Abandoned] = attrs.field(factory=list)
    leases: list[Lease] = attrs.field(factory=list)


def labels_for(converter: cattrs.Converter, spec: DeploySpec, host_port: int,
               gpu: int | None, instance: str, attempt: str,
               lease: Lease | None = None) -> dict[str, str]:
    """The labels a service container carries so it can be adopted after any restart.

    The lease that created it is among them: should services.json be lost, that holder's
    lease comes back (labels can't change later, so later leases live only in the file).
    """
    labels = {
        MANAGED_LABEL: instance,
        SPEC_LABEL: json.dumps(converter.unstructure(spec), sort_keys=True),
        HOST_PORT_LABEL: str(host_port),
        VRAM_LABEL: str(spec.vram_gb),
        ATTEMPT_LABEL: attempt,
    }
    if gpu is not None:
        labels[GPU_LABEL] = str(gpu)
    if lease is not None:
        labels[LEASE_LABEL] = json.dumps({"id": lease.id, "lease_s": lease.lease_s})
    return labels


def lease_of(labels: JSONObject) -> tuple[str, float] | None:
    """(id, lease_s) of the lease a container was created with; None when deployed unleased."""
    try:
        found = json.loads(labels[LEASE_LABEL])
        return str(found["id"]), float(found["lease_s"])
    except (KeyError, ValueError, TypeError):
        return None


def recorded_in(converter: cattrs.Converter, labels: JSONObject, instance: str,
                what: str) -> tuple[DeploySpec, int, int | None] | None:
    """The spec, host port and GPU index that an agent instance's labels record on `what` (a
    container or a Swarm service); None when it is not this instance's, or they are unusable."""
    if labels.get(MANAGED_LABEL) != instance:
        return None
    try:
        spec = converter.structure(json.loads(labels[SPEC_LABEL]), DeploySpec)
        return spec, int(labels[HOST_PORT_LABEL]), int(labels[GPU_LABEL]) if GPU_LABEL in labels else None
    except (KeyError, ValueError, cattrs.BaseValidationError) as err:
        _LOGGER.warning("%s has unusable agent labels: %s", what, err)
        return None


def service_from_container(converter: cattrs.Converter, info: JSONObject,
                           instance: str) -> Service | None:
    """Rebuild a Service from a container's inspect document.

    None when the container is not this agent instance's, or its labels are unusable.
    """
    labels = info.get("Config", {}).get("Labels") or {}
    recorded = recorded_in(converter, labels, instance, f"Container {info.get('Name')}")
    if recorded is None:
        return None
    spec, host_port, gpu = recorded
    state = info.get("State", {})
    service = Service(
        spec=spec,
        container_id=info["Id"],
        host_port=host_port,
        gpu=gpu,
        started_at=parse_docker_time(state.get("StartedAt")) or time.time(),
        restarts=int(info.get("RestartCount", 0)),
        pinned=lease_of(labels) is None,
    )
    apply_container_state(service, state)
    return service


def apply_container_state(service: Service, state: JSONObject) -> None:
    """Set status and exit code from an inspect State block, keeping a known health."""
    if state.get("Restarting"):
        service.status = "restarting"
        service.exit_code = state.get("ExitCode")
    elif state.get("Running"):
        if service.status in ("exited", "restarting"):
            service.status = "starting"
        service.exit_code = None
    else:
        service.status = "exited"
        service.exit_code = state.get("ExitCode")


def summary_state(summary_state: str) -> JSONObject:
    """A `docker ps` State word ("running", "restarting", "exited", ...) as an inspect State block."""
    return {"Running": summary_state in ("running", "restarting"),
            "Restarting": summary_state == "restarting"}


def attempt_of(labels: JSONObject) -> str | None:
    """The deploy attempt a container was created by (None for containers from before 0.2)."""
    attempt = labels.get(ATTEMPT_LABEL)
    return attempt if isinstance(attempt, str) else None


def summary_name(summary: JSONObject) -> str | None:
    """The service name a `docker ps` summary's spec label declares."""
    try:
        name = json.loads(summary["Labels"][SPEC_LABEL])["name"]
    except (KeyError, ValueError, TypeError):
        return None
    return name if isinstance(name, str) else None


def parse_docker_time(text: str | None) -> float | None:
    """Docker's RFC 3339 nanosecond times -> epoch seconds."""
    if not text or text.startswith("0001-"):
        return None
    trimmed = text.rstrip("Z")
    whole, _, fraction = trimmed.partition(".")
    try:
        moment = datetime.fromisoformat(whole + "+00:00")
    except ValueError:
        return None
    return moment.timestamp() + (float("0." + fraction) if fraction.isdigit() else 0.0)


class StateFile:
    """services.json: the agent's record of what it runs, rewritten atomically on change."""

    def __init__(self, state_dir: Path, converter: cattrs.Converter) -> None:
        self.path = state_dir / "services.json"
        self._converter = converter
        self._lock = asyncio.Lock()  # queues writers on the loop, at most one thread per write
        # Held by the thread that writes: a save cancelled at shutdown lets go of the asyncio
        # lock while its thread writes on, and the next one must not write beside it.
        self._thread_lock = threading.Lock()
        self._requested = 0  # sequence number of the last save called
        self._written = 0  # sequence number of the state the file holds

    async def save(self, state: SavedState) -> None:
        """Write the state off the event loop; one writer at a time, and never a state older
        than one a later save already wrote. OSError when it can't."""
        document = {"version": FORMAT_VERSION, **self._converter.unstructure(state)}
        self._requested += 1
        sequence = self._requested
        async with self._lock:
            await asyncio.to_thread(self._write, sequence, document)

    def _write(self, sequence: int, document: Any) -> None:
        with self._thread_lock:
            if sequence <= self._written:  # a later state is there already: it includes this one
                return
            write_atomically(self.path, document)
            self._written = sequence

    def load(self) -> SavedState | None:
        """The saved state; None when the file is missing or corrupt (kept aside)."""
        with self._thread_lock:  # temp files left by a crash; none is being written now
            for leftover in self.path.parent.glob(f".{self.path.name}.*.tmp"):
                with contextlib.suppress(OSError):
                    leftover.unlink()
        try:
            document = json.loads(self.path.read_text())
            if document.get("version") != FORMAT_VERSION:
                raise ValueError(f"unknown format version {document.get('version')!r}")
            del document["version"]
            for service in document.get("services", []):
                # Written before cold starts were recorded: its one figure is not kept.
                if isinstance(service, dict):
                    service.pop("deploy_s", None)
            return self._converter.structure(document, SavedState)
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError, AttributeError, cattrs.BaseValidationError) as err:
            aside = self.path.with_name(f"services.json.corrupt-{int(time.time())}")
            _LOGGER.warning("%s is unreadable (%s); kept as %s and rebuilt from containers",
                            self.path, err, aside)
            self.path.rename(aside)
            return None


def write_atomically(path: Path, document: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)  # heals a state dir deleted under us
    data = json.dumps(document, indent=1, sort_keys=True).encode()
    # A temp file of its own (mkstemp makes it 0600: specs carry env values, often API keys).
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)

