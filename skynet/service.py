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
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from skynet.observe.histogram import MethodStats  # (observe hook)
from skynet.protocol import DEFAULT_MAX_FRAME, AdminProtocol, RequestInfo, ServerProtocol, new_id
from skynet.registry.base import (
    DEFAULT_CRITICAL_AVERAGE_RESPONSE_TIME,
    DEFAULT_CRITICAL_CLIENT_COUNT,
    Address,
    Instance,
)

#: How many recent response times the percentiles are computed from.
RESPONSE_TIME_WINDOW = 1024

#: Go's reference layout C{2006-01-02T15:04:05Z-0700}, as strftime.
GO_TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ%z"


def local(f: Callable[..., Any]) -> Callable[..., Any]:
    """
    Mark a public method of a L{Service} as not remotely callable.
    """
    f.__skynet_local__ = True  # type: ignore[attr-defined]
    return f


def remote_method_names(cls: type) -> list[str]:
    """
    The names of the remote methods of a service class: its public
    callables, less those of L{Service} itself and those marked L{local}.
    """
    names = []
    for name in dir(cls):
        if name.startswith("_") or hasattr(Service, name):
            continue
        value = inspect.getattr_static(cls, name)
        if isinstance(value, (staticmethod, classmethod, property)):
            continue
        if callable(value) and not getattr(value, "__skynet_local__", False):
            names.append(name)
    return sorted(names)


class Service:
    """
    Base class of skynet services.

    Every public method of a subclass is a remote method, called as
    C{method(request_info, params)} with a L{RequestInfo} and the decoded
    parameters, and returning a dict, a Deferred firing with one, or (when
    declared C{async def}) a coroutine.  Raising L{skynet.errors.ServiceError}
    fails the call with exactly its message; any other exception fails it
    with C{"<Type>: <message>"}.  The connection lives on either way.

    @cvar name: the service name (default: the class name).
    @cvar version: default version (overridden by C{--version}).
    @cvar region: default region (overridden by C{--region}, C{SKYNET_REGION}).
    @ivar host: the L{ServiceHost} serving this object, set before
        L{on_started}.
    """

    name: ClassVar[str | None] = None
    version: ClassVar[str | None] = None
    region: ClassVar[str | None] = None
    critical_client_count: ClassVar[int] = DEFAULT_CRITICAL_CLIENT_COUNT
    critical_average_response_time: ClassVar[float] = DEFAULT_CRITICAL_AVERAGE_RESPONSE_TIME

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
    def __init__(self, host: "ServiceHost") -> None:
        self.host = host

    def buildProtocol(self, addr: Any) -> ServerProtocol:
        return ServerProtocol(self.host)


class _AdminFactory(Factory):
    def __init__(self, host: "ServiceHost") -> None:
        self.host = host

    def buildProtocol(self, addr: Any) -> AdminProtocol:
        return AdminProtocol(self.host)


def advertised_address(interface: str) -> str:
    """
    The address clients should use for a listener bound to C{interface}.
    """
    if interface and interface not in ("0.0.0.0", "::"):
        return interface
    ip = os.environ.get("SKYNET_BIND_IP", "")
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
    """

    log = Logger()

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
        max_frame: int = DEFAULT_MAX_FRAME,
        handshake_timeout: float | None = 60.0,
        stats_interval: float = 5.0,
        drain_timeout: float = 10.0,
        stop_process: Callable[[], Any] | None = None,
        own_registry: bool = False,
        client: Any = None,
    ) -> None:
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self.reactor = reactor
        self.service = service
        self.registry = registry
        self.endpoints = list(endpoints)
        self.admin_endpoints = list(admin_endpoints)
        cls = type(service)
        self.service_name: str = name or cls.name or cls.__name__
        self.version = version or cls.version or os.environ.get("SKYNET_VERSION") or "unknown"
        self.region = region or cls.region or os.environ.get("SKYNET_REGION") or "unknown"
        self.uuid = uuid or new_id()
        self.registered = registered
        self.advertise_host = advertise_host
        self.max_frame = max_frame
        self.handshake_timeout = handshake_timeout
        self.stats_interval = stats_interval
        self.drain_timeout = drain_timeout
        self.own_registry = own_registry
        self.stop_process = stop_process or getattr(reactor, "stop", lambda: None)
        self.connections: dict[str, ServerProtocol] = {}
        self.stats = ServiceStats(reactor.seconds)
        self.methods = {n: getattr(service, n) for n in remote_method_names(cls)}
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
        self._stopping: Deferred | None = None
        self._started: Deferred | None = None
        self._retry_call: Any = None
        service.host = self

    # Dispatcher (see skynet.protocol.IDispatcher)

    def client_connected(self, protocol: ServerProtocol) -> None:
        self.connections[protocol.clientid] = protocol

    def client_disconnected(self, protocol: ServerProtocol) -> None:
        self.connections.pop(protocol.clientid, None)

    def knows_client(self, clientid: str) -> bool:
        return clientid in self.connections

    def find_method(self, name: str) -> Callable[..., Any] | None:
        return self.methods.get(name)

    def request_started(self) -> float:
        self.stats.in_flight += 1
        return self.reactor.seconds()

    def request_finished(self, started: float, failed: bool) -> None:
        stats = self.stats
        stats.in_flight -= 1
        stats.finished(started, failed)
        if not stats.in_flight and self._drained:
            waiting, self._drained = self._drained, []
            for d in waiting:
                d.callback(None)

    def call_later(self, delay: float, f: Callable[..., Any]) -> Any:
        return self.reactor.callLater(delay, f)

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

            self._client = Client(registry=self.registry, reactor=self.reactor)
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
        host = self.advertise_host or (advertised_address(port.host) if port else "")
        return Instance(
            uuid=self.uuid,
            name=self.service_name,
            version=self.version,
            region=self.region,
            host=host,
            port=port.port if port is not None else 0,
            admin=Address(advertised_address(admin.host), admin.port) if admin else None,
            registered=self.registered,
            critical_client_count=self.service.critical_client_count,
            critical_average_response_time=self.service.critical_average_response_time,
            pid=os.getpid(),
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
        if self._started is not None and not self._started.called:
            self._started.cancel()
        if self.registered:
            await self._set_registered(False)
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
        await self._hook(self.service.on_stopped)
        if self._own_client and self._client is not None:
            await self._client.stop()
        if self.own_registry and self.registry_started:
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
