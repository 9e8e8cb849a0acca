"""
Chaos: a local cluster under a daemon, a fixed-rate load, and an instance
killed every few seconds; do the callers notice?

    python -m benchmarks.chaos [--rate 500] [--duration 60] [--interval 2] [--quiet 10]
        [--fibonacci 4] [--testservice 2] [--backends embedded,zookeeper] [--zk HOSTS]
        [--sigstop [--stop-seconds 10]] [--stable-after 1] [--seed N] [--json FILE]

For each backend (the embedded registry in a temporary directory; ZooKeeper:
a standalone server started with L{tests.zkserver}, or the ensemble C{--zk}
names, in a chroot of its own), this starts C{twistd skynet-daemon}, deploys
C{--fibonacci} Fibonacci and C{--testservice} TestService instances through
C{SkynetDaemon.Deploy}, and runs an open-loop load from this process: calls
are due at a fixed rate whatever the answers do (two thirds
C{Fibonacci.Index {index: 0..40}}, one third C{TestService.Upcase}), and each
call's latency counts from when it was due.  Every answer is checked.

  - quiet: C{--quiet} seconds of load, nothing killed;
  - chaos: C{--duration} seconds; every C{--interval} seconds a random
    instance gets SIGKILL.  The victim is one that is registered and whose
    service has another instance registered (killing the last one of a
    service is an outage, which no client can hide);
  - recovery: the load goes on until every killed instance is back in
    rotation (at most 20 s), and one more second.

C{--sigstop} replaces the kills: after the quiet phase one random instance is
SIGSTOPped (hung, not dead: its connections stay open and silent) for
C{--stop-seconds}, then SIGCONTed.

The client is L{skynet.client.Client} with its defaults (retry interval 2 s,
give-up 10 s), with a connector that records every attempt it sends to each
process (the connection's instance: uuid and pid).  From those records and
a watch on the registry, for each kill:

  - kill -> last attempt sent to the dead process;
  - kill -> out of this client's registry view (its node gone or replaced);
  - kill -> registered again (the daemon's restart: same uuid, new pid);
  - kill -> back in rotation (the first call answered by the new process).

The daemon runs with C{--stable-after} (default 1 s here, 10 s by default):
the monkey's kills are not a crash loop, and with 10 s an instance killed
twice within 10 s comes back only after 1, 2, 4 ... s of back-off.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import deferLater, react
from zope.interface import implementer

from benchmarks.backends import registry_backend
from skynet.client import Client, tcp_connector
from skynet.protocol import DEFAULT_MAX_FRAME
from skynet.registry import registry_from_url
from skynet.registry.base import IInstanceListener, Instance, Query

ROOT = Path(__file__).resolve().parent.parent

SERVICE_ARGS = ["--listen", "tcp:0:interface=127.0.0.1", "--stats-interval", "1"]
FIBONACCI = "examples.fibonacci:Fibonacci"
TESTSERVICE = "examples.testservice:TestService"

_FIB = [0, 1]
while len(_FIB) < 93:
    _FIB.append(_FIB[-1] + _FIB[-2])


def clock() -> float:
    return time.monotonic()


def percentile(values: list[float], fraction: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


# -- what the client sends where


class _Receiver:
    """
    Stands for an attempt in a connection's table of pending requests:
    notes the answer, then passes it on.
    """

    __slots__ = ("inner", "recorder", "pid", "sent")

    def __init__(self, inner: Any, recorder: Recorder, pid: int, sent: float) -> None:
        self.inner = inner
        self.recorder = recorder
        self.pid = pid
        self.sent = sent

    def callback(self, result: Any) -> None:
        self.recorder.answered.setdefault(self.pid, []).append((self.sent, clock()))
        self.inner.callback(result)

    def errback(self, error: Any) -> None:
        self.recorder.failed.append(clock())
        self.inner.errback(error)


class Recorder:
    """
    A connector for L{Client} that records, per process (the instance's
    pid in the registry), when attempts were sent to it, when connections
    to it were attempted, and when it answered.
    """

    def __init__(self, reactor: Any) -> None:
        self.inner = tcp_connector(reactor, 2.0, DEFAULT_MAX_FRAME)
        self.sent: dict[int, list[float]] = {}
        self.connects: dict[int, list[float]] = {}
        self.answered: dict[int, list[tuple[float, float]]] = {}  # (sent, answered)
        self.uuid_of: dict[int, str] = {}
        self.failed: list[float] = []

    def __call__(self, instance: Instance) -> Deferred:
        pid = instance.pid if instance.pid is not None else -instance.port
        self.uuid_of[pid] = instance.uuid
        self.connects.setdefault(pid, []).append(clock())
        sent = self.sent.setdefault(pid, [])

        def connected(protocol: Any) -> Any:
            send = protocol.send
            recorder = self

            def recording_send(method: str, params: bytes, info: Any, receiver: Any) -> int:
                now = clock()
                sent.append(now)
                return send(method, params, info, _Receiver(receiver, recorder, pid, now))

            protocol.send = recording_send
            return protocol

        return self.inner(instance).addCallback(connected)

    def sent_between(self, pid: int, start: float, end: float) -> list[float]:
        """
        When attempts were sent to C{pid} on a connection, in [start, end).
        """
        return [t for t in self.sent.get(pid, []) if start <= t < end]

    def attempts_between(self, start: float, end: float) -> dict[str, int]:
        """
        How many attempts were sent (to any process) in [start, end), how
        many failed (their connection died under them), and how many
        connections were attempted.
        """
        return {
            "attempts": sum(1 for ts in self.sent.values() for t in ts if start <= t < end),
            "failed_attempts": sum(1 for t in self.failed if start <= t < end),
            "connects": sum(1 for ts in self.connects.values() for t in ts if start <= t < end),
        }

    def connects_between(self, pid: int, start: float, end: float) -> list[float]:
        """
        When connections to C{pid} were attempted, in [start, end).
        """
        return [t for t in self.connects.get(pid, []) if start <= t < end]


@implementer(IInstanceListener)
class View:
    """
    This process's view of the registry: the current instance of each
    uuid, and every change with its time.
    """

    def __init__(self) -> None:
        self.current: dict[str, Instance] = {}
        self.events: list[tuple[float, str, str, int | None, bool]] = []
        self.ready = False

    def snapshot(self, instances: list[Instance]) -> None:
        for instance in instances:
            self.updated(instance)
        self.ready = True

    def added(self, instance: Instance) -> None:
        self.updated(instance)

    def updated(self, instance: Instance) -> None:
        self.current[instance.uuid] = instance
        self.events.append((clock(), "present", instance.uuid, instance.pid, instance.registered))

    def removed(self, instance: Instance) -> None:
        self.current.pop(instance.uuid, None)
        self.events.append((clock(), "removed", instance.uuid, instance.pid, False))

    def registered(self, uuids: list[str]) -> list[Instance]:
        return [self.current[u] for u in uuids if u in self.current and self.current[u].registered]

    def first_after(self, uuid: str, since: float, test: Any) -> float | None:
        for t, kind, u, pid, registered in self.events:
            if u == uuid and t >= since and test(kind, pid, registered):
                return t
        return None


# -- the load


class Load:
    """
    Open-loop calls at C{rate} per second: each call is due at its time,
    whatever the previous ones did, and its latency counts from then.
    """

    def __init__(self, reactor: Any, client: Client, rate: float, rng: random.Random,
                 services: tuple[str, ...] = ("Fibonacci", "Fibonacci", "TestService")) -> None:  # fmt: skip
        self.reactor = reactor
        self.rate = rate
        self.rng = rng
        self.clients = {name: client.service(name) for name in set(services)}
        self.services = services
        # (due, done, ok, what, error)
        self.records: list[tuple[float, float, bool, str, str]] = []
        self.outstanding = 0
        self.issued = 0
        self.running = False
        self.start_time = 0.0
        self._timer: Any = None
        self._idle: Deferred | None = None

    def start(self) -> None:
        self.running = True
        self.start_time = clock()
        self.issued = 0
        self._tick()

    def stop(self) -> Deferred:
        """
        Stop issuing calls; fires when every call issued has finished.
        """
        self.running = False
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._idle = Deferred()
        if not self.outstanding:
            self._idle.callback(None)
        return self._idle

    def _tick(self) -> None:
        self._timer = None
        if not self.running:
            return
        now = clock()
        due_count = int((now - self.start_time) * self.rate) + 1
        while self.issued < due_count:
            due = self.start_time + self.issued / self.rate
            self.issued += 1
            self._issue(due)
        next_due = self.start_time + self.issued / self.rate
        self._timer = self.reactor.callLater(max(0.0, next_due - clock()), self._tick)

    def _issue(self, due: float) -> None:
        service = self.services[self.issued % len(self.services)]
        if service == "Fibonacci":
            index = self.rng.randint(0, 40)
            d = self.clients[service].call("Index", {"index": index})
            expected: Any = {"index": index, "value": _FIB[index]}
            what = f"Fibonacci.Index {index}"
        else:
            data = f"chaos {self.issued}"
            d = self.clients[service].call("Upcase", {"data": data})
            expected = {"data": data.upper()}
            what = f"{service}.Upcase"
        self.outstanding += 1

        def done(result: Any) -> None:
            self.outstanding -= 1
            if isinstance(result, dict):
                ok = result == expected
                error = "" if ok else f"wrong answer {result!r:.100}"
            else:
                ok, error = False, f"{type(result.value).__name__}: {result.value}"
            self.records.append((due, clock(), ok, what, error))
            if not self.running and not self.outstanding and self._idle and not self._idle.called:
                self._idle.callback(None)

        d.addBoth(done)


def phase_figures(records: list[tuple[float, float, bool, str, str]], start: float,
                  end: float) -> dict[str, Any]:  # fmt: skip
    """
    Calls due in [start, end): how many, failed, latency percentiles (ms).
    """
    chosen = [r for r in records if start <= r[0] < end]
    latencies = [(r[1] - r[0]) * 1e3 for r in chosen]
    errors: dict[str, int] = {}
    for r in chosen:
        if not r[2]:
            errors[r[4][:120]] = errors.get(r[4][:120], 0) + 1
    return {
        "seconds": end - start,
        "calls": len(chosen),
        "failed": sum(1 for r in chosen if not r[2]),
        "p50_ms": percentile(latencies, 0.5),
        "p99_ms": percentile(latencies, 0.99),
        "max_ms": max(latencies) if latencies else None,
        "over_retry_interval": sum(1 for x in latencies if x >= 2000),
        "errors": errors,
        # The slowest calls (1 s or more), to tell what they were.
        "slow": [
            {"at_s": round(r[0] - start, 3), "call": r[3], "ms": round((r[1] - r[0]) * 1e3, 1)}
            for r in sorted(chosen, key=lambda r: r[0] - r[1])[:20]
            if r[1] - r[0] >= 1.0
        ],
    }


# -- the cluster


def _die_with_parent() -> list[str]:
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "KILL"] if setpriv else []


class Cluster:
    """
    A C{twistd skynet-daemon} on C{url}, the services it deploys, and this
    process's client and registry view.
    """

    def __init__(self, reactor: Any, url: str, workdir: Path, args: argparse.Namespace) -> None:
        self.reactor = reactor
        self.url = url
        self.workdir = workdir
        self.args = args
        self.daemon: subprocess.Popen | None = None
        self.log_path = workdir / "daemon.log"
        self.uuids: dict[str, str] = {}  # uuid -> service name
        self.recorder = Recorder(reactor)
        self.view = View()
        self.registry: Any = None
        self.client: Client | None = None
        self._watch: Any = None

    async def start(self) -> None:
        env = dict(os.environ, SKYNET_HOME=str(self.workdir), PYTHONUNBUFFERED="1")
        twistd = str(Path(sys.executable).parent / "twistd")
        command = _die_with_parent() + [
            twistd, "-n", "--pidfile=", "skynet-daemon", "--registry", self.url,
            "--listen", "tcp:0:interface=127.0.0.1", "--log-dir", str(self.workdir / "logs"),
            "--stats-interval", "1", "--stable-after", str(self.args.stable_after),
            "--stop-grace", "5", "--kill-time", "2",
        ]  # fmt: skip
        self.log = open(self.log_path, "ab")
        self.daemon = subprocess.Popen(command, cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                                       stdout=self.log, stderr=subprocess.STDOUT)  # fmt: skip
        self.registry = registry_from_url(self.url, self.reactor)
        await self.registry.start()
        self._watch = self.registry.watch(Query(), self.view)
        self.client = Client(registry=self.registry, reactor=self.reactor, connector=self.recorder)
        daemon_pid = self.daemon.pid

        def daemon_up() -> bool:
            return any(i.name == "SkynetDaemon" and i.pid == daemon_pid and i.registered
                       for i in self.view.current.values())  # fmt: skip

        await self.wait(daemon_up, 60, "the daemon registered")
        deploy = self.client.service("SkynetDaemon")
        wanted = [(FIBONACCI, "Fibonacci")] * self.args.fibonacci
        wanted += [(TESTSERVICE, "TestService")] * self.args.testservice
        for spec, name in wanted:
            result = await deploy.call("Deploy", {"service": spec, "args": SERVICE_ARGS})
            self.uuids[result["uuid"]] = name
        await self.wait(lambda: len(self.view.registered(list(self.uuids))) == len(self.uuids),
                        120, "every instance registered")  # fmt: skip

    async def wait(self, predicate: Any, timeout: float, what: str) -> None:
        deadline = clock() + timeout
        while not predicate():
            if self.daemon is not None and self.daemon.poll() is not None:
                raise RuntimeError(f"the daemon exited:\n{self.daemon_log()}")
            if clock() > deadline:
                raise RuntimeError(f"timed out after {timeout}s waiting for {what}\n"
                                   f"{self.daemon_log()}")  # fmt: skip
            await deferLater(self.reactor, 0.02, lambda: None)

    def daemon_log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def live(self) -> list[Instance]:
        """
        The deployed instances registered now, under a live process.
        """
        return [i for i in self.view.registered(list(self.uuids)) if _alive(i.pid)]

    async def stop(self) -> None:
        if self.client is not None:
            await self.client.stop()
        if self._watch is not None:
            self._watch.stop()
        if self.registry is not None:
            await self.registry.stop()
        if self.daemon is not None and self.daemon.poll() is None:
            self.daemon.terminate()
            deadline = clock() + 30
            while self.daemon.poll() is None and clock() < deadline:
                await deferLater(self.reactor, 0.1, lambda: None)
            if self.daemon.poll() is None:
                self.daemon.kill()
                self.daemon.wait(10)
        self.log.close()
        # Children the daemon could not stop (it was killed): by pid, ours only.
        for uuid in self.uuids:
            instance = self.view.current.get(uuid)
            if instance is not None and instance.pid and _alive(instance.pid):
                _signal(instance.pid, signal.SIGKILL)


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


# -- the runs


async def run_kills(reactor: Any, cluster: Cluster, args: argparse.Namespace,
                    rng: random.Random) -> dict[str, Any]:  # fmt: skip
    load = Load(reactor, cluster.client, args.rate, rng)  # type: ignore[arg-type]
    await warm_up(reactor, cluster)
    load.start()
    quiet_start = load.start_time
    await deferLater(reactor, args.quiet, lambda: None)
    chaos_start = clock()
    kills: list[dict[str, Any]] = []
    skipped = 0
    next_kill = chaos_start
    while next_kill < chaos_start + args.duration - 1e-6:
        await deferLater(reactor, max(0.0, next_kill - clock()), lambda: None)
        next_kill += args.interval
        victim = choose_victim(cluster, rng)
        if victim is None:
            skipped += 1
            continue
        killed_at = clock()
        _signal(victim.pid, signal.SIGKILL)  # type: ignore[arg-type]
        kills.append({"at": killed_at, "uuid": victim.uuid, "service": victim.name,
                      "pid": victim.pid})  # fmt: skip
    await deferLater(reactor, max(0.0, chaos_start + args.duration - clock()), lambda: None)
    chaos_end = clock()
    # Recovery: the load goes on until every victim answered again, and 1 s.
    deadline = clock() + 20
    while clock() < deadline and not all(back_in_rotation(cluster, k) for k in kills):
        await deferLater(reactor, 0.05, lambda: None)
    await deferLater(reactor, 1.0, lambda: None)
    recovery_end = clock()
    await load.stop()
    analysed = [analyse_kill(cluster, k) for k in kills]
    return {
        "phases": {
            "quiet": phase_figures(load.records, quiet_start, chaos_start),
            "chaos": phase_figures(load.records, chaos_start, chaos_end),
            "recovery": phase_figures(load.records, chaos_end, recovery_end),
        },
        "kills": analysed,
        "kills_skipped": skipped,
        "kill_summary": summarise_kills(analysed),
        "calls": len(load.records),
        **cluster.recorder.attempts_between(quiet_start, float("inf")),
    }


def choose_victim(cluster: Cluster, rng: random.Random) -> Instance | None:
    """
    A random live registered instance whose service has another one.
    """
    live = cluster.live()
    by_service: dict[str, int] = {}
    for instance in live:
        by_service[instance.name] = by_service.get(instance.name, 0) + 1
    candidates = sorted((i for i in live if by_service[i.name] > 1), key=lambda i: i.uuid)
    return rng.choice(candidates) if candidates else None


def back_in_rotation(cluster: Cluster, kill: dict[str, Any]) -> float | None:
    """
    When a new process of the killed uuid first answered a call.
    """
    recorder = cluster.recorder
    times = [
        t
        for pid, answered in recorder.answered.items()
        if pid != kill["pid"] and recorder.uuid_of.get(pid) == kill["uuid"]
        for _, t in answered
        if t >= kill["at"]
    ]
    return min(times) if times else None


def analyse_kill(cluster: Cluster, kill: dict[str, Any]) -> dict[str, Any]:
    at, uuid, pid = kill["at"], kill["uuid"], kill["pid"]
    recorder, view = cluster.recorder, cluster.view
    after = recorder.sent_between(pid, at, float("inf"))
    connects = recorder.connects_between(pid, at, float("inf"))
    # Attempts sent after the kill that the dead process answered: none, surely.
    answered_after = [t for sent, t in recorder.answered.get(pid, []) if sent > at]
    gone = view.first_after(uuid, at, lambda kind, p, reg: kind == "removed" or p != pid)
    again = view.first_after(uuid, at, lambda kind, p, reg: kind == "present" and p != pid
                             and reg)  # fmt: skip
    back = back_in_rotation(cluster, kill)

    def ms(t: float | None) -> float | None:
        return None if t is None else (t - at) * 1e3

    return {
        "service": kill["service"],
        "uuid": uuid,
        "pid": pid,
        "attempts_after_kill": len(after),
        "answered_after_kill": len(answered_after),
        "last_attempt_ms": ms(max(after)) if after else 0.0,
        "connects_after_kill": len(connects),
        "last_connect_ms": ms(max(connects)) if connects else None,
        "out_of_view_ms": ms(gone),
        "registered_again_ms": ms(again),
        "back_in_rotation_ms": ms(back),
    }


SUMMARY_KEYS = [
    ("last_attempt_ms", "kill -> last attempt sent to the dead process"),
    ("last_connect_ms", "kill -> last connection attempt to it (refused)"),
    ("out_of_view_ms", "kill -> out of the client's registry view"),
    ("registered_again_ms", "kill -> registered again (restarted, same uuid)"),
    ("back_in_rotation_ms", "kill -> back in rotation (first call answered)"),
]


def summarise_kills(kills: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for key, _ in SUMMARY_KEYS:
        values = [k[key] for k in kills if k[key] is not None]
        summary[key] = {
            "n": len(values),
            "missing": len(kills) - len(values),
            "median": percentile(values, 0.5),
            "p90": percentile(values, 0.9),
            "max": max(values) if values else None,
        }
    summary["attempts_after_kill"] = sum(k["attempts_after_kill"] for k in kills)
    summary["answered_after_kill"] = sum(k["answered_after_kill"] for k in kills)
    summary["connects_after_kill"] = sum(k["connects_after_kill"] for k in kills)
    return summary


async def warm_up(reactor: Any, cluster: Cluster) -> None:
    """
    Every instance answers (and every Fibonacci learns F(0..40)) before the
    measured load starts.
    """
    assert cluster.client is not None
    fib = cluster.client.service("Fibonacci")
    test = cluster.client.service("TestService")
    for _ in range(3):
        for index in range(0, 41, 4):
            await fib.call("Index", {"index": index})
        await test.call("Upcase", {"data": "warm"})
    deadline = clock() + 30
    while clock() < deadline:
        answered = {cluster.recorder.uuid_of.get(p) for p in cluster.recorder.answered}
        if all(u in answered for u in cluster.uuids):
            return
        for index in range(0, 41, 8):
            await fib.call("Index", {"index": index})
        await test.call("Upcase", {"data": "warm"})


async def run_sigstop(reactor: Any, cluster: Cluster, args: argparse.Namespace,
                      rng: random.Random) -> dict[str, Any]:  # fmt: skip
    load = Load(reactor, cluster.client, args.rate, rng)  # type: ignore[arg-type]
    await warm_up(reactor, cluster)
    load.start()
    quiet_start = load.start_time
    await deferLater(reactor, args.quiet, lambda: None)
    victim = choose_victim(cluster, rng)
    if victim is None:
        raise RuntimeError("no instance to stop")
    pid = victim.pid
    stopped_at = clock()
    _signal(pid, signal.SIGSTOP)  # type: ignore[arg-type]
    try:
        await deferLater(reactor, args.stop_seconds, lambda: None)
    finally:
        _signal(pid, signal.SIGCONT)  # type: ignore[arg-type]
    resumed_at = clock()
    await deferLater(reactor, args.after, lambda: None)
    after_end = clock()
    await load.stop()
    recorder = cluster.recorder
    sent = recorder.sent_between(pid, stopped_at, resumed_at)  # type: ignore[arg-type]
    seconds = [0] * int(args.stop_seconds + 1)
    for t in sent:
        seconds[min(len(seconds) - 1, int(t - stopped_at))] += 1
    after = recorder.sent_between(pid, resumed_at, after_end)  # type: ignore[arg-type]
    answered = [t for sent_at, t in recorder.answered.get(pid, []) if sent_at >= resumed_at]  # type: ignore[arg-type]
    share = [
        len(recorder.sent_between(p, stopped_at, resumed_at))
        for p in recorder.sent
        if recorder.uuid_of.get(p) in cluster.uuids
        and cluster.uuids[recorder.uuid_of[p]] == victim.name
    ]
    return {
        "victim": {"service": victim.name, "uuid": victim.uuid, "pid": pid},
        "phases": {
            "quiet": phase_figures(load.records, quiet_start, stopped_at),
            "stopped": phase_figures(load.records, stopped_at, resumed_at),
            "after": phase_figures(load.records, resumed_at, after_end),
        },
        "attempts_to_stopped": len(sent),
        "attempts_to_service_while_stopped": sum(share),
        "attempts_to_stopped_per_second": seconds,
        "attempts_after_resume": len(after),
        "first_answer_after_resume_ms": (min(answered) - resumed_at) * 1e3 if answered else None,
        "calls": len(load.records),
        **recorder.attempts_between(quiet_start, float("inf")),
    }


# -- backends and the report


async def run_backend(reactor: Any, backend: str, args: argparse.Namespace) -> dict[str, Any]:
    async with registry_backend(backend, args.zk, "chaos") as (url, workdir):
        cluster = Cluster(reactor, url, workdir, args)
        rng = random.Random(args.seed)
        try:
            await cluster.start()
            if args.sigstop:
                result = await run_sigstop(reactor, cluster, args, rng)
            else:
                result = await run_kills(reactor, cluster, args, rng)
        finally:
            await cluster.stop()
        result["backend"] = backend
        return result


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if value < 100 else f"{value:.0f}"


def format_report(result: dict[str, Any], args: argparse.Namespace) -> str:
    lines = []
    if args.sigstop:
        v = result["victim"]
        lines.append(
            f"{result['backend']}: {args.rate:g} calls/s; {v['service']} {v['uuid'][:8]} "
            f"(pid {v['pid']}) SIGSTOPped for {args.stop_seconds:g} s after {args.quiet:g} s"
        )
    else:
        lines.append(
            f"{result['backend']}: {args.rate:g} calls/s; {len(result['kills'])} SIGKILLs, one "
            f"every {args.interval:g} s for {args.duration:g} s after {args.quiet:g} s quiet "
            f"({result['kills_skipped']} skipped: no instance to spare); "
            f"daemon --stable-after {args.stable_after:g}"
        )
    lines.append(f"{'phase':10}{'calls':>8}{'failed':>8}{'p50 ms':>9}{'p99 ms':>9}"
                 f"{'max ms':>9}{'>= 2 s':>8}")  # fmt: skip
    for name, p in result["phases"].items():
        lines.append(f"{name:10}{p['calls']:8}{p['failed']:8}{_ms(p['p50_ms']):>9}"
                     f"{_ms(p['p99_ms']):>9}{_ms(p['max_ms']):>9}"
                     f"{p['over_retry_interval']:8}")  # fmt: skip
        for error, count in p["errors"].items():
            lines.append(f"    {count} x {error}")
    if args.sigstop:
        per_second = " ".join(str(n) for n in result["attempts_to_stopped_per_second"])
        lines.append(
            f"attempts sent to the stopped process while stopped: "
            f"{result['attempts_to_stopped']} of {result['attempts_to_service_while_stopped']} "
            f"to its service (per second: {per_second})"
        )
        lines.append(
            f"after SIGCONT: {result['attempts_after_resume']} attempts sent to it in "
            f"{args.after:g} s; first answer {_ms(result['first_answer_after_resume_ms'])} ms "
            f"after SIGCONT"
        )
    else:
        summary = result["kill_summary"]
        lines.append(f"{'per kill, ms':50}{'median':>9}{'p90':>9}{'max':>9}")
        for key, label in SUMMARY_KEYS:
            s = summary[key]
            never = "without one" if key == "last_connect_ms" else "never"
            missing = f"  ({s['missing']} {never})" if s["missing"] else ""
            lines.append(f"{label:50}{_ms(s['median']):>9}{_ms(s['p90']):>9}"
                         f"{_ms(s['max']):>9}{missing}")  # fmt: skip
        lines.append(
            f"attempts sent to dead processes after their kill: "
            f"{summary['attempts_after_kill']} (answered by the dead: "
            f"{summary['answered_after_kill']}); connection attempts to them, refused: "
            f"{summary['connects_after_kill']}"
        )
    lines.append(
        f"attempts: {result['attempts']} for {result['calls']} calls "
        f"({result['failed_attempts']} failed with their connection, then retried at once); "
        f"{result['connects']} connections opened or tried"
    )
    return "\n".join(lines)


async def main(reactor: Any, args: argparse.Namespace) -> None:
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores, "
          f"load {os.getloadavg()[0]:.2f}", flush=True)  # fmt: skip
    results = {}
    for backend in args.backends:
        result = await run_backend(reactor, backend, args)
        results[backend] = result
        print(format_report(result, args), flush=True)
        print(f"(load average now {os.getloadavg()[0]:.2f})", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"config": vars(args), **results}, indent=2))


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Chaos: kill instances under load.")
    parser.add_argument("--rate", type=float, default=500.0, help="calls per second")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of chaos")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between kills")
    parser.add_argument("--quiet", type=float, default=10.0, help="seconds of load before")
    parser.add_argument("--fibonacci", type=int, default=4)
    parser.add_argument("--testservice", type=int, default=2)
    parser.add_argument("--backends", default="embedded",
                        help="embedded, zookeeper, or both (comma-separated)")  # fmt: skip
    parser.add_argument("--zk", metavar="HOSTS",
                        help="ZooKeeper ensemble (default: start a standalone server)")  # fmt: skip
    parser.add_argument("--sigstop", action="store_true",
                        help="SIGSTOP one instance instead of killing")  # fmt: skip
    parser.add_argument("--stop-seconds", type=float, default=10.0)
    parser.add_argument("--after", type=float, default=5.0,
                        help="seconds of load after SIGCONT (--sigstop)")  # fmt: skip
    parser.add_argument("--stable-after", type=float, default=1.0,
                        help="the daemon's --stable-after")  # fmt: skip
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    args.backends = [b for b in args.backends.split(",") if b]
    if bad := set(args.backends) - {"embedded", "zookeeper"}:
        parser.error(f"unknown backends {sorted(bad)}")
    if args.rate <= 0 or args.interval <= 0 or args.duration < 0 or args.quiet < 0:
        parser.error("--rate and --interval must be positive, --duration and --quiet not negative")
    if args.fibonacci < 1 or args.testservice < 1:
        parser.error("at least one instance of each service")
    return args


if __name__ == "__main__":
    arguments = parse()
    react(lambda reactor: ensureDeferred(main(reactor, arguments)))
