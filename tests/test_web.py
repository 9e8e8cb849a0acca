"""
The dashboard: its model on a fake clock, then a real listening dashboard
on an in-memory registry, driven with treq and an Autobahn WebSocket client
(snapshot and deltas, series, /metrics, actions and their 403s, Graphite).
"""

from __future__ import annotations

import json
import re
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from treq.client import HTTPClient
from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredQueue, fail
from twisted.internet.endpoints import TCP4ClientEndpoint, serverFromString
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.logger import capturedLogs
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from skynet.control import (
    DAEMON_SERVICE,
    ChildStats,
    DaemonProcess,
    HostFigures,
    HostMemory,
    HostStats,
    LoadGuardStatus,
    ProcessUsage,
)
from skynet.registry.base import Address, Instance, RegistryError
from skynet.registry.memory import MemoryRegistry
from skynet.service import Service, ServiceHost
from skynet.testing import FakeDaemon
from skynet.web.app import DashboardApp, bearer_token, same_origin
from skynet.web.hosts import read_daemon_node
from skynet.web.metrics import GraphitePusher, graphite_name, prometheus_text
from skynet.web.model import LATENCY_BUCKETS, DashboardModel, latency_fraction_below

TOKEN = "s3cret-token"


def make_instance(n: int = 1, name: str = "Svc", **kw: Any) -> Instance:
    fields: dict[str, Any] = dict(
        uuid=f"uuid-{n}", name=name, version="1", region="north", host="127.0.0.1",
        port=9000 + n, admin=Address("127.0.0.1", 19000 + n), pid=1000 + n,
    )  # fmt: skip
    fields.update(kw)
    return Instance(**fields)


def stats(requests: int = 0, errors: int = 0, start: str = "2024-05-01T10:00:00Z+0000",
          **extra: Any) -> dict[str, Any]:  # fmt: skip
    doc = {
        "Clients": 2, "StartTime": start, "LastRequest": "2024-05-01T10:05:00Z+0000",
        "RequestsServed": requests, "AverageResponseTime": 2_000_000, "Errors": errors,
        "InFlight": 0, "P50ResponseTime": 1_000_000, "P99ResponseTime": 40_000_000,
        "Registered": True,
    }  # fmt: skip
    doc.update(extra)
    return doc


def daemon_stats(children: dict[str, ProcessUsage | None], events: list | None = None) -> dict:
    """
    A daemon's statistics node, as C{skynet.daemon} publishes it: the
    control records' own C{to_bson}.
    """
    host = HostStats(
        daemon=DaemonProcess(uuid="daemon-1", pid=42, uptime=10.0),
        load_guard=LoadGuardStatus(),
        children=tuple(ChildStats(uuid=uuid, service="Svc", pid=None, running=True, usage=usage)
                       for uuid, usage in children.items()),
        figures=HostFigures(cpu=12.5, cpus=2, memory=HostMemory(total=8 << 30, available=6 << 30,
                            used=2 << 30, percent=25.0), load=(0.5, 0.25, 0.125), uptime=3600.0,
                            boot_time=1700000000.0, hostname="box"),
    )  # fmt: skip
    return stats(Host=host.to_bson(), Events=events or [])


