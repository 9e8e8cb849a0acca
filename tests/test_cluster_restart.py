"""
Rolling restarts on real processes: one C{twistd -n skynet-daemon}
supervising 4 Fibonacci instances, the real C{sky --service Fibonacci
restart} under a bounded load of 500 calls/s.  The instances are restarted
one at a time, each replaced by a process that answers before the old one
stops: zero failed calls, and a registry watch never sees fewer than 4
registered.  C{--all-at-once} restarts them together, as before.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time

import pytest
from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from skynet.client import Client
from skynet.registry import Query, registry_from_url
from skynet.registry.base import IInstanceListener, Instance
from tests.processes import ROOT, child_env, terminate, twistd, wait_for
from tests.test_cluster_hosts import figure, kill_strays, paced_load, rate

pytestmark = pytest.mark.slow


@implementer(IInstanceListener)
class RegisteredCounter:
    """
    Follows the registered Fibonacci instances through a registry watch,
    keeping the lowest count seen once armed.
    """

    def __init__(self) -> None:
        self.registered: dict[str, Instance] = {}
        self.lowest: int | None = None
        self.armed = False
        self.log: list[str] = []

    def _seen(self, what: str = "") -> None:
        if self.armed:
            count = len(self.registered)
            self.log.append(f"{what} -> {count}")
            self.lowest = count if self.lowest is None else min(self.lowest, count)

    def snapshot(self, instances: list[Instance]) -> None:
        self.registered = {i.uuid: i for i in instances if i.registered}
        self._seen()

    def added(self, instance: Instance) -> None:
        self.updated(instance)

    def updated(self, instance: Instance) -> None:
        if instance.registered:
            self.registered[instance.uuid] = instance
        else:
            self.registered.pop(instance.uuid, None)
        self._seen(f"updated {instance.uuid[:8]} registered={instance.registered}")

    def removed(self, instance: Instance) -> None:
        self.registered.pop(instance.uuid, None)
        self._seen(f"removed {instance.uuid[:8]}")


class RollingRestartTests(TestCase):
    timeout = 240

    async def test_rolling_restart_of_four_under_load(self) -> None:
        root = tempfile.mkdtemp(prefix="skynet-cluster-restart-")
        self.addCleanup(shutil.rmtree, root, True)
        self.addCleanup(kill_strays, root)
        url = "file://" + os.path.join(root, "registry")
        deploy = os.path.join(root, "deploy.txt")
        with open(deploy, "w") as f:
            f.write("examples.fibonacci:Fibonacci --stats-interval 0.5\n" * 4)
        log = open(os.path.join(root, "daemon.log"), "ab")
        self.addCleanup(log.close)
        daemon = subprocess.Popen(
            [twistd(), "-n", "--pidfile=", "skynet-daemon", "--registry", url,
             "--listen", "tcp:0:interface=127.0.0.1", "--deploy", deploy,
             "--log-dir", os.path.join(root, "logs"), "--stats-interval", "0.5",
             "--stop-grace", "5", "--kill-time", "2", "--no-cluster"],
            cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            env=child_env(SKYNET_HOME=root),
        )  # fmt: skip
        self.addCleanup(terminate, daemon, 20)
        registry = registry_from_url(url, reactor)
        await registry.start()
        self.addCleanup(registry.stop)
        client = Client(registry=registry, reactor=reactor)
        self.addCleanup(client.stop)

        async def registered() -> list[Instance]:
            return await registry.query(Query(service="Fibonacci", registered=True))

        async def four() -> bool:
            return len(await registered()) == 4

        await wait_for(four, timeout=60, what="4 Fibonacci registered")
        before = {i.uuid for i in await registered()}
        counter = RegisteredCounter()
        watch = registry.watch(Query(service="Fibonacci"), counter)
        self.addCleanup(watch.stop)
        await wait_for(lambda: len(counter.registered) == 4, timeout=20, what="the watch")
        counter.armed = True

        fib = client.service("Fibonacci")
        await fib.call("Index", {"index": 10})
        callers, results = paced_load(fib, seconds=120.0, rate=500.0, callers=20)

        def sky(*argv: str) -> subprocess.CompletedProcess:
            return subprocess.run(
                [sys.executable, "-m", "skynet.sky", "--registry", url, *argv],
                cwd=ROOT, env=child_env(SKYNET_HOME=root), capture_output=True, text=True,
                timeout=180,
            )  # fmt: skip

        started = time.monotonic()
        restart = await deferToThread(sky, "--service", "Fibonacci", "--yes", "restart")
        took = time.monotonic() - started
        results["stop"] = True  # the callers end at their next call
        await callers
        self.assertEqual(restart.returncode, 0, restart.stdout + restart.stderr)
        lines = restart.stdout.splitlines()
        self.assertEqual(len(lines), 5, lines)
        for n, line in enumerate(lines[:4]):
            self.assertRegex(line, rf"^Restarted service with UUID [\w-]+ \({n + 1}/4\): now "
                                   r"[\w-]+ at 127\.0\.0\.1:\d+, registered and answering\.$")  # fmt: skip
        self.assertEqual(lines[4], "Restarted 4 instances, one at a time.")
        after = {i.uuid for i in await registered()}
        self.assertEqual(len(after), 4)
        self.assertEqual(after & before, set())
        self.assertEqual(results["failed"], [])
        self.assertGreater(results["ok"], 100)
        self.assertIsNotNone(counter.lowest)
        self.assertGreaterEqual(counter.lowest, 4, counter.log)
        figure(f"rolling restart of 4 (sky restart): {took:.1f}s, {results['ok']} calls "
               f"({rate(results)}), 0 failed, never fewer than {counter.lowest} registered")  # fmt: skip

        # --all-at-once: every instance restarted in place, together (once
        # the old ones have drained and left).
        async def only_four() -> bool:
            return len(await registry.query(Query(service="Fibonacci"))) == 4

        await wait_for(only_four, timeout=60, what="the old instances gone")
        restart = await deferToThread(sky, "--service", "Fibonacci", "--yes", "restart",
                                      "--all-at-once")  # fmt: skip
        self.assertEqual(restart.returncode, 0, restart.stdout + restart.stderr)
        self.assertEqual(sorted(restart.stdout.splitlines()),
                         sorted(f"Restarted service with UUID {u}." for u in after))  # fmt: skip
