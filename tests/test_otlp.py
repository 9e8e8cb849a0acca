"""
OTLP export on a L{Clock} with a fake HTTP agent: the JSON the collector
gets, batching, the bounded queue, back-off and the flush on stop, and the
C{twistd skynet-service} options (a real collector and real processes are in
test_otlp_real).
"""

from __future__ import annotations

import json
import os
from typing import Any

import attr
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import ResponseDone

from examples.fibonacci import Fibonacci
from skynet import service_tap
from skynet.config import environment_defaults
from skynet.errors import ServiceError
from skynet.observe import otlp, tracing
from skynet.protocol import RequestInfo, new_request_id
from skynet.testing import LocalCluster
from tests.test_trace import Slow

REQUEST = "0f8fad5b-d9cb-469f-a165-70867728950e"


class FakeResponse:
    def __init__(self, code: int, body: bytes = b"{}") -> None:
        self.code = code
        self.phrase = b"Whatever"
        self.body = body

    def deliverBody(self, protocol: Any) -> None:
        protocol.dataReceived(self.body)
        protocol.connectionLost(Failure(ResponseDone()))


class FakeAgent:
    """
    An C{IAgent} that records each request; C{answer} decides what it gets:
    an HTTP code, an exception, or L{None} (a Deferred the test fires).
    """

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.answer: Any = 200

    def request(self, method, uri, headers, body):
        sink: list[bytes] = []

        class Consumer:
            write = sink.append

        body.startProducing(Consumer())
        d: Deferred = Deferred()
        self.requests.append(
            {
                "method": method,
                "uri": uri,
                "headers": headers,
                "body": json.loads(b"".join(sink)),
                "length": body.length,
                "deferred": d,
            }
        )
        if isinstance(self.answer, int):
            return succeed(FakeResponse(self.answer))
        if isinstance(self.answer, Exception):
            return fail(self.answer)
        return d

    def spans(self, index: int = -1) -> list[dict[str, Any]]:
        return self.requests[index]["body"]["resourceSpans"][0]["scopeSpans"][0]["spans"]


@attr.frozen
class Site:
    service: str = "Svc"
    method: str = "Do"
    uuid: str = "u-1"


def server_tuple(n: int, request_id: str = REQUEST, peer: str = "10.0.0.9:1234") -> tuple:
    return (tracing._SERVER, n, request_id, Site(), peer, 0, 100.0 + n, 0.5, None)


