"""
Services: a class whose public methods are remote methods, and the
L{ServiceHost} that serves it, registers it, keeps its statistics and stops
it gracefully.

    class TestService(Service):
        name = "TestService"

        def Upcase(self, request_info, params):
            return {"data": params["data"].upper()}
"""

from __future__ import annotations

import inspect
import os
import socket
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred, maybeDeferred, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from skynet import busypoll
from skynet.config import EnvDefaults, default_reactor
from skynet.observe import tracing  # (trace hook)
from skynet.observe.histogram import MethodStats  # (observe hook)
from skynet.protocol import (
    AdminProtocol,
    BufferBudget,
    RequestInfo,
    ServerProtocol,
    new_id,
)
from skynet.reactor_lag import STATISTICS_KEY as REACTOR_LAG_KEY  # (heal, issue 16)
from skynet.reactor_lag import ReactorLag
from skynet.registry.base import (
    DEFAULT_CRITICAL_AVERAGE_RESPONSE_TIME,
    DEFAULT_CRITICAL_CLIENT_COUNT,
    Address,
    Instance,
)

#: How many recent response times the percentiles are computed from.
RESPONSE_TIME_WINDOW = 1024

#: The largest request a service accepts by default (its C{max_frame}); a
#: service class may set its own C{max_request_size}.
DEFAULT_MAX_REQUEST = 4 * 1024 * 1024

#: The bytes of unfinished requests all the connections of a service may
#: hold at once (a connection that would exceed it is closed).
DEFAULT_BUFFER_BUDGET = 96 * 1024 * 1024

#: The most BSON elements a request may hold by default (nested ones
#: included; decoding 20,000 takes about 10 ms of the reactor's time).  A
#: request large enough to hold more is counted in a worker process first.
DEFAULT_MAX_REQUEST_ELEMENTS = 20_000

#: Large requests waiting for their count at once; beyond, they are refused.
MAX_PENDING_COUNTS = 8

#: Connections a service accepts at once, from anyone (at most; see
#: L{connection_limit}) and from one address.
DEFAULT_MAX_CONNECTIONS = 4096
DEFAULT_MAX_CONNECTIONS_PER_PEER = 256

#: Descriptors kept for everything but client connections: listeners, the
#: registry, logs, the element-count worker, calls to other services.
RESERVED_DESCRIPTORS = 64


def connection_limit(nofile: int | None = None) -> int:
    """
    The connections a service accepts at once by default: 4,096, or fewer
    when the process may open fewer descriptors (so that idle connections
    can never take the last descriptor a listener or the registry needs).

    @param nofile: the soft C{RLIMIT_NOFILE} (default: this process's).
    """
    if nofile is None:
        try:
            import resource

            nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        except (ImportError, OSError, ValueError):
            return DEFAULT_MAX_CONNECTIONS
        if nofile == resource.RLIM_INFINITY:
            return DEFAULT_MAX_CONNECTIONS
    return max(1, min(DEFAULT_MAX_CONNECTIONS, nofile - RESERVED_DESCRIPTORS))


#: Seconds a new connection has for its handshake, a started frame has to
#: complete, and a connection may stay silent with nothing in flight.
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
DEFAULT_FRAME_TIMEOUT = 30.0
DEFAULT_IDLE_TIMEOUT = 300.0

#: Go's reference layout C{2006-01-02T15:04:05Z-0700}, as strftime.
GO_TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ%z"


def local(f: Callable[..., Any]) -> Callable[..., Any]:
    """
    Mark a method of a L{Service} as not remotely callable, whatever its
    name.
    """
    f.__skynet_local__ = True  # type: ignore[attr-defined]
    return f


def remote(f: Callable[..., Any]) -> Callable[..., Any]:
    """
    Mark a method of a L{Service} whose name does not start with an
    upper-case letter as remotely callable all the same.
    """
    f.__skynet_remote__ = True  # type: ignore[attr-defined]
    return f


