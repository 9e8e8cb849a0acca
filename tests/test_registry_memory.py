"""
Tests for L{skynet.registry.memory}: the conformance suite on a fake clock,
and what is particular to the in-memory registry.
"""

from __future__ import annotations

import attr
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from skynet.registry import (
    IRegistry,
    MemoryRegistry,
    Query,
    RegistryError,
    registry_from_url,
)
from skynet.registry.memory import MemoryStore
from tests.registry_conformance import (
    RecordingListener,
    RegistryConformanceMixin,
    make_instance,
)


class MemoryRegistryConformanceTests(RegistryConformanceMixin, TestCase):
    """
    The conformance suite on L{MemoryRegistry}, with a L{Clock}.
    """

    max_settles = 10

    def setUp(self) -> None:
        self.clock = Clock()

    async def _started(self, registry: MemoryRegistry) -> MemoryRegistry:
        self.addCleanup(registry.stop)
        await registry.start()
        return registry

    async def make_registry(self) -> MemoryRegistry:
        return await self._started(MemoryRegistry(reactor=self.clock))

    async def make_peer_registry(self, registry) -> MemoryRegistry:
        return await self._started(MemoryRegistry(reactor=self.clock, store=registry.store))

    async def add_doomed(self, registry, instances) -> MemoryRegistry:
        owner = await self.make_peer_registry(registry)
        for instance in instances:
            await owner.add(instance)
        return owner

    async def crash_owner(self, owner: MemoryRegistry) -> None:
        owner.crash()

    async def settle(self) -> None:
        self.clock.advance(0)


class MemoryRegistryTests(TestCase):
    """
    What only the in-memory registry does.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.registry = MemoryRegistry(reactor=self.clock)
        self.addCleanup(self.registry.stop)

    def test_interface(self) -> None:
        self.assertTrue(verifyObject(IRegistry, self.registry))

    def test_events_are_not_reentrant(self) -> None:
        """
        The snapshot and every event arrive from the reactor, never inside
        C{watch} or the call that made the change.
        """
        listener = RecordingListener()
        self.registry.watch(Query(), listener)
        self.assertEqual(listener.events, [])
        self.clock.advance(0)
        self.assertEqual(listener.events, [("snapshot", [])])
        instance = make_instance()
        self.successResultOf(self.registry.add(instance))
        self.assertEqual(len(listener.events), 1)
        self.clock.advance(0)
        self.assertEqual(listener.events[1:], [("added", instance)])

    def test_changes_in_order(self) -> None:
        """
        Several changes before the reactor runs are all delivered, in order.
        """
        listener = RecordingListener()
        instance = make_instance()
        unregistered = attr.evolve(instance, registered=False)
        self.registry.watch(Query(), listener)
        self.registry.add(instance)
        self.registry.update(unregistered)
        self.registry.remove(unregistered)
        self.clock.advance(0)
        self.assertEqual(
            listener.events,
            [
                ("snapshot", []),
                ("added", instance),
                ("updated", unregistered),
                ("removed", unregistered),
            ],
        )

    def test_snapshot_taken_at_watch(self) -> None:
        """
        The snapshot is the state when C{watch} was called; a change made
        after it, before delivery, comes as an event.
        """
        before = make_instance()
        self.registry.add(before)
        listener = RecordingListener()
        self.registry.watch(Query(), listener)
        after = make_instance()
        self.registry.add(after)
        self.clock.advance(0)
        self.assertEqual(listener.events, [("snapshot", [before]), ("added", after)])

    def test_new_uuid_at_same_path(self) -> None:
        """
        A node rewritten with another uuid (a restarted instance on the same
        port) is the old instance removed and the new one added.
        """
        old = make_instance()
        new = attr.evolve(old, uuid="another")
        self.registry.add(old)
        listener = RecordingListener()
        self.registry.watch(Query(), listener)
        self.clock.advance(0)
        self.registry.add(new)
        self.clock.advance(0)
        self.assertEqual(listener.events, [("snapshot", [old]), ("removed", old), ("added", new)])

    def test_crash(self) -> None:
        """
        C{crash} drops the object's nodes and stats, watchers on the store
        see the removals, and the crashed object refuses further writes.
        """
        service = MemoryRegistry(reactor=self.clock, store=self.registry.store)
        instance = make_instance()
        service.add(instance)
        service.publish_stats(instance, {"Clients": 1})
        listener = RecordingListener()
        self.registry.watch(Query(), listener)
        self.clock.advance(0)
        service.crash()
        self.clock.advance(0)
        self.assertEqual(listener.events, [("snapshot", [instance]), ("removed", instance)])
        self.assertEqual(self.successResultOf(self.registry.query(Query())), [])
        self.assertIsNone(self.successResultOf(self.registry.get_stats(instance)))
        self.failureResultOf(service.add(instance), RegistryError)

    def test_update_keeps_owner(self) -> None:
        """
        An update by another object does not take the node over: it still
        goes when its creator stops.
        """
        other = MemoryRegistry(reactor=self.clock, store=self.registry.store)
        instance = make_instance()
        self.registry.add(instance)
        other.update(attr.evolve(instance, registered=False))
        other.stop()
        self.assertEqual(len(self.successResultOf(self.registry.query(Query()))), 1)
        self.registry.stop()
        self.assertEqual(self.successResultOf(other.query(Query())), [])

    def test_listener_failure_is_logged(self) -> None:
        """
        A listener that raises is logged; other listeners still get events.
        """

        class Broken(RecordingListener):
            def added(self, instance):
                raise ZeroDivisionError()

        broken = Broken()
        working = RecordingListener()
        self.registry.watch(Query(), broken)
        self.registry.watch(Query(), working)
        instance = make_instance()
        self.registry.add(instance)
        self.clock.advance(0)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertEqual(working.events, [("snapshot", []), ("added", instance)])

    def test_stop_leaves_no_delayed_calls(self) -> None:
        """
        Stopping with events pending cancels their delivery.
        """
        self.registry.watch(Query(), RecordingListener())
        self.registry.add(make_instance())
        self.assertTrue(self.clock.getDelayedCalls())
        self.registry.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_shared_store(self) -> None:
        """
        Objects built on one store see one registry; a fresh store is empty.
        """
        instance = make_instance()
        self.registry.add(instance)
        peer = MemoryRegistry(reactor=self.clock, store=self.registry.store)
        self.assertEqual(self.successResultOf(peer.query(Query())), [instance])
        alone = MemoryRegistry(reactor=self.clock, store=MemoryStore())
        self.assertEqual(self.successResultOf(alone.query(Query())), [])

    def test_named_store_url(self) -> None:
        """
        C{memory://name} URLs give registries on one process-wide store per
        name, each owning its own nodes; their C{url} leads back to it.
        """
        first = registry_from_url("memory://test_named_store_url", reactor=self.clock)
        second = registry_from_url(first.url, reactor=self.clock)
        other = registry_from_url("memory://test_named_store_url-other", reactor=self.clock)
        self.assertIsInstance(first, MemoryRegistry)
        self.assertIsNot(first, second)
        self.assertIs(first.store, second.store)
        self.assertIsNot(first.store, other.store)
        instance = make_instance()
        first.add(instance)
        self.assertEqual(self.successResultOf(second.query(Query())), [instance])
        first.stop()
        self.assertEqual(self.successResultOf(second.query(Query())), [])
