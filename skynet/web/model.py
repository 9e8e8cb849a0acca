"""
The dashboard's live model of a cluster.

L{DashboardModel} watches every instance in a registry, reads each
instance's statistics node at the stats interval, and keeps, in this
process:

  - one row per instance (what the page's tables show);
  - one header per host, from the skynet daemon running there, if any;
  - time series per instance, per service and per host, for the last
    C{history} seconds (15 minutes by default);
  - a list of recent events (instances added, removed, restarted,
    registered, unregistered; actions taken through the dashboard).

Changes are collected and pushed to subscribers (the page's WebSockets) as
one JSON-ready delta message per C{push_interval}: only the fields that
changed, the rows that went away, the new events and the new points of the
time series.  A subscriber first gets L{DashboardModel.snapshot}; deltas
carry absolute values (never increments), so applying one twice is
harmless, and events and points carry ids and times to drop duplicates.
"""

from __future__ import annotations

import math
import secrets
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredList,
    DeferredSemaphore,
    ensureDeferred,
    succeed,
)
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from skynet._services import RetryingStart
from skynet.config import default_reactor
from skynet.registry.base import IInstanceListener, Instance, Query, parse_go_time
from skynet.web.deltas import Changes
from skynet.web.hosts import DAEMON_SERVICE, Daemons

#: Fields of one point of an instance's or a service's series.
INSTANCE_FIELDS = ("rps", "p50", "p99", "eps", "cpu", "rss")
#: Fields of one point of a host's series.
HOST_FIELDS = ("cpu", "mem", "load", "rss")

#: Upper bounds, in seconds, of the latency histogram's buckets.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                   5.0, 10.0)  # fmt: skip

#: An instance seen again this soon after its removal was restarted.
RESTART_WINDOW = 120.0

#: Seconds of readings that rates are computed over.
RATE_WINDOW = 10.0

#: Statistics unchanged this long mean no requests are being counted.
STALE_AFTER = 30.0

#: How many events the model keeps, and how many a snapshot carries.
MAX_EVENTS = 1000
SNAPSHOT_EVENTS = 200


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _int(value: Any) -> int | None:
    number = _number(value)
    return None if number is None else int(number)


def _ms(ns: Any) -> float | None:
    value = _number(ns)
    return None if value is None else round(value / 1e6, 3)


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def latency_fraction_below(bound: float, p50: float, p99: float) -> float:
    """
    An estimate of the fraction of requests faster than C{bound} seconds,
    from what a statistics node tells: the median and the 99th percentile.
    The distribution is taken as piecewise linear through (0, 0),
    (p50, 0.5), (p99, 0.99) and (2 x p99, 1).
    """
    points = [(0.0, 0.0), (p50, 0.5), (max(p99, p50), 0.99), (max(2 * p99, p50), 1.0)]
    if bound >= points[-1][0]:
        return 1.0
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        if bound < x1:
            if x1 <= x0:
                return y0
            return y0 + (y1 - y0) * (bound - x0) / (x1 - x0)
    return 1.0


class Series:
    """
    A time series of fixed-width points, kept for C{history} seconds.
    """

    def __init__(self, history: float, interval: float) -> None:
        self.history = history
        self.points: deque[tuple[float, tuple[float | None, ...]]] = deque(
            maxlen=max(16, int(history / max(interval, 0.05) * 1.5) + 8)
        )

    def append(self, t: float, values: tuple[float | None, ...]) -> None:
        self.points.append((t, values))
        horizon = t - self.history
        while self.points and self.points[0][0] < horizon:
            self.points.popleft()

    def to_json(self) -> dict[str, Any]:
        return {"t": [round(t, 3) for t, _ in self.points], "v": [list(v) for _, v in self.points]}


