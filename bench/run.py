"""deploy-agent benchmark: every figure beside its baseline, measured in the same run.

    python3 bench/run.py            # needs dockerd, the test image (tests/images/build.sh), wrk

Baselines:
  deploy latency, slow start, 8-in-parallel: the engine floor, i.e. the same container
      config created and started through the Engine API directly, /health polled every 20 ms;
  idempotent re-deploy, GET /services: the agent's own GET /health (the loopback HTTP floor);
  RSS, start-up, resync CPU: the same agent with no services;
  a deploy that evicts: the engine floor of a stop plus that of a deploy;
  a waiter's placement, an impossible deploy's refusal: the figures themselves (targets);
  a deploy that pulls: `docker pull` of an image of the same size + the engine floor; a deploy
      after POST /images/pull: the engine floor; a redeploy finding its cache: the first
      deploy, which wrote it.
Everything it creates carries the label tidybot.deploy-agent=bench-* and is removed at the end.
An agent that exits, or a service that never answers, fails the run with a message (its
log is kept) instead of hanging it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiodocker
import aiohttp

from deploy_agent.backends.engine import container_config
from deploy_agent.convert import make_converter
from deploy_agent.models import MANAGED_LABEL, DeploySpec
from deploy_agent.state import labels_for

IMAGE = "deploy-agent-test/httpd:1"
NVML_STANDIN = Path(__file__).resolve().parent.parent / "tests" / "nvml_standin"
CLK_TCK = os.sysconf("SC_CLK_TCK")
WAIT_S = 60.0  # the longest any agent or service is waited for before the run fails
PULL_LAYER_MB = 64  # the layer each cold-start figure's image must pull
CACHE_MB = 500  # the weights the cache figure's service writes


class BenchError(Exception):
    """The run can't go on: an agent exited or a service never answered."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


class Agent:
    """The installed deploy-agent as a process, for one instance name."""

    def __init__(self, instance: str, port_range: str, workdir: Path, resync: float = 5.0,
                 extra: tuple[str, ...] = ()) -> None:
        self.instance, self.port_range, self.resync, self.extra = instance, port_range, resync, extra
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.state = workdir / instance
        self.env: dict[str, str] = {}
        self.process: subprocess.Popen[bytes] | None = None
        self.log = workdir / f"{instance}.log"

    def spawn(self) -> float:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [str(Path(sys.executable).parent / "deploy-agent"), "--host", "127.0.0.1",
                 "--port", str(self.port), "--state-dir", str(self.state), "--advertise-host", "127.0.0.1",
                 "--port-range", self.port_range, "--instance", self.instance,
                 "--resync-interval", str(self.resync), "--log-level", "WARNING", *self.extra],
                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.env})
        return time.perf_counter()

    def check_running(self) -> None:
        """BenchError, with the end of its log, when the agent has exited."""
        if self.process is not None and self.process.poll() is not None:
            tail = self.log.read_text(errors="replace").strip().splitlines()[-5:]
            raise BenchError(f"the agent {self.instance} exited with code {self.process.returncode}: "
                             + " | ".join(tail))

    async def wait_for(self, session: aiohttp.ClientSession, expected_services: int) -> None:
        deadline = time.monotonic() + WAIT_S
        while True:
            self.check_running()
            try:
                async with session.get(self.url + "/services",
                                       timeout=aiohttp.ClientTimeout(total=5)) as response:
                    if response.status == 200 and len(await response.json()) == expected_services:
                        return
            except (TimeoutError, aiohttp.ClientError):
                pass
            if time.monotonic() > deadline:
                raise BenchError(f"the agent {self.instance} did not list {expected_services} services "
                                 f"within {WAIT_S:g} s")
            await asyncio.sleep(0.005)

    def rss_mib(self) -> float:
        assert self.process is not None
        text = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+)", text).group(1)) / 1024  # type: ignore[union-attr]

    def cpu_s(self) -> float:
        assert self.process is not None
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=60)
            self.process = None


