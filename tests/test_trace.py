"""
Spans on a L{Clock}: what each side records, the tree they join into, and
its text and JSON forms (the real processes are in test_trace_cluster).
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from examples.fibonacci import Fibonacci
from skynet.errors import ServiceError
from skynet.observe import tracing
from skynet.protocol import RequestInfo
from skynet.service import Service
from skynet.testing import LocalCluster


def fresh_ring(case: Any, size: int = 1000) -> None:
    """
    Record spans into a ring of C{size} of the test's own, and put the
    process's ring back after it.
    """
    saved = tracing.RING, tracing.ENABLED

    def restore() -> None:
        tracing.RING, tracing.ENABLED = saved

    tracing.configure(size)
    case.addCleanup(restore)


class Slow(Service):
    name = "Slow"

    def __init__(self, clock) -> None:
        self.clock = clock

    def Wait(self, request_info, params):
        d: Deferred = Deferred()
        self.clock.callLater(params["seconds"], d.callback, {"ok": True})
        return d

    def Fail(self, request_info, params):
        raise ServiceError("no luck")


class Outer(Service):
    name = "Outer"

    async def Go(self, request_info, params):
        slow = self.client.service("Slow")
        await slow.call("Wait", {"seconds": 2}, request_info)
        await slow.call("Wait", {"seconds": 3}, request_info)
        return {}


def _walk(nodes):
    for node in nodes:
        yield node
        yield from _walk(node["children"])


class SpanRecordingTests(TestCase):
    def setUp(self) -> None:
        fresh_ring(self)
        self.cluster = LocalCluster()

    def test_both_sides_recorded_with_timings_on_the_clock(self) -> None:
        self.cluster.add(Slow(self.cluster.clock))
        info = RequestInfo("req-1")
        d = self.cluster.client().service("Slow").call("Wait", {"seconds": 1.5}, info)
        self.cluster.settle()
        self.cluster.clock.advance(1.5)
        self.cluster.settle()
        self.assertEqual(self.successResultOf(d), {"ok": True})
        spans = tracing.RING.find("req-1")
        [client] = [s for s in spans if s["kind"] == "client"]
        [server] = [s for s in spans if s["kind"] == "server"]
        self.assertEqual((client["service"], client["method"]), ("Slow", "Wait"))
        self.assertEqual((server["service"], server["method"]), ("Slow", "Wait"))
        self.assertAlmostEqual(server["duration"], 1.5)
        self.assertAlmostEqual(client["duration"], 1.5)
        self.assertEqual((client["outcome"], server["outcome"]), ("ok", "ok"))
        self.assertEqual(client["attempts"], 1)
        self.assertEqual(client["parent"], "")
        self.assertIn(server["uuid"], client["tried"])
        self.assertIn(server["peer"], client["local"])
        self.assertEqual(tracing.RING.find("other"), [])

    def test_failure_is_the_outcome(self) -> None:
        self.cluster.add(Slow(self.cluster.clock))
        d = self.cluster.client().service("Slow").call("Fail", {}, RequestInfo("req-2"))
        self.cluster.settle()
        self.failureResultOf(d, ServiceError)
        outcomes = {s["kind"]: s["outcome"] for s in tracing.RING.find("req-2")}
        self.assertEqual(outcomes, {"client": "error: no luck", "server": "error: no luck"})

    def test_calls_made_while_serving_are_children(self) -> None:
        self.cluster.add(Slow(self.cluster.clock))
        self.cluster.add(Outer())
        d = self.cluster.client().service("Outer").call("Go", {}, RequestInfo("req-3"))
        self.cluster.settle()
        self.cluster.clock.advance(2)
        self.cluster.settle()
        self.cluster.clock.advance(3)
        self.cluster.settle()
        self.successResultOf(d)
        [root] = tracing.build_tree(tracing.RING.find("req-3"))
        self.assertEqual(root["client"]["method"], "Go")
        self.assertEqual(len(root["servers"]), 1)
        children = root["children"]
        self.assertEqual([c["client"]["method"] for c in children], ["Wait", "Wait"])
        self.assertTrue(all(len(c["servers"]) == 1 for c in children))
        [tree] = tracing.tree_json([root])
        self.assertAlmostEqual(tree["duration"], 5.0)
        self.assertEqual([c["start"] for c in tree["children"]], [0.0, 2.0])
        self.assertEqual([c["duration"] for c in tree["children"]], [2.0, 3.0])
        lines = tracing.format_tree([root])
        self.assertEqual(len(lines), 3)
        self.assertTrue(lines[0].startswith("Outer.Go 10.0.0.1:"), lines)
        self.assertIn(" +2000.00ms 3000.00ms ok", lines[2])
        self.assertTrue(lines[1].startswith("  Slow.Wait"))

    def test_fibonacci_tree_counts_every_call(self) -> None:
        hosts = [self.cluster.add(Fibonacci()), self.cluster.add(Fibonacci())]
        d = (
            self.cluster.client()
            .service("Fibonacci")
            .call("Index", {"index": 10}, RequestInfo("req-fib"))
        )
        for _ in range(20):
            self.cluster.settle()
        self.assertEqual(self.successResultOf(d)["value"], 55)
        served = sum(h.method_stats.methods["Index"].requests for h in hosts)
        roots = tracing.build_tree(tracing.RING.find("req-fib"))
        self.assertEqual(len(roots), 1)
        nodes = list(_walk(roots))
        self.assertEqual(len(nodes), served)
        # Every call has its client span and its one server span.
        self.assertTrue(all(n["client"] is not None and len(n["servers"]) == 1 for n in nodes))
        self.assertEqual(tracing.count_calls(roots), served)

    def test_off_records_nothing(self) -> None:
        tracing.configure(0)
        self.cluster.add(Slow(self.cluster.clock))
        d = self.cluster.client().service("Slow").call("Fail", {}, RequestInfo("req-4"))
        self.cluster.settle()
        self.failureResultOf(d, ServiceError)
        self.assertEqual(tracing.RING.find("req-4"), [])

    def test_ring_is_bounded(self) -> None:
        tracing.configure(3)
        self.cluster.add(Slow(self.cluster.clock))
        service = self.cluster.client().service("Slow")
        for i in range(5):
            d = service.call("Fail", {}, RequestInfo(f"r{i}"))
            self.cluster.settle()
            self.failureResultOf(d, ServiceError)
        self.assertEqual(len(tracing.RING.spans), 3)

    def test_spans_method(self) -> None:
        self.cluster.add(Slow(self.cluster.clock))
        d = self.cluster.client().service("Slow").call("Fail", {}, RequestInfo("abc"))
        self.cluster.settle()
        self.failureResultOf(d, ServiceError)
        spans = tracing.spans_method(None, {"request_id": "abc"})["spans"]
        self.assertEqual(sorted(s["kind"] for s in spans), ["client", "server"])
        self.assertEqual(tracing.spans_method(None, {"request_id": "abd"}), {"spans": []})
        self.assertRaises(ServiceError, tracing.spans_method, None, {})
        self.assertRaises(ServiceError, tracing.spans_method, None, {"request_id": 5})


def _client(id_, start, parent="", tried=("u1",), local=("a:1",), attempts=1):
    return {"kind": "client", "id": id_, "parent": parent, "request_id": "R",
            "service": "S", "method": "M", "start": start, "duration": 1.0,
            "outcome": "ok", "attempts": attempts, "tried": list(tried),
            "local": list(local), "targets": ["h:1"]}  # fmt: skip


def _server(id_, start, uuid="u1", peer="a:1", retry=0):
    return {"kind": "server", "id": id_, "request_id": "R", "service": "S", "method": "M",
            "uuid": uuid, "peer": peer, "retry": retry, "start": start, "duration": 0.5,
            "outcome": "ok"}  # fmt: skip


class TreeTests(TestCase):
    def test_same_connection_paired_in_order(self) -> None:
        spans = [_client("c2", 2.0), _server("s2", 12.0), _client("c1", 1.0), _server("s1", 11.0)]
        roots = tracing.build_tree(spans)
        self.assertEqual([(r["client"]["id"], [s["id"] for s in r["servers"]]) for r in roots],
                         [("c1", ["s1"]), ("c2", ["s2"])])  # fmt: skip

    def test_other_connection_or_instance_is_not_paired(self) -> None:
        spans = [_client("c1", 1.0), _server("s1", 2.0, peer="b:2"), _server("s2", 3.0, uuid="u2")]
        roots = tracing.build_tree(spans)
        self.assertEqual(len(roots), 3)
        self.assertTrue(all(len(r["servers"]) <= 1 for r in roots))

    def test_retry_shows_both_attempts_under_one_call(self) -> None:
        spans = [
            _client("c1", 1.0, tried=("u1", "u2"), local=("a:1", "a:2"), attempts=2),
            _server("s1", 1.1),
            _server("s2", 1.6, uuid="u2", peer="a:2", retry=1),
        ]
        [root] = tracing.build_tree(spans)
        self.assertEqual([s["id"] for s in root["servers"]], ["s1", "s2"])
        [line] = tracing.format_tree([root])
        self.assertIn("retries=2", line)  # one more attempt, and the server saw retry 1
        # Both attempts, as the waterfall draws them, offset from the call's start.
        [doc] = tracing.tree_json([root])
        self.assertEqual([(round(a["start"], 3), a["duration"], a["retry"]) for a in doc["arrived"]],
                         [(0.1, 0.5, 0), (0.6, 0.5, 1)])  # fmt: skip

    def test_server_without_its_client_is_a_root_with_children(self) -> None:
        spans = [_server("s1", 0.0), _client("c1", 0.5, parent="s1", local=("b:9",)),
                 _server("s2", 0.6, peer="b:9")]  # fmt: skip
        [root] = tracing.build_tree(spans)
        self.assertIsNone(root["client"])
        [child] = root["children"]
        self.assertEqual([s["id"] for s in child["servers"]], ["s2"])
        [doc] = tracing.tree_json([root])
        self.assertEqual(doc["children"][0]["start"], 0.5)
        self.assertEqual(doc["server_spans"], ["s1"])


class ShellTraceTests(TestCase):
    """
    C{call --trace} and C{trace} in the shell, on a L{LocalCluster}.
    """

    def setUp(self) -> None:
        fresh_ring(self)

    def run_line(self, shell, cluster, line):
        from skynet.shell import BufferIO

        io = BufferIO()
        d = shell.run_line(line, io)
        for _ in range(20):
            cluster.settle()
        return self.successResultOf(d), io

    def test_call_trace_then_trace(self) -> None:
        from skynet.shell import Shell

        cluster = LocalCluster()
        self.addCleanup(cluster.stop)
        hosts = [cluster.add(Fibonacci()), cluster.add(Fibonacci())]
        shell = Shell(cluster.registry, cluster.client(), reactor=cluster.clock)
        status, io = self.run_line(
            shell, cluster, """call --trace Fibonacci Index '{"index": 6}'"""
        )
        self.assertEqual(status, 0, io.stderr)
        served = sum(h.method_stats.methods["Index"].requests for h in hosts)
        lines = "\n".join(io.stdout).splitlines()
        self.assertIn('"value": 8', "\n".join(lines))
        [header] = [line for line in lines if line.startswith("request ")]
        request_id = header.split()[1].rstrip(":")
        self.assertIn(f": {served} call(s)", header)
        tree = lines[lines.index(header) + 1 :]
        self.assertEqual(len(tree), served)
        self.assertEqual(sum(1 for line in tree if not line.startswith(" ")), 1)

        status, io = self.run_line(shell, cluster, f"trace {request_id} --json")
        self.assertEqual(status, 0)
        doc = json.loads("\n".join("\n".join(io.stdout).splitlines()))
        self.assertEqual(doc["request_id"], request_id)
        self.assertEqual(len(doc["calls"]), 1)
        self.assertEqual(
            tracing.count_calls(tracing.build_tree(tracing.RING.find(request_id))), served
        )

        status, io = self.run_line(shell, cluster, "trace no-such-request")
        self.assertEqual(status, 1)
        status, io = self.run_line(shell, cluster, "call --trace Fibonacci Index '[1]'")
        self.assertEqual(status, 2)


class ShellSlowestTests(TestCase):
    """
    C{trace --slowest N [--since W]} in the shell, on a L{LocalCluster} at
    the real time (an instance reads C{since} on the global reactor).
    """

    def setUp(self) -> None:
        import time

        from skynet.shell import Shell

        fresh_ring(self)
        self.cluster = LocalCluster()
        self.addCleanup(self.cluster.stop)
        self.cluster.clock.advance(time.time())
        self.cluster.add(Slow(self.cluster.clock))
        self.shell = Shell(self.cluster.registry, self.cluster.client(), reactor=self.cluster.clock)

    def run_line(self, line):
        from skynet.shell import BufferIO

        io = BufferIO()
        d = self.shell.run_line(line, io)
        for _ in range(20):
            self.cluster.settle()
        return self.successResultOf(d), io

    def wait(self, seconds: float, request_id: str) -> None:
        d = self.cluster.call("Slow", "Wait", {"seconds": seconds}, RequestInfo(request_id))
        self.cluster.clock.advance(seconds)
        self.cluster.settle()
        self.assertEqual(self.successResultOf(d), {"ok": True})

    def test_slowest_listed_longest_first(self) -> None:
        status, io = self.run_line("trace --slowest 5")
        self.assertEqual(status, 1)
        self.assertIn("no calls recorded", "\n".join(io.stderr))
        self.wait(2, "two")
        self.wait(3, "three")
        self.wait(1, "one")
        status, io = self.run_line("trace --slowest 2")
        self.assertEqual(status, 0, io.stderr)
        lines = "\n".join(io.stdout).splitlines()
        self.assertEqual([line.split()[-1] for line in lines], ["three", "two"])
        self.assertTrue(lines[0].split()[0].startswith("3000.00ms"), lines)
        self.assertIn(" Slow.Wait ", lines[0])
        status, io = self.run_line("trace --slowest 10 --service Nobody")
        self.assertEqual(status, 1)
        status, io = self.run_line("trace --slowest 1 --service Slow")
        self.assertEqual(status, 0, io.stderr)
        self.assertEqual(["\n".join(io.stdout).split()[-1]], ["three"])
        status, io = self.run_line("trace --slowest 10 --since 1h --json")
        self.assertEqual(status, 0, io.stderr)
        doc = json.loads("\n".join(io.stdout))
        self.assertEqual([c["request_id"] for c in doc["calls"]], ["three", "two", "one"])
        for line, error in [("trace --slowest 0", "must be 1..1000"),
                            ("trace --slowest many", "--slowest must be a whole number"),
                            ("trace --slowest 3 --since soon", "since must be like 30s"),
                            ("trace abc --slowest 3", "Usage: trace --slowest N"),
                            ("trace abc --grep x", "trace does not take --grep")]:  # fmt: skip
            status, io = self.run_line(line)
            self.assertEqual(status, 2, (line, io.stdout, io.stderr))
            self.assertIn(error, "\n".join(io.stderr))


class SpansQueryTests(TestCase):
    """
    The two forms of the spans question, and what is refused.
    """

    def test_forms(self) -> None:
        parse = tracing.SpansQuery.from_bson
        self.assertEqual(parse({"request_id": "r"}), tracing.SpansQuery(request_id="r"))
        query = parse({"slowest": 5, "since": 60, "service": "Fibonacci"})
        self.assertEqual(query, tracing.SpansQuery(slowest=5, since=60.0, service="Fibonacci"))
        self.assertEqual(parse(query.to_bson()), query)
        self.assertEqual(parse({"slowest": 3}).to_bson(), {"slowest": 3})
        self.assertEqual(parse({"request_id": "r"}).to_bson(), {"request_id": "r"})

    def test_bad_questions(self) -> None:
        bad = [None, [], {}, {"request_id": ""}, {"request_id": 5}, {"slowest": 0},
               {"slowest": True}, {"slowest": 1001}, {"slowest": "3"}, {"slowest": 2.5},
               {"slowest": 3, "since": -1}, {"slowest": 3, "since": "1m"},
               {"request_id": "r", "slowest": 3}, {"request_id": "r", "service": "S"},
               {"slowest": 3, "service": ""}, {"slowest": 3, "service": 7}]  # fmt: skip
        for params in bad:
            with self.assertRaises(ValueError, msg=repr(params)):
                tracing.SpansQuery.from_bson(params)
        with self.assertRaisesRegex(ServiceError, "SkynetSpans: 'slowest' must be 1..1000"):
            tracing.spans_method(None, {"slowest": 0})


class SlowestTests(TestCase):
    """
    C{slowest}: the longest calls of the ring, one per request.
    """

    def setUp(self) -> None:
        fresh_ring(self)
        self.cluster = LocalCluster()
        self.cluster.add(Slow(self.cluster.clock))
        self.cluster.add(Outer())

    def run_call(self, service: str, method: str, params, request_id: str) -> None:
        d = self.cluster.client().service(service).call(method, params, RequestInfo(request_id))
        for _ in range(12):
            self.cluster.settle()
            if d.called:
                break
            self.cluster.clock.advance(0.5)
        self.assertTrue(d.called)
        d.addErrback(lambda f: f.trap(ServiceError))

    def test_longest_first_one_per_request(self) -> None:
        self.run_call("Slow", "Wait", {"seconds": 1}, "a")  # t 0..1
        self.run_call("Outer", "Go", {}, "b")  # 1..6, calling Wait 2 s then 3 s
        self.run_call("Slow", "Wait", {"seconds": 4}, "c")  # 6..10
        self.run_call("Slow", "Fail", {}, "d")  # at 10
        top = tracing.slowest(3)
        self.assertEqual([s["request_id"] for s in top], ["b", "c", "a"])
        self.assertEqual([round(s["duration"], 3) for s in top], [5.0, 4.0, 1.0])
        # Request b's longest span is the call of Go, not one of its Waits.
        self.assertEqual(top[0]["method"], "Go")
        everything = tracing.slowest(10)
        self.assertEqual([s["request_id"] for s in everything], ["b", "c", "a", "d"])
        self.assertEqual(everything[-1]["outcome"], "error: no luck")
        # Only what started in the last 4.5 s: c (at 6) and d (at 10), not
        # b's Wait that started at 3.
        now = self.cluster.clock.seconds()
        self.assertAlmostEqual(now, 10.0)
        recent = tracing.slowest(10, since=4.5, now=now)
        self.assertEqual([s["request_id"] for s in recent], ["c", "d"])
        # The remote method's form.
        answer = tracing.spans_method(None, {"slowest": 2})
        self.assertEqual([s["request_id"] for s in answer["spans"]], ["b", "c"])
        # One service's calls only: b's longest call of Slow is its 3 s Wait.
        slow = tracing.slowest(10, service="Slow")
        self.assertEqual([(s["request_id"], s["method"]) for s in slow],
                         [("c", "Wait"), ("b", "Wait"), ("a", "Wait"), ("d", "Fail")])  # fmt: skip
        self.assertEqual(round(slow[1]["duration"], 3), 3.0)
        answer = tracing.spans_method(None, {"slowest": 5, "service": "Outer"})
        self.assertEqual([s["request_id"] for s in answer["spans"]], ["b"])
        self.assertEqual(tracing.slowest(5, service="Nobody"), [])

    def test_admin_listener_answers_both_forms(self) -> None:
        import bson
        from twisted.internet.testing import StringTransport

        from skynet.protocol import DEFAULT_MAX_FRAME, AdminProtocol, encode_header

        self.run_call("Slow", "Fail", {}, "abc")
        self.run_call("Slow", "Wait", {"seconds": 2}, "slow-one")

        class Target:
            max_frame = DEFAULT_MAX_FRAME

        def ask(params) -> tuple[dict, dict]:
            protocol = AdminProtocol(Target())  # type: ignore[arg-type]
            transport = StringTransport()
            protocol.makeConnection(transport)
            protocol.dataReceived(encode_header("Admin.Spans", 7) + bson.encode(params))
            header, body = bson.decode_all(transport.value())
            self.assertEqual(header["seq"], 7)
            return header, body

        header, body = ask({"request_id": "abc"})
        self.assertEqual(header["error"], "")
        self.assertEqual(sorted(s["kind"] for s in body["spans"]), ["client", "server"])
        header, body = ask({"slowest": 1})
        self.assertEqual([s["request_id"] for s in body["spans"]], ["slow-one"])
        header, body = ask({"slowest": "many"})
        self.assertIn("Admin.Spans: 'slowest' must be a whole number", header["error"])
        self.assertEqual(body, {})


def _span(id_, request_id="R", kind="server", duration=1.0, uuid="u"):
    span = {"kind": kind, "id": id_, "request_id": request_id, "service": "S", "method": "M",
            "start": 0.0, "duration": duration, "outcome": "ok"}  # fmt: skip
    if kind == "server":
        span.update(uuid=uuid, peer="p:1", retry=0)
    else:
        span.update(parent="", attempts=1, tried=[uuid], local=["p:1"], targets=["h:1"])
    return span


class HostSpansTests(TestCase):
    """
    A daemon's C{SearchSpans}: its children's admin listeners asked at
    once, the answers merged, the silent ones reported.
    """

    def setUp(self) -> None:
        from twisted.internet.task import Clock

        from skynet.registry.base import Address, Instance

        self.clock = Clock()

        def child(n: int, admin: bool = True) -> Instance:
            return Instance(uuid=f"u{n}", name="Fib", version="1", region="r",
                            host="10.0.0.5", port=9000 + n,
                            admin=Address("127.0.0.1", 9100 + n) if admin else None)  # fmt: skip

        self.children = [child(1), child(2), child(3, admin=False), child(4), child(5)]
        self.answers: dict[int, Any] = {}
        self.asked: list[tuple[int, str, dict]] = []

    def admin(self, address, method, params) -> Deferred:
        from twisted.internet.defer import fail, succeed

        from skynet.errors import RemoteCallError

        self.asked.append((address.port, method, params))
        if address.port == 9104:
            return Deferred()  # never answers
        if address.port == 9105:
            return fail(RemoteCallError("rpc: can't find method Admin.Spans"))
        return succeed(self.answers[address.port])

    def run_host(self, params) -> Deferred:
        return Deferred.fromCoroutine(
            tracing.host_spans(self.clock, self.children, params, self.admin)
        )

    def test_request_spans_merged_and_labelled(self) -> None:
        self.answers = {
            9101: {"spans": [_span("p1-1", uuid="u1"), _span("p1-2", kind="client")]},
            9102: {"spans": [_span("p2-1", uuid="u2"), "junk"]},
        }
        d = self.run_host({"request_id": "R"})
        self.assertNoResult(d)
        self.clock.advance(tracing.CHILD_TIMEOUT)
        answer = self.successResultOf(d)
        self.assertEqual(answer["instances"], ["u1", "u2"])
        self.assertEqual([s["id"] for s in answer["spans"]], ["p1-1", "p1-2", "p2-1"])
        addresses = {s["id"]: s.get("address") for s in answer["spans"]}
        self.assertEqual(addresses, {"p1-1": "10.0.0.5:9001", "p1-2": None,
                                     "p2-1": "10.0.0.5:9002"})  # fmt: skip
        self.assertEqual(len(answer["errors"]), 3)
        self.assertIn("u2 (admin 127.0.0.1:9102): 1 malformed span(s)", answer["errors"][0])
        self.assertIn("u4", answer["errors"][1])
        self.assertIn("u5", answer["errors"][2])
        self.assertIn("can't find method Admin.Spans", answer["errors"][2])
        # Each child with an admin listener asked once, the question as given.
        self.assertEqual(self.asked, [(p, "Admin.Spans", {"request_id": "R"})
                                      for p in (9101, 9102, 9104, 9105)])  # fmt: skip
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_malformed_spans_left_out_and_said(self) -> None:
        bad = [
            dict(_span("x1"), start="soon"),
            dict(_span("x2"), kind="other"),
            {k: v for k, v in _span("x3", kind="client").items() if k != "tried"},
            dict(_span("x4", kind="client"), tried=[1]),
            dict(_span("x5"), retry=True),
            7,
        ]
        self.answers = {9101: {"spans": [_span("good")] + bad}, 9102: {"spans": []}}  # fmt: skip
        d = self.run_host({"request_id": "R"})
        self.clock.advance(tracing.CHILD_TIMEOUT)
        answer = self.successResultOf(d)
        self.assertEqual([s["id"] for s in answer["spans"]], ["good"])
        self.assertEqual(answer["instances"], ["u1", "u2"])
        self.assertIn("u1 (admin 127.0.0.1:9101): 6 malformed span(s) left out",
                      answer["errors"][0])  # fmt: skip

    def test_slowest_merged_across_children(self) -> None:
        self.answers = {
            9101: {"spans": [_span("a", "R1", duration=3.0), _span("b", "R2", duration=1.0)]},
            9102: {"spans": [_span("c", "R2", duration=2.0), _span("d", "R3", duration=0.5)]},
        }
        d = self.run_host({"slowest": 2, "since": 60})
        self.clock.advance(tracing.CHILD_TIMEOUT)
        answer = self.successResultOf(d)
        self.assertEqual([s["id"] for s in answer["spans"]], ["a", "c"])
        self.assertEqual(self.asked[0][2], {"slowest": 2, "since": 60.0})

    def test_bad_question_asks_nobody(self) -> None:
        self.failureResultOf(self.run_host({"slowest": -1}), ServiceError)
        self.assertEqual(self.asked, [])


class FakeDaemon(Service):
    """
    A host's daemon on a L{LocalCluster}: C{SearchSpans} over the admin
    listeners of C{children}, played by the one ring of this process, cut
    to what each child recorded (its server spans and the calls they made).
    """

    name = "SkynetDaemon"

    def __init__(self, clock, children, broken: bool = False) -> None:
        self.clock = clock
        self.children = children
        self.broken = broken

    def admin(self, address, method, params) -> Deferred:
        from twisted.internet.defer import succeed

        [child] = [c for c in self.children if c.admin == address]
        spans = tracing.admin_spans(params)[0]["spans"]
        own = {s["id"] for s in spans if s["kind"] == "server" and s["uuid"] == child.uuid}
        return succeed({"spans": [s for s in spans if s["id"] in own or s.get("parent") in own]})

    async def SearchSpans(self, request_info, params):
        if self.broken:
            raise ServiceError("rpc: can't find method SkynetDaemon.SearchSpans")
        return await tracing.host_spans(self.clock, self.children, params, self.admin)


class GatherTests(TestCase):
    """
    L{tracing.gather}: one call per daemon, C{SkynetSpans} only to the
    instances no daemon answered for.
    """

    def setUp(self) -> None:
        fresh_ring(self)

    def gather(self, broken: bool) -> tuple[tracing.Gathered, list[str], list]:
        import attr

        from skynet.registry.base import Address, Query

        cluster = LocalCluster()
        self.addCleanup(cluster.stop)
        fibs = [cluster.add(Fibonacci()), cluster.add(Fibonacci())]
        supervised = attr.evolve(fibs[0].instance, admin=Address("127.0.0.1", 1))
        daemon = cluster.add(FakeDaemon(cluster.clock, [supervised], broken=broken))
        d = cluster.client().service("Fibonacci").call("Index", {"index": 6}, RequestInfo("g1"))
        for _ in range(20):
            cluster.settle()
        self.assertEqual(self.successResultOf(d)["value"], 8)
        served = sum(h.method_stats.methods["Index"].requests for h in fibs)
        connected: list[str] = []

        def connector(instance):
            connected.append(instance.uuid)
            return cluster.connect(instance)

        instances = self.successResultOf(cluster.registry.query(Query()))
        found = Deferred.fromCoroutine(tracing.gather(
            cluster.clock, instances, {"request_id": "g1"}, connector=connector))  # fmt: skip
        for _ in range(20):
            cluster.settle()
        result = self.successResultOf(found)
        # Every span of the request, once.  (Not counted through the tree:
        # here every service shares one client, its connections and the
        # clock's one instant, which real processes never do.)
        ids = [s["id"] for s in result.spans]
        self.assertEqual(sorted(ids), sorted(s["id"] for s in tracing.RING.find("g1")))
        self.assertEqual(len(ids), 2 * served)
        if broken:  # both asked directly: each answers from the one shared ring
            return result, connected, [daemon.instance.uuid] + [h.instance.uuid for h in fibs]
        # Every server span labelled with the address of the instance that served it.
        where = {h.instance.uuid: f"{h.instance.host}:{h.instance.port}" for h in fibs}
        servers = [s for s in result.spans if s["kind"] == "server"]
        self.assertEqual(len(servers), served)
        self.assertEqual([s["address"] for s in servers], [where[s["uuid"]] for s in servers])
        return result, connected, [daemon.instance.uuid] + [h.instance.uuid for h in fibs]

    def test_daemon_answers_for_its_children(self) -> None:
        result, connected, (daemon, fib0, fib1) = self.gather(broken=False)
        # The daemon once, and SkynetSpans only to the one it does not supervise.
        self.assertEqual(connected, [daemon, fib1])
        self.assertEqual(result.errors, [])

    def test_daemon_without_the_method_falls_back(self) -> None:
        result, connected, (daemon, fib0, fib1) = self.gather(broken=True)
        self.assertEqual(connected[0], daemon)
        self.assertEqual(sorted(connected[1:]), sorted([fib0, fib1]))

    def test_unregistered_instance_answers_on_its_admin_listener(self) -> None:
        import attr
        from twisted.internet.defer import succeed

        from skynet.registry.base import Address

        cluster = LocalCluster()
        self.addCleanup(cluster.stop)
        cluster.add(Fibonacci())
        d = cluster.client().service("Fibonacci").call("Index", {"index": 3}, RequestInfo("u1"))
        for _ in range(20):
            cluster.settle()
        self.successResultOf(d)
        quiet = [cluster.add(Fibonacci(), registered=False) for _ in range(3)]
        # One with its admin listener on its own address, one elsewhere, one without.
        own = attr.evolve(quiet[0].instance, admin=Address(quiet[0].instance.host, 7001))
        elsewhere = attr.evolve(quiet[1].instance, admin=Address("127.0.0.1", 7002))
        without = quiet[2].instance
        asked: list[Address] = []

        def admin(address, method, params):
            asked.append(address)
            return succeed(tracing.admin_spans(params)[0])

        found = Deferred.fromCoroutine(tracing.gather(
            cluster.clock, [own, elsewhere, without], {"request_id": "u1"},
            connector=cluster.connect, admin=admin))  # fmt: skip
        for _ in range(20):
            cluster.settle()
        result = self.successResultOf(found)
        self.assertEqual(asked, [own.admin])
        self.assertEqual(len(result.errors), 2)
        self.assertIn(elsewhere.uuid, result.errors[0])
        self.assertIn(without.uuid, result.errors[1])
        self.assertTrue(result.spans)
        self.assertTrue(all(s["address"] == f"{own.host}:{own.port}"
                            for s in result.spans if s["kind"] == "server"))  # fmt: skip
