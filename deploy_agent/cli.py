"""`deployctl`: deploy-agent for people. Tables by default, --json for scripts.

Nodes come from --node, else COMPUTE_NODES, else http://127.0.0.1:9000. With several
nodes, `deploy` places the service like ComputeNodes.ensure, and `stop` and `logs` find
the node that runs it. Exit status 0 on success; 1 with one line on stderr (with --json,
also the error as JSON on stdout) for any failure; 2 for bad input (an unreadable or invalid
manifest, a bad URL or argument); 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import warnings
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TaskID, TextColumn
from rich.table import Table

from deploy_agent.client import (
    DEFAULT_NODE,
    AgentRequestError,
    AsyncAgentClient,
    AsyncComputeNodes,
    CapacityError,
    Intent,
    InvalidRequestError,
    NodeUnreachable,
    load_manifest,
    nodes_from_env,
)
from deploy_agent.models import parse_duration


def add_global_flags(parser: argparse.ArgumentParser, defaults: bool) -> None:
    """--node, --token, --token-file, --json: before the subcommand, or after it as docker and kubectl take
    them. After it, no defaults, so a flag given before is not overwritten by one unsaid."""
    unset: dict[str, Any] = {} if defaults else {"default": argparse.SUPPRESS}
    parser.add_argument("--node", action="append", metavar="URL", **unset,
                        help="agent to talk to (repeatable; default: COMPUTE_NODES, else "
                        f"{DEFAULT_NODE})")
    parser.add_argument("--token", **unset, help="bearer token for every node; discouraged: "
                        "other users see a command line (ps), so prefer DEPLOY_AGENT_TOKEN or "
                        "--token-file (default: those; for a loopback node, the local agent's own)")
    parser.add_argument("--token-file", **unset, metavar="PATH",
                        help="file holding the bearer token (default: DEPLOY_AGENT_TOKEN_FILE)")
    parser.add_argument("--json", action="store_true", **unset, help="print JSON instead of tables")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deployctl", description=__doc__.splitlines()[0])
    add_global_flags(parser, defaults=True)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        add_global_flags(sub, defaults=False)
        return sub

    deploy = command("deploy", "deploy a service.yaml (or - for stdin), with live progress")
    deploy.add_argument("file", metavar="FILE|-")
    deploy.add_argument("--replace", action="store_true", help="replace it if running with another spec")
    deploy.add_argument("--dry-run", action="store_true",
                        help="say where it would go (node, GPU, port, whether it would pull), "
                        "deploying nothing")
    deploy.add_argument("--lease", type=_lease_length, metavar="DURATION",
                        help="hold it for this long (90s, 10m, 2h) and print the lease id: it "
                        "stops when no one renews; without, it runs until stopped")
    deploy.add_argument("--keep-warm", type=_length_or_zero, metavar="DURATION",
                        help="with --lease: keep it running this long once no one holds it "
                        "(default: the node's --keep-warm)")
    deploy.add_argument("--wait", type=_lease_length, metavar="DURATION",
                        help="a GPU service that fits nowhere waits this long in a node's queue "
                        "for room, instead of failing at once")
    deploy.add_argument("--priority", type=int, choices=range(10), metavar="0-9",
                        help="its place in the queue: higher first (default: 5)")
    pull = command("pull", "pull an image on a node now, so its deploys start without pulling")
    pull.add_argument("image")
    pull.add_argument("--all", action="store_true",
                      help="on every node (--node, COMPUTE_NODES) at once, not only the first")
    command("ps", "list services")
    stop = command("stop", "stop and remove a service")
    stop.add_argument("name")
    command("gpus", "GPUs and their VRAM accounting")
    logs = command("logs", "a service's output")
    logs.add_argument("name")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new output")
    logs.add_argument("--tail", type=int, default=100, help="lines from the end (default: 100)")
    command("nodes", "the compute nodes and how they are")
    command("queue", "GPU deploys waiting for room on each node")
    renew = command("renew", "extend a lease (from deploy --lease) so its service keeps running")
    renew.add_argument("name")
    renew.add_argument("lease_id")
    renew.add_argument("--lease", type=_lease_length, metavar="DURATION",
                       help="from now, this long (default: the lease's own length)")
    release = command("release", "drop a lease; the service stops if it was the last one")
    release.add_argument("name")
    release.add_argument("lease_id")
    events = command("events", "what happened: deploys, stops, crashes, restarts, leases running out")
    events.add_argument("-f", "--follow", action="store_true", help="keep printing new events")
    events.add_argument("--limit", type=int, default=50, help="how many recent ones (default: 50)")
    return parser


def _length_or_zero(text: str) -> float:
    return 0.0 if text.strip() in ("0", "0s", "0m", "0h") else _lease_length(text)


def _lease_length(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


class Ctl:
    """One deployctl invocation."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        # Piped output keeps every column whole instead of fitting an 80-column guess.
        self.out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 250)
        self.err = Console(stderr=True)
        self.nodes = AsyncComputeNodes(args.node or nodes_from_env() or [DEFAULT_NODE], args.token,
                                       token_file=args.token_file)
        self.deploying: dict[str, Any] | None = None  # node, name, lease_id of a deploy under way

    def print_json(self, value: Any) -> None:
        sys.stdout.write(json.dumps(value, indent=2) + "\n")

    async def deploy(self) -> None:
        """Where some node has it live, there (the agent answers already running, or 409 for a
        changed spec); else the best node. Always sent, so a spec change is never hidden."""
        body = load_manifest(self.args.file)
        name = str(body.get("name", ""))
        located = await self.nodes.locate(name, statuses=())
        intent = self.intent()
        targets = ([located[0]] if located is not None
                   else await self.nodes.candidates(body, waiting="wait_s" in intent))
        if not targets:
            raise CapacityError(503, "no_capacity", f"No reachable node can run {name!r}.")
        if self.args.dry_run:
            client = targets[0]
            return self.show_dry_run({**await client.dry_run(body, self.args.replace, **intent),
                                      "node": client.url})
        for client in targets:
            try:
                answer = await self.follow_deploy(client, name, body)
            except (CapacityError, NodeUnreachable) as err:  # nothing placed there
                if located is not None or client is targets[-1]:
                    raise
                self.err.print(f"[yellow]warning:[/] {err.message}; trying the next node", highlight=False)
                continue
            return self.show_deployed({**answer, "node": client.url})

    def intent(self) -> Intent:
        """--wait, --priority, --keep-warm as the deploy's intent."""
        intent: Intent = {}
        if self.args.wait is not None:
            intent["wait_s"] = self.args.wait
        if self.args.priority is not None:
            intent["priority"] = self.args.priority
        if self.args.keep_warm is not None:
            intent["keep_warm_s"] = self.args.keep_warm
        return intent

    async def queue(self) -> None:
        """Every node's waiting deploys."""
        async def of(client: AsyncAgentClient) -> list[dict[str, Any]]:
            return [{**entry, "node": client.url} for entry in await client.queue()]
        rows = [row for rows in await self.nodes.ask_all(of) if rows for row in rows]
        if self.args.json:
            return self.print_json(rows)
        table = Table("POSITION", "NAME", "PRIORITY", "NEEDS GB", "SINCE", "CALLERS", "NODE", box=None)
        for row in rows:
            table.add_row(str(row["position"]), row["name"], str(row["priority"]), f"{row['needs_gb']:g}",
                          row["since"], str(row["callers"]), row["node"])
        self.out.print(table if rows else "no deploys waiting")

    async def pull(self) -> None:
        """The first node, with live progress; with --all, every node at once, a line each."""
        if not self.args.all:
            client = self.nodes.clients[0]
            view = DeployView(self.err, quiet=self.args.json)
            with view:
                answer = await client.pull(self.args.image, view.show)
            if self.args.json:
                return self.print_json({**answer, "node": client.url})
            return self.out.print(f"pulled {answer['image']} ({answer['digest']}, "
                                  f"{answer['size_bytes'] / 1e6:.0f} MB) on {client.url}", highlight=False)

        rows = [{**answer, "node": url} if isinstance(answer, dict)
                else {"ok": False, "error": answer.code, "message": answer.message, "node": url}
                for url, answer in (await self.nodes.pull(self.args.image)).items()]
        if self.args.json:
            self.print_json(rows)
        else:
            for row in rows:
                self.out.print(f"{row['node']}: " + (f"pulled {row['digest']}" if row["ok"]
                                                     else f"[red]{row['error']}[/]: {row['message']}"),
                               highlight=False)
        failed = [row for row in rows if not row["ok"]]
        if failed and self.args.json:
            raise SystemExit(1)  # each node's error is in the JSON already
        if failed:
            raise AgentRequestError(0, "pull_failed", f"the pull failed on {len(failed)} of "
                                    f"{len(rows)} node(s)")

    def show_dry_run(self, answer: dict[str, Any]) -> None:
        if self.args.json:
            return self.print_json(answer)
        if answer["already_running"]:
            return self.out.print(f"{answer['name']} already runs at {answer['host']} on "
                                  f"{answer['node']}: a deploy would change nothing")
        if answer.get("queued"):
            return self.out.print(f"{answer['name']} fits nowhere on {answer['node']} now: it would "
                                  "wait for room (dry run: nothing deployed)")
        gpu = f", GPU {answer['gpu']}" if answer["gpu"] is not None else ""
        if answer.get("evicts"):
            gpu += f", evicting {', '.join(answer['evicts'])} (idle)"
        pull = ", after pulling its image" if answer["pull_needed"] else ""
        self.out.print(f"{answer['name']} would run at {answer['host']}{gpu} on {answer['node']}"
                       f"{pull} (dry run: nothing deployed)")

    async def follow_deploy(self, client: AsyncAgentClient, name: str,
                            body: dict[str, Any]) -> dict[str, Any]:
        """Stream the deploy's events into a live view; the final answer."""
        view = DeployView(self.err, quiet=self.args.json)
        self.deploying = {"node": client.url, "name": name, "lease_id": None, "reached": False}
        with view:
            async for event in client.deploy_events(body, self.args.replace, self.args.lease,
                                                    **self.intent()):
                self.deploying["reached"] = True
                if event.get("event") == "lease":
                    self.deploying["lease_id"] = event.get("lease_id")
                if "event" in event:
                    view.show(event)
                elif event.get("ok"):
                    self.deploying = None
                    return event
                # an error answer: deploy_events raises it as the stream ends
        raise AgentRequestError(0, "no_answer", "The agent closed the stream without an answer.")

    def show_deployed(self, answer: dict[str, Any]) -> None:
        if self.args.json:
            return self.print_json(answer)
        verb = "already running" if answer["already_running"] else "deployed"
        gpu = f", GPU {answer['gpu']}" if answer.get("gpu") is not None else ""
        self.out.print(f"[green]{answer['name']}[/] {verb} at [bold]{answer['host']}[/]{gpu} "
                       f"on {answer['node']}")
        if answer.get("lease_id"):
            self.out.print(f"lease {answer['lease_id']} until {answer['lease_expires_at']}; renew "
                           f"with: {lease_command('renew', answer['name'], answer['lease_id'])}",
                           highlight=False)

    async def ps(self) -> None:
        statuses = await self.nodes.status()
        rows = [{**service, "node": s["node"]} for s in statuses for service in s.get("services", [])]
        self.warn_unreachable(statuses)
        if self.args.json:
            return self.print_json(rows)
        table = Table("NAME", "STATUS", "HOST", "GPU", "VRAM GB", "USED GB", "UPTIME", "RESTARTS",
                      "LEASES", "IMAGE", *(["NODE"] if len(statuses) > 1 else []), box=None)
        for row in rows:
            used = _dash(row["vram_used_gb"]) + (" [red]over[/]" if row["vram_over"] else "")
            table.add_row(row["name"], _status(row["status"], row.get("exit_code")), row["host"],
                          _dash(row["gpu"]), f"{row['vram_gb']:g}", used, _uptime(row["uptime"]),
                          str(row["restarts"]), _leases(row), row["image"],
                          *([row["node"]] if len(statuses) > 1 else []))
        self.out.print(table if rows else "no services")

    async def stop(self) -> None:
        answer = await self.nodes.stop(self.args.name)
        if self.args.json:
            return self.print_json(answer)
        self.out.print(f"stopped {self.args.name} on {answer['node']}")

    async def renew(self) -> None:
        answer = await self.nodes.renew(self.args.name, self.args.lease_id, self.args.lease)
        if self.args.json:
            return self.print_json(answer)
        self.out.print(f"lease {answer['lease_id']} on {answer['name']} until "
                       f"{answer['lease_expires_at']}", highlight=False)

    async def release(self) -> None:
        answer = await self.nodes.release(self.args.name, self.args.lease_id)
        if self.args.json:
            return self.print_json(answer)
        after = "; it was the last one: stopped" if answer["stopped"] else ""
        self.out.print(f"released {self.args.lease_id} on {self.args.name}{after}", highlight=False)

    async def events(self) -> None:
        """The recent events of every node, in time order; with -f, then as they come, until
        a node's stream fails (then that failure, and a non-zero exit)."""
        if not self.args.follow:
            for event in await self.nodes.events(self.args.limit):
                self.show_event(event.raw)
            return

        async def follow(client: AsyncAgentClient) -> None:
            async for event in client.follow_events(since=None):
                self.show_event({**event.raw, "node": client.url})

        following = [asyncio.ensure_future(follow(c)) for c in self.nodes.clients]
        try:
            done, _ = await asyncio.wait(following, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            for task in following:
                task.cancel()
            await asyncio.gather(*following, return_exceptions=True)
        for task in done:
            task.result()  # raises the failure that ended it

    def show_event(self, event: dict[str, Any]) -> None:
        if self.args.json:
            sys.stdout.write(json.dumps(event) + "\n")
            sys.stdout.flush()
            return
        details = " ".join(f"{k}={v}" for k, v in event["details"].items() if v not in (None, []))
        node = f" [{event['node']}]" if len(self.nodes.urls) > 1 else ""
        self.out.print(f"{event['time']} {event['id']:>6} {event['kind']:<13} "
                       f"{event['service'] or '-'} {event['reason'] or ''} {details}{node}".rstrip(),
                       highlight=False, markup=False)

    async def gpus(self) -> None:
        statuses = await self.nodes.status()
        self.warn_unreachable(statuses)
        rows = [{**gpu, "node": s["node"]} for s in statuses for gpu in s.get("gpus", [])]
        if self.args.json:
            return self.print_json(rows)
        table = Table("NODE", "ID", "NAME", "TOTAL GB", "USED", "RESERVED", "FOREIGN", "COMMITTED",
                      "FREE", "UTIL %", "SERVICES (DECLARED/USED GB)", box=None)
        for g in rows:
            services = ", ".join(f"{v['name']} {v['declared_gb']:g}/{_dash(v['used_gb'])}"
                                 for v in g["service_vram"])
            table.add_row(g["node"], str(g["id"]), g["name"], f"{g['vram_total_gb']:g}",
                          f"{g['vram_used_gb']:g}", f"{g['vram_reserved_gb']:g}",
                          f"{g['vram_foreign_gb']:g}", f"{g['vram_committed_gb']:g}",
                          f"{g['vram_free_gb']:g}", _dash(g["utilization_pct"]), services or "-")
        self.out.print(table if rows else "no GPUs")

    async def logs(self) -> None:
        client = await self.nodes.holder(self.args.name)
        if not self.args.follow:
            sys.stdout.write(await client.logs(self.args.name, self.args.tail))
            return
        async for chunk in client.follow_logs(self.args.name, self.args.tail):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    async def nodes_(self) -> None:
        statuses = await self.nodes.status()
        if self.args.json:
            return self.print_json([_node_summary(s) for s in statuses])
        table = Table("NODE", "REACHABLE", "ENGINE", "GPUS", "FREE VRAM GB", "SERVICES", "VERSION", box=None)
        for s in map(_node_summary, statuses):
            table.add_row(s["node"], "yes" if s["reachable"] else "[red]no[/]", s.get("engine", "-"),
                          _dash(s.get("gpus")), _dash(s.get("free_vram_gb")), _dash(s.get("services")),
                          s.get("version", "-"))
        self.out.print(table)

    def warn_unreachable(self, statuses: list[dict[str, Any]]) -> None:
        """Warn of each dead node; fail when none answered at all."""
        dead = [status for status in statuses if not status["reachable"]]
        if len(dead) == len(statuses):
            raise NodeUnreachable(0, "unreachable", "No node answered: " + "; ".join(
                status.get("error") or status["node"] for status in dead))
        for status in dead:
            told = status.get("error") or f"{status['node']} did not answer"
            sys.stderr.write(f"deployctl: warning: {' '.join(told.split())}\n")


class DeployView:
    """Live progress of one deploy: a bar per image layer, then the steps, on stderr."""

    def __init__(self, console: Console, quiet: bool) -> None:
        self._quiet = quiet
        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                  console=console, transient=False, disable=quiet)
        self._layers: dict[str, TaskID] = {}

    def __enter__(self) -> DeployView:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def show(self, event: dict[str, Any]) -> None:
        if self._quiet:
            return
        kind = event["event"]
        if kind == "pull":
            layer = event.get("layer")
            if layer and "total" in event:
                if layer not in self._layers:
                    self._layers[layer] = self._progress.add_task(f"pull {layer}", total=event["total"])
                self._progress.update(self._layers[layer], completed=event["current"],
                                      description=f"{event['status'].lower()} {layer}")
            elif layer in self._layers and event["status"] in ("Pull complete", "Already exists"):
                task = self._layers[layer]
                self._progress.update(task, completed=self._progress.tasks[task].total or 0,
                                      description=f"done {layer}")
            elif not layer:
                self._progress.console.print(f"  {event['status']}")
        elif kind == "waiting":
            self._progress.console.print(f"  waiting {event['waited_s']:g} s: {event['message']}",
                                         highlight=False)
        elif kind == "lease":
            self._progress.console.print(f"  lease {event['lease_id']}", highlight=False)
        elif kind == "queued":
            self._progress.console.print(f"  waiting for {event['needs_gb']:g} GB of VRAM: position "
                                         f"{event['position']} in the queue", highlight=False)
        elif kind == "created":
            gpu = f", GPU {event['gpu']}" if event.get("gpu") is not None else ""
            self._progress.console.print(f"  created container {event['container']} on port "
                                         f"{event['port']}{gpu}")
        elif kind == "started":
            self._progress.console.print("  started; waiting for health")
        elif kind == "health" and (event["healthy"] or event["attempt"] % 10 == 1):
            state = "[green]healthy[/]" if event["healthy"] else "not yet"
            self._progress.console.print(f"  health attempt {event['attempt']} "
                                         f"({event['elapsed_s']:.1f} s): {state}")


