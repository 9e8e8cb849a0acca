"""
The cluster on real processes: three C{twistd -n skynet-daemon} hosts on
127.0.0.2-4, nothing else (every daemon campaigns; the leader reconciles),
and C{sky apply}.  C{kill -9} of one host's daemon and children under a
bounded load (250 calls/s): capacity back to 3 on the survivors, zero
failed calls; the host back: exactly 3, one per host; C{kill -9} of the
leader daemon (and its children): another daemon leads and acts.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

import psutil
import pytest
from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from examples import loopback_hosts
from examples.loopback_hosts import HOSTS
from skynet.client import Client
from skynet.cluster.commands import read_statuses
from skynet.registry import Query, registry_from_url
from tests.processes import ROOT, child_env, sleep, wait_for
from tests.zkserver import ZooKeeperCluster

pytestmark = pytest.mark.slow

APPLY = """
[services.Fibonacci]
run = "{run}"
instances = {instances}
args = ["--stats-interval", "0.5"]
version = "{version}"
ready_timeout = {ready_timeout}
"""


def figure(text: str) -> None:
    print(f"\n[cluster figure] {text}", file=sys.stderr)


def paced_load(
    fibonacci: Any, seconds: float, rate: float = 250.0, callers: int = 10
) -> tuple[Any, dict[str, Any]]:
    """
    A bounded load: C{callers} loops calling C{Fibonacci.Index} on
    C{fibonacci}, together at most C{rate} calls a second, for C{seconds}.

    @return: a Deferred firing when all are done, and the results so far
        (C{{"ok": count, "failed": [repr, ...], "seconds": elapsed}}; set
        C{"stop"} there to end the load early).
    """
    from twisted.internet.defer import DeferredList, ensureDeferred

    results: dict[str, Any] = {"ok": 0, "failed": [], "seconds": seconds}
    started = time.monotonic()
    stop_at = started + seconds
    period = callers / rate

    async def caller(n: int) -> None:
        i = n
        due = started + n * period / callers
        while time.monotonic() < stop_at and not results.get("stop"):
            wait = due - time.monotonic()
            if wait > 0:
                await sleep(wait)
            due += period
            i = (i + 7) % 90
            try:
                r = await fibonacci.call("Index", {"index": i})
                assert r["index"] == i, r
                results["ok"] += 1
            except Exception as e:
                results["failed"].append(repr(e))

    def done(result: Any) -> Any:
        results["seconds"] = time.monotonic() - started
        return result

    return DeferredList([ensureDeferred(caller(n)) for n in range(callers)]).addCallback(
        done
    ), results


def rate(results: dict[str, Any]) -> str:
    return f"{results['ok'] / max(results['seconds'], 1e-9):.0f} calls/s"


#: The daemon flags of these tests: quick stops, ticks and listings.
DAEMON_ARGS = ["--stats-interval", "0.5", "--stop-grace", "3", "--kill-time", "2",
               "--cluster-interval", "0.5", "--cluster-list-interval", "3"]  # fmt: skip


class Host(loopback_hosts.Host):
    """
    A host of L{examples.loopback_hosts} with these tests' daemon flags and
    environment.
    """

    def __init__(self, root: str, address: str, registry: str) -> None:
        super().__init__(root, address, registry, DAEMON_ARGS, env=child_env())


def kill_strays(root: str) -> None:
    """
    Kill, by pid, processes whose command line names this test's temp dir.
    """
    for process in psutil.process_iter(["pid", "cmdline"]):
        try:
            if root in " ".join(process.info["cmdline"] or []) and process.pid != os.getpid():
                process.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass


class _ClusterMixin:
    """
    Three hosts (daemons) and the host-loss test, on the registry of
    L{registry_url}.
    """

    timeout = 240
    kind = "embedded"

    async def setup_cluster(self) -> None:
        self.root = tempfile.mkdtemp(prefix="skynet-cluster-hosts-")
        self.addCleanup(shutil.rmtree, self.root, True)
        self.addCleanup(kill_strays, self.root)
        self.url = self.registry_url()
        self.registry = registry_from_url(self.url, reactor)
        await self.registry.start()
        self.addCleanup(self.registry.stop)
        self.client = Client(registry=self.registry, reactor=reactor)
        self.addCleanup(self.client.stop)
        self.hosts = {a: Host(self.root, a, self.url).start() for a in HOSTS}
        for host in self.hosts.values():
            self.addCleanup(host.stop)
        await wait_for(self.daemons_up, timeout=60, what="3 daemons registered")

    async def leader(self, other_than: "Host | None" = None, timeout: float = 60.0) -> "Host":
        """
        The host whose daemon leads (the lock's holder names its pid),
        once there is one (other than C{other_than}).
        """
        found: list[Host] = []

        async def led() -> bool:
            _statuses, _stored, holder = await read_statuses(self.registry)
            if not holder or " pid " not in holder:
                return False
            pid = int(holder.rsplit(" pid ", 1)[1].split()[0])
            found[:] = [h for h in self.hosts.values()
                        if h.popen is not None and h.popen.pid == pid and h is not other_than
                        and h.popen.poll() is None]  # fmt: skip
            return bool(found)

        await wait_for(led, timeout=timeout, interval=0.02, what="a leading daemon")
        return found[0]

    def registry_url(self) -> str:
        return "file://" + os.path.join(self.root, "registry")

    async def daemons_up(self, count: int = 3) -> bool:
        found = await self.registry.query(Query(service="SkynetDaemon", registered=True))
        return len({i.host for i in found}) == count

    async def fibonacci(self) -> dict[str, int]:
        found = await self.registry.query(Query(service="Fibonacci", registered=True))
        per_host: dict[str, int] = {}
        for i in found:
            per_host[i.host] = per_host.get(i.host, 0) + 1
        return per_host

    def sky(self, *argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "skynet.sky", "--registry", self.url, *argv],
            cwd=ROOT, env=child_env(SKYNET_HOME=self.root), capture_output=True, text=True,
            timeout=60,
        )  # fmt: skip

    async def apply(
        self,
        instances: int,
        version: str = "1",
        run: str = "examples.fibonacci:Fibonacci",
        ready_timeout: float = 30,
    ) -> str:
        path = os.path.join(self.root, "cluster.toml")
        with open(path, "w") as f:
            f.write(APPLY.format(instances=instances, version=version, run=run,
                                 ready_timeout=ready_timeout))  # fmt: skip
        result = await deferToThread(self.sky, "apply", path)
        self.assertEqual(result.returncode, 0, result.stderr)
        return result.stdout

    async def wait_placement(self, wanted: dict[str, int], timeout: float = 60.0) -> None:
        async def placed() -> bool:
            return await self.fibonacci() == wanted

        try:
            await wait_for(placed, timeout=timeout, what=f"placement {wanted}")
        except AssertionError:
            listing = await deferToThread(self.sky, "deployments")
            raise AssertionError(
                f"placement is {await self.fibonacci()}, not {wanted}\n{listing.stdout}"
                + "".join(f"\n--- {a}:\n{h.output()}" for a, h in self.hosts.items())
            ) from None

    async def test_host_loss_return_and_leader_loss(self) -> None:
        await self.setup_cluster()
        leader = await self.leader()
        out = await self.apply(3)
        self.assertIn("+ Fibonacci: 3 x examples.fibonacci:Fibonacci", out)
        await self.wait_placement(dict.fromkeys(HOSTS, 1))
        # Applying again changes nothing.
        self.assertIn("No changes.", await self.apply(3))

        # A host (not the leader's) melts under load.
        fib = self.client.service("Fibonacci")
        await fib.call("Index", {"index": 10})
        callers, results = paced_load(fib, seconds=8.0)
        await sleep(1.5)
        melted = next(h for h in self.hosts.values() if h is not leader)
        melted_at = time.monotonic()
        await deferToThread(melted.melt)

        async def three_without(address: str) -> bool:
            per_host = await self.fibonacci()
            return address not in per_host and sum(per_host.values()) == 3

        await wait_for(lambda: three_without(melted.address), timeout=60,
                       what="3 instances on the survivors")  # fmt: skip
        healed = time.monotonic() - melted_at
        await callers
        self.assertEqual(results["failed"], [])
        self.assertGreater(results["ok"], 100)
        figure(f"{self.kind}: host kill -9 -> 3 registered on the survivors in {healed:.2f}s; "
               f"{results['ok']} calls ({rate(results)}), 0 failed")  # fmt: skip

        # It comes back: its daemon restarts its old child; one instance is
        # stopped so that exactly 3 remain, one per host, none duplicated.
        melted.start()
        await self.wait_placement(dict.fromkeys(HOSTS, 1), timeout=90)
        await sleep(4.0)
        self.assertEqual(await self.fibonacci(), dict.fromkeys(HOSTS, 1))
        found = await self.registry.query(Query(service="Fibonacci", registered=True))
        self.assertEqual(len({i.uuid for i in found}), 3)

        # The leader's host melts under load: another daemon leads and
        # re-creates its instance.
        callers, results = paced_load(fib, seconds=8.0)
        await sleep(1.5)
        killed_at = time.monotonic()
        await deferToThread(leader.melt)
        successor = await self.leader(other_than=leader)
        took_over = time.monotonic() - killed_at
        await wait_for(lambda: three_without(leader.address), timeout=60,
                       what="3 instances after the leader's death")  # fmt: skip
        healed = time.monotonic() - killed_at
        await callers
        self.assertEqual(results["failed"], [])
        self.assertNotEqual(successor, leader)
        figure(f"{self.kind}: leader kill -9 -> {successor.address} leads after "
               f"{took_over:.2f}s, 3 registered on the survivors after {healed:.2f}s; "
               f"{results['ok']} calls ({rate(results)}), 0 failed")  # fmt: skip

        # And it carries out a change.
        result = await deferToThread(self.sky, "scale", "Fibonacci=4")
        self.assertEqual(result.returncode, 0, result.stderr)

        async def four() -> bool:
            per_host = await self.fibonacci()
            return leader.address not in per_host and sum(per_host.values()) == 4

        await wait_for(four, timeout=60, what="4 instances after the leader's death")
        listing = await deferToThread(self.sky, "deployments")
        self.assertIn("Fibonacci", listing.stdout)
        self.assertIn(f"pid {successor.popen.pid}", listing.stdout)


class EmbeddedClusterTests(_ClusterMixin, TestCase):
    """
    On the embedded registry, and rolling upgrades.
    """

    async def test_rolling_upgrade_and_a_broken_one(self) -> None:
        await self.setup_cluster()
        await self.leader()
        await self.apply(4)

        async def four() -> bool:
            return sum((await self.fibonacci()).values()) == 4

        await wait_for(four, timeout=60, what="4 instances")
        fib = self.client.service("Fibonacci")
        await fib.call("Index", {"index": 10})

        # Load, and the lowest number of registered instances seen, while
        # the rollout runs.
        running = [True]
        results: dict = {"ok": 0, "failed": []}
        lowest = [4]

        async def caller(n: int) -> None:
            i = n
            while running[0]:
                i = (i + 7) % 90
                try:
                    r = await fib.call("Index", {"index": i})
                    assert r["index"] == i, r
                    results["ok"] += 1
                except Exception as e:
                    results["failed"].append(repr(e))

        async def counter() -> None:
            while running[0]:
                lowest[0] = min(lowest[0], sum((await self.fibonacci()).values()))
                await sleep(0.05)

        from twisted.internet.defer import DeferredList, ensureDeferred

        load = DeferredList(
            [ensureDeferred(caller(n)) for n in range(6)] + [ensureDeferred(counter())]
        )
        started = time.monotonic()
        self.assertIn("version 1 -> 2 (rolling replacement)", await self.apply(4, version="2"))
        status = await deferToThread(self.sky, "rollout", "status", "Fibonacci",
                                     "--timeout", "150")  # fmt: skip
        took = time.monotonic() - started
        running[0] = False
        await load
        self.assertEqual(status.returncode, 0, status.stdout + status.stderr)
        self.assertIn("Fibonacci: rolled out.", status.stdout)
        found = await self.registry.query(Query(service="Fibonacci", registered=True))
        self.assertEqual(sorted(i.version for i in found), ["2"] * 4)
        self.assertEqual(results["failed"], [])
        self.assertGreaterEqual(lowest[0], 4)
        figure(f"rolling upgrade of 4 instances: {took:.1f}s, {results['ok']} calls, "
               f"0 failed, never fewer than {lowest[0]} registered")  # fmt: skip

        # A broken version: the rollout stops, the old ones keep serving.
        before = sorted(i.uuid for i in found)
        await self.apply(4, version="3", run="examples.nosuch:Thing", ready_timeout=8)
        status = await deferToThread(self.sky, "rollout", "status", "Fibonacci",
                                     "--timeout", "120")  # fmt: skip
        self.assertEqual(status.returncode, 1, status.stdout + status.stderr)
        self.assertIn("stopped: new instance", status.stdout)
        found = await self.registry.query(Query(service="Fibonacci", registered=True))
        self.assertEqual(sorted(i.uuid for i in found), before)
        listing = await deferToThread(self.sky, "deployments")
        self.assertIn("failing", listing.stdout)
        self.assertIn("last exit:", listing.stdout)
        await fib.call("Index", {"index": 20})


class ZooKeeperClusterTests(_ClusterMixin, TestCase):
    """
    The same on a real ZooKeeper server (2 s sessions): a melted host's
    nodes go when its sessions expire.
    """

    kind = "zookeeper"

    def registry_url(self) -> str:
        zookeeper = ZooKeeperCluster(size=1).start()
        self.addCleanup(zookeeper.close)
        return zookeeper.url("/cluster-hosts", session_timeout=2)
