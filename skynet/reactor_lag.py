"""
A service's own reactor lag: how late a timer that should fire every
C{interval} seconds actually fires.  A reactor blocked by a long
computation or a blocking call shows it here before anything else; the
service publishes it in its statistics node (C{ReactorLag}, seconds) and
the daemon's probe counts a child whose lag is over its threshold as
failing (see C{docs/daemon.md}).
"""

from __future__ import annotations

from collections import deque
from typing import Any

from twisted.internet.task import LoopingCall

from skynet.config import default_reactor

__all__ = ["STATISTICS_KEY", "ReactorLag"]

#: The key of the statistics node (Go readers ignore keys they do not know).
STATISTICS_KEY = "ReactorLag"


class ReactorLag:
    """
    Measures the lateness of a L{LoopingCall} every C{interval} seconds
    and keeps the worst of the last C{window} seconds.

    @param reactor: an L{IReactorTime} (default: the global reactor).
    """

    def __init__(self, reactor: Any = None, interval: float = 0.5, window: float = 10.0) -> None:
        self.reactor = default_reactor(reactor)
        self.interval = interval
        self.window = window
        self._samples: deque[tuple[float, float]] = deque()
        self._last: float | None = None
        self._loop: LoopingCall | None = None

    def start(self) -> None:
        if self._loop is not None:
            return
        self._last = self.reactor.seconds()
        self._loop = LoopingCall(self._tick)
        self._loop.clock = self.reactor
        self._loop.start(self.interval, now=False)

    def stop(self) -> None:
        loop, self._loop = self._loop, None
        if loop is not None and loop.running:
            loop.stop()

    def _tick(self) -> None:
        now = self.reactor.seconds()
        if self._last is not None:
            self._samples.append((now, max(0.0, now - self._last - self.interval)))
        self._last = now
        while self._samples and self._samples[0][0] < now - self.window:
            self._samples.popleft()

    @property
    def lag(self) -> float:
        """
        The worst lateness, in seconds, of the last C{window} seconds (as
        far as the timer has fired: a reactor blocked now shows it once it
        runs again).
        """
        now = self.reactor.seconds()
        return max((lag for t, lag in self._samples if t >= now - self.window), default=0.0)
