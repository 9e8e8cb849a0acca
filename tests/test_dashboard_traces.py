"""
The dashboard's traces, server side: C{GET /api/trace/<request_id>} and
C{GET /api/slow} under L{StubTreq}, on a L{LocalCluster} of two Fibonacci
(the spans gathered for real, in memory) and with a stand-in C{gather} for
what the page is refused.
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import quote

from treq.testing import StubTreq
from twisted.internet.defer import Deferred, succeed
from twisted.trial.unittest import SynchronousTestCase

from examples.fibonacci import Fibonacci
from skynet.observe import tracing
from skynet.protocol import RequestInfo
from skynet.registry.memory import MemoryRegistry
from skynet.testing import LocalCluster
from skynet.web.app import DashboardApp
from skynet.web.model import DashboardModel
from skynet.web.traces import DashboardTraces, TraceError, parse_window, slow_entry
from tests.test_dashboard_logs import stub_get
from tests.test_trace import fresh_ring
from tests.test_web import TOKEN


def _walk(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for call in calls:
        out.append(call)
        out.extend(_walk(call["children"]))
    return out


class DashboardTracesTests(SynchronousTestCase):
    def setUp(self) -> None:
        fresh_ring(self)
        self.cluster = LocalCluster()
        self.addCleanup(self.cluster.stop)
        # At the real time: an instance reads "since" on the reactor it runs
        # on, which in SkynetSpans is the global one.
        self.cluster.clock.advance(time.time())
        self.fibs = [self.cluster.add(Fibonacci()), self.cluster.add(Fibonacci())]
        registry = MemoryRegistry(reactor=self.cluster.clock, store=self.cluster.registry.store)
        self.model = DashboardModel(registry, reactor=self.cluster.clock, stats_interval=0.1,
                                    push_interval=0.05)  # fmt: skip
        self.model.startService()
        self.addCleanup(self.model.stopService)
        self.asked: list[dict[str, Any]] = []

        def gather(reactor, instances, params, timeout):
            self.asked.append(params)
            return tracing.gather(reactor, instances, params, timeout,
                                  connector=self.cluster.connect)  # fmt: skip

        traces = DashboardTraces(self.model, self.cluster.clock, gather=gather)
        app = DashboardApp(self.model, token=TOKEN, allowed_hosts=["dashboard.test"],
                           traces=traces)  # fmt: skip
        self.treq = StubTreq(app.resource())
        self.settle()

    def settle(self) -> None:
        for _ in range(10):
            self.cluster.clock.advance(0.05)
            self.cluster.settle()

    def get(self, path: str, authority: str = "dashboard.test", **args: str) -> tuple[int, Any]:
        return stub_get(self, self.treq, path, authority, self.settle, **args)

    def fibonacci(self, index: int, request_id: str) -> int:
        d = (
            self.cluster.client()
            .service("Fibonacci")
            .call("Index", {"index": index}, RequestInfo(request_id))
        )
        # At one instant, as the shell's tests do: on a clock that moves while
        # every service shares one client and its connections, which real
        # processes never do, the calls on a connection could not be paired.
        for _ in range(20):
            self.cluster.settle()
        self.assertEqual(self.successResultOf(d)["index"], index)
        return sum(h.method_stats.methods["Index"].requests for h in self.fibs)

    def test_trace_is_the_call_tree(self) -> None:
        served = self.fibonacci(6, "dash-6")
        code, body = self.get("/api/trace/dash-6")
        self.assertEqual(code, 200, body)
        self.assertEqual(body["request_id"], "dash-6")
        [root] = body["calls"]
        calls = _walk(body["calls"])
        self.assertEqual(len(calls), served)
        self.assertEqual(body["spans"], 2 * served)  # a client and a server span each
        self.assertEqual((root["service"], root["method"], root["start"]),
                         ("Fibonacci", "Index", 0.0))  # fmt: skip
        self.assertTrue(all(c["outcome"] == "ok" for c in calls))
        # The same tree sky trace --json prints.
        roots = tracing.build_tree(tracing.RING.find("dash-6"))
        self.assertEqual(len(calls), tracing.count_calls(roots))

    def test_unknown_and_bad_requests(self) -> None:
        code, body = self.get("/api/trace/no-such-request")
        self.assertEqual(code, 404)
        self.assertEqual(body["ok"], False)
        self.assertIn("no spans of request no-such-request", body["error"])
        code, body = self.get("/api/trace/" + quote("x" * 300))
        self.assertEqual(code, 400)
        self.assertIn("1 to 256 characters", body["error"])
        # Another site's name (DNS rebinding): refused before any question.
        asked = len(self.asked)
        code, _ = self.get("/api/trace/dash-6", authority="evil.test")
        self.assertEqual(code, 421)
        self.assertEqual(len(self.asked), asked)

    def test_slow_lists_the_slowest_requests(self) -> None:
        self.fibonacci(6, "dash-a")
        self.cluster.clock.advance(1)
        self.fibonacci(8, "dash-b")
        code, body = self.get("/api/slow", limit="5")
        self.assertEqual(code, 200, body)
        self.assertEqual(sorted(c["request_id"] for c in body["calls"]), ["dash-a", "dash-b"])
        first = body["calls"][0]
        self.assertEqual(set(first), {"request_id", "service", "method", "address", "start",
                                      "duration", "outcome", "kind"})  # fmt: skip
        self.assertEqual((first["service"], first["method"]), ("Fibonacci", "Index"))
        self.assertEqual(self.asked[-1], {"slowest": 5, "since": 3600.0})
        self.get("/api/slow", since="15m")
        self.assertEqual(self.asked[-1], {"slowest": 20, "since": 900.0})
        code, body = self.get("/api/slow", service="Fibonacci")
        self.assertEqual(self.asked[-1], {"slowest": 20, "since": 3600.0, "service": "Fibonacci"})
        self.assertEqual(len(body["calls"]), 2)
        code, body = self.get("/api/slow", service="Other")
        self.assertEqual((code, body["calls"]), (200, []))
        for args, error in [({"limit": "0"}, "limit must be 1..200"),
                            ({"limit": "lots"}, "limit must be a whole number"),
                            ({"since": "soon"}, "since must be like 30s")]:  # fmt: skip
            asked = len(self.asked)
            code, body = self.get("/api/slow", **args)
            self.assertEqual(code, 400, body)
            self.assertIn(error, body["error"])
            self.assertEqual(len(self.asked), asked)


class StandInTests(SynchronousTestCase):
    def test_errors_are_passed_on(self) -> None:
        class Model:
            instances: dict[str, Any] = {}

        span = {"kind": "server", "id": "p-1", "request_id": "R", "service": "S", "method": "M",
                "uuid": "u", "peer": "", "start": 5.0, "duration": 0.25, "outcome": "ok",
                "address": "127.0.0.1:9001"}  # fmt: skip

        def gather(reactor, instances, params, timeout):
            return succeed(tracing.Gathered([span], ["Go 1234 (10.0.0.1:9): can't find method"]))

        traces = DashboardTraces(Model(), reactor=object(), gather=gather)
        answer = self.successResultOf(Deferred.fromCoroutine(traces.trace("R")))
        self.assertEqual(answer["errors"], ["Go 1234 (10.0.0.1:9): can't find method"])
        self.assertEqual(_walk(answer["calls"])[0]["address"], "127.0.0.1:9001")
        self.assertEqual(slow_entry(span)["address"], "127.0.0.1:9001")
        client = dict(span, kind="client", address=None, targets=["10.0.0.2:1", "10.0.0.3:2"])
        self.assertEqual(slow_entry(client)["address"], "10.0.0.2:1,10.0.0.3:2")

    def test_windows(self) -> None:
        self.assertEqual([parse_window(v) for v in ("30s", "15m", "2h", "1d", "90")],
                         [30.0, 900.0, 7200.0, 86400.0, 90.0])  # fmt: skip
        for bad in ("", "m", "-5m", "0", "inf", "nan", "1w"):
            with self.assertRaises(TraceError, msg=bad):
                parse_window(bad)
