"""
Test your services without a cluster: no sockets, no registry server.

    from skynet.testing import LocalCluster

    class UpcaseTests(TestCase):
        def test_upcase(self):
            cluster = LocalCluster()
            cluster.add(TestService())
            result = self.successResultOf(
                cluster.call("TestService", "Upcase", {"data": "hi"}))
            self.assertEqual(result, {"data": "HI"})

A L{LocalCluster} serves real L{Service} objects through the real wire
protocol over in-memory connections, registers them in a L{MemoryRegistry},
and hands out L{Client}s that find them through it.  With the default
L{Clock}, everything happens synchronously and time moves only when the test
calls C{cluster.clock.advance(seconds)}: retries, timeouts and sleeps can be
tested without waiting.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionDone, ConnectionLost, ConnectionRefusedError
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocolFactory,
    IStreamServerEndpoint,
    ITransport,
)
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from zope.interface import implementer

from skynet import control
from skynet.client import Client
from skynet.errors import ServiceError
from skynet.protocol import ClientProtocol, RequestInfo
from skynet.registry.base import Instance
from skynet.registry.memory import MemoryRegistry
from skynet.service import Service, ServiceHost

__all__ = ["FakeDaemon", "LocalCluster", "MemoryRegistry", "MemoryTransport", "connect_pair"]


class _Switchboard:
    """
    Delivers bytes between in-memory transports synchronously, but never
    re-entrantly: a write made while delivering waits for the delivery in
    progress to finish.
    """

    def __init__(self) -> None:
        self.queue: list[Any] = []
        self.busy = False

    def post(self, action: Any) -> None:
        self.queue.append(action)
        if self.busy:
            return
        self.busy = True
        try:
            while self.queue:
                self.queue.pop(0)()
        finally:
            self.busy = False


@implementer(ITransport)
class MemoryTransport:
    """
    One end of an in-memory connection.
    """

    def __init__(self, board: _Switchboard, host: IPv4Address, peer: IPv4Address) -> None:
        self.board = board
        self.host = host
        self.peer = peer
        self.protocol: Protocol | None = None
        self.other: "MemoryTransport" | None = None
        self.disconnecting = False
        self.disconnected = False

    def write(self, data: bytes) -> None:
        if self.disconnecting or not data:
            return
        other = self.other
        self.board.post(lambda: other._receive(data))  # type: ignore[union-attr]

    def writeSequence(self, data: Iterable[bytes]) -> None:
        self.write(b"".join(data))

    def _receive(self, data: bytes) -> None:
        if not self.disconnected and self.protocol is not None:
            self.protocol.dataReceived(data)

    def loseConnection(self) -> None:
        self._close(ConnectionDone("closed cleanly"))

    def abortConnection(self) -> None:
        self._close(ConnectionLost("aborted"))

    def _close(self, reason: Exception) -> None:
        if self.disconnecting:
            return
        self.disconnecting = True
        other = self.other
        self.board.post(lambda: self._lost(reason))
        if other is not None:
            other.disconnecting = True
            self.board.post(lambda: other._lost(reason))

    def _lost(self, reason: Exception) -> None:
        if self.disconnected:
            return
        self.disconnected = True
        if self.protocol is not None:
            self.protocol.connectionLost(Failure(reason))

    def getPeer(self) -> IPv4Address:
        return self.peer

    def getHost(self) -> IPv4Address:
        return self.host

    # Enough of ITCPTransport for the protocols here.
    def setTcpNoDelay(self, enabled: bool) -> None:
        pass


def connect_pair(
    server: Protocol,
    client: Protocol,
    server_address: IPv4Address,
    client_address: IPv4Address,
) -> tuple[MemoryTransport, MemoryTransport]:
    """
    Connect two protocols in memory; returns (server side, client side).
    """
    board = _Switchboard()
    server_side = MemoryTransport(board, server_address, client_address)
    client_side = MemoryTransport(board, client_address, server_address)
    server_side.other, client_side.other = client_side, server_side
    server_side.protocol, client_side.protocol = server, client

    def start() -> None:
        server.makeConnection(server_side)
        client.makeConnection(client_side)

    board.post(start)
    return server_side, client_side


@implementer(IListeningPort)
class _MemoryPort:
    def __init__(
        self, cluster: "LocalCluster", factory: IProtocolFactory, address: IPv4Address
    ) -> None:
        self.cluster = cluster
        self.factory = factory
        self.address = address

    def startListening(self) -> None:
        pass

    def stopListening(self) -> Deferred:
        self.cluster.listeners.pop((self.address.host, self.address.port), None)
        return succeed(None)

    def getHost(self) -> IPv4Address:
        return self.address


@implementer(IStreamServerEndpoint)
class MemoryServerEndpoint:
    """
    A server endpoint of a L{LocalCluster}: listening takes the next fake
    port of the cluster's fake host.
    """

    def __init__(self, cluster: "LocalCluster") -> None:
        self.cluster = cluster

    def listen(self, factory: IProtocolFactory) -> Deferred:
        cluster = self.cluster
        cluster.next_port += 1
        address = IPv4Address("TCP", cluster.host, cluster.next_port)
        port = _MemoryPort(cluster, factory, address)
        cluster.listeners[(address.host, address.port)] = port
        return succeed(port)


class LocalCluster:
    """
    An in-memory skynet cluster for tests.

    @ivar clock: the reactor everything runs on (a L{Clock} unless given).
    @ivar registry: the L{MemoryRegistry} the services register in.
    """

    host = "10.0.0.1"

    def __init__(self, reactor: Any = None) -> None:
        self.clock = reactor if reactor is not None else Clock()
        self.registry = MemoryRegistry(reactor=self.clock)
        self.listeners: dict[tuple[str, int], _MemoryPort] = {}
        self.hosts: list[ServiceHost] = []
        self.clients: list[Client] = []
        self.next_port = 9000
        self._client: Client | None = None
        self._client_port = 40000

    def settle(self) -> None:
        """
        Deliver what is due now (registry events are sent a moment later).
        """
        if isinstance(self.clock, Clock):
            for _ in range(5):
                self.clock.advance(0)

    def add(
        self,
        service: Service,
        *,
        name: str | None = None,
        version: str | None = None,
        region: str | None = None,
        registered: bool = True,
    ) -> ServiceHost:
        """
        Start serving C{service} and register it.
        @return: its L{ServiceHost}, started.
        """
        host = ServiceHost(
            service,
            MemoryRegistry(reactor=self.clock, store=self.registry.store),
            [MemoryServerEndpoint(self)],
            [],
            reactor=self.clock,
            name=name,
            version=version,
            region=region,
            registered=registered,
            client=self.client(),
            stop_process=lambda: None,
            own_registry=True,
        )
        host.startService()
        self.hosts.append(host)
        self.settle()
        return host

    def client(self, **options: Any) -> Client:
        """
        A L{Client} connecting in memory to the services of this cluster;
        the same one each time unless options are given.
        """
        if not options and self._client is not None:
            return self._client
        client = Client(registry=self.registry, reactor=self.clock, connector=self.connect,
                        **options)  # fmt: skip
        self.clients.append(client)
        if not options:
            self._client = client
        return client

    def connect(self, instance: Instance) -> Deferred:
        """
        The in-memory connector: a ready L{ClientProtocol} to C{instance}.
        """
        port = self.listeners.get((instance.host, instance.port))
        if port is None:
            return fail(ConnectionRefusedError(f"{instance.host}:{instance.port}"))
        self._client_port += 1
        client_address = IPv4Address("TCP", "10.0.0.254", self._client_port)
        server = port.factory.buildProtocol(client_address)
        if server is None:
            return fail(ConnectionRefusedError(f"{instance.host}:{instance.port} refused"))
        client = ClientProtocol(instance.name)
        connect_pair(server, client, port.address, client_address)  # type: ignore[arg-type]
        return client.ready

    def call(
        self,
        service: str,
        method: str,
        params: dict[str, Any] | None = None,
        request_info: RequestInfo | None = None,
        **query: Any,
    ) -> Deferred:
        """
        Call a method through discovery, as a client would.
        """
        d = self.client().service(service, **query).call(method, params, request_info)
        self.settle()
        return d

    def kill(self, host: ServiceHost) -> None:
        """
        Make an instance vanish as if its process was killed: connections
        drop, it stops listening and its registry entries go.
        """
        if host.port is not None:
            host.port.stopListening()
        for protocol in list(host.connections.values()):
            protocol.transport.abortConnection()  # type: ignore[union-attr]
        host.registry.crash()
        self.hosts.remove(host)
        self.settle()

    def stop(self) -> Deferred:
        """
        Stop every client and service.
        """
        from twisted.internet.defer import DeferredList

        ds = [c.stop() for c in self.clients] + [h.stopService() for h in self.hosts]
        self.clients = []
        self._client = None
        self.hosts = []
        d = DeferredList(ds, consumeErrors=True)
        self.settle()
        return d


class FakeDaemon(Service):
    """
    A stand-in for a host's C{SkynetDaemon} that supervises nothing: it
    claims the uuids in C{managed}, answers C{ListSubServices} with
    complete L{control.SubServiceStatus} records, and records every call
    it gets in C{calls} as C{(method, uuid)} (C{(method, params)} for
    C{Deploy}).  Add it to a L{LocalCluster} to test the shell or the
    dashboard's routes through a daemon.

    @ivar listing: if set, what C{ListSubServices} answers instead (to test
        how a reader refuses an answer that breaks the contract).
    """

    listing: Any = None

    name = control.DAEMON_SERVICE

    def __init__(self, managed: Iterable[str] = (), deployed_uuid: str = "deployed-uuid") -> None:
        self.managed = set(managed)
        self.deployed_uuid = deployed_uuid
        self.calls: list[tuple[str, Any]] = []

    def status(self, uuid: str) -> control.SubServiceStatus:
        """
        What C{ListSubServices} says of C{uuid}: running and registered.
        """
        return control.SubServiceStatus(
            uuid=uuid, service="fake:Service", args=(), running=True, pid=None, restarts=0,
            started=None, registered=True, last_exit=None, desired_registered=True, held=(),
            in_registry=True, next_restart=None, backoff=1.0, log=None, cpu=None, rss=None,
        )  # fmt: skip

    def ListSubServices(self, request_info: Any, params: dict[str, Any]) -> dict[str, Any]:
        if self.listing is not None:
            return self.listing
        return control.sub_services_to_bson(self.status(u) for u in sorted(self.managed))

    def _act(self, method: str, params: dict[str, Any], **answer: Any) -> dict[str, Any]:
        uuid = params.get("uuid")
        self.calls.append((method, uuid))
        if uuid not in self.managed:
            raise ServiceError(f"no sub-service with uuid {uuid} on this host")
        return {"ok": True, "uuid": uuid, **answer}

    def StopSubService(self, request_info: Any, params: dict[str, Any]) -> dict[str, Any]:
        return self._act(control.STOP_SUB_SERVICE, params)

    def RestartSubService(self, request_info: Any, params: dict[str, Any]) -> dict[str, Any]:
        return self._act(control.RESTART_SUB_SERVICE, params)

    def RegisterSubService(self, request_info: Any, params: dict[str, Any]) -> dict[str, Any]:
        return self._act(control.REGISTER_SUB_SERVICE, params, registered=True)

    def UnregisterSubService(self, request_info: Any, params: dict[str, Any]) -> dict[str, Any]:
        return self._act(control.UNREGISTER_SUB_SERVICE, params, registered=False)

    def Deploy(self, request_info: Any, params: dict[str, Any]) -> dict[str, Any]:
        self.calls.append((control.DEPLOY, dict(params)))
        return {"uuid": self.deployed_uuid}
