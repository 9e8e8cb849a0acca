"""
Real traces: two C{twistd skynet-service} Fibonacci instances, and
C{sky call --trace Fibonacci Index '{"index": 10}'} as an operator runs it.
The tree has one line per call the recursion made (counted independently
from the instances' published per-method statistics), each a child of the
call that caused it except the root; C{sky trace ID --json} reads it back.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile

import pytest
from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from skynet.registry import Query
from skynet.registry.files import FileRegistry
from tests.processes import ROOT, ServiceProcess, wait_for

pytestmark = pytest.mark.slow


def _sky(root: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "skynet.sky", "--registry", f"file://{root}", *args],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip


def _walk(calls: list[dict]) -> list[dict]:
    out = []
    for c in calls:
        out.append(c)
        out.extend(_walk(c["children"]))
    return out


class FibonacciTraceTests(TestCase):
    timeout = 180

    async def test_call_trace_tree_has_one_span_per_call(self) -> None:
        root = tempfile.mkdtemp(prefix="skynet-registry-")
        for _ in range(2):
            process = ServiceProcess("examples.fibonacci:Fibonacci", f"file://{root}").start()
            self.addCleanup(process.stop)
        registry = FileRegistry(root, reactor=reactor)
        await registry.start()
        self.addCleanup(registry.stop)

        async def both_registered():
            found = await registry.query(Query(service="Fibonacci"))
            return len([i for i in found if i.registered]) == 2

        await wait_for(both_registered, timeout=60, what="two Fibonacci instances registered")

        result = await deferToThread(
            _sky, root, "call", "--trace", "Fibonacci", "Index", '{"index": 10}'
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        lines = result.stdout.splitlines()
        self.assertIn('"value": 55', result.stdout)
        header = next(i for i, line in enumerate(lines) if line.startswith("request "))
        request_id = re.match(r"request (\S+): (\d+) call", lines[header]).group(1)
        tree = lines[header + 1 :]
        # Only the root starts at column 0; every other line is indented
        # under its parent.
        self.assertEqual([line for line in tree if not line.startswith(" ")][:1], tree[:1])
        self.assertEqual(sum(1 for line in tree if not line.startswith(" ")), 1, result.stdout)

        # Independently: the calls of Index the instances served.
        instances = await registry.query(Query(service="Fibonacci"))

        async def served() -> int:
            total = 0
            for instance in instances:
                node = await registry.get_stats(instance) or {}
                total += (node.get("Methods", {}).get("Index") or {}).get("Requests", 0)
            return total

        readings: list[int] = []

        async def settled():
            # Published every 0.5 s: the same count over 2 s of readings is final.
            readings.append(await served())
            return readings[-1] if len(readings) > 8 and len(set(readings[-8:])) == 1 else None

        total = await wait_for(settled, timeout=60, interval=0.25, what="statistics settled")
        self.assertEqual(len(tree), total, result.stdout)
        self.assertGreater(total, 2)

        again = await deferToThread(_sky, root, "trace", request_id, "--json")
        self.assertEqual(again.returncode, 0, again.stderr)
        doc = json.loads(again.stdout)
        calls = _walk(doc["calls"])
        # The sky process that made the root call is gone: its client span
        # with it, so the root is the first instance's server span.
        self.assertEqual(len(calls), total)
        self.assertEqual(len(doc["calls"]), 1)
        self.assertTrue(all(c["outcome"] == "ok" for c in calls))
        self.assertTrue(all(c["server_spans"] for c in calls))
        self.assertTrue(all(re.match(r"[\d.]+:\d+$", c["address"]) for c in calls), calls)
