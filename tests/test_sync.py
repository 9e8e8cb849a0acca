"""
L{skynet.sync}: the blocking client, against real C{twistd skynet-service}
processes, called from plain threads, after a fork, and beside a running
global reactor.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from skynet.errors import NoInstances, RemoteCallError, ServiceError
from skynet.registry import RegistryError
from skynet.sync import Client
from tests.processes import ROOT, ServiceProcess, child_env

pytestmark = pytest.mark.slow

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


def fibonacci(n: int) -> int:
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


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


def test_threads_share_one_client_and_both_instances(
    services: list[ServiceProcess], registry: str
) -> None:
    start(services, registry)
    start(services, registry)
    client = Client(registry)
    fib = client.service("Fibonacci")
    fib.call("Index", {"index": 1}, timeout=30)
    # Both instances known before the threads start.
    for _ in range(300):
        if len(fib.handles) == 2:
            break
        threading.Event().wait(0.1)
    assert len(fib.handles) == 2
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


def test_an_instance_killed_mid_run_fails_no_call(
    services: list[ServiceProcess], registry: str
) -> None:
    victim = start(services, registry)
    start(services, registry)
    client = Client(registry)
    fib = client.service("Fibonacci")
    fib.call("Index", {"index": 1}, timeout=30)
    for _ in range(300):
        if len(fib.handles) == 2:
            break
        threading.Event().wait(0.1)
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


def test_a_hung_instance_is_overtaken_by_a_retry(
    services: list[ServiceProcess], registry: str
) -> None:
    """
    SIGSTOP one of two instances: a call that went to it gets its answer
    from the other after the retry interval, long before its timeout.
    """
    hung = start(services, registry)
    start(services, registry)
    client = Client(registry, retry_interval=0.3)
    fib = client.service("Fibonacci")
    fib.call("Index", {"index": 1}, timeout=30)
    for _ in range(300):
        if len(fib.handles) == 2:
            break
        threading.Event().wait(0.1)
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
from skynet.sync import Client
registry = sys.argv[1]
"""


def run_script(body: str, registry: str) -> subprocess.CompletedProcess:
    script = SCRIPT_PRELUDE + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", script, registry], cwd=ROOT, env=child_env(),
                          capture_output=True, text=True, timeout=120)  # fmt: skip


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


def test_environment_registry(services: list[ServiceProcess], registry: str) -> None:
    start(services, registry)
    env = child_env(SKYNET_REGISTRY=registry)
    script = SCRIPT_PRELUDE + "print(Client().service('Fibonacci').call('Index', " \
        "{'index': 7}, timeout=30)['value'])"  # fmt: skip
    result = subprocess.run([sys.executable, "-c", script, ""], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert (result.returncode, result.stdout.strip()) == (0, "13"), result.stderr
    assert os.environ.get("SKYNET_REGISTRY") != registry
