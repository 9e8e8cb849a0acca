"""
Run a local skynet cluster of the example services on this machine.

    python -m examples.local_cluster [--registry URL] [--once]

Starts, as separate C{twistd -n skynet-service} processes on the embedded
registry (no server to install): two Fibonacci, one TestService, one
TutorialService and one Sleeper.  It waits until they are registered, calls
each through discovery, prints how to call them yourself, and keeps them
running until Ctrl-C (or, with C{--once}, stops them right away).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from twisted.internet.defer import ensureDeferred
from twisted.internet.task import deferLater, react

from skynet.client import Client
from skynet.registry import Query, registry_from_url

ROOT = Path(__file__).resolve().parent.parent

SERVICES = [
    "examples.fibonacci:Fibonacci",
    "examples.fibonacci:Fibonacci",
    "examples.testservice:TestService",
    "examples.tutorial:TutorialService",
    "examples.sleeper:Sleeper",
]


def log_dir() -> Path:
    home = Path(os.environ.get("SKYNET_HOME", Path.home() / ".skynet"))
    path = home / "local-cluster"
    path.mkdir(parents=True, exist_ok=True)
    return path


def start(spec: str, index: int, registry: str | None) -> tuple[subprocess.Popen, Path]:
    twistd = str(Path(sys.executable).parent / "twistd")
    log_path = log_dir() / f"{spec.split(':')[1].lower()}-{index}.log"
    command = [twistd, "-n", "--pidfile=", "skynet-service", "--service", spec]
    if registry:
        command += ["--registry", registry]
    with open(log_path, "wb") as log:
        child = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    return child, log_path


async def main(reactor: Any, args: argparse.Namespace) -> None:
    registry = registry_from_url(args.registry, reactor=reactor)
    await registry.start()
    print(f"registry: {registry.url}")
    children = [start(spec, i, args.registry) for i, spec in enumerate(SERVICES)]

    def stop_children() -> None:
        for child, _ in children:
            if child.poll() is None:
                child.terminate()
        for child, _ in children:
            try:
                child.wait(15)
            except subprocess.TimeoutExpired:
                child.kill()

    reactor.addSystemEventTrigger("before", "shutdown", stop_children)
    mine = {child.pid for child, _ in children}
    for _ in range(300):
        found = [i for i in await registry.query(Query(registered=True)) if i.pid in mine]
        if len(found) == len(children):
            break
        dead = [(c, log) for c, log in children if c.poll() is not None]
        if dead:
            for _, log in dead:
                print(f"a service failed to start; its log {log}:\n{log.read_text()[-2000:]}")
            raise SystemExit(1)
        await deferLater(reactor, 0.1, lambda: None)
    else:
        raise SystemExit("services did not register within 30 s")
    print(f"{len(found)} instances running (logs in {log_dir()}):")
    for instance in found:
        print(f"  {instance.host}:{instance.port} - {instance.name} {instance.version} "
              f"({instance.region}) pid {instance.pid}")  # fmt: skip

    client = Client(registry=registry, reactor=reactor)
    up = await client.service("TestService").call("Upcase", {"data": "hello skynet"})
    fib = await client.service("Fibonacci").call("Index", {"index": 50})
    one = await client.service("TutorialService", version="1").call("AddOne", {"value": 41})
    print(f"TestService.Upcase('hello skynet') = {up['data']!r}")
    print(f"Fibonacci.Index(50) = {fib['value']}")
    print(f"TutorialService.AddOne(41) = {one['value']}")
    await client.stop()
    registry_arg = f" --registry {args.registry}" if args.registry else ""
    print("\nCall them yourself from another terminal:")
    print(f"  .venv/bin/python -m examples.fibonacci_client{registry_arg} 10 20 30")
    print(f"  .venv/bin/python -m examples.testservice_client{registry_arg} hello")
    print(f"  .venv/bin/python -m examples.tutorial_client{registry_arg}")
    if args.once:
        await registry.stop()
        return
    print("\nCtrl-C stops the cluster.")
    await ensureDeferred(_forever(reactor))


async def _forever(reactor: Any) -> None:
    from twisted.internet.defer import Deferred

    await Deferred()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Run the example services locally.")
    parser.add_argument("--registry", help="registry URL (default: embedded)")
    parser.add_argument("--once", action="store_true", help="stop after the demo calls")
    arguments = parser.parse_args()
    react(lambda reactor: ensureDeferred(main(reactor, arguments)))
