"""
Tests for L{benchmarks.wire}, the codec micro benchmark: it measures the
operations of a real call (checked here against pymongo's reading of the
bytes), runs tiny, and (slow) its in-process per-call figure works.  Its
C{--build} (a mypyc-compiled copy) needs mypy, gcc and Python's headers,
which the test environment does not install for an experiment that is not
shipped; it is not run here (docs/benchmarks.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import bson
import pytest
from twisted.trial.unittest import SynchronousTestCase

from benchmarks import wire

ROOT = Path(__file__).resolve().parent.parent


def split(frame: bytes) -> tuple[dict, dict]:
    """
    The header and body documents of a request or response's bytes.
    """
    n = int.from_bytes(frame[:4], "little")
    return bson.decode(frame[:n]), bson.decode(frame[n:])


class OperationsTests(SynchronousTestCase):
    """
    The benchmarked operations make and read the documents of one
    C{Adder.Add} call, for small documents (pymongo's encoder) and large
    ones (L{skynet._wire.encode_parts}).
    """

    def setUp(self) -> None:
        self.pure, self.loaded = wire.load_modules(None)

    def test_pure_is_the_source(self) -> None:
        """
        The pure module is loaded from C{_wire.py} under a name of its own,
        apart from the imported one.
        """
        self.assertTrue(self.pure.__file__.endswith("_wire.py"))
        self.assertFalse(wire.is_compiled(self.pure))
        self.assertIsNot(self.pure, self.loaded)
        self.assertIsNot(self.pure.ServerLayout, self.loaded.ServerLayout)

    def test_request_and_response(self) -> None:
        for payload in (100, 40000):
            data = b"x" * payload
            ops = wire.operations(self.pure, payload)
            header, body = split(ops["request encode"]())
            self.assertEqual(header, {"servicemethod": "Adder.Forward", "seq": 7})
            self.assertEqual(body["method"], "Add")
            self.assertEqual(body["clientid"], "client-1")
            self.assertEqual(bson.decode(body["in"]), {"a": 1, "b": 2, "data": data})
            header, body = split(ops["response encode"]())
            self.assertEqual(header, {"servicemethod": "Adder.Forward", "seq": 7, "error": ""})
            self.assertEqual(body["errstring"], "")
            self.assertEqual(bson.decode(body["out"]), {"sum": 3, "data": data})
            seq, out = ops["response parse"]()
            self.assertEqual((seq, bson.decode(out)), (7, {"sum": 3, "data": data}))
            forward_seq, span = ops["request parse"]()
            self.assertEqual((forward_seq, span[:3]), (7, ("Add", wire.Info.request_id, 0)))
            self.assertEqual(
                ops["general decode"](),
                (("Adder.Forward", 7, None), (body["out"], "")),
            )

    def test_tiny_run(self) -> None:
        """
        A run gives a figure for every operation and payload, and a table
        row for each.
        """
        args = wire.parse(["--payloads", "100,40000", "--repeat", "1", "--round", "0.001"])
        report = wire.run(args)
        pure = report["figures"]["pure"]
        self.assertEqual(set(pure), {"100", "40000"})
        for figures in pure.values():
            self.assertEqual(set(figures), set(wire.OPS))
            self.assertTrue(all(us > 0 for us in figures.values()), figures)
        rows = wire.table(report).splitlines()
        for op in wire.OPS:
            self.assertEqual(sum(1 for row in rows if row.startswith(op)), 2, op)


@pytest.mark.slow
class ProcessTests(SynchronousTestCase):
    """
    The parts that start processes: the in-process per-call figure (a
    worker process per figure) and the mypyc build.
    """

    def run_wire(self, *args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "benchmarks.wire", *args],
            cwd=ROOT,
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
            capture_output=True,
            text=True,
            timeout=240,
        )
        self.assertEqual(done.returncode, 0, done.stderr[-3000:])
        return done.stdout

    def test_e2e_worker_pure(self) -> None:
        """
        The pure worker calls C{Adder.Add} through a L{LocalCluster} with
        the source module, even where a compiled one would be found.
        """
        out = json.loads(
            self.run_wire("--e2e-worker", "pure", "--payloads", "100,40000", "--calls", "30")
        )
        self.assertTrue(out["loaded"].endswith("_wire.py"), out)
        self.assertEqual(set(out["figures"]), {"100", "40000"})
        self.assertTrue(all(us > 0 for us in out["figures"].values()), out)
