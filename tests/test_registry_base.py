"""
The registry's records: the Go JSON shape, paths, queries, and the diffing
every backend's watches are built on.
"""

from __future__ import annotations

import json

from twisted.trial.unittest import SynchronousTestCase

from skynet.registry.base import Address, Instance, InstanceDiff, Query, RegistryError


def instance(uuid: str = "u1", **kw) -> Instance:
    values = dict(uuid=uuid, name="Fibonacci", version="1", region="east", host="10.0.0.1",
                  port=9000, admin=Address("127.0.0.1", 9100))  # fmt: skip
    values.update(kw)
    return Instance(**values)


class Events:
    def __init__(self) -> None:
        self.events: list[tuple[str, object]] = []

    def snapshot(self, instances):
        self.events.append(("snapshot", [i.uuid for i in instances]))

    def added(self, i):
        self.events.append(("added", i.uuid))

    def updated(self, i):
        self.events.append(("updated", i.uuid))

    def removed(self, i):
        self.events.append(("removed", i.uuid))


class InstanceTests(SynchronousTestCase):
    def test_go_shape(self) -> None:
        doc = json.loads(instance(pid=42).to_json())
        self.assertEqual(doc["Config"], {
            "UUID": "u1", "Name": "Fibonacci", "Version": "1", "Region": "east",
            "ServiceAddr": {"IPAddress": "10.0.0.1", "Port": 9000, "MaxPort": 0},
            "AdminAddr": {"IPAddress": "127.0.0.1", "Port": 9100, "MaxPort": 0},
            "CriticalClientCount": 100, "CriticalAverageResponseTime": 5_000_000_000,
        })  # fmt: skip
        self.assertEqual(doc["Registered"], True)
        self.assertEqual(doc["PID"], 42)

    def test_round_trip(self) -> None:
        original = instance(registered=False, pid=7, extra={"k": "v"}, admin=None)
        self.assertEqual(Instance.from_json(original.to_json()), original)

    def test_path(self) -> None:
        self.assertEqual(instance().path, "/Fibonacci/1/east/10.0.0.1/9000")
        for bad in ("", "a/b", "..", "x\x00"):
            with self.subTest(bad=bad), self.assertRaises(ValueError):
                _ = instance(name=bad).path

    def test_malformed(self) -> None:
        for data in (b"not json", b"[]", b'{"Config": {}}', b'{"Config": {"UUID": 1}}'):
            with self.subTest(data=data), self.assertRaises(RegistryError):
                Instance.from_json(data)

    def test_query(self) -> None:
        i = instance()
        self.assertTrue(Query().matches(i))
        self.assertTrue(Query(service="Fibonacci", version="1", region="east", host="10.0.0.1",
                              port=9000, uuid="u1", registered=True).matches(i))  # fmt: skip
        for q in (Query(service="fibonacci"), Query(port=9001), Query(registered=False)):
            self.assertFalse(q.matches(i))


class InstanceDiffTests(SynchronousTestCase):
    def test_feed(self) -> None:
        events = Events()
        diff = InstanceDiff(Query(registered=True), events)
        a, b = instance("a"), instance("b", port=9001)
        diff.feed([b, a])
        diff.feed([a, b])  # nothing changed: no events
        diff.feed([instance("a", registered=False), b, instance("c", port=9002)])
        diff.feed([instance("c", port=9002, version="2")])
        self.assertEqual(events.events, [
            ("snapshot", ["a", "b"]), ("removed", "a"), ("added", "c"),
            ("removed", "b"), ("updated", "c"),
        ])  # fmt: skip

    def test_change_takeover_of_a_node(self) -> None:
        """
        A new process on the same host and port replaces the node: the old
        instance is removed and the new one added.
        """
        events = Events()
        diff = InstanceDiff(Query(), events)
        old = instance("old")
        diff.feed([old])
        diff.change(old, instance("new"))
        diff.change(instance("new"), None)
        self.assertEqual(events.events, [("snapshot", ["old"]), ("removed", "old"),
                                         ("added", "new"), ("removed", "new")])  # fmt: skip


class QueryDescribeTests(SynchronousTestCase):
    """
    L{Query.describe}: what both clients' errors name.
    """

    def test_describe(self) -> None:
        self.assertEqual(Query(service="Fibonacci").describe(), "Fibonacci")
        self.assertEqual(
            Query(service="Fibonacci", version="2", host="10.0.0.1", port=9).describe(),
            "Fibonacci (version=2, host=10.0.0.1)",
        )
        self.assertEqual(Query(region="eu").describe(), "any service (region=eu)")
