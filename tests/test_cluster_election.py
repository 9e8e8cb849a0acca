"""
Leader election between real processes (C{python -m skynet.cluster.leader}):
on the embedded registry and on a real ZooKeeper server, C{kill -9} of the
leader makes another process the leader; a frozen leader whose ZooKeeper
session expired is deposed when it wakes, so two never lead at once.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from twisted.internet.defer import CancelledError
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from tests.zkserver import ZooKeeperCluster

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


class Campaigner:
    """
    One C{python -m skynet.cluster.leader} process and the lines it printed.
    """

    def __init__(self, url: str, name: str, home: str, *extra: str) -> None:
        self.name = name
        env = dict(os.environ, SKYNET_HOME=home, PYTHONUNBUFFERED="1")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "skynet.cluster.leader",
                "--registry",
                url,
                "--name",
                name,
                *extra,
            ],  # fmt: skip
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._queue.put(line.rstrip("\n"))

    def wait_for(self, prefix: str, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        for line in self.lines:
            if line.startswith(prefix):
                self.lines.remove(line)
                return line
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=0.05)
            except queue.Empty:
                if self.process.poll() is not None and self._queue.empty():
                    break
                continue
            if line.startswith(prefix):
                return line
            self.lines.append(line)
        raise AssertionError(f"{self.name}: no {prefix!r} line in {timeout}s; got {self.lines}")

    def drain(self) -> list[str]:
        while True:
            try:
                self.lines.append(self._queue.get_nowait())
            except queue.Empty:
                return self.lines

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)

    def close(self) -> None:
        self.kill(signal.SIGKILL)
        self.process.wait(timeout=10)


def elect(campaigners: list[Campaigner], timeout: float = 30.0) -> Campaigner:
    """
    Wait until one of them prints ELECTED; check no other did.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for c in campaigners:
            if any(line.startswith("ELECTED") for line in c.drain()):
                others = [
                    o for o in campaigners if o is not c and any(
                        line.startswith("ELECTED") for line in o.drain()
                    )
                ]  # fmt: skip
                assert not others, [o.lines for o in others]
                c.lines = [line for line in c.lines if not line.startswith("ELECTED")]
                return c
        time.sleep(0.05)
    raise AssertionError(f"nobody elected in {timeout}s: {[c.lines for c in campaigners]}")


@pytest.fixture
def home():
    with tempfile.TemporaryDirectory() as d:
        yield d


def campaign_and_kill(url: str, home: str, timeout: float) -> float:
    campaigners = [Campaigner(url, name, home) for name in ("first", "second", "third")]
    try:
        for c in campaigners:
            c.wait_for("CAMPAIGNING")
        leader = elect(campaigners)
        rest = [c for c in campaigners if c is not leader]
        # Nobody else takes over while the leader lives.
        time.sleep(1.0)
        assert not any(line.startswith("ELECTED") for c in rest for line in c.drain())
        killed_at = time.monotonic()
        leader.kill(signal.SIGKILL)
        second = elect(rest, timeout)
        took = time.monotonic() - killed_at
        # And the next after that.
        second.kill(signal.SIGKILL)
        third = elect([c for c in rest if c is not second], timeout)
        assert third is not leader and third is not second
        return took
    finally:
        for c in campaigners:
            c.close()


def test_embedded_registry_kill_9_of_the_leader(home) -> None:
    url = "file://" + os.path.join(home, "registry")
    took = campaign_and_kill(url, home, timeout=10.0)
    print(f"\n[cluster figure] embedded: next leader {took:.2f}s after kill -9", file=sys.stderr)


@pytest.fixture(scope="module")
def zookeeper():
    cluster = ZooKeeperCluster(size=1).start()
    yield cluster
    cluster.close()


def test_zookeeper_kill_9_of_the_leader(zookeeper, home) -> None:
    url = zookeeper.url("/cluster-kill", session_timeout=2)
    took = campaign_and_kill(url, home, timeout=20.0)
    print(f"\n[cluster figure] zookeeper: next leader {took:.2f}s after kill -9", file=sys.stderr)


