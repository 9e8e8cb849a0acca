"""
Spans on a L{Clock}: what each side records, the tree they join into, and
its text and JSON forms (the real processes are in test_trace_cluster).
"""

from __future__ import annotations

import json

from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from examples.fibonacci import Fibonacci
from skynet.errors import ServiceError
from skynet.observe import tracing
from skynet.protocol import RequestInfo
from skynet.service import Service
from skynet.testing import LocalCluster


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
        self.saved = tracing.RING, tracing.ENABLED
        tracing.configure(1000)
        self.addCleanup(self.restore)
        self.cluster = LocalCluster()

    def restore(self) -> None:
        tracing.RING, tracing.ENABLED = self.saved

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
        self.saved = tracing.RING, tracing.ENABLED
        tracing.configure(1000)
        self.addCleanup(self.restore)

    def restore(self) -> None:
        tracing.RING, tracing.ENABLED = self.saved

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
