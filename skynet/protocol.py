"""
The Go Skynet wire protocol: BSON documents framed by their own length,
a handshake, then pipelined header/body request and response pairs.

Byte compatible with Go Skynet's C{rpc/bsonrpc} codec over C{net/rpc}; see
C{docs/architecture.md} and the captured vectors the tests replay.

    - L{FrameProtocol}: exact-length framing with a maximum frame size.
    - L{ServerProtocol}: one service connection (handshake, dispatch).
    - L{AdminProtocol}: the admin listener (no handshake).
    - L{ClientProtocol}: one client connection, pipelining calls by C{seq}.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any
from typing import Protocol as TypingProtocol

import attr
import bson
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.internet.error import ConnectionDone
from twisted.internet.main import CONNECTION_DONE as _CONNECTION_DONE
from twisted.internet.main import CONNECTION_LOST as _CONNECTION_LOST
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from skynet._wire import (
    EMPTY_DOCUMENT,
    INT64_MAX,
    INT64_MIN,
    LARGE_BINARY,
    ClientLayout,
    ServerLayout,
    decode_header,
    decode_response_body,
    decode_response_header,
    decode_views,
    document,
    element_bound,
    encode_for_send,
    encode_header,
    encode_request_body,
    encode_request_info,
    encode_response_body,
    plain_tcp,
    request_body_parts,
    request_body_parts_of,
    response_body_parts,
    response_body_parts_of,
    string_element,
    write_now,
    write_parts_now,
)
from skynet._wire import (
    GATHER as _GATHER,
)
from skynet._wire import (
    METHOD as _METHOD,
)
from skynet._wire import (
    unpack_length as _unpack_length,
)
from skynet.errors import (
    ConnectionFailed,
    ProtocolError,
    RemoteCallError,
    ServiceError,
    ServiceUnregistered,
)

#: The largest frame accepted by default, as MongoDB's (16 MiB).
DEFAULT_MAX_FRAME = 16 * 1024 * 1024

_encode = bson.encode
_decode = bson.decode


@attr.s(slots=True, auto_attribs=True)
class RequestInfo:
    """
    What follows one request through the cluster.

    @ivar request_id: a UUID4 string made by the first client, kept across
        retries and passed on by services calling other services.
    @ivar retry_count: how many extra attempts preceded this one.
    @ivar origin_address: C{ip:port} of the originating client.  A client
        sends what its caller gave; a service does not trust it and hands
        its methods the peer of the connection the request came on, as in
        C{connection_address}.
    @ivar connection_address: C{ip:port} of the peer of this connection.
    """

    request_id: str = ""
    retry_count: int = 0
    origin_address: str = ""
    connection_address: str = ""

    def to_bson(self) -> dict[str, Any]:
        """
        The Go C{RequestInfo} document, fields in the Go order.
        """
        return {
            "originaddress": self.origin_address,
            "connectionaddress": self.connection_address,
            "requestid": self.request_id,
            "retrycount": self.retry_count,
        }

    @classmethod
    def from_bson(cls, doc: Any) -> "RequestInfo":
        """
        Read a C{RequestInfo} leniently: missing, null or mistyped fields are
        empty (the Go seed crashed on a missing one; we must not).
        """
        if not isinstance(doc, dict):
            return cls()
        retry = doc.get("retrycount", 0)
        return cls(
            request_id=_str(doc.get("requestid")),
            retry_count=retry if isinstance(retry, int) else 0,
            origin_address=_str(doc.get("originaddress")),
            connection_address=_str(doc.get("connectionaddress")),
        )

    def copy(self) -> "RequestInfo":
        return RequestInfo(
            self.request_id,
            self.retry_count,
            self.origin_address,
            self.connection_address,
        )


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def new_id() -> str:
    """
    A fresh random UUID4 string, as used for client ids and instance uuids
    (like C{str(uuid.uuid4())}, at a fraction of its cost).
    """
    h = os.urandom(16).hex()
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:]}"


def new_request_id() -> str:
    """
    A fresh unique request id in the shape of a UUID4 string, cheaper still
    for the per-call path: 68 random bits per process (drawn again in the
    child after a fork) and a counter in the last 12 hex digits.  Unique,
    not secret.
    """
    global _id_count
    if not _id_prefix:
        _draw_id_prefix()
    _id_count = (_id_count + 1) & 0xFFFFFFFFFFFF
    return _id_prefix + _id_count.to_bytes(6, "big").hex()  # twice as fast as format


def _draw_id_prefix() -> None:
    global _id_prefix, _id_count
    h = os.urandom(16).hex()
    _id_prefix = f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-"
    _id_count = int(h[20:], 16)


def _forget_id_prefix() -> None:
    global _id_prefix
    _id_prefix = ""


_id_prefix = ""
_id_count = 0
# A child draws its own (a pid check per call would cost a system call).
os.register_at_fork(after_in_child=_forget_id_prefix)


_VARIANT = {c: "89ab"[int(c, 16) & 3] for c in "0123456789abcdef"}


def go_quote(text: str) -> str:
    """
    Quote C{text} as Go's C{%q} does for the strings skynet sees.
    """
    out = ['"']
    for ch in text:
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif not ch.isprintable():
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x80 else f"\\u{code:04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def error_text(failure: BaseException) -> str:
    """
    The C{errstring} for an exception raised by a service method.
    """
    if isinstance(failure, ServiceError):
        return str(failure)
    message = str(failure)
    name = type(failure).__name__
    return f"{name}: {message}" if message else name


class BufferBudget:
    """
    The bytes of unfinished frames that all the connections of one service
    may hold together; a connection that would take it over its limit is
    closed (one peer stalling many large frames must not take the memory
    of the host).

    @ivar limit: the most bytes held at once.
    @ivar used: the bytes held now.
    """

    __slots__ = ("limit", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0


#: Twisted's read size on TCP, and the largest this raises it to for a
#: large frame.
_READ_SIZE = 65536
_LARGE_READ = 1 << 20
#: Frames from this size on are read into a buffer of their own
#: (L{FrameProtocol.read_into}).
_INTO = 1 << 18


class _Pieces:
    """
    The received pieces of one large frame, kept as they came and joined
    once it is whole: appended to a C{bytearray}, each piece is copied, and
    the whole is copied again each time the allocator moves the growing
    buffer (half the copying of a 1 MB request, measured).
    """

    __slots__ = ("pieces", "size")

    def __init__(self, first: bytes | bytearray) -> None:
        self.pieces: list[Any] = [first]
        self.size = len(first)

    def __len__(self) -> int:
        return self.size

    def __iadd__(self, data: bytes) -> "_Pieces":
        self.pieces.append(data)
        self.size += len(data)
        return self

    def take(self, n: int) -> tuple[bytes, Any]:
        """
        The first C{n} bytes (at most L{size}), joined, and what follows.
        """
        pieces = self.pieces
        rest: Any = b""
        excess = self.size - n
        if excess:
            last = pieces[-1]
            cut = len(last) - excess
            rest = last[cut:]
            pieces[-1] = memoryview(last)[:cut]
        return b"".join(pieces), rest


class FrameProtocol(Protocol):
    """
    Splits a TCP stream into whole BSON documents, whatever the segmentation.

    Each document starts with its little-endian int32 length, which counts
    itself and the trailing NUL.  A length below 5 or above L{max_frame}
    closes the connection with a logged error before anything is allocated.

    @ivar frame_timeout: seconds a started frame may take to complete
        before the connection is closed (L{None}: no limit); needs
        L{call_later}.
    @ivar budget: a L{BufferBudget} shared with other connections, charged
        with the bytes of this connection's unfinished frame.
    """

    log = Logger()
    max_frame = 16 * 1024 * 1024
    frame_timeout: float | None = None
    budget: BufferBudget | None = None
    call_later: Callable[[float, Callable[[], None]], Any] | None = None

    _buffer: Any = b""
    _needed = 0
    _closing = False
    #: Read large frames straight into a buffer of their size (L{_read_into}),
    #: on plain TCP, where no budget or frame timeout applies.
    read_into = False
    _into: tuple[bytearray, memoryview, int] | None = None
    _batch: list[bytes] | None = None
    _charged = 0
    _frame_timer: Any = None

    def send_bytes(self, data: bytes) -> None:
        """
        Write C{data}: with the other writes of the frames being read now,
        in one piece when they are done, or at once.
        """
        if self._batch is not None:
            self._batch.append(data)
        elif self.transport is not None:
            write_now(self.transport, data)

    def send_parts(self, parts: list[Any]) -> None:
        """
        Write the pieces of one large frame (at least L{_GATHER} bytes in
        all) after what is already queued, without joining them first.
        """
        batch = self._batch
        if batch:
            self._batch = []
            parts = [*batch, *parts]
        if self.transport is not None:
            write_parts_now(self.transport, parts)

    def flush(self) -> None:
        batch = self._batch
        self._batch = None
        if batch and self.transport is not None:
            write_now(self.transport, batch[0] if len(batch) == 1 else b"".join(batch))

    def dataReceived(self, data: bytes) -> None:
        if self._batch is not None:
            self._data_received(data)
            return
        self._batch = []
        try:
            self._data_received(data)
        finally:
            self.flush()

    def _data_received(self, data: bytes) -> None:
        if self._closing:
            return
        buf = self._buffer
        completed = False
        if buf:
            buf += data  # a bytearray grows; _Pieces keeps the piece
            # Still short of the frame being waited for: no re-scan, no copy.
            if len(buf) < self._needed:
                self._buffer = buf
                if self._charged:
                    self._unfinished(False)
                return
            if type(buf) is _Pieces:
                # A large frame, whole: joined once, and what came after it.
                frame, data = buf.take(self._needed)
                self._buffer = buf = b""
                self.frame_received(frame)
                if self._closing:
                    self._buffer = b""
                    return
                completed = True
            else:
                data = buf
        end = len(data)
        offset = 0
        while True:
            remaining = end - offset
            if remaining < 4:
                needed = 4
                break
            length = _unpack_length(data, offset)[0]
            if length < 5 or length > self.max_frame:
                self._buffer = b""
                self.bad_frame_length(length)
                return
            if remaining < length:
                needed = length
                break
            if type(data) is bytes:
                frame = data[offset : offset + length]  # a read that is one frame: itself
            elif offset == 0 and length == end and data is buf and length >= 65536:
                # A large frame that fills the buffer: handed over, not copied.
                frame = buf
                self._buffer = buf = b""
            else:
                frame = bytes(memoryview(data)[offset : offset + length])
            offset += length
            self.frame_received(frame)
            if self._closing:
                self._buffer = b""
                return
        self._needed = needed
        if offset == end:
            self._buffer = b""
        elif offset == 0 and data is buf:
            self._buffer = buf
        else:
            self._buffer = bytearray(memoryview(data)[offset:])
        if (
            self.read_into
            and needed >= _INTO
            and self.budget is None
            and not self.frame_timeout
            and type(self.transport) in plain_tcp()
        ):
            self._start_into(needed)
            return
        wanted = needed - len(self._buffer)
        if wanted > _READ_SIZE:
            self._buffer = _Pieces(self._buffer)  # the rest of a large frame
        if self._buffer or self._frame_timer is not None:
            self._unfinished(offset > 0 or completed)
        if wanted > _READ_SIZE or self._large_reads:
            self._read_size(wanted)

    def _start_into(self, length: int) -> None:
        """
        Receive the rest of the frame of C{length} bytes whose start is in
        L{_buffer} with C{recv_into} a buffer of its size, the transport's
        C{doRead} replaced until it is complete: no allocation per read and
        no copy of what came before.
        """
        frame = bytearray(length)
        have = len(self._buffer)
        frame[:have] = self._buffer
        self._buffer = b""
        self._into = (frame, memoryview(frame), have)
        self.transport.doRead = self._read_into  # type: ignore[union-attr]

    def _read_into(self) -> Any:
        into, transport = self._into, self.transport
        if into is None or self._closing or transport is None:
            return None
        frame, view, have = into
        try:
            count = transport.socket.recv_into(view[have:])  # type: ignore[attr-defined]
        except BlockingIOError:
            return None
        except OSError:
            return _CONNECTION_LOST
        if not count:
            return _CONNECTION_DONE
        have += count
        if have < len(frame):
            self._into = (frame, view, have)
            return None
        self._into = None
        del transport.doRead  # type: ignore[attr-defined]
        view.release()
        self._needed = 0
        whole: Any = frame  # a bytearray, as large frames are handed over below too
        if self._batch is not None:
            self.frame_received(whole)
            return None
        self._batch = []
        try:
            self.frame_received(whole)
        finally:
            self.flush()
        return None

    _large_reads = False

    def _read_size(self, wanted: int) -> None:
        """
        Read a large frame's rest in pieces of up to L{_LARGE_READ} bytes
        rather than Twisted's 64 KiB (a reactor round each), on plain TCP;
        back to Twisted's size when no large frame is pending.
        """
        transport = self.transport
        if type(transport) not in plain_tcp():
            return
        if wanted > _READ_SIZE:
            transport.bufferSize = min(wanted, _LARGE_READ)  # type: ignore[union-attr]
            self._large_reads = True
        elif self._large_reads:
            self._large_reads = False
            del transport.bufferSize  # type: ignore[union-attr]

    def _unfinished(self, completed: bool) -> None:
        """
        Account for the unfinished frame held (or no longer held): charge
        the budget, and time the frame out if it does not complete.
        """
        held = len(self._buffer)
        budget = self.budget
        if budget is not None and held != self._charged:
            budget.used += held - self._charged
            self._charged = held
            if held and budget.used > budget.limit:
                self.log.warn(
                    "closing connection from {peer}: {held} bytes of unfinished frames"
                    " would exceed the service's budget of {limit}",
                    peer=self.peer_address(),
                    held=budget.used,
                    limit=budget.limit,
                )
                self.release_buffer()
                self.close_connection(ProtocolError("frame buffer budget exceeded"))
                return
        timer = self._frame_timer
        if held:
            if self.frame_timeout and self.call_later is not None:
                if timer is None:
                    self._frame_timer = self.call_later(self.frame_timeout, self._frame_timed_out)
                elif completed:
                    timer.reset(self.frame_timeout)
        elif timer is not None:
            self._frame_timer = None
            if timer.active():
                timer.cancel()

    def _frame_timed_out(self) -> None:
        self._frame_timer = None
        if self._closing or not self._buffer:
            return
        self.log.warn(
            "closing connection from {peer}: a frame did not complete in {timeout}s",
            peer=self.peer_address(),
            timeout=self.frame_timeout,
        )
        self.release_buffer()
        self.close_connection(ProtocolError("frame timed out"))
        if self.transport is not None and hasattr(self.transport, "abortConnection"):
            self.transport.abortConnection()

    def release_buffer(self) -> None:
        """
        Drop the unfinished frame, giving its bytes back to the budget and
        stopping its timer.
        """
        self._buffer = b""
        if self.budget is not None and self._charged:
            self.budget.used -= self._charged
        self._charged = 0
        timer, self._frame_timer = self._frame_timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def frame_received(self, frame: bytes) -> None:
        """
        One whole document, length prefix included.
        """
        raise NotImplementedError()

    def bad_frame_length(self, length: int) -> None:
        self.log.error(
            "closing connection from {peer}: frame length {length} is outside 5..{maximum}",
            peer=self.peer_address(),
            length=length,
            maximum=self.max_frame,
        )
        self.release_buffer()
        self.close_connection(ProtocolError(f"bad frame length {length}"))

    def close_connection(self, reason: Exception | None = None) -> None:
        """
        Stop reading and close, flushing what was written.
        """
        self.flush()
        self._closing = True
        if self.transport is not None:
            self.transport.loseConnection()

    def peer_address(self) -> str:
        """
        The peer as C{ip:port}, or C{""} for transports without one.
        """
        try:
            peer: Any = self.transport.getPeer()  # type: ignore[union-attr]
            return f"{peer.host}:{peer.port}"
        except (AttributeError, NotImplementedError):
            return ""


class IDispatcher(TypingProtocol):
    """
    What a L{ServerProtocol} serves: the service host implements this.

    @ivar handshake_timeout: seconds a new connection has to send its
        handshake.
    @ivar idle_timeout: seconds a connection may stay silent with nothing
        in flight before it is closed (L{None}: forever).
    @ivar frame_timeout: seconds a started frame may take to complete.
    @ivar buffer_budget: the bytes of unfinished frames all connections
        may hold together, or L{None}.
    @ivar max_request_elements: the most BSON elements a request may hold,
        or L{None}.
    @ivar view_methods: the names of the methods that take large binary
        parameters as views (L{skynet.service.binary_views}).
    """

    service_name: str
    registered: bool
    max_frame: int
    handshake_timeout: float | None
    idle_timeout: float | None
    frame_timeout: float | None
    buffer_budget: BufferBudget | None
    max_request_elements: int | None
    view_methods: frozenset[str]

    def client_connected(self, protocol: "ServerProtocol") -> None: ...

    def client_disconnected(self, protocol: "ServerProtocol") -> None: ...

    def knows_client(self, clientid: str) -> bool: ...

    def find_method(self, name: str) -> Callable[..., Any] | None: ...

    def request_started(self) -> float: ...

    def request_finished(self, started: float, failed: bool) -> None: ...

    def request_released(self) -> None:
        """
        A request started is no longer in flight, but not served either (it
        goes on as a new request).
        """

    def count_elements(self, data: bytes) -> Deferred:
        """
        The number of elements of the BSON document C{data}, nested ones
        included, counted off the reactor thread.

        @raise Exception: if no count can be started now.
        """

    def call_later(self, delay: float, f: Callable[..., Any]) -> Any: ...


_HEADER, _BODY, _HANDSHAKE, _CLOSED = range(4)


def _can_push_back(transport: Any) -> bool:
    """
    Whether a connection may register as its transport's producer and
    pause its reading (not under a TLS wrapper; see L{ServerProtocol}).
    """
    from twisted.protocols.policies import ProtocolWrapper

    if isinstance(transport, ProtocolWrapper) or getattr(transport, "TLS", False):
        return False
    return hasattr(transport, "registerProducer") and hasattr(transport, "pauseProducing")


def valid_seq(seq: Any) -> int | None:
    """
    A request's C{seq} as the int64 the answer carries, or L{None} if it is
    not one: any BSON integer width, or a double holding an integer in the
    int64 range (booleans and other types are not C{seq}s).
    """
    if isinstance(seq, int):
        if isinstance(seq, bool) or not INT64_MIN <= seq <= INT64_MAX:
            return None
        return seq
    if type(seq) is float and seq.is_integer() and INT64_MIN <= seq <= INT64_MAX:
        return int(seq)
    return None


def ill_formed(servicemethod: str) -> str:
    """
    Go's net/rpc text for a servicemethod that is not C{Service.Method}.
    """
    return f"rpc: service/method request ill-formed: {servicemethod}"


def route_error(
    servicemethod: str, service_name: str, methods: tuple[str, ...] = ("Forward",)
) -> str | None:
    """
    Go's net/rpc (2013) routing of a servicemethod: split at every dot,
    exactly two parts, then the service, then the method; L{None} when it
    names one of C{methods} of C{service_name}.
    """
    parts = servicemethod.split(".")
    if len(parts) != 2:
        return ill_formed(servicemethod)
    if parts[0] != service_name:
        return f"rpc: can't find service {servicemethod}"
    if parts[1] not in methods:
        return f"rpc: can't find method {servicemethod}"
    return None


class ServerProtocol(FrameProtocol):
    """
    One client connection to a service.

    Sends the service handshake, ignores the client's, then reads header and
    body pairs.  Requests are dispatched as they arrive, so pipelined calls
    run concurrently and their responses go out as each finishes.

    Every request is answered and accounted for, whatever it holds: a
    header that decodes but is unusable is answered as Go's net/rpc does
    (C{rpc: service/method request ill-formed: ...}, C{seq} 0 if it has
    none) and its body read and dropped.  The connection registers itself
    as the producer of its transport: while the answers waiting to be sent
    exceed the transport's buffer, it stops reading requests.
    """

    #: Called once when the connection is lost (the factory's count).
    on_lost: Callable[[], None] | None = None

    def __init__(self, dispatcher: IDispatcher) -> None:
        self.dispatcher = dispatcher
        self.max_frame = dispatcher.max_frame
        self.clientid = new_id()
        self.in_flight = 0
        self.frame_timeout = getattr(dispatcher, "frame_timeout", None)
        self.budget = getattr(dispatcher, "buffer_budget", None)
        self.call_later = dispatcher.call_later
        self.paused = False
        self._state = _HANDSHAKE
        self._servicemethod = ""
        self._seq = 0
        self._header_error: str | None = None
        self._timeout: Any = None
        self._idle_timer: Any = None
        self._idle_reads = 0
        self._requests = 0
        self._peer = ""
        self._closed_waiters: list[Deferred] = []
        self._layout = ServerLayout(dispatcher.service_name, self.clientid)
        self._forward = self._layout.forward
        # Bound once: the per-request path skips the attribute lookups.
        self._read_forward_header = self._layout.read_forward_header
        self._read_body = self._layout.read_body_span
        self._ok_header = self._layout.ok_header
        self._ok_response = self._layout.ok_response
        self._max_elements = getattr(dispatcher, "max_request_elements", None)

    def connectionMade(self) -> None:
        self._peer = self.peer_address()
        registered = self.dispatcher.registered
        transport: Any = self.transport
        transport.write(
            _encode(
                {
                    "name": self.dispatcher.service_name,
                    "registered": registered,
                    "clientid": self.clientid,
                }
            )
        )
        if not registered:
            self._state = _CLOSED
            self.close_connection()
            return
        # Back-pressure where the transport reads the socket itself (plain
        # TCP, and the in-memory ones of tests).  A TLS wrapper pauses its
        # producer while it buffers writes during its handshake, which would
        # stop the very reading the handshake needs: none there yet.
        if _can_push_back(transport):
            transport.registerProducer(self, True)
        self.dispatcher.client_connected(self)
        timeout = self.dispatcher.handshake_timeout
        if timeout:
            self._timeout = self.dispatcher.call_later(timeout, self._handshake_timed_out)

    # IPushProducer: our transport tells us when its write buffer is full.

    def pauseProducing(self) -> None:
        self.paused = True
        if self.transport is not None:
            self.transport.pauseProducing()  # type: ignore[attr-defined]

    def resumeProducing(self) -> None:
        self.paused = False
        if self.transport is not None and not self._closing:
            self.transport.resumeProducing()  # type: ignore[attr-defined]

    def stopProducing(self) -> None:
        pass

    def _handshake_timed_out(self) -> None:
        self._timeout = None
        self.log.warn("closing connection from {peer}: no client handshake", peer=self._peer)
        self.close_connection()

    def _idle_check(self) -> None:
        self._idle_timer = None
        timeout = self.dispatcher.idle_timeout
        if self._closing or not timeout:
            return
        if self._requests == self._idle_reads and not self.in_flight and not self._buffer:
            self.log.info(
                "closing connection from {peer}: idle for {timeout}s",
                peer=self._peer,
                timeout=timeout,
            )
            self.close_connection()
            return
        self._idle_reads = self._requests
        self._idle_timer = self.dispatcher.call_later(timeout, self._idle_check)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self._closing = True
        on_lost, self.on_lost = self.on_lost, None
        if on_lost is not None:
            on_lost()
        self.release_buffer()
        for timer in (self._timeout, self._idle_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._timeout = self._idle_timer = None
        if self._state != _CLOSED:
            self._state = _CLOSED
            self.dispatcher.client_disconnected(self)
        waiters, self._closed_waiters = self._closed_waiters, []
        for d in waiters:
            d.callback(None)

    def when_closed(self) -> Deferred:
        """
        A Deferred firing once the connection is closed (its written data
        flushed or abandoned).
        """
        d: Deferred = Deferred()
        if self._state == _CLOSED:
            d.callback(None)
        else:
            self._closed_waiters.append(d)
        return d

    def frame_received(self, frame: bytes) -> None:
        state = self._state
        if state == _HEADER:
            self._requests += 1
            seq = self._read_forward_header(frame)
            if seq is not None:
                self._servicemethod = self._forward
                self._seq = seq
                self._state = _BODY
                return
            self._read_header(frame)
        elif state == _BODY:
            self._state = _HEADER
            servicemethod, seq = self._servicemethod, self._seq
            error = self._header_error
            if error is not None:
                self._header_error = None
                self._send_error(servicemethod, seq, error)
                return
            try:
                self._dispatch(servicemethod, seq, frame)
            except Exception:
                # A bug of ours must still answer, and lose nothing else.
                self.log.failure("request from {peer} (seq {seq}) failed", peer=self._peer, seq=seq)
                self._send_error(servicemethod, seq, "rpc: internal error of the service")
        elif state == _HANDSHAKE:
            # The client handshake's content is ignored, as in Go Skynet.
            self._state = _HEADER
            if self._timeout is not None:
                if self._timeout.active():
                    self._timeout.cancel()
                self._timeout = None
            idle = self.dispatcher.idle_timeout
            if idle:
                self._idle_reads = self._requests
                self._idle_timer = self.dispatcher.call_later(idle, self._idle_check)

    def _read_header(self, frame: bytes) -> None:
        try:
            servicemethod, raw_seq, _ = decode_header(frame)
        except Exception as e:
            self._broken(f"undecodable request header: {e}")
            return
        # Go's net/rpc decodes a missing seq as 0 and serves the request.
        seq = 0 if raw_seq is None else valid_seq(raw_seq)
        if type(servicemethod) is not str or seq is None:
            # Go's net/rpc reads such a header as an empty servicemethod or
            # seq 0, answers ill-formed, drops the body and reads on.
            servicemethod = servicemethod if type(servicemethod) is str else ""
            self._header_error = ill_formed(servicemethod)
            seq = 0 if seq is None else seq
        self._servicemethod = servicemethod
        self._seq = seq
        self._state = _BODY

    def _broken(self, why: str) -> None:
        self.log.error("closing connection from {peer}: {why}", peer=self._peer, why=why)
        self.close_connection()

    def _dispatch(self, servicemethod: str, seq: int, frame: bytes, checked: bool = False) -> None:
        dispatcher = self.dispatcher
        if servicemethod != self._forward:
            error = route_error(servicemethod, dispatcher.service_name)
            self._send_error(servicemethod, seq, error or ill_formed(servicemethod))
            return
        fast = self._read_body(frame)
        fast_method = dispatcher.find_method(fast[0]) if fast is not None else None
        limit = self._max_elements
        if limit and not checked:
            if fast_method is not None:
                start, stop = fast[3], fast[4]  # type: ignore[index]
            else:
                start, stop = 0, len(frame)
            # Each element has a name ending in NUL: no more NULs, no more
            # elements, and no need for the exact count off this process
            # (a walk bounds a document of a few large values in a few steps).
            if stop - start > limit and element_bound(frame, start, stop) > limit:
                data = frame[start:stop] if stop - start < len(frame) else frame
                self._check_elements(servicemethod, seq, frame, data, limit)
                return
        if fast is not None:
            if fast_method is not None:
                start, stop = fast[3], fast[4]  # type: ignore[misc]
                try:
                    fast_params = self._decode_params(fast[0], frame, start, stop)
                except Exception as e:
                    self._send_error(servicemethod, seq, f"in: {e}")
                    return
                info = RequestInfo(fast[1], fast[2], self._peer, self._peer)
                self._invoke(fast_method, info, fast_params, servicemethod, seq)
                return
        try:
            body = _decode(frame)
        except Exception as e:
            self._send_error(servicemethod, seq, str(e) or "Document is corrupted")
            return
        clientid = body.get("clientid")
        if type(clientid) is not str or (
            clientid != self.clientid and not dispatcher.knows_client(clientid)
        ):
            self._send_error(servicemethod, seq, "did not provide the ClientID")
            return
        method_name = body.get("method")
        if type(method_name) is not str:
            method_name = ""
        method = dispatcher.find_method(method_name)
        if method is None:
            self._send_error(servicemethod, seq, f"No such method {go_quote(method_name)}")
            return
        raw_in = body.get("in")
        if raw_in is None:
            params: dict[str, Any] = {}
        elif isinstance(raw_in, bytes):
            try:
                params = self._decode_params(method_name, raw_in, 0, len(raw_in))
            except Exception as e:
                self._send_error(servicemethod, seq, f"in: {e}")
                return
        else:
            self._send_error(servicemethod, seq, "in: not a binary BSON document")
            return
        doc = body.get("requestinfo")
        if type(doc) is dict:
            request_id = doc.get("requestid", "")
            retry_count = doc.get("retrycount", 0)
            info = RequestInfo(
                request_id if type(request_id) is str else "",
                retry_count
                if isinstance(retry_count, int) and not isinstance(retry_count, bool)
                else 0,
                self._peer,
                self._peer,
            )
        else:
            info = RequestInfo("", 0, self._peer, self._peer)
        self._invoke(method, info, params, servicemethod, seq)

    def _decode_params(self, method: str, data: bytes, start: int, stop: int) -> dict[str, Any]:
        """
        The parameters document at C{data[start:stop]}, decoded where it
        lies (a large slice is a copy); a large one of a method marked
        L{skynet.service.binary_views} with its large binaries as views.

        @raise Exception: whatever C{bson.decode} raises for it.
        """
        if stop - start >= LARGE_BINARY and method in self.dispatcher.view_methods:
            views = decode_views(data, start, stop)
            if views is not None:
                return views
        return _decode(data[start:stop] if stop - start < 4096 else memoryview(data)[start:stop])

    def _check_elements(
        self, servicemethod: str, seq: int, frame: bytes, data: bytes, limit: int
    ) -> None:
        """
        Count the elements of a large request off the reactor (decoding a
        million of them takes most of a second), and dispatch it only if
        there are at most C{limit}.  It is in flight meanwhile.
        """
        dispatcher = self.dispatcher
        started = dispatcher.request_started()
        self.in_flight += 1

        def refuse(error: str) -> None:
            self.in_flight -= 1
            try:
                if self._state != _CLOSED:
                    self._send_error(servicemethod, seq, error)
            finally:
                dispatcher.request_finished(started, True)

        def counted(count: int) -> None:
            if count > limit:
                refuse(f"request has {count} elements, more than the {limit} this service takes")
                return
            self.in_flight -= 1
            try:
                if self._state != _CLOSED:
                    self._dispatch(servicemethod, seq, frame, checked=True)
                    self.flush()
            except Exception:
                self.log.failure("request from {peer} (seq {seq}) failed", peer=self._peer, seq=seq)
                self._send_error(servicemethod, seq, "rpc: internal error of the service")
            finally:
                dispatcher.request_released()

        try:
            d = dispatcher.count_elements(data)
        except Exception as e:
            refuse(f"rpc: cannot take this request now: {e}")
            return
        d.addCallbacks(
            counted, lambda f: refuse(f"{f.getErrorMessage() or 'Document is corrupted'}")
        )

    def _invoke(
        self,
        method: Callable[..., Any],
        info: RequestInfo,
        params: dict[str, Any],
        servicemethod: str,
        seq: int,
    ) -> None:
        started = self.dispatcher.request_started()
        self.in_flight += 1
        try:
            result = method(info, params)
            if type(result) is not dict and (
                isinstance(result, Deferred) or hasattr(result, "__await__")
            ):
                d = result if isinstance(result, Deferred) else ensureDeferred(result)
                d.addCallbacks(
                    self._method_returned,
                    self._method_errback,
                    callbackArgs=(servicemethod, seq, started),
                    errbackArgs=(servicemethod, seq, started),
                )
                return
        except Exception as e:
            self._method_failed(e, servicemethod, seq, started)
            return
        self._method_returned(result, servicemethod, seq, started)

    def _method_errback(self, failure: Failure, servicemethod: str, seq: int, started: float):
        self._method_failed(failure.value, servicemethod, seq, started, failure)

    def _method_failed(
        self,
        exc: BaseException,
        servicemethod: str,
        seq: int,
        started: float,
        failure: Failure | None = None,
    ) -> None:
        if not isinstance(exc, ServiceError):
            self.log.failure(
                "method of {service} failed (seq {seq})",
                failure=failure or Failure(exc),
                service=self.dispatcher.service_name,
                seq=seq,
            )
        try:
            text = error_text(exc)
        except Exception:
            text = type(exc).__name__
        self._respond(servicemethod, seq, EMPTY_DOCUMENT, text, started, True)

    def _method_returned(self, result: Any, servicemethod: str, seq: int, started: float):
        out: bytes | tuple[list[Any], int]
        if result is None:
            out = EMPTY_DOCUMENT
        else:
            try:
                # A large result in pieces: joined once, with the rest.
                out = encode_for_send(result)  # views in it taken as bytes
            except Exception as e:
                self._respond(
                    servicemethod,
                    seq,
                    EMPTY_DOCUMENT,
                    f"cannot encode the result as BSON: {e}",
                    started,
                    True,
                )
                return
        self._respond(servicemethod, seq, out, "", started, False)

    def _respond(
        self,
        servicemethod: str,
        seq: int,
        out: bytes | tuple[list[Any], int],
        errstring: str,
        started: float,
        failed: bool,
    ) -> None:
        self.in_flight -= 1
        try:
            if self._state != _CLOSED:
                if not errstring and servicemethod == self._forward and type(out) is bytes:
                    self.send_bytes(self._ok_response(seq, out))
                    return
                if servicemethod == self._forward:
                    header = self._ok_header(seq)
                else:
                    header = encode_header(servicemethod, seq, "")
                # One copy of the result (a chain of + would make several).
                if type(out) is tuple:
                    body = response_body_parts_of(out[0], out[1], errstring)
                    if out[1] >= _GATHER:
                        self.send_parts([header, *body])
                        return
                else:
                    body = response_body_parts(out, errstring)  # type: ignore[arg-type]
                self.send_bytes(b"".join((header, *body)))
        finally:
            # Last: this may finish a drain, which closes the connection.
            self.dispatcher.request_finished(started, failed)

    def _send_error(self, servicemethod: str, seq: int, error: str) -> None:
        self.send_bytes(encode_header(servicemethod, seq, error) + EMPTY_DOCUMENT)


class IAdminTarget(TypingProtocol):
    """
    What the admin listener acts on: the service host implements this.
    """

    max_frame: int

    def admin_register(self) -> Deferred: ...

    def admin_unregister(self) -> Deferred: ...

    def admin_stop(self, wait_for_clients: bool) -> Deferred: ...


class AdminProtocol(FrameProtocol):
    """
    The admin listener of a service: raw header and body pairs, no
    handshake.  C{Admin.Register {}}, C{Admin.Unregister {}} and
    C{Admin.Stop {waitforclients}} are each answered with C{{}}.
    """

    def __init__(self, target: IAdminTarget) -> None:
        self.target = target
        self.max_frame = target.max_frame
        # The service's frame timeout and budget, when the target has them.
        self.frame_timeout = getattr(target, "frame_timeout", None)
        self.budget = getattr(target, "buffer_budget", None)
        self.call_later = getattr(target, "call_later", None)
        self._header: tuple[str, int] | None = None

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self._closing = True
        self.release_buffer()

    def frame_received(self, frame: bytes) -> None:
        try:
            doc = _decode(frame)
        except Exception as e:
            self.log.error("closing admin connection: undecodable document: {e}", e=e)
            self.close_connection()
            return
        if self._header is None:
            servicemethod, seq = doc.get("servicemethod"), valid_seq(doc.get("seq"))
            if type(servicemethod) is not str or seq is None:
                self.log.error("closing admin connection: bad header {doc!r}", doc=doc)
                self.close_connection()
                return
            self._header = (servicemethod, seq)
            return
        servicemethod, seq = self._header
        self._header = None
        if servicemethod == "Admin.Register":
            d = self.target.admin_register()
        elif servicemethod == "Admin.Unregister":
            d = self.target.admin_unregister()
        elif servicemethod == "Admin.Stop":
            self._reply(servicemethod, seq, "")
            self.target.admin_stop(bool(doc.get("waitforclients", False)))
            return
        elif servicemethod == "Admin.Spans":
            # (trace hook, issue 14: this process's spans, answered with a
            # body; the query and its errors are skynet.observe.tracing's.)
            from skynet.observe.tracing import admin_spans

            answer, why = admin_spans(doc)
            if self.transport is not None and not self._closing:
                self.transport.write(encode_header(servicemethod, seq, why) + bson.encode(answer))
            return
        elif servicemethod == "Admin.Ping":
            # (heal, issue 16: the daemon's liveness probe; an answer is all
            # it needs, so a Go service's "can't find method" does as well.)
            self._reply(servicemethod, seq, "")
            return
        else:
            error = route_error(servicemethod, "Admin", ("Register", "Unregister", "Stop"))
            self._reply(servicemethod, seq, error or ill_formed(servicemethod))
            return
        d.addCallbacks(
            lambda _: self._reply(servicemethod, seq, ""),
            lambda f: self._reply(servicemethod, seq, error_text(f.value)),
        )

    def _reply(self, servicemethod: str, seq: int, error: str) -> None:
        if self.transport is not None and not self._closing:
            self.transport.write(encode_header(servicemethod, seq, error) + EMPTY_DOCUMENT)


class IReceiver(TypingProtocol):
    """
    Where L{ClientProtocol.send} delivers one answer: exactly one of its
    methods is called, once.  A L{Deferred} is one.
    """

    def callback(self, result: Any, /) -> Any: ...

    def errback(self, error: Any, /) -> Any: ...


class ClientProtocol(FrameProtocol):
    """
    One connection from a client to a service instance.

    L{ready} fires with this protocol once the handshake is done (or fails
    with L{ServiceUnregistered}).  L{call} may be used any number of times
    concurrently; responses are matched to calls by C{seq}.

    An answer that cannot be decoded is a protocol failure of the instance:
    its call fails with L{ProtocolError} (a L{ConnectionFailed}, so a
    client retries elsewhere), and so does the connection, with every call
    still waiting on it.

    @ivar lost_with_calls: whether calls were waiting when the connection
        was lost (a service closing an idle connection is no failure).
    @ivar binary_views: whether the large binary values of answers that
        are flat documents are handed over as read-only views of the
        received frame (L{skynet._wire.decode_views}) rather than copies.
    """

    binary_views = False

    # A service's answers are read into a buffer of their size as soon as
    # their length has come (an instance the registry named may so make this
    # connection allocate one frame of up to max_frame early); requests from
    # peers are read as they come, under the service's budget.
    read_into = True

    def __init__(self, service_name: str, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.service_name = service_name
        self.max_frame = max_frame
        self.servicemethod = f"{service_name}.Forward"
        self.ready: Deferred = Deferred()
        self.clientid = ""
        self.pending: dict[int, IReceiver] = {}
        self.lost = False
        self.lost_with_calls = False
        self.closed_by_us = False
        self.on_lost: Callable[["ClientProtocol"], None] | None = None
        self._next_seq = 0
        self._state = _HANDSHAKE
        self._response: tuple[int, str] | None = None
        self._failure: Exception | None = None
        self._method_elements: dict[str, bytes] = {}
        self._layout: ClientLayout | None = None

    def frame_received(self, frame: bytes) -> None:
        state = self._state
        if state == _HEADER:
            seq = self._read_ok_header(frame)
            if seq is not None:
                self._response = (seq, "")
                self._state = _BODY
                return
            try:
                seq, error = decode_response_header(frame)
            except Exception as e:
                self._fail_connection(ProtocolError(f"undecodable response header: {e}"))
                return
            if valid_seq(seq) is None:
                self._fail_connection(ProtocolError(f"response header without seq: {seq!r}"))
                return
            self._response = (int(seq), error if type(error) is str else "")
            self._state = _BODY
        elif state == _BODY:
            self._state = _HEADER
            seq, error = self._response  # type: ignore[misc]
            self._response = None
            d = self.pending.pop(seq, None)
            if d is None:
                return  # cancelled, or a response for nobody
            if error:
                d.errback(RemoteCallError(error))
                return
            span = self._read_ok_body(frame)
            out: Any = None
            if span is not None:
                start, stop = span
                if self.binary_views and stop - start >= LARGE_BINARY:
                    views = decode_views(frame, start, stop)
                    if views is not None:
                        d.callback(views)
                        return
                # The result where it lies (a large slice is a copy).
                out = frame[start:stop] if stop - start < 4096 else memoryview(frame)[start:stop]
            try:
                if span is None:
                    out, errstring = decode_response_body(frame)
                    if errstring:
                        d.errback(ServiceError(str(errstring)))
                        return
                    if out is not None and not isinstance(out, bytes):
                        raise TypeError(f"out is a {type(out).__name__}, not binary")
                result = _decode(out) if out else {}
            except Exception as e:
                failure = ProtocolError(f"undecodable response body from {self.service_name}: {e}")
                d.errback(failure)
                self._fail_connection(failure)
                return
            d.callback(result)
        elif state == _HANDSHAKE:
            self._handshake(frame)

    def _handshake(self, frame: bytes) -> None:
        try:
            doc = _decode(frame)
        except Exception as e:
            self._fail_connection(ProtocolError(f"undecodable service handshake: {e}"))
            return
        # The Go seed writes its handshake before looking at the service's.
        self.send_bytes(EMPTY_DOCUMENT)
        name = doc.get("name")
        if type(name) is str and name and name != self.service_name:
            self._fail_connection(
                ProtocolError(f"expected service {self.service_name!r}, reached {name!r}")
            )
            return
        if doc.get("registered", False) is not True:
            self._fail_connection(ServiceUnregistered(f"{self.service_name} is not registered"))
            return
        clientid = doc.get("clientid")
        self.clientid = clientid if type(clientid) is str else ""
        self._layout = ClientLayout(self.servicemethod, self.clientid)
        self._read_ok_header = self._layout.read_ok_header
        self._read_ok_body = self._layout.read_ok_body_span
        self._request_header = self._layout.request_header
        self._state = _HEADER
        self.ready.callback(self)

    def send(
        self,
        method: str,
        params: bytes | tuple[list[Any], int],
        request_info: RequestInfo,
        receiver: IReceiver,
    ) -> int:
        """
        Send one request; its answer goes to C{receiver.callback(result)}
        or C{receiver.errback(exception)}.

        @param params: the encoded parameters document (or its pieces and
            length, from L{skynet._wire.encode_for_send}).
        @return: the request's C{seq}, for L{forget}.
        @raise ConnectionFailed: if the connection is not usable.
        """
        layout = self._layout
        if self.lost or layout is None or self._closing:
            raise ConnectionFailed("connection is not ready")
        seq = self._next_seq
        self._next_seq = seq + 1
        self.pending[seq] = receiver
        method_element = self._method_elements.get(method) or self._method_element(method)
        # One copy of the parameters (a chain of + would make several).
        if type(params) is tuple:  # large, in pieces: encode_for_send
            body = request_body_parts_of(
                layout.clientid_element, method_element, request_info, params[0], params[1]
            )
            if params[1] >= _GATHER:  # sent as they are, not joined
                self.send_parts([self._request_header(seq), *body])
                return seq
            self.send_bytes(b"".join((self._request_header(seq), *body)))
            return seq
        self.send_bytes(layout.request(seq, method_element, request_info, params))  # type: ignore[arg-type]
        return seq

    def _method_element(self, method: str) -> bytes:
        element = string_element(_METHOD, method)
        if len(self._method_elements) < 256:
            self._method_elements[method] = element
        return element

    def forget(self, seq: int) -> None:
        """
        Drop the answer to request C{seq} when it comes.
        """
        self.pending.pop(seq, None)

    def call(
        self, method: str, params: Any, request_info: RequestInfo, encoded: bool = False
    ) -> Deferred:
        """
        Send one request.

        @param params: a dict (or the encoded BSON bytes if C{encoded}).
        @return: a Deferred firing with the result dict, or failing with
            L{ServiceError}, L{RemoteCallError} or L{ConnectionFailed}.
            Cancelling it forgets the call (the answer is dropped).
        """
        sent: list[int] = []

        def cancel(_: Deferred) -> None:
            if sent:
                self.forget(sent[0])

        d: Deferred = Deferred(cancel)
        sent.append(
            self.send(method, params if encoded else encode_for_send(params), request_info, d)
        )
        return d

    def _fail_connection(self, error: Exception) -> None:
        self._failure = error
        if not self.ready.called:
            self.ready.errback(error)
        self.close_connection()
        if self.transport is not None and hasattr(self.transport, "abortConnection"):
            # A broken peer gets no chance to keep the connection half open.
            self.transport.abortConnection()

    def bad_frame_length(self, length: int) -> None:
        self._failure = ProtocolError(f"bad frame length {length} from the service")
        super().bad_frame_length(length)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self.lost = True
        self._closing = True
        self._into = None  # an unfinished large answer
        error = self._failure or ConnectionFailed(
            f"connection to {self.service_name} lost: {reason.getErrorMessage()}"
        )
        if not self.ready.called:
            self.ready.errback(error)
        pending, self.pending = self.pending, {}
        self.lost_with_calls = bool(pending) or self._failure is not None
        for d in pending.values():
            d.errback(error)
        if self.on_lost is not None:
            self.on_lost(self)

    @property
    def in_flight(self) -> int:
        return len(self.pending)


__all__ = [
    "AdminProtocol",
    "BufferBudget",
    "CancelledError",
    "ClientProtocol",
    "DEFAULT_MAX_FRAME",
    "EMPTY_DOCUMENT",
    "FrameProtocol",
    "IReceiver",
    "RequestInfo",
    "ServerProtocol",
    "decode_header",
    "decode_response_body",
    "decode_response_header",
    "document",
    "encode_header",
    "encode_request_body",
    "encode_request_info",
    "encode_response_body",
    "go_quote",
    "new_id",
    "new_request_id",
    "request_body_parts",
    "response_body_parts",
    "string_element",
    "write_now",
]
