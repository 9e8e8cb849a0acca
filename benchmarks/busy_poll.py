"""
What busy polling (L{skynet.busypoll}, and L{skynet.sync}'s C{spin})
gains and costs, measured as robustly as a shared machine allows.

    python -m benchmarks.busy_poll [--rounds 5] [--seconds 1]
        [--modes sequential,concurrent,processes] [--payloads 100,10000]

Four C{twistd skynet-service} processes serve L{benchmarks.compare.Adder}:
C{skynet} and C{sync} as shipped, C{nopoll} and C{syncnopoll} with
C{SKYNET_BUSY_POLL=0} (and their clients with C{busy_poll=0} and
C{spin=0}).  Rounds alternate the order of each pair, so that load elsewhere
on the machine falls on both alike.  Per mode and payload it prints the
median ratio of calls/s, polling / not, with its range, and the median CPU
per call (client + service) of both.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.compare import MODES, NO_POLL, Server, measure, parse_lists, size_label


def run(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="skynet-busy-poll-"))
    servers: dict[str, Server] = {}
    report: dict[str, Any] = {}
    try:
        for off, on in NO_POLL.items():
            for system in (on, off):
                servers[system] = Server(system, workdir, None, connections=1)
        for payload in args.payloads:
            for mode in args.modes:
                for off, on in NO_POLL.items():
                    rounds = []
                    for n in range(args.rounds):
                        order = (on, off) if n % 2 == 0 else (off, on)
                        rounds.append({s: measure(servers[s], mode, args, payload) for s in order})
                    ratios = [r[on]["calls_per_s"] / r[off]["calls_per_s"] for r in rounds]

                    def cpu(system: str, rounds: list[dict[str, Any]] = rounds) -> float:
                        return statistics.median(
                            r[system]["client_cpu_us"] + r[system]["server_cpu_us"] for r in rounds
                        )

                    figure = {
                        "ratios": ratios,
                        "median": statistics.median(ratios),
                        "calls_per_s": statistics.median(r[on]["calls_per_s"] for r in rounds),
                        "calls_per_s_off": statistics.median(r[off]["calls_per_s"] for r in rounds),
                        "cpu_us": cpu(on),
                        "cpu_us_off": cpu(off),
                    }
                    report[f"{on} {mode} {payload}"] = figure
                    print(f"  {on:6} {mode:10} {size_label(payload):>6}: "
                          f"{figure['calls_per_s']:9,.0f} vs {figure['calls_per_s_off']:9,.0f} "
                          f"calls/s, median ratio {figure['median']:.2f} "
                          f"({min(ratios):.2f}-{max(ratios):.2f}), CPU per call "
                          f"{figure['cpu_us']:.0f} vs {figure['cpu_us_off']:.0f} us",
                          flush=True)  # fmt: skip
    finally:
        for server in servers.values():
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return report


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="What busy polling gains and costs.")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=1.0, help="per figure")
    parser.add_argument("--payloads", default="100,10000")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--processes", type=int, default=8)
    args = parser.parse_args(argv)
    parse_lists(parser, args)
    if args.rounds < 1 or args.seconds <= 0 or args.concurrency < 1 or args.processes < 1:
        parser.error("--rounds, --seconds, --concurrency and --processes must be positive")
    args.connections = 1  # what benchmarks.compare's client command line needs
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    print(f"{args.rounds} rounds of {args.seconds:g} s per figure; concurrent = "
          f"{args.concurrency} in flight, processes = {args.processes} sequential clients")  # fmt: skip
    run(args)


if __name__ == "__main__":
    main()
