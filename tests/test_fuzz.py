"""
A structured fuzzer of the service side of the wire protocol.

Cases are made from valid handshakes, headers and bodies, then damaged:
wrong BSON types for every field, truncations, lying lengths, deep nesting,
huge key counts, invalid UTF-8, NUL bytes, duplicate keys, requests before
the handshake.  One generator (L{make_case}) draws from a C{random.Random},
which hypothesis supplies (and shrinks) in the suite and a seeded one
supplies in long runs.

    - L{InMemoryFuzzTests}: every case against a L{ServiceHost} on a
      C{StringTransport} and a C{Clock}; after each, nothing raised, nothing
      stays in flight or buffered, and a new connection is answered.
    - L{RealServiceFuzzTests} (slow): batches of cases over loopback against
      a real C{twistd} service; after each batch, a new connection is
      answered correctly, the service's statistics show nothing in flight,
      and its RSS stays bounded.

A long run: C{make fuzz} (C{python -m tests.test_fuzz --cases N}) prints
cases per second and findings; C{SKYNET_FUZZ_CASES=N} lengthens the suite's
runs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import struct
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import bson
import psutil
from bson.code import Code
from bson.int64 import Int64
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from skynet import _wire
from skynet.protocol import EMPTY_DOCUMENT, RequestInfo, encode_header, encode_request_body
from tests import vectors
from tests.processes import ServiceProcess

#: Cases per run of each test (hypothesis examples, or real-service cases).
CASES = int(os.environ.get("SKYNET_FUZZ_CASES", "0")) or None

SERVICE = "Adder"

#: Stands for the connection's client id in a case; as long as a real one,
#: so that replacing it keeps every length right.
CLIENTID = "CLIENTID-0000-4000-8000-000000000000"

# -- the generator


def _raw_document(elements: bytes) -> bytes:
    return struct.pack("<i", len(elements) + 5) + elements + b"\x00"


def deep(depth: int) -> bytes:
    """
    C{{a: {a: ... {}}}}, C{depth} levels, built as bytes (no recursion).
    """
    doc = EMPTY_DOCUMENT
    for _ in range(depth):
        doc = _raw_document(b"\x03a\x00" + doc)
    return doc


def many_keys(count: int) -> bytes:
    return _raw_document(b"\x0aa\x00" * count)


def odd_value(rnd: random.Random) -> Any:
    """
    A value of some BSON type, often one the protocol does not allow there.
    """
    return rnd.choice([
        None, True, False, 0, -1, 2**31, Int64(2**62), 1.5, 1e20, float(2**63), 1e308,
        float("inf"), float("nan"), "", "x" * rnd.randint(0, 64), "Add", Code("Add"),
        Code("x", {"s": 1}), b"", b"\x00" * 8, [1, "a"], {"k": "v"}, bson.ObjectId(),
        bson.Regex("a"), bson.MinKey(), bson.MaxKey(), bson.Timestamp(1, 2),
    ])  # fmt: skip


def header_doc(rnd: random.Random) -> bytes:
    fields: dict[str, Any] = {}
    roll = rnd.random()
    if roll < 0.6:
        fields["servicemethod"] = f"{SERVICE}.Forward"
    elif roll < 0.8:
        fields["servicemethod"] = rnd.choice(["", "X", "A.B.C", f"{SERVICE}.Back", "Other.Forward",
                                              f"{SERVICE}.Forward.X", "XXXX"])  # fmt: skip
    elif roll < 0.95:
        fields["servicemethod"] = odd_value(rnd)
    roll = rnd.random()
    if roll < 0.6:
        fields["seq"] = Int64(rnd.randint(0, 2**63 - 1))
    elif roll < 0.7:
        fields["seq"] = rnd.randint(-(2**31), 2**31 - 1)
    elif roll < 0.95:
        fields["seq"] = odd_value(rnd)
    return bson.encode(fields)


def body_doc(rnd: random.Random, clientid: str) -> bytes:
    if rnd.random() < 0.3:
        return encode_request_body(
            clientid, "Add", RequestInfo("r" * 36), bson.encode({"a": 1, "b": 2})
        )
    fields: dict[str, Any] = {}
    for key, good in (
        ("clientid", clientid),
        ("method", rnd.choice(["Add", "Nope", "add", "XXXX"])),
        ("requestinfo", RequestInfo("XXXX", 1).to_bson()),
    ):
        roll = rnd.random()
        if roll < 0.6:
            fields[key] = good
        elif roll < 0.9:
            fields[key] = odd_value(rnd)
    roll = rnd.random()
    if roll < 0.5:
        fields["in"] = bson.encode({"a": rnd.randint(-5, 5), "b": odd_value(rnd)})
    elif roll < 0.6:
        fields["in"] = deep(rnd.choice([10, 200, 2000]))
    elif roll < 0.7:
        fields["in"] = many_keys(rnd.choice([10, 5_000, 30_000]))
    elif roll < 0.8:
        fields["in"] = bson.Binary(bson.encode({"a": 1, "b": 1}), rnd.choice([0, 2, 4, 0x80]))
    elif roll < 0.95:
        fields["in"] = odd_value(rnd)
    return bson.encode(fields)


def damage(rnd: random.Random, doc: bytes) -> bytes:
    """
    Maybe damage one document: invalid UTF-8 and NULs in a string, a
    duplicate key, overwritten bytes, a truncation or a lying length.
    """
    roll = rnd.random()
    if roll < 0.5:
        return doc
    data = bytearray(doc)
    if roll < 0.6 and b"XXXX" in data:
        at = data.index(b"XXXX")
        data[at : at + 4] = rnd.choice([b"\xff\xfeX\x00", b"\xc3\x28\x00\x00", b"\xed\xa0\x80X"])
    elif roll < 0.7 and len(data) > 5:
        # The first element again, at the end: a duplicate key.
        data = bytearray(_raw_document(bytes(data[4:-1]) + bytes(data[4:-1])))
    elif roll < 0.8:
        for _ in range(rnd.randint(1, 4)):
            data[rnd.randrange(len(data))] = rnd.randrange(256)
    elif roll < 0.9:
        cut = rnd.randrange(len(data))
        del data[cut:]
        if rnd.random() < 0.5 and cut >= 5:
            data[:4] = struct.pack("<i", cut)
    elif len(data) >= 4:
        data[:4] = struct.pack("<i", rnd.choice([0, 4, 5, len(data) - 1, len(data) + 1, 2**31 - 1,
                                                 -1, 16 * 2**20]))  # fmt: skip
    return bytes(data)


def make_case(rnd: random.Random, clientid: str) -> bytes:
    """
    The bytes one hostile client sends on one connection.
    """
    parts = []
    roll = rnd.random()
    if roll < 0.8:
        parts.append(EMPTY_DOCUMENT)
    elif roll < 0.9:
        parts.append(damage(rnd, bson.encode({"clientid": clientid, "x": odd_value(rnd)})))
    # else: requests before (in place of) the handshake
    for _ in range(rnd.randint(1, 4)):
        parts.append(damage(rnd, header_doc(rnd)))
        parts.append(damage(rnd, body_doc(rnd, clientid)))
    stream = b"".join(parts)
    if rnd.random() < 0.1:
        stream = stream[: rnd.randrange(len(stream) + 1)]
    return stream


def good_request(clientid: str, seq: int = 1) -> bytes:
    return encode_header(f"{SERVICE}.Forward", seq) + encode_request_body(
        clientid, "Add", RequestInfo("r" * 36), bson.encode({"a": 1, "b": 2})
    )


def good_answer(data: bytes, seq: int = 1) -> bool:
    docs = vectors.split_documents(data)
    if len(docs) != 2:
        return False
    head, body = bson.decode(docs[0]), bson.decode(docs[1])
    return (
        head == {"servicemethod": f"{SERVICE}.Forward", "seq": seq, "error": ""}
        and bson.decode(body["out"]) == {"sum": 3}
        and body["errstring"] == ""
    )


# -- in memory


def make_host(clock: Clock) -> Any:
    from benchmarks.adder import Adder
    from skynet.service import ServiceHost

    host = ServiceHost(Adder(), registry=None, endpoints=[], reactor=clock)
    # The worker process is replaced by the same count, done inline.
    host.count_elements = lambda data: succeed(_wire.count_elements(data))  # type: ignore[method-assign]
    return host


def serve_case(host: Any, clock: Clock, data: bytes) -> bytes:
    """
    One case on a fresh connection; what the service wrote after its
    handshake.  The connection is closed afterwards, as its client would.
    """
    from twisted.internet.address import IPv4Address
    from twisted.internet.testing import StringTransport

    from skynet.protocol import ServerProtocol

    protocol = ServerProtocol(host)
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.2", 1234))
    protocol.makeConnection(transport)
    clientid = bson.decode(transport.value())["clientid"]
    transport.clear()
    protocol.dataReceived(data.replace(CLIENTID.encode(), clientid.encode()))
    written = transport.value()
    clock.advance(60)
    protocol.connectionLost(Failure(ConnectionDone()))
    return written


def check_written(test: SynchronousTestCase, written: bytes) -> None:
    """
    What a service writes is always well formed: header and body pairs, the
    headers with a string servicemethod, an int seq and a string error.
    """
    docs = vectors.split_documents(written)
    test.assertEqual(len(docs) % 2, 0)
    for head, body in zip(docs[::2], docs[1::2], strict=True):
        h, b = bson.decode(head), bson.decode(body)
        test.assertEqual(sorted(h), ["error", "seq", "servicemethod"])
        test.assertIsInstance(h["seq"], int)
        test.assertIsInstance(h["error"], str)
        test.assertEqual(b == {}, h["error"] != "")


class InMemoryFuzzTests(SynchronousTestCase):
    """
    Hostile cases against a service host in memory, checked after each.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.host = make_host(self.clock)

    @settings(max_examples=CASES or 200, deadline=None,
              suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
    @given(st.randoms(use_true_random=False))
    def test_hostile_cases(self, rnd: random.Random) -> None:
        case = make_case(rnd, CLIENTID)
        with capturedLogs():
            written = serve_case(self.host, self.clock, case)
        self.flushLoggedErrors()
        check_written(self, written)
        self.assertEqual(self.host.stats.in_flight, 0)
        self.assertEqual(self.host.buffer_budget.used, 0)
        self.assertEqual(self.host.connections, {})
        self.assertTrue(good_answer(serve_case(self.host, self.clock, EMPTY_DOCUMENT +
                                               good_request(CLIENTID))))  # fmt: skip

    def test_generator_covers_the_attacks(self) -> None:
        """
        The generator makes each kind of hostile input (so that a change to
        it cannot quietly stop testing one).
        """
        rnd = random.Random(7)
        cases = [make_case(rnd, CLIENTID) for _ in range(2000)]
        joined = b"".join(cases)
        kinds = {
            "deep nesting": b"\x03a\x00\xfd\x01\x00\x00\x03a\x00",
            "huge key counts": b"\x0aa\x00" * 1000,
            "invalid UTF-8 and NUL": b"\xff\xfeX\x00",
            "code where a string belongs": b"\x0dmethod\x00",
            "double seq": b"\x01seq\x00",
            "lying length": b"\xff\xff\xff\x7f",
            "duplicate key": b"\x02servicemethod\x00\x0e\x00\x00\x00Adder.Forward\x00\x12seq\x00",
        }
        for kind, marker in kinds.items():
            self.assertTrue(marker in joined, kind)
        self.assertGreater(joined.count(b"\x03a\x00"), 10_000)
        self.assertTrue(any(not c.startswith(EMPTY_DOCUMENT) for c in cases))


class MaliciousServiceFuzzTests(SynchronousTestCase):
    """
    A hostile service against the client: whatever it answers, nothing
    raises out of the client's protocol, each call ends exactly once (at
    the latest when the connection is lost), and an answer the client
    cannot decode fails its call as connection trouble, never as a service
    error, so that a client retries elsewhere.
    """

    @settings(max_examples=CASES or 200, deadline=None)
    @given(st.randoms(use_true_random=False), st.integers(1, 4))
    def test_hostile_answers(self, rnd: random.Random, calls: int) -> None:
        from twisted.internet.testing import StringTransport

        from skynet.errors import ConnectionFailed, RemoteCallError, ServiceError
        from skynet.protocol import ClientProtocol, encode_response_body

        protocol = ClientProtocol(SERVICE)
        protocol.ready.addErrback(lambda f: None)  # a refused handshake is a fine outcome
        transport = StringTransport()
        protocol.makeConnection(transport)
        handshake = {"name": SERVICE, "registered": True, "clientid": CLIENTID}
        if rnd.random() < 0.2:
            handshake[rnd.choice(["name", "registered", "clientid"])] = odd_value(rnd)
        protocol.dataReceived(damage(rnd, bson.encode(handshake)) if rnd.random() < 0.2
                              else bson.encode(handshake))  # fmt: skip
        outcomes: list[list] = []
        for _ in range(calls if protocol.ready.called and not transport.disconnecting else 0):
            try:
                d = protocol.call("Add", {"a": 1}, RequestInfo("x"))
            except ConnectionFailed:
                break
            outcome: list = []
            d.addBoth(outcome.append)
            outcomes.append(outcome)
        answers = []
        for seq in range(calls + 1):
            head = bson.encode({"servicemethod": f"{SERVICE}.Forward", "seq": Int64(seq),
                                "error": rnd.choice(["", "", "rpc: nope"])})  # fmt: skip
            out = bson.encode({"sum": odd_value(rnd)}) if rnd.random() < 0.7 else odd_value(rnd)
            try:
                body = encode_response_body(out, rnd.choice(["", "", "failed"]))
            except (TypeError, AttributeError):
                body = bson.encode({"out": out})
            answers.append(damage(rnd, head) + damage(rnd, body))
        stream = b"".join(answers)
        with capturedLogs():
            for cut in sorted(rnd.sample(range(len(stream) + 1), 3)) + [len(stream)]:
                protocol.dataReceived(stream[:cut])
                stream = stream[cut:]
            protocol.connectionLost(Failure(ConnectionDone()))
        for outcome in outcomes:
            self.assertEqual(len(outcome), 1)
            result = outcome[0]
            if isinstance(result, Failure):
                self.assertTrue(result.check(ConnectionFailed, RemoteCallError, ServiceError),
                                result)  # fmt: skip
                if result.check(ServiceError):
                    self.assertEqual(str(result.value), "failed")
            else:
                self.assertIsInstance(result, dict)


# -- against a real service


class RealService:
    """
    A C{twistd} service of L{benchmarks.adder.Adder} and what is needed to
    check on it between batches.
    """

    def __init__(self) -> None:
        self.home = tempfile.mkdtemp(prefix="skynet-fuzz-")
        self.process = ServiceProcess(
            "benchmarks.adder:Adder", f"file://{self.home}/registry", "--admin", "none",
            env={"SKYNET_HOME": self.home},
        ).start()  # fmt: skip
        self.ps = psutil.Process(self.process.pid)
        self.port = self._port()

    def _port(self) -> int:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            ports = [c.laddr.port for c in self.ps.net_connections("tcp")
                     if c.status == psutil.CONN_LISTEN]  # fmt: skip
            if ports:
                return ports[0]
            if self.process.popen.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"the service never listened:\n{self.process.output()}")

    def send_case(self, data: bytes) -> None:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=2,
                                        source_address=("127.0.0.2", 0))  # fmt: skip
        try:
            handshake = read_document(sock)
            clientid = bson.decode(handshake)["clientid"]
            sock.sendall(data.replace(CLIENTID.encode(), clientid.encode()))
            sock.settimeout(0.02)
            try:
                while sock.recv(65536):
                    pass
            except (TimeoutError, OSError):
                pass
        except OSError:
            pass
        finally:
            sock.close()

    def call_works(self) -> bool:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        try:
            clientid = bson.decode(read_document(sock))["clientid"]
            sock.sendall(EMPTY_DOCUMENT + good_request(clientid))
            return good_answer(read_document(sock) + read_document(sock))
        finally:
            sock.close()

    def in_flight(self, timeout: float = 10.0) -> int:
        """
        The service's C{InFlight} statistic, once it reads 0 (or the last
        value read when C{timeout} is up).
        """
        last = -1
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for path in Path(self.home, "registry", "statistics").rglob("*"):
                if path.is_file():
                    try:
                        last = json.loads(path.read_text())["InFlight"]
                    except (OSError, ValueError, KeyError):
                        continue
            if last == 0:
                return 0
            time.sleep(0.2)
        return last

    def rss(self) -> float:
        return self.ps.memory_info().rss / 2**20

    def stop(self) -> None:
        self.process.stop()


