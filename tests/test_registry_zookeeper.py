"""
The ZooKeeper registry against real ZooKeeper servers (see L{tests.zkserver}):
the tree other languages read, ephemeral nodes and their owners, pruning,
watches, a SIGKILLed holder, failover in a 3-node ensemble, session expiry,
a whole-ensemble outage, and starting while ZooKeeper is down.

The ZooKeeper server must be installed (C{apt-get install -y zookeeper});
without it every test here fails with that instruction.

Figures (failover pauses, kill -9 to node gone) are printed; run pytest with
C{-s} to see them.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import attr
import pytest
from kazoo.client import KazooClient
from kazoo.exceptions import ConnectionLoss, NoNodeError, UnimplementedError
from kazoo.protocol.serialization import int_struct, multiheader_struct, stat_struct, write_string
from kazoo.protocol.states import ZnodeStat
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import Clock, deferLater
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from skynet.registry.base import (
    Address,
    IInstanceListener,
    Instance,
    IRegistry,
    IWatch,
    Query,
    RegistryError,
)
from skynet.registry.zookeeper import (
    _GET_CHILDREN,
    _GET_DATA,
    READ_BATCH,
    ZooKeeperRegistry,
    _MultiRead,
    _ReadBatch,
)
from tests.netns import SharedZooKeeper
from tests.registry_conformance import RegistryConformanceMixin
from tests.zkserver import ZooKeeperCluster, four_letter_word, hold_command

ROOT = Path(__file__).resolve().parent.parent
SESSION_TIMEOUT = 4.0
_chroots = itertools.count(1)

GO_CONFIG_KEYS = {
    "UUID",
    "Name",
    "Version",
    "Region",
    "ServiceAddr",
    "AdminAddr",
    "CriticalClientCount",
    "CriticalAverageResponseTime",
}


def figure(text: str) -> None:
    """
    Print a measured figure (visible with C{pytest -s}).
    """
    print(f"\n[zookeeper figure] {text}", file=sys.stderr)


def instance(name: str, port: int, uuid: str | None = None, **kw: Any) -> Instance:
    fields: dict[str, Any] = {
        "version": "1",
        "region": "Test",
        "host": "127.0.0.1",
    }
    fields.update(kw)
    return Instance(uuid=uuid or f"{name}-{port}", name=name, port=port, **fields)


async def sleep(seconds: float) -> None:
    await deferLater(reactor, seconds, lambda: None)


async def poll(predicate: Any, timeout: float = 15.0, what: str = "condition") -> float:
    """
    Poll C{predicate} every 20 ms until it is true.

    @return: the seconds it took.
    """
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await sleep(0.02)
    return time.monotonic() - start


@implementer(IInstanceListener)
class Recorder:
    """
    Records a watch's events and keeps the view they describe.
    """

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []
        self.view: dict[str, Instance] = {}
        self.snapshotted: Deferred = Deferred()

    def snapshot(self, instances: list[Instance]) -> None:
        self.events.append(("snapshot", [i.uuid for i in instances]))
        self.view = {i.uuid: i for i in instances}
        self.snapshotted.callback(instances)

    def added(self, instance: Instance) -> None:
        self.events.append(("added", instance.uuid))
        self.view[instance.uuid] = instance

    def updated(self, instance: Instance) -> None:
        self.events.append(("updated", instance.uuid))
        self.view[instance.uuid] = instance

    def removed(self, instance: Instance) -> None:
        self.events.append(("removed", instance.uuid))
        self.view.pop(instance.uuid, None)

    def removals(self) -> list[str]:
        return [uuid for kind, uuid in self.events if kind == "removed"]


@pytest.mark.slow
class _ZooKeeperTestCase(SharedZooKeeper, TestCase):
    """
    Shared servers for a class (L{SharedZooKeeper}), a fresh chroot per
    test, and helpers that stop every registry and client a test makes.
    """

    def setUp(self) -> None:
        self.chroot = f"/test{next(_chroots)}/skynet"
        if not self.cluster.serving():
            # A previous test left a member down: bring it back.
            self.cluster.start()

    def registry(self, hosts: str | None = None, **kwargs: Any) -> ZooKeeperRegistry:
        kwargs.setdefault("session_timeout", SESSION_TIMEOUT)
        registry = ZooKeeperRegistry(
            hosts or self.cluster.hosts,
            kwargs.pop("chroot", self.chroot),
            reactor=reactor,
            **kwargs,
        )
        self.addCleanup(registry.stop)
        return registry

    async def started(self, **kwargs: Any) -> ZooKeeperRegistry:
        registry = self.registry(**kwargs)
        await registry.start()
        self.assertTrue(registry.connected)
        return registry

    def kazoo(self, hosts: str | None = None) -> KazooClient:
        """
        A plain kazoo client, blocking: the view of another language.
        """
        client = KazooClient(hosts or self.cluster.hosts, timeout=SESSION_TIMEOUT)
        client.start(timeout=15)

        def close() -> None:
            client.stop()
            client.close()

        self.addCleanup(close)
        return client

    def walk(self, client: KazooClient, path: str) -> list[str]:
        """
        Every instance node below C{path} (a C{/services} tree), by path.
        """
        found = []
        for child in sorted(client.get_children(path)):
            node = f"{path}/{child}"
            if node.count("/") - self.chroot.count("/") - 1 == 5:
                found.append(node)
            else:
                found.extend(self.walk(client, node))
        return found

    async def spawn_holder(self, instances: list[Instance]) -> Holder:
        """
        A child process that registers C{instances} in this test's tree
        through its own ZooKeeperRegistry (own session) and waits to be
        killed.
        """
        holder = Holder()
        reactor.spawnProcess(
            holder,
            sys.executable,
            hold_command(f"zk://{self.cluster.hosts}{self.chroot}", instances),
            env=dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1"),
            path=str(ROOT),
        )
        self.addCleanup(holder.kill)
        await poll(
            lambda: holder.ready is not None or holder.ended.called,
            timeout=30,
            what="the holder",
        )
        if holder.ready is None:
            self.fail(f"the holder failed: {holder.output.decode(errors='replace')}")
        return holder

    async def watching(self, registry: ZooKeeperRegistry, query: Query) -> Recorder:
        recorder = Recorder()
        watch = registry.watch(query, recorder)
        self.addCleanup(watch.stop)
        await recorder.snapshotted
        return recorder


class StandaloneTests(_ZooKeeperTestCase):
    """
    One standalone server shared by the tests of this class.
    """

    async def test_interfaces(self) -> None:
        registry = await self.started()
        self.assertTrue(verifyObject(IRegistry, registry))
        watch = registry.watch(Query(), Recorder())
        self.assertTrue(verifyObject(IWatch, watch))
        watch.stop()

    async def test_tree_is_ephemeral_and_walkable(self) -> None:
        """
        A plain ZooKeeper client finds the Go-shaped JSON at
        C{/services/<Name>/<Version>/<Region>/<Host>/<Port>}, and the
        statistics beside it; both leaves are ephemeral nodes of the
        registry's session, the parents are not.
        """
        registry = await self.started()
        a = instance("Walk", 9001, admin=Address("127.0.0.1", 9002), pid=123)
        b = instance("Other", 9003, version="2", region="Elsewhere", host="10.0.0.7")
        await registry.add(a)
        await registry.add(b)
        await registry.publish_stats(a, {"Clients": 3, "RequestsServed": 10})

        zk = self.kazoo()
        services = f"{self.chroot}/services"
        self.assertEqual(
            self.walk(zk, services),
            [
                f"{services}/Other/2/Elsewhere/10.0.0.7/9003",
                f"{services}/Walk/1/Test/127.0.0.1/9001",
            ],
        )
        data, stat = zk.get(f"{services}/Walk/1/Test/127.0.0.1/9001")
        doc = json.loads(data)
        self.assertEqual(GO_CONFIG_KEYS, set(doc["Config"]))
        self.assertEqual(doc["Registered"], True)
        self.assertEqual(
            doc["Config"]["ServiceAddr"],
            {"IPAddress": "127.0.0.1", "Port": 9001, "MaxPort": 0},
        )
        self.assertEqual(doc["Config"]["AdminAddr"]["Port"], 9002)
        self.assertEqual(doc["Config"]["CriticalAverageResponseTime"], 5_000_000_000)
        self.assertEqual(Instance.from_go(doc), a)
        self.assertEqual(stat.ephemeralOwner, registry.session_id)
        self.assertNotEqual(registry.session_id, 0)
        _, parent = zk.get(f"{services}/Walk/1/Test/127.0.0.1")
        self.assertEqual(parent.ephemeralOwner, 0)

        data, stat = zk.get(f"{self.chroot}/statistics/Walk/1/Test/127.0.0.1/9001")
        self.assertEqual(json.loads(data), {"Clients": 3, "RequestsServed": 10})
        self.assertEqual(stat.ephemeralOwner, registry.session_id)

        self.assertEqual(await registry.query(Query()), [b, a])
        self.assertEqual(await registry.query(Query(service="Walk")), [a])
        self.assertEqual(await registry.query(Query(region="Elsewhere")), [b])
        self.assertEqual(await registry.services(), ["Other", "Walk"])
        self.assertEqual(await registry.hosts(), ["10.0.0.7", "127.0.0.1"])
        self.assertEqual(await registry.get_stats(a), {"Clients": 3, "RequestsServed": 10})
        self.assertIsNone(await registry.get_stats(b))

    async def test_data_nodes_are_persistent_beside_the_tree(self) -> None:
        """
        A data node is a persistent node at C{<chroot>/data/<escaped key>}
        that a plain client reads, and that stays after its writer's
        session closes; the Go tree below C{/services} is untouched.
        """
        registry = await self.started()
        await registry.set_value("tls/revoked", b"serial-1\nserial-2")
        zk = self.kazoo()
        self.assertEqual(zk.get_children(f"{self.chroot}/data"), ["tls%2Frevoked"])
        data, stat = zk.get(f"{self.chroot}/data/tls%2Frevoked")
        self.assertEqual(data, b"serial-1\nserial-2")
        self.assertEqual(stat.ephemeralOwner, 0)
        self.assertIsNone(zk.exists(f"{self.chroot}/services"))
        await registry.stop()
        self.assertEqual(zk.get(f"{self.chroot}/data/tls%2Frevoked")[0], b"serial-1\nserial-2")
        zk.set(f"{self.chroot}/data/tls%2Frevoked", b"from another language")
        reader = await self.started()
        self.assertEqual(await reader.get_value("tls/revoked"), b"from another language")

    async def test_default_chroot(self) -> None:
        registry = ZooKeeperRegistry.from_url(f"zk://{self.cluster.hosts}", reactor=reactor)
        self.addCleanup(registry.stop)
        self.assertEqual(registry.chroot, "/skynet")
        await registry.start()
        await registry.add(instance("Rooted", 9100))
        zk = self.kazoo()
        self.assertTrue(zk.exists("/skynet/services/Rooted/1/Test/127.0.0.1/9100"))
        await registry.stop()
        self.assertIsNone(zk.exists("/skynet/services/Rooted"))

    async def test_update_rewrites_in_place(self) -> None:
        registry = await self.started()
        a = instance("Flag", 9200)
        await registry.add(a)
        await registry.update(_with(a, registered=False))
        zk = self.kazoo()
        data, stat = zk.get(f"{self.chroot}/services{a.path}")
        self.assertFalse(json.loads(data)["Registered"])
        self.assertEqual(stat.ephemeralOwner, registry.session_id)
        self.assertEqual(stat.version, 1)

    async def test_remove_prunes_empty_parents(self) -> None:
        registry = await self.started()
        one = instance("Prune", 9301, region="One")
        two = instance("Prune", 9302, region="Two")
        for i in (one, two):
            await registry.add(i)
            await registry.publish_stats(i, {"Clients": 0})
        zk = self.kazoo()
        root = self.chroot

        await registry.remove(one)
        self.assertIsNone(zk.exists(f"{root}/services/Prune/1/One"))
        self.assertIsNone(zk.exists(f"{root}/statistics/Prune/1/One"))
        self.assertTrue(zk.exists(f"{root}/services/Prune/1/Two/127.0.0.1/9302"))

        await registry.remove(two)
        self.assertIsNone(zk.exists(f"{root}/services/Prune"))
        self.assertIsNone(zk.exists(f"{root}/statistics/Prune"))
        self.assertTrue(zk.exists(f"{root}/services"))
        # Removing what is gone is fine.
        await registry.remove(two)

    async def test_stop_deletes_only_own_nodes(self) -> None:
        owner = await self.started()
        other = await self.started()
        await owner.add(instance("Mine", 9401))
        await other.add(instance("Theirs", 9402))
        await owner.stop()
        zk = self.kazoo()
        self.assertIsNone(zk.exists(f"{self.chroot}/services/Mine"))
        self.assertTrue(zk.exists(f"{self.chroot}/services/Theirs/1/Test/127.0.0.1/9402"))
        self.assertFalse(owner.connected)

    async def test_replacement_on_same_port_survives_old_owner(self) -> None:
        """
        A new process on the host and port of one whose session is still
        alive takes the node over; the old one stopping does not delete it.
        """
        old = await self.started()
        new = await self.started()
        watcher = await self.started()
        first = instance("Restarted", 9500, uuid="first")
        second = instance("Restarted", 9500, uuid="second")
        await old.add(first)
        recorder = await self.watching(watcher, Query(service="Restarted"))
        await new.add(second)
        await old.stop()
        zk = self.kazoo()
        data, stat = zk.get(f"{self.chroot}/services{second.path}")
        self.assertEqual(Instance.from_json(data).uuid, "second")
        self.assertEqual(stat.ephemeralOwner, new.session_id)
        await poll(lambda: "second" in recorder.view, what="the replacement")
        self.assertEqual(
            recorder.events[:3],
            [("snapshot", ["first"]), ("removed", "first"), ("added", "second")],
        )
        self.assertEqual(list(recorder.view), ["second"])

    async def test_watch_snapshot_then_changes(self) -> None:
        owner = await self.started()
        watcher = await self.started()
        a1 = instance("Watched", 9601)
        a2 = instance("Watched", 9602, region="Far")
        await owner.add(a1)
        recorder = await self.watching(watcher, Query(service="Watched"))
        registered = await self.watching(watcher, Query(service="Watched", registered=True))
        self.assertEqual(recorder.events, [("snapshot", [a1.uuid])])

        await owner.add(a2)
        await owner.add(instance("Unwatched", 9603))
        await poll(lambda: len(recorder.events) == 2, what="added")
        await owner.update(_with(a1, registered=False))
        await poll(lambda: len(recorder.events) == 3, what="updated")
        await owner.remove(a2)
        await poll(lambda: len(recorder.events) == 4, what="removed")
        self.assertEqual(
            recorder.events,
            [
                ("snapshot", [a1.uuid]),
                ("added", a2.uuid),
                ("updated", a1.uuid),
                ("removed", a2.uuid),
            ],
        )
        self.assertFalse(recorder.view[a1.uuid].registered)
        await poll(lambda: len(registered.events) == 4, what="registered-only events")
        self.assertEqual(
            registered.events,
            [
                ("snapshot", [a1.uuid]),
                ("added", a2.uuid),
                ("removed", a1.uuid),
                ("removed", a2.uuid),
            ],
        )

    async def test_watch_of_a_service_not_there_yet(self) -> None:
        """
        A watch on a service nobody registered waits for its subtree to
        appear, and again after the last instance pruned it.
        """
        owner = await self.started()
        watcher = await self.started()
        recorder = await self.watching(watcher, Query(service="Later"))
        self.assertEqual(recorder.events, [("snapshot", [])])
        first = instance("Later", 9701)
        await owner.add(first)
        await poll(lambda: first.uuid in recorder.view, what="first")
        await owner.remove(first)
        await poll(lambda: not recorder.view, what="removal")
        second = instance("Later", 9702, host="10.1.1.1")
        await owner.add(second)
        await poll(lambda: second.uuid in recorder.view, what="second")
        self.assertEqual(
            recorder.events,
            [
                ("snapshot", []),
                ("added", first.uuid),
                ("removed", first.uuid),
                ("added", second.uuid),
            ],
        )

    async def test_watch_of_one_instance_path(self) -> None:
        owner = await self.started()
        watcher = await self.started()
        target = instance("Exact", 9801)
        query = Query(service="Exact", version="1", region="Test", host="127.0.0.1", port=9801)
        recorder = await self.watching(watcher, query)
        await owner.add(instance("Exact", 9802))
        await owner.add(target)
        await poll(lambda: target.uuid in recorder.view, what="the instance")
        await owner.remove(target)
        await poll(lambda: not recorder.view, what="its removal")
        self.assertEqual(
            recorder.events,
            [("snapshot", []), ("added", target.uuid), ("removed", target.uuid)],
        )

    async def test_kill_minus_9_holder_vanishes_within_session_timeout(self) -> None:
        """
        A process that registered through ZooKeeperRegistry and is SIGKILLed
        leaves no node behind once its session expires.
        """
        watcher = await self.started()
        recorder = await self.watching(watcher, Query(service="Holder"))
        held = instance("Holder", 9900)
        holder = await self.spawn_holder([held])
        await poll(lambda: len(recorder.view) == 1, what="the holder's instance")
        zk = self.kazoo()
        path = f"{self.chroot}/services/Holder/1/Test/127.0.0.1/9900"
        self.assertEqual(zk.exists(path).ephemeralOwner, holder.ready)

        killed = time.monotonic()
        os.kill(holder.pid, signal.SIGKILL)
        await holder.ended
        await poll(lambda: not recorder.view, timeout=SESSION_TIMEOUT + 10, what="the removal")
        elapsed = time.monotonic() - killed
        figure(
            f"kill -9 -> removal seen by a watch: {elapsed:.2f}s (session timeout {SESSION_TIMEOUT}s)"
        )
        self.assertIsNone(zk.exists(path))
        self.assertEqual(recorder.removals(), [held.uuid])
        # The target is session timeout + 1 s; 1 s more of slack for a busy machine.
        self.assertLess(elapsed, SESSION_TIMEOUT + 1.0 + 1.0)

    async def test_sigterm_holder_removes_its_nodes_at_once(self) -> None:
        """
        A holder stopped cleanly (SIGTERM: the reactor shuts down, the
        registry's shutdown trigger deletes its nodes and closes the
        session) leaves nothing behind at once, parents pruned.
        """
        watcher = await self.started()
        recorder = await self.watching(watcher, Query(service="Polite"))
        held = instance("Polite", 9910)
        holder = await self.spawn_holder([held])
        await poll(lambda: len(recorder.view) == 1, what="the holder's instance")
        stopped = time.monotonic()
        os.kill(holder.pid, signal.SIGTERM)
        await poll(lambda: not recorder.view, what="the removal")
        elapsed = time.monotonic() - stopped
        figure(f"SIGTERM -> removal seen by a watch: {elapsed:.2f}s")
        await holder.ended
        self.assertLess(elapsed, 1.5)
        zk = self.kazoo()
        self.assertIsNone(zk.exists(f"{self.chroot}/services/Polite"))
        self.assertIsNone(zk.exists(f"{self.chroot}/statistics/Polite"))

    async def test_session_expiry_recreates_own_nodes(self) -> None:
        """
        When the session expires the registry re-creates its nodes (and the
        latest statistics) on a new session.
        """
        owner = await self.started()
        watcher = await self.started()
        mine = instance("Expiring", 9950)
        await owner.add(mine)
        await owner.publish_stats(mine, {"Clients": 1})
        await owner.publish_stats(mine, {"Clients": 2})
        recorder = await self.watching(watcher, Query(service="Expiring"))
        old_session = owner.session_id

        # kazoo's client_id trick: a second client takes the session over
        # and closes it, which expires it for its owner.
        thief = KazooClient(
            self.cluster.hosts, client_id=owner._zk.client_id, timeout=SESSION_TIMEOUT
        )
        thief.start(timeout=15)

        thief.stop()
        thief.close()

        zk = self.kazoo()
        path = f"{self.chroot}/services{mine.path}"
        stats = f"{self.chroot}/statistics{mine.path}"

        def recreated() -> bool:
            stat = zk.exists(path)
            return bool(
                owner.session_id != old_session
                and stat is not None
                and stat.ephemeralOwner == owner.session_id
                and zk.exists(stats) is not None
            )

        took = await poll(recreated, what="the nodes on a new session")
        figure(f"session expiry -> own nodes re-created after {took:.2f}s")
        self.assertEqual(json.loads(zk.get(stats)[0]), {"Clients": 2})
        self.assertEqual(Instance.from_json(zk.get(path)[0]), mine)
        await poll(lambda: mine.uuid in recorder.view, what="the watch's view")
        figure(f"watch events across the expiry: {recorder.events}")
        # Writes keep working on the new session.
        await owner.update(_with(mine, registered=False))
        self.assertFalse(json.loads(zk.get(path)[0])["Registered"])

    async def test_leaf_deletion_costs_no_read(self) -> None:
        """
        A watched instance's removal is reported from the DELETED event
        itself: no read of the node (nor of its service subtree) follows.
        """
        writer = await self.started()
        doomed = instance("Reads", 9100)
        kept = instance("Reads", 9101)
        await writer.add(doomed)
        await writer.add(kept)
        watcher = await self.started()
        recorder = await self.watching(watcher, Query(service="Reads"))
        reads: list[str] = []
        # Count the watcher's reads of data (kazoo's API on its client).
        get_async = watcher._zk.get_async

        def counting(path: str, *args: Any, **kwargs: Any) -> Any:
            reads.append(path)
            return get_async(path, *args, **kwargs)

        self.patch(watcher._zk, "get_async", counting)
        await writer.remove(doomed)
        await poll(lambda: recorder.removals() == [doomed.uuid], what="the removal")
        await sleep(0.3)
        self.assertEqual(reads, [])
        self.assertEqual(list(recorder.view), [kept.uuid])

    async def test_many_adds_are_batched(self) -> None:
        """
        Instances added together are created in a few transactions, not
        one request each; they are ephemeral nodes of the session, found
        by a plain client; a node that exists already (another session's)
        is replaced one at a time.
        """
        registry = await self.started()
        peer = await self.started()
        taken = instance("Batch0", 9400, uuid="old")
        await peer.add(taken)
        creates: list[str] = []
        transactions: list[int] = []
        create_async = registry._zk.create_async
        transaction = registry._zk.transaction

        def counting_create(path: str, *args: Any, **kwargs: Any) -> Any:
            creates.append(path)
            return create_async(path, *args, **kwargs)

        def counting_transaction() -> Any:
            transactions.append(1)
            return transaction()

        # Count kazoo's requests (its API, on the registry's client).
        self.patch(registry._zk, "create_async", counting_create)
        self.patch(registry._zk, "transaction", counting_transaction)
        many = [instance(f"Batch{n % 7}", 9400 + n, host=f"10.9.{n % 5}.1") for n in range(300)]
        many[0] = instance("Batch0", 9400, uuid="new")
        await DeferredList([registry.add(i) for i in many], fireOnOneErrback=True)
        self.assertEqual(
            sorted(await peer.query(Query()), key=lambda i: i.port),
            sorted(many, key=lambda i: i.port),
        )
        zk = self.kazoo()
        for each in many[1:]:
            self.assertEqual(
                zk.exists(f"{self.chroot}/services{each.path}").ephemeralOwner,
                registry.session_id,
            )
        # A few per depth of parents and per 250 nodes; one request each would be 300+.
        self.assertLess(len(transactions), 50)
        self.assertEqual(creates, [f"{self.chroot}/services{many[0].path}"])

    async def test_get_by_uuid_reads_one_node(self) -> None:
        """
        C{get(uuid)} of an instance seen before reads its node only; an
        unknown uuid walks the tree once.
        """
        writer = await self.started()
        instances = [instance(f"G{n}", 9200 + n) for n in range(5)]
        for each in instances:
            await writer.add(each)
        reader = await self.started()
        self.assertEqual(len(await reader.query(Query())), 5)
        reads: list[str] = []
        get_async = reader._zk.get_async

        def counting(path: str, *args: Any, **kwargs: Any) -> Any:
            reads.append(path)
            return get_async(path, *args, **kwargs)

        self.patch(reader._zk, "get_async", counting)
        self.assertEqual(await reader.get(instances[3].uuid), instances[3])
        self.assertEqual(reads, [f"{self.chroot}/services{instances[3].path}"])
        del reads[:]
        self.assertIsNone(await reader.get("unknown"))
        self.assertEqual(len(reads), 5)

    async def test_scale_watch_reads_only_the_queried_service(self) -> None:
        """
        2,000 instances across 50 services: a watch on one service reads and
        watches only that subtree, with one persistent recursive watch
        (ZooKeeper 3.6+) for the subtree.
        """
        await self.check_scale(persistent=True)

    async def test_scale_watch_one_shot(self) -> None:
        """
        The same with one-shot watches (servers before 3.6): one watch per
        node of the subtree.
        """
        await self.check_scale(persistent=False)

    async def check_scale(self, persistent: bool) -> None:
        zk = self.kazoo()
        services = f"{self.chroot}/services"
        paths = []
        for n in range(2000):
            paths.append(f"{services}/S{n % 50}/1/Test/10.{n // 250}.{n % 250}.1/{2000 + n}")
        started = time.monotonic()
        parents = {p.rsplit("/", 1)[0] for p in paths}
        levels: set[str] = set()
        for parent in parents:
            while parent.count("/") > services.count("/"):
                levels.add(parent)
                parent = parent.rsplit("/", 1)[0]
        zk.ensure_path(services)
        for depth in sorted({p.count("/") for p in levels}):
            batch = [zk.create_async(p) for p in sorted(levels) if p.count("/") == depth]
            for result in batch:
                result.get(timeout=60)
        body = [
            zk.create_async(
                p,
                instance(f"S{n % 50}", 2000 + n, uuid=f"u{n}", host=p.split("/")[-2]).to_json(),
                ephemeral=True,
            )
            for n, p in enumerate(paths)
        ]
        for result in body:
            result.get(timeout=60)
        figure(f"2,000 instances created by a plain client in {time.monotonic() - started:.2f}s")

        watcher = await self.started(persistent_watches=persistent)
        before = _watch_count(self.cluster)
        started = time.monotonic()
        one = await self.watching(watcher, Query(service="S7"))
        took_one = time.monotonic() - started
        self.assertEqual(len(one.view), 40)
        watches_one = _watch_count(self.cluster) - before
        started = time.monotonic()
        everything = await self.watching(watcher, Query())
        took_all = time.monotonic() - started
        watches_all = _watch_count(self.cluster) - before - watches_one
        self.assertEqual(len(everything.view), 2000)
        started = time.monotonic()
        found = await watcher.query(Query())
        took_query = time.monotonic() - started
        self.assertEqual(len(found), 2000)
        figure(
            f"2,000 instances / 50 services: one-service watch snapshot {took_one * 1000:.0f} ms"
            f" ({watches_one} server watches), all-services watch snapshot {took_all:.2f}s"
            f" ({watches_all} server watches),"
            f" one-shot query of all {took_query:.2f}s"
        )
        if persistent:
            # One persistent recursive watch each (mntr counts it in the
            # data and the child watch tables: 2).
            self.assertEqual((watches_one, watches_all), (2, 2))
        else:
            # 40 instances: 40 data watches, 40 host nodes, service/version/region.
            self.assertEqual(watches_one, 40 + 40 + 3)

        zk.set(
            paths[7],
            _with(
                instance("S7", 2007, uuid="u7", host=paths[7].split("/")[-2]),
                registered=False,
            ).to_json(),
        )
        zk.delete(paths[57])
        await poll(
            lambda: "u57" not in one.view and not one.view["u7"].registered,
            what="the changes",
        )
        # In order per instance; a deletion needs no read, so it may be
        # reported before the update that needs one.
        self.assertEqual(sorted(one.events[1:]), [("removed", "u57"), ("updated", "u7")])
        await poll(
            lambda: len(everything.view) == 1999,
            what="the removal in the all-services watch",
        )


class StartWhileDownTests(_ZooKeeperTestCase):
    """
    A registry started while its ZooKeeper is down (a server of its own,
    started late).
    """

    @classmethod
    def setUpClass(cls) -> None:
        cls.cluster = ZooKeeperCluster(1)  # not started

    def setUp(self) -> None:
        self.chroot = f"/test{next(_chroots)}/skynet"

    async def test_start_while_down_registers_when_it_comes_back(self) -> None:
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)

        registry = self.registry()
        started = time.monotonic()
        await registry.start()
        took = time.monotonic() - started
        figure(f"start() with ZooKeeper down returned after {took:.2f}s")
        self.assertLess(took, registry.connect_timeout + 1.0)
        self.assertFalse(registry.connected)
        waiting = [
            e
            for e in events
            if e.get("log_format") == "ZooKeeper at {hosts} unreachable; waiting to register"
        ]
        self.assertEqual([e["hosts"] for e in waiting], [self.cluster.hosts])

        mine = instance("Late", 9990)
        started = time.monotonic()
        await registry.add(mine)
        await registry.publish_stats(mine, {"Clients": 0})
        self.assertLess(time.monotonic() - started, 0.5)
        with self.assertRaises(RegistryError):
            await registry.query(Query())

        self.cluster.start(wait=False)
        up = time.monotonic()
        await poll(self.cluster.serving, timeout=30, what="ZooKeeper")
        zk = self.kazoo()
        path = f"{self.chroot}/services{mine.path}"
        await poll(lambda: zk.exists(path) is not None, what="the late registration")
        figure(f"ZooKeeper back -> queued registration written after {time.monotonic() - up:.2f}s")
        self.assertTrue(registry.connected)
        self.assertEqual(zk.exists(path).ephemeralOwner, registry.session_id)
        self.assertTrue(zk.exists(f"{self.chroot}/statistics{mine.path}"))
        self.assertEqual(await registry.query(Query()), [mine])


class EnsembleTests(_ZooKeeperTestCase):
    """
    A 3-node ensemble shared by the tests of this class; each test leaves
    every member running.
    """

    zookeeper_size = 3

    async def _write_pause(self, registry: ZooKeeperRegistry, target: Instance, n: int) -> float:
        started = time.monotonic()
        await registry.update(_with(target, extra={"n": n}))
        return time.monotonic() - started

    async def test_failover_is_a_suspension_not_a_removal(self) -> None:
        """
        Killing the member a client uses, then the leader: the session and
        its nodes survive, writes resume, watches report no removal.
        """
        owner = await self.started()
        watcher = await self.started()
        mine = instance("Failover", 9501)
        await owner.add(mine)
        recorder = await self.watching(watcher, Query(service="Failover"))
        session = owner.session_id
        zk_path = f"{self.chroot}/services{mine.path}"

        member = self.cluster.member_with_session(session)
        self.assertIsNotNone(member)
        role = member.mode()
        member.kill()
        pause_member = await self._write_pause(owner, mine, 1)
        figure(
            f"kill -9 of the member the client used ({role}): a write completed {pause_member:.2f}s later"
        )
        self.assertEqual(owner.session_id, session)
        member.start()
        await poll(self.cluster.serving, timeout=30, what="the member back")

        leader = self.cluster.leader()
        self.assertIsNotNone(leader)
        leader.kill()
        pause_leader = await self._write_pause(owner, mine, 2)
        figure(f"kill -9 of the leader: a write completed {pause_leader:.2f}s later")
        self.assertEqual(owner.session_id, session)
        leader.start()
        await poll(self.cluster.serving, timeout=30, what="the leader back")

        await poll(lambda: recorder.view[mine.uuid].extra == {"n": 2}, what="the last update")
        self.assertEqual(recorder.removals(), [])
        zk = self.kazoo()
        data, stat = zk.get(zk_path)
        self.assertEqual(stat.ephemeralOwner, session)
        self.assertEqual(json.loads(data)["Extra"], {"n": 2})
        self.assertLess(pause_member, SESSION_TIMEOUT)
        self.assertLess(pause_leader, SESSION_TIMEOUT)

    async def test_whole_ensemble_down_for_10s(self) -> None:
        """
        Every member stopped for 10 s, then restarted: nodes are back (their
        sessions survive: a new leader gives every session a fresh timeout),
        writes made during the outage land, the watch sees them.
        """
        owner = await self.started()
        watcher = await self.started()
        mine = instance("Outage", 9601)
        await owner.add(mine)
        recorder = await self.watching(watcher, Query(service="Outage"))
        session = owner.session_id

        down = time.monotonic()
        for member in self.cluster.members:
            member.kill()
        await sleep(1.0)
        # A write during the outage: queued, its Deferred fires once the
        # registry gives up waiting (the session timeout).
        during = owner.update(_with(mine, registered=False))
        await sleep(10.0 - (time.monotonic() - down))
        self.assertTrue(during.called, "a write during the outage is still waiting")
        await during
        self.assertEqual(recorder.removals(), [])
        self.assertFalse(owner.connected)

        self.cluster.start(wait=False)
        up = time.monotonic()
        await poll(self.cluster.serving, timeout=30, what="the ensemble")
        serving = time.monotonic() - up
        took = await poll(lambda: owner.connected and watcher.connected, what="reconnection")
        zk = self.kazoo()
        path = f"{self.chroot}/services{mine.path}"

        def landed() -> bool:
            stat = zk.exists(path)
            return stat is not None and not json.loads(zk.get(path)[0])["Registered"]

        await poll(landed, what="the outage's write")
        await poll(lambda: not recorder.view[mine.uuid].registered, what="the watch")
        figure(
            f"whole ensemble down 10s: quorum {serving:.2f}s after restart, clients"
            f" reconnected {took:.2f}s later; session kept: {owner.session_id == session};"
            f" watch events {recorder.events}"
        )
        self.assertEqual(zk.exists(path).ephemeralOwner, owner.session_id)
        self.assertEqual(recorder.removals(), [])


class ZooKeeperConformanceTests(RegistryConformanceMixin, _ZooKeeperTestCase):
    """
    The conformance suite on a standalone ZooKeeper server: a fresh chroot
    per test, peers on sessions of their own, owners crashed by SIGKILL of
    a child process (detected when its session expires).
    """

    max_settles = int((SESSION_TIMEOUT + 6.0) / 0.05)

    async def make_registry(self) -> ZooKeeperRegistry:
        return await self.started()

    async def make_peer_registry(self, registry: ZooKeeperRegistry) -> ZooKeeperRegistry:
        return await self.started(chroot=registry.chroot)

    async def add_doomed(self, registry: ZooKeeperRegistry, instances: list[Instance]) -> Holder:
        self.assertEqual(registry.chroot, self.chroot)
        return await self.spawn_holder(instances)

    async def crash_owner(self, owner: Holder) -> None:
        await owner.kill()

    async def settle(self) -> None:
        await sleep(0.05)


class ACLTests(_ZooKeeperTestCase):
    """
    Digest authentication and ACLs against the real server: only members
    create, change or delete under the chroot; reads open or members-only.
    """

    def members_url(self, **options: str) -> str:
        query = "&".join(f"{k}={v}" for k, v in options.items())
        return f"zk://member:s%40cret@{self.cluster.hosts}{self.chroot}" + (
            f"?{query}" if query else ""
        )

    async def from_url(self, url: str) -> ZooKeeperRegistry:
        registry = ZooKeeperRegistry.from_url(url, reactor=reactor, session_timeout=SESSION_TIMEOUT)
        self.addCleanup(registry.stop)
        await registry.start()
        self.assertTrue(registry.connected)
        return registry

    async def test_only_members_write(self) -> None:
        """
        A member's instance and data node cannot be added to, changed or
        removed by a client without the credentials: neither through a
        registry (a clear RegistryError) nor a plain kazoo client; anyone
        may read them by default.
        """
        member = await self.from_url(self.members_url())
        self.assertEqual(member.credentials.user, "member")
        self.assertEqual(member.credentials.secret, "s@cret")
        self.assertNotIn("s@cret", repr(member))
        self.assertNotIn("s%40cret", repr(member))
        good = instance("Guarded", 9300)
        await member.add(good)
        await member.set_value("cluster/desired", b"v1")

        stranger = await self.started()
        self.assertEqual(await stranger.query(Query()), [good])
        self.assertEqual(await stranger.get_value("cluster/desired"), b"v1")
        fake = instance("Guarded", 9301, uuid="fake")
        with self.assertRaises(RegistryError) as caught:
            await stranger.add(fake)
        self.assertIn("not authorized", str(caught.exception))
        self.assertIn("credentials", str(caught.exception))
        with self.assertRaises(RegistryError):
            await stranger.remove(good)
        with self.assertRaises(RegistryError):
            await stranger.update(attr.evolve(good, registered=False))
        with self.assertRaises(RegistryError) as caught:
            await stranger.set_value("cluster/desired", b"evil")
        self.assertIn("not authorized", str(caught.exception))
        with self.assertRaises(RegistryError):
            await stranger.delete_value("cluster/desired")
        self.assertEqual(await member.query(Query()), [good])
        self.assertTrue((await member.query(Query()))[0].registered)
        self.assertEqual(await member.get_value("cluster/desired"), b"v1")

        from kazoo.exceptions import NoAuthError

        zk = self.kazoo()
        services = f"{self.chroot}/services"
        node = f"{services}{good.path}"
        for attempt in (
            lambda: zk.create(f"{services}/Evil", b""),
            lambda: zk.create(f"{services}/Guarded/1/Test/127.0.0.1/9999", fake.to_json()),
            lambda: zk.delete(node),
            lambda: zk.set(node, b"{}"),
            lambda: zk.set(f"{self.chroot}/data/cluster%2Fdesired", b"evil"),
            lambda: zk.create(f"{self.chroot}/evil", b""),
        ):
            self.assertRaises(NoAuthError, attempt)

        # Another member (same credentials, its own session) may.
        peer = await self.from_url(self.members_url())
        await peer.remove(good)
        self.assertEqual(await member.query(Query()), [])

    async def test_members_only_reads(self) -> None:
        """
        With C{read=members}, a client without credentials cannot read the
        tree (a clear RegistryError); members can.
        """
        member = await self.from_url(self.members_url(read="members"))
        self.assertIn("read=members", member.url)
        good = instance("Secret", 9310)
        await member.add(good)
        await member.set_value("anything", b"hidden")
        stranger = await self.started()
        with self.assertRaises(RegistryError) as caught:
            await stranger.query(Query())
        self.assertIn("not authorized", str(caught.exception))
        with self.assertRaises(RegistryError):
            await stranger.get_value("anything")
        reader = await self.from_url(self.members_url(read="members"))
        self.assertEqual(await reader.query(Query()), [good])
        self.assertEqual(await reader.get_value("anything"), b"hidden")

    async def test_credentials_file(self) -> None:
        """
        C{?auth=FILE} reads C{user:secret} from a file only its owner may
        read; a file others may read is refused with a clear error.
        """
        directory = tempfile.mkdtemp(prefix="skynet-zk-credentials-")
        self.addCleanup(shutil.rmtree, directory, True)
        path = os.path.join(directory, "zk-credentials")
        with open(path, "w") as f:
            f.write("member:s@cret\n")
        os.chmod(path, 0o644)
        with self.assertRaises(RegistryError) as caught:
            ZooKeeperRegistry.from_url(f"zk://{self.cluster.hosts}{self.chroot}?auth={path}")
        self.assertIn("chmod 600", str(caught.exception))
        os.chmod(path, 0o600)
        url = f"zk://{self.cluster.hosts}{self.chroot}?auth={path}"
        member = await self.from_url(url)
        self.assertIn(f"auth={path}", member.url)
        self.assertNotIn("s@cret", member.url)
        good = instance("Filed", 9320)
        await member.add(good)
        # The same identity as the inline credentials.
        inline = await self.from_url(self.members_url())
        await inline.update(attr.evolve(good, registered=False))
        stranger = await self.started()
        with self.assertRaises(RegistryError):
            await stranger.remove(good)

    async def test_existing_chroot_is_secured(self) -> None:
        """
        A chroot made before ACLs were turned on gets the members' ACL on
        its top nodes when a member connects.
        """
        open_registry = await self.started()
        await open_registry.add(instance("Before", 9330))
        await open_registry.stop()
        await self.from_url(self.members_url())
        zk = self.kazoo()
        from kazoo.exceptions import NoAuthError

        self.assertRaises(NoAuthError, zk.create, f"{self.chroot}/services/Evil", b"")
        acl, _ = zk.get_acls(f"{self.chroot}/services")
        self.assertEqual(sorted(a.id.scheme for a in acl), ["digest", "world"])


class OneShotWatchConformanceTests(ZooKeeperConformanceTests):
    """
    The conformance suite with one-shot watches, as on servers before 3.6.
    """

    async def started(self, **kwargs: Any) -> ZooKeeperRegistry:
        kwargs.setdefault("persistent_watches", False)
        return await super().started(**kwargs)


class _FakeKazoo:
    """
    Just what L{_ReadBatch} uses of a kazoo client: the multiRead requests
    it sends are recorded; single reads answer at once.
    """

    def __init__(self) -> None:
        self.requests: list[Any] = []
        self.answers: list[Deferred] = []
        self.alone: list[str] = []
        self.handler = self

    def async_result(self) -> object:
        return object()

    def _call(self, request: Any, result: object) -> None:
        self.requests.append(request)

    def get_async(self, path: str) -> Any:
        self.alone.append(path)
        return (path.encode(), None)

    def call(self, method: Any, *args: Any) -> Deferred:
        """
        The registry's C{_call}: a multiRead's Deferred is the test's to
        fire; a single read answers with the path as data.
        """
        if method == self.get_async:
            return succeed(method(*args))
        method()
        d: Deferred = Deferred()
        self.answers.append(d)
        return d


class ReadBatchTests(TestCase):
    """
    L{_ReadBatch}, without a server: reads of one reactor turn go out as
    multiRead requests of at most L{READ_BATCH}, grouped reads fire once with
    every result or error in order, and a server without multiRead gets one
    read per node.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.zk = _FakeKazoo()
        self.unsupported: list[bool] = []
        self.batch = _ReadBatch(
            self.zk, self.zk.call, self.clock, lambda: self.unsupported.append(True)
        )

    def test_grouped_reads_in_batches(self) -> None:
        paths = [f"/s/{n}" for n in range(READ_BATCH * 2 + 3)]
        single = self.batch.read(_GET_DATA, "/alone")
        group = self.batch.read_many(_GET_DATA, paths)
        self.clock.advance(0)
        sizes = [len(r.operations) for r in self.zk.requests]
        self.assertEqual(sizes, [READ_BATCH, READ_BATCH, 4])
        sent = [path for r in self.zk.requests for _, path in r.operations]
        self.assertEqual(sent, ["/alone"] + paths)
        self.assertNoResult(group)
        missing = NoNodeError()
        for request, answer in zip(self.zk.requests, self.zk.answers, strict=True):
            answer.callback(
                [missing if p == "/s/7" else (p.encode(), None) for _, p in request.operations]
            )
        self.assertEqual(self.successResultOf(single), (b"/alone", None))
        results = self.successResultOf(group)
        self.assertIs(results[7], missing)
        self.assertEqual(
            [r for n, r in enumerate(results) if n != 7],
            [(p.encode(), None) for n, p in enumerate(paths) if n != 7],
        )
        self.assertEqual(self.zk.alone, [])

    def test_multi_read_answer(self) -> None:
        """
        A multiRead answer, as ZooKeeper sends it, decodes into each read's
        result: data and stat, children, an error, a node without data.
        """
        stat = ZnodeStat(*range(11))
        buffer = bytearray()
        buffer += multiheader_struct.pack(_GET_DATA, False, 0)
        buffer += int_struct.pack(3) + b"abc" + stat_struct.pack(*stat)
        buffer += multiheader_struct.pack(_GET_CHILDREN, False, 0)
        buffer += int_struct.pack(2) + write_string("a") + write_string("b\u00e9")
        buffer += multiheader_struct.pack(-1, False, 0) + int_struct.pack(NoNodeError.code)
        buffer += multiheader_struct.pack(_GET_DATA, False, 0)
        buffer += int_struct.pack(-1) + stat_struct.pack(*stat)
        buffer += multiheader_struct.pack(-1, True, -1)
        results = _MultiRead([]).deserialize(bytes(buffer), 0)
        self.assertEqual(len(results), 4)
        self.assertEqual(results[0], (b"abc", stat))
        self.assertEqual(results[1], ["a", "b\u00e9"])
        self.assertIsInstance(results[2], NoNodeError)
        self.assertEqual(results[3], (None, stat))

    def test_empty_group(self) -> None:
        self.assertEqual(self.successResultOf(self.batch.read_many(_GET_DATA, [])), [])
        self.clock.advance(0)
        self.assertEqual(self.zk.requests, [])

    def test_connection_lost(self) -> None:
        """
        A multiRead that fails as a whole fails each of its reads: a single
        read's Deferred, and a group's entries (the group itself fires).
        """
        single = self.batch.read(_GET_DATA, "/alone")
        group = self.batch.read_many(_GET_DATA, ["/a", "/b"])
        self.clock.advance(0)
        lost = ConnectionLoss()
        self.zk.answers[0].errback(lost)
        self.failureResultOf(single, ConnectionLoss)
        self.assertEqual(self.successResultOf(group), [lost, lost])

    def test_server_without_multi_read(self) -> None:
        single = self.batch.read(_GET_DATA, "/alone")
        group = self.batch.read_many(_GET_DATA, ["/a", "/b"])
        self.clock.advance(0)
        self.zk.answers[0].errback(UnimplementedError())
        self.assertEqual(self.unsupported, [True])
        self.assertFalse(self.batch.supported)
        self.assertEqual(self.successResultOf(single), (b"/alone", None))
        self.assertEqual(self.successResultOf(group), [(b"/a", None), (b"/b", None)])
        # From now on, one read per node, without waiting for the turn to end.
        later = self.batch.read_many(_GET_DATA, ["/c"])
        self.assertEqual(self.successResultOf(later), [(b"/c", None)])
        self.assertEqual(self.zk.alone, ["/alone", "/a", "/b", "/c"])
        self.assertEqual(len(self.zk.requests), 1)


class URLTests(TestCase):
    """
    L{ZooKeeperRegistry.from_url}, without a server.
    """

    def test_credentials_in_url(self) -> None:
        registry = ZooKeeperRegistry.from_url("zk://u%3Ax:p%40ss@h1,h2:2182/s?read=members")
        self.assertEqual((registry.credentials.user, registry.credentials.secret), ("u", "x:p@ss"))
        self.assertFalse(registry.open_reads)
        self.assertEqual(registry.zk_hosts, "h1:2181,h2:2182")
        self.assertNotIn("p%40ss", registry.display_url)
        self.assertNotIn("p%40ss", repr(registry))
        again = ZooKeeperRegistry.from_url(registry.url)
        self.assertEqual(again.credentials, registry.credentials)
        for url in (
            "zk://h/s?read=members",
            "zk://u:p@h/s?auth=/nonexistent",
            "zk://h/s?auth=/nonexistent/file",
            "zk://h/s?read=everyone",
            "zk://:p@h/s",
        ):
            with self.assertRaises(RegistryError, msg=url) as caught:
                ZooKeeperRegistry.from_url(url)
            self.assertNotIn("p@h", str(caught.exception))

    def test_parses(self) -> None:
        registry = ZooKeeperRegistry.from_url(
            "zk://127.0.0.1:2181,127.0.0.2:2182/apps/skynet?session_timeout=2.5",
            reactor=reactor,
        )
        self.assertEqual(registry.zk_hosts, "127.0.0.1:2181,127.0.0.2:2182")
        self.assertEqual(registry.chroot, "/apps/skynet")
        self.assertEqual(registry.session_timeout, 2.5)
        self.assertEqual(
            registry.url,
            "zk://127.0.0.1:2181,127.0.0.2:2182/apps/skynet?session_timeout=2.5",
        )
        self.assertEqual(ZooKeeperRegistry.from_url(registry.url).url, registry.url)

    def test_defaults(self) -> None:
        registry = ZooKeeperRegistry.from_url("zk://localhost", reactor=reactor)
        self.assertEqual(registry.zk_hosts, "localhost:2181")
        self.assertEqual(registry.chroot, "/skynet")
        self.assertEqual(registry.session_timeout, 4.0)
        self.assertEqual(registry.url, "zk://localhost:2181/skynet")
        self.assertEqual(ZooKeeperRegistry.from_url("zk://[::1]:2182/").zk_hosts, "[::1]:2182")
        explicit = ZooKeeperRegistry.from_url("zk://h?session_timeout=9", session_timeout=3)
        self.assertEqual(explicit.session_timeout, 3.0)

    def test_bad_urls(self) -> None:
        for url in [
            "http://127.0.0.1:2181/skynet",
            "127.0.0.1:2181",
            "zk://",
            "zk:///skynet",
            "zk://h:port/skynet",
            "zk://h:99999/skynet",
            "zk://h1:2181,,h2:2181/skynet",
            "zk://h/sky/../net",
            "zk://h/skynet?session_timeout=abc",
            "zk://h/skynet?session_timeout=0",
            "zk://h/skynet?session_timeout=-1",
            "zk://h/skynet?session_timeout=nan",
            "zk://h/skynet?session_timeout=1&session_timeout=2",
            "zk://h/skynet?chroot=/x",
            "zk://h/skynet#frag",
            "zk://user@h/skynet",
            "zk://[::1/skynet",
        ]:
            with self.assertRaises(RegistryError, msg=url) as caught:
                ZooKeeperRegistry.from_url(url)
            self.assertIn("ZooKeeper URL", str(caught.exception))


class Holder(ProcessProtocol):
    """
    The C{python -m tests.zkserver hold} child.
    """

    def __init__(self) -> None:
        self.output = b""
        self.ready: int | None = None
        self.ended: Deferred = Deferred()
        self.pid: int = 0

    def connectionMade(self) -> None:
        self.pid = self.transport.pid

    def outReceived(self, data: bytes) -> None:
        self.output += data
        for line in self.output.splitlines():
            if line.startswith(b"READY "):
                self.ready = int(line.split()[1])

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(None)

    def kill(self) -> Deferred | None:
        """
        SIGKILL the child (if still running); fires when it is reaped.
        """
        if self.ended.called:
            return None
        try:
            self.transport.signalProcess("KILL")
        except ProcessExitedAlready:
            pass
        return self.ended


def _with(instance: Instance, **changes: Any) -> Instance:
    return attr.evolve(instance, **changes)


def _watch_count(cluster: ZooKeeperCluster) -> int:
    """
    The watches (data and child) every server holds: C{mntr}'s
    C{zk_watch_count}.
    """
    total = 0
    for member in cluster.members:
        answer = four_letter_word(member.client_port, "mntr") or ""
        for line in answer.splitlines():
            key, _, value = line.partition("\t")
            if key == "zk_watch_count":
                total += int(value)
    return total
