"""What a deploy may ask of the node: checked before anything is pulled or created.

The agent holds the Docker socket, so a deploy that could mount the host's system paths
or run an arbitrary image is a root shell on the node. Safe by default: only named
volumes, and host paths under roots the operator allowed.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Callable, Mapping
from pathlib import PurePosixPath

from deploy_agent.config import Config
from deploy_agent.errors import ImageNotAllowed, MountNotAllowed
from deploy_agent.models import DeploySpec

# No service may mount these, anything inside them, or anything that contains them
# (so "/" and "/var" are refused too), whatever the configured roots say.
SYSTEM_PATHS = tuple(
    PurePosixPath(p)
    for p in ("/etc", "/proc", "/sys", "/dev", "/boot", "/root", "/var/lib/docker",
              "/var/run/docker.sock", "/run/docker.sock", "/run/docker", "/run/containerd",
              "/var/run/containerd", "/var/lib/containerd", "/var/lib/deploy-agent")
)


def _touches_system_path(path: PurePosixPath) -> bool:
    return any(path == system or system in path.parents or path in system.parents
               for system in SYSTEM_PATHS)


def host_path_refusal(source: str, config: Config,
                      resolve: Callable[[str], str] | None = None) -> str | None:
    """Why a host path may not be mounted, or None when it may.

    Both the path as written and the path its symlinks lead to must pass. Resolving
    touches the file system (a slow NFS mount, say): callers run this off the event loop.
    """
    resolve = resolve or os.path.realpath
    if ".." in PurePosixPath(source).parts:
        return "host paths must not contain '..'"
    roots = [PurePosixPath(root) for root in config.allow_host_paths]
    for path in dict.fromkeys((PurePosixPath(source), PurePosixPath(resolve(source)))):
        if _touches_system_path(path):
            return f"{path} is or contains a system path, which is never mounted into services"
        if not any(path == root or root in path.parents for root in roots):
            allowed = ", ".join(str(root) for root in roots) or "none configured"
            return (f"{path} is not under an allowed host path ({allowed}); "
                    "use a named volume or start the agent with --allow-host-path")
    return None


def check_mounts(spec: DeploySpec, config: Config) -> None:
    """Refuse bind mounts of host paths outside the allowed roots (named volumes are fine)."""
    for volume in spec.volumes:
        source = volume.split(":", 1)[0]
        if not source.startswith("/"):
            continue
        reason = host_path_refusal(source, config)
        if reason is not None:
            raise MountNotAllowed(f"Volume {volume!r} is not allowed: {reason}.", volume=volume)


def _host_sources(volumes: tuple[str, ...], resolve: Callable[[str], str]) -> set[PurePosixPath]:
    """The host paths of bind mounts, as written and as their symlinks lead."""
    sources = (volume.split(":", 1)[0] for volume in volumes)
    return {path for source in sources if source.startswith("/")
            for path in (PurePosixPath(source), PurePosixPath(resolve(source)))}


def _nested(a: PurePosixPath, b: PurePosixPath) -> bool:
    return a != b and (a in b.parents or b in a.parents)


def check_nesting(spec: DeploySpec, others: Mapping[str, tuple[str, ...]],
                  resolve: Callable[[str], str] | None = None) -> None:
    """Refuse host mounts where one source contains another, within the spec or across the
    node's other services (`others`: name -> volumes). The engine resolves binds again when it
    restarts a container, so a service holding /data/a could swap /data/a/sub, which another
    mount uses, for a symlink to /."""
    resolve = resolve or os.path.realpath
    mine = _host_sources(spec.volumes, resolve)
    clash = next(((a, b) for a in mine for b in mine if _nested(a, b)), None)
    if clash is not None:
        raise MountNotAllowed(f"Host paths {clash[0]} and {clash[1]} of {spec.name} contain one another: "
                              "a service could swap the inner one for a symlink; mount one of them only.",
                              volume=str(clash[1]))
    for name, volumes in sorted(others.items()):
        for theirs in _host_sources(volumes, resolve):
            ours = next((path for path in mine if _nested(path, theirs)), None)
            if ours is not None:
                raise MountNotAllowed(
                    f"Host path {ours} and {theirs}, mounted by {name}, contain one another: "
                    f"a service could swap the inner one for a symlink; use a separate directory.",
                    volume=str(ours), service=name)


def image_allowed(image: str, config: Config) -> bool:
    """Without --allow-image patterns every image; else those matching one (shell-style glob)."""
    patterns = config.allow_images
    return not patterns or any(fnmatch.fnmatchcase(image, p) for p in patterns)


def check_image(image: str, config: Config) -> None:
    """ImageNotAllowed unless the image reference may be deployed (or pulled) here."""
    if not image_allowed(image, config):
        raise ImageNotAllowed(f"Image {image} is not allowed on this node (allowed: "
                              f"{', '.join(config.allow_images)}).", image=image)


def check_deploy(spec: DeploySpec, config: Config,
                 others: Mapping[str, tuple[str, ...]] | None = None) -> None:
    """Every policy check; runs before the image is pulled or anything is created (and off
    the event loop: it resolves host paths). `others`: the volumes of the node's other
    services and deploys in flight, by name."""
    check_image(spec.image, config)
    check_mounts(spec, config)
    check_nesting(spec, others or {})
