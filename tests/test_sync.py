"""
L{skynet.sync}: the blocking client, against real C{twistd skynet-service}
processes, called from plain threads, after a fork, and beside a running
global reactor (slow); and its wire handling against a scripted server on a
socket (fast).
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bson
import pytest

from skynet import _wire, sync
from skynet.errors import (
    ConnectionFailed,
    NoInstances,
    ProtocolError,
    RemoteCallError,
    RequestTimeout,
    ServiceError,
    ServiceUnregistered,
)
from skynet.protocol import (
    RequestInfo,
    encode_header,
    encode_request_body,
    encode_response_body,
)
from skynet.registry import RegistryError
from skynet.registry.base import Instance
from skynet.registry.memory import MemoryRegistry, named_store
from skynet.sync import Client, ServiceClient, _background
from tests.processes import ROOT, ServiceProcess, child_env

slow = pytest.mark.slow

FIBONACCI = "examples.fibonacci:Fibonacci"


@pytest.fixture
def home() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="skynet-sync-") as directory:
        yield Path(directory)


@pytest.fixture
def registry(home: Path) -> str:
    return f"file://{home}/registry"


@pytest.fixture
def services(home: Path, registry: str) -> Iterator[list[ServiceProcess]]:
    started: list[ServiceProcess] = []

    yield started
    for process in started:
        process.stop()


def start(services: list[ServiceProcess], registry: str, spec: str = FIBONACCI,
          *args: str) -> ServiceProcess:  # fmt: skip
    process = ServiceProcess(spec, registry, *args).start()
    services.append(process)
    return process


def two_instances(services: list[ServiceProcess], registry: str,
                  **options: Any) -> tuple[ServiceProcess, Client, Any]:  # fmt: skip
    """
    Two Fibonacci instances, and a client (with C{options}) that knows both:
    the first instance's process, the client and its Fibonacci service.
    """
    first = start(services, registry)
    start(services, registry)
    client = Client(registry, **options)
    fib = client.service("Fibonacci")
    fib.call("Index", {"index": 1}, timeout=30)
    for _ in range(300):
        if len(fib.handles) == 2:
            break
        threading.Event().wait(0.1)
    assert len(fib.handles) == 2
    return first, client, fib


def fibonacci(n: int) -> int:
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


@slow
def test_call_and_errors(services: list[ServiceProcess], registry: str) -> None:
    start(services, registry)
    with Client(registry) as client:
        fib = client.service("Fibonacci")
        assert fib.call("Index", {"index": 30}, timeout=30) == {"index": 30, "value": 832040}
        with pytest.raises(ServiceError, match="negative index -1"):
            fib.call("Index", {"index": -1})
        with pytest.raises(RemoteCallError, match='No such method "Nope"'):
            fib.call("Nope", {})
        with pytest.raises(TypeError, match="cannot be encoded as BSON"):
            fib.call("Index", {"index": object()})
        with pytest.raises(NoInstances, match="no instance of Nosuch found"):
            client.service("Nosuch").call("Index", {}, timeout=0.5)
        # The connection lives on after errors.
        assert fib.call_once("Index", {"index": 10})["value"] == 55


@slow
def test_threads_share_one_client_and_both_instances(
    services: list[ServiceProcess], registry: str
) -> None:
    _, client, fib = two_instances(services, registry)  # both known before the threads start
    errors: list[BaseException] = []
    results: list[tuple[int, int]] = []
    ports: set[int] = set()

    def worker(offset: int) -> None:
        try:
            for i in range(40):
                n = (offset * 7 + i) % 80
                results.append((n, fib.call("Index", {"index": n})["value"]))
            # This thread's own connections (they close when it ends).
            ports.update(c.instance.port for c in client._local.connections.values())
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    assert len(results) == 8 * 40
    assert all(value == fibonacci(n) for n, value in results)
    # The threads used both instances.
    assert ports == {h.instance.port for h in fib.handles.values()}
    client.close()


@slow
def test_an_instance_killed_mid_run_fails_no_call(
    services: list[ServiceProcess], registry: str
) -> None:
    victim, client, fib = two_instances(services, registry)
    stop = threading.Event()
    errors: list[BaseException] = []
    counts = [0] * 4

    def worker(k: int) -> None:
        while not stop.is_set():
            try:
                assert fib.call("Index", {"index": 20})["value"] == 6765
                counts[k] += 1
            except BaseException as e:  # reported below
                errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    threading.Event().wait(1.0)
    before = sum(counts)
    victim.kill(signal.SIGKILL)
    victim.wait()
    threading.Event().wait(2.0)
    stop.set()
    for t in threads:
        t.join(60)
    assert errors == []
    assert before > 0 and sum(counts) > before
    client.close()


@slow
def test_a_hung_instance_is_overtaken_by_a_retry(
    services: list[ServiceProcess], registry: str
) -> None:
    """
    SIGSTOP one of two instances: a call that went to it gets its answer
    from the other after the retry interval, long before its timeout.
    """
    hung, client, fib = two_instances(services, registry, retry_interval=0.3)
    for _ in range(4):  # both instances in use
        fib.call("Index", {"index": 2})
    hung.kill(signal.SIGSTOP)
    try:
        for _ in range(6):
            assert fib.call("Index", {"index": 12}, timeout=5)["value"] == 144
        hung_handle = next(h for h in fib.handles.values() if h.instance.pid == hung.pid)
        assert hung_handle.evicted_until > 0  # overtaken, out of rotation
    finally:
        hung.kill(signal.SIGCONT)
        client.close()


SCRIPT_PRELUDE = """
import os, sys
from skynet.sync import Client, ServiceClient, _background
registry = sys.argv[1]
"""


def run_script(body: str, registry: str) -> subprocess.CompletedProcess:
    script = SCRIPT_PRELUDE + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", script, registry], cwd=ROOT, env=child_env(),
                          capture_output=True, text=True, timeout=120)  # fmt: skip


@slow
def test_a_process_that_forks_after_import(services: list[ServiceProcess], registry: str) -> None:
    """
    The parent calls (its reactor thread and connections exist), forks;
    the child calls on its own thread and connections, then the parent
    again on its own.
    """
    start(services, registry)
    result = run_script(
        """
        fib = Client(registry).service("Fibonacci")
        print("parent", fib.call("Index", {"index": 10}, timeout=30)["value"], flush=True)

        def fib_of(n):
            a, b = 0, 1
            for _ in range(n):
                a, b = b, a + b
            return a

        def calls(first):
            # Parent and child call at the same time: on a shared socket one
            # would read the other's answers.
            for i in range(300):
                n = first + i % 40
                value = fib.call("Index", {"index": n}, timeout=30)["value"]
                assert value == fib_of(n), (n, value)
            return i + 1

        pid = os.fork()
        if pid == 0:
            try:
                print("child", calls(41), flush=True)
            finally:
                os._exit(0)
        done = calls(0)
        _, status = os.waitpid(pid, 0)
        print("parent", done, os.waitstatus_to_exitcode(status), flush=True)
        """,
        registry,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "parent 55" and sorted(lines[1:]) == ["child 300", "parent 300 0"], lines


@slow
def test_beside_the_global_reactor(services: list[ServiceProcess], registry: str) -> None:
    """
    A Twisted program runs the global reactor in its main thread and calls
    through skynet.sync from a worker thread.
    """
    start(services, registry)
    result = run_script(
        """
        from twisted.internet import reactor
        from twisted.internet.threads import deferToThread

        fib = Client(registry).service("Fibonacci")

        def done(value):
            print("value", value["value"], flush=True)
            reactor.stop()

        def failed(failure):
            print("failed", failure.getErrorMessage(), flush=True)
            reactor.stop()

        reactor.callWhenRunning(lambda: deferToThread(
            fib.call, "Index", {"index": 25}, timeout=30).addCallbacks(done, failed))
        reactor.run()
        """,
        registry,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "value 75025"


def test_a_bad_registry_url_fails_at_once() -> None:
    with pytest.raises(RegistryError, match="unsupported registry URL"):
        Client("gopher://nowhere")


@slow
def test_environment_registry(services: list[ServiceProcess], registry: str) -> None:
    start(services, registry)
    env = child_env(SKYNET_REGISTRY=registry)
    script = SCRIPT_PRELUDE + "print(Client().service('Fibonacci').call('Index', " \
        "{'index': 7}, timeout=30)['value'])"  # fmt: skip
    result = subprocess.run([sys.executable, "-c", script, ""], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert (result.returncode, result.stdout.strip()) == (0, "13"), result.stderr
    assert os.environ.get("SKYNET_REGISTRY") != registry


@slow
def test_the_sync_system_of_the_rpc_comparison(home: Path) -> None:
    """
    C{benchmarks.compare --systems sync}: the blocking client measured in
    every mode (a tiny run: figures are not checked, only that it measured).
    """
    out = home / "report.json"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.compare", "--systems", "sync", "--payloads", "100",
         "--seconds", "0.2", "--processes", "2", "--concurrency", "4", "--connections", "5",
         "--json", str(out)],
        cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=170,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    import json

    report = json.loads(out.read_text())
    assert report["systems"] == ["sync"]
    for mode in ("sequential", "concurrent", "processes"):
        figures = report["results"]["sync"][mode]["100"]
        assert figures["calls"] > 0, (mode, figures)
    assert report["results"]["sync"]["concurrent"]["100"]["style"] == "threads"
    assert report["memory"]["sync"]["connections"] == 5


# The wire, against a scripted server


class ScriptedServer:
    """
    A one-thread BSON-RPC server on 127.0.0.1 that answers as C{script}
    says: C{script(connection, seq, method, params)} writes what it wants.
    """

    def __init__(self, script: Any, registered: bool = True) -> None:
        self.script = script
        self.registered = registered
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.requests: list[tuple[int, str, int]] = []
        self.frames: list[tuple[bytes, bytes]] = []
        self.closed_by_client = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._talk, args=(connection,), daemon=True).start()

    @staticmethod
    def _frame(stream: Any) -> bytes | None:
        head = stream.read(4)
        if len(head) < 4:
            return None
        rest = stream.read(int.from_bytes(head, "little") - 4)
        return head + rest

    def _talk(self, connection: socket.socket) -> None:
        with connection:
            connection.sendall(bson.encode({"name": "Scripted", "registered": self.registered,
                                            "clientid": "c-1"}))  # fmt: skip
            stream = connection.makefile("rb")
            if self._frame(stream) is None:
                return
            while True:
                header, body = self._frame(stream), self._frame(stream)
                if header is None or body is None:
                    self.closed_by_client += 1
                    return
                self.frames.append((header, body))
                seq = bson.decode(header)["seq"]
                request = bson.decode(body)
                info = request["requestinfo"]
                self.requests.append((seq, request["method"], info["retrycount"]))
                if self.script(connection, seq, request["method"], bson.decode(request["in"])):
                    return

    def close(self) -> None:
        self.listener.close()


def answer(connection: socket.socket, seq: int, result: Any = None, error: str = "",
           errstring: str = "") -> None:  # fmt: skip
    out = bson.encode(result) if result is not None else b""
    connection.sendall(encode_header("Scripted.Forward", seq, error)
                       + encode_response_body(out, errstring))  # fmt: skip


_stores = itertools.count()


@pytest.fixture
def scripted() -> Iterator[Any]:
    servers: list[ScriptedServer] = []
    clients: list[Client] = []

    def start(*scripts: Any, registered: bool = True, **options: Any) -> ServiceClient:
        """
        A server per script, all in a registry of their own; a client's
        L{ServiceClient} for them, with C{servers} the servers in order.
        """
        # Unique in the process: id() of a list is reused once it is freed,
        # and a store of that name would still hold an earlier test's instances.
        name = f"sync-wire-{os.getpid()}-{next(_stores)}"
        writer = MemoryRegistry(store=named_store(name), reactor=_background().reactor)
        mine = []
        for script in scripts:
            server = ScriptedServer(script, registered)
            servers.append(server)
            mine.append(server)
            instance = Instance(uuid=f"u-{server.port}", name="Scripted", version="1",
                                region="r", host="127.0.0.1", port=server.port)  # fmt: skip
            _background().run(writer.add, instance)
        client = Client(f"memory://{name}", **options)
        clients.append(client)
        service = client.service("Scripted")
        service.servers = mine  # type: ignore[attr-defined]
        service.writer = writer  # type: ignore[attr-defined]
        return service

    yield start
    for client in clients:
        client.close()
    for server in servers:
        server.close()


def test_answers_to_older_requests_are_skipped(scripted: Any) -> None:
    def script(connection: socket.socket, seq: int, method: str, params: Any) -> bool:
        answer(connection, seq + 1000, {"stale": True})  # an answer for nobody
        answer(connection, seq, {"echo": params["n"]})
        return False

    service = scripted(script)
    assert [service.call("Echo", {"n": n}, timeout=5)["echo"] for n in range(5)] == list(range(5))


def test_calls_write_no_class_state(scripted: Any) -> None:
    """
    As in the Twisted client: a call writes to its objects, never to
    their classes (which would invalidate the interpreter's attribute
    caches for every instance of them).
    """
    from skynet import sync

    def script(connection: socket.socket, seq: int, method: str, params: Any) -> bool:
        answer(connection, seq, {"echo": params["n"]})
        return False

    service = scripted(script)
    service.call("Echo", {"n": 0}, timeout=5)
    classes = {cls for name in dir(sync) for top in [getattr(sync, name)]
               if isinstance(top, type) and top.__module__ == sync.__name__
               for cls in top.__mro__ if cls is not object}  # fmt: skip
    before = {cls: dict(vars(cls)) for cls in classes}
    assert [service.call("Echo", {"n": n}, timeout=5)["echo"] for n in range(1, 6)] == [
        1,
        2,
        3,
        4,
        5,
    ]
    assert {cls: dict(vars(cls)) for cls in classes} == before


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "general"])
def test_payloads_of_every_size_in_any_segmentation(
    scripted: Any, monkeypatch: pytest.MonkeyPatch, fast: bool
) -> None:
    """
    Payloads around the receive buffer's and the gathered send's sizes, up
    to megabytes, come back whole when the answer (after a stale one)
    arrives in uneven pieces; every request is byte for byte what the
    general (pymongo) encoders make.
    """
    monkeypatch.setattr(_wire, "FAST", fast)

    def script(connection: socket.socket, seq: int, method: str, params: Any) -> bool:
        stale = encode_header("Scripted.Forward", seq + 7, "") + encode_response_body(b"", "")
        out = bson.encode({"data": params["data"]})
        data = stale + encode_header("Scripted.Forward", seq, "") + encode_response_body(out, "")
        step = 1 + len(data) // 5
        for at in range(0, len(data), step):
            connection.sendall(data[at : at + step])
        return False

    service = scripted(script)
    sizes = [0, 100, 65_000, 65_536, 70_000, 1_000_000, 3_000_000, 10]
    for size in sizes:
        data = os.urandom(size)
        assert service.call("Echo", {"data": data}, timeout=30) == {"data": data}
    frames = service.servers[0].frames
    assert len(frames) == len(sizes)
    monkeypatch.setattr(_wire, "FAST", False)
    for seq, (header, body) in enumerate(frames):
        request = bson.decode(body)
        info = RequestInfo(request["requestinfo"]["requestid"], 0)
        assert len(info.request_id) == 36
        assert header == encode_header("Scripted.Forward", seq)
        assert body == encode_request_body("c-1", "Echo", info, request["in"])
        assert bson.decode(request["in"])["data"].__len__() == sizes[seq]


def test_errors_are_mapped(scripted: Any) -> None:
    def script(connection: socket.socket, seq: int, method: str, params: Any) -> bool:
        if method == "Fail":
            answer(connection, seq, errstring="it failed")
        elif method == "Refuse":
            answer(connection, seq, error='rpc: can\'t find method "Refuse"')
        else:
            answer(connection, seq, {})
        return False

    service = scripted(script)
    with pytest.raises(ServiceError, match="^it failed$"):
        service.call("Fail", {}, timeout=5)
    with pytest.raises(RemoteCallError, match="can't find method"):
        service.call("Refuse", {}, timeout=5)
    assert service.call("Ok", {}, timeout=5) == {}


def test_a_hung_instance_is_hedged_with_retrycount(scripted: Any) -> None:
    """
    No answer within the retry interval: a second attempt goes to the other
    instance with C{retrycount} 1 and its answer wins; alone, a hung
    instance ends the call with RequestTimeout.
    """

    def hang(*args: Any) -> bool:
        return False

    def echo(connection: socket.socket, seq: int, method: str, params: Any) -> bool:
        answer(connection, seq, {"ok": True})
        return False

    service = scripted(hang, echo, retry_interval=0.2)
    hung, good = service.servers
    for _ in range(200):
        if len(service.handles) == 2:
            break
        threading.Event().wait(0.05)
    for _ in range(4):
        assert service.call("Work", {}, timeout=5) == {"ok": True}
    assert [r[2] for r in hung.requests] == [0], hung.requests  # tried once, then evicted
    assert any(retry == 1 for _, _, retry in good.requests), good.requests
    alone = scripted(hang, retry_interval=0.1)
    with pytest.raises(RequestTimeout, match="no answer after 1 attempt"):
        alone.call("Hang", {}, timeout=0.5)


@pytest.mark.parametrize("spin", [0.0, 2.0], ids=["sleeping", "polling"])
def test_a_connection_closed_mid_call(scripted: Any, spin: float) -> None:
    service = scripted(lambda *args: True, spin=spin)  # closes instead of answering
    with pytest.raises(ConnectionFailed, match="closed by the peer"):
        service.call_once("Anything", {}, timeout=5)
    # With retries, the call keeps trying (the instance is back in rotation
    # after its back-off) until it gives up.
    with pytest.raises(RequestTimeout, match="last error: connection to Scripted lost"):
        service.call("Anything", {}, timeout=1.5)


class Waits:
    """
    How calls waited for their answers: each L{_Connection._spin} (its
    budget and whether bytes came) and each sleeping receive.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.spins: list[tuple[float, bool]] = []
        self.refused = 0  # polls not made: another thread was polling
        self.receives = 0
        spin, receive = sync._Connection._spin, sync._Connection._receive

        def spying_spin(connection: Any, budget: float) -> bool | None:
            came = spin(connection, budget)
            if came is None:
                self.refused += 1
            else:
                self.spins.append((budget, came))
            return came

        def spying_receive(connection: Any) -> bool:
            self.receives += 1
            return receive(connection)

        monkeypatch.setattr(sync._Connection, "_spin", spying_spin)
        monkeypatch.setattr(sync._Connection, "_receive", spying_receive)
        monkeypatch.setattr(sync, "_SPINNERS", 1)  # as on a machine of 2 CPUs

    def clear(self) -> None:
        self.spins.clear()
        self.receives = 0


