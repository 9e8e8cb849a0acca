"""
Clients: find instances of a service through the registry, keep a pool of
connections to each, balance calls over them, retry and time out.

    client = Client()
    fib = client.service("Fibonacci")
    result = await fib.call("Index", {"index": 10})

A call goes to the best instance (see L{GoScoreBalancer}).  If no answer
comes within the retry interval, an extra attempt goes to another instance
and the first answer wins; a connection that fails takes its instance out of
rotation at once and the call moves on; after the give-up timeout the call
fails with L{RequestTimeout}.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, fail, maybeDeferred, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectError, ConnectionLost
from twisted.internet.error import TimeoutError as TxTimeoutError
from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from skynet import _wire, busypoll, config
from skynet.config import default_reactor
from skynet.errors import (
    ConnectionFailed,
    NoInstances,
    RemoteCallError,
    RequestTimeout,
    ServiceError,
    ServiceUnregistered,
)
from skynet.observe import tracing as _trace  # (trace hook)
from skynet.protocol import DEFAULT_MAX_FRAME, ClientProtocol, RequestInfo, new_request_id
from skynet.registry.base import IInstanceListener, Instance, Query

DEFAULT_RETRY_INTERVAL = 2.0
DEFAULT_GIVEUP_TIMEOUT = 10.0

_encode = _wire.encode_for_send


class ILoadBalancer(Interface):
    """
    Chooses the instance for the next attempt of a call.
    """

    def choose(candidates: list["InstanceHandle"]) -> "InstanceHandle":
        """
        @param candidates: a non-empty list of handles.
        @return: one of them.
        """


def pick_handle(handles: dict[str, Any], balancer: Any, exclude: Any, now: float,
                fresh_only: bool = False) -> Any:  # fmt: skip
    """
    The rule both clients (this one and L{skynet.sync}) choose by: the
    C{balancer}'s choice among the C{handles} (uuid -> handle with C{uuid},
    C{available(now)} and C{evicted_until}) in rotation and not in
    C{exclude}; failing that, the evicted one due back soonest (unless
    C{fresh_only}); L{None} if there is none.
    """
    if not handles:
        return None
    if not exclude and len(handles) == 1:
        (only,) = handles.values()
        return only if only.available(now) or not fresh_only else None
    candidates = [h for h in handles.values() if h.uuid not in exclude and h.available(now)]
    if not candidates:
        if fresh_only:
            return None
        candidates = [h for h in handles.values() if h.uuid not in exclude]
        if not candidates:
            return None
        return min(candidates, key=lambda h: h.evicted_until)
    return balancer.choose(candidates)


@implementer(ILoadBalancer)
class GoScoreBalancer:
    """
    Go Skynet's scoring: same region +10, same host +3, at or over the
    critical client count -15, at or over the critical average response
    time -17; the best score wins, and among equals the one whose last
    request is oldest (so equals take turns).
    """

    def __init__(self, region: str | None = None, host: str | None = None) -> None:
        self.region = region
        self.host = host

    def score(self, handle: "InstanceHandle") -> int:
        instance = handle.instance
        score = 0
        if self.region is not None and instance.region == self.region:
            score += 10
        if self.host is not None and instance.host == self.host:
            score += 3
        if handle.clients >= instance.critical_client_count:
            score -= 15
        if handle.average_response_time >= instance.critical_average_response_time:
            score -= 17
        return score

    def choose(self, candidates: list["InstanceHandle"]) -> "InstanceHandle":
        if len(candidates) == 1:
            return candidates[0]
        score = self.score
        best = candidates[0]
        best_key = (score(best), -best.last_used)
        for handle in candidates[1:]:
            key = (score(handle), -handle.last_used)
            if key > best_key:
                best, best_key = handle, key
        return best


@implementer(ILoadBalancer)
class RoundRobinBalancer:
    """
    Each instance in turn.
    """

    def __init__(self) -> None:
        self._next = 0

    def choose(self, candidates: list["InstanceHandle"]) -> "InstanceHandle":
        self._next += 1
        return candidates[self._next % len(candidates)]


class _ClientFactory(Factory):
    def __init__(self, service_name: str, max_frame: int) -> None:
        self.service_name = service_name
        self.max_frame = max_frame

    def buildProtocol(self, addr: Any) -> ClientProtocol:
        return ClientProtocol(self.service_name, self.max_frame)


def tcp_connector(reactor: Any, connect_timeout: float, max_frame: int) -> Callable[..., Deferred]:
    """
    The default way to reach an instance: TCP, then the handshake, both
    within C{connect_timeout}.
    """

    def connect(instance: Instance) -> Deferred:
        if instance.extra.get("TLS"):  # security hook (issue 12): TLS when advertised
            from skynet.tls import instance_endpoint

            endpoint = instance_endpoint(reactor, instance, connect_timeout)
        else:
            endpoint = TCP4ClientEndpoint(
                reactor, instance.host, instance.port, timeout=connect_timeout
            )
        d = endpoint.connect(_ClientFactory(instance.name, max_frame))

        def connected(protocol: ClientProtocol) -> Deferred:
            if protocol.ready.called:
                return protocol.ready
            timer = reactor.callLater(connect_timeout, protocol.ready.cancel)

            def done(result: Any) -> Any:
                if timer.active():
                    timer.cancel()
                if isinstance(result, Failure) and result.check(CancelledError):
                    protocol.transport.abortConnection()  # type: ignore[union-attr]
                    return Failure(ConnectionFailed(f"no handshake from {instance.address}"))
                return result

            return protocol.ready.addBoth(done)

        return d.addCallback(connected)  # type: ignore[call-overload]

    return connect


#: The order of a call among all of this process's calls (L{InstanceHandle.last_used}).
#: A counter, not a class attribute: writing to a class on every call would
#: invalidate the interpreter's attribute caches for all its instances.
_next_use = itertools.count(1).__next__


class InstanceHandle:
    """
    A client's view of one instance: its pool of connections and what this
    client has measured of it.

    @ivar clients: connected clients, from the instance's statistics when
        known (else this client's calls in flight).
    @ivar average_response_time: moving average of this client's calls.
    @ivar last_request: when this client last sent it a call.
    @ivar last_used: the order of that call among all of this process's
        calls (a tie-breaker finer than the clock).
    """

    log = Logger()

    def __init__(self, owner: "ServiceClient", instance: Instance) -> None:
        self.owner = owner
        self.instance = instance
        self.connections: list[ClientProtocol] = []
        self.remote_clients: int | None = None
        self.average_response_time = 0.0
        self.last_request = 0.0
        self.last_used = 0
        self.evicted_until = 0.0
        self.backoff = 0.0
        self.probing = False
        self.probe: _Attempt | None = None
        self.retired = False
        self._connecting: Deferred | None = None
        self._waiting: list[tuple[_Attempt, str, bytes, RequestInfo]] = []

    @property
    def uuid(self) -> str:
        return self.instance.uuid

    @property
    def clients(self) -> int:
        if self.remote_clients is not None:
            return self.remote_clients
        return sum(c.in_flight for c in self.connections)

    def available(self, now: float) -> bool:
        """
        In rotation: not evicted, and, after an eviction, not waiting for
        the answer to the one call that probes it.
        """
        return now >= self.evicted_until and (not self.probing or self.probe is None)

    def send(self, attempt: "_Attempt", method: str, encoded: Any, info: RequestInfo) -> None:
        """
        Send one attempt of a call on a pooled connection (connecting first
        if there is none); its answer goes to C{attempt}.

        @raise ConnectionFailed: if the chosen connection is already gone.
        """
        self.last_request = attempt.started
        if self.probing and self.probe is None:
            self.probe = attempt
        self.last_used = _next_use()
        connection = self._pick_connection()
        if connection is not None:
            attempt.connection = connection
            attempt.seq = connection.send(method, encoded, info, attempt)
            return
        self._waiting.append((attempt, method, encoded, info))
        if self._connecting is None:
            self._connect()

    def _pick_connection(self) -> ClientProtocol | None:
        connections = self.connections
        if not connections:
            return None
        limit = self.owner.client.max_in_flight_per_connection
        best = connections[0]
        least = len(best.pending)  # (in_flight, without the property's call)
        if least < limit:
            return best
        for c in connections[1:]:
            n = len(c.pending)
            if n < least:
                best, least = c, n
                if n < limit:
                    return c
        if len(connections) < self.owner.client.max_connections and self._connecting is None:
            self._connect()
        return best

    def _connect(self) -> None:
        client = self.owner.client
        self._connecting = maybeDeferred(client.connector, self.instance)
        self._connecting.addCallbacks(self._connected, self._connect_failed)

    def _connected(self, protocol: ClientProtocol) -> None:
        self._connecting = None
        if self.retired or self.owner.stopped:
            protocol.transport.loseConnection()  # type: ignore[union-attr]
            self._fail_waiting(ConnectionFailed(f"{self.instance.address} left rotation"))
            return
        protocol.on_lost = self._lost
        protocol.binary_views = self.owner.binary_views
        self.connections.append(protocol)
        self.backoff = 0.0
        waiting, self._waiting = self._waiting, []
        for attempt, method, encoded, info in waiting:
            if attempt.done:
                continue
            try:
                attempt.connection = protocol
                attempt.seq = protocol.send(method, encoded, info, attempt)
            except ConnectionFailed as e:
                attempt.errback(e)

    def _connect_failed(self, failure: Failure) -> None:
        self._connecting = None
        error = failure.value
        if not isinstance(error, ConnectionFailed):
            error = ConnectionFailed(
                f"cannot connect to {self.instance.name} at {self.instance.address}: "
                f"{failure.getErrorMessage()}"
            )
        self.evict(str(error))
        self._fail_waiting(error)

    def _fail_waiting(self, error: Exception) -> None:
        waiting, self._waiting = self._waiting, []
        for attempt, _, _, _ in waiting:
            if not attempt.done:
                attempt.errback(error)

    def _lost(self, protocol: ClientProtocol) -> None:
        try:
            self.connections.remove(protocol)
        except ValueError:
            return
        # A service may close a connection idle too long; only one lost with
        # calls on it (or broken) says something about the instance.
        if not protocol.closed_by_us and protocol.lost_with_calls:
            self.evict("connection lost")

    def evict(self, why: str) -> None:
        """
        Take this instance out of rotation for a while (1 s, doubling up to
        30 s while it keeps failing), without waiting for the registry.
        """
        now = self.owner.client.reactor.seconds()
        if now < self.evicted_until:
            # Out of rotation already: the same trouble, reported by another
            # attempt (a hung instance overtakes every call it holds at once).
            return
        self.backoff = min(self.backoff * 2 or 1.0, 30.0)
        self.evicted_until = now + self.backoff
        # When the time is up, one call probes it before it gets its share.
        self.probing = True
        self.probe = None
        self.log.info(
            "{service} instance {uuid} at {address} out of rotation for {backoff}s: {why}",
            service=self.instance.name,
            uuid=self.instance.uuid,
            address=self.instance.address,
            backoff=self.backoff,
            why=why,
        )

    def record(self, elapsed: float) -> None:
        """
        It answered a call: back in rotation, its back-off starts over.
        """
        self.backoff = 0.0
        self.probing = False
        self.probe = None
        if self.average_response_time:
            self.average_response_time += (elapsed - self.average_response_time) * 0.1
        else:
            self.average_response_time = elapsed

    def trim(self, max_idle: int) -> None:
        """
        Close idle connections beyond C{max_idle} (all of them if retired).
        """
        keep = 0 if self.retired else max_idle
        idle = [c for c in self.connections if not c.in_flight]
        for c in idle[keep:]:
            self.close(c)

    def close(self, protocol: ClientProtocol) -> None:
        protocol.closed_by_us = True
        if protocol in self.connections:
            self.connections.remove(protocol)
        if protocol.transport is not None:
            protocol.transport.loseConnection()

    def close_all(self) -> None:
        for c in list(self.connections):
            self.close(c)
        self._fail_waiting(ConnectionFailed("client stopped"))


_CONNECTION_ERRORS = (ConnectionFailed, ConnectError, ConnectionLost, TxTimeoutError, OSError)


class _Wheel:
    """
    The timers of all calls of a client: retry and give-up times, rounded up
    to 1/32 s, in buckets served by one reactor timer.  Adding and removing
    a timer is a set operation, where a DelayedCall per call would cost a
    heap push, a cancel and a heap rebuild now and then.
    """

    RESOLUTION = 32  # ticks per second; a power of two, so times are exact

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.buckets: dict[int, set[Any]] = {}
        self.timer: Any = None
        self.timer_key = 0

    def add(self, call: Any, due: float) -> int:
        """
        Call C{call._tick()} at C{due} (or up to 1/32 s later).
        @return: the key to L{discard} it with.
        """
        key = math.ceil(due * self.RESOLUTION)
        bucket = self.buckets.get(key)
        if bucket is None:
            bucket = self.buckets[key] = set()
            if self.timer is None or key < self.timer_key:
                self._schedule(key)
        bucket.add(call)
        return key

    def discard(self, call: Any, key: int) -> None:
        bucket = self.buckets.get(key)
        if bucket is not None:
            bucket.discard(call)

    def _schedule(self, key: int) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer_key = key
        delay = max(0.0, key / self.RESOLUTION - self.reactor.seconds())
        self.timer = self.reactor.callLater(delay, self._fire)

    def _fire(self) -> None:
        self.timer = None
        now = math.floor(self.reactor.seconds() * self.RESOLUTION + 1e-6)
        for key in sorted(k for k in self.buckets if k <= now):
            for call in self.buckets.pop(key):
                call._tick()
        # A call's _tick above may have set the timer for its own new time,
        # later than buckets still waiting: the timer is for the earliest.
        if self.buckets:
            first = min(self.buckets)
            if self.timer is None or first < self.timer_key:
                self._schedule(first)

    def stop(self) -> list[Any]:
        """
        Stop; return the calls that had timers (every call not finished).
        """
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        calls = [call for bucket in self.buckets.values() for call in bucket]
        self.buckets.clear()
        return calls


class _Attempt:
    """
    One attempt of a call on one instance; the connection answers it
    directly (C{callback}/C{errback}), without a Deferred of its own.
    """

    __slots__ = ("call", "handle", "started", "connection", "seq", "done")

    def __init__(self, call: "_Call", handle: InstanceHandle, started: float) -> None:
        self.call = call
        self.handle = handle
        self.started = started
        self.connection: ClientProtocol | None = None
        self.seq = -1
        self.done = False

    def callback(self, result: dict[str, Any]) -> None:
        if not self.done:
            self.done = True
            self.call._succeeded(self, result)

    def errback(self, error: Any) -> None:
        if not self.done:
            self.done = True
            if isinstance(error, Failure):
                error = error.value
            self.call._failed(self, error)

    def cancel(self) -> None:
        """
        Forget this attempt: a late answer is dropped.
        """
        self.done = True
        if self.handle.probe is self:
            self.handle.probe = None  # another call may probe it
        if self.connection is not None:
            self.connection.forget(self.seq)


class _Call:
    """
    One call with its attempts, retries, hedging and give-up.
    """

    __slots__ = (
        "service",
        "method",
        "encoded",
        "info",
        "retry_interval",
        "deadline",
        "result",
        "outstanding",
        "tried",
        "attempts",
        "timer",
        "wheel",
        "done",
        "saw_instance",
        "last_error",
        "hedge",
        "waiting",
        "last_sent",
        "started",
        "trace",
    )

    def __init__(
        self,
        service: "ServiceClient",
        method: str,
        encoded: Any,  # bytes, or pieces and length (encode_for_send)
        info: RequestInfo,
        retry_interval: float,
        timeout: float,
        hedge: bool,
    ) -> None:
        self.service = service
        self.method = method
        self.encoded = encoded
        self.info = info
        self.retry_interval = retry_interval
        self.hedge = hedge
        reactor = service.client.reactor
        self.started = now = reactor.seconds()
        self.deadline = now + timeout
        #: The parent span id when spans are recorded (0: a root), else None.
        self.trace: int | None = None
        self.result: Deferred = Deferred(self._cancelled)
        self.outstanding: list[_Attempt] = []
        self.tried: set[str] = set()
        self.attempts = 0
        self.done = False
        self.saw_instance = False
        self.waiting = False
        self.last_sent = 0.0
        self.last_error: Exception | None = None
        self.wheel = service.client.wheel
        self.timer: int | None = self.wheel.add(self, self.deadline - timeout
                                                   + min(retry_interval, timeout))  # fmt: skip

    def start(self) -> Deferred:
        self._attempt()
        return self.result

    def _attempt(self) -> None:
        service = self.service
        now = service.client.reactor.seconds()
        handle = pick_handle(service.handles, service.balancer, self.tried, now)
        if handle is None and self.tried:
            busy = {a.handle.instance.uuid for a in self.outstanding}
            handle = pick_handle(service.handles, service.balancer, busy, now, fresh_only=True)
        if handle is None:
            if not self.outstanding and not self.waiting:
                # Nothing to try now: look again soon, and at once on news.
                self.waiting = True
                service.waiters.append(self._wake)
                soon = math.ceil((now + 0.1) * _Wheel.RESOLUTION)
                if self.timer is not None and self.timer > soon:
                    self.wheel.discard(self, self.timer)
                    self.timer = self.wheel.add(self, now + 0.1)
            return
        self.saw_instance = True
        self.tried.add(handle.instance.uuid)
        info = self.info
        if self.attempts:
            info = RequestInfo(
                info.request_id,
                info.retry_count + self.attempts,
                info.origin_address,
                info.connection_address,
            )
        self.attempts += 1
        self.last_sent = now
        attempt = _Attempt(self, handle, now)
        self.outstanding.append(attempt)
        try:
            handle.send(attempt, self.method, self.encoded, info)
        except ConnectionFailed as e:
            attempt.errback(e)

    def _wake(self) -> None:
        self.waiting = False
        if not self.done and not self.outstanding:
            self._attempt()

    def _succeeded(self, attempt: _Attempt, result: dict[str, Any]) -> None:
        self.outstanding.remove(attempt)
        if self.done:
            return
        attempt.handle.record(self.service.client.reactor.seconds() - attempt.started)
        for overtaken in self.outstanding:
            # An instance that a later retry beat is hung or overloaded:
            # keep new calls away from it for a while.
            if overtaken.started < attempt.started:
                overtaken.handle.evict("overtaken by a retry on another instance")
        self._finish(None, attempt)
        self.result.callback(result)

    def _failed(self, attempt: _Attempt, error: BaseException) -> None:
        self.outstanding.remove(attempt)
        if self.done:
            return
        handle = attempt.handle
        if isinstance(error, (ServiceError, RemoteCallError)):
            handle.record(self.service.client.reactor.seconds() - attempt.started)
            self._finish(error, attempt)
            self.result.errback(error)
            return
        if not isinstance(error, _CONNECTION_ERRORS):
            self._finish(error, attempt)
            self.result.errback(error)
            return
        handle.evict("unregistered" if isinstance(error, ServiceUnregistered) else str(error))
        self.last_error = error  # type: ignore[assignment]
        if not self.outstanding:
            self._attempt()

    def _tick(self) -> None:
        self.timer = None
        if self.done:
            return
        reactor = self.service.client.reactor
        now = reactor.seconds()
        remaining = self.deadline - now
        if remaining <= 1e-6:
            self._give_up()
            return
        if self.outstanding:
            # Hedge a retry interval after the latest attempt (a tick set
            # while waiting for an instance may come sooner than that).
            since = now - self.last_sent
            if since + 1 / 64 >= self.retry_interval:
                if self.hedge:
                    self._attempt()
                delay = self.retry_interval
            else:
                delay = self.retry_interval - since
        else:
            self._attempt()
            delay = 0.1 if not self.outstanding else self.retry_interval
        if not self.done and self.timer is None:
            self.timer = self.wheel.add(self, now + min(delay, remaining))

    def _give_up(self) -> None:
        service = self.service
        if not self.saw_instance:
            error: Exception = NoInstances(f"no instance of {service.describe()} found")
        else:
            error = RequestTimeout(
                f"{service.query.service}.{self.method}: no answer after "
                f"{self.attempts} attempt(s)"
                + (f"; last error: {self.last_error}" if self.last_error else "")
            )
        self._finish(error)
        self.result.errback(error)

    def _finish(self, error: BaseException | str | None = None,
                attempt: _Attempt | None = None) -> None:  # fmt: skip
        """
        The call is over (C{error} L{None}: it succeeded, through
        C{attempt} if given): stop its timer and attempts, and record its
        client span when spans are recorded.
        """
        self.done = True
        if self.trace is not None:  # (trace hook) skynet.observe.tracing
            _trace.client_finish(self, error, attempt)
        if self.timer is not None:
            self.wheel.discard(self, self.timer)
            self.timer = None
        if self.outstanding:
            for attempt in self.outstanding:
                attempt.cancel()
            self.outstanding.clear()
        if self.waiting:
            self.waiting = False
            self.service.waiters.remove(self._wake)

    def _cancelled(self, d: Deferred) -> None:
        if not self.done:
            self._finish("cancelled")

    def abort(self, error: Exception) -> None:
        """
        Fail the call now with C{error}, unless it is finished.
        """
        if not self.done:
            self.timer = None
            self._finish(error)
            self.result.errback(error)


@implementer(IInstanceListener)
class ServiceClient:
    """
    Calls one service, on the registered instances matching a query.

    Obtain one from L{Client.service}.  It follows the registry live:
    instances joining, changing and leaving.
    """

    log = Logger()

    def __init__(
        self,
        client: "Client",
        query: Query,
        retry_interval: float,
        giveup_timeout: float,
        balancer: ILoadBalancer,
        binary_views: bool = False,
    ) -> None:
        self.client = client
        self.query = query
        self.retry_interval = retry_interval
        self.giveup_timeout = giveup_timeout
        self.balancer = balancer
        self.handles: dict[str, InstanceHandle] = {}
        self.retired: list[InstanceHandle] = []
        self.waiters: list[Callable[[], None]] = []
        self.stopped = False
        self.has_snapshot = False
        #: See L{Client.service}.
        self.binary_views = binary_views
        self._watch: Any = None

    def describe(self) -> str:
        return self.query.describe()

    def start_watch(self) -> None:
        if not self.stopped and self._watch is None:
            self._watch = self.client.registry.watch(self.query, self)

    # IInstanceListener

    def snapshot(self, instances: list[Instance]) -> None:
        self.has_snapshot = True
        for instance in instances:
            self._add(instance)
        self._wake_waiters()

    def added(self, instance: Instance) -> None:
        self._add(instance)
        self._wake_waiters()

    def updated(self, instance: Instance) -> None:
        handle = self.handles.get(instance.uuid)
        if handle is None:
            self._add(instance)
        else:
            if handle.instance.address != instance.address:
                handle.retired = True
                self.retired.append(handle)
                self.handles[instance.uuid] = InstanceHandle(self, instance)
            else:
                handle.instance = instance
                handle.evicted_until = 0.0
                handle.probing = False
                handle.probe = None
        self._wake_waiters()

    def removed(self, instance: Instance) -> None:
        handle = self.handles.pop(instance.uuid, None)
        if handle is not None:
            self.log.debug(
                "{service} instance {uuid} left rotation", service=instance.name, uuid=instance.uuid
            )
            handle.retired = True
            handle.trim(0)
            if handle.connections:
                self.retired.append(handle)

    def _add(self, instance: Instance) -> None:
        if instance.uuid not in self.handles:
            self.handles[instance.uuid] = InstanceHandle(self, instance)
        else:
            self.handles[instance.uuid].instance = instance

    def _wake_waiters(self) -> None:
        waiters, self.waiters = self.waiters, []
        for wake in waiters:
            wake()

    # Choosing

    def pick(
        self, exclude: Iterable[str], now: float, fresh_only: bool = False
    ) -> InstanceHandle | None:
        """
        The balancer's choice among the instances in rotation and not in
        C{exclude}; failing that, among those evicted (unless
        C{fresh_only}).
        """
        return pick_handle(self.handles, self.balancer, exclude, now, fresh_only)

    # Calls

    def call(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        request_info: RequestInfo | None = None,
        *,
        timeout: float | None = None,
        retry_interval: float | None = None,
    ) -> Deferred:
        """
        Call C{method} with C{params} on some instance, retrying as needed.

        @param request_info: passed on from a calling service so that one
            request id follows the request through the cluster.
        @return: a Deferred firing with the result dict, or failing with
            L{ServiceError}, L{RemoteCallError}, L{RequestTimeout} or
            L{NoInstances}.
        """
        return self._call(method, params, request_info, timeout, retry_interval, hedge=True)

    def call_once(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        request_info: RequestInfo | None = None,
        *,
        timeout: float | None = None,
    ) -> Deferred:
        """
        Like L{call}, with one attempt only: no retry, no hedging.  A failed
        connection fails the call with L{skynet.errors.ConnectionFailed}.
        """
        d = self._call(method, params, request_info, timeout, None, hedge=False, once=True)
        return d

    def _call(
        self,
        method: str,
        params: dict[str, Any] | None,
        request_info: RequestInfo | None,
        timeout: float | None,
        retry_interval: float | None,
        hedge: bool,
        once: bool = False,
    ) -> Deferred:
        if self.stopped:
            return fail(ConnectionFailed("the client is stopped"))
        try:
            encoded = _encode(params if params is not None else {})
        except Exception as e:
            return fail(TypeError(f"parameters of {method} cannot be encoded as BSON: {e}"))
        if request_info is None:
            info = RequestInfo(new_request_id())
        else:
            info = request_info.copy()
            if not info.request_id:
                info.request_id = new_request_id()
        retry = self.retry_interval if retry_interval is None else retry_interval
        call = (_OnceCall if once else _Call)(
            self,
            method,
            encoded,
            info,
            retry if retry > 0 else math.inf,  # 0: no retry on time, only on failure
            self.giveup_timeout if timeout is None else timeout,
            hedge,
        )
        if _trace.ENABLED:  # (trace hook) the span's parent: the request served now, if any
            serving = _trace.serving.get()
            call.trace = serving[2] if serving is not None else 0
        return call.start()

    def sweep(self, max_idle: int) -> None:
        for handle in self.handles.values():
            handle.trim(max_idle)
        for handle in self.retired:
            handle.trim(0)
        self.retired = [h for h in self.retired if h.connections]

    def stop(self) -> None:
        self.stopped = True
        if self._watch is not None:
            self._watch.stop()
            self._watch = None
        for handle in list(self.handles.values()) + self.retired:
            handle.retired = True
            handle.close_all()
        self.handles.clear()
        self.retired = []


class _OnceCall(_Call):
    """
    One attempt only; connection failures fail the call.
    """

    __slots__ = ()

    def _failed(self, attempt: _Attempt, error: BaseException) -> None:
        self.outstanding.remove(attempt)
        if self.done:
            return
        if isinstance(error, _CONNECTION_ERRORS) and not isinstance(error, ServiceUnregistered):
            attempt.handle.evict(str(error))
        self._finish(error, attempt)
        self.result.errback(error)

    def _attempt(self) -> None:
        if self.attempts:
            return
        super()._attempt()


class Client:
    """
    The entry point for calling services.

    @param registry: an L{skynet.registry.IRegistry}, a registry URL, or
        L{None} for C{$SKYNET_REGISTRY} or the embedded registry.  A
        registry given as an object is used as it is (start it first); one
        made from a URL belongs to this client.
    @param balancer: an L{ILoadBalancer} (default L{GoScoreBalancer} for
        this client's region and host).
    @param region: the region the default balancer prefers (L{None}: none).
        This client never reads C{os.environ}; the edges pass
        C{$SKYNET_REGION} (L{skynet.config.environment_defaults}), as do
        L{skynet.sync.Client} and L{skynet.aio.Client}.
    @param host: likewise the host (the edges pass C{$SKYNET_BIND_IP}).
    @param connector: how to reach an instance: a callable taking an
        L{Instance} and returning a Deferred firing with a ready
        L{ClientProtocol} (default TCP; L{skynet.testing} has an in-memory
        one).
    @param busy_poll: how long the reactor polls for the next event before
        it sleeps (backing off after polls in vain), in seconds
        (L{skynet.busypoll}; it is the reactor's setting, shared by all on
        it).  L{None}: L{skynet.busypoll.DEFAULT_BUDGET}, unless set on this
        reactor already (by C{twistd skynet-service --busy-poll}, say); 0:
        never.  Only Twisted's epoll reactor polls.
    @param tune_malloc: make this process's C allocator reuse freed large
        blocks (L{skynet.config.tune_malloc}, as skynet's twistd processes
        do), unless the environment says otherwise (C{SKYNET_TUNE_MALLOC=0},
        or glibc's own C{MALLOC_MMAP_THRESHOLD_} or C{MALLOC_TRIM_THRESHOLD_}).
        Without it every 1 MB message costs a page fault per 4 KiB; the
        price is up to 128 MiB of freed memory kept after a burst of large
        messages.  It is the process's setting: the first decision stands.
    """

    log = Logger()

    def __init__(
        self,
        registry: Any = None,
        reactor: Any = None,
        *,
        retry_interval: float = DEFAULT_RETRY_INTERVAL,
        giveup_timeout: float = DEFAULT_GIVEUP_TIMEOUT,
        balancer: Callable[[], ILoadBalancer] | None = None,
        region: str | None = None,
        host: str | None = None,
        max_connections: int = 4,
        max_idle: int = 2,
        max_in_flight_per_connection: int = 32,
        connect_timeout: float = 2.0,
        max_frame: int = DEFAULT_MAX_FRAME,
        sweep_interval: float = 5.0,
        connector: Callable[[Instance], Deferred] | None = None,
        busy_poll: float | None = None,
        tune_malloc: bool = True,
    ) -> None:
        reactor = default_reactor(reactor)
        if tune_malloc:
            config.tune_malloc()
        self.busy_poll = (
            None if busy_poll is None else busypoll.check_budget(busy_poll, "busy_poll")
        )
        self.reactor = reactor
        self.own_registry = registry is None or isinstance(registry, str)
        if self.own_registry:
            from skynet.registry import registry_from_url

            registry = registry_from_url(registry, reactor=reactor)
        self.registry = registry
        self.retry_interval = retry_interval
        self.giveup_timeout = giveup_timeout
        # The environment is the edges' (skynet.config.environment_defaults).
        self.region = region
        self.host = host
        self.balancer_factory = balancer or (lambda: GoScoreBalancer(self.region, self.host))
        self.max_connections = max_connections
        self.max_idle = max_idle
        self.max_in_flight_per_connection = max_in_flight_per_connection
        self.connector = connector or tcp_connector(reactor, connect_timeout, max_frame)
        #: One service client (and registry watch) per query and intervals.
        self.services: dict[tuple[Query, float, float, bool], ServiceClient] = {}
        self.wheel = _Wheel(reactor)
        self._sweeper = LoopingCall(self._sweep)
        self._sweeper.clock = reactor
        self._sweep_interval = sweep_interval
        self._ready: Deferred | None = None
        self.stopped = False

    def _start(self) -> None:
        if self._ready is not None:
            return
        if self.busy_poll is None:
            busypoll.install_default(self.reactor)
        else:
            busypoll.install(self.reactor, self.busy_poll)
        self._sweeper.start(self._sweep_interval, now=False)
        if self.own_registry:
            self._ready = maybeDeferred(self.registry.start)
            self._ready.addErrback(
                lambda f: self.log.failure(
                    "cannot start the registry {url}", f, url=getattr(self.registry, "url", None)
                )  # fmt: skip
            )
        else:
            self._ready = succeed(None)

    def service(
        self,
        name: str,
        version: str | None = None,
        region: str | None = None,
        host: str | None = None,
        *,
        retry_interval: float | None = None,
        giveup_timeout: float | None = None,
        binary_views: bool = False,
    ) -> ServiceClient:
        """
        A client for the registered instances of C{name} matching the other
        arguments (L{None}: any).  It does not fail when none exist yet:
        calls wait for one until they give up.

        The same query with the same intervals and views gives the same
        service client (one registry watch), however often it is asked for.

        @param retry_interval: seconds before a call is also sent to another
            instance (L{None}: the client's; C{0}: never on time, only
            after a failure).
        @param giveup_timeout: seconds before a call fails (L{None}: the
            client's).
        @param binary_views: hand over each binary value of at least 32 KiB
            in a result that is a flat document as a read-only
            C{memoryview} of the answer as received, not a copy (as
            L{skynet.service.binary_views} does for a service's parameters).
        """
        query = Query(service=name, version=version, region=region, host=host, registered=True)
        retry = self.retry_interval if retry_interval is None else retry_interval
        giveup = self.giveup_timeout if giveup_timeout is None else giveup_timeout
        key = (query, retry, giveup, binary_views)
        existing = self.services.get(key)
        if existing is not None:
            return existing
        self._start()
        sc = ServiceClient(self, query, retry, giveup, self.balancer_factory(), binary_views)
        self.services[key] = sc
        self._ready.addCallback(lambda _: sc.start_watch())  # type: ignore[union-attr]
        return sc

    def _sweep(self) -> None:
        for sc in self._all_services():
            sc.sweep(self.max_idle)

    def _all_services(self) -> list[ServiceClient]:
        return list(self.services.values())

    def stop(self) -> Deferred:
        """
        Stop watching, close every connection, and stop the registry if this
        client made it.
        """
        self.stopped = True
        if self._sweeper.running:
            self._sweeper.stop()
        for call in self.wheel.stop():
            call.abort(ConnectionFailed("the client was stopped"))
        for sc in self._all_services():
            sc.stop()
        self.services.clear()
        if self.own_registry and self._ready is not None:
            return maybeDeferred(self.registry.stop)
        return succeed(None)


__all__ = [
    "Client",
    "GoScoreBalancer",
    "ILoadBalancer",
    "InstanceHandle",
    "RoundRobinBalancer",
    "ServiceClient",
]
