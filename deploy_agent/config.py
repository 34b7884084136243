"""One frozen Config, read from command-line flags with `DEPLOY_AGENT_<NAME>` env fallbacks."""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import socket
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import attrs

from deploy_agent.gpus import parse_fake_gpus
from deploy_agent.models import parse_duration
from deploy_agent.tokens import TokenError, default_state_dir, read_token_file

ENV_PREFIX = "DEPLOY_AGENT_"
MIB = 1024 * 1024


def detect_primary_address() -> str:
    """The address of the interface that holds the default route.

    Connecting a UDP socket only asks the kernel for a route; no packet is sent.
    """
    with (
        contextlib.suppress(OSError),
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe,
    ):
        probe.connect(("192.0.2.1", 9))  # TEST-NET-1: routed like any outside address
        address: str = probe.getsockname()[0]
        return address
    return "127.0.0.1"


def parse_port_range(text: str) -> tuple[int, int]:
    """`8000-8999` -> (8000, 8999), both ends valid ports, low <= high."""
    try:
        low_text, high_text = text.split("-")
        low, high = int(low_text), int(high_text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW-HIGH, got {text!r}") from None
    if not 1 <= low <= high <= 65535:
        raise argparse.ArgumentTypeError(f"expected 1 <= LOW <= HIGH <= 65535, got {text!r}")
    return low, high


@attrs.frozen
class Config:
    """Everything the agent is configured with; built once at start."""

    host: str = "0.0.0.0"
    port: int = 9000
    state_dir: Path = Path("/var/lib/deploy-agent")
    advertise_host: str = "127.0.0.1"
    port_range: tuple[int, int] = (8000, 8999)
    docker_host: str = "unix:///var/run/docker.sock"
    log_level: str = "INFO"
    allow_host_paths: tuple[Path, ...] = ()
    max_ready_timeout: float = 600.0
    stop_timeout: int = 10
    max_body_bytes: int = MIB
    health_host: str = "127.0.0.1"
    fake_gpus: str | None = None
    resync_interval_s: float = 5.0
    shutdown_timeout_s: float = 30.0
    allow_images: tuple[str, ...] = ()
    token: str | None = attrs.field(default=None, repr=False)  # never in a log line
    instance: str = "default"
    mdns: bool = False
    engine_timeout_s: float = 30.0
    pull_stall_timeout_s: float = 120.0
    max_streams: int = 256
    no_auth: bool = False
    service_pids_limit: int = 4096
    max_lease_s: float = 86400.0
    keep_warm_s: float = 300.0  # a leased service's warm time after its last lease, by default
    max_keep_warm_s: float = 3600.0
    min_resident_s: float = 60.0  # an idle service younger than this is never evicted
    max_wait_s: float = 600.0  # cap on a deploy's wait_s
    max_queue: int = 64  # deploys waiting for room at once
    max_priority: int = 9  # cap on a deploy's priority
    preempt_grace_s: float = 30.0  # a preempted service's warning before it is stopped
    default_shm_gb: float = 2.0  # /dev/shm of a GPU service that doesn't say shm_gb
    gpu_memlock: bool = True  # GPU services get unlimited locked memory (NCCL, pinned memory)
    registry_auth: Path | None = None  # a Docker client config; None: $DOCKER_CONFIG or ~/.docker
    prepull: tuple[str, ...] = ()  # images pulled in the background at start-up
    cache_max_gb: float | None = None  # unmounted caches beyond this are pruned, oldest use first
    cache_measure_s: float = 60.0  # how often the caches' sizes are measured (a slow engine call)
    vram_overuse: Literal["warn", "stop"] = "warn"
    swarm: bool = False
    node_grace_s: float = 30.0
    publish_host: str = ""  # all addresses
    allow_host_headers: tuple[str, ...] = ()  # names besides the agent's own a Host may carry
    allow_volumes: tuple[str, ...] = ()  # other applications' volumes services may mount as named

    @property
    def auth(self) -> Literal["token", "off"]:
        """"token" when requests must carry the bearer token, else "off"."""
        return "off" if self.token is None else "token"


def _env(environ: Mapping[str, str], name: str, default: str | None = None) -> str | None:
    return environ.get(ENV_PREFIX + name.upper().replace("-", "_"), default)


def build_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    """The flags; each default comes from DEPLOY_AGENT_<NAME> when that is set."""
    parser = argparse.ArgumentParser(
        prog="deploy-agent",
        description="Deploy, find and stop containerised ML services on this node over HTTP.",
        epilog="Every flag can also be set with an environment variable DEPLOY_AGENT_<NAME>, "
        "for example DEPLOY_AGENT_PORT=9000 or DEPLOY_AGENT_STATE_DIR=/srv/agent.",
    )
    add = parser.add_argument
    add("--host", default=_env(environ, "host", "0.0.0.0"),
        help="address the HTTP API listens on (default: %(default)s)")
    add("--port", type=int, default=_env(environ, "port", "9000"),
        help="port the HTTP API listens on (default: %(default)s)")
    add("--state-dir", type=Path, default=_env(environ, "state_dir") or str(default_state_dir(environ)),
        help="where services.json is kept (default: %(default)s)")
    add("--advertise-host", default=_env(environ, "advertise_host"),
        help="host name or address put in service URLs (default: this node's primary address)")
    add("--port-range", type=parse_port_range, default=_env(environ, "port_range", "8000-8999"),
        help="host ports the agent may publish services on, LOW-HIGH (default: 8000-8999)")
    add("--docker-host", default=_env(environ, "docker_host", "unix:///var/run/docker.sock"),
        help="Docker Engine API address (default: %(default)s)")
    add("--log-level", default=_env(environ, "log_level", "INFO"),
        choices=["DEBUG", "INFO", "WARNING", "ERROR"], type=str.upper,
        help="log verbosity (default: %(default)s)")
    add("--allow-host-path", action="append", type=Path, default=None, metavar="DIR",
        help="a host directory services may bind-mount from (repeatable; env: colon-separated); "
        "by default only named volumes are allowed")
    add("--max-ready-timeout", type=float, default=_env(environ, "max_ready_timeout", "600"),
        help="upper bound on a deploy's ready_timeout in seconds (default: %(default)s)")
    add("--stop-timeout", type=int, default=_env(environ, "stop_timeout", "10"),
        help="seconds a service gets to exit on stop before it is killed (default: %(default)s)")
    add("--health-host", default=_env(environ, "health_host"),
        help="address the agent reaches published service ports on for health checks "
        "(default: the --publish-host address when one is set, else 127.0.0.1)")
    add("--resync-interval", type=float, default=_env(environ, "resync_interval", "5"),
        metavar="SECONDS", help="how often every service is re-checked and health-probed "
        "(default: %(default)s)")
    add("--shutdown-timeout", type=float, default=_env(environ, "shutdown_timeout", "30"),
        metavar="SECONDS", help="on SIGTERM, how long a deploy in flight may take to finish "
        "before it is rolled back (default: %(default)s)")
    add("--token-file", type=Path, default=_env(environ, "token_file"), metavar="PATH",
        help="file holding the bearer token every request but GET /health must carry; "
        "or set the token itself in DEPLOY_AGENT_TOKEN (default: on loopback none; beyond "
        "it, a token made on first start in STATE_DIR/token)")
    add("--no-auth", action="store_true", default=_flag(environ, "no_auth"),
        help="serve without a token even beyond loopback: anyone who reaches the port can "
        "run containers on this node")
    add("--publish-host", default=_env(environ, "publish_host", ""), metavar="ADDRESS",
        help="address service ports are published on (default: all); pinned to one, it is "
        "also the default --health-host and --advertise-host")
    add("--allow-host-header", action="append", default=None, metavar="NAME",
        help="a host name callers reach this agent by, besides localhost, the node's hostname "
        "and --advertise-host; a request whose Host is any other name is refused, so a web "
        "page can't reach the agent through DNS rebinding (repeatable; env: comma-separated)")
    add("--allow-volume", action="append", default=None, metavar="NAME",
        help="an existing volume (another application's) services may mount under its own name; "
        "any other volume name in a deploy is the agent's own, made on first use "
        "(repeatable; env: comma-separated)")
    add("--service-pids-limit", type=int, default=_env(environ, "service_pids_limit", "4096"),
        metavar="N", help="processes each service container may run (default: %(default)s)")
    add("--allow-image", action="append", default=None, metavar="PATTERN",
        help="only deploy images whose full reference matches this glob, e.g. "
        "'registry.lab:5000/*' (repeatable; env: comma-separated; default: any image)")
    add("--instance", default=_env(environ, "instance", "default"), type=_instance_name,
        help="name of this agent on its Docker engine; several agents sharing one engine "
        "(development, tests) each manage only their own containers (default: %(default)s)")
    add("--mdns", action="store_true", default=_flag(environ, "mdns"),
        help="advertise this agent as _tidybot-compute._tcp over mDNS (needs the 'mdns' extra)")
    add("--engine-timeout", type=_positive, default=_env(environ, "engine_timeout", "30"),
        metavar="SECONDS", help="bound on each Docker control call (create, start, inspect, "
        "remove, list, the start of a pull); a deploy against a frozen engine answers 503 within "
        "about this (default: %(default)s)")
    add("--pull-stall-timeout", type=_positive, default=_env(environ, "pull_stall_timeout", "120"),
        metavar="SECONDS", help="a pull that makes no progress this long while the engine still "
        "answers fails with 504 pull_stalled (default: %(default)s)")
    add("--max-streams", type=int, default=_env(environ, "max_streams", "256"), metavar="N",
        help="log and event follows open at once; one more gets 429 too_many_streams "
        "(default: %(default)s)")
    add("--max-lease", type=_duration, default=_env(environ, "max_lease", "24h"), metavar="DURATION",
        help="longest lease_s a deploy or renewal may ask for, e.g. 24h or 90m (default: 24h)")
    add("--keep-warm", type=_duration_or_zero, default=_env(environ, "keep_warm", "5m"), metavar="DURATION",
        help="how long a leased service stays running (idle, kept warm) after its last lease "
        "ends, unless its deploy says keep_warm_s; 0 stops it at once (default: 5m)")
    add("--max-keep-warm", type=_duration, default=_env(environ, "max_keep_warm", "1h"),
        metavar="DURATION", help="cap on a deploy's keep_warm_s (default: 1h)")
    add("--min-resident", type=_duration_or_zero, default=_env(environ, "min_resident", "60s"),
        metavar="DURATION", help="an idle service is evicted for another deploy only once it has "
        "run this long, so two callers can't swap each other out forever (default: 60s)")
    add("--max-wait", type=_duration, default=_env(environ, "max_wait", "10m"), metavar="DURATION",
        help="cap on a deploy's wait_s: how long it may wait for GPU room (default: 10m)")
    add("--max-queue", type=_at_least_one, default=_env(environ, "max_queue", "64"), metavar="N",
        help="deploys that may wait for room at once; one more gets 429 queue_full "
        "(default: %(default)s)")
    add("--max-priority", type=int, choices=range(10), default=_env(environ, "max_priority", "9"),
        metavar="0-9", help="cap on a deploy's priority: any caller with the token may ask up to "
        "this (default: %(default)s)")
    add("--preempt-grace", type=_duration, default=_env(environ, "preempt_grace", "30s"),
        metavar="DURATION", help="how long a leased service is announced (preempt_at) before a "
        "waiting deploy of higher priority stops it (default: 30s)")
    add("--default-shm-gb", type=_positive, default=_env(environ, "default_shm_gb", "2"),
        metavar="GB", help="/dev/shm size of a GPU service whose deploy doesn't say shm_gb "
        "(default: 2)")
    add("--gpu-memlock", choices=["unlimited", "off"],
        default=_env(environ, "gpu_memlock", "unlimited"),
        help="locked memory of GPU services: unlimited, as NVIDIA's containers expect (pinned "
        "memory, NCCL), or off (the engine's default) (default: %(default)s)")
    add("--registry-auth", type=Path, default=_env(environ, "registry_auth"), metavar="PATH",
        help="the Docker client config whose credentials pulls use (auths, credsStore, "
        "credHelpers), read at every pull (default: $DOCKER_CONFIG/config.json, else "
        "~/.docker/config.json of the agent's user: what `docker login` writes)")
    add("--prepull", action="append", metavar="IMAGE",
        default=[i for i in (_env(environ, "prepull") or "").split(",") if i],
        help="pull this image in the background at start-up, under the image policy; "
        "repeatable (env: comma-separated)")
    add("--cache-max-gb", type=_positive, default=_env(environ, "cache_max_gb"), metavar="GB",
        help="keep the caches no running service mounts under this many GB in all, removing "
        "the least recently used first (default: no limit)")
    add("--cache-measure-interval", type=_duration,
        default=_env(environ, "cache_measure_interval", "60s"), metavar="DURATION",
        help="how often the caches' sizes are measured: the engine walks every volume, so "
        "not too often (default: 60s)")
    add("--vram-overuse", choices=["warn", "stop"], default=_env(environ, "vram_overuse", "warn"),
        help="a service seen using more VRAM than it declared (3 resyncs in a row): only "
        "flag it (warn), or also stop it (stop; GPU deploys must then declare vram_gb) "
        "(default: %(default)s)")
    add("--swarm", action="store_true", default=_flag(environ, "swarm"),
        help="serve the whole Docker Swarm this engine manages: services become Swarm "
        "services placed on the swarm's nodes and GPUs (run it on a manager; one per swarm)")
    add("--node-grace", type=_positive, default=_env(environ, "node_grace", "30"), metavar="SECONDS",
        help="with --swarm: a node down this long has its services placed elsewhere "
        "(default: %(default)s)")
    add("--fake-gpus", type=_fake_gpus, default=_env(environ, "fake_gpus"), metavar="NAME:GB,...",
        help="simulate GPUs for development and tests, e.g. 'RTX 4090:24,RTX 4090:24': placement "
        "and accounting are real, containers get NVIDIA_VISIBLE_DEVICES and no device")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND",
                                     title="commands (without one, the agent serves its API)")
    token = commands.add_parser(
        "token", help="print the token callers need, for DEPLOY_AGENT_TOKEN on their side",
        description="Print the bearer token of this node's agent: --token-file's, else "
        "STATE_DIR/token (made by the agent on its first start beyond loopback).")
    token.add_argument("--state-dir", type=Path, default=argparse.SUPPRESS,
                       help="the agent's state dir (default: as for the agent)")
    token.add_argument("--token-file", type=Path, default=argparse.SUPPRESS, metavar="PATH",
                       help="the agent's --token-file, when it has one")
    gpus = commands.add_parser(
        "gpus", help="this node's GPUs, as NVML reports them",
        description="Print this node's GPUs. With --label, the line to put in this node's "
        "/etc/docker/daemon.json \"labels\" list, so that a `deploy-agent --swarm` on a "
        "manager knows its GPUs (restart dockerd after changing it).")
    gpus.add_argument("--label", action="store_true", help="print the Docker engine label line")
    return parser


