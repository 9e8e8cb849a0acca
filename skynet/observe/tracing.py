"""
Spans of every call, on both sides, and the call tree of one request.

A client span is recorded by L{client_finish} (hooked into
L{skynet.client._Call._finish}), a server span by the method wrapper of
L{skynet.observe.histogram.MethodStats}.  Both go into a bounded ring per
process (L{RING}; C{$SKYNET_TRACE_RING} spans, default 4096; C{0} turns
recording off, as does C{$SKYNET_TRACE=0}).

Links:
  - a client span made while a remote method runs has that method's server
    span as its parent (same process, through the context variable the
    wrapper sets);
  - a server span's parent is the client span of the same request id that
    sent to this instance over the connection whose local address is the
    server's peer address; several such calls are paired in the order they
    started (one connection carries its requests in order).  No field is
    added to the wire: Go peers see the same bytes.

A ring answers two questions (L{SpansQuery}): the spans of one request,
or the slowest recent calls.  Each instance answers them on its admin
listener (C{Admin.Spans}, L{admin_spans}) and on its service port
(C{SkynetSpans}, L{SPANS_METHOD}); each host's daemon answers for its
children (C{SearchSpans}, L{host_spans}).  L{gather} asks every host's
daemon and then only the instances no daemon answered for; L{build_tree}
joins the spans into the call tree.
"""

from __future__ import annotations

import contextvars
import heapq
import itertools
import os
import uuid as _uuid
from collections import deque
from collections.abc import Iterable
from typing import Any, cast

import attr

#: The remote method an instance serves its spans with.
SPANS_METHOD = "SkynetSpans"


def _ring_size(environ: dict[str, str] | os._Environ[str] = os.environ) -> int:
    raw = environ.get("SKYNET_TRACE_RING", "4096")
    try:
        size = int(raw)
    except ValueError:
        raise ValueError(f"SKYNET_TRACE_RING must be an integer, not {raw!r}") from None
    if size < 0:
        raise ValueError(f"SKYNET_TRACE_RING must be >= 0, not {size}")
    if environ.get("SKYNET_TRACE", "1") in ("0", "off", "no", "false"):
        return 0
    return size


