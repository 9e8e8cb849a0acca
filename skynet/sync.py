"""
A blocking, thread-safe client for code that is not Twisted: scripts, web
applications (Django, Flask), worker threads.

    from skynet.sync import Client

    fib = Client().service("Fibonacci")
    fib.call("Index", {"index": 30})        # {'index': 30, 'value': 832040}

The same discovery (the registry, followed live), load balancing
(L{skynet.client.GoScoreBalancer} by default), hedged retries, timeouts and
errors (L{skynet.errors}) as L{skynet.client}, with the same defaults.

How it works: the registry runs on a private Twisted reactor in one daemon
thread per process (never the global reactor, which stays free for the
program's own use); it keeps each service's list of instances up to date.
A call does not go through that thread: the calling thread picks an
instance and speaks BSON-RPC on a blocking socket of its own (one
connection per thread and instance, kept open), with the codec functions
of L{skynet.protocol}.  So calls from many threads run in parallel, and a
sequential call costs one send and one receive.

Supported: any number of threads calling at once; a process that forks
(the child gets its own background thread and connections on first use,
and never touches the parent's); a program that also runs Twisted's global
reactor in another thread.  Not supported: calling from the thread that
runs a Twisted reactor (it would block that reactor): use L{skynet.client}
there, and L{skynet.aio} from asyncio code.
"""

from __future__ import annotations

import atexit
import os
import select
import socket
import struct
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, NoReturn

import bson
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.python.failure import Failure
from zope.interface import implementer

from skynet import _wire, busypoll, config
from skynet.client import (
    DEFAULT_GIVEUP_TIMEOUT,
    DEFAULT_RETRY_INTERVAL,
    GoScoreBalancer,
    _next_use,
    pick_handle,
)
from skynet.config import environment_defaults
from skynet.errors import (
    ConnectionFailed,
    NoInstances,
    ProtocolError,
    RemoteCallError,
    RequestTimeout,
    ServiceError,
    ServiceUnregistered,
)
from skynet.protocol import (
    DEFAULT_MAX_FRAME,
    EMPTY_DOCUMENT,
    RequestInfo,
    decode_response_body,
    decode_response_header,
    encode_header,
    encode_request_body,
    encode_response_body,
    new_request_id,
)
from skynet.registry.base import IInstanceListener, Instance, Query

__all__ = ["Client", "ServiceClient"]

#: How long one wait on a socket lasts at most, in seconds: the precision of
#: hedging and of the give-up timeout.
_SLICE = 1 / 32

#: How long a call polls for its answer before it sleeps, by default, in
#: seconds (L{Client}'s C{spin}).
DEFAULT_SPIN = 200e-6

# Threads of this process polling at once, at most one per CPU but one (so
# a service on this host keeps a CPU); none on a single CPU.
_spinning: set[int] = set()
_SPINNERS = len(os.sched_getaffinity(0)) - 1 if hasattr(os, "sched_getaffinity") else 0
_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0)
_yield = getattr(os, "sched_yield", lambda: None)

_unpack_i32 = struct.Struct("<i").unpack_from
_pack_i64 = struct.Struct("<q").pack
_unpack_i64 = struct.Struct("<q").unpack_from


# A successful response body, encode_response_body's layout: the length,
# the "out" binary element's head (its length at 9, subtype at 13, data from
# 14), then an empty errstring element and the end.
_EMPTY_BODY = encode_response_body(b"", "")
_OUT_HEAD, _OK_TAIL = _EMPTY_BODY[4:9], _EMPTY_BODY[14:]

#: A connection's first receive buffer; a larger frame gets a larger one.
_BUFFER = 65536

#: Parameters from this size on are sent as they are, not joined with the
#: rest of the request.
_GATHER = 65536


def _timeval(seconds: float) -> bytes:
    whole = int(seconds)
    return struct.pack("@ll", whole, int((seconds - whole) * 1e6))


_CONNECTION_ERRORS = (ConnectionFailed, OSError)