def binary_views(f: Callable[..., Any]) -> Callable[..., Any]:
    """
    Mark a remote method as taking large binary parameters uncopied: where
    its parameters are a flat document (binary, string, number, boolean
    and null values), each binary value of at least 32 KiB arrives as a
    read-only C{memoryview} of the request as it was received, instead of
    C{bytes} copied out of it.  Treat them as bytes-like (C{bytes(view)}
    copies); they keep the request's buffer alive while held.  A view may be
    returned in a flat result as it is: it is sent without a copy.  Smaller
    binaries, and those of nested documents, are C{bytes} as usual.
    """
    f.__skynet_binary_views__ = True  # type: ignore[attr-defined]
    return f


def remote_method_names(cls: type) -> list[str]:
    """
    The names of the remote methods of a service class, as Go's net/rpc
    exposes exported names: its callables whose names start with an
    upper-case letter, and those marked L{remote}; less those of L{Service}
    itself and those marked L{local}.
    """
    names = []
    for name in dir(cls):
        if name.startswith("_") or hasattr(Service, name):
            continue
        value = inspect.getattr_static(cls, name)
        if isinstance(value, (staticmethod, classmethod, property)):
            continue
        if not callable(value) or getattr(value, "__skynet_local__", False):
            continue
        if name[0].isupper() or getattr(value, "__skynet_remote__", False):
            names.append(name)
    return sorted(names)


class Service:
    """
    Base class of skynet services.

    Every method of a subclass whose name starts with an upper-case letter
    (Go's exported names), or marked L{remote}, is a remote method, called as
    C{method(request_info, params)} with a L{RequestInfo} and the decoded
    parameters, and returning a dict, a Deferred firing with one, or (when
    declared C{async def}) a coroutine.  Raising L{skynet.errors.ServiceError}
    fails the call with exactly its message; any other exception fails it
    with C{"<Type>: <message>"}.  The connection lives on either way.

    @cvar name: the service name (default: the class name).
    @cvar version: default version (overridden by C{--version}).
    @cvar region: default region (overridden by C{--region}, C{SKYNET_REGION}).
    @cvar max_request_size: the largest request, in bytes, a client may
        send (default L{DEFAULT_MAX_REQUEST}; a larger one closes its
        connection).
    @cvar max_request_elements: the most BSON elements a request may hold
        (default L{DEFAULT_MAX_REQUEST_ELEMENTS}; L{None}: any number); one
        with more is refused with an error.
    @ivar host: the L{ServiceHost} serving this object, set before
        L{on_started}.
    """

    name: ClassVar[str | None] = None
    version: ClassVar[str | None] = None
    region: ClassVar[str | None] = None
    critical_client_count: ClassVar[int] = DEFAULT_CRITICAL_CLIENT_COUNT
    critical_average_response_time: ClassVar[float] = DEFAULT_CRITICAL_AVERAGE_RESPONSE_TIME
    max_request_size: ClassVar[int] = DEFAULT_MAX_REQUEST
    max_request_elements: ClassVar[int | None] = DEFAULT_MAX_REQUEST_ELEMENTS

    host: "ServiceHost"

    @property
    def info(self) -> Instance:
        """
        This instance as registered: uuid, name, version, region, host,
        port, admin address, registered.
        """
        return self.host.instance

    @property
    def client(self):
        """
        A L{skynet.client.Client} on the same registry, for calling other
        services (or this one) from a method.
        """
        return self.host.client

    # Lifecycle hooks; each may return a Deferred or be a coroutine.

    def on_started(self) -> Any:
        """
        Listening, before registration.
        """

    def on_registered(self) -> Any:
        """
        Now registered: clients may find this instance.
        """

    def on_unregistered(self) -> Any:
        """
        Now unregistered: clients will stop sending new calls.
        """

    def on_stopped(self) -> Any:
        """
        Stopped: no more calls will arrive.
        """

    def extra_statistics(self) -> dict[str, Any]:
        """
        Extra keys for this instance's C{/statistics} node, merged beside
        the Go keys (which they cannot replace) at every update.
        """
        return {}


