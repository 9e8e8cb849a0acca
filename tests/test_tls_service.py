"""
Service calls over TLS: a real C{twistd -n skynet-service --tls DIR}
advertises C{"TLS": true} in its registry entry (the Go-shaped fields as
they were), the skynet client calls it over TLS checking its identity, a
plain client gets nothing; C{--require-client-cert} decides whether a
caller without a certificate may call.  And the benchmark runs.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import tempfile

import attr
import pytest
from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from skynet import tls
from skynet.admin import call_instance
from skynet.client import Client, tcp_connector
from skynet.errors import ConnectionFailed
from skynet.protocol import DEFAULT_MAX_FRAME
from skynet.registry import Query
from skynet.registry.files import FileRegistry
from tests.processes import ServiceProcess, wait_for

pytestmark = pytest.mark.slow


class TLSServiceTests(TestCase):
    timeout = 120

    async def start(self, *args: str, hosts: list[str] | None = None) -> None:
        self.root = tempfile.mkdtemp(prefix="skynet-tlss-")
        self.addCleanup(shutil.rmtree, self.root, True)
        self.tls_dir = os.path.join(self.root, "tls")
        tls.init_cluster(self.tls_dir)
        self.addCleanup(tls.set_client_identity, None)
        server_dir = self.tls_dir
        if hosts is not None:
            server_dir = os.path.join(self.root, "server")
            tls.issue(self.tls_dir, "server", server_dir, hosts)
        url = f"file://{self.root}/registry"
        self.process = ServiceProcess("examples.testservice:TestService", url, "--tls",
                                      server_dir, *args, log_dir=self.root,
                                      env={"SKYNET_HOME": self.root}).start()  # fmt: skip
        self.addCleanup(self.process.stop)
        self.registry = FileRegistry(os.path.join(self.root, "registry"), reactor=reactor)
        await self.registry.start()
        self.addCleanup(self.registry.stop)
        [self.instance] = await wait_for(
            lambda: self.registry.query(Query(service="TestService", registered=True)),
            timeout=30, what="TestService registered",
        )  # fmt: skip

    async def test_called_over_tls(self) -> None:
        await self.start()
        self.assertEqual(self.instance.extra.get("TLS"), True)
        # The Go-shaped part of the entry is as before: one extra key beside it.
        doc = self.instance.to_go()
        self.assertEqual(set(doc), {"Config", "Registered", "PID", "Extra"})
        address = doc["Config"]["ServiceAddr"]
        self.assertEqual((address["IPAddress"], address["Port"]), ("127.0.0.1", self.instance.port))
        self.assertEqual(doc["Extra"], {"TLS": True, "AdminTLS": True})
        json.dumps(doc)
        tls.set_client_identity(tls.load_credentials(os.path.join(self.tls_dir, "operator")))
        client = Client(registry=self.registry, reactor=reactor)
        self.addCleanup(client.stop)
        result = await client.service("TestService").call("Upcase", {"data": "secret"})
        self.assertEqual(result, {"data": "SECRET"})
        # A plain client (as Go Skynet's) gets no handshake.
        plain = attr.evolve(self.instance, extra={})
        with self.assertRaises(ConnectionFailed):
            await call_instance(reactor, plain, "Upcase", {"data": "x"}, 3.0,
                                tcp_connector(reactor, 3.0, DEFAULT_MAX_FRAME))  # fmt: skip

    async def test_identity_checked(self) -> None:
        """
        The client checks that the server's certificate names the address
        it calls: a service whose certificate (from the cluster CA) names
        another address is not called.
        """
        await self.start(hosts=["10.0.0.9"])
        tls.set_client_identity(tls.load_credentials(os.path.join(self.tls_dir, "operator")))
        with self.assertRaises(ConnectionFailed):
            await call_instance(reactor, self.instance, "Upcase", {"data": "x"}, 3.0)

    def _python_ssl(self) -> str:
        context = ssl.create_default_context(cafile=os.path.join(self.tls_dir, "ca.pem"))
        with socket.create_connection((self.instance.host, self.instance.port), 5) as raw:
            try:
                with context.wrap_socket(raw, server_hostname=self.instance.host) as s:
                    s.settimeout(5)
                    return "answered" if s.recv(4) else "closed"
            except (ssl.SSLError, OSError) as e:
                return f"refused: {e}"

    async def test_client_certificate_optional_by_default(self) -> None:
        """
        Without C{--require-client-cert}, a TLS caller with only the CA is
        served (the service sends its skynet handshake).
        """
        await self.start()
        self.assertEqual(await deferToThread(self._python_ssl), "answered")

    async def test_require_client_cert(self) -> None:
        await self.start("--require-client-cert")
        self.assertTrue((await deferToThread(self._python_ssl)).startswith("refused"))


class BenchmarkTests(TestCase):
    timeout = 120

    async def test_benchmark_runs(self) -> None:
        from benchmarks import tls as bench

        args = bench.parse(["--seconds", "0.2", "--connections", "5"])
        self.addCleanup(tls.set_client_identity, None)
        results = await bench.run(reactor, args)
        text = bench.report(results, args)
        for label in ("plain", "tls"):
            self.assertGreater(results[label]["sequential"]["calls/s"], 0)
            self.assertGreater(results[label]["concurrent"]["calls/s"], 0)
            self.assertGreater(results[label]["setup"]["mean ms"], 0)
        self.assertIn("tls / plain", text)
