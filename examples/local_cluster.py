"""
Run a local skynet cluster of the example services on this machine.

    python -m examples.local_cluster [--registry URL] [--once]

Starts a skynet daemon (C{twistd -n skynet-daemon}) on the embedded
registry (no server to install), or on C{--registry}, with the SSH shell on
loopback (a key for the local user is made if needed), and deploys through
its C{SkynetDaemon.Deploy} RPC, as separate supervised processes: two
Fibonacci, one TestService, one TutorialService and one Sleeper.  It also
starts the web dashboard (actions enabled with a token it makes).  It waits
until everything answers, calls each service through discovery, prints how
to reach it all yourself, and keeps it running until Ctrl-C (or, with
C{--once}, stops it right away).
"""

from __future__ import annotations

import argparse
import os
import secrets
import shlex
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, ensureDeferred
from twisted.internet.task import deferLater, react
from twisted.internet.threads import deferToThread

from skynet.client import Client
from skynet.manhole import ensure_client_key, pick_ssh_port
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


def twistd(name: str, args: list[str], registry: str | None) -> tuple[subprocess.Popen, Path]:
    """
    C{twistd -n <name> args...}, its log in the cluster's log directory.
    """
    log_path = log_dir() / f"{name.removeprefix('skynet-')}.log"
    command = [str(Path(sys.executable).parent / "twistd"), "-n", "--pidfile=", name, *args]
    if registry:
        command += ["--registry", registry]
    with open(log_path, "wb") as log:
        child = subprocess.Popen(command, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log,
                                 stderr=subprocess.STDOUT)  # fmt: skip
    return child, log_path


def start_daemon(registry: str | None, ssh_port: int, authorized_keys: str):
    """
    The daemon, with the SSH shell on loopback; the services' logs go beside
    its own.
    """
    return twistd("skynet-daemon", ["--log-dir", str(log_dir()),
                                    "--ssh", f"tcp:{ssh_port}:interface=127.0.0.1",
                                    "--authorized-keys", authorized_keys], registry)  # fmt: skip


def start_dashboard(registry: str | None) -> tuple[subprocess.Popen, Path, str]:
    """
    The dashboard on 127.0.0.1:8080 (or a free port), actions enabled by a
    fresh token kept in a 0600 file.
    """
    token = secrets.token_urlsafe(18)
    token_file = log_dir() / "dashboard-token"
    token_file.touch(mode=0o600)
    token_file.chmod(0o600)
    token_file.write_text(token + "\n")
    port = free_port(8080)
    child, log_path = twistd("skynet-dashboard", [
        "--listen", f"tcp:{port}:interface=127.0.0.1", "--token-file", str(token_file),
    ], registry)  # fmt: skip
    return child, log_path, f"http://127.0.0.1:{port}/?token={token}"


def free_port(preferred: int) -> int:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred))
            return preferred
        except OSError:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])


async def stop_child(reactor: Any, child: subprocess.Popen, timeout: float = 30.0) -> None:
    """
    SIGTERM (the daemon then stops its services gracefully), then SIGKILL.
    """
    if child.poll() is None:
        child.terminate()
    for _ in range(int(timeout * 10)):
        if child.poll() is not None:
            return
        await deferLater(reactor, 0.1, lambda: None)
    child.kill()
    child.wait()


def _answers_http(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def _answers_ssh(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            return s.recv(64).startswith(b"SSH-2.0")
    except OSError:
        return False


async def main(reactor: Any, args: argparse.Namespace) -> None:
    registry = registry_from_url(args.registry, reactor=reactor)
    await registry.start()
    print(f"registry: {registry.url}")
    key = ensure_client_key()
    ssh_port = pick_ssh_port()
    daemon, daemon_log = start_daemon(args.registry, ssh_port, key.authorized_keys)
    dashboard, dashboard_log, dashboard_url = start_dashboard(args.registry)
    children = [(daemon, daemon_log), (dashboard, dashboard_log)]
    reactor.addSystemEventTrigger(
        "before", "shutdown",
        lambda: DeferredList([ensureDeferred(stop_child(reactor, c)) for c, _ in children]),
    )  # fmt: skip

    async def wait_for(what: str, predicate: Any) -> Any:
        for _ in range(300):
            found = await predicate()
            if found:
                return found
            for child, log in children:
                if child.poll() is not None:
                    print(f"{log.stem} exited; its log {log}:\n{log.read_text()[-3000:]}")
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

    await wait_for("the dashboard", lambda: deferToThread(_answers_http, dashboard_url))
    await wait_for("the SSH shell", lambda: deferToThread(_answers_ssh, ssh_port))
    registry_arg = f" --registry {shlex.quote(args.registry)}" if args.registry else ""
    print(f"\ndashboard: {dashboard_url}")
    print(f"shell:     {key.ssh_command(ssh_port)}   ('help'; 'python' for a manhole)")
    print(f"           .venv/bin/sky{registry_arg} cli   (the same shell on this terminal)")
    print("\nCall and operate them yourself from another terminal:")
    print(f"  .venv/bin/python -m examples.fibonacci_client{registry_arg} 10 20 30")
    print(f"  .venv/bin/python -m examples.testservice_client{registry_arg} hello")
    print(f"  .venv/bin/sky{registry_arg} instances")
    print(f"  .venv/bin/sky{registry_arg} --service Fibonacci restart")
    print(f"  .venv/bin/sky{registry_arg} call Fibonacci Index '{{\"index\": 30}}'")
    if args.once:
        for child, _ in children:
            await stop_child(reactor, child)
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