class _Background:
    """
    A private reactor running in a daemon thread: the registry and its
    watches live there.  One per process (see L{_background}).
    """

    def __init__(self) -> None:
        try:
            from twisted.internet.epollreactor import EPollReactor as reactor_type
        except ImportError:  # not Linux
            from twisted.internet.selectreactor import SelectReactor as reactor_type
        reactor = reactor_type()
        # The global reactor's thread stays Twisted's "I/O thread".
        reactor._registerAsIOThread = False
        self.reactor = reactor
        self.pid = os.getpid()
        self.thread = threading.Thread(target=reactor.run, kwargs={"installSignalHandlers": False},
                                       name="skynet.sync reactor", daemon=True)  # fmt: skip
        self.thread.start()

    def run(self, f: Callable[..., Any], *args: Any, timeout: float = 30.0) -> Any:
        """
        Run C{f(*args)} in the reactor thread and wait for its result (it
        may return a Deferred).

        @raise TimeoutError: if no result came within C{timeout} seconds.
        """
        done = threading.Event()
        box: list[Any] = []

        def in_reactor() -> None:
            def finish(result: Any) -> None:
                box.append(result)
                done.set()

            maybeDeferred(f, *args).addBoth(finish)

        self.reactor.callFromThread(in_reactor)
        if not done.wait(timeout):
            raise TimeoutError(f"the skynet.sync reactor did not answer within {timeout} s")
        result = box[0]
        if isinstance(result, Failure):
            result.raiseException()
        return result

    def soon(self, f: Callable[..., Any], *args: Any) -> None:
        self.reactor.callFromThread(f, *args)


_background_lock = threading.Lock()
_background_instance: _Background | None = None
_clients: weakref.WeakSet[Client] = weakref.WeakSet()


def _background() -> _Background:
    global _background_instance
    with _background_lock:
        if _background_instance is None or _background_instance.pid != os.getpid():
            _background_instance = _Background()
        return _background_instance


def _after_fork_in_child() -> None:
    global _background_instance, _background_lock
    # The parent's reactor thread does not exist here, and its lock may
    # have been held by another thread at the fork.
    _background_lock = threading.Lock()
    _background_instance = None
    for client in list(_clients):
        client._forked()


os.register_at_fork(after_in_child=_after_fork_in_child)


@atexit.register
def _close_at_exit() -> None:
    for client in list(_clients):
        try:
            client.close(timeout=2.0)
        except Exception:
            pass  # exiting anyway: the registry's session expires by itself


