"""
Hostile peers against a real C{twistd} service (slow): each attack of issue
11 that costs memory or descriptors, with the behaviour that stops it.

The attackers are those of L{benchmarks.attacks}, bound to 127.0.0.2 where a
normal client on 127.0.0.1 must still get through.  Waits are generous and
nothing asserts on time: on memory, descriptors, answers and log lines.
"""

from __future__ import annotations

import socket
import struct
import time

import bson
from twisted.trial.unittest import SynchronousTestCase

from benchmarks import attacks
from skynet.taps import LISTEN_BACKLOG, service_endpoints


class AttackTests(SynchronousTestCase):
    def start(self, nofile: int | None = None) -> attacks.Service:
        service = attacks.Service(attacks.ROOT, nofile=nofile)
        self.addCleanup(lambda: service.popen.poll() is None and service.stop())
        return service

    def assert_normal_call_works(self, service: attacks.Service) -> None:
        result = attacks.normal_client(service.port, 0.5, fresh=True)
        self.assertGreater(result["calls"], 0)
        self.assertEqual(result["failures"], 0)

    def test_stalled_large_frames_closed_and_memory_bounded(self) -> None:
        """
        32 connections each send most of a 16 MiB frame and stall: beyond
        the 4 MiB request limit, each is closed at once, and the service
        stays small (it grew past 500 MiB).
        """
        service = self.start()
        lived = attacks.attack_stall(service.port, time.monotonic() + 5)
        self.assertEqual(len(lived), 32)
        self.assertLess(max(lived), 5)  # every one closed by the service
        self.assertLess(service.rss(), 200)
        self.assert_normal_call_works(service)

    def test_stalled_frames_within_the_limit_bounded_by_the_budget(self) -> None:
        """
        64 connections each stall a frame just under the 4 MiB limit: the
        service's budget of unfinished frames closes those beyond it (the
        service grew past 300 MiB), and the others time out.
        """
        service = self.start()
        lived = attacks.attack_stall_at_limit(service.port, time.monotonic() + 6)
        self.assertLess(service.rss(), 200)
        closed = [t for t in lived if t < 6]
        self.assertGreater(len(closed), 16)
        self.assertIn("would exceed the service's budget", (service_log(service)))
        self.assert_normal_call_works(service)

    def test_pipelining_without_reading_stops_reading(self) -> None:
        """
        A client that pipelines requests and never reads its answers: the
        service stops reading it once the answers fill its buffers, so the
        client cannot push 100,000 requests in (it could).
        """
        service = self.start()
        sock, clientid = attacks.connect(service.port, source="127.0.0.2")
        self.addCleanup(sock.close)
        request = attacks.body(clientid)
        batch = b"".join(attacks.header(bson.Int64(i)) + request for i in range(1000))
        sock.settimeout(3)
        sent = 0
        try:
            while sent < 100_000:
                sock.sendall(batch)
                sent += 1000
        except TimeoutError:
            pass
        self.assertLess(sent, 100_000)
        self.assertLess(service.rss(), 200)
        self.assert_normal_call_works(service)

    def test_idle_connections_cannot_take_every_descriptor(self) -> None:
        """
        With 1,024 descriptors, idle connections from one address took
        every descriptor and new calls failed: now that address gets 256,
        and a client from another address is served.
        """
        service = self.start(nofile=1024)
        socks = []
        for _ in range(1100):
            try:
                socks.append(attacks.connect(service.port, source="127.0.0.2", timeout=1)[0])
            except OSError:
                break
        self.addCleanup(lambda: [s.close() for s in socks])
        self.assertGreaterEqual(len(socks), 256)
        for s in socks:
            s.setblocking(False)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and open_count(socks) > 256:
            time.sleep(0.1)
        self.assertEqual(open_count(socks), 256)
        self.assert_normal_call_works(service)

    def test_bad_seq_leaves_nothing_in_flight_at_stop(self) -> None:
        """
        Requests whose seq is a double outside int64 are answered; a SIGTERM
        afterwards has nothing to drain (it waited the whole 10 s).
        """
        service = self.start()
        for value in (1e20, float(2**63), 1e308):
            sock, clientid = attacks.connect(service.port)
            sock.sendall(attacks.header(value) + attacks.body(clientid))
            answer = bson.decode(attacks.read_document(sock))
            self.assertEqual(answer["seq"], 0)
            self.assertIn("ill-formed", answer["error"])
            sock.close()
        service.stop()
        self.assertNotIn("draining", service_log(service))
        self.assertNotIn("still in flight", service_log(service))

    def test_request_with_a_million_elements_refused(self) -> None:
        """
        A body of 1.39 million elements is counted off the reactor and
        refused; the connection and a normal client are served on.
        """
        service = self.start()
        sock, clientid = attacks.connect(service.port, source="127.0.0.2")
        self.addCleanup(sock.close)
        elements = b"\x0aa\x00" * 1_390_000
        heavy = struct.pack("<i", len(elements) + 5) + elements + b"\x00"
        sock.settimeout(60)
        sock.sendall(attacks.header(bson.Int64(3)) + heavy)
        answer = bson.decode(attacks.read_document(sock))
        attacks.read_document(sock)
        self.assertEqual(
            answer["error"], "request has 1390000 elements, more than the 20000 this service takes"
        )
        sock.sendall(attacks.header(bson.Int64(4)) + attacks.body(clientid))
        self.assertEqual(bson.decode(attacks.read_document(sock))["error"], "")
        self.assert_normal_call_works(service)

    def test_listen_backlog(self) -> None:
        from twisted.internet import reactor

        endpoints, _ = service_endpoints(reactor, "tcp:0:interface=127.0.0.1", "none")
        self.assertEqual(endpoints[0]._backlog, LISTEN_BACKLOG)
        self.assertGreater(LISTEN_BACKLOG, 50)


def open_count(socks: list[socket.socket]) -> int:
    """
    How many of C{socks} the service has not closed.
    """
    count = 0
    for s in socks:
        try:
            if s.recv(65536) == b"":
                continue
        except BlockingIOError:
            pass
        except OSError:
            continue
        count += 1
    return count


def service_log(service: attacks.Service) -> str:
    from pathlib import Path

    return (Path(service.home) / "service.log").read_text(errors="replace")
