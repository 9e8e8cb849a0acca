"""
Where the time of one sequential call goes: the same 100-byte call made by
ever thinner blocking clients, against a skynet service and against the
bare Twisted server, so that each layer's cost is the difference between
two rows of one run.

    python -m benchmarks.floors [--calls 4000] [--rounds 6] [--payload 100]

The rows (every client is a blocking socket in this process's thread):
  - C{blocking -> bare}: a minimal client (one C{sendall} of a BSON
    document, C{recv_into} a buffer, sleeping until the answer comes)
    against L{benchmarks.compare}'s bare Twisted server: the floor of any
    Twisted service;
  - C{polling -> bare}: the same client polling for the answer instead
    (C{MSG_DONTWAIT}), as L{skynet.sync} does: the difference is the cost
    of one wake-up;
  - C{connection -> skynet}: L{skynet.sync}'s connection alone (frames,
    codec, no discovery, no balancing; polling as the client does) against
    C{twistd skynet-service} (which polls between quick requests:
    L{skynet.busypoll});
  - C{sync -> skynet}: L{skynet.sync.Client} as users call it.

Each row runs C{--rounds} times, alternating with the others so that load
elsewhere falls on all alike, and the best round is printed: calls/s and
the calling thread's CPU per call.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import struct
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bson

from benchmarks.compare import Server


def _bare_caller(port: int, payload: bytes,
                 poll: bool) -> tuple[Callable[[], Any], Callable[[], None]]:  # fmt: skip
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray(1 << 16)
    view = memoryview(buf)
    unpack = struct.Struct("<i").unpack_from
    request = bson.encode({"a": 1, "b": 2, "data": payload, "seq": 1})
    flags = socket.MSG_DONTWAIT if poll else 0

    def call() -> Any:
        sock.sendall(request)
        n = 0
        while n < 4 or n < unpack(buf)[0]:
            try:  # polling, as skynet.sync does, or sleeping until bytes come
                got = sock.recv_into(view[n:], 0, flags)
            except BlockingIOError:
                continue
            if not got:
                raise ConnectionError("the bare server closed the connection")
            n += got
        return bson.decode(bytes(view[:n]))

    return call, sock.close


def run(args: argparse.Namespace) -> dict[str, tuple[float, float]]:
    from skynet.protocol import RequestInfo
    from skynet.sync import Client

    workdir = Path(tempfile.mkdtemp(prefix="skynet-floors-"))
    servers = {s: Server(s, workdir, None, connections=10) for s in ("bare", "skynet")}
    payload = b"x" * args.payload
    params = {"a": 1, "b": 2, "data": payload}
    client = Client(servers["skynet"].target)
    try:
        bare, close_bare = _bare_caller(int(servers["bare"].target), payload, poll=False)
        polling, close_polling = _bare_caller(int(servers["bare"].target), payload, poll=True)
        if bare()["sum"] != 3 or polling()["sum"] != 3:
            raise AssertionError("the bare server answered wrongly")
        adder = client.service("Adder")
        if adder.call("Add", params, timeout=60) != {"sum": 3, "data": payload}:
            raise AssertionError("the skynet service answered wrongly")
        connection = client._connection(next(iter(adder.handles.values())).instance)
        encoded = bson.encode(params)
        info = RequestInfo("floors")

        def direct() -> Any:
            seq = connection.send("Add", encoded, info)
            done, result = connection.response(seq, time.monotonic() + 10, spin=client.spin)
            if not done:
                raise TimeoutError("no answer in 10 s")
            return result

        rows: dict[str, Callable[[], Any]] = {
            "blocking -> bare": bare,
            "polling -> bare": polling,
            "connection -> skynet": direct,
            "sync -> skynet": lambda: adder.call("Add", params),
        }
        best: dict[str, tuple[float, float]] = {}
        for _ in range(args.rounds):
            for name, call in rows.items():
                cpu, wall = time.thread_time(), time.perf_counter()
                for _ in range(args.calls):
                    call()
                wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
                figure = (args.calls / wall, cpu / args.calls * 1e6)
                if figure[0] > best.get(name, (0.0, 0.0))[0]:
                    best[name] = figure
        close_bare()
        close_polling()
        return best
    finally:
        client.close()
        for server in servers.values():
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="The layers of one sequential call.")
    parser.add_argument("--calls", type=int, default=4000, help="per round and row")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--payload", type=int, default=100)
    args = parser.parse_args(argv)
    if args.calls < 1 or args.rounds < 1 or not 0 <= args.payload <= 60_000:
        parser.error("--calls and --rounds must be positive, --payload 0 to 60000")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    best = run(args)
    print(f"sequential {args.payload} B calls, best of {args.rounds} rounds of {args.calls}")
    print(f"{'client -> server':24}{'calls/s':>10}{'client CPU us':>16}")
    for name, (rate, cpu) in best.items():
        print(f"{name:24}{rate:10,.0f}{cpu:16.1f}")


if __name__ == "__main__":
    main()