class _Handle:
    """
    This process's view of one instance, shared by all threads: the figures
    the balancer reads (C{clients}, C{average_response_time},
    C{last_used}) and the eviction state, as in L{skynet.client}.
    """

    def __init__(self, instance: Instance) -> None:
        self.instance = instance
        self.in_flight = 0
        self._lock = threading.Lock()
        self.average_response_time = 0.0
        self.last_used = 0
        self.evicted_until = 0.0
        self.backoff = 0.0

    @property
    def uuid(self) -> str:
        return self.instance.uuid

    @property
    def clients(self) -> int:
        return self.in_flight

    def available(self, now: float) -> bool:
        return now >= self.evicted_until

    def started(self) -> None:
        with self._lock:  # += from several threads would lose counts
            self.in_flight += 1

    def ended(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def used(self) -> None:
        self.last_used = _next_use()

    def evict(self, now: float) -> None:
        """
        Out of rotation for 1 s, doubling up to 30 s while it keeps failing.
        """
        if now < self.evicted_until:
            return
        self.backoff = min(self.backoff * 2 or 1.0, 30.0)
        self.evicted_until = now + self.backoff

    def record(self, elapsed: float) -> None:
        self.backoff = 0.0
        self.evicted_until = 0.0
        if self.average_response_time:
            self.average_response_time += (elapsed - self.average_response_time) * 0.1
        else:
            self.average_response_time = elapsed


class _Connection:
    """
    One blocking socket to one instance, handshake done; used by one thread.

    Received bytes go straight from the socket into this connection's
    buffer, allocated once (and replaced by a larger one for a larger
    frame, never resized: L{view} stays valid); frames are read where they
    lie, and the usual answer's result is decoded from the buffer without
    a copy of the frame.  A request is built from bytes precomputed per
    connection, and a large one is sent with its parameters as they are
    (no join).
    """

    def __init__(self, instance: Instance, connect_timeout: float, max_frame: int,
                 send_timeout: float = DEFAULT_GIVEUP_TIMEOUT) -> None:  # fmt: skip
        self.instance = instance
        self.max_frame = max_frame
        self.servicemethod = f"{instance.name}.Forward"
        # encode_header's output around the seq (an int64 right after the
        # servicemethod element), to compare answers with.
        template = encode_header(self.servicemethod, 0, "")
        at = len(encode_header(self.servicemethod, 0)) - 1 - 8
        self._ok_prefix, self._ok_suffix = template[:at], template[at + 8 :]
        self._ok_length = len(template)
        # A request header up to its seq.
        self._request_prefix = encode_header(self.servicemethod, 0)[:at]
        self.buf = bytearray(_BUFFER)
        self.view = memoryview(self.buf)
        self.start = self.end = 0  # the unread bytes: buf[start:end]
        self.next_seq = 0
        self.closed = False
        self._methods: dict[str, bytes] = {}
        self._backoff = busypoll.Backoff()  # which calls poll for their answers
        try:
            sock = socket.create_connection((instance.host, instance.port), connect_timeout)
        except OSError as e:
            raise ConnectionFailed(
                f"cannot connect to {instance.name} at {instance.host}:{instance.port}: {e}"
            ) from None
        self.sock = sock
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # Go's seed writes its handshake first; so may we.
            sock.sendall(EMPTY_DOCUMENT)
            frame = self.read_frame(time.monotonic() + connect_timeout)
            if frame is None:
                raise ConnectionFailed(f"no handshake from {instance.host}:{instance.port}")
            try:
                doc = bson.decode(frame)
            except Exception as e:
                raise ProtocolError(f"undecodable service handshake: {e}") from None
            name = doc.get("name")
            if isinstance(name, str) and name and name != instance.name:
                raise ProtocolError(f"expected service {instance.name!r}, reached {name!r}")
            if not doc.get("registered", False):
                raise ServiceUnregistered(f"{instance.name} is not registered")
            clientid = doc.get("clientid")
            self.clientid = clientid if isinstance(clientid, str) else ""
            self._clientid_element = _wire.string_element(_wire.CLIENTID, self.clientid)
            # From here on the socket blocks in the kernel, with the kernel's
            # own timeouts: one system call per send and per receive, where
            # Python's timeout mode adds a poll() before each.
            sock.settimeout(None)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(_SLICE))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(send_timeout))
        except BaseException:
            self.close()
            raise

    def _ok_header(self, seq: int) -> bytes:
        """
        The response header of a successful call C{seq}, byte for byte.
        """
        return self._ok_prefix + _pack_i64(seq) + self._ok_suffix

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.closed = True
        self.sock.close()

    # Sending

    def send(self, method: str, params: bytes, info: RequestInfo) -> int:
        seq = self.next_seq
        self.next_seq = seq + 1
        if _wire.FAST:
            method_element = self._methods.get(method)
            if method_element is None:
                method_element = _wire.string_element(_wire.METHOD, method)
                if len(self._methods) < 64:
                    self._methods[method] = method_element
            parts = (self._request_prefix, _pack_i64(seq), b"\x00",
                     *_wire.request_body_parts(self._clientid_element, method_element,
                                               info, params))  # fmt: skip
        else:
            parts = (encode_header(self.servicemethod, seq),
                     encode_request_body(self.clientid, method, info, params))  # fmt: skip
        try:
            if len(params) < _GATHER:
                self.sock.sendall(b"".join(parts))
            else:
                self._send_parts(list(parts))
        except OSError as e:
            # Part of the request may be out (SO_SNDTIMEO): the stream is
            # unusable.
            self._lost(str(e))
        return seq

    def _send_parts(self, parts: list[Any]) -> None:
        """
        Send C{parts} in order with C{sendmsg}, the large parameters as
        they are, however the kernel splits them.
        """
        sock = self.sock
        while parts:
            sent = sock.sendmsg(parts)
            while parts and sent >= len(parts[0]):
                sent -= len(parts.pop(0))
            if sent:
                parts[0] = memoryview(parts[0])[sent:]

    # Receiving

    def _complete(self, pos: int) -> int:
        """
        The length of the frame at C{buf[pos:]} if all of it has arrived,
        else 0 (after making room for it from L{start} on).

        @raise ProtocolError: for a length out of bounds.
        """
        have = self.end - pos
        if have < 4:
            if len(self.buf) - pos < 4:
                self._room(pos - self.start + 4)
            return 0
        length = _unpack_i32(self.buf, pos)[0]
        if length < 5 or length > self.max_frame:
            raise ProtocolError(f"bad frame length {length} from the service")
        if have < length:
            if len(self.buf) - pos < length:
                self._room(pos - self.start + length)
            return 0
        return length  # type: ignore[no-any-return]

    def _room(self, needed: int) -> None:
        """
        Make C{buf} hold C{needed} bytes from L{start}: the unread bytes move
        to its front, into a new larger buffer if need be.
        """
        unread = bytes(self.view[self.start : self.end])
        if needed > len(self.buf):
            self.view.release()
            self.buf = bytearray(max(needed, 2 * len(self.buf)))
            self.view = memoryview(self.buf)
        self.buf[: len(unread)] = unread
        self.start, self.end = 0, len(unread)

    def _consumed(self, pos: int) -> None:
        if pos == self.end:
            self.start = self.end = 0
        else:
            self.start = pos

    def _receive(self) -> bool:
        """
        One receive (waiting at most L{_SLICE}); C{False} if nothing came.

        @raise ConnectionFailed: if the service closed the connection.
        """
        end = self.end
        if end == len(self.buf):
            self._room(end - self.start + 4)
            end = self.end
        try:
            count = self.sock.recv_into(self.view[end:])
        except (BlockingIOError, TimeoutError):  # SO_RCVTIMEO, or the handshake's timeout
            return False
        except OSError as e:
            self._lost(str(e))
        if not count:
            self._lost("closed by the peer")
        self.end = end + count
        return True

    def _lost(self, why: str) -> NoReturn:
        self.close()
        raise ConnectionFailed(f"connection to {self.instance.name} lost: {why}") from None

    def _spin(self, budget: float) -> bool | None:
        """
        Wait for bytes without sleeping, for up to C{budget} seconds: poll
        the socket, yielding the CPU between polls to anything runnable;
        C{False} if nothing came, L{None} if it did not poll (too many
        threads polling already).  An answer expected within microseconds
        comes sooner this way than through a sleep in C{recv}: on these
        machines, waking a thread that sleeps on a socket costs tens of
        microseconds (and more CPU than the polls), the round trip's largest
        single cost.

        @raise ConnectionFailed: if the service closed the connection.
        """
        end = self.end
        if end == len(self.buf) or len(_spinning) >= _SPINNERS or not _DONTWAIT:
            return None
        view = self.view[end:]
        recv_into = self.sock.recv_into
        me = threading.get_ident()
        _spinning.add(me)
        try:
            stop = time.perf_counter() + budget
            while True:
                try:
                    count = recv_into(view, 0, _DONTWAIT)
                    break
                except BlockingIOError:
                    if time.perf_counter() >= stop:
                        return False
                    _yield()
        except OSError as e:
            self._lost(str(e))
        finally:
            _spinning.discard(me)
        if not count:
            self._lost("closed by the peer")
        self.end = end + count
        return True

    def read_frame(self, until: float) -> bytes | None:
        """
        The next frame, or L{None} if none came before C{until}.
        """
        while True:
            start = self.start
            length = self._complete(start)
            if length:
                frame = bytes(self.view[start : start + length])
                self._consumed(start + length)
                return frame
            if time.monotonic() >= until:
                return None
            self._receive()

    def response(self, seq: int, until: float, poll: bool = False,
                 spin: float = 0.0) -> tuple[bool, Any]:  # fmt: skip
        """
        The answer to request C{seq}: C{(True, result)}, C{(True, error)} for
        a L{ServiceError} or L{RemoteCallError}, or C{(False, None)} if it did
        not come before C{until} (with C{poll}: in what has arrived already,
        after one receive).  Answers to older requests are skipped.  With
        C{spin}, the first wait polls for that many seconds (L{_spin})
        before it sleeps; after a poll in vain, the next call sleeps at
        once, then the next two, four, ... (L{busypoll.Backoff}), until a
        poll catches its answer again.

        @raise ConnectionFailed: the connection is unusable.
        """
        received = False
        while True:
            while True:
                start = self.start
                length = self._complete(start)
                if not length:
                    break
                body_length = self._complete(start + length)
                if not body_length:
                    break
                body = start + length
                self._consumed(body + body_length)
                buf = self.buf
                if (
                    length == self._ok_length
                    and _wire.FAST
                    and buf.startswith(self._ok_prefix, start)
                    and _unpack_i64(buf, start + len(self._ok_prefix))[0] == seq
                    and buf.startswith(self._ok_suffix, body - len(self._ok_suffix))
                ):  # the usual answer, as Go writes it
                    return True, self._body_result(body, body_length)
                header = bytes(self.view[start:body])
                try:
                    got, error = decode_response_header(header)
                except Exception as e:
                    raise ProtocolError(f"undecodable response header: {e}") from None
                if got == seq:
                    return True, self._result(error, bytes(self.view[body : body + body_length]))
            if (poll and received) or time.monotonic() >= until:
                return False, None
            if spin:
                spun = self._spin(spin) if self._backoff.ready() else None
                spin = 0.0
                if spun:
                    self._backoff.caught()
                    received = True
                    continue
                if spun is False:
                    self._backoff.missed()
            received = self._receive() or received

    def _body_result(self, pos: int, length: int) -> Any:
        """
        The result in the body at C{buf[pos:pos + length]}, decoded where it
        lies when it has the usual layout C{{out, errstring: ""}}.
        """
        buf = self.buf
        try:
            if buf.startswith(_OUT_HEAD, pos + 4) and buf[pos + 13] == 0:
                n = _unpack_i32(buf, pos + 9)[0]
                out = pos + 14
                if 14 + n + len(_OK_TAIL) == length and buf.startswith(_OK_TAIL, out + n):
                    return bson.decode(self.view[out : out + n]) if n else {}
        except Exception as e:
            return RemoteCallError(f"undecodable response body: {e}")
        return self._result(None, bytes(self.view[pos : pos + length]))

    @staticmethod
    def _result(error: Any, body: bytes) -> Any:
        if isinstance(error, str) and error:
            return RemoteCallError(error)
        try:
            out, errstring = decode_response_body(body)
            if errstring:
                return ServiceError(str(errstring))
            return bson.decode(out) if out else {}
        except Exception as e:
            return RemoteCallError(f"undecodable response body: {e}")