class InstanceState:
    """
    What the dashboard knows of one instance.

    @ivar rps: requests per second over the last L{RATE_WINDOW} seconds of
        readings of its statistics; C{eps} likewise for errors.
    @ivar buckets: the estimated cumulative latency histogram (counts per
        bucket of L{LATENCY_BUCKETS}), growing with C{RequestsServed}.
    """

    def __init__(self, instance: Instance, now: float) -> None:
        self.instance = instance
        self.first_seen = now
        self.stats: dict[str, Any] | None = None
        self.changed_at = now
        self.requests: int | None = None
        self.errors: int | None = None
        self.rps = 0.0
        self.eps = 0.0
        self.readings: deque[tuple[float, int | None, int | None]] = deque(maxlen=512)
        self.cpu: float | None = None
        self.rss: int | None = None
        self.daemon: str | None = None
        self.buckets = [0] * len(LATENCY_BUCKETS)
        self.histogram_count = 0

    @property
    def uuid(self) -> str:
        return self.instance.uuid

    def observe(self, stats: dict[str, Any], now: float) -> bool:
        """
        Take a freshly read statistics node.  @return: whether it changed.

        Rates are the counters' growth since the oldest reading of the last
        L{RATE_WINDOW} seconds (at least the previous one): the instance
        publishes on its own schedule, so one interval between two readings
        says little; several smooth that out.
        """
        if stats == self.stats:
            if now - self.changed_at > STALE_AFTER:
                self.rps = self.eps = 0.0
            return False
        previous_start = (self.stats or {}).get("StartTime")
        self.stats = stats
        requests = _int(stats.get("RequestsServed"))
        errors = _int(stats.get("Errors"))
        restarted = previous_start is not None and stats.get("StartTime") != previous_start
        reset = (
            restarted
            or not self.readings
            or (requests is not None and (self.requests is None or requests < self.requests))
            or (errors is not None and self.errors is not None and errors < self.errors)
        )
        if reset:
            self.readings.clear()
            self.rps = self.eps = 0.0
            self._reset_histogram()
            if requests is not None:
                self._histogram_add(requests)
        elif requests is not None and self.requests is not None:
            self._histogram_add(requests - self.requests)
        self.readings.append((now, requests, errors))
        readings = self.readings
        while len(readings) > 2 and readings[1][0] <= now - RATE_WINDOW:
            readings.popleft()
        since, base_requests, base_errors = readings[0]
        elapsed = now - since
        if elapsed > 0:
            if requests is not None and base_requests is not None:
                self.rps = (requests - base_requests) / elapsed
            if errors is not None and base_errors is not None:
                self.eps = (errors - base_errors) / elapsed
        self.requests = requests if requests is not None else self.requests
        self.errors = errors if errors is not None else self.errors
        self.changed_at = now
        return True

    def _reset_histogram(self) -> None:
        self.buckets = [0] * len(LATENCY_BUCKETS)
        self.histogram_count = 0

    def _histogram_add(self, count: int) -> None:
        if count <= 0:
            return
        stats = self.stats or {}
        p50 = (_number(stats.get("P50ResponseTime")) or 0) / 1e9
        p99 = (_number(stats.get("P99ResponseTime")) or 0) / 1e9
        if not p50 and not p99:
            p50 = p99 = (_number(stats.get("AverageResponseTime")) or 0) / 1e9
        for i, bound in enumerate(LATENCY_BUCKETS):
            self.buckets[i] += round(count * latency_fraction_below(bound, p50, p99))
        self.histogram_count += count
        # Rounding per bucket may not be monotone across buckets: fix it up.
        for i in range(1, len(self.buckets)):
            if self.buckets[i] < self.buckets[i - 1]:
                self.buckets[i] = self.buckets[i - 1]
        for i, value in enumerate(self.buckets):
            if value > self.histogram_count:
                self.buckets[i] = self.histogram_count

    @property
    def start_time(self) -> float | None:
        return parse_go_time((self.stats or {}).get("StartTime"))

    def point(self) -> tuple[float | None, ...]:
        stats = self.stats or {}
        return (
            _round(self.rps),
            _ms(stats.get("P50ResponseTime")),
            _ms(stats.get("P99ResponseTime")),
            _round(self.eps),
            _round(self.cpu, 2),
            self.rss,
        )

    def row(self) -> dict[str, Any]:
        """
        The instance as the page shows it (JSON-ready).
        """
        instance = self.instance
        stats = self.stats or {}
        admin = instance.admin
        return {
            "uuid": instance.uuid,
            "service": instance.name,
            "version": instance.version,
            "region": instance.region,
            "host": instance.host,
            "port": instance.port,
            "address": f"{instance.host}:{instance.port}",
            "admin": f"{admin.ip_address}:{admin.port}" if admin is not None else None,
            "pid": instance.pid,
            # The instance node, not the statistics (which lag), says whether
            # clients may use it.
            "registered": instance.registered,
            "clients": _number(stats.get("Clients")),
            "start": self.start_time,
            "last_request": parse_go_time(stats.get("LastRequest")),
            "requests": self.requests,
            "rps": _round(self.rps, 2),
            "avg_ms": _ms(stats.get("AverageResponseTime")),
            "p50_ms": _ms(stats.get("P50ResponseTime")),
            "p99_ms": _ms(stats.get("P99ResponseTime")),
            "errors": self.errors,
            "in_flight": _number(stats.get("InFlight")),
            "cpu": _round(self.cpu, 1),
            "rss": self.rss,
            "daemon": self.daemon,
            "is_daemon": instance.name == DAEMON_SERVICE,
        }


