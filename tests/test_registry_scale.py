"""
The registry scale simulation (C{benchmarks/registry_scale.py}), run once,
tiny, against its own real ZooKeeper: it must finish and report every
figure docs/scale.md is built from.  (No timing is asserted.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from twisted.trial.unittest import SynchronousTestCase

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


class SimulationTests(SynchronousTestCase):
    def test_tiny_run_reports_every_figure(self) -> None:
        directory = tempfile.mkdtemp(prefix="skynet-registry-scale-")
        self.addCleanup(lambda: subprocess.run(["rm", "-rf", directory], check=False))
        output = os.path.join(directory, "figures.json")
        result = subprocess.run(
            [sys.executable, "-m", "benchmarks.registry_scale", "--instances", "300",
             "--services", "6", "--clients", "3", "--changes", "5", "--seconds", "120",
             "--json", output],
            cwd=ROOT, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        self.assertEqual(result.returncode, 0, result.stderr)
        with open(output) as f:
            figures = json.load(f)
        self.assertEqual(figures["instances"], 300)
        self.assertEqual(figures["clients"], 3)
        self.assertEqual(figures["snapshot_all_count"], 300)
        self.assertEqual(figures["instances_per_service"], 50)
        self.assertEqual(figures["changes"], 5)
        # Each client watches one service: 50 data watches and its
        # interior nodes (service, version, region and 50 hosts).
        self.assertEqual(figures["server_watches"], 3 * (50 + 50 + 3))
        for key in (
            "node_bytes_data",
            "client_rss_per_instance",
            "fanout_median_s",
            "server_cpu_per_notification_s",
        ):
            self.assertIn(key, figures)
