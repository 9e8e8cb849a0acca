"""
skynet.tls on real certificates, without sockets: the CA and its files,
credentials, revocation lists, the listening policy, the refusal log, and
mutual-TLS handshakes between a L{ServerTLS} and clients with good, foreign,
expired, revoked and no certificates (over C{iosim}).
"""

from __future__ import annotations

import datetime
import os
import stat
import tempfile

from cryptography import x509
from twisted.internet.endpoints import TCP4ServerEndpoint, UNIXServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage
from twisted.test.iosim import FakeTransport, connect
from twisted.trial.unittest import SynchronousTestCase

from skynet import tls


def _mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


class Cluster:
    """
    A cluster CA in a temp dir, and helpers to issue from it.
    """

    def __init__(self, hosts: tuple[str, ...] = ()) -> None:
        self.root = tempfile.mkdtemp(prefix="skynet-tls-")
        self.ca_dir = os.path.join(self.root, "tls")
        tls.init_cluster(self.ca_dir, hosts)

    def issue(self, name: str, **kwargs) -> tls.Credentials:
        out = os.path.join(self.root, name)
        tls.issue(self.ca_dir, name, out, **kwargs)
        return tls.load_credentials(out)

    @property
    def host(self) -> tls.Credentials:
        return tls.load_credentials(self.ca_dir)

    @property
    def operator(self) -> tls.Credentials:
        return tls.load_credentials(os.path.join(self.ca_dir, "operator"))


class CredentialFilesTests(SynchronousTestCase):
    def test_init_modes_and_contents(self) -> None:
        """
        C{init_cluster} makes the CA, this host's and the operator's
        credentials: directories 0700, private keys 0600; the host's
        certificate names loopback and the extra addresses, and both are
        signed by the CA.
        """
        cluster = Cluster(hosts=("10.9.8.7",))
        for directory in (cluster.ca_dir, os.path.join(cluster.ca_dir, "operator")):
            self.assertEqual(_mode(directory), 0o700)
            self.assertEqual(_mode(os.path.join(directory, "key.pem")), 0o600)
        self.assertEqual(_mode(os.path.join(cluster.ca_dir, "ca-key.pem")), 0o600)
        host = x509.load_pem_x509_certificate(cluster.host.cert)
        san = host.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        addresses = {str(a) for a in san.get_values_for_type(x509.IPAddress)}
        self.assertTrue({"127.0.0.1", "10.9.8.7"} <= addresses, addresses)
        ca = x509.load_pem_x509_certificate(cluster.host.ca)
        host.verify_directly_issued_by(ca)
        self.assertEqual(cluster.operator.name, "operator")

    def test_init_twice_refused(self) -> None:
        """
        A second C{init} in the same directory refuses rather than replace
        the CA (which would orphan every certificate issued).
        """
        cluster = Cluster()
        with self.assertRaises(tls.TLSError) as e:
            tls.init_cluster(cluster.ca_dir)
        self.assertIn("has a cluster CA already", str(e.exception))

    def test_key_readable_by_others_refused(self) -> None:
        """
        Credentials whose key others can read are refused with a message
        saying how to fix it.
        """
        cluster = Cluster()
        creds = cluster.issue("web")
        os.chmod(os.path.join(creds.directory, "key.pem"), 0o644)
        with self.assertRaises(tls.TLSError) as e:
            tls.load_credentials(creds.directory)
        self.assertIn("chmod 600", str(e.exception))

    def test_missing_credentials(self) -> None:
        with self.assertRaises(tls.TLSError) as e:
            tls.load_credentials(tempfile.mkdtemp())
        self.assertIn("no credentials", str(e.exception))

    def test_certificate_of_another_ca_refused(self) -> None:
        """
        A directory whose certificate is not signed by its C{ca.pem} is
        refused at load.
        """
        a, b = Cluster(), Cluster()
        creds = a.issue("x")
        with open(os.path.join(creds.directory, "ca.pem"), "wb") as f:
            f.write(b.host.ca)
        with self.assertRaises(tls.TLSError):
            tls.load_credentials(creds.directory)

    def test_resolve_directory(self) -> None:
        home = tempfile.mkdtemp()
        env = {"SKYNET_HOME": home}
        self.assertIsNone(tls.resolve_directory(None, env))
        tls.init_cluster(os.path.join(home, "tls"))
        self.assertEqual(tls.resolve_directory(None, env), os.path.join(home, "tls"))
        self.assertEqual(tls.resolve_directory(None, {**env, "SKYNET_TLS": "/x"}), "/x")
        self.assertEqual(tls.resolve_directory("/y", env), "/y")

    def test_cli(self) -> None:
        """
        C{sky tls init / issue / list / revoke} as an operator types them.
        """
        root = tempfile.mkdtemp()
        lines: list[str] = []
        ca = os.path.join(root, "tls")
        self.assertEqual(tls.main(["init", "--dir", ca], out=lines.append), 0)
        out = os.path.join(root, "dash")
        self.assertEqual(tls.main(["issue", "dashboard", "--ca", ca, "--days", "30",
                                   "--out", out], out=lines.append), 0)  # fmt: skip
        cert = x509.load_pem_x509_certificate(tls.load_credentials(out).cert)
        days = (cert.not_valid_after_utc - cert.not_valid_before_utc).days
        self.assertEqual(days, 30)
        lines.clear()
        self.assertEqual(tls.main(["list", "--ca", ca], out=lines.append), 0)
        self.assertEqual([line.split("\t")[0] for line in lines][-1], "dashboard")
        self.assertEqual(tls.main(["revoke", "nobody", "--ca", ca], out=lines.append), 1)


