"""
Every hand-written BSON codec and exact-layout fast path of the wire
protocol, in one place, behind one switch.

pymongo's C codec costs about 2-3 us per tiny document, a third of a call,
so the fixed-shape documents of the protocol are built and read here
directly.  Readers take only the exact layout Go Skynet and we write, and
hand anything else to C{bson.decode}, so that they accept and reject exactly
what it does; writers produce pymongo's bytes exactly.  The differential
tests (C{tests/test_protocol.py}) compare each of them with the general
path, valid, damaged, short and truncated documents alike.

Set L{FAST} to C{False} (before connections are made) to turn every fast
path off: the module functions then call pymongo, and each L{ServerLayout}
and L{ClientLayout} made afterwards declines every frame.  A layout may
also be made with C{fast=False} on its own.

The module compiles with mypyc as it is (C{python -m benchmarks.wire
--build} measures it so; it did not pay enough to ship, see
docs/benchmarks.md): its constants are C{Final}, L{FAST} is the one global
meant to be set from outside, and frames are typed as what arrives,
C{bytes} or, for a large one, the C{bytearray} receive buffer (a compiled
C{bytes} parameter would refuse the latter).
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Sequence
from typing import Any, ClassVar, Final

import bson
from bson.int64 import Int64
from twisted.internet.main import CONNECTION_LOST as _CONNECTION_LOST

#: The one switch: C{False} sends every document through pymongo.
FAST = True

#: The empty BSON document, the client handshake and error response body.
EMPTY_DOCUMENT: Final = b"\x05\x00\x00\x00\x00"

_INT32_MAX: Final = 2**31 - 1
INT64_MIN: Final = -(2**63)
INT64_MAX: Final = 2**63 - 1

_pack_i32: Final = struct.Struct("<i").pack
_pack_i64: Final = struct.Struct("<q").pack
unpack_length: Final = struct.Struct("<i").unpack_from
_unpack_i64: Final = struct.Struct("<q").unpack_from

#: What the readers take: a whole frame, as L{skynet.protocol.FrameProtocol}
#: and L{skynet.sync} deliver it (a large one may be the receive buffer).
Frame = bytes | bytearray

_encode: Final = bson.encode
_decode: Final = bson.decode

SERVICEMETHOD: Final = b"\x02servicemethod\x00"
SEQ64: Final = b"\x12seq\x00"
_SEQ32: Final = b"\x10seq\x00"
_ERROR: Final = b"\x02error\x00"
OUT: Final = b"\x05out\x00"
_ERRSTRING: Final = b"\x02errstring\x00"
CLIENTID: Final = b"\x02clientid\x00"
METHOD: Final = b"\x02method\x00"
_REQUESTINFO: Final = b"\x03requestinfo\x00"
_ORIGINADDRESS: Final = b"\x02originaddress\x00"
_CONNECTIONADDRESS: Final = b"\x02connectionaddress\x00"
_REQUESTID: Final = b"\x02requestid\x00"
_RETRYCOUNT: Final = b"\x10retrycount\x00"
_IN: Final = b"\x05in\x00"

#: How a response header with an empty error ends, and a body with an empty errstring.
OK_HEADER_SUFFIX: Final = _ERROR + b"\x01\x00\x00\x00\x00\x00"
OK_BODY_SUFFIX: Final = _ERRSTRING + b"\x01\x00\x00\x00\x00\x00"
_OK_BODY_SUFFIX_LENGTH: Final = len(OK_BODY_SUFFIX)

#: What the fast readers may raise on a frame not in their layout.
_DECLINE: Final = (struct.error, UnicodeDecodeError, IndexError)


class _NotFastPath(Exception):
    """
    The document is not in the exact layout the fast readers handle.
    """


_DECLINE_ALL: Final = (_NotFastPath, *_DECLINE)


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


def _read_string(frame: Frame, pos: int) -> tuple[str, int]:
    n = unpack_length(frame, pos)[0]
    end = pos + 3 + n
    if n < 1 or end >= len(frame) or frame[end] != 0:
        raise _NotFastPath()
    return frame[pos + 4 : end].decode("utf-8"), end + 1


# Writers


def encode_header(servicemethod: str, seq: int, error: str | None = None) -> bytes:
    """
    A request header (C{error} is L{None}) or a response header, C{seq}
    as int64: C{{servicemethod, seq[, error]}}.
    """
    if not FAST:
        doc: dict[str, Any] = {"servicemethod": servicemethod, "seq": Int64(seq)}
        if error is not None:
            doc["error"] = error
        return _encode(doc)
    elements = string_element(SERVICEMETHOD, servicemethod) + SEQ64 + _pack_i64(seq)
    if error is not None:
        elements += string_element(_ERROR, error)
    return document(elements)


#: The end of a response body with an empty C{errstring}.
_OK_TAIL: Final = string_element(_ERRSTRING, "") + b"\x00"


def response_body_parts(out: bytes, errstring: str) -> tuple[bytes, ...]:
    """
    The pieces of a response body C{{out: binary, errstring}}, to be joined
    (with the header) in one copy of C{out}.
    """
    if not FAST:
        return (_encode({"out": out, "errstring": errstring}),)
    tail = string_element(_ERRSTRING, errstring) + b"\x00" if errstring else _OK_TAIL
    return (_pack_i32(4 + 5 + len(OUT) + len(out) + len(tail)), OUT,
            _pack_i32(len(out)), b"\x00", out, tail)  # fmt: skip


def response_body_parts_of(out: list[Any], length: int, errstring: str) -> tuple[Any, ...]:
    """
    L{response_body_parts} of an C{out} given in pieces (of L{encode_parts}),
    C{length} bytes in all.
    """
    if not FAST:
        return response_body_parts(b"".join(out), errstring)
    tail = string_element(_ERRSTRING, errstring) + b"\x00"
    return (_pack_i32(4 + 5 + len(OUT) + length + len(tail)), OUT,
            _pack_i32(length), b"\x00", *out, tail)  # fmt: skip


def encode_response_body(out: bytes, errstring: str) -> bytes:
    """
    C{{out: binary, errstring}}.
    """
    return b"".join(response_body_parts(out, errstring))


def request_info_bson(
    request_id: str, retry_count: int, origin_address: str, connection_address: str
) -> dict[str, Any]:
    """
    The Go C{RequestInfo} document, fields in the Go order (C{retrycount}
    as int32, clamped to its range).
    """
    return {
        "originaddress": origin_address,
        "connectionaddress": connection_address,
        "requestid": request_id,
        "retrycount": retry_count if 0 <= retry_count <= _INT32_MAX else _INT32_MAX,
    }


def encode_request_info(info: Any) -> bytes:
    """
    The C{requestinfo} element of a request body, in the Go layout
    (C{info} is a L{skynet.protocol.RequestInfo}).
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


