"""
Tests for L{skynet.registry.files}, the embedded registry: the conformance
suite on real files with real child processes, and what is particular to
files: the layout on disk, atomic writes, crash detection by pid and start
time, malformed files, inotify and polling.  Also L{registry_from_url}.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import threading
import time
import types
from typing import Any

import attr
import pytest
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.logger import capturedLogs
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from skynet.registry import (
    DEFAULT_REGISTRY_ENV,
    Address,
    FileRegistry,
    Instance,
    IRegistry,
    MemoryRegistry,
    Query,
    RegistryError,
    files,
    registry_from_url,
)
from skynet.registry.files import (
    current_owner,
    default_registry_root,
    encode_node,
    write_atomically,
)
from tests.processes import missing_here
from tests.registry_conformance import (
    RecordingListener,
    RegistryConformanceMixin,
    make_instance,
)

#: A process that adds instances to a file registry, says so, and waits for
#: its stdin to close (or to be killed).
CHILD = r"""
import json, sys
from twisted.internet.task import Clock
from skynet.registry.base import Instance
from skynet.registry.files import FileRegistry

registry = FileRegistry(sys.argv[1], reactor=Clock())
results = []
registry.start().addBoth(results.append)
for doc in json.loads(sys.argv[2]):
    instance = Instance.from_go(doc)
    registry.add(instance).addBoth(results.append)
    registry.publish_stats(instance, {"Clients": 1}).addBoth(results.append)
if any(result is not None for result in results):
    sys.exit(f"child failed: {results!r}")
