"""
What changed in the dashboard's model since its last delta message, and
the delta message itself: only the fields of rows that changed, the rows
and hosts that went away, the new events and the new points.  Deltas carry
absolute values, never increments, so that applying one twice is harmless.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["Changes"]


class Changes:
    """
    The changes gathered for the next delta message.

    @ivar seq: the number of the last delta message made.
    @ivar dirty_rows: uuids whose row may have changed (ordered).
    @ivar removed_rows: uuids whose row went away.
    @ivar removed_hosts: hosts whose header went away.
    @ivar events: new events.
    @ivar points: new points of the time series.
    """

    def __init__(self) -> None:
        self.seq = 0
        self.dirty_rows: dict[str, None] = {}
        self.removed_rows: set[str] = set()
        self.removed_hosts: set[str] = set()
        self.events: list[dict[str, Any]] = []
        self.points: list[dict[str, Any]] = []
        self._sent_rows: dict[str, dict[str, Any]] = {}
        self._sent_hosts: dict[str, dict[str, Any]] = {}

    def delta(self, instances: Mapping[str, Any], hosts: Mapping[str, dict[str, Any]],
              now: float) -> dict[str, Any] | None:  # fmt: skip
        """
        The delta message of what changed since the last one (and forget
        it), or L{None} if nothing did.

        @param instances: uuid -> state with a C{row()}.
        @param hosts: host name -> header.
        """
        rows = []
        for uuid in self.dirty_rows:
            state = instances.get(uuid)
            if state is None:
                continue
            row = state.row()
            sent = self._sent_rows.get(uuid)
            if sent is None:
                rows.append(row)
            else:
                changed = {k: v for k, v in row.items() if sent.get(k) != v}
                if changed:
                    changed["uuid"] = uuid
                    rows.append(changed)
            self._sent_rows[uuid] = row
        self.dirty_rows = {}
        removed = sorted(self.removed_rows)
        for uuid in removed:
            self._sent_rows.pop(uuid, None)
        self.removed_rows = set()
        changed_hosts = []
        for name, header in hosts.items():
            if self._sent_hosts.get(name) != header:
                changed_hosts.append(dict(header))
                self._sent_hosts[name] = dict(header)
        hosts_removed = sorted(self.removed_hosts)
        for name in hosts_removed:
            self._sent_hosts.pop(name, None)
        self.removed_hosts = set()
        events, self.events = self.events, []
        points, self.points = self.points, []
        if not (rows or removed or changed_hosts or hosts_removed or events or points):
            return None
        self.seq += 1
        message: dict[str, Any] = {"type": "delta", "seq": self.seq, "time": round(now, 3)}
        for key, value in [("rows", rows), ("removed", removed), ("hosts", changed_hosts),
                           ("hosts_removed", hosts_removed), ("events", events),
                           ("points", points)]:  # fmt: skip
            if value:
                message[key] = value
        return message