class _Default:
    """
    The argument was not given.
    """


class ElementCounter:
    """
    Counts the elements of large requests in one worker process, so that
    the reactor never decodes a document it would refuse.

    @ivar max_pending: counts waiting at once; beyond, L{count} refuses.
    """

    def __init__(self, reactor: Any, max_pending: int = MAX_PENDING_COUNTS) -> None:
        self.reactor = reactor
        self.max_pending = max_pending
        self.pending = 0
        self._pool: Any = None

    def count(self, data: bytes) -> Deferred:
        """
        @return: a Deferred firing with the element count of C{data}, or
            failing with the decoding error.
        @raise RuntimeError: if L{max_pending} counts are waiting already.
        """
        if self.pending >= self.max_pending:
            raise RuntimeError(f"{self.pending} large requests are waiting to be checked")
        if self._pool is None:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            self._pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        from skynet._wire import count_elements

        future = self._pool.submit(count_elements, data)
        self.pending += 1
        d: Deferred = Deferred()

        def deliver(done: Any) -> None:
            self.pending -= 1
            try:
                result = done.result()
            except Exception as e:
                d.errback(e)
            else:
                d.callback(result)

        future.add_done_callback(lambda done: self.reactor.callFromThread(deliver, done))
        return d

    def stop(self) -> None:
        """
        End the worker (counts still waiting are abandoned).
        """
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


class ServiceStats:
    """
    The statistics of one instance.
    """

    def __init__(self, now: Callable[[], float], window: int = RESPONSE_TIME_WINDOW) -> None:
        self.now = now
        self.start_time = now()
        self.last_request: float | None = None
        self.requests_served = 0
        self.errors = 0
        self.in_flight = 0
        self.total_response_time = 0.0
        self.recent: deque[float] = deque(maxlen=window)

    def finished(self, started: float, failed: bool) -> None:
        now = self.now()
        elapsed = now - started
        self.last_request = now
        self.requests_served += 1
        if failed:
            self.errors += 1
        self.total_response_time += elapsed
        self.recent.append(elapsed)

    @property
    def average_response_time(self) -> float:
        if not self.requests_served:
            return 0.0
        return self.total_response_time / self.requests_served

    def percentile(self, fraction: float) -> float:
        """
        The response time below which C{fraction} of the recent ones fall.
        """
        if not self.recent:
            return 0.0
        ordered = sorted(self.recent)
        index = min(len(ordered) - 1, int(fraction * len(ordered)))
        return ordered[index]

    def to_go(self, clients: int) -> dict[str, Any]:
        """
        The C{/statistics} node: the Go keys, then ours.
        """
        return {
            "Clients": clients,
            "StartTime": go_time(self.start_time),
            "LastRequest": go_time(self.last_request) if self.last_request else "",
            "RequestsServed": self.requests_served,
            "AverageResponseTime": int(self.average_response_time * 1e9),
            "Errors": self.errors,
            "InFlight": self.in_flight,
            "P50ResponseTime": int(self.percentile(0.50) * 1e9),
            "P99ResponseTime": int(self.percentile(0.99) * 1e9),
            "Updated": go_time(self.now()),
        }


def go_time(t: float) -> str:
    """
    Format a POSIX time as Go Skynet did (C{2006-01-02T15:04:05Z-0700}).
    """
    return time.strftime(GO_TIME_FORMAT, time.localtime(t))


