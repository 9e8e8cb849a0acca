"""
TLS benchmark: service calls over mutual TLS against plain TCP, same run.

    python -m benchmarks.tls [--seconds 5] [--concurrency 64] [--connections 200]

Makes a cluster CA (C{skynet.tls}), starts two C{twistd -n skynet-service}
with L{benchmarks.adder.Adder} on one embedded registry, one plain
(C{Adder}) and one with C{--tls} (C{AdderTLS}), and calls C{Add} on each
through discovery from this one process: sequential calls/s with p50/p99,
then calls/s with C{--concurrency} in flight.  Then the cost of setting up
a connection: C{--connections} fresh connections (TCP, the TLS handshake
with certificates both ways, the skynet handshake) to each, one after the
other.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import deferLater, react

from benchmarks.rpc import concurrent, percentile, sequential, twistd

ROOT = Path(__file__).resolve().parent.parent


async def _instance(registry: Any, name: str, reactor: Any) -> Any:
    from skynet.registry import Query

    for _ in range(400):
        found = await registry.query(Query(service=name, registered=True))
        if found:
            return found[0]
        await deferLater(reactor, 0.05, lambda: None)
    raise RuntimeError(f"{name} never registered")


async def setup_cost(client: Any, instance: Any, count: int) -> dict[str, float]:
    """
    C{count} fresh connections, each closed once its skynet handshake is
    done.
    """
    times = []
    for _ in range(count):
        started = time.perf_counter()
        protocol = await client.connector(instance)
        times.append(time.perf_counter() - started)
        protocol.closed_by_us = True
        protocol.close_connection()
    return {"mean ms": sum(times) / len(times) * 1e3, "p50 ms": percentile(times, 0.5) * 1e3,
            "p99 ms": percentile(times, 0.99) * 1e3}  # fmt: skip


async def run(reactor: Any, args: argparse.Namespace) -> dict[str, Any]:
    from skynet import tls
    from skynet.client import Client
    from skynet.registry import registry_from_url

    root = tempfile.mkdtemp(prefix="skynet-bench-tls-")
    tls_dir = os.path.join(root, "tls")
    tls.init_cluster(tls_dir)
    tls.set_client_identity(tls.load_credentials(os.path.join(tls_dir, "operator")))
    url = f"file://{root}/registry"
    env = {**os.environ, "SKYNET_HOME": root}
    common = ["-n", "--pidfile=", "skynet-service", "--service", "benchmarks.adder:Adder",
              "--registry", url, "--listen", "tcp:0:interface=127.0.0.1"]  # fmt: skip
    servers = {
        "plain": subprocess.Popen([twistd(), *common], cwd=ROOT, env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT),
        "tls": subprocess.Popen([twistd(), *common, "--name", "AdderTLS", "--tls", tls_dir],
                                cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.STDOUT),
    }  # fmt: skip
    registry = registry_from_url(url, reactor=reactor)
    await registry.start()
    client = Client(registry=registry, reactor=reactor)
    results: dict[str, Any] = {}
    params = {"a": 1, "b": 2}
    try:
        for label, name in (("plain", "Adder"), ("tls", "AdderTLS")):
            instance = await _instance(registry, name, reactor)
            assert bool(instance.extra.get("TLS")) == (label == "tls"), instance.extra
            service = client.service(name)
            assert await service.call("Add", params, timeout=30) == {"sum": 3}
            call = lambda service=service: service.call("Add", params)  # noqa: E731
            await sequential(call, min(1.0, args.seconds))  # warm up
            results[label] = {
                "sequential": await sequential(call, args.seconds),
                "concurrent": await concurrent(
                    call, args.seconds, args.concurrency, psutil.Process(servers[label].pid)
                ),  # fmt: skip
                "setup": await setup_cost(client, instance, args.connections),
            }
    finally:
        await client.stop()
        await registry.stop()
        for server in servers.values():
            server.terminate()
            server.wait(10)
    return results


def report(results: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [
        f"python {sys.version.split()[0]}, {os.cpu_count()} cores, {args.seconds}s per figure, "
        f"{args.concurrency} in flight, {args.connections} connections",
        f"{'':6} {'seq calls/s':>11} {'p50 ms':>7} {'p99 ms':>7} {'conc calls/s':>12} "
        f"{'client us':>9} {'server us':>9} {'connect ms':>10} {'p99':>6}",
    ]
    for label in ("plain", "tls"):
        r = results[label]
        s, c, u = r["sequential"], r["concurrent"], r["setup"]
        lines.append(
            f"{label:6} {s['calls/s']:11.0f} {s['p50 ms']:7.3f} {s['p99 ms']:7.3f} "
            f"{c['calls/s']:12.0f} {c['client us/call']:9.1f} {c['server us/call']:9.1f} "
            f"{u['mean ms']:10.2f} {u['p99 ms']:6.2f}"
        )
    plain, secure = results["plain"], results["tls"]
    lines.append(
        f"tls / plain: sequential "
        f"{secure['sequential']['calls/s'] / plain['sequential']['calls/s']:.2f}, "
        f"{args.concurrency} in flight "
        f"{secure['concurrent']['calls/s'] / plain['concurrent']['calls/s']:.2f}; "
        f"connection set-up {secure['setup']['mean ms'] - plain['setup']['mean ms']:+.2f} ms"
    )
    return "\n".join(lines)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--connections", type=int, default=200)
    return parser.parse_args(argv)


async def main(reactor: Any, args: argparse.Namespace) -> None:
    print(report(await run(reactor, args), args))


if __name__ == "__main__":
    arguments = parse(sys.argv[1:])
    react(lambda reactor: ensureDeferred(main(reactor, arguments)))