def _node_summary(status: dict[str, Any]) -> dict[str, Any]:
    if not status["reachable"]:
        return {"node": status["node"], "reachable": False}
    health = status["health"]
    return {"node": status["node"], "reachable": True, "engine": health["engine"],
            "gpus": health["gpus"], "services": len(status["services"]),
            "free_vram_gb": round(sum(g["vram_free_gb"] for g in status["gpus"]), 2),
            "version": health["version"]}


def _status(status: str, exit_code: int | None) -> str:
    colour = {"healthy": "green", "starting": "yellow", "unhealthy": "red", "exited": "red",
              "restarting": "yellow"}.get(status, "white")
    suffix = f" ({exit_code})" if exit_code is not None else ""
    return f"[{colour}]{status}{suffix}[/]"


def lease_command(verb: str, name: str, lease_id: str) -> str:
    """The deployctl command that renews or releases a lease: `--` goes before an id that
    starts with '-' (an older agent issued such ids, kept across a restart), which argparse
    would take for an option."""
    separator = "-- " if lease_id.startswith("-") else ""
    return f"deployctl {verb} {name} {separator}{lease_id}"


def _leases(row: dict[str, Any]) -> str:
    """`-` for a service that runs until stopped, else the count and the latest expiry."""
    if not row.get("leases"):
        return "-"
    return f"{row['leases']} until {str(row['lease_expires_at'])[11:19]}"


