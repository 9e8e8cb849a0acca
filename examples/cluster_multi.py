"""
Three hosts on one machine, healing: C{make cluster-multi}.

    python -m examples.cluster_multi [--file examples/cluster.toml] [--once]

Starts three skynet daemons (C{twistd -n skynet-daemon}) on the loopback
addresses 127.0.0.2, 127.0.0.3 and 127.0.0.4 (C{SKYNET_BIND_IP}: each is a
host of its own) on an embedded registry in C{$SKYNET_HOME/cluster-multi},
and applies the cluster file (C{sky apply}): the leading daemon places the
instances, one per host.  Then it shows the healing: C{kill -9} of one
host's daemon and its children, its instances re-created on the other two,
and the host back, exactly the desired number again.  It prints the
commands to look and play yourself and keeps running until Ctrl-C (or,
with C{--once}, stops at the end of the demo).
"""

from __future__ import annotations

import argparse
import io
import shlex
import shutil
import time
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, ensureDeferred
from twisted.internet.task import deferLater, react

from examples.local_cluster import stop_child
from examples.loopback_hosts import HOSTS, Host
from skynet.client import Client
from skynet.cluster.commands import read_statuses, run_command
from skynet.config import environment_defaults, skynet_path
from skynet.registry import Query, registry_from_url

ROOT = Path(__file__).resolve().parent.parent
DAEMON_ARGS = ["--stats-interval", "1", "--cluster-interval", "0.5"]


async def sky(registry: Any, reactor: Any, *argv: str) -> str:
    out, err = io.StringIO(), io.StringIO()
    code = await run_command(list(argv), registry, out, err, reactor=reactor)
    if code:
        raise SystemExit(f"sky {' '.join(argv)} failed: {err.getvalue()}")
    return out.getvalue()


async def main(reactor: Any, args: argparse.Namespace) -> None:
    root = Path(skynet_path("cluster-multi"))
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    url = f"file://{root / 'registry'}"
    registry = registry_from_url(url, reactor=reactor)
    await registry.start()
    print(f"registry: {url}")
    hosts = {a: Host(root, a, url, DAEMON_ARGS, own_session=True).start() for a in HOSTS}

    async def stop_all() -> None:
        print("\nstopping the cluster...", flush=True)
        await DeferredList([ensureDeferred(stop_child(reactor, h.popen))
                            for h in hosts.values() if h.popen is not None])  # fmt: skip
        print("stopped.", flush=True)

    stopping = reactor.addSystemEventTrigger("before", "shutdown",
                                             lambda: ensureDeferred(stop_all()))  # fmt: skip

    async def wait_for(what: str, predicate: Any, timeout: float = 90.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = await predicate()
            if found:
                return found
            await deferLater(reactor, 0.1, lambda: None)
        raise SystemExit(f"{what} did not happen within {timeout:g} s (logs in {root})")

    async def per_host(service: str = "Fibonacci") -> dict[str, int]:
        counts: dict[str, int] = {}
        for i in await registry.query(Query(service=service, registered=True)):
            counts[i.host] = counts.get(i.host, 0) + 1
        return counts

    async def daemons_up() -> bool:
        found = await registry.query(Query(service="SkynetDaemon", registered=True))
        return {i.host for i in found} == set(HOSTS)

    await wait_for("3 daemons registered", daemons_up)
    print(f"3 daemons up: {', '.join(HOSTS)} (logs in {root})")
    print(f"\n$ sky apply {args.file}")
    print(await sky(registry, reactor, "apply", args.file), end="")

    async def settled() -> bool:
        if await per_host() != dict.fromkeys(HOSTS, 1):
            return False
        if sum((await per_host("TestService")).values()) != 2:
            return False
        statuses = (await read_statuses(registry))[0]
        return all(s.state == "ok" for s in statuses)

    await wait_for("the placement", settled)
    print("\n$ sky deployments")
    print(await sky(registry, reactor, "deployments"), end="")

    env = environment_defaults()
    client = Client(registry=registry, reactor=reactor, region=env.region, host=env.bind_ip)
    fib = client.service("Fibonacci")
    print(f"\nFibonacci.Index(50) = {(await fib.call('Index', {'index': 50}))['value']}")
    victim = hosts["127.0.0.4"]
    print(f"\nkill -9 of host {victim.address}: its daemon (pid {victim.popen.pid}) and children")
    killed = time.monotonic()
    victim.melt()

    async def healed() -> bool:
        counts = await per_host()
        return victim.address not in counts and sum(counts.values()) == 3

    await wait_for("the heal", healed)
    print(f"3 Fibonacci registered again after {time.monotonic() - killed:.1f} s: "
          f"{await per_host()}")  # fmt: skip
    print(f"Fibonacci.Index(60) = {(await fib.call('Index', {'index': 60}))['value']}")
    print(f"\nhost {victim.address} back: its old instances return, the surplus is stopped")
    victim.start()
    await wait_for("one per host again", settled, timeout=120)
    print(f"Fibonacci per host: {await per_host()}")
    await client.stop()

    registry_arg = f"--registry {shlex.quote(url)}"
    print("\nLook and play yourself from another terminal:")
    print(f"  .venv/bin/sky {registry_arg} deployments")
    print(f"  .venv/bin/sky {registry_arg} scale Fibonacci=5")
    print(f"  .venv/bin/sky {registry_arg} --service Fibonacci restart   (rolling)")
    print(f"  .venv/bin/sky {registry_arg} instances")
    print("  kill -9 a daemon: " + ", ".join(f"{a} pid {h.popen.pid}" for a, h in hosts.items()
                                             if h.popen is not None))  # fmt: skip
    if args.once:
        reactor.removeSystemEventTrigger(stopping)
        await stop_all()
        await registry.stop()
        return
    print("\nCtrl-C stops the cluster.")
    await Deferred()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Three daemons on loopback hosts, healing.")
    parser.add_argument("--file", default=str(ROOT / "examples" / "cluster.toml"),
                        help="the cluster file to apply")  # fmt: skip
    parser.add_argument("--once", action="store_true", help="stop at the end of the demo")
    arguments = parser.parse_args()
    react(lambda reactor: ensureDeferred(main(reactor, arguments)))
