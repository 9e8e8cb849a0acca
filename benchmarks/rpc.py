"""
RPC benchmark: the Python client against a Python service on loopback.

    python -m benchmarks.rpc [--seconds 5] [--concurrency 64]

Starts C{twistd -n skynet-service} with L{benchmarks.adder.Adder} on a fresh
embedded registry, calls C{Add {"a": 1, "b": 2}} through discovery, and
prints sequential calls/s with p50/p99 latency, then calls/s with
C{--concurrency} calls in flight from this one process.  The same two
measurements of a bare Twisted BSON request/response loop (L{benchmarks.bare})
give the floor of the design, and the service's RSS is printed too.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.task import deferLater, react

ROOT = Path(__file__).resolve().parent.parent


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def sequential(call: Callable[[], Deferred], seconds: float) -> dict[str, float]:
    latencies = []
    clock = time.perf_counter
    end = clock() + seconds
    while True:
        started = clock()
        if started > end:
            break
        await call()
        latencies.append(clock() - started)
    total = sum(latencies)
    return {
        "calls/s": len(latencies) / total,
        "p50 ms": percentile(latencies, 0.5) * 1e3,
        "p99 ms": percentile(latencies, 0.99) * 1e3,
    }


async def concurrent(call: Callable[[], Deferred], seconds: float, width: int,
                     server: "psutil.Process | None" = None) -> dict[str, float]:  # fmt: skip
    done = 0
    clock = time.perf_counter
    end = clock() + seconds
    cpu = time.process_time()
    server_cpu = _cpu(server)

    async def worker() -> None:
        nonlocal done
        while clock() < end:
            await call()
            done += 1

    started = clock()
    await DeferredList([ensureDeferred(worker()) for _ in range(width)], fireOnOneErrback=True)
    return {
        "calls/s": done / (clock() - started),
        "client us/call": (time.process_time() - cpu) / done * 1e6,
        "server us/call": (_cpu(server) - server_cpu) / done * 1e6,
    }


def _cpu(process: "psutil.Process | None") -> float:
    if process is None:
        return 0.0
    times = process.cpu_times()
    return times.user + times.system


def twistd() -> str:
    return str(Path(sys.executable).parent / "twistd")


async def wait_file(path: Path, reactor: Any) -> str:
    for _ in range(200):
        if path.exists() and path.read_text():
            return path.read_text()
        await deferLater(reactor, 0.05, lambda: None)
    raise RuntimeError(f"{path} never appeared")


async def bench_skynet(
    reactor: Any, args: argparse.Namespace, env: dict[str, str] | None = None
) -> dict[str, Any]:
    from skynet.client import Client
    from skynet.registry import registry_from_url

    root = tempfile.mkdtemp(prefix="skynet-bench-")
    url = f"file://{root}"
    service = subprocess.Popen(
        [twistd(), "-n", "--pidfile=", "skynet-service", "--service", "benchmarks.adder:Adder",
         "--registry", url, "--listen", "tcp:0:interface=127.0.0.1"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip
    registry = registry_from_url(url, reactor=reactor)
    await registry.start()
    client = Client(registry=registry, reactor=reactor)
    adder = client.service("Adder")
    params = {"a": 1, "b": 2}
    try:
        result = await adder.call("Add", params, timeout=30)
        assert result == {"sum": 3}, result
        rss_idle = psutil.Process(service.pid).memory_info().rss
        call = lambda: adder.call("Add", params)  # noqa: E731
        await sequential(call, min(1.0, args.seconds))  # warm up
        seq = await sequential(call, args.seconds)
        conc = await concurrent(call, args.seconds, args.concurrency, psutil.Process(service.pid))
        rss_busy = psutil.Process(service.pid).memory_info().rss
    finally:
        await client.stop()
        await registry.stop()
        service.terminate()
        service.wait(10)
    return {"sequential": seq, "concurrent": conc, "rss_idle": rss_idle, "rss_busy": rss_busy}


async def bench_bare(reactor: Any, args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.bare import BareClient

    port_file = Path(tempfile.mkdtemp(prefix="skynet-bare-")) / "port"
    server = subprocess.Popen([sys.executable, "-m", "benchmarks.bare", str(port_file)], cwd=ROOT)
    try:
        port = int(await wait_file(port_file, reactor))
        client = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port),
                                       BareClient())  # fmt: skip
        call = lambda: client.call(1, 2)  # noqa: E731
        await sequential(call, min(1.0, args.seconds))
        seq = await sequential(call, args.seconds)
        conc = await concurrent(call, args.seconds, args.concurrency, psutil.Process(server.pid))
        client.transport.loseConnection()
    finally:
        server.terminate()
        server.wait(10)
    return {"sequential": seq, "concurrent": conc}


async def trace_compare(reactor: Any, args: argparse.Namespace) -> None:
    """
    Calls/s at C{--concurrency} in flight with spans off and on (client and
    service both), alternating in one run, C{--trace-compare} rounds.
    """
    from skynet.observe import tracing

    size = tracing.RING.size or 4096
    print(f"spans off/on, {args.concurrency} in flight, {args.seconds}s per figure")
    for round_ in range(args.trace_compare):
        figures = {}
        for mode in ("off", "on"):
            tracing.configure(size if mode == "on" else 0)
            env = dict(os.environ, SKYNET_TRACE="1" if mode == "on" else "0")
            figures[mode] = (await bench_skynet(reactor, args, env))["concurrent"]
        off, on = figures["off"], figures["on"]
        print(f"round {round_ + 1}: off {off['calls/s']:.0f} calls/s "
              f"({off['client us/call']:.1f} + {off['server us/call']:.1f} us/call), "
              f"on {on['calls/s']:.0f} calls/s "
              f"({on['client us/call']:.1f} + {on['server us/call']:.1f} us/call): "
              f"{(on['calls/s'] / off['calls/s'] - 1) * 100:+.1f} %")  # fmt: skip


async def main(reactor: Any, args: argparse.Namespace) -> None:
    if args.trace_compare:
        await trace_compare(reactor, args)
        return
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores, {args.seconds}s per figure, "
          f"{args.concurrency} in flight")  # fmt: skip
    sky = await bench_skynet(reactor, args)
    bare = await bench_bare(reactor, args)
    rows = [("skynet (client -> service, via registry)", sky), ("bare Twisted BSON loop", bare)]
    print(f"{'':42} {'seq calls/s':>11} {'p50 ms':>7} {'p99 ms':>7} "
          f"{'conc calls/s':>12} {'client us':>9} {'server us':>9}")  # fmt: skip
    for label, r in rows:
        s, c = r["sequential"], r["concurrent"]
        print(f"{label:42} {s['calls/s']:11.0f} {s['p50 ms']:7.3f} {s['p99 ms']:7.3f} "
              f"{c['calls/s']:12.0f} {c['client us/call']:9.1f} {c['server us/call']:9.1f}")  # fmt: skip
    print("(client us / server us: CPU microseconds per call, concurrent phase)")
    print(f"skynet / bare: sequential {sky['sequential']['calls/s'] / bare['sequential']['calls/s']:.2f}, "
          f"concurrent {sky['concurrent']['calls/s'] / bare['concurrent']['calls/s']:.2f}")  # fmt: skip
    print(f"service RSS: idle {sky['rss_idle'] / 2**20:.1f} MiB, "
          f"after load {sky['rss_busy'] / 2**20:.1f} MiB")  # fmt: skip


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--trace-compare", type=int, default=0, metavar="ROUNDS",
                        help="only calls/s with spans off and on ($SKYNET_TRACE), ROUNDS times")  # fmt: skip
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = parse(sys.argv[1:])
    react(lambda reactor: ensureDeferred(main(reactor, arguments)))
