"""
Reading a skynet daemon's statistics node.

The per-host daemon (C{skynet.daemon}) is itself a skynet service, named
L{DAEMON_SERVICE}; besides the usual statistics it publishes figures of its
host and of each child it supervises, as extra keys of its statistics node:

    "Host": {"cpu", "cpus", "memory": {"total", "available", "used", "percent"},
             "load": [1, 5, 15 minutes], "uptime", "boot_time", "hostname",
             "daemon": {"uuid", "pid", "uptime", "cpu", "rss"},
             "children": {uuid: {"service", "pid", "running", "cpu", "rss"}}}
    "Events": [{"time", "kind", "text", "uuid"?, ...}]     (the most recent)

L{daemon_figures} turns that node into a L{DaemonFigures}, never failing on
a missing or mistyped key: what is unknown stays L{None} and the page shows
it blank.
"""

from __future__ import annotations

import math
from typing import Any

import attr

#: The service name of the per-host daemon (C{skynet.daemon.DAEMON_SERVICE_NAME}).
DAEMON_SERVICE = "SkynetDaemon"


@attr.frozen
class ProcessFigures:
    """
    CPU (percent of one core) and resident memory (bytes) of one process.
    """

    cpu: float | None = None
    rss: int | None = None


@attr.frozen
class DaemonFigures:
    """
    What one daemon's statistics say.

    @ivar host: the host header: C{load1}, C{load5}, C{load15}, C{cpu}
        (percent), C{mem_used}, C{mem_total} (bytes), C{mem_percent},
        C{boot_time} (POSIX seconds), C{cpus}; absent keys are unknown.
    @ivar children: per supervised instance uuid, its L{ProcessFigures}.
    @ivar own: the daemon process's own figures, if published.
    @ivar events: the daemon's recent events as C{(key, event)} pairs, the
        key identifying the event across reads; an event has C{kind},
        C{text} and maybe C{uuid}.
    """

    host: dict[str, Any] = attr.field(factory=dict)
    children: dict[str, ProcessFigures] = attr.field(factory=dict)
    own: ProcessFigures | None = None
    events: tuple[tuple[Any, dict[str, Any]], ...] = ()


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return float(value)


def _first(doc: dict[str, Any], *names: str) -> Any:
    for name in names:
        if name in doc and doc[name] is not None:
            return doc[name]
    return None


def _process(doc: Any) -> ProcessFigures | None:
    if not isinstance(doc, dict):
        return None
    cpu = _num(_first(doc, "CPUPercent", "CPU", "cpu_percent", "cpu"))
    rss = _num(_first(doc, "RSS", "RSSBytes", "rss", "MemoryRSS"))
    if cpu is None and rss is None:
        return None
    return ProcessFigures(cpu=cpu, rss=int(rss) if rss is not None else None)


def _host(doc: Any) -> dict[str, Any]:
    if not isinstance(doc, dict):
        return {}
    found: dict[str, Any] = {}
    memory = _first(doc, "memory", "Memory")
    if isinstance(memory, dict):
        for key, keys in (("mem_total", ("total", "Total")), ("mem_used", ("used", "Used")),
                          ("mem_available", ("available", "Available")),
                          ("mem_percent", ("percent", "Percent"))):  # fmt: skip
            value = _num(_first(memory, *keys))
            if value is not None:
                found[key] = value
    load = _first(doc, "LoadAverage", "Load", "load")
    if isinstance(load, (list, tuple)):
        for name, value in zip(("load1", "load5", "load15"), load, strict=False):
            if _num(value) is not None:
                found[name] = _num(value)
    names: dict[str, tuple[str, ...]] = {
        "load1": ("Load1", "load1"),
        "load5": ("Load5", "load5"),
        "load15": ("Load15", "load15"),
        "cpu": ("cpu", "CPUPercent", "CPU", "cpu_percent"),
        "cpus": ("cpus", "CPUCount", "CPUs", "cpu_count"),
        "mem_total": ("MemoryTotal", "MemTotal", "memory_total"),
        "mem_used": ("MemoryUsed", "MemUsed", "memory_used"),
        "mem_available": ("MemoryAvailable", "MemAvailable", "memory_available"),
        "mem_percent": ("MemoryPercent", "MemPercent", "memory_percent"),
        "boot_time": ("BootTime", "boot_time"),
        "uptime": ("Uptime", "uptime"),
    }
    for key, candidates in names.items():
        value = _num(_first(doc, *candidates))
        if value is not None and key not in found:
            found[key] = value
    hostname = _first(doc, "hostname", "Hostname")
    if isinstance(hostname, str):
        found["hostname"] = hostname
    if "mem_percent" not in found and found.get("mem_total"):
        used = found.get("mem_used")
        if used is None and "mem_available" in found:
            used = found["mem_total"] - found["mem_available"]
        if used is not None:
            found["mem_percent"] = round(100.0 * used / found["mem_total"], 2)
    return found


def _children(value: Any) -> dict[str, ProcessFigures]:
    found: dict[str, ProcessFigures] = {}
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, list):
        items = [(_first(v, "UUID", "uuid"), v) for v in value if isinstance(v, dict)]
    else:
        return found
    for uuid, doc in items:
        if not isinstance(uuid, str) or not uuid:
            continue
        figures = _process(doc)
        if figures is None and isinstance(doc, dict):
            figures = _process(_first(doc, "Process", "Usage") or {})
        found[uuid] = figures if figures is not None else ProcessFigures()
    return found


def _events(value: Any) -> tuple[tuple[Any, dict[str, Any]], ...]:
    if not isinstance(value, list):
        return ()
    out = []
    for doc in value:
        if not isinstance(doc, dict):
            continue
        event = {
            "kind": str(_first(doc, "Kind", "kind", "Type", "type") or "daemon"),
            "text": str(_first(doc, "Text", "text", "Message", "message") or ""),
            "uuid": _first(doc, "UUID", "uuid"),
        }
        key = _first(doc, "ID", "Id", "id", "Seq", "seq")
        if key is None:
            key = (_first(doc, "Time", "time"), event["kind"], event["text"], event["uuid"])
        out.append((key if not isinstance(key, list) else tuple(key), event))
    return tuple(out)


def daemon_figures(stats: dict[str, Any]) -> DaemonFigures:
    """
    The host, children and events a daemon's statistics node describes.
    """
    if not isinstance(stats, dict):
        return DaemonFigures()
    host_doc = _first(stats, "Host", "HostStats", "host")
    if not isinstance(host_doc, dict):
        host_doc = {}
    children_doc = _first(host_doc, "children", "Children", "SubServices")
    if children_doc is None:
        children_doc = _first(stats, "SubServices", "Children", "children")
    own = _first(host_doc, "daemon", "Daemon")
    if own is None:
        own = _first(stats, "Process", "Daemon")
    return DaemonFigures(
        host=_host(host_doc),
        children=_children(children_doc),
        own=_process(own or {}),
        events=_events(_first(stats, "Events", "events")),
    )


__all__ = ["DAEMON_SERVICE", "DaemonFigures", "ProcessFigures", "daemon_figures"]
