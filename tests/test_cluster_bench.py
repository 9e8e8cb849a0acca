"""
A tiny run of C{benchmarks/heal.py} (the embedded registry, one round of
each, a rolling upgrade of 2), so that the benchmark never rots: its figures
are printed, not asserted on; its failed-call counts must be 0.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.processes import ROOT, child_env

pytestmark = pytest.mark.slow


def test_heal_benchmark_tiny_run(tmp_path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.heal", "--backends", "embedded", "--rounds", "1",
         "--leader-rounds", "1", "--upgrade", "2", "--rate", "100", "--json"],
        cwd=ROOT, env=child_env(SKYNET_HOME=str(tmp_path)), capture_output=True, text=True,
        timeout=400,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    [run] = json.loads(result.stdout)
    print(run, file=sys.stderr)
    assert run["backend"] == "embedded"
    assert run["host_death_failed"] == 0 and run["host_death_calls"] > 0
    assert run["leader_death_failed"] == 0
    assert run["upgrade"]["instances"] == 2 and run["upgrade"]["failed"] == 0
    assert run["upgrade"]["fewest_registered"] >= 2
    assert len(run["host_death_s"]["rounds"]) == 1
