"""
The per-host daemon: itself a skynet service named C{SkynetDaemon}, it
deploys, supervises, restarts and guards the service instances of its host.

    twistd -n skynet-daemon [--registry URL] [--state FILE] [--deploy FILE] ...

Remote methods (Go Skynet's names where it had them; the records of their
answers are in L{skynet.control}):

    Deploy {service, args, registered[, start_timeout]} -> {uuid} (once registered)
    ListSubServices -> {services: {uuid: SubServiceStatus}}
    StopSubService {uuid} -> {ok, uuid}        StopAllSubServices -> {ok, uuids}
    RestartSubService {uuid} -> {ok, uuid}     RestartAllSubServices -> {ok, uuids}
    RegisterSubService {uuid} -> {ok, uuid, registered}
    UnregisterSubService {uuid} -> {ok, uuid, registered}
    HostStats -> HostStats

Each child runs as C{twistd -n --pidfile= skynet-service --service M:C
--uuid U --registry R --supervised [args...]} under a L{Supervisor}: its
uuid comes from the daemon, so the registry, C{ListSubServices} and the
dashboard agree; its stdin is a pipe from the daemon whose end stops it.

The parts, one module each:

    deployments  Deploy requests, deployment files, the state file, command lines
    policy       whether a child is meant to be registered (wish x holds x overload)
    guards       the CPU/memory and host-load guards as state machines; samplers
    children     the daemon's one view of its children in the registry
    sampling     the guards at work: samples in, decisions carried out
    probes       the liveness probe of the children as a state machine (pure)
    probing      the probes at work: Admin.Ping out, unresponsive children killed
    status       the records ListSubServices and HostStats answer with
    service      Daemon (the wiring) and SkynetDaemon (its remote methods)

The names below are imported from their module on first use, so that
C{import skynet.daemon} stays cheap (no Twisted process machinery).
"""

from __future__ import annotations

import importlib
from typing import Any

_NAMES = {
    "deployments": ["DaemonState", "Deployment", "DeploymentStore", "command_line", "load_state",
                    "make_deployment", "parse_deploy_file", "save_state", "twistd_command"],
    "policy": ["RegistrationPolicy"],
    "guards": ["ChildGuard", "FakeSampler", "GuardConfig", "ISampler", "LoadGuard",
               "PsutilSampler", "Release", "Restart", "Usage", "load_reading"],
    "children": ["ChildInstances"],
    "sampling": ["GuardRunner"],
    "probes": ["ProbeConfig", "ProbeGuard", "Unresponsive"],
    "probing": ["PROBE_METHOD", "ProbeRunner"],
    "service": ["DAEMON_SERVICE_NAME", "DEFAULT_START_TIMEOUT", "EVENTS_IN_STATISTICS", "Daemon",
                "DeployFailed", "SkynetDaemon", "UnknownSubService"],
}  # fmt: skip

_WHERE = {name: module for module, names in _NAMES.items() for name in names}

__all__ = sorted([*_WHERE, "admin_call"])


def __getattr__(name: str) -> Any:
    if name == "admin_call":
        from skynet.admin import admin_call

        return admin_call
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'skynet.daemon' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"skynet.daemon.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
