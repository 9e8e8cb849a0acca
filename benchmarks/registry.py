"""
Registry benchmark: the embedded registry and ZooKeeper at scale.

    python -m benchmarks.registry [--instances 2000] [--services 50] [--writers 10]
        [--samples 200] [--zookeeper | --zk HOST:PORT,...] [--json FILE]

A writer process registers C{--instances} instances across C{--services}
services through the registry API, with C{--writers} registry objects (so
the nodes have several owners, as when many services register), and keeps
them.  A measuring process (one per backend) then measures, as a client
would see it:

  - snapshot, watch on everything: from C{watch(Query())} on a freshly
    started registry to the listener's snapshot, and the CPU time the
    measuring process spent meanwhile (all its threads: kazoo's too), a
    figure that other work on the machine disturbs less;
  - snapshot, watch on one service: the same for C{Query(service="S0")}, on
    another fresh registry object;
  - change -> event: the writer flips the C{registered} flag of a random
    instance (C{update}); the time from just before its update call to the
    event at the listener of the watch on everything, C{--samples} times,
    one at a time (both processes read the same monotonic clock);
  - client memory: the growth of the measuring process's RSS from before
    the registry object was made to after the watch on everything delivered
    its snapshot (for ZooKeeper: the kazoo client, its threads and the
    watch's mirror of the tree).  Modules are imported before the baseline,
    and each backend is measured in a fresh process of its own (memory one
    backend freed would otherwise hide the next one's growth).

The embedded registry lives in a temporary directory.  For ZooKeeper
(C{--zookeeper}), a standalone server is started from Debian's C{zookeeper}
package with C{tests.zkserver}, or C{--zk} names a running ensemble (the
benchmark works in a chroot of its own and deletes it afterwards).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater, react
from twisted.internet.utils import getProcessOutputAndValue
from twisted.protocols.basic import LineReceiver
from zope.interface import implementer

from benchmarks.backends import delete_tree
from skynet.registry import registry_from_url
from skynet.registry.base import IInstanceListener, Instance, Query

# Imported before any baseline, so that module code does not count as the
# client's memory.
from skynet.registry.files import FileRegistry  # noqa: F401
from skynet.registry.zookeeper import ZooKeeperRegistry  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent

#: Instances registered per batch by the writer (bounds the requests in flight).
BATCH = 250


def make_instance(index: int, services: int, registered: bool = True) -> Instance:
    """
    Instance C{index}: service C{S<index % services>}, on one of 20 hosts
    (20 more for each further 50,000 instances, so that ports stay valid).
    """
    return Instance(
        uuid=f"bench-{index}",
        name=f"S{index % services}",
        version="1",
        region="Bench",
        host=f"10.{index // 50000}.0.{index % 20 + 1}",
        port=10000 + index % 50000,
        registered=registered,
        pid=os.getpid(),
    )


# -- the writer process


class _Commands(LineReceiver):
    delimiter = b"\n"

    def __init__(self, writer: _Writer) -> None:
        self.writer = writer

    def lineReceived(self, line: bytes) -> None:
        command, _, argument = line.decode().partition(" ")
        if command == "flip":
            ensureDeferred(self.writer.flip(int(argument)))

    def connectionLost(self, reason: Any = None) -> None:
        self.writer.done.callback(None)


class _Writer:
    def __init__(self, reactor: Any, args: argparse.Namespace) -> None:
        self.reactor = reactor
        self.registries = [registry_from_url(args.writer, reactor) for _ in range(args.writers)]
        self.services = args.services
        self.instances = [make_instance(i, args.services) for i in range(args.instances)]
        self.done: Deferred = Deferred()

    async def run(self) -> None:
        from twisted.internet.stdio import StandardIO

        await DeferredList([r.start() for r in self.registries], fireOnOneErrback=True)
        started = time.monotonic()
        writers = len(self.registries)
        for first in range(0, len(self.instances), BATCH):
            batch = range(first, min(first + BATCH, len(self.instances)))
            await DeferredList(
                [self.registries[i % writers].add(self.instances[i]) for i in batch],
                fireOnOneErrback=True,
                consumeErrors=True,
            )
        print(f"READY {time.monotonic() - started:.6f}", flush=True)
        StandardIO(_Commands(self), reactor=self.reactor)
        await self.done
        await DeferredList([r.stop() for r in self.registries], consumeErrors=True)

    async def flip(self, index: int) -> None:
        old = self.instances[index]
        new = make_instance(index, self.services, not old.registered)
        self.instances[index] = new
        writers = len(self.registries)
        started = time.monotonic()
        await self.registries[index % writers].update(new)
        print(f"FLIPPED {index} {started:.6f}", flush=True)


# -- the measuring process


@implementer(IInstanceListener)
class _Listener:
    """
    Keeps the view a watch describes and when each instance last changed.
    """

    def __init__(self) -> None:
        self.view: dict[str, Instance] = {}
        self.snapshotted: Deferred = Deferred()
        self.changed: dict[str, float] = {}

    def snapshot(self, instances: list[Instance]) -> None:
        self.view = {i.uuid: i for i in instances}
        self.snapshotted.callback(time.monotonic())

    def added(self, instance: Instance) -> None:
        self.updated(instance)

    def updated(self, instance: Instance) -> None:
        self.view[instance.uuid] = instance
        self.changed[instance.uuid] = time.monotonic()

    def removed(self, instance: Instance) -> None:
        self.view.pop(instance.uuid, None)
        self.changed[instance.uuid] = time.monotonic()


class _WriterProcess(ProcessProtocol):
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.buffer = b""
        self.stderr = b""
        self.ended: Deferred = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        self.lines += [line.decode() for line in lines]

    def errReceived(self, data: bytes) -> None:
        self.stderr += data

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(None)

    def take(self, prefix: str) -> list[str] | None:
        for i, line in enumerate(self.lines):
            if line.startswith(prefix + " "):
                del self.lines[i]
                return line.split()[1:]
        return None


async def _until(reactor: Any, predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout}s waiting for {what}")
        await deferLater(reactor, 0.001, lambda: None)


def _rss() -> int:
    gc.collect()
    return psutil.Process().memory_info().rss


async def measure(reactor: Any, url: str, args: argparse.Namespace) -> dict[str, Any]:
    """
    Run a writer on C{url} and measure a listener; the figures as a dict.
    """
    writer = _WriterProcess()
    command = [sys.executable, "-m", "benchmarks.registry", "--writer", url,
               "--instances", str(args.instances), "--services", str(args.services),
               "--writers", str(args.writers)]  # fmt: skip
    reactor.spawnProcess(writer, sys.executable, command, env=dict(os.environ), path=str(ROOT))
    try:
        return await _measure(reactor, url, args, writer)
    finally:
        if not writer.ended.called:
            writer.transport.closeStdin()
            stopping = reactor.callLater(60, writer.transport.signalProcess, "KILL")
            await writer.ended
            if stopping.active():
                stopping.cancel()


async def _measure(
    reactor: Any, url: str, args: argparse.Namespace, writer: _WriterProcess
) -> dict[str, Any]:
    def ready() -> list[str] | None:
        if writer.ended.called:
            raise RuntimeError(f"the writer exited:\n{writer.stderr.decode(errors='replace')}")
        return writer.take("READY")

    (register_seconds,) = await _until(reactor, ready, 600, "the writer's registrations")
    figures: dict[str, Any] = {"register_s": float(register_seconds)}

    # Memory and the snapshot of everything, on a fresh registry object.
    before = _rss()
    registry = registry_from_url(url, reactor)
    await registry.start()
    listener = _Listener()
    started = time.monotonic()
    cpu = time.process_time()
    watch = registry.watch(Query(), listener)
    figures["snapshot_all_s"] = await listener.snapshotted - started
    figures["snapshot_all_cpu_s"] = time.process_time() - cpu
    figures["memory_bytes"] = _rss() - before
    figures["snapshot_all_count"] = len(listener.view)

    # Change -> event, one sample at a time.
    rng = random.Random(3)
    latencies = []
    for _ in range(args.samples):
        index = rng.randrange(args.instances)
        uuid = f"bench-{index}"
        expected = not listener.view[uuid].registered
        writer.transport.write(f"flip {index}\n".encode())
        flipped = await _until(reactor, lambda: writer.take("FLIPPED"), 30, "the writer's update")
        await _until(
            reactor,
            lambda: listener.view[uuid].registered == expected,  # noqa: B023 (awaited here)
            30,
            "the listener's event",
        )
        latencies.append(listener.changed[uuid] - float(flipped[1]))
    figures["event_median_s"] = statistics.median(latencies) if latencies else None
    figures["event_p99_s"] = _percentile(latencies, 0.99) if latencies else None
    figures["samples"] = len(latencies)
    watch.stop()
    await registry.stop()

    # The snapshot of one service, on another fresh registry object.
    registry = registry_from_url(url, reactor)
    await registry.start()
    one = _Listener()
    started = time.monotonic()
    watch = registry.watch(Query(service="S0"), one)
    figures["snapshot_one_s"] = await one.snapshotted - started
    figures["snapshot_one_count"] = len(one.view)
    watch.stop()
    await registry.stop()
    return figures


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 1:
        return f"{value * 1000:.1f} ms"
    return f"{value:.2f} s"


def table(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> str:
    names = list(results)
    one = args.instances // args.services + (args.instances % args.services > 0)
    rows = [
        ("register all (writer process)", "register_s", _seconds),
        ("snapshot, watch on everything", "snapshot_all_s", _seconds),
        ("  its CPU time (client process)", "snapshot_all_cpu_s", _seconds),
        (f"snapshot, watch on one service ({one})", "snapshot_one_s", _seconds),
        ("change -> event, median", "event_median_s", _seconds),
        ("change -> event, p99", "event_p99_s", _seconds),
        (
            "client memory (RSS growth)",
            "memory_bytes",
            lambda b: f"{b / 2**20:.1f} MiB",
        ),
    ]
    lines = [
        f"{args.instances} instances across {args.services} services, registered by "
        f"{args.writers} registry objects in a writer process; {args.samples} change samples",
        f"{'':44}" + "".join(f"{name:>16}" for name in names),
    ]
    for label, key, show in rows:
        lines.append(f"{label:44}" + "".join(f"{show(results[n][key]):>16}" for n in names))
    return "\n".join(lines)


async def measure_apart(reactor: Any, url: str, args: argparse.Namespace) -> dict[str, Any]:
    """
    L{measure} in a process of its own, so that one backend's memory
    (freed, but kept by the allocator) does not hide the next one's growth.
    """
    with tempfile.TemporaryDirectory(prefix="skynet-bench-registry-") as directory:
        out = Path(directory) / "figures.json"
        command = [sys.executable, "-m", "benchmarks.registry", "--measure", url,
                   "--json", str(out), "--instances", str(args.instances),
                   "--services", str(args.services), "--writers", str(args.writers),
                   "--samples", str(args.samples)]  # fmt: skip
        output, errors, code = await getProcessOutputAndValue(
            sys.executable, command[1:], env=dict(os.environ), path=str(ROOT), reactor=reactor
        )
        if code != 0:
            raise RuntimeError(
                f"measuring {url} failed ({code}):\n{output.decode()}{errors.decode()}"
            )
        figures: dict[str, Any] = json.loads(out.read_text())
        return figures


async def measure_here(reactor: Any, args: argparse.Namespace) -> None:
    """
    The child process of L{measure_apart}.
    """
    figures = await measure(reactor, args.measure, args)
    Path(args.json).write_text(json.dumps(figures))


async def main(reactor: Any, args: argparse.Namespace) -> None:
    results: dict[str, dict[str, Any]] = {}
    directory = tempfile.mkdtemp(prefix="skynet-bench-registry-")
    try:
        results["embedded"] = await measure_apart(reactor, f"file://{directory}/registry", args)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    if args.zk or args.zookeeper:
        server = None
        hosts = args.zk
        if not hosts:
            from tests.zkserver import ZooKeeperCluster

            server = ZooKeeperCluster(1)
            server.start()
            hosts = server.hosts
        top = f"/bench-{os.getpid()}-{int(time.time())}"
        try:
            results["ZooKeeper"] = await measure_apart(reactor, f"zk://{hosts}{top}/skynet", args)
        finally:
            delete_tree(hosts, top)
            if server is not None:
                server.close()
    print(table(results, args))
    if args.json:
        Path(args.json).write_text(json.dumps({"config": vars(args), **results}, indent=2))


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Registry benchmark: embedded vs ZooKeeper.")
    parser.add_argument("--instances", type=int, default=2000)
    parser.add_argument("--services", type=int, default=50)
    parser.add_argument("--writers", type=int, default=10, help="registry objects that write")
    parser.add_argument("--samples", type=int, default=200, help="change -> event samples")
    parser.add_argument(
        "--zookeeper", action="store_true", help="also ZooKeeper (a standalone server of its own)"
    )
    parser.add_argument("--zk", metavar="HOSTS", help="also ZooKeeper, this ensemble")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    parser.add_argument("--writer", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--measure", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.instances < 1 or args.services < 1 or args.writers < 1 or args.samples < 0:
        parser.error("--instances, --services and --writers must be positive")
    if args.services > args.instances:
        parser.error("--services must not exceed --instances")
    return args


if __name__ == "__main__":
    arguments = parse()
    if arguments.writer:
        react(lambda reactor: ensureDeferred(_Writer(reactor, arguments).run()))
    elif arguments.measure:
        react(lambda reactor: ensureDeferred(measure_here(reactor, arguments)))
    else:
        react(lambda reactor: ensureDeferred(main(reactor, arguments)))
