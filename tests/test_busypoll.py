"""
L{skynet.busypoll}: a private (never installed) epoll reactor driven one
iteration at a time over a socket pair (fast), and C{twistd skynet-service}
publishing its polling in its statistics (slow).
"""

from __future__ import annotations

import math
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet.abstract import FileDescriptor
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.task import Clock

from skynet import busypoll
from skynet.client import Client
from skynet.sync import _background
from tests.processes import ROOT, ServiceProcess, child_env, twistd


class Reader(FileDescriptor):
    """
    One end of a socket pair, read by the reactor; C{then} runs after each
    read.
    """

    def __init__(self, reactor: Any, sock: socket.socket) -> None:
        super().__init__(reactor)
        self.sock = sock
        self.sock.setblocking(False)
        self.received = b""
        self.lost: list[Any] = []
        self.then: Any = None

    def fileno(self) -> int:
        return self.sock.fileno()

    def doRead(self) -> None:
        self.received += self.sock.recv(4096)
        if self.then is not None:
            self.then()

    def connectionLost(self, reason: Any) -> None:
        self.lost.append(reason)
        self.reactor.removeReader(self)


@pytest.fixture
def reactor() -> Iterator[EPollReactor]:
    reactor = EPollReactor()
    yield reactor
    for selectable in list(reactor.getReaders()):
        reactor.removeReader(selectable)
    reactor._poller.close()


@pytest.fixture
def pair(reactor: EPollReactor) -> Iterator[tuple[Reader, socket.socket]]:
    ours, theirs = socket.socketpair()
    reader = Reader(reactor, ours)
    reactor.addReader(reader)
    yield reader, theirs
    reactor.removeReader(reader)
    theirs.close()
    ours.close()


def later(seconds: float, f: Any, *args: Any) -> threading.Thread:
    thread = threading.Timer(seconds, f, args)
    thread.start()
    return thread


def test_only_an_epoll_reactor_polls(reactor: EPollReactor) -> None:
    clock = Clock()
    assert busypoll.install(clock) is None and busypoll.installed(clock) is None
    assert busypoll.install_default(clock) is None
    busy = busypoll.install(reactor, 0.001)
    assert busy is not None and busypoll.installed(reactor) is busy
    assert reactor.doIteration == busy.do_iteration
    assert busypoll.install(reactor, 0.002) is busy and busy.budget == 0.002
    assert busypoll.install_default(reactor) is busy and busy.budget == 0.002  # set already
    assert busypoll.install(reactor, 0) is None and busypoll.installed(reactor) is None
    assert reactor.doIteration == EPollReactor.doIteration.__get__(reactor)
    assert busypoll.install_default(reactor) is None  # turned off stays off
    fresh = busypoll.install_default(EPollReactor())
    assert fresh is not None and fresh.budget == busypoll.DEFAULT_BUDGET
    fresh.reactor._poller.close()
    for bad in (-1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="0 or more seconds"):
            busypoll.install(reactor, bad)


def test_a_poll_in_vain_is_followed_by_sleeps(
    reactor: EPollReactor, pair: tuple[Reader, socket.socket]
) -> None:
    """
    Each wait polls for the budget while polls catch events; one that runs
    out (here: at a timer's timeout, far below the budget) makes the next
    wait a plain sleep, after which polling resumes and a catch clears the
    back-off.
    """
    reader, theirs = pair
    busy = busypoll.install(reactor, 5.0)
    assert busy is not None
    theirs.sendall(b"a")
    busy.do_iteration(1.0)  # polls, and the event is there
    assert (reader.received, busy.polls, busy.caught) == (b"a", 1, 1)

    later(0.05, theirs.sendall, b"b")
    busy.do_iteration(10.0)  # polls, and catches "b" on its way
    assert (reader.received, busy.polls, busy.caught) == (b"ab", 2, 2)

    started = time.monotonic()
    busy.do_iteration(0.05)  # polls, but only until the timer's timeout
    assert time.monotonic() - started < 2.5  # far below the 5 s budget
    assert (reader.received, busy.polls, busy.caught) == (b"ab", 3, 2)

    later(0.05, theirs.sendall, b"c")
    busy.do_iteration(10.0)  # after a poll in vain: a plain sleep
    assert (reader.received, busy.polls, busy.caught) == (b"abc", 3, 2)

    busy.do_iteration(0)  # callLater(0) work: one look, neither a poll nor a sleep
    later(0.05, theirs.sendall, b"d")
    busy.do_iteration(10.0)  # polling again, and it catches
    assert (reader.received, busy.polls, busy.caught) == (b"abcd", 4, 3)


def test_an_idle_reactor_backs_off_to_one_poll_in_65_waits(reactor: EPollReactor) -> None:
    """
    Waits that end with no event at all (an idle process's timers): polls
    at waits 1, 3, 6, 11, 20, 37, 70, then one every 65 (64 sleeps between).
    """
    busy = busypoll.install(reactor, 0.0002)
    assert busy is not None
    polled = []
    for wait in range(1, 271):
        before = busy.polls
        busy.do_iteration(0.0005)
        if busy.polls > before:
            polled.append(wait)
    assert polled == [1, 3, 6, 11, 20, 37, 70, 135, 200, 265]
    assert busy.caught == 0


