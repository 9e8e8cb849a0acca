"""
Spans exported to an OpenTelemetry collector: OTLP over HTTP, JSON encoding.

    twistd -n skynet-service --service examples.fibonacci:Fibonacci \\
        --otlp-endpoint http://127.0.0.1:4318 [--otlp-header K=V ...]

(or C{$SKYNET_OTLP_ENDPOINT}).  An L{OTLPExporter} sinks every span the
process records (L{skynet.observe.tracing.Ring.sink}) into a bounded queue,
and a C{LoopingCall} POSTs them in batches, as an
C{ExportTraceServiceRequest} in the OTLP JSON mapping, to C{/v1/traces}.
Nothing of this runs in the call path but one C{append}: when the queue is
full the oldest span is dropped and counted, and a collector that is down
or slow only delays export (back-off, one warning per outage).

Ids:
  - C{traceId} is the request id itself when it is a UUID (the 32 hex digits),
    else a hash of it: the spans of one request share a trace in every
    process, with no field added to the wire;
  - a span's C{spanId} is its ring id (L{skynet.observe.tracing}: 8 hex digits
    of the process, then the span number), so it names the same span as
    C{sky trace};
  - a client span's parent is the server span it was made in (same process);
  - a server span's parent is the client span of the other process that sent
    it.  Without a field on the wire neither side knows the other's id, so
    both derive one from what they share: the request id, the client end of
    the connection (the client's local address, the server's peer) and the
    ordinal of the answer among the answers of that request on that
    connection (answers leave the server and reach the client in one order).
    A client span gets this id when one connection is left in question at
    its end (one attempt, or a retry after the first one's connection was
    lost); a call hedged on several connections keeps its ring id.  The
    server span of an attempt that no client span names (hedged, or on a
    lost connection) then names a parent that no exported span has (or, on
    a connection reused by the same request, a sibling's).
"""

from __future__ import annotations

import hashlib
import json
import socket
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import attr
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from skynet.config import default_reactor
from skynet.observe import tracing

__all__ = [
    "OTLPExporter",
    "ExportingService",
    "Resource",
    "encode_spans",
    "parse_endpoint",
    "parse_header",
    "trace_id",
]

#: Seconds between flushes, spans per POST, spans queued at most.
DEFAULT_INTERVAL = 1.0
DEFAULT_BATCH_SIZE = 512
DEFAULT_QUEUE_SIZE = 8192
#: Seconds a POST may take; seconds to wait before the first retry, and at most.
DEFAULT_TIMEOUT = 10.0
DEFAULT_BACKOFF = 1.0
DEFAULT_MAX_BACKOFF = 30.0
#: Seconds a stop may spend sending what is queued.
DEFAULT_STOP_TIMEOUT = 5.0

#: Answers after which the same batch is sent again (the OTLP/HTTP spec's).
RETRYABLE = frozenset({429, 502, 503, 504})

_KIND_SERVER, _KIND_CLIENT = 2, 3
_STATUS_OK, _STATUS_ERROR = 1, 2


def parse_endpoint(url: str) -> str:
    """
    The traces URL of a collector: C{http[s]://host[:port][/path]}; with no
    path (or C{/}), the OTLP default C{/v1/traces} is added.

    @raise ValueError: with what is wrong.
    """
    try:
        parts = urlsplit(url.strip())
        port = parts.port  # raises on a bad port
    except ValueError as e:
        raise ValueError(f"bad OTLP endpoint {url!r}: {e}") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError(
            f"bad OTLP endpoint {url!r}: it must be an http:// or https:// URL, "
            "like http://127.0.0.1:4318"
        )
    if not parts.hostname:
        raise ValueError(f"bad OTLP endpoint {url!r}: no host")
    if port == 0:
        raise ValueError(f"bad OTLP endpoint {url!r}: port 0")
    path = parts.path if parts.path not in ("", "/") else "/v1/traces"
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


def parse_header(text: str) -> tuple[str, str]:
    """
    C{"Name=value"} as a header for the collector (C{Authorization=Bearer x}).

    @raise ValueError: when it is not C{Name=value} with a valid name.
    """
    name, sep, value = text.partition("=")
    name = name.strip()
    if not sep or not name:
        raise ValueError(f"an OTLP header must look like Name=value, not {text!r}")
    if any(c in name for c in ' \t:()<>@,;\\"/[]?={}') or not name.isascii():
        raise ValueError(f"{name!r} is not a valid HTTP header name")
    if "\r" in value or "\n" in value:
        raise ValueError(f"the value of header {name!r} has a line break")
    return name, value.strip()