def attributes(span: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for a in span["attributes"]:
        (value,) = a["value"].values()
        out[a["key"]] = value
    return out


class Exporting(TestCase):
    """
    A L{LocalCluster} whose process's ring has an exporter's sink installed.
    """

    def setUp(self) -> None:
        saved = tracing.RING, tracing.ENABLED
        tracing.configure(1000)
        self.addCleanup(lambda: setattr(tracing, "RING", saved[0]))
        self.addCleanup(lambda: setattr(tracing, "ENABLED", saved[1]))
        self.cluster = LocalCluster()
        self.clock = self.cluster.clock
        self.agent = FakeAgent()
        self.events: list[dict[str, Any]] = []

    def exporter(self, **kw: Any) -> otlp.OTLPExporter:
        kw.setdefault("interval", 1.0)
        exporter = otlp.OTLPExporter(
            kw.pop("endpoint", "http://127.0.0.1:4318"),
            otlp.Resource("Tests", "7", "uuid-7", "box"),
            reactor=self.clock,
            agent=self.agent,
            **kw,
        )
        exporter.log = Logger(observer=self.events.append)
        exporter.startService()
        self.addCleanup(self.stop, exporter)
        return exporter

    def stop(self, exporter: otlp.OTLPExporter) -> None:
        if exporter.running:
            stopped = exporter.stopService()
            self.clock.advance(exporter.stop_timeout)
            self.successResultOf(stopped)
        left = [c for c in self.clock.getDelayedCalls() if "OTLPExporter" in repr(c)]
        self.assertEqual(left, [])

    def warnings(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e["log_level"].name == "warn"]


class EncodingTests(Exporting):
    def test_one_call_as_the_collector_gets_it(self) -> None:
        """A call's client and server spans: OTLP JSON, linked, on the clock's times."""
        self.exporter()
        self.cluster.add(Slow(self.clock))
        d = (
            self.cluster.client()
            .service("Slow")
            .call("Wait", {"seconds": 1.5}, RequestInfo(REQUEST))
        )
        self.cluster.settle()
        self.clock.advance(1.5)
        self.cluster.settle()
        self.assertEqual(self.successResultOf(d), {"ok": True})
        self.assertEqual(self.agent.requests, [])  # nothing sent in the call path
        self.clock.advance(1.0)
        [request] = self.agent.requests
        self.assertEqual(request["method"], b"POST")
        self.assertEqual(request["uri"], b"http://127.0.0.1:4318/v1/traces")
        self.assertEqual(request["headers"].getRawHeaders(b"content-type"), [b"application/json"])
        [resource_spans] = request["body"]["resourceSpans"]
        self.assertEqual(
            attributes(resource_spans["resource"]),
            {"service.name": "Tests", "service.version": "7", "service.instance.id": "uuid-7",
             "host.name": "box"},
        )  # fmt: skip
        [scope] = resource_spans["scopeSpans"]
        self.assertEqual(scope["scope"], {"name": "skynet"})
        spans = {s["kind"]: s for s in scope["spans"]}
        self.assertEqual(sorted(spans), [2, 3])
        server, client = spans[2], spans[3]
        trace = "0f8fad5bd9cb469fa16570867728950e"
        self.assertEqual({server["traceId"], client["traceId"]}, {trace})
        self.assertEqual(server["parentSpanId"], client["spanId"])
        self.assertNotIn("parentSpanId", client)  # the root
        for span in (server, client):
            self.assertEqual(span["name"], "Slow.Wait")
            self.assertRegex(span["spanId"], "^[0-9a-f]{16}$")
            self.assertEqual(span["status"], {"code": 1})
            self.assertIsInstance(span["startTimeUnixNano"], str)
            start, end = int(span["startTimeUnixNano"]), int(span["endTimeUnixNano"])
            self.assertEqual(end - start, 1_500_000_000)
        ring = {s["kind"]: s for s in tracing.RING.find(REQUEST)}
        process, number = ring["server"]["id"].split("-")  # the ring's id, as 16 hex digits
        self.assertEqual(server["spanId"], f"{process}{int(number):08x}")
        a = attributes(server)
        self.assertEqual(a["skynet.request_id"], REQUEST)
        self.assertEqual(a["skynet.span"], ring["server"]["id"])
        self.assertEqual(a["net.peer"], ring["server"]["peer"])
        self.assertEqual(a["skynet.uuid"], ring["server"]["uuid"])
        self.assertEqual(a["skynet.outcome"], "ok")
        a = attributes(client)
        self.assertEqual(a["skynet.attempts"], "1")  # int64 as a string
        self.assertEqual(a["skynet.span"], ring["client"]["id"])
        self.assertEqual(a["net.peer"], ",".join(ring["client"]["targets"]))

    def test_errors_are_the_status(self) -> None:
        self.exporter()
        self.cluster.add(Slow(self.clock))
        d = self.cluster.client().service("Slow").call("Fail", {}, RequestInfo(REQUEST))
        self.cluster.settle()
        self.failureResultOf(d, ServiceError)
        self.clock.advance(1.0)
        statuses = [s["status"] for s in self.agent.spans()]
        self.assertEqual(statuses, [{"code": 2, "message": "no luck"}] * 2)

    def test_fibonacci_spans_form_the_call_tree(self) -> None:
        """
        Every span of a recursive request has its parent in the export but
        the root, and the links are the ones of L{tracing.build_tree}.
        """
        self.exporter(batch_size=10_000)
        hosts = [self.cluster.add(Fibonacci()), self.cluster.add(Fibonacci())]
        request_id = new_request_id()
        d = (
            self.cluster.client()
            .service("Fibonacci")
            .call("Index", {"index": 10}, RequestInfo(request_id))
        )
        for _ in range(20):
            self.cluster.settle()
        self.assertEqual(self.successResultOf(d)["value"], 55)
        self.clock.advance(1.0)
        spans = [s for r in self.agent.requests for s in r["body"]["resourceSpans"][0]
                 ["scopeSpans"][0]["spans"]]  # fmt: skip
        served = sum(h.method_stats.methods["Index"].requests for h in hosts)
        self.assertEqual(len([s for s in spans if s["kind"] == 2]), served)
        self.assertEqual(len([s for s in spans if s["kind"] == 3]), served)
        self.assertEqual({s["traceId"] for s in spans}, {otlp.trace_id(request_id)})
        ids = {s["spanId"]: s for s in spans}
        self.assertEqual(len(ids), len(spans))
        roots = [s for s in spans if "parentSpanId" not in s]
        self.assertEqual([r["kind"] for r in roots], [3])
        for s in spans:
            if s is not roots[0]:
                parent = ids[s["parentSpanId"]]
                self.assertNotEqual(parent["kind"], s["kind"])  # client -> server -> client
        # The same links as the ring's own tree.
        by_ring = {attributes(s)["skynet.span"]: s for s in spans}

        def check(node):
            client = by_ring[node["client"]["id"]]
            [server] = node["servers"]
            self.assertEqual(by_ring[server["id"]]["parentSpanId"], client["spanId"])
            for child in node["children"]:
                self.assertEqual(by_ring[child["client"]["id"]]["parentSpanId"],
                                 by_ring[server["id"]]["spanId"])  # fmt: skip
                check(child)

        [root] = tracing.build_tree(tracing.RING.find(request_id))
        check(root)

    def test_retry_on_another_instance_links_to_the_attempt_that_answered(self) -> None:
        """
        The instance serving a call dies; the retry on another answers: its
        server span is the client span's child, and the dead one's names a
        parent that no exported span has.
        """
        self.exporter()
        first = self.cluster.add(Slow(self.clock))
        d = self.cluster.call("Slow", "Wait", {"seconds": 5}, RequestInfo(REQUEST))
        second = self.cluster.add(Slow(self.clock))
        self.cluster.settle()
        self.cluster.kill(first)
        self.clock.advance(5)
        self.cluster.settle()
        self.assertEqual(self.successResultOf(d), {"ok": True})
        self.clock.advance(1)
        spans = [s for r in range(len(self.agent.requests)) for s in self.agent.spans(r)]
        [client] = [s for s in spans if s["kind"] == 3]
        self.assertEqual(attributes(client)["skynet.attempts"], "2")
        servers = {attributes(s)["skynet.uuid"]: s for s in spans if s["kind"] == 2}
        self.assertEqual(servers[second.uuid]["parentSpanId"], client["spanId"])
        # The dead instance's method still ended (on the clock) after the kill.
        self.assertNotIn(servers[first.uuid]["parentSpanId"], {s["spanId"] for s in spans})
        self.assertEqual(len(spans), 3)

    def test_trace_ids(self) -> None:
        self.assertEqual(otlp.trace_id(REQUEST.upper()), "0f8fad5bd9cb469fa16570867728950e")
        other = otlp.trace_id("go-style-request-17")
        self.assertRegex(other, "^[0-9a-f]{32}$")
        self.assertEqual(other, otlp.trace_id("go-style-request-17"))
        self.assertNotEqual(other, otlp.trace_id("go-style-request-18"))
        self.assertNotEqual(otlp.trace_id("0" * 32), "0" * 32)  # all-zero is invalid in OTLP


class QueueTests(Exporting):
    def test_a_full_batch_goes_at_once_the_rest_on_the_interval(self) -> None:
        exporter = self.exporter(batch_size=3)
        for n in range(1, 8):
            tracing.RING.add(server_tuple(n))
        self.clock.advance(0)
        self.assertEqual([len(self.agent.spans(i)) for i in range(len(self.agent.requests))],
                         [3, 3])  # fmt: skip
        self.clock.advance(1.0)
        self.assertEqual(len(self.agent.requests), 3)
        self.assertEqual(len(self.agent.spans()), 1)
        self.assertEqual(exporter.sent, 7)
        self.assertEqual(len(tracing.RING.spans), 7)  # the ring keeps them all the same

    def test_full_queue_drops_the_oldest_and_counts(self) -> None:
        exporter = self.exporter(queue_size=4, batch_size=100)
        for n in range(1, 7):
            tracing.RING.add(server_tuple(n))
        self.assertEqual(exporter.dropped, 2)
        self.clock.advance(1.0)
        numbers = [attributes(s)["skynet.span"].split("-")[1] for s in self.agent.spans()]
        self.assertEqual(numbers, ["3", "4", "5", "6"])

    def test_collector_down_backs_off_warns_once_and_loses_nothing(self) -> None:
        exporter = self.exporter(backoff=1.0, max_backoff=4.0)
        self.agent.answer = ConnectionRefusedError("refused")
        tracing.RING.add(server_tuple(1))
        self.clock.advance(1.0)
        self.assertEqual(len(self.agent.requests), 1)
        [warning] = self.warnings()
        self.assertEqual(warning["endpoint"], "http://127.0.0.1:4318/v1/traces")
        self.assertIn("refused", warning["error"])
        tracing.RING.add(server_tuple(2))
        times = []
        for _ in range(16):
            before = len(self.agent.requests)
            self.clock.advance(1.0)
            if len(self.agent.requests) > before:
                times.append(self.clock.seconds())
        # Retries after 1, 2, 4, 4, 4 ... s (the back-off, capped), ticking each second.
        self.assertEqual(times[:4], [2.0, 4.0, 8.0, 12.0])
        self.assertEqual(len(self.warnings()), 1)  # once per outage
        self.assertGreater(exporter.failures, 3)
        self.agent.answer = 200
        for _ in range(6):
            self.clock.advance(1.0)
        sent = [attributes(s)["skynet.span"].split("-")[1] for r in range(len(self.agent.requests))
                for s in self.agent.spans(r)]  # fmt: skip
        self.assertEqual(sent[-2:], ["1", "2"])  # the failed batch was sent again, then the next
        self.assertEqual((exporter.failures, exporter.sent, exporter.dropped), (0, 2, 0))
        [back] = [e for e in self.events if "works again" in e["log_format"]]
        self.assertGreater(back["failures"], 3)
        # A second outage warns again.
        self.agent.answer = ConnectionRefusedError("refused")
        tracing.RING.add(server_tuple(3))
        self.clock.advance(1.0)
        self.assertEqual(len(self.warnings()), 2)

    def test_retryable_answers_are_retried_others_dropped(self) -> None:
        exporter = self.exporter()
        self.agent.answer = 503
        tracing.RING.add(server_tuple(1))
        self.clock.advance(1.0)
        self.assertEqual((exporter.failures, exporter.dropped), (1, 0))
        self.agent.answer = 400
        self.clock.advance(1.0)
        self.assertEqual((exporter.failures, exporter.dropped, exporter.sent), (1, 1, 0))
        self.assertIn("HTTP 400", self.warnings()[-1]["error"])
        self.clock.advance(5.0)
        self.assertEqual(len(self.agent.requests), 2)  # nothing left to send

    def test_slow_collector_times_out(self) -> None:
        exporter = self.exporter(timeout=3.0)
        self.agent.answer = None  # never answers
        tracing.RING.add(server_tuple(1))
        self.clock.advance(1.0)
        self.assertEqual(exporter.failures, 0)
        self.clock.advance(3.0)
        self.assertEqual(exporter.failures, 1)
        self.assertEqual(self.warnings()[0]["error"], "no answer in time")

    def test_headers_are_sent(self) -> None:
        self.exporter(headers=[("Authorization", "Bearer abc")])
        tracing.RING.add(server_tuple(1))
        self.clock.advance(1.0)
        self.assertEqual(
            self.agent.requests[0]["headers"].getRawHeaders(b"authorization"), [b"Bearer abc"]
        )


class StopTests(Exporting):
    def test_stop_sends_what_is_queued_and_removes_the_sink(self) -> None:
        exporter = self.exporter(batch_size=2, interval=60.0)
        for n in range(1, 6):
            tracing.RING.add(server_tuple(n))
        self.clock.advance(0)
        self.assertEqual(len(self.agent.requests), 2)
        self.agent.answer = None
        stopped = exporter.stopService()
        self.assertNoResult(stopped)
        self.agent.requests[-1]["deferred"].callback(FakeResponse(200))
        self.successResultOf(stopped)
        self.assertEqual(exporter.sent, 5)
        tracing.RING.add(server_tuple(6))
        self.assertEqual(len(exporter.queue), 0)
        self.assertEqual(tracing.RING.add, tracing.RING.spans.append)  # as without export
        self.assertEqual(len(tracing.RING.spans), 6)

    def test_stop_is_bounded_when_the_collector_hangs(self) -> None:
        exporter = self.exporter(stop_timeout=2.0, timeout=30.0)
        self.agent.answer = None
        tracing.RING.add(server_tuple(1))
        stopped = exporter.stopService()
        self.assertNoResult(stopped)
        self.clock.advance(2.0)
        self.successResultOf(stopped)
        [warning] = self.warnings()
        self.assertEqual(warning["count"], 1)

    def test_exporting_service_stops_the_exporter_after_its_children(self) -> None:
        from twisted.application.service import Service as Service_

        exporter = otlp.OTLPExporter("http://127.0.0.1:1", otlp.Resource("x"),
                                     reactor=self.clock, agent=self.agent)  # fmt: skip
        parent = otlp.ExportingService(exporter)
        order = []
        draining: Deferred = Deferred()

        class Child(Service_):
            def stopService(self):
                order.append(("child", exporter.running))
                tracing.RING.add(server_tuple(1))  # a request drained at stop
                return draining

        Child().setServiceParent(parent)
        parent.startService()
        self.assertTrue(exporter.running)
        stopped = parent.stopService()
        self.assertEqual(order, [("child", True)])
        self.assertEqual(self.agent.requests, [])
        draining.callback(None)
        self.successResultOf(stopped)
        self.assertEqual(len(self.agent.spans()), 1)
        self.assertFalse(exporter.running)


class ParsingTests(SynchronousTestCase):
    def test_endpoints(self) -> None:
        self.assertEqual(otlp.parse_endpoint("http://127.0.0.1:4318"),
                         "http://127.0.0.1:4318/v1/traces")  # fmt: skip
        self.assertEqual(otlp.parse_endpoint("https://c.example/"), "https://c.example/v1/traces")
        self.assertEqual(otlp.parse_endpoint("http://h:1/otlp/v1/traces?x=1"),
                         "http://h:1/otlp/v1/traces?x=1")  # fmt: skip
        for bad, says in [
            ("127.0.0.1:4318", "http:// or https://"),
            ("ftp://h/", "http:// or https://"),
            ("http://", "no host"),
            ("http://h:99999", "bad OTLP endpoint"),
            ("http://h:port", "bad OTLP endpoint"),
        ]:
            with self.assertRaises(ValueError) as e:
                otlp.parse_endpoint(bad)
            self.assertIn(says, str(e.exception), bad)

    def test_headers(self) -> None:
        self.assertEqual(otlp.parse_header("Authorization=Bearer a=b"),
                         ("Authorization", "Bearer a=b"))  # fmt: skip
        for bad in ["novalue", "=x", "bad name=x", "X=a\r\nY: b"]:
            with self.assertRaises(ValueError):
                otlp.parse_header(bad)


class TapTests(SynchronousTestCase):
    def options(self, *args: str) -> service_tap.Options:
        options = service_tap.Options()
        options.parseOptions(["--service", "examples.testservice:TestService",
                              "--registry", "memory://otlp", "--listen",
                              "tcp:0:interface=127.0.0.1", *args])  # fmt: skip
        return options

    def test_endpoint_option_and_environment(self) -> None:
        self.assertIsNone(self.options().otlp_endpoint)
        options = self.options("--otlp-endpoint", "http://127.0.0.1:4318",
                               "--otlp-header", "X-Token=s3cret")  # fmt: skip
        self.assertEqual(options.otlp_endpoint, "http://127.0.0.1:4318/v1/traces")
        self.assertEqual(options["otlp-headers"], [("X-Token", "s3cret")])
        self.patch(os, "environ", {**os.environ, "SKYNET_OTLP_ENDPOINT": "http://10.1.1.1:9"})
        self.assertEqual(environment_defaults().otlp_endpoint, "http://10.1.1.1:9")
        self.assertEqual(self.options().otlp_endpoint, "http://10.1.1.1:9/v1/traces")
        self.assertEqual(self.options("--otlp-endpoint", "http://h:2").otlp_endpoint,
                         "http://h:2/v1/traces")  # fmt: skip
        self.patch(os, "environ", {**os.environ, "SKYNET_OTLP_ENDPOINT": "10.1.1.1:9"})
        with self.assertRaises(usage.UsageError) as e:
            self.options()
        self.assertIn("$SKYNET_OTLP_ENDPOINT: bad OTLP endpoint '10.1.1.1:9'", str(e.exception))

    def test_bad_values_are_usage_errors(self) -> None:
        for args, says in [
            (["--otlp-endpoint", "localhost:4318"], "--otlp-endpoint: bad OTLP endpoint"),
            (["--otlp-endpoint", "http://h", "--otlp-header", "nope"], "--otlp-header: an OTLP"),
            (["--otlp-header", "A=b"], "--otlp-header needs --otlp-endpoint"),
        ]:
            with self.assertRaises(usage.UsageError) as e:
                self.options(*args)
            self.assertIn(says, str(e.exception), args)

    def test_recording_off_is_a_usage_error(self) -> None:
        self.patch(tracing, "ENABLED", False)
        with self.assertRaises(usage.UsageError) as e:
            self.options("--otlp-endpoint", "http://127.0.0.1:4318")
        self.assertIn("recording them is off", str(e.exception))

    def test_make_service_exports_the_host(self) -> None:
        from skynet.service import ServiceHost

        options = self.options("--otlp-endpoint", "http://127.0.0.1:4318")
        top = service_tap.makeService(options)
        [exporting] = [s for s in top if isinstance(s, otlp.ExportingService)]
        [host] = [s for s in exporting if isinstance(s, ServiceHost)]
        self.assertEqual(exporting.exporter.endpoint, "http://127.0.0.1:4318/v1/traces")
        resource = exporting.exporter.resource()
        self.assertEqual((resource.service_name, resource.instance_id),
                         ("TestService", host.uuid))  # fmt: skip