def _flag(environ: Mapping[str, str], name: str) -> bool:
    return (_env(environ, name, "") or "").lower() in ("1", "true", "yes")


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds above 0, got {text!r}")
    return value


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def _duration_or_zero(text: str) -> float:
    return 0.0 if text.strip() in ("0", "0s", "0m", "0h") else _duration(text)


def _instance_name(text: str) -> str:
    if not re.fullmatch(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,62}", text):
        raise argparse.ArgumentTypeError(f"expected letters, digits, '_', '.', '-', got {text!r}")
    return text


def _fake_gpus(text: str) -> str:
    try:
        parse_fake_gpus(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def parse_args(argv: Sequence[str] | None = None,
               environ: Mapping[str, str] | None = None) -> argparse.Namespace:
    """The command line, with DEPLOY_AGENT_* fallbacks; `command` is None for serving."""
    return build_parser(os.environ if environ is None else environ).parse_args(argv)


def parse_config(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Build the Config from flags, falling back to the environment, then defaults."""
    environ = os.environ if environ is None else environ
    return config_from(parse_args(argv, environ), environ)


def config_from(args: argparse.Namespace, environ: Mapping[str, str]) -> Config:
    allow = args.allow_host_path
    if allow is None:
        allow = [Path(p) for p in (_env(environ, "allow_host_path") or "").split(":") if p]
    images = args.allow_image
    if images is None:
        images = [p.strip() for p in (_env(environ, "allow_image") or "").split(",") if p.strip()]
    host_headers = args.allow_host_header
    if host_headers is None:
        host_headers = [n.strip() for n in (_env(environ, "allow_host_header") or "").split(",") if n.strip()]
    volumes = args.allow_volume
    if volumes is None:
        volumes = [n.strip() for n in (_env(environ, "allow_volume") or "").split(",") if n.strip()]
    pinned = args.publish_host if args.publish_host not in ("", "0.0.0.0", "::") else None
    if pinned and args.swarm:
        raise SystemExit("deploy-agent: --publish-host can't be used with --swarm: a Swarm service "
                         "publishes its port on every address of its node (Swarm has no host "
                         "address for a port); drop --publish-host, or firewall the range")
    token = read_token(args.token_file, _env(environ, "token"))
    if token is not None and args.no_auth:
        raise SystemExit("deploy-agent: --no-auth and a token (--token-file or DEPLOY_AGENT_TOKEN) "
                         "contradict each other; drop one")
    return Config(
        host=args.host,
        port=args.port,
        state_dir=args.state_dir,
        advertise_host=args.advertise_host or pinned or detect_primary_address(),
        port_range=args.port_range,
        docker_host=args.docker_host,
        log_level=args.log_level,
        allow_host_paths=tuple(p.resolve() for p in allow),
        max_ready_timeout=args.max_ready_timeout,
        stop_timeout=args.stop_timeout,
        health_host=args.health_host or pinned or "127.0.0.1",
        fake_gpus=args.fake_gpus or None,
        resync_interval_s=args.resync_interval,
        shutdown_timeout_s=args.shutdown_timeout,
        allow_images=tuple(images),
        instance=args.instance,
        mdns=args.mdns,
        engine_timeout_s=args.engine_timeout,
        pull_stall_timeout_s=args.pull_stall_timeout,
        max_streams=args.max_streams,
        no_auth=args.no_auth,
        service_pids_limit=args.service_pids_limit,
        max_lease_s=args.max_lease,
        keep_warm_s=min(args.keep_warm, args.max_keep_warm),
        max_keep_warm_s=args.max_keep_warm,
        min_resident_s=args.min_resident,
        max_wait_s=args.max_wait,
        max_queue=args.max_queue,
        max_priority=args.max_priority,
        preempt_grace_s=args.preempt_grace,
        default_shm_gb=args.default_shm_gb,
        gpu_memlock=args.gpu_memlock == "unlimited",
        registry_auth=args.registry_auth,
        prepull=tuple(dict.fromkeys(args.prepull)),
        cache_max_gb=args.cache_max_gb,
        cache_measure_s=args.cache_measure_interval,
        vram_overuse=args.vram_overuse,
        swarm=args.swarm,
        node_grace_s=args.node_grace,
        publish_host=args.publish_host,
        allow_host_headers=tuple(host_headers),
        allow_volumes=tuple(volumes),
        token=token,
    )


def read_token(token_file: Path | None, token_env: str | None) -> str | None:
    """The bearer token from --token-file, else DEPLOY_AGENT_TOKEN; None when neither is set."""
    if token_file is not None:
        try:
            return read_token_file(token_file)
        except TokenError as err:
            raise SystemExit(f"deploy-agent: {err}") from None
    return token_env.strip() or None if token_env else None