class RevocationTests(SynchronousTestCase):
    def test_revoke_lists_the_serial(self) -> None:
        cluster = Cluster()
        creds = cluster.issue("web")
        serial = x509.load_pem_x509_certificate(creds.cert).serial_number
        serials, pem = tls.revoke(cluster.ca_dir, "web")
        self.assertEqual(serials, [format(serial, "x")])
        revocations = tls.RevocationList(cluster.host.ca)
        self.assertTrue(revocations.load(pem))
        self.assertTrue(revocations.is_revoked(serial))
        with open(os.path.join(cluster.ca_dir, "crl.pem"), "rb") as f:
            self.assertEqual(f.read(), pem)

    def test_foreign_crl_refused(self) -> None:
        """
        A revocation list not signed by the cluster CA (anyone who can
        write the registry could put one there) is ignored, with a warning.
        """
        a, b = Cluster(), Cluster()
        b.issue("x")
        _, pem = tls.revoke(b.ca_dir, "x")
        revocations = tls.RevocationList(a.host.ca)
        with capturedLogs() as events:
            self.assertFalse(revocations.load(pem, "the registry"))
        self.assertEqual(revocations.serials, frozenset())
        self.assertTrue(any("not signed" in e["log_format"] for e in events))
        self.assertFalse(revocations.load(b"garbage"))

    def test_older_crl_ignored(self) -> None:
        cluster = Cluster()
        cluster.issue("x")
        with open(os.path.join(cluster.ca_dir, "crl.pem"), "rb") as f:
            old = f.read()
        _, new = tls.revoke(cluster.ca_dir, "x")
        revocations = tls.RevocationList(cluster.host.ca)
        self.assertTrue(revocations.load(new))
        self.assertFalse(revocations.load(old))
        self.assertEqual(len(revocations.serials), 1)

    def test_watch_reads_the_file_when_it_changes(self) -> None:
        cluster = Cluster()
        creds = cluster.issue("web")
        revocations = tls.RevocationList(cluster.host.ca)
        clock = Clock()
        watch = tls.RevocationWatch(revocations, os.path.join(cluster.ca_dir, "crl.pem"),
                                    reactor=clock, interval=1.0)  # fmt: skip
        watch.startService()
        self.assertEqual(revocations.serials, frozenset())
        tls.revoke(cluster.ca_dir, "web")
        os.utime(os.path.join(cluster.ca_dir, "crl.pem"), (1, 1))  # a different mtime
        clock.advance(1.0)
        serial = x509.load_pem_x509_certificate(creds.cert).serial_number
        self.assertTrue(revocations.is_revoked(serial))
        watch.stopService()
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_watch_takes_the_registry_value(self) -> None:
        """
        With a registry that keeps values, the watch takes the CRL stored
        under C{tls/crl} (the registry calls back with its bytes).
        """
        cluster = Cluster()
        creds = cluster.issue("web")

        class Values:
            def __init__(self) -> None:
                self.callbacks: dict = {}

            def watch_value(self, key, callback):
                self.callbacks[key] = callback

        registry = Values()
        revocations = tls.RevocationList(cluster.host.ca)
        clock = Clock()
        watch = tls.RevocationWatch(revocations, "/nonexistent", registry, clock)
        watch.startService()
        _, pem = tls.revoke(cluster.ca_dir, "web")
        registry.callbacks[tls.CRL_KEY](pem)
        serial = x509.load_pem_x509_certificate(creds.cert).serial_number
        self.assertTrue(revocations.is_revoked(serial))
        watch.stopService()


class ListenPolicyTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()

    def endpoint(self, interface: str):
        return TCP4ServerEndpoint(self.clock, 0, interface=interface)  # type: ignore[arg-type]

    def test_loopback(self) -> None:
        self.assertTrue(tls.is_loopback("127.0.0.1"))
        self.assertTrue(tls.is_loopback("127.0.0.2"))
        self.assertTrue(tls.is_loopback("::1"))
        for host in ("", "0.0.0.0", "10.0.0.1", "::", "example.com"):
            self.assertFalse(tls.is_loopback(host), host)

    def test_loopback_without_credentials_allowed(self) -> None:
        ends = [self.endpoint("127.0.0.1"), UNIXServerEndpoint(self.clock, "/tmp/x")]  # type: ignore[arg-type]
        self.assertFalse(tls.check_listen_policy("daemon", ends, None, False))

    def test_routable_without_credentials_refused(self) -> None:
        """
        Off loopback without credentials: refused in one line that says how
        to make them; C{insecure} allows it (and the caller warns).
        """
        for interface in ("0.0.0.0", "", "10.1.2.3"):
            ends = [self.endpoint("127.0.0.1"), self.endpoint(interface)]
            with self.assertRaises(tls.ListenPolicyError) as e:
                tls.check_listen_policy("daemon", ends, None, False)
            message = str(e.exception)
            self.assertNotIn("\n", message)
            self.assertIn("sky tls init", message)
            self.assertIn("--insecure", message)
            self.assertTrue(tls.check_listen_policy("daemon", ends, None, True))

    def test_routable_with_credentials_allowed(self) -> None:
        creds = Cluster().host
        self.assertFalse(tls.check_listen_policy("d", [self.endpoint("0.0.0.0")], creds, False))

    def test_options(self) -> None:
        """
        C{add_tls_options} gives a tap C{--tls}, C{--insecure} (and for a
        service C{--require-client-cert}); C{tap_tls} loads the directory.
        """

        class Options(usage.Options):
            optParameters = [["other", None, None, ""]]

        tls.add_tls_options(Options, service=True)
        cluster = Cluster()
        options = Options()
        options.parseOptions(["--tls", cluster.ca_dir, "--insecure", "--require-client-cert"])
        self.assertTrue(options["insecure"] and options["require-client-cert"])
        try:
            decided = tls.tap_tls(options, self.clock)
        finally:
            tls.set_client_identity(None)
        self.assertTrue(decided.explicit)
        self.assertEqual(decided.creds, cluster.host)
        bad = Options()
        bad.parseOptions(["--tls", tempfile.mkdtemp()])
        with self.assertRaises(usage.UsageError):
            tls.tap_tls(bad, self.clock)


class RefusalLogTests(SynchronousTestCase):
    def test_rate_limited(self) -> None:
        """
        At most C{burst} warnings per interval; the next one says how many
        were not logged.
        """
        clock = Clock()
        refusals = tls.RefusalLog(clock, burst=3, interval=10.0)
        with capturedLogs() as events:
            for i in range(10):
                refusals.refused(f"10.0.0.{i}:1", "no client certificate")
            clock.advance(10)
            refusals.refused("10.0.0.99:1", "certificate expired")
        warnings = [e for e in events if e.get("peer")]
        self.assertEqual([e["peer"] for e in warnings],
                         ["10.0.0.0:1", "10.0.0.1:1", "10.0.0.2:1", "10.0.0.99:1"])  # fmt: skip
        self.assertEqual(warnings[-1]["suppressed"], 7)
        self.assertEqual(warnings[-1]["reason"], "certificate expired")


class _Echo(Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[union-attr]


class _Caller(Protocol):
    def __init__(self) -> None:
        self.received = b""
        self.lost = False

    def connectionMade(self) -> None:
        self.transport.write(b"Deploy")  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason=None) -> None:
        self.lost = True
        self.reason = reason


