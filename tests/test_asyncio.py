"""
asyncio: a service under Twisted's asyncio reactor (C{twistd
--reactor=asyncio skynet-service}), and an C{asyncio.run} program awaiting
calls to it through L{skynet.aio}.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.processes import ROOT, child_env, terminate, twistd

pytestmark = pytest.mark.slow

CLIENT = """
import asyncio, sys
from skynet.aio import Client
from skynet.errors import NoInstances, ServiceError

async def main(registry):
    loop = asyncio.get_running_loop()
    async with Client(registry) as client:
        fib = client.service("Fibonacci")
        first = await fib.call("Index", {"index": 30}, timeout=30)
        print("first", first["value"])
        # Many calls in flight from one task, with asyncio's own sleep between.
        results = await asyncio.gather(*(fib.call("Index", {"index": n}) for n in range(40)))
        await asyncio.sleep(0.01)
        print("gathered", [r["value"] for r in results][-3:])
        try:
            await fib.call("Index", {"index": -1})
        except ServiceError as e:
            print("error", e)
        try:
            await client.service("Nosuch").call("X", timeout=0.3)
        except NoInstances as e:
            print("none", e)
        # An asyncio timeout cancels the call.
        try:
            await asyncio.wait_for(client.service("Nosuch").call("X"), 0.2)
        except asyncio.TimeoutError:
            print("cancelled")
        from twisted.internet import reactor
        print("reactor", type(reactor).__name__, reactor._asyncioEventloop is loop)

asyncio.run(main(sys.argv[1]))
"""


@pytest.fixture
def asyncio_service() -> Iterator[tuple[str, Path]]:
    with tempfile.TemporaryDirectory(prefix="skynet-asyncio-") as home:
        registry = f"file://{home}/registry"
        log = Path(home) / "service.log"
        with open(log, "wb") as out:
            popen = subprocess.Popen(
                [twistd(), "-n", "--pidfile=", "--reactor=asyncio", "skynet-service",
                 "--service", "examples.fibonacci:Fibonacci", "--registry", registry,
                 "--listen", "tcp:0:interface=127.0.0.1"],
                cwd=ROOT, env=child_env(SKYNET_HOME=home), stdin=subprocess.DEVNULL,
                stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        try:
            yield registry, log
        finally:
            terminate(popen)


def test_asyncio_program_calls_a_service_on_the_asyncio_reactor(
    asyncio_service: tuple[str, Path],
) -> None:
    registry, log = asyncio_service
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(CLIENT), registry], cwd=ROOT,
                            env=child_env(), capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines() == [
        "first 832040",
        "gathered [24157817, 39088169, 63245986]",
        "error negative index -1",
        "none no instance of Nosuch found",
        "cancelled",
        "reactor AsyncioSelectorReactor True",
    ]
    deadline = time.monotonic() + 10
    while "AsyncioSelectorReactor" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert (
        "reactor class: twisted.internet.asyncioreactor.AsyncioSelectorReactor" in log.read_text()
    )


def test_a_non_asyncio_reactor_is_refused() -> None:
    script = """
    import asyncio
    from twisted.internet import epollreactor
    epollreactor.install()
    from skynet.aio import Client

    async def main():
        try:
            Client("memory://x")
        except RuntimeError as e:
            print(e)

    asyncio.run(main())
    """
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=ROOT,
                            env=child_env(), capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (
        "needs Twisted's asyncio reactor on this loop; EPollReactor is installed" in result.stdout
    )
