"""
Registry scale simulation: what instances and watching clients cost a real
ZooKeeper, measured on this machine and extrapolated (see docs/scale.md).

    python -m benchmarks.registry_scale [--instances 20000] [--services 400]
        [--clients 40] [--changes 200] [--seconds 120] [--zk HOSTS] [--json FILE]

Steps, each bounded by what is left of C{--seconds}:

  1. C{--instances} instance nodes (Go-shaped JSON, as skynet writes them)
     across C{--services} services are created in transactions by one plain
     kazoo client: the server's node count, data size and RSS before and
     after give bytes per node.
  2. C{--clients} watching clients (each a ZooKeeperRegistry with its own
     session, as each skynet client process has) watch one service each:
     the server's watch count and RSS give bytes per watch; the clients'
     RSS growth gives bytes per watched instance in a client.
  3. One client watches everything: its snapshot time and memory.
  4. C{--changes} updates of watched instances, one at a time: the time
     from the write to the last watching client's event (fan-out), and the
     server's CPU time per notification.

ZooKeeper is a standalone server of its own (Debian's package, through
C{tests.zkserver}) unless C{--zk} names one; the simulation works in a
chroot of its own and deletes it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import attr
import psutil
from kazoo.client import KazooClient
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred
from twisted.internet.task import deferLater, react
from zope.interface import implementer

from benchmarks.backends import delete_tree
from skynet.registry.base import IInstanceListener, Instance, Query
from skynet.registry.zookeeper import ZooKeeperRegistry

ROOT = Path(__file__).resolve().parent.parent


def make_instance(index: int, services: int, registered: bool = True) -> Instance:
    return Instance(
        uuid=f"sim-{index}",
        name=f"S{index % services}",
        version="1",
        region="Sim",
        host=f"10.{index // 65536 % 256}.{index // 256 % 256}.{index % 256}",
        port=10000 + index % 50000,
        registered=registered,
        pid=12345,
    )


@implementer(IInstanceListener)
class _Listener:
    def __init__(self) -> None:
        self.snapshotted: Deferred = Deferred()
        self.last_event = 0.0
        self.events = 0
        self.count = 0

    def snapshot(self, instances: list[Instance]) -> None:
        self.count = len(instances)
        self.snapshotted.callback(time.monotonic())

    def added(self, instance: Instance) -> None:
        self.updated(instance)

    def updated(self, instance: Instance) -> None:
        self.events += 1
        self.last_event = time.monotonic()

    def removed(self, instance: Instance) -> None:
        self.updated(instance)


def _mntr(zk: KazooClient) -> dict[str, str]:
    text = zk.command(b"mntr")
    return dict(line.split("\t", 1) for line in text.splitlines() if "\t" in line)


def _rss() -> int:
    gc.collect()
    return psutil.Process().memory_info().rss


def _server_process(port: int) -> psutil.Process | None:
    for connection in psutil.net_connections("tcp"):
        if connection.laddr and connection.laddr.port == port and connection.status == "LISTEN":
            if connection.pid:
                return psutil.Process(connection.pid)
    return None


async def simulate(reactor: Any, hosts: str, args: argparse.Namespace) -> dict[str, Any]:
    deadline = time.monotonic() + args.seconds
    chroot = f"/sim-{os.getpid()}-{int(time.time())}/skynet"
    figures: dict[str, Any] = {"chroot": chroot}
    zk = KazooClient(hosts)
    zk.start(timeout=30)
    server = _server_process(int(hosts.split(",")[0].rsplit(":", 1)[1]))
    try:
        # 1. Nodes.
        before = _mntr(zk)
        server_rss = server.memory_info().rss if server else 0
        services = f"{chroot}/services"
        instances = [make_instance(i, args.services) for i in range(args.instances)]
        started = time.monotonic()
        parents = sorted({services + i.path.rpartition("/")[0] for i in instances})
        levels: dict[int, set[str]] = {}
        for parent in parents:
            parts = parent.split("/")
            for depth in range(2, len(parts) + 1):
                levels.setdefault(depth, set()).add("/".join(parts[:depth]))
        for depth in sorted(levels):
            for result in [zk.create_async(p) for p in sorted(levels[depth])]:
                result.get(timeout=60)
        created = 0
        for first in range(0, len(instances), 500):
            if time.monotonic() > deadline - args.seconds / 2:
                break
            transaction = zk.transaction()
            for instance in instances[first : first + 500]:
                transaction.create(services + instance.path, instance.to_json())
            transaction.commit()
            created += len(instances[first : first + 500])
        instances = instances[:created]
        figures["create_s"] = time.monotonic() - started
        figures["instances"] = created
        after = _mntr(zk)
        figures["node_bytes_data"] = (
            int(after["zk_approximate_data_size"]) - int(before["zk_approximate_data_size"])
        ) / max(1, created)
        figures["znodes"] = int(after["zk_znode_count"])
        figures["instance_node_bytes"] = len(instances[0].to_json()) if instances else 0
        if server:
            figures["server_rss_per_node"] = (server.memory_info().rss - server_rss) / max(
                1, created
            )

        # 2. Watching clients, one service each.
        registries: list[ZooKeeperRegistry] = []
        listeners: list[_Listener] = []
        client_rss = _rss()
        watches_before = int(_mntr(zk)["zk_watch_count"])
        server_rss = server.memory_info().rss if server else 0
        started = time.monotonic()
        for n in range(args.clients):
            if time.monotonic() > deadline - args.seconds / 4:
                break
            registry = ZooKeeperRegistry(hosts, chroot, reactor=reactor)
            await registry.start()
            listener = _Listener()
            registry.watch(Query(service=f"S{n % min(args.services, 10)}"), listener)
            await listener.snapshotted
            registries.append(registry)
            listeners.append(listener)
        figures["clients"] = len(registries)
        figures["client_start_and_snapshot_s"] = (time.monotonic() - started) / max(
            1, len(registries)
        )
        watches = int(_mntr(zk)["zk_watch_count"]) - watches_before
        figures["server_watches"] = watches
        per_client = listeners[0].count if listeners else 0
        figures["instances_per_service"] = per_client
        if server and watches:
            figures["server_rss_per_watch"] = (server.memory_info().rss - server_rss) / watches
        figures["client_rss_per_session"] = (_rss() - client_rss) / max(1, len(registries))

        # 3. One client watching everything.
        rss = _rss()
        everything = ZooKeeperRegistry(hosts, chroot, reactor=reactor)
        await everything.start()
        listener = _Listener()
        started = time.monotonic()
        everything.watch(Query(), listener)
        await listener.snapshotted
        figures["snapshot_all_s"] = time.monotonic() - started
        figures["snapshot_all_count"] = listener.count
        figures["client_rss_per_instance"] = (_rss() - rss) / max(1, listener.count)
        registries.append(everything)
        listeners.append(listener)

        # 4. Fan-out of changes to the watchers of S0.
        watching_s0 = [n for n in range(len(listeners) - 1) if n % min(args.services, 10) == 0]
        targets = [i for i in instances if i.name == "S0"]
        fanouts = []
        cpu_before = server.cpu_times() if server else None
        notified = 0
        for sample in range(args.changes):
            if time.monotonic() > deadline or not targets:
                break
            target = targets[sample % len(targets)]
            # A real change (an identical write is no event).
            flipped = attr.evolve(target, critical_client_count=1000 + sample)
            counts = [listeners[n].events for n in watching_s0] + [listener.events]
            started = time.monotonic()
            zk.set(services + target.path, flipped.to_json())
            expected = len(counts)
            while True:
                now = [listeners[n].events for n in watching_s0] + [listener.events]
                if sum(a > b for a, b in zip(now, counts, strict=True)) == expected:
                    break
                if time.monotonic() - started > 10:
                    break
                await deferLater(reactor, 0.0005, lambda: None)
            last = max([listeners[n].last_event for n in watching_s0] + [listener.last_event])
            fanouts.append(last - started)
            notified += expected
        if fanouts:
            figures["changes"] = len(fanouts)
            figures["watchers_per_change"] = len(watching_s0) + 1
            figures["fanout_median_s"] = statistics.median(fanouts)
            figures["fanout_max_s"] = max(fanouts)
        if server and cpu_before and notified:
            cpu = server.cpu_times()
            spent = (cpu.user + cpu.system) - (cpu_before.user + cpu_before.system)
            figures["server_cpu_per_notification_s"] = spent / notified
        await DeferredList([r.stop() for r in registries], consumeErrors=True)
    finally:
        zk.stop()
        zk.close()
        delete_tree(hosts, chroot.rsplit("/", 1)[0])
    return figures


async def main(reactor: Any, args: argparse.Namespace) -> None:
    cluster = None
    hosts = args.zk
    if not hosts:
        sys.path.insert(0, str(ROOT))
        from tests.zkserver import ZooKeeperCluster

        cluster = ZooKeeperCluster(1)
        cluster.start()
        hosts = cluster.hosts
    try:
        figures = await simulate(reactor, hosts, args)
    finally:
        if cluster is not None:
            cluster.close()
    for key, value in figures.items():
        print(f"{key:34} {value:.6g}" if isinstance(value, float) else f"{key:34} {value}")
    if args.json:
        Path(args.json).write_text(json.dumps({"config": vars(args), **figures}, indent=2))


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="ZooKeeper registry scale simulation.")
    parser.add_argument("--instances", type=int, default=20000)
    parser.add_argument("--services", type=int, default=400)
    parser.add_argument("--clients", type=int, default=40, help="watching client sessions")
    parser.add_argument("--changes", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=120, help="time budget")
    parser.add_argument("--zk", metavar="HOSTS", help="a running ZooKeeper")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    if min(args.instances, args.services, args.clients) < 1 or args.seconds <= 0:
        parser.error("counts and --seconds must be positive")
    return args


if __name__ == "__main__":
    arguments = parse()
    react(lambda reactor: ensureDeferred(main(reactor, arguments)))
