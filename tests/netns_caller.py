"""
Steady client load for the end-to-end ZooKeeper tests, and a caller process
that runs it on another "host" (a network namespace).

L{SteadyLoad} calls a service at a fixed offered rate (open loop: a call is
sent on schedule whether or not earlier ones have answered) and counts
answers and failures.  The tests use it in their own process, and

    ip netns exec NS python -m tests.netns_caller --registry zk://... \\
        --service TestService [--rate 200] [--wait-instances 2]

runs it in a namespace: it prints one JSON document per line on stdout,

    {"event": "hosts", "t": <monotonic>, "hosts": [...]}   the hosts the client
        has in rotation, whenever they change (checked every 20 ms)
    {"event": "started", "t": ...}     the load has started
    {"event": "done", ...}             L{SteadyLoad.report}, at the end

and stops when its stdin closes.  C{t} is C{time.monotonic()}, one clock
for every process on the machine, whatever their namespace.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import Counter
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, ensureDeferred
from twisted.internet.protocol import Protocol
from twisted.internet.task import LoopingCall, deferLater, react

from skynet.client import Client, ServiceClient

#: How often the load generator sends the calls that are due.
TICK = 0.005


class SteadyLoad:
    """
    Calls C{Upcase} on a L{ServiceClient} at C{rate} calls per second (with
    the client's default retries), checking every answer.

    @ivar issued: calls sent so far.
    @ivar ok: calls answered correctly.
    @ivar failures: one line per failed or wrong call.
    """

    def __init__(self, service: ServiceClient, rate: float, reactor: Any) -> None:
        self.service = service
        self.rate = rate
        self.reactor = reactor
        self.issued = 0
        self.ok = 0
        self.failures: list[str] = []
        self.slowest = 0.0
        self.over_one_second = 0
        self.per_second: Counter[int] = Counter()
        self.latencies: Counter[str] = Counter()
        self.started = 0.0
        self.stopped = 0.0
        self._in_flight: set[Deferred] = set()
        self._loop = LoopingCall(self._tick)
        self._loop.clock = reactor

    def start(self) -> None:
        self.started = self.reactor.seconds()
        self._loop.start(TICK, now=True)

    def _tick(self) -> None:
        # Catch up on the calls due by now, however late this tick is.
        due = int((self.reactor.seconds() - self.started) * self.rate) - self.issued
        for _ in range(due):
            self._send()

    def _send(self) -> None:
        n = self.issued
        self.issued += 1
        data = f"call {n}"
        sent = self.reactor.seconds()
        d = self.service.call("Upcase", {"data": data})
        self._in_flight.add(d)

        def answered(result: dict[str, Any]) -> None:
            self._in_flight.discard(d)
            now = self.reactor.seconds()
            elapsed = now - sent
            self.slowest = max(self.slowest, elapsed)
            if elapsed > 1.0:
                self.over_one_second += 1
            self.latencies[_bucket(elapsed)] += 1
            if result == {"data": data.upper()}:
                self.ok += 1
                self.per_second[int(now - self.started)] += 1
            else:
                self.failures.append(f"call {n}: wrong answer {result!r}")

        def failed(failure: Any) -> None:
            self._in_flight.discard(d)
            self.failures.append(f"call {n}: {failure.value!r}")

        d.addCallbacks(answered, failed)

    async def stop(self) -> dict[str, Any]:
        """
        Stop sending, wait for the calls in flight to end (they end within
        the client's give-up timeout), and return L{report}.
        """
        if self._loop.running:
            self._loop.stop()
        self.stopped = self.reactor.seconds()
        while self._in_flight:
            await DeferredList(list(self._in_flight), consumeErrors=True)
        return self.report()

    def report(self) -> dict[str, Any]:
        duration = (self.stopped or self.reactor.seconds()) - self.started
        whole_seconds = [self.per_second[s] for s in range(int(duration))]
        return {
            "issued": self.issued,
            "ok": self.ok,
            "failed": len(self.failures),
            "failures": self.failures[:10],
            "duration": round(duration, 3),
            "offered_per_second": round(self.issued / duration, 1) if duration else 0.0,
            "answered_per_second": round(self.ok / duration, 1) if duration else 0.0,
            "fewest_answers_in_a_second": min(whole_seconds) if whole_seconds else None,
            "slowest_call": round(self.slowest, 3),
            "calls_over_one_second": self.over_one_second,
            "latencies": {b: self.latencies[b] for b in BUCKETS if self.latencies[b]},
        }


#: Latency buckets of L{SteadyLoad.report}, by upper bound in seconds.
BUCKETS = {"<0.1s": 0.1, "<1s": 1.0, "<2.5s": 2.5, "<4.5s": 4.5, "<10s": 10.0, ">=10s": math.inf}


def _bucket(elapsed: float) -> str:
    for name, bound in BUCKETS.items():
        if elapsed < bound:
            return name
    return ">=10s"


def emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


class _StdinWatch(Protocol):
    def __init__(self) -> None:
        self.closed: Deferred = Deferred()

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Any = None) -> None:
        if not self.closed.called:
            self.closed.callback(None)


async def run(reactor: Any, args: argparse.Namespace) -> None:
    from twisted.internet.stdio import StandardIO

    stdin = _StdinWatch()
    StandardIO(stdin, reactor=reactor)
    client = Client(registry=args.registry, reactor=reactor)
    service = client.service(args.service)
    hosts: list[str] | None = None

    def check_hosts() -> None:
        nonlocal hosts
        now = sorted(h.instance.host for h in service.handles.values())
        if now != hosts:
            hosts = now
            emit(event="hosts", t=time.monotonic(), hosts=now)

    watcher = LoopingCall(check_hosts)
    watcher.clock = reactor
    watcher.start(0.02)
    deadline = time.monotonic() + args.max_seconds
    while len(service.handles) < args.wait_instances and not stdin.closed.called:
        if time.monotonic() > deadline:
            break
        await deferLater(reactor, 0.02, lambda: None)
    check_hosts()  # the hosts the load starts with, reported before it starts
    load = SteadyLoad(service, args.rate, reactor)
    load.start()
    emit(event="started", t=time.monotonic())
    limit = reactor.callLater(args.max_seconds, stdin.connectionLost)
    await stdin.closed
    if limit.active():
        limit.cancel()
    report = await load.stop()
    watcher.stop()
    check_hosts()
    emit(event="done", t=time.monotonic(), **report)
    await client.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Call a service at a steady rate.")
    parser.add_argument("--registry", required=True, help="registry URL")
    parser.add_argument("--service", default="TestService")
    parser.add_argument("--rate", type=float, default=200.0, help="calls per second")
    parser.add_argument(
        "--wait-instances", type=int, default=1, help="instances to know before calling"
    )
    parser.add_argument(
        "--max-seconds", type=float, default=120.0, help="stop after this long regardless"
    )
    args = parser.parse_args(argv)
    react(lambda reactor: ensureDeferred(run(reactor, args)))


if __name__ == "__main__":
    main(sys.argv[1:])
