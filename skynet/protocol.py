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
import struct
from collections.abc import Callable
from typing import Any
from typing import Protocol as TypingProtocol

import attr
import bson
from bson.errors import BSONError
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from skynet.errors import (
    ConnectionFailed,
    ProtocolError,
    RemoteCallError,
    ServiceError,
    ServiceUnregistered,
)

#: The largest frame accepted by default, as MongoDB's (16 MiB).
DEFAULT_MAX_FRAME = 16 * 1024 * 1024

#: The empty BSON document, the client handshake and error response body.
EMPTY_DOCUMENT = b"\x05\x00\x00\x00\x00"

_length = struct.Struct("<i")
_unpack_length = _length.unpack_from

_encode = bson.encode
_decode = bson.decode


@attr.s(slots=True, auto_attribs=True)
class RequestInfo:
    """
    What follows one request through the cluster.

    @ivar request_id: a UUID4 string made by the first client, kept across
        retries and passed on by services calling other services.
    @ivar retry_count: how many extra attempts preceded this one.
    @ivar origin_address: C{ip:port} of the originating client.
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
    for the per-call path: 68 random bits per process (drawn again after a
    fork) and a counter in the last 12 hex digits.  Unique, not secret.
    """
    global _id_pid, _id_prefix, _id_count
    if _id_pid != os.getpid():
        h = os.urandom(16).hex()
        _id_prefix = f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-"
        _id_count = int(h[20:], 16)
        _id_pid = os.getpid()
    _id_count = (_id_count + 1) & 0xFFFFFFFFFFFF
    return _id_prefix + format(_id_count, "012x")


_id_pid = -1
_id_prefix = ""
_id_count = 0


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


# The fixed-shape documents of the protocol are built and read here directly:
# pymongo's C codec costs about 2-3 us per tiny document, a third of a call.
# Readers take only the exact layout Go Skynet and we write, and hand anything
# else to bson.decode, so they accept and reject exactly what it does.

_pack_i32 = struct.Struct("<i").pack
_pack_i64 = struct.Struct("<q").pack
_unpack_i64 = struct.Struct("<q").unpack_from

_SERVICEMETHOD = b"\x02servicemethod\x00"
_SEQ64 = b"\x12seq\x00"
_SEQ32 = b"\x10seq\x00"
_ERROR = b"\x02error\x00"
_OUT = b"\x05out\x00"
_ERRSTRING = b"\x02errstring\x00"
_CLIENTID = b"\x02clientid\x00"
_METHOD = b"\x02method\x00"
_REQUESTINFO = b"\x03requestinfo\x00"
_ORIGINADDRESS = b"\x02originaddress\x00"
_CONNECTIONADDRESS = b"\x02connectionaddress\x00"
_REQUESTID = b"\x02requestid\x00"
_RETRYCOUNT = b"\x10retrycount\x00"
_IN = b"\x05in\x00"
_INT32_MAX = 2**31 - 1


class _NotFastPath(Exception):
    """
    The document is not in the exact layout the fast readers handle.
    """


def string_element(prefix: bytes, value: str) -> bytes:
    """
    A BSON string element; C{prefix} is the type byte and the name's cstring.
    """
    data = value.encode("utf-8")
    return prefix + _pack_i32(len(data) + 1) + data + b"\x00"


def document(elements: bytes) -> bytes:
    """
    A BSON document of the given encoded elements.
    """
    return _pack_i32(len(elements) + 5) + elements + b"\x00"


def _read_string(frame: bytes, pos: int) -> tuple[str, int]:
    n = _unpack_length(frame, pos)[0]
    end = pos + 3 + n
    if n < 1 or end >= len(frame) or frame[end] != 0:
        raise _NotFastPath()
    return frame[pos + 4 : end].decode("utf-8"), end + 1


def encode_header(servicemethod: str, seq: int, error: str | None = None) -> bytes:
    """
    A request header (C{error} is L{None}) or a response header, C{seq}
    as int64: C{{servicemethod, seq[, error]}}.
    """
    elements = string_element(_SERVICEMETHOD, servicemethod) + _SEQ64 + _pack_i64(seq)
    if error is not None:
        elements += string_element(_ERROR, error)
    return document(elements)