class Ring:
    """
    The last C{size} finished spans of this process, kept raw (tuples, see
    L{_server_doc} and L{_client_doc}) so that recording stays cheap; they
    are made into dicts only when asked for.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.spans: deque[tuple[Any, ...]] = deque(maxlen=max(size, 1))
        self.add = self.spans.append

    def sink(self, sink: Any) -> None:
        """
        (otlp hook) Also hand every span added from now on to C{sink}, a
        callable (L{skynet.observe.otlp}); L{None} stops it.  Without a sink
        C{add} is the bare C{append} it always was.
        """
        append = self.spans.append
        if sink is None:
            self.add = append
            return

        def add(span: tuple[Any, ...]) -> None:
            append(span)
            sink(span)

        self.add = add

    def find(self, request_id: str) -> list[dict[str, Any]]:
        return [_doc(s) for s in self.spans if s[2] == request_id]


#: This process's ring, and whether spans are recorded at all.
RING = Ring(_ring_size())
ENABLED = RING.size > 0

#: (request info, site, server span) of the request served in this
#: context, set around each remote method by the wrapper of
#: L{skynet.observe.histogram}.
serving: contextvars.ContextVar[tuple[Any, Any, Any] | None] = contextvars.ContextVar(
    "skynet_serving", default=None
)

_process = _uuid.uuid4().hex[:8]
_ids = itertools.count(1)
#: A new span id of this process (never 0).
next_id = _ids.__next__


def configure(size: int) -> None:
    """
    Replace the ring with one of C{size} spans (C{0}: record nothing).
    """
    global RING, ENABLED
    RING = Ring(size)
    ENABLED = size > 0


def _span_id(n: int) -> str:
    return f"{_process}-{n}" if n else ""


# Server side (called by the method wrapper of skynet.observe.histogram)

_SERVER, _CLIENT = 0, 1


def server_finish(
    span: int, info: Any, site: Any, started: float, elapsed: float, error: str | None
) -> None:
    """
    Record the server span C{span} (an id from L{next_id}) of a remote
    method of C{site}: one tuple, [kind, id, request id, site, peer, retry
    count, start, duration, error].
    """
    try:
        request_id = info.request_id
        peer = info.connection_address
        retry = info.retry_count
    except AttributeError:  # not a RequestInfo (a test's, or a caller's own)
        request_id = getattr(info, "request_id", "")
        peer = getattr(info, "connection_address", "")
        retry = getattr(info, "retry_count", 0)
    RING.add((_SERVER, span, request_id, site, peer, retry, started, elapsed, error))


def _server_doc(span: tuple[Any, ...]) -> dict[str, Any]:
    site = span[3]
    return {
        "kind": "server",
        "id": _span_id(span[1]),
        "request_id": span[2] or "",
        "service": site.service,
        "method": site.method,
        "uuid": site.uuid,
        "peer": span[4] or "",
        "retry": span[5] or 0,
        "start": span[6],
        "duration": span[7],
        "outcome": "ok" if span[8] is None else f"error: {span[8]}",
    }


# Client side (called by skynet.client._Call._finish)


def _local_address(connection: Any) -> str:
    """
    The local address of a client connection, found once and kept on it.
    """
    try:
        return connection.trace_local  # type: ignore[no-any-return]
    except AttributeError:
        pass
    try:
        host = connection.transport.getHost()
        address = f"{host.host}:{host.port}"
    except Exception:
        address = ""
    try:
        connection.trace_local = address
    except AttributeError:  # a connection with slots: found again next time
        pass
    return address


def client_finish(call: Any, error: Any, attempt: Any) -> None:
    """
    Record the client span of C{call} (a L{skynet.client._Call} whose
    C{trace} is its parent span id), which ends now: C{error} L{None} if it
    succeeded, through C{attempt} if given.

    One tuple, not the call (its payload): [kind, id, request id, service,
    method, start, duration, error, parent id, attempts, tried, local
    addresses of the connections of the attempts still running].
    """
    # Kept lean (about 0.7 us): this runs at the end of every call.
    outstanding = call.outstanding
    connection = None if attempt is None else attempt.connection
    if outstanding:
        connections = [a.connection for a in outstanding if a.connection is not None]
        if connection is not None:
            connections.append(connection)
        local = tuple(_local_address(c) for c in connections)
    elif connection is not None:
        try:
            local = (connection.trace_local,)
        except AttributeError:
            local = (_local_address(connection),)
    else:
        local = ()
    service = call.service
    started = call.started
    RING.add(
        (
            _CLIENT,
            next_id(),
            call.info.request_id,
            service,
            call.method,
            started,
            service.client.reactor.seconds() - started,
            None if error is None else str(error),
            call.trace,
            call.attempts,
            call.tried,  # a set no longer changed: the call is over
            local,
        )
    )


def _client_doc(span: tuple[Any, ...]) -> dict[str, Any]:
    service, tried = span[3], span[10]
    handles = [service.handles.get(u) for u in tried]
    return {
        "kind": "client",
        "id": _span_id(span[1]),
        "parent": _span_id(span[8]),
        "request_id": span[2],
        "service": service.query.service,
        "method": span[4],
        "start": span[5],
        "duration": span[6],
        "outcome": "ok" if span[7] is None else f"error: {span[7]}",
        "attempts": span[9],
        "tried": list(tried),
        "local": list(span[11]),
        "targets": [f"{h.instance.host}:{h.instance.port}" for h in handles if h is not None],
    }


def _doc(span: tuple[Any, ...]) -> dict[str, Any]:
    return _server_doc(span) if span[0] == _SERVER else _client_doc(span)


# Serving and collecting

#: The admin listener's call for the same questions (L{admin_spans}).
ADMIN_SPANS = "Admin.Spans"

#: Most spans one C{slowest} question is answered with.
MAX_SLOWEST = 1000

#: Seconds a daemon waits for one child's admin listener.
CHILD_TIMEOUT = 2.0


@attr.s(frozen=True, auto_attribs=True)
class SpansQuery:
    """
    One question to span rings, in either of two forms: C{{request_id}},
    every span of that request; or C{{slowest: N[, since: S][, service:
    NAME]}}, the C{N} slowest calls (root or server spans, at most one per
    request: its longest), optionally only those that started in the last
    C{S} seconds, only calls of service C{NAME}.
    """

    request_id: str | None = None
    slowest: int = 0
    since: float | None = None
    service: str | None = None

    @classmethod
    def from_bson(cls, params: Any) -> SpansQuery:
        """
        @raise ValueError: naming what is wrong with C{params}.
        """
        if not isinstance(params, dict):
            raise ValueError("the parameters must be a document")
        request_id, slowest, since, service = (
            params.get("request_id"),
            params.get("slowest"),
            params.get("since"),
            params.get("service"),
        )
        if request_id is not None:
            if slowest is not None or since is not None or service is not None:
                raise ValueError(
                    "give either 'request_id' or 'slowest' (and 'since', 'service'), not both"
                )
            if not isinstance(request_id, str) or not request_id:
                raise ValueError("'request_id' must be a non-empty string")
            return cls(request_id=request_id)
        if slowest is None:
            raise ValueError("needs a string 'request_id' or a number 'slowest'")
        if isinstance(slowest, bool) or not isinstance(slowest, int):
            raise ValueError(f"'slowest' must be a whole number, not {slowest!r}")
        if not 1 <= slowest <= MAX_SLOWEST:
            raise ValueError(f"'slowest' must be 1..{MAX_SLOWEST}, not {slowest}")
        if since is not None:
            if isinstance(since, bool) or not isinstance(since, (int, float)):
                raise ValueError(f"'since' must be a number of seconds, not {since!r}")
            if not since > 0:
                raise ValueError(f"'since' must be more than 0 seconds, not {since}")
            since = float(since)
        if service is not None and (not isinstance(service, str) or not service):
            raise ValueError(f"'service' must be a non-empty string, not {service!r}")
        return cls(slowest=int(slowest), since=since, service=service)

    def to_bson(self) -> dict[str, Any]:
        if self.request_id is not None:
            return {"request_id": self.request_id}
        doc: dict[str, Any] = {"slowest": self.slowest}
        if self.since is not None:
            doc["since"] = self.since
        if self.service is not None:
            doc["service"] = self.service
        return doc


def slowest(
    limit: int,
    since: float | None = None,
    now: float | None = None,
    ring: Ring | None = None,
    service: str | None = None,
) -> list[dict[str, Any]]:
    """
    The C{limit} slowest calls in this process's ring, longest first: its
    server spans and its root client spans (those made outside any remote
    method), at most one per request id (its longest; spans without one
    cannot be traced and are left out).

    @param since: only spans that started in the last C{since} seconds
        before C{now} (default: the reactor's time, the clock spans are
        recorded on).
    @param service: only calls of this service.
    """
    ring = RING if ring is None else ring
    cutoff = None
    if since is not None:
        if now is None:
            from skynet.config import default_reactor

            now = default_reactor().seconds()
        cutoff = now - since
    best: dict[str, tuple[float, tuple[Any, ...]]] = {}
    for span in ring.spans:
        if span[0] == _SERVER:
            start, duration = span[6], span[7]
            if service is not None and span[3].service != service:
                continue
        elif span[8]:
            continue  # a call made while serving: the server span it is part of counts
        else:
            start, duration = span[5], span[6]
            if service is not None and span[3].query.service != service:
                continue
        request_id = span[2]
        if not request_id or (cutoff is not None and start < cutoff):
            continue
        known = best.get(request_id)
        if known is None or duration > known[0]:
            best[request_id] = (duration, span)
    top = heapq.nlargest(limit, best.values(), key=lambda pair: pair[0])
    return [_doc(span) for _, span in top]


def answer_query(query: SpansQuery, now: float | None = None) -> dict[str, Any]:
    """
    This process's answer to C{query}: C{{spans}}.
    """
    if query.request_id is not None:
        return {"spans": RING.find(query.request_id)}
    return {"spans": slowest(query.slowest, query.since, now, service=query.service)}


def spans_method(request_info: Any, params: Any) -> dict[str, Any]:
    """
    The remote method C{SkynetSpans {request_id}} or C{SkynetSpans
    {slowest[, since]}} (see L{SpansQuery}): this process's spans.
    """
    try:
        query = SpansQuery.from_bson(params)
    except ValueError as e:
        from skynet.errors import ServiceError

        raise ServiceError(f"{SPANS_METHOD}: {e}") from None
    return answer_query(query)


def admin_spans(params: Any) -> tuple[dict[str, Any], str]:
    """
    The admin listener's C{Admin.Spans}, the same questions as
    L{spans_method}: C{(answer, "")}, or C{({}, error)} for a bad one.
    """
    try:
        return answer_query(SpansQuery.from_bson(params)), ""
    except ValueError as e:
        return {}, f"{ADMIN_SPANS}: {e}"


def find_method(name: str) -> Any:
    """
    L{spans_method} for C{SkynetSpans}, for a host's C{find_method}; L{None}
    for any other name.
    """
    return spans_method if name == SPANS_METHOD else None


_NUMBER = (int, float)
#: What the tree reads of a span from another process, and its types.
_SPAN_FIELDS: dict[str, tuple[tuple[str, Any], ...]] = {
    "server": (("id", str), ("request_id", str), ("service", str), ("method", str),
               ("start", _NUMBER), ("duration", _NUMBER), ("outcome", str), ("uuid", str),
               ("peer", str), ("retry", int)),
    "client": (("id", str), ("request_id", str), ("service", str), ("method", str),
               ("start", _NUMBER), ("duration", _NUMBER), ("outcome", str), ("parent", str),
               ("attempts", int), ("tried", list), ("local", list), ("targets", list)),
}  # fmt: skip


def _sane(span: Any) -> bool:
    """
    Whether a span document from another process has every field the tree
    reads, of its type (a peer's bad answer must not break a trace).
    """
    if not isinstance(span, dict):
        return False
    fields = _SPAN_FIELDS.get(span.get("kind"))  # type: ignore[arg-type]
    if fields is None:
        return False
    for key, kind in fields:
        value = span.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            return False
    return all(
        isinstance(x, str) for key in ("tried", "local", "targets") for x in span.get(key, ())
    )


def _labelled(spans: Any, instance: Any) -> tuple[list[dict[str, Any]], int]:
    """
    The span documents of one instance's answer, each server span labelled
    with the instance's C{host:port} (what the tree shows), and how many
    were left out as malformed.

    @raise ValueError: for an answer that holds no list of spans.
    """
    if not isinstance(spans, list):
        raise ValueError(f"bad spans in the answer: {spans!r:.200}")
    out = []
    for span in spans:
        if not _sane(span):
            continue
        if span["kind"] == "server":
            span["address"] = f"{instance.host}:{instance.port}"
        out.append(span)
    return out, len(spans) - len(out)


def _dropped(what: str, count: int) -> str:
    return f"{what}: {count} malformed span(s) left out"


def merge(query: SpansQuery, spans: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """
    Spans of several answers as one: each span once (the first of an id);
    for a C{slowest} question, the longest per request, longest first, at
    most C{query.slowest}.
    """
    seen: set[str] = set()
    unique = []
    for span in spans:
        if span["id"] not in seen:
            seen.add(span["id"])
            unique.append(span)
    if query.request_id is not None:
        return unique
    best: dict[str, dict[str, Any]] = {}
    for span in unique:
        request_id, duration = span.get("request_id"), _duration(span)
        if not isinstance(request_id, str) or not request_id:
            continue
        if request_id not in best or duration > _duration(best[request_id]):
            best[request_id] = span
    return heapq.nlargest(query.slowest, best.values(), key=_duration)


def _duration(span: dict[str, Any]) -> float:
    value = span.get("duration")
    return float(value) if isinstance(value, (int, float)) else 0.0


async def host_spans(
    reactor: Any, instances: Iterable[Any], params: Any, admin: Any,
    timeout: float = CHILD_TIMEOUT,
) -> dict[str, Any]:  # fmt: skip
    """
    A daemon's C{SearchSpans} (L{skynet.control.SEARCH_SPANS}): the
    question of L{SpansQuery} put to the admin listener of each of
    C{instances} (its children in the registry) at once, the answers
    merged.

    @param admin: C{admin(address, servicemethod, params)} -> Deferred of
        the answer's body (L{skynet.admin.admin_call}).
    @return: C{{spans, instances, errors}}: the merged spans (server spans
        labelled with their instance's C{host:port}), the uuids of the
        instances that answered, and one line per instance that did not.
    @raise ServiceError: for a bad question.
    """
    from twisted.internet.defer import DeferredList

    from skynet.control import SEARCH_SPANS
    from skynet.errors import ServiceError

    try:
        query = SpansQuery.from_bson(params)
    except ValueError as e:
        raise ServiceError(f"{SEARCH_SPANS}: {e}") from None
    asked = query.to_bson()
    targets = [i for i in instances if i.admin is not None]

    from skynet.admin import with_timeout

    results = await DeferredList(
        [with_timeout(reactor, admin(i.admin, ADMIN_SPANS, asked), timeout) for i in targets],
        consumeErrors=True,
    )
    spans: list[dict[str, Any]] = []
    errors: list[str] = []
    answered = _take_answers(
        targets, results, spans, errors, lambda i: f"{i.name} {i.uuid} (admin {i.admin})"
    )
    return {"spans": merge(query, spans), "instances": answered, "errors": errors}


def _take_answers(instances: list[Any], results: list[Any], spans: list[dict[str, Any]],
                  errors: list[str], describe: Any) -> list[str]:  # fmt: skip
    """
    Add the checked, labelled spans of each instance's answer (C{results}
    of a C{DeferredList}, in the order of C{instances}) to C{spans}, and a
    line to C{errors} for each that failed or sent bad spans; return the
    uuids of those that answered.
    """
    answered: list[str] = []
    for instance, (ok, value) in zip(instances, results, strict=True):
        value = cast(Any, value)  # an answer, or a Failure when not ok
        what = describe(instance)
        if not ok:  # a Go instance, or one that is gone: it has none for us
            errors.append(f"{what}: {value.getErrorMessage() or value.type.__name__}")
            continue
        try:
            good, dropped = _labelled(value.get("spans") if isinstance(value, dict) else None,
                                      instance)  # fmt: skip
        except ValueError as e:
            errors.append(f"{what}: {e}")
            continue
        spans.extend(good)
        if dropped:
            errors.append(_dropped(what, dropped))
        answered.append(instance.uuid)
    return answered


@attr.s(frozen=True, auto_attribs=True)
class Gathered:
    """
    The spans of a question, from every host (L{gather}).

    @ivar spans: the merged spans (L{merge}).
    @ivar errors: one line for each instance (or daemon) that could not be
        asked, or answered badly.
    """

    spans: list[dict[str, Any]]
    errors: list[str]


async def gather(
    reactor: Any,
    instances: Iterable[Any],
    params: Any,
    timeout: float = 5.0,
    connector: Any = None,
    admin: Any = None,
) -> Gathered:
    """
    Put a L{SpansQuery} to the whole cluster: one C{SearchSpans} call per
    host's daemon (registered C{SkynetDaemon}s among C{instances}, asked
    at once by L{skynet.observe.logsearch.fan_out}), then C{SkynetSpans}
    to each instance that no daemon answered for (not supervised, its
    daemon unreachable or older, its admin listener off), and
    C{Admin.Spans} to those of them that refuse it but have an admin
    listener on their address (an unregistered instance refuses new
    clients); and this
    process's own ring.

    @param instances: the registry's instances.
    @param connector: how to reach an instance (a client's C{connector}:
        TLS when it has it; default TCP).
    @param admin: C{admin(address, servicemethod, params)} -> Deferred of
        the answer's body (default L{skynet.admin.admin_call}).
    @raise ValueError: for a bad question.
    """
    from functools import partial

    from twisted.internet.defer import Deferred, DeferredList

    from skynet.admin import admin_call, call_instance
    from skynet.control import DAEMON_SERVICE, SEARCH_SPANS
    from skynet.observe.logsearch import fan_out

    query = SpansQuery.from_bson(params)
    asked = query.to_bson()
    instances = list(instances)
    daemons = [i for i in instances if i.name == DAEMON_SERVICE and i.registered and i.port]
    covered: set[str] = set()

    async def ask(daemon: Any, p: dict[str, Any]) -> dict[str, Any]:
        answer = await call_instance(reactor, daemon, SEARCH_SPANS, p, timeout, connector)
        found = answer.get("spans") if isinstance(answer, dict) else None
        if not isinstance(found, list):
            raise ValueError(f"bad answer to {SEARCH_SPANS}: {answer!r:.200}")
        covered.update(u for u in answer.get("instances") or () if isinstance(u, str))
        # The shape fan_out merges (it keeps the order: spans have no "time").
        return {"events": found}

    spans: list[dict[str, Any]] = []
    errors: list[str] = []
    if daemons:
        answered = await fan_out(ask, daemons, asked, {d.uuid: None for d in daemons})
        by_host: dict[str, int] = {}
        for span, host in answered.events:
            if _sane(span):
                spans.append(span)
            else:
                by_host[host] = by_host.get(host, 0) + 1
        errors.extend(_dropped(f"the daemon of host {h}", n) for h, n in sorted(by_host.items()))
    rest = [i for i in instances
            if i.name != DAEMON_SERVICE and i.port and i.uuid not in covered]  # fmt: skip
    admin = admin or partial(admin_call, reactor, timeout=timeout)

    async def direct(instance: Any) -> Any:
        try:
            return await call_instance(reactor, instance, SPANS_METHOD, asked, timeout, connector)
        except Exception as e:
            # Only an admin listener on the instance's own address: a
            # loopback one advertised by another host is not its.
            if instance.admin is None or instance.admin.ip_address != instance.host:
                raise
            try:
                return await admin(instance.admin, ADMIN_SPANS, asked)
            except Exception as again:
                raise ConnectionError(f"{e}; admin {instance.admin}: {again}") from None

    results = await DeferredList(
        [Deferred.fromCoroutine(direct(i)) for i in rest], consumeErrors=True
    )
    _take_answers(rest, results, spans, errors,
                  lambda i: f"{i.name} {i.uuid} ({i.host}:{i.port})")  # fmt: skip
    # Last, so that the labelled copies of spans recorded here come first.
    spans.extend(answer_query(query)["spans"])
    return Gathered(merge(query, spans), errors)


async def collect(shell: Any, request_id: str, timeout: float = 5.0) -> list[dict[str, Any]]:
    """
    The spans of C{request_id} from every host (L{gather}), each server
    span labelled with its instance's C{host:port}.
    """
    from skynet.registry.base import Query

    instances = await shell.registry.query(Query())
    connector = getattr(shell.client, "connector", None)  # TLS when the shell has it
    found = await gather(shell.reactor, instances, {"request_id": request_id}, timeout, connector)
    return found.spans


# The tree


def build_tree(spans: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """
    Join spans into call nodes: each node is one call, with its client span
    (if recorded), its server span(s) (one per attempt that arrived), and
    its children.  Returns the roots.
    """
    spans = list(spans)
    clients = sorted((s for s in spans if s.get("kind") == "client"), key=lambda s: s["start"])
    servers = sorted((s for s in spans if s.get("kind") == "server"), key=lambda s: s["start"])
    nodes: dict[str, dict[str, Any]] = {}
    for c in clients:
        nodes[c["id"]] = {"client": c, "servers": [], "children": []}
    # Pair servers with the client calls that sent them.
    taken: dict[str, int] = {}
    server_parent: dict[str, str] = {}
    for s in servers:
        for c in clients:
            if (
                c["request_id"] == s["request_id"]
                and s.get("uuid") in c.get("tried", ())
                and s.get("peer") in c.get("local", ())
                and taken.get(c["id"], 0) < max(c.get("attempts", 1), 1)
            ):
                taken[c["id"]] = taken.get(c["id"], 0) + 1
                server_parent[s["id"]] = c["id"]
                break
    roots: list[dict[str, Any]] = []
    server_node: dict[str, dict[str, Any]] = {}
    for s in servers:
        cid = server_parent.get(s["id"])
        if cid is not None:
            nodes[cid]["servers"].append(s)
            server_node[s["id"]] = nodes[cid]
        else:
            orphan: dict[str, Any] = {"client": None, "servers": [s], "children": []}
            server_node[s["id"]] = orphan
            roots.append(orphan)
    for c in clients:
        parent = server_node.get(c.get("parent") or "")
        if parent is not None:
            parent["children"].append(nodes[c["id"]])
        else:
            roots.append(nodes[c["id"]])
    for node in _walk(roots):
        node["children"].sort(key=_node_start)
    roots.sort(key=_node_start)
    return roots


def _node_start(node: dict[str, Any]) -> float:
    if node["client"] is not None:
        return float(node["client"]["start"])
    return float(node["servers"][0]["start"])


def _walk(nodes: list[dict[str, Any]]) -> Iterable[dict[str, Any]]:
    for node in nodes:
        yield node
        yield from _walk(node["children"])


def count_calls(roots: list[dict[str, Any]]) -> int:
    return sum(1 for _ in _walk(roots))


def tree_json(roots: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """
    The tree as plain JSON: one object per call.
    """
    origin = min((_node_start(n) for n in roots), default=0.0)

    def one(node: dict[str, Any]) -> dict[str, Any]:
        c = node["client"]
        s = node["servers"][-1] if node["servers"] else None
        first = c or s
        assert first is not None
        return {
            "service": first["service"],
            "method": first["method"],
            "address": (s or {}).get("address") or ",".join((c or {}).get("targets", [])),
            "start": _node_start(node) - origin,
            "duration": first.get("duration"),
            "server_duration": s.get("duration") if s else None,
            "outcome": first.get("outcome"),
            "attempts": (c or {}).get("attempts", 1),
            "retry": s.get("retry", 0) if s else 0,
            "client_span": c["id"] if c else None,
            "server_spans": [x["id"] for x in node["servers"]],
            # Each attempt that arrived (a retry or a hedge makes several).
            "arrived": [
                {
                    "address": x.get("address") or "",
                    "start": float(x["start"]) - origin,
                    "duration": x.get("duration"),
                    "outcome": x.get("outcome"),
                    "retry": x.get("retry", 0),
                }
                for x in node["servers"]
            ],
            "children": [one(n) for n in node["children"]],
        }

    return [one(n) for n in roots]


def format_tree(roots: list[dict[str, Any]]) -> list[str]:
    """
    The tree as text, one line per call:
    C{service.method host:port +start duration outcome [retries]}.
    """
    lines: list[str] = []

    def ms(value: Any) -> str:
        return "?" if value is None else f"{value * 1000:.2f}ms"

    def one(node: dict[str, Any], depth: int) -> None:
        retries = max(node["attempts"] - 1, 0) + int(node["retry"] or 0)
        lines.append(
            f"{'  ' * depth}{node['service']}.{node['method']} {node['address'] or '?'}"
            f" +{ms(node['start'])} {ms(node['duration'])} {node['outcome']}"
            + (f" retries={retries}" if retries else "")
        )
        for child in node["children"]:
            one(child, depth + 1)

    for root in tree_json(roots):
        one(root, 0)
    return lines


# The slow calls


def parse_window(value: str) -> float:
    """
    C{30s}, C{15m}, C{2h}, C{1d} (L{skynet.observe.logsearch.parse_duration})
    or a number of seconds, as seconds.

    @raise ValueError: for anything else.
    """
    from skynet.observe.logsearch import parse_duration

    seconds = parse_duration(value)
    if seconds is None:
        try:
            seconds = float(value.strip())
        except ValueError:
            raise ValueError(f"since must be like 30s, 15m, 2h or 1d, not {value!r}") from None
    if not 0 < seconds < float("inf"):
        raise ValueError(f"since must be more than 0 seconds, not {value!r}")
    return seconds


def slow_entry(span: dict[str, Any]) -> dict[str, Any]:
    """
    One slow call, from a span of a C{slowest} answer: C{request_id,
    service, method, address, start, duration, outcome, kind}.
    """
    address = span.get("address")
    if not address and span.get("kind") == "client":
        address = ",".join(str(t) for t in span.get("targets") or [])
    return {
        "request_id": span.get("request_id", ""),
        "service": span.get("service", ""),
        "method": span.get("method", ""),
        "address": address or "",
        "start": span.get("start"),
        "duration": span.get("duration"),
        "outcome": span.get("outcome", ""),
        "kind": span.get("kind", ""),
    }


def format_slow(entries: list[dict[str, Any]]) -> list[str]:
    """
    Slow calls as text, one line each: C{duration service.method host:port
    outcome request_id}.
    """
    lines = []
    for e in entries:
        duration = e["duration"]
        took = "?" if not isinstance(duration, (int, float)) else f"{duration * 1000:.2f}ms"
        lines.append(f"{took:>11} {e['service']}.{e['method']} {e['address'] or '?'}"
                     f" {e['outcome']} {e['request_id']}")  # fmt: skip
    return lines


# The sky commands


#: The slow list's length when C{--slowest} is not given a number.
DEFAULT_SLOWEST = 20


async def run_trace_command(
    shell: Any, filters: Any, inv: Any, io: Any, options: dict[str, Any] | None = None
) -> int:
    """
    C{call --trace SERVICE METHOD [JSON]}: the call, its result, then its
    call tree; C{trace REQUEST_ID}: the tree of an earlier request;
    C{trace --slowest N [--since 1h]}: the slowest recent calls of the
    cluster (of the filters' service, if any), one per request, longest
    first.
    """
    import json

    from twisted.internet.task import deferLater

    from skynet.protocol import RequestInfo, new_request_id
    from skynet.shell import ShellError, UsageError, to_json

    options = options or {}
    if inv.command == "trace" and ("slowest" in options or "since" in options):
        if inv.args:
            raise UsageError("Usage: trace --slowest N [--since 1h] [--json]")
        return await _run_slowest(shell, filters, inv, options, io)
    if inv.command == "trace":
        if len(inv.args) != 1:
            raise UsageError("Usage: trace REQUEST_ID [--json] | trace --slowest N [--since 1h]")
        request_id = inv.args[0]
    else:
        if len(inv.args) not in (2, 3):
            raise UsageError('Usage: call --trace SERVICE METHOD [\'{"json": "params"}\']')
        name, method = inv.args[0], inv.args[1]
        params: Any = {}
        if len(inv.args) == 3:
            try:
                params = json.loads(inv.args[2])
            except ValueError as e:
                raise UsageError(f"the parameters are not JSON: {e}") from None
            if not isinstance(params, dict):
                raise UsageError("the parameters must be a JSON object, like '{\"key\": 1}'")
        service = shell.client.service(
            name, version=filters.version, region=filters.region, host=filters.host
        )
        request_id = new_request_id()
        try:
            result = await service.call(
                method, params, RequestInfo(request_id), timeout=shell.call_timeout
            )
        except Exception as e:
            raise ShellError(f"{name}.{method} failed: {e} (request {request_id})") from None
        io.out(to_json(result, pretty=not inv.json))
        # Let the root's client span be recorded (its callback runs after ours).
        await deferLater(shell.reactor, 0, lambda: None)
    roots = build_tree(await collect(shell, request_id))
    if not roots:
        raise ShellError(f"no spans of request {request_id} found")
    if inv.json:
        io.out(to_json({"request_id": request_id, "calls": tree_json(roots)}))
    else:
        io.out(f"request {request_id}: {count_calls(roots)} call(s)")
        for line in format_tree(roots):
            io.out(line)
    return 0


async def _run_slowest(shell: Any, filters: Any, inv: Any, options: dict[str, Any], io: Any) -> int:
    from skynet.registry.base import Query
    from skynet.shell import ShellError, UsageError, to_json

    raw = options.get("slowest", str(DEFAULT_SLOWEST))
    try:
        limit = int(raw)
    except ValueError:
        raise UsageError(f"--slowest must be a whole number, not {raw!r}") from None
    params: dict[str, Any] = {"slowest": limit}
    if getattr(filters, "service", None):
        params["service"] = filters.service
    if "since" in options:
        try:
            params["since"] = parse_window(str(options["since"]))
        except ValueError as e:
            raise UsageError(f"--{e}") from None
    try:
        SpansQuery.from_bson(params)
    except ValueError as e:
        raise UsageError(f"trace --slowest: {e}") from None
    instances = await shell.registry.query(Query())
    connector = getattr(shell.client, "connector", None)
    found = await gather(shell.reactor, instances, params, getattr(shell, "timeout", 5.0),
                         connector)  # fmt: skip
    entries = [slow_entry(span) for span in found.spans]
    if inv.json:
        io.out(to_json({"calls": entries, "errors": found.errors}))
    elif not entries:
        raise ShellError("no calls recorded" + (" in that window" if "since" in params else ""))
    else:
        for line in format_slow(entries):
            io.out(line)
    return 0
