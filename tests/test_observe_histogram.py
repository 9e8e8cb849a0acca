"""
Per-method histograms: the counting wrapper on a Clock, the statistics
node keys, reading them back, quantiles, the C{/metrics} histogram, and
C{sky stats --by-method} formatting.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from skynet.errors import ServiceError
from skynet.observe.commands import by_method_rows, format_by_method
from skynet.observe.histogram import (
    BUCKETS,
    Histogram,
    MethodStats,
    current_call,
    method_histograms,
)
from skynet.protocol import RequestInfo


class Info:
    request_id = "req-1"


class MethodStatsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.stats = MethodStats(self.clock.seconds)

    def test_sync_and_deferred_calls_counted_in_their_bucket(self) -> None:
        pending: list[Deferred] = []

        def slow(info, params):
            d: Deferred = Deferred()
            pending.append(d)
            return d

        def quick(info, params):
            self.clock.advance(0.003)  # 3 ms: the (2.5 ms, 5 ms] bucket
            return {"ok": True}

        def broken(info, params):
            raise ServiceError("no")

        methods = self.stats.instrument({"Slow": slow, "Quick": quick, "Broken": broken})
        self.assertEqual(methods["Quick"](Info(), {}), {"ok": True})
        d = methods["Slow"](Info(), {})
        self.clock.advance(0.2)  # (0.1, 0.25]
        pending[0].callback({"x": 1})
        self.assertEqual(self.successResultOf(d), {"x": 1})
        self.assertRaises(ServiceError, methods["Broken"], Info(), {})
        doc = self.stats.to_bson()
        bounds = doc["LatencyBuckets"]
        self.assertEqual(bounds, [round(b * 1e9) for b in BUCKETS])
        quick_doc = doc["Methods"]["Quick"]
        self.assertEqual((quick_doc["Requests"], quick_doc["Errors"]), (1, 0))
        self.assertEqual(quick_doc["Buckets"][BUCKETS.index(0.005)], 1)
        self.assertEqual(sum(quick_doc["Buckets"]), 1)
        self.assertEqual(doc["Methods"]["Slow"]["Buckets"][BUCKETS.index(0.25)], 1)
        self.assertEqual(doc["Methods"]["Slow"]["TotalResponseTime"], 200_000_000)
        self.assertEqual(doc["Methods"]["Broken"]["Errors"], 1)

    def test_failed_deferred_counts_an_error(self) -> None:
        methods = self.stats.instrument({"M": lambda i, p: fail(ServiceError("bad"))})
        self.failureResultOf(methods["M"](Info(), {}), ServiceError)
        self.assertEqual(self.stats.to_bson()["Methods"]["M"]["Errors"], 1)

    def test_slower_than_every_bound_counts_in_inf(self) -> None:
        self.stats.record("M", 60.0, False)
        self.stats.record("M", BUCKETS[0], False)  # exactly a bound: that bucket (le)
        counts = self.stats.to_bson()["Methods"]["M"]["Buckets"]
        self.assertEqual(counts[-1], 1)
        self.assertEqual(counts[0], 1)

    def test_coroutine_sees_its_request_in_context(self) -> None:
        seen = []
        waiting: Deferred = Deferred()

        async def method(info, params):
            seen.append(current_call())
            await waiting
            seen.append(current_call())
            return {}

        wrapped = self.stats.instrument({"Co": method}, service="Svc", uuid="u-1")["Co"]
        d = wrapped(RequestInfo("rid-9"), {})
        self.assertIsNone(current_call())  # not leaked outside the call
        waiting.callback(None)
        self.successResultOf(d)
        self.assertEqual([c.request_id for c in seen], ["rid-9", "rid-9"])
        self.assertEqual(seen[0].service, "Svc")
        self.assertEqual(seen[0].method, "Co")

    def test_unsorted_bounds_refused(self) -> None:
        self.assertRaises(ValueError, MethodStats, self.clock.seconds, (0.1, 0.01))


class ReadingTests(SynchronousTestCase):
    def node(self, *durations: float) -> dict:
        stats = MethodStats(Clock().seconds)
        for d in durations:
            stats.record("Sleep", d, False)
        return stats.to_bson()

    def test_round_trip(self) -> None:
        h = method_histograms(self.node(0.03, 0.03, 0.2))["Sleep"]
        self.assertEqual(h.requests, 3)
        self.assertEqual(sum(h.counts), 3)
        self.assertEqual(h.cumulative()[BUCKETS.index(0.05)], 2)
        self.assertAlmostEqual(h.total, 0.26)

    def test_malformed_or_go_nodes_give_nothing(self) -> None:
        self.assertEqual(method_histograms({"RequestsServed": 5}), {})
        self.assertEqual(method_histograms(None), {})
        node = self.node(0.01)
        node["Methods"]["Sleep"]["Buckets"] = [1, 2]  # wrong length
        self.assertEqual(method_histograms(node), {})
        node = self.node(0.01)
        node["LatencyBuckets"] = [3, 2, 1]
        self.assertEqual(method_histograms(node), {})
        node = self.node(0.01)
        node["Methods"]["Sleep"]["Requests"] = "many"
        self.assertEqual(method_histograms(node), {})

    def test_quantiles_interpolate_inside_the_bucket(self) -> None:
        bounds = (0.1, 0.2, 0.4)
        h = Histogram(bounds, (0, 10, 0, 0), 10, 0, 1.5)
        self.assertAlmostEqual(h.quantile(0.5), 0.15)
        self.assertAlmostEqual(h.quantile(1.0), 0.2)
        self.assertIsNone(Histogram(bounds, (0, 0, 0, 0), 0, 0, 0).quantile(0.5))
        self.assertEqual(Histogram(bounds, (0, 0, 0, 3), 3, 0, 9).quantile(0.99), 0.4)

    def test_sum_of_instances(self) -> None:
        a = method_histograms(self.node(0.03))["Sleep"]
        b = method_histograms(self.node(0.2, 0.2))["Sleep"]
        both = a + b
        self.assertEqual(both.requests, 3)
        self.assertEqual(both.cumulative()[-1], 3)
        self.assertRaises(ValueError, lambda: a + Histogram((1.0,), (0, 0), 0, 0, 0))


class ByMethodTests(SynchronousTestCase):
    def test_rows_sum_instances_and_compute_rates(self) -> None:
        stats = MethodStats(Clock().seconds)
        for _ in range(10):
            stats.record("Sleep", 0.03, False)
        stats.record("Sleep", 0.2, True)
        node = dict(stats.to_bson())
        node.update(StartTime="2026-12-01T10:00:00Z+0000", Updated="2026-12-01T10:00:10Z+0000")
        rows = by_method_rows([("Sleeper", node), ("Sleeper", node)])
        self.assertEqual(len(rows), 1)
        row = rows[0]
        self.assertEqual((row["service"], row["method"]), ("Sleeper", "Sleep"))
        self.assertEqual((row["requests"], row["errors"], row["instances"]), (22, 2, 2))
        self.assertAlmostEqual(row["rate"], 2.2)  # 11 calls in 10 s, two instances
        self.assertTrue(0.025 < row["p50"] <= 0.05)
        self.assertTrue(0.1 < row["p99"] <= 0.25)
        lines = format_by_method(rows)
        self.assertIn("Sleeper.Sleep", lines[1])
        self.assertIn("22", lines[1])

    def test_instances_without_buckets_are_said(self) -> None:
        lines = format_by_method(by_method_rows([("GoService", {"RequestsServed": 3})]))
        self.assertEqual(lines, ["no per-method statistics (instances publish none yet)"])


class PrometheusTests(SynchronousTestCase):
    """
    C{/metrics} renders the published buckets as they are.
    """

    def test_true_histogram_per_method_and_summed_per_service(self) -> None:
        import types

        from skynet.registry.base import Instance
        from skynet.web.metrics import prometheus_text
        from skynet.web.model import InstanceState
        from tests.test_web import parse_prometheus

        instances = {}
        for n, durations in ((1, [0.03] * 4 + [0.2]), (2, [0.03, 7.0, 60.0])):
            stats = MethodStats(Clock().seconds)
            for d in durations:
                stats.record("Sleep", d, False)
            node = {"RequestsServed": len(durations), "Errors": 0, **stats.to_bson()}
            instance = Instance(uuid=f"u{n}", name="Sleeper", version="1", region="r",
                                host="127.0.0.1", port=9000 + n)  # fmt: skip
            state = InstanceState(instance, 0.0)
            state.observe(node, 1.0)
            instances[instance.uuid] = state
        model = types.SimpleNamespace(instances=instances, hosts={})
        text = prometheus_text(model)  # type: ignore[arg-type]
        samples = parse_prometheus(text)
        one = 'service="Sleeper",version="1",region="r",host="127.0.0.1",uuid="u1",method="Sleep"'
        self.assertEqual(samples[f'skynet_request_duration_seconds_bucket{{{one},le="0.025"}}'], 0)
        self.assertEqual(samples[f'skynet_request_duration_seconds_bucket{{{one},le="0.05"}}'], 4)
        self.assertEqual(samples[f'skynet_request_duration_seconds_bucket{{{one},le="0.25"}}'], 5)
        self.assertEqual(samples[f'skynet_request_duration_seconds_bucket{{{one},le="+Inf"}}'], 5)
        self.assertEqual(samples[f"skynet_request_duration_seconds_count{{{one}}}"], 5)
        self.assertAlmostEqual(samples[f"skynet_request_duration_seconds_sum{{{one}}}"], 0.32)
        both = 'service="Sleeper",method="Sleep"'
        self.assertEqual(
            samples[f'skynet_service_request_duration_seconds_bucket{{{both},le="0.05"}}'], 5
        )
        self.assertEqual(
            samples[f'skynet_service_request_duration_seconds_bucket{{{both},le="10.0"}}'], 7
        )
        self.assertEqual(samples[f"skynet_service_request_duration_seconds_count{{{both}}}"], 8)
        self.assertIn("# TYPE skynet_request_duration_seconds histogram", text)

    def test_no_buckets_no_histogram(self) -> None:
        import types

        from skynet.registry.base import Instance
        from skynet.web.metrics import prometheus_text
        from skynet.web.model import InstanceState

        instance = Instance(uuid="g", name="GoSvc", version="1", region="r", host="h", port=1)
        state = InstanceState(instance, 0.0)
        state.observe({"RequestsServed": 77, "P50ResponseTime": 1_000_000}, 1.0)
        text = prometheus_text(types.SimpleNamespace(instances={"g": state}, hosts={}))  # type: ignore[arg-type]
        self.assertNotIn("skynet_request_duration_seconds", text)
        self.assertIn('skynet_requests_total{service="GoSvc"', text)