sys.stdout.write("ready\n")
sys.stdout.flush()
sys.stdin.read()
"""


class _Child(ProcessProtocol):
    def __init__(self) -> None:
        self.ready: Deferred[None] = Deferred()
        self.ended: Deferred[None] = Deferred()
        self.output = b""
        self.errors = b""
        self.running = True

    def outReceived(self, data: bytes) -> None:
        self.output += data
        if b"ready\n" in self.output and not self.ready.called:
            self.ready.callback(None)

    def errReceived(self, data: bytes) -> None:
        self.errors += data

    def processEnded(self, reason: Any) -> None:
        self.running = False
        if not self.ready.called:
            self.ready.errback(RuntimeError(f"child died: {self.errors.decode()}"))
        self.ended.callback(None)


def tree(root: str) -> list[str]:
    """
    Every file and directory below C{root}, relative, sorted.
    """
    found = []
    for directory, dirs, names in os.walk(root):
        for name in dirs + names:
            found.append(os.path.relpath(os.path.join(directory, name), root))
    return sorted(found)


def read_json(path: str) -> Any:
    with open(path, "rb") as f:
        return json.load(f)


def sleep(seconds: float) -> Deferred[None]:
    return deferLater(reactor, seconds, lambda: None)


class FileTestMixin:
    """
    Temporary roots, registries stopped at cleanup, child processes.
    """

    def make_root(self) -> str:
        root = tempfile.mkdtemp(prefix="skynet-registry-test-")
        self.addCleanup(shutil.rmtree, root, True)
        return os.path.join(root, "registry")

    async def started(self, registry: FileRegistry) -> FileRegistry:
        self.addCleanup(registry.stop)
        await registry.start()
        return registry

    async def spawn_owner(self, root: str, instances: list[Instance]) -> _Child:
        """
        A child process that adds C{instances} below C{root} and waits.
        """
        child = _Child()
        docs = json.dumps([i.to_go() for i in instances])
        reactor.spawnProcess(
            child,
            sys.executable,
            [sys.executable, "-c", CHILD, root, docs],
            env=os.environ,
        )

        def kill() -> Deferred[None]:
            if child.running:
                child.transport.signalProcess("KILL")
            return child.ended

        self.addCleanup(kill)
        child.ready.addTimeout(30, reactor)
        await child.ready
        return child

    async def kill(self, child: _Child) -> float:
        """
        SIGKILL C{child}, wait until it is reaped.

        @return: when it was killed (C{time.monotonic()}).
        """
        killed_at = time.monotonic()
        child.transport.signalProcess("KILL")
        await child.ended
        return killed_at

    async def wait_until(self, predicate, what: str, timeout: float = 5.0) -> float:
        """
        Poll C{predicate} every 10 ms; return when it became true.
        """
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                self.fail(f"timed out after {timeout}s waiting for {what}")
            await sleep(0.01)
        return time.monotonic()


@pytest.mark.slow
class FileRegistryConformanceTests(FileTestMixin, RegistryConformanceMixin, TestCase):
    """
    The conformance suite on L{FileRegistry}: a temporary root, inotify
    where available, owners crashed by SIGKILL.
    """

    max_settles = 100  # 5 s

    def setUp(self) -> None:
        self.root = self.make_root()

    async def make_registry(self) -> FileRegistry:
        return await self.started(FileRegistry(self.root, reactor=reactor))

    async def make_peer_registry(self, registry: FileRegistry) -> FileRegistry:
        return await self.started(FileRegistry(registry.root, reactor=reactor))

    async def add_doomed(self, registry: FileRegistry, instances: list[Instance]) -> _Child:
        return await self.spawn_owner(registry.root, instances)

    async def crash_owner(self, owner: _Child) -> None:
        await self.kill(owner)

    async def settle(self) -> None:
        await sleep(0.05)


@pytest.mark.slow
class FileRegistryTests(FileTestMixin, TestCase):
    """
    What only the file registry does.
    """

    def setUp(self) -> None:
        self.root = self.make_root()

    def node_path(self, instance: Instance, top: str = "services") -> str:
        return os.path.join(self.root, top + instance.path)

    def write_node(self, instance: Instance, owner: Any = None) -> str:
        """
        Write a node directly, as another process would (no nudge to this
        process's scanner).
        """
        path = self.node_path(instance)
        doc = instance.to_go()
        if owner is not None:
            doc["Owner"] = owner
        write_atomically(path, json.dumps(doc).encode())
        return path

    async def test_interface(self) -> None:
        registry = FileRegistry(self.root, reactor=reactor)
        self.assertTrue(verifyObject(IRegistry, registry))
        self.assertEqual(registry.url, "file://" + self.root)

    async def test_start_creates_root(self) -> None:
        """
        A missing root is created by C{start}, not before.
        """
        registry = FileRegistry(self.root, reactor=reactor)
        self.assertFalse(os.path.exists(self.root))
        await self.started(registry)
        self.assertEqual(tree(self.root), ["services", "statistics"])

    async def test_layout(self) -> None:
        """
        The tree on disk is the protocol's: one file per instance at
        C{services/<Name>/<Version>/<Region>/<Host>/<Port>} holding the Go
        keys plus our owner record, its stats at the same path below
        C{statistics}; removal prunes the emptied directories.
        """
        registry = await self.started(FileRegistry(self.root, reactor=reactor))
        instance = Instance(
            uuid="7a2c",
            name="TestService",
            version="1.0",
            region="Development",
            host="127.0.0.1",
            port=9000,
            admin=Address("127.0.0.1", 9001),
        )
        await registry.add(instance)
        await registry.publish_stats(instance, {"Clients": 2, "RequestsServed": 5})
        path = "TestService/1.0/Development/127.0.0.1/9000"
        self.assertEqual(
            tree(self.root),
            sorted(
                ["services", "statistics"]
                + [
                    f"{top}/{'/'.join(path.split('/')[:n])}"
                    for top in ("services", "statistics")
                    for n in range(1, 6)
                ]
            ),
        )
        doc = read_json(os.path.join(self.root, "services", path))
        self.assertEqual(set(doc), {"Config", "Registered", "Owner"})
        self.assertEqual(
            set(doc["Config"]),
            {
                "UUID",
                "Name",
                "Version",
                "Region",
                "ServiceAddr",
                "AdminAddr",
                "CriticalClientCount",
                "CriticalAverageResponseTime",
            },
        )
        self.assertEqual(doc["Config"]["UUID"], "7a2c")
        self.assertEqual(doc["Config"]["Name"], "TestService")
        self.assertEqual(
            doc["Config"]["ServiceAddr"],
            {"IPAddress": "127.0.0.1", "Port": 9000, "MaxPort": 0},
        )
        self.assertEqual(set(doc["Config"]["AdminAddr"]), {"IPAddress", "Port", "MaxPort"})
        self.assertEqual(doc["Config"]["CriticalAverageResponseTime"], 5_000_000_000)
        self.assertIs(doc["Registered"], True)
        owner = current_owner()
        self.assertEqual(doc["Owner"]["pid"], os.getpid())
        self.assertEqual(doc["Owner"]["start_time"], owner.start_time)
        stats = read_json(os.path.join(self.root, "statistics", path))
        self.assertEqual(stats["Clients"], 2)
        self.assertEqual(stats["Owner"]["pid"], os.getpid())
        self.assertEqual(await registry.get_stats(instance), {"Clients": 2, "RequestsServed": 5})

        await registry.remove(instance)
        self.assertEqual(tree(self.root), ["services", "statistics"])

    async def test_data_node_layout(self) -> None:
        """
        A data node is a plain file at C{data/<escaped key>} holding the
        value's bytes, with no owner record: it stays when its writer
        stops, and a file written there by another process is read.
        """
        registry = await self.started(FileRegistry(self.root, reactor=reactor))
        await registry.set_value("tls/revoked", b"serial-1")
        self.assertEqual(os.listdir(os.path.join(self.root, "data")), ["tls%2Frevoked"])
        with open(os.path.join(self.root, "data", "tls%2Frevoked"), "rb") as f:
            self.assertEqual(f.read(), b"serial-1")
        await registry.stop()
        self.assertTrue(os.path.exists(os.path.join(self.root, "data", "tls%2Frevoked")))
        write_atomically(os.path.join(self.root, "data", "cluster%2Fdesired"), b"{}")
        reader = await self.started(FileRegistry(self.root, reactor=reactor))
        self.assertEqual(await reader.get_value("cluster/desired"), b"{}")
        self.assertEqual(await reader.get_value("tls/revoked"), b"serial-1")

    async def test_data_node_watch_polls_without_inotify(self) -> None:
        """
        Without inotify, a value watch sees another process's write at the
        next poll.
        """
        registry = await self.started(
            FileRegistry(self.root, reactor=reactor, poll_interval=0.05, use_inotify=False)
        )
        seen: list = []
        watch = registry.watch_value("k", seen.append)
        self.addCleanup(watch.stop)
        await self.wait_until(lambda: seen, "the first value")
        write_atomically(os.path.join(self.root, "data", "k"), b"polled")
        await self.wait_until(lambda: seen[-1:] == [b"polled"], "the polled value")
        os.unlink(os.path.join(self.root, "data", "k"))
        await self.wait_until(lambda: seen[-1:] == [None], "the deletion")
        self.assertEqual(seen, [None, b"polled", None])

    async def test_private_modes_whatever_the_umask(self) -> None:
        """
        With a umask of 0, every directory the registry creates is 0700 and
        every file 0600 (other users can neither read admin addresses nor
        add nodes).
        """
        old = os.umask(0)
        self.addCleanup(os.umask, old)
        registry = await self.started(FileRegistry(self.root, reactor=reactor))
        instance = make_instance()
        await registry.add(instance)
        await registry.publish_stats(instance, {"Clients": 1})
        await registry.set_value("a/b", b"v")
        modes = {}
        for directory, dirs, names in os.walk(os.path.dirname(self.root)):
            for name in dirs + names:
                modes[os.path.join(directory, name)] = os.stat(os.path.join(directory, name))
        self.assertGreater(len(modes), 12)
        for path, st in modes.items():
            expected = 0o700 if os.path.isdir(path) else 0o600
            self.assertEqual(oct(st.st_mode & 0o777), oct(expected), path)

    async def test_directory_others_can_write_is_refused(self) -> None:
        """
        A registry directory (or its services, statistics or data) that
        other users can write is refused with a clear error; one that they
        can only read is made private.
        """
        os.makedirs(os.path.join(self.root, "services"))
        for path in (self.root, os.path.join(self.root, "services")):
            os.chmod(path, 0o777)
            registry = FileRegistry(self.root, reactor=reactor)
            with self.assertRaises(RegistryError) as caught:
                await registry.start()
            message = str(caught.exception)
            self.assertIn(f"registry directory {path} is writable by other users", message)
            self.assertIn(f"chmod 700 {path}", message)
            os.chmod(path, 0o755)
        registry = await self.started(FileRegistry(self.root, reactor=reactor))
        self.assertEqual(os.stat(self.root).st_mode & 0o777, 0o700)
        self.assertEqual(os.stat(os.path.join(self.root, "services")).st_mode & 0o777, 0o700)

    async def test_foreign_directories(self) -> None:
        """
        As root: a registry directory of another user is refused, a tree
        directory another user could write is skipped, and another user
        cannot add a node at all.
        """
        if os.geteuid() != 0:
            missing_here("needs root to make files of another user (uid 65534)")
        registry = await self.started(FileRegistry(self.root, reactor=reactor))
        good = make_instance(name="Good")
        await registry.add(good)
        evil_dir = os.path.join(self.root, "services", "Evil", "1", "r", "h")
        write_atomically(
            os.path.join(evil_dir, "1"),
            make_instance(name="Evil", version="1", region="r", host="h", port=1).to_json(),
        )
        os.chmod(os.path.join(self.root, "services", "Evil"), 0o777)
        with capturedLogs() as events:
            self.assertEqual(await registry.query(Query()), [good])
        self.assertIn(os.path.join(self.root, "services", "Evil"), [e.get("path") for e in events])
        os.chmod(os.path.join(self.root, "services", "Evil"), 0o700)
        os.chown(os.path.join(self.root, "services", "Evil"), 65534, 65534)
        self.assertEqual(await registry.query(Query()), [good])

        other_root = os.path.join(os.path.dirname(self.root), "theirs")
        os.mkdir(other_root, 0o700)
        os.chown(other_root, 65534, 65534)
        with self.assertRaises(RegistryError) as caught:
            await FileRegistry(other_root, reactor=reactor).start()
        self.assertIn("belongs to another user (uid 65534)", str(caught.exception))

        # uid 65534 itself cannot write a node into our tree.
        os.chmod(os.path.dirname(self.root), 0o755)
        fake = make_instance(name="Good", port=good.port + 1)
        script = (
            "import sys\n"
            "from skynet.registry.files import write_atomically\n"
            "try:\n"
            "    write_atomically(sys.argv[1], sys.argv[2].encode())\n"
            "except PermissionError:\n"
            "    print('refused')\n"
        )
        import subprocess

        result = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
             sys.executable, "-c", script,
             os.path.join(self.root, "services") + fake.path, fake.to_json().decode()],
            capture_output=True, text=True, timeout=60,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        )  # fmt: skip
        self.assertEqual(result.stdout, "refused\n", result.stderr)
        self.assertEqual(await registry.query(Query()), [good])

    async def test_atomic_writes(self) -> None:
        """
        A reader racing a writer always reads a whole document, the old or
        the new, and the registry leaves no temporary files behind.
        """
        registry = await self.started(FileRegistry(self.root, reactor=reactor))
        versions = [
            make_instance(port=9000, uuid="u", extra={"blob": letter * 60_000}) for letter in "ab"
        ]
        await registry.add(versions[0])
        path = self.node_path(versions[0])
        seen: list[str] = []
        broken: list[bytes] = []
        done = threading.Event()

        def read() -> None:
            while not done.is_set():
                with open(path, "rb") as f:
                    data = f.read()
                try:
                    seen.append(json.loads(data)["Extra"]["blob"][0])
                except (ValueError, KeyError):
                    broken.append(data[:80])

        reader = threading.Thread(target=read)
        reader.start()
        try:
            for n in range(60):
                await registry.update(versions[n % 2])
        finally:
            done.set()
            reader.join()
        self.assertEqual(broken, [])
        self.assertEqual(set(seen), {"a", "b"})
        self.assertEqual(os.listdir(os.path.dirname(path)), ["9000"])

    async def test_crash_of_real_process(self) -> None:
        """
        The instance of a child process killed with SIGKILL disappears from
        queries and watches within a second (asserted: 3 s), and its files
        are pruned, though nobody cleaned up.
        """
        registry = await self.started(FileRegistry(self.root, reactor=reactor))
        instance = make_instance(name="Doomed")
        child = await self.spawn_owner(self.root, [instance])
        self.assertEqual(await registry.query(Query()), [instance])
        owner = read_json(self.node_path(instance))["Owner"]
        self.assertEqual(owner["pid"], child.transport.pid)
        listener = RecordingListener()
        registry.watch(Query(), listener)
        await self.wait_until(lambda: listener.events, "the snapshot")
        self.assertEqual(listener.events, [("snapshot", [instance])])

        killed_at = await self.kill(child)
        await self.wait_until(lambda: len(listener.events) > 1, "the removal")
        detected = listener.times[1] - killed_at
        print(f"\ncrash detected by the watch {detected:.3f}s after SIGKILL")
        self.assertEqual(listener.events[1:], [("removed", instance)])
        self.assertLess(detected, 3.0)
        self.assertEqual(await registry.query(Query()), [])
        self.assertFalse(os.path.exists(self.node_path(instance)))
        self.assertFalse(os.path.exists(self.node_path(instance, "statistics")))
        self.assertEqual(tree(self.root), ["services", "statistics"])

    async def test_query_hides_dead_owner_at_once(self) -> None:
        """
        A query checks owners itself: right after the kill, without waiting
        for any sweep, the instance is gone and pruned.
        """
        registry = await self.started(FileRegistry(self.root, reactor=reactor))
        instance = make_instance()
        child = await self.spawn_owner(self.root, [instance])
        self.assertEqual(await registry.query(Query()), [instance])
        await self.kill(child)
        self.assertEqual(await registry.query(Query()), [])
        self.assertEqual(tree(self.root), ["services", "statistics"])
        self.assertIsNone(await registry.get_stats(instance))

    async def test_pid_reuse(self) -> None:
        """
        An owner record naming a live pid with another start time is a dead
        owner whose pid was reused: its node is hidden and pruned.  The
        right start time keeps it; no owner record at all too.
        """
        registry = await self.started(FileRegistry(self.root, reactor=reactor))
        me = current_owner()
        reused = make_instance(name="Reused")
        alive = make_instance(name="Alive")
        unowned = make_instance(name="Unowned")
        self.write_node(reused, {"pid": os.getpid(), "start_time": me.start_time + 1234})
        self.write_node(alive, {"pid": os.getpid(), "start_time": me.start_time})
        self.write_node(unowned)
        self.assertEqual(await registry.services(), ["Alive", "Unowned"])
        self.assertFalse(os.path.exists(self.node_path(reused)))
        self.assertTrue(os.path.exists(self.node_path(alive)))

    async def test_malformed_files_skipped(self) -> None:
        """
        Garbage, partial JSON, a node at the wrong path and stray files are
        skipped with a logged warning, and watching goes on.
        """
        registry = await self.started(FileRegistry(self.root, reactor=reactor))
        good = make_instance(name="Good")
        await registry.add(good)
        services = os.path.join(self.root, "services")
        garbage = os.path.join(services, "Bad/1/r/h/1")
        partial = os.path.join(services, "Bad/1/r/h/2")
        misplaced = os.path.join(services, "Bad/1/r/h/3")
        write_atomically(garbage, b"\x00\xffnot json")
        write_atomically(partial, good.to_json()[:40])
        write_atomically(misplaced, good.to_json())
        write_atomically(os.path.join(services, "Bad/1/r/h/4"), b'{"Config": {}}')
        write_atomically(os.path.join(services, "stray"), b"{}")
        with capturedLogs() as events:
            self.assertEqual(await registry.query(Query()), [good])
            listener = RecordingListener()
            registry.watch(Query(), listener)
            await self.wait_until(lambda: listener.events, "the snapshot")
        self.assertEqual(listener.events, [("snapshot", [good])])
        warned = {
            e.get("path") for e in events if "Ignoring registry node" in e.get("log_format", "")
        }
        self.assertEqual(
            warned, {garbage, partial, misplaced, os.path.join(services, "Bad/1/r/h/4")}
        )

        fixed = make_instance(name="Bad", version="1", region="r", host="h", port=1)
        write_atomically(garbage, encode_node(fixed.to_go(), current_owner()))
        await self.wait_until(lambda: len(listener.events) > 1, "the fixed node")
        self.assertEqual(listener.events[1:], [("added", fixed)])

    async def test_polling(self) -> None:
        """
        With C{use_inotify=False} a watch learns of other processes' changes
        by polling.
        """
        registry = await self.started(
            FileRegistry(self.root, reactor=reactor, use_inotify=False, poll_interval=0.1)
        )
        listener = RecordingListener()
        watch = registry.watch(Query(), listener)
        await self.wait_until(lambda: listener.events, "the snapshot")
        self.assertIsNone(watch.scanner.notifier)
        instance = make_instance()
        path = self.write_node(instance, current_owner().to_json())
        await self.wait_until(lambda: len(listener.events) > 1, "the addition", timeout=3)
        os.unlink(path)
        await self.wait_until(lambda: len(listener.events) > 2, "the removal", timeout=3)
        self.assertEqual(
            listener.events,
            [("snapshot", []), ("added", instance), ("removed", instance)],
        )

    async def test_inotify(self) -> None:
        """
        With inotify, changes by other processes arrive at once though
        polling would take a minute, also in directories created, deleted
        and created again meanwhile.
        """
        if files.inotify is None:
            missing_here("no inotify here")
        registry = await self.started(FileRegistry(self.root, reactor=reactor, poll_interval=60))
        listener = RecordingListener()
        watch = registry.watch(Query(), listener)
        await self.wait_until(lambda: listener.events, "the snapshot")
        self.assertIsNotNone(watch.scanner.notifier)
        owner = current_owner().to_json()
        first = make_instance(name="New", version="9")
        path = self.write_node(first, owner)
        start = time.monotonic()
        await self.wait_until(lambda: len(listener.events) > 1, "the addition", timeout=2)
        os.unlink(path)
        files.prune_empty_dirs(os.path.join(self.root, "services"), os.path.dirname(path))
        await self.wait_until(lambda: len(listener.events) > 2, "the removal", timeout=2)
        self.assertFalse(os.path.exists(os.path.join(self.root, "services", "New")))
        again = attr.evolve(first, uuid="again")
        self.write_node(again, owner)
        await self.wait_until(lambda: len(listener.events) > 3, "the re-addition", timeout=2)
        self.assertLess(time.monotonic() - start, 5)
        self.assertEqual(
            listener.events,
            [("snapshot", []), ("added", first), ("removed", first), ("added", again)],
        )

    async def test_unwatchable_directory_is_polled(self) -> None:
        """
        A directory inotify cannot watch (out of watches) is still listed,
        and the scanner polls so that changes in it are seen.
        """
        if files.inotify is None:
            missing_here("no inotify here")
        registry = await self.started(FileRegistry(self.root, reactor=reactor, poll_interval=0.1))
        listener = RecordingListener()
        watch = registry.watch(Query(), listener)
        await self.wait_until(lambda: listener.events, "the snapshot")
        notifier = watch.scanner.notifier
        ensure_watched = notifier.ensure_watched
        blind = os.path.join(self.root, "services", "Blind")

        def refuse(path: str) -> None:
            if path.startswith(blind):
                raise files.inotify.INotifyError("no more watches")
            ensure_watched(path)

        self.patch(notifier, "ensure_watched", refuse)
        self.patch(notifier, "_watch_subtree", lambda path: None)
        self.patch(files, "SAFETY_RESCAN_TICKS", 10**9)
        owner = current_owner().to_json()
        first = make_instance(name="Blind")
        self.write_node(first, owner)
        await self.wait_until(lambda: len(listener.events) > 1, "the addition")
        self.assertTrue(watch.scanner._unwatched)
        second = make_instance(name="Blind")
        self.write_node(second, owner)
        await self.wait_until(lambda: len(listener.events) > 2, "the second addition")
        self.assertEqual(listener.events, [("snapshot", []), ("added", first), ("added", second)])

    async def test_two_registries_one_process(self) -> None:
        """
        Two registry objects in one process on one root see each other's
        changes when they share a scanner.
        """
        await self.check_two_registries({})

    async def test_two_registries_two_scanners(self) -> None:
        """
        Two registry objects in one process on one root see each other's
        changes with a scanner each (here, inotify: polling would take 30 s).
        """
        if files.inotify is None:
            missing_here("no inotify here")
        await self.check_two_registries({"poll_interval": 30})

    async def check_two_registries(self, options: dict[str, Any]) -> None:
        one = await self.started(FileRegistry(self.root, reactor=reactor))
        two = await self.started(FileRegistry(self.root, reactor=reactor, **options))
        seen_by_one = RecordingListener()
        seen_by_two = RecordingListener()
        one.watch(Query(), seen_by_one)
        two.watch(Query(), seen_by_two)
        await self.wait_until(lambda: seen_by_one.events and seen_by_two.events, "snapshots")
        a = make_instance()
        b = make_instance()
        await one.add(a)
        await two.add(b)
        await self.wait_until(
            lambda: len(seen_by_one.events) == len(seen_by_two.events) == 3, "additions"
        )
        for listener in (seen_by_one, seen_by_two):
            # Additions close together may come from one scan, in path order.
            self.assertEqual(listener.events[0], ("snapshot", []))
            self.assertEqual(
                sorted(listener.events[1:], key=lambda e: e[1].uuid),
                sorted([("added", a), ("added", b)], key=lambda e: e[1].uuid),
            )
        await one.stop()
        await self.wait_until(lambda: len(seen_by_two.events) == 4, "the removal")
        self.assertEqual(seen_by_two.events[3], ("removed", a))

    async def test_rescans_reread_only_changes(self) -> None:
        """
        With a thousand instances, a rescan re-reads only the files that
        changed.
        """
        registry = await self.started(FileRegistry(self.root, reactor=reactor))
        owner = current_owner().to_json()
        instances = [make_instance(name=f"S{n % 10}", port=10000 + n) for n in range(1000)]
        for instance in instances:
            self.write_node(instance, owner)
        started = time.monotonic()
        self.assertEqual(len(await registry.query(Query())), 1000)
        first = time.monotonic() - started
        scanner = registry._scanner
        self.assertEqual(scanner.reads, 1000)
        started = time.monotonic()
        self.assertEqual(len(await registry.query(Query())), 1000)
        again = time.monotonic() - started
        self.assertEqual(scanner.reads, 1000)
        print(f"\n1000 instances: first scan {first * 1000:.0f} ms, rescan {again * 1000:.0f} ms")
        await registry.update(attr.evolve(instances[0], registered=False))
        self.assertEqual(len(await registry.query(Query(registered=True))), 999)
        self.assertEqual(scanner.reads, 1001)

    async def test_changes_are_kept_only_for_watches_with_a_snapshot(self) -> None:
        """
        A registry that only queries keeps no record of the changes it saw
        (it would grow with the churn), nor does a watch's first scan (the
        snapshot comes from the live view); a watch that has its snapshot
        gets the changes after it.
        """
        registry = await self.started(FileRegistry(self.root, reactor=reactor))
        owner = current_owner().to_json()
        instances = [make_instance(name="S", port=10000 + n) for n in range(50)]
        for instance in instances:
            self.write_node(instance, owner)
        scanner = registry._get_scanner()
        for n in range(3):
            for instance in instances[:10]:
                self.write_node(attr.evolve(instance, registered=bool(n % 2)), owner)
            self.assertEqual(len(await registry.query(Query())), 50)
        self.assertEqual(scanner._changes, [])
        listener = RecordingListener()
        watch = registry.watch(Query(), listener)
        self.addCleanup(watch.stop)
        await self.wait_until(lambda: listener.events, "the snapshot")
        self.assertEqual(len(listener.events[0][1]), 50)
        self.assertEqual(scanner._changes, [])
        changed = attr.evolve(instances[20], registered=False)
        self.write_node(changed, owner)
        await self.wait_until(lambda: len(listener.events) > 1, "the change")
        self.assertEqual(listener.events[1:], [("updated", changed)])

    async def test_one_service_reads_only_its_subtree(self) -> None:
        """
        A watch or a query of one service reads that service's files only,
        and a change elsewhere costs it no read; a change in its service
        is re-read alone.
        """
        registry = await self.started(FileRegistry(self.root, reactor=reactor))
        owner = current_owner().to_json()
        instances = [make_instance(name=f"S{n % 20}", port=10000 + n) for n in range(400)]
        for instance in instances:
            self.write_node(instance, owner)
        scanner = registry._get_scanner()
        listener = RecordingListener()
        watch = registry.watch(Query(service="S3"), listener)
        self.addCleanup(watch.stop)
        await self.wait_until(lambda: listener.events, "the snapshot")
        self.assertEqual(len(listener.events[0][1]), 20)
        self.assertEqual(scanner.reads, 20)
        self.assertEqual(len(await registry.query(Query(service="S3"))), 20)
        self.assertEqual(len(await registry.query(Query(service="S4", version="1"))), 20)
        self.assertEqual(scanner.reads, 40)
        self.write_node(attr.evolve(instances[7], registered=False), owner)  # S7
        changed = attr.evolve(instances[3], registered=False)  # S3
        self.write_node(changed, owner)
        await self.wait_until(lambda: len(listener.events) > 1, "the change")
        self.assertEqual(listener.events[1:], [("updated", changed)])
        self.assertEqual(scanner.reads, 41)

    async def test_stop(self) -> None:
        """
        C{stop} deletes this object's nodes (not a node another object has
        since overwritten), stops its watches and leaves no timers.
        """
        registry = await self.started(FileRegistry(self.root, reactor=reactor, poll_interval=0.05))
        other = await self.started(FileRegistry(self.root, reactor=reactor))
        mine = make_instance()
        taken = make_instance()
        await registry.add(mine)
        await registry.add(taken)
        await other.add(taken)
        listener = RecordingListener()
        registry.watch(Query(), listener)
        await self.wait_until(lambda: listener.events, "the snapshot")
        await registry.stop()
        await registry.stop()
        self.assertEqual(await other.query(Query()), [taken])
        self.assertFalse(os.path.exists(self.node_path(mine)))
        count = len(listener.events)
        await other.add(make_instance())
        await sleep(0.2)
        self.assertEqual(len(listener.events), count)
        self.assertEqual(
            files._scanners.get((reactor, os.path.realpath(self.root), 0.05, True)),
            None,
        )
        self.failureResultOf(registry.add(mine), RegistryError)

    def test_default_root(self) -> None:
        """
        C{$SKYNET_HOME/registry}, else C{~/.skynet/registry}.
        """
        self.setenv("SKYNET_HOME", "/some/home")
        self.assertEqual(default_registry_root(), "/some/home/registry")
        self.setenv("SKYNET_HOME", None)
        self.setenv("HOME", "/home/someone")
        self.assertEqual(default_registry_root(), "/home/someone/.skynet/registry")

    def setenv(self, name: str, value: str | None) -> None:
        old = os.environ.get(name)

        def restore() -> None:
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old

        self.addCleanup(restore)
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


class RegistryFromURLTests(TestCase):
    """
    L{registry_from_url} for each scheme.
    """

    setenv = FileRegistryTests.setenv

    def test_file(self) -> None:
        registry = registry_from_url("file:///tmp/some%20where/registry", reactor=reactor)
        self.assertIsInstance(registry, FileRegistry)
        self.assertEqual(registry.root, "/tmp/some where/registry")
        self.assertEqual(registry_from_url(registry.url, reactor=reactor).root, registry.root)
        self.assertTrue(registry.use_inotify)

    def test_file_options(self) -> None:
        registry = registry_from_url("file:///srv/r?poll_interval=0.25&inotify=0", reactor=reactor)
        self.assertEqual((registry.poll_interval, registry.use_inotify), (0.25, False))

    def test_default(self) -> None:
        """
        No URL: C{$SKYNET_REGISTRY}, else the embedded registry at the
        default root.
        """
        self.setenv(DEFAULT_REGISTRY_ENV, None)
        self.setenv("SKYNET_HOME", "/skynet-home")
        for url in (None, ""):
            registry = registry_from_url(url, reactor=reactor)
            self.assertIsInstance(registry, FileRegistry)
            self.assertEqual(registry.root, "/skynet-home/registry")
        self.setenv(DEFAULT_REGISTRY_ENV, "memory://from-env")
        registry = registry_from_url(None, reactor=reactor)
        self.assertIsInstance(registry, MemoryRegistry)
        self.assertEqual(registry.url, "memory://from-env")

    def test_memory(self) -> None:
        one = registry_from_url("memory://shared", reactor=reactor)
        two = registry_from_url("memory://shared", reactor=reactor)
        self.assertIsInstance(one, MemoryRegistry)
        self.assertIs(one.store, two.store)

    def test_zookeeper(self) -> None:
        """
        C{zk://} URLs go to C{ZooKeeperRegistry.from_url}, imported only
        then.
        """
        calls = []

        class ZooKeeperRegistry:
            @classmethod
            def from_url(cls, url, reactor=None):
                calls.append((url, reactor))
                return "the zk registry"

        fake = types.ModuleType("skynet.registry.zookeeper")
        fake.ZooKeeperRegistry = ZooKeeperRegistry  # type: ignore[attr-defined]
        name = "skynet.registry.zookeeper"
        old = sys.modules.get(name)
        sys.modules[name] = fake
        self.addCleanup(
            lambda: sys.modules.pop(name) if old is None else sys.modules.update({name: old})
        )
        url = "zk://10.0.0.1:2181,10.0.0.2:2181/skynet"
        self.assertEqual(registry_from_url(url, reactor=reactor), "the zk registry")
        self.assertEqual(calls, [(url, reactor)])

    @pytest.mark.slow
    def test_import_is_lazy(self) -> None:
        """
        Importing C{skynet.registry} imports no backend and not kazoo (nor a
        reactor); the names still resolve, and a URL brings in only its
        backend.
        """
        script = (
            "import sys\n"
            "import skynet.registry as r\n"
            "loaded = sorted(m for m in sys.modules if m.startswith(('kazoo',"
            " 'skynet.registry.', 'psutil')) or m == 'twisted.internet.reactor')\n"
            "assert loaded == ['skynet.registry.base'], loaded\n"
            "assert r.FileRegistry.__module__ == 'skynet.registry.files'\n"
            "assert r.MemoryRegistry.__module__ == 'skynet.registry.memory'\n"
            "r.registry_from_url('memory://x', reactor=object())\n"
            "assert 'kazoo' not in sys.modules\n"
            "from skynet.registry import files\n"
            "print('ok')\n"
        )
        import subprocess

        result = subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
            timeout=60,
        )
        self.assertEqual((result.returncode, result.stdout), (0, "ok\n"), result.stderr)

    def test_bad_urls(self) -> None:
        """
        Anything else is a L{RegistryError} saying what is accepted.
        """
        for url in ("http://example.com/", "registry", "/abs/path", "mongodb://x"):
            e = self.assertRaises(RegistryError, registry_from_url, url)
            self.assertIn("file://", str(e))
            self.assertIn("memory://", str(e))
            self.assertIn("zk://", str(e))
            self.assertIn(url, str(e))
            self.assertNotIn("\n", str(e))
        for url in (
            "file://host/path",
            "file:relative/path",
            "file:///",
            "file:///r?poll_interval=x",
            "file:///r?poll_interval=0",
            "file:///r?inotify=maybe",
            "file:///r?colour=blue",
            "memory://name/path",
        ):
            self.assertRaises(RegistryError, registry_from_url, url)
