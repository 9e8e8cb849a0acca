"""
Client unit tests on an in-memory cluster and a fake clock: discovery,
retries, hedging, timeouts, eviction, pools and load balancing.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from examples.fibonacci import Fibonacci
from examples.testservice import TestService
from skynet.client import (
    GoScoreBalancer,
    ILoadBalancer,
    InstanceHandle,
    RoundRobinBalancer,
    _Wheel,
)
from skynet.errors import (
    ConnectionFailed,
    NoInstances,
    ProtocolError,
    RemoteCallError,
    RequestTimeout,
    ServiceError,
)
from skynet.protocol import RequestInfo, encode_header
from skynet.registry.base import Instance
from skynet.service import Service
from skynet.testing import LocalCluster


class Recorder(Service):
    """
    Remembers each call's request info; answers at once, or never when
    told to hang.
    """

    name = "Recorder"

    def __init__(self, hang: bool = False) -> None:
        self.hang = hang
        self.seen: list[RequestInfo] = []
        self.pending: list[Deferred] = []

    def Hello(self, request_info, params):
        self.seen.append(request_info)
        if self.hang:
            d: Deferred = Deferred()
            self.pending.append(d)
            return d
        return {"from": self.info.uuid}


def lie_in_answers(cluster: LocalCluster, host) -> None:
    """
    Make every answer of C{host} undecodable: a good header, then a body of
    12 bytes that only starts like one.
    """
    port = next(p for p in cluster.listeners.values() if p.factory.host is host)
    build = port.factory.buildProtocol

    def lying(addr):
        protocol = build(addr)

        def respond(servicemethod, seq, out, errstring, started, failed):
            protocol.in_flight -= 1
            protocol.send_bytes(
                encode_header(servicemethod, seq, "") + b"\x0c\x00\x00\x00\x05out\x00\x00\x00\x00"
            )
            host.request_finished(started, failed)

        protocol._respond = respond
        return protocol

    port.factory.buildProtocol = lying


class ClientTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.cluster = LocalCluster()
        self.clock = self.cluster.clock

    def tearDown(self) -> None:
        self.cluster.stop()
        self.cluster.settle()

    def service(self, name: str, **kw):
        """
        A service client whose first registry snapshot has arrived.
        """
        service = self.cluster.client().service(name, **kw)
        self.cluster.settle()
        return service

    def call(self, service: str, method: str, params=None, **kw) -> Deferred:
        d = self.cluster.call(service, method, params, **kw)
        return d

    def test_call_through_discovery(self) -> None:
        self.cluster.add(TestService())
        result = self.successResultOf(self.call("TestService", "Upcase", {"data": "hi"}))
        self.assertEqual(result, {"data": "HI"})

    def test_waits_for_an_instance(self) -> None:
        """
        A call made before any instance exists waits, and succeeds once one
        registers.
        """
        d = self.call("TestService", "Upcase", {"data": "late"})
        self.clock.advance(1)
        self.assertNoResult(d)
        self.cluster.add(TestService())
        self.clock.advance(0.2)
        self.assertEqual(self.successResultOf(d), {"data": "LATE"})

    def test_no_early_hedge_after_waiting(self) -> None:
        """
        A call that waited for an instance hedges a full retry interval
        after its attempt, not at the next quick look for instances.
        """
        d = self.call("Recorder", "Hello")
        self.clock.advance(0.05)
        slow = self.cluster.add(Recorder(hang=True))
        self.cluster.add(Recorder(hang=True))
        attempts = lambda: sum(len(h.service.seen) for h in self.cluster.hosts)  # noqa: E731
        self.assertEqual(attempts(), 1)
        for _ in range(19):
            self.clock.advance(0.1)
        self.assertEqual(attempts(), 1)
        self.clock.advance(0.1 + 1 / 32)
        self.assertEqual(attempts(), 2)
        self.assertTrue(slow.service.seen)
        d.cancel()
        self.failureResultOf(d)

    def test_no_instances(self) -> None:
        d = self.call("Nobody", "Hello")
        self.clock.advance(9.9)
        self.assertNoResult(d)
        self.clock.advance(0.2)
        self.failureResultOf(d, NoInstances)

    def test_errors_carry_the_message(self) -> None:
        self.cluster.add(TestService())
        f = self.failureResultOf(self.call("TestService", "Upcase", {"data": 3}), ServiceError)
        self.assertEqual(str(f.value), "Upcase needs a string 'data'")
        f = self.failureResultOf(self.call("TestService", "Downcase"), RemoteCallError)
        self.assertEqual(str(f.value), 'No such method "Downcase"')

    def test_errors_are_not_retried(self) -> None:
        recorder = Recorder()
        self.cluster.add(recorder)
        self.cluster.add(Recorder())
        service = self.service("Recorder")
        self.failureResultOf(service.call("Nope"), RemoteCallError)
        self.clock.advance(5)
        self.assertEqual(sum(len(h.service.seen) for h in self.cluster.hosts), 0)

    def test_killed_instance_calls_go_elsewhere(self) -> None:
        a = self.cluster.add(Recorder())
        b = self.cluster.add(Recorder())
        service = self.service("Recorder")
        for _ in range(4):
            self.successResultOf(service.call("Hello"))
        self.assertTrue(a.service.seen and b.service.seen)
        # Kill a without telling the registry: the client finds out itself.
        silently_kill(a)
        results = [service.call("Hello") for _ in range(10)]
        answers = [self.successResultOf(d)["from"] for d in results]
        self.assertEqual(set(answers), {b.uuid})
        self.assertFalse(service.handles[a.uuid].available(self.clock.seconds()))

    def test_undecodable_answers_evict_their_instance(self) -> None:
        """
        An instance whose answers cannot be decoded is a broken instance,
        not a service error: its calls go to another instance, and it is
        taken out of rotation (it kept half of all calls, failing them).
        """
        liar = self.cluster.add(Recorder())
        good = self.cluster.add(Recorder())
        lie_in_answers(self.cluster, liar)
        service = self.service("Recorder")
        service.handles[good.uuid].last_used = 1 << 60  # the liar first
        with capturedLogs():
            answers = [self.successResultOf(service.call("Hello"))["from"] for _ in range(20)]
        self.assertEqual(set(answers), {good.uuid})
        self.assertEqual(len(liar.service.seen), 1)
        self.assertFalse(service.handles[liar.uuid].available(self.clock.seconds()))

    def test_undecodable_answer_fails_a_single_attempt_as_connection_trouble(self) -> None:
        liar = self.cluster.add(Recorder())
        lie_in_answers(self.cluster, liar)
        service = self.service("Recorder")
        with capturedLogs():
            f = self.failureResultOf(service.call_once("Hello"), ProtocolError)
        self.assertIn("undecodable response body", str(f.value))

    def test_service_clients_cached_by_query_and_intervals(self) -> None:
        """
        Asking for a service with the same intervals again gives the same
        service client, so one registry watch, however often it is asked.
        """
        client = self.cluster.client()
        watches = []
        real_watch = client.registry.watch
        client.registry.watch = lambda q, listener: watches.append(q) or real_watch(q, listener)
        first = client.service("Recorder", retry_interval=0.5)
        for _ in range(50):
            self.assertIs(client.service("Recorder", retry_interval=0.5), first)
        other = client.service("Recorder", retry_interval=0.25)
        self.assertIsNot(other, first)
        self.assertIs(client.service("Recorder", retry_interval=client.retry_interval),
                      client.service("Recorder"))  # fmt: skip
        self.cluster.settle()
        self.assertEqual(len(watches), 3)

    def test_explicit_zero_is_not_the_default(self) -> None:
        """
        C{retry_interval=0} means no retry on time (only after a failure):
        a hung instance is not hedged after the default 2 s; and
        C{giveup_timeout=0} is kept too.
        """
        self.cluster.add(Recorder(hang=True))
        self.cluster.add(Recorder(hang=True))
        service = self.service("Recorder", retry_interval=0)
        self.assertEqual(service.retry_interval, 0)
        d = service.call("Hello")
        self.clock.advance(5)
        self.assertEqual(sum(len(h.service.seen) for h in self.cluster.hosts), 1)
        self.clock.advance(5.1)
        self.failureResultOf(d, RequestTimeout)
        self.assertEqual(
            self.cluster.client().service("Recorder", giveup_timeout=0).giveup_timeout, 0
        )

    def test_idle_connection_closed_by_the_service_is_no_failure(self) -> None:
        host = self.cluster.add(Recorder())
        service = self.service("Recorder")
        self.successResultOf(service.call("Hello"))
        handle = service.handles[host.uuid]
        self.assertEqual(len(handle.connections), 1)
        for protocol in list(host.connections.values()):
            protocol.close_connection()
        self.cluster.settle()
        self.assertEqual(handle.connections, [])
        self.assertTrue(handle.available(self.clock.seconds()))
        self.successResultOf(service.call("Hello"))

    def test_retry_keeps_request_id_and_counts(self) -> None:
        """
        When the first instance hangs, an extra attempt goes to another after
        the retry interval, with the same request id and retrycount 1; the
        first answer wins and the other attempt is forgotten.
        """
        slow = self.cluster.add(Recorder(hang=True))
        fast = self.cluster.add(Recorder())
        service = self.service("Recorder")
        # Make the slow one the balancer's first choice.
        service.handles[fast.uuid].last_used = 1 << 60
        d = service.call("Hello", request_info=RequestInfo("the-request"))
        self.assertNoResult(d)
        self.assertEqual(len(slow.service.seen), 1)
        self.clock.advance(2.0)
        self.assertEqual(self.successResultOf(d)["from"], fast.uuid)
        self.assertEqual(slow.service.seen[0].request_id, "the-request")
        self.assertEqual(slow.service.seen[0].retry_count, 0)
        self.assertEqual(fast.service.seen[0].request_id, "the-request")
        self.assertEqual(fast.service.seen[0].retry_count, 1)
        # The slow answer arriving later changes nothing.
        slow.service.pending[0].callback({"late": True})
        # The overtaken instance is avoided for a while: the next calls go
        # straight to the other one.
        self.assertFalse(service.handles[slow.uuid].available(self.clock.seconds()))
        for _ in range(3):
            self.assertEqual(self.successResultOf(service.call("Hello"))["from"], fast.uuid)
        self.assertEqual(len(slow.service.seen), 1)

    def test_hung_instance_probed_back(self) -> None:
        """
        Many calls overtaken at once on a hung instance count as one
        trouble (1 s out, not the 30 s cap); when that is up, one call
        probes it while the others go elsewhere; once it answers, it is back
        in rotation.
        """
        hung = self.cluster.add(Recorder(hang=True))
        fine = self.cluster.add(Recorder())
        service = self.service("Recorder")
        service.handles[fine.uuid].last_used = 1 << 60
        calls = [service.call("Hello") for _ in range(20)]
        held = len(hung.service.seen)
        self.assertGreater(held, 0)
        self.clock.advance(2.0)
        for d in calls:
            self.assertEqual(self.successResultOf(d)["from"], fine.uuid)
        handle = service.handles[hung.uuid]
        self.assertEqual(handle.backoff, 1.0)
        for _ in range(5):
            self.successResultOf(service.call("Hello"))
        self.assertEqual(len(hung.service.seen), held)
        self.clock.advance(1.0)
        probes = [service.call("Hello") for _ in range(10)]
        self.assertEqual(len(hung.service.seen), held + 1)  # exactly one probe
        self.assertEqual(sum(1 for d in probes if d.called), 9)
        # It wakes up and answers everything it holds: back in rotation.
        hung.service.hang = False
        for d in hung.service.pending:
            d.callback({"from": hung.uuid})
        self.assertTrue(all(d.called for d in probes))
        self.assertTrue(handle.available(self.clock.seconds()))
        self.assertEqual(handle.backoff, 0.0)
        answers = {self.successResultOf(service.call("Hello"))["from"] for _ in range(6)}
        self.assertEqual(answers, {hung.uuid, fine.uuid})

    def test_request_timeout(self) -> None:
        self.cluster.add(Recorder(hang=True))
        self.cluster.add(Recorder(hang=True))
        d = self.service("Recorder").call("Hello")
        self.clock.advance(9.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        f = self.failureResultOf(d, RequestTimeout)
        self.assertIn("2 attempt", str(f.value))

    def test_configurable_intervals(self) -> None:
        self.cluster.add(Recorder(hang=True))
        service = self.service("Recorder", retry_interval=0.5, giveup_timeout=1.5)
        d = service.call("Hello")
        self.clock.advance(1.5)
        self.failureResultOf(d, RequestTimeout)
        self.clock.advance(0.01)
        d = service.call("Hello", timeout=0.2)
        self.clock.advance(0.18)
        self.assertNoResult(d)
        # Timers have a resolution of 1/32 s.
        self.clock.advance(0.02 + 1 / 32)
        self.failureResultOf(d, RequestTimeout)

    def test_unregistered_instance_gets_no_new_calls(self) -> None:
        a = self.cluster.add(Recorder())
        b = self.cluster.add(Recorder())
        service = self.service("Recorder")
        self.successResultOf(service.call("Hello"))
        self.successResultOf(a.set_registered(False))
        self.cluster.settle()
        before = len(a.service.seen)
        for _ in range(6):
            self.assertEqual(self.successResultOf(service.call("Hello"))["from"], b.uuid)
        self.assertEqual(len(a.service.seen), before)
        self.successResultOf(a.set_registered(True))
        self.cluster.settle()
        answers = {self.successResultOf(service.call("Hello"))["from"] for _ in range(6)}
        self.assertEqual(answers, {a.uuid, b.uuid})

    def test_version_and_region_filters(self) -> None:
        v1 = self.cluster.add(Recorder(), version="1", region="east")
        v2 = self.cluster.add(Recorder(), version="2", region="west")
        for _ in range(3):
            d = self.service("Recorder", version="2").call("Hello")
            self.assertEqual(self.successResultOf(d)["from"], v2.uuid)
            d = self.service("Recorder", region="east").call("Hello")
            self.assertEqual(self.successResultOf(d)["from"], v1.uuid)

    def test_call_once_does_not_retry(self) -> None:
        self.cluster.add(Recorder(hang=True))
        self.cluster.add(Recorder(hang=True))
        service = self.service("Recorder")
        d = service.call_once("Hello", timeout=5)
        self.clock.advance(5)
        self.failureResultOf(d, RequestTimeout)
        self.assertEqual(sum(len(h.service.seen) for h in self.cluster.hosts), 1)

    def test_call_once_reports_connection_failure(self) -> None:
        a = self.cluster.add(Recorder())
        service = self.service("Recorder")
        self.successResultOf(service.call_once("Hello"))
        silently_kill(a)
        self.failureResultOf(service.call_once("Hello"), ConnectionFailed)

    def test_cancel(self) -> None:
        host = self.cluster.add(Recorder(hang=True))
        d = self.service("Recorder").call("Hello")
        d.cancel()
        self.failureResultOf(d)
        self.clock.advance(20)
        self.assertEqual(len(host.service.seen), 1)

    def test_calls_write_no_class_state(self) -> None:
        """
        A call writes to its objects, never to their classes.  A class
        written on every call (a shared use counter once was) invalidates
        the interpreter's attribute caches for every instance of it: that
        cost about a tenth of the client's time per call.
        """
        from skynet.client import Client, InstanceHandle, ServiceClient, _Attempt, _Call, _Wheel
        from skynet.protocol import ClientProtocol

        self.cluster.add(TestService())
        service = self.service("TestService")
        self.successResultOf(service.call("Upcase", {"data": "a"}))
        classes = {cls for top in (Client, ServiceClient, InstanceHandle, _Call, _Attempt,
                                   _Wheel, ClientProtocol) for cls in top.__mro__}  # fmt: skip
        classes.discard(object)
        before = {cls: dict(vars(cls)) for cls in classes}
        for n in range(5):
            self.successResultOf(service.call("Upcase", {"data": f"b{n}"}))
        self.assertEqual({cls: dict(vars(cls)) for cls in classes}, before)

    def test_pool_reuses_connections(self) -> None:
        host = self.cluster.add(Recorder())
        service = self.service("Recorder")
        for _ in range(20):
            self.successResultOf(service.call("Hello"))
        self.assertEqual(host.clients, 1)

    def test_pool_grows_under_load_and_trims_idle(self) -> None:
        host = self.cluster.add(Recorder(hang=True))
        client = self.cluster.client(max_in_flight_per_connection=2, max_connections=3,
                                     max_idle=1)  # fmt: skip
        service = client.service("Recorder")
        self.cluster.settle()
        calls = [service.call("Hello") for _ in range(10)]
        self.assertEqual(host.clients, 3)
        for d in host.service.pending:
            d.callback({"ok": True})
        for d in calls:
            self.successResultOf(d)
        self.clock.advance(5)
        self.assertEqual(host.clients, 1)

    def test_fibonacci_through_the_cluster(self) -> None:
        """
        Fibonacci recurses through the cluster, passing the request info.
        """
        hosts = [self.cluster.add(Fibonacci()) for _ in range(2)]
        result = self.successResultOf(self.call("Fibonacci", "Index", {"index": 30}))
        self.assertEqual(result, {"index": 30, "value": 832040})
        served = [h.stats.requests_served for h in hosts]
        self.assertTrue(all(served), served)
        f = self.failureResultOf(self.call("Fibonacci", "Index", {"index": -1}), ServiceError)
        self.assertEqual(str(f.value), "negative index -1")


def silently_kill(host) -> None:
    """
    Stop an instance listening and drop its connections, leaving its
    registry entry behind (as a crash does until the registry notices).
    """
    host.port.stopListening()
    for protocol in list(host.connections.values()):
        protocol.transport.abortConnection()


def handle(uuid: str, region: str = "r", host: str = "h", critical_clients: int = 10,
           critical_time: float = 1.0) -> InstanceHandle:  # fmt: skip
    instance = Instance(uuid=uuid, name="S", version="1", region=region, host=host, port=1,
                        critical_client_count=critical_clients,
                        critical_average_response_time=critical_time)  # fmt: skip
    return InstanceHandle(owner=None, instance=instance)  # type: ignore[arg-type]


class BalancerTests(SynchronousTestCase):
    def test_interfaces(self) -> None:
        verifyObject(ILoadBalancer, GoScoreBalancer())
        verifyObject(ILoadBalancer, RoundRobinBalancer())

    def test_go_scores(self) -> None:
        balancer = GoScoreBalancer(region="east", host="10.0.0.1")
        local = handle("local", region="east", host="10.0.0.1")
        same_region = handle("region", region="east", host="10.0.0.2")
        far = handle("far", region="west", host="10.0.0.3")
        self.assertEqual(balancer.score(local), 13)
        self.assertEqual(balancer.score(same_region), 10)
        self.assertEqual(balancer.score(far), 0)
        self.assertIs(balancer.choose([far, same_region, local]), local)
        local.remote_clients = 10
        self.assertEqual(balancer.score(local), -2)
        self.assertIs(balancer.choose([far, same_region, local]), same_region)
        same_region.average_response_time = 1.0
        self.assertEqual(balancer.score(same_region), -7)
        self.assertIs(balancer.choose([far, same_region, local]), far)

    def test_ties_go_to_the_oldest_last_request(self) -> None:
        balancer = GoScoreBalancer()
        a, b, c = handle("a"), handle("b"), handle("c")
        a.last_used, b.last_used, c.last_used = 3, 1, 2
        self.assertIs(balancer.choose([a, b, c]), b)

    def test_round_robin(self) -> None:
        balancer = RoundRobinBalancer()
        hs = [handle("a"), handle("b"), handle("c")]
        picks = [balancer.choose(hs).uuid for _ in range(6)]
        self.assertEqual(sorted(picks), ["a", "a", "b", "b", "c", "c"])

    def test_pluggable(self) -> None:
        cluster = LocalCluster()
        self.addCleanup(cluster.stop)
        hosts = [cluster.add(Recorder()) for _ in range(3)]
        client = cluster.client(balancer=RoundRobinBalancer)
        service = client.service("Recorder")
        cluster.settle()
        for _ in range(9):
            self.successResultOf(service.call("Hello"))
        self.assertEqual([len(h.service.seen) for h in hosts], [3, 3, 3])


class WheelTests(SynchronousTestCase):
    def test_timers_fire_in_time_when_a_tick_adds_a_later_one(self) -> None:
        """
        A call re-adding itself during a tick must not delay the buckets
        already waiting for an earlier time.
        """
        clock = Clock()
        wheel = _Wheel(clock)
        fired: list[tuple[str, float]] = []

        class Call:
            def __init__(self, name: str, again: float | None = None) -> None:
                self.name, self.again = name, again

            def _tick(self) -> None:
                fired.append((self.name, clock.seconds()))
                if self.again:
                    wheel.add(self, clock.seconds() + self.again)
                    self.again = None

        wheel.add(Call("a", 2.0), 1.0)
        wheel.add(Call("b"), 1.5)
        for _ in range(16):
            clock.advance(0.25)
        self.assertEqual(fired, [("a", 1.0), ("b", 1.5), ("a", 3.0)])

    def test_discard(self) -> None:
        clock = Clock()
        wheel = _Wheel(clock)
        fired: list[str] = []

        class Call:
            def _tick(self) -> None:
                fired.append("x")

        call = Call()
        key = wheel.add(call, 0.5)
        wheel.discard(call, key)
        clock.advance(1)
        self.assertEqual(fired, [])
        self.assertEqual(clock.getDelayedCalls(), [])
