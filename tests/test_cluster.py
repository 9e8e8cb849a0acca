"""
Integration tests on real processes: C{twistd -n skynet-service} instances
on the embedded registry, called through discovery while they die,
unregister and get fed garbage.
"""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import struct
import subprocess
import tempfile
import time

import bson
from bson.int64 import Int64
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from skynet.client import Client
from skynet.registry import Query
from skynet.registry.files import FileRegistry
from tests.processes import ROOT, ServiceProcess, fibonacci_load, sleep, twistd, wait_for


def admin_call(address, servicemethod: str, params: dict) -> dict:
    """
    One raw admin call, as Go Skynet's tools made them.
    """
    with socket.create_connection((address.ip_address, address.port), timeout=5) as s:
        s.sendall(bson.encode({"servicemethod": servicemethod, "seq": Int64(0)})
                  + bson.encode(params))  # fmt: skip
        data = b""
        while len(data) < _total(data):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    header_len = struct.unpack_from("<i", data)[0]
    return bson.decode(data[:header_len])


def _total(data: bytes) -> int:
    """
    Bytes needed for a header and a body document, once they are known.
    """
    if len(data) < 4:
        return 4
    first = struct.unpack_from("<i", data)[0]
    if len(data) < first + 4:
        return first + 4
    return first + struct.unpack_from("<i", data, first)[0]