def decode_header(frame: bytes) -> tuple[Any, Any, Any]:
    """
    Read a request or response header: (servicemethod, seq, error), each
    L{None} where absent; values are not type-checked.

    @raise BSONError: if the document is not valid BSON.
    """
    try:
        if frame[4:19] != _SERVICEMETHOD:
            raise _NotFastPath()
        servicemethod, pos = _read_string(frame, 19)
        tag = frame[pos : pos + 5]
        if tag == _SEQ64:
            seq = _unpack_i64(frame, pos + 5)[0]
            pos += 13
        elif tag == _SEQ32:
            seq = _unpack_length(frame, pos + 5)[0]
            pos += 9
        else:
            raise _NotFastPath()
        error = None
        if frame[pos : pos + 7] == _ERROR:
            error, pos = _read_string(frame, pos + 7)
        if pos != len(frame) - 1 or frame[pos] != 0:
            raise _NotFastPath()
        return servicemethod, seq, error
    except (_NotFastPath, struct.error, UnicodeDecodeError):
        doc = _decode(frame)
        return doc.get("servicemethod"), doc.get("seq"), doc.get("error")


def decode_response_header(frame: bytes) -> tuple[Any, Any]:
    """
    Read a response header's (seq, error): the servicemethod, which a
    client does not need, is checked but not returned.

    @raise BSONError: if the document is not valid BSON.
    """
    try:
        if frame[4:19] != _SERVICEMETHOD:
            raise _NotFastPath()
        _, pos = _read_string(frame, 19)  # validated, as bson.decode would
        if frame[pos : pos + 5] != _SEQ64:
            raise _NotFastPath()
        seq = _unpack_i64(frame, pos + 5)[0]
        if frame[pos + 13 : pos + 20] != _ERROR:
            raise _NotFastPath()
        error, pos = _read_string(frame, pos + 20)
        if pos != len(frame) - 1 or frame[pos] != 0:
            raise _NotFastPath()
        return seq, error
    except (_NotFastPath, struct.error, UnicodeDecodeError, IndexError):
        _, seq, error = decode_header(frame)
        return seq, error


def encode_response_body(out: bytes, errstring: str) -> bytes:
    """
    C{{out: binary, errstring}}.
    """
    return b"".join(response_body_parts(out, errstring))


def response_body_parts(out: bytes, errstring: str) -> tuple[bytes, ...]:
    """
    The pieces of a response body, to be joined (with the header) in one
    copy of C{out}.
    """
    tail = string_element(_ERRSTRING, errstring) + b"\x00"
    return (_pack_i32(4 + 5 + len(_OUT) + len(out) + len(tail)), _OUT,
            _pack_i32(len(out)), b"\x00", out, tail)  # fmt: skip


def decode_response_body(frame: bytes) -> tuple[Any, Any]:
    """
    Read a response body: (out, errstring), each L{None} where absent.

    @raise BSONError: if the document is not valid BSON.
    """
    try:
        if frame[4:9] != _OUT:
            raise _NotFastPath()
        n = _unpack_length(frame, 9)[0]
        end = 14 + n
        if n < 0 or frame[13] != 0 or end >= len(frame):
            raise _NotFastPath()
        out = frame[14:end]
        if frame[end : end + 11] != _ERRSTRING:
            raise _NotFastPath()
        errstring, pos = _read_string(frame, end + 11)
        if pos != len(frame) - 1 or frame[pos] != 0:
            raise _NotFastPath()
        return out, errstring
    except (_NotFastPath, struct.error, UnicodeDecodeError, IndexError):
        doc = _decode(frame)
        return doc.get("out"), doc.get("errstring")


def encode_request_info(info: "RequestInfo") -> bytes:
    """
    The C{requestinfo} element of a request body, in the Go layout.
    """
    request_id = info.request_id
    if (
        not info.origin_address
        and not info.connection_address
        and len(request_id) == 36
        and request_id.isascii()
        and 0 <= info.retry_count <= _INT32_MAX
    ):
        return (
            _REQUESTINFO_EMPTY_ADDRESSES
            + request_id.encode()
            + _END_ID
            + _pack_i32(info.retry_count)
            + b"\x00"
        )
    retry = info.retry_count if 0 <= info.retry_count <= _INT32_MAX else _INT32_MAX
    return _REQUESTINFO + document(
        string_element(_ORIGINADDRESS, info.origin_address)
        + string_element(_CONNECTIONADDRESS, info.connection_address)
        + string_element(_REQUESTID, info.request_id)
        + _RETRYCOUNT
        + _pack_i32(retry)
    )