@implementer(IInstanceListener)
class DashboardModel(Service):
    """
    The live model behind the dashboard (an C{IService}).

    (About 440 lines: the registry listener, the sweep and the page's
    messages all work on the one instance table; the pieces that need it
    less live apart: L{Changes} makes the deltas, L{Daemons} reads the
    hosts' daemons, L{record_points} grows the series.)

    @param registry: an L{skynet.registry.IRegistry}.
    @param stats_interval: seconds between reads of every statistics node
        (and between points of the time series).
    @param history: seconds of time series to keep.
    @param push_interval: seconds over which changes are gathered into one
        delta message.
    @param own_registry: start and stop C{registry} with this service.
    """

    log = Logger()

    def __init__(
        self,
        registry: Any,
        *,
        reactor: Any = None,
        stats_interval: float = 2.0,
        history: float = 900.0,
        push_interval: float = 0.25,
        own_registry: bool = False,
        max_concurrent_reads: int = 64,
    ) -> None:
        self.reactor = default_reactor(reactor)
        self.registry = registry
        self.stats_interval = stats_interval
        self.history = history
        self.push_interval = push_interval
        self.own_registry = own_registry
        self.instances: dict[str, InstanceState] = {}
        self.series: dict[str, Series] = {}
        self.events: deque[dict[str, Any]] = deque(maxlen=MAX_EVENTS)
        self.synced = False
        self.sweeps = 0
        #: Tells a reconnecting page whether it is talking to the same process.
        self.server_id = secrets.token_hex(8)
        self._semaphore = DeferredSemaphore(max_concurrent_reads)
        self._recently_removed: dict[str, float] = {}
        self.daemons = Daemons()
        self._next_event_id = 1
        self._watch: Any = None
        self._registry_start: RetryingStart | None = None
        self._started_waiters: list[Deferred] = []
        self._loop: LoopingCall | None = None
        self._sweeping: Deferred | None = None
        self._subscribers: list[Callable[[dict[str, Any]], None]] = []
        self._push_call: Any = None
        self.changes = Changes()
        self._sweep_listeners: list[Callable[[], None]] = []

    # IService

    def startService(self) -> None:
        super().startService()
        if not self.own_registry:
            self._open()
            return
        # A dashboard started before its ZooKeeper keeps trying.
        self._registry_start = RetryingStart(
            self.registry.start,
            self.registry.stop,
            what=f"start the registry {getattr(self.registry, 'url', self.registry)}",
            reactor=self.reactor,
        )
        self._registry_start.startService()
        d = self._registry_start.when_started()
        d.addCallbacks(lambda _: self._open(), lambda f: f.trap(CancelledError))
        d.addErrback(lambda f: self.log.failure("opening the dashboard's watch failed", f))

    def when_started(self) -> Deferred:
        """
        Fires once the model watches the registry (its registry started,
        if it owns it).
        """
        if self._watch is not None:
            return succeed(None)
        d: Deferred = Deferred()
        self._started_waiters.append(d)
        return d

    def _open(self) -> None:
        if not self.running:
            return
        self._watch = self.registry.watch(Query(), self)
        self._loop = LoopingCall(self.sweep)
        self._loop.clock = self.reactor
        self._loop.start(self.stats_interval, now=True).addErrback(
            lambda f: self.log.failure("statistics sweep loop failed", f)
        )
        waiters, self._started_waiters = self._started_waiters, []
        for d in waiters:
            d.callback(None)

    def stopService(self) -> Deferred:  # type: ignore[override]
        super().stopService()
        return ensureDeferred(self._stop())

    async def _stop(self) -> None:
        if self._watch is not None:
            self._watch.stop()
            self._watch = None
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self._push_call is not None and self._push_call.active():
            self._push_call.cancel()
        self._push_call = None
        if self._sweeping is not None:
            await self._sweeping
        if self._registry_start is not None:
            await self._registry_start.stopService()
            self._registry_start = None

    # IInstanceListener

    def snapshot(self, instances: list[Instance]) -> None:
        now = self.reactor.seconds()
        for instance in instances:
            self.instances[instance.uuid] = InstanceState(instance, now)
            self.changes.dirty_rows[instance.uuid] = None
        self.synced = True
        if instances:
            count = len(instances)
            what = "instance" if count == 1 else "instances"
            self.add_event("snapshot", f"watching {count} {what}", now=now)
        self._poll_new([i.uuid for i in instances])
        self._schedule_push()

    def added(self, instance: Instance) -> None:
        now = self.reactor.seconds()
        self.instances[instance.uuid] = InstanceState(instance, now)
        self.changes.dirty_rows[instance.uuid] = None
        self.changes.removed_rows.discard(instance.uuid)
        removed_at = self._recently_removed.pop(instance.uuid, None)
        if removed_at is not None and now - removed_at < RESTART_WINDOW:
            self.add_event("restarted", "{service} {address} restarted", instance, now=now)
        else:
            state = "" if instance.registered else " (unregistered)"
            self.add_event("added", "{service} {address} appeared" + state, instance, now=now)
        self._poll_new([instance.uuid])
        self._schedule_push()

    def updated(self, instance: Instance) -> None:
        state = self.instances.get(instance.uuid)
        if state is None:
            self.added(instance)
            return
        before = state.instance
        state.instance = instance
        if before.registered != instance.registered:
            kind = "registered" if instance.registered else "unregistered"
            self.add_event(kind, "{service} {address} " + kind, instance)
        self.changes.dirty_rows[instance.uuid] = None
        self._schedule_push()

    def removed(self, instance: Instance) -> None:
        state = self.instances.pop(instance.uuid, None)
        if state is None:
            return
        now = self.reactor.seconds()
        self._recently_removed[instance.uuid] = now
        self.changes.dirty_rows.pop(instance.uuid, None)
        self.changes.removed_rows.add(instance.uuid)
        self.series.pop(f"i:{instance.uuid}", None)
        if instance.name == DAEMON_SERVICE:
            self.daemons.forget(instance.uuid)
            self._refresh_hosts()
        self.add_event("removed", "{service} {address} disappeared", instance, now=now)
        self._schedule_push()

    # Events

    def add_event(
        self,
        kind: str,
        text: str,
        instance: Instance | None = None,
        *,
        now: float | None = None,
        **fields: Any,
    ) -> dict[str, Any]:
        """
        Record an event; C{text} may name C{{service}}, C{{address}},
        C{{uuid}} and C{{host}} of C{instance}.
        """
        event: dict[str, Any] = {
            "id": self._next_event_id,
            "time": round(self.reactor.seconds() if now is None else now, 3),
            "kind": kind,
        }
        self._next_event_id += 1
        if instance is not None:
            names = {
                "service": instance.name,
                "address": f"{instance.host}:{instance.port}",
                "uuid": instance.uuid,
                "host": instance.host,
            }
            event.update(names, region=instance.region)
            for name, value in names.items():
                text = text.replace("{" + name + "}", value)
        event["text"] = text
        event.update(fields)
        self.events.append(event)
        self.changes.events.append(event)
        self.log.info(
            "dashboard event {kind}: {text}", kind=kind, text=text, uuid=event.get("uuid")
        )
        self._schedule_push()
        return event

    # Statistics

    def sweep(self) -> Deferred:
        """
        Read every instance's statistics node, then add one point to every
        time series.  @return: a Deferred firing when done.
        """
        if self._sweeping is not None:
            return self._sweeping
        self._sweeping = ensureDeferred(self._sweep())

        def done(result: Any) -> Any:
            self._sweeping = None
            return result

        return self._sweeping.addBoth(done)

    async def _sweep(self) -> None:
        uuids = list(self.instances)
        await self._read_stats(uuids)
        now = self.reactor.seconds()
        for uuid in list(self._recently_removed):
            if now - self._recently_removed[uuid] > RESTART_WINDOW:
                del self._recently_removed[uuid]
        self._apply_daemons()
        self._record_points(now)
        self.sweeps += 1
        self._schedule_push()
        for listener in list(self._sweep_listeners):
            listener()

    def on_sweep(self, listener: Callable[[], None]) -> Callable[[], None]:
        """
        Call C{listener()} after every sweep.  @return: a function removing it.
        """
        self._sweep_listeners.append(listener)
        return lambda: self._sweep_listeners.remove(listener)

    def _poll_new(self, uuids: list[str]) -> None:
        """
        Read the statistics of instances just seen, so that their rows
        fill in without waiting for the next sweep.
        """
        if uuids and self.running:
            d = self._read_stats(uuids).addCallback(lambda _: self._apply_daemons())
            d.addErrback(lambda f: self.log.failure("reading new instances failed", f))

    def _read_stats(self, uuids: Iterable[str]) -> Deferred:
        reads = []
        for uuid in uuids:
            state = self.instances.get(uuid)
            if state is not None:
                reads.append(self._semaphore.run(self._read_one, state))
        return DeferredList(reads, consumeErrors=True)

    def _read_one(self, state: InstanceState) -> Deferred:
        d = self.registry.get_stats(state.instance)

        def got(stats: Any) -> None:
            if not isinstance(stats, dict) or self.instances.get(state.uuid) is not state:
                return
            before_start = state.start_time
            if state.observe(stats, self.reactor.seconds()):
                if before_start is not None and state.start_time not in (None, before_start):
                    self.add_event("restarted", "{service} {address} restarted", state.instance)
                self.changes.dirty_rows[state.uuid] = None
                if state.instance.name == DAEMON_SERVICE:
                    self._read_daemon(state.uuid, stats)

        def failed(failure: Any) -> None:
            self.log.debug(
                "cannot read the statistics of {uuid}: {error}",
                uuid=state.uuid,
                error=failure.value,
            )

        return d.addCallbacks(got, failed)

    def _read_daemon(self, uuid: str, stats: dict[str, Any]) -> None:
        try:
            self.daemons.read(uuid, stats)
        except ValueError as e:
            # Not the daemon contract: keep what we knew, say why.
            self.log.warn("cannot read the statistics of daemon {uuid}: {error}",
                          uuid=uuid, error=e)  # fmt: skip

    @property
    def hosts(self) -> dict[str, dict[str, Any]]:
        """
        Host name -> its header, from the daemon running there.
        """
        return self.daemons.headers

    def _apply_daemons(self) -> None:
        """
        Give each supervised instance its CPU and RSS from its daemon, and
        each host its header, and turn daemons' events into ours (stamped
        with the time they happened on the daemon).
        """
        for daemon_uuid, reading in self.daemons.readings.items():
            if daemon_uuid not in self.instances:
                continue
            for event in self.daemons.news.news(daemon_uuid, reading):
                target = self.instances.get(event.uuid or "")
                self.add_event(event.kind, event.text,
                               target.instance if target is not None else None,
                               now=event.time, daemon=daemon_uuid)  # fmt: skip
        supervision = self.daemons.supervision()
        for uuid, state in self.instances.items():
            supervisor, usage = supervision.get(uuid, (None, None))
            cpu = usage.cpu if usage is not None else None
            rss = usage.rss if usage is not None else None
            if (state.daemon, state.cpu, state.rss) != (supervisor, cpu, rss):
                state.daemon, state.cpu, state.rss = supervisor, cpu, rss
                self.changes.dirty_rows[uuid] = None
        self._refresh_hosts()

    def _refresh_hosts(self) -> None:
        where = {uuid: (state.instance.host, state.instance.region)
                 for uuid, state in self.instances.items() if uuid in self.daemons.readings}  # fmt: skip
        for name in self.daemons.refresh(where):
            self.changes.removed_hosts.add(name)
            self.series.pop(f"h:{name}", None)
        for name in self.hosts:
            self.changes.removed_hosts.discard(name)

    def _record_points(self, now: float) -> None:
        points = record_points(self.series, now, self.instances, self.hosts,
                               self.history, self.stats_interval)  # fmt: skip
        self.changes.points.append({"t": round(now, 3), "s": points})

    # What the page gets

    def config(self) -> dict[str, Any]:
        return {
            "server_id": self.server_id,
            "interval": self.stats_interval,
            "history": self.history,
            "instance_fields": list(INSTANCE_FIELDS),
            "host_fields": list(HOST_FIELDS),
        }

    def rows(self) -> list[dict[str, Any]]:
        return [state.row() for state in self.instances.values()]

    def snapshot_message(self) -> dict[str, Any]:
        """
        Everything a new page needs: the rows, the hosts, recent events and
        the series of services and hosts (instances' on request, see
        L{series_message}).
        """
        return {
            "type": "snapshot",
            "seq": self.changes.seq,
            "time": round(self.reactor.seconds(), 3),
            "synced": self.synced,
            "config": self.config(),
            "rows": self.rows(),
            "hosts": list(self.hosts.values()),
            "events": list(self.events)[-SNAPSHOT_EVENTS:],
            "series": {k: s.to_json() for k, s in self.series.items() if not k.startswith("i:")},
        }

    def series_message(self, keys: Iterable[str]) -> dict[str, Any]:
        """
        The full series named by C{keys} (C{i:<uuid>}, C{s:<service>},
        C{h:<host>}); unknown keys map to empty series.
        """
        out = {}
        for key in keys:
            series = self.series.get(key)
            out[key] = series.to_json() if series is not None else {"t": [], "v": []}
        return {"type": "series", "time": round(self.reactor.seconds(), 3), "series": out}

    def subscribe(self, send: Callable[[dict[str, Any]], None]) -> Callable[[], None]:
        """
        Deliver every delta message to C{send}.  @return: an unsubscribe
        function.
        """
        self._subscribers.append(send)

        def unsubscribe() -> None:
            if send in self._subscribers:
                self._subscribers.remove(send)

        return unsubscribe

    def _schedule_push(self) -> None:
        if self._push_call is None or not self._push_call.active():
            self._push_call = self.reactor.callLater(self.push_interval, self.push)

    def push(self) -> dict[str, Any] | None:
        """
        Send what changed since the last push to every subscriber, as one
        delta message.  @return: that message, or L{None} if nothing
        changed.
        """
        if self._push_call is not None and self._push_call.active():
            self._push_call.cancel()
        self._push_call = None
        message = self.changes.delta(self.instances, self.hosts, self.reactor.seconds())
        if message is None:
            return None
        for send in list(self._subscribers):
            try:
                send(message)
            except Exception:
                self.log.failure("dashboard subscriber failed")
        return message

    # Look-ups for actions

    def find(self, uuid: str) -> InstanceState | None:
        return self.instances.get(uuid)

    def daemon_of(self, uuid: str) -> Instance | None:
        """
        The daemon instance supervising C{uuid}, if its statistics say so.
        """
        state = self.instances.get(uuid)
        if state is None or state.daemon is None:
            return None
        daemon = self.instances.get(state.daemon)
        return daemon.instance if daemon is not None else None