class ClusterTests(TestCase):
    """
    Three processes (two Fibonacci, one TestService) on one embedded
    registry, shared by the tests of this class.
    """

    timeout = 120

    async def start_cluster(self) -> None:
        self.root = tempfile.mkdtemp(prefix="skynet-registry-")
        self.url = f"file://{self.root}"
        self.processes = [
            ServiceProcess("examples.fibonacci:Fibonacci", self.url).start(),
            ServiceProcess("examples.fibonacci:Fibonacci", self.url).start(),
            ServiceProcess("examples.testservice:TestService", self.url).start(),
        ]
        for p in self.processes:
            self.addCleanup(p.stop)
        self.registry = FileRegistry(self.root, reactor=reactor)
        await self.registry.start()
        self.addCleanup(self.registry.stop)
        self.client = Client(registry=self.registry, reactor=reactor)
        self.addCleanup(self.client.stop)
        await wait_for(self._all_registered, timeout=30, what="3 registered instances")

    async def _all_registered(self) -> bool:
        found = await self.registry.query(Query(registered=True))
        return len(found) == 3

    async def instances(self, name: str):
        return await self.registry.query(Query(service=name))

    def dump_logs(self) -> str:
        return "\n".join(f"--- {p.service} ---\n{p.output()[-3000:]}" for p in self.processes)

    async def test_calls_through_discovery(self) -> None:
        await self.start_cluster()
        result = await self.client.service("TestService").call("Upcase", {"data": "hi"})
        self.assertEqual(result, {"data": "HI"})
        result = await self.client.service("Fibonacci").call("Index", {"index": 40})
        self.assertEqual(result, {"index": 40, "value": 102334155})
        fibs = await self.instances("Fibonacci")
        self.assertEqual(len(fibs), 2)
        self.assertEqual({i.pid for i in fibs}, {p.pid for p in self.processes[:2]})

    async def test_kill_9_while_calls_run(self) -> None:
        """
        C{kill -9} of one Fibonacci while calls run: zero failed calls.
        """
        await self.start_cluster()
        fib = self.client.service("Fibonacci")
        await fib.call("Index", {"index": 10})
        callers, results = fibonacci_load(fib, seconds=4.0)
        await sleep(1.5)
        victim = self.processes[0]
        killed_at = time.monotonic()
        victim.kill(signal.SIGKILL)
        await callers
        self.assertEqual(results["failed"], [], self.dump_logs())
        self.assertGreater(results["ok"], 100)
        # And the registry forgets it without anyone cleaning up.
        await wait_for(lambda: self._fib_count(1), timeout=5, what="dead instance removed")
        gone_after = time.monotonic() - killed_at
        self.assertLess(gone_after, 5.0)

    async def _fib_count(self, n: int) -> bool:
        return len(await self.instances("Fibonacci")) == n

    async def test_unregistered_instance_gets_no_new_calls(self) -> None:
        await self.start_cluster()
        [test_instance] = await self.instances("TestService")
        # A second TestService, so there is somewhere for calls to go.
        second = ServiceProcess("examples.testservice:TestService", self.url).start()
        self.addCleanup(second.stop)
        await wait_for(lambda: self._count("TestService", 2), what="second TestService")
        service = self.client.service("TestService")
        for _ in range(10):
            await service.call("Upcase", {"data": "x"})
        reply = admin_call(test_instance.admin, "Admin.Unregister", {})
        self.assertEqual(reply["error"], "")
        await wait_for(lambda: self._registered(test_instance.uuid, False), what="unregistered")
        await sleep(1.2)  # let a statistics update go out
        before = (await self.registry.get_stats(test_instance))["RequestsServed"]
        for _ in range(40):
            await service.call("Upcase", {"data": "y"})
        await sleep(1.2)
        after = (await self.registry.get_stats(test_instance))["RequestsServed"]
        self.assertEqual(after, before)
        # Registering again brings calls back.
        admin_call(test_instance.admin, "Admin.Register", {})
        await wait_for(lambda: self._registered(test_instance.uuid, True), what="registered")

    async def _count(self, name: str, n: int) -> bool:
        return len(await self.registry.query(Query(service=name, registered=True))) == n

    async def _registered(self, uuid: str, registered: bool) -> bool:
        found = await self.registry.query(Query(uuid=uuid))
        return bool(found) and found[0].registered == registered

    async def test_garbage_closes_only_that_connection(self) -> None:
        """
        Random bytes, and a 2 GiB length prefix, each close their own
        connection; the service keeps serving others.
        """
        await self.start_cluster()
        [instance] = await self.instances("TestService")
        rng = random.Random(4)
        garbage = bytes(rng.getrandbits(8) for _ in range(4096))
        length = struct.unpack_from("<i", garbage)[0]
        self.assertFalse(5 <= length <= 16 * 1024 * 1024)
        for payload in (garbage, struct.pack("<I", 2 * 1024**3) + b"\x00" * 64,
                        b"\x05\x00\x00\x00\x00" + struct.pack("<i", 2**31 - 1)):  # fmt: skip
            closed = await ensureDeferred(self._send_raw(instance, payload))
            self.assertTrue(closed)
            result = await self.client.service("TestService").call("Upcase", {"data": "ok"})
            self.assertEqual(result, {"data": "OK"})

    async def _send_raw(self, instance, payload: bytes) -> bool:
        def talk() -> bool:
            with socket.create_connection((instance.host, instance.port), timeout=5) as s:
                handshake = s.recv(4096)
                assert bson.decode(handshake[: struct.unpack_from("<i", handshake)[0]])
                s.sendall(payload)
                s.settimeout(5)
                try:
                    while s.recv(65536):
                        pass
                except ConnectionResetError:
                    return True  # closed by the service
                except TimeoutError:
                    return False  # still open: the service did not close it
                return True  # end of stream: closed by the service

        return await deferToThread(talk)

    async def test_sigterm_drains_requests(self) -> None:
        """
        SIGTERM: the instance unregisters, finishes the call in flight, and
        leaves the registry.
        """
        await self.start_cluster()
        sleeper = ServiceProcess("examples.sleeper:Sleeper", self.url).start()
        self.addCleanup(sleeper.stop)
        await wait_for(lambda: self._count("Sleeper", 1), what="Sleeper registered")
        d = self.client.service("Sleeper").call(
            "Sleep", {"duration": Int64(1_500_000_000), "message": "done"}
        )
        await sleep(0.5)
        sleeper.kill(signal.SIGTERM)
        result = await d
        self.assertEqual(result, {"message": "done"})
        # twistd ends by re-raising the signal that stopped it.
        self.assertIn(await ensureDeferred(_wait_exit(sleeper)), (0, -signal.SIGTERM))
        self.assertEqual(await self.instances("Sleeper"), [])


class SupervisedTests(TestCase):
    timeout = 60

    async def test_supervisor_pipe_end_stops_the_service(self) -> None:
        """
        With C{--supervised}, the end of stdin (the daemon died) stops the
        service gracefully: it leaves the registry and exits.
        """
        root = tempfile.mkdtemp(prefix="skynet-registry-")
        registry = FileRegistry(root, reactor=reactor)
        await registry.start()
        self.addCleanup(registry.stop)
        process = ServiceProcess("examples.testservice:TestService", f"file://{root}",
                                 "--supervised")  # fmt: skip
        process.stdin = subprocess.PIPE
        process.start()
        self.addCleanup(process.stop)
        await wait_for(lambda: _count(registry, "TestService", 1), what="registered")
        await sleep(0.5)
        self.assertIsNone(process.popen.poll())
        process.popen.stdin.close()
        await wait_for(lambda: process.popen.poll() is not None, timeout=10, what="exit")
        self.assertEqual(await registry.query(Query(service="TestService")), [])
        self.assertIn("supervisor pipe closed", process.output())


