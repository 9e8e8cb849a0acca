"""
The dashboard's logs view, server side: C{GET /api/logs}.

The search is the one of C{sky logs}: the page's filters become
C{SearchLogs} parameters (L{skynet.observe.logsearch.query_params}), and
L{skynet.observe.logsearch.fan_out} asks the daemon of every host that the
host and region filters match, and merges the answers by time.  The
daemons are the ones the dashboard's model already knows (registered
C{SkynetDaemon} instances), so a search costs no registry query.

Query string (all optional):

    service, version, host, region   the page's filters
    uuid, request_id                 one instance, one request
    grep                             a regular expression on the text
    level                            the least level shown
    since, until                     C{30s}, C{10m}, C{2h}, C{1d}, POSIX or ISO 8601 time
    limit                            newest events of the first page (default 100, at most 1000)
    cursor                           from a previous answer: only what was written since

Answer: C{{ok, events, cursor, more, errors}}: each event is a daemon's
event (L{skynet.observe.logsearch}) with its C{daemon_host}; C{cursor}
holds one daemon cursor per daemon (opaque: pass it back to follow);
C{errors} are the daemons' troubles, one line each.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

import attr

from skynet.config import default_reactor
from skynet.observe.logsearch import SearchError, fan_out, query_params
from skynet.web.hosts import DAEMON_SERVICE

#: Most events on the first page of the dashboard's logs view.
MAX_PAGE = 1000

#: The query-string keys the view takes; C{SearchLogs} option names where
#: they differ.
_OPTIONS = {"uuid": "uuid", "request_id": "request-id", "grep": "grep", "level": "level",
            "since": "since", "until": "until", "limit": "limit"}  # fmt: skip
_FILTERS = ("service", "version", "host", "region")


@attr.s(frozen=True, auto_attribs=True)
class _Filters:
    service: str | None = None
    version: str | None = None
    host: str | None = None
    region: str | None = None


def encode_cursors(cursors: dict[str, str | None]) -> str:
    """
    The page's cursor: each daemon's cursor, by daemon uuid.
    """
    raw = json.dumps(cursors, separators=(",", ":"), sort_keys=True).encode()
    return base64.urlsafe_b64encode(raw).decode("ascii")


def decode_cursors(cursor: str) -> dict[str, str | None]:
    """
    @raise SearchError: for a cursor this view did not make.
    """
    try:
        value = json.loads(base64.urlsafe_b64decode(cursor.encode("ascii")))
    except (ValueError, UnicodeError, binascii.Error):
        raise SearchError("bad cursor: pass back the cursor of a previous answer") from None
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and (v is None or isinstance(v, str)) for k, v in value.items()
    ):
        raise SearchError("bad cursor: pass back the cursor of a previous answer")
    return value


class DashboardLogs:
    """
    Searches the logs of the daemons a L{skynet.web.model.DashboardModel}
    knows.

    @param ask: C{ask(daemon, params)} -> awaitable C{SearchLogs} answer
        (default: a call to the daemon, as the dashboard's actions make).
    """

    def __init__(
        self, model: Any, reactor: Any = None, timeout: float = 10.0, ask: Any = None
    ) -> None:
        self.model = model
        self.reactor = default_reactor(reactor)
        self.timeout = timeout
        self.ask = ask or self._call

    def _call(self, daemon: Any, params: dict[str, Any]) -> Any:
        from skynet.admin import call_instance
        from skynet.control import SEARCH_LOGS

        return call_instance(self.reactor, daemon, SEARCH_LOGS, params, self.timeout)

    def daemons(self, host: str | None, region: str | None) -> list[Any]:
        """
        The registered daemons of the hosts that C{host} and C{region} match.
        """
        found = []
        for state in self.model.instances.values():
            i = state.instance
            if i.name != DAEMON_SERVICE or not i.registered:
                continue
            if host and i.host != host:
                continue
            if region and i.region != region:
                continue
            found.append(i)
        return sorted(found, key=lambda i: (i.host, i.uuid))

    async def search(self, args: dict[str, str]) -> dict[str, Any]:
        """
        One page (or, with a cursor, what is new) of the logs view.

        @raise SearchError: for a bad parameter (said to the page as is).
        """
        filters = _Filters(**{k: args.get(k) or None for k in _FILTERS})
        options = {option: args[key] for key, option in _OPTIONS.items() if args.get(key)}
        params = query_params(filters, options, self.reactor.seconds())
        limit = params.get("limit", 100)
        if limit > MAX_PAGE:
            raise SearchError(f"limit must be at most {MAX_PAGE}")
        daemons = self.daemons(filters.host, filters.region)
        if args.get("cursor"):
            known = decode_cursors(args["cursor"])
            # A daemon that came since the first page starts at its newest.
            cursors = {d.uuid: known.get(d.uuid) for d in daemons}
        else:
            cursors = {d.uuid: None for d in daemons}
        if not daemons:
            return {"ok": True, "events": [], "cursor": encode_cursors(cursors), "more": False,
                    "errors": ["no SkynetDaemon is registered on the hosts that match the "
                               "filters (logs are searched by the daemons)"]}  # fmt: skip
        found = await fan_out(self.ask, daemons, params, cursors)
        events = found.events if args.get("cursor") else found.events[-limit:]
        hosts = {d.uuid: d.host for d in daemons}
        errors = [f"host {hosts[u]}: {e}" for u in sorted(found.errors) for e in found.errors[u]]
        return {
            "ok": True,
            "events": [dict(event, daemon_host=host) for event, host in events],
            "cursor": encode_cursors(cursors),
            "more": found.more,
            "errors": errors,
        }


__all__ = ["MAX_PAGE", "DashboardLogs", "decode_cursors", "encode_cursors"]