@attr.frozen
class Resource:
    """
    The process the spans come from, as OTLP resource attributes.
    """

    service_name: str
    service_version: str = ""
    instance_id: str = ""
    host_name: str = attr.field(factory=socket.gethostname)

    def to_otlp(self) -> dict[str, Any]:
        attributes = [_attribute("service.name", self.service_name)]
        if self.service_version:
            attributes.append(_attribute("service.version", self.service_version))
        if self.instance_id:
            attributes.append(_attribute("service.instance.id", self.instance_id))
        if self.host_name:
            attributes.append(_attribute("host.name", self.host_name))
        return {"attributes": attributes}


# Encoding


def _attribute(key: str, value: Any) -> dict[str, Any]:
    if isinstance(value, bool):
        return {"key": key, "value": {"boolValue": value}}
    if isinstance(value, int):
        return {"key": key, "value": {"intValue": str(value)}}  # int64: a string
    if isinstance(value, (list, tuple)):
        return {
            "key": key,
            "value": {"arrayValue": {"values": [{"stringValue": str(v)} for v in value]}},
        }
    return {"key": key, "value": {"stringValue": str(value)}}


def _hash_hex(text: str, digits: int) -> str:
    value = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:digits]
    return value if int(value, 16) else "1".rjust(digits, "0")  # all-zero is invalid


def trace_id(request_id: str) -> str:
    """
    The OTLP trace id of a request: its UUID as 32 hex digits, or a hash of
    any other (non-empty) request id, so that every process agrees.
    """
    digits = request_id.replace("-", "").lower()
    if len(digits) == 32 and all(c in "0123456789abcdef" for c in digits) and int(digits, 16):
        return digits
    return _hash_hex("skynet-request:" + request_id, 32)


def _span_id(number: int) -> str:
    # The ring id "<8 hex of the process>-<n>" as 16 hex digits.
    if 0 < number < 1 << 32:
        return f"{tracing._process}{number:08x}"
    return _hash_hex(f"skynet-span:{tracing._process}-{number}", 16)


def _nanos(seconds: float) -> str:
    return str(int(round(seconds * 1e9)))


class Linker:
    """
    The ids shared by a client span and the server span it caused (see the
    module docstring): C{(request id, client end of the connection, n)}
    hashed, n counting the answers of that request on that connection in the
    order this process saw them.  The counters are kept for the last
    C{size} pairs.
    """

    def __init__(self, size: int = 65536) -> None:
        self.size = size
        self.counts: OrderedDict[tuple[str, str, str], int] = OrderedDict()

    def next(self, side: str, request_id: str, address: str) -> str:
        key = (side, request_id, address)
        counts = self.counts
        n = counts.pop(key, 0)
        counts[key] = n + 1
        if len(counts) > self.size:
            counts.popitem(last=False)
        return _hash_hex(f"skynet-link:{request_id}\0{address}\0{n}", 16)


def _status(error: str | None) -> dict[str, Any]:
    if error is None:
        return {"code": _STATUS_OK}
    return {"code": _STATUS_ERROR, "message": error}


def _span(
    number: int, span_id: str, request_id: str, name: str, kind: int, started: float,
    duration: float, error: str | None, attributes: list[dict[str, Any]],
) -> dict[str, Any]:  # fmt: skip
    return {
        "traceId": trace_id(request_id) if request_id else _hash_hex(f"span:{number}", 32),
        "spanId": span_id,
        "name": name,
        "kind": kind,
        "startTimeUnixNano": _nanos(started),
        "endTimeUnixNano": _nanos(started + duration),
        "attributes": [
            _attribute("skynet.request_id", request_id),
            _attribute("skynet.span", tracing._span_id(number)),
            *attributes,
            _attribute("skynet.outcome", "ok" if error is None else f"error: {error}"),
        ],
        "status": _status(error),
    }


def _server_span(span: tuple[Any, ...], linker: Linker) -> dict[str, Any]:
    _, number, request_id, site, peer, retry, started, duration, error = span[:9]
    request_id = request_id or ""
    attributes = [
        _attribute("skynet.uuid", site.uuid),
        _attribute("net.peer", peer or ""),
        _attribute("skynet.retry", int(retry or 0)),
    ]
    doc = _span(number, _span_id(number), request_id, f"{site.service}.{site.method}",
                _KIND_SERVER, started, duration, error, attributes)  # fmt: skip
    if request_id and peer:
        doc["parentSpanId"] = linker.next("server", request_id, peer)
    return doc


