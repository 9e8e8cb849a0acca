"""
Discovery timing: how fast clients start and stop calling an instance.

    python -m benchmarks.discovery [--rounds 5] [--rate 200]
        [--backends embedded,zookeeper] [--zk HOSTS] [--zk-session-timeout 4] [--json FILE]

On each backend, one TestService instance (C{twistd skynet-service}, a
process of its own) serves an open-loop load of C{TestService.Upcase} calls
at C{--rate} from this process (L{skynet.client.Client}, defaults, with the
recording connector of L{benchmarks.chaos}).  Then, C{--rounds} times:

  1. a second instance starts: from its spawn to this client's registry
     watch seeing it registered, and to the first call it answers;
  2. it stops cleanly (SIGTERM: it unregisters, drains, leaves): from the
     signal to the last attempt this client sent it (goal: under 50 ms),
     and to the watch seeing it unregistered;
  3. a third instance starts (measured as in 1) and gets SIGKILL: from the
     kill to its removal from the registry as the watch sees it (goal:
     embedded under 1 s; ZooKeeper within the session timeout + 1 s; no
     daemon deletes its nodes here), and to the last attempt sent to it.

Every call must succeed; the report says how many did not.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from twisted.internet.defer import ensureDeferred
from twisted.internet.task import deferLater, react

from benchmarks.backends import registry_backend
from benchmarks.chaos import (
    ROOT,
    Load,
    Recorder,
    View,
    _die_with_parent,
    _signal,
    clock,
    percentile,
    phase_figures,
)
from skynet.client import Client
from skynet.registry import registry_from_url
from skynet.registry.base import Query

SERVICE = "examples.testservice:TestService"


class Discovery:
    def __init__(self, reactor: Any, url: str, workdir: Path, args: argparse.Namespace) -> None:
        self.reactor = reactor
        self.url = url
        self.workdir = workdir
        self.args = args
        self.recorder = Recorder(reactor)
        self.view = View()
        self.processes: list[subprocess.Popen] = []
        self.registry: Any = None
        self.client: Client | None = None
        self._watch: Any = None
        self._logs: list[Any] = []

    def spawn(self) -> subprocess.Popen:
        twistd = str(Path(sys.executable).parent / "twistd")
        command = _die_with_parent() + [
            twistd, "-n", "--pidfile=", "skynet-service", "--service", SERVICE,
            "--registry", self.url, "--listen", "tcp:0:interface=127.0.0.1",
            "--stats-interval", "1",
        ]  # fmt: skip
        if self.url.startswith("zk:"):
            command += ["--zk-session-timeout", str(self.args.zk_session_timeout)]
        log = open(self.workdir / f"service-{len(self.processes)}.log", "wb")
        self._logs.append(log)
        env = dict(os.environ, SKYNET_HOME=str(self.workdir), PYTHONUNBUFFERED="1")
        popen = subprocess.Popen(command, cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                                 stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
        self.processes.append(popen)
        return popen

    async def until(self, predicate: Any, timeout: float, what: str) -> float:
        deadline = clock() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if clock() > deadline:
                raise RuntimeError(f"timed out after {timeout}s waiting for {what}")
            await deferLater(self.reactor, 0.002, lambda: None)

    def seen_registered(self, pid: int) -> float | None:
        for t, kind, _, p, registered in self.view.events:
            if p == pid and kind == "present" and registered:
                return t
        return None

    def first_answer(self, pid: int) -> float | None:
        answered = self.recorder.answered.get(pid)
        return min(t for _, t in answered) if answered else None

    def first_sent(self, pid: int) -> float | None:
        times = self.recorder.sent.get(pid)
        return times[0] if times else None

    async def start_one(self) -> tuple[subprocess.Popen, dict[str, Any]]:
        spawned = clock()
        popen = self.spawn()
        pid = popen.pid
        registered = await self.until(lambda: self.seen_registered(pid), 60, "registered")
        answered = await self.until(lambda: self.first_answer(pid), 30, "a call answered")
        sent = self.first_sent(pid)
        return popen, {
            "spawn_to_registered_ms": (registered - spawned) * 1e3,
            "registered_to_first_attempt_ms": (sent - registered) * 1e3 if sent else None,
            "spawn_to_first_answer_ms": (answered - spawned) * 1e3,
        }

    async def round(self) -> dict[str, Any]:
        figures: dict[str, Any] = {}
        # 1. start; 2. clean stop.
        popen, started = await self.start_one()
        figures["start"] = [started]
        await deferLater(self.reactor, self.args.serve, lambda: None)
        pid = popen.pid
        stopped = clock()
        popen.send_signal(signal.SIGTERM)

        def unregistered() -> float | None:
            for t, kind, _, p, registered in self.view.events:
                if p == pid and t >= stopped and (kind == "removed" or not registered):
                    return t
            return None

        gone = await self.until(unregistered, 30, "the stopped instance unregistered")
        await self.until(lambda: popen.poll() is not None, 30, "the stopped process to exit")
        await deferLater(self.reactor, 0.2, lambda: None)
        after = self.recorder.sent_between(pid, stopped, float("inf"))
        connects = self.recorder.connects_between(pid, stopped, float("inf"))
        figures["stop"] = {
            "stop_to_unregistered_ms": (gone - stopped) * 1e3,
            "stop_to_last_attempt_ms": (after[-1] - stopped) * 1e3 if after else 0.0,
            "attempts_after_stop": len(after),
            "stop_to_last_connect_ms": (connects[-1] - stopped) * 1e3 if connects else None,
        }
        # 3. start again; kill.
        popen, started = await self.start_one()
        figures["start"].append(started)
        await deferLater(self.reactor, self.args.serve, lambda: None)
        pid = popen.pid
        killed = clock()
        _signal(pid, signal.SIGKILL)

        def removed() -> float | None:
            for t, kind, _, p, _registered in self.view.events:
                if p == pid and t >= killed and kind == "removed":
                    return t
            return None

        timeout = 10 + (self.args.zk_session_timeout if self.url.startswith("zk:") else 0)
        gone = await self.until(removed, timeout, "the killed instance removed")
        popen.wait(10)
        after = self.recorder.sent_between(pid, killed, float("inf"))
        connects = self.recorder.connects_between(pid, killed, float("inf"))
        figures["kill"] = {
            "kill_to_removed_ms": (gone - killed) * 1e3,
            "kill_to_last_attempt_ms": (after[-1] - killed) * 1e3 if after else 0.0,
            "attempts_after_kill": len(after),
            "kill_to_last_connect_ms": (connects[-1] - killed) * 1e3 if connects else None,
            "connects_after_kill": len(connects),
        }
        return figures

    async def run(self) -> dict[str, Any]:
        self.registry = registry_from_url(self.url, self.reactor)
        await self.registry.start()
        self._watch = self.registry.watch(Query(service="TestService"), self.view)
        self.client = Client(registry=self.registry, reactor=self.reactor, connector=self.recorder)
        base = self.spawn()
        await self.until(lambda: self.seen_registered(base.pid), 60, "the first instance")
        test = self.client.service("TestService")
        await test.call("Upcase", {"data": "warm"})
        load = Load(self.reactor, self.client, self.args.rate, random.Random(1),
                    services=("TestService",))  # fmt: skip
        load.start()
        rounds = []
        try:
            for _ in range(self.args.rounds):
                rounds.append(await self.round())
        finally:
            await load.stop()
        return {
            "rounds": rounds,
            "load": phase_figures(load.records, load.start_time, clock()),
            "summary": summarise(rounds),
            "connects_after_kill": sum(r["kill"]["connects_after_kill"] for r in rounds),
            "attempts_after_kill": sum(r["kill"]["attempts_after_kill"] for r in rounds),
        }

    async def stop(self) -> None:
        if self.client is not None:
            await self.client.stop()
        if self._watch is not None:
            self._watch.stop()
        if self.registry is not None:
            await self.registry.stop()
        for popen in self.processes:
            if popen.poll() is None:
                popen.terminate()
                try:
                    popen.wait(15)
                except subprocess.TimeoutExpired:
                    popen.kill()
                    popen.wait(5)
        for log in self._logs:
            log.close()


ROWS = [
    ("start", "spawn_to_registered_ms", "start -> registered (seen by the client's watch)"),
    ("start", "registered_to_first_attempt_ms", "registered -> first call sent to it"),
    ("start", "spawn_to_first_answer_ms", "start -> first call answered by it"),
    ("stop", "stop_to_unregistered_ms", "clean stop -> unregistered (seen by the watch)"),
    ("stop", "stop_to_last_attempt_ms", "clean stop -> last call sent to it"),
    ("kill", "kill_to_removed_ms", "kill -> removed from the registry (the watch)"),
    ("kill", "kill_to_last_attempt_ms", "kill -> last call sent to it"),
    ("kill", "kill_to_last_connect_ms", "kill -> last connection attempt (refused)"),
]


def summarise(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for part, key, _ in ROWS:
        if part == "start":
            values = [s[key] for r in rounds for s in r["start"] if s[key] is not None]
        else:
            values = [r[part][key] for r in rounds if r[part][key] is not None]
        summary[key] = {
            "n": len(values),
            "min": min(values) if values else None,
            "median": percentile(values, 0.5),
            "max": max(values) if values else None,
        }
    return summary


def format_report(backend: str, result: dict[str, Any], args: argparse.Namespace) -> str:
    load = result["load"]
    extra = f", session timeout {args.zk_session_timeout:g} s" if backend == "zookeeper" else ""
    lines = [
        f"{backend}{extra}: {args.rounds} rounds under {args.rate:g} calls/s; "
        f"{load['calls']} calls, {load['failed']} failed, p50 {load['p50_ms']:.1f} ms, "
        f"p99 {load['p99_ms']:.1f} ms, max {load['max_ms']:.1f} ms",
        f"{'ms':52}{'min':>9}{'median':>9}{'max':>9}",
    ]
    for _, key, label in ROWS:
        s = result["summary"][key]
        lines.append(f"{label:52}" + "".join(f"{_ms(s[k]):>9}" for k in ("min", "median", "max")))
    lines.append(
        f"after the kills: {result['attempts_after_kill']} calls sent to the dead processes, "
        f"{result['connects_after_kill']} connection attempts (refused; the call moved on)"
    )
    for error, count in load["errors"].items():
        lines.append(f"    {count} x {error}")
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if value < 100 else f"{value:.0f}"


async def run_backend(reactor: Any, backend: str, args: argparse.Namespace) -> dict[str, Any]:
    async with registry_backend(backend, args.zk, "discovery") as (url, workdir):
        discovery = Discovery(reactor, url, workdir, args)
        try:
            return await discovery.run()
        finally:
            await discovery.stop()


async def main(reactor: Any, args: argparse.Namespace) -> None:
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores, "
          f"load {os.getloadavg()[0]:.2f}", flush=True)  # fmt: skip
    results = {}
    for backend in args.backends:
        results[backend] = await run_backend(reactor, backend, args)
        print(format_report(backend, results[backend], args), flush=True)
        print(f"(load average now {os.getloadavg()[0]:.2f})", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"config": vars(args), **results}, indent=2))


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Discovery timing.")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rate", type=float, default=200.0, help="calls per second")
    parser.add_argument("--serve", type=float, default=0.5,
                        help="seconds each new instance serves before it is stopped")  # fmt: skip
    parser.add_argument("--backends", default="embedded",
                        help="embedded, zookeeper, or both (comma-separated)")  # fmt: skip
    parser.add_argument("--zk", metavar="HOSTS",
                        help="ZooKeeper ensemble (default: start a standalone server)")  # fmt: skip
    parser.add_argument("--zk-session-timeout", type=float, default=4.0)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    args.backends = [b for b in args.backends.split(",") if b]
    if bad := set(args.backends) - {"embedded", "zookeeper"}:
        parser.error(f"unknown backends {sorted(bad)}")
    if args.rounds < 1 or args.rate <= 0:
        parser.error("--rounds and --rate must be positive")
    return args


if __name__ == "__main__":
    arguments = parse()
    react(lambda reactor: ensureDeferred(main(reactor, arguments)))
