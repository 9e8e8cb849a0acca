"""
The control plane over mutual TLS, on real processes and real certificates:
a C{twistd -n skynet-daemon --tls DIR} attacked without a certificate, with
one from another CA, an expired and a revoked one (nothing runs); C{sky}
with the cluster's certificate deploying, stopping and restarting; the
refusal to listen off loopback without credentials, and a TLS daemon in a
network namespace served to C{sky} in another.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import uuid as uuidlib
from pathlib import Path
from typing import Any

import attr
import bson
import pytest
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from skynet import tls
from skynet.admin import call_instance
from skynet.client import tcp_connector
from skynet.errors import ConnectionFailed, ServiceError
from skynet.protocol import DEFAULT_MAX_FRAME, encode_header
from skynet.registry import Query, registry_from_url
from skynet.registry.files import FileRegistry
from tests.processes import ROOT, child_env, sleep, terminate, twistd, wait_for

pytestmark = pytest.mark.slow


def sky_command() -> list[str]:
    return [sys.executable, "-m", "skynet.sky"]


def run_sky(home: str, *args: str, prefix: tuple[str, ...] = (), timeout: float = 60.0,
            **env: str) -> subprocess.CompletedProcess:  # fmt: skip
    return subprocess.run([*prefix, *sky_command(), *args], cwd=ROOT,
                          env=child_env(SKYNET_HOME=home, **env), capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)  # fmt: skip


class TLSDaemonTests(TestCase):
    """
    One daemon with C{--tls}, its credentials made by C{sky tls init}.
    """

    timeout = 180

    async def start(self, *extra: str, url: str | None = None, own_dir: bool = False) -> None:
        """
        @param own_dir: the daemon gets credentials of its own (issued from
            the CA), not the CA's directory: it sees no later C{crl.pem}.
        """
        self.root = tempfile.mkdtemp(prefix="skynet-tlsd-")
        self.addCleanup(shutil.rmtree, self.root, True)
        self.tls_dir = os.path.join(self.root, "tls")
        made = run_sky(self.root, "tls", "init")
        self.assertEqual(made.returncode, 0, made.stderr)
        self.url = url or f"file://{self.root}/registry"
        if url is None:
            self.registry = FileRegistry(os.path.join(self.root, "registry"), reactor=reactor)
        else:
            self.registry = registry_from_url(url, reactor=reactor)
        await self.registry.start()
        self.addCleanup(self.registry.stop)
        daemon_dir = self.tls_dir
        if own_dir:
            daemon_dir = os.path.join(self.root, "daemon-tls")
            tls.issue(self.tls_dir, "daemon", daemon_dir, ["127.0.0.1"])
        command = [twistd(), "-n", "--pidfile=", "skynet-daemon", "--registry", self.url,
                   "--listen", "tcp:0:interface=127.0.0.1", "--tls", daemon_dir,
                   "--log-dir", os.path.join(self.root, "logs"), "--stats-interval", "0.5",
                   "--stop-grace", "5", "--kill-time", "2", *extra]  # fmt: skip
        self.log_path = os.path.join(self.root, "daemon.log")
        log = open(self.log_path, "ab")
        self.addCleanup(log.close)
        self.popen = subprocess.Popen(command, cwd=ROOT, env=child_env(SKYNET_HOME=self.root),
                                      stdin=subprocess.DEVNULL, stdout=log,
                                      stderr=subprocess.STDOUT)  # fmt: skip
        self.addCleanup(terminate, self.popen, 30)
        self.addCleanup(tls.set_client_identity, None)

        async def up() -> Any:
            found = await self.registry.query(Query(service="SkynetDaemon", registered=True))
            return [i for i in found if i.pid == self.popen.pid]

        [self.daemon] = await wait_for(up, timeout=30, what="the TLS daemon registered")

    def logs(self) -> str:
        return Path(self.log_path).read_text(errors="replace")[-5000:]

    async def wait_log(self, text: str) -> None:
        try:
            await wait_for(lambda: text in self.logs(), timeout=10, what=text)
        except AssertionError as e:
            raise AssertionError(f"{e}; the daemon's log:\n{self.logs()}") from None

    def marker(self) -> str:
        return os.path.join(self.root, f"pwned-{uuidlib.uuid4().hex}")

    def deploy_touch(self, instance: Any, marker: str, connector: Any = None) -> Deferred:
        """
        What an attacker sends: C{Deploy} of a command that leaves a file.
        """
        params = {"service": "/usr/bin/touch", "args": [marker]}
        return call_instance(reactor, instance, "Deploy", params, 5.0, connector)

    async def assert_refused(self, creds: tls.Credentials | None, reason: str) -> None:
        tls.set_client_identity(creds)
        marker = self.marker()
        with self.assertRaises(ConnectionFailed):
            await self.deploy_touch(self.daemon, marker)
        await sleep(1.0)
        self.assertFalse(os.path.exists(marker))
        await self.wait_log(reason)

    async def test_strangers_refused_operator_served(self) -> None:
        """
        The daemon advertises TLS; a plain skynet client (raw TCP, as Go
        Skynet speaks), Python's ssl without a certificate, and our client
        with a certificate of another CA or an expired one all get no
        answer, the command does not run, and each refusal is logged.
        """
        await self.start()
        self.assertTrue(self.daemon.extra.get("TLS"))
        self.assertTrue(self.daemon.extra.get("AdminTLS"))

        # Raw TCP, the way any Go Skynet client would call.
        plain = attr.evolve(self.daemon, extra={})
        marker = self.marker()
        with self.assertRaises(ConnectionFailed):
            await self.deploy_touch(plain, marker, tcp_connector(reactor, 5.0, DEFAULT_MAX_FRAME))
        await self.wait_log("closed before the TLS handshake")

        # Raw bytes on the socket (a Deploy request, as BSON-RPC frames).
        def raw() -> bytes:
            with socket.create_connection((self.daemon.host, self.daemon.port), 5) as s:
                s.settimeout(5)
                s.sendall(encode_header("SkynetDaemon.Deploy", 1) + bson.encode(
                    {"service": "/usr/bin/touch", "args": [marker]}))  # fmt: skip
                try:
                    return s.recv(100)
                except OSError:
                    return b""

        self.assertEqual(await deferToThread(raw), b"")
        await self.wait_log("not TLS")
        self.assertFalse(os.path.exists(marker))

        # Python's ssl module, trusting the CA but with no client certificate.
        def stranger() -> str:
            context = ssl.create_default_context(cafile=os.path.join(self.tls_dir, "ca.pem"))
            with socket.create_connection((self.daemon.host, self.daemon.port), 5) as raw:
                try:
                    with context.wrap_socket(raw, server_hostname=self.daemon.host) as s:
                        s.settimeout(5)
                        s.sendall(b"\x05\x00\x00\x00\x00")
                        return repr(s.recv(100))
                except ssl.SSLError as e:
                    return f"refused: {e}"

        answer = await deferToThread(stranger)
        self.assertTrue(answer.startswith("refused") or answer == "b''", answer)
        await self.wait_log("no client certificate")

        other = tempfile.mkdtemp(prefix="skynet-otherca-")
        self.addCleanup(shutil.rmtree, other, True)
        tls.init_cluster(other)
        # The attacker trusts our CA (its certificate is no secret) and
        # presents a certificate of its own CA.
        foreign = tls.load_credentials(os.path.join(other, "operator"))
        with open(os.path.join(self.tls_dir, "ca.pem"), "rb") as f:
            foreign = attr.evolve(foreign, ca=f.read())
        await self.assert_refused(foreign, "not signed by the cluster CA")

        long_ago = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=30)
        expired = os.path.join(self.root, "expired")
        tls.issue(self.tls_dir, "expired", expired, days=1, not_before=long_ago)
        await self.assert_refused(tls.load_credentials(expired), "certificate expired")

        # The operator's certificate: served.
        tls.set_client_identity(tls.load_credentials(os.path.join(self.tls_dir, "operator")))
        listing = await call_instance(reactor, self.daemon, "ListSubServices", {}, 10.0)
        self.assertEqual(listing["services"], {})

    async def test_revoked_refused(self, url: str | None = None) -> None:
        """
        A certificate that worked stops working once C{sky tls revoke}
        publishes the revocation list in the registry.
        """
        await self.start(url=url, own_dir=True)
        laptop = os.path.join(self.root, "laptop")
        issued = run_sky(self.root, "tls", "issue", "laptop", "--out", laptop)
        self.assertEqual(issued.returncode, 0, issued.stderr)
        tls.set_client_identity(tls.load_credentials(laptop))
        await call_instance(reactor, self.daemon, "ListSubServices", {}, 10.0)
        # Keep the daemon from seeing crl.pem: only the registry can tell it.
        revoked = run_sky(self.root, "tls", "revoke", "laptop", "--registry", self.url)
        self.assertEqual(revoked.returncode, 0, revoked.stderr)
        self.assertIn("stored in the registry", revoked.stdout)
        self.assertIsNotNone(await self.registry.get_value(tls.CRL_KEY))

        async def refused() -> bool:
            try:
                await call_instance(reactor, self.daemon, "ListSubServices", {}, 5.0)
            except ConnectionFailed:
                return True
            return False

        await wait_for(refused, timeout=20, interval=0.5, what="the revoked cert refused")
        await self.assert_refused(tls.load_credentials(laptop), "certificate of 'laptop' revoked")

    async def test_revoked_refused_zookeeper(self) -> None:
        """
        The same with a real ZooKeeper server as the registry.
        """
        from tests.zkserver import ZooKeeperCluster

        zookeeper = ZooKeeperCluster(1).start()
        self.addCleanup(zookeeper.close)
        await self.test_revoked_refused(url=zookeeper.url("/skynet-tls"))

    async def test_deploy_classes_only(self) -> None:
        """
        C{--deploy-classes-only}: the operator's certificate is not enough
        to run a command line; a C{module:Class} deploys.
        """
        await self.start("--deploy-classes-only")
        tls.set_client_identity(tls.load_credentials(os.path.join(self.tls_dir, "operator")))
        marker = self.marker()
        with self.assertRaises(ServiceError) as e:
            await self.deploy_touch(self.daemon, marker)
        self.assertIn("module:Class services only", str(e.exception))
        result = await call_instance(reactor, self.daemon, "Deploy",
                                     {"service": "examples.sleeper:Sleeper"}, 10.0)  # fmt: skip
        self.assertIn("uuid", result)
        await sleep(1.0)
        self.assertFalse(os.path.exists(marker))

    async def test_sky_deploys_stops_restarts(self) -> None:
        """
        C{sky}, with the operator's credentials of C{$SKYNET_HOME/tls},
        deploys a service, restarts and stops it through the TLS daemon
        (which reaches its child's TLS admin endpoint).
        """
        await self.start()

        def sky(*args: str) -> subprocess.CompletedProcess:
            result = run_sky(self.root, "--registry", self.url, *args)
            self.assertEqual(result.returncode, 0,
                             f"sky {args}: {result.stdout} {result.stderr}\n{self.logs()}")  # fmt: skip
            return result

        await deferToThread(sky, "deploy", "examples.sleeper:Sleeper")

        async def sleeper() -> Any:
            return await self.registry.query(Query(service="Sleeper", registered=True))

        [first] = await wait_for(sleeper, timeout=30, what="Sleeper registered")
        self.assertTrue(first.extra.get("AdminTLS"))
        await deferToThread(sky, "--service", "Sleeper", "--yes", "restart")

        async def restarted() -> Any:
            found = await sleeper()
            return found if found and found[0].pid != first.pid else None

        [second] = await wait_for(restarted, timeout=30, what="Sleeper restarted")
        # Politely: the daemon reached the child's TLS admin endpoint.
        await self.wait_log("Sleeper asked to stop")
        self.assertEqual(second.uuid, first.uuid)
        await deferToThread(sky, "--service", "Sleeper", "--yes", "stop")
        await wait_for(lambda: self.registry.query(Query(service="Sleeper")).addCallback(
            lambda found: not found), timeout=30, what="Sleeper stopped")  # fmt: skip


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


class NamespaceTests(TestCase):
    """
    Two network namespaces joined by a veth pair, each a "host" with a
    routable address; the registry is a file registry both can read.
    """

    timeout = 180

    def setUp(self) -> None:
        from tests.netns import namespaces_unavailable

        reason = namespaces_unavailable()
        if reason is not None:
            raise SkipTest(reason)
        tag = uuidlib.uuid4().hex[:6]
        self.ns = [f"sktls-a-{tag}", f"sktls-b-{tag}"]
        self.addresses = ["10.231.7.1", "10.231.7.2"]
        for ns in self.ns:
            _ip("netns", "add", ns)
            self.addCleanup(_ip, "netns", "delete", ns, check=False)
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", self.ns[0], "link", "add", "eth0", "type", "veth", "peer", "name", "eth0",
            "netns", self.ns[1])  # fmt: skip
        for ns, address in zip(self.ns, self.addresses, strict=True):
            _ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
        self.root = tempfile.mkdtemp(prefix="skynet-tlsns-")
        self.addCleanup(shutil.rmtree, self.root, True)
        self.url = f"file://{self.root}/registry"

    def daemon_command(self, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns[0], twistd(), "-n", "--pidfile=",
                "skynet-daemon", "--registry", self.url,
                "--listen", f"tcp:0:interface={self.addresses[0]}",
                "--log-dir", os.path.join(self.root, "logs"), "--stats-interval", "0.5",
                *args]  # fmt: skip

    def test_refuses_without_credentials(self) -> None:
        """
        Without credentials, a daemon on a routable address does not start:
        one line on stderr says how to make them.
        """
        result = subprocess.run(self.daemon_command(), cwd=ROOT, capture_output=True, text=True,
                                env=child_env(SKYNET_HOME=self.root), timeout=60)  # fmt: skip
        self.assertNotEqual(result.returncode, 0)
        lines = result.stderr.strip().splitlines()
        self.assertEqual(len(lines), 1, result.stderr)
        self.assertIn("without TLS", lines[0])
        self.assertIn("sky tls init", lines[0])
        self.assertIn(self.addresses[0], lines[0])

    async def test_insecure_warns(self) -> None:
        """
        C{--insecure} lets it start there, plain, with a warning in its log.
        """
        log_path = os.path.join(self.root, "insecure.log")
        with open(log_path, "ab") as log:
            popen = subprocess.Popen(self.daemon_command("--insecure"), cwd=ROOT, stdout=log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=child_env(SKYNET_HOME=self.root))  # fmt: skip
        self.addCleanup(terminate, popen, 30)
        registry = FileRegistry(os.path.join(self.root, "registry"), reactor=reactor)
        await registry.start()
        self.addCleanup(registry.stop)
        [daemon] = await wait_for(
            lambda: registry.query(Query(service="SkynetDaemon", registered=True)),
            timeout=30, what="the insecure daemon registered",
        )  # fmt: skip
        self.assertEqual(daemon.host, self.addresses[0])
        self.assertNotIn("TLS", daemon.extra)
        text = Path(log_path).read_text(errors="replace")
        self.assertIn("INSECURE: skynet-daemon control endpoints reachable off loopback", text)

    async def test_serves_sky_from_another_namespace(self) -> None:
        """
        With credentials (the host's certificate naming its routable
        address), the daemon serves C{sky} in the other namespace: deploy,
        then the instances listed; a plain client from there is refused.
        """
        made = run_sky(self.root, "tls", "init", "--host", self.addresses[0])
        self.assertEqual(made.returncode, 0, made.stderr)
        log_path = os.path.join(self.root, "daemon.log")
        with open(log_path, "ab") as log:
            popen = subprocess.Popen(self.daemon_command(), cwd=ROOT, stdout=log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=child_env(SKYNET_HOME=self.root))  # fmt: skip
        self.addCleanup(terminate, popen, 30)
        registry = FileRegistry(os.path.join(self.root, "registry"), reactor=reactor)
        await registry.start()
        self.addCleanup(registry.stop)

        async def up() -> Any:
            return await registry.query(Query(service="SkynetDaemon", registered=True))

        await wait_for(up, timeout=30, what="the namespaced daemon registered")
        prefix = ("ip", "netns", "exec", self.ns[1])

        def sky(*args: str) -> subprocess.CompletedProcess:
            return run_sky(self.root, "--registry", self.url, *args, prefix=prefix)

        deployed = await deferToThread(sky, "deploy", "examples.sleeper:Sleeper")
        logs = Path(log_path).read_text(errors="replace")[-4000:]
        self.assertEqual(deployed.returncode, 0, f"{deployed.stderr}\n{logs}")
        await wait_for(lambda: registry.query(Query(service="Sleeper", registered=True)),
                       timeout=30, what="Sleeper deployed from the other namespace")  # fmt: skip
        listed = await deferToThread(sky, "--json", "instances")
        self.assertEqual(listed.returncode, 0, listed.stderr)
        where = {i["name"]: i["host"] for i in json.loads(listed.stdout)}
        self.assertEqual(where["SkynetDaemon"], self.addresses[0])
        self.assertIn("Sleeper", where)

        # Without credentials, from the other namespace: refused.
        bare = tempfile.mkdtemp(prefix="skynet-bare-")
        self.addCleanup(shutil.rmtree, bare, True)
        stranger = await deferToThread(
            lambda: run_sky(
                bare,
                "--registry",
                self.url,
                "--timeout",
                "5",
                "deploy",
                "examples.sleeper:Sleeper",
                prefix=prefix,
            )  # fmt: skip
        )
        self.assertNotEqual(stranger.returncode, 0)
        self.assertIn("credentials", stranger.stderr)
        self.assertEqual(
            len(await registry.query(Query(service="Sleeper"))), 1, "a second Sleeper ran"
        )