class Bench:
    def __init__(self, rounds: int, workdir: Path,
                 only: tuple[str, ...] = ("deploy", "scale", "contention", "cold")) -> None:
        self.rounds = rounds
        self.only = only
        self.workdir = workdir
        self.rows: list[tuple[str, str, str, str, bool]] = []
        self.converter = make_converter()

    def report(self, figure: str, agent: str, baseline: str, target: str, met: bool) -> None:
        self.rows.append((figure, agent, baseline, target, met))
        print(f"  {figure}: {agent} (baseline {baseline}; target {target}) "
              f"{'OK' if met else 'MISSED'}", flush=True)

    # -- the engine floor ---------------------------------------------------------------------

    async def floor_deploy(self, docker: aiodocker.Docker, session: aiohttp.ClientSession,
                           name: str, host_port: int, env: dict[str, str] | None = None,
                           image: str = IMAGE) -> float:
        """create + start through the engine, then /health every 20 ms: the least any agent can do.

        The container is removed afterwards, outside the time measured.
        """
        elapsed, container = await self._floor_start(docker, session, name, host_port, env, image)
        await container.delete(force=True)
        return elapsed

    async def _floor_start(self, docker: aiodocker.Docker, session: aiohttp.ClientSession, name: str,
                           host_port: int, env: dict[str, str] | None,
                           image: str = IMAGE) -> tuple[float, Any]:
        spec = self.converter.structure({"name": name, "image": image, "env": env or {}}, DeploySpec)
        config = container_config(spec, host_port=host_port, env=dict(spec.env), device_requests=[], binds=[],
                                  labels=labels_for(self.converter, spec, host_port, None,
                                                    "bench-floor", "floor"))
        started = time.perf_counter()
        container = await docker.containers.create(config, name=f"bench-floor-{name}")
        await container.start()
        deadline = time.monotonic() + WAIT_S
        while True:
            if time.monotonic() > deadline:
                raise BenchError(f"the floor container {name} never answered /health on {host_port}")
            try:
                async with session.get(f"http://127.0.0.1:{host_port}/health",
                                       timeout=aiohttp.ClientTimeout(total=1)) as response:
                    if response.status == 200:
                        break
            except (TimeoutError, aiohttp.ClientError):
                pass
            await asyncio.sleep(0.02)
        return time.perf_counter() - started, container

    async def agent_deploy(self, session: aiohttp.ClientSession, agent: Agent, name: str,
                           env: dict[str, str] | None = None) -> float:
        return await self.timed_deploy(session, agent, {"name": name, "image": IMAGE, "env": env or {}})

    async def timed_deploy(self, session: aiohttp.ClientSession, agent: Agent, body: dict[str, Any],
                           expected: int = 200) -> float:
        """Seconds to the answer of one deploy; BenchError when it is not `expected`."""
        agent.check_running()
        started = time.perf_counter()
        async with session.post(agent.url + "/deploy", json=body,
                                timeout=aiohttp.ClientTimeout(total=WAIT_S * 2)) as response:
            answer = await response.json()
        elapsed = time.perf_counter() - started
        if response.status != expected:
            raise BenchError(f"deploy {body['name']} answered {response.status}, not {expected}: {answer}")
        return elapsed

    async def agent_stop(self, session: aiohttp.ClientSession, agent: Agent, name: str) -> None:
        async with session.post(agent.url + "/stop", json={"name": name}) as response:
            if response.status != 200:
                raise BenchError(f"stop {name} answered {response.status}: {await response.text()}")

    async def floor_stop(self, docker: aiodocker.Docker, session: aiohttp.ClientSession, name: str,
                         host_port: int) -> float:
        """A running container stopped (the agent's grace: 10 s, busybox exits at once) and
        removed through the engine: the least a stop can take."""
        _, container = await self._floor_start(docker, session, name, host_port, None)
        started = time.perf_counter()
        await container.stop(t=10)
        await container.delete(force=True)
        return time.perf_counter() - started

    # -- contention: eviction, the queue, refusals -----------------------------------------------

    async def contention_figures(self, docker: aiodocker.Docker, session: aiohttp.ClientSession) -> None:
        agent = Agent("bench-contend", "30000-30099", self.workdir, resync=5.0,
                      extra=("--fake-gpus", "bench GPU:24", "--min-resident", "0", "--keep-warm", "10m"))
        agent.spawn()
        await agent.wait_for(session, 0)
        gpu = {"image": IMAGE, "gpu": True, "vram_gb": 20}
        try:
            evicting, floor = [], []
            for i in range(self.rounds):  # interleaved with the floors, so both see the same machine
                floor.append(await self.floor_stop(docker, session, f"x{i}", 30500 + i)
                             + await self.floor_deploy(docker, session, f"y{i}", 30600 + i))
                async with session.post(agent.url + "/deploy", json={
                        "name": f"bench-idle{i}", **gpu, "lease_s": 60}) as response:
                    lease = (await response.json())["lease_id"]
                async with session.delete(f"{agent.url}/services/bench-idle{i}/leases/{lease}") as response:
                    await response.read()  # idle now, kept warm: the next deploy must evict it
                evicting.append(await self.timed_deploy(session, agent, {"name": f"bench-new{i}", **gpu}))
                await self.agent_stop(session, agent, f"bench-new{i}")
            a, f = statistics.median(evicting), statistics.median(floor)
            self.report("8a. deploy that evicts an idle service, median", f"{a * 1000:.0f} ms",
                        f"{f * 1000:.0f} ms (stop + deploy floors)", "ratio <= 1.10", a / f <= 1.10)

            placed = []
            for i in range(max(3, self.rounds // 3)):
                placed.append(await self.placed_after_release(session, agent, i, gpu))
            p = statistics.median(placed)
            self.report("8b. a waiter placed after a release, median", f"{p * 1000:.0f} ms",
                        "-", "<= 500 ms", p <= 0.5)

            holder = await self.leased(session, agent, "bench-hold", gpu)
            refusals = []
            for i in range(self.rounds):
                refusals.append(await self.timed_deploy(session, agent, {
                    "name": f"bench-huge{i}", "image": IMAGE, "gpu": True, "vram_gb": 30, "wait_s": 60},
                    expected=503))
            r = statistics.median(refusals)
            self.report("8c. an impossible deploy (30 GB on 24) refused, median", f"{r * 1000:.1f} ms",
                        "-", "<= 50 ms", r <= 0.050)

            alone = await self.sequential(session, "GET", agent.url + "/services", None, 300)
            waiting = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))  # 64 open streams
            waiters = [asyncio.ensure_future(self.wait_in_queue(waiting, agent, f"bench-w{i}", gpu))
                       for i in range(64)]
            try:
                await self.until(lambda: self.queued(session, agent, 64), "64 waiters queued")
                queued = await self.sequential(session, "GET", agent.url + "/services", None, 300)
            finally:
                for waiter in waiters:
                    waiter.cancel()
                await asyncio.gather(*waiters, return_exceptions=True)
                await waiting.close()
            self.report("8d. GET /services p50 with 64 deploys waiting",
                        f"{percentile(queued, 50) * 1000:.2f} ms",
                        f"{percentile(alone, 50) * 1000:.2f} ms (none waiting)", "<= 2 ms",
                        percentile(queued, 50) <= 0.002)
            async with session.delete(f"{agent.url}/services/bench-hold/leases/{holder}") as response:
                await response.read()
        finally:
            agent.stop()

    async def leased(self, session: aiohttp.ClientSession, agent: Agent, name: str,
                     gpu: dict[str, Any]) -> str:
        async with session.post(agent.url + "/deploy", json={"name": name, **gpu, "lease_s": 600,
                                                             "keep_warm_s": 0}) as response:
            answer = await response.json()
        if response.status != 200:
            raise BenchError(f"deploy {name} answered {response.status}: {answer}")
        return str(answer["lease_id"])

    async def placed_after_release(self, session: aiohttp.ClientSession, agent: Agent, i: int,
                                   gpu: dict[str, Any]) -> float:
        """Seconds from a release to the first progress of the deploy that waited for it."""
        lease = await self.leased(session, agent, f"bench-holder{i}", gpu)
        released: list[float] = []
        async with session.post(agent.url + "/deploy", json={"name": f"bench-waiter{i}", **gpu, "wait_s": 60},
                                headers={"Accept": "application/x-ndjson"},
                                timeout=aiohttp.ClientTimeout(total=WAIT_S * 2)) as response:
            async for line in response.content:
                event = json.loads(line) if line.strip() else {}
                if event.get("event") == "queued" and not released:
                    released.append(time.perf_counter())
                    async with session.delete(f"{agent.url}/services/bench-holder{i}/leases/{lease}") as done:
                        await done.read()
                elif released and event.get("event") not in (None, "queued"):
                    elapsed = time.perf_counter() - released[0]
                    break
            else:
                raise BenchError(f"the waiter bench-waiter{i} ended without being placed")
        await self.agent_stop(session, agent, f"bench-waiter{i}")
        return elapsed

    async def wait_in_queue(self, session: aiohttp.ClientSession, agent: Agent, name: str,
                            gpu: dict[str, Any]) -> None:
        async with session.post(agent.url + "/deploy", json={"name": name, **gpu, "wait_s": 300},
                                headers={"Accept": "application/x-ndjson"}) as response:
            async for _ in response.content:
                pass

    async def queued(self, session: aiohttp.ClientSession, agent: Agent, count: int) -> bool:
        async with session.get(agent.url + "/queue") as response:
            return len(await response.json()) == count

    async def until(self, check: Any, what: str) -> None:
        deadline = time.monotonic() + WAIT_S
        while not await check():
            if time.monotonic() > deadline:
                raise BenchError(f"never got to: {what}")
            await asyncio.sleep(0.05)

    # -- cold starts: pulls from a registry, pre-pulls, caches -----------------------------------

    async def cold_figures(self, docker: aiodocker.Docker, session: aiohttp.ClientSession) -> None:
        rounds = max(3, self.rounds // 3)
        with local_registry(self.workdir) as registry:
            images = [push_image(registry, self.workdir, f"cold{i}-{kind}", PULL_LAYER_MB)
                      for i in range(rounds) for kind in ("floor", "agent", "pre")]
            agent = Agent("bench-cold", "31300-31399", self.workdir)
            agent.spawn()
            await agent.wait_for(session, 0)
            try:
                pulled, floor, prepulled, floor_present = [], [], [], []
                for i in range(rounds):  # interleaved, so both see the same machine
                    floor_image, agent_image, pre_image = images[3 * i: 3 * i + 3]
                    started = time.perf_counter()
                    await docker.images.pull(floor_image)
                    floor.append(time.perf_counter() - started
                                 + await self.floor_deploy(docker, session, f"c{i}", 31800 + i,
                                                           image=floor_image))
                    pulled.append(await self.timed_deploy(session, agent, {"name": f"bench-c{i}",
                                                                           "image": agent_image}))
                    async with session.post(agent.url + "/images/pull", json={"image": pre_image}) as answer:
                        if answer.status != 200:
                            raise BenchError(f"POST /images/pull answered {answer.status}")
                    floor_present.append(await self.floor_deploy(docker, session, f"p{i}", 31850 + i,
                                                                 image=floor_image))
                    prepulled.append(await self.timed_deploy(session, agent, {"name": f"bench-pre{i}",
                                                                              "image": pre_image}))
                    for name in (f"bench-c{i}", f"bench-pre{i}"):
                        await self.agent_stop(session, agent, name)
                a, f = statistics.median(pulled), statistics.median(floor)
                self.report(f"9a. deploy pulling {PULL_LAYER_MB} MB from a local registry",
                            f"{a * 1000:.0f} ms", f"{f * 1000:.0f} ms (docker pull + floor)",
                            "ratio <= 1.10", a / f <= 1.10)
                a, f = statistics.median(prepulled), statistics.median(floor_present)
                self.report("9b. deploy after POST /images/pull", f"{a * 1000:.0f} ms",
                            f"{f * 1000:.0f} ms (floor, image present)", "ratio <= 1.10", a / f <= 1.10)
                await self.cache_figure(session, agent)
            finally:
                agent.stop()
                for image in images:
                    with contextlib.suppress(aiodocker.DockerError):
                        await docker.images.delete(image, force=True)
                await asyncio.to_thread(subprocess.run, ["docker", "volume", "rm", "-f",
                                                         "tidybot-bench-cold-bench-weights"],
                                        capture_output=True)

    async def cache_figure(self, session: aiohttp.ClientSession, agent: Agent) -> None:
        """A service that writes its weights into its cache unless they are there: the first
        deploy writes them, the redeploy after a stop finds them."""
        write = (f"if [ -f /cache/weights ]; then echo reused > /www/state; else dd if=/dev/zero "
                 f"of=/cache/weights bs=1M count={CACHE_MB} 2>/dev/null && sync && "
                 "echo wrote > /www/state; fi; exec httpd -f -p 8000 -h /www")
        body = {"name": "bench-weights", "image": IMAGE, "command": ["sh", "-c", write],
                "cache": {"bench-weights": "/cache"}, "ready_timeout": 300}
        times, said = [], []
        for _ in range(2):
            times.append(await self.timed_deploy(session, agent, body))
            async with session.get(agent.url + "/services/bench-weights") as response:
                port = (await response.json())["port"]
            async with session.get(f"http://127.0.0.1:{port}/state") as response:
                said.append((await response.text()).strip())
            await self.agent_stop(session, agent, "bench-weights")
        first, again = times
        self.report(f"9c. redeploy finding {CACHE_MB} MB in its cache",
                    f"{again * 1000:.0f} ms ({first - again:.1f} s saved)",
                    f"{first * 1000:.0f} ms (writing them)", "found, not rewritten",
                    said == ["wrote", "reused"] and again < first)

    # -- figures ------------------------------------------------------------------------------

    async def deploy_figures(self, docker: aiodocker.Docker, session: aiohttp.ClientSession) -> None:
        agent = Agent("bench-deploy", "31000-31099", self.workdir, resync=5.0)
        agent.spawn()
        await agent.wait_for(session, 0)
        try:
            ours, floor = [], []
            for i in range(self.rounds):  # interleaved, so both see the same machine
                floor.append(await self.floor_deploy(docker, session, f"d{i}", 31500 + i))
                ours.append(await self.agent_deploy(session, agent, f"bench-d{i}"))
                await self.agent_stop(session, agent, f"bench-d{i}")
            a, f = statistics.median(ours), statistics.median(floor)
            one, floor_one = a, f  # "1 alone" for figure 5
            self.report("1. deploy latency, median", f"{a * 1000:.0f} ms", f"{f * 1000:.0f} ms",
                        "ratio <= 1.10", a / f <= 1.10)

            ours, floor = [], []
            for i in range(max(3, self.rounds // 2)):
                floor.append(await self.floor_deploy(docker, session, f"s{i}", 31600 + i, {"DELAY": "1.5"}))
                ours.append(await self.agent_deploy(session, agent, f"bench-s{i}", {"DELAY": "1.5"}))
                await self.agent_stop(session, agent, f"bench-s{i}")
            a, f = statistics.median(ours) - 1.5, statistics.median(floor) - 1.5
            self.report("2. slow start (healthy at 1.5 s), answer - 1.5 s", f"{a * 1000:.0f} ms",
                        f"{f * 1000:.0f} ms", "<= floor + 150 ms", a <= f + 0.150)

            await self.agent_deploy(session, agent, "bench-idem")
            idem = await self.sequential(session, "POST", agent.url + "/deploy",
                                         {"name": "bench-idem", "image": IMAGE}, 500)
            bare = await self.sequential(session, "GET", agent.url + "/health", None, 500)
            self.report("3. idempotent re-deploy p50", f"{percentile(idem, 50) * 1000:.2f} ms",
                        f"{percentile(bare, 50) * 1000:.2f} ms (GET /health)", "<= 2 ms",
                        percentile(idem, 50) <= 0.002)
            await self.agent_stop(session, agent, "bench-idem")

            # 1 alone: the medians of figure 1; 8 at once: the median of three trials each.
            eights, floor_eights = [], []
            for trial in range(3):
                names = [f"bench-p{trial}-{i}" for i in range(8)]
                started = time.perf_counter()
                await asyncio.gather(*(self.agent_deploy(session, agent, name) for name in names))
                eights.append(time.perf_counter() - started)
                await asyncio.gather(*(self.agent_stop(session, agent, name) for name in names))
                started = time.perf_counter()
                floors = await asyncio.gather(*(
                    self._floor_start(docker, session, f"p{trial}-{i}", 31710 + 10 * trial + i, None)
                    for i in range(8)))
                floor_eights.append(time.perf_counter() - started)
                await asyncio.gather(*(container.delete(force=True) for _, container in floors))
            ratio, floor_ratio = statistics.median(eights) / one, statistics.median(floor_eights) / floor_one
            self.report("5. 8 deploys in parallel / 1 alone", f"{ratio:.2f}x", f"{floor_ratio:.2f}x",
                        "<= 3", ratio <= 3)
        finally:
            agent.stop()

    async def sequential(self, session: aiohttp.ClientSession, method: str, url: str,
                         body: Any, count: int) -> list[float]:
        times = []
        for _ in range(count):
            started = time.perf_counter()
            async with session.request(method, url, json=body) as response:
                await response.read()
            times.append(time.perf_counter() - started)
        return times

    async def populate(self, docker: aiodocker.Docker, instance: str, count: int, first_port: int) -> None:
        """`count` healthy service containers of `instance`, created straight through the engine."""
        semaphore = asyncio.Semaphore(8)

        async def one(i: int) -> None:
            spec = self.converter.structure({"name": f"bench-{i}", "image": IMAGE}, DeploySpec)
            port = first_port + i
            config = container_config(spec, host_port=port, env={}, device_requests=[], binds=[],
                                      labels=labels_for(self.converter, spec, port, None, instance,
                                                        f"bench-{i}"))
            async with semaphore:
                container = await docker.containers.create(config, name=f"bench-{instance}-{i}")
                await container.start()
        await asyncio.gather(*(one(i) for i in range(count)))
        await asyncio.sleep(1.0)  # let every httpd listen

    async def scale_figures(self, docker: aiodocker.Docker, session: aiohttp.ClientSession) -> None:
        print("  (starting 220 service containers)", flush=True)
        await self.populate(docker, "bench-20", 20, 32000)
        await self.populate(docker, "bench-200", 200, 32100)
        empty = Agent("bench-0", "33000-33099", self.workdir, resync=1.0)
        twenty = Agent("bench-20", "32000-32099", self.workdir, resync=1.0)
        many = Agent("bench-200", "32100-32399", self.workdir, resync=1.0)
        try:
            started = empty.spawn()
            await empty.wait_for(session, 0)
            empty_start = time.perf_counter() - started
            started = many.spawn()
            await many.wait_for(session, 200)
            many_start = time.perf_counter() - started
            self.report("6b. start-up adopting 200 containers to first answer", f"{many_start:.2f} s",
                        f"{empty_start:.2f} s (no containers)", "<= 2 s", many_start <= 2.0)
            twenty.spawn()
            await twenty.wait_for(session, 20)

            p50 = {}
            for agent, n in ((twenty, 20), (many, 200)):
                times = await self.sequential(session, "GET", agent.url + "/services", None, 500)
                p50[n] = percentile(times, 50)
            bare = await self.sequential(session, "GET", many.url + "/health", None, 500)
            self.report("4a. GET /services p50, 20 | 200 services",
                        f"{p50[20] * 1000:.2f} | {p50[200] * 1000:.2f} ms",
                        f"{percentile(bare, 50) * 1000:.2f} ms (GET /health)", "<= 2 ms",
                        max(p50.values()) <= 0.002)
            load = {n: wrk(agent.url + "/services") for agent, n in ((twenty, 20), (many, 200))}
            bare_load = wrk(many.url + "/health")
            self.report("4b. GET /services req/s, 16 clients, 200 services", f"{load[200]['rps']:.0f}/s",
                        f"{bare_load['rps']:.0f}/s (GET /health)", ">= 1500/s", load[200]["rps"] >= 1500)
            self.report("4c. GET /services p99, 16 clients, 200 (20) services",
                        f"{load[200]['p99'] * 1000:.2f} ({load[20]['p99'] * 1000:.2f}) ms",
                        f"{bare_load['p99'] * 1000:.2f} ms (GET /health)", "<= 1.5x /health",
                        load[200]["p99"] <= 1.5 * bare_load["p99"])

            self.report("6a. agent RSS with 200 services", f"{many.rss_mib():.1f} MiB",
                        f"{empty.rss_mib():.1f} MiB (no services)", "<= 64 MiB", many.rss_mib() <= 64)

            cpu = {}
            for agent in (empty, many):  # resync every 1 s, no requests
                resyncs_before, cpu_before = await resyncs(session, agent), agent.cpu_s()
                await asyncio.sleep(10.0)
                done = await resyncs(session, agent) - resyncs_before
                cpu[agent.instance] = (agent.cpu_s() - cpu_before) / done
            self.report("7. CPU time of one resync, 200 services", f"{cpu['bench-200'] * 1000:.0f} ms",
                        f"{cpu['bench-0'] * 1000:.0f} ms (no services)", "<= 100 ms",
                        cpu["bench-200"] <= 0.100)

            # The same agent, now reading 8 GPUs whose 200 processes are the services' own
            # (a stand-in NVML reporting their real PIDs): VRAM truth must not slow a resync.
            many.stop()
            nvml = self.workdir / "nvml.json"
            nvml.write_text(json.dumps(await standin_gpus(docker, "bench-200", 8)))
            many.env = {"PYTHONPATH": str(NVML_STANDIN), "DEPLOY_AGENT_TEST_NVML": str(nvml)}
            many.spawn()
            await many.wait_for(session, 200)
            resyncs_before, cpu_before = await resyncs(session, many), many.cpu_s()
            await asyncio.sleep(10.0)
            with_gpus = (many.cpu_s() - cpu_before) / (await resyncs(session, many) - resyncs_before)
            reading = await reading_cost(nvml)
            self.report("7b. resync CPU, 200 services, GPU reading attributing 200 processes",
                        f"{with_gpus * 1000:.0f} ms ({reading * 1000:.1f} ms reading)",
                        f"{cpu['bench-200'] * 1000:.0f} ms (figure 7, no GPUs)", "<= 100 ms",
                        with_gpus <= 0.100)
        finally:
            for agent in (empty, twenty, many):
                agent.stop()

    async def run(self) -> None:
        async with aiodocker.Docker() as docker, aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=64)) as session:
            await cleanup(docker)
            try:
                if "deploy" in self.only:
                    print("deploy figures", flush=True)
                    await self.deploy_figures(docker, session)
                if "scale" in self.only:
                    print("scale figures", flush=True)
                    await self.scale_figures(docker, session)
                if "contention" in self.only:
                    print("contention figures", flush=True)
                    await self.contention_figures(docker, session)
                if "cold" in self.only:
                    print("cold-start figures", flush=True)
                    await self.cold_figures(docker, session)
            finally:
                await cleanup(docker)


async def standin_gpus(docker: aiodocker.Docker, instance: str, count: int) -> dict[str, Any]:
    """A stand-in NVML description: `count` 80 GB GPUs, each service's PID using 1 GB."""
    containers = await docker.containers.list(filters={"label": [f"{MANAGED_LABEL}={instance}"]})
    pids = [(await c.show())["State"]["Pid"] for c in containers]
    return {"gpus": [{"uuid": f"GPU-bench-{i}", "name": "bench GPU", "total_gb": 80, "utilization": 0,
                      "processes": [{"pid": pid, "used_gb": 1} for pid in pids[i::count]]}
                     for i in range(count)]}


async def reading_cost(nvml_state: Path, rounds: int = 50) -> float:
    """Median CPU seconds (all threads) of one inventory read plus pool refresh, in this process."""
    sys.path.insert(0, str(NVML_STANDIN))
    os.environ["DEPLOY_AGENT_TEST_NVML"] = str(nvml_state)
    import pynvml  # the stand-in, from the path above

    from deploy_agent.gpus import GpuPool, NvmlGpus

    pool = GpuPool(NvmlGpus(pynvml))
    times = []
    for _ in range(rounds):
        started = time.process_time()
        await pool.refresh({})
        times.append(time.process_time() - started)
    return statistics.median(times)


async def resyncs(session: aiohttp.ClientSession, agent: Agent) -> int:
    """The agent's count of completed resyncs, from its /metrics."""
    async with session.get(agent.url + "/metrics") as response:
        text = await response.text()
    return int(float(re.search(r"^deploy_agent_resyncs_total (\S+)$", text, re.M).group(1)))  # type: ignore[union-attr]


def wrk(url: str, seconds: int = 5) -> dict[str, float]:
    """16 concurrent connections for `seconds`: requests/s and latency p50/p99 in seconds."""
    out = subprocess.run(["wrk", "-t2", "-c16", f"-d{seconds}s", "--latency", url],
                         capture_output=True, text=True, check=True).stdout
    units = {"us": 1e-6, "ms": 1e-3, "s": 1.0}

    def latency(label: str) -> float:
        value, unit = re.search(rf"{label}\s+([\d.]+)(us|ms|s)", out).groups()  # type: ignore[union-attr]
        return float(value) * units[unit]
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    return {"rps": rps, "p50": latency("50%"), "p99": latency("99%")}


@contextlib.contextmanager
def local_registry(workdir: Path) -> Iterator[str]:
    """A docker-registry on 127.0.0.1 for the run; its address."""
    binary = shutil.which("docker-registry")
    if binary is None:
        raise BenchError("the cold-start figures need docker-registry (apt-get install docker-registry)")
    port = free_port()
    root = workdir / "registry"
    root.mkdir()
    (root / "config.yml").write_text(json.dumps({
        "version": 0.1, "storage": {"filesystem": {"rootdirectory": str(root / "data")}},
        "http": {"addr": f"127.0.0.1:{port}"}, "log": {"level": "error"}}))
    process = subprocess.Popen([binary, "serve", str(root / "config.yml")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise BenchError("the local registry did not start") from None
                time.sleep(0.05)
        yield f"localhost:{port}"
    finally:
        process.terminate()
        process.wait(timeout=10)


def push_image(registry: str, workdir: Path, name: str, megabytes: int) -> str:
    """The test image plus a layer of `megabytes` random bytes, pushed, and gone from the
    engine: a deploy of it must pull that layer."""
    ref = f"{registry}/bench/{name}:1"
    context = workdir / f"image-{name}"
    context.mkdir()
    (context / "blob").write_bytes(os.urandom(megabytes * 1024 * 1024))
    (context / "Dockerfile").write_text(f"FROM {IMAGE}\nCOPY blob /blob\n")
    for command in (["docker", "build", "-q", "-t", ref, str(context)], ["docker", "push", ref],
                    ["docker", "rmi", ref]):
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise BenchError(f"{' '.join(command[:2])} {ref} failed: {done.stderr.strip()}")
    shutil.rmtree(context)
    return ref


async def cleanup(docker: aiodocker.Docker) -> None:
    containers = await docker.containers.list(all=True, filters={"label": [MANAGED_LABEL]})
    doomed = [c for c in containers if str(c["Labels"].get(MANAGED_LABEL, "")).startswith("bench-")]
    await asyncio.gather(*(c.delete(force=True) for c in doomed))


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    memory = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))  # type: ignore[union-attr]
    docker = subprocess.run(["docker", "version", "-f", "{{.Server.Version}}"], capture_output=True,
                            text=True).stdout.strip()
    return (f"{os.cpu_count()} cores ({cpu}), {memory / 1024 / 1024:.0f} GiB, Linux {platform.release()}, "
            f"Python {platform.python_version()}, Docker {docker}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15,
                        help="deploys per latency figure (single deploys vary by about 50 ms here)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--only", choices=["deploy", "scale", "contention", "cold"], action="append",
                        help="run one group of figures (repeatable; default: all)")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("bench: needs wrk (apt-get install wrk)")
    workdir = Path(tempfile.mkdtemp(prefix="deploy-agent-bench-"))
    bench = Bench(args.rounds, workdir, tuple(args.only or ("deploy", "scale", "contention", "cold")))
    print(f"machine: {machine()}", flush=True)
    try:
        asyncio.run(bench.run())
    except BenchError as err:
        sys.exit(f"bench: {err} (agent logs kept in {workdir})")
    shutil.rmtree(workdir, ignore_errors=True)
    width = max(len(row[0]) for row in bench.rows)
    print(f"\n{'figure'.ljust(width)}  {'agent':>22}  {'baseline':>30}  {'target':>18}  met")
    for figure, agent, baseline, target, met in bench.rows:
        print(f"{figure.ljust(width)}  {agent:>22}  {baseline:>30}  {target:>18}  {'yes' if met else 'NO'}")
    if args.json:
        args.json.write_text(json.dumps([dict(zip(("figure", "agent", "baseline", "target", "met"), row,
                                                  strict=True)) for row in bench.rows], indent=1))
    return 0 if all(row[4] for row in bench.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
