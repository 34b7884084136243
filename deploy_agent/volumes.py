"""Volumes belong to the agent: a deploy's named volume is the agent's own, never another
application's. A deploy's `cache` entries (`{"hf": "/root/.cache/huggingface"}`) are such
volumes too, always the agent's: weights that outlive the containers that downloaded them.

A deploy says `models:/app/models`; the engine gets the volume `tidybot-<instance>-models`,
labelled as this agent instance's, created on first use, shared by every service that
names `models`, kept across stops. A volume some other application made (a database's, or
a `local` volume with `o=bind,device=/`) is mounted only when the operator names it with
`--allow-volume NAME`. Host paths (`/data/x:/w`) are the policy's (policy.py).
"""

from __future__ import annotations

import attrs

from deploy_agent.config import Config
from deploy_agent.models import MANAGED_LABEL, DeploySpec, JSONObject

VOLUME_LABEL = "tidybot.volume"  # the name the deploys use, on the agent's own volumes
CACHE_LABEL = "tidybot.cache"  # on volumes made for a deploy's `cache`: --cache-max-gb may prune them


@attrs.frozen
class Mount:
    """One entry of a deploy's `volumes`, as the engine mounts it."""

    name: str  # as the deploy wrote it: a volume or cache name, or a host path
    source: str  # a host path, or the engine's volume name
    target: str
    read_only: bool
    host_path: bool
    owned: bool  # a volume the agent makes and labels (not a host path, not an allowed one)
    cache: bool = False  # made for a deploy's `cache` (else its `volumes`)

    @property
    def bind(self) -> str:
        """The `Binds` form: source:target[:ro]."""
        return f"{self.source}:{self.target}{':ro' if self.read_only else ''}"


def engine_mount(mount: Mount, instance: str) -> JSONObject:
    """The Engine API form (HostConfig.Mounts, a Swarm ContainerSpec's Mounts). The agent's own
    volumes carry its labels, so one the engine makes on the fly (removed a moment before)
    is still the agent's."""
    found: JSONObject = {"Type": "bind" if mount.host_path else "volume", "Source": mount.source,
                         "Target": mount.target, "ReadOnly": mount.read_only}
    if mount.owned:
        found["VolumeOptions"] = {"Labels": volume_labels(mount.name, instance, mount.cache)}
    return found


def engine_volume(name: str, instance: str) -> str:
    """The engine's name for the agent's volume `name`."""
    return f"tidybot-{instance}-{name}"


def volume_labels(name: str, instance: str, cache: bool = False) -> dict[str, str]:
    return {MANAGED_LABEL: instance, VOLUME_LABEL: name, **({CACHE_LABEL: "1"} if cache else {})}


def mounts_of(spec: DeploySpec, config: Config) -> list[Mount]:
    """The engine's mounts for a spec's `volumes` and `cache` (already validated by the
    converter)."""
    mounts = []
    for entry in spec.volumes:
        parts = entry.split(":")
        source, target = parts[0], parts[1]
        read_only = len(parts) == 3 and parts[2] == "ro"
        if source.startswith("/"):
            mounts.append(Mount(source, source, target, read_only, host_path=True, owned=False))
        elif source in config.allow_volumes:
            mounts.append(Mount(source, source, target, read_only, host_path=False, owned=False))
        else:
            mounts.append(Mount(source, engine_volume(source, config.instance), target, read_only,
                                host_path=False, owned=True))
    mounts.extend(Mount(name, engine_volume(name, config.instance), target, read_only=False,
                        host_path=False, owned=True, cache=True)
                  for name, target in sorted(spec.cache.items()))
    return mounts


def owned_volume_names(spec: DeploySpec, config: Config) -> set[str]:
    """The agent's own volumes (by the deploy's names) a spec mounts: its caches and volumes."""
    return {mount.name for mount in mounts_of(spec, config) if mount.owned}


def is_ours(labels: dict[str, str] | None, name: str, instance: str) -> bool:
    """Whether a volume's labels say it is this instance's volume `name`."""
    return (labels or {}) == {**(labels or {}), **volume_labels(name, instance)}
