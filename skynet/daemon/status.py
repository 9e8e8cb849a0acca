"""
The two status records a daemon answers with, built from its parts:
L{sub_services} (C{ListSubServices}) and L{host_stats} (C{HostStats}, also
the C{"Host"} key of its statistics node).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from twisted.logger import Logger

from skynet.control import (
    FAILING,
    RESTARTING,
    RUNNING,
    STARTING,
    ChildStats,
    DaemonProcess,
    HostFigures,
    HostStats,
    LoadGuardStatus,
    SubServiceStatus,
)

if TYPE_CHECKING:
    from skynet.daemon.service import Daemon

__all__ = ["deployment_state", "host_stats", "sub_services"]

_log = Logger()

#: How many of a failing child's last output lines its C{last_error} holds.
ERROR_LINES = 10


def deployment_state(*, running: bool, in_registry: bool, exited: bool, quick_death: bool,
                     registered_before_exit: bool) -> str:  # fmt: skip
    """
    The state of a sub-service (L{SubServiceStatus.state}).

    @param running: whether it has a process now.
    @param in_registry: whether that process is in the registry.
    @param exited: whether a process of it has ended before.
    @param quick_death: whether that one died before it had stayed up
        (it is backing off).
    @param registered_before_exit: whether that one had been in the
        registry.
    """
    if running and in_registry:
        return RUNNING
    if exited and (quick_death or not registered_before_exit):
        return FAILING
    return STARTING if running else RESTARTING


def sub_services(daemon: Daemon) -> list[SubServiceStatus]:
    """
    Every sub-service, as C{ListSubServices} answers.
    """
    services = []
    for uuid, deployment in daemon.store.deployments.items():
        child = daemon.supervisor.children[uuid]
        instance = daemon.children.get(uuid)
        usage = daemon.usage.get(uuid)
        last = child.last_exit
        state = deployment_state(
            running=child.running,
            in_registry=daemon._live_instance(uuid) is not None,
            exited=last is not None,
            quick_death=child.delay > daemon.supervisor.min_restart_delay,
            registered_before_exit=last is not None
            and daemon.registered_pids.get(uuid) == last.pid,
        )
        last_error = None
        if state == FAILING and last is not None:
            last_error = "\n".join([last.describe(), *child.last_output[-ERROR_LINES:]])
        services.append(SubServiceStatus(
            uuid=uuid,
            service=deployment.service,
            args=deployment.args,
            running=child.running,
            pid=child.pid,
            restarts=child.restarts,
            started=child.started,
            registered=daemon.effective_registered(uuid),
            last_exit=child.last_exit.to_status() if child.last_exit else None,
            desired_registered=deployment.registered,
            held=daemon.policy.held(uuid),
            in_registry=None if instance is None else instance.registered,
            next_restart=child.next_restart,
            backoff=float(child.delay),
            log=child.log_path,
            cpu=usage.cpu if usage else None,
            rss=usage.rss if usage else None,
            state=state,
            last_error=last_error,
            probe_failures=daemon.probes.guard.failures(uuid),
        ))  # fmt: skip
    return services


def host_stats(daemon: Daemon) -> HostStats:
    """
    The host and this daemon's children, as C{HostStats} answers.
    """
    try:
        figures: HostFigures | None = daemon.sampler.host()
    except Exception:
        _log.failure("reading the host's statistics failed")
        figures = None
    try:
        own = daemon.sampler.own_usage()
    except Exception:
        own = None
    guards = daemon.guards
    children = []
    for uuid, deployment in daemon.store.deployments.items():
        child = daemon.supervisor.children[uuid]
        children.append(ChildStats(uuid=uuid, service=deployment.label, pid=child.pid,
                                   running=child.running, usage=daemon.usage.get(uuid)))  # fmt: skip
    return HostStats(
        daemon=DaemonProcess(
            uuid=daemon.uuid,
            pid=os.getpid(),
            uptime=daemon.reactor.seconds() - daemon.started_at,
            usage=own,
        ),  # fmt: skip
        load_guard=LoadGuardStatus(
            reading=daemon.guard_runner.load_guard.last,
            high=guards.load_high,
            low=guards.load_low_mark if guards.load_high else None,
            overloaded=daemon.policy.overloaded,
        ),
        children=tuple(children),
        figures=figures,
    )