def test_zookeeper_frozen_leader_is_deposed_when_it_wakes(zookeeper, home) -> None:
    url = zookeeper.url("/cluster-freeze", session_timeout=2)
    campaigners = [Campaigner(url, name, home) for name in ("a", "b")]
    try:
        for c in campaigners:
            c.wait_for("CAMPAIGNING")
        leader = elect(campaigners)
        other = next(c for c in campaigners if c is not leader)
        leader.kill(signal.SIGSTOP)
        elect([other], timeout=20.0)
        leader.kill(signal.SIGCONT)
        line = leader.wait_for("DEPOSED", timeout=20.0)
        assert "ZooKeeper" in line, line
        # It campaigns again and waits: the other still leads.
        time.sleep(2.0)
        assert not any(x.startswith("ELECTED") for x in leader.drain()), leader.lines
        assert not any(x.startswith("DEPOSED") for x in other.drain()), other.lines
    finally:
        for c in campaigners:
            c.close()


def test_zookeeper_suspended_leader_steps_down_and_resumes(home) -> None:
    """
    The ZooKeeper server restarts within the session timeout: the leader
    steps down while its connection is suspended, and leads again when the
    same session comes back, without a new campaign; the other never leads.
    """
    cluster = ZooKeeperCluster(size=1).start()
    try:
        url = cluster.url("/cluster-suspend", session_timeout=10)
        campaigners = [Campaigner(url, name, home) for name in ("a", "b")]
        try:
            for c in campaigners:
                c.wait_for("CAMPAIGNING")
            leader = elect(campaigners)
            other = next(c for c in campaigners if c is not leader)
            cluster.members[0].kill()
            line = leader.wait_for("DEPOSED", timeout=20.0)
            assert "suspended" in line, line
            cluster.members[0].start()
            cluster.wait_serving()
            leader.wait_for("ELECTED", timeout=20.0)
            time.sleep(2.0)
            assert not any(x.startswith("ELECTED") for x in other.drain()), other.lines
            # The same session: never lost, so no second campaign.
            assert not any("session lost" in x for x in leader.drain()), leader.lines
        finally:
            for c in campaigners:
                c.close()
    finally:
        cluster.close()


class ZooKeeperLockTests(TestCase):
    """
    L{ZooKeeperLock} in this process, on a real server: held, waited for,
    cancelled, handed on, and its holder named.
    """

    timeout = 60

    async def test_lock_in_process(self) -> None:
        from twisted.internet import reactor

        from skynet.registry.locks import ZooKeeperLock, registry_lock
        from skynet.registry.zookeeper import ZooKeeperRegistry

        cluster = ZooKeeperCluster(size=1).start()
        self.addCleanup(cluster.close)
        url = cluster.url("/lock-in-process", session_timeout=2)
        registries = []
        for _ in range(2):
            registry = ZooKeeperRegistry.from_url(url, reactor=reactor)
            await registry.start()
            self.addCleanup(registry.stop)
            registries.append(registry)
        a = registry_lock(registries[0], "cluster/leader", identifier="a", reactor=reactor)
        b = registry_lock(registries[1], "cluster/leader", identifier="b", reactor=reactor)
        c = registry_lock(registries[1], "cluster/leader", identifier="c", reactor=reactor)
        assert isinstance(a, ZooKeeperLock)
        for lock in (a, b, c):
            self.addCleanup(lock.release)
        await a.acquire()
        self.assertTrue(a.held)
        self.assertEqual(await b.holder(), "a")
        waiting_b = b.acquire()
        waiting_c = c.acquire()
        await deferLater(reactor, 0.5, lambda: None)
        self.assertFalse(waiting_b.called or waiting_c.called)
        # c gives up waiting; a lets go: b gets it.
        waiting_c.cancel()
        with self.assertRaises(CancelledError):
            await waiting_c
        await a.release()
        await waiting_b
        self.assertTrue(b.held and not a.held and not c.held)
        self.assertEqual(await a.holder(), "b")
        await b.release()
        self.assertIsNone(await a.holder())
        # A released lock campaigns again (a new term after stepping down).
        await a.acquire()
        self.assertEqual(await c.holder(), "a")
        await a.release()
