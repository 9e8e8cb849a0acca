"""
The behaviour every registry backend must share, as a mixin of tests.

A backend's test module subclasses L{RegistryConformanceMixin} together with
L{twisted.trial.unittest.TestCase} and fills in the hooks::

    class MyRegistryConformanceTests(RegistryConformanceMixin, TestCase):
        async def make_registry(self): ...
        async def make_peer_registry(self, registry): ...
        async def add_doomed(self, registry, instances): ...
        async def crash_owner(self, owner): ...
        async def settle(self): ...

The tests only use L{IRegistry} (and L{ListingMixin}'s listings), so the
same assertions hold for the in-memory, file and ZooKeeper backends.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Callable
from typing import Any

import attr
from zope.interface import implementer
from zope.interface.verify import verifyObject

from skynet.registry.base import (
    MAX_VALUE_SIZE,
    IInstanceListener,
    Instance,
    IRegistry,
    Query,
    sort_instances,
)

_ports = itertools.count(20000)


def make_instance(**fields: Any) -> Instance:
    """
    An instance with a fresh uuid and port unless given.
    """
    defaults: dict[str, Any] = {
        "uuid": str(uuid.uuid4()),
        "name": "TestService",
        "version": "1",
        "region": "Development",
        "host": "127.0.0.1",
        "port": next(_ports),
    }
    defaults.update(fields)
    return Instance(**defaults)


@implementer(IInstanceListener)
class RecordingListener:
    """
    Records a watch's events as C{(kind, payload)} tuples, and when each
    arrived (C{time.monotonic()}).
    """

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []
        self.times: list[float] = []

    def _record(self, kind: str, payload: Any) -> None:
        self.events.append((kind, payload))
        self.times.append(time.monotonic())

    def snapshot(self, instances: list[Instance]) -> None:
        self._record("snapshot", list(instances))

    def added(self, instance: Instance) -> None:
        self._record("added", instance)

    def updated(self, instance: Instance) -> None:
        self._record("updated", instance)

    def removed(self, instance: Instance) -> None:
        self._record("removed", instance)


class RegistryConformanceMixin:
    """
    Tests every L{IRegistry} backend must pass.

    Hooks a subclass provides:

      - C{async make_registry() -> IRegistry}: a I{started} registry on an
        empty backend private to this test.  The hook arranges for it to be
        stopped at cleanup (C{addCleanup}); tests may have stopped it
        already, so stopping must be idempotent.
      - C{async make_peer_registry(registry) -> IRegistry}: another started
        registry object on the same backend as C{registry}, owning its own
        nodes, as another process would (another ZooKeeper session); same
        cleanup rule.
      - C{async add_doomed(registry, instances) -> owner}: have C{instances}
        added to C{registry}'s backend by an owner that can be crashed (a
        peer registry object, a child process, a ZooKeeper session), and
        return whatever L{crash_owner} needs.  Leave nothing running at
        cleanup.
      - C{async crash_owner(owner)}: kill that owner abruptly, the way a
        process dies: it must not clean up after itself.
      - C{async settle()}: let time pass for events in flight (one step; the
        tests call it repeatedly until what they expect arrives, up to
        C{max_settles} times).  For a L{twisted.internet.task.Clock},
        C{clock.advance(0)}; for real I/O, a short sleep.

    @ivar max_settles: how many L{settle} calls to wait for an expected
        event at most (so C{max_settles} times one settle is the timeout).
    @ivar crash_detection_seconds: set by L{test_crash_detection}: the
        seconds from L{crash_owner} returning to the watch reporting the
        removal (0 with a fake clock).
    """

    max_settles = 100
    crash_detection_seconds: float | None = None

    # Hooks.

    async def make_registry(self) -> IRegistry:
        raise NotImplementedError

    async def make_peer_registry(self, registry: IRegistry) -> IRegistry:
        raise NotImplementedError

    async def add_doomed(self, registry: IRegistry, instances: list[Instance]) -> Any:
        raise NotImplementedError

    async def crash_owner(self, owner: Any) -> None:
        raise NotImplementedError

    async def settle(self) -> None:
        raise NotImplementedError

    # Helpers.

    async def wait_for(self, predicate: Callable[[], Any], what: str) -> None:
        """
        Settle until C{predicate()} is true.

        @raise AssertionError: naming C{what} if it never is.
        """
        for _ in range(self.max_settles):
            if predicate():
                return
            await self.settle()
        if not predicate():
            self.fail(f"timed out waiting for {what}")  # type: ignore[attr-defined]

    async def events_after(self, listener: RecordingListener, count: int) -> list:
        """
        Wait until C{listener} has C{count} events, then a little longer to
        catch any extra one, and return them all.
        """
        await self.wait_for(lambda: len(listener.events) >= count, f"{count} events")
        for _ in range(3):
            await self.settle()
        return listener.events

    def watch(self, registry: IRegistry, query: Query) -> RecordingListener:
        listener = RecordingListener()
        watch = registry.watch(query, listener)
        self.addCleanup(watch.stop)  # type: ignore[attr-defined]
        return listener

    async def snapshot_of(self, registry: IRegistry, query: Query) -> RecordingListener:
        """
        Start a watch and wait for its snapshot.
        """
        listener = self.watch(registry, query)
        await self.wait_for(lambda: listener.events, "the snapshot")
        return listener

    # The tests.

    async def test_interface(self) -> None:
        """
        The registry provides L{IRegistry}, with a string URL.
        """
        registry = await self.make_registry()
        self.assertTrue(verifyObject(IRegistry, registry))
        self.assertIsInstance(registry.url, str)

    async def test_add_query_update_remove(self) -> None:
        """
        An added instance is found; an update rewrites it; a removal deletes
        it.
        """
        registry = await self.make_registry()
        instance = make_instance(extra={"tag": "x"})
        self.assertEqual(await registry.query(Query()), [])
        await registry.add(instance)
        found = await registry.query(Query())
        self.assertEqual(found, [instance])
        self.assertEqual(found[0].extra, {"tag": "x"})

        unregistered = attr.evolve(instance, registered=False)
        await registry.update(unregistered)
        found = await registry.query(Query())
        self.assertEqual(found, [unregistered])
        self.assertFalse(found[0].registered)

        await registry.remove(unregistered)
        self.assertEqual(await registry.query(Query()), [])

    async def test_get_by_uuid(self) -> None:
        """
        C{get(uuid)} finds the live instance with that uuid in its latest
        state, a peer's too, and L{None} for an unknown or removed uuid, or
        one whose node another instance has taken over.
        """
        registry = await self.make_registry()
        peer = await self.make_peer_registry(registry)
        mine = make_instance(name="Mine")
        theirs = make_instance(name="Theirs")
        self.assertIsNone(await registry.get(mine.uuid))
        await registry.add(mine)
        await peer.add(theirs)
        self.assertEqual(await registry.get(mine.uuid), mine)
        self.assertEqual(await registry.get(theirs.uuid), theirs)
        self.assertIsNone(await registry.get("no-such-uuid"))
        # With a watch running (a cache kept up to date) too.
        await self.snapshot_of(registry, Query())
        changed = attr.evolve(mine, registered=False, critical_client_count=3)
        await registry.update(changed)
        found = await registry.get(mine.uuid)
        self.assertEqual(found, changed)
        self.assertFalse(found.registered)
        await peer.remove(theirs)
        self.assertIsNone(await registry.get(theirs.uuid))
        successor = make_instance(name="Mine", port=mine.port)
        await peer.add(successor)
        self.assertIsNone(await registry.get(mine.uuid))
        self.assertEqual(await registry.get(successor.uuid), successor)

    async def test_add_again_overwrites(self) -> None:
        """
        Adding the same instance again replaces its node; there is still
        one.
        """
        registry = await self.make_registry()
        instance = make_instance()
        await registry.add(instance)
        changed = attr.evolve(instance, registered=False, critical_client_count=7)
        await registry.add(changed)
        found = await registry.query(Query())
        self.assertEqual(found, [changed])
        self.assertEqual(found[0].critical_client_count, 7)

    async def test_remove_absent(self) -> None:
        """
        Removing an instance that is not there (or no longer) is fine.
        """
        registry = await self.make_registry()
        kept = make_instance()
        await registry.add(kept)
        self.assertIsNone(await registry.remove(make_instance()))
        gone = make_instance()
        await registry.add(gone)
        await registry.remove(gone)
        self.assertIsNone(await registry.remove(gone))
        self.assertEqual(await registry.query(Query()), [kept])

    async def test_remove_leaves_a_successor(self) -> None:
        """
        When a new instance has taken over the host and port of an old one
        (a new process on a freed port), removing the old one leaves the
        new one's node alone.
        """
        registry = await self.make_registry()
        peer = await self.make_peer_registry(registry)
        old = make_instance()
        await registry.add(old)
        new = make_instance(port=old.port)
        await peer.add(new)
        await registry.remove(old)
        self.assertEqual([i.uuid for i in await peer.query(Query())], [new.uuid])

    def _four(self) -> list[Instance]:
        return [
            make_instance(name="A", version="v1", region="r1", host="10.0.0.1", port=1001),
            make_instance(
                name="A",
                version="v2",
                region="r1",
                host="10.0.0.2",
                port=1002,
                registered=False,
            ),
            make_instance(name="B", version="v1", region="r2", host="10.0.0.1", port=1003),
            make_instance(name="B", version="v2", region="r2", host="10.0.0.3", port=1001),
        ]

    async def test_query_by_each_field(self) -> None:
        """
        Each field of L{Query} selects on its own (L{None} matches
        anything), the results sorted by path.
        """
        registry = await self.make_registry()
        a, b, c, d = self._four()
        for instance in (d, c, b, a):
            await registry.add(instance)
        cases = [
            (Query(), [a, b, c, d]),
            (Query(service="A"), [a, b]),
            (Query(version="v1"), [a, c]),
            (Query(region="r2"), [c, d]),
            (Query(host="10.0.0.1"), [a, c]),
            (Query(port=1001), [a, d]),
            (Query(uuid=b.uuid), [b]),
            (Query(registered=True), [a, c, d]),
            (Query(registered=False), [b]),
            (Query(service="B", version="v2"), [d]),
            (Query(service="A", region="r2"), []),
            (Query(service="Nothing"), []),
        ]
        for query, expected in cases:
            self.assertEqual(await registry.query(query), expected, query)

    async def test_listings(self) -> None:
        """
        services/versions/regions/hosts list the distinct values, sorted,
        optionally within a query.
        """
        registry = await self.make_registry()
        a, b, c, d = self._four()
        for instance in (a, b, c, d):
            await registry.add(instance)
        self.assertEqual(await registry.services(), ["A", "B"])
        self.assertEqual(await registry.versions(), ["v1", "v2"])
        self.assertEqual(await registry.versions(Query(service="B", region="r2")), ["v1", "v2"])
        self.assertEqual(await registry.regions(), ["r1", "r2"])
        self.assertEqual(await registry.regions(Query(service="A")), ["r1"])
        self.assertEqual(await registry.hosts(), ["10.0.0.1", "10.0.0.2", "10.0.0.3"])
        self.assertEqual(await registry.hosts(Query(registered=True)), ["10.0.0.1", "10.0.0.3"])
        self.assertEqual(await registry.instances(Query(service="B")), [c, d])

    async def test_stats(self) -> None:
        """
        Statistics are published and read back per instance, seen by a
        peer, rewritten, and go with the instance.
        """
        registry = await self.make_registry()
        peer = await self.make_peer_registry(registry)
        instance = make_instance()
        other = make_instance()
        await registry.add(instance)
        await registry.add(other)
        self.assertIsNone(await registry.get_stats(instance))
        stats = {
            "Clients": 2,
            "StartTime": "2013-05-01T10:00:00Z+0000",
            "LastRequest": "2013-05-01T10:00:05Z+0000",
            "RequestsServed": 10,
            "AverageResponseTime": 1500000,
        }
        await registry.publish_stats(instance, stats)
        self.assertEqual(await registry.get_stats(instance), stats)
        self.assertEqual(await peer.get_stats(instance), stats)
        self.assertIsNone(await registry.get_stats(other))
        await registry.publish_stats(instance, {**stats, "Clients": 3})
        self.assertEqual((await peer.get_stats(instance))["Clients"], 3)
        await registry.remove(instance)
        self.assertIsNone(await registry.get_stats(instance))

    async def test_watch_events(self) -> None:
        """
        A watch delivers the matching instances as a snapshot, then
        added/updated/removed in order, and nothing about other instances.
        """
        registry = await self.make_registry()
        first = make_instance(name="Watched")
        await registry.add(first)
        await registry.add(make_instance(name="Other"))
        listener = await self.snapshot_of(registry, Query(service="Watched"))
        self.assertEqual(listener.events, [("snapshot", [first])])

        second = make_instance(name="Watched")
        await registry.add(second)
        await self.wait_for(lambda: len(listener.events) >= 2, "added")
        changed = attr.evolve(second, critical_client_count=5)
        await registry.update(changed)
        await self.wait_for(lambda: len(listener.events) >= 3, "updated")
        await registry.remove(first)
        await registry.add(make_instance(name="Other"))
        events = await self.events_after(listener, 4)
        self.assertEqual(
            events,
            [
                ("snapshot", [first]),
                ("added", second),
                ("updated", changed),
                ("removed", first),
            ],
        )
        self.assertEqual(events[2][1].critical_client_count, 5)

    async def test_watch_snapshot_sorted(self) -> None:
        """
        The snapshot holds every matching instance, sorted by path.
        """
        registry = await self.make_registry()
        a, b, c, d = self._four()
        for instance in (d, b, c, a):
            await registry.add(instance)
        listener = await self.snapshot_of(registry, Query(registered=True))
        self.assertEqual(listener.events, [("snapshot", [a, c, d])])

    async def test_unregister_reregister(self) -> None:
        """
        Under a C{registered=True} query, unregistering is a removal (of the
        last registered state) and registering again an addition.
        """
        registry = await self.make_registry()
        instance = make_instance()
        await registry.add(instance)
        listener = await self.snapshot_of(registry, Query(service=instance.name, registered=True))
        unregistered = attr.evolve(instance, registered=False)
        await registry.update(unregistered)
        await self.wait_for(lambda: len(listener.events) >= 2, "removal")
        await registry.update(instance)
        events = await self.events_after(listener, 3)
        self.assertEqual(
            events,
            [("snapshot", [instance]), ("removed", instance), ("added", instance)],
        )
        self.assertTrue(events[1][1].registered)
        self.assertTrue(events[2][1].registered)

    async def test_peer_changes_are_seen(self) -> None:
        """
        A watch sees what another registry object (process) on the same
        backend adds, updates and removes; queries too.
        """
        registry = await self.make_registry()
        peer = await self.make_peer_registry(registry)
        listener = await self.snapshot_of(registry, Query())
        instance = make_instance()
        await peer.add(instance)
        await self.wait_for(lambda: len(listener.events) >= 2, "added")
        self.assertEqual(await registry.query(Query()), [instance])
        unregistered = attr.evolve(instance, registered=False)
        await peer.update(unregistered)
        await self.wait_for(lambda: len(listener.events) >= 3, "updated")
        await peer.remove(unregistered)
        events = await self.events_after(listener, 4)
        self.assertEqual(
            events,
            [
                ("snapshot", []),
                ("added", instance),
                ("updated", unregistered),
                ("removed", unregistered),
            ],
        )
        self.assertFalse(events[2][1].registered)
        self.assertEqual(await registry.query(Query()), [])

    async def test_watch_stop(self) -> None:
        """
        A stopped watch delivers nothing more; others go on.
        """
        registry = await self.make_registry()
        stopped = RecordingListener()
        watch = registry.watch(Query(), stopped)
        self.addCleanup(watch.stop)
        going = await self.snapshot_of(registry, Query())
        await self.wait_for(lambda: stopped.events, "the snapshot")
        watch.stop()
        watch.stop()
        instance = make_instance()
        await registry.add(instance)
        events = await self.events_after(going, 2)
        self.assertEqual(events, [("snapshot", []), ("added", instance)])
        self.assertEqual(stopped.events, [("snapshot", [])])

    async def test_stop_removes_owned_nodes(self) -> None:
        """
        Stopping a registry removes the nodes it owns (and their
        statistics), not those of others; watchers see the removal.
        """
        registry = await self.make_registry()
        peer = await self.make_peer_registry(registry)
        mine = make_instance()
        theirs = make_instance()
        await registry.add(mine)
        await registry.publish_stats(mine, {"Clients": 1})
        await peer.add(theirs)
        await peer.publish_stats(theirs, {"Clients": 2})
        listener = await self.snapshot_of(peer, Query())
        self.assertEqual(listener.events, [("snapshot", sort_instances([mine, theirs]))])
        await registry.stop()
        events = await self.events_after(listener, 2)
        self.assertEqual(events[1:], [("removed", mine)])
        self.assertEqual(await peer.query(Query()), [theirs])
        self.assertIsNone(await peer.get_stats(mine))
        self.assertEqual(await peer.get_stats(theirs), {"Clients": 2})

    async def test_crash_detection(self) -> None:
        """
        The instances of an owner that dies without cleaning up vanish from
        queries and watches; other instances stay.
        """
        registry = await self.make_registry()
        survivor = make_instance(name="Survivor")
        await registry.add(survivor)
        doomed = [make_instance(name="Doomed"), make_instance(name="Doomed")]
        owner = await self.add_doomed(registry, doomed)
        self.assertEqual(await registry.query(Query(service="Doomed")), sort_instances(doomed))
        listener = await self.snapshot_of(registry, Query())
        self.assertEqual(listener.events, [("snapshot", sort_instances([survivor, *doomed]))])

        await self.crash_owner(owner)
        crashed_at = time.monotonic()
        await self.wait_for(lambda: len(listener.events) >= 3, "the removals")
        self.crash_detection_seconds = listener.times[-1] - crashed_at
        print(
            f"\n{type(self).__name__}: crash seen by the watch"
            f" {self.crash_detection_seconds:.3f}s after crash_owner returned"
        )
        events = await self.events_after(listener, 3)
        self.assertEqual(
            sorted(events[1:], key=lambda e: e[1].uuid),
            sorted([("removed", i) for i in doomed], key=lambda e: e[1].uuid),
        )
        self.assertEqual(await registry.query(Query()), [survivor])
        self.assertEqual(await registry.services(), ["Survivor"])
        for instance in doomed:
            self.assertIsNone(await registry.get(instance.uuid))
        self.assertEqual(await registry.get(survivor.uuid), survivor)

    # Data nodes.

    async def test_value_set_get_replace_delete(self) -> None:
        """
        A data node is absent (L{None}) until set, holds exactly the bytes
        set (empty and binary values too), is replaced by the next set, and
        is gone after a delete; deleting an absent node is fine.
        """
        registry = await self.make_registry()
        self.assertIsNone(await registry.get_value("conformance/a"))
        await registry.set_value("conformance/a", b"one")
        self.assertEqual(await registry.get_value("conformance/a"), b"one")
        await registry.set_value("conformance/a", b"\x00\xff binary\n")
        self.assertEqual(await registry.get_value("conformance/a"), b"\x00\xff binary\n")
        await registry.set_value("conformance/a", b"")
        self.assertEqual(await registry.get_value("conformance/a"), b"")
        await registry.delete_value("conformance/a")
        self.assertIsNone(await registry.get_value("conformance/a"))
        self.assertIsNone(await registry.delete_value("conformance/a"))
        self.assertIsNone(await registry.delete_value("never/set"))

    async def test_value_keys_are_independent(self) -> None:
        """
        C{a}, C{a/b} and C{a%2Fb} are three keys: a key that is a prefix of
        another, or looks like another once escaped, is its own node; a
        leading dot is a key like any other.
        """
        registry = await self.make_registry()
        keys = ["a", "a/b", "a%2Fb", ".hidden", "a/b/c"]
        for index, key in enumerate(keys):
            await registry.set_value(key, str(index).encode())
        for index, key in enumerate(keys):
            self.assertEqual(await registry.get_value(key), str(index).encode(), key)
        await registry.delete_value("a/b")
        self.assertIsNone(await registry.get_value("a/b"))
        self.assertEqual(await registry.get_value("a"), b"0")
        self.assertEqual(await registry.get_value("a/b/c"), b"4")

    async def test_values_are_not_instances(self) -> None:
        """
        Data nodes are invisible to instance queries and watches.
        """
        registry = await self.make_registry()
        listener = await self.snapshot_of(registry, Query())
        await registry.set_value("services", b"{}")
        await registry.set_value("TestService/1/Development/127.0.0.1/1", b"{}")
        instance = make_instance()
        await registry.add(instance)
        events = await self.events_after(listener, 2)
        self.assertEqual(events, [("snapshot", []), ("added", instance)])
        self.assertEqual(await registry.query(Query()), [instance])

    async def test_value_seen_by_peer_and_outlives_writer(self) -> None:
        """
        A peer reads what another registry object wrote, and the value
        stays after its writer stops (data nodes belong to nobody).
        """
        registry = await self.make_registry()
        writer = await self.make_peer_registry(registry)
        await writer.set_value("cluster/desired", b'{"Fibonacci": 2}')
        self.assertEqual(await registry.get_value("cluster/desired"), b'{"Fibonacci": 2}')
        await writer.stop()
        self.assertEqual(await registry.get_value("cluster/desired"), b'{"Fibonacci": 2}')
        await registry.delete_value("cluster/desired")

    async def test_bad_keys_and_values(self) -> None:
        """
        Malformed keys and values are refused with a clear error, and
        nothing is written.
        """
        registry = await self.make_registry()
        for key in ["", "/a", "a/", "a//b", "a/../b", ".", "a/./b", "nul\x00", "x" * 300, 7]:
            with self.assertRaises(ValueError, msg=repr(key)):
                await registry.get_value(key)  # type: ignore[arg-type]
            with self.assertRaises(ValueError, msg=repr(key)):
                await registry.set_value(key, b"v")  # type: ignore[arg-type]
            with self.assertRaises(ValueError, msg=repr(key)):
                await registry.delete_value(key)  # type: ignore[arg-type]
            with self.assertRaises(ValueError, msg=repr(key)):
                registry.watch_value(key, lambda value: None)  # type: ignore[arg-type]
        with self.assertRaises(TypeError):
            await registry.set_value("k", "text")  # type: ignore[arg-type]
        with self.assertRaises(ValueError):
            await registry.set_value("k", b"x" * (MAX_VALUE_SIZE + 1))
        self.assertIsNone(await registry.get_value("k"))
        await registry.set_value("k", b"x" * MAX_VALUE_SIZE)
        self.assertEqual(len(await registry.get_value("k")), MAX_VALUE_SIZE)

    def watch_value(self, registry: IRegistry, key: str) -> list:
        seen: list = []
        watch = registry.watch_value(key, seen.append)
        self.addCleanup(watch.stop)  # type: ignore[attr-defined]
        return seen

    async def test_watch_value(self) -> None:
        """
        A value watch reports the current value (L{None} if absent) and
        then every change, its own and a peer's, including deletion and
        re-creation; a stopped watch reports nothing more.
        """
        registry = await self.make_registry()
        peer = await self.make_peer_registry(registry)
        seen = self.watch_value(registry, "watched/key")
        await self.wait_for(lambda: seen, "the first value")
        self.assertEqual(seen, [None])
        await registry.set_value("watched/key", b"1")
        await self.wait_for(lambda: seen[-1:] == [b"1"], "the value set")
        await peer.set_value("watched/key", b"2")
        await self.wait_for(lambda: seen[-1:] == [b"2"], "the peer's value")
        await peer.delete_value("watched/key")
        await self.wait_for(lambda: seen[-1:] == [None], "the deletion")
        await registry.set_value("watched/key", b"3")
        await self.wait_for(lambda: seen[-1:] == [b"3"], "the re-creation")
        await registry.set_value("watched/other", b"x")
        await registry.set_value("watched/key/below", b"x")
        await registry.set_value("watched", b"x")
        for _ in range(5):
            await self.settle()
        self.assertEqual(seen, [None, b"1", b"2", None, b"3"])

    async def test_watch_value_existing_and_stop(self) -> None:
        """
        A watch of an existing node starts with its value; the same value
        written again is not reported twice; after C{stop} nothing is
        reported, while another watch of the key goes on.
        """
        registry = await self.make_registry()
        await registry.set_value("k", b"v1")
        seen = self.watch_value(registry, "k")
        other = self.watch_value(registry, "k")
        await self.wait_for(lambda: seen and other, "the first values")
        self.assertEqual(seen, [b"v1"])
        calls: list = []
        watch = registry.watch_value("k", calls.append)
        await self.wait_for(lambda: calls, "the third watch's value")
        watch.stop()
        watch.stop()
        await registry.set_value("k", b"v1")
        await registry.set_value("k", b"v2")
        await self.wait_for(lambda: other[-1:] == [b"v2"], "the change")
        for _ in range(3):
            await self.settle()
        self.assertEqual(seen, [b"v1", b"v2"])
        self.assertEqual(calls, [b"v1"])

    async def test_watch_value_callback_failure(self) -> None:
        """
        A callback that raises is called again at the next change.
        """
        registry = await self.make_registry()
        seen: list = []

        def callback(value: bytes | None) -> None:
            seen.append(value)
            raise RuntimeError("callback bug")

        watch = registry.watch_value("k", callback)
        self.addCleanup(watch.stop)  # type: ignore[attr-defined]
        await self.wait_for(lambda: seen, "the first value")
        await registry.set_value("k", b"after")
        await self.wait_for(lambda: seen[-1:] == [b"after"], "the change")
        self.flushLoggedErrors(RuntimeError)  # type: ignore[attr-defined]
