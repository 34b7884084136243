"""What a deploy may ask of the node: checked before anything is pulled or created."""

from __future__ import annotations

from pathlib import PurePosixPath

from deploy_agent.config import Config
from deploy_agent.errors import MountNotAllowed
from deploy_agent.models import DeploySpec

# Host paths no service may mount, whatever the configured roots say.
FORBIDDEN_HOST_PATHS = tuple(
    PurePosixPath(p)
    for p in ("/", "/etc", "/proc", "/sys", "/dev", "/boot", "/root", "/var/lib/docker",
              "/var/run/docker.sock", "/run/docker.sock", "/run/containerd",
              "/var/run/containerd")
)
ALWAYS_FORBIDDEN_TREES = FORBIDDEN_HOST_PATHS[1:]  # everything below these too; "/" only itself


def host_path_refusal(source: str, config: Config) -> str | None:
    """Why a host path may not be mounted, or None when it may."""
    path = PurePosixPath(source)
    if ".." in path.parts:
        return "host paths must not contain '..'"
    if path == PurePosixPath("/") or any(
        path == tree or tree in path.parents for tree in ALWAYS_FORBIDDEN_TREES
    ):
        return f"{source} is a system path that is never mounted into services"
    roots = [PurePosixPath(root) for root in config.allow_host_paths]
    if not any(path == root or root in path.parents for root in roots):
        allowed = ", ".join(str(root) for root in roots) or "none configured"
        return (f"{source} is not under an allowed host path ({allowed}); "
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