def _client_span(span: tuple[Any, ...], linker: Linker) -> dict[str, Any]:
    _, number, request_id, service, method, started, duration, error = span[:8]
    parent, attempts, tried, local = span[8:12]
    request_id = request_id or ""
    handles = [service.handles.get(u) for u in tried]
    targets = [f"{h.instance.host}:{h.instance.port}" for h in handles if h is not None]
    if request_id and len(local) == 1 and local[0]:
        span_id = linker.next("client", request_id, local[0])
    else:
        span_id = _span_id(number)
    attributes = [
        _attribute("net.peer", ",".join(targets)),
        _attribute("skynet.attempts", int(attempts)),
        _attribute("skynet.tried", list(tried)),
    ]
    doc = _span(number, span_id, request_id, f"{service.query.service}.{method}",
                _KIND_CLIENT, started, duration, error, attributes)  # fmt: skip
    if parent:
        doc["parentSpanId"] = _span_id(parent)
    return doc


def encode_spans(
    spans: Iterable[tuple[Any, ...]], resource: Resource, linker: Linker | None = None
) -> dict[str, Any]:
    """
    Raw ring spans (L{skynet.observe.tracing}) as one OTLP JSON
    C{ExportTraceServiceRequest}.  Give the same L{Linker} to every call of
    one process, in the order the spans were recorded.
    """
    linker = linker or Linker()
    docs = []
    for span in spans:
        if span[0] == tracing._SERVER:
            docs.append(_server_span(span, linker))
        else:
            docs.append(_client_span(span, linker))
    return {
        "resourceSpans": [
            {
                "resource": resource.to_otlp(),
                "scopeSpans": [{"scope": {"name": "skynet"}, "spans": docs}],
            }
        ]
    }


# Sending


