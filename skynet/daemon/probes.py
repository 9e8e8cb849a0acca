"""
The liveness probe of the daemon's children, as a pure state machine fed
probe results on a clock (beside the resource guards of
L{skynet.daemon.guards}).

Every C{interval} seconds the daemon sends each child that is in the
registry a real call on its admin listener (C{Admin.Ping}); any answer
within C{timeout} seconds, even an error, means the child's reactor runs.
No answer (refused, closed, timed out), or a reactor lag in its statistics
above C{max_lag}, is a failure; C{failures} failures in a row make it
L{Unresponsive}: the daemon unregisters it at once, kills it (SIGTERM, then
SIGKILL) and restarts it with the usual back-off.

L{ProbeGuard} only decides; L{skynet.daemon.probing.ProbeRunner} sends the
probes and carries out its decisions.
"""

from __future__ import annotations

from typing import Any

import attr

__all__ = ["ProbeConfig", "ProbeGuard", "Unresponsive"]


@attr.frozen
class ProbeConfig:
    """
    How the daemon probes its children.

    @ivar interval: seconds between two probes of one child (0: no probes).
    @ivar timeout: seconds a probe waits for its answer.
    @ivar failures: failed probes in a row that make a child unresponsive.
    @ivar max_lag: the reactor lag (seconds, from the child's statistics
        node, key C{ReactorLag}) above which a probe counts as failed;
        L{None}: not looked at.
    """

    interval: float = 2.0
    timeout: float = 1.0
    failures: int = 3
    max_lag: float | None = None

    def __attrs_post_init__(self) -> None:
        if self.interval < 0:
            raise ValueError("the probe interval must not be negative")
        if self.timeout <= 0:
            raise ValueError("the probe timeout must be positive")
        if self.failures < 1:
            raise ValueError("probe failures must be at least 1")
        if self.max_lag is not None and self.max_lag <= 0:
            raise ValueError("the reactor lag threshold must be positive")

    @property
    def enabled(self) -> bool:
        return self.interval > 0


@attr.frozen
class Unresponsive:
    """
    Process C{pid} of child C{uuid} failed C{failures} probes in a row:
    unregister it, kill it and let it restart.

    @ivar errors: why each of those probes failed, oldest first.
    """

    uuid: str
    pid: int
    failures: int
    errors: tuple[str, ...]


@attr.s(auto_attribs=True)
class _Probed:
    pid: int
    last_sent: float | None = None
    in_flight: bool = False
    errors: list[str] = attr.Factory(list)
    condemned: bool = False


class ProbeGuard:
    """
    Per child, its current process's probes: when the next is due, and
    the failures in a row.

    @param clock: an L{IReactorTime} (only its C{seconds()} is read).
    """

    def __init__(self, config: ProbeConfig, clock: Any) -> None:
        self.config = config
        self.clock = clock
        self._children: dict[str, _Probed] = {}

    def _of(self, uuid: str, pid: int) -> _Probed:
        probed = self._children.get(uuid)
        if probed is None or probed.pid != pid:
            probed = self._children[uuid] = _Probed(pid=pid)
        return probed

    def due(self, uuid: str, pid: int) -> bool:
        """
        Whether process C{pid} of C{uuid} should be probed now: probes are
        on, none of its is in flight, it is not condemned, and the last was
        sent at least C{interval} seconds ago.
        """
        if not self.config.enabled:
            return False
        probed = self._of(uuid, pid)
        if probed.in_flight or probed.condemned:
            return False
        return (
            probed.last_sent is None
            or self.clock.seconds() - probed.last_sent >= self.config.interval - 1e-6
        )

    def sent(self, uuid: str, pid: int) -> None:
        """
        A probe of process C{pid} of C{uuid} went out now.
        """
        probed = self._of(uuid, pid)
        probed.last_sent = self.clock.seconds()
        probed.in_flight = True

    def result(self, uuid: str, pid: int, *, answered: bool, error: str | None = None,
               lag: float | None = None) -> Unresponsive | None:  # fmt: skip
        """
        The outcome of a probe of process C{pid} of C{uuid}.

        @param answered: whether it answered within the timeout.
        @param error: why not, if it did not.
        @param lag: its reactor lag as its statistics say, if known.
        @return: L{Unresponsive} once it has failed C{failures} probes in a
            row (once per process), else L{None}.
        """
        probed = self._children.get(uuid)
        if probed is None or probed.pid != pid:
            return None  # a probe of a process that has been replaced
        probed.in_flight = False
        if probed.condemned:
            return None
        max_lag = self.config.max_lag
        if answered and max_lag is not None and lag is not None and lag > max_lag:
            answered, error = False, f"reactor lag {lag:.2f}s over {max_lag:g}s"
        if answered:
            probed.errors.clear()
            return None
        probed.errors.append(error or "no answer")
        if len(probed.errors) < self.config.failures:
            return None
        probed.condemned = True
        return Unresponsive(uuid=uuid, pid=pid, failures=len(probed.errors),
                            errors=tuple(probed.errors))  # fmt: skip

    def failures(self, uuid: str) -> int:
        """
        The failed probes in a row of C{uuid}'s current process.
        """
        probed = self._children.get(uuid)
        return len(probed.errors) if probed is not None else 0

    def started(self, uuid: str) -> None:
        """
        A new process of C{uuid} started: its probes start over.
        """
        self._children.pop(uuid, None)

    forget = started
