"""
RPC comparison: one C{add(a, b, data)} call through skynet, a bare Twisted
BSON loop, Pyro5 and gRPC-Python, on loopback, in one run.

    python -m benchmarks.compare [--seconds 3] [--payloads 100,10000,1000000]
        [--modes sequential,concurrent,processes] [--systems skynet,sync,bare,pyro5,grpc]
        [--concurrency 64] [--processes 8] [--connections 1000] [--json FILE]
        [--peers-venv DIR] [--peers-python PYTHON]
    python -m benchmarks.compare --setup-peers      # make the peers' environment only

Every system serves C{add(a, b, data) -> {sum: a + b, data: data}} in a
server process of its own; C{data} is C{--payloads} bytes, so the payload
goes both ways.  Every client is a process of its own too, the same for
every system: it connects and warms up, says it is ready, and measures for
C{--seconds} when told to go.  The modes:

  - sequential: one client process, one call at a time (calls/s, p50, p99);
  - concurrent: one client process, C{--concurrency} calls in flight
    (skynet and the bare loop: that many coroutines on the reactor; Pyro5:
    that many threads, each with its own proxy; gRPC: that many asyncio
    tasks on one channel);
  - processes: C{--processes} client processes at once, each sequential.

The systems:

  - skynet: C{twistd skynet-service} serving L{Adder}, found by each
    client through the embedded registry (in a temporary directory);
    L{skynet.client.Client} with its defaults (retries, hedging, pools);
  - sync: the same skynet service, called through L{skynet.sync.Client}
    (blocking sockets in the calling threads; concurrent: that many
    threads sharing one client); its ratio to Pyro5, the other blocking
    client, is in a column of its own;
  - notrace: skynet with span recording off in the service and the
    client (C{SKYNET_TRACE=0}); skynet's ratio to it is the cost of tracing
    (issue 14: at most 5 % at 64 in flight), in a column of its own;
  - nopoll, syncnopoll: skynet and sync without busy polling (the
    service with C{SKYNET_BUSY_POLL=0}, the Twisted client with
    C{busy_poll=0}, the sync client with C{spin=0}), what polling gains,
    in columns of their own (not in the default run: C{--systems});
  - bare: a bare Twisted request/response loop over the same BSON framing
    (one document each way, no handshake, no registry: see
    L{benchmarks.bare}), the floor of this design;
  - raw: the machine's own limit for these bytes: the same payload each
    way over a loopback socket, a 4-byte length and the bytes, with
    blocking C{sendall}/C{recv_into} into a buffer allocated once and no
    codec (a thread per connection on the server; concurrent: a thread per
    call in flight, each with its own connection); every system's ratio to
    it is in a table of its own;
  - pyro5: Pyro5 5.x, its threaded server, marshal serializer, TCP_NODELAY;
  - grpc: grpcio, protobuf stubs generated at run time, an asyncio server;
    sequential calls through the blocking stub.

Pyro5 and grpcio are not dependencies of skynet: they run from their own
virtualenv (C{--peers-venv}, default C{benchmarks/.venv}), created here on
first use from PyPI.  When it cannot be created, the peers are left out and
the table says why.

The C allocator: glibc's defaults, except that skynet's servers and clients
tune theirs (L{skynet.config.tune_malloc}), as they do for users; with
C{--malloc-tuned} every process, clients and peers included, runs with those
settings, so that all run alike (1 MB payloads move several times faster for
every system then: a fresh mmap()ed block per message costs a page fault per
page).

Memory: the RSS of each idle server (after answering one call on one
connection), and its growth per idle client connection (C{--connections}
more connections opened by one client process, divided by their number).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from benchmarks.peers import gathered, percentile, size_label
from skynet.service import Service, binary_views

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PEERS_VENV = ROOT / "benchmarks" / ".venv"
PEER_PACKAGES = ["Pyro5", "grpcio", "grpcio-tools"]

SYSTEMS = ["skynet", "notrace", "sync", "bare", "raw", "pyro5", "grpc"]
PEERS = {"pyro5", "grpc", "fake"}
LABELS = {
    "skynet": "skynet",
    "notrace": "notrace",
    "sync": "sync",
    "bare": "bare",
    "raw": "raw",
    "pyro5": "Pyro5",
    "grpc": "gRPC",
    "fake": "fake",
    "nopoll": "nopoll",
    "syncnopoll": "syncnopoll",
    "views": "views",
}
MODES = ["sequential", "concurrent", "processes"]

#: skynet / other, at least (from issue 7); "bare" applies to every mode.
GOALS = {
    ("sequential", "pyro5"): 1.5,
    ("sequential", "grpc"): 2.0,
    ("concurrent", "pyro5"): 2.0,
    ("concurrent", "grpc"): 4.0,
    ("sequential", "bare"): 0.5,
    ("concurrent", "bare"): 0.5,
    ("processes", "bare"): 0.5,
}

#: sync / Pyro5, at least (issue 13): both are blocking clients.
SYNC_GOALS = {"sequential": 1.5}

#: skynet / notrace, at least (issue 14): tracing costs at most 5 %.
TRACE_GOALS = {"concurrent": 0.95}

#: The systems served by C{twistd skynet-service}.
SKYNET_SERVED = ("skynet", "notrace", "sync", "nopoll", "syncnopoll", "views")

#: Systems measured only when named: skynet with large binaries as views
#: (L{skynet.service.binary_views} in the service, C{binary_views=True} in
#: the client), beside the systems of L{NO_POLL}.
EXTRA = {"views"}

#: The systems without busy polling, and the one each is the baseline of.
NO_POLL = {"nopoll": "skynet", "syncnopoll": "sync"}


# -- the skynet service and the bare server


class Adder(Service):
    """
    C{Adder.Add {a, b, data} -> {sum, data}}.
    """

    name = "Adder"

    def Add(self, request_info: Any, params: dict[str, Any]) -> dict[str, Any]:
        return {"sum": params["a"] + params["b"], "data": params.get("data", b"")}


class ViewAdder(Adder):
    """
    L{Adder} taking its large C{data} as a view and answering with it.
    """

    @binary_views
    def Add(self, request_info: Any, params: dict[str, Any]) -> dict[str, Any]:
        return super().Add(request_info, params)


def _bare_protocols() -> tuple[type, type]:
    """
    The bare loop's server and client protocols: L{benchmarks.bare}'s, with
    the payload echoed and a buffer that does not copy a large document
    once per TCP segment.
    """
    import struct

    import bson
    from twisted.internet.defer import Deferred
    from twisted.internet.protocol import Protocol

    unpack = struct.Struct("<i").unpack_from
    decode, encode = bson.decode, bson.encode

    class Framing(Protocol):
        def __init__(self) -> None:
            self.chunks: list[bytes] = []
            self.have = 0
            self.needed = 0

        def dataReceived(self, data: bytes) -> None:
            if self.chunks:
                self.chunks.append(data)
                self.have += len(data)
                if self.have < self.needed:
                    return
                data = b"".join(self.chunks)
                self.chunks = []
            end = len(data)
            offset = 0
            needed = 4
            while end - offset >= 4:
                length = unpack(data, offset)[0]
                if end - offset < length:
                    needed = length
                    break
                frame = data if offset == 0 and length == end else data[offset : offset + length]
                self.document(decode(frame))
                offset += length
            if offset < end:
                rest = data[offset:]
                self.chunks, self.have, self.needed = [rest], len(rest), needed

        def document(self, doc: dict) -> None:
            raise NotImplementedError

    class Server(Framing):
        def document(self, doc: dict) -> None:
            self.transport.write(
                encode({"sum": doc["a"] + doc["b"], "data": doc["data"], "seq": doc["seq"]})
            )

    class Client(Framing):
        def __init__(self) -> None:
            super().__init__()
            self.pending: dict[int, Deferred] = {}
            self.seq = 0

        def call(self, a: int, b: int, data: bytes) -> Deferred:
            self.seq += 1
            d: Deferred = Deferred()
            self.pending[self.seq] = d
            self.transport.write(encode({"a": a, "b": b, "data": data, "seq": self.seq}))
            return d

        def document(self, doc: dict) -> None:
            self.pending.pop(doc["seq"]).callback(doc)

    return Server, Client


def serve_bare(port_file: str) -> None:
    from twisted.internet import reactor
    from twisted.internet.protocol import Factory

    server, _ = _bare_protocols()
    port = reactor.listenTCP(0, Factory.forProtocol(server), interface="127.0.0.1")
    _write(port_file, str(port.getHost().port))
    reactor.run()


def serve_raw(port_file: str) -> None:
    """
    The C{raw} system's server: a thread per connection, each echoing
    length-prefixed messages through one buffer, no codec.
    """
    import socket
    import threading

    listener = socket.create_server(("127.0.0.1", 0))
    _write(port_file, str(listener.getsockname()[1]))

    def serve(sock: socket.socket) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buffer = bytearray(4)
        view = memoryview(buffer)
        try:
            while True:
                if not _recv_exactly(sock, view[:4]):
                    return
                length = 4 + int.from_bytes(view[:4], "little")
                if len(buffer) < length:
                    buffer = bytearray(length)
                    buffer[:4] = view[:4]
                    view = memoryview(buffer)
                if not _recv_exactly(sock, view[4:length]):
                    return
                sock.sendall(view[:length])
        except OSError:
            return
        finally:
            sock.close()

    while True:
        sock, _ = listener.accept()
        threading.Thread(target=serve, args=(sock,), daemon=True).start()


def _recv_exactly(sock: Any, view: memoryview) -> bool:
    """
    Fill C{view} from C{sock}; C{False} if the peer closed first.
    """
    got, want = 0, len(view)
    while got < want:
        n = sock.recv_into(view[got:])
        if not n:
            return False
        got += n
    return True


def raw_caller(port: int, payload: bytes) -> tuple[Callable[[], Any], Callable[[], None]]:
    """
    One connection of the C{raw} system: a call sends the payload and
    receives it back into a buffer allocated once.
    """
    import socket

    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    message = len(payload).to_bytes(4, "little") + payload
    answer = memoryview(bytearray(len(message)))

    def call() -> None:
        sock.sendall(message)
        if not _recv_exactly(sock, answer):
            raise ConnectionError("raw server closed the connection")

    return call, sock.close


def run_raw_client(args: argparse.Namespace) -> None:
    from benchmarks.peers import ready_then_wait, report, sequential, threaded

    payload = b"x" * args.payload
    port = int(args.target)
    if args.mode == "connections":
        call, close = raw_caller(port, payload)
        call()
        ready_then_wait()
        extra = [raw_caller(port, payload) for _ in range(args.connections)]
        ready_then_wait()
        for _, other in extra:
            other()
        close()
        report({"connections": len(extra)})
        return
    width = args.width if args.mode == "concurrent" else 1
    callers = [raw_caller(port, payload) for _ in range(width)]
    calls = [c for c, _ in callers]
    warmup = min(0.5, args.seconds / 4)
    if width > 1:
        threaded(calls, warmup)
        ready_then_wait()
        result = threaded(calls, args.seconds)
        result["style"] = "threads"
    else:
        sequential(calls[0], warmup)
        ready_then_wait()
        result = sequential(calls[0], args.seconds)
        result["style"] = "blocking"
    for _, close in callers:
        close()
    report(result)


def malloc_env(tuned: bool = False) -> dict[str, str]:
    """
    The C allocator's settings for every process of the comparison: by
    default nothing (glibc's own; skynet's servers and clients tune
    themselves, as they do for users; the bare, raw and peer processes do
    not); with C{tuned}, those
    L{skynet.config.tune_malloc} gives (heap reuse for blocks up to 32 MiB)
    for every process, clients and peers included, so that all run alike.
    """
    from skynet.config import MMAP_THRESHOLD, TRIM_THRESHOLD

    if not tuned:
        return {}
    return {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD),
            "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD)}  # fmt: skip


#: Set by L{run} from C{--malloc-defaults}.
_MALLOC: dict[str, str] = {}


def _pythonpath() -> str:
    """
    This tree on the path of every process (after C{$PYTHONPATH}, if set).
    """
    return os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(ROOT)) if p)


def _write(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


# -- the skynet and bare clients (the peers' are in benchmarks.peers)


def run_twisted_client(args: argparse.Namespace) -> None:
    from twisted.internet.defer import ensureDeferred
    from twisted.internet.task import react

    react(lambda reactor: ensureDeferred(_twisted_client(reactor, args)))


async def _twisted_client(reactor: Any, args: argparse.Namespace) -> None:
    from twisted.internet.threads import deferToThread

    from benchmarks.peers import report

    payload = b"x" * args.payload
    if args.kind == "notrace":
        from skynet.observe import tracing

        tracing.configure(0)
    if args.kind in ("skynet", "notrace", "nopoll", "views"):
        busy_poll = 0.0 if args.kind == "nopoll" else None
        call, connect, close = await _skynet_setup(reactor, args.target, payload, busy_poll,
                                                   views=args.kind == "views")  # fmt: skip
    else:
        call, connect, close = await _bare_setup(reactor, int(args.target), payload)
    if args.mode == "connections":
        print("READY", flush=True)  # one connection, one call answered: idle
        await deferToThread(sys.stdin.readline)
        extra = [await connect() for _ in range(args.connections)]
        print("READY", flush=True)
        await deferToThread(sys.stdin.readline)
        for protocol in extra:
            protocol.transport.loseConnection()
        await close()
        report({"connections": len(extra)})
        return
    width = args.width if args.mode == "concurrent" else 1
    await _loop(call, min(0.5, args.seconds / 4), width)
    print("READY", flush=True)
    await deferToThread(sys.stdin.readline)
    result = await _loop(call, args.seconds, width)
    result["style"] = "reactor"
    await close()
    report(result)


async def _loop(call: Any, seconds: float, width: int) -> dict[str, Any]:
    """
    C{width} coroutines on the reactor, each awaiting C{call()} in a loop.
    """
    from twisted.internet.defer import DeferredList, ensureDeferred

    def on_reactor(workers: list[Any]) -> Any:
        return DeferredList([ensureDeferred(w) for w in workers],
                            fireOnOneErrback=True, consumeErrors=True)  # fmt: skip

    return await gathered(call, seconds, width, gather=on_reactor)


async def _skynet_setup(reactor: Any, url: str, payload: bytes, busy_poll: float | None = None,
                        views: bool = False) -> tuple[Any, Any, Any]:  # fmt: skip
    from skynet._wire import LARGE_BINARY
    from skynet.client import Client, tcp_connector
    from skynet.protocol import DEFAULT_MAX_FRAME

    client = Client(registry=url, reactor=reactor, busy_poll=busy_poll)
    adder = client.service("Adder", binary_views=views)
    params = {"a": 1, "b": 2, "data": payload}
    first = await adder.call("Add", params, timeout=60)
    if views and len(payload) >= LARGE_BINARY and type(first.get("data")) is not memoryview:
        raise AssertionError(f"views asked for, {type(first.get('data')).__name__} given")
    if {**first, "data": bytes(first.get("data", b""))} != {"sum": 3, "data": payload}:
        raise AssertionError(f"wrong answer {first!r:.100}")
    instance = next(iter(adder.handles.values())).instance
    connector = tcp_connector(reactor, 30.0, DEFAULT_MAX_FRAME)
    return (lambda: adder.call("Add", params)), (lambda: connector(instance)), client.stop


async def _bare_setup(reactor: Any, port: int, payload: bytes) -> tuple[Any, Any, Any]:
    from twisted.internet.defer import succeed
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

    _, client_protocol = _bare_protocols()

    def connect() -> Any:
        return connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client_protocol())

    client = await connect()
    first = await client.call(1, 2, payload)
    if first["sum"] != 3 or first["data"] != payload:
        raise AssertionError(f"wrong answer {first!r:.100}")

    def close() -> Any:
        client.transport.loseConnection()
        return succeed(None)

    return (lambda: client.call(1, 2, payload)), connect, close


def run_sync_client(args: argparse.Namespace) -> None:
    """
    The client of the C{sync} system: L{skynet.sync.Client}, no reactor in
    this thread.
    """
    from benchmarks.peers import ready_then_wait, report, sequential, threaded
    from skynet.sync import DEFAULT_SPIN, Client, _Connection

    payload = b"x" * args.payload
    client = Client(args.target, spin=0.0 if args.kind == "syncnopoll" else DEFAULT_SPIN)
    adder = client.service("Adder")
    params = {"a": 1, "b": 2, "data": payload}
    first = adder.call("Add", params, timeout=60)
    if first != {"sum": 3, "data": payload}:
        raise AssertionError(f"wrong answer {first!r:.100}")

    def call() -> Any:
        return adder.call("Add", params)

    if args.mode == "connections":
        instance = next(iter(adder.handles.values())).instance
        ready_then_wait()
        extra = [_Connection(instance, 30.0, 2**24) for _ in range(args.connections)]
        ready_then_wait()
        for connection in extra:
            connection.close()
        client.close()
        report({"connections": len(extra)})
        return
    warmup = min(0.5, args.seconds / 4)
    if args.mode == "concurrent":
        calls = [call] * args.width
        threaded(calls, warmup)
        ready_then_wait()
        result = threaded(calls, args.seconds)
        result["style"] = "threads"
    else:
        sequential(call, warmup)
        ready_then_wait()
        result = sequential(call, args.seconds)
        result["style"] = "blocking"
    client.close()
    report(result)


# -- the orchestrator


class Failed(RuntimeError):
    pass


def _die_with_parent() -> list[str]:
    """
    A command prefix that has the kernel kill a server if this process dies.
    """
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "KILL"] if setpriv else []


def ensure_peers(venv: Path, create: bool = True) -> tuple[str | None, str]:
    """
    The Python of the peers' environment, made (and Pyro5, grpcio and
    grpcio-tools installed from PyPI) if missing.

    @return: (its path, "") or (None, why not).
    """
    python = venv / "bin" / "python"
    check = [str(python), "-c", "import Pyro5.api, grpc, grpc_tools.protoc"]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return str(python), ""
    if not create:
        return None, (f"no usable environment at {venv} (make it with "
                      "python -m benchmarks.compare --setup-peers)")  # fmt: skip
    print(f"making the peers' environment in {venv} (pip install {' '.join(PEER_PACKAGES)})",
          flush=True)  # fmt: skip
    steps = [
        [sys.executable, "-m", "venv", str(venv)],
        [str(python), "-m", "pip", "install", "-q", *PEER_PACKAGES],
    ]
    for step in steps:
        try:
            done = subprocess.run(step, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as e:
            return None, f"{' '.join(step[:4])}... failed: {e}"
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["?"]
            return None, f"{' '.join(step[:4])}... failed: {tail[0]}"
    if subprocess.run(check, capture_output=True).returncode != 0:
        return None, f"Pyro5/grpc do not import in {venv}"
    return str(python), ""


class Server:
    """
    One system's server process.
    """

    def __init__(self, system: str, workdir: Path, peers_python: str | None,
                 pyro_threads: int = 300, connections: int = 1000) -> None:  # fmt: skip
        self.system = system
        self.workdir = workdir
        self.peers_python = peers_python
        self.log = open(workdir / f"{system}-server.log", "wb")
        port_file = workdir / f"{system}.port"
        if system in SKYNET_SERVED:
            # A registry of its own: every skynet-served system registers an
            # "Adder", and a shared registry would have each client balance
            # over all their servers.
            self.target = f"file://{workdir}/{system}-registry"
            twistd = str(Path(sys.executable).parent / "twistd")
            command = [twistd, "-n", "--pidfile=", "skynet-service",
                       "--service", f"benchmarks.compare:{'ViewAdder' if system == 'views' else 'Adder'}",
                       "--registry", self.target,
                       "--listen", "tcp:0:interface=127.0.0.1",
                       # The memory figure opens --connections from one address.
                       "--max-connections-per-peer", str(connections + 100)]  # fmt: skip
        elif system == "bare":
            command = [sys.executable, "-m", "benchmarks.compare", "--serve-bare", str(port_file)]
        elif system == "raw":
            command = [sys.executable, "-m", "benchmarks.compare", "--serve-raw", str(port_file)]
        else:
            assert peers_python is not None
            command = [peers_python, "-m", "benchmarks.peers", "serve", system, str(port_file)]
        command = _die_with_parent() + command
        env = dict(os.environ, **_MALLOC, SKYNET_HOME=str(workdir), PYTHONPATH=_pythonpath(),
                   BENCH_PYRO_THREADS=str(pyro_threads))  # fmt: skip
        if system == "notrace":
            env["SKYNET_TRACE"] = "0"
        if system in NO_POLL:
            env["SKYNET_BUSY_POLL"] = "0"
        self.popen = subprocess.Popen(command, cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                                      stdout=self.log, stderr=subprocess.STDOUT)  # fmt: skip
        self.process = psutil.Process(self.popen.pid)
        if system not in SKYNET_SERVED:
            deadline = time.monotonic() + 60
            while not port_file.exists():
                if self.popen.poll() is not None or time.monotonic() > deadline:
                    raise Failed(f"{system} server did not start:\n{self.output()}")
                time.sleep(0.02)
            self.target = port_file.read_text()

    def output(self) -> str:
        return (self.workdir / f"{self.system}-server.log").read_text(errors="replace")[-3000:]

    def cpu(self) -> float:
        times = self.process.cpu_times()
        return times.user + times.system

    def rss(self) -> int:
        return self.process.memory_info().rss

    def client_command(self, mode: str, args: argparse.Namespace, payload: int) -> list[str]:
        common = ["--mode", mode, "--seconds", str(args.seconds), "--payload", str(payload),
                  "--width", str(args.concurrency), "--connections", str(args.connections)]  # fmt: skip
        if self.system in PEERS:
            assert self.peers_python is not None
            return [self.peers_python, "-m", "benchmarks.peers", "client", self.system,
                    self.target, *common]  # fmt: skip
        return [sys.executable, "-m", "benchmarks.compare", "--client", self.system,
                self.target, *common]  # fmt: skip

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        self.log.close()


class Clients:
    """
    Client processes of one measurement, started together.
    """

    def __init__(self, server: Server, commands: list[list[str]]) -> None:
        self.server = server
        env = dict(os.environ, **_MALLOC, PYTHONPATH=_pythonpath(), PYTHONUNBUFFERED="1")
        self.errors = [tempfile.TemporaryFile() for _ in commands]
        self.popens = [
            subprocess.Popen(
                command,
                cwd=ROOT,
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
            )  # fmt: skip
            for command, err in zip(commands, self.errors, strict=True)
        ]

    def expect(self, prefix: str) -> list[str]:
        """
        The next line of each client, which must start with C{prefix}.
        """
        lines = []
        for popen, err in zip(self.popens, self.errors, strict=True):
            line = popen.stdout.readline() if popen.stdout else ""
            if not line.startswith(prefix):
                popen.kill()
                popen.wait()
                err.seek(0)
                raise Failed(f"{self.server.system} client said {line[:200]!r}, not {prefix}:\n"
                             f"{err.read().decode(errors='replace')[-3000:]}")  # fmt: skip
            lines.append(line[len(prefix) :].strip())
        return lines

    def go(self) -> None:
        for popen in self.popens:
            assert popen.stdin is not None
            popen.stdin.write("GO\n")
            popen.stdin.flush()

    def close(self) -> None:
        for popen, err in zip(self.popens, self.errors, strict=True):
            if popen.poll() is None:
                popen.kill()
            popen.wait()
            err.close()


def measure(server: Server, mode: str, args: argparse.Namespace, payload: int) -> dict[str, Any]:
    count = args.processes if mode == "processes" else 1
    client_mode = "concurrent" if mode == "concurrent" else "sequential"
    clients = Clients(server, [server.client_command(client_mode, args, payload)] * count)
    try:
        clients.expect("READY")
        cpu = server.cpu()
        clients.go()
        results = [json.loads(line) for line in clients.expect("RESULT")]
        server_cpu = server.cpu() - cpu
    finally:
        clients.close()
    latencies = [x for r in results for x in r["latencies_us"]]
    calls = sum(r["calls"] for r in results)
    if not calls:
        raise Failed(f"{server.system} made no call in {mode}")
    return {
        "calls": calls,
        "calls_per_s": calls / max(r["seconds"] for r in results),
        "p50_ms": percentile(latencies, 0.5) / 1e3,
        "p99_ms": percentile(latencies, 0.99) / 1e3,
        "client_cpu_us": sum(r["cpu_s"] for r in results) / calls * 1e6,
        "server_cpu_us": server_cpu / calls * 1e6,
        "style": results[0].get("style"),
        "processes": count,
    }


def measure_memory(server: Server, args: argparse.Namespace) -> dict[str, Any]:
    clients = Clients(server, [server.client_command("connections", args, 100)])
    try:
        clients.expect("READY")
        time.sleep(0.3)
        idle = server.rss()
        clients.go()
        clients.expect("READY")
        time.sleep(0.5)
        loaded = server.rss()
        clients.go()
        clients.expect("RESULT")
    finally:
        clients.close()
    return {
        "idle_rss": idle,
        "connections": args.connections,
        "per_connection": (loaded - idle) / args.connections,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    _MALLOC.clear()
    _MALLOC.update(malloc_env(args.malloc_tuned))
    systems = list(args.systems)
    peers_python: str | None = args.peers_python
    skipped: dict[str, str] = {}
    wanted_peers = [s for s in systems if s in PEERS]
    if wanted_peers and peers_python is None:
        peers_python, why = ensure_peers(Path(args.peers_venv), create=not args.no_peer_setup)
        if peers_python is None:
            for system in wanted_peers:
                skipped[system] = why
                print(f"{LABELS[system]}: not measured: {why}", flush=True)
            systems = [s for s in systems if s not in PEERS]
    started = machine()
    workdir = Path(tempfile.mkdtemp(prefix="skynet-compare-"))
    servers: dict[str, Server] = {}
    results: dict[str, Any] = {s: {} for s in systems}
    memory: dict[str, Any] = {}
    try:
        for system in systems:
            # Pyro5's threaded server needs a thread per connection.
            threads = max(args.connections, args.concurrency) + args.processes + 16
            servers[system] = Server(system, workdir, peers_python, threads, args.connections)
        for system in systems:
            memory[system] = measure_memory(servers[system], args)
        for payload in args.payloads:
            for mode in args.modes:
                # On a machine whose speed drifts, systems measured in turn,
                # several times, compare better than one after the other.
                rounds: dict[str, list[dict[str, Any]]] = {s: [] for s in systems}
                for n in range(args.rounds):
                    for system in systems if n % 2 == 0 else systems[::-1]:
                        rounds[system].append(measure(servers[system], mode, args, payload))
                for system in systems:
                    runs = sorted(rounds[system], key=lambda f: f["calls_per_s"])
                    figures = dict(runs[len(runs) // 2],
                                   rounds=[f["calls_per_s"] for f in rounds[system]])  # fmt: skip
                    results[system].setdefault(mode, {})[str(payload)] = figures
                    print(f"  {mode:10} {size_label(payload):>6} {LABELS[system]:7} "
                          f"{figures['calls_per_s']:9.0f} calls/s  p50 {figures['p50_ms']:.3f} ms"
                          f"  p99 {figures['p99_ms']:.3f} ms", flush=True)  # fmt: skip
    finally:
        for server in servers.values():
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        "machine": started,
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "systems": systems,
        "skipped": skipped,
        "results": results,
        "memory": memory,
    }


def machine() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_before": os.getloadavg()[0],
        "platform": platform.platform(),
        "time": time.strftime("%Y-%m-%d %H:%M"),
    }


# -- the tables


def ratio_cell(mine: float, theirs: float, goal: float | None) -> str:
    r = mine / theirs
    if goal is None:
        return f"{r:.2f}"
    return f"{r:.2f} {'ok' if r >= goal else f'<{goal:g}'}"


def tables(report: dict[str, Any]) -> str:
    systems = report["systems"]
    config = report["config"]
    others = [s for s in systems if s not in SKYNET_SERVED]
    sync_column = "sync" in systems and "pyro5" in systems
    trace_column = "skynet" in systems and "notrace" in systems
    poll_columns = [(s, b) for s, b in NO_POLL.items() if s in systems and b in systems]
    lines = []
    m = report["machine"]
    lines.append(
        f"python {m['python']}, {m['cpus']} cores, load {m['load_before']:.2f} -> "
        f"{os.getloadavg()[0]:.2f}, {config['seconds']:g} s per figure, "
        f"concurrent = {config['concurrency']} in flight, processes = "
        f"{config['processes']} sequential clients"
        + (
            f", the median of {config['rounds']} rounds, systems in turn"
            if config.get("rounds", 1) > 1
            else ""
        )  # fmt: skip
    )
    lines.append("every process (clients and peers too) with skynet's malloc settings "
                 "(skynet.config.tune_malloc)" if config.get("malloc_tuned")
                 else "glibc's malloc defaults, but skynet's servers and clients tune theirs "
                      "(skynet.config.tune_malloc)")  # fmt: skip
    for system, why in report["skipped"].items():
        lines.append(f"{LABELS[system]}: not measured: {why}")
    lines.append("")
    lines.append("calls/s (ratios: skynet / other; 'ok' meets issue 7's goal, '<x' misses it)")
    header = f"{'mode':11}{'payload':>8}" + "".join(f"{LABELS[s]:>10}" for s in systems)
    if "skynet" in systems:
        header += "".join(f"{'/' + LABELS[s]:>12}" for s in others)
    if sync_column:
        header += f"{'sync/Pyro5':>12}"
    if trace_column:
        header += f"{'/notrace':>12}"
    header += "".join(f"{LABELS[b] + '/' + LABELS[s]:>18}" for s, b in poll_columns)
    lines.append(header)
    results = report["results"]
    for payload in config["payloads"]:
        for mode in config["modes"]:
            row = f"{mode:11}{size_label(payload):>8}"
            figures = {s: results[s][mode][str(payload)] for s in systems}
            row += "".join(f"{figures[s]['calls_per_s']:10,.0f}" for s in systems)
            if "skynet" in systems:
                mine = figures["skynet"]["calls_per_s"]
                row += "".join(
                    f"{ratio_cell(mine, figures[s]['calls_per_s'], GOALS.get((mode, s))):>12}"
                    for s in others
                )
            if sync_column:
                mine = figures["sync"]["calls_per_s"]
                theirs = figures["pyro5"]["calls_per_s"]
                row += f"{ratio_cell(mine, theirs, SYNC_GOALS.get(mode)):>12}"
            if trace_column:
                mine = figures["skynet"]["calls_per_s"]
                theirs = figures["notrace"]["calls_per_s"]
                row += f"{ratio_cell(mine, theirs, TRACE_GOALS.get(mode)):>12}"
            row += "".join(
                f"{ratio_cell(figures[b]['calls_per_s'], figures[s]['calls_per_s'], None):>18}"
                for s, b in poll_columns
            )
            lines.append(row)
    lines.append("")
    if "raw" in systems:
        lines += _table("calls/s / raw (the machine's own limit for these bytes)", config,
                        systems, results, lambda f, raw: f"{f['calls_per_s'] / raw:.2f}",
                        per_row=lambda row: row["raw"]["calls_per_s"])  # fmt: skip
    lines += _table("latency p50 / p99, ms", config, systems, results,
                    lambda f: f"{_ms(f['p50_ms'])} / {_ms(f['p99_ms'])}")  # fmt: skip
    lines += _table("CPU us per call, client + server", config, systems, results,
                    lambda f: f"{f['client_cpu_us']:.0f} + {f['server_cpu_us']:.0f}")  # fmt: skip
    memory = report["memory"]
    lines.append(f"memory of the server{'':13}" + "".join(f"{LABELS[s]:>10}" for s in systems))
    lines.append(f"{'idle RSS, MiB':33}"
                 + "".join(f"{memory[s]['idle_rss'] / 2**20:10.1f}" for s in systems))  # fmt: skip
    lines.append(f"{'per idle connection, KiB':33}" + "".join(
        f"{memory[s]['per_connection'] / 1024:10.1f}" for s in systems))  # fmt: skip
    return "\n".join(lines)


def _table(
    title: str, config: dict[str, Any], systems: list[str], results: dict[str, Any],
    cell: Callable[..., str], per_row: Callable[[dict[str, Any]], Any] | None = None,
) -> list[str]:  # fmt: skip
    """
    One table of the report: a row per mode and payload, a column per
    system; C{cell(figures)}, or C{cell(figures, per_row(row))} where
    C{row} maps each system to its figures.
    """
    lines = [title, f"{'mode':11}{'payload':>8}" + "".join(f"{LABELS[s]:>18}" for s in systems)]
    for payload in config["payloads"]:
        for mode in config["modes"]:
            row = {s: results[s][mode][str(payload)] for s in systems}
            extra = () if per_row is None else (per_row(row),)
            lines.append(f"{mode:11}{size_label(payload):>8}" + "".join(
                f"{cell(row[s], *extra):>18}" for s in systems))  # fmt: skip
    lines.append("")
    return lines


def _ms(value: float) -> str:
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def parse_lists(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """
    Turn C{args.payloads} (and C{args.modes}, where the script has it) from
    comma-separated text into checked lists, as every benchmark here takes
    them.
    """
    try:
        args.payloads = [int(p) for p in args.payloads.split(",") if p]
    except ValueError:
        parser.error("--payloads: comma-separated byte counts")
    if hasattr(args, "modes"):
        args.modes = [m for m in args.modes.split(",") if m]
        if bad := set(args.modes) - set(MODES):
            parser.error(f"unknown modes {sorted(bad)}; choose from {MODES}")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="RPC comparison: skynet, bare, Pyro5, gRPC.")
    parser.add_argument("--seconds", type=float, default=3.0, help="per figure")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure each figure this many times, the systems in turn "
                             "(forward, then backward), and keep the median")  # fmt: skip
    parser.add_argument("--payloads", default="100,10000,1000000",
                        help="bytes of data each way, comma-separated")  # fmt: skip
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--processes", type=int, default=8)
    parser.add_argument("--connections", type=int, default=1000,
                        help="idle connections opened to measure memory")  # fmt: skip
    parser.add_argument("--peers-venv", default=str(DEFAULT_PEERS_VENV))
    parser.add_argument("--peers-python", help="a Python that has Pyro5 and grpc (no venv made)")
    parser.add_argument("--no-peer-setup", action="store_true",
                        help="leave the peers out if their environment is missing")  # fmt: skip
    parser.add_argument("--setup-peers", action="store_true",
                        help="only make the peers' environment")  # fmt: skip
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    parser.add_argument("--malloc-tuned", action="store_true",
                        help="run every process (clients and peers too) with skynet's "
                             "large-message malloc settings")  # fmt: skip
    parser.add_argument("--serve-bare", metavar="PORTFILE", help=argparse.SUPPRESS)
    parser.add_argument("--serve-raw", metavar="PORTFILE", help=argparse.SUPPRESS)
    parser.add_argument("--client", nargs=2, metavar=("KIND", "TARGET"), help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--payload", type=int, default=100, help=argparse.SUPPRESS)
    parser.add_argument("--width", type=int, default=64, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    parse_lists(parser, args)
    args.systems = [s for s in args.systems.split(",") if s]
    if bad := set(args.systems) - set(SYSTEMS) - set(NO_POLL) - EXTRA - PEERS:
        parser.error(f"unknown systems {sorted(bad)}; "
                     f"choose from {SYSTEMS + list(NO_POLL) + sorted(EXTRA)}")  # fmt: skip
    if (args.seconds <= 0 or args.concurrency < 1 or args.processes < 1 or args.connections < 1
            or args.rounds < 1):  # fmt: skip
        parser.error("--seconds, --concurrency, --processes, --connections, --rounds "
                     "must be positive")  # fmt: skip
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.serve_bare:
        serve_bare(args.serve_bare)
        return
    if args.serve_raw:
        serve_raw(args.serve_raw)
        return
    if args.client:
        args.kind, args.target = args.client
        if args.kind in ("sync", "syncnopoll"):
            run_sync_client(args)
        elif args.kind == "raw":
            run_raw_client(args)
        else:
            run_twisted_client(args)
        return
    if args.setup_peers:
        python, why = ensure_peers(Path(args.peers_venv))
        print(python or f"cannot make the peers' environment: {why}")
        sys.exit(0 if python else 1)
    report = run(args)
    print()
    print(tables(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