def read_document(sock: socket.socket) -> bytes:
    """
    Exactly one document from C{sock}.
    """
    head = _read_exactly(sock, 4)
    return head + _read_exactly(sock, struct.unpack("<i", head)[0] - 4)


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    chunks = []
    while n > 0:
        chunk = sock.recv(n)
        if not chunk:
            raise ConnectionError("closed")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def fuzz_real_service(cases: int, batch: int = 200, seed: int = 0,
                      report: Any = None) -> dict[str, Any]:  # fmt: skip
    """
    Send C{cases} cases in batches; after each batch check the service.
    @return: counts, rate and findings (one line per broken invariant).
    """
    service = RealService()
    rnd = random.Random(seed)
    findings: list[str] = []
    rss_max = service.rss()
    started = time.monotonic()
    sent = 0
    try:
        while sent < cases:
            batch_cases = [make_case(rnd, CLIENTID) for _ in range(min(batch, cases - sent))]
            # Several hostile clients at once (each case on its own connection).
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(service.send_case, batch_cases))
            sent += len(batch_cases)
            if service.process.popen.poll() is not None:
                findings.append(f"after {sent} cases: the service died")
                break
            if not service.call_works():
                findings.append(f"after {sent} cases: a new connection was not answered")
            in_flight = service.in_flight()
            if in_flight != 0:
                findings.append(f"after {sent} cases: {in_flight} requests in flight")
            rss_max = max(rss_max, service.rss())
            if rss_max > 200:
                findings.append(f"after {sent} cases: RSS {rss_max:.0f} MiB")
            if report is not None:
                report(sent, time.monotonic() - started, findings)
    finally:
        log = service.process.output()
        service.stop()
    elapsed = time.monotonic() - started
    # Adder's own failures on bad parameters are logged with their
    # traceback, as any method's unexpected exception is: not findings.
    tracebacks = log.count("Traceback") - log.count(f"method of {SERVICE} failed")
    if tracebacks:
        findings.append(f"{tracebacks} tracebacks in the service log")
    return {"cases": sent, "seconds": elapsed, "rate": sent / elapsed, "rss_max": rss_max,
            "findings": findings}  # fmt: skip


class RealServiceFuzzTests(SynchronousTestCase):
    """
    Hostile cases over loopback against a real service (slow: a twistd
    process); C{SKYNET_FUZZ_CASES} for a longer run.
    """

    def test_real_service_survives(self) -> None:
        result = fuzz_real_service(CASES or 600, batch=200, seed=int(time.time()))
        self.assertEqual(result["findings"], [])
        self.assertEqual(result["cases"], CASES or 600)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="Fuzz a real service with hostile peers.")
    parser.add_argument("--cases", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else int(time.time())

    def report(sent: int, elapsed: float, findings: list[str]) -> None:
        print(f"{sent} cases, {sent / elapsed:.0f} cases/s, {len(findings)} findings", flush=True)

    print(f"seed {seed}")
    result = fuzz_real_service(args.cases, args.batch, seed, report)
    print(f"{result['cases']} cases in {result['seconds']:.1f}s ({result['rate']:.0f} cases/s), "
          f"service RSS at most {result['rss_max']:.1f} MiB")  # fmt: skip
    for finding in result["findings"]:
        print("FINDING:", finding)
    print(f"{len(result['findings'])} findings")
    return 1 if result["findings"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
