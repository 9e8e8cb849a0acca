"""
Busy polling for Twisted's epoll reactor: the reactor polls for the next
event for a short while before it sleeps in C{epoll_wait}, as long as such
polls keep catching events.

Why: on these machines a thread that sleeps on a socket and is woken by
the peer's answer costs tens of microseconds of wall time and CPU (a
sleeping CPU woken by an interrupt through the hypervisor), more than a
sequential call's own work.  A reactor that polls instead of sleeping
between a call's request and its answer, or between one sequential
client's calls, skips that wake-up; Go's scheduler does the same before it
parks a thread.

When: while polling pays.  A wait for I/O starts by polling; a poll that
runs out of budget with no event (the gap was long: the process is idle,
or its events come further apart) is followed by plain sleeps, one after
the first miss, then two, four, ... up to L{MAX_BACKOFF} waits, until a
poll catches an event again.  So an idle or lightly loaded process spends
at most one budget per L{MAX_BACKOFF} waits, while one whose events come
in quick succession polls every time.  (A rule on the length of the last
gap would be trapped: a gap measured through a sleep includes the wake-up
that polling would have saved.)  Between polls the thread yields its CPU
(C{sched_yield}) to anything else runnable, and a timer due sooner than the
budget ends the polling in time.

Only Twisted's C{EPollReactor} is supported (the default on Linux); on any
other reactor L{install} does nothing and says so by returning L{None}.

    from skynet.busypoll import install
    install(reactor, 200e-6)    # seconds; twistd skynet-service does this
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

from twisted.python import log

__all__ = [
    "DEFAULT_BUDGET",
    "MAX_BACKOFF",
    "Backoff",
    "BusyPoll",
    "check_budget",
    "install",
    "install_default",
    "installed",
]

#: How long a reactor polls before it sleeps, by default, in seconds.
DEFAULT_BUDGET = 200e-6

#: The most plain sleeps after a poll in vain, before polling again.
MAX_BACKOFF = 64

_yield = getattr(os, "sched_yield", lambda: None)


def check_budget(seconds: float, name: str = "a busy-poll budget") -> float:
    """
    C{seconds}, if it is a polling budget (a finite number, 0 or more).

    @raise ValueError: naming C{name}, if not.
    """
    if not isinstance(seconds, (int, float)) or not 0 <= seconds < math.inf:
        raise ValueError(f"{name} is 0 or more seconds, not {seconds!r}")
    return seconds


class Backoff:
    """
    When to poll: every time, until a poll is in vain; then not for the
    next 1, 2, 4, ... up to L{MAX_BACKOFF} chances, until a poll catches
    again.  Shared by the reactor's waits and L{skynet.sync}'s calls.
    """

    __slots__ = ("_length", "_skip")

    def __init__(self) -> None:
        self._length = 0  # chances skipped after the last poll in vain
        self._skip = 0  # chances left to skip

    def ready(self) -> bool:
        """
        Whether to poll at this chance (a chance not taken counts down).
        """
        if self._skip:
            self._skip -= 1
            return False
        return True

    def caught(self) -> None:
        self._length = 0

    def missed(self) -> None:
        self._length = min(self._length * 2 or 1, MAX_BACKOFF)
        self._skip = self._length


class BusyPoll:
    """
    The polling C{doIteration} of one epoll reactor (see the module).

    @ivar budget: seconds of polling before a sleep.
    @ivar polls: waits that started by polling; C{caught} of them ended
        with I/O before the budget ran out.
    """

    def __init__(self, reactor: Any, budget: float) -> None:
        self.reactor = reactor
        self.budget = budget
        self.polls = self.caught = 0
        self._backoff = Backoff()

    def do_iteration(self, timeout: float | None) -> None:
        """
        One iteration of the reactor's loop: wait at most C{timeout}
        seconds (L{None}: no limit) for I/O, and dispatch it.
        """
        reactor = self.reactor
        poll = reactor._poller.poll
        most = len(reactor._selectables)
        if timeout == 0:
            events = poll(0, most)  # work pending: no wait
        elif not self._backoff.ready():
            events = poll(-1.0 if timeout is None else timeout, most)
        else:
            start = time.perf_counter()
            stop = start + (self.budget if timeout is None else min(self.budget, timeout))
            self.polls += 1
            while True:
                events = poll(0, most)
                if events:
                    self.caught += 1
                    self._backoff.caught()
                    break
                if time.perf_counter() >= stop:
                    self._backoff.missed()
                    if timeout is None:
                        left = -1.0
                    else:
                        left = max(0.0, timeout - (time.perf_counter() - start))
                    events = poll(left, most)
                    break
                _yield()
        selectables = reactor._selectables
        dispatch = reactor._doReadOrWrite
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is not None:  # removed by an earlier event's handler
                log.callWithLogger(selectable, dispatch, selectable, fd, event)

    def uninstall(self) -> None:
        if self.reactor.__dict__.get("doIteration") == self.do_iteration:
            del self.reactor.doIteration


# The reactor attribute holding its BusyPoll, or OFF once turned off.
_ATTRIBUTE = "_skynet_busy_poll"
_OFF = "off"


def install(reactor: Any, budget: float = DEFAULT_BUDGET) -> BusyPoll | None:
    """
    Make C{reactor} poll for up to C{budget} seconds before it sleeps
    (backing off after polls in vain); a budget of 0 turns it off (for
    good: L{install_default} leaves it off).  Installed once per reactor: a
    second call sets the budget.

    @return: the L{BusyPoll}, or L{None} for a budget of 0 or a reactor
        that is not Twisted's epoll reactor.
    """
    check_budget(budget)
    current = installed(reactor)
    if budget == 0:
        if current is not None:
            current.uninstall()
        if hasattr(reactor, "__dict__"):
            setattr(reactor, _ATTRIBUTE, _OFF)
        return None
    if current is not None:
        current.budget = budget
        return current
    try:
        from twisted.internet.epollreactor import EPollReactor
    except ImportError:  # not Linux
        return None
    if not isinstance(reactor, EPollReactor):
        return None
    busy = BusyPoll(reactor, budget)
    setattr(reactor, _ATTRIBUTE, busy)
    # The loop calls self.doIteration: an instance attribute comes first.
    reactor.doIteration = busy.do_iteration  # type: ignore[method-assign]
    return busy


def install_default(reactor: Any) -> BusyPoll | None:
    """
    L{install} with L{DEFAULT_BUDGET}, unless C{reactor}'s busy polling was
    set already (installed with its own budget, or turned off).
    """
    if getattr(reactor, "__dict__", {}).get(_ATTRIBUTE) is not None:
        return installed(reactor)
    return install(reactor, DEFAULT_BUDGET)


def installed(reactor: Any) -> BusyPoll | None:
    """
    The L{BusyPoll} installed on C{reactor}, if any.
    """
    found = getattr(reactor, "__dict__", {}).get(_ATTRIBUTE)
    return found if isinstance(found, BusyPoll) else None