def record_points(series: dict[str, Series], now: float, instances: dict[str, InstanceState],
                  hosts: dict[str, dict[str, Any]], history: float,
                  interval: float) -> dict[str, list[Any]]:  # fmt: skip
    """
    Add one point at C{now} to the series of every instance, service and
    host (making those that are new, dropping services gone for longer
    than C{history}).  @return: the new points by series key.
    """

    def get(key: str) -> Series:
        if key not in series:
            series[key] = Series(history, interval)
        return series[key]

    points: dict[str, list[Any]] = {}
    by_service: dict[str, list[InstanceState]] = {}
    by_host: dict[str, list[InstanceState]] = {}
    for uuid, state in instances.items():
        value = state.point()
        get(f"i:{uuid}").append(now, value)
        points[f"i:{uuid}"] = list(value)
        by_service.setdefault(state.instance.name, []).append(state)
        by_host.setdefault(state.instance.host, []).append(state)
    for name, states in by_service.items():
        value = _aggregate(states)
        get(f"s:{name}").append(now, value)
        points[f"s:{name}"] = list(value)
    for name, header in hosts.items():
        rss = [s.rss for s in by_host.get(name, []) if s.rss is not None]
        value = (
            _round(_number(header.get("cpu")), 2),
            _round(_number(header.get("mem_percent")), 2),
            _round(_number(header.get("load1")), 2),
            sum(rss) if rss else None,
        )
        get(f"h:{name}").append(now, value)
        points[f"h:{name}"] = list(value)
    for key in [k for k in series if k.startswith("s:") and k[2:] not in by_service]:
        if not series[key].points or series[key].points[-1][0] < now - history:
            del series[key]
    return points


