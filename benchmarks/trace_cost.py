"""
What recording spans costs (issue 14: at most 5 % of calls/s with 64
calls in flight), measured as robustly as a shared machine allows.

    python -m benchmarks.trace_cost [--rounds 7] [--seconds 1] [--payloads 100,10000]

Two C{twistd skynet-service} processes serve L{benchmarks.compare.Adder}:
one records spans (the default), one does not (C{SKYNET_TRACE=0}); their
clients likewise.  The rounds alternate between the two, each a fresh
client process of L{benchmarks.compare} with C{--concurrency} calls in
flight, so that a burst of load elsewhere on the machine falls on both
alike.  It prints, per payload, the calls/s of each round, the median ratio
traced / untraced and its range, and the CPU per call of both sides (client
and service, medians): on a busy machine the calls/s of one round swing with
the load, while the CPU a call costs barely does, so its ratio is the
steadier estimate of what tracing costs a machine that is not shared.

Then, in this process, the same calls through a L{skynet.testing.LocalCluster}
(client and service on in-memory connections: no kernel, no scheduler), with
recording switched on and off between batches of C{--concurrency} calls, and
the best CPU per call of each: the cost of the recording code itself.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.compare import Server, measure, parse_lists


def run(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="skynet-trace-cost-"))
    servers: dict[str, Server] = {}
    report: dict[str, Any] = {}
    try:
        for system in ("skynet", "notrace"):
            servers[system] = Server(system, workdir, None, connections=args.connections)
        for payload in args.payloads:
            rounds: list[dict[str, Any]] = []
            for n in range(args.rounds):
                order = ("skynet", "notrace") if n % 2 == 0 else ("notrace", "skynet")
                figures = {s: measure(servers[s], "concurrent", args, payload) for s in order}
                rounds.append(figures)
                print(f"  {payload:>8} B round {n + 1}: traced "
                      f"{figures['skynet']['calls_per_s']:9,.0f}  untraced "
                      f"{figures['notrace']['calls_per_s']:9,.0f} calls/s", flush=True)  # fmt: skip
            ratios = [r["skynet"]["calls_per_s"] / r["notrace"]["calls_per_s"] for r in rounds]

            def cpu(system: str, rounds: list[dict[str, Any]] = rounds) -> float:
                return statistics.median(
                    r[system]["client_cpu_us"] + r[system]["server_cpu_us"] for r in rounds
                )

            report[str(payload)] = {
                "ratios": ratios,
                "median": statistics.median(ratios),
                "cpu_us_traced": cpu("skynet"),
                "cpu_us_untraced": cpu("notrace"),
            }
    finally:
        for server in servers.values():
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return report


def in_process(
    payloads: list[int], width: int, batches: int = 40, repeat: int = 9
) -> dict[str, Any]:
    """
    CPU microseconds per call with spans recorded and not, per payload: the
    best of C{repeat} alternating runs of C{batches} batches of C{width}
    calls in flight.
    """
    import time

    from benchmarks.compare import Adder
    from skynet.observe import tracing
    from skynet.testing import LocalCluster

    size = tracing.RING.size or 4096
    cluster = LocalCluster()
    cluster.add(Adder())
    service = cluster.client().service("Adder")
    figures: dict[str, Any] = {}
    try:
        for payload in payloads:
            params = {"a": 1, "b": 2, "data": b"x" * payload}
            best = {"on": float("inf"), "off": float("inf")}
            for n in range(repeat * 2):
                mode = "on" if n % 2 == 0 else "off"
                tracing.configure(size if mode == "on" else 0)
                for _ in range(4):  # settle in after the switch
                    [service.call("Add", params) for _ in range(width)]
                    cluster.settle()
                started = time.process_time()
                for _ in range(batches):
                    calls = [service.call("Add", params) for _ in range(width)]
                    cluster.settle()
                    for d in calls:
                        if d.result["sum"] != 3:
                            raise AssertionError(f"Add answered {d.result!r}")
                us = (time.process_time() - started) / (batches * width) * 1e6
                best[mode] = min(best[mode], us)
            figures[str(payload)] = best
    finally:
        tracing.configure(size)
    return figures


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="The cost of recording spans.")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=1.0, help="per figure")
    parser.add_argument("--payloads", default="100,10000")
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args(argv)
    parse_lists(parser, args)
    if args.rounds < 1 or args.seconds <= 0 or args.concurrency < 1:
        parser.error("--rounds, --seconds and --concurrency must be positive")
    # What benchmarks.compare's client command line needs.
    args.connections = 1
    args.processes = 1
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    report = run(args)
    print()
    print(f"{args.concurrency} calls in flight, {args.rounds} rounds of {args.seconds:g} s, "
          "traced / untraced calls/s (issue 14: at least 0.95)")  # fmt: skip
    for payload, r in report.items():
        low, high = min(r["ratios"]), max(r["ratios"])
        extra = r["cpu_us_traced"] / r["cpu_us_untraced"] - 1
        print(f"  {int(payload):>8} B  median {r['median']:.3f}  range {low:.3f}-{high:.3f}  "
              f"CPU per call {r['cpu_us_traced']:.1f} vs {r['cpu_us_untraced']:.1f} us "
              f"({extra:+.1%})")  # fmt: skip
    print()
    print("in one process (LocalCluster, no kernel): best CPU per call, recording on / off")
    for payload, best in in_process(args.payloads, args.concurrency).items():
        print(f"  {int(payload):>8} B  {best['on']:.2f} / {best['off']:.2f} us "
              f"({best['on'] / best['off'] - 1:+.1%})")  # fmt: skip


if __name__ == "__main__":
    main()