def test_dispatch_skips_the_removed_and_survives_a_failing_reader(
    reactor: EPollReactor, pair: tuple[Reader, socket.socket]
) -> None:
    """
    Two readers ready at once, the first removing the second: only the first
    reads.  A reader whose C{doRead} raises loses its connection (Twisted's
    usual handling); the loop goes on.
    """
    first, first_peer = pair
    ours, theirs = socket.socketpair()
    second = Reader(reactor, ours)
    reactor.addReader(second)
    busy = busypoll.install(reactor, 0.01)
    assert busy is not None
    readers = {first.fileno(): first, second.fileno(): second}
    first_fd, second_fd = sorted(readers)

    def remove_the_other() -> None:
        reactor.removeReader(readers[second_fd])

    readers[first_fd].then = remove_the_other
    first_peer.sendall(b"x")
    theirs.sendall(b"y")
    time.sleep(0.05)
    busy.do_iteration(1.0)
    assert (readers[first_fd].received, readers[second_fd].received) in {(b"x", b""), (b"y", b"")}

    def fail() -> None:
        raise RuntimeError("a broken reader")

    readers[first_fd].then = fail
    (first_peer if readers[first_fd] is first else theirs).sendall(b"z")
    busy.do_iteration(1.0)
    assert len(readers[first_fd].lost) == 1
    reactor.removeReader(second)
    theirs.close()
    ours.close()


def test_a_client_turns_it_on_unless_told_otherwise(reactor: EPollReactor) -> None:
    registry = "memory://busypoll-client"
    client = Client(registry, reactor=reactor)
    client._start()
    busy = busypoll.installed(reactor)
    assert busy is not None and busy.budget == busypoll.DEFAULT_BUDGET
    other = EPollReactor()
    Client(registry, reactor=other, busy_poll=0)._start()
    assert busypoll.installed(other) is None
    other._poller.close()
    with pytest.raises(ValueError, match="busy_poll is 0 or more seconds"):
        Client(registry, reactor=reactor, busy_poll=-1)


# A real service


def _statistics(registry: Any, name: str) -> dict[str, Any] | None:
    from skynet.registry import Query

    instances = _background().run(registry.query, Query(service=name))
    if not instances:
        return None
    stats = _background().run(registry.get_stats, instances[0])
    return stats if isinstance(stats, dict) else None


def _wait_statistics(registry: Any, name: str, ready: Any) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        stats = _statistics(registry, name)
        if stats is not None and ready(stats):
            return stats
        time.sleep(0.1)
    raise AssertionError(f"no statistics of {name} as expected: {stats}")


@pytest.mark.slow
@pytest.mark.parametrize("budget", ["50000", "0"])
def test_a_service_publishes_its_polling(budget: str) -> None:
    """
    C{twistd skynet-service --busy-poll 50000} (50 ms: every gap between a
    sequential client's calls is shorter) polls between calls and says so
    in its statistics; C{--busy-poll 0} does not poll and has no such key.
    """
    from skynet.registry.files import FileRegistry
    from skynet.sync import Client as SyncClient

    root = tempfile.mkdtemp(prefix="skynet-busypoll-")
    process = ServiceProcess("examples.fibonacci:Fibonacci", f"file://{root}",
                             "--busy-poll", budget, "--stats-interval", "0.2").start()  # fmt: skip
    registry = FileRegistry(root, reactor=_background().reactor)
    _background().run(registry.start)
    client = SyncClient(f"file://{root}")
    try:
        fib = client.service("Fibonacci")
        for n in range(50):
            assert fib.call("Index", {"index": n % 20}, timeout=30)["index"] == n % 20
        if budget == "0":
            stats = _wait_statistics(
                registry, "Fibonacci", lambda s: s.get("RequestsServed", 0) >= 50
            )
            assert "BusyPoll" not in stats
        else:
            stats = _wait_statistics(
                registry, "Fibonacci", lambda s: s.get("RequestsServed", 0) >= 50
            )
            polling = stats["BusyPoll"]
            assert polling["Budget"] == 0.05
            assert 0 < polling["Caught"] <= polling["Polls"]
    finally:
        client.close()
        _background().run(registry.stop)
        process.stop()


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--busy-poll", "-5"], {}, "--busy-poll must not be negative"),
        (["--busy-poll", "soon"], {}, "--busy-poll must be a number"),
        ([], {"SKYNET_BUSY_POLL": "lots"}, "$SKYNET_BUSY_POLL: --busy-poll must be a number"),
    ],
)
def test_a_bad_budget_is_refused(args: list[str], env: dict[str, str], message: str) -> None:
    root = tempfile.mkdtemp(prefix="skynet-busypoll-")
    result = subprocess.run(
        [
            twistd(),
            "-n",
            "--pidfile=",
            "skynet-service",
            "--service",
            "examples.fibonacci:Fibonacci",
            "--registry",
            f"file://{root}",
            *args,
        ],  # fmt: skip
        cwd=ROOT,
        env=child_env(**env),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert message in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
