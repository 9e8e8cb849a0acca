"""
The cluster's part of a daemon: campaign for leadership and, while leading,
run the reconciler.

    cluster = ClusterService(registry, reactor=reactor, identifier=daemon_uuid)
    cluster.startService()      # once the registry has started
    ...
    await cluster.stopService()  # before the registry stops

Every daemon runs one (L{skynet.daemon.Daemon}C{(cluster=True)}, which
C{twistd skynet-daemon} passes unless C{--no-cluster}): started after its
registry and C{SkynetDaemon} service, stopped first (see C{docs/cluster.md},
"Leader election").  C{python -m skynet.cluster.leader --reconcile} runs
the same as a process of its own, beside daemons started with
C{--no-cluster}.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred

from skynet.cluster.leader import LeaderService
from skynet.cluster.reconciler import Reconciler, RpcDaemonExecutor, call_probe
from skynet.config import default_reactor

__all__ = ["ClusterService"]


class ClusterService(Service):
    """
    A L{LeaderService} whose terms run a L{Reconciler}.

    @param registry: a started registry.
    @param executor: an L{IDaemonExecutor} (default L{RpcDaemonExecutor}).
    @param probe: the reconciler's readiness probe (default
        L{call_probe}: a new instance is ready once it answers a call;
        L{None}: once it is registered).
    @param on_change: called with C{"elected"} or C{"deposed: <reason>"}
        (for a daemon's event log, or a test).
    """

    def __init__(
        self,
        registry: Any,
        *,
        executor: Any = None,
        reactor: Any = None,
        identifier: str | None = None,
        interval: float = 2.0,
        list_interval: float = 30.0,
        on_change: Callable[[str], None] | None = None,
        lock: Any = None,
        probe: Any = "call",
    ) -> None:
        self.reactor = default_reactor(reactor)
        self.on_change = on_change or (lambda what: None)
        self.leader = LeaderService(
            registry,
            self._elected,
            self._deposed,
            identifier=identifier,
            reactor=self.reactor,
            lock=lock,
        )
        self.reconciler = Reconciler(
            registry,
            executor if executor is not None else RpcDaemonExecutor(self.reactor),
            reactor=self.reactor,
            interval=interval,
            list_interval=list_interval,
            identifier=self.leader.identifier,
            probe=call_probe(self.reactor) if probe == "call" else probe,
        )

    @property
    def leading(self) -> bool:
        return self.leader.leading

    def _elected(self) -> Deferred:
        self.on_change("elected")
        return self.reconciler.start()

    def _deposed(self, reason: str) -> Deferred:
        d = self.reconciler.stop()
        d.addCallback(lambda _: self.on_change(f"deposed: {reason}"))
        return d

    def startService(self) -> None:
        super().startService()
        self.leader.startService()

    def stopService(self) -> Deferred:
        super().stopService()
        return self.leader.stopService()
