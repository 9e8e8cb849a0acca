"""
Hostile peers against a real service: what each attack of issue 11 costs the
service and a normal client beside it.

    python -m benchmarks.attacks [--seconds 8] [--only stall,cpu] [--root DIR]

Starts C{twistd -n skynet-service} with L{benchmarks.adder.Adder} (from
C{--root}, default this checkout, so that an older tree can be measured with
the same script), then for each attack: the attacker runs in threads of this
process (plain blocking sockets, bound to 127.0.0.2 where it matters) while a
normal client in a child process calls C{Add} in a loop over its own
connection.  Printed per attack: the service's RSS before and at its peak,
the normal client's calls, p50/p99 and failures during the attack, and how
long the attacker's connections lived.  Loopback only; every attack is
bounded in connections, bytes and time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bson
import psutil

ROOT = Path(__file__).resolve().parent.parent
SERVICE = "Adder"


def header(seq: Any, servicemethod: str = f"{SERVICE}.Forward") -> bytes:
    return bson.encode({"servicemethod": servicemethod, "seq": seq})


def body(clientid: str, params: dict[str, Any] | None = None) -> bytes:
    return bson.encode({
        "clientid": clientid, "method": "Add",
        "requestinfo": {"originaddress": "", "connectionaddress": "", "requestid": "r" * 36,
                        "retrycount": 0},
        "in": bson.encode(params if params is not None else {"a": 1, "b": 2}),
    })  # fmt: skip


def read_document(sock: socket.socket) -> bytes:
    head = _read_exactly(sock, 4)
    (length,) = struct.unpack("<i", head)
    return head + _read_exactly(sock, length - 4)


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    chunks = []
    while n:
        chunk = sock.recv(min(n, 1 << 20))
        if not chunk:
            raise ConnectionError("closed")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def connect(
    port: int, source: str = "127.0.0.1", timeout: float = 5.0
) -> tuple[socket.socket, str]:
    """
    A connection after the handshake: (socket, client id).
    """
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout,
                                    source_address=(source, 0))  # fmt: skip
    handshake = bson.decode(read_document(sock))
    sock.sendall(b"\x05\x00\x00\x00\x00")
    return sock, handshake["clientid"]


# The normal client (a child process)


def normal_client(port: int, seconds: float, fresh: bool = False) -> dict[str, Any]:
    """
    Call C{Add} in a loop for C{seconds}, on one connection (or a fresh
    connection per call if C{fresh}, as a client reaching a new instance).
    """
    latencies: list[float] = []
    failures = 0
    end = time.monotonic() + seconds
    sock: socket.socket | None = None
    seq = 0
    while time.monotonic() < end:
        try:
            if sock is None:
                sock, clientid = connect(port, timeout=2.0)
            started = time.perf_counter()
            sock.sendall(header(bson.Int64(seq)) + body(clientid))
            answer = bson.decode(read_document(sock))
            result = bson.decode(read_document(sock))
            seq += 1
            if answer["error"] or bson.decode(result["out"]) != {"sum": 3}:
                failures += 1
                continue
            latencies.append(time.perf_counter() - started)
            if fresh:
                sock.close()
                sock = None
        except (OSError, ConnectionError, KeyError, bson.errors.BSONError):
            failures += 1
            if sock is not None:
                sock.close()
            sock = None
            time.sleep(0.05)
    latencies.sort()

    def pct(f: float) -> float:
        return (
            latencies[min(len(latencies) - 1, int(f * len(latencies)))] * 1e3 if latencies else -1
        )

    return {"calls": len(latencies), "failures": failures, "p50": pct(0.5), "p99": pct(0.99),
            "max": latencies[-1] * 1e3 if latencies else -1}  # fmt: skip


# Attacks: each returns the lifetimes (s) of its connections, and stops at `end`.


def _hold(socks: list[socket.socket], started: float, end: float) -> list[float]:
    """
    Keep C{socks} open until C{end}; each one's lifetime (until the service
    closes it, or C{end}).
    """
    lived = [0.0] * len(socks)
    open_ = set(range(len(socks)))
    for s in socks:
        s.setblocking(False)
    while open_ and time.monotonic() < end:
        for i in list(open_):
            try:
                data = socks[i].recv(65536)
                if not data:
                    lived[i] = time.monotonic() - started
                    open_.discard(i)
            except BlockingIOError:
                pass
            except OSError:
                lived[i] = time.monotonic() - started
                open_.discard(i)
        time.sleep(0.05)
    for i in open_:
        lived[i] = time.monotonic() - started
    for s in socks:
        s.close()
    return lived


def attack_stall(port: int, end: float, count: int = 32, claim: int = 16 * 2**20) -> list[float]:
    """
    C{count} connections each send C{claim - 1} bytes of a C{claim}-byte
    frame, then stall.
    """
    started = time.monotonic()
    socks = []
    for _ in range(count):
        try:
            sock, _ = connect(port, source="127.0.0.2")
        except OSError:
            continue
        socks.append(sock)
    chunk = b"\x00" * (1 << 20)

    def feed(sock: socket.socket) -> None:
        try:
            sock.sendall(struct.pack("<i", claim))
            left = claim - 5
            while left > 0 and time.monotonic() < end:
                n = min(left, len(chunk))
                sock.sendall(chunk[:n])
                left -= n
        except OSError:
            pass

    threads = [threading.Thread(target=feed, args=(s,)) for s in socks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, end - time.monotonic()))
    return _hold(socks, started, end)


def attack_stall_at_limit(port: int, end: float) -> list[float]:
    """
    As L{attack_stall}, with frames just under a 4 MiB request limit.
    """
    return attack_stall(port, end, count=64, claim=4 * 2**20 - 1)


def attack_pipeline(port: int, end: float, count: int = 100_000) -> list[float]:
    """
    One connection pipelines C{count} requests and never reads an answer.
    """
    started = time.monotonic()
    sock, clientid = connect(port, source="127.0.0.2")
    request = body(clientid)
    sock.settimeout(0.5)
    sent = 0
    batch = b"".join(header(bson.Int64(i)) + request for i in range(1000))
    try:
        while sent < count and time.monotonic() < end:
            sock.sendall(batch)
            sent += 1000
    except OSError:
        pass  # the service stopped reading: the socket buffers are full
    sock.settimeout(None)
    return _hold([sock], started, end)


def attack_idle(port: int, end: float, count: int = 1100) -> list[float]:
    """
    C{count} connections complete the handshake, then say nothing.
    """
    started = time.monotonic()
    socks = []
    for _ in range(count):
        try:
            sock, _ = connect(port, source="127.0.0.2", timeout=1.0)
        except OSError:
            break
        socks.append(sock)
    return _hold(socks, started, end)


def attack_burst(port: int, end: float, count: int = 200) -> list[float]:
    """
    C{count} connects at once; lifetime 0 for a connection that never got
    its handshake within 3 s.
    """
    started = time.monotonic()
    socks = []
    for _ in range(count):
        s = socket.socket()
        s.bind(("127.0.0.2", 0))
        s.setblocking(False)
        try:
            s.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        socks.append(s)
    greeted = [False] * count
    deadline = time.monotonic() + 3
    while not all(greeted) and time.monotonic() < deadline:
        for i, s in enumerate(socks):
            if not greeted[i]:
                try:
                    if s.recv(4096):
                        greeted[i] = True
                except (BlockingIOError, OSError):
                    pass
        time.sleep(0.02)
    lived = _hold([s for s, g in zip(socks, greeted, strict=True) if g], started, end)
    return lived + [0.0] * greeted.count(False)


def attack_cpu(port: int, end: float, keys: int = 1_390_000) -> list[float]:
    """
    One connection sends bodies of about 4 MiB holding C{keys} elements,
    one after the other (reading each answer).
    """
    started = time.monotonic()
    sock, _ = connect(port, source="127.0.0.2")
    elements = b"\x0aa\x00" * keys
    heavy = struct.pack("<i", len(elements) + 5) + elements + b"\x00"
    seq = 0
    try:
        while time.monotonic() < end:
            sock.sendall(header(bson.Int64(seq)) + heavy)
            read_document(sock)
            read_document(sock)
            seq += 1
    except (OSError, ConnectionError):
        pass
    return _hold([sock], started, end)


def attack_leak(port: int, end: float, count: int = 50) -> list[float]:
    """
    Requests whose seq is a double outside int64, on fresh connections.
    """
    lived = []
    for value in [1e20, float(2**63), 1e308] * (count // 3):
        started = time.monotonic()
        sock, clientid = connect(port, source="127.0.0.2")
        sock.sendall(header(value) + body(clientid))
        lived += _hold([sock], started, min(end, started + 0.1))
    return lived


ATTACKS: dict[str, Callable[[int, float], list[float]]] = {
    "stall": attack_stall,
    "stall-4MiB": attack_stall_at_limit,
    "pipeline": attack_pipeline,
    "idle": attack_idle,
    "burst": attack_burst,
    "cpu": attack_cpu,
    "leak": attack_leak,
}


#: Attacks against which the normal client opens a fresh connection per call.
FRESH = {"idle", "burst"}


# The service


class Service:
    def __init__(self, root: Path, nofile: int | None = None) -> None:
        self.home = tempfile.mkdtemp(prefix="skynet-attacks-")
        env = dict(os.environ, SKYNET_HOME=self.home, PYTHONPATH=str(root))

        def limits() -> None:
            if nofile:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        twistd = str(Path(sys.executable).parent / "twistd")
        self.popen = subprocess.Popen(
            [twistd, "-n", "--pidfile=", "skynet-service", "--service", "benchmarks.adder:Adder",
             "--registry", f"file://{self.home}/registry", "--listen",
             "tcp:0:interface=127.0.0.1", "--admin", "none"],
            cwd=root, env=env, stdout=open(Path(self.home) / "service.log", "wb"),
            stderr=subprocess.STDOUT, preexec_fn=limits,
        )  # fmt: skip
        self.process = psutil.Process(self.popen.pid)
        self.port = self._port()

    def _port(self) -> int:
        for _ in range(200):
            listening = [c.laddr.port for c in self.process.net_connections("tcp")
                         if c.status == psutil.CONN_LISTEN]  # fmt: skip
            if listening:
                return listening[0]
            time.sleep(0.05)
        raise RuntimeError("the service never listened")

    def rss(self) -> float:
        return self.process.memory_info().rss / 2**20

    def stop(self) -> float:
        """
        SIGTERM; the seconds until it has exited.
        """
        started = time.monotonic()
        self.popen.terminate()
        try:
            self.popen.wait(30)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(5)
        return time.monotonic() - started


def run_attack(name: str, root: Path, seconds: float) -> dict[str, Any]:
    service = Service(root, nofile=1024 if name == "idle" else None)
    try:
        time.sleep(0.5)
        rss_before = service.rss()
        end = time.monotonic() + seconds
        normal = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.attacks", "--normal", str(service.port),
             "--seconds", str(seconds)] + (["--fresh"] if name in FRESH else []),
            cwd=ROOT, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        peak = [rss_before]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                try:
                    peak.append(service.rss())
                except psutil.Error:
                    return
                time.sleep(0.1)

        sampler = threading.Thread(target=sample)
        sampler.start()
        lived = ATTACKS[name](service.port, end)
        out, _ = normal.communicate(timeout=seconds + 30)
        done.set()
        sampler.join()
        stop_seconds = service.stop()
    finally:
        if service.popen.poll() is None:
            service.stop()
    lived.sort()
    return {
        "attack": name,
        "rss_before": rss_before,
        "rss_peak": max(peak),
        "normal": json.loads(out),
        "connections": len(lived),
        "lived_median": lived[len(lived) // 2] if lived else 0.0,
        "lived_max": lived[-1] if lived else 0.0,
        "stop_seconds": stop_seconds,
    }


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--only", default=",".join(ATTACKS))
    parser.add_argument("--root", default=str(ROOT), help="the skynet tree to run the service from")
    parser.add_argument("--normal", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--fresh", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.normal:
        print(json.dumps(normal_client(args.normal, args.seconds, args.fresh)))
        return
    print(f"service from {args.root}; {args.seconds}s per attack")
    print(f"{'attack':11} {'RSS MiB':>15} {'normal calls':>12} {'p50 ms':>7} {'p99 ms':>8} "
          f"{'max ms':>8} {'failed':>6} {'conns':>5} {'lived s (median/max)':>21} {'stop s':>6}")  # fmt: skip
    for name in args.only.split(","):
        r = run_attack(name, Path(args.root), args.seconds)
        n = r["normal"]
        print(f"{name:11} {r['rss_before']:6.1f} -> {r['rss_peak']:6.1f} {n['calls']:12d} "
              f"{n['p50']:7.2f} {n['p99']:8.2f} {n['max']:8.1f} {n['failures']:6d} {r['connections']:5d} "
              f"{r['lived_median']:10.1f} / {r['lived_max']:8.1f} {r['stop_seconds']:6.1f}",
              flush=True)  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1:])
