"""
Per-method statistics of a service instance: call and error counts and a
latency histogram with fixed buckets, published in the instance's
statistics node beside Go Skynet's keys.

The node gains two keys (Go readers ignore keys they do not know; the
Go-shaped keys stay exactly as they were):

    LatencyBuckets  [int64 ns, ...]    the upper bounds of the buckets
                                       (L{BUCKETS}, in nanoseconds)
    Methods         {method: {Requests: int, Errors: int,
                              TotalResponseTime: int64 ns,
                              Buckets: [int, ...]}}

C{Buckets} holds one count per bound plus a last one for the calls slower
than every bound (C{+Inf}); the counts are per bucket (not cumulative), so
they sum to C{Requests}.  A call of duration C{d} counts in the first
bucket whose bound C{b} has C{d <= b} (Prometheus' C{le}).

Durations are measured from the dispatch of the request to the moment its
result (or error) is ready to be written.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping
from types import CoroutineType
from typing import Any

import attr
from bson.int64 import Int64
from twisted.internet.defer import Deferred, ensureDeferred

from skynet.observe import tracing

#: Upper bounds, in seconds, of the latency buckets (then C{+Inf}).
BUCKETS: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
)  # fmt: skip

#: The statistics node keys of this module.
BUCKETS_KEY = "LatencyBuckets"
METHODS_KEY = "Methods"


@attr.s(frozen=True, slots=True, auto_attribs=True)
class CallContext:
    """
    What is known of the request a remote method is serving.
    """

    request_id: str
    method: str
    service: str
    uuid: str


@attr.s(frozen=True, slots=True, auto_attribs=True)
class _Site:
    method: str
    service: str
    uuid: str


#: (request info, site, server span id) of the request served in this context, set
#: around each remote method: a cheap tuple per call; L{current_call} reads
#: it.  It lives in L{skynet.observe.tracing}, whose client spans read the
#: parent from it.
_serving = tracing.serving


def current_call() -> CallContext | None:
    """
    The request the code running now serves (inside a remote method and
    everything it awaits), or L{None}.
    """
    serving = _serving.get()
    if serving is None:
        return None
    info, site = serving[0], serving[1]
    return CallContext(getattr(info, "request_id", "") or "", site.method, site.service, site.uuid)


class MethodHistogram:
    """
    The counts of one method.
    """

    __slots__ = ("requests", "errors", "total", "counts")

    def __init__(self, size: int) -> None:
        self.requests = 0
        self.errors = 0
        self.total = 0.0
        self.counts = [0] * size

    def to_bson(self) -> dict[str, Any]:
        return {
            "Requests": self.requests,
            "Errors": self.errors,
            "TotalResponseTime": Int64(round(self.total * 1e9)),
            "Buckets": list(self.counts),
        }


class MethodStats:
    """
    Counts and histograms per method, and the wrapper of remote methods
    that keeps them (and sets L{current_call} while a method runs).

    @param now: the clock (C{reactor.seconds}).
    @param bounds: the bucket bounds in seconds, increasing.
    """

    def __init__(self, now: Callable[[], float], bounds: Iterable[float] = BUCKETS) -> None:
        self.now = now
        self.bounds = tuple(bounds)
        if list(self.bounds) != sorted(set(self.bounds)):
            raise ValueError("bucket bounds must be strictly increasing")
        self.methods: dict[str, MethodHistogram] = {}

    def record(self, method: str, elapsed: float, failed: bool) -> None:
        """
        Count one call of C{method} that took C{elapsed} seconds.
        """
        h = self.methods.get(method)
        if h is None:
            h = self.methods[method] = MethodHistogram(len(self.bounds) + 1)
        h.requests += 1
        if failed:
            h.errors += 1
        h.total += elapsed
        h.counts[bisect_left(self.bounds, elapsed)] += 1

    def to_bson(self) -> dict[str, Any]:
        """
        The keys this adds to the statistics node.
        """
        return {
            BUCKETS_KEY: [Int64(round(b * 1e9)) for b in self.bounds],
            METHODS_KEY: {name: h.to_bson() for name, h in sorted(self.methods.items())},
        }

    def instrument(
        self, methods: Mapping[str, Callable[..., Any]], service: str = "", uuid: str = ""
    ) -> dict[str, Callable[..., Any]]:
        """
        The remote methods wrapped: each call is timed and counted, and runs
        with L{current_call} set to its request.
        """
        return {name: self._wrap(name, f, service, uuid) for name, f in methods.items()}

    def _wrap(
        self, name: str, f: Callable[..., Any], service: str, uuid: str
    ) -> Callable[..., Any]:
        # Kept lean: this runs on every call (about 1 us of the service's CPU).
        now = self.now
        bounds = self.bounds
        h = self.methods.get(name)
        if h is None:
            h = self.methods[name] = MethodHistogram(len(bounds) + 1)
        counts = h.counts
        site = _Site(name, service, uuid)
        serving_set = _serving.set
        serving_reset = _serving.reset

        def finished(
            started: float, failed: bool, span: int, info: Any = None, error: Any = None
        ) -> None:
            elapsed = now() - started
            if span:  # (trace hook) skynet.observe.tracing
                tracing.server_finish(span, info, site, started, elapsed, error)
            h.requests += 1
            if failed:
                h.errors += 1
            h.total += elapsed
            counts[bisect_left(bounds, elapsed)] += 1

        def call(request_info: Any, params: Any) -> Any:
            started = now()
            # (trace hook) the server span, and the parent of the calls made inside
            span = tracing.next_id() if tracing.ENABLED else 0
            token = serving_set((request_info, site, span))
            try:
                result = f(request_info, params)
                if isinstance(result, CoroutineType):
                    # Made into a Deferred here, inside the context, so that
                    # the coroutine's every step sees its request.
                    result = ensureDeferred(result)
            except BaseException as e:
                finished(started, True, span, request_info, str(e))
                raise
            finally:
                serving_reset(token)
            # (a dict, the usual result, skips Deferred's ABC isinstance)
            if type(result) is not dict and isinstance(result, Deferred):

                def done(value: Any) -> Any:
                    finished(started, False, span, request_info)
                    return value

                def failed(failure: Any) -> Any:
                    finished(started, True, span, request_info, failure.getErrorMessage())
                    return failure

                return result.addCallbacks(done, failed)
            finished(started, False, span, request_info)
            return result

        call.__name__ = getattr(f, "__name__", name)
        call.__wrapped__ = f  # type: ignore[attr-defined]
        return call


# Reading published statistics


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Histogram:
    """
    One method's published counts, read back from a statistics node (or
    several summed).

    @ivar bounds: upper bounds in seconds.
    @ivar counts: per bucket, one more than C{bounds} (the last is C{+Inf}).
    """

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    requests: int
    errors: int
    total: float

    def cumulative(self) -> list[int]:
        """
        Counts of calls at most each bound, then the total (C{+Inf}).
        """
        out, running = [], 0
        for c in self.counts:
            running += c
            out.append(running)
        return out

    def quantile(self, q: float) -> float | None:
        """
        The duration below which a fraction C{q} of the calls fall,
        interpolated linearly inside its bucket (as Prometheus'
        C{histogram_quantile}); the largest bound when it falls in C{+Inf};
        L{None} with no calls.
        """
        n = sum(self.counts)
        if not n:
            return None
        rank = q * n
        running = 0
        for i, c in enumerate(self.counts):
            if c and running + c >= rank:
                if i == len(self.bounds):
                    return self.bounds[-1]
                low = self.bounds[i - 1] if i else 0.0
                high = self.bounds[i]
                return low + (high - low) * max(0.0, rank - running) / c
            running += c
        return self.bounds[-1]

    def __add__(self, other: Histogram) -> Histogram:
        if other.bounds != self.bounds:
            raise ValueError("cannot add histograms of different buckets")
        return Histogram(
            self.bounds,
            tuple(a + b for a, b in zip(self.counts, other.counts, strict=True)),
            self.requests + other.requests,
            self.errors + other.errors,
            self.total + other.total,
        )


def _count(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return int(value)


def method_histograms(stats: Mapping[str, Any] | None) -> dict[str, Histogram]:
    """
    The per-method histograms of a statistics node; entries that are
    missing or malformed (a Go instance, an older skynet) are left out,
    never guessed.
    """
    if not isinstance(stats, Mapping):
        return {}
    raw_bounds = stats.get(BUCKETS_KEY)
    methods = stats.get(METHODS_KEY)
    if not isinstance(raw_bounds, list) or not isinstance(methods, Mapping) or not raw_bounds:
        return {}
    bounds_ns = [_count(b) for b in raw_bounds]
    if any(b is None for b in bounds_ns):
        return {}
    bounds = tuple(b / 1e9 for b in bounds_ns if b is not None)
    if list(bounds) != sorted(set(bounds)):
        return {}
    out = {}
    for name, doc in methods.items():
        if not isinstance(name, str) or not isinstance(doc, Mapping):
            continue
        counts = doc.get("Buckets")
        requests = _count(doc.get("Requests"))
        errors = _count(doc.get("Errors"))
        total = _count(doc.get("TotalResponseTime"))
        if not isinstance(counts, list) or len(counts) != len(bounds) + 1:
            continue
        parsed = [_count(c) for c in counts]
        if any(c is None for c in parsed) or requests is None or errors is None or total is None:
            continue
        out[name] = Histogram(bounds, tuple(c or 0 for c in parsed), requests, errors, total / 1e9)
    return out


def format_seconds(value: float | None) -> str:
    """
    A duration for people: C{850us}, C{12.5ms}, C{1.2s}; C{-} when unknown.
    """
    if value is None or math.isnan(value):
        return "-"
    if value < 1e-3:
        return f"{value * 1e6:.0f}us"
    if value < 1:
        return f"{value * 1e3:.3g}ms"
    return f"{value:.3g}s"


__all__ = [
    "BUCKETS",
    "BUCKETS_KEY",
    "METHODS_KEY",
    "CallContext",
    "Histogram",
    "MethodStats",
    "current_call",
    "format_seconds",
    "method_histograms",
]
