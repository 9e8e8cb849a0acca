"""
Metrics export: the Prometheus text format for C{/metrics}, and an optional
Graphite plaintext push.

Every instance metric is labelled C{service}, C{version}, C{region},
C{host} and C{uuid} (the instance: Prometheus keeps the label C{instance}
for the scrape target).  C{skynet_request_duration_seconds} is a true
histogram, per instance and C{method}, from the buckets instances publish
in their statistics node (L{skynet.observe.histogram}): its C{_bucket}
counts, C{_sum} and C{_count} are the instances' own, never estimated.
C{skynet_service_request_duration_seconds} is the same summed over the
instances of each service and method.  Instances that publish no buckets
(Go Skynet's) have no histogram; their request counts and own percentiles
are exported as they are.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any

from twisted.application.internet import ClientService
from twisted.application.service import MultiService
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

from skynet.observe.histogram import Histogram, method_histograms
from skynet.web.model import DashboardModel, InstanceState

#: The content type of the Prometheus text format.
PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LABELS = ("service", "version", "region", "host", "uuid")


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(pairs: Iterable[tuple[str, str]]) -> str:
    inside = ",".join(f'{k}="{_escape(str(v))}"' for k, v in pairs)
    return "{" + inside + "}" if inside else ""


def _value(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _instance_labels(state: InstanceState) -> list[tuple[str, str]]:
    i = state.instance
    return list(zip(_LABELS, (i.name, i.version, i.region, i.host, i.uuid), strict=True))


class _Family:
    def __init__(self, name: str, kind: str, help_text: str) -> None:
        self.name = name
        self.kind = kind
        self.help = help_text
        self.samples: list[str] = []

    def add(self, labels: list[tuple[str, str]], value: Any, suffix: str = "") -> None:
        if value is None:
            return
        self.samples.append(f"{self.name}{suffix}{_labels(labels)} {_value(value)}")

    def render(self) -> list[str]:
        if not self.samples:
            return []
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"] + self.samples


def _add_histogram(family: _Family, labels: list[tuple[str, str]], h: Histogram) -> None:
    cumulative = h.cumulative()
    for bound, count in zip(h.bounds, cumulative, strict=False):
        family.add(labels + [("le", _value(bound))], count, "_bucket")
    family.add(labels + [("le", "+Inf")], cumulative[-1], "_bucket")
    family.add(labels, h.total, "_sum")
    family.add(labels, cumulative[-1], "_count")


def prometheus_text(model: DashboardModel) -> str:
    """
    The model's figures in the Prometheus text exposition format (0.0.4).
    Unknown figures (no statistics yet, no daemon) are left out.
    """
    f = {
        name: _Family(name, kind, text)
        for name, kind, text in [
            ("skynet_up", "gauge", "1 for every instance in the registry."),
            ("skynet_registered", "gauge", "1 if the instance takes new clients, else 0."),
            ("skynet_requests_total", "counter", "Requests served by the instance."),
            ("skynet_errors_total", "counter", "Requests that failed."),
            ("skynet_requests_per_second", "gauge", "Request rate seen by the dashboard."),
            ("skynet_request_duration_seconds", "histogram",
             "Response times per method, as counted by the instance."),
            ("skynet_service_request_duration_seconds", "histogram",
             "Response times per method, summed over the instances of the service."),
            ("skynet_method_requests_total", "counter", "Requests served, per method."),
            ("skynet_method_errors_total", "counter", "Requests that failed, per method."),
            ("skynet_response_time_quantile_seconds", "gauge",
             "Response time quantiles reported by the instance (recent requests)."),
            ("skynet_response_time_average_seconds", "gauge",
             "Average response time since the instance started."),
            ("skynet_clients", "gauge", "Connected clients."),
            ("skynet_in_flight", "gauge", "Requests being served."),
            ("skynet_start_time_seconds", "gauge", "When the instance started (POSIX)."),
            ("skynet_cpu_percent", "gauge", "CPU use of the process, percent of one core."),
            ("skynet_rss_bytes", "gauge", "Resident memory of the process."),
            ("skynet_host_load1", "gauge", "Host load average over 1 minute."),
            ("skynet_host_cpu_percent", "gauge", "Host CPU use, percent."),
            ("skynet_host_memory_used_bytes", "gauge", "Host memory in use."),
            ("skynet_host_memory_total_bytes", "gauge", "Host memory."),
            ("skynet_host_boot_time_seconds", "gauge", "When the host booted (POSIX)."),
        ]
    }  # fmt: skip
    per_service: dict[tuple[str, str], Histogram] = {}
    for state in sorted(model.instances.values(), key=lambda s: s.instance.path):
        labels = _instance_labels(state)
        row = state.row()
        f["skynet_up"].add(labels, 1)
        f["skynet_registered"].add(labels, 1 if row["registered"] else 0)
        f["skynet_requests_total"].add(labels, state.requests)
        f["skynet_errors_total"].add(labels, state.errors)
        f["skynet_clients"].add(labels, row["clients"])
        f["skynet_in_flight"].add(labels, row["in_flight"])
        f["skynet_start_time_seconds"].add(labels, row["start"])
        f["skynet_cpu_percent"].add(labels, state.cpu)
        f["skynet_rss_bytes"].add(labels, state.rss)
        if state.stats is not None:
            f["skynet_requests_per_second"].add(labels, round(state.rps, 6))
        for method, h in sorted(method_histograms(state.stats).items()):
            method_labels = labels + [("method", method)]
            _add_histogram(f["skynet_request_duration_seconds"], method_labels, h)
            f["skynet_method_requests_total"].add(method_labels, h.requests)
            f["skynet_method_errors_total"].add(method_labels, h.errors)
            skey = (state.instance.name, method)
            if skey in per_service and per_service[skey].bounds == h.bounds:
                per_service[skey] = per_service[skey] + h
            elif skey not in per_service:
                per_service[skey] = h
        for quantile, key in (("0.5", "p50_ms"), ("0.99", "p99_ms")):
            if row[key] is not None:
                f["skynet_response_time_quantile_seconds"].add(
                    labels + [("quantile", quantile)], row[key] / 1e3
                )
        if row["avg_ms"] is not None:
            f["skynet_response_time_average_seconds"].add(labels, row["avg_ms"] / 1e3)
    for (service, method), h in sorted(per_service.items()):
        _add_histogram(
            f["skynet_service_request_duration_seconds"],
            [("service", service), ("method", method)],
            h,
        )
    for name, header in sorted(model.hosts.items()):
        labels = [("host", name), ("region", str(header.get("region", "")))]
        f["skynet_host_load1"].add(labels, header.get("load1"))
        f["skynet_host_cpu_percent"].add(labels, header.get("cpu"))
        f["skynet_host_memory_used_bytes"].add(labels, header.get("mem_used"))
        f["skynet_host_memory_total_bytes"].add(labels, header.get("mem_total"))
        f["skynet_host_boot_time_seconds"].add(labels, header.get("boot_time"))
    lines: list[str] = []
    for family in f.values():
        lines.extend(family.render())
    return "\n".join(lines) + "\n"


_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]")


def graphite_name(*parts: str) -> str:
    """
    A Graphite metric path from parts, each made safe (dots, spaces and the
    like become C{_}).
    """
    return ".".join(_UNSAFE.sub("_", p) or "_" for p in parts)


def graphite_lines(model: DashboardModel, now: float, prefix: str = "skynet") -> list[bytes]:
    """
    The current figures as Graphite plaintext lines C{path value time}.
    """
    stamp = int(now)
    lines = []
    for state in model.instances.values():
        i = state.instance
        base = graphite_name(prefix, i.region, i.host, i.name, i.uuid)
        row = state.row()
        figures = {
            "requests": state.requests,
            "errors": state.errors,
            "requests_per_second": round(state.rps, 6) if state.stats is not None else None,
            "p50_ms": row["p50_ms"],
            "p99_ms": row["p99_ms"],
            "average_ms": row["avg_ms"],
            "clients": row["clients"],
            "registered": 1 if row["registered"] else 0,
            "cpu_percent": state.cpu,
            "rss_bytes": state.rss,
        }
        for name, value in figures.items():
            if value is not None:
                lines.append(f"{base}.{name} {_value(value)} {stamp}\n".encode())
    for host, header in model.hosts.items():
        base = graphite_name(prefix, "hosts", host)
        for name in ("load1", "cpu", "mem_used", "mem_percent"):
            value = header.get(name)
            if value is not None:
                lines.append(f"{base}.{name} {_value(value)} {stamp}\n".encode())
    return lines


class _GraphiteProtocol(Protocol):
    def __init__(self, pusher: GraphitePusher) -> None:
        self.pusher = pusher

    def connectionMade(self) -> None:
        self.pusher.connection = self

    def connectionLost(self, reason: Any = None) -> None:
        if self.pusher.connection is self:
            self.pusher.connection = None

    def dataReceived(self, data: bytes) -> None:
        pass


class _GraphiteFactory(Factory):
    def __init__(self, pusher: GraphitePusher) -> None:
        self.pusher = pusher

    def buildProtocol(self, addr: Any) -> _GraphiteProtocol:
        return _GraphiteProtocol(self.pusher)


class GraphitePusher(MultiService):
    """
    Pushes the model's figures to Graphite's plaintext port after every
    statistics sweep, over a connection kept open (and re-opened) by a
    L{ClientService}.  Figures are dropped while there is no connection.

    @param endpoint: an C{IStreamClientEndpoint} (C{tcp:HOST:2003}).
    @ivar sent: how many lines were written.
    """

    log = Logger()

    def __init__(self, model: DashboardModel, endpoint: Any, prefix: str = "skynet") -> None:
        super().__init__()
        self.model = model
        self.prefix = prefix
        self.sent = 0
        self.connection: _GraphiteProtocol | None = None
        self.client = ClientService(endpoint, _GraphiteFactory(self), clock=model.reactor)
        self.client.setServiceParent(self)
        self._unsubscribe: Any = None

    def startService(self) -> None:
        super().startService()
        self._unsubscribe = self.model.on_sweep(self.push)

    def stopService(self) -> Any:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        return super().stopService()

    def push(self) -> None:
        """
        Write the current figures, if connected.
        """
        connection = self.connection
        if connection is None or connection.transport is None:
            return
        lines = graphite_lines(self.model, self.model.reactor.seconds(), self.prefix)
        if lines:
            connection.transport.writeSequence(lines)
            self.sent += len(lines)


__all__ = [
    "PROMETHEUS_CONTENT_TYPE",
    "GraphitePusher",
    "graphite_lines",
    "graphite_name",
    "prometheus_text",
]
