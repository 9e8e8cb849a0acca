"""
The cluster across network namespaces: three hosts (namespaces A, B, C on
one switch), each a C{twistd -n skynet-daemon} on ZooKeeper (a server in
the root namespace: a 3-node ensemble, 2 s sessions) that campaigns for the
cluster's leadership (the leader reconciles), and a bounded load (250
calls/s) in the root namespace.  B's cable is pulled under load: its instance is
replaced on A or C within the session timeout plus the start time, zero
failed calls; the cable back in: exactly 3 instances, one per host.

Needs root and C{ip} (as the network namespace test of
L{tests.test_zookeeper_cluster}; both use L{tests.netns}).
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from twisted.internet import reactor
from twisted.internet.threads import deferToThread

from skynet.client import Client
from skynet.registry import Query, registry_from_url
from tests.netns import NamespaceTestCase
from tests.processes import ROOT, child_env, sleep, twistd, wait_for
from tests.test_cluster_hosts import paced_load, rate

pytestmark = pytest.mark.slow

SESSION_TIMEOUT = 2.0

APPLY = """
[services.Fibonacci]
run = "examples.fibonacci:Fibonacci"
instances = 3
args = ["--stats-interval", "0.5"]
"""


def figure(text: str) -> None:
    print(f"\n[cluster figure] {text}", file=sys.stderr)


class NetworkNamespaceClusterTests(NamespaceTestCase):
    timeout = 240
    directory_prefix = "skynet-cluster-netns-"

    def start_daemon(self, role: str, url: str) -> subprocess.Popen:
        address = self.network.addresses[role]
        home = self.directory / role
        home.mkdir(exist_ok=True)
        argv = [
            twistd(), "-n", "--pidfile=", "skynet-daemon",
            # The session timeout is in the URL (the URL and the flag
            # together give the children a URL naming it twice).
            "--registry", url,
            "--listen", f"tcp:0:interface={address}",
            "--state", str(home / "state.json"), "--log-dir", str(home / "logs"),
            "--stats-interval", "0.5", "--stop-grace", "3", "--kill-time", "2",
            "--cluster-interval", "0.5", "--cluster-list-interval", "3",
            # The switch's addresses are not loopback: without TLS, say so.
            "--insecure",
        ]  # fmt: skip
        log = open(home / "daemon.log", "ab")
        self.addCleanup(log.close)
        child = subprocess.Popen(
            self.network.command(role, argv), cwd=ROOT, stdin=subprocess.DEVNULL,
            stdout=log, stderr=subprocess.STDOUT,
            env=child_env(SKYNET_HOME=str(home), SKYNET_BIND_IP=address),
        )  # fmt: skip
        self.children.append(child)
        return child

    def reconnect(self, role: str) -> None:
        subprocess.run(
            ["ip", "-n", self.network.switch, "link", "set", f"host-{role}", "up"],
            check=True, timeout=20,
        )  # fmt: skip

    async def per_host(self) -> dict[str, int]:
        found = await self.registry.query(Query(service="Fibonacci", registered=True))
        counts: dict[str, int] = {}
        for i in found:
            counts[i.host] = counts.get(i.host, 0) + 1
        return counts

    async def dump(self, url: str) -> str:
        listing = await deferToThread(
            subprocess.run,
            [sys.executable, "-m", "skynet.sky", "--registry", url, "deployments"],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        text = f"placement {await self.per_host()}\n{listing.stdout}{listing.stderr}\n"
        for role in ("a", "b", "c"):
            log = self.directory / role / "daemon.log"
            text += f"--- daemon {role} ---\n{log.read_text(errors='replace')[-2500:]}\n"
        return text

    async def test_host_link_cut_and_back(self) -> None:
        members = self.start_ensemble()
        for member in members:
            await wait_for(
                lambda m=member: deferToThread(m.serving), timeout=60, what=f"{member} serving"
            )
        hosts = ",".join(m.address for m in members)
        url = f"zk://{hosts}/cluster-netns?session_timeout={SESSION_TIMEOUT:g}"
        self.registry = registry_from_url(url, reactor)
        await self.registry.start()
        self.addCleanup(self.registry.stop)
        client = Client(registry=self.registry, reactor=reactor)
        self.addCleanup(client.stop)

        addresses = self.network.addresses
        for role in ("a", "b", "c"):
            self.start_daemon(role, url)

        async def daemons() -> bool:
            found = await self.registry.query(Query(service="SkynetDaemon", registered=True))
            return {i.host for i in found} == set(addresses.values())

        try:
            await wait_for(daemons, timeout=60, what="3 daemons registered")
        except AssertionError:
            self.fail(await self.dump(url))
        path = self.directory / "cluster.toml"
        path.write_text(APPLY)
        applied = await deferToThread(
            subprocess.run,
            [sys.executable, "-m", "skynet.sky", "--registry", url, "apply", str(path)],
            cwd=ROOT, env=child_env(SKYNET_HOME=str(self.directory)), capture_output=True,
            text=True, timeout=60,
        )  # fmt: skip
        self.assertEqual(applied.returncode, 0, applied.stderr)
        spread = {addresses[r]: 1 for r in ("a", "b", "c")}

        async def placed(wanted: dict[str, int]) -> bool:
            return await self.per_host() == wanted

        try:
            await wait_for(lambda: placed(spread), timeout=90, what="one instance per host")
        except AssertionError:
            self.fail(await self.dump(url))

        fib = client.service("Fibonacci")
        await fib.call("Index", {"index": 10})
        callers, results = paced_load(fib, seconds=12.0)
        await sleep(1.5)
        cut = time.monotonic()
        self.network.cut("b")

        async def healed() -> bool:
            counts = await self.per_host()
            return addresses["b"] not in counts and sum(counts.values()) == 3

        async def b_gone() -> bool:
            found = await self.registry.query(Query(service="SkynetDaemon"))
            return addresses["b"] not in {i.host for i in found}

        await wait_for(b_gone, timeout=60, what="B's daemon gone from the registry")
        gone = time.monotonic() - cut
        await wait_for(healed, timeout=60, what="3 instances on A and C")
        took = time.monotonic() - cut
        await callers
        figure(
            f"netns: B's link cut -> B's daemon gone after {gone:.2f}s, "
            f"3 registered on A and C after {took:.2f}s "
            f"(session timeout {SESSION_TIMEOUT:g}s); {results['ok']} calls ({rate(results)}), "
            f"{len(results['failed'])} failed"
        )
        self.assertEqual(results["failed"], [])
        self.assertLessEqual(took, SESSION_TIMEOUT + 15.0)

        # The cable back in: B's daemon and child come back on new sessions;
        # the surplus goes, exactly one per host remains.
        self.reconnect("b")
        await wait_for(lambda: placed(spread), timeout=90, what="one per host again")
        await sleep(4.0)
        self.assertEqual(await self.per_host(), spread)
