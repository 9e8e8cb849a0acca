"""
The peers of the RPC comparison (L{benchmarks.compare}): Pyro5 and
gRPC-Python servers and clients, and the client side every driver of the
comparison shares (the measuring loops and the READY/GO/RESULT exchange
with the orchestrator).

This module imports nothing of skynet or Twisted, and Pyro5 and grpc only
inside the functions that use them: it runs in the benchmark's own
environment (C{benchmarks/.venv}, made by C{python -m benchmarks.compare
--setup-peers} with Pyro5, grpcio and grpcio-tools from PyPI), and the
skynet drivers import its loops from the package's environment.

    python -m benchmarks.peers serve KIND PORTFILE [--server-style S]
    python -m benchmarks.peers client KIND PORT --mode sequential|concurrent|connections
        [--seconds S] [--width N] [--payload BYTES] [--connections N] [--style S]

KIND is C{pyro5}, C{grpc} or C{fake} (a stdlib socket server speaking
length-prefixed marshal, for the test suite: it exercises every code path
here without Pyro5 or grpc).  Every server serves C{add(a, b, data)} ->
C{{sum: a + b, data: data}}: the payload goes both ways.

A client sets up (connects, warms up), prints C{READY}, waits for a line on
its standard input, measures for C{--seconds}, and prints C{RESULT} and a
JSON document: calls, elapsed seconds, every latency in microseconds, and
its own CPU seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import marshal
import os
import shutil
import socket
import socketserver
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

#: Whom the Pyro5 server registers the adder as.
PYRO_OBJECT = "bench.adder"

#: gRPC: the service, and its protobuf definition (stubs made at run time).
GRPC_PROTO = """
syntax = "proto3";
package bench;
message AddRequest { int64 a = 1; int64 b = 2; bytes data = 3; }
message AddReply { int64 sum = 1; bytes data = 2; }
service Adder { rpc Add (AddRequest) returns (AddReply); }
"""
GRPC_MAX_MESSAGE = 64 * 1024 * 1024
GRPC_OPTIONS = [
    ("grpc.max_send_message_length", GRPC_MAX_MESSAGE),
    ("grpc.max_receive_message_length", GRPC_MAX_MESSAGE),
]

#: How each kind keeps many calls in flight from one process, by default.
DEFAULT_STYLE = {"pyro5": "threads", "grpc": "asyncio", "fake": "threads"}

#: How each kind's server runs, by default.
DEFAULT_SERVER_STYLE = {"pyro5": "threads", "grpc": "asyncio", "fake": "threads"}

_length = struct.Struct("<I")


# -- measuring (shared by every driver of the comparison)


def size_label(n: int) -> str:
    """
    C{1 MB}, C{10 KB}, C{100 B}: a payload size as the tables print it.
    """
    if n >= 1_000_000:
        return f"{n / 1e6:g} MB"
    if n >= 1000:
        return f"{n / 1e3:g} KB"
    return f"{n} B"


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def sequential(call: Callable[[], Any], seconds: float) -> dict[str, Any]:
    """
    Call, wait, call again, for C{seconds}.
    """
    clock = time.perf_counter
    latencies: list[float] = []
    cpu = time.process_time()
    started = clock()
    end = started + seconds
    now = started
    while now < end:
        call()
        done = clock()
        latencies.append(done - now)
        now = done
    return _result(latencies, clock() - started, time.process_time() - cpu)


def threaded(calls: list[Callable[[], Any]], seconds: float) -> dict[str, Any]:
    """
    One thread per function of C{calls} (each with its own connection),
    each calling in a loop for C{seconds}.
    """
    clock = time.perf_counter
    per_thread: list[list[float]] = [[] for _ in calls]
    errors: list[BaseException] = []
    start = threading.Event()
    end = 0.0

    def worker(call: Callable[[], Any], latencies: list[float]) -> None:
        start.wait()
        try:
            now = clock()
            while now < end:
                call()
                done = clock()
                latencies.append(done - now)
                now = done
        except BaseException as e:  # noqa: B036 - reported below
            errors.append(e)

    threads = [
        threading.Thread(target=worker, args=(c, lat), daemon=True)
        for c, lat in zip(calls, per_thread, strict=True)
    ]
    for t in threads:
        t.start()
    cpu = time.process_time()
    started = clock()
    end = started + seconds
    start.set()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    latencies = [x for lat in per_thread for x in lat]
    return _result(latencies, clock() - started, time.process_time() - cpu)


async def gathered(
    call: Callable[[], Awaitable[Any]],
    seconds: float,
    width: int,
    gather: Callable[[list[Any]], Awaitable[Any]] | None = None,
) -> dict[str, Any]:
    """
    C{width} workers, each awaiting C{call()} in a loop for C{seconds}, run
    together by C{gather} (a list of coroutines -> an awaitable; default
    C{asyncio.gather}; the skynet and bare clients pass Twisted's).
    """
    clock = time.perf_counter
    latencies: list[float] = []
    cpu = time.process_time()
    started = clock()
    end = started + seconds

    async def worker() -> None:
        now = clock()
        while now < end:
            await call()
            done = clock()
            latencies.append(done - now)
            now = done

    workers = [worker() for _ in range(width)]
    await (gather(workers) if gather is not None else asyncio.gather(*workers))
    return _result(latencies, clock() - started, time.process_time() - cpu)


def _result(latencies: list[float], elapsed: float, cpu: float) -> dict[str, Any]:
    return {
        "calls": len(latencies),
        "seconds": elapsed,
        "cpu_s": cpu,
        "latencies_us": [round(x * 1e6, 1) for x in latencies],
    }


def ready_then_wait() -> None:
    """
    Tell the orchestrator this client is set up; wait for its go-ahead.
    """
    print("READY", flush=True)
    sys.stdin.readline()


def report(result: dict[str, Any]) -> None:
    print("RESULT " + json.dumps(result), flush=True)


# -- Pyro5


def _pyro_config() -> Any:
    import Pyro5.api  # noqa: F401 - loads the config
    from Pyro5 import config

    # Its fastest settings: marshal (serpent, the default, base64-encodes
    # bytes), and TCP_NODELAY.
    config.SERIALIZER = "marshal"
    config.SOCK_NODELAY = True
    config.COMMTIMEOUT = 0.0
    config.THREADPOOL_SIZE = int(os.environ.get("BENCH_PYRO_THREADS", "300"))
    return config


def serve_pyro5(port_file: str, style: str) -> None:
    config = _pyro_config()
    config.SERVERTYPE = "multiplex" if style == "multiplex" else "thread"
    import Pyro5.api

    @Pyro5.api.expose
    class Adder:
        def add(self, a: int, b: int, data: bytes) -> dict[str, Any]:
            return {"sum": a + b, "data": data}

    daemon = Pyro5.api.Daemon(host="127.0.0.1", port=0)
    daemon.register(Adder(), PYRO_OBJECT)
    _write_port(port_file, daemon.locationStr.rsplit(":", 1)[1])
    daemon.requestLoop()


def pyro5_caller(port: int, payload: bytes) -> tuple[Callable[[], Any], Callable[[], None]]:
    _pyro_config()
    import Pyro5.api

    proxy = Pyro5.api.Proxy(f"PYRO:{PYRO_OBJECT}@127.0.0.1:{port}")
    proxy._pyroBind()
    owner = [threading.get_ident()]

    def call() -> Any:
        if owner[0] != threading.get_ident():  # a proxy belongs to one thread
            proxy._pyroClaimOwnership()
            owner[0] = threading.get_ident()
        result = proxy.add(1, 2, payload)
        if result["sum"] != 3 or len(result["data"]) != len(payload):
            raise AssertionError(f"wrong answer {result!r:.100}")
        return result

    def close() -> None:
        proxy._pyroClaimOwnership()
        proxy._pyroRelease()

    return call, close


# -- gRPC


def grpc_stubs() -> tuple[Any, Any]:
    """
    The protobuf and gRPC modules of L{GRPC_PROTO}, generated now into a
    temporary directory (no generated code is kept anywhere).
    """
    from grpc_tools import protoc

    directory = tempfile.mkdtemp(prefix="skynet-bench-grpc-")
    try:
        with open(os.path.join(directory, "benchadder.proto"), "w") as f:
            f.write(GRPC_PROTO)
        status = protoc.main(["protoc", f"-I{directory}", f"--python_out={directory}",
                              f"--grpc_python_out={directory}",
                              os.path.join(directory, "benchadder.proto")])  # fmt: skip
        if status != 0:
            raise RuntimeError(f"protoc failed ({status})")
        sys.path.insert(0, directory)
        try:
            import benchadder_pb2
            import benchadder_pb2_grpc
        finally:
            sys.path.remove(directory)
        return benchadder_pb2, benchadder_pb2_grpc
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def serve_grpc(port_file: str, style: str) -> None:
    import grpc

    pb2, pb2_grpc = grpc_stubs()

    class Adder(pb2_grpc.AdderServicer):
        def Add(self, request: Any, context: Any) -> Any:
            return pb2.AddReply(sum=request.a + request.b, data=request.data)

    class AsyncAdder(pb2_grpc.AdderServicer):
        async def Add(self, request: Any, context: Any) -> Any:
            return pb2.AddReply(sum=request.a + request.b, data=request.data)

    if style == "threads":
        from concurrent.futures import ThreadPoolExecutor

        server = grpc.server(ThreadPoolExecutor(max_workers=16), options=GRPC_OPTIONS)
        pb2_grpc.add_AdderServicer_to_server(Adder(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        _write_port(port_file, port)
        server.wait_for_termination()
        return

    async def main() -> None:
        server = grpc.aio.server(options=GRPC_OPTIONS)
        pb2_grpc.add_AdderServicer_to_server(AsyncAdder(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        _write_port(port_file, port)
        await server.wait_for_termination()

    asyncio.run(main())


def _grpc_check(reply: Any, payload: bytes) -> None:
    if reply.sum != 3 or len(reply.data) != len(payload):
        raise AssertionError(f"wrong answer {reply!r:.100}")


def grpc_caller(port: int, payload: bytes) -> tuple[Callable[[], Any], Callable[[], None]]:
    import grpc

    pb2, pb2_grpc = grpc_stubs()
    options = GRPC_OPTIONS + [("grpc.use_local_subchannel_pool", 1)]
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=options)
    grpc.channel_ready_future(channel).result(timeout=30)
    stub = pb2_grpc.AdderStub(channel)
    request = pb2.AddRequest(a=1, b=2, data=payload)

    def call() -> Any:
        reply = stub.Add(request)
        _grpc_check(reply, payload)
        return reply

    return call, channel.close


async def grpc_async_caller(
    port: int, payload: bytes
) -> tuple[Callable[[], Awaitable[Any]], Callable[[], Awaitable[None]]]:
    import grpc

    pb2, pb2_grpc = grpc_stubs()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=GRPC_OPTIONS)
    await channel.channel_ready()
    stub = pb2_grpc.AdderStub(channel)
    request = pb2.AddRequest(a=1, b=2, data=payload)

    async def call() -> Any:
        reply = await stub.Add(request)
        _grpc_check(reply, payload)
        return reply

    return call, channel.close


# -- fake: the code paths above, on the standard library only (for the tests)


class _FakeHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while True:
            request = _recv_message(sock)
            if request is None:
                return
            a, b, data = request
            sock.sendall(_frame(marshal.dumps({"sum": a + b, "data": data})))


class _FakeServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


def serve_fake(port_file: str, style: str) -> None:
    server = _FakeServer(("127.0.0.1", 0), _FakeHandler)
    _write_port(port_file, server.server_address[1])
    server.serve_forever()


def _frame(body: bytes) -> bytes:
    return _length.pack(len(body)) + body


def _recv_exactly(sock: socket.socket, n: int) -> bytes | None:
    chunks = []
    while n:
        chunk = sock.recv(min(n, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _recv_message(sock: socket.socket) -> Any:
    head = _recv_exactly(sock, 4)
    if head is None:
        return None
    body = _recv_exactly(sock, _length.unpack(head)[0])
    return None if body is None else marshal.loads(body)


def fake_caller(port: int, payload: bytes) -> tuple[Callable[[], Any], Callable[[], None]]:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    request = _frame(marshal.dumps((1, 2, payload)))

    def call() -> Any:
        sock.sendall(request)
        result = _recv_message(sock)
        if result["sum"] != 3 or len(result["data"]) != len(payload):
            raise AssertionError("wrong answer")
        return result

    return call, sock.close


async def fake_async_caller(
    port: int, payload: bytes
) -> tuple[Callable[[], Awaitable[Any]], Callable[[], Awaitable[None]]]:
    """
    One connection per call in flight, from a pool (the fake server answers
    in order, one request at a time per connection).
    """
    request = _frame(marshal.dumps((1, 2, payload)))
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    opened: list[asyncio.StreamWriter] = []

    async def call() -> Any:
        if idle:
            reader, writer = idle.pop()
        else:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            opened.append(writer)
        writer.write(request)
        head = await reader.readexactly(4)
        result = marshal.loads(await reader.readexactly(_length.unpack(head)[0]))
        idle.append((reader, writer))
        if result["sum"] != 3 or len(result["data"]) != len(payload):
            raise AssertionError("wrong answer")
        return result

    async def close() -> None:
        for writer in opened:
            writer.close()

    return call, close


SERVERS = {"pyro5": serve_pyro5, "grpc": serve_grpc, "fake": serve_fake}
CALLERS = {"pyro5": pyro5_caller, "grpc": grpc_caller, "fake": fake_caller}
ASYNC_CALLERS = {"grpc": grpc_async_caller, "fake": fake_async_caller}


def _write_port(port_file: str, port: Any) -> None:
    temporary = port_file + ".tmp"
    with open(temporary, "w") as f:
        f.write(str(port))
    os.replace(temporary, port_file)


# -- the client process


def run_client(args: argparse.Namespace) -> None:
    payload = b"x" * args.payload
    caller = CALLERS[args.kind]
    if args.mode == "connections":
        # Idle: one connection, one call answered.  Then the extra ones.
        call, close = caller(args.port, payload)
        call()
        ready_then_wait()
        closers = [caller(args.port, payload)[1] for _ in range(args.connections)]
        ready_then_wait()
        for extra in closers:
            extra()
        close()
        report({"connections": len(closers)})
        return
    warmup = min(0.5, args.seconds / 4)
    if args.mode == "sequential":
        style = "asyncio" if args.style == "asyncio" else "blocking"
    else:
        style = args.style or DEFAULT_STYLE[args.kind]
    if style == "blocking":
        call, close = caller(args.port, payload)
        sequential(call, warmup)
        ready_then_wait()
        result = sequential(call, args.seconds)
        close()
    elif style == "threads":
        pairs = [caller(args.port, payload) for _ in range(args.width)]
        threaded([c for c, _ in pairs], warmup)
        ready_then_wait()
        result = threaded([c for c, _ in pairs], args.seconds)
        for _, close in pairs:
            close()
    else:
        result = asyncio.run(_async_client(args, payload))
    result["style"] = style
    report(result)


async def _async_client(args: argparse.Namespace, payload: bytes) -> dict[str, Any]:
    call, close = await ASYNC_CALLERS[args.kind](args.port, payload)
    width = args.width if args.mode == "concurrent" else 1
    await gathered(call, min(0.5, args.seconds / 4), width)
    await asyncio.get_running_loop().run_in_executor(None, ready_then_wait)
    result = await gathered(call, args.seconds, width)
    await close()
    return result


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Peers of the RPC comparison.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve")
    serve.add_argument("kind", choices=sorted(SERVERS))
    serve.add_argument("port_file")
    serve.add_argument("--server-style", choices=["threads", "asyncio", "multiplex"])
    client = commands.add_parser("client")
    client.add_argument("kind", choices=sorted(CALLERS))
    client.add_argument("port", type=int)
    client.add_argument("--mode", choices=["sequential", "concurrent", "connections"],
                        default="sequential")  # fmt: skip
    client.add_argument("--seconds", type=float, default=5.0)
    client.add_argument("--width", type=int, default=64)
    client.add_argument("--payload", type=int, default=100)
    client.add_argument("--connections", type=int, default=100)
    client.add_argument("--style", choices=["threads", "asyncio"],
                        help="concurrent: threads or asyncio; sequential: asyncio, else blocking")  # fmt: skip
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = parse()
    if arguments.command == "serve":
        style = arguments.server_style or DEFAULT_SERVER_STYLE[arguments.kind]
        SERVERS[arguments.kind](arguments.port_file, style)
    else:
        run_client(arguments)