class ModelTests(SynchronousTestCase):
    """
    The model on a fake clock: rates, histogram, events, daemons, deltas.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.services = MemoryRegistry(reactor=self.clock)
        self.registry = MemoryRegistry(reactor=self.clock, store=self.services.store)
        self.model = DashboardModel(self.registry, reactor=self.clock, stats_interval=1.0,
                                    push_interval=0.5)  # fmt: skip
        self.sent: list[dict[str, Any]] = []
        self.model.subscribe(self.sent.append)

    def start(self) -> None:
        self.model.startService()
        self.addCleanup(self.model.stopService)
        self.clock.advance(0)

    def publish(self, instance: Instance, doc: dict[str, Any]) -> None:
        self.successResultOf(self.services.publish_stats(instance, doc))

    def test_requests_per_second_from_deltas(self) -> None:
        instance = make_instance()
        self.services.add(instance)
        self.publish(instance, stats(requests=100))
        self.start()
        self.clock.advance(1.0)
        self.publish(instance, stats(requests=300, errors=4))
        self.clock.advance(1.0)
        # Over the time between the two readings that differed.
        state = self.model.find(instance.uuid)
        self.assertEqual(state.rps, 100.0)
        self.assertEqual(state.eps, 2.0)
        row = state.row()
        self.assertEqual((row["requests"], row["errors"], row["p99_ms"]), (300, 4, 40.0))
        self.assertEqual(row["avg_ms"], 2.0)
        self.assertEqual(row["start"], 1714557600.0)

    def test_rates_are_smoothed_over_the_window(self) -> None:
        """
        Readings that catch one or two of the instance's updates in turn
        still give a steady rate.
        """
        instance = make_instance()
        self.services.add(instance)
        self.publish(instance, stats(requests=0))
        self.start()
        total = 0
        rates = []
        for step in range(30):
            total += 50 if step % 2 else 150
            self.publish(instance, stats(requests=total))
            self.clock.advance(1.0)
            rates.append(self.model.find(instance.uuid).rps)
        self.assertTrue(all(90 <= r <= 110 for r in rates[12:]), rates)

    def test_unchanged_statistics_keep_the_rate_then_go_stale(self) -> None:
        instance = make_instance()
        self.services.add(instance)
        self.publish(instance, stats(requests=0))
        self.start()
        self.clock.advance(2.0)
        self.publish(instance, stats(requests=50))
        self.clock.advance(1.0)
        state = self.model.find(instance.uuid)
        self.assertEqual(state.rps, 50 / 3)
        self.clock.advance(5.0)
        self.assertEqual(state.rps, 50 / 3)
        self.clock.advance(40.0)
        self.assertEqual(state.rps, 0.0)

    def test_counter_reset_is_a_restart(self) -> None:
        instance = make_instance()
        self.services.add(instance)
        self.publish(instance, stats(requests=500))
        self.start()
        self.clock.advance(1.0)
        self.publish(instance, stats(requests=3, start="2024-05-01T11:00:00Z+0000"))
        self.clock.advance(1.0)
        state = self.model.find(instance.uuid)
        self.assertEqual((state.rps, state.requests, state.histogram_count), (0.0, 3, 3))
        kinds = [e["kind"] for e in self.model.events]
        self.assertIn("restarted", kinds)

    def test_histogram_is_cumulative_and_consistent(self) -> None:
        instance = make_instance()
        self.services.add(instance)
        self.publish(instance, stats(requests=1000))
        self.start()
        state = self.model.find(instance.uuid)
        self.assertEqual(state.histogram_count, 1000)
        self.assertEqual(state.buckets, sorted(state.buckets))
        self.assertLessEqual(state.buckets[-1], 1000)
        # p50 is 1 ms: about half the requests are in the 1 ms bucket.
        self.assertEqual(state.buckets[LATENCY_BUCKETS.index(0.001)], 500)
        self.clock.advance(1.0)
        self.publish(instance, stats(requests=1500))
        self.clock.advance(1.0)
        self.assertEqual(state.histogram_count, 1500)
        self.assertEqual(state.buckets[LATENCY_BUCKETS.index(0.001)], 750)
        self.assertEqual(state.buckets, sorted(state.buckets))

    def test_latency_fraction_below(self) -> None:
        self.assertEqual(latency_fraction_below(0.0, 0.01, 0.1), 0.0)
        self.assertEqual(latency_fraction_below(0.01, 0.01, 0.1), 0.5)
        self.assertAlmostEqual(latency_fraction_below(0.1, 0.01, 0.1), 0.99)
        self.assertEqual(latency_fraction_below(0.2, 0.01, 0.1), 1.0)
        self.assertEqual(latency_fraction_below(5.0, 0.0, 0.0), 1.0)

    def test_events_for_lifecycle(self) -> None:
        first = make_instance(1)
        self.services.add(first)
        self.start()
        second = make_instance(2)
        self.services.add(second)
        self.clock.advance(0)
        self.services.update(attr_evolve(second, registered=False))
        self.clock.advance(0)
        self.services.remove(second)
        self.clock.advance(0)
        self.services.add(second)
        self.clock.advance(0)
        kinds = [(e["kind"], e.get("uuid")) for e in self.model.events]
        self.assertEqual(
            kinds,
            [("snapshot", None), ("added", "uuid-2"), ("unregistered", "uuid-2"),
             ("removed", "uuid-2"), ("restarted", "uuid-2")],
        )  # fmt: skip
        self.assertEqual(self.model.events[1]["text"], "Svc 127.0.0.1:9002 appeared")

    def test_changes_are_batched_into_one_delta(self) -> None:
        self.start()
        instances = [make_instance(n) for n in range(300)]
        for instance in instances:
            self.services.add(instance)
        self.clock.advance(0)
        self.assertEqual(self.sent, [])
        self.clock.advance(0.5)
        [delta] = self.sent
        self.assertEqual(delta["type"], "delta")
        self.assertEqual(len(delta["rows"]), 300)
        self.assertEqual(len(delta["events"]), 300)
        # Nothing changed: nothing is sent.
        self.clock.advance(0.5)
        self.assertEqual(len(self.sent), 1)

    def test_delta_rows_carry_only_changed_fields(self) -> None:
        instance = make_instance()
        self.services.add(instance)
        self.publish(instance, stats(requests=10))
        self.start()
        self.clock.advance(0.5)
        self.sent.clear()
        self.publish(instance, stats(requests=20))
        self.clock.pump([0.5, 0.5, 0.5])
        rows = [row for message in self.sent for row in message.get("rows", [])]
        self.assertEqual(rows, [{"uuid": "uuid-1", "requests": 20, "rps": 10.0}])

    def test_series_points_per_sweep(self) -> None:
        a, b = make_instance(1), make_instance(2)
        for instance in (a, b):
            self.services.add(instance)
            self.publish(instance, stats(requests=0))
        self.start()
        self.clock.advance(1.0)
        self.publish(a, stats(requests=30))
        self.publish(b, stats(requests=10))
        self.clock.advance(1.0)
        series = self.model.series_message(["i:uuid-1", "s:Svc", "i:nope"])["series"]
        self.assertEqual(series["i:uuid-1"]["v"][-1][:3], [15.0, 1.0, 40.0])
        self.assertEqual(series["s:Svc"]["v"][-1][0], 20.0)
        self.assertEqual(series["i:nope"], {"t": [], "v": []})
        # One point per sweep (the first ran before the registry's snapshot came).
        self.assertEqual(len(series["s:Svc"]["t"]), 2)
        self.assertEqual(len(series["s:Svc"]["v"]), 2)

    def test_series_keep_the_history_only(self) -> None:
        self.model.history = 10.0
        self.services.add(make_instance())
        self.start()
        self.clock.pump([1.0] * 30)
        points = self.model.series["i:uuid-1"].points
        self.assertLessEqual(points[-1][0] - points[0][0], 10.0)

    def test_daemon_figures_fill_rows_and_hosts(self) -> None:
        child = make_instance(1)
        daemon = make_instance(9, name=DAEMON_SERVICE, uuid="daemon-1")
        lone = make_instance(3, host="10.0.0.7")
        for instance in (child, daemon, lone):
            self.services.add(instance)
        self.publish(child, stats(requests=1))
        self.publish(lone, stats(requests=1))
        self.publish(daemon, daemon_stats({"uuid-1": ProcessUsage(cpu=33.5, rss=123456)}))
        self.start()
        self.clock.advance(1.0)
        row = self.model.find("uuid-1").row()
        self.assertEqual((row["cpu"], row["rss"], row["daemon"]), (33.5, 123456, "daemon-1"))
        lone_row = self.model.find("uuid-3").row()
        self.assertEqual((lone_row["cpu"], lone_row["rss"], lone_row["daemon"]), (None, None, None))
        host = self.model.hosts["127.0.0.1"]
        self.assertEqual(host["load1"], 0.5)
        self.assertEqual(host["cpu"], 12.5)
        self.assertEqual(host["mem_total"], 8 << 30)
        self.assertEqual(host["mem_percent"], 25.0)
        self.assertEqual(host["boot_time"], 1700000000.0)
        self.assertNotIn("10.0.0.7", self.model.hosts)
        self.assertEqual(self.model.daemon_of("uuid-1"), daemon)
        self.assertIsNone(self.model.daemon_of("uuid-3"))
        point = self.model.series["h:127.0.0.1"].points[-1][1]
        self.assertEqual(point, (12.5, 25.0, 0.5, 123456))

    def test_daemon_events_after_the_first_read_become_events(self) -> None:
        daemon = make_instance(9, name=DAEMON_SERVICE, uuid="daemon-1")
        child = make_instance(1)
        self.services.add(daemon)
        self.services.add(child)
        old = {"time": 1.0, "kind": "started", "text": "Svc (uuid-1) started", "uuid": "uuid-1"}
        self.publish(daemon, daemon_stats({}, [old]))
        self.start()
        self.clock.advance(1.0)
        new = {"time": 2.0, "kind": "guard_restart", "text": "Svc (uuid-1) over its cpu",
               "uuid": "uuid-1", "cpu": 99.0}  # fmt: skip
        self.publish(daemon, daemon_stats({}, [old, new]))
        self.clock.advance(1.0)
        self.clock.advance(1.0)
        daemon_events = [e for e in self.model.events if e.get("daemon") == "daemon-1"]
        self.assertEqual([(e["kind"], e["uuid"]) for e in daemon_events],
                         [("guard_restart", "uuid-1")])  # fmt: skip
        # Stamped with when it happened on the daemon, not when we read it.
        self.assertEqual(daemon_events[0]["time"], 2.0)
        self.assertEqual(self.clock.seconds(), 3.0)

    def test_malformed_daemon_nodes_are_refused(self) -> None:
        """
        A daemon node that breaks the contract is refused with the reason;
        the model logs it and keeps the figures it had.
        """
        good = daemon_stats({"uuid-1": ProcessUsage(cpu=1.0, rss=2)})
        bad_host = dict(good["Host"], cpu="lots")
        for junk, reason in [
            ({}, "'Host' and 'Events'"),
            (dict(good, Host=5), "host statistics must be a document"),
            (dict(good, Host=bad_host), "'cpu' must be a number"),
            (dict(good, Host=dict(good["Host"], load=[1, 2])), "three numbers"),
            (dict(good, Host={k: v for k, v in good["Host"].items() if k != "daemon"}), "'daemon'"),
            (dict(good, Events=[{"kind": "x", "text": "y"}]), "no 'time'"),
            (dict(good, Events=[{"time": 1.0, "kind": ["x"], "text": "y"}]), "'kind' must be"),
        ]:  # fmt: skip
            with self.assertRaises(ValueError) as e:
                read_daemon_node(junk)
            self.assertIn(reason, str(e.exception))
        daemon = make_instance(9, name=DAEMON_SERVICE, uuid="daemon-1")
        self.services.add(daemon)
        self.services.add(make_instance(1))
        self.publish(daemon, good)
        self.start()
        self.clock.advance(1.0)
        self.assertEqual(self.model.find("uuid-1").row()["rss"], 2)
        self.publish(daemon, dict(good, Host=bad_host))
        with capturedLogs() as events:
            self.clock.advance(1.0)
        [warning] = [e for e in events if e.get("uuid") == "daemon-1" and "error" in e]
        self.assertIn("'cpu' must be a number", str(warning["error"]))
        self.assertEqual(self.model.find("uuid-1").row()["rss"], 2)
        self.assertEqual(self.model.hosts["127.0.0.1"]["cpu"], 12.5)

    def test_registry_start_is_retried(self) -> None:
        attempts = []
        start = self.registry.start

        def flaky_start() -> Deferred:
            attempts.append(self.clock.seconds())
            if len(attempts) < 3:
                return fail(RegistryError("not yet"))
            return start()

        self.registry.start = flaky_start  # type: ignore[method-assign]
        self.model.own_registry = True
        self.services.add(make_instance())
        self.start()
        self.assertIsNone(self.model.find("uuid-1"))
        self.clock.pump([0.5, 1.0, 0.1])
        self.assertEqual(attempts, [0.0, 0.5, 1.5])
        self.assertIsNotNone(self.model.find("uuid-1"))
        flushed = self.flushLoggedErrors()
        self.assertEqual(flushed, [])

    def test_five_hundred_instances(self) -> None:
        """
        500 instances: a sweep, a delta and a snapshot stay cheap.
        """
        instances = [make_instance(n, name=f"S{n % 7}") for n in range(500)]
        for instance in instances:
            self.services.add(instance)
            self.publish(instance, stats(requests=1))
        self.start()
        self.clock.advance(1.0)
        for n, instance in enumerate(instances):
            self.publish(instance, stats(requests=2 + n))
        started = time.perf_counter()
        self.clock.advance(1.0)
        self.model.push()
        snapshot = json.dumps(self.model.snapshot_message())
        elapsed = time.perf_counter() - started
        self.assertLess(elapsed, 1.0)
        self.assertEqual(len(json.loads(snapshot)["rows"]), 500)
        self.assertLess(len(snapshot), 400_000)
        self.assertLess(len(json.dumps(self.sent[-1])), 150_000)


def attr_evolve(instance: Instance, **changes: Any) -> Instance:
    import attr

    return attr.evolve(instance, **changes)


class MetricsTextTests(SynchronousTestCase):
    def test_prometheus_text(self) -> None:
        clock = Clock()
        registry = MemoryRegistry(reactor=clock)
        model = DashboardModel(registry, reactor=clock)
        child = make_instance(1, name='Odd"Name')
        daemon = make_instance(9, name=DAEMON_SERVICE, uuid="daemon-1")
        for instance in (child, daemon):
            registry.add(instance)
        registry.publish_stats(child, stats(requests=1000, errors=3))
        registry.publish_stats(daemon, daemon_stats({"uuid-1": ProcessUsage(cpu=5.0, rss=2048)}))
        model.startService()
        clock.advance(0)
        text = prometheus_text(model)
        model.stopService()
        samples = parse_prometheus(text)
        labels = 'service="Odd\\"Name",version="1",region="north",host="127.0.0.1",uuid="uuid-1"'
        self.assertEqual(samples[f"skynet_requests_total{{{labels}}}"], 1000)
        self.assertEqual(samples[f"skynet_errors_total{{{labels}}}"], 3)
        self.assertEqual(samples[f"skynet_clients{{{labels}}}"], 2)
        self.assertEqual(samples[f"skynet_registered{{{labels}}}"], 1)
        self.assertEqual(samples[f"skynet_cpu_percent{{{labels}}}"], 5.0)
        self.assertEqual(samples[f"skynet_rss_bytes{{{labels}}}"], 2048)
        # (observe) A node without published buckets gets no histogram: no
        # estimate from p50/p99 (real buckets: tests/test_observe_histogram.py).
        self.assertFalse([k for k in samples if k.startswith("skynet_request_duration")])
        self.assertEqual(
            samples[f'skynet_response_time_quantile_seconds{{{labels},quantile="0.99"}}'], 0.04
        )
        self.assertEqual(samples['skynet_host_load1{host="127.0.0.1",region="north"}'], 0.5)
        self.assertIn("# TYPE skynet_requests_total counter", text)
        # The daemon has no daemon above it: no CPU line rather than a made-up one.
        self.assertFalse([k for k in samples if k.startswith("skynet_cpu_percent") and
                          "daemon-1" in k])  # fmt: skip

    def test_graphite_names(self) -> None:
        self.assertEqual(graphite_name("skynet", "my region", "10.0.0.1", "Svc"),
                         "skynet.my_region.10_0_0_1.Svc")  # fmt: skip


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*(?:\{.*\})?) (\S+)$")


def parse_prometheus(text: str) -> dict[str, float]:
    """
    The samples of a Prometheus text page, checking every line's syntax.
    """
    samples = {}
    for line in text.splitlines():
        if not line or line.startswith("# HELP ") or line.startswith("# TYPE "):
            continue
        match = _SAMPLE.match(line)
        assert match, f"not a sample line: {line!r}"
        samples[match.group(1)] = float(match.group(2))
    return samples


class HelperTests(SynchronousTestCase):
    def test_same_origin(self) -> None:
        self.assertTrue(same_origin(None, "127.0.0.1:8080"))
        self.assertTrue(same_origin("http://127.0.0.1:8080", "127.0.0.1:8080"))
        self.assertFalse(same_origin("http://evil.example", "127.0.0.1:8080"))
        self.assertFalse(same_origin("null", "127.0.0.1:8080"))

    def test_bearer_token(self) -> None:
        class Request:
            def __init__(self, value: bytes | None) -> None:
                self.value = value

            def getHeader(self, name: bytes) -> bytes | None:
                return self.value

        self.assertEqual(bearer_token(Request(b"Bearer abc")), "abc")
        self.assertEqual(bearer_token(Request(b"bearer  abc ")), "abc")
        self.assertIsNone(bearer_token(Request(b"Basic abc")))
        self.assertIsNone(bearer_token(Request(None)))


class DashboardTapTests(SynchronousTestCase):
    def test_twistd_lists_the_plugin(self) -> None:
        from tests.processes import ROOT, twistd

        listed = subprocess.run([twistd(), "--help"], cwd=ROOT, capture_output=True, text=True,
                                timeout=60)  # fmt: skip
        self.assertIn("skynet-dashboard", listed.stdout)
        usage_text = subprocess.run([twistd(), "skynet-dashboard", "--help"], cwd=ROOT,
                                    capture_output=True, text=True, timeout=60)  # fmt: skip
        self.assertIn("--token-file", usage_text.stdout)
        self.assertIn("--graphite", usage_text.stdout)

    def test_options(self) -> None:
        from skynet.dashboard_tap import Options

        directory = Path(tempfile.mkdtemp(prefix="skynet-dash-"))
        token = directory / "token"
        token.write_text(f"  {TOKEN}\n")
        options = Options()
        options.parseOptions(["--listen", "tcp:0:interface=127.0.0.1", "--registry",
                              "memory://tap-test", "--token-file", str(token),
                              "--graphite", "tcp:127.0.0.1:2003"])  # fmt: skip
        self.assertEqual(options.token, TOKEN)
        self.assertIsNotNone(options.graphite)
        self.assertIsNone(Options().token)
        (directory / "empty").write_text("\n")
        for bad in (["--token-file", str(directory / "missing")],
                    ["--token-file", str(directory / "empty")],
                    ["--stats-interval", "0"], ["--listen", "nonsense:1"],
                    ["--registry", "ftp://x"], ["--graphite", "bogus:"]):  # fmt: skip
            self.assertRaises(usage.UsageError, Options().parseOptions, bad)


# A real dashboard on a socket


class _Socket(WebSocketClientProtocol):
    def onOpen(self) -> None:
        self.factory.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.factory.messages.put(json.loads(payload))

    def onClose(self, wasClean: bool, code: Any, reason: Any) -> None:
        if not self.factory.opened.called:
            self.factory.opened.errback(ConnectionError(f"refused: {code} {reason}"))
        if not self.factory.closed.called:
            self.factory.closed.callback(code)


class Sleepy(Service):
    """
    An in-process service whose admin endpoint the dashboard calls.
    """

    name = "Sleepy"

    def Ping(self, request_info: Any, params: dict[str, Any]) -> dict[str, Any]:
        return {}


class DashboardHTTPTests(SynchronousTestCase):
    """
    The dashboard's pages and API in memory: its resource under
    L{StubTreq}, its model on a fake clock.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.services = MemoryRegistry(reactor=self.clock)
        self.registry = MemoryRegistry(reactor=self.clock, store=self.services.store)
        self.model = DashboardModel(self.registry, reactor=self.clock, stats_interval=0.1,
                                    push_interval=0.05)  # fmt: skip
        self.model.startService()
        self.addCleanup(self.model.stopService)
        # "dashboard.test" is served by name, as --allowed-host makes it.
        app = DashboardApp(self.model, token=TOKEN, allowed_hosts=["dashboard.test"])
        self.treq = StubTreq(app.resource())

    def add(self, instance: Instance, doc: dict[str, Any]) -> None:
        self.services.add(instance)
        self.successResultOf(self.services.publish_stats(instance, doc))

    def done(self, d: Deferred) -> Any:
        self.treq.flush()
        return self.successResultOf(d)

    def get(self, path: str, **kw: Any) -> tuple[int, Any, bytes]:
        response = self.done(self.treq.get("http://dashboard.test" + path, **kw))
        return response.code, response.headers, self.done(self.treq.content(response))

    def test_pages_and_api(self) -> None:
        self.add(make_instance(1), stats(requests=5))
        self.clock.advance(0.2)
        code, headers, body = self.get("/")
        self.assertEqual(code, 200)
        self.assertIn(b'src="/static/app.js"', body)
        self.assertEqual(headers.getRawHeaders("referrer-policy"), ["no-referrer"])
        code, _, body = self.get("/api/state")
        self.assertEqual(code, 200)
        self.assertEqual([r["uuid"] for r in json.loads(body)["rows"]], ["uuid-1"])
        code, _, body = self.get("/api/series?key=i:uuid-1&key=s:Svc")
        self.assertEqual(set(json.loads(body)["series"]), {"i:uuid-1", "s:Svc"})

    def test_metrics_endpoint(self) -> None:
        self.add(make_instance(1), stats(requests=77, errors=2))
        self.add(make_instance(2, registered=False), stats(requests=1))
        self.clock.advance(0.3)
        code, headers, body = self.get("/metrics")
        self.assertEqual(code, 200)
        self.assertEqual(headers.getRawHeaders("content-type"),
                         ["text/plain; version=0.0.4; charset=utf-8"])  # fmt: skip
        samples = parse_prometheus(body.decode())
        one = 'service="Svc",version="1",region="north",host="127.0.0.1",uuid="uuid-1"'
        two = one.replace("uuid-1", "uuid-2")
        self.assertEqual(samples[f"skynet_requests_total{{{one}}}"], 77)
        self.assertEqual(samples[f"skynet_errors_total{{{one}}}"], 2)
        self.assertEqual(samples[f"skynet_registered{{{one}}}"], 1)
        self.assertEqual(samples[f"skynet_registered{{{two}}}"], 0)
        # No daemon: no CPU or RSS rather than zeros.
        self.assertFalse([k for k in samples if k.startswith(("skynet_cpu", "skynet_rss"))])

    def test_auth(self) -> None:
        for token, code in [(TOKEN, 200), ("nope", 403), (None, 403)]:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            self.assertEqual(self.get("/api/auth", headers=headers)[0], code, token)


