"""
Real per-method histograms: a C{twistd skynet-service} Sleeper called N
times with known durations; its statistics node and the dashboard's
C{/metrics} count each call in its bucket exactly.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile

import pytest
import treq
from bson.int64 import Int64
from twisted.internet import reactor
from twisted.internet.endpoints import serverFromString
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from skynet.client import Client
from skynet.observe.histogram import BUCKETS
from skynet.registry import Query
from skynet.registry.files import FileRegistry
from skynet.web.app import DashboardApp
from skynet.web.model import DashboardModel
from tests.processes import ROOT, ServiceProcess, wait_for
from tests.test_web import parse_prometheus

pytestmark = pytest.mark.slow

#: (duration in seconds, calls): each just above a bucket's lower bound, so
#: that a busy machine's lateness (tens to hundreds of ms) keeps it in its
#: bucket: (50, 100], (250, 500] ms and (1, 2.5] s.
PLAN = [(0.060, 5), (0.300, 3), (1.100, 2)]


class SleeperHistogramTests(TestCase):
    timeout = 120

    async def test_bucket_counts_exact(self) -> None:
        root = tempfile.mkdtemp(prefix="skynet-registry-")
        process = ServiceProcess("examples.sleeper:Sleeper", f"file://{root}").start()
        self.addCleanup(process.stop)
        registry = FileRegistry(root, reactor=reactor)
        await registry.start()
        self.addCleanup(registry.stop)
        client = Client(registry=registry, reactor=reactor)
        self.addCleanup(client.stop)
        await wait_for(lambda: _registered(registry), timeout=30, what="Sleeper registered")
        sleeper = client.service("Sleeper")
        for duration, calls in PLAN:
            for _ in range(calls):
                await sleeper.call("Sleep", {"duration": Int64(int(duration * 1e9))}, timeout=10)
        total = sum(c for _, c in PLAN)
        [instance] = await registry.query(Query(service="Sleeper"))

        async def published():
            node = await registry.get_stats(instance)
            methods = (node or {}).get("Methods", {})
            return node if methods.get("Sleep", {}).get("Requests") == total else None

        await wait_for(published, timeout=30, what="statistics published")
        node = await registry.get_stats(instance)
        counts = node["Methods"]["Sleep"]["Buckets"]
        expected = [0] * (len(BUCKETS) + 1)
        for duration, calls in PLAN:
            expected[next(i for i, b in enumerate(BUCKETS) if duration <= b)] += calls
        self.assertEqual(counts, expected)
        # Go's keys are still there, unchanged in kind.
        self.assertEqual(node["RequestsServed"], total)

        # sky stats --by-method, as an operator runs it.
        result = await deferToThread(
            subprocess.run,
            [sys.executable, "-m", "skynet.sky", "--registry", f"file://{root}", "stats",
             "--by-method", "--service", "Sleeper", "--json"],
            capture_output=True, text=True, timeout=60, cwd=ROOT,
        )  # fmt: skip
        self.assertEqual(result.returncode, 0, result.stderr)
        [row] = json.loads(result.stdout)
        self.assertEqual((row["method"], row["requests"], row["errors"]), ("Sleep", total, 0))
        self.assertTrue(0.05 < row["p50"] <= 0.1, row)
        self.assertTrue(1.0 < row["p99"] <= 2.5, row)
        table = await deferToThread(
            subprocess.run,
            [sys.executable, "-m", "skynet.sky", "--registry", f"file://{root}", "stats",
             "--by-method"],
            capture_output=True, text=True, timeout=60, cwd=ROOT,
        )  # fmt: skip
        self.assertEqual(table.returncode, 0, table.stderr)
        self.assertRegex(table.stdout, r"Sleeper\.Sleep +10 +0 ")

        model = DashboardModel(registry, reactor=reactor, stats_interval=0.2)
        model.startService()
        self.addCleanup(model.stopService)
        app = DashboardApp(model)
        port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(app.site())
        self.addCleanup(port.stopListening)
        url = f"http://127.0.0.1:{port.getHost().port}/metrics"

        async def scraped():
            response = await treq.get(url, persistent=False)
            samples = parse_prometheus((await response.content()).decode())
            keys = [k for k in samples if k.startswith("skynet_request_duration_seconds_count")]
            return samples if keys else None

        samples = await wait_for(scraped, timeout=30, what="/metrics with the histogram")
        labels = (f'service="Sleeper",version="{instance.version}",region="{instance.region}",'
                  f'host="{instance.host}",uuid="{instance.uuid}",method="Sleep"')  # fmt: skip
        cumulative = 0
        for bound, count in zip(BUCKETS, expected, strict=False):
            cumulative += count
            key = f'skynet_request_duration_seconds_bucket{{{labels},le="{float(bound)!r}"}}'
            self.assertEqual(samples[key], cumulative, key)
        self.assertEqual(
            samples[f'skynet_request_duration_seconds_bucket{{{labels},le="+Inf"}}'], total
        )
        self.assertEqual(samples[f"skynet_request_duration_seconds_count{{{labels}}}"], total)
        expected_sum = sum(d * c for d, c in PLAN)
        measured_sum = samples[f"skynet_request_duration_seconds_sum{{{labels}}}"]
        # Each call at least its sleep, and late by less than 0.2 s on a busy machine.
        self.assertTrue(expected_sum <= measured_sum < expected_sum + 0.2 * total, measured_sum)


async def _registered(registry) -> bool:
    return bool(await registry.query(Query(service="Sleeper", registered=True)))
