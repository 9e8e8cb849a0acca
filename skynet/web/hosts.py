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

from skynet.control import DAEMON_SERVICE, DaemonEvent, HostStats, ProcessUsage

__all__ = [
    "DAEMON_SERVICE",
    "DaemonNews",
    "DaemonReading",
    "event_key",
    "host_header",
    "read_daemon_node",
]


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


class DaemonNews:
    """
    Which of each daemon's events are news: those that appear in its node
    after our first read of it (what happened before we looked is history).
    """

    def __init__(self) -> None:
        self._seen: dict[str, set[Any]] = {}

    def news(self, daemon: str, reading: DaemonReading) -> list[DaemonEvent]:
        """
        The events of C{reading} not seen before from C{daemon}, oldest
        first.
        """
        events = [(event_key(e), e) for e in reading.events]
        current = {key for key, _ in events}
        seen = self._seen.get(daemon)
        if seen is None:
            self._seen[daemon] = current
            return []
        new = []
        for key, event in events:
            if key not in seen:
                seen.add(key)
                new.append(event)
        if len(seen) > 2 * len(current) + 100:
            seen.intersection_update(current)
        return new

    def forget(self, daemon: str) -> None:
        self._seen.pop(daemon, None)


class Daemons:
    """
    The dashboard's knowledge of the hosts' daemons: each one's last good
    reading, which of its events are news, and one header per host.

    @ivar readings: daemon uuid -> its last L{DaemonReading}.
    @ivar headers: host name -> its header (C{host}, C{daemon}, C{region}
        and the figures of L{host_header}).
    """

    def __init__(self) -> None:
        self.readings: dict[str, DaemonReading] = {}
        self.headers: dict[str, dict[str, Any]] = {}
        self.news = DaemonNews()

    def read(self, uuid: str, stats: Any) -> None:
        """
        Take a daemon's freshly read statistics node.

        @raise ValueError: if it breaks the contract (the last good reading
            is kept).
        """
        self.readings[uuid] = read_daemon_node(stats)

    def forget(self, uuid: str) -> None:
        self.readings.pop(uuid, None)
        self.news.forget(uuid)

    def supervision(self) -> dict[str, tuple[str | None, ProcessUsage | None]]:
        """
        Per instance uuid: the daemon supervising it (or L{None}) and its
        usage as measured by a daemon (a daemon's own included).
        """
        found: dict[str, tuple[str | None, ProcessUsage | None]] = {}
        for daemon_uuid, reading in self.readings.items():
            for child in reading.host.children:
                found[child.uuid] = (daemon_uuid, child.usage)
        for daemon_uuid, reading in self.readings.items():
            if reading.host.daemon.usage is not None:
                above = found.get(daemon_uuid, (None, None))[0]
                found[daemon_uuid] = (above, reading.host.daemon.usage)
        return found

    def refresh(self, where: dict[str, tuple[str, str]]) -> set[str]:
        """
        Rebuild the headers from the daemons still present.

        @param where: daemon uuid -> its (host, region), for the daemons
            present in the registry.
        @return: the hosts whose header went away.
        """
        headers: dict[str, dict[str, Any]] = {}
        for daemon_uuid, reading in self.readings.items():
            if daemon_uuid not in where:
                continue
            host, region = where[daemon_uuid]
            header = {"host": host, "daemon": daemon_uuid, "region": region}
            header.update(host_header(reading.host))
            headers[host] = header
        gone = set(self.headers) - set(headers)
        self.headers = headers
        return gone
