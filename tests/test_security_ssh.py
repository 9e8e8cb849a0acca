"""
The SSH shell's hardening: an C{authorized_keys} file (or its directory)
writable by others is refused, as OpenSSH's StrictModes does; a connection
that does not authenticate in time is closed.  On the real server
(L{ManholeService} on a loopback port) with the OpenSSH client.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time

import pytest
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.threads import deferToThread
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase, TestCase

from skynet.manhole import AuthorizedKeysFile, ManholeService, ensure_client_key, unsafe_permissions
from skynet.registry.memory import MemoryRegistry


class StrictModesTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.home = tempfile.mkdtemp(prefix="skynet-strict-")
        self.addCleanup(shutil.rmtree, self.home, True)
        os.chmod(self.home, 0o700)
        self.key = ensure_client_key(os.path.join(self.home, "ssh"), os.path.join(self.home, "x"))

    def test_safe(self) -> None:
        self.assertIsNone(unsafe_permissions(self.key.authorized_keys))
        self.assertEqual(len(AuthorizedKeysFile(self.key.authorized_keys).getAuthorizedKeys(b"a")),
                         1)  # fmt: skip

    def test_file_writable_by_others(self) -> None:
        os.chmod(self.key.authorized_keys, 0o666)
        reason = unsafe_permissions(self.key.authorized_keys)
        self.assertIn("writable by others (mode 666)", reason or "")
        with capturedLogs() as events:
            found = AuthorizedKeysFile(self.key.authorized_keys).getAuthorizedKeys(b"admin")
        self.assertEqual(list(found), [])
        [event] = [e for e in events if "reason" in e]
        self.assertEqual(event["log_level"].name, "error")
        self.assertEqual(event["path"], self.key.authorized_keys)

    def test_directory_writable_by_others(self) -> None:
        directory = os.path.dirname(self.key.authorized_keys)
        os.chmod(directory, 0o777)
        self.assertIn(directory, unsafe_permissions(self.key.authorized_keys) or "")
        self.assertEqual(list(AuthorizedKeysFile(self.key.authorized_keys).getAuthorizedKeys(b"a")),
                         [])  # fmt: skip


@pytest.mark.slow
class RealServerTests(TestCase):
    timeout = 60

    async def start(self) -> None:
        if shutil.which("ssh") is None:
            self.fail("the OpenSSH client is missing: apt-get install openssh-client")
        self.home = tempfile.mkdtemp(prefix="skynet-sshsec-")
        self.addCleanup(shutil.rmtree, self.home, True)
        os.chmod(self.home, 0o700)
        ssh_dir = os.path.join(self.home, "ssh")
        self.key = ensure_client_key(ssh_dir, os.path.join(self.home, "nokeys"))
        registry = MemoryRegistry()
        await registry.start()
        self.service = ManholeService(
            registry, [TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")],
            self.key.authorized_keys, os.path.join(ssh_dir, "host_key"), reactor=reactor,
        )  # fmt: skip
        self.assertIsNone(self.service.startService())
        await self.service.when_started()
        self.addCleanup(self.service.stopService)
        self.port = self.service.ports[0].getHost().port

    def ssh(self, *prefix: str, command: tuple[str, ...] = ("-N",)) -> subprocess.CompletedProcess:
        return subprocess.run([
            *prefix, "ssh", "-v", "-p", str(self.port), "-i", str(self.key.identity),
            "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=no",
            "-o", f"UserKnownHostsFile={self.home}/known_hosts",
            "admin@127.0.0.1", *command,
        ], capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)  # fmt: skip

    async def test_world_writable_keys_refused(self) -> None:
        await self.start()
        logged_in = await deferToThread(self.ssh, "timeout", "2")
        self.assertIn("Authenticated to", logged_in.stderr)
        os.chmod(self.key.authorized_keys, 0o666)
        with capturedLogs() as events:
            refused = await deferToThread(self.ssh, "timeout", "20")
        self.assertNotIn("Authenticated to", refused.stderr)
        self.assertIn("Permission denied", refused.stderr)
        self.assertTrue(any("writable by others" in str(e.get("reason")) for e in events))

    async def test_login_timeout(self) -> None:
        """
        A connection that sends nothing after the banner is closed once the
        login timeout passes; one that authenticated is not.
        """
        await self.start()
        assert self.service.factory is not None
        self.service.factory.login_timeout = 1.0

        def silent() -> tuple[bytes, float]:
            with socket.create_connection(("127.0.0.1", self.port), 10) as s:
                s.settimeout(20)
                banner = s.recv(256)
                started = time.monotonic()
                try:
                    while s.recv(4096):
                        pass
                except ConnectionResetError:
                    pass  # aborted: closed all the same
                return banner, time.monotonic() - started

        with capturedLogs() as events:
            banner, _ = await deferToThread(silent)
        self.assertTrue(banner.startswith(b"SSH-2.0"), banner)
        self.assertTrue(any("did not authenticate" in e.get("log_format", "") for e in events))
        self.assertEqual(self.service.factory.connections, [])
        # Authenticated (ssh -N: no command) within the timeout: it stays
        # connected past it, until `timeout` ends the client (status 124).
        with capturedLogs() as events:
            stayed = await deferToThread(self.ssh, "timeout", "4")
        self.assertIn("Authenticated to", stayed.stderr)
        self.assertEqual(stayed.returncode, 124, stayed.stderr)
        self.assertFalse(any("did not authenticate" in e.get("log_format", "") for e in events))