def _dash(value: Any) -> str:
    return "-" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def _uptime(seconds: int) -> str:
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600}h"


BAD_INPUT = 2
INTERRUPTED = 130


async def run(ctl: Ctl) -> int:
    command = {"nodes": ctl.nodes_}.get(ctl.args.command) or getattr(ctl, ctl.args.command)
    try:
        await command()
    finally:
        await ctl.nodes.close()
    return 0


def report(json_wanted: bool, err: BaseException, tokens: list[str]) -> int:
    """One line on stderr (and with --json, the error as JSON on stdout); the exit status."""
    if isinstance(err, AgentRequestError):
        code, message = err.code, err.message
        status = BAD_INPUT if isinstance(err, InvalidRequestError) else 1
        details = [f"{d.get('field')}: {d.get('message')}" for d in err.body.get("details", [])
                   if isinstance(d, dict)]
        body: dict[str, Any] = {**err.body, "ok": False, "error": code, "message": message, "node": err.node}
    elif isinstance(err, (OSError, ValueError)):  # an unreadable or malformed manifest, a bad URL
        code, message, status, details = "bad_input", str(err), BAD_INPUT, []
        body = {"ok": False, "error": code, "message": message}
    else:
        message = f"unexpected {type(err).__name__}: {err}"
        for token in tokens:
            message = message.replace(token, "***")
        code, status, details = "internal_error", 1, []
        body = {"ok": False, "error": code, "message": message}
    if json_wanted:
        sys.stdout.write(json.dumps(body) + "\n")
    line = " ".join((message + (f" ({'; '.join(details)})" if details else "")).split())
    sys.stderr.write(f"deployctl: {line}\n")
    if isinstance(err, AgentRequestError):
        for log_line in err.body.get("logs", [])[-10:]:
            sys.stderr.write(f"  | {log_line}\n")
    return status