@implementer(IBodyProducer)
class _Body:
    def __init__(self, body: bytes) -> None:
        self.body = body
        self.length = len(body)

    def startProducing(self, consumer: Any) -> Deferred:
        consumer.write(self.body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class _Answer(Protocol):
    """
    Reads a collector's answer (its first 4 KiB: only for error messages).
    """

    def __init__(self, done: Deferred) -> None:
        self.done = done
        self.parts: list[bytes] = []
        self.size = 0

    def dataReceived(self, data: bytes) -> None:
        if self.size < 4096:
            self.parts.append(data[: 4096 - self.size])
            self.size += len(self.parts[-1])

    def connectionLost(self, reason: Any = None) -> None:
        if not self.done.called:
            self.done.callback(b"".join(self.parts))


class ExportFailed(Exception):
    """
    The collector did not take a batch; C{retry} says whether to send it again.
    """

    def __init__(self, message: str, retry: bool) -> None:
        super().__init__(message)
        self.retry = retry


class OTLPExporter(Service):
    """
    Sends the spans this process records to an OTLP/HTTP collector.

    Start it (it is an C{IService}) to install its sink in the ring; stop it
    to remove the sink and send what is queued (for at most C{stop_timeout}
    seconds).

    @param endpoint: the collector's traces URL (L{parse_endpoint}).
    @param resource: the L{Resource} of the spans, or a callable returning it
        (asked at each send: a service knows its port only once started).
    @param headers: extra headers of each POST (name, value).
    @param agent: an C{IAgent} (default: a C{twisted.web.client.Agent} on a
        persistent connection pool).
    @ivar dropped: spans lost: dropped from a full queue, or refused by the
        collector for good.
    @ivar sent: spans the collector took.
    @ivar failures: failed sends in a row (0 while the collector answers).
    """

    log = Logger()

    def __init__(
        self,
        endpoint: str,
        resource: Resource | Callable[[], Resource],
        *,
        headers: Sequence[tuple[str, str]] = (),
        reactor: Any = None,
        agent: Any = None,
        interval: float = DEFAULT_INTERVAL,
        batch_size: int = DEFAULT_BATCH_SIZE,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        timeout: float = DEFAULT_TIMEOUT,
        backoff: float = DEFAULT_BACKOFF,
        max_backoff: float = DEFAULT_MAX_BACKOFF,
        stop_timeout: float = DEFAULT_STOP_TIMEOUT,
    ) -> None:
        if batch_size < 1 or queue_size < 1:
            raise ValueError("batch_size and queue_size must be at least 1")
        self.endpoint = parse_endpoint(endpoint)
        self.resource = resource
        self.reactor = default_reactor(reactor)
        self._agent = agent
        self._pool: Any = None
        self.interval = interval
        self.batch_size = batch_size
        self.queue_size = queue_size
        self.timeout = timeout
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.stop_timeout = stop_timeout
        self.headers = Headers({b"Content-Type": [b"application/json"]})
        for name, value in headers:
            self.headers.addRawHeader(name.encode("ascii"), value.encode("utf-8"))
        self.queue: deque[tuple[Any, ...]] = deque()
        self.linker = Linker()
        self.dropped = 0
        self.sent = 0
        self.failures = 0
        self._pending: tuple[bytes, int] | None = None  # an encoded batch not yet taken
        self._sending: Deferred | None = None
        self._retry_at = 0.0
        self._soon: Any = None
        self._loop: LoopingCall | None = None
        self._ring: Any = None

    # The sink: the only part in the call path.

    def add(self, span: tuple[Any, ...]) -> None:
        """
        Queue one raw span (the ring's sink); drop the oldest when full.
        """
        queue = self.queue
        if len(queue) >= self.queue_size:
            queue.popleft()
            self.dropped += 1
        queue.append(span)
        if len(queue) >= self.batch_size and self._soon is None and self.running:
            self._soon = self.reactor.callLater(0, self._flush_soon)

    # IService

    def startService(self) -> None:
        super().startService()
        self._ring = tracing.RING
        self._ring.sink(self.add)
        self._loop = LoopingCall(self._tick)
        self._loop.clock = self.reactor
        self._loop.start(self.interval, now=False)

    def stopService(self) -> Deferred:
        super().stopService()
        if self._ring is not None:
            self._ring.sink(None)
            self._ring = None
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        if self._soon is not None and self._soon.active():
            self._soon.cancel()
        self._soon = None
        return Deferred.fromCoroutine(self._drain())

    async def _drain(self) -> None:
        deadline = self.reactor.seconds() + self.stop_timeout
        try:
            while self._pending is not None or self.queue:
                sending = self._sending or self._start_send()
                left = deadline - self.reactor.seconds()
                if left <= 0:
                    break
                if not await _within(self.reactor, sending, left):
                    break  # the collector is down or too slow: stop anyway
            left_over = len(self.queue) + (self._pending[1] if self._pending else 0)
            if left_over:
                self.log.warn(
                    "OTLP export to {endpoint} stopped with {count} span(s) not sent",
                    endpoint=self.endpoint,
                    count=left_over,
                )
        finally:
            if self._pool is not None:
                await self._pool.closeCachedConnections()

    # Flushing

    def _tick(self) -> None:
        self.flush()  # (not returned: the loop keeps its pace while a send waits)

    def _flush_soon(self) -> None:
        self._soon = None
        self.flush()

    def flush(self) -> Deferred | None:
        """
        Send a batch now unless one is being sent or the back-off says wait;
        the Deferred of the send (it fires C{True} if the collector took it),
        or L{None}.
        """
        if self._sending is not None or self.reactor.seconds() < self._retry_at:
            return None
        if self._pending is None and not self.queue:
            return None
        return self._start_send()

    def _start_send(self) -> Deferred:
        d = Deferred.fromCoroutine(self._send())
        if not d.called:  # (a fake agent answers at once)
            self._sending = d

            def sent(result: Any) -> Any:
                self._sending = None
                return result

            d.addBoth(sent)
        return d

    def _next_body(self) -> tuple[bytes, int]:
        if self._pending is None:
            queue = self.queue
            batch = [queue.popleft() for _ in range(min(len(queue), self.batch_size))]
            resource = self.resource() if callable(self.resource) else self.resource
            try:
                doc = encode_spans(batch, resource, self.linker)
                body = json.dumps(doc, separators=(",", ":")).encode("utf-8")
            except Exception:
                self.dropped += len(batch)
                raise
            self._pending = (body, len(batch))
        return self._pending

    async def _send(self) -> bool:
        try:
            body, count = self._next_body()
        except Exception:
            self.log.failure("cannot encode spans for OTLP export; the batch is dropped")
            self._pending = None
            return False
        try:
            await self._post(body)
        except ExportFailed as e:
            if not e.retry:
                self._pending = None
                self.dropped += count
                self.log.warn(
                    "OTLP collector {endpoint} refused {count} span(s): {error}",
                    endpoint=self.endpoint, count=count, error=str(e),
                )  # fmt: skip
                return False
            self._failed(str(e))
            return False
        except Exception as e:
            self._failed(_describe(e))
            return False
        self._pending = None
        self.sent += count
        if self.failures:
            self.log.info(
                "OTLP export to {endpoint} works again after {failures} failed "
                "attempt(s); {dropped} span(s) dropped so far",
                endpoint=self.endpoint, failures=self.failures, dropped=self.dropped,
            )  # fmt: skip
        self.failures = 0
        self._retry_at = 0.0
        if len(self.queue) >= self.batch_size and self.running and self._soon is None:
            self._soon = self.reactor.callLater(0, self._flush_soon)
        return True

    def _failed(self, error: str) -> None:
        self.failures += 1
        delay = min(self.max_backoff, self.backoff * 2 ** (self.failures - 1))
        self._retry_at = self.reactor.seconds() + delay
        if self.failures == 1:
            self.log.warn(
                "OTLP export to {endpoint} failed: {error}; spans stay queued (at most "
                "{queue_size}, the oldest dropped beyond) and are sent again with back-off",
                endpoint=self.endpoint, error=error, queue_size=self.queue_size,
            )  # fmt: skip
        else:
            self.log.debug(
                "OTLP export to {endpoint} failed again ({failures} in a row): {error}; "
                "next try in {delay:.1f} s",
                endpoint=self.endpoint, failures=self.failures, error=error, delay=delay,
            )  # fmt: skip

    def agent(self) -> Any:
        if self._agent is None:
            from twisted.web.client import Agent, HTTPConnectionPool

            self._pool = HTTPConnectionPool(self.reactor, persistent=True)
            self._pool.maxPersistentPerHost = 1
            quiet = _quiet_factory()
            if quiet is not None:  # no "Starting factory" line per try
                self._pool._factory = quiet
            self._agent = Agent(self.reactor, connectTimeout=self.timeout, pool=self._pool)
        return self._agent

    async def _post(self, body: bytes) -> None:
        d = self.agent().request(
            b"POST", self.endpoint.encode("ascii"), self.headers.copy(), _Body(body)
        )
        d.addTimeout(self.timeout, self.reactor)
        response = await d
        answer: Deferred = Deferred()
        response.deliverBody(_Answer(answer))
        answer.addTimeout(self.timeout, self.reactor)
        try:
            text = await answer
        except Exception:
            text = b""
        code = response.code
        if 200 <= code < 300:
            return
        detail = text[:200].decode("utf-8", "replace").strip()
        raise ExportFailed(
            f"HTTP {code}" + (f": {detail}" if detail else ""), retry=code in RETRYABLE
        )


def _quiet_factory() -> Any:
    """
    Twisted's (private) HTTP/1.1 client factory without its log lines, or
    L{None} if this Twisted has no such class (the pool keeps its own).
    """
    try:
        from twisted.web.client import _HTTP11ClientFactory
    except ImportError:
        return None

    class Quiet(_HTTP11ClientFactory):
        noisy = False

    return Quiet


def _within(reactor: Any, d: Deferred, seconds: float) -> Deferred:
    """
    A Deferred firing with C{d}'s result (C{d} itself untouched), or with
    C{False} after C{seconds}.
    """
    waiting: Deferred = Deferred()
    timer = reactor.callLater(seconds, waiting.callback, False)

    def fire(result: Any) -> Any:
        if not waiting.called:
            timer.cancel()
            waiting.callback(result)
        return result

    d.addBoth(fire)
    return waiting


def _describe(error: BaseException) -> str:
    from twisted.internet.defer import CancelledError, TimeoutError
    from twisted.web.client import ResponseNeverReceived

    if isinstance(error, (CancelledError, TimeoutError)):
        return "no answer in time"
    if isinstance(error, ResponseNeverReceived):
        return "; ".join(str(r.value) for r in error.reasons) or "no response"
    return str(error) or type(error).__name__


class ExportingService(MultiService):
    """
    A C{MultiService} whose L{OTLPExporter} starts before its other children
    and stops after them, so that the spans of requests drained at stop are
    exported too.
    """

    def __init__(self, exporter: OTLPExporter) -> None:
        super().__init__()
        self.exporter = exporter

    def startService(self) -> None:
        self.exporter.startService()
        super().startService()

    def stopService(self) -> Deferred:
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        try:
            await super().stopService()
        finally:
            await self.exporter.stopService()