class DashboardTests(TestCase):
    """
    A dashboard listening on 127.0.0.1 over an in-memory registry.
    """

    timeout = 30

    async def start_dashboard(self, token: str | None = TOKEN) -> None:
        self.services = MemoryRegistry(reactor=reactor)
        self.registry = MemoryRegistry(reactor=reactor, store=self.services.store)
        self.model = DashboardModel(self.registry, reactor=reactor, stats_interval=0.1,
                                    push_interval=0.05)  # fmt: skip
        self.model.startService()
        await self.model.when_started()
        self.addCleanup(self.model.stopService)
        self.app = DashboardApp(self.model, token=token)
        port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(self.app.site())
        self.addCleanup(port.stopListening)
        self.port = port.getHost().port
        self.url = f"http://127.0.0.1:{self.port}"
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.http = HTTPClient(Agent(reactor, pool=pool))
        self.addCleanup(lambda: deferLater(reactor, 0.05, lambda: None))

    async def get(self, path: str, **kw: Any) -> tuple[int, Any, bytes]:
        response = await self.http.get(self.url + path, **kw)
        return response.code, response.headers, await response.content()

    async def post(self, path: str, token: str | None = None) -> tuple[int, dict[str, Any]]:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        response = await self.http.post(self.url + path, headers=headers)
        return response.code, json.loads(await response.content())

    async def connect(self, origin: str | None = None) -> tuple[_Socket, DeferredQueue]:
        factory = WebSocketClientFactory(f"ws://127.0.0.1:{self.port}/ws", origin=origin)
        factory.protocol = _Socket
        factory.messages = DeferredQueue()
        factory.opened = Deferred()
        factory.closed = Deferred()
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port)
        protocol = await endpoint.connect(factory)

        async def close() -> None:
            if not factory.closed.called:
                protocol.sendClose()
                timer = reactor.callLater(2, protocol.transport.abortConnection)
                await factory.closed
                if timer.active():
                    timer.cancel()

        self.addCleanup(lambda: Deferred.fromCoroutine(close()))
        socket = await factory.opened
        return socket, factory.messages

    async def receive(self, messages: DeferredQueue, predicate: Any, what: str,
                      timeout: float = 5.0) -> dict[str, Any]:  # fmt: skip
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no message with {what} within {timeout}s")
            d = messages.get()
            d.addTimeout(remaining, reactor)
            try:
                message = await d
            except Exception:
                raise AssertionError(f"no message with {what} within {timeout}s") from None
            if predicate(message):
                return message

    async def add(self, instance: Instance, doc: dict[str, Any] | None = None) -> None:
        await self.services.add(instance)
        if doc is not None:
            await self.services.publish_stats(instance, doc)

    async def test_snapshot_then_deltas(self) -> None:
        await self.start_dashboard()
        first = make_instance(1)
        await self.add(first, stats(requests=5))
        await deferLater(reactor, 0.2, lambda: None)
        socket, messages = await self.connect()
        snapshot = await messages.get()
        self.assertEqual(snapshot["type"], "snapshot")
        self.assertTrue(snapshot["config"]["actions"])
        [row] = snapshot["rows"]
        self.assertEqual((row["uuid"], row["service"], row["address"], row["requests"]),
                         ("uuid-1", "Svc", "127.0.0.1:9001", 5))  # fmt: skip
        self.assertIn("s:Svc", snapshot["series"])

        # New statistics: a delta with only what changed.
        await self.services.publish_stats(first, stats(requests=25))
        delta = await self.receive(messages, lambda m: any(
            r.get("requests") == 25 for r in m.get("rows", [])), "requests 25")  # fmt: skip
        self.assertEqual(delta["type"], "delta")
        [changed] = [r for r in delta["rows"] if r["uuid"] == "uuid-1"]
        self.assertNotIn("service", changed)

        # A new instance: its full row and an event.
        second = make_instance(2)
        await self.add(second, stats(requests=1))
        delta = await self.receive(messages, lambda m: any(
            r["uuid"] == "uuid-2" for r in m.get("rows", [])), "the new row")  # fmt: skip
        [row] = [r for r in delta["rows"] if r["uuid"] == "uuid-2"]
        self.assertEqual(row["service"], "Svc")
        self.assertIn("added", [e["kind"] for e in delta.get("events", [])])

        # Unregistered: the flag flips, with an event.
        await self.services.update(attr_evolve(second, registered=False))
        delta = await self.receive(messages, lambda m: any(
            r["uuid"] == "uuid-2" and r.get("registered") is False for r in m.get("rows", [])
        ), "registered false")  # fmt: skip
        self.assertIn("unregistered", [e["kind"] for e in delta.get("events", [])])

        # Gone: removed, with an event.
        await self.services.remove(second)
        delta = await self.receive(messages, lambda m: "uuid-2" in m.get("removed", []),
                                   "the removal")  # fmt: skip
        self.assertIn("removed", [e["kind"] for e in delta["events"]])

        # Points for the graphs arrive with the deltas.
        delta = await self.receive(messages, lambda m: "points" in m, "points")
        self.assertIn("i:uuid-1", delta["points"][-1]["s"])

        # And the page may ask for a full series.
        socket.sendMessage(json.dumps({"type": "series", "keys": ["i:uuid-1"]}).encode())
        reply = await self.receive(messages, lambda m: m["type"] == "series", "series")
        self.assertGreater(len(reply["series"]["i:uuid-1"]["t"]), 1)

    async def test_cross_origin_websocket_refused(self) -> None:
        await self.start_dashboard()
        with self.assertRaises(ConnectionError):
            await self.connect(origin="http://evil.example")
        socket, messages = await self.connect(origin=f"http://127.0.0.1:{self.port}")
        self.assertEqual((await messages.get())["type"], "snapshot")

    async def test_static_files(self) -> None:
        """
        The script and style, from a real port (static files are sent by a
        pull producer, which StubTreq's transport does not drive).
        """
        await self.start_dashboard()
        code, headers, body = await self.get("/static/app.js")
        self.assertEqual(code, 200)
        self.assertIn("javascript", headers.getRawHeaders("content-type")[0])
        self.assertIn(b"new WebSocket", body)
        code, _, _ = await self.get("/static/app.css")
        self.assertEqual(code, 200)
        code, _, _ = await self.get("/static/")
        self.assertEqual(code, 404)

    async def test_actions_refused_when_read_only(self) -> None:
        """
        No token configured: every action is refused, whatever is sent,
        and nothing changes.
        """
        await self.start_dashboard(token=None)
        host = await self.start_service()
        code, headers, body = await self.get("/api/state")
        self.assertFalse(json.loads(body)["config"]["actions"])
        for token in (None, "", TOKEN, "anything"):
            for action in ("unregister", "stop", "restart", "register"):
                code, body = await self.post(f"/api/instances/{host.uuid}/{action}", token)
                self.assertEqual(code, 403, (action, token, body))
                self.assertIn("read-only", body["error"])
        code, _, _ = await self.get("/api/auth", headers={"Authorization": f"Bearer {TOKEN}"})
        self.assertEqual(code, 403)
        await deferLater(reactor, 0.2, lambda: None)
        self.assertTrue(host.registered)
        self.assertEqual(self.stopped, [])

    async def test_actions_need_the_right_token(self) -> None:
        await self.start_dashboard()
        host = await self.start_service()
        for token in (None, "", "wrong", TOKEN + "x", TOKEN.upper()):
            code, body = await self.post(f"/api/instances/{host.uuid}/unregister", token)
            self.assertEqual(code, 403, (token, body))
            code, _, _ = await self.get("/api/auth", headers={"Authorization": f"Bearer {token}"})
            self.assertEqual(code, 403)
        await deferLater(reactor, 0.2, lambda: None)
        self.assertTrue(host.registered)
        code, _, _ = await self.get("/api/auth", headers={"Authorization": f"Bearer {TOKEN}"})
        self.assertEqual(code, 200)

        # With the token: through the admin endpoint.
        code, body = await self.post(f"/api/instances/{host.uuid}/unregister", TOKEN)
        self.assertEqual((code, body["via"]), (200, "admin"))
        self.assertFalse(host.registered)
        code, body = await self.post(f"/api/instances/{host.uuid}/register", TOKEN)
        self.assertEqual(code, 200)
        self.assertTrue(host.registered)
        # Restart needs a daemon; unknown instances and actions are 404s.
        code, body = await self.post(f"/api/instances/{host.uuid}/restart", TOKEN)
        self.assertEqual(code, 409)
        self.assertIn("daemon", body["error"])
        code, _ = await self.post("/api/instances/nobody/stop", TOKEN)
        self.assertEqual(code, 404)
        code, _ = await self.post(f"/api/instances/{host.uuid}/explode", TOKEN)
        self.assertEqual(code, 404)
        code, body = await self.post(f"/api/instances/{host.uuid}/stop", TOKEN)
        self.assertEqual(code, 200)
        await deferLater(reactor, 0.1, lambda: None)
        self.assertEqual(self.stopped, [host.uuid])
        kinds = [e["kind"] for e in self.model.events]
        self.assertEqual(kinds.count("action"), 3)
        self.assertIn("action-refused", kinds)

    async def test_actions_go_through_the_daemon(self) -> None:
        await self.start_dashboard()
        host = await self.start_service()
        daemon = FakeDaemon({host.uuid})
        daemon_host = await self.start_service(daemon, uuid="daemon-1")
        await self.services.publish_stats(
            daemon_host.instance, daemon_stats({host.uuid: ProcessUsage(cpu=1.0, rss=4096)})
        )
        await self.wait(lambda: self.model.daemon_of(host.uuid) is not None, "the daemon")
        code, body = await self.post(f"/api/instances/{host.uuid}/restart", TOKEN)
        self.assertEqual((code, body["via"]), (200, "daemon"), body)
        code, body = await self.post(f"/api/instances/{host.uuid}/unregister", TOKEN)
        self.assertEqual(code, 200, body)
        self.assertEqual(daemon.calls, [("RestartSubService", host.uuid),
                                        ("UnregisterSubService", host.uuid)])  # fmt: skip
        # The daemon did nothing to it (it is a stand-in): still registered.
        self.assertTrue(host.registered)
        # Refused with a wrong token: the daemon hears nothing.
        code, _ = await self.post(f"/api/instances/{host.uuid}/restart", "nope")
        self.assertEqual(code, 403)
        self.assertEqual(len(daemon.calls), 2)

    async def test_graphite_push(self) -> None:
        await self.start_dashboard()
        await self.add(make_instance(1), stats(requests=9))
        received = DeferredQueue()

        class Collect(Protocol):
            def dataReceived(self, data: bytes) -> None:
                received.put(data)

        listening = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(
            Factory.forProtocol(Collect)
        )
        self.addCleanup(listening.stopListening)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", listening.getHost().port)
        pusher = GraphitePusher(self.model, endpoint)
        pusher.startService()
        self.addCleanup(pusher.stopService)
        data = b""
        while b"requests 9 " not in data:
            d = received.get()
            d.addTimeout(5, reactor)
            data += await d
        line = next(x for x in data.decode().splitlines() if ".requests " in x)
        path, value, stamp = line.split()
        self.assertEqual(path, "skynet.north.127_0_0_1.Svc.uuid-1.requests")
        self.assertLess(abs(int(stamp) - time.time()), 5)

    # Helpers

    async def start_service(self, service: Service | None = None, uuid: str | None = None):
        self.stopped: list[str] = getattr(self, "stopped", [])
        host: ServiceHost | None = None

        def stop() -> None:
            self.stopped.append(host.uuid)  # type: ignore[union-attr]

        host = ServiceHost(
            service or Sleepy(),
            MemoryRegistry(reactor=reactor, store=self.services.store),
            [serverFromString(reactor, "tcp:0:interface=127.0.0.1")],
            [serverFromString(reactor, "tcp:0:interface=127.0.0.1")],
            reactor=reactor, uuid=uuid, stats_interval=0.1, stop_process=stop,
        )  # fmt: skip
        host.startService()
        await host.when_started()
        self.addCleanup(host.stopService)
        await self.wait(lambda: self.model.find(host.uuid) is not None, "the instance")
        return host

    async def wait(self, predicate: Any, what: str, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            await deferLater(reactor, 0.02, lambda: None)