@implementer(IInstanceListener)
class _Watcher:
    """
    Keeps a L{ServiceClient}'s instances up to date; its methods run in the
    background reactor's thread.
    """

    def __init__(self, service: ServiceClient) -> None:
        self.service = service

    def snapshot(self, instances: list[Instance]) -> None:
        self.service._update(instances, [], snapshot=True)

    def added(self, instance: Instance) -> None:
        self.service._update([instance], [])

    def updated(self, instance: Instance) -> None:
        self.service._update([instance], [])

    def removed(self, instance: Instance) -> None:
        self.service._update([], [instance])


class ServiceClient:
    """
    Calls one service, on the registered instances matching a query, from
    any thread.  Obtain one from L{Client.service}.
    """

    def __init__(self, client: Client, query: Query, retry_interval: float,
                 giveup_timeout: float, balancer: Any) -> None:  # fmt: skip
        self.client = client
        self.query = query
        self.retry_interval = retry_interval
        self.giveup_timeout = giveup_timeout
        self.balancer = balancer
        self.handles: dict[str, _Handle] = {}
        self.changed = threading.Condition()
        self.has_snapshot = False
        self._watch: Any = None

    def describe(self) -> str:
        return self.query.describe()

    # Discovery (in the reactor thread)

    def _start_watch(self, registry: Any) -> None:
        self._watch = registry.watch(self.query, _Watcher(self))

    def _update(self, present: list[Instance], gone: list[Instance], snapshot: bool = False):
        with self.changed:
            handles = dict(self.handles)
            for instance in present:
                handle = handles.get(instance.uuid)
                if handle is None or handle.instance.address != instance.address:
                    handles[instance.uuid] = _Handle(instance)
                else:
                    handle.instance = instance
                    handle.evicted_until = 0.0
            for instance in gone:
                handles.pop(instance.uuid, None)
            self.handles = handles  # replaced whole: readers need no lock
            if snapshot:
                self.has_snapshot = True
            self.changed.notify_all()

    def _forked(self) -> None:
        self._watch = None
        self.changed = threading.Condition()

    # Calls (in the caller's thread)

    def _pick(self, exclude: set[str], now: float, fresh_only: bool = False) -> _Handle | None:
        return pick_handle(self.handles, self.balancer, exclude, now, fresh_only)

    def _wait_for_news(self, until: float) -> None:
        error = self.client._start_error
        if error is not None:
            raise ConnectionFailed(f"skynet.sync cannot watch {self.describe()}: {error}")
        with self.changed:
            self.changed.wait(max(0.0, min(0.1, until - time.monotonic())))

    def call(self, method: str, params: dict[str, Any] | None = None,
             request_info: RequestInfo | None = None, *, timeout: float | None = None,
             retry_interval: float | None = None) -> dict[str, Any]:  # fmt: skip
        """
        Call C{method} with C{params} on some instance, retrying as needed,
        and return the result dict.

        If no answer comes within the retry interval, another attempt goes
        to another instance (with C{retrycount} incremented) and the first
        answer wins; a failed connection takes its instance out of rotation
        and the call moves on at once.

        @raise ServiceError: the method failed (the service's message).
        @raise RemoteCallError: the service refused the call.
        @raise RequestTimeout: no answer within C{timeout} (default the
            give-up timeout, 10 s).
        @raise NoInstances: no instance was found within C{timeout}.
        @raise TypeError: C{params} cannot be encoded as BSON.
        """
        return self._call(method, params, request_info, timeout, retry_interval, hedge=True)

    def call_once(self, method: str, params: dict[str, Any] | None = None,
                  request_info: RequestInfo | None = None, *,
                  timeout: float | None = None) -> dict[str, Any]:  # fmt: skip
        """
        Like L{call}, with one attempt only: a failed connection raises
        L{skynet.errors.ConnectionFailed}.
        """
        return self._call(method, params, request_info, timeout, None, hedge=False, once=True)

    def _call(self, method: str, params: dict[str, Any] | None,
              request_info: RequestInfo | None, timeout: float | None,
              retry_interval: float | None, hedge: bool, once: bool = False) -> dict[str, Any]:  # fmt: skip
        client = self.client
        client._ensure_started(self)
        try:
            encoded = _wire.encode_large(params if params is not None else {})
        except Exception as e:
            raise TypeError(f"parameters of {method} cannot be encoded as BSON: {e}") from None
        if request_info is None:
            info = RequestInfo(new_request_id())
        else:
            info = request_info.copy()
            if not info.request_id:
                info.request_id = new_request_id()
        retry = retry_interval or self.retry_interval
        now = time.monotonic()
        deadline = now + (timeout or self.giveup_timeout)
        # (handle, connection, seq, started) of each attempt not answered yet.
        outstanding: list[tuple[_Handle, _Connection, int, float]] = []
        tried: set[str] = set()
        attempts = 0
        last_error: Exception | None = None
        saw_instance = False
        next_hedge = deadline
        # The usual call first, with nothing more than it needs: one attempt
        # on the instance the balancer picks, answered within the retry
        # interval.  Anything else goes on in the loop below, from there.
        handle = self._pick(tried, now) if self.handles and not client.stopped else None
        if handle is not None:
            saw_instance = True
            tried.add(handle.uuid)
            attempts = 1
            if hedge:
                next_hedge = now + retry
            handle.used()
            try:
                connection = client._connection(handle.instance)
                seq = connection.send(method, encoded, info)
            except _CONNECTION_ERRORS as e:
                last_error = self._failed(handle, e)
            else:
                sent = time.monotonic()
                handle.started()
                try:
                    done, result = connection.response(seq, min(deadline, next_hedge),
                                                       spin=client.spin)  # fmt: skip
                except _CONNECTION_ERRORS as e:
                    handle.ended()
                    last_error = self._failed(handle, e)
                else:
                    if done:
                        handle.ended()
                        handle.record(time.monotonic() - sent)
                        if isinstance(result, (ServiceError, RemoteCallError)):
                            raise result
                        return result  # type: ignore[no-any-return]
                    outstanding.append((handle, connection, seq, sent))
        try:
            while True:
                now = time.monotonic()
                if now >= deadline:
                    break
                if client.stopped:
                    raise ConnectionFailed("the client is stopped")
                if not outstanding or (hedge and now >= next_hedge):
                    if once and attempts:
                        if not outstanding:
                            assert last_error is not None
                            raise last_error
                    else:
                        handle = self._pick(tried, now)
                        if handle is None and tried:
                            busy = {a[0].uuid for a in outstanding}
                            handle = self._pick(busy, now, fresh_only=True)
                        if handle is None:
                            if not outstanding:
                                self._wait_for_news(deadline)
                                continue
                            next_hedge = now + retry  # nobody else to ask yet
                        else:
                            saw_instance = True
                            tried.add(handle.uuid)
                            sent_info = info
                            if attempts:
                                sent_info = RequestInfo(info.request_id,
                                                        info.retry_count + attempts,
                                                        info.origin_address,
                                                        info.connection_address)  # fmt: skip
                            attempts += 1
                            next_hedge = now + retry
                            handle.used()
                            try:
                                connection = client._connection(handle.instance)
                                seq = connection.send(method, encoded, sent_info)
                            except _CONNECTION_ERRORS as e:
                                last_error = self._failed(handle, e)
                                continue
                            handle.started()
                            # Timed from the send: a new connection's set-up
                            # is not the instance's response time.
                            outstanding.append((handle, connection, seq, time.monotonic()))
                until = min(deadline, next_hedge) if hedge else deadline
                answer = self._wait(outstanding, until)
                if answer is None:
                    continue
                attempt, result, error = answer
                if error is not None:
                    last_error = error
                    continue
                handle, _, _, started = attempt
                handle.record(time.monotonic() - started)
                for other in outstanding:
                    if other[3] < started:
                        other[0].evict(time.monotonic())  # overtaken by a retry
                if isinstance(result, (ServiceError, RemoteCallError)):
                    raise result
                return result  # type: ignore[no-any-return]
        finally:
            for attempt in outstanding:
                attempt[0].ended()
        if not saw_instance:
            raise NoInstances(f"no instance of {self.describe()} found")
        raise RequestTimeout(
            f"{self.query.service}.{method}: no answer after {attempts} attempt(s)"
            + (f"; last error: {last_error}" if last_error else "")
        )

    def _failed(self, handle: _Handle, error: Exception) -> Exception:
        handle.evict(time.monotonic())
        self.client._forget(handle.uuid)
        if isinstance(error, OSError):
            error = ConnectionFailed(f"connection to {handle.instance.name} failed: {error}")
        return error

    def _wait(self, outstanding: list[tuple[_Handle, _Connection, int, float]],
              until: float) -> tuple[Any, Any, Exception | None] | None:  # fmt: skip
        """
        Wait until C{until} for the first answer among C{outstanding}: the
        attempt and its result, or the attempt and the connection error that
        ended it (removed from C{outstanding} either way); L{None} if none
        came.
        """
        for attempt in outstanding:
            if attempt[1].closed:  # pruned: its instance left the registry
                outstanding.remove(attempt)
                attempt[0].ended()
                return (
                    attempt,
                    None,
                    ConnectionFailed(
                        f"{attempt[0].instance.name} at {attempt[0].instance.address} left"
                    ),
                )
        if len(outstanding) == 1:
            candidates = outstanding
            poll = False
        else:
            timeout = max(0.0, min(_SLICE, until - time.monotonic()))
            readable, _, _ = select.select([a[1] for a in outstanding], [], [], timeout)
            candidates = [a for a in outstanding if a[1] in readable]
            poll = True
        for attempt in candidates:
            handle, connection, seq, _ = attempt
            try:
                done, result = connection.response(seq, until, poll=poll)
            except _CONNECTION_ERRORS as e:
                outstanding.remove(attempt)
                handle.ended()
                return attempt, None, self._failed(handle, e)
            if done:
                outstanding.remove(attempt)
                handle.ended()
                return attempt, result, None
        return None


