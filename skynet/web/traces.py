"""
The dashboard's traces, server side: C{GET /api/trace/<request_id>} and
C{GET /api/slow}.

Both put a L{skynet.observe.tracing.SpansQuery} to the cluster with
L{skynet.observe.tracing.gather}, as C{sky trace} does: one C{SearchSpans}
call per host's daemon, C{SkynetSpans} to the instances no daemon answered
for.  The instances are the ones the dashboard's model already knows, so
a trace costs no registry query.

C{/api/trace/<request_id>} answers C{{ok, request_id, calls, spans,
errors}}: C{calls} is the call tree (L{skynet.observe.tracing.tree_json}:
one object per call, C{start} relative to the first call, in seconds),
C{spans} how many spans it was made of.  A request of which no span is
found answers 404 with C{ok} false.

C{/api/slow?limit=N&since=S} answers C{{ok, calls, errors}}: the C{N}
(default 20, at most 200) slowest recent calls of the cluster, one per
request, longest first, each C{{request_id, service, method, address,
start, duration, outcome, kind}} (C{start} in POSIX seconds); C{since}
(C{30s}, C{15m}, C{1h}, C{1d}; default 1 h) bounds how recent; C{service}
keeps the calls of one service.
"""

from __future__ import annotations

from typing import Any

from skynet.config import default_reactor
from skynet.observe import tracing

#: The slow list's default and largest length.
DEFAULT_SLOW = 20
MAX_SLOW = 200

#: The slow list's default window, in seconds.
DEFAULT_SINCE = 3600.0


class TraceError(ValueError):
    """
    A bad question from the page: said to it as is (400).
    """


def parse_window(value: str) -> float:
    """
    L{tracing.parse_window}, raising L{TraceError}.
    """
    try:
        return tracing.parse_window(value)
    except ValueError as e:
        raise TraceError(str(e)) from None


#: One line of the slow list (L{tracing.slow_entry}).
slow_entry = tracing.slow_entry


class DashboardTraces:
    """
    Traces of the cluster a L{skynet.web.model.DashboardModel} knows.

    @param gather: C{gather(reactor, instances, params, timeout)} ->
        awaitable L{tracing.Gathered} (default L{tracing.gather}).
    """

    def __init__(
        self, model: Any, reactor: Any = None, timeout: float = 10.0, gather: Any = None
    ) -> None:
        self.model = model
        self.reactor = default_reactor(reactor)
        self.timeout = timeout
        self.gather = gather or tracing.gather

    def instances(self) -> list[Any]:
        return [state.instance for state in self.model.instances.values()]

    async def trace(self, request_id: str) -> dict[str, Any] | None:
        """
        The call tree of C{request_id}, or L{None} when no span of it is
        found anywhere.

        @raise TraceError: for a request id that cannot be one.
        """
        if not request_id or len(request_id) > 256:
            raise TraceError("a request id is 1 to 256 characters")
        found = await self.gather(
            self.reactor, self.instances(), {"request_id": request_id}, self.timeout
        )
        roots = tracing.build_tree(found.spans)
        if not roots:
            return None
        return {
            "ok": True,
            "request_id": request_id,
            "calls": tracing.tree_json(roots),
            "spans": len(found.spans),
            "errors": list(found.errors),
        }

    async def slow(self, args: dict[str, str]) -> dict[str, Any]:
        """
        The slow list.

        @raise TraceError: for a bad C{limit} or C{since}.
        """
        raw = args.get("limit") or str(DEFAULT_SLOW)
        try:
            limit = int(raw)
        except ValueError:
            raise TraceError(f"limit must be a whole number, not {raw!r}") from None
        if not 1 <= limit <= MAX_SLOW:
            raise TraceError(f"limit must be 1..{MAX_SLOW}, not {limit}")
        since = parse_window(args["since"]) if args.get("since") else DEFAULT_SINCE
        params: dict[str, Any] = {"slowest": limit, "since": since}
        if args.get("service"):
            params["service"] = args["service"]
        found = await self.gather(self.reactor, self.instances(), params, self.timeout)
        return {
            "ok": True,
            "calls": [slow_entry(span) for span in found.spans],
            "errors": list(found.errors),
        }


__all__ = ["DEFAULT_SLOW", "MAX_SLOW", "DashboardTraces", "TraceError", "parse_window"]
