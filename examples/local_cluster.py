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

The dashboard listens on 8080 and the SSH shell on 2222 when they are free,
else on ports the system picks (it says so).  The logs of the run are in
C{$SKYNET_HOME/local-cluster}; those of the previous run are removed at
start.  The daemon and the dashboard run in sessions of their own, so that
Ctrl-C reaches only this command, which then stops them gracefully (and the
kernel sends them SIGTERM should this command die).
"""

from __future__ import annotations

import argparse
import os
import secrets
import shlex
import shutil
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
from skynet.config import environment_defaults, skynet_path
from skynet.manhole import DEFAULT_SSH_PORT, default_ssh_dir, ensure_client_key
from skynet.registry import Query, registry_from_url

ROOT = Path(__file__).resolve().parent.parent

SERVICES = [
    "examples.fibonacci:Fibonacci",
    "examples.fibonacci:Fibonacci",
    "examples.testservice:TestService",
    "examples.tutorial:TutorialService",
    "examples.sleeper:Sleeper",
]


DASHBOARD_PORT = 8080


def log_dir() -> Path:
    path = Path(skynet_path("local-cluster"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def clear_old_logs() -> None:
    """
    Remove the logs of earlier runs (one per service instance each time).
    """
    for old in log_dir().glob("*.log"):
        old.unlink(missing_ok=True)


def _die_with_parent() -> list[str]:
    """
    A command prefix that has the kernel send SIGTERM to the child if this
    process dies (the children are in sessions of their own, out of reach
    of the terminal's Ctrl-C).
    """
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM"] if setpriv else []


def twistd(name: str, args: list[str], registry: str | None) -> tuple[subprocess.Popen, Path]:
    """
    C{twistd -n <name> args...}, its log in the cluster's log directory.
    """
    log_path = log_dir() / f"{name.removeprefix('skynet-')}.log"
    command = [*_die_with_parent(), str(Path(sys.executable).parent / "twistd"), "-n",
               "--pidfile=", name, *args]  # fmt: skip
    if registry:
        command += ["--registry", registry]
    with open(log_path, "wb") as log:
        # A session of its own: Ctrl-C on the terminal reaches only us, and
        # we stop the child once (a second signal during its shutdown made
        # twistd log ReactorNotRunning).
        child = subprocess.Popen(command, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log,
                                 stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    return child, log_path


def start_daemon(registry: str | None, ssh_port: int, authorized_keys: str):
    """
    The daemon, with the SSH shell on loopback; the services' logs go beside
    its own.
    """
    return twistd("skynet-daemon", ["--log-dir", str(log_dir()),
                                    "--ssh", f"tcp:{ssh_port}:interface=127.0.0.1",
                                    "--authorized-keys", authorized_keys], registry)  # fmt: skip


def start_dashboard(registry: str | None, port: int) -> tuple[subprocess.Popen, Path, str]:
    """
    The dashboard on 127.0.0.1:C{port}, actions enabled by a
    fresh token kept in a 0600 file.
    """
    token = secrets.token_urlsafe(18)
    token_file = log_dir() / "dashboard-token"
    token_file.touch(mode=0o600)
    token_file.chmod(0o600)
    token_file.write_text(token + "\n")
    child, log_path = twistd("skynet-dashboard", [
        "--listen", f"tcp:{port}:interface=127.0.0.1", "--token-file", str(token_file),
    ], registry)  # fmt: skip
    return child, log_path, f"http://127.0.0.1:{port}/?token={token}"


def free_ports(*preferred: int) -> list[int]:
    """
    Each preferred port of 127.0.0.1 if free, else one the system picks;
    all bound at once while choosing, so that two fallbacks differ.  (Another
    process may still take one before our child listens on it.)
    """
    sockets = []
    try:
        for port in preferred:
            s = socket.socket()
            sockets.append(s)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


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


def host_key_fingerprint() -> str | None:
    """
    The daemon's SSH host key as OpenSSH shows it (C{ED25519
    SHA256:...}), or L{None} if it cannot be read.
    """
    from twisted.conch.ssh import keys

    try:
        key = keys.Key.fromFile(os.path.join(default_ssh_dir(), "host_key"))
    except Exception:
        return None
    fingerprint = key.fingerprint(keys.FingerprintFormats.SHA256_BASE64).rstrip("=")
    return f"{key.type().upper()} SHA256:{fingerprint}"


async def stop_all(reactor: Any, children: list[tuple[subprocess.Popen, Path]]) -> None:
    print("\nstopping the cluster...", flush=True)
    await DeferredList([ensureDeferred(stop_child(reactor, c)) for c, _ in children])
    print("stopped.", flush=True)


async def main(reactor: Any, args: argparse.Namespace) -> None:
    registry = registry_from_url(args.registry, reactor=reactor)
    await registry.start()
    print(f"registry: {registry.url}")
    clear_old_logs()
    key = ensure_client_key()
    ssh_port, dashboard_port = free_ports(DEFAULT_SSH_PORT, DASHBOARD_PORT)
    if ssh_port != DEFAULT_SSH_PORT:
        print(f"port {DEFAULT_SSH_PORT} is taken: the SSH shell uses port {ssh_port} instead")
    if dashboard_port != DASHBOARD_PORT:
        print(f"port {DASHBOARD_PORT} is taken: the dashboard uses port {dashboard_port} instead")
    daemon, daemon_log = start_daemon(args.registry, ssh_port, key.authorized_keys)
    dashboard, dashboard_log, dashboard_url = start_dashboard(args.registry, dashboard_port)
    children = [(daemon, daemon_log), (dashboard, dashboard_log)]
    stopping = reactor.addSystemEventTrigger(
        "before", "shutdown", lambda: ensureDeferred(stop_all(reactor, children))
    )

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
    env = environment_defaults()
    client = Client(registry=registry, reactor=reactor, region=env.region, host=env.bind_ip)
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
    fingerprint = host_key_fingerprint()
    if fingerprint:
        print(f"           host key {fingerprint} (what ssh asks you to check)")
    print(f"           .venv/bin/sky{registry_arg} cli   (the same shell on this terminal)")
    print("\nCall and operate them yourself from another terminal:")
    print(f"  .venv/bin/python -m examples.fibonacci_client{registry_arg} 10 20 30")
    print(f"  .venv/bin/python -m examples.testservice_client{registry_arg} hello")
    print(f"  .venv/bin/sky{registry_arg} instances")
    print(f"  .venv/bin/sky{registry_arg} --service Fibonacci restart")
    print(f"  .venv/bin/sky{registry_arg} call Fibonacci Index '{{\"index\": 30}}'")
    if args.once:
        reactor.removeSystemEventTrigger(stopping)
        await stop_all(reactor, children)
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