def wait_for_handles(service: ServiceClient, count: int = 1) -> None:
    for _ in range(200):  # the fast path's first call: an instance in hand
        if len(service.handles) >= count:
            return
        threading.Event().wait(0.05)


def test_a_quick_answer_is_polled_for_a_slow_one_slept_for(
    scripted: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    A call polls for its answer for the client's C{spin} before it sleeps
    on the socket: a quick answer comes while polling (no sleeping
    receive).  A slow one comes after the poll gave up, and then the next
    call on that connection sleeps at once, the next two after the next
    poll in vain, and so on; a poll that catches its answer again ends that.
    """
    delay = {"seconds": 0.0}

    def echo(connection: socket.socket, seq: int, method: str, params: Any) -> bool:
        threading.Event().wait(delay["seconds"])
        answer(connection, seq, {"n": params["n"]})
        return False

    waits = Waits(monkeypatch)
    service = scripted(echo, spin=2.0)
    assert service.call("Echo", {"n": -1}, timeout=10) == {"n": -1}  # connects
    waits.clear()
    for n in range(5):
        assert service.call("Echo", {"n": n}, timeout=10) == {"n": n}
    assert waits.spins == [(2.0, True)] * 5 and waits.receives == 0

    slower = scripted(echo, spin=0.05)
    wait_for_handles(slower)
    delay["seconds"] = 0.2
    waits.clear()
    for n in range(6):  # polls at calls 1, 3 and 6, in vain
        assert slower.call("Echo", {"n": n}, timeout=10) == {"n": n}
    assert waits.spins == [(0.05, False)] * 3 and waits.receives >= 6
    delay["seconds"] = 0.0
    waits.clear()
    for n in range(6):  # four calls sleep, then polls catch again
        assert slower.call("Echo", {"n": n}, timeout=10) == {"n": n}
    assert waits.spins == [(0.05, True)] * 2

    never = scripted(echo, spin=0)
    waits.clear()
    assert never.call("Echo", {"n": 4}, timeout=10) == {"n": 4}
    assert waits.spins == [] and waits.receives >= 1


def test_polling_is_one_thread_at_a_time_on_two_cpus(
    scripted: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    While a thread polls, the others sleep on their sockets (so a service on
    the same host keeps a CPU); every call is answered either way.
    """
    gate = threading.Event()

    def echo(connection: socket.socket, seq: int, method: str, params: Any) -> bool:
        if params["n"] >= 0:
            gate.wait(10)
        answer(connection, seq, {"n": params["n"]})
        return False

    waits = Waits(monkeypatch)  # with _SPINNERS as on 2 CPUs
    service = scripted(echo, spin=2.0)
    results: list[Any] = []

    def caller(n: int) -> None:
        service.call("Echo", {"n": -1 - n}, timeout=10)  # its connection, no waiting
        results.append(service.call("Echo", {"n": n}, timeout=10))

    threads = [threading.Thread(target=caller, args=(n,)) for n in range(3)]
    for thread in threads:
        thread.start()
    for _ in range(500):  # until a gated call polls
        if sync._spinning:
            break
        threading.Event().wait(0.01)
    most = 0
    for _ in range(50):  # while it polls, for 0.25 s of its 2 s
        most = max(most, len(sync._spinning))
        threading.Event().wait(0.005)
    gate.set()
    for thread in threads:
        thread.join(10)
    assert most == 1
    # While one gated call polled, the other two were refused and slept.
    assert waits.refused >= 2, (waits.refused, waits.spins)
    assert sorted(r["n"] for r in results) == [0, 1, 2]
    assert not sync._spinning


def test_spin_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match="spin is 0 or more seconds"):
        Client("memory://never-used", spin=-1)