class Client:
    """
    The entry point for calling services from ordinary (blocking) code.

    @param registry: a registry URL, or L{None} for C{$SKYNET_REGISTRY} or
        the embedded registry.
    @param balancer: a callable making an L{skynet.client.ILoadBalancer}
        per service (default L{GoScoreBalancer} for this client's region
        and host).
    @param region: the region the default balancer prefers (default:
        C{$SKYNET_REGION}; this constructor is an edge, read when called).
    @param host: likewise the host (default: C{$SKYNET_BIND_IP}).
    @param spin: how long a call polls for its answer before its thread
        sleeps on the socket, in seconds (default L{DEFAULT_SPIN}, 200 us;
        0: never poll).  A poll in vain makes the next calls on that
        connection sleep at once (1, 2, 4, ... up to 64 of them) before one
        polls again; one thread at a time per CPU but one polls, none on a
        machine with one CPU.
    @param tune_malloc: make this process's C allocator reuse freed large
        blocks, as L{skynet.client.Client} does (L{skynet.config.tune_malloc};
        C{SKYNET_TUNE_MALLOC=0} says no).
    """

    def __init__(self, registry: str | None = None, *,
                 retry_interval: float = DEFAULT_RETRY_INTERVAL,
                 giveup_timeout: float = DEFAULT_GIVEUP_TIMEOUT,
                 balancer: Callable[[], Any] | None = None, region: str | None = None,
                 host: str | None = None, connect_timeout: float = 2.0,
                 max_frame: int = DEFAULT_MAX_FRAME, spin: float = DEFAULT_SPIN,
                 tune_malloc: bool = True) -> None:  # fmt: skip
        if registry is not None and not isinstance(registry, str):
            raise TypeError("skynet.sync.Client takes a registry URL")
        self.registry_url = registry
        self.retry_interval = retry_interval
        self.giveup_timeout = giveup_timeout
        # An edge: a client built by user code honours Go Skynet's environment.
        env = environment_defaults()
        self.region = region if region is not None else env.region
        self.host = host if host is not None else env.bind_ip
        self.balancer_factory = balancer or (lambda: GoScoreBalancer(self.region, self.host))
        self.connect_timeout = connect_timeout
        self.max_frame = max_frame
        self.spin = busypoll.check_budget(spin, "spin")
        if tune_malloc:
            config.tune_malloc()
        self.services: dict[tuple[Query, float, float], ServiceClient] = {}
        self.stopped = False
        self._lock = threading.Lock()
        self._local = threading.local()
        self._registry: Any = self._make_registry()
        self._registry_started: Deferred | None = None
        self._start_error: str | None = None
        self._all_connections: weakref.WeakSet[_Connection] = weakref.WeakSet()
        _clients.add(self)

    def service(self, name: str, version: str | None = None, region: str | None = None,
                host: str | None = None, *, retry_interval: float | None = None,
                giveup_timeout: float | None = None) -> ServiceClient:  # fmt: skip
        """
        A client for the registered instances of C{name} matching the other
        arguments (L{None}: any).  It does not fail when none exist yet:
        calls wait for one until they give up.
        """
        query = Query(service=name, version=version, region=region, host=host, registered=True)
        key = (query, retry_interval or self.retry_interval,
               giveup_timeout or self.giveup_timeout)  # fmt: skip
        with self._lock:
            existing = self.services.get(key)
            if existing is None:
                existing = self.services[key] = ServiceClient(
                    self, query, key[1], key[2], self.balancer_factory()
                )
        self._ensure_started(existing)
        return existing

    # The background reactor

    def _ensure_started(self, service: ServiceClient) -> None:
        if self.stopped:
            raise ConnectionFailed("the client is stopped")
        if service._watch is not None:
            return
        with self._lock:
            if service._watch is not None:
                return
            service._watch = "starting"
            _background().soon(self._start_in_reactor, service)

    def _start_in_reactor(self, service: ServiceClient) -> None:
        from twisted.logger import Logger

        if self._registry is None:
            self._registry = self._make_registry()
        if self._registry_started is None:
            self._registry_started = maybeDeferred(self._registry.start)

        def failed(failure: Failure) -> None:
            self._start_error = failure.getErrorMessage()
            Logger().failure("skynet.sync: cannot watch {service}", failure,
                             service=service.describe())  # fmt: skip

        started = self._registry_started
        assert started is not None
        started.addCallback(lambda _: service._start_watch(self._registry)).addErrback(failed)

    def _make_registry(self) -> Any:
        """
        The registry of C{registry_url} on the background reactor (not
        started).

        @raise skynet.registry.RegistryError: for a bad URL.
        """
        from skynet.registry import registry_from_url

        return registry_from_url(self.registry_url, reactor=_background().reactor)

    def _forked(self) -> None:
        """
        In a child after C{fork}: the parent's reactor thread, registry and
        sockets are not ours.  Close our copies of the sockets (the parent's
        stay open) and start afresh on first use.
        """
        for connection in list(self._all_connections):
            connection.close()
        self._all_connections = weakref.WeakSet()
        self._local = threading.local()
        self._lock = threading.Lock()
        self._registry = None
        self._registry_started = None
        for service in self.services.values():
            service._forked()

    # Connections, one per thread and instance

    def _connection(self, instance: Instance) -> _Connection:
        connections = getattr(self._local, "connections", None)
        if connections is None:
            connections = self._local.connections = {}
        connection = connections.get(instance.uuid)
        if (
            connection is not None
            and not connection.closed
            and (connection.instance is instance or connection.instance.address == instance.address)
        ):
            return connection  # type: ignore[no-any-return]
        if connection is not None:
            connection.close()
        self._prune(connections)
        connection = _Connection(instance, self.connect_timeout, self.max_frame)
        connections[instance.uuid] = connection
        self._all_connections.add(connection)
        return connection

    def _prune(self, connections: dict[str, _Connection]) -> None:
        """
        Close this thread's connections to instances that left every
        service's rotation (else a long-lived thread would keep a socket to
        each instance that ever went away).
        """
        known: set[str] = set()
        for service in list(self.services.values()):
            known.update(service.handles)
        for uuid in [u for u in connections if u not in known]:
            connections.pop(uuid).close()

    def _forget(self, uuid: str) -> None:
        """
        Drop this thread's connection to an instance (other threads drop
        theirs when they find it broken).
        """
        connections = getattr(self._local, "connections", None)
        if connections:
            connection = connections.pop(uuid, None)
            if connection is not None:
                connection.close()

    def close(self, timeout: float = 30.0) -> None:
        """
        Close every connection and stop the registry this client uses (a
        ZooKeeper session ends at once, rather than when it expires).
        Idempotent; the client cannot be used afterwards.  Clients still
        open when the interpreter exits are closed then.

        @param timeout: seconds the registry has to stop.
        """
        if self.stopped:
            return
        self.stopped = True
        for connection in list(self._all_connections):
            connection.close()
        registry, self._registry = self._registry, None
        if self._registry_started is None:
            registry = None  # never started: nothing to stop
        services = list(self.services.values())

        def stop() -> Any:
            for service in services:
                if service._watch not in (None, "starting"):
                    service._watch.stop()
            if registry is not None:
                return registry.stop()
            return None

        if _background_instance is not None and _background_instance.pid == os.getpid():
            _background().run(stop, timeout=timeout)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()