class _ServiceFactory(Factory):
    """
    Builds the connections of a service, refusing those beyond its limits
    (in all, and from one peer address).
    """

    log = Logger()

    def __init__(self, host: "ServiceHost") -> None:
        self.host = host
        self.open = 0
        self.per_peer: dict[str, int] = {}
        self.refused = 0

    def buildProtocol(self, addr: Any) -> ServerProtocol | None:
        host = self.host
        peer = getattr(addr, "host", "")
        from_peer = self.per_peer.get(peer, 0)
        if self.open >= host.max_connections or from_peer >= host.max_connections_per_peer:
            self.refused += 1
            if self.refused & (self.refused - 1) == 0:  # 1st, 2nd, 4th, 8th...
                self.log.warn(
                    "{service} refused a connection from {peer}: {open} open,"
                    " {from_peer} from that address ({refused} refused so far)",
                    service=host.service_name,
                    peer=peer,
                    open=self.open,
                    from_peer=from_peer,
                    refused=self.refused,
                )
            return None
        self.open += 1
        self.per_peer[peer] = from_peer + 1
        protocol = ServerProtocol(host)
        protocol.on_lost = lambda: self._release(peer)
        return protocol

    def _release(self, peer: str) -> None:
        self.open -= 1
        left = self.per_peer.get(peer, 1) - 1
        if left > 0:
            self.per_peer[peer] = left
        else:
            self.per_peer.pop(peer, None)


class _AdminFactory(Factory):
    def __init__(self, host: "ServiceHost") -> None:
        self.host = host

    def buildProtocol(self, addr: Any) -> AdminProtocol:
        return AdminProtocol(self.host)


def advertised_address(interface: str, bind_ip: str | None = None) -> str:
    """
    The address clients should use for a listener bound to C{interface}.

    @param bind_ip: the address to advertise when C{interface} is a
        wildcard (the edges pass C{SKYNET_BIND_IP}); else this host's name's.
    """
    if interface and interface not in ("0.0.0.0", "::"):
        return interface
    ip = bind_ip or ""
    if ip and ip not in ("0.0.0.0", "::"):
        return ip
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


