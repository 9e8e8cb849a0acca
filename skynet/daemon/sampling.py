"""
The daemon's guards at work: every C{sample_interval} the L{GuardRunner}
measures each child and the host's load, feeds the pure state machines of
L{skynet.daemon.guards}, and carries out their decisions through the
daemon (hold and unregister, restart, release; unregister every child while
the host is overloaded).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.logger import Logger, LogLevel

from skynet.control import ProcessUsage
from skynet.daemon.guards import OVERLOADED, ChildGuard, GuardConfig, LoadGuard, Release, Restart

if TYPE_CHECKING:
    from skynet.daemon.service import Daemon

__all__ = ["GuardRunner"]


class GuardRunner:
    """
    Samples and guards the children of C{daemon}.

    @param sampler: an L{ISampler}.
    @param load: the host's load reading.
    @ivar usage: per child uuid, its last sample.
    """

    log = Logger()

    def __init__(self, daemon: Daemon, config: GuardConfig, sampler: Any,
                 load: Callable[[], float]) -> None:  # fmt: skip
        self.daemon = daemon
        self.sampler = sampler
        self.load = load
        self.child_guard = ChildGuard(config)
        self.load_guard = LoadGuard(config)
        self.usage: dict[str, ProcessUsage] = {}
        self._load_failed = False

    def forget(self, uuid: str) -> None:
        """
        C{uuid} is no longer deployed.
        """
        self.child_guard.forget(uuid)
        self.usage.pop(uuid, None)

    def sample(self) -> None:
        """
        One round of measurements and guard decisions.
        """
        try:
            self.sampler.sample_host()
        except Exception:
            self.log.failure("sampling the host failed")
        self._sample_children()
        self._sample_load()

    def _sample_children(self) -> None:
        running = {}
        for uuid, child in list(self.daemon.supervisor.children.items()):
            if child.pid is None or uuid not in self.daemon.store:
                self.usage.pop(uuid, None)
                self.child_guard.idle(uuid)
                continue
            running[uuid] = child.pid
            try:
                usage = self.sampler.usage(child.pid)
            except Exception:
                self.log.failure("sampling {uuid} failed", uuid=uuid)
                usage = None
            if usage is None:
                continue
            self.usage[uuid] = usage
            decision = self.child_guard.sample(
                uuid, child.pid, usage, in_registry=self.daemon._live_instance(uuid) is not None
            )
            if isinstance(decision, Restart):
                self.daemon._spawn(self._guard_restart(decision), "a guard's restart", uuid=uuid)
            elif isinstance(decision, Release):
                self._guard_release(decision)
        try:
            self.sampler.forget(running.values())
        except Exception:
            self.log.failure("pruning the sampler failed")

    async def _guard_restart(self, decision: Restart) -> None:
        uuid, pid = decision.uuid, decision.pid
        label = self.daemon.store.deployments[uuid].label
        self.daemon.policy.hold(uuid, decision.reasons)
        fields = self.child_guard.fields(decision.usage)
        reasons = "+".join(decision.reasons)
        self.daemon.events.record("guard_unregister",
                           "{service} ({uuid}) pid {pid} over its {reasons} threshold for "
                           "{samples} samples (cpu {cpu:.0f}%, rss {rss} bytes): unregistering",
                           level=LogLevel.warn, log=self.log, service=label, uuid=uuid, pid=pid,
                           reasons=reasons, **fields)  # fmt: skip
        await self.daemon._apply_registration(uuid)
        if uuid not in self.daemon.store:
            return
        self.daemon.events.record("guard_restart",
                           "{service} ({uuid}) pid {pid}: restarting (in-flight requests finish "
                           "first); registered again when healthy",
                           level=LogLevel.warn, log=self.log, service=label, uuid=uuid,
                           pid=pid, reasons=reasons, **fields)  # fmt: skip
        await self.daemon.supervisor.restart_child(uuid)

    def _guard_release(self, decision: Release) -> None:
        uuid = decision.uuid
        reasons = self.daemon.policy.release(uuid)
        self.daemon.events.record("guard_register",
                           "{service} ({uuid}) pid {pid} healthy (cpu {cpu:.0f}%, rss {rss} "
                           "bytes): registering again",
                           log=self.log, service=self.daemon.store.deployments[uuid].label, uuid=uuid,
                           pid=decision.pid, reasons="+".join(sorted(reasons)),
                           **self.child_guard.fields(decision.usage))  # fmt: skip
        self.daemon._spawn(self.daemon._apply_registration(uuid), "registering", uuid=uuid)

    def _sample_load(self) -> None:
        if not self.load_guard.enabled:
            return
        try:
            reading = float(self.load())
        except Exception as e:
            if not self._load_failed:
                self.log.warn("cannot read the host load: {error}", error=e)
            self._load_failed = True
            return
        self._load_failed = False
        change = self.load_guard.sample(reading)
        if change is None:
            return
        self.daemon.policy.overloaded = self.load_guard.overloaded
        fields = dict(self.load_guard.fields(), count=len(self.daemon.store),
                      uuids=sorted(self.daemon.store.deployments))  # fmt: skip
        if change == OVERLOADED:
            self.daemon.events.record("host_overloaded",
                               "host load {load} above {high} for {samples} samples: "
                               "unregistering {count} instances",
                               level=LogLevel.warn, log=self.log, **fields)  # fmt: skip
        else:
            self.daemon.events.record("host_recovered",
                               "host load {load} below {low} for {samples} samples: "
                               "registering {count} instances again",
                               log=self.log, **fields)  # fmt: skip
        self.daemon._apply_all()
