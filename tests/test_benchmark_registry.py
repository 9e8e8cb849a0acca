"""
The registry benchmark runs, in a tiny configuration (20 instances, 2
services) on both backends, so that it never rots.  No timing assertions:
only that it measured what it says, for the embedded registry and ZooKeeper
(a standalone server of its own, so Debian's C{zookeeper} must be
installed).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from twisted.trial.unittest import TestCase

from tests.processes import ROOT, child_env


class RegistryBenchmarkTests(TestCase):
    pytestmark = [pytest.mark.slow]
    timeout = 180

    def test_runs_on_both_backends(self) -> None:
        directory = tempfile.mkdtemp(prefix="skynet-bench-test-")
        self.addCleanup(shutil.rmtree, directory, True)
        out = Path(directory) / "figures.json"
        command = [sys.executable, "-m", "benchmarks.registry", "--instances", "20",
                   "--services", "2", "--writers", "3", "--samples", "5", "--zookeeper",
                   "--json", str(out)]  # fmt: skip
        result = subprocess.run(
            command, cwd=ROOT, capture_output=True, text=True, timeout=170, env=child_env()
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        figures = json.loads(out.read_text())
        for backend in ("embedded", "ZooKeeper"):
            found = figures[backend]
            self.assertEqual(found["snapshot_all_count"], 20)
            self.assertEqual(found["snapshot_one_count"], 10)
            self.assertEqual(found["samples"], 5)
            for key in ("register_s", "snapshot_all_s", "snapshot_all_cpu_s", "snapshot_one_s",
                        "event_median_s", "event_p99_s"):  # fmt: skip
                self.assertGreater(found[key], 0, key)
            self.assertIsInstance(found["memory_bytes"], int)
        lines = result.stdout.splitlines()
        self.assertEqual(lines[1].split(), ["embedded", "ZooKeeper"])
        for label in ("snapshot, watch on everything", "change -> event, median",
                      "change -> event, p99", "client memory (RSS growth)"):  # fmt: skip
            self.assertTrue(any(line.startswith(label) for line in lines), result.stdout)