class ServiceHost(MultiService):
    """
    Serves one L{Service} object: listens, registers it in the registry,
    publishes its statistics, answers admin calls and stops gracefully
    (unregister, drain the requests in flight, remove, close).

    @param endpoints: server endpoints to try in order; the first that
        listens is used (a port range is a list of endpoints).
    @param admin_endpoints: likewise for the admin listener, or empty.
    @param stop_process: called when an admin C{Stop} asks the process to
        end (default: stop the reactor).
    @param max_frame: the largest request accepted (default: the service
        class's C{max_request_size}).
    @param max_connections: connections accepted at once; beyond, new ones
        are closed at once (default: L{connection_limit}).
    @param max_connections_per_peer: the same, from one peer address.
    @param handshake_timeout: seconds a new connection has to send its
        handshake.
    @param frame_timeout: seconds a started request frame has to complete.
    @param idle_timeout: seconds a connection may stay silent with nothing
        in flight (L{None}: forever).
    @param buffer_budget: bytes of unfinished requests all connections may
        hold at once.
    @param defaults: Go Skynet's environment as the edge read it
        (L{skynet.config.environment_defaults}): the version and region used
        when neither the argument nor the class names one, the address
        advertised for a wildcard listener, and the region and host this
        host's own client prefers.  Default: none; C{os.environ} is never read.
    """

    log = Logger()

    #: Extra keys of this instance's registry entry (C{skynet.tls}: C{"TLS"}).
    instance_extra: dict[str, Any] = {}  # security hook (issue 12)

    def __init__(
        self,
        service: Service,
        registry: Any,
        endpoints: Iterable[IStreamServerEndpoint],
        admin_endpoints: Iterable[IStreamServerEndpoint] = (),
        *,
        reactor: Any = None,
        name: str | None = None,
        version: str | None = None,
        region: str | None = None,
        uuid: str | None = None,
        registered: bool = True,
        advertise_host: str | None = None,
        max_frame: int | None = None,
        max_connections: int | None = None,
        max_connections_per_peer: int = DEFAULT_MAX_CONNECTIONS_PER_PEER,
        handshake_timeout: float | None = DEFAULT_HANDSHAKE_TIMEOUT,
        frame_timeout: float | None = DEFAULT_FRAME_TIMEOUT,
        idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT,
        buffer_budget: int = DEFAULT_BUFFER_BUDGET,
        max_request_elements: int | None | type[_Default] = _Default,
        stats_interval: float = 5.0,
        drain_timeout: float = 10.0,
        linger: float = 0.0,
        stop_process: Callable[[], Any] | None = None,
        own_registry: bool = False,
        client: Any = None,
        defaults: EnvDefaults | None = None,
    ) -> None:
        super().__init__()
        reactor = default_reactor(reactor)
        self.defaults = defaults = defaults or EnvDefaults()
        self.reactor = reactor
        self.service = service
        self.registry = registry
        self.endpoints = list(endpoints)
        self.admin_endpoints = list(admin_endpoints)
        cls = type(service)
        self.service_name: str = name or cls.name or cls.__name__
        self.version = version or cls.version or defaults.version or "unknown"
        self.region = region or cls.region or defaults.region or "unknown"
        self.uuid = uuid or new_id()
        self.registered = registered
        self.advertise_host = advertise_host
        self.max_frame = max_frame if max_frame is not None else cls.max_request_size
        self.max_connections = connection_limit() if max_connections is None else max_connections
        self.max_connections_per_peer = max_connections_per_peer
        self.handshake_timeout = handshake_timeout
        self.frame_timeout = frame_timeout
        self.idle_timeout = idle_timeout
        self.buffer_budget: BufferBudget | None = BufferBudget(buffer_budget)
        self.max_request_elements: int | None = (
            cls.max_request_elements if max_request_elements is _Default else max_request_elements  # type: ignore[assignment]
        )
        self._counter: ElementCounter | None = None
        self.stats_interval = stats_interval
        self.drain_timeout = drain_timeout
        self.linger = linger
        self.own_registry = own_registry
        self.stop_process = stop_process or getattr(reactor, "stop", lambda: None)
        self.connections: dict[str, ServerProtocol] = {}
        self.stats = ServiceStats(reactor.seconds)
        self.methods = {n: getattr(service, n) for n in remote_method_names(cls)}
        #: The names of the methods marked L{binary_views}.
        self.view_methods = frozenset(
            n for n, f in self.methods.items() if getattr(f, "__skynet_binary_views__", False)
        )
        # (observe hook) per-method counts and latency histograms, and the
        # request's context for log events: see skynet.observe.histogram.
        self.method_stats = MethodStats(reactor.seconds)
        self.methods = self.method_stats.instrument(self.methods, self.service_name, self.uuid)
        self.port: IListeningPort | None = None
        self.admin_port: IListeningPort | None = None
        self.instance: Instance = Instance(
            uuid=self.uuid, name=self.service_name, version=self.version, region=self.region,
            host="", port=0, registered=registered,
        )  # fmt: skip
        self.in_registry = False
        self.registry_started = False
        self._client = client
        self._own_client = False
        self._drained: list[Deferred] = []
        self._stats_loop: LoopingCall | None = None
        self._reactor_lag: ReactorLag | None = None  # (heal, issue 16)
        self._stopping: Deferred | None = None
        self._started: Deferred | None = None
        self._retry_call: Any = None
        self._registry_starting = False
        service.host = self

    # Dispatcher (see skynet.protocol.IDispatcher)

    def client_connected(self, protocol: ServerProtocol) -> None:
        self.connections[protocol.clientid] = protocol

    def client_disconnected(self, protocol: ServerProtocol) -> None:
        self.connections.pop(protocol.clientid, None)

    def knows_client(self, clientid: str) -> bool:
        return clientid in self.connections

    def find_method(self, name: str) -> Callable[..., Any] | None:
        # (trace hook) SkynetSpans is served beside the methods, not listed with them
        return self.methods.get(name) or tracing.find_method(name)

    def request_started(self) -> float:
        self.stats.in_flight += 1
        return self.reactor.seconds()

    def request_finished(self, started: float, failed: bool) -> None:
        stats = self.stats
        stats.finished(started, failed)
        stats.in_flight -= 1
        if not stats.in_flight and self._drained:
            waiting, self._drained = self._drained, []
            for d in waiting:
                d.callback(None)

    def request_released(self) -> None:
        stats = self.stats
        stats.in_flight -= 1
        if not stats.in_flight and self._drained:
            waiting, self._drained = self._drained, []
            for d in waiting:
                d.callback(None)

    def call_later(self, delay: float, f: Callable[..., Any]) -> Any:
        return self.reactor.callLater(delay, f)

    def count_elements(self, data: bytes) -> Deferred:
        if self._counter is None:
            self._counter = ElementCounter(self.reactor)
        return self._counter.count(data)

    # Admin target (see skynet.protocol.IAdminTarget)

    def admin_register(self) -> Deferred:
        return self.set_registered(True)

    def admin_unregister(self) -> Deferred:
        return self.set_registered(False)

    def admin_stop(self, wait_for_clients: bool) -> Deferred:
        self.log.info(
            "{service} asked to stop (wait for clients: {wait})",
            service=self.service_name,
            wait=wait_for_clients,
        )
        if not wait_for_clients:
            self.drain_timeout = 0.0
        # Let the admin reply leave before the process winds down.
        self.reactor.callLater(0, self.stop_process)
        return succeed(None)

    # Public API

    @property
    def client(self):
        """
        A client on this host's registry, made on first use.
        """
        if self._client is None:
            from skynet.client import Client

            self._client = Client(registry=self.registry, reactor=self.reactor,
                                  region=self.defaults.region, host=self.defaults.bind_ip)  # fmt: skip
            self._own_client = True
        return self._client

    @property
    def clients(self) -> int:
        """
        How many clients are connected now.
        """
        return len(self.connections)

    def statistics(self) -> dict[str, Any]:
        """
        The current statistics, in the C{/statistics} shape.
        """
        doc = self.stats.to_go(self.clients)
        doc["UUID"] = self.uuid
        doc["Registered"] = self.registered
        doc.update(self.method_stats.to_bson())  # (observe hook) Methods, LatencyBuckets
        if self._reactor_lag is not None:  # (heal, issue 16: Go readers ignore it)
            doc[REACTOR_LAG_KEY] = self._reactor_lag.lag
        busy = busypoll.installed(self.reactor)
        if busy is not None:  # Go readers ignore it too
            doc["BusyPoll"] = {"Budget": busy.budget, "Polls": busy.polls, "Caught": busy.caught}
        try:
            extra = self.service.extra_statistics()
        except Exception:
            self.log.failure("extra statistics of {service} failed", service=self.service_name)
            extra = {}
        for key, value in extra.items():
            doc.setdefault(key, value)
        return doc

    def set_registered(self, registered: bool) -> Deferred:
        """
        Register or unregister at run time; fires when the registry has it.
        """
        return ensureDeferred(self._set_registered(registered))

    async def _set_registered(self, registered: bool) -> None:
        if registered == self.registered:
            return
        self.registered = registered
        self.instance = self._make_instance()
        self.log.info(
            "{service} instance {uuid} {what}",
            service=self.service_name,
            uuid=self.uuid,
            what="registered" if registered else "unregistered",
        )
        if self.in_registry:
            try:
                await self.registry.update(self.instance)
            except Exception:
                self.log.failure("could not update {uuid} in the registry", uuid=self.uuid)
        hook = self.service.on_registered if registered else self.service.on_unregistered
        await self._hook(hook)

    async def _hook(self, hook: Callable[[], Any]) -> None:
        try:
            await maybeDeferred(lambda: ensure(hook()))
        except Exception:
            self.log.failure(
                "{hook} of {service} failed", hook=hook.__name__, service=self.service_name
            )

    def _make_instance(self) -> Instance:
        port: Any = self.port.getHost() if self.port is not None else None
        admin: Any = self.admin_port.getHost() if self.admin_port is not None else None
        host = self.advertise_host or (
            advertised_address(port.host, self.defaults.bind_ip) if port else ""
        )
        return Instance(
            uuid=self.uuid,
            name=self.service_name,
            version=self.version,
            region=self.region,
            host=host,
            port=port.port if port is not None else 0,
            admin=Address(advertised_address(admin.host, self.defaults.bind_ip), admin.port)
            if admin
            else None,
            registered=self.registered,
            critical_client_count=self.service.critical_client_count,
            critical_average_response_time=self.service.critical_average_response_time,
            pid=os.getpid(),
            extra=dict(self.instance_extra),  # security hook (issue 12)
        )

    # IService

    def startService(self) -> None:
        # (daemon helper: returns None as IService says; see when_started.)
        super().startService()
        self._started = ensureDeferred(self._start())
        self._started.addErrback(self._start_failed)

    def when_started(self) -> Deferred:
        """
        Fires when the start is done: listening, and the first attempt to
        register made (later ones retry with back-off).
        """
        d: Deferred = Deferred()
        if self._started is None:
            d.callback(None)
            return d

        def fire(result: Any) -> Any:
            d.callback(None)
            return result

        self._started.addBoth(fire)
        return d

    def _start_failed(self, failure: Failure) -> None:
        self.log.failure("{service} failed to start", failure, service=self.service_name)
        self.reactor.callLater(0, self.stop_process)

    async def _start(self) -> None:
        self.port = await listen_first(self.endpoints, _ServiceFactory(self))
        if self.admin_endpoints:
            self.admin_port = await listen_first(self.admin_endpoints, _AdminFactory(self))
        self.instance = self._make_instance()
        self.log.info(
            "{service} {version} ({region}) instance {uuid} listening on {host}:{port}"
            " (admin {admin})",
            service=self.service_name,
            version=self.version,
            region=self.region,
            uuid=self.uuid,
            host=self.instance.host,
            port=self.instance.port,
            admin=self.instance.admin,
        )
        await self._hook(self.service.on_started)
        await self._register_instance()
        self._stats_loop = LoopingCall(self.publish_statistics)
        self._stats_loop.clock = self.reactor
        self._stats_loop.start(self.stats_interval, now=False).addErrback(
            lambda f: self.log.failure("statistics loop failed", f)
        )
        # (heal, issue 16: the reactor's own lag, published as ReactorLag for
        # the daemon's liveness probe; see skynet/reactor_lag.py.)
        self._reactor_lag = ReactorLag(self.reactor)
        self._reactor_lag.start()

    async def _register_instance(self) -> None:
        # (daemon helper: one RetryingStart with backoffPolicy, not a loop of our own.)
        if self._stopping is not None:
            return
        from skynet._services import RetryingStart

        self._retry_call = RetryingStart(
            self._register_once,
            what=f"register {self.service_name} in {getattr(self.registry, 'url', self.registry)}",
            reactor=self.reactor,
        )
        self._retry_call.startService()

    async def _register_once(self) -> None:
        if self.own_registry and not self.registry_started:
            # This host stops the registry it owns, last (see _stop): a
            # registry that would stop itself at shutdown must not, or the
            # unregistration and removal would find it stopped.
            if hasattr(self.registry, "stop_at_shutdown"):
                self.registry.stop_at_shutdown = False
            self._registry_starting = True
            await self.registry.start()
            self.registry_started = True
        await self.registry.add(self.instance)
        self.in_registry = True
        if self.registered:
            await self._hook(self.service.on_registered)

    def publish_statistics(self) -> Deferred:
        """
        Write the statistics node now.
        """
        if not self.in_registry:
            return succeed(None)
        d = maybeDeferred(self.registry.publish_stats, self.instance, self.statistics())
        d.addErrback(
            lambda f: self.log.warn("could not publish statistics: {error}", error=f.value)
        )
        return d

    def stopService(self) -> Deferred:  # type: ignore[override]
        if self._stopping is None:
            self._stopping = ensureDeferred(self._stop())
        return self._stopping

    def drained(self) -> Deferred:
        """
        A Deferred firing when no request is in flight.
        """
        if not self.stats.in_flight:
            return succeed(None)
        d: Deferred = Deferred()
        self._drained.append(d)
        return d

    async def _close_connections(self, grace: float = 2.0) -> None:
        """
        Close every client connection and wait until each is really closed,
        so that answers already written reach their clients before the
        process ends (an unflushed write dies with the reactor).
        """
        protocols = list(self.connections.values())
        if not protocols:
            return
        closed = DeferredList([p.when_closed() for p in protocols])
        for protocol in protocols:
            protocol.close_connection()

        def abort() -> None:
            for p in protocols:
                _abort_if_open(p)

        timer = self.reactor.callLater(grace, abort)
        await closed
        if timer.active():
            timer.cancel()

    async def _stop(self) -> None:
        if self._retry_call is not None and self._retry_call.running:
            await self._retry_call.stopService()
        if self._stats_loop is not None and self._stats_loop.running:
            self._stats_loop.stop()
        if self._reactor_lag is not None:  # (heal, issue 16)
            self._reactor_lag.stop()
        if self._started is not None and not self._started.called:
            self._started.cancel()
        if self.registered:
            await self._set_registered(False)
            if self.linger > 0 and self.in_registry:
                # Unregistered but still serving: every watcher sees the
                # unregistration (and stops sending new calls) before the
                # instance closes its port and leaves the registry, so a
                # graceful stop never looks like a crash.
                await deferLater(self.reactor, self.linger, lambda: None)
        ports = [p for p in (self.port, self.admin_port) if p is not None]
        await DeferredList([maybeDeferred(p.stopListening) for p in ports])
        if self.stats.in_flight and self.drain_timeout > 0:
            self.log.info(
                "{service} draining {count} requests (at most {timeout}s)",
                service=self.service_name,
                count=self.stats.in_flight,
                timeout=self.drain_timeout,
            )
            drained = self.drained()
            timer = self.reactor.callLater(self.drain_timeout, drained.cancel)
            try:
                await drained
            except Exception:
                self.log.warn(
                    "{service} stopping with {count} requests still in flight",
                    service=self.service_name,
                    count=self.stats.in_flight,
                )
            else:
                timer.cancel()
        if self.in_registry:
            try:
                await self.registry.remove(self.instance)
            except Exception as e:
                # (daemon helper: an outage at stop is expected: a warning.)
                self.log.warn("could not remove {uuid} from the registry: {error}",
                              uuid=self.uuid, error=e)  # fmt: skip
            self.in_registry = False
        await self._close_connections()
        if self._counter is not None:
            self._counter.stop()
        await self._hook(self.service.on_stopped)
        if self._own_client and self._client is not None:
            await self._client.stop()
        if self.own_registry and (self.registry_started or self._registry_starting):
            await self.registry.stop()
        await super().stopService()
        self.log.info(
            "{service} instance {uuid} stopped", service=self.service_name, uuid=self.uuid
        )


def _abort_if_open(protocol: ServerProtocol) -> None:
    transport = protocol.transport
    if transport is not None and hasattr(transport, "abortConnection"):
        transport.abortConnection()


def ensure(result: Any) -> Any:
    """
    Turn a coroutine into a Deferred; leave anything else alone.
    """
    if inspect.iscoroutine(result):
        return ensureDeferred(result)
    return result


async def listen_first(endpoints: list[IStreamServerEndpoint], factory: Factory) -> IListeningPort:
    """
    Listen on the first endpoint that can, as Go Skynet picks the first
    free port of its range.
    """
    last: Exception | None = None
    for endpoint in endpoints:
        try:
            return await endpoint.listen(factory)
        except CannotListenError as e:
            last = e
    if last is None:
        raise CannotListenError("", 0, ValueError("no endpoint to listen on"))
    raise last


__all__ = [
    "RequestInfo",
    "Service",
    "ServiceHost",
    "ServiceStats",
    "local",
    "remote_method_names",
]
