"""
The RPC benchmark runs, in a tiny configuration, so that it never rots.
No timing assertions: only that it measured something.
"""

from __future__ import annotations

import re
import subprocess
import sys

from twisted.trial.unittest import TestCase

from tests.processes import ROOT, child_env


class RPCBenchmarkTests(TestCase):
    timeout = 120

    def test_runs_and_prints_figures(self) -> None:
        result = subprocess.run(
            [sys.executable, "-m", "benchmarks.rpc", "--seconds", "0.3", "--concurrency", "4"],
            cwd=ROOT, capture_output=True, text=True, timeout=100, env=child_env(),
        )  # fmt: skip
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        for label in ("skynet (client -> service, via registry)", "bare Twisted BSON loop"):
            line = next(ln for ln in result.stdout.splitlines() if ln.startswith(label))
            numbers = [float(x) for x in re.findall(r"\d+(?:\.\d+)?", line[len(label) :])]
            self.assertEqual(len(numbers), 6, line)
            self.assertTrue(all(n > 0 for n in numbers), line)
        self.assertIn("service RSS: idle", result.stdout)
