"""
How fast the cluster heals (issue 16): three real daemons on loopback hosts
127.0.0.2-4 (every daemon campaigns; the leader reconciles), a bounded load
of Fibonacci calls, and on each registry backend:

  - host death: C{kill -9} of a host's daemon and children, time until
    every instance is registered again on the survivors (median and max of
    C{--rounds}); the host is restarted and settles between rounds;
  - leader death: C{kill -9} of the leading daemon's host, time until the
    next placement (a new instance registered elsewhere);
  - a rolling upgrade of C{--upgrade} instances (a new C{version}): its
    duration, and the fewest registered seen meanwhile;

with the calls failed during each (must be 0).

    python -m benchmarks.heal [--backends embedded,zookeeper] [--rounds 5]
        [--upgrade 10] [--rate 250] [--json]

ZooKeeper is a one-server ensemble of C{tests.zkserver} with 2 s sessions:
a killed host's nodes go when its session expires.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

from twisted.internet.defer import ensureDeferred
from twisted.internet.task import react
from twisted.internet.threads import deferToThread

from skynet.client import Client
from skynet.cluster.commands import read_statuses, run_command
from skynet.registry import Query, registry_from_url
from tests.processes import sleep, wait_for
from tests.test_cluster_hosts import HOSTS, Host, kill_strays, paced_load

APPLY = """
[services.Fibonacci]
run = "examples.fibonacci:Fibonacci"
instances = {instances}
args = ["--stats-interval", "0.5"]
version = "{version}"
"""


class Bench:
    """
    One backend's cluster: its registry, three hosts, a client.
    """

    def __init__(self, reactor: Any, url: str, root: str, rate: float) -> None:
        self.reactor = reactor
        self.url = url
        self.root = root
        self.rate = rate
        self.registry = registry_from_url(url, reactor)
        self.hosts: dict[str, Host] = {}
        self.client: Client | None = None

    async def start(self) -> None:
        await self.registry.start()
        self.client = Client(registry=self.registry, reactor=self.reactor)
        self.hosts = {a: Host(self.root, a, self.url).start() for a in HOSTS}

        async def up() -> bool:
            found = await self.registry.query(Query(service="SkynetDaemon", registered=True))
            return len({i.host for i in found}) == 3

        await wait_for(up, timeout=90, what="3 daemons")

    async def stop(self) -> None:
        for host in self.hosts.values():
            await deferToThread(host.stop)
        if self.client is not None:
            await self.client.stop()
        await self.registry.stop()

    async def command(self, *argv: str) -> str:
        out, err = io.StringIO(), io.StringIO()
        code = await run_command(list(argv), self.registry, out, err, reactor=self.reactor)
        if code != 0:
            raise RuntimeError(f"{' '.join(argv)}: {err.getvalue()}")
        return out.getvalue()

    async def apply(self, instances: int, version: str = "1") -> None:
        path = os.path.join(self.root, "cluster.toml")
        with open(path, "w") as f:
            f.write(APPLY.format(instances=instances, version=version))
        await self.command("apply", path)

    async def registered(self) -> list[Any]:
        return await self.registry.query(Query(service="Fibonacci", registered=True))

    async def per_host(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for i in await self.registered():
            counts[i.host] = counts.get(i.host, 0) + 1
        return counts

    async def settled(self, wanted: dict[str, int] | int, timeout: float = 120.0) -> None:
        async def placed() -> bool:
            if isinstance(wanted, int):
                return len(await self.registered()) == wanted
            return await self.per_host() == wanted

        await wait_for(placed, timeout=timeout, what=f"placement {wanted}")
        statuses: list[Any] = []

        async def ok() -> bool:
            statuses[:] = (await read_statuses(self.registry))[0]
            return all(s.state == "ok" for s in statuses)

        await wait_for(ok, timeout=timeout, what="every deployment ok")

    async def leader(self) -> Host:
        found: list[Host] = []

        async def led() -> bool:
            holder = (await read_statuses(self.registry))[2]
            if not holder or " pid " not in holder:
                return False
            pid = int(holder.rsplit(" pid ", 1)[1].split()[0])
            found[:] = [h for h in self.hosts.values()
                        if h.popen is not None and h.popen.pid == pid and h.popen.poll() is None]  # fmt: skip
            return bool(found)

        await wait_for(led, timeout=60, interval=0.02, what="a leader")
        return found[0]

    def load(self) -> tuple[Any, dict[str, Any]]:
        assert self.client is not None
        return paced_load(self.client.service("Fibonacci"), seconds=600.0, rate=self.rate)

    async def host_death(self, leader: bool) -> dict[str, Any]:
        """
        One round: melt a host (the leader's, or another), time the heal,
        bring the host back and let it settle.
        """
        spread = dict.fromkeys(HOSTS, 1)
        await self.settled(spread)
        chief = await self.leader()
        victim = chief if leader else next(h for h in self.hosts.values() if h is not chief)
        before = {i.uuid for i in await self.registered()}
        callers, results = self.load()
        await sleep(1.0)
        killed = time.monotonic()
        await deferToThread(victim.melt)
        first: list[float] = []

        async def healed() -> bool:
            found = await self.registered()
            if not first and {i.uuid for i in found} - before:
                first.append(time.monotonic() - killed)
            hosts = {i.host for i in found}
            return victim.address not in hosts and len(found) == 3

        await wait_for(healed, timeout=120, interval=0.02, what="3 on the survivors")
        took = time.monotonic() - killed
        results["stop"] = True
        await callers
        victim.start()
        await self.settled(spread)
        return {"seconds": took, "first_placement": first[0] if first else took,
                "calls": results["ok"], "failed": len(results["failed"])}  # fmt: skip

    async def upgrade(self, instances: int) -> dict[str, Any]:
        await self.apply(instances)
        await self.settled(instances)
        counts: list[int] = []
        running = [True]

        async def count() -> None:
            while running[0]:
                counts.append(len(await self.registered()))
                await sleep(0.05)

        counting = ensureDeferred(count())
        callers, results = self.load()
        await sleep(1.0)
        started = time.monotonic()
        await self.apply(instances, version="2")

        async def done() -> bool:
            found = await self.registered()
            statuses = (await read_statuses(self.registry))[0]
            return (
                len(found) == instances
                and all(i.version == "2" for i in found)
                and all(s.state == "ok" for s in statuses)
            )

        await wait_for(done, timeout=300, interval=0.1, what="the rollout done")
        took = time.monotonic() - started
        results["stop"] = True
        running[0] = False
        await callers
        await counting
        return {"instances": instances, "seconds": took, "fewest_registered": min(counts),
                "calls": results["ok"], "failed": len(results["failed"])}  # fmt: skip


async def measure(reactor: Any, backend: str, args: argparse.Namespace) -> dict[str, Any]:
    root = tempfile.mkdtemp(prefix=f"skynet-bench-heal-{backend}-")
    zookeeper = None
    try:
        if backend == "zookeeper":
            from tests.zkserver import ZooKeeperCluster

            zookeeper = ZooKeeperCluster(size=1).start()
            url = zookeeper.url("/bench-heal", session_timeout=2)
        else:
            url = "file://" + os.path.join(root, "registry")
        bench = Bench(reactor, url, root, args.rate)
        await bench.start()
        try:
            await bench.apply(3)
            deaths = [await bench.host_death(leader=False) for _ in range(args.rounds)]
            leaders = [await bench.host_death(leader=True) for _ in range(args.leader_rounds)]
            upgrade = await bench.upgrade(args.upgrade)
        finally:
            await bench.stop()
        heal = [d["seconds"] for d in deaths]
        placement = [d["first_placement"] for d in leaders]
        return {
            "backend": backend,
            "host_death_s": {
                "median": statistics.median(heal),
                "max": max(heal),
                "rounds": heal,
            },  # fmt: skip
            "host_death_failed": sum(d["failed"] for d in deaths),
            "host_death_calls": sum(d["calls"] for d in deaths),
            "leader_death_to_placement_s": {
                "median": statistics.median(placement),
                "max": max(placement),
                "rounds": placement,
            },  # fmt: skip
            "leader_death_failed": sum(d["failed"] for d in leaders),
            "upgrade": upgrade,
        }
    finally:
        kill_strays(root)
        if zookeeper is not None:
            zookeeper.close()
        shutil.rmtree(root, ignore_errors=True)


def report(result: dict[str, Any]) -> str:
    h, p, u = result["host_death_s"], result["leader_death_to_placement_s"], result["upgrade"]
    return (
        f"{result['backend']}: host death -> all registered again in median {h['median']:.2f}s,"
        f" max {h['max']:.2f}s ({len(h['rounds'])} rounds; {result['host_death_failed']} of "
        f"{result['host_death_calls']} calls failed); leader death -> next placement median "
        f"{p['median']:.2f}s, max {p['max']:.2f}s ({result['leader_death_failed']} failed); "
        f"rolling upgrade of {u['instances']}: {u['seconds']:.1f}s, never fewer than "
        f"{u['fewest_registered']} registered, {u['failed']} of {u['calls']} calls failed"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.heal", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--backends", default="embedded,zookeeper")
    parser.add_argument("--rounds", type=int, default=5, help="host deaths per backend")
    parser.add_argument("--leader-rounds", type=int, default=3, help="leader deaths per backend")
    parser.add_argument("--upgrade", type=int, default=10, help="instances rolled")
    parser.add_argument("--rate", type=float, default=250.0, help="calls per second")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    for b in backends:
        if b not in ("embedded", "zookeeper"):
            parser.error(f"unknown backend {b!r} (embedded, zookeeper)")
    if args.rounds < 1 or args.leader_rounds < 1 or args.upgrade < 1:
        parser.error("--rounds, --leader-rounds and --upgrade must be at least 1")
    args.backends = backends
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)

    async def run(reactor: Any) -> None:
        results = []
        for backend in args.backends:
            result = await measure(reactor, backend, args)
            results.append(result)
            if not args.json:
                print(report(result), flush=True)
        if args.json:
            json.dump(results, sys.stdout, indent=1)
            sys.stdout.write("\n")
        failed = sum(r["host_death_failed"] + r["leader_death_failed"] + r["upgrade"]["failed"]
                     for r in results)  # fmt: skip
        if failed:
            raise SystemExit(f"{failed} calls failed")

    react(lambda reactor: ensureDeferred(run(reactor)))


if __name__ == "__main__":
    main()
