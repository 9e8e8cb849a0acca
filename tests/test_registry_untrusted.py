"""
Every registry node is untrusted: bad nodes planted beside a healthy instance
in the embedded registry (files) and in a real ZooKeeper never fail a query,
a watch or C{sky instances}, are logged once each by path, and a
hypothesis fuzzer of nodes checks that every backend agrees with the strict
parser on what is an instance.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kazoo.client import KazooClient
from kazoo.exceptions import BadArgumentsError
from twisted.internet import reactor
from twisted.internet.task import Clock, deferLater
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase, TestCase

from skynet.registry.base import (
    MAX_NODE_SIZE,
    Address,
    Instance,
    NodeWarnings,
    Query,
    RegistryError,
    parse_json_node,
    parse_written_node,
    sort_instances,
)
from skynet.registry.files import FileRegistry, Owner, encode_node, write_atomically
from skynet.registry.memory import MemoryRegistry
from skynet.registry.zookeeper import ZooKeeperRegistry
from tests.netns import SharedZooKeeper
from tests.registry_conformance import RecordingListener, make_instance

ROOT = Path(__file__).resolve().parent.parent
_chroots = itertools.count(1)


def good_doc(port: int, **config: Any) -> dict[str, Any]:
    doc = Instance(
        uuid=f"bad-{port}",
        name="Bad",
        version="1",
        region="r",
        host="127.0.0.1",
        port=port,
        admin=Address("127.0.0.1", port + 1000),
    ).to_go()
    doc["Config"].update(config)
    return doc


def _dumps(doc: Any) -> bytes:
    return json.dumps(doc).encode()


def bad_nodes() -> dict[int, bytes]:
    """
    Bad instance nodes by the port of the path they are planted at
    (C{Bad/1/r/127.0.0.1/<port>}); each would describe that path if it were
    valid.
    """
    nodes: dict[int, bytes] = {}
    nodes[9001] = _dumps(good_doc(9001, AdminAddr="127.0.0.1:2"))
    nodes[9002] = _dumps(good_doc(9002)).replace(b'"Port": 9002', b'"Port": 1e400')
    nodes[9003] = b"[" * 100_000 + b"]" * 100_000
    nodes[9004] = _dumps({**good_doc(9004), "Extra": {"x": "DEEP"}}).replace(
        b'"DEEP"', b"[" * 5_000 + b"]" * 5_000
    )
    nodes[9005] = _dumps({**good_doc(9005), "Registered": "false"})
    nodes[9006] = _dumps({**good_doc(9006), "Extra": {"pad": "x" * (MAX_NODE_SIZE + 10)}})
    nodes[9007] = _dumps(good_doc(9007)).replace(b'"Port": 9007', b'"Port": 0')
    nodes[9008] = _dumps(good_doc(9008)).replace(b'"Port": 9008', b'"Port": "9008"')
    nodes[9009] = _dumps(good_doc(9009)).replace(b'"Port": 9009', b'"Port": true')
    nodes[9010] = _dumps(good_doc(9010)).replace(b'"Port": 9010', b'"Port": NaN')
    nodes[9011] = _dumps(good_doc(9011, CriticalAverageResponseTime=float("inf")))
    nodes[9012] = _dumps({**good_doc(9012), "Config": ["not", "an", "object"]})
    nodes[9013] = _dumps(good_doc(9013, ServiceAddr="127.0.0.1:9013"))
    nodes[9014] = _dumps(good_doc(9014, Name="Bad/../../etc"))
    nodes[9015] = _dumps(good_doc(9015, UUID=12345))
    nodes[9016] = b"\xff\xfe not utf-8 \x00"
    nodes[9017] = _dumps(good_doc(9017, Name="\ud800"))
    nodes[9018] = _dumps(good_doc(9018, CriticalClientCount=1.5))
    nodes[9019] = _dumps({**good_doc(9019), "PID": -1})
    nodes[9020] = _dumps({**good_doc(9020), "Extra": ["list"]})
    nodes[9021] = _dumps(good_doc(9021)).replace(b'"Port": 10021', b'"Port": 70000')
    nodes[9022] = _dumps(good_doc(9022)).replace(b'"Port": 9022', b'"Port": 9' + b"0" * 5000)
    nodes[9023] = _dumps(good_doc(9024))  # describes another path
    nodes[9025] = b""
    nodes[9026] = b"null"
    return nodes


class _UntrustedNodesMixin:
    """
    The bad-node tests; a backend's class provides the hooks.
    """

    url: str

    async def make_registry(self) -> Any:
        raise NotImplementedError

    def plant(self, rel: str, data: bytes) -> str:
        """
        Write a raw node at C{/services/<rel>} as a hostile process would;
        return the path the registry names it by in its logs.
        """
        raise NotImplementedError

    async def wait_for(self, predicate: Callable[[], Any], what: str) -> None:
        for _ in range(400):
            if predicate():
                return
            await deferLater(reactor, 0.025, lambda: None)
        self.fail(f"timed out waiting for {what}")  # type: ignore[attr-defined]

    async def watched_snapshot(self, registry: Any) -> RecordingListener:
        """
        Watch everything on C{registry} until its snapshot has come; the
        listener, its first event the snapshot.
        """
        listener = RecordingListener()
        watch = registry.watch(Query(), listener)
        self.addCleanup(watch.stop)  # type: ignore[attr-defined]
        await self.wait_for(lambda: listener.events, "the snapshot")
        return listener

    async def test_bad_nodes_beside_a_healthy_instance(self) -> None:
        """
        Each bad node is ignored with one warning naming it; queries and
        watches return the healthy instance; a watch keeps working when
        more bad nodes and another healthy instance arrive.
        """
        registry = await self.make_registry()
        good = make_instance(name="Good", host="127.0.0.1", port=8000)
        await registry.add(good)
        planted = {
            self.plant(f"Bad/1/r/127.0.0.1/{port}", data) for port, data in bad_nodes().items()
        }
        with capturedLogs() as events:
            self.assertEqual(await registry.query(Query()), [good])
            self.assertEqual(await registry.query(Query(service="Bad")), [])
            self.assertEqual(await registry.query(Query(registered=True)), [good])
            listener = await self.watched_snapshot(registry)
            self.assertEqual(await registry.query(Query()), [good])
        self.assertEqual(listener.events, [("snapshot", [good])])
        warned = [
            e["path"]
            for e in events
            if e.get("log_format", "").startswith("Ignoring registry node")
        ]
        self.assertEqual(sorted(warned), sorted(planted), "one warning per bad node")

        late = self.plant("Bad/1/r/127.0.0.1/9100", b'{"Config": "late"}')
        other = make_instance(name="Good", host="127.0.0.1", port=8001)
        await registry.add(other)
        await self.wait_for(lambda: len(listener.events) > 1, "the other instance")
        self.assertEqual(listener.events[1:], [("added", other)])
        self.assertEqual(await registry.query(Query()), [good, other])
        self.assertTrue(late)

    async def test_sky_instances_prints_no_traceback(self) -> None:
        """
        C{sky instances}, run as a user would, lists the healthy instance
        and prints no traceback, whatever else is in the tree.
        """
        registry = await self.make_registry()
        good = make_instance(name="Good", host="127.0.0.1", port=8000)
        await registry.add(good)
        for port, data in bad_nodes().items():
            self.plant(f"Bad/1/r/127.0.0.1/{port}", data)
        home = tempfile.mkdtemp(prefix="skynet-untrusted-home-")
        self.addCleanup(shutil.rmtree, home, True)  # type: ignore[attr-defined]
        env = {**os.environ, "SKYNET_HOME": home, "PYTHONPATH": str(ROOT)}
        env.pop("SKYNET_REGISTRY", None)
        out, err, code = await getProcessOutputAndValue(
            sys.executable,
            ["-m", "skynet.sky", "--registry", self.url, "instances"],
            env=env,
            path=str(ROOT),
        )
        text = (out + err).decode(errors="replace")
        self.assertNotIn("Traceback", text)
        self.assertEqual(code, 0, text)
        self.assertIn("127.0.0.1:8000", out.decode())
        self.assertNotIn("Bad", out.decode())


class _Fuzz:
    fuzz_count = 100
    owner_counts = False

    async def check_fuzzed(self, count: int) -> None:
        registry = await self.make_registry()  # type: ignore[attr-defined]
        good = make_instance(name="Good", host="127.0.0.1", port=8000)
        await registry.add(good)
        expected = plant_fuzzed(fuzzed_nodes(count), self.plant_or_skip, self.owner_counts)
        found = await registry.query(Query())
        self.assertEqual(  # type: ignore[attr-defined]
            [(i.path, i, i.extra) for i in found],
            [(i.path, i, i.extra) for i in sort_instances([good, *expected])],
        )
        listener = RecordingListener()
        watch = registry.watch(Query(), listener)
        self.addCleanup(watch.stop)  # type: ignore[attr-defined]
        await self.wait_for(lambda: listener.events, "the snapshot")  # type: ignore[attr-defined]
        kind, snapshot = listener.events[0]
        self.assertEqual(kind, "snapshot")  # type: ignore[attr-defined]
        self.assertEqual(  # type: ignore[attr-defined]
            {i.uuid for i in snapshot}, {i.uuid for i in [good, *expected]}
        )
        print(f"\n{type(self).__name__}: {count} fuzzed nodes, {len(expected)} valid")

    def plant_or_skip(self, rel: str, data: bytes) -> Any:
        return self.plant(rel, data)  # type: ignore[attr-defined]

    async def test_fuzzed_nodes(self) -> None:
        """
        Many mutated nodes planted in the tree: the registry's view is
        exactly the healthy instance plus what the strict parser accepts.
        """
        await self.check_fuzzed(self.fuzz_count)


@pytest.mark.slow
class FileUntrustedTests(_UntrustedNodesMixin, _Fuzz, TestCase):
    """
    Bad files in the embedded registry, and what only files can do: links
    and special files.
    """

    fuzz_count = 300
    owner_counts = True

    def setUp(self) -> None:
        top = tempfile.mkdtemp(prefix="skynet-untrusted-")
        self.addCleanup(shutil.rmtree, top, True)
        self.top = top
        self.root = os.path.join(top, "registry")
        self.url = f"file://{self.root}"

    async def make_registry(self) -> FileRegistry:
        registry = FileRegistry(self.root, reactor=reactor)
        self.addCleanup(registry.stop)
        await registry.start()
        return registry

    def plant(self, rel: str, data: bytes) -> str:
        path = os.path.join(self.root, "services", rel)
        write_atomically(path, data)
        return path

    async def test_directory_link_loop(self) -> None:
        """
        A directory link loop in the tree breaks neither new watches nor
        queries, and inotify goes on reporting changes.
        """
        registry = await self.make_registry()
        good = make_instance(name="Good", port=8000)
        await registry.add(good)
        loop = os.path.join(self.root, "services", "Loop", "1")
        os.makedirs(loop)
        os.symlink(os.path.join(self.root, "services", "Loop"), os.path.join(loop, "r"))
        os.symlink(os.path.join(self.root, "services"), os.path.join(self.root, "services", "Up"))
        self.assertEqual(await registry.query(Query()), [good])
        listener = await self.watched_snapshot(registry)
        self.assertEqual(listener.events, [("snapshot", [good])])
        # Another process's instance, seen through inotify or the poll.
        peer = FileRegistry(self.root, reactor=reactor)
        self.addCleanup(peer.stop)
        other = make_instance(name="Other", port=8001)
        await peer.add(other)
        await self.wait_for(lambda: len(listener.events) > 1, "the peer's instance")
        self.assertEqual(listener.events[1:], [("added", other)])

    async def test_links_and_special_files_are_not_nodes(self) -> None:
        """
        A link to a valid instance file outside the tree, a FIFO and a
        directory at instance depth are not instances, and reading them
        never blocks.
        """
        registry = await self.make_registry()
        good = make_instance(name="Good", port=8000)
        await registry.add(good)
        outside = os.path.join(self.top, "outside")
        foreign = make_instance(name="Linked", version="1", region="r", host="h", port=1)
        with open(outside, "wb") as f:
            f.write(foreign.to_json())
        linked_dir = os.path.join(self.root, "services", "Linked", "1", "r", "h")
        os.makedirs(linked_dir)
        os.symlink(outside, os.path.join(linked_dir, "1"))
        os.mkfifo(os.path.join(linked_dir, "2"))
        os.makedirs(os.path.join(linked_dir, "3"))
        self.assertEqual(await registry.query(Query()), [good])
        listener = await self.watched_snapshot(registry)
        self.assertEqual(listener.events, [("snapshot", [good])])


@pytest.mark.slow
class ZooKeeperUntrustedTests(SharedZooKeeper, _UntrustedNodesMixin, _Fuzz, TestCase):
    """
    Bad nodes in a real ZooKeeper, written by a plain kazoo client.
    """

    fuzz_count = 150

    def plant_or_skip(self, rel: str, data: bytes) -> Any:
        try:
            return self.plant(rel, data)
        except (BadArgumentsError, ValueError):
            return False  # a path ZooKeeper itself refuses

    def setUp(self) -> None:
        self.chroot = f"/untrusted{next(_chroots)}/skynet"
        self.url = f"zk://{self.cluster.hosts}{self.chroot}"
        self.zk = KazooClient(self.cluster.hosts, timeout=4.0)
        self.zk.start(timeout=15)

        def close() -> None:
            self.zk.stop()
            self.zk.close()

        self.addCleanup(close)

    async def make_registry(self) -> ZooKeeperRegistry:
        registry = ZooKeeperRegistry(self.cluster.hosts, self.chroot, reactor=reactor)
        self.addCleanup(registry.stop)
        await registry.start()
        self.assertTrue(registry.connected)
        return registry

    def plant(self, rel: str, data: bytes) -> str:
        path = f"{self.chroot}/services/{rel}"
        if self.zk.exists(path):
            self.zk.set(path, data)
        else:
            self.zk.create(path, data, makepath=True)
        return path

    async def test_interior_nodes_with_data_and_deep_paths(self) -> None:
        """
        Data on interior nodes, children below an instance-depth node and
        nodes deeper than instances are ignored.
        """
        registry = await self.make_registry()
        good = make_instance(name="Good", host="127.0.0.1", port=8000)
        await registry.add(good)
        self.plant("Good", b"[[[[")
        self.plant("Bad/1/r/127.0.0.1/9001", _dumps(good_doc(9001)) + b" trailing")
        self.plant("Bad/1/r/127.0.0.1/9001/child", _dumps(good_doc(9001)))
        self.plant("Bad/1/r/127.0.0.1/9000/deeper/still", b"{}")
        self.plant("Bad/1/r/127.0.0.1", _dumps(good_doc(9000)))
        self.assertEqual(await registry.query(Query()), [good])
        listener = await self.watched_snapshot(registry)
        self.assertEqual(listener.events, [("snapshot", [good])])


class InstanceParsingTests(SynchronousTestCase):
    """
    The strict parser itself.
    """

    def test_bad_nodes_raise_only_registry_error(self) -> None:
        for port, data in bad_nodes().items():
            with self.assertRaises(RegistryError, msg=str(port)):
                Instance.from_json(data, f"/Bad/1/r/127.0.0.1/{port}")

    def test_registered_must_be_a_boolean(self) -> None:
        doc = good_doc(9000)
        self.assertTrue(Instance.from_go({**doc, "Registered": True}).registered)
        self.assertFalse(Instance.from_go({**doc, "Registered": False}).registered)
        for value in ("false", "true", 0, 1, None, []):
            with self.assertRaises(RegistryError):
                Instance.from_go({**doc, "Registered": value})

    def test_go_admin_address_variants(self) -> None:
        """
        A Go node's AdminAddr may be null, empty or port 0 (not bound): no
        admin address.  Anything but an object is refused.
        """
        for admin in (None, {}, {"IPAddress": "127.0.0.1", "Port": 0, "MaxPort": 0}):
            self.assertIsNone(Instance.from_go(good_doc(9000, AdminAddr=admin)).admin)
        parsed = Instance.from_go(good_doc(9000))
        self.assertEqual(parsed.admin, Address("127.0.0.1", 10000))
        for admin in ("127.0.0.1:2", [], 7, {"IPAddress": 1, "Port": 2}):
            with self.assertRaises(RegistryError):
                Instance.from_go(good_doc(9000, AdminAddr=admin))

    def test_writers_refuse_what_readers_would(self) -> None:
        """
        A registry refuses to write a node its readers would ignore.
        """
        clock = Clock()
        registry = MemoryRegistry(reactor=clock)
        big = make_instance(extra={"pad": "x" * MAX_NODE_SIZE})
        self.failureResultOf(registry.add(big), ValueError)
        surrogate = make_instance(name="\ud800")
        self.failureResultOf(registry.add(surrogate), ValueError)
        self.assertEqual(self.successResultOf(registry.query(Query())), [])

    def test_node_warnings_are_rate_limited(self) -> None:
        clock = Clock()
        from twisted.logger import Logger

        warnings = NodeWarnings(Logger(), clock, interval=60)
        with capturedLogs() as events:
            warnings.warn("/a", "bad")
            warnings.warn("/a", "bad")
            warnings.warn("/b", "bad")
            clock.advance(61)
            warnings.warn("/a", "still bad")
        self.assertEqual([e["path"] for e in events], ["/a", "/b", "/a"])


# The fuzzer.

_json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
_json = st.recursive(
    _json_leaf,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
_FIELDS = [
    ("Config",),
    ("Config", "UUID"),
    ("Config", "Name"),
    ("Config", "Version"),
    ("Config", "Region"),
    ("Config", "ServiceAddr"),
    ("Config", "ServiceAddr", "IPAddress"),
    ("Config", "ServiceAddr", "Port"),
    ("Config", "ServiceAddr", "MaxPort"),
    ("Config", "AdminAddr"),
    ("Config", "AdminAddr", "Port"),
    ("Config", "CriticalClientCount"),
    ("Config", "CriticalAverageResponseTime"),
    ("Registered",),
    ("PID",),
    ("Extra",),
    ("Owner",),
]
#: Values of the right type (often) for a field, so that many mutants are
#: valid and the fuzzer checks acceptance as well as refusal.
_plausible = st.one_of(
    st.integers(-1, 70000),
    st.booleans(),
    st.text(alphabet="abcXYZ019.-_:", min_size=1, max_size=8),
    st.floats(0, 1e12),
    st.none(),
)
_mutation = st.one_of(
    st.tuples(st.just("set"), st.sampled_from(_FIELDS), _json),
    st.tuples(st.just("set"), st.sampled_from(_FIELDS), _plausible),
    st.tuples(st.just("set"), st.sampled_from(_FIELDS), _plausible),
    st.tuples(st.just("delete"), st.sampled_from(_FIELDS), st.none()),
    st.tuples(st.just("deep"), st.sampled_from(_FIELDS), st.integers(1, 100_000)),
    st.tuples(st.just("truncate"), st.none(), st.integers(0, 400)),
    st.tuples(st.just("flip"), st.none(), st.tuples(st.integers(0, 400), st.integers(0, 255))),
    st.tuples(st.just("raw"), st.none(), st.binary(max_size=64)),
)


def mutate(base: dict[str, Any], mutations: list[tuple[str, Any, Any]]) -> bytes:
    doc = json.loads(json.dumps(base))
    deep: int | None = None
    for kind, field, arg in mutations:
        if kind in ("set", "delete", "deep"):
            target = doc
            for name in field[:-1]:
                target = target.get(name) if isinstance(target, dict) else None
            if not isinstance(target, dict):
                continue
            if kind == "delete":
                target.pop(field[-1], None)
            elif kind == "set":
                target[field[-1]] = arg
            else:
                target[field[-1]] = "__DEEP__"
                deep = arg
    data = json.dumps(doc).encode()
    if deep is not None:
        data = data.replace(b'"__DEEP__"', b"[" * deep + b"]" * deep, 1)
    for kind, _, arg in mutations:
        if kind == "truncate":
            data = data[:arg]
        elif kind == "flip" and data:
            index, byte = arg
            data = data[: index % len(data)] + bytes([byte]) + data[index % len(data) + 1 :]
        elif kind == "raw":
            data = arg
    return data


def fuzzed_nodes(count: int) -> list[bytes]:
    """
    C{count} mutations of a valid node (hypothesis drives the mutations;
    the nodes are collected and then planted all at once).
    """
    found: list[bytes] = []

    @settings(
        max_examples=count,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(st.integers(0, 10**6), st.lists(_mutation, min_size=0, max_size=3))
    def collect(port: int, mutations: list[tuple[str, Any, Any]]) -> None:
        found.append(mutate(good_doc(1 + port % 65535), mutations))

    collect()
    return found


def parsed_or_none(data: bytes, rel: str) -> Instance | None:
    """
    What every backend must make of C{data} at C{rel}: the strict parser's
    answer, which may only be an instance or L{RegistryError}.
    """
    try:
        instance = Instance.from_json(data, rel)
    except RegistryError:
        return None
    # Whatever is accepted is a well-formed instance: it writes back as
    # itself.
    again = Instance.from_json(instance.checked_json(), rel)
    assert again == instance and again.extra == instance.extra, (instance, again)
    return instance


def plant_fuzzed(
    nodes: list[bytes],
    plant: Callable[[str, bytes], Any],
    owner_counts: bool = False,
) -> list[Instance]:
    """
    Plant each node where it claims to be if it names a valid path (so a
    valid one is accepted), else at a path of its own; return the
    instances the strict parser accepts, sorted by path.

    @param owner_counts: whether the backend reads an C{"Owner"} record
        (the embedded registry): a node with any but a live owner's record
        is then not an instance (fuzzed records never name a live owner).
    """
    expected: dict[str, Instance] = {}
    for index, data in enumerate(nodes):
        try:
            doc = json.loads(data)
            rel = Instance.from_go(doc).path
        except Exception:  # noqa: BLE001 (fuzzed input)
            rel = f"/Fuzz/1/r/127.0.0.1/{10000 + index}"
        if rel in expected or rel.startswith("/Good/"):
            rel = f"/Fuzz/1/r/127.0.0.1/{10000 + index}"
        if plant(rel.lstrip("/"), data) is False:
            continue
        instance = parsed_or_none(data, rel)
        if instance is not None and owner_counts and json.loads(data).get("Owner") is not None:
            instance = None
        if instance is not None:
            expected[rel] = instance
        else:
            expected.pop(rel, None)
    return sort_instances(expected.values())


class MemoryFuzzTests(SynchronousTestCase):
    def test_fuzzed_nodes(self) -> None:
        """
        The memory registry holds parsed instances: whatever the strict
        parser accepts from a fuzzed node, it stores and finds as is.
        """
        clock = Clock()
        registry = MemoryRegistry(reactor=clock)
        expected: dict[str, Instance] = {}
        for data in fuzzed_nodes(500):
            try:
                instance = Instance.from_json(data)
            except RegistryError:
                continue
            self.assertIsNone(self.successResultOf(registry.add(instance)))
            expected[instance.path] = instance
        found = self.successResultOf(registry.query(Query()))
        self.assertEqual({i.path: i for i in found}, expected)
        # Assert that the fuzzer reaches valid nodes as well as bad ones.
        self.assertTrue(found)


# The fast path for the nodes skynet writes, against the careful parser.


def careful(data: bytes, rel: str | None) -> tuple[Instance, Owner | None] | None:
    """
    What the careful parser makes of a node, as the embedded registry reads
    it (its C{"Owner"} record apart; ZooKeeper ignores that key): the
    instance and owner, or L{None} if it refuses the node.
    """
    try:
        doc = parse_json_node(data)
        owner_data = doc.pop("Owner", None)
        owner = Owner.from_json(owner_data) if owner_data is not None else None
        instance = Instance.from_go(doc)
    except RegistryError:
        return None
    if rel is not None and instance.path != rel:
        return None
    return instance, owner


_names = st.one_of(
    st.text(alphabet="abcXYZ019 .-_:~", min_size=1, max_size=6),
    st.text(alphabet='abcXYZ019 .-_:/~\\"\u00e9\x00\x1f', min_size=0, max_size=6),
)
_words = st.text(alphabet="abcXYZ019_", min_size=1, max_size=6)
_maybe_int = st.one_of(st.integers(-(2**64), 2**64), st.integers(-2, 70000))


@st.composite
def written_instances(draw: Any) -> Instance:
    """
    Instances as a service could write them, valid or not: odd names,
    ports and counts in and out of range, admin addresses, extras.
    """
    extra = draw(
        st.one_of(
            st.just({}),
            st.dictionaries(_words, st.booleans(), max_size=3),
            st.dictionaries(_words, _json, max_size=2),
        )
    )
    admin = draw(st.one_of(st.none(), st.builds(Address, _names, _maybe_int, _maybe_int)))
    return Instance(
        uuid=draw(_names),
        name=draw(_names),
        version=draw(st.one_of(st.just("1"), _names)),
        region=draw(st.one_of(st.just("r"), _names)),
        host=draw(st.one_of(st.just("10.0.0.1"), _names)),
        port=draw(_maybe_int),
        admin=admin,
        registered=draw(st.booleans()),
        critical_client_count=draw(st.one_of(st.just(100), _maybe_int)),
        critical_average_response_time=draw(
            st.one_of(st.just(5.0), st.floats(0, 2**54 / 1e9), st.floats(-1, 1))
        ),
        pid=draw(st.one_of(st.none(), _maybe_int)),
        extra=extra,
    )


class WrittenNodeFastPathTests(SynchronousTestCase):
    """
    L{parse_written_node} reads the nodes skynet writes without the careful
    parser's walk of the document; it must never accept a node the careful
    parser refuses, nor read one differently.
    """

    def assert_agrees(self, data: bytes, rel: str | None) -> bool:
        """
        @return: whether the fast path read the node.
        """
        fast = parse_written_node(data, rel)
        if fast is None:
            return False
        expected = careful(data, rel)
        self.assertIsNotNone(expected, data)
        assert expected is not None
        instance, owner = fast
        self.assertEqual(instance, expected[0], data)
        self.assertEqual(instance.extra, expected[0].extra, data)
        self.assertEqual(
            type(instance.critical_average_response_time),
            type(expected[0].critical_average_response_time),
        )
        self.assertEqual(None if owner is None else Owner(*owner), expected[1], data)
        # Instance.from_json, which every backend uses, answers the same.
        self.assertEqual(Instance.from_json(data, rel), expected[0])
        return True

    def test_what_we_write_takes_the_fast_path(self) -> None:
        """
        Every node a registry writes (L{Instance.checked_json}, and the
        embedded registry's file with its owner record) of an instance
        whose strings need no JSON escape is read by the fast path, as
        the careful parser reads it; odd instances agree or fall back.
        """
        fast = written = 0

        # Derandomized: the same examples every run, so that the counts
        # asserted below do not depend on luck.
        @settings(max_examples=1500, deadline=None, database=None, derandomize=True)
        @given(written_instances(), st.sampled_from([None, "0123abcd", ""]))
        def check(instance: Instance, token: str | None) -> None:
            nonlocal fast, written
            try:
                data = instance.checked_json()
                rel = instance.path
            except (ValueError, TypeError):
                data, rel = instance.to_json(), None
            owner = Owner(os.getpid(), 1234567, token)
            file_data = encode_node(json.loads(data), owner)
            for node in (data, file_data):
                took = self.assert_agrees(node, rel)
                if rel is not None:
                    # Where it does not claim to be, it is nobody.
                    self.assertIsNone(parse_written_node(node, rel + "0"))
                plain = all(
                    s.isascii() and s.isprintable() and '"' not in s and "\\" not in s
                    for s in (instance.uuid, instance.name, instance.version)
                    + (instance.region, instance.host)
                    + ((instance.admin.ip_address,) if instance.admin else ())
                )
                simple_extra = all(isinstance(v, bool) for v in instance.extra.values())
                if rel is not None and plain and simple_extra:
                    written += 1
                    self.assertTrue(took, node)
                fast += took

        check()
        # The generator reaches the fast path often, and not only there.
        self.assertGreater(written, 100)
        self.assertGreater(fast, 100)

    def test_fuzzed_nodes_agree(self) -> None:
        """
        Mutations of a valid node, with and without an owner record: where
        the fast path answers, it answers as the careful parser.
        """
        fast = 0
        nodes = fuzzed_nodes(1500)
        base = good_doc(7)
        owner = {"Owner": {"pid": 1, "start_time": 2, "registry": "r"}}
        nodes += [
            mutate({**base, **owner}, [m])
            for m in [
                ("set", ("Owner",), None),
                ("set", ("Config", "Name"), "."),
                ("set", ("Config", "Name"), ".."),
                ("set", ("Config", "UUID"), "a/b"),
                ("set", ("Config", "ServiceAddr", "MaxPort"), -5),
                ("set", ("Config", "CriticalAverageResponseTime"), 2**53),
                ("set", ("Config", "CriticalAverageResponseTime"), 2**53 + 1),
                ("set", ("Config", "CriticalClientCount"), -(2**63)),
                ("set", ("Config", "CriticalClientCount"), 2**63),
                ("set", ("PID",), 0),
                ("set", ("PID",), 2**63 - 1),
                ("set", ("Extra",), {"TLS": True, "AdminTLS": False}),
                ("set", ("Extra",), {}),
                ("set", ("Registered",), False),
            ]
        ]
        # Every integer field at the edges of its range and beyond.
        edges = [-(2**63) - 1, -(2**63), -1, 0, 1, 65535, 65536, 2**53, 2**53 + 1, 2**63 - 1]
        integers = [f for f in _FIELDS if f[-1] in ("Port", "MaxPort", "PID")] + [
            ("Config", "CriticalClientCount"),
            ("Config", "CriticalAverageResponseTime"),
        ]
        nodes += [
            mutate({**base, **owner}, [("set", field, value)])
            for field in integers
            for value in edges + [2**63]
        ]
        for data in nodes:
            try:
                rel = Instance.from_go(json.loads(data)).path
            except Exception:  # noqa: BLE001 (fuzzed input)
                rel = "/Bad/1/r/127.0.0.1/7"
            fast += self.assert_agrees(data, rel)
            self.assert_agrees(data, None)
        self.assertGreater(fast, 100)

    def test_other_shapes_go_to_the_careful_parser(self) -> None:
        """
        Valid nodes in another spelling (Go's compact JSON, escapes,
        reordered keys, raw UTF-8, bytearray) and invalid ones in our
        spelling: the fast path leaves them all to the careful parser,
        which accepts the valid ones and refuses the rest.
        """
        doc = good_doc(7)
        ours = json.dumps(doc).encode()
        self.assertIsNotNone(parse_written_node(ours, "/Bad/1/r/127.0.0.1/7"))
        valid = [
            json.dumps(doc, separators=(",", ":")).encode(),
            json.dumps(doc, indent=1).encode(),
            ours.replace(b'"Name": "Bad"', b'"Name": "B\\u0061d"'),
            json.dumps(good_doc(7, UUID="\u00e9")).encode(),
            json.dumps(good_doc(7, UUID="\u00e9"), ensure_ascii=False).encode(),
            json.dumps({"Registered": True, **doc}).encode(),
            json.dumps({**doc, "PID": None}).encode(),
            json.dumps({**doc, "Extra": {"TLS": 1}}).encode(),
            json.dumps(good_doc(7, CriticalAverageResponseTime=5e9)).encode(),
            b"\xef\xbb\xbf" + ours,
            ours + b" ",
        ]
        for data in valid:
            self.assertIsNone(parse_written_node(data, "/Bad/1/r/127.0.0.1/7"), data)
            self.assertIsNotNone(careful(data, "/Bad/1/r/127.0.0.1/7"), data)
        self.assertIsNone(parse_written_node(bytearray(ours)))
        self.assertEqual(Instance.from_json(bytearray(ours)), Instance.from_go(doc))
        invalid = [
            ours.replace(b'"Name": "Bad"', b'"Name": "."'),
            ours.replace(b'"Port": 7', b'"Port": 0'),
            ours.replace(b'"Port": 7', b'"Port": 65536'),
            ours.replace(b'"Port": 1007', b'"Port": 65536'),
            ours.replace(b'"Port": 7', b'"Port": 99999999999999999999'),
            ours.replace(b'"Registered": true', b'"Registered": true, "PID": 0'),
            ours.replace(b'"UUID": "bad-7"', b'"UUID": ""'),
            ours.replace(b'"Region": "r"', b'"Region": "r\x01"'),
        ]
        for data in invalid:
            self.assertIsNone(parse_written_node(data), data)
            self.assertIsNone(careful(data, None), data)
