"""
The registration policy of a daemon's children: whether each is meant to
be registered now.

A child is registered when the operator wants it (its L{Deployment}'s
C{registered}), no child guard holds it (too much CPU or memory, until its
restarted process is healthy) and the host is not overloaded (the load
guard).  Pure: no reactor, no registry.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["HOST_LOAD", "RegistrationPolicy"]

#: The hold every child gets while the host is overloaded.
HOST_LOAD = "host-load"


class RegistrationPolicy:
    """
    The operator's wish x the guards' holds x the host's overload.

    @ivar holds: per child uuid, the reasons a guard holds it unregistered
        (C{"cpu"}, C{"memory"}).
    @ivar overloaded: whether the load guard holds every child.
    """

    def __init__(self) -> None:
        self.holds: dict[str, set[str]] = {}
        self.overloaded = False

    def effective(self, uuid: str, wish: bool | None) -> bool:
        """
        Whether C{uuid} is meant to be registered now, given the operator's
        C{wish} (L{None}: not deployed).
        """
        return bool(wish) and not self.holds.get(uuid) and not self.overloaded

    def held(self, uuid: str) -> tuple[str, ...]:
        """
        Why C{uuid} is held unregistered, sorted; the host's load last.
        """
        reasons = sorted(self.holds.get(uuid, ()))
        return tuple(reasons + ([HOST_LOAD] if self.overloaded else []))

    def hold(self, uuid: str, reasons: Iterable[str]) -> None:
        self.holds.setdefault(uuid, set()).update(reasons)

    def release(self, uuid: str) -> set[str]:
        """
        Lift every guard's hold on C{uuid}; the reasons there were.
        """
        return self.holds.pop(uuid, set())

    def forget(self, uuid: str) -> None:
        self.holds.pop(uuid, None)