def _aggregate(states: list[InstanceState]) -> tuple[float | None, ...]:
    """
    One point for a service: summed rates, CPU and RSS; the request-weighted
    mean of the medians; the worst 99th percentile.
    """
    points = [s.point() for s in states]
    rps = sum(p[0] or 0 for p in points)
    p50s = [(p[1], p[0] or 0) for p in points if p[1] is not None]
    weight = sum(w for _, w in p50s)
    if p50s and weight > 0:
        p50: float | None = sum(v * w for v, w in p50s) / weight
    elif p50s:
        p50 = sum(v for v, _ in p50s) / len(p50s)
    else:
        p50 = None
    p99s = [p[2] for p in points if p[2] is not None]
    cpus = [p[4] for p in points if p[4] is not None]
    rsses = [p[5] for p in points if p[5] is not None]
    return (
        _round(rps),
        _round(p50),
        max(p99s) if p99s else None,
        _round(sum(p[3] or 0 for p in points)),
        _round(sum(cpus), 2) if cpus else None,
        sum(rsses) if rsses else None,
    )


__all__ = [
    "HOST_FIELDS",
    "INSTANCE_FIELDS",
    "LATENCY_BUCKETS",
    "DashboardModel",
    "InstanceState",
    "Series",
    "latency_fraction_below",
    "parse_go_time",
]