class HandshakeTests(SynchronousTestCase):
    """
    A L{ServerTLS} listener and clients, connected in memory.
    """

    def setUp(self) -> None:
        self.cluster = Cluster()
        self.clock = Clock()
        self.server = tls.ServerTLS(self.cluster.host, reactor=self.clock)

    def talk(self, creds: tls.Credentials | None, server: tls.ServerTLS | None = None):
        server = server or self.server
        server_factory = server.wrap_factory(Factory.forProtocol(_Echo))
        caller = _Caller()
        options = tls.client_options(creds, "127.0.0.1", ca=self.cluster.host.ca)
        client_factory = TLSMemoryBIOFactory(options, True, Factory.forProtocol(lambda: caller),
                                             clock=self.clock)  # fmt: skip
        server_proto = server_factory.buildProtocol(None)
        client_proto = client_factory.buildProtocol(None)
        with capturedLogs() as events:
            pump = connect(server_proto, FakeTransport(server_proto, isServer=True),
                           client_proto, FakeTransport(client_proto, isServer=False))  # fmt: skip
            for _ in range(20):
                pump.pump()
                self.clock.advance(0)  # BufferingTLSTransport flushes on the clock
        refusals = [e for e in events if "reason" in e and "peer" in e]
        return caller, refusals

    def test_cluster_certificate_accepted(self) -> None:
        caller, refusals = self.talk(self.cluster.operator)
        self.assertEqual(caller.received, b"Deploy")
        self.assertEqual(refusals, [])

    def test_no_certificate_refused(self) -> None:
        caller, refusals = self.talk(None)
        self.assertEqual(caller.received, b"")
        self.assertEqual([e["reason"] for e in refusals], ["no client certificate"])

    def test_other_ca_refused(self) -> None:
        stranger = Cluster().operator
        caller, refusals = self.talk(stranger)
        self.assertEqual(caller.received, b"")
        self.assertEqual([e["reason"] for e in refusals], ["not signed by the cluster CA"])

    def test_expired_refused(self) -> None:
        long_ago = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=10)
        expired = self.cluster.issue("old", days=1, not_before=long_ago)
        caller, refusals = self.talk(expired)
        self.assertEqual(caller.received, b"")
        self.assertEqual([e["reason"] for e in refusals], ["certificate expired"])

    def test_revoked_refused(self) -> None:
        """
        Revoked after it was accepted: the next handshake is refused.
        """
        creds = self.cluster.issue("laptop")
        self.assertEqual(self.talk(creds)[0].received, b"Deploy")
        _, pem = tls.revoke(self.cluster.ca_dir, "laptop")
        self.assertTrue(self.server.revocations.load(pem))
        caller, refusals = self.talk(creds)
        self.assertEqual(caller.received, b"")
        self.assertEqual([e["reason"] for e in refusals], ["certificate of 'laptop' revoked"])
        # The client is told why (OpenSSL's certificate_revoked alert).
        self.assertIn("revoked", str(caller.reason.value))
        # Others of the cluster still get in.
        self.assertEqual(self.talk(self.cluster.operator)[0].received, b"Deploy")

    def test_optional_client_certificate(self) -> None:
        """
        C{require_client_cert=False} (a service's calls): no certificate is
        fine, a foreign one is still refused.
        """
        server = tls.ServerTLS(self.cluster.host, reactor=self.clock, require_client_cert=False)
        self.assertEqual(self.talk(None, server)[0].received, b"Deploy")
        self.assertEqual(self.talk(Cluster().operator, server)[0].received, b"")

    def test_server_identity_checked(self) -> None:
        """
        The client refuses a server whose certificate does not name the
        address it called (service_identity), even from the cluster CA.
        """
        wrong = self.cluster.issue("elsewhere", hosts=["10.0.0.9"])
        server = tls.ServerTLS(wrong, reactor=self.clock)
        caller, _ = self.talk(self.cluster.operator, server)
        self.assertEqual(caller.received, b"")


class DeployPolicyTests(SynchronousTestCase):
    def test_default_allows_anything(self) -> None:
        policy = tls.DeployPolicy()
        self.assertFalse(policy.restricted)
        policy.check("/bin/sh -c 'anything'")

    def test_classes_only(self) -> None:
        policy = tls.DeployPolicy(classes_only=True)
        policy.check("examples.sleeper:Sleeper")
        with self.assertRaises(ValueError) as e:
            policy.check("/usr/bin/touch /tmp/x")
        self.assertIn("module:Class services only", str(e.exception))

    def test_command_prefixes(self) -> None:
        policy = tls.DeployPolicy(command_prefixes=(("/opt/app/bin/run",), ("nice", "-n", "5")))
        policy.check("examples.sleeper:Sleeper")
        policy.check("/opt/app/bin/run --port 1")
        policy.check("nice -n 5 /usr/bin/work")
        for refused in ("/opt/app/bin/run2", "nice -n 1 x", "sh -c '/opt/app/bin/run'"):
            with self.assertRaises(ValueError):
                policy.check(refused)

    def test_daemon_options_and_guard(self) -> None:
        """
        The daemon tap's options make the policy, and the guard refuses
        before the daemon's own deploy runs.
        """
        from skynet.daemon_tap import Options

        options = Options()
        options["deploy-command-prefix"] = []
        options.opt_deploy_command_prefix("/opt/app/bin/run")  # type: ignore[attr-defined]
        options["deploy-classes-only"] = False
        policy = tls.deploy_policy(options)
        self.assertEqual(policy.command_prefixes, (("/opt/app/bin/run",),))

        with self.assertRaises(ValueError):
            policy.check("/usr/bin/touch /tmp/x")
        policy.check("/opt/app/bin/run")  # allowed: returns
        policy.check("/opt/app/bin/run --flag")
