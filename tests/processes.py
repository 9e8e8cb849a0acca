"""
Real service processes for integration tests: C{twistd -n skynet-service}
started the way an operator starts them.
"""

from __future__ import annotations

import inspect
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import SkipTest

from examples.loopback_hosts import terminate as terminate  # (SIGTERM, then SIGKILL)

ROOT = Path(__file__).resolve().parent.parent


def missing_here(reason: str) -> NoReturn:
    """
    What a test does when something it needs is missing on this machine:
    skip, saying C{reason}; under CI (C{$CI} set, where .ci/run installs
    everything and runs as root) fail instead, so that a missing dependency
    never hides a test there.
    """
    if os.environ.get("CI"):
        raise AssertionError(f"CI must run this test: {reason}")
    raise SkipTest(reason)


def twistd() -> str:
    """
    The C{twistd} of the Python running the tests.
    """
    path = Path(sys.executable).parent / "twistd"
    if not path.exists():
        raise RuntimeError(f"twistd not found beside {sys.executable}; install the package")
    return str(path)


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(extra)
    return env


class ServiceProcess:
    """
    One C{twistd -n skynet-service} child, its output in a log file.
    """

    def __init__(self, service: str, registry: str, *args: str, log_dir: str | None = None,
                 env: dict[str, str] | None = None) -> None:  # fmt: skip
        self.service = service
        self.registry = registry
        self.args = list(args)
        self.log_dir = log_dir or tempfile.mkdtemp(prefix="skynet-proc-")
        self.log_path = Path(self.log_dir) / f"{service.replace(':', '.')}-{id(self)}.log"
        self.env = env or {}
        self.popen: subprocess.Popen | None = None
        self.stdin: Any = subprocess.DEVNULL

    def start(self) -> "ServiceProcess":
        command = [
            twistd(), "-n", "--pidfile=", "skynet-service",
            "--service", self.service,
            "--registry", self.registry,
            "--listen", "tcp:0:interface=127.0.0.1",
            "--stats-interval", "0.5",
        ] + self.args  # fmt: skip
        self.log = open(self.log_path, "wb")
        self.popen = subprocess.Popen(
            command, cwd=ROOT, env=child_env(**self.env), stdin=self.stdin, stdout=self.log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(sig)

    def wait(self, timeout: float = 15.0) -> int:
        assert self.popen is not None
        return self.popen.wait(timeout)

    def stop(self) -> None:
        """
        Make sure the process is gone (SIGTERM, then SIGKILL).
        """
        if self.popen is None:
            return
        terminate(self.popen, grace=10)
        self.log.close()


async def wait_for(predicate: Callable[[], Any], timeout: float = 15.0, interval: float = 0.05,
                   what: str = "condition") -> Any:  # fmt: skip
    """
    Poll C{predicate} (which may return a Deferred) until it is truthy.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await deferLater(reactor, interval, lambda: None)


async def served_calls(registry: Any, instances: Any, method: str, timeout: float = 60) -> int:
    """
    How many calls of C{method} the C{instances} served, from the per-method
    statistics they publish in C{registry}, once that count has settled
    (the same over eight readings 0.25 s apart, so published every 0.5 s or
    faster it is final).
    """
    readings: list[int] = []

    async def settled() -> int | None:
        total = 0
        for instance in instances:
            node = await registry.get_stats(instance) or {}
            total += (node.get("Methods", {}).get(method) or {}).get("Requests", 0)
        readings.append(total)
        return total if len(readings) > 8 and len(set(readings[-8:])) == 1 else None

    return await wait_for(settled, timeout=timeout, interval=0.25,  # type: ignore[no-any-return]
                          what=f"statistics of {method} settled")  # fmt: skip


async def sleep(seconds: float) -> None:
    await deferLater(reactor, seconds, lambda: None)


def fibonacci_load(
    fibonacci: Any, seconds: float, callers: int = 16, indexes: int = 90
) -> tuple[Any, dict[str, Any]]:
    """
    C{callers} loops calling C{Fibonacci.Index} on C{fibonacci} (a service
    client) for C{seconds}, each failure kept with its repr.

    @return: a Deferred firing when all are done, and the results so far
        (C{{"ok": count, "failed": [repr, ...]}}).
    """
    from twisted.internet.defer import DeferredList, ensureDeferred

    results: dict[str, Any] = {"ok": 0, "failed": []}
    stop_at = time.monotonic() + seconds

    async def caller(n: int) -> None:
        i = n
        while time.monotonic() < stop_at:
            i = (i + 7) % indexes
            try:
                r = await fibonacci.call("Index", {"index": i})
                assert r["index"] == i, r
                results["ok"] += 1
            except Exception as e:
                results["failed"].append(repr(e))

    return DeferredList([ensureDeferred(caller(n)) for n in range(callers)]), results
