"""
The RPC comparison runs, in a tiny configuration, so that it never rots: skynet
and the bare loop for real; the peers' code paths with the fake peer of
L{benchmarks.peers} (standard library only), since Pyro5 and grpcio live in an
environment of their own that the suite does not make.  If that environment
exists (C{python -m benchmarks.compare --setup-peers}), the real peers run
too.  No timing assertions: only that everything measured something and the
report has its shape.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from twisted.trial.unittest import SynchronousTestCase, TestCase

from benchmarks import peers
from benchmarks.compare import DEFAULT_PEERS_VENV, MODES, ensure_peers
from tests.processes import ROOT, child_env, missing_here

TINY = ["--seconds", "0.2", "--processes", "2", "--concurrency", "4", "--connections", "10"]


class CompareRun(TestCase):
    pytestmark = [pytest.mark.slow]
    timeout = 180

    def run_compare(self, *args: str) -> tuple[subprocess.CompletedProcess, dict[str, Any]]:
        directory = tempfile.mkdtemp(prefix="skynet-compare-test-")
        self.addCleanup(shutil.rmtree, directory, True)
        out = Path(directory) / "report.json"
        result = subprocess.run(
            [sys.executable, "-m", "benchmarks.compare", *TINY, *args, "--json", str(out)],
            cwd=ROOT, capture_output=True, text=True, timeout=170, env=child_env(),
        )  # fmt: skip
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        return result, json.loads(out.read_text())

    def check_figures(self, report: dict[str, Any], systems: list[str], payloads: list[int]):
        self.assertEqual(report["systems"], systems)
        for system in systems:
            for mode in MODES:
                for payload in payloads:
                    figures = report["results"][system][mode][str(payload)]
                    self.assertGreater(figures["calls"], 0, (system, mode, payload))
                    self.assertGreater(figures["calls_per_s"], 0)
                    self.assertLessEqual(figures["p50_ms"], figures["p99_ms"])
                    self.assertGreater(figures["client_cpu_us"], 0)
                    self.assertGreaterEqual(figures["server_cpu_us"], 0)
                    self.assertEqual(figures["processes"], 2 if mode == "processes" else 1)
            memory = report["memory"][system]
            self.assertGreater(memory["idle_rss"], 0)
            self.assertEqual(memory["connections"], 10)
            self.assertIsInstance(memory["per_connection"], float)

    def table_row(self, stdout: str, mode: str, payload: str) -> list[str]:
        for line in stdout.splitlines():
            if line.startswith(mode) and f" {payload} " in line and "calls/s" not in line:
                return line.split()
        raise AssertionError(f"no {mode} {payload} row in\n{stdout}")

    def test_skynet_and_bare(self) -> None:
        """
        skynet and the bare loop, two payloads, every mode; the peers asked
        for but without their environment are left out, visibly.
        """
        result, report = self.run_compare(
            "--systems", "skynet,bare,pyro5,grpc", "--payloads", "100,10000",
            "--peers-venv", "/nonexistent/skynet-peers", "--no-peer-setup",
        )  # fmt: skip
        self.check_figures(report, ["skynet", "bare"], [100, 10000])
        self.assertIn("Pyro5: not measured: no usable environment", result.stdout)
        self.assertIn("gRPC: not measured: no usable environment", result.stdout)
        self.assertEqual(set(report["skipped"]), {"pyro5", "grpc"})
        header = next(
            ln for ln in result.stdout.splitlines() if ln.startswith("mode") and "/bare" in ln
        )
        self.assertEqual(header.split(), ["mode", "payload", "skynet", "bare", "/bare"])
        for mode in MODES:
            row = self.table_row(result.stdout, mode, "B")
            # mode, size, unit, skynet, bare, ratio and its verdict
            self.assertEqual(len(row), 7, row)
            self.assertTrue(row[6] == "ok" or row[6] == "<0.5", row)
        self.assertIn("idle RSS, MiB", result.stdout)
        self.assertIn("per idle connection, KiB", result.stdout)

    def test_peer_code_paths_with_the_fake(self) -> None:
        """
        A peer system (its server and clients run by another Python, the
        READY/GO/RESULT exchange, threads for calls in flight) through the
        fake peer.
        """
        result, report = self.run_compare(
            "--systems", "skynet,fake", "--payloads", "100", "--peers-python", sys.executable
        )
        self.check_figures(report, ["skynet", "fake"], [100])
        self.assertEqual(report["results"]["fake"]["concurrent"]["100"]["style"], "threads")
        self.assertEqual(report["results"]["fake"]["sequential"]["100"]["style"], "blocking")
        self.assertIn("/fake", result.stdout)

    def test_raw_limit_and_every_ratio_to_it(self) -> None:
        """
        The raw system (a length and the bytes each way, blocking sockets,
        no codec) is measured in every mode, for a small and a 1 MB payload,
        and a table gives every system's calls/s over raw's in the same row:
        raw's own 1.00, skynet's its figure over raw's.
        """
        result, report = self.run_compare("--systems", "skynet,raw", "--payloads", "100,1000000")
        self.check_figures(report, ["skynet", "raw"], [100, 1000000])
        lines = result.stdout.splitlines()
        start = next(i for i, ln in enumerate(lines) if ln.startswith("calls/s / raw"))
        self.assertEqual(lines[start + 1].split(), ["mode", "payload", "skynet", "raw"])
        rows = lines[start + 2 : start + 2 + 2 * len(MODES)]
        results = report["results"]
        for row in rows:
            mode, size, unit, skynet, raw = row.split()
            payload = "100" if unit == "B" else "1000000"
            self.assertEqual(raw, "1.00", row)
            figures = {s: results[s][mode][payload]["calls_per_s"] for s in ("skynet", "raw")}
            self.assertEqual(skynet, f"{figures['skynet'] / figures['raw']:.2f}", row)

    def test_the_views_system(self) -> None:
        """
        The views system (a service method marked binary_views, a client
        asking for views) runs in every mode at 1 MB beside raw; its client
        checks that the answer's data came as a view and whole, and fails
        the run if not.
        """
        result, report = self.run_compare("--systems", "views,raw", "--payloads", "1000000")
        self.check_figures(report, ["views", "raw"], [1000000])
        row = self.table_row(result.stdout.split("calls/s / raw")[1], "sequential", "MB")
        self.assertEqual(row[-1], "1.00", row)

    def test_rounds_in_turn_and_the_median_kept(self) -> None:
        """
        With --rounds, each figure is measured that many times, the systems
        in turn, and the median round is the one reported (its calls/s
        among the rounds', which the report keeps).
        """
        result, report = self.run_compare("--systems", "skynet,raw", "--payloads", "100",
                                          "--modes", "sequential", "--rounds", "3")  # fmt: skip
        self.assertIn("the median of 3 rounds, systems in turn", result.stdout)
        for system in ("skynet", "raw"):
            figures = report["results"][system]["sequential"]["100"]
            rounds = figures["rounds"]
            self.assertEqual(len(rounds), 3)
            self.assertEqual(figures["calls_per_s"], sorted(rounds)[1])
        progress = [ln.split()[:4] for ln in result.stdout.splitlines() if ln.startswith("  ")]
        self.assertEqual(progress.count(["sequential", "100", "B", "skynet"]), 1)  # one figure

    def test_each_skynet_system_is_reached_alone(self) -> None:
        """
        Every skynet-served system registers an Adder; each has a registry
        of its own, so that its client calls its own server and no other.
        """
        from benchmarks.compare import Server
        from skynet.sync import Client

        directory = Path(tempfile.mkdtemp(prefix="skynet-compare-test-"))
        self.addCleanup(shutil.rmtree, directory, True)
        servers = [
            Server(system, directory, None, connections=10) for system in ("skynet", "views")
        ]
        try:
            ports = set()
            for server in servers:
                with Client(server.target) as client:
                    adder = client.service("Adder")
                    self.assertEqual(adder.call("Add", {"a": 1, "b": 2}, timeout=30)["sum"], 3)
                    instances = [h.instance for h in adder.handles.values()]
                    self.assertEqual(len(instances), 1, server.system)
                    ports.add(instances[0].port)
            self.assertEqual(len(ports), 2)
        finally:
            for server in servers:
                server.stop()

    def test_tracing_cost(self) -> None:
        """
        The notrace system (skynet with span recording off) has its column,
        skynet / notrace, with issue 14's 0.95 goal; and
        L{benchmarks.trace_cost} alternates the two and prints the median
        ratio and the CPU per call of both.
        """
        result, report = self.run_compare("--systems", "skynet,notrace", "--payloads", "100")
        self.check_figures(report, ["skynet", "notrace"], [100])
        header = next(
            ln for ln in result.stdout.splitlines() if ln.startswith("mode") and "/notrace" in ln
        )
        self.assertEqual(header.split(), ["mode", "payload", "skynet", "notrace", "/notrace"])
        row = self.table_row(result.stdout, "concurrent", "B")
        self.assertTrue(row[-1] == "ok" or row[-1] == "<0.95", row)
        cost = subprocess.run(
            [sys.executable, "-m", "benchmarks.trace_cost", "--rounds", "2", "--seconds", "0.2",
             "--payloads", "100", "--concurrency", "4"],
            cwd=ROOT, capture_output=True, text=True, timeout=170, env=child_env(),
        )  # fmt: skip
        self.assertEqual(cost.returncode, 0, cost.stdout + cost.stderr)
        self.assertEqual(cost.stdout.count(" round "), 2, cost.stdout)
        summary = [ln for ln in cost.stdout.splitlines() if "median" in ln]
        self.assertEqual(len(summary), 1, cost.stdout)
        self.assertRegex(summary[0], r"100 B  median \d\.\d{3}  range .* CPU per call [\d.]+ vs")

    def test_busy_polling_gain(self) -> None:
        """
        The nopoll and syncnopoll systems (busy polling off on both sides)
        have their columns, skynet / nopoll and sync / syncnopoll; and
        L{benchmarks.busy_poll} alternates each pair and prints one line per
        pair, mode and payload.
        """
        result, report = self.run_compare(
            "--systems", "skynet,nopoll,sync,syncnopoll", "--payloads", "100"
        )
        self.check_figures(report, ["skynet", "nopoll", "sync", "syncnopoll"], [100])
        header = next(ln for ln in result.stdout.splitlines() if ln.startswith("mode"))
        self.assertEqual(header.split()[-2:], ["skynet/nopoll", "sync/syncnopoll"], header)
        gain = subprocess.run(
            [sys.executable, "-m", "benchmarks.busy_poll", "--rounds", "2", "--seconds", "0.2",
             "--payloads", "100", "--modes", "sequential,concurrent", "--concurrency", "4"],
            cwd=ROOT, capture_output=True, text=True, timeout=170, env=child_env(),
        )  # fmt: skip
        self.assertEqual(gain.returncode, 0, gain.stdout + gain.stderr)
        lines = [ln for ln in gain.stdout.splitlines() if "median ratio" in ln]
        self.assertEqual([ln.split()[:2] for ln in lines],
                         [["skynet", "sequential"], ["sync", "sequential"],
                          ["skynet", "concurrent"], ["sync", "concurrent"]], gain.stdout)  # fmt: skip
        for line in lines:
            self.assertRegex(
                line, r"calls/s, median ratio \d+\.\d\d \(.*CPU per call \d+ vs \d+ us"
            )

    def test_floors(self) -> None:
        """
        L{benchmarks.floors} makes its four sequential rows for real (each
        client checks its answers) and prints calls/s and CPU for each.
        """
        result = subprocess.run(
            [sys.executable, "-m", "benchmarks.floors", "--calls", "50", "--rounds", "2"],
            cwd=ROOT, capture_output=True, text=True, timeout=170, env=child_env(),
        )  # fmt: skip
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        rows = {}
        for line in result.stdout.splitlines():
            m = re.match(r"(.+? -> \w+) +([\d,]+) +([\d.]+)$", line)
            if m:
                rows[m.group(1)] = (float(m.group(2).replace(",", "")), float(m.group(3)))
        self.assertEqual(
            list(rows),
            ["blocking -> bare", "polling -> bare", "connection -> skynet", "sync -> skynet"],
            result.stdout,
        )
        self.assertTrue(all(rate > 0 and cpu > 0 for rate, cpu in rows.values()), rows)

    def test_real_peers_if_installed(self) -> None:
        python, why = ensure_peers(DEFAULT_PEERS_VENV, create=False)
        if python is None:
            missing_here(f"Pyro5 and grpc not set up: {why}")
        result, report = self.run_compare(
            "--systems", "pyro5,grpc", "--payloads", "100", "--peers-python", python
        )
        self.check_figures(report, ["pyro5", "grpc"], [100])


class PeerLoopTests(SynchronousTestCase):
    """
    The measuring loops every peer client uses, on fake calls.
    """

    def test_sequential(self) -> None:
        calls = []
        result = peers.sequential(lambda: calls.append(1), 0.05)
        self.assertEqual(result["calls"], len(calls))
        self.assertEqual(len(result["latencies_us"]), len(calls))
        self.assertGreaterEqual(result["seconds"], 0.05)

    def test_threaded(self) -> None:
        counts = [0, 0, 0]

        def make(i: int) -> Any:
            def call() -> None:
                counts[i] += 1
                time.sleep(0.001)

            return call

        result = peers.threaded([make(i) for i in range(3)], 0.05)
        self.assertEqual(result["calls"], sum(counts))
        self.assertTrue(all(counts), counts)

    def test_threaded_reports_errors(self) -> None:
        def broken() -> None:
            raise ValueError("boom")

        self.assertRaises(ValueError, peers.threaded, [broken], 0.05)

    def test_gathered(self) -> None:
        in_flight = [0, 0]

        async def call() -> None:
            in_flight[0] += 1
            in_flight[1] = max(in_flight[1], in_flight[0])
            await asyncio.sleep(0.001)
            in_flight[0] -= 1

        result = asyncio.run(peers.gathered(call, 0.05, 5))
        self.assertGreater(result["calls"], 0)
        self.assertEqual(in_flight[1], 5)

    def test_fake_peer_asyncio_and_connections(self) -> None:
        """
        The fake peer's server, its asyncio client and its connections
        mode, as processes.
        """
        directory = tempfile.mkdtemp(prefix="skynet-fake-peer-")
        self.addCleanup(shutil.rmtree, directory, True)
        port_file = Path(directory) / "port"
        server = subprocess.Popen([sys.executable, "-m", "benchmarks.peers", "serve", "fake",
                                   str(port_file)], cwd=ROOT, env=child_env())  # fmt: skip
        self.addCleanup(server.wait)
        self.addCleanup(server.kill)
        deadline = time.monotonic() + 30
        while not port_file.exists():
            self.assertLess(time.monotonic(), deadline, "the fake server did not start")
            time.sleep(0.02)
        port = port_file.read_text()
        base = [sys.executable, "-m", "benchmarks.peers", "client", "fake", port]
        for extra, lines in ((["--mode", "concurrent", "--style", "asyncio", "--width", "3"],
                              "GO\n"), (["--mode", "sequential", "--style", "asyncio"], "GO\n"),
                             (["--mode", "connections", "--connections", "4"], "GO\nGO\n")):  # fmt: skip
            done = subprocess.run(base + ["--seconds", "0.1", *extra], input=lines, cwd=ROOT,
                                  capture_output=True, text=True, timeout=60, env=child_env())  # fmt: skip
            self.assertEqual(done.returncode, 0, done.stderr)
            out = done.stdout.splitlines()
            self.assertTrue(out[0] == "READY" and out[-1].startswith("RESULT "), out)
            result = json.loads(out[-1][len("RESULT ") :])
            if "connections" in extra[1]:
                self.assertEqual(result, {"connections": 4})
            else:
                self.assertGreater(result["calls"], 0)
                self.assertEqual(result["style"], "asyncio")
