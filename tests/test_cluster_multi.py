"""
The C{make cluster-multi} demo, as an operator runs it (C{--once}): three
daemons on 127.0.0.2-4, C{examples/cluster.toml} applied, one per host, a
host killed and healed, the host back and exactly one per host again.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.processes import ROOT, child_env

pytestmark = pytest.mark.slow


def test_cluster_multi_demo(tmp_path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "examples.cluster_multi", "--once"],
        cwd=ROOT, env=child_env(SKYNET_HOME=str(tmp_path)), capture_output=True, text=True,
        timeout=400,
    )  # fmt: skip
    out = result.stdout
    assert result.returncode == 0, out + result.stderr[-3000:]
    assert "+ Fibonacci: 3 x examples.fibonacci:Fibonacci (spread host)" in out
    assert re.search(r"^Fibonacci\s+ok\s+3\s+3\s+0\s+0\s+127\.0\.0\.2=1 127\.0\.0\.3=1 "
                     r"127\.0\.0\.4=1$", out, re.M), out  # fmt: skip
    assert re.search(r"^TestService\s+ok\s+2\s+2\s", out, re.M), out
    healed = re.search(r"3 Fibonacci registered again after [\d.]+ s: (\{.*\})", out)
    assert healed and "127.0.0.4" not in healed.group(1), out
    assert "Fibonacci.Index(60) = 1548008755920" in out
    assert "Fibonacci per host: {'127.0.0.2': 1, '127.0.0.3': 1, '127.0.0.4': 1}" in out
    assert out.rstrip().endswith("stopped.")
