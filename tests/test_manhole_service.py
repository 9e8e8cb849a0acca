"""
L{skynet.manhole.ManholeService} as an L{IService}: C{startService} returns
L{None}, and C{when_started} is how a caller waits for the listeners.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile

from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.trial.unittest import TestCase

from skynet.manhole import ManholeService
from skynet.registry.memory import MemoryRegistry


class StartTests(TestCase):
    timeout = 60

    def make(self) -> ManholeService:
        home = tempfile.mkdtemp(prefix="skynet-manhole-")
        self.addCleanup(shutil.rmtree, home, True)
        os.chmod(home, 0o700)
        return ManholeService(
            MemoryRegistry(), [TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")],
            os.path.join(home, "authorized_keys"), os.path.join(home, "host_key"),
            reactor=reactor,
        )  # fmt: skip

    async def test_start_returns_none_and_when_started_waits(self) -> None:
        """
        startService returns None as IService says; when_started fires once
        the SSH port listens, and an SSH client then gets its banner.
        """
        service = self.make()
        self.assertIsNone(service.startService())
        self.addCleanup(service.stopService)
        await service.when_started()
        [port] = service.ports
        address = port.getHost()
        with socket.create_connection((address.host, address.port), timeout=10) as s:
            banner = await self._read_banner(s)
        self.assertTrue(banner.startswith(b"SSH-2.0-"), banner)
        # Asked again after the start, it fires at once.
        self.assertIsNone(await service.when_started())

    async def _read_banner(self, s: socket.socket) -> bytes:
        from twisted.internet.threads import deferToThread

        return await deferToThread(s.recv, 64)

    def test_when_started_before_start_fires(self) -> None:
        """Never started: nothing to wait for."""
        fired: list = []
        self.make().when_started().addCallback(fired.append)
        self.assertEqual(fired, [None])