_REQUESTINFO_EMPTY_ADDRESSES = (
    _REQUESTINFO
    + _pack_i32(
        4
        + len(string_element(_ORIGINADDRESS, ""))
        + len(string_element(_CONNECTIONADDRESS, ""))
        + len(_REQUESTID)
        + 4
        + 37
        + len(_RETRYCOUNT)
        + 4
        + 1
    )
    + string_element(_ORIGINADDRESS, "")
    + string_element(_CONNECTIONADDRESS, "")
    + _REQUESTID
    + _pack_i32(37)
)
_END_ID = b"\x00" + _RETRYCOUNT


def encode_request_body(clientid: str, method: str, info: "RequestInfo", params: bytes) -> bytes:
    """
    C{{clientid, method, requestinfo, in: binary}}; C{params} is the
    encoded parameters document.
    """
    return b"".join(
        request_body_parts(
            string_element(_CLIENTID, clientid), string_element(_METHOD, method), info, params
        )
    )


def request_body_parts(
    clientid_element: bytes, method_element: bytes, info: "RequestInfo", params: bytes
) -> tuple[bytes, ...]:
    """
    The pieces of a request body, to be joined (with what goes before it)
    in one copy of C{params}; the client passes its cached elements.
    """
    elements = clientid_element + method_element + encode_request_info(info) + _IN
    return (
        _pack_i32(len(elements) + 5 + len(params) + 5),
        elements,
        _pack_i32(len(params)),
        b"\x00",
        params,
        b"\x00",
    )


def error_text(failure: BaseException) -> str:
    """
    The C{errstring} for an exception raised by a service method.
    """
    if isinstance(failure, ServiceError):
        return str(failure)
    message = str(failure)
    name = type(failure).__name__
    return f"{name}: {message}" if message else name


def _plain_tcp() -> tuple[type, ...]:
    """
    The transports L{write_now} may write to directly: Twisted's plain TCP
    connections, if their write buffer still has the shape it relies on
    (private attributes of L{twisted.internet.abstract.FileDescriptor},
    pinned by a test); none otherwise, and every write goes the usual way.
    """
    from twisted.internet import abstract, tcp

    needed = ("connected", "disconnecting", "offset", "dataBuffer", "_writeDisconnected")
    if not all(hasattr(abstract.FileDescriptor, name) for name in needed):
        return ()
    probe = abstract.FileDescriptor.__new__(abstract.FileDescriptor)
    try:
        # (newcomer, issue 13: a stand-in reactor, so that importing this
        # module does not install the global one, which skynet.aio and
        # other reactors must be free to install first.)
        abstract.FileDescriptor.__init__(probe, reactor=object())  # type: ignore[arg-type]
    except Exception:
        return ()
    if not isinstance(getattr(probe, "_tempDataBuffer", None), list):
        return ()
    return (tcp.Client, tcp.Server)


_PLAIN_TCP = _plain_tcp()


def write_now(transport: Any, data: bytes) -> None:
    """
    Send C{data} at once when the transport holds nothing else to send (a
    plain TCP connection), rather than queueing it for the reactor's next
    round (which costs two epoll_ctl calls and a loop iteration on each side
    of every call); what the socket does not take, and every other
    transport, goes through C{transport.write}.
    """
    if (
        type(transport) in _PLAIN_TCP
        and transport.connected
        and not transport.disconnecting
        and not transport.TLS
        and not transport._tempDataBuffer
        and transport.offset == len(transport.dataBuffer)
        and not transport._writeDisconnected
    ):
        try:
            sent = transport.socket.send(data)
        except OSError:
            sent = 0  # full, or broken: the reactor's own write deals with it
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)


