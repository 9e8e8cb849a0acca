"""
Reading a skynet daemon's statistics node, for the dashboard.

The per-host daemon is itself a skynet service (L{DAEMON_SERVICE}); beside
the usual statistics its node carries C{"Host"}, a L{HostStats} document,
and C{"Events"}, its recent L{DaemonEvent}s.  Both are read with the
control records' strict C{from_bson}: a node that does not follow the
contract is refused with a L{ValueError} saying why, and the dashboard
keeps what it knew.
"""

from __future__ import annotations

from typing import Any

import attr

from skynet.control import DAEMON_SERVICE, DaemonEvent, HostStats

__all__ = ["DAEMON_SERVICE", "DaemonReading", "event_key", "host_header", "read_daemon_node"]


@attr.frozen
class DaemonReading:
    """
    What one daemon's statistics node says: its host and children, and its
    recent events (oldest first).
    """

    host: HostStats
    events: tuple[DaemonEvent, ...] = ()


def read_daemon_node(stats: Any) -> DaemonReading:
    """
    The L{DaemonReading} of a daemon's statistics node.

    @raise ValueError: if C{"Host"} or C{"Events"} is missing or malformed.
    """
    if not isinstance(stats, dict):
        raise ValueError("a statistics node must be a document")
    if "Host" not in stats or "Events" not in stats:
        raise ValueError("a daemon's statistics node needs 'Host' and 'Events'")
    events = stats["Events"]
    if not isinstance(events, list):
        raise ValueError(f"'Events' must be a list, not {type(events).__name__}")
    return DaemonReading(host=HostStats.from_bson(stats["Host"]),
                         events=tuple(DaemonEvent.from_bson(e) for e in events))  # fmt: skip


def event_key(event: DaemonEvent) -> tuple[Any, ...]:
    """
    What identifies one daemon event across reads of the node.
    """
    return (event.time, event.kind, event.text, event.uuid)


def host_header(stats: HostStats) -> dict[str, Any]:
    """
    The figures of a host's header on the page: C{load1}, C{load5},
    C{load15}, C{cpu} (percent), C{cpus}, C{mem_total}, C{mem_used},
    C{mem_available} (bytes), C{mem_percent}, C{boot_time}, C{uptime}
    (seconds), C{hostname}; none if the daemon could not measure its host.
    """
    f = stats.figures
    if f is None:
        return {}
    load1, load5, load15 = f.load
    return {
        "load1": load1,
        "load5": load5,
        "load15": load15,
        "cpu": f.cpu,
        "cpus": f.cpus,
        "mem_total": f.memory.total,
        "mem_used": f.memory.used,
        "mem_available": f.memory.available,
        "mem_percent": f.memory.percent,
        "boot_time": f.boot_time,
        "uptime": f.uptime,
        "hostname": f.hostname,
    }
