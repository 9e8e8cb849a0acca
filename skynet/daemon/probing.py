"""
The daemon's liveness probes at work: every C{interval} the L{ProbeRunner}
sends C{Admin.Ping} to the admin listener of each child in the registry,
feeds the answers to the pure L{ProbeGuard}, and carries out its
decisions: a child that failed C{failures} probes in a row is removed from
the registry at once, killed (SIGTERM, then SIGKILL after the kill time)
and restarted with the usual back-off, with an C{unresponsive} event.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger, LogLevel

from skynet.daemon.probes import ProbeConfig, ProbeGuard, Unresponsive
from skynet.errors import RemoteCallError
from skynet.registry.base import Instance

if TYPE_CHECKING:
    from skynet.daemon.service import Daemon

__all__ = ["PROBE_METHOD", "ProbeRunner"]

#: The admin call a probe makes.  Any answer counts, an error too: a
#: service that does not know the method has still answered.
PROBE_METHOD = "Admin.Ping"


class ProbeRunner(Service):
    """
    Probes the children of C{daemon} while running.
    """

    log = Logger()

    def __init__(self, daemon: Daemon, config: ProbeConfig) -> None:
        self.daemon = daemon
        self.config = config
        self.guard = ProbeGuard(config, daemon.reactor)
        self._loop: LoopingCall | None = None
        self._in_flight: set[Deferred] = set()

    # IService

    def startService(self) -> None:
        super().startService()
        if self.config.enabled:
            self._loop = LoopingCall(self.tick)
            self._loop.clock = self.daemon.reactor
            self._loop.start(self.config.interval, now=False).addErrback(
                lambda f: self.log.failure("the probe loop failed", f)
            )

    def stopService(self) -> None:  # type: ignore[override]
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        for d in list(self._in_flight):
            d.cancel()

    # Probing

    def tick(self) -> None:
        """
        Probe every child in the registry whose probe is due.
        """
        for uuid, child in list(self.daemon.supervisor.children.items()):
            if child.pid is None or uuid not in self.daemon.store:
                continue
            if child.stopping:
                continue  # draining (its listeners closed) or being killed: its timers rule
            instance = self.daemon._live_instance(uuid)
            if instance is None or instance.admin is None:
                continue  # not in the registry yet: the start timeout's business
            if self.guard.due(uuid, child.pid):
                self.guard.sent(uuid, child.pid)
                self.daemon._spawn(self._probe(uuid, child.pid, instance), "a probe", uuid=uuid)

    async def _probe(self, uuid: str, pid: int, instance: Instance) -> None:
        answered, error = True, None
        assert instance.admin is not None  # (tick probes only those with one)
        d = maybeDeferred(self.daemon.admin, instance.admin, PROBE_METHOD, {})
        self._in_flight.add(d)
        timer = self.daemon.reactor.callLater(self.config.timeout, d.cancel)
        try:
            await d
        except RemoteCallError:
            pass  # it answered
        except Exception as e:
            answered = False
            error = (f"no answer within {self.config.timeout:g}s" if not timer.active()
                     else str(e) or type(e).__name__)  # fmt: skip
        finally:
            self._in_flight.discard(d)
            if timer.active():
                timer.cancel()
        if not self.running:
            return
        lag = None
        if answered and self.config.max_lag is not None:
            lag = await self._lag(instance)
        decision = self.guard.result(uuid, pid, answered=answered, error=error, lag=lag)
        if decision is not None:
            await self._unresponsive(decision, instance)

    async def _lag(self, instance: Instance) -> float | None:
        try:
            stats = await self.daemon.registry.get_stats(instance)
        except Exception as e:
            self.log.warn("cannot read the statistics of {uuid}: {error}", uuid=instance.uuid,
                          error=e)  # fmt: skip
            return None
        lag = stats.get("ReactorLag") if isinstance(stats, dict) else None
        if isinstance(lag, bool) or not isinstance(lag, (int, float)):
            return None
        return float(lag)

    async def _unresponsive(self, decision: Unresponsive, instance: Instance) -> None:
        daemon, uuid, pid = self.daemon, decision.uuid, decision.pid
        child = daemon.supervisor.children.get(uuid)
        if child is None or child.pid != pid or child.stopping or uuid not in daemon.store:
            return
        daemon.events.record("unresponsive",
                             "{service} ({uuid}) pid {pid} failed {failures} probes in a row "
                             "({error}): unresponsive; unregistering and killing it",
                             level=LogLevel.warn, log=self.log, service=child.label, uuid=uuid,
                             pid=pid, reason="unresponsive", failures=decision.failures,
                             error=decision.errors[-1], interval=self.config.interval,
                             timeout=self.config.timeout)  # fmt: skip
        # Out of the registry first (it cannot unregister itself), so that
        # clients stop choosing it while it is being killed.
        try:
            await daemon.children.remove_dead(uuid, pid)
        except Exception as e:
            self.log.warn("cannot remove the node of unresponsive {uuid}: {error}", uuid=uuid,
                          error=e)  # fmt: skip
        if uuid in daemon.supervisor.children:
            await daemon.supervisor.kill_child(uuid)