_REQUESTINFO_EMPTY_ADDRESSES: Final = (
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
_END_ID: Final = b"\x00" + _RETRYCOUNT
_EMPTY_ADDRESSES_LENGTH: Final = len(_REQUESTINFO_EMPTY_ADDRESSES)


def request_body_parts(
    clientid_element: bytes, method_element: bytes, info: Any, params: bytes
) -> tuple[bytes, ...]:
    """
    The pieces of a request body C{{clientid, method, requestinfo, in}},
    to be joined (with what goes before it) in one copy of C{params}; the
    client passes its cached C{clientid} and C{method} elements.
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


def encode_request_body(clientid: str, method: str, info: Any, params: bytes) -> bytes:
    """
    C{{clientid, method, requestinfo, in: binary}}; C{params} is the
    encoded parameters document.
    """
    if not FAST:
        return _encode(
            {
                "clientid": clientid,
                "method": method,
                "requestinfo": request_info_bson(
                    info.request_id,
                    info.retry_count,
                    info.origin_address,
                    info.connection_address,
                ),
                "in": params,
            }
        )
    return b"".join(
        request_body_parts(
            string_element(CLIENTID, clientid), string_element(METHOD, method), info, params
        )
    )


#: Documents holding a binary value of at least this many bytes are encoded
#: by L{encode_parts} (pymongo grows its buffer, copying, as it goes).
LARGE_BINARY: Final = 32768

_pack_double: Final = struct.Struct("<d").pack
_INT32_MIN: Final = -(2**31)


def encode_parts(doc: Any) -> tuple[list[Any], int] | None:
    """
    The BSON encoding of C{doc} as pieces to be joined (its large binary
    values as they are, uncopied) and their total length, byte for byte
    what C{bson.encode(doc)} makes; L{None} unless C{doc} is a plain dict
    with plain C{str} keys (no C{"_id"}, which pymongo moves first) whose
    values are plain C{bytes}, C{int}, C{Int64}, C{str}, C{float}, C{bool}
    or L{None}, one of them a binary value of at least L{LARGE_BINARY}
    bytes: anything else, and every small document, is pymongo's.  A
    C{memoryview} of bytes (one dimension, contiguous; L{decode_views} makes
    them) is a binary value too, sent as it is, which pymongo cannot encode.
    """
    if not FAST or type(doc) is not dict:
        return None
    for value in doc.values():  # the usual small document: declined at once
        kind = type(value)
        if (kind is bytes and len(value) >= LARGE_BINARY) or kind is memoryview:
            break
    else:
        return None
    if "_id" in doc:
        return None
    try:
        return _encode_parts(doc)
    except UnicodeEncodeError:
        return None  # pymongo's error, then


def _encode_parts(doc: dict[Any, Any]) -> tuple[list[Any], int] | None:
    parts: list[Any] = [b""]
    head: list[bytes] = []  # the small elements before the next large value
    for key, value in doc.items():
        if type(key) is not str:
            return None
        name = key.encode("utf-8")
        if b"\x00" in name:
            return None
        kind = type(value)
        if kind is memoryview:
            if value.ndim != 1 or value.itemsize != 1 or not value.c_contiguous:
                return None
            kind = bytes
        if kind is bytes:
            head.append(b"\x05" + name + b"\x00" + _pack_i32(len(value)) + b"\x00")
            if len(value) >= 1024:
                parts.append(b"".join(head))
                parts.append(value)
                head = []
            else:
                head.append(value)
        elif kind is int:
            if _INT32_MIN <= value <= _INT32_MAX:
                head.append(b"\x10" + name + b"\x00" + _pack_i32(value))
            elif INT64_MIN <= value <= INT64_MAX:
                head.append(b"\x12" + name + b"\x00" + _pack_i64(value))
            else:
                return None
        elif kind is Int64:  # always 64 bits, as pymongo writes it
            if not INT64_MIN <= value <= INT64_MAX:
                return None
            head.append(b"\x12" + name + b"\x00" + _pack_i64(value))
        elif kind is str:
            head.append(string_element(b"\x02" + name + b"\x00", value))
        elif kind is float:
            head.append(b"\x01" + name + b"\x00" + _pack_double(value))
        elif kind is bool:
            head.append(b"\x08" + name + (b"\x00\x01" if value else b"\x00\x00"))
        elif value is None:
            head.append(b"\x0a" + name + b"\x00")
        else:
            return None
    head.append(b"\x00")
    parts.append(b"".join(head))
    total = 4 + sum(len(p) for p in parts)
    parts[0] = _pack_i32(total)
    return parts, total


_unpack_i32: Final = struct.Struct("<i").unpack_from
_unpack_double: Final = struct.Struct("<d").unpack_from


def decode_views(frame: Frame, start: int, stop: int) -> dict[str, Any] | None:
    """
    C{bson.decode(frame[start:stop])} for a flat document of binary
    (subtype 0), string, int32, int64, double, boolean and null values,
    with each binary value of at least L{LARGE_BINARY} bytes as a read-only
    C{memoryview} of C{frame} instead of a copy; L{None} for anything else
    (nested documents, other types, a damaged document), which is
    pymongo's to decode or reject.  The views keep C{frame} alive.
    """
    if not FAST:
        return None
    try:
        if stop - start < 5 or unpack_length(frame, start)[0] != stop - start:
            return None
        end = stop - 1
        if frame[end] != 0:
            return None
        doc: dict[str, Any] = {}
        view: memoryview | None = None
        pos = start + 4
        while pos < end:
            kind = frame[pos]
            nul = frame.index(0, pos + 1, end)
            key = frame[pos + 1 : nul].decode("utf-8")
            pos = nul + 1
            value: Any
            if kind == 0x05:
                n = unpack_length(frame, pos)[0]
                data = pos + 5
                if n < 0 or data + n > end or frame[pos + 4] != 0:
                    return None
                if n >= LARGE_BINARY:
                    if view is None:
                        view = memoryview(frame).toreadonly()
                    value = view[data : data + n]
                else:
                    value = bytes(frame[data : data + n])
                pos = data + n
            elif kind == 0x10:
                value = _unpack_i32(frame, pos)[0]
                pos += 4
            elif kind == 0x02:
                n = unpack_length(frame, pos)[0]
                if n < 1 or pos + 4 + n > end or frame[pos + 3 + n] != 0:
                    return None
                value = frame[pos + 4 : pos + 3 + n].decode("utf-8")
                pos += 4 + n
            elif kind == 0x12:
                value = Int64(_unpack_i64(frame, pos)[0])
                pos += 8
            elif kind == 0x01:
                value = _unpack_double(frame, pos)[0]
                pos += 8
            elif kind == 0x08:
                if frame[pos] > 1:
                    return None
                value = frame[pos] == 1
                pos += 1
            elif kind == 0x0A:
                value = None
            else:
                return None
            if pos > end:
                return None
            doc[key] = value
        return doc if pos == end else None
    except (*_DECLINE, ValueError):  # ValueError: a name without its NUL
        return None


def encode_for_send(doc: Any) -> bytes | tuple[list[Any], int]:
    """
    C{bson.encode(doc)}, or for a document with a large binary value the
    pieces and length of L{encode_parts}, for a writer to join once with the
    rest of its message (L{request_body_parts_of}).
    """
    encoded = encode_parts(doc)
    return encode_document(doc) if encoded is None else encoded


def encode_document(doc: Any) -> bytes:
    """
    C{bson.encode(doc)}, with the C{memoryview}s anywhere in it (as
    L{decode_views} makes them) encoded as the binary values they show:
    pymongo refuses them, so they are copied, only once it has.
    """
    try:
        return _encode(doc)
    except bson.errors.InvalidDocument:
        plain = _views_as_bytes(doc)
        if plain is doc:
            raise
        return _encode(plain)


def _views_as_bytes(value: Any) -> Any:
    """
    C{value} with each C{memoryview} in its dicts, lists and tuples made
    C{bytes}; C{value} itself if it holds none.
    """
    kind = type(value)
    if kind is memoryview:
        return value.tobytes()
    if kind is dict:
        items = {k: _views_as_bytes(v) for k, v in value.items()}
        return value if all(items[k] is v for k, v in value.items()) else items
    if kind is list or kind is tuple:
        converted = [_views_as_bytes(v) for v in value]
        if all(c is v for c, v in zip(converted, value, strict=True)):
            return value
        return converted if kind is list else tuple(converted)
    return value


def request_body_parts_of(
    clientid_element: bytes, method_element: bytes, info: Any, params: list[Any], length: int
) -> tuple[Any, ...]:
    """
    L{request_body_parts} of parameters given in pieces (of L{encode_parts}),
    C{length} bytes in all.
    """
    elements = clientid_element + method_element + encode_request_info(info) + _IN
    return (_pack_i32(len(elements) + 5 + length + 5), elements, _pack_i32(length),
            b"\x00", *params, b"\x00")  # fmt: skip


def encode_large(doc: Any) -> bytes:
    """
    C{bson.encode(doc)}, with one copy of its large binary values (see
    L{encode_parts}).
    """
    encoded = encode_for_send(doc)
    if isinstance(encoded, bytes):
        return encoded
    return b"".join(encoded[0])


# General readers (fast first, pymongo for anything else)


def decode_header(frame: Frame) -> tuple[Any, Any, Any]:
    """
    Read a request or response header: (servicemethod, seq, error), each
    L{None} where absent; values are not type-checked.

    @raise bson.errors.BSONError: if the document is not valid BSON.
    """
    if FAST:
        try:
            return _fast_header(frame)
        except _DECLINE_ALL:
            pass
    doc = _decode(frame)
    return doc.get("servicemethod"), doc.get("seq"), doc.get("error")


def _fast_header(frame: Frame) -> tuple[str, int, str | None]:
    if frame[4:19] != SERVICEMETHOD:
        raise _NotFastPath()
    servicemethod, pos = _read_string(frame, 19)
    tag = frame[pos : pos + 5]
    if tag == SEQ64:
        seq = _unpack_i64(frame, pos + 5)[0]
        pos += 13
    elif tag == _SEQ32:
        seq = unpack_length(frame, pos + 5)[0]
        pos += 9
    else:
        raise _NotFastPath()
    error = None
    if frame[pos : pos + 7] == _ERROR:
        error, pos = _read_string(frame, pos + 7)
    if pos != len(frame) - 1 or frame[pos] != 0 or unpack_length(frame, 0)[0] != len(frame):
        raise _NotFastPath()
    return servicemethod, seq, error


def decode_response_header(frame: Frame) -> tuple[Any, Any]:
    """
    Read a response header's (seq, error): the servicemethod, which a
    client does not need, is checked but not returned.

    @raise bson.errors.BSONError: if the document is not valid BSON.
    """
    _, seq, error = decode_header(frame)
    return seq, error


def decode_response_body(frame: Frame) -> tuple[Any, Any]:
    """
    Read a response body: (out, errstring), each L{None} where absent.

    @raise bson.errors.BSONError: if the document is not valid BSON.
    """
    if FAST:
        try:
            return _fast_response_body(frame)
        except _DECLINE_ALL:
            pass
    doc = _decode(frame)
    return doc.get("out"), doc.get("errstring")


def _fast_response_body(frame: Frame) -> tuple[bytes, str]:
    if len(frame) < 14 or frame[4:9] != OUT or unpack_length(frame, 0)[0] != len(frame):
        raise _NotFastPath()
    n = unpack_length(frame, 9)[0]
    end = 14 + n
    if n < 0 or frame[13] != 0 or end >= len(frame):
        raise _NotFastPath()
    out = frame[14:end]
    if type(out) is not bytes:  # a large frame may be a bytearray
        out = bytes(out)
    if frame[end : end + 11] != _ERRSTRING:
        raise _NotFastPath()
    errstring, pos = _read_string(frame, end + 11)
    if pos != len(frame) - 1 or frame[pos] != 0:
        raise _NotFastPath()
    return out, errstring


# Per-connection layouts


class ServerLayout:
    """
    The precomputed bytes of one service connection: the exact request
    header for C{<Name>.Forward}, this connection's client id element, and
    the prefix of an answer with an empty error.

    @ivar fast: whether the fast readers are tried at all.
    """

    __slots__ = (
        "fast",
        "forward",
        "_header_length",
        "_header_prefix",
        "_ok_prefix",
        "_clientid_element",
    )

    def __init__(self, service_name: str, clientid: str, fast: bool | None = None) -> None:
        self.fast = FAST if fast is None else fast
        self.forward = f"{service_name}.Forward"
        forward = string_element(SERVICEMETHOD, self.forward) + SEQ64
        self._header_length = 4 + len(forward) + 8 + 1
        self._header_prefix = _pack_i32(self._header_length) + forward
        self._ok_prefix = _pack_i32(4 + len(forward) + 8 + len(OK_HEADER_SUFFIX)) + forward
        self._clientid_element = string_element(CLIENTID, clientid)

    def read_forward_header(self, frame: Frame) -> int | None:
        """
        The C{seq} of C{{servicemethod: "<Name>.Forward", seq: int64}}
        exactly, or L{None} for any other document.
        """
        if (
            self.fast
            and len(frame) == self._header_length
            and frame.startswith(self._header_prefix)
            and frame[-1] == 0
        ):
            return _unpack_i64(frame, self._header_length - 9)[0]  # type: ignore[no-any-return]
        return None

    def ok_header(self, seq: int) -> bytes:
        """
        The response header C{{servicemethod: "<Name>.Forward", seq, error: ""}}.
        """
        if not self.fast:
            return encode_header(self.forward, seq, "")
        return self._ok_prefix + _pack_i64(seq) + OK_HEADER_SUFFIX

    def ok_response(self, seq: int, out: bytes) -> bytes:
        """
        L{ok_header} and the body C{{out, errstring: ""}} in one piece,
        joined once.
        """
        if not self.fast:
            return encode_header(self.forward, seq, "") + encode_response_body(out, "")
        n = len(out)
        return b"".join((
            self._ok_prefix, _pack_i64(seq), OK_HEADER_SUFFIX,
            _pack_i32(9 + len(OUT) + n + len(_OK_TAIL)), OUT, _pack_i32(n), b"\x00", out,
            _OK_TAIL,
        ))  # fmt: skip

    def read_body(self, frame: Frame) -> tuple[str, str, int, Frame] | None:
        """
        Read a request body in the exact layout our client and Go's write,
        with this connection's client id: (method, request id, retry count,
        encoded params); L{None} for anything else (left to bson.decode).
        """
        span = self.read_body_span(frame)
        if span is None:
            return None
        return span[0], span[1], span[2], frame[span[3] : span[4]]

    def read_body_span(self, frame: Frame) -> tuple[str, str, int, int, int] | None:
        """
        L{read_body}, with the encoded params' place in C{frame} (start,
        end) instead of a copy of them.
        """
        if not self.fast:
            return None
        clientid = self._clientid_element
        if not frame.startswith(clientid, 4):
            return None
        try:
            if unpack_length(frame, 0)[0] != len(frame):
                return None
            pos = 4 + len(clientid)
            if frame[pos : pos + 8] != METHOD:
                return None
            method, pos = _read_string(frame, pos + 8)
            if frame.startswith(_REQUESTINFO_EMPTY_ADDRESSES, pos):
                # The request info our clients write (encode_request_info):
                # no addresses and a 36-character id, at known places.
                pos += _EMPTY_ADDRESSES_LENGTH
                if not frame.startswith(_END_ID, pos + 36):
                    return None
                request_id = frame[pos : pos + 36].decode("utf-8")
                pos += 36 + len(_END_ID)
                end = pos + 5
            else:
                if frame[pos : pos + 13] != _REQUESTINFO:
                    return None
                end = pos + 13 + unpack_length(frame, pos + 13)[0]
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
                pos += 12
            retry_count = unpack_length(frame, pos)[0]
            pos += 4
            if pos + 1 != end or frame[pos] != 0 or frame[end : end + 4] != _IN:
                return None
            n = unpack_length(frame, end + 4)[0]
            start = end + 9
            if n < 5 or frame[end + 8] != 0 or start + n + 1 != len(frame) or frame[-1] != 0:
                return None
            return method, request_id, retry_count, start, start + n
        except _DECLINE_ALL:
            return None


class ClientLayout:
    """
    The precomputed bytes of one client connection: the request header
    prefix for C{<Name>.Forward} and the exact answer header with an empty
    error.

    @ivar fast: whether the fast readers and writers are used at all.
    """

    __slots__ = (
        "fast",
        "servicemethod",
        "clientid_element",
        "_header_prefix",
        "_ok_header_length",
        "_ok_header_prefix",
        "_ok_header_seq_at",
        "_header_start",
        "_body_fixed",
    )

    def __init__(self, servicemethod: str, clientid: str, fast: bool | None = None) -> None:
        self.fast = FAST if fast is None else fast
        self.servicemethod = servicemethod
        self._header_prefix = string_element(SERVICEMETHOD, servicemethod) + SEQ64
        self._ok_header_length = 4 + len(self._header_prefix) + 8 + len(OK_HEADER_SUFFIX)
        self._ok_header_prefix = _pack_i32(self._ok_header_length) + self._header_prefix
        self._ok_header_seq_at = len(self._ok_header_prefix)
        self.clientid_element = string_element(CLIENTID, clientid)
        self._header_start = _pack_i32(len(self._header_prefix) + 13) + self._header_prefix
        # A body's length but for its method, request info and parameters.
        self._body_fixed = 4 + len(self.clientid_element) + len(_IN) + 6

    def request(self, seq: int, method_element: bytes, info: Any, params: bytes) -> bytes:
        """
        A whole request in one piece, joined once: L{request_header} for
        C{seq} and the body of L{request_body_parts}.
        """
        if not self.fast:
            return b"".join((
                self.request_header(seq),
                *request_body_parts(self.clientid_element, method_element, info, params),
            ))  # fmt: skip
        requestinfo = encode_request_info(info)
        n = len(params)
        return b"".join((
            self._header_start, _pack_i64(seq), b"\x00",
            _pack_i32(self._body_fixed + len(method_element) + len(requestinfo) + n),
            self.clientid_element, method_element, requestinfo,
            _IN, _pack_i32(n), b"\x00", params, b"\x00",
        ))  # fmt: skip

    def request_header(self, seq: int) -> bytes:
        """
        C{{servicemethod: "<Name>.Forward", seq: int64}}.
        """
        if not self.fast:
            return encode_header(self.servicemethod, seq)
        return document(self._header_prefix + _pack_i64(seq))

    def read_ok_header(self, frame: Frame) -> int | None:
        """
        The C{seq} of our (and Go's) exact answer header with an empty
        error, or L{None} for any other document.
        """
        if (
            self.fast
            and len(frame) == self._ok_header_length
            and frame.startswith(self._ok_header_prefix)
            and frame.endswith(OK_HEADER_SUFFIX)
        ):
            return _unpack_i64(frame, self._ok_header_seq_at)[0]  # type: ignore[no-any-return]
        return None

    def read_ok_body(self, frame: Frame) -> Frame | None:
        """
        The C{out} bytes of C{{out: binary, errstring: ""}} exactly, or
        L{None} for any other document (short ones included).

        @param frame: a whole frame as L{skynet.protocol.FrameProtocol}
            delivers it: its length prefix is its length.
        """
        span = self.read_ok_body_span(frame)
        return None if span is None else frame[span[0] : span[1]]

    def read_ok_body_span(self, frame: Frame) -> tuple[int, int] | None:
        """
        L{read_ok_body}, as the place of C{out} in C{frame} (start, end).
        """
        if (
            self.fast
            and len(frame) >= 14 + _OK_BODY_SUFFIX_LENGTH
            and frame[4:9] == OUT
            and frame[13] == 0
            and frame.endswith(OK_BODY_SUFFIX)
        ):
            n = unpack_length(frame, 9)[0]
            if len(frame) == 14 + n + _OK_BODY_SUFFIX_LENGTH:
                return 14, 14 + n
        return None


# Writing at once to plain TCP


_plain_tcp_types: tuple[type, ...] | None = None


def plain_tcp() -> tuple[type, ...]:
    """
    The transports L{write_now} may write to directly: Twisted's plain TCP
    connections, if their write buffer still has the shape it relies on
    (private attributes of L{twisted.internet.abstract.FileDescriptor},
    pinned by a test); none otherwise, and every write goes the usual way.

    Probed on first use, with a stand-in reactor, so that importing this
    module never installs the global reactor.
    """
    global _plain_tcp_types
    if _plain_tcp_types is None:
        _plain_tcp_types = _probe_plain_tcp() if FAST else ()
    return _plain_tcp_types


def _probe_plain_tcp() -> tuple[type, ...]:
    from twisted.internet import abstract, tcp

    # What write_now and _Queue read, set and replace on the transport.
    needed = ("connected", "disconnecting", "offset", "dataBuffer", "_writeDisconnected",
              "startWriting", "doWrite", "bufferSize", "producer", "streamingProducer",
              "producerPaused")  # fmt: skip
    if not all(hasattr(abstract.FileDescriptor, name) for name in needed):
        return ()
    probe = abstract.FileDescriptor.__new__(abstract.FileDescriptor)
    try:
        abstract.FileDescriptor.__init__(probe, reactor=object())  # type: ignore[arg-type]
    except Exception:
        return ()
    if not isinstance(getattr(probe, "_tempDataBuffer", None), list):
        return ()
    return (tcp.Client, tcp.Server)


def _idle_plain_tcp(transport: Any) -> bool:
    """
    Whether C{transport} is a plain TCP connection, open, with nothing
    waiting in Twisted's buffer: a write may go to its socket at once.
    """
    types = _plain_tcp_types if _plain_tcp_types is not None else plain_tcp()
    return bool(
        FAST
        and type(transport) in types
        and transport.connected
        and not transport.disconnecting
        and not transport.TLS
        and not transport._tempDataBuffer
        and transport.offset == len(transport.dataBuffer)
        and not transport._writeDisconnected
        and "_skynet_queue" not in transport.__dict__
    )


def write_now(transport: Any, data: bytes) -> None:
    """
    Send C{data} at once when the transport holds nothing else to send (a
    plain TCP connection), rather than queueing it for the reactor's next
    round (which costs two epoll_ctl calls and a loop iteration on each side
    of every call); what the socket does not take waits in the transport's
    L{_Queue}, and every other transport gets C{transport.write}.
    """
    if _idle_plain_tcp(transport):
        try:
            sent = transport.socket.send(data)
        except OSError:
            sent = 0  # full, or broken: the queue's write finds out which
        if sent == len(data):
            return
        _Queue.start(transport, [memoryview(data)[sent:] if sent else data])
        return
    if not _Queue.extend(transport, (data,)):
        transport.write(data)


class _Queue:
    """
    What a plain TCP transport has still to send of the frames written by
    L{write_now} and L{write_parts_now}, as the pieces they came in: sent
    with gathered C{sendmsg} calls as the socket takes them, ahead of
    anything in Twisted's own buffer.

    Twisted's buffer would join the pieces into one string, and join again
    each write that comes while it waits (a copy of every large frame, and
    of the tail of a partly sent one), and send it 128 KiB per reactor
    round.  While a queue is there the transport's C{doWrite} is its
    L{do_write}; once empty it hands over to Twisted's, which sends what
    Twisted's buffer holds, stops writing, resumes a paused producer and
    finishes a C{loseConnection}.  Writes stay in order: a write joins the
    queue only while Twisted's buffer is empty, and Twisted's buffer is
    sent after the queue.  A streaming producer is paused when the queue
    holds more than the transport's C{bufferSize}, as Twisted's buffer
    would pause it.
    """

    __slots__ = ("transport", "parts", "size")

    #: Pieces per C{sendmsg} at most (Linux's IOV_MAX is 1024).
    IOV = 512

    def __init__(self, transport: Any, parts: list[Any]) -> None:
        self.transport = transport
        self.parts = parts
        self.size = sum(map(len, parts))

    @classmethod
    def start(cls, transport: Any, parts: list[Any]) -> None:
        queue = cls(transport, parts)
        transport._skynet_queue = queue
        transport.doWrite = queue.do_write
        queue.push_back()
        transport.startWriting()

    @staticmethod
    def extend(transport: Any, parts: Sequence[Any]) -> bool:
        """
        Queue C{parts} behind the transport's queue, if it has one and
        Twisted's buffer is empty; L{False} if not queued.
        """
        queue = getattr(transport, "_skynet_queue", None) if FAST else None
        if (
            queue is None
            or transport._tempDataBuffer
            or transport.offset != len(transport.dataBuffer)
            or not transport.connected
        ):
            return False
        queue.parts.extend(parts)
        queue.size += sum(map(len, parts))
        queue.push_back()
        return True

    def push_back(self) -> None:
        transport = self.transport
        producer = transport.producer
        if (
            producer is not None
            and transport.streamingProducer
            and not transport.producerPaused
            and self.size > transport.bufferSize
        ):
            transport.producerPaused = True
            producer.pauseProducing()

    def do_write(self) -> Any:
        """
        The transport's C{doWrite} while the queue holds something: send
        what the socket takes; when all is sent, Twisted's own C{doWrite}.
        """
        transport, parts = self.transport, self.parts
        while parts:
            batch = parts[: self.IOV]
            try:
                sent = transport.socket.sendmsg(batch)
            except BlockingIOError:
                return None
            except InterruptedError:
                continue
            except OSError as e:
                if e.errno == errno.ENOBUFS:
                    return None
                return _CONNECTION_LOST
            self.size -= sent
            _drop_sent(parts, sent)
            if sent < sum(map(len, batch)):
                return None  # the socket is full: wait until it takes more
        del transport.doWrite
        del transport._skynet_queue
        return transport.doWrite()


def _drop_sent(parts: list[Any], sent: int) -> None:
    """
    Drop from the pieces C{parts}, in place, the first C{sent} bytes: the
    pieces sent whole, and the sent start of the next (a view of its rest).
    """
    done = 0
    for part in parts:
        size = len(part)
        if sent < size:
            break
        sent -= size
        done += 1
    del parts[:done]
    if sent:
        parts[0] = memoryview(parts[0])[sent:]


class _CountingDocument(dict):  # type: ignore[type-arg]
    """
    A decoded document that counts every element set in it, duplicate
    names included (a plain dict keeps one of a million C{"a"}s).
    """

    elements: ClassVar[int] = 0

    def __setitem__(self, key: Any, value: Any) -> None:
        _CountingDocument.elements += 1
        super().__setitem__(key, value)


_COUNTING: Final = bson.CodecOptions(document_class=_CountingDocument)


def count_elements(data: Frame, depth: int = 0) -> int:
    """
    The number of elements of the BSON document C{data}, those of nested
    documents and arrays included, and those of binary values that hold a
    document (as C{in} holds the parameters).  Run in a worker process:
    decoding a large document holds the GIL for as long as it takes.

    @raise Exception: whatever C{bson.decode} raises for C{data}.
    """
    _CountingDocument.elements = 0
    doc = bson.decode(data, codec_options=_COUNTING)
    total = _CountingDocument.elements
    stack: list[Any] = [doc]
    nested: list[bytes] = []
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            stack.extend(value.values())
        elif type(value) is list:
            total += len(value)
            stack.extend(value)
        elif isinstance(value, bytes) and len(value) >= 5 and depth < 2:
            if unpack_length(value, 0)[0] == len(value) and value[-1] == 0:
                nested.append(value)
    for inner in nested:
        try:
            total += count_elements(inner, depth + 1)
        except Exception:
            pass  # a blob, not a document: the method gets it as bytes
    return total


# Writing large answers without joining them


#: Below this many bytes the pieces of a frame are joined (one small copy
#: beats a gathered send); at and above, they are sent as they are.
GATHER = 64 * 1024


def write_parts_now(transport: Any, parts: Sequence[Any]) -> None:
    """
    Send the pieces C{parts} of a large frame in order, with one gathered
    C{sendmsg} when the transport holds nothing else to send (a plain TCP
    connection, as for L{write_now}): a large result goes from its encoded
    pieces to the socket without being joined first.  What the socket does
    not take waits in the transport's L{_Queue}, still in pieces; every
    other transport gets C{writeSequence}.
    """
    if len(parts) <= _Queue.IOV and _idle_plain_tcp(transport):
        try:
            sent = transport.socket.sendmsg(parts)
        except OSError:
            sent = 0  # full, or broken: the queue's write finds out which
        rest = list(parts)
        _drop_sent(rest, sent)
        if rest:
            _Queue.start(transport, rest)
        return
    if not _Queue.extend(transport, parts):
        transport.writeSequence([p if type(p) is bytes else bytes(p) for p in parts])


# A bound on the elements of a request, without reading every byte

#: Elements walked at most before falling back to counting NUL bytes.
_WALK_BUDGET = 256

#: BSON element types of a fixed value size.
_FIXED = {0x01: 8, 0x07: 12, 0x08: 1, 0x09: 8, 0x0A: 0, 0x06: 0, 0x10: 4, 0x11: 8, 0x12: 8,
          0x13: 16, 0xFF: 0, 0x7F: 0}  # fmt: skip
#: Types whose value is an int32 length and that many bytes.
_SIZED = {0x02: 4, 0x0D: 4, 0x0E: 4}


def element_bound(data: Any, start: int, stop: int) -> int:
    """
    An upper bound of the elements of the BSON document at
    C{data[start:stop]} as L{count_elements} counts them (nested documents
    and arrays, and documents held in binary values): the exact count of a
    walk over the elements, which jumps over strings and binary values in
    one step, with the NUL bytes of a binary value that could hold a
    document counted instead of its elements (every element name ends in
    one); or, when the walk meets more than L{_WALK_BUDGET} elements or a
    layout it does not know, the NUL bytes of the whole span, as before.
    A few large values cost a few steps rather than a scan of every byte.
    """
    counted = _walk(data, start, stop, [0])
    if counted is None:
        return data.count(0, start, stop)  # type: ignore[no-any-return]
    return counted


def _walk(data: Any, start: int, stop: int, steps: list[int]) -> int | None:
    if stop - start < 5 or unpack_length(data, start)[0] != stop - start or data[stop - 1]:
        return None
    total = 0
    pos = start + 4
    end = stop - 1
    while pos < end:
        steps[0] += 1
        if steps[0] > _WALK_BUDGET:
            return None
        kind = data[pos]
        name_end = data.find(0, pos + 1, end)
        if name_end < 0:
            return None
        pos = name_end + 1
        total += 1
        size = _FIXED.get(kind)
        if size is not None:
            pos += size
        elif kind in _SIZED:
            if pos + 4 > end:
                return None
            pos += 4 + unpack_length(data, pos)[0]
        elif kind == 0x03 or kind == 0x04:
            if pos + 4 > end:
                return None
            inner_end = pos + unpack_length(data, pos)[0]
            if inner_end > end:
                return None
            inner = _walk(data, pos, inner_end, steps)
            if inner is None:
                return None
            total += inner
            pos = inner_end
        elif kind == 0x05:
            if pos + 5 > end:
                return None
            n = unpack_length(data, pos)[0]
            value = pos + 5
            pos = value + n
            if n < 0 or pos > end:
                return None
            if n >= 5 and unpack_length(data, value)[0] == n and data[pos - 1] == 0:
                total += data.count(0, value, pos)  # it may hold a document
        else:
            return None  # regex, code with scope, DBPointer...: not walked
        if pos > end:
            return None
    return total if pos == end else None