class GracefulStopTests(TestCase):
    timeout = 60

    async def test_sigterm_shows_as_unregistration_before_removal(self) -> None:
        """
        A SIGTERM'd service is first seen unregistered, then removed, by a
        watcher of the embedded registry (what C{sky watch} shows), so a
        graceful stop cannot be mistaken for a crash.
        """
        from tests.registry_conformance import RecordingListener

        root = tempfile.mkdtemp(prefix="skynet-registry-")
        registry = FileRegistry(root, reactor=reactor)
        await registry.start()
        self.addCleanup(registry.stop)
        listener = RecordingListener()
        watch = registry.watch(Query(service="TestService"), listener)
        self.addCleanup(watch.stop)
        process = ServiceProcess("examples.testservice:TestService", f"file://{root}").start()
        self.addCleanup(process.stop)
        await wait_for(lambda: _count(registry, "TestService", 1), what="registered")
        process.kill(signal.SIGTERM)
        await wait_for(lambda: any(k == "removed" for k, _ in listener.events), timeout=20,
                       what="the removal")  # fmt: skip
        kinds = [(k, getattr(p, "registered", None)) for k, p in listener.events if k != "snapshot"]
        removal = kinds.index(("removed", False)) if ("removed", False) in kinds else len(kinds)
        self.assertIn(("updated", False), kinds[:removal], kinds)


class RegistryDownTests(TestCase):
    timeout = 90

    async def test_serves_while_the_registry_is_unusable(self) -> None:
        """
        A service whose registry cannot be used serves direct connections,
        says so clearly, and registers once the registry can be used.
        """
        top = tempfile.mkdtemp(prefix="skynet-down-")
        blocker = os.path.join(top, "blocker")
        with open(blocker, "w") as f:
            f.write("a file where the registry's directory should be")
        root = os.path.join(blocker, "registry")
        process = ServiceProcess("examples.testservice:TestService", f"file://{root}").start()
        self.addCleanup(process.stop)
        await wait_for(lambda: "could not register" in process.output(), timeout=20,
                       what="the log line about the registry")  # fmt: skip
        port = int(re.search(r"listening on 127.0.0.1:(\d+)", process.output()).group(1))
        handshake = await deferToThread(_raw_handshake, port)
        self.assertEqual((handshake["name"], handshake["registered"]), ("TestService", True))
        os.unlink(blocker)
        registry = FileRegistry(root, reactor=reactor)
        await registry.start()
        self.addCleanup(registry.stop)
        await wait_for(lambda: _count(registry, "TestService", 1), timeout=30,
                       what="registered after the registry came back")  # fmt: skip


def _raw_handshake(port: int) -> dict:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        data = s.recv(4096)
    return bson.decode(data[: struct.unpack_from("<i", data)[0]])


async def _count(registry, name: str, n: int) -> bool:
    return len(await registry.query(Query(service=name, registered=True))) == n


async def _wait_exit(process: ServiceProcess) -> int:
    await wait_for(lambda: process.popen.poll() is not None, timeout=15, what="exit")
    return process.popen.returncode


class CommandLineTests(TestCase):
    def run_twistd(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([twistd(), *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=60)  # fmt: skip

    def test_twistd_lists_the_plugin(self) -> None:
        out = self.run_twistd("--help").stdout
        self.assertIn("skynet-service", out)

    def test_bad_options_are_usage_errors(self) -> None:
        cases = [
            (["skynet-service"], "--service module:Class is required"),
            (["skynet-service", "--service", "nope"], "module:Class"),
            (["skynet-service", "--service", "no.such.module:X"], "cannot import"),
            (["skynet-service", "--service", "examples.tutorial:Nope"], "has no 'Nope'"),
            (
                [
                    "skynet-service",
                    "--service",
                    "examples.tutorial:TutorialService",
                    "--listen",
                    "bogus:1",
                ],
                "bad endpoint",
            ),  # fmt: skip
            (
                [
                    "skynet-service",
                    "--service",
                    "examples.tutorial:TutorialService",
                    "--registry",
                    "ftp://x",
                ],
                "registry",
            ),  # fmt: skip
            (
                [
                    "skynet-service",
                    "--service",
                    "examples.tutorial:TutorialService",
                    "--max-frame",
                    "lots",
                ],
                "--max-frame must be a number",
            ),  # fmt: skip
        ]
        for args, message in cases:
            with self.subTest(args=args):
                result = self.run_twistd("-n", "--pidfile=", *args)
                self.assertNotEqual(result.returncode, 0)
                self.assertIn(message, result.stdout + result.stderr)
                self.assertNotIn("Traceback", result.stdout + result.stderr)
