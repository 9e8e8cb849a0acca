"""
Tests for L{skynet.registry.locks} and L{skynet.cluster.leader} without
other processes: memory locks on a L{Clock}, file locks (real C{flock}s, in
one process) and the L{LeaderService} on both.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import pytest
from twisted.internet.defer import CancelledError
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from skynet.cluster.leader import LEADER_LOCK, LeaderService
from skynet.registry.files import FileRegistry
from skynet.registry.locks import (
    FileLock,
    MemoryLock,
    read_file_lock_holder,
    registry_lock,
)
from skynet.registry.memory import MemoryRegistry, MemoryStore


class Campaigner:
    """
    A L{LeaderService} and what it was told.
    """

    def __init__(self, registry, name, **kw) -> None:
        self.log: list[str] = []
        self.service = LeaderService(
            registry,
            lambda: self.log.append("elected"),
            lambda reason: self.log.append(f"deposed: {reason}"),
            identifier=name,
            **kw,
        )


class TemporaryMixin(SynchronousTestCase):
    def temporary(self) -> str:
        path = tempfile.mkdtemp(prefix="skynet-cluster-")
        self.addCleanup(shutil.rmtree, path, True)
        return os.path.join(path, "registry")


class MemoryLockTests(TemporaryMixin):
    def test_one_holder_then_the_next_in_order(self) -> None:
        store = MemoryStore()
        a, b, c = (MemoryLock(store, "x", identifier=n) for n in "abc")
        self.assertIsNone(self.successResultOf(a.acquire()))
        db, dc = b.acquire(), c.acquire()
        self.assertNoResult(db)
        self.assertEqual(self.successResultOf(b.holder()), "a")
        self.successResultOf(a.release())
        self.successResultOf(db)
        self.assertNoResult(dc)
        self.assertTrue(b.held and not a.held)

    def test_cancel_waiting(self) -> None:
        store = MemoryStore()
        a, b = MemoryLock(store, "x"), MemoryLock(store, "x")
        a.acquire()
        d = b.acquire()
        d.cancel()
        self.failureResultOf(d, CancelledError)
        a.release()
        self.assertFalse(b.held)
        self.assertIsNone(self.successResultOf(a.holder()))

    def test_separate_names_and_stores(self) -> None:
        store = MemoryStore()
        self.successResultOf(MemoryLock(store, "x").acquire())
        self.successResultOf(MemoryLock(store, "y").acquire())
        self.successResultOf(MemoryLock(MemoryStore(), "x").acquire())

    def test_lose_tells_observers(self) -> None:
        store = MemoryStore()
        a, b = MemoryLock(store, "x"), MemoryLock(store, "x")
        told: list = []
        a.observe(lambda held, reason: told.append((held, reason)))
        a.acquire()
        d = b.acquire()
        a.lose("session lost")
        self.assertEqual(told, [(False, "session lost")])
        self.successResultOf(d)

    def test_registry_lock_kinds(self, tmp: str | None = None) -> None:
        registry = MemoryRegistry(reactor=Clock())
        self.assertIsInstance(registry_lock(registry, "a/b"), MemoryLock)
        files = FileRegistry(self.temporary(), reactor=Clock())
        lock = registry_lock(files, "cluster/leader")
        self.assertIsInstance(lock, FileLock)
        assert isinstance(lock, FileLock)
        self.assertEqual(lock.path, os.path.join(files.root, "locks", "cluster%2Fleader"))
        with pytest.raises(ValueError):
            registry_lock(registry, "")
        with pytest.raises(TypeError):
            registry_lock(object(), "x")


class FileLockTests(TemporaryMixin):
    def setUp(self) -> None:
        self.clock = Clock()
        self.path = os.path.join(os.path.abspath(self.temporary()), "locks", "leader")

    def lock(self, name: str) -> FileLock:
        lock = FileLock(self.path, identifier=name, reactor=self.clock, poll_interval=0.5)
        self.addCleanup(lock.release)
        return lock

    def test_exclusive_and_polled(self) -> None:
        a, b = self.lock("a"), self.lock("b")
        self.successResultOf(a.acquire())
        self.assertEqual(read_file_lock_holder(self.path), "a")
        d = b.acquire()
        self.clock.advance(0.5)
        self.assertNoResult(d)
        a.release()
        self.assertIsNone(read_file_lock_holder(self.path))
        self.clock.advance(0.5)
        self.successResultOf(d)
        self.assertTrue(b.held)
        self.assertEqual(self.successResultOf(a.holder()), "b")
        with open(self.path, "rb") as f:
            self.assertEqual(json.loads(f.read())["pid"], os.getpid())

    def test_release_while_waiting_stops_polling(self) -> None:
        a, b = self.lock("a"), self.lock("b")
        a.acquire()
        d = b.acquire()
        b.release()
        self.failureResultOf(d, CancelledError)
        # Only the holder's check that its file is still the lock file.
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        a.release()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_replaced_file_is_a_lost_lock(self) -> None:
        a, b = self.lock("a"), self.lock("b")
        told: list = []
        a.observe(lambda held, reason: told.append((held, reason)))
        a.acquire()
        os.unlink(self.path)
        d = b.acquire()  # locks a new file at once
        self.successResultOf(d)
        self.clock.advance(0.5)
        self.assertEqual(told, [(False, "lock file replaced")])
        self.assertFalse(a.held)
        self.assertEqual(read_file_lock_holder(self.path), "b")

    def test_holder_of_garbage_file(self) -> None:
        os.makedirs(os.path.dirname(self.path))
        with open(self.path, "w") as f:
            f.write("not json")
        self.assertIsNone(read_file_lock_holder(self.path))
        self.assertIsNone(read_file_lock_holder(self.path + ".missing"))


class LeaderServiceTests(TemporaryMixin):
    def setUp(self) -> None:
        self.clock = Clock()
        self.registry = MemoryRegistry(reactor=self.clock)

    def test_exactly_one_leads_and_the_next_takes_over(self) -> None:
        a = Campaigner(self.registry, "a", reactor=self.clock)
        b = Campaigner(self.registry, "b", reactor=self.clock)
        a.service.startService()
        b.service.startService()
        self.assertEqual((a.log, b.log), (["elected"], []))
        self.assertTrue(a.service.leading and not b.service.leading)
        self.successResultOf(a.service.stopService())
        self.assertEqual(a.log, ["elected", "deposed: stopping"])
        self.assertEqual(b.log, ["elected"])
        self.successResultOf(b.service.stopService())

    def test_session_loss_deposes_and_campaigns_again(self) -> None:
        a = Campaigner(self.registry, "a", reactor=self.clock)
        b = Campaigner(self.registry, "b", reactor=self.clock)
        a.service.startService()
        b.service.startService()
        lock = a.service.lock
        assert isinstance(lock, MemoryLock)
        lock.lose("session lost")
        self.assertEqual(a.log, ["elected", "deposed: session lost"])
        self.assertEqual(b.log, ["elected"])
        # a campaigns again and leads when b goes.
        self.assertFalse(a.service.leading)
        self.successResultOf(b.service.stopService())
        self.assertEqual(a.log[-1], "elected")
        self.successResultOf(a.service.stopService())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_on_elected_failure_steps_down_and_retries(self) -> None:
        calls: list[str] = []

        def elected() -> None:
            calls.append("elected")
            if len(calls) == 1:
                raise RuntimeError("boom")

        service = LeaderService(
            self.registry,
            elected,
            lambda reason: calls.append(f"deposed: {reason}"),
            reactor=self.clock,
            retry_delay=2.0,
        )
        service.startService()
        self.assertEqual(calls, ["elected", "deposed: on_elected failed"])
        self.assertFalse(service.leading)
        self.clock.advance(2.0)
        self.assertEqual(calls[-1], "elected")
        self.assertTrue(service.leading)
        self.successResultOf(service.stopService())
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_stop_while_campaigning(self) -> None:
        a = Campaigner(self.registry, "a", reactor=self.clock)
        b = Campaigner(self.registry, "b", reactor=self.clock)
        a.service.startService()
        b.service.startService()
        self.successResultOf(b.service.stopService())
        self.assertEqual(b.log, [])
        self.successResultOf(a.service.stopService())
        self.assertEqual(self.successResultOf(a.service.lock.holder()), None)

    def test_file_registry_leader(self) -> None:
        registry = FileRegistry(self.temporary(), reactor=self.clock)
        a = Campaigner(registry, "a", reactor=self.clock)
        b = Campaigner(registry, "b", reactor=self.clock)
        a.service.startService()
        b.service.startService()
        self.assertEqual((a.log, b.log), (["elected"], []))
        self.assertEqual(self.successResultOf(b.service.lock.holder()), "a")
        self.successResultOf(a.service.stopService())
        self.clock.advance(0.5)
        self.assertEqual(b.log, ["elected"])
        self.successResultOf(b.service.stopService())
        self.assertEqual(LEADER_LOCK, "cluster/leader")
