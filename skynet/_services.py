"""
Small L{IService}s for ordered start and stop, shared by the daemon,
L{skynet.service.ServiceHost} and the dashboard model.

  - L{SequentialMultiService} starts its children in the order they were
    added and stops them in reverse, awaiting each before the next (the
    stock C{MultiService} stops every child at once).
  - L{RetryingStart} runs a start function (a registry's C{start}, say) with
    L{backoffPolicy} until it succeeds; C{startService} returns at once, and
    C{stopService} cancels a pending retry.
  - L{StartAfter} starts one service once a L{RetryingStart} has succeeded.

As C{IService} says, C{startService} returns nothing; a caller that must
wait uses C{when_started()}.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.internet import backoffPolicy
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from skynet.config import default_reactor

__all__ = ["DEFAULT_RETRY_POLICY", "RetryingStart", "SequentialMultiService", "StartAfter"]

#: The delay before retry N (0, 1, ...): 0.5 s doubling up to 10 s, as the
#: hand-written loops this replaces had it (no jitter, so that tests on a
#: Clock can tell when the next attempt comes).
DEFAULT_RETRY_POLICY: Callable[[int], float] = backoffPolicy(
    initialDelay=0.5, maxDelay=10.0, factor=2.0, jitter=lambda: 0.0
)


class SequentialMultiService(MultiService):
    """
    A C{MultiService} whose children stop one after another, the last added
    first, each awaited before the next: a child may rely on those added
    before it (a registry, say) for as long as it runs.
    """

    log = Logger()
    _stopping: Deferred | None = None

    def stopService(self) -> Deferred:  # type: ignore[override]
        if self._stopping is None:
            Service.stopService(self)
            self._stopping = Deferred.fromCoroutine(self._stop_children())
        return self._stopping

    def startService(self) -> None:
        self._stopping = None
        super().startService()

    async def _stop_children(self) -> None:
        for child in reversed(list(self)):
            if not child.running:
                continue
            try:
                await maybeDeferred(child.stopService)
            except Exception:
                self.log.failure("stopping {child!r} failed", child=child)


class RetryingStart(Service):
    """
    Calls C{start()} until it succeeds, waiting C{policy(n)} seconds after
    the n-th failure (counted from 0); on stop, cancels a pending retry,
    waits for an attempt in flight, and calls C{stop()} if it had started.

    @param start: returns a Deferred or a value (or raises).
    @param stop: undoes a successful start (optional).
    @param what: what is being started, for the log.
    @ivar started: whether C{start()} has succeeded.
    """

    log = Logger()

    def __init__(
        self,
        start: Callable[[], Any],
        stop: Callable[[], Any] | None = None,
        *,
        what: str = "start",
        reactor: Any = None,
        policy: Callable[[int], float] | None = None,
    ) -> None:
        self._start = start
        self._stop = stop
        self.what = what
        self.reactor = default_reactor(reactor)
        self.policy = policy or DEFAULT_RETRY_POLICY
        self.started = False
        self.failures = 0
        self._attempt: Deferred | None = None
        self._retry: Any = None
        self._waiters: list[Deferred] = []

    def startService(self) -> None:
        super().startService()
        self.failures = 0
        self._try()

    def when_started(self) -> Deferred:
        """
        Fires with L{None} once C{start()} has succeeded; fails with
        L{CancelledError} if the service stops first.
        """
        if self.started:
            return succeed(None)
        d: Deferred = Deferred()
        self._waiters.append(d)
        return d

    def _try(self) -> None:
        self._retry = None
        if not self.running:
            return
        self._attempt = maybeDeferred(self._start)
        self._attempt.addCallbacks(self._succeeded, self._failed)

    def _succeeded(self, _: Any) -> None:
        self._attempt = None
        self.started = True
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(None)

    def _failed(self, failure: Failure) -> None:
        self._attempt = None
        if not self.running:
            return
        delay = self.policy(self.failures)
        self.failures += 1
        self.log.warn("could not {what} ({error}); retrying in {delay}s", what=self.what,
                      error=failure.getErrorMessage(), delay=delay)  # fmt: skip
        self._retry = self.reactor.callLater(delay, self._try)

    def stopService(self) -> Deferred:  # type: ignore[override]
        super().stopService()
        return Deferred.fromCoroutine(self._stop_now())

    async def _stop_now(self) -> None:
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        if self._attempt is not None:
            try:
                await self._attempt
            except Exception:
                pass  # logged by _failed
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.errback(CancelledError(f"stopped before {self.what} succeeded"))
        if self.started:
            self.started = False
            if self._stop is not None:
                try:
                    await maybeDeferred(self._stop)
                except Exception as e:
                    # An outage (the registry gone) is expected here, not a bug.
                    self.log.warn("undoing {what} failed: {error}", what=self.what, error=e)


class StartAfter(Service):
    """
    Starts C{service} once C{gate} (a L{RetryingStart}) has started, if
    this is still running then; stops it on stop.
    """

    def __init__(self, gate: RetryingStart, service: IService) -> None:
        self.gate = gate
        self.service = service

    log = Logger()

    def startService(self) -> None:
        super().startService()
        d = self.gate.when_started()
        d.addCallbacks(self._open, lambda f: f.trap(CancelledError))
        d.addErrback(lambda f: self.log.failure("starting {service!r} failed", f,
                                                service=self.service))  # fmt: skip

    def _open(self, _: Any) -> None:
        if self.running and not self.service.running:
            self.service.startService()

    def stopService(self) -> Deferred:  # type: ignore[override]
        super().stopService()
        if self.service.running:
            return maybeDeferred(self.service.stopService)
        return succeed(None)
