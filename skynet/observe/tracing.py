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

Instances serve their ring as the remote method C{SkynetSpans
{request_id}} (L{SPANS_METHOD}); L{collect} asks every instance of the
registry and L{build_tree} joins the spans into the call tree.
"""

from __future__ import annotations

import contextvars
import itertools
import os
import uuid as _uuid
from collections import deque
from collections.abc import Iterable
from typing import Any

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


def spans_method(request_info: Any, params: Any) -> dict[str, Any]:
    """
    The remote method C{SkynetSpans {request_id}}: this process's spans of
    that request.
    """
    request_id = params.get("request_id") if isinstance(params, dict) else None
    if not isinstance(request_id, str) or not request_id:
        from skynet.errors import ServiceError

        raise ServiceError("SkynetSpans needs a string 'request_id'")
    return {"spans": RING.find(request_id)}


def find_method(name: str) -> Any:
    """
    L{spans_method} for C{SkynetSpans}, for a host's C{find_method}; L{None}
    for any other name.
    """
    return spans_method if name == SPANS_METHOD else None


async def collect(shell: Any, request_id: str, timeout: float = 5.0) -> list[dict[str, Any]]:
    """
    The spans of C{request_id} from every registered instance (and this
    process), each server span labelled with its instance's C{host:port}.
    """
    from skynet.admin import call_instance
    from skynet.registry.base import Query

    instances = await shell.registry.query(Query())
    spans = list(RING.find(request_id))
    seen = {s["id"] for s in spans}
    for instance in instances:
        if instance.name == "SkynetDaemon" or not instance.port:
            continue
        try:
            answer = await call_instance(
                shell.reactor,
                instance,
                SPANS_METHOD,
                {"request_id": request_id},
                timeout,
                connector=getattr(shell.client, "connector", None),  # TLS when the shell has it
            )
        except Exception:
            continue  # a Go instance, or one that is gone: it has none for us
        for span in answer.get("spans") or []:
            if not isinstance(span, dict) or span.get("id") in seen:
                continue
            seen.add(span["id"])
            if span.get("kind") == "server":
                span["address"] = f"{instance.host}:{instance.port}"
            spans.append(span)
    return spans


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


# The sky commands


async def run_trace_command(shell: Any, filters: Any, inv: Any, io: Any) -> int:
    """
    C{call --trace SERVICE METHOD [JSON]}: the call, its result, then its
    call tree; C{trace REQUEST_ID}: the tree of an earlier request.
    """
    import json

    from twisted.internet.task import deferLater

    from skynet.protocol import RequestInfo, new_request_id
    from skynet.shell import ShellError, UsageError, to_json

    if inv.command == "trace":
        if len(inv.args) != 1:
            raise UsageError("Usage: trace REQUEST_ID [--json]")
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
