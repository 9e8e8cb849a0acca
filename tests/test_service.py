"""
Service host unit tests: remote methods, lifecycle, statistics,
registration at run time and graceful stop, on a fake clock.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import bson
from bson.errors import InvalidBSON
from twisted.internet.address import IPv4Address
from twisted.internet.defer import fail, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from examples.fibonacci import Fibonacci
from examples.sleeper import Sleeper
from examples.testservice import TestService
from skynet.errors import RemoteCallError, ServiceError, ServiceUnregistered
from skynet.registry import Query
from skynet.registry.memory import MemoryRegistry
from skynet.service import (
    ElementCounter,
    Service,
    ServiceHost,
    ServiceStats,
    _ServiceFactory,
    connection_limit,
    go_time,
    local,
    remote,
    remote_method_names,
)
from skynet.testing import LocalCluster, MemoryServerEndpoint

ROOT = Path(__file__).resolve().parent.parent


class Hooks(Service):
    name = "Hooks"

    def __init__(self) -> None:
        self.events: list[str] = []

    def Ping(self, request_info, params):
        return {}

    @local
    def helper(self):
        return 1

    def _private(self):
        return 2

    @staticmethod
    def static_thing():
        return 3

    def on_started(self):
        self.events.append("started")

    async def on_registered(self):
        self.events.append("registered")

    def on_unregistered(self):
        self.events.append("unregistered")
        return succeed(None)

    def on_stopped(self):
        self.events.append("stopped")


class RemoteMethodTests(SynchronousTestCase):
    def test_public_methods_only(self) -> None:
        self.assertEqual(remote_method_names(Hooks), ["Ping"])
        self.assertEqual(remote_method_names(Sleeper), ["Sleep"])

    def test_exported_names_and_marked_methods(self) -> None:
        """
        As in Go's net/rpc, names starting with an upper-case letter are
        remote; a lower-case one only when marked L{remote}; an upper-case
        one marked L{local} is not.
        """

        class Mixed(Service):
            def Exported(self, request_info, params):
                return {}

            def helper(self, request_info, params):
                return {}

            @remote
            def lower(self, request_info, params):
                return {}

            @local
            def Hidden(self, request_info, params):
                return {}

        self.assertEqual(remote_method_names(Mixed), ["Exported", "lower"])

    def test_fibonacci_helper_not_callable_over_the_wire(self) -> None:
        self.assertEqual(remote_method_names(Fibonacci), ["Index"])
        cluster = LocalCluster()
        self.addCleanup(cluster.stop)
        cluster.add(Fibonacci())
        f = self.failureResultOf(cluster.call("Fibonacci", "value", {"index": 3}), RemoteCallError)
        self.assertEqual(str(f.value), 'No such method "value"')
        result = cluster.call("Fibonacci", "Index", {"index": 10})
        cluster.settle()
        self.assertEqual(self.successResultOf(result), {"index": 10, "value": 55})

    def test_defaults(self) -> None:
        cluster = LocalCluster()
        self.addCleanup(cluster.stop)
        host = cluster.add(TestService())
        info = host.service.info
        self.assertEqual((info.name, info.version, info.region), ("TestService", "unknown",
                                                                   "unknown"))  # fmt: skip
        self.assertEqual(info.host, cluster.host)
        self.assertTrue(info.registered)
        self.assertEqual(len(info.uuid), 36)
        named = cluster.add(TestService(), name="Upper", version="2", region="north")
        self.assertEqual((named.service_name, named.version, named.region), ("Upper", "2", "north"))


class LifecycleTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.cluster = LocalCluster()
        self.clock = self.cluster.clock

    def test_hooks_in_order(self) -> None:
        service = Hooks()
        host = self.cluster.add(service)
        self.assertEqual(service.events, ["started", "registered"])
        self.successResultOf(host.set_registered(False))
        self.successResultOf(host.set_registered(False))  # no change, no hook
        self.successResultOf(host.set_registered(True))
        self.successResultOf(host.stopService())
        self.assertEqual(
            service.events,
            ["started", "registered", "unregistered", "registered", "unregistered", "stopped"],
        )

    def test_registry_follows_registration(self) -> None:
        host = self.cluster.add(TestService())
        registry = self.cluster.registry
        [instance] = self.successResultOf(registry.query(Query(service="TestService")))
        self.assertTrue(instance.registered)
        self.assertEqual(instance, host.instance)
        self.successResultOf(host.set_registered(False))
        [instance] = self.successResultOf(registry.query(Query(service="TestService")))
        self.assertFalse(instance.registered)
        self.successResultOf(host.stopService())
        self.assertEqual(self.successResultOf(registry.query(Query())), [])

    def test_unregistered_refuses_new_connections(self) -> None:
        host = self.cluster.add(TestService(), registered=False)
        d = self.cluster.connect(host.instance)
        self.failureResultOf(d, ServiceUnregistered)

    def test_start_unregistered_then_register(self) -> None:
        service = Hooks()
        host = self.cluster.add(service, registered=False)
        self.assertEqual(service.events, ["started"])
        [instance] = self.successResultOf(self.cluster.registry.query(Query()))
        self.assertFalse(instance.registered)
        self.successResultOf(host.set_registered(True))
        self.assertEqual(service.events, ["started", "registered"])

    def test_graceful_stop_drains(self) -> None:
        """
        Stopping unregisters first, lets the call in flight finish, then
        removes the instance and closes connections.
        """
        host = self.cluster.add(Sleeper())
        service = self.cluster.client().service("Sleeper")
        self.cluster.settle()
        d = service.call("Sleep", {"duration": 3_000_000_000, "message": "m"}, timeout=30)
        self.clock.advance(1)
        stopped = host.stopService()
        self.cluster.settle()
        [instance] = self.successResultOf(self.cluster.registry.query(Query()))
        self.assertFalse(instance.registered)
        self.assertNoResult(stopped)
        self.assertNoResult(d)
        self.clock.advance(2)
        self.assertEqual(self.successResultOf(d), {"message": "m"})
        self.successResultOf(stopped)
        self.assertEqual(self.successResultOf(self.cluster.registry.query(Query())), [])
        self.assertEqual(host.clients, 0)

    def test_linger_keeps_an_unregistered_instance_in_the_registry(self) -> None:
        """
        With C{linger}, a stopping instance stays in the registry,
        unregistered and listening, for that long before it leaves: a
        watcher sees the unregistration before the removal.
        """
        host = self.cluster.add(Sleeper())
        host.linger = 0.5
        self.cluster.settle()
        stopped = host.stopService()
        self.cluster.settle()
        [instance] = self.successResultOf(self.cluster.registry.query(Query()))
        self.assertFalse(instance.registered)
        self.assertIsNotNone(host.port)
        self.clock.advance(0.4)
        self.assertNoResult(stopped)
        self.assertEqual(len(self.successResultOf(self.cluster.registry.query(Query()))), 1)
        self.clock.advance(0.2)
        self.successResultOf(stopped)
        self.assertEqual(self.successResultOf(self.cluster.registry.query(Query())), [])

    def test_drain_is_bounded(self) -> None:
        host = self.cluster.add(Sleeper())
        host.drain_timeout = 5
        service = self.cluster.client().service("Sleeper")
        self.cluster.settle()
        d = service.call("Sleep", {"duration": 60_000_000_000}, timeout=120)
        stopped = host.stopService()
        self.clock.advance(4.9)
        self.assertNoResult(stopped)
        self.clock.advance(0.2)
        self.successResultOf(stopped)
        d.cancel()
        self.failureResultOf(d)

    def test_admin_stop(self) -> None:
        stops: list[bool] = []
        registry = MemoryRegistry(reactor=self.clock)
        from skynet.service import ServiceHost

        host = ServiceHost(TestService(), registry, [MemoryServerEndpoint(self.cluster)],
                           reactor=self.clock, stop_process=lambda: stops.append(True))  # fmt: skip
        host.startService()
        self.successResultOf(host.admin_stop(False))
        self.assertEqual(stops, [])
        self.clock.advance(0)
        self.assertEqual(stops, [True])
        self.assertEqual(host.drain_timeout, 0)
        self.successResultOf(host.stopService())

    def test_registry_down_at_start(self) -> None:
        """
        A registry that refuses at first: the service serves anyway and
        registers once the registry accepts.
        """
        registry = MemoryRegistry(reactor=self.clock, store=self.cluster.registry.store)
        real_add = registry.add
        attempts: list[int] = []

        def flaky_add(instance):
            attempts.append(1)
            if len(attempts) < 3:
                return fail(ConnectionError("registry unreachable"))
            return real_add(instance)

        registry.add = flaky_add  # type: ignore[method-assign]
        from skynet.service import ServiceHost

        host = ServiceHost(TestService(), registry, [MemoryServerEndpoint(self.cluster)],
                           reactor=self.clock)  # fmt: skip
        host.startService()
        self.assertFalse(host.in_registry)
        self.clock.advance(0.5)
        self.assertFalse(host.in_registry)
        self.clock.advance(1.0)
        self.assertTrue(host.in_registry)
        self.assertEqual(len(attempts), 3)
        self.successResultOf(host.stopService())


class StatisticsTests(SynchronousTestCase):
    def test_counts_and_percentiles(self) -> None:
        clock = Clock()
        stats = ServiceStats(clock.seconds)
        for i in range(100):
            started = clock.seconds()
            clock.advance((i + 1) / 1000)
            stats.finished(started, failed=(i % 10 == 0))
        self.assertEqual(stats.requests_served, 100)
        self.assertEqual(stats.errors, 10)
        self.assertAlmostEqual(stats.average_response_time, 0.0505)
        self.assertAlmostEqual(stats.percentile(0.5), 0.051)
        self.assertAlmostEqual(stats.percentile(0.99), 0.100)
        doc = stats.to_go(clients=3)
        self.assertEqual(list(doc)[:5], ["Clients", "StartTime", "LastRequest", "RequestsServed",
                                         "AverageResponseTime"])  # fmt: skip
        self.assertEqual(doc["Clients"], 3)
        self.assertEqual(doc["AverageResponseTime"], 50_500_000)
        self.assertRegex(doc["StartTime"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ[+-]\d{4}$")

    def test_go_time_layout(self) -> None:
        self.assertTrue(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ[+-]\d{4}", go_time(0)))

    def test_published_to_registry(self) -> None:
        cluster = LocalCluster()
        host = cluster.add(TestService())
        for word in ("a", "b", "c"):
            self.successResultOf(cluster.call("TestService", "Upcase", {"data": word}))
        self.failureResultOf(cluster.call("TestService", "Upcase", {"data": 1}), ServiceError)
        cluster.clock.advance(5)
        stats = self.successResultOf(cluster.registry.get_stats(host.instance))
        self.assertEqual(stats["RequestsServed"], 4)
        self.assertEqual(stats["Errors"], 1)
        self.assertEqual(stats["Clients"], 1)
        self.assertEqual(stats["UUID"], host.uuid)
        for key in ("StartTime", "LastRequest", "AverageResponseTime", "P50ResponseTime",
                    "P99ResponseTime"):  # fmt: skip
            self.assertIn(key, stats)
        self.successResultOf(cluster.stop())


class LimitTests(SynchronousTestCase):
    def test_connection_limit_follows_the_descriptor_limit(self) -> None:
        """
        By default a service takes 4,096 connections, or fewer when the
        process may not open as many descriptors, keeping 64 for the rest.
        """
        self.assertEqual(connection_limit(1024), 960)
        self.assertEqual(connection_limit(1 << 20), 4096)
        self.assertEqual(connection_limit(10), 1)
        host = ServiceHost(Hooks(), registry=None, endpoints=[], reactor=Clock())
        self.assertEqual(host.max_connections, connection_limit())
        self.assertEqual(host.max_connections_per_peer, 256)

    def test_connections_beyond_the_limits_refused(self) -> None:
        host = ServiceHost(Hooks(), registry=None, endpoints=[], reactor=Clock(),
                           max_connections=3, max_connections_per_peer=2)  # fmt: skip
        factory = _ServiceFactory(host)
        a, b = IPv4Address("TCP", "10.0.0.1", 1), IPv4Address("TCP", "10.0.0.2", 1)
        with capturedLogs() as events:
            first = [factory.buildProtocol(a) for _ in range(3)]
            other = [factory.buildProtocol(b) for _ in range(2)]
        self.assertEqual([p is None for p in first], [False, False, True])
        self.assertEqual([p is None for p in other], [False, True])  # 3 in all
        self.assertEqual([e["refused"] for e in events if "refused" in e], [1, 2])
        first[0].makeConnection(StringTransport())
        first[0].connectionLost(Failure(ConnectionDone()))
        self.assertIsNotNone(factory.buildProtocol(b))
        self.assertEqual(factory.per_peer, {"10.0.0.1": 1, "10.0.0.2": 2})


class ImportTests(SynchronousTestCase):
    def test_importing_installs_no_reactor(self) -> None:
        """
        C{skynet.client} and C{skynet.service} can be imported before a
        reactor is chosen: the asyncio reactor installs afterwards.
        """
        code = (
            "import sys, skynet.client, skynet.service, skynet.protocol\n"
            "assert 'twisted.internet.reactor' not in sys.modules, 'reactor installed'\n"
            "from twisted.internet import asyncioreactor\n"
            "asyncioreactor.install()\n"
            "from twisted.internet import reactor\n"
            "print(type(reactor).__name__)\n"
        )
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=60, cwd=ROOT)  # fmt: skip
        self.assertEqual((done.returncode, done.stderr), (0, ""))
        self.assertEqual(done.stdout.strip(), "AsyncioSelectorReactor")


class ZooKeeperShutdownTests(SynchronousTestCase):
    """
    A real twistd service on a real ZooKeeper, stopped with SIGTERM: it
    unregisters and drains while its registry is still up, then removes
    itself and closes the registry; nothing critical is logged.
    """

    def test_sigterm_leaves_cleanly(self) -> None:
        from tests.processes import ServiceProcess
        from tests.zkserver import ZooKeeperCluster

        zk = ZooKeeperCluster(1).start()
        self.addCleanup(zk.close)
        process = ServiceProcess(
            "examples.testservice:TestService",
            zk.url("/skynet-shutdown"),
            env={"SKYNET_HOME": self.mktemp()},
        ).start()
        self.addCleanup(process.stop)
        deadline = time.monotonic() + 60
        while "Connected to ZooKeeper" not in process.output():
            self.assertLess(time.monotonic(), deadline, process.output())
            self.assertIsNone(process.popen.poll(), process.output())
            time.sleep(0.1)
        time.sleep(1.0)  # registered; the first statistics are published
        process.kill(signal.SIGTERM)
        self.assertIn(process.wait(30), (0, -signal.SIGTERM))
        log = process.output()
        self.assertIn("stopped", log)
        for bad in ("Traceback", "CRITICAL", "critical", "could not update", "could not remove"):
            self.assertNotIn(bad, log)


class ElementCounterTests(TestCase):
    """
    The real worker process counts elements, nested ones included, and
    reports documents it cannot decode.
    """

    async def test_counts_in_a_worker(self) -> None:
        from twisted.internet import reactor

        counter = ElementCounter(reactor)
        self.addCleanup(counter.stop)
        doc = bson.encode({"a": [1, 2, {"b": None}], "c": {"d": 1}})
        self.assertEqual(await counter.count(doc), 7)  # a, c; 1, 2, {}; b; d
        with self.assertRaises(InvalidBSON):
            await counter.count(b"\x0a\x00\x00\x00\x99bad\x00\x00")
        self.assertEqual(counter.pending, 0)
