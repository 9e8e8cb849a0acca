"""
Run a local skynet cluster of the example services on this machine.

    python -m examples.local_cluster [--registry URL] [--once]

Starts a skynet daemon (C{twistd -n skynet-daemon}) on the embedded
registry (no server to install), or on C{--registry}, and deploys through
its C{SkynetDaemon.Deploy} RPC, as separate supervised processes: two
Fibonacci, one TestService, one TutorialService and one Sleeper.  It waits
until they are registered, calls each through discovery, prints how to call
them yourself, and keeps them running until Ctrl-C (or, with C{--once},
stops the daemon, and so every service, right away).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred
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


def start_daemon(registry: str | None) -> tuple[subprocess.Popen, Path]:
    """
    C{twistd -n skynet-daemon}, its log in the cluster's log directory (the
    services' logs beside it).
    """
    twistd = str(Path(sys.executable).parent / "twistd")
    logs = log_dir()
    log_path = logs / "daemon.log"
    command = [twistd, "-n", "--pidfile=", "skynet-daemon", "--log-dir", str(logs)]
    if registry:
        command += ["--registry", registry]
    with open(log_path, "wb") as log:
        daemon = subprocess.Popen(command, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log,
                                  stderr=subprocess.STDOUT)  # fmt: skip
    return daemon, log_path


async def stop_daemon(reactor: Any, daemon: subprocess.Popen, timeout: float = 30.0) -> None:
    """
    SIGTERM: the daemon stops its services gracefully, then itself.
    """
    if daemon.poll() is None:
        daemon.terminate()
    for _ in range(int(timeout * 10)):
        if daemon.poll() is not None:
            return
        await deferLater(reactor, 0.1, lambda: None)
    daemon.kill()
    daemon.wait()


async def main(reactor: Any, args: argparse.Namespace) -> None:
    registry = registry_from_url(args.registry, reactor=reactor)
    await registry.start()
    print(f"registry: {registry.url}")
    daemon, daemon_log = start_daemon(args.registry)
    reactor.addSystemEventTrigger(
        "before", "shutdown", lambda: ensureDeferred(stop_daemon(reactor, daemon))
    )

    async def wait_for(what: str, predicate: Any) -> Any:
        for _ in range(300):
            found = await predicate()
            if found:
                return found
            if daemon.poll() is not None:
                print(f"the daemon exited; its log {daemon_log}:\n{daemon_log.read_text()[-3000:]}")
                raise SystemExit(1)
            await deferLater(reactor, 0.1, lambda: None)
        raise SystemExit(f"{what} did not happen within 30 s (logs in {log_dir()})")

    async def daemon_up() -> Any:
        found = await registry.query(Query(service="SkynetDaemon", registered=True))
        return [i for i in found if i.pid == daemon.pid]

    [instance] = await wait_for("the daemon's registration", daemon_up)
    print(f"daemon: SkynetDaemon {instance.uuid} at {instance.host}:{instance.port} "
          f"pid {daemon.pid}")  # fmt: skip
    client = Client(registry=registry, reactor=reactor)
    skynet_daemon = client.service("SkynetDaemon", host=instance.host)
    uuids = []
    for spec in SERVICES:
        reply = await skynet_daemon.call("Deploy", {"service": spec, "args": []})
        uuids.append(reply["uuid"])

    async def all_registered() -> Any:
        found = {i.uuid: i for i in await registry.query(Query(registered=True))}
        return [found[u] for u in uuids] if all(u in found for u in uuids) else None

    found = await wait_for("the services' registration", all_registered)
    print(f"{len(found)} instances deployed through the daemon (logs in {log_dir()}):")
    for instance in found:
        print(f"  {instance.host}:{instance.port} - {instance.name} {instance.version} "
              f"({instance.region}) pid {instance.pid} uuid {instance.uuid}")  # fmt: skip

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
    print("and operate them through the daemon: SkynetDaemon.ListSubServices, "
          "RestartSubService {uuid}, ... (docs/daemon.md)")  # fmt: skip
    if args.once:
        await stop_daemon(reactor, daemon)
        await registry.stop()
        return
    print("\nCtrl-C stops the cluster.")
    await Deferred()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Run the example services locally.")
    parser.add_argument("--registry", help="registry URL (default: embedded)")
    parser.add_argument("--once", action="store_true", help="stop after the demo calls")
    arguments = parser.parse_args()
    react(lambda reactor: ensureDeferred(main(reactor, arguments)))