class FrameProtocol(Protocol):
    """
    Splits a TCP stream into whole BSON documents, whatever the segmentation.

    Each document starts with its little-endian int32 length, which counts
    itself and the trailing NUL.  A length below 5 or above L{max_frame}
    closes the connection with a logged error before anything is allocated.
    """

    log = Logger()
    max_frame = DEFAULT_MAX_FRAME

    _buffer: Any = b""
    _needed = 0
    _closing = False
    _batch: list[bytes] | None = None

    def send_bytes(self, data: bytes) -> None:
        """
        Write C{data}: with the other writes of the frames being read now,
        in one piece when they are done, or at once.
        """
        if self._batch is not None:
            self._batch.append(data)
        elif self.transport is not None:
            write_now(self.transport, data)

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
        if buf:
            buf += data
            # Still short of the frame being waited for: no re-scan, no copy.
            if len(buf) < self._needed:
                return
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
            if offset == 0 and length == end and type(data) is bytes:
                frame = data
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
    """

    service_name: str
    registered: bool
    max_frame: int
    handshake_timeout: float | None

    def client_connected(self, protocol: "ServerProtocol") -> None: ...

    def client_disconnected(self, protocol: "ServerProtocol") -> None: ...

    def knows_client(self, clientid: str) -> bool: ...

    def find_method(self, name: str) -> Callable[..., Any] | None: ...

    def request_started(self) -> float: ...

    def request_finished(self, started: float, failed: bool) -> None: ...

    def call_later(self, delay: float, f: Callable[..., Any]) -> Any: ...


_HEADER, _BODY, _HANDSHAKE, _CLOSED = range(4)

#: How a response header with an empty error ends, and a body with an empty errstring.
_OK_HEADER_SUFFIX = _ERROR + b"\x01\x00\x00\x00\x00\x00"
_OK_BODY_SUFFIX = _ERRSTRING + b"\x01\x00\x00\x00\x00\x00"
_OK_BODY_SUFFIX_LENGTH = len(_OK_BODY_SUFFIX)


class ServerProtocol(FrameProtocol):
    """
    One client connection to a service.

    Sends the service handshake, ignores the client's, then reads header and
    body pairs.  Requests are dispatched as they arrive, so pipelined calls
    run concurrently and their responses go out as each finishes.
    """

    def __init__(self, dispatcher: IDispatcher) -> None:
        self.dispatcher = dispatcher
        self.max_frame = dispatcher.max_frame
        self.clientid = new_id()
        self.in_flight = 0
        self._state = _HANDSHAKE
        self._servicemethod = ""
        self._seq = 0
        self._timeout: Any = None
        self._peer = ""
        self._closed_waiters: list[Deferred] = []
        self._forward = f"{dispatcher.service_name}.Forward"
        forward = string_element(_SERVICEMETHOD, self._forward) + _SEQ64
        self._forward_header_length = 4 + len(forward) + 8 + 1
        self._forward_header_prefix = _pack_i32(self._forward_header_length) + forward
        self._ok_response_prefix = (
            _pack_i32(4 + len(forward) + 8 + len(_OK_HEADER_SUFFIX)) + forward
        )
        self._clientid_element = string_element(_CLIENTID, self.clientid)

    def connectionMade(self) -> None:
        self._peer = self.peer_address()
        registered = self.dispatcher.registered
        self.transport.write(  # type: ignore[union-attr]
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
        self.dispatcher.client_connected(self)
        timeout = self.dispatcher.handshake_timeout
        if timeout:
            self._timeout = self.dispatcher.call_later(timeout, self._handshake_timed_out)

    def _handshake_timed_out(self) -> None:
        self._timeout = None
        self.log.warn("closing connection from {peer}: no client handshake", peer=self._peer)
        self.close_connection()

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self._closing = True
        if self._timeout is not None and self._timeout.active():
            self._timeout.cancel()
        self._timeout = None
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
            # Fast path: {servicemethod: "<Name>.Forward", seq: int64}, exactly.
            if len(frame) == self._forward_header_length and frame.startswith(
                self._forward_header_prefix
            ) and frame[-1] == 0:  # fmt: skip
                self._servicemethod = self._forward
                self._seq = _unpack_i64(frame, self._forward_header_length - 9)[0]
                self._state = _BODY
                return
            try:
                servicemethod, seq, _ = decode_header(frame)
            except (BSONError, ValueError) as e:
                self._broken(f"undecodable request header: {e}")
                return
            if isinstance(seq, float) and seq.is_integer():
                seq = int(seq)
            if not isinstance(servicemethod, str) or not isinstance(seq, int):
                self._broken(
                    f"request header lacks servicemethod or seq: {servicemethod!r}, {seq!r}"
                )
                return
            self._servicemethod = servicemethod
            self._seq = seq
            self._state = _BODY
        elif state == _BODY:
            self._state = _HEADER
            self._dispatch(self._servicemethod, self._seq, frame)
        elif state == _HANDSHAKE:
            # The client handshake's content is ignored, as in Go Skynet.
            self._state = _HEADER
            if self._timeout is not None:
                if self._timeout.active():
                    self._timeout.cancel()
                self._timeout = None

    def _broken(self, why: str) -> None:
        self.log.error("closing connection from {peer}: {why}", peer=self._peer, why=why)
        self.close_connection()

    def _dispatch(self, servicemethod: str, seq: int, frame: bytes) -> None:
        dispatcher = self.dispatcher
        if servicemethod == self._forward:
            pass
        elif (dot := servicemethod.rfind(".")) < 0:
            self._send_error(
                servicemethod,
                seq,
                f"rpc: service/method request ill-formed: {servicemethod}",
            )
            return
        elif servicemethod[:dot] != dispatcher.service_name:
            self._send_error(servicemethod, seq, f"rpc: can't find service {servicemethod}")
            return
        else:
            self._send_error(servicemethod, seq, f"rpc: can't find method {servicemethod}")
            return
        fast = self._fast_body(frame)
        if fast is not None:
            fast_method = dispatcher.find_method(fast[0])
            if fast_method is not None:
                try:
                    fast_params = _decode(fast[3])
                except (BSONError, ValueError) as e:
                    self._send_error(servicemethod, seq, f"in: {e}")
                    return
                info = RequestInfo(fast[1], fast[2], self._peer, self._peer)
                self._invoke(fast_method, info, fast_params, servicemethod, seq)
                return
        try:
            body = _decode(frame)
        except (BSONError, ValueError) as e:
            self._send_error(servicemethod, seq, str(e) or "Document is corrupted")
            return
        clientid = body.get("clientid")
        if clientid != self.clientid and not (
            isinstance(clientid, str) and dispatcher.knows_client(clientid)
        ):
            self._send_error(servicemethod, seq, "did not provide the ClientID")
            return
        method_name = body.get("method")
        if not isinstance(method_name, str):
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
                params = _decode(raw_in)
            except (BSONError, ValueError) as e:
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
                retry_count if isinstance(retry_count, int) else 0,
                self._peer,
                self._peer,
            )
        else:
            info = RequestInfo("", 0, self._peer, self._peer)
        self._invoke(method, info, params, servicemethod, seq)

    def _fast_body(self, frame: bytes) -> tuple[str, str, int, bytes] | None:
        """
        Read a request body in the exact layout our client and Go's write,
        with this connection's client id: (method, request id, retry count,
        encoded params); L{None} for anything else (left to bson.decode).
        """
        clientid = self._clientid_element
        if not frame.startswith(clientid, 4):
            return None
        try:
            pos = 4 + len(clientid)
            if frame[pos : pos + 8] != _METHOD:
                return None
            method, pos = _read_string(frame, pos + 8)
            if frame[pos : pos + 13] != _REQUESTINFO:
                return None
            end = pos + 13 + _unpack_length(frame, pos + 13)[0]
            pos += 17
            if frame[pos : pos + 15] != _ORIGINADDRESS:
                return None
            _, pos = _read_string(frame, pos + 15)
            if frame[pos : pos + 19] != _CONNECTIONADDRESS:
                return None
            _, pos = _read_string(frame, pos + 19)
            if frame[pos : pos + 11] != _REQUESTID:
                return None
            request_id, pos = _read_string(frame, pos + 11)
            if frame[pos : pos + 12] != _RETRYCOUNT:
                return None
            retry_count = _unpack_length(frame, pos + 12)[0]
            pos += 16
            if pos + 1 != end or frame[pos] != 0 or frame[end : end + 4] != _IN:
                return None
            n = _unpack_length(frame, end + 4)[0]
            start = end + 9
            if n < 5 or frame[end + 8] != 0 or start + n + 1 != len(frame) or frame[-1] != 0:
                return None
            return method, request_id, retry_count, frame[start : start + n]
        except (_NotFastPath, struct.error, UnicodeDecodeError, IndexError):
            return None

    def _invoke(
        self,
        method: Callable[..., Any],
        info: RequestInfo,
        params: dict[str, Any],
        servicemethod: str,
        seq: int,
    ) -> None:
        dispatcher = self.dispatcher
        started = dispatcher.request_started()
        self.in_flight += 1
        try:
            result = method(info, params)
        except Exception as e:
            self._method_failed(e, servicemethod, seq, started)
            return
        if isinstance(result, Deferred) or hasattr(result, "__await__"):
            d = ensureDeferred(result) if not isinstance(result, Deferred) else result
            d.addCallbacks(
                self._method_returned,
                self._method_errback,
                callbackArgs=(servicemethod, seq, started),
                errbackArgs=(servicemethod, seq, started),
            )
        else:
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
        self._respond(servicemethod, seq, EMPTY_DOCUMENT, error_text(exc), started, True)

    def _method_returned(self, result: Any, servicemethod: str, seq: int, started: float):
        if result is None:
            out = EMPTY_DOCUMENT
        else:
            try:
                out = _encode(result)
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
        out: bytes,
        errstring: str,
        started: float,
        failed: bool,
    ) -> None:
        self.in_flight -= 1
        if self._state != _CLOSED:
            if servicemethod == self._forward:
                header = self._ok_response_prefix + _pack_i64(seq) + _OK_HEADER_SUFFIX
            else:
                header = encode_header(servicemethod, seq, "")
            # One copy of the result (a chain of + would make several).
            self.send_bytes(b"".join((header, *response_body_parts(out, errstring))))
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
        self._header: tuple[str, int] | None = None

    def frame_received(self, frame: bytes) -> None:
        try:
            doc = _decode(frame)
        except (BSONError, ValueError) as e:
            self.log.error("closing admin connection: undecodable document: {e}", e=e)
            self.close_connection()
            return
        if self._header is None:
            servicemethod, seq = doc.get("servicemethod"), doc.get("seq")
            if not isinstance(servicemethod, str) or not isinstance(seq, int):
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
        elif servicemethod == "Admin.Ping":
            # (heal, issue 16: the daemon's liveness probe; an answer is all
            # it needs, so a Go service's "can't find method" does as well.)
            self._reply(servicemethod, seq, "")
            return
        elif "." not in servicemethod:
            self._reply(
                servicemethod,
                seq,
                f"rpc: service/method request ill-formed: {servicemethod}",
            )
            return
        elif not servicemethod.startswith("Admin."):
            self._reply(servicemethod, seq, f"rpc: can't find service {servicemethod}")
            return
        else:
            self._reply(servicemethod, seq, f"rpc: can't find method {servicemethod}")
            return
        d.addCallbacks(
            lambda _: self._reply(servicemethod, seq, ""),
            lambda f: self._reply(servicemethod, seq, error_text(f.value)),
        )

    def _reply(self, servicemethod: str, seq: int, error: str) -> None:
        if self.transport is not None and not self._closing:
            self.transport.write(encode_header(servicemethod, seq, error) + EMPTY_DOCUMENT)


class ClientProtocol(FrameProtocol):
    """
    One connection from a client to a service instance.

    L{ready} fires with this protocol once the handshake is done (or fails
    with L{ServiceUnregistered}).  L{call} may be used any number of times
    concurrently; responses are matched to calls by C{seq}.
    """

    def __init__(self, service_name: str, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.service_name = service_name
        self.max_frame = max_frame
        self.servicemethod = f"{service_name}.Forward"
        self.ready: Deferred = Deferred()
        self.clientid = ""
        self.pending: dict[int, Deferred] = {}
        self.lost = False
        self.closed_by_us = False
        self.on_lost: Callable[["ClientProtocol"], None] | None = None
        self._next_seq = 0
        self._state = _HANDSHAKE
        self._response: tuple[int, str] | None = None
        self._failure: Exception | None = None
        self._method_elements: dict[str, bytes] = {}

    def frame_received(self, frame: bytes) -> None:
        state = self._state
        if state == _HEADER:
            # Fast path: our (and Go's) exact layout with an empty error.
            if len(frame) == self._ok_header_length and frame.startswith(self._ok_header_prefix) \
                    and frame.endswith(_OK_HEADER_SUFFIX):  # fmt: skip
                self._response = (_unpack_i64(frame, self._ok_header_seq_at)[0], "")
                self._state = _BODY
                return
            try:
                seq, error = decode_response_header(frame)
            except (BSONError, ValueError) as e:
                self._fail_connection(ProtocolError(f"undecodable response header: {e}"))
                return
            if not isinstance(seq, int):
                self._fail_connection(ProtocolError(f"response header without seq: {seq!r}"))
                return
            self._response = (seq, error if isinstance(error, str) else "")
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
            if frame[4:9] == _OUT and frame[13] == 0 and frame.endswith(_OK_BODY_SUFFIX):
                n = _unpack_length(frame, 9)[0]
                if len(frame) == 14 + n + _OK_BODY_SUFFIX_LENGTH:
                    try:
                        result = _decode(frame[14 : 14 + n]) if n else {}
                    except (BSONError, ValueError, TypeError) as e:
                        d.errback(RemoteCallError(f"undecodable response body: {e}"))
                        return
                    d.callback(result)
                    return
            try:
                out, errstring = decode_response_body(frame)
                if errstring:
                    d.errback(ServiceError(str(errstring)))
                    return
                result = _decode(out) if out else {}
            except (BSONError, ValueError, TypeError) as e:
                d.errback(RemoteCallError(f"undecodable response body: {e}"))
                return
            d.callback(result)
        elif state == _HANDSHAKE:
            self._handshake(frame)

    def _handshake(self, frame: bytes) -> None:
        try:
            doc = _decode(frame)
        except (BSONError, ValueError) as e:
            self._fail_connection(ProtocolError(f"undecodable service handshake: {e}"))
            return
        # The Go seed writes its handshake before looking at the service's.
        self.send_bytes(EMPTY_DOCUMENT)
        name = doc.get("name")
        if isinstance(name, str) and name and name != self.service_name:
            self._fail_connection(
                ProtocolError(f"expected service {self.service_name!r}, reached {name!r}")
            )
            return
        if not doc.get("registered", False):
            self._fail_connection(ServiceUnregistered(f"{self.service_name} is not registered"))
            return
        clientid = doc.get("clientid")
        self.clientid = clientid if isinstance(clientid, str) else ""
        self._state = _HEADER
        self._header_prefix = string_element(_SERVICEMETHOD, self.servicemethod) + _SEQ64
        self._ok_header_length = 4 + len(self._header_prefix) + 8 + len(_OK_HEADER_SUFFIX)
        self._ok_header_prefix = _pack_i32(self._ok_header_length) + self._header_prefix
        self._ok_header_seq_at = len(self._ok_header_prefix)
        self._clientid_element = string_element(_CLIENTID, self.clientid)
        self.ready.callback(self)

    def send(self, method: str, params: bytes, request_info: RequestInfo, receiver: Any) -> int:
        """
        Send one request; its answer goes to C{receiver.callback(result)}
        or C{receiver.errback(exception)} (a Deferred will do).

        @param params: the encoded parameters document.
        @return: the request's C{seq}, for L{forget}.
        @raise ConnectionFailed: if the connection is not usable.
        """
        if self.lost or self._state != _HEADER and self._state != _BODY:
            raise ConnectionFailed("connection is not ready")
        seq = self._next_seq
        self._next_seq = seq + 1
        self.pending[seq] = receiver
        method_element = self._method_elements.get(method) or self._method_element(method)
        # One copy of the parameters (a chain of + would make several).
        self.send_bytes(
            b"".join(
                (
                    document(self._header_prefix + _pack_i64(seq)),
                    *request_body_parts(
                        self._clientid_element, method_element, request_info, params
                    ),
                )
            )
        )
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
        seq = self._next_seq
        d: Deferred = Deferred(lambda _: self.forget(seq))
        self.send(method, params if encoded else _encode(params), request_info, d)
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
        error = self._failure or ConnectionFailed(
            f"connection to {self.service_name} lost: {reason.getErrorMessage()}"
        )
        if not self.ready.called:
            self.ready.errback(error)
        pending, self.pending = self.pending, {}
        for d in pending.values():
            d.errback(error)
        if self.on_lost is not None:
            self.on_lost(self)

    @property
    def in_flight(self) -> int:
        return len(self.pending)


__all__ = [
    "AdminProtocol",
    "CancelledError",
    "ClientProtocol",
    "DEFAULT_MAX_FRAME",
    "EMPTY_DOCUMENT",
    "FrameProtocol",
    "RequestInfo",
    "ServerProtocol",
    "encode_header",
    "go_quote",
    "new_id",
]
