"""Prometheus metrics: deploy counts and durations, services, GPUs, engine, build.

Each app has its own registry (no process-global state). Deploy outcomes are counted
as they finish; the rest is read from memory at scrape time, never from Docker.
"""

from __future__ import annotations

import platform
from collections import Counter as Tally
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from deploy_agent import __version__
from deploy_agent.deployer import Deployer
from deploy_agent.gpus import GpuPool
from deploy_agent.reconciler import Reconciler

STATUSES = ("starting", "healthy", "unhealthy", "restarting", "exited")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class AgentMetrics:
    """The registry behind GET /metrics."""

    def __init__(self, deployer: Deployer, gpus: GpuPool, reconciler: Reconciler) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._deploys = Counter(
            "deploy_agent_deploys", "Deploy requests that passed validation, by outcome "
            "(deployed, already_running, or the error code).", ["outcome"], registry=self.registry)
        self._duration = Histogram(
            "deploy_agent_deploy_duration_seconds", "Time to answer a deploy, pull and health wait included.",
            ["outcome"], registry=self.registry,
            buckets=(0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600))
        self.registry.register(_StateCollector(deployer, gpus, reconciler))

    def deploy_finished(self, outcome: str, seconds: float) -> None:
        self._deploys.labels(outcome).inc()
        self._duration.labels(outcome).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _StateCollector(Collector):
    """Gauges read from the agent's memory on each scrape."""

    def __init__(self, deployer: Deployer, gpus: GpuPool, reconciler: Reconciler) -> None:
        self._deployer = deployer
        self._gpus = gpus
        self._reconciler = reconciler

    def collect(self) -> Iterator[Metric]:
        by_status: Tally[str] = Tally(service.status for service in self._deployer.services())
        services = GaugeMetricFamily("deploy_agent_services", "Services by status.", labels=["status"])
        for status in STATUSES:
            services.add_metric([status], by_status.get(status, 0))
        yield services

        families = {
            "total": GaugeMetricFamily("deploy_agent_gpu_vram_total_gb", "GPU memory.",
                                       labels=["gpu", "name"]),
            "reserved": GaugeMetricFamily("deploy_agent_gpu_vram_reserved_gb",
                                          "VRAM declared by the agent's services on the GPU.",
                                          labels=["gpu", "name"]),
            "used": GaugeMetricFamily("deploy_agent_gpu_vram_used_gb", "VRAM in use (all processes).",
                                      labels=["gpu", "name"]),
        }
        for view in self._gpus.views():
            labels = [str(view.id), view.name]
            families["total"].add_metric(labels, view.vram_total_gb)
            families["reserved"].add_metric(labels, view.vram_reserved_gb)
            families["used"].add_metric(labels, view.vram_used_gb)
        yield from families.values()

        reachable = GaugeMetricFamily("deploy_agent_engine_reachable",
                                      "1 when the Docker engine answers, else 0.")
        reachable.add_metric([], 1 if self._reconciler.engine_reachable else 0)
        yield reachable

        resyncs = CounterMetricFamily("deploy_agent_resyncs", "Completed resyncs (list, adopt, probe all).")
        resyncs.add_metric([], self._reconciler.resyncs)
        yield resyncs
        seconds = CounterMetricFamily("deploy_agent_resync_seconds", "Wall time spent in resyncs.")
        seconds.add_metric([], self._reconciler.resync_seconds)
        yield seconds

        info = InfoMetricFamily("deploy_agent_build", "Version of the agent and its Python.")
        info.add_metric([], {"version": __version__, "python": platform.python_version()})
        yield info
