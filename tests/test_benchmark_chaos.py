"""
The chaos benchmark (kills, and the SIGSTOP variant) and the discovery timing
run once each, in a tiny configuration, so that they never rot.  No timing
assertions; zero failed calls is asserted, since that is behaviour: a call
must survive the death or hang of the instance it went to.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
from twisted.trial.unittest import TestCase

from tests.processes import ROOT, child_env, missing_here


class _Run(TestCase):
    pytestmark = [pytest.mark.slow]
    timeout = 180

    def run_module(self, module: str, *args: str) -> tuple[str, dict[str, Any]]:
        directory = tempfile.mkdtemp(prefix="skynet-chaos-test-")
        self.addCleanup(shutil.rmtree, directory, True)
        out = Path(directory) / "report.json"
        result = subprocess.run(
            [sys.executable, "-m", module, *args, "--json", str(out)],
            cwd=ROOT, capture_output=True, text=True, timeout=170, env=child_env(),
        )  # fmt: skip
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        return result.stdout, json.loads(out.read_text())

    def assert_no_failure(self, phases: dict[str, Any], names: list[str]) -> None:
        self.assertEqual(list(phases), names)
        for name, phase in phases.items():
            self.assertGreater(phase["calls"], 0, name)
            self.assertEqual(phase["failed"], 0, (name, phase["errors"]))
            self.assertLessEqual(phase["p50_ms"], phase["p99_ms"])
            self.assertLessEqual(phase["p99_ms"], phase["max_ms"])


class ChaosTests(_Run):
    def test_kills(self) -> None:
        """
        Two SIGKILLs under 50 calls/s: no call fails, each victim comes back
        under its uuid and answers again, and the report has every figure.
        """
        stdout, report = self.run_module(
            "benchmarks.chaos", "--duration", "6", "--interval", "3", "--quiet", "1",
            "--rate", "50", "--fibonacci", "2", "--testservice", "2",
        )  # fmt: skip
        result = report["embedded"]
        self.assert_no_failure(result["phases"], ["quiet", "chaos", "recovery"])
        self.assertEqual(len(result["kills"]), 2)
        for kill in result["kills"]:
            self.assertIn(kill["service"], ("Fibonacci", "TestService"))
            self.assertEqual(kill["answered_after_kill"], 0)
            for key in ("last_attempt_ms", "out_of_view_ms", "registered_again_ms",
                        "back_in_rotation_ms"):  # fmt: skip
                self.assertIsNotNone(kill[key], key)
        self.assertEqual(set(result["kill_summary"]),
                         {"last_attempt_ms", "last_connect_ms", "out_of_view_ms",
                          "registered_again_ms", "back_in_rotation_ms", "attempts_after_kill",
                          "answered_after_kill", "connects_after_kill"})  # fmt: skip
        self.assertGreaterEqual(result["attempts"], result["calls"])
        for label in ("embedded: 50 calls/s; 2 SIGKILLs", "phase", "quiet", "chaos", "recovery",
                      "kill -> last attempt sent to the dead process",
                      "kill -> back in rotation (first call answered)",
                      "attempts sent to dead processes after their kill"):  # fmt: skip
            self.assertIn(label, stdout)

    def test_sigstop(self) -> None:
        """
        One instance SIGSTOPped for 3 s: no call fails (they are hedged to
        its sibling), and the report says how many attempts it got.
        """
        stdout, report = self.run_module(
            "benchmarks.chaos", "--sigstop", "--stop-seconds", "3", "--after", "1", "--quiet",
            "1", "--rate", "50", "--fibonacci", "1", "--testservice", "2",
        )  # fmt: skip
        result = report["embedded"]
        self.assert_no_failure(result["phases"], ["quiet", "stopped", "after"])
        self.assertEqual(result["victim"]["service"], "TestService")  # the one with a sibling
        self.assertEqual(len(result["attempts_to_stopped_per_second"]), 4)
        self.assertEqual(sum(result["attempts_to_stopped_per_second"]),
                         result["attempts_to_stopped"])  # fmt: skip
        self.assertIn("SIGSTOPped for 3 s", stdout)
        self.assertIn("attempts sent to the stopped process while stopped", stdout)


class DiscoveryTests(_Run):
    def check(self, stdout: str, result: dict[str, Any], backend: str) -> None:
        self.assertEqual(result["load"]["failed"], 0, result["load"]["errors"])
        self.assertEqual(len(result["rounds"]), 1)
        self.assertEqual(len(result["rounds"][0]["start"]), 2)
        for key in ("spawn_to_registered_ms", "spawn_to_first_answer_ms",
                    "stop_to_unregistered_ms", "stop_to_last_attempt_ms", "kill_to_removed_ms",
                    "kill_to_last_attempt_ms"):  # fmt: skip
            self.assertEqual(result["summary"][key]["n"], 1 if "spawn" not in key else 2, key)
            self.assertIsNotNone(result["summary"][key]["median"], key)
        self.assertIn(f"{backend}", stdout)
        self.assertIn("clean stop -> last call sent to it", stdout)
        self.assertIn("kill -> removed from the registry (the watch)", stdout)

    def test_embedded(self) -> None:
        stdout, report = self.run_module(
            "benchmarks.discovery", "--rounds", "1", "--rate", "50", "--serve", "0.3"
        )
        self.check(stdout, report["embedded"], "embedded")

    def test_zookeeper(self) -> None:
        from tests.zkserver import ZooKeeperMissing, require_zookeeper

        try:
            require_zookeeper()
        except ZooKeeperMissing as e:
            missing_here(str(e))
        stdout, report = self.run_module(
            "benchmarks.discovery", "--rounds", "1", "--rate", "50", "--serve", "0.3",
            "--backends", "zookeeper", "--zk-session-timeout", "2",
        )  # fmt: skip
        self.check(stdout, report["zookeeper"], "zookeeper, session timeout 2 s")
