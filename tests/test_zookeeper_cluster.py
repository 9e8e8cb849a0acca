"""
End to end on real ZooKeeper: C{twistd -n skynet-service --registry zk://...}
processes, a client in the test process (or, across network namespaces, in
a caller process of its own) calling them at a steady rate while ZooKeeper
members die, the whole ensemble stops, a service is killed with SIGKILL, and
a host drops off the network.

The ZooKeeper server must be installed (C{apt-get install -y zookeeper}); the
network namespace test needs root and C{ip}, and is skipped, saying why,
where namespaces cannot be created.  Figures are printed (C{pytest -s}).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import pytest
from kazoo.client import KazooClient
from kazoo.exceptions import (
    ConnectionClosedError,
    ConnectionLoss,
    NoNodeError,
    SessionExpiredError,
)
from kazoo.retry import KazooRetry
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.threads import deferToThread
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase

from skynet.client import Client
from skynet.registry import registry_from_url
from skynet.registry.base import Instance, RegistryError
from skynet.registry.files import FileRegistry
from skynet.registry.memory import MemoryRegistry
from skynet.registry.zookeeper import DEFAULT_SESSION_TIMEOUT, ZooKeeperRegistry
from tests.netns import NamespaceTestCase, SharedZooKeeper
from tests.netns_caller import SteadyLoad
from tests.processes import ROOT, ServiceProcess, child_env, sleep, twistd, wait_for
from tests.zkserver import (
    ZooKeeperCluster,
    ZooKeeperServer,
    four_letter_word,
)

#: Calls per second offered by every steady load here.
RATE = 250
TEST_SERVICE = "examples.testservice:TestService"

_chroots = iter(range(1, 1_000_000))


def figure(text: str) -> None:
    """
    Print a measured figure (visible with C{pytest -s}).
    """
    print(f"\n[zookeeper cluster figure] {text}", file=sys.stderr)


def describe(report: dict[str, Any]) -> str:
    return (
        f"{report['issued']} calls offered at {report['offered_per_second']}/s over "
        f"{report['duration']:.1f}s, {report['ok']} answered ({report['answered_per_second']}/s,"
        f" fewest in a second {report['fewest_answers_in_a_second']}), {report['failed']} failed,"
        f" slowest {report['slowest_call']}s"
    )


# -- a plain kazoo client: what another language's client sees


class Inspector:
    """
    A plain blocking kazoo client; every method runs in a thread so that the
    reactor (and the load it drives) never waits for it.
    """

    def __init__(self, hosts: str) -> None:
        self.hosts = hosts
        # Reconnect at least every second, as the registry does, so that an
        # outage does not leave this client's view behind.
        retry = KazooRetry(max_tries=-1, delay=0.1, backoff=2, max_delay=1.0)
        self.zk = KazooClient(hosts, timeout=DEFAULT_SESSION_TIMEOUT, connection_retry=retry)

    def start(self) -> Deferred:
        return deferToThread(self.zk.start, timeout=30)

    def close(self) -> Deferred:
        def close() -> None:
            self.zk.stop()
            self.zk.close()

        return deferToThread(close)

    def instances(self, chroot: str, name: str) -> Deferred:
        """
        @return: a Deferred firing with C{{pid: (path, uuid, ephemeral owner)}}
            for the instance nodes of service C{name}, or L{None} if the
            connection failed meanwhile.
        """
        return deferToThread(self._unless_disconnected, self._walk, f"{chroot}/services/{name}", 4)

    @staticmethod
    def _unless_disconnected(f: Callable[..., Any], *args: Any) -> Any:
        try:
            return f(*args)
        except (ConnectionLoss, ConnectionClosedError, SessionExpiredError):
            return None

    def _walk(self, path: str, below: int) -> dict[int, tuple[str, str, int]]:
        found: dict[int, tuple[str, str, int]] = {}
        try:
            if below == 0:
                data, stat = self.zk.get(path)
                instance = Instance.from_json(data)
                return {instance.pid: (path, instance.uuid, stat.ephemeralOwner)}  # type: ignore[dict-item]
            children = self.zk.get_children(path)
        except NoNodeError:
            return found
        for child in children:
            found.update(self._walk(f"{path}/{child}", below - 1))
        return found

    def exists(self, path: str) -> Deferred:
        """
        @return: a Deferred firing with whether C{path} exists, or L{None} if
            the connection failed meanwhile.
        """
        return deferToThread(self._unless_disconnected, lambda: self.zk.exists(path) is not None)


def session_timeouts(member: ZooKeeperServer) -> dict[int, int]:
    """
    The negotiated timeout (ms) of each session connected to C{member}, from
    C{cons}.
    """
    answer = four_letter_word(member.client_port, "cons", timeout=0.5) or ""
    found = {}
    for sid, timeout in re.findall(r"sid=0x([0-9a-f]+),.*?to=(\d+)", answer):
        found[int(sid, 16)] = int(timeout)
    return found


def listening_address(output: str) -> tuple[str, int] | None:
    """
    The address a service's log says it listens on.
    """
    match = re.search(r"listening on ([0-9.]+):(\d+)", output)
    return (match.group(1), int(match.group(2))) if match else None


class _ClusterTestCase(TestCase):
    """
    Helpers: service processes, a client on its own ZooKeeper registry, a
    plain kazoo inspector, all stopped at the end of the test.
    """

    timeout = 120
    cluster: ZooKeeperCluster

    def setUp(self) -> None:
        self.chroot = f"/e2e{next(_chroots)}-{os.getpid()}/skynet"
        self.url = self.cluster.url(self.chroot)
        self.processes: list[ServiceProcess] = []
        self.addCleanup(self._stop_processes)

    def service(self, *args: str, name: str = TEST_SERVICE) -> ServiceProcess:
        process = ServiceProcess(name, self.url, *args).start()
        self.processes.append(process)
        return process

    def _stop_processes(self) -> None:
        # SIGTERM all at once, then wait: each drains and leaves the registry.
        for process in self.processes:
            process.kill(signal.SIGTERM)
        for process in self.processes:
            process.stop()

    def logs(self) -> str:
        return "\n".join(f"--- pid {p.pid} ---\n{p.output()[-3000:]}" for p in self.processes)

    async def client(self) -> Client:
        registry = ZooKeeperRegistry.from_url(self.url, reactor=reactor)
        self.addCleanup(registry.stop)
        await registry.start()
        self.assertTrue(registry.connected)
        client = Client(registry=registry, reactor=reactor)
        self.addCleanup(client.stop)
        return client

    async def inspector(self) -> Inspector:
        inspector = Inspector(self.cluster.hosts)
        await inspector.start()
        self.addCleanup(inspector.close)
        return inspector

    async def registered(
        self, inspector: Inspector, name: str, processes: list[ServiceProcess]
    ) -> dict[int, tuple[str, str, int]]:
        """
        Wait until every one of C{processes} has its node under C{name}.
        """
        pids = {p.pid for p in processes}

        async def check() -> dict[int, tuple[str, str, int]] | None:
            found = await inspector.instances(self.chroot, name)
            if found is None:
                return None
            mine = {pid: node for pid, node in found.items() if pid in pids}
            return mine if len(mine) == len(pids) else None

        try:
            return await wait_for(check, timeout=30, what=f"{len(pids)} {name} node(s)")
        except AssertionError:
            self.fail(f"{name} not registered\n{self.logs()}")

    def load(self, service: Any) -> SteadyLoad:
        """
        Start a steady load on C{service}, stopped at the end of the test
        whatever happens.
        """
        load = SteadyLoad(service, RATE, reactor)
        load.start()
        self.addCleanup(load.stop)
        return load

    async def warm(self, client: Client, name: str, count: int) -> Any:
        service = client.service(name)
        await service.call("Upcase", {"data": "warm"})
        await wait_for(lambda: len(service.handles) == count, what=f"{count} {name} in rotation")
        return service


class EnsembleTests(SharedZooKeeper, _ClusterTestCase):
    """
    A 3-node ensemble shared by the tests of this class; each test starts
    with every member serving.
    """

    pytestmark = [pytest.mark.slow]
    zookeeper_size = 3

    def setUp(self) -> None:
        super().setUp()
        if not self.cluster.serving() or not all(m.running for m in self.cluster.members):
            self.cluster.start()

    async def test_member_and_leader_failover_under_load(self) -> None:
        """
        Under steady load, kill the member the service's session uses, bring
        it back, then kill the leader: zero failed calls, and the service's
        node survives on the same session.
        """
        services = [self.service(), self.service()]
        client = await self.client()
        inspector = await self.inspector()
        before = await self.registered(inspector, "TestService", services)
        victim = services[0]
        path, _, session = before[victim.pid]
        member = self.cluster.member_with_session(session)
        self.assertIsNotNone(member, f"no member holds session 0x{session:x}")
        assert member is not None
        # The default session timeout, as negotiated with the server.
        self.assertEqual(session_timeouts(member).get(session), DEFAULT_SESSION_TIMEOUT * 1000)

        load = self.load(await self.warm(client, "TestService", 2))
        await sleep(1.0)

        started = time.monotonic()
        await deferToThread(member.kill)
        moved = await wait_for(
            lambda: deferToThread(self.cluster.member_with_session, session),
            timeout=20,
            what="the session on another member",
        )
        figure(
            f"member {member.myid} (the service's) killed: session 0x{session:x} moved to "
            f"member {moved.myid} in {time.monotonic() - started:.2f}s"
        )
        self.assertIsNot(moved, member)
        await sleep(1.0)

        # Two of three must be up for a quorum once the leader goes too.
        member.start()
        await wait_for(lambda: deferToThread(member.serving), timeout=30, what="member back")
        leader = self.cluster.leader()
        assert leader is not None
        started = time.monotonic()
        await deferToThread(leader.kill)
        await wait_for(lambda: deferToThread(self.cluster.serving), timeout=30, what="new quorum")
        await wait_for(
            lambda: deferToThread(self.cluster.member_with_session, session),
            timeout=20,
            what="the session reconnected",
        )
        figure(
            f"leader (member {leader.myid}) killed: the service's session 0x{session:x} was "
            f"connected again {time.monotonic() - started:.2f}s later"
        )
        await sleep(1.0)
        report = await load.stop()
        figure(f"failover of a member then the leader under load: {describe(report)}")

        self.assertEqual(report["failures"], [], self.logs())
        self.assertEqual(report["ok"], report["issued"])
        self.assertGreaterEqual(report["offered_per_second"], 200)
        after = await self.registered(inspector, "TestService", services)
        # Same nodes, owned by the same sessions: nothing expired.
        self.assertEqual({pid: after.get(pid) for pid in before}, before)
        self.assertEqual(after[victim.pid][0], path)

    async def test_whole_ensemble_down_for_10s(self) -> None:
        """
        The whole ensemble stops for 10 s: clients keep calling the instances
        they know; a service started meanwhile serves direct connections and
        registers when ZooKeeper is back; everyone is registered afterwards.
        """
        services = [self.service(), self.service()]
        client = await self.client()
        inspector = await self.inspector()
        before = await self.registered(inspector, "TestService", services)
        load = self.load(await self.warm(client, "TestService", 2))
        await sleep(1.0)

        await deferToThread(self.cluster.stop)
        down = time.monotonic()
        late = self.service("--name", "LateService")
        await wait_for(
            lambda: "unreachable; waiting to register" in late.output(),
            timeout=20,
            what="the late service saying it waits for ZooKeeper",
        )
        address = listening_address(late.output())
        self.assertIsNotNone(address, late.output())
        assert address is not None
        # A client that knows its address (no ZooKeeper involved) is served.
        direct = Client(registry=MemoryRegistry(reactor=reactor), reactor=reactor)
        self.addCleanup(direct.stop)
        await direct.registry.add(
            Instance(uuid="late", name="LateService", version="unknown", region="unknown",
                     host=address[0], port=address[1])
        )  # fmt: skip
        answer = await direct.service("LateService").call("Upcase", {"data": "direct"})
        self.assertEqual(answer, {"data": "DIRECT"})

        await sleep(10.0 - (time.monotonic() - down))
        self.cluster.start(wait=False)
        up = time.monotonic()
        await wait_for(lambda: deferToThread(self.cluster.serving), timeout=60, what="quorum")
        quorum = time.monotonic() - up
        after = await self.registered(inspector, "TestService", services)
        await self.registered(inspector, "LateService", [late])
        registered_again = time.monotonic() - up
        # The late service, found through discovery by the client that lived
        # through the outage.
        found = client.service("LateService")
        answer = await found.call("Upcase", {"data": "found"})
        self.assertEqual(answer, {"data": "FOUND"})
        self.assertEqual([h.instance.pid for h in found.handles.values()], [late.pid])
        await sleep(1.0)
        report = await load.stop()
        kept = sum(after[pid][2] == before[pid][2] for pid in before)
        figure(
            f"ensemble down {up - down:.1f}s: quorum {quorum:.2f}s after restart, every service"
            f" registered {registered_again:.2f}s after restart ({kept} of {len(before)} kept"
            f" their session); {describe(report)}"
        )
        self.assertEqual(report["failures"], [], self.logs())
        self.assertEqual(report["ok"], report["issued"])
        self.assertGreaterEqual(report["offered_per_second"], 200)
        self.assertEqual({pid: node[0] for pid, node in after.items()},
                         {pid: node[0] for pid, node in before.items()})  # fmt: skip

    async def test_kill_9_node_gone_within_session_timeout(self) -> None:
        """
        C{kill -9} of a service (its session timeout set with
        C{--zk-session-timeout}): clients evict it at once, calls succeed, and
        its node is gone within the session timeout + 1 s.
        """
        timeout = 3.0
        victim = self.service("--zk-session-timeout", f"{timeout:g}")
        other = self.service()
        client = await self.client()
        inspector = await self.inspector()
        nodes = await self.registered(inspector, "TestService", [victim, other])
        path, uuid, session = nodes[victim.pid]
        member = self.cluster.member_with_session(session)
        assert member is not None
        self.assertEqual(session_timeouts(member).get(session), timeout * 1000)

        evicted: list[float] = []

        def observe(event: dict) -> None:
            if event.get("uuid") == uuid and "out of rotation" in event.get("log_format", ""):
                evicted.append(time.monotonic())

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        service = await self.warm(client, "TestService", 2)
        load = self.load(service)
        await sleep(1.0)

        killed = time.monotonic()
        victim.kill(signal.SIGKILL)
        left_client = None
        while True:
            if left_client is None and uuid not in service.handles:
                left_client = time.monotonic() - killed
            if await inspector.exists(path) is False:
                gone = time.monotonic() - killed
                break
            self.assertLess(time.monotonic() - killed, 30, "the node never went")
            await sleep(0.02)
        await wait_for(lambda: uuid not in service.handles, what="the client's view")
        if left_client is None:
            left_client = time.monotonic() - killed
        await sleep(0.5)
        report = await load.stop()
        self.assertTrue(evicted, "the client did not evict the dead instance")
        figure(
            f"kill -9 with a {timeout:g}s session: node gone after {gone:.2f}s, gone from the "
            f"client's instance list after {left_client:.2f}s; the client evicted it "
            f"{(evicted[0] - killed) * 1000:.0f} ms after the kill; {describe(report)}"
        )
        self.assertEqual(report["failures"], [], self.logs())
        self.assertLess(evicted[0] - killed, gone)
        # The documented bound: session timeout + 1 s.
        self.assertLessEqual(gone, timeout + 1.0)


# -- hosts as network namespaces


class Caller(ProcessProtocol):
    """
    The C{tests.netns_caller} child: its JSON lines as they come.
    """

    def __init__(self) -> None:
        self.buffer = b""
        self.events: list[dict[str, Any]] = []
        self.stderr = b""
        self.ended: Deferred = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        for line in lines:
            if line.strip():
                self.events.append(json.loads(line))

    def errReceived(self, data: bytes) -> None:
        self.stderr += data

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(None)

    def find(self, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any] | None:
        for event in self.events:
            if predicate(event):
                return event
        return None

    def stop(self) -> Deferred | None:
        if self.ended.called:
            return None
        try:
            self.transport.signalProcess("KILL")
        except ProcessExitedAlready:
            pass
        return self.ended


class NetworkNamespaceTests(NamespaceTestCase):
    """
    Two hosts, A and B, each running an instance; a third, C, runs a client
    calling at a steady rate; ZooKeeper runs in the root namespace on the
    same switch.  B's cable is pulled.
    """

    pytestmark = [pytest.mark.slow]
    timeout = 120

    def start_service(self, role: str, url: str) -> subprocess.Popen:
        address = self.network.addresses[role]
        argv = [
            twistd(), "-n", "--pidfile=", "skynet-service", "--service", TEST_SERVICE,
            "--registry", url, "--listen", f"tcp:0:interface={address}",
            "--stats-interval", "0.5",
        ]  # fmt: skip
        log = open(self.directory / f"service-{role}.log", "wb")
        self.addCleanup(log.close)
        child = subprocess.Popen(
            self.network.command(role, argv), cwd=ROOT, env=child_env(),
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.children.append(child)
        return child

    def logs(self, caller: Caller) -> str:
        text = ""
        for role in ("a", "b"):
            path = self.directory / f"service-{role}.log"
            text += f"--- service {role} ---\n{path.read_text(errors='replace')[-2000:]}\n"
        return text + f"--- caller stderr ---\n{caller.stderr.decode(errors='replace')[-3000:]}"

    async def test_host_cut_off_leaves_within_session_timeout(self) -> None:
        server = self.start_zookeeper()
        await wait_for(lambda: deferToThread(server.serving), timeout=30, what="ZooKeeper")
        url = f"zk://{server.address}/skynet"
        a, b = self.network.addresses["a"], self.network.addresses["b"]
        self.start_service("a", url)
        self.start_service("b", url)

        caller = Caller()
        argv = [sys.executable, "-m", "tests.netns_caller", "--registry", url,
                "--service", "TestService", "--rate", str(RATE), "--wait-instances", "2"]  # fmt: skip
        command = self.network.command("c", argv)
        reactor.spawnProcess(caller, command[0], command, env=child_env(), path=str(ROOT))
        self.addCleanup(caller.stop)
        try:
            await wait_for(
                lambda: caller.find(lambda e: e["event"] == "started") or caller.ended.called,
                timeout=40,
                what="the caller in namespace C knowing both instances",
            )
        except AssertionError:
            self.fail(self.logs(caller))
        self.assertFalse(caller.ended.called, self.logs(caller))
        self.assertEqual(
            caller.find(lambda e: e["event"] == "hosts" and len(e["hosts"]) == 2)["hosts"],
            sorted([a, b]),
        )
        await sleep(2.0)

        cut = time.monotonic()
        self.network.cut("b")
        try:
            left = await wait_for(
                lambda: caller.find(
                    lambda e: e["event"] == "hosts" and e["t"] > cut and b not in e["hosts"]
                ),  # fmt: skip
                timeout=30,
                what="B leaving the client's rotation",
            )
        except AssertionError:
            self.fail(self.logs(caller))
        removal = left["t"] - cut
        self.assertEqual(left["hosts"], [a])
        await sleep(1.0)
        caller.transport.closeStdin()
        await caller.ended
        done = caller.find(lambda e: e["event"] == "done")
        self.assertIsNotNone(done, self.logs(caller))
        figure(
            f"network namespaces: B's link cut -> B gone from the client in namespace C after "
            f"{removal:.2f}s (session timeout {DEFAULT_SESSION_TIMEOUT:g}s); {describe(done)};"
            f" latencies {done['latencies']}"
        )
        self.assertEqual(done["failures"], [], self.logs(caller))
        self.assertEqual(done["ok"], done["issued"])
        self.assertGreaterEqual(done["offered_per_second"], 200)
        # The documented bound: session timeout + 1 s.
        self.assertLessEqual(removal, DEFAULT_SESSION_TIMEOUT + 1.0)


# -- the command line and URLs (no ZooKeeper needed)


class SessionTimeoutOptionTests(TestCase):
    """
    C{--zk-session-timeout} and C{registry_from_url(zk_session_timeout=)}.
    """

    def test_registry_from_url_passes_it_to_zookeeper(self) -> None:
        registry = registry_from_url("zk://127.0.0.1:1/x", zk_session_timeout=2.5)
        assert isinstance(registry, ZooKeeperRegistry)
        self.assertEqual(registry.session_timeout, 2.5)
        # The option wins over the URL's; without either, 4 s.
        registry = registry_from_url("zk://127.0.0.1:1/x?session_timeout=7", zk_session_timeout=3)
        self.assertEqual(registry.session_timeout, 3.0)  # type: ignore[attr-defined]
        registry = registry_from_url("zk://127.0.0.1:1/x?session_timeout=7")
        self.assertEqual(registry.session_timeout, 7.0)  # type: ignore[attr-defined]
        registry = registry_from_url("zk://127.0.0.1:1/x")
        self.assertEqual(registry.session_timeout, DEFAULT_SESSION_TIMEOUT)  # type: ignore[attr-defined]

    def test_other_registries_ignore_it(self) -> None:
        self.assertIsInstance(registry_from_url("memory://t", zk_session_timeout=2), MemoryRegistry)
        root = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, root, True)
        self.assertIsInstance(
            registry_from_url(f"file://{root}", zk_session_timeout=2), FileRegistry
        )
        with self.assertRaises(RegistryError):
            registry_from_url("zk://127.0.0.1:1/x", zk_session_timeout=-1)

    def test_environment_names_zookeeper(self) -> None:
        self.patch(os, "environ", {**os.environ, "SKYNET_REGISTRY": "zk://127.0.0.1:1/env"})
        registry = registry_from_url(None, zk_session_timeout=2)
        assert isinstance(registry, ZooKeeperRegistry)
        self.assertEqual((registry.chroot, registry.session_timeout), ("/env", 2.0))

    def test_service_options(self) -> None:
        from skynet.service_tap import Options

        def parse(*args: str) -> Options:
            options = Options()
            options.parseOptions(["--service", TEST_SERVICE, *args])
            return options

        options = parse("--registry", "zk://127.0.0.1:1/x", "--zk-session-timeout", "2.5")
        self.assertEqual(options.registry.session_timeout, 2.5)
        options = parse("--registry", "zk://127.0.0.1:1/x?session_timeout=6")
        self.assertEqual(options.registry.session_timeout, 6.0)
        options = parse("--registry", "memory://opts", "--zk-session-timeout", "2")
        self.assertIsInstance(options.registry, MemoryRegistry)

    def test_bad_values_are_usage_errors(self) -> None:
        for value in ("soon", "0", "-1", "nan", "inf"):
            with self.subTest(value=value):
                result = subprocess.run(
                    [twistd(), "-n", "--pidfile=", "skynet-service", "--service", TEST_SERVICE,
                     "--registry", "zk://127.0.0.1:1/x", "--zk-session-timeout", value],
                    cwd=ROOT, capture_output=True, text=True, timeout=60,
                )  # fmt: skip
                output = result.stdout + result.stderr
                self.assertNotEqual(result.returncode, 0)
                self.assertIn("--zk-session-timeout", output)
                self.assertNotIn("Traceback", output)