def test_a_bad_frame_fails_the_connection(scripted: Any) -> None:
    def script(connection: socket.socket, seq: int, method: str, params: Any) -> bool:
        connection.sendall(b"\xff\xff\xff\x7f" + b"x" * 20)
        return False

    service = scripted(script)
    with pytest.raises(ProtocolError, match="bad frame length"):
        service.call_once("Anything", {}, timeout=5)


def test_an_unregistered_instance_is_not_called(scripted: Any) -> None:
    service = scripted(lambda *args: False, registered=False)
    with pytest.raises(ServiceUnregistered):
        service.call_once("Anything", {}, timeout=5)


def test_connections_to_instances_gone_are_closed(scripted: Any) -> None:
    """
    A long-lived thread does not keep a socket to every instance that ever
    left: the next new connection closes those to instances out of rotation.
    """

    def echo(connection: socket.socket, seq: int, method: str, params: Any) -> bool:
        answer(connection, seq, {})
        return False

    service = scripted(echo, echo)
    gone, staying = service.servers
    for _ in range(200):
        if len(service.handles) == 2:
            break
        threading.Event().wait(0.05)
    for _ in range(4):
        service.call("Work", {}, timeout=5)
    assert gone.requests and staying.requests
    [instance] = [h.instance for h in service.handles.values() if h.instance.port == gone.port]
    _background().run(service.writer.remove, instance)
    for _ in range(200):
        if len(service.handles) == 1:
            break
        threading.Event().wait(0.05)
    third = ScriptedServer(echo)
    service.servers.append(third)
    newcomer = Instance(uuid=f"u-{third.port}", name="Scripted", version="1", region="r",
                        host="127.0.0.1", port=third.port)  # fmt: skip
    _background().run(service.writer.add, newcomer)
    for _ in range(200):
        if len(service.handles) == 2:
            break
        threading.Event().wait(0.05)
    for _ in range(4):
        service.call("Work", {}, timeout=5)
    assert third.requests
    for _ in range(100):
        if gone.closed_by_client:
            break
        threading.Event().wait(0.05)
    assert (gone.closed_by_client, staying.closed_by_client) == (1, 0)
    third.close()


