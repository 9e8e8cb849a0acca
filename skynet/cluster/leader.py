"""
Leader election among the daemons: exactly one reconciler acts at a time.

A L{LeaderService} campaigns for the registry lock L{LEADER_LOCK}
(L{skynet.registry.locks.registry_lock}: an C{flock} on the embedded
registry, kazoo's lock recipe on ZooKeeper).  When it gets the lock it calls
C{on_elected()}; when it loses it (session suspended or lost, lock file
replaced) or stops, it calls C{on_deposed(reason)} and, unless stopping,
campaigns again.  C{on_elected} may return a Deferred: the service waits for
it before it reports a loss, so that elected and deposed never overlap.

    python -m skynet.cluster.leader --registry URL [--name ID] [--reconcile]

campaigns from the command line and prints C{ELECTED} and C{DEPOSED}
lines (the election tests use it); with C{--reconcile} it runs the
L{Reconciler} while it leads: a cluster controller beside daemons started
with C{--no-cluster} (every other daemon campaigns and reconciles itself).
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.internet.task import deferLater
from twisted.logger import Logger

from skynet.config import default_reactor
from skynet.registry.locks import ILock, registry_lock

__all__ = ["LEADER_LOCK", "LeaderService", "default_identifier"]

#: The lock the cluster's reconcilers campaign for.
LEADER_LOCK = "cluster/leader"


def default_identifier() -> str:
    """
    Who campaigns: C{<hostname> pid <pid>}.
    """
    return f"{socket.gethostname()} pid {os.getpid()}"


class LeaderService(Service):
    """
    Campaigns for leadership while running.

    @param registry: a started registry (the daemon's own).
    @param on_elected: called with no arguments once this process leads.
    @param on_deposed: called with a reason once it no longer does.
    @param lock: the L{ILock} (default: L{LEADER_LOCK} on C{registry}).
    @param retry_delay: seconds between campaigns after a failed one.
    @ivar leading: whether this process leads now.
    """

    log = Logger()

    def __init__(
        self,
        registry: Any,
        on_elected: Callable[[], Any],
        on_deposed: Callable[[str], Any],
        *,
        identifier: str | None = None,
        lock: ILock | None = None,
        reactor: Any = None,
        retry_delay: float = 1.0,
    ) -> None:
        self.reactor = default_reactor(reactor)
        self.identifier = identifier or default_identifier()
        self.registry = registry
        self._lock = lock
        self.on_elected = on_elected
        self.on_deposed = on_deposed
        self.retry_delay = retry_delay
        self.leading = False
        self.terms = 0
        self._campaign: Deferred | None = None
        self._pending: Deferred | None = None
        self._observed = False

    @property
    def lock(self) -> ILock:
        if self._lock is None:
            self._lock = registry_lock(
                self.registry, LEADER_LOCK, identifier=self.identifier, reactor=self.reactor
            )
        return self._lock

    def startService(self) -> None:
        super().startService()
        if not self._observed:
            self.lock.observe(self._lock_changed)
            self._observed = True
        self._start_campaign()

    def _start_campaign(self) -> None:
        if not self.running or self._campaign is not None:
            return
        campaign = Deferred.fromCoroutine(self._run_campaign())
        if campaign.called:
            # Elected at once (the coroutine ran to its end already).
            campaign.addErrback(self._campaign_failed)
            return
        self._campaign = campaign

        def over(result: Any) -> Any:
            if self._campaign is campaign:
                self._campaign = None
            return result

        campaign.addBoth(over).addErrback(self._campaign_failed)

    def _campaign_failed(self, failure: Any) -> None:
        if not failure.check(CancelledError):
            self.log.failure("campaign failed", failure)

    async def _run_campaign(self) -> None:
        while self.running:
            self.log.info("{who} campaigns for leadership", who=self.identifier)
            self._pending = self.lock.acquire()
            try:
                await self._pending
            except CancelledError:
                raise
            except Exception as e:
                self.log.warn("campaign failed ({error}); retrying in {delay}s",
                              error=e, delay=self.retry_delay)  # fmt: skip
                self._pending = deferLater(self.reactor, self.retry_delay, lambda: None)
                await self._pending
                continue
            finally:
                self._pending = None
            if not self.running:
                await self.lock.release()
                return
            await self._elected()
            return

    async def _elected(self) -> None:
        self.leading = True
        self.terms += 1
        self.log.info("{who} is the leader (term {term})", who=self.identifier, term=self.terms)
        try:
            await maybeDeferred(self.on_elected)
        except Exception:
            self.log.failure("on_elected failed; stepping down")
            await self._depose("on_elected failed")
            await self.lock.release()
            self._pending = deferLater(self.reactor, self.retry_delay, lambda: None)
            try:
                await self._pending
            finally:
                self._pending = None
            self._campaign = None
            self._start_campaign()

    async def _depose(self, reason: str) -> None:
        if not self.leading:
            return
        self.leading = False
        self.log.info("{who} is no longer the leader: {reason}", who=self.identifier, reason=reason)
        try:
            await maybeDeferred(self.on_deposed, reason)
        except Exception:
            self.log.failure("on_deposed failed")

    def _lock_changed(self, held: bool, reason: str) -> None:
        if not self.running:
            return
        if held:
            if not self.leading:
                Deferred.fromCoroutine(self._elected())
        else:
            d = Deferred.fromCoroutine(self._depose(reason))
            # A suspended ZooKeeper session may come back with the lock
            # (held again); otherwise campaign anew.
            d.addCallback(lambda _: None if self.lock.can_resume else self._start_campaign())

    def stopService(self) -> Deferred:
        super().stopService()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
        if self._campaign is not None:
            try:
                await self._campaign
            except Exception:
                pass
        await self._depose("stopping")
        await self.lock.release()


def main(argv: list[str] | None = None) -> int:
    """
    Campaign from the command line: C{--registry URL [--name ID]
    [--reconcile]}; prints C{ELECTED <id>} and C{DEPOSED <id> <reason>}.
    """
    import argparse

    from twisted.internet import reactor

    from skynet.registry import registry_from_url

    parser = argparse.ArgumentParser(prog="python -m skynet.cluster.leader")
    parser.add_argument("--registry", required=True)
    parser.add_argument("--name", default=None)
    parser.add_argument(
        "--reconcile",
        action="store_true",
        help="run the cluster's reconciler while leading (a cluster controller)",
    )
    parser.add_argument("--interval", type=float, default=2.0)
    parser.add_argument("--list-interval", type=float, default=30.0)
    args = parser.parse_args(argv)

    def say(line: str) -> None:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    async def run(_reactor: Any) -> None:
        registry = registry_from_url(args.registry, _reactor)
        await registry.start()
        name = args.name or default_identifier()
        service: Any
        if args.reconcile:
            from skynet.cluster.service import ClusterService

            service = ClusterService(
                registry,
                reactor=_reactor,
                identifier=name,
                interval=args.interval,
                list_interval=args.list_interval,
                on_change=lambda what: say(
                    f"ELECTED {name}" if what == "elected" else f"DEPOSED {name} {what[9:]}"
                ),
            )
        else:
            service = LeaderService(
                registry,
                lambda: say(f"ELECTED {name}"),
                lambda reason: say(f"DEPOSED {name} {reason}"),
                identifier=name,
                reactor=_reactor,
            )
        leader = service

        async def cleanup() -> None:
            await leader.stopService()
            await registry.stop()

        _reactor.addSystemEventTrigger(
            "before", "shutdown", lambda: Deferred.fromCoroutine(cleanup())
        )
        leader.startService()
        say(f"CAMPAIGNING {name}")

    def start() -> None:
        Deferred.fromCoroutine(run(reactor)).addErrback(failed)

    def failed(failure: Any) -> None:
        say(f"FAILED {failure.value}")
        reactor.stop()

    reactor.callWhenRunning(start)
    reactor.run()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