def interrupted(ctl: Ctl | None, json_wanted: bool) -> int:
    """Ctrl-C: what goes on without us (with --json, also as JSON on stdout)."""
    deploying = ctl.deploying if ctl is not None else None
    body: dict[str, Any] = {"ok": False, "error": "interrupted"}
    if deploying is None or not deploying["reached"]:
        message = "interrupted" + (f"; the deploy of {deploying['name']} may not have reached "
                                   f"{deploying['node']}: look with `deployctl ps`"
                                   if deploying is not None else "")
    else:
        lease = deploying["lease_id"]
        held = (f"; once it is done it holds lease {lease}: renew it with "
                f"`{lease_command('renew', deploying['name'], lease)}`, or let it go with "
                f"`{lease_command('release', deploying['name'], lease)}`" if lease else "")
        message = (f"interrupted; the deploy of {deploying['name']} goes on at "
                   f"{deploying['node']}{held}")
        body.update(name=deploying["name"], node=deploying["node"], lease_id=lease)
    if json_wanted:
        sys.stdout.write(json.dumps({**body, "message": message}) + "\n")
    sys.stderr.write(f"deployctl: {message}\n")
    return INTERRUPTED


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.showwarning = _one_line_warning
    ctl = None
    try:
        ctl = Ctl(args)
        return asyncio.run(run(ctl))
    except KeyboardInterrupt:
        return interrupted(ctl, bool(args.json))
    except BrokenPipeError:  # `deployctl ps | head`: the reader had enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as err:
        if os.environ.get("DEPLOYCTL_DEBUG") == "1":
            raise
        tokens = [args.token, os.environ.get("DEPLOY_AGENT_TOKEN"),
                  *(ctl.nodes.tokens() if ctl is not None else [])]
        return report(bool(args.json), err, [t for t in tokens if t])


def _one_line_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                      file: Any = None, line: str | None = None) -> None:
    sys.stderr.write(f"deployctl: warning: {message}\n")


if __name__ == "__main__":
    sys.exit(main())