def test_calls_after_close_fail_at_once(scripted: Any) -> None:
    def echo(connection: socket.socket, seq: int, method: str, params: Any) -> bool:
        answer(connection, seq, {})
        return False

    service = scripted(echo)
    assert service.call("Work", {}, timeout=5) == {}
    service.client.close()
    with pytest.raises(ConnectionFailed, match="the client is stopped"):
        service.call("Work", {}, timeout=5)
    Client("memory://never-used").close()  # never started: nothing to stop


def readme_block(heading: str) -> str:
    """
    The first python block after C{heading} in README.md.
    """
    text = (ROOT / "README.md").read_text()
    after = text[text.index(heading) :]
    start = after.index("```python\n") + len("```python\n")
    return after[start : after.index("```", start)]


@slow
def test_the_readme_examples_run_as_written(services: list[ServiceProcess], registry: str) -> None:
    """
    The README's skynet.sync and skynet.aio examples, verbatim, against a
    real Fibonacci found through $SKYNET_REGISTRY.
    """
    start(services, registry)
    env = child_env(SKYNET_REGISTRY=registry)
    for heading, expected in [("### From ordinary Python code", "832040"),
                              ("### From asyncio", "[55, 6765, 832040]")]:  # fmt: skip
        result = subprocess.run([sys.executable, "-c", readme_block(heading)], cwd=ROOT,
                                env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
        assert (result.returncode, result.stdout.strip()) == (0, expected), result.stderr
