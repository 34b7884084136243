"""Prometheus metrics: deploy counts and durations, services, GPUs, engine, build.

Each app has its own registry (no process-global state). Deploy outcomes are counted
as they finish; the rest is read from memory at scrape time, never from Docker.
"""

from __future__ import annotations

import platform
import typing
from collections import Counter as Tally
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from deploy_agent import __version__
from deploy_agent.events import EventLog
from deploy_agent.models import ColdStart, Status
from deploy_agent.runtime import Reconciler
from deploy_agent.streams import Streams
from deploy_agent.supervise import Supervisor
from deploy_agent.table import ServiceTable

STATUSES = typing.get_args(Status)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class AgentMetrics:
    """The registry behind GET /metrics."""

    def __init__(self, table: ServiceTable, reconciler: Reconciler, supervisor: Supervisor,
                 streams: Streams, events: EventLog) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._deploys = Counter(
            "deploy_agent_deploys", "Deploy requests that passed validation, by outcome "
            "(deployed, already_running, or the error code).", ["outcome"], registry=self.registry)
        self._duration = Histogram(
            "deploy_agent_deploy_duration_seconds", "Time to answer a deploy, pull and health wait included.",
            ["outcome"], registry=self.registry,
            buckets=(0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600))
        self._cold_start = Histogram(
            "deploy_agent_cold_start_seconds", "Phases of the deploys that started a service: "
            "pull (up to the create), start (create and start), healthy (start to healthy).",
            ["phase"], registry=self.registry,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800))
        self.registry.register(_StateCollector(table, reconciler, supervisor, streams, events))

    def deploy_finished(self, outcome: str, seconds: float) -> None:
        self._deploys.labels(outcome).inc()
        self._duration.labels(outcome).observe(seconds)

    def cold_start(self, phases: ColdStart) -> None:
        self._cold_start.labels("pull").observe(phases.pull_s)
        self._cold_start.labels("start").observe(phases.start_s)
        self._cold_start.labels("healthy").observe(phases.healthy_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _StateCollector(Collector):
    """Gauges read from the agent's memory on each scrape."""

    def __init__(self, table: ServiceTable, reconciler: Reconciler, supervisor: Supervisor,
                 streams: Streams, events: EventLog) -> None:
        self._events = events
        self._table = table
        self._reconciler = reconciler
        self._supervisor = supervisor
        self._streams = streams

    def collect(self) -> Iterator[Metric]:
        by_status: Tally[str] = Tally(service.status for service in self._table.services())
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
            "committed": GaugeMetricFamily(
                "deploy_agent_gpu_vram_committed_gb",
                "What placement counts: each service's max(declared, observed), plus foreign use.",
                labels=["gpu", "name"]),
            "foreign": GaugeMetricFamily("deploy_agent_gpu_vram_foreign_gb",
                                         "VRAM used by processes that are not the agent's services.",
                                         labels=["gpu", "name"]),
        }
        for view in self._table.gpus.views():
            gpu = str(view.id) if view.node_name is None else f"{view.node_name}/{view.id}"
            labels = [gpu, view.name]
            families["total"].add_metric(labels, view.vram_total_gb)
            families["reserved"].add_metric(labels, view.vram_reserved_gb)
            if view.vram_used_gb is not None:  # a remote GPU's use is not known
                families["used"].add_metric(labels, view.vram_used_gb)
            families["committed"].add_metric(labels, view.vram_committed_gb)
            if view.vram_foreign_gb is not None:
                families["foreign"].add_metric(labels, view.vram_foreign_gb)
        yield from families.values()

        used = GaugeMetricFamily("deploy_agent_service_vram_used_gb",
                                 "VRAM NVML attributes to a service's container (where known).",
                                 labels=["service"])
        over = GaugeMetricFamily("deploy_agent_service_vram_over",
                                 "1 while a service uses more VRAM than it declared (3 readings).",
                                 labels=["service"])
        gpus = self._table.gpus
        for service in self._table.services():
            name = service.spec.name
            observed = gpus.observed_gb(name)
            if observed is not None:
                used.add_metric([name], observed)
            if service.gpu is not None:
                over.add_metric([name], 1 if name in gpus.over else 0)
        yield used
        yield over

        reachable = GaugeMetricFamily("deploy_agent_engine_reachable",
                                      "1 when the Docker engine answers, else 0.")
        reachable.add_metric([], 1 if self._reconciler.engine_reachable else 0)
        yield reachable

        resyncs = CounterMetricFamily("deploy_agent_resyncs", "Completed resyncs (list, adopt, probe all).")
        resyncs.add_metric([], self._reconciler.resyncs)
        yield resyncs
        refusals = CounterMetricFamily("deploy_agent_resync_refusals",
                                       "Things the engine refused during resyncs (one container, "
                                       "one re-placement), each retried on the next pass.")
        refusals.add_metric([], self._reconciler.refusals_total)
        yield refusals
        seconds = CounterMetricFamily("deploy_agent_resync_seconds", "Wall time spent in resyncs.")
        seconds.add_metric([], self._reconciler.resync_seconds)
        yield seconds

        failures = CounterMetricFamily("deploy_agent_task_failures",
                                       "Background tasks that failed and were restarted, by task.",
                                       labels=["task"])
        for task, count in sorted(self._supervisor.failures.items()):
            failures.add_metric([task], count)
        yield failures
        writes = CounterMetricFamily("deploy_agent_state_write_failures",
                                     "Writes of services.json that failed (and are retried).")
        writes.add_metric([], self._table.state_write_failures)
        yield writes
        event_writes = CounterMetricFamily("deploy_agent_event_write_failures",
                                           "Appends to events.jsonl that failed (and are retried).")
        event_writes.add_metric([], self._events.write_failures)
        yield event_writes
        streams = GaugeMetricFamily("deploy_agent_streams_open", "Log and event follows open now.")
        streams.add_metric([], self._streams.count)
        yield streams
        refused = CounterMetricFamily("deploy_agent_streams_refused",
                                      "Follows refused with 429 because --max-streams were open.")
        refused.add_metric([], self._streams.refused)
        yield refused

        info = InfoMetricFamily("deploy_agent_build", "Version of the agent and its Python.")
        info.add_metric([], {"version": __version__, "python": platform.python_version()})
        yield info
