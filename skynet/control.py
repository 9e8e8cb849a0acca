"""
The daemon's control-plane contract: what the per-host daemon (itself a
skynet service, L{DAEMON_SERVICE}), C{sky} and its shell, the dashboard and
admin calls say to one another.

One place holds the service name, the method names and the records of its
answers and statistics, each with a strict C{to_bson()} / C{from_bson()}
in exactly one spelling: a missing key or a value of the wrong type raises
L{ValueError} naming it, so that a reader never guesses among spellings.
Keys a reader does not know are ignored (a newer daemon may add some).

No Twisted here: the records are plain data, importable by anything.
"""

from __future__ import annotations

import math
import os
import re
import shlex
from collections.abc import Iterable, Mapping
from typing import Any

import attr

__all__ = [
    "ADMIN_ACTIONS",
    "DAEMON_ACTIONS",
    "DAEMON_METHODS",
    "DAEMON_SERVICE",
    "DEPLOY",
    "DEPLOYMENT_STATES",
    "FAILING",
    "HOST_STATS",
    "LIST_SUB_SERVICES",
    "REGISTER_SUB_SERVICE",
    "RESTARTING",
    "RUNNING",
    "RESTART_ALL_SUB_SERVICES",
    "RESTART_SUB_SERVICE",
    "SEARCH_LOGS",
    "SEARCH_SPANS",
    "STARTING",
    "STOP_ALL_SUB_SERVICES",
    "STOP_SUB_SERVICE",
    "UNREGISTER_SUB_SERVICE",
    "ChildStats",
    "DaemonEvent",
    "DaemonProcess",
    "Deployment",
    "ExitStatus",
    "HostMemory",
    "HostStats",
    "LoadGuardStatus",
    "ProcessUsage",
    "SubServiceStatus",
    "sub_services_from_bson",
    "sub_services_to_bson",
]

#: The daemon's service name, as in Go Skynet.
DAEMON_SERVICE = "SkynetDaemon"

#: The daemon's remote methods (Go Skynet's names where it had them).
DEPLOY = "Deploy"
LIST_SUB_SERVICES = "ListSubServices"
STOP_SUB_SERVICE = "StopSubService"
STOP_ALL_SUB_SERVICES = "StopAllSubServices"
RESTART_SUB_SERVICE = "RestartSubService"
RESTART_ALL_SUB_SERVICES = "RestartAllSubServices"
REGISTER_SUB_SERVICE = "RegisterSubService"
UNREGISTER_SUB_SERVICE = "UnregisterSubService"
HOST_STATS = "HostStats"
SEARCH_LOGS = "SearchLogs"  # (observe hook) the host's JSON logs: skynet.observe.logsearch
#: (trace) the spans of the host's children: skynet.observe.tracing.host_spans
SEARCH_SPANS = "SearchSpans"

DAEMON_METHODS = (
    DEPLOY,
    HOST_STATS,
    LIST_SUB_SERVICES,
    REGISTER_SUB_SERVICE,
    RESTART_ALL_SUB_SERVICES,
    RESTART_SUB_SERVICE,
    STOP_ALL_SUB_SERVICES,
    STOP_SUB_SERVICE,
    UNREGISTER_SUB_SERVICE,
    SEARCH_LOGS,  # (observe hook)
    SEARCH_SPANS,  # (trace)
)

#: The admin calls behind the operators' actions (restart has none: only a
#: supervising daemon can start a process again).
ADMIN_ACTIONS: dict[str, tuple[str, dict[str, Any]]] = {
    "register": ("Admin.Register", {}),
    "unregister": ("Admin.Unregister", {}),
    "stop": ("Admin.Stop", {"waitforclients": True}),
}

#: The daemon's remote method for each action, given C{{uuid}}.
DAEMON_ACTIONS: dict[str, str] = {
    "register": REGISTER_SUB_SERVICE,
    "unregister": UNREGISTER_SUB_SERVICE,
    "stop": STOP_SUB_SERVICE,
    "restart": RESTART_SUB_SERVICE,
}


# Strict reading


def _doc(value: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ValueError(f"{what} must be a document, not {type(value).__name__}")
    return value


def _get(doc: Mapping[str, Any], key: str, what: str) -> Any:
    try:
        return doc[key]
    except KeyError:
        raise ValueError(f"{what} has no {key!r}") from None


def _str(doc: Mapping[str, Any], key: str, what: str, *, optional: bool = False) -> Any:
    value = _get(doc, key, what)
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{what}: {key!r} must be a string, not {value!r}")
    return value


def _bool(doc: Mapping[str, Any], key: str, what: str, *, optional: bool = False) -> Any:
    value = _get(doc, key, what)
    if value is None and optional:
        return None
    if not isinstance(value, bool):
        raise ValueError(f"{what}: {key!r} must be true or false, not {value!r}")
    return value


def _number(value: Any, key: str, what: str, optional: bool) -> Any:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what}: {key!r} must be a number, not {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{what}: {key!r} must be finite, not {value!r}")
    return value


def _float(doc: Mapping[str, Any], key: str, what: str, *, optional: bool = False) -> Any:
    value = _number(_get(doc, key, what), key, what, optional)
    return None if value is None else float(value)


def _int(doc: Mapping[str, Any], key: str, what: str, *, optional: bool = False) -> Any:
    value = _number(_get(doc, key, what), key, what, optional)
    if value is None:
        return None
    if isinstance(value, float) and not value.is_integer():
        raise ValueError(f"{what}: {key!r} must be a whole number, not {value!r}")
    return int(value)


def _strings(doc: Mapping[str, Any], key: str, what: str) -> tuple[str, ...]:
    value = _get(doc, key, what)
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{what}: {key!r} must be a list of strings, not {value!r}")
    return tuple(value)


# Deployments

_CLASS_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


@attr.frozen
class Deployment:
    """
    One service deployed on a host, as C{Deploy} asks and the daemon's
    state file keeps it.

    @ivar service: C{module:Class}, run as C{twistd skynet-service}, or a
        full command line.
    @ivar args: further arguments.
    @ivar registered: whether the operator wants it registered (guards may
        hold it unregistered for a while).
    """

    uuid: str
    service: str
    args: tuple[str, ...] = ()
    registered: bool = True

    @property
    def is_class(self) -> bool:
        """
        Whether C{service} is C{module:Class} (else a command line).
        """
        return bool(_CLASS_SPEC.match(self.service))

    @property
    def label(self) -> str:
        """
        A short name: the class, or the command's program name.
        """
        if self.is_class:
            return self.service.rpartition(":")[2]
        try:
            words = shlex.split(self.service)
        except ValueError:
            words = []
        return os.path.basename(words[0]) if words else "command"

    def to_bson(self) -> dict[str, Any]:
        return {"uuid": self.uuid, "service": self.service, "args": list(self.args),
                "registered": self.registered}  # fmt: skip

    @classmethod
    def from_bson(cls, doc: Any) -> Deployment:
        what = "a deployment"
        doc = _doc(doc, what)
        return cls(uuid=_str(doc, "uuid", what), service=_str(doc, "service", what),
                   args=_strings(doc, "args", what),
                   registered=_bool(doc, "registered", what))  # fmt: skip


# ListSubServices

#: The states of a sub-service (see L{SubServiceStatus.state}).
STARTING = "starting"
RUNNING = "running"
RESTARTING = "restarting"
FAILING = "failing"
DEPLOYMENT_STATES = (STARTING, RUNNING, RESTARTING, FAILING)


@attr.frozen
class ExitStatus:
    """
    How a child's last process ended (see L{skynet.procmon.ExitRecord}).

    @ivar text: a sentence saying it (C{"killed by SIGKILL"}).
    """

    code: int | None
    signal: int | None
    signal_name: str | None
    time: float
    uptime: float
    pid: int | None
    error: str | None
    text: str

    def to_bson(self) -> dict[str, Any]:
        return attr.asdict(self)

    @classmethod
    def from_bson(cls, doc: Any) -> ExitStatus:
        what = "an exit status"
        doc = _doc(doc, what)
        return cls(code=_int(doc, "code", what, optional=True),
                   signal=_int(doc, "signal", what, optional=True),
                   signal_name=_str(doc, "signal_name", what, optional=True),
                   time=_float(doc, "time", what), uptime=_float(doc, "uptime", what),
                   pid=_int(doc, "pid", what, optional=True),
                   error=_str(doc, "error", what, optional=True),
                   text=_str(doc, "text", what))  # fmt: skip


@attr.frozen
class SubServiceStatus:
    """
    One sub-service of a daemon, as C{ListSubServices} answers it.

    @ivar registered: whether it is meant to be registered now (the
        operator's wish, unless a guard holds it).
    @ivar desired_registered: the operator's wish alone.
    @ivar held: why it is held unregistered (C{"cpu"}, C{"memory"},
        C{"host-load"}).
    @ivar in_registry: its node's C{registered}, L{None} if it has none.
    @ivar state: one of L{DEPLOYMENT_STATES}: C{"starting"} (its process
        is not in the registry yet), C{"running"} (it is),
        C{"restarting"} (no process, the next one due at once) or
        C{"failing"} (its last process died before it had stayed up, or
        before it registered, and no new one has registered since).
    @ivar last_error: why it is failing: how its last process ended and
        its last lines of output; L{None} unless failing.
    @ivar probe_failures: the liveness probes its current process has
        failed in a row.
    """

    uuid: str
    service: str
    args: tuple[str, ...]
    running: bool
    pid: int | None
    restarts: int
    started: float | None
    registered: bool
    last_exit: ExitStatus | None
    desired_registered: bool
    held: tuple[str, ...]
    in_registry: bool | None
    next_restart: float | None
    backoff: float
    log: str | None
    cpu: float | None
    rss: int | None
    state: str = "starting"
    last_error: str | None = None
    probe_failures: int = 0

    def __attrs_post_init__(self) -> None:
        if self.state not in DEPLOYMENT_STATES:
            raise ValueError(f"sub-service {self.uuid}: unknown state {self.state!r}")

    def to_bson(self) -> dict[str, Any]:
        """
        The document of one entry (its uuid is the key it sits under).
        """
        doc = attr.asdict(self, recurse=False)
        del doc["uuid"]
        doc["args"] = list(self.args)
        doc["held"] = list(self.held)
        doc["last_exit"] = self.last_exit.to_bson() if self.last_exit else None
        return doc

    @classmethod
    def from_bson(cls, uuid: str, doc: Any) -> SubServiceStatus:
        what = f"sub-service {uuid}"
        doc = _doc(doc, what)
        last_exit = _get(doc, "last_exit", what)
        return cls(
            uuid=uuid,
            service=_str(doc, "service", what),
            args=_strings(doc, "args", what),
            running=_bool(doc, "running", what),
            pid=_int(doc, "pid", what, optional=True),
            restarts=_int(doc, "restarts", what),
            started=_float(doc, "started", what, optional=True),
            registered=_bool(doc, "registered", what),
            last_exit=None if last_exit is None else ExitStatus.from_bson(last_exit),
            desired_registered=_bool(doc, "desired_registered", what),
            held=_strings(doc, "held", what),
            in_registry=_bool(doc, "in_registry", what, optional=True),
            next_restart=_float(doc, "next_restart", what, optional=True),
            backoff=_float(doc, "backoff", what),
            log=_str(doc, "log", what, optional=True),
            cpu=_float(doc, "cpu", what, optional=True),
            rss=_int(doc, "rss", what, optional=True),
            state=_str(doc, "state", what),
            last_error=_str(doc, "last_error", what, optional=True),
            probe_failures=_int(doc, "probe_failures", what),
        )


def sub_services_to_bson(statuses: Iterable[SubServiceStatus]) -> dict[str, Any]:
    """
    C{ListSubServices}'s answer: C{{services: {uuid: {...}}}}.
    """
    return {"services": {s.uuid: s.to_bson() for s in statuses}}


def sub_services_from_bson(answer: Any) -> dict[str, SubServiceStatus]:
    """
    Read C{ListSubServices}'s answer.

    @raise ValueError: if it is not C{{services: {uuid: {...}}}} with
        every entry complete.
    """
    services = _get(_doc(answer, "a ListSubServices answer"), "services",
                    "a ListSubServices answer")  # fmt: skip
    services = _doc(services, "'services' of a ListSubServices answer")
    found = {}
    for uuid, doc in services.items():
        if not isinstance(uuid, str) or not uuid:
            raise ValueError(f"a ListSubServices answer has a bad uuid {uuid!r}")
        found[uuid] = SubServiceStatus.from_bson(uuid, doc)
    return found


# HostStats


@attr.frozen
class ProcessUsage:
    """
    One sample of a process (with its descendants): CPU percent (100 = one
    core) and resident memory in bytes.
    """

    cpu: float
    rss: int


def _usage_bson(usage: ProcessUsage | None) -> dict[str, Any]:
    return {"cpu": usage.cpu if usage else None, "rss": usage.rss if usage else None}


def _usage_from(doc: Mapping[str, Any], what: str) -> ProcessUsage | None:
    cpu = _float(doc, "cpu", what, optional=True)
    rss = _int(doc, "rss", what, optional=True)
    if cpu is None and rss is None:
        return None
    if cpu is None or rss is None:
        raise ValueError(f"{what}: 'cpu' and 'rss' are both known or both null")
    return ProcessUsage(cpu=cpu, rss=rss)


@attr.frozen
class ChildStats:
    """
    One child of a daemon in its host statistics.

    @ivar service: its label (the class name, or the command's name).
    @ivar usage: its last sample, L{None} before the first.
    """

    uuid: str
    service: str
    pid: int | None
    running: bool
    usage: ProcessUsage | None = None

    def to_bson(self) -> dict[str, Any]:
        return {"service": self.service, "pid": self.pid, "running": self.running,
                **_usage_bson(self.usage)}  # fmt: skip

    @classmethod
    def from_bson(cls, uuid: str, doc: Any) -> ChildStats:
        what = f"child {uuid}"
        doc = _doc(doc, what)
        return cls(uuid=uuid, service=_str(doc, "service", what),
                   pid=_int(doc, "pid", what, optional=True), running=_bool(doc, "running", what),
                   usage=_usage_from(doc, what))  # fmt: skip


@attr.frozen
class DaemonProcess:
    """
    The daemon process itself: its uuid, pid, uptime (seconds) and usage
    (without its children; L{None} if it could not be measured).
    """

    uuid: str
    pid: int
    uptime: float
    usage: ProcessUsage | None = None

    def to_bson(self) -> dict[str, Any]:
        return {"uuid": self.uuid, "pid": self.pid, "uptime": self.uptime,
                **_usage_bson(self.usage)}  # fmt: skip

    @classmethod
    def from_bson(cls, doc: Any) -> DaemonProcess:
        what = "the daemon process"
        doc = _doc(doc, what)
        return cls(uuid=_str(doc, "uuid", what), pid=_int(doc, "pid", what),
                   uptime=_float(doc, "uptime", what), usage=_usage_from(doc, what))  # fmt: skip


@attr.frozen
class LoadGuardStatus:
    """
    The host load guard: its last reading, its marks (L{None} when off),
    and whether it holds the host's instances unregistered.
    """

    reading: float | None = None
    high: float | None = None
    low: float | None = None
    overloaded: bool = False

    def to_bson(self) -> dict[str, Any]:
        return attr.asdict(self)

    @classmethod
    def from_bson(cls, doc: Any) -> LoadGuardStatus:
        what = "the load guard"
        doc = _doc(doc, what)
        return cls(reading=_float(doc, "reading", what, optional=True),
                   high=_float(doc, "high", what, optional=True),
                   low=_float(doc, "low", what, optional=True),
                   overloaded=_bool(doc, "overloaded", what))  # fmt: skip


@attr.frozen
class HostMemory:
    """
    The host's memory, in bytes, and the percent in use.
    """

    total: int
    available: int
    used: int
    percent: float

    def to_bson(self) -> dict[str, Any]:
        return attr.asdict(self)

    @classmethod
    def from_bson(cls, doc: Any) -> HostMemory:
        what = "the host's memory"
        doc = _doc(doc, what)
        return cls(total=_int(doc, "total", what), available=_int(doc, "available", what),
                   used=_int(doc, "used", what), percent=_float(doc, "percent", what))  # fmt: skip


@attr.frozen
class HostFigures:
    """
    What a sampler measures of the host (see L{HostStats}).
    """

    cpu: float
    cpus: int
    memory: HostMemory
    load: tuple[float, float, float]
    uptime: float
    boot_time: float
    hostname: str


@attr.frozen
class HostStats:
    """
    The host and a daemon's children: C{HostStats}'s answer, and the
    C{"Host"} key of the daemon's statistics node.

    @ivar figures: the host's L{HostFigures}, L{None} if it could not be
        measured (the keys are then null).
    @ivar children: per child, its L{ChildStats}.
    """

    daemon: DaemonProcess
    load_guard: LoadGuardStatus
    children: tuple[ChildStats, ...] = ()
    figures: HostFigures | None = None

    def to_bson(self) -> dict[str, Any]:
        f = self.figures
        return {
            "cpu": f.cpu if f else None,
            "cpus": f.cpus if f else None,
            "memory": f.memory.to_bson() if f else None,
            "load": list(f.load) if f else None,
            "uptime": f.uptime if f else None,
            "boot_time": f.boot_time if f else None,
            "hostname": f.hostname if f else None,
            "daemon": self.daemon.to_bson(),
            "load_guard": self.load_guard.to_bson(),
            "children": {c.uuid: c.to_bson() for c in self.children},
        }

    @classmethod
    def from_bson(cls, doc: Any) -> HostStats:
        what = "host statistics"
        doc = _doc(doc, what)
        children = _doc(_get(doc, "children", what), "the children of host statistics")
        figures = None
        if _get(doc, "cpu", what) is not None:
            load = _get(doc, "load", what)
            if (
                not isinstance(load, (list, tuple))
                or len(load) != 3
                or not all(_number(x, "load", what, False) is not None for x in load)
            ):
                raise ValueError(f"{what}: 'load' must be three numbers, not {load!r}")
            figures = HostFigures(
                cpu=_float(doc, "cpu", what),
                cpus=_int(doc, "cpus", what),
                memory=HostMemory.from_bson(_get(doc, "memory", what)),
                load=(float(load[0]), float(load[1]), float(load[2])),
                uptime=_float(doc, "uptime", what),
                boot_time=_float(doc, "boot_time", what),
                hostname=_str(doc, "hostname", what),
            )
        for uuid in children:
            if not isinstance(uuid, str) or not uuid:
                raise ValueError(f"{what}: bad child uuid {uuid!r}")
        return cls(
            daemon=DaemonProcess.from_bson(_get(doc, "daemon", what)),
            load_guard=LoadGuardStatus.from_bson(_get(doc, "load_guard", what)),
            children=tuple(ChildStats.from_bson(u, d) for u, d in children.items()),
            figures=figures,
        )


# Events


@attr.frozen
class DaemonEvent:
    """
    One thing a daemon (its supervisor or a guard) did or saw.

    @ivar time: when it happened, POSIX seconds on the daemon's clock.
    @ivar kind: what, as a short name (C{"started"}, C{"exited"},
        C{"restart_scheduled"}, C{"guard_unregister"} ...).
    @ivar text: the rendered log message.
    @ivar fields: the measured values and names, as logged (C{uuid} and
        C{service} among them when it concerns one child).
    """

    time: float
    kind: str
    text: str
    fields: dict[str, Any] = attr.field(factory=dict, eq=False, hash=False)

    @property
    def uuid(self) -> str | None:
        """
        The child it concerns, if any.
        """
        uuid = self.fields.get("uuid")
        return uuid if isinstance(uuid, str) else None

    def to_bson(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"time": self.time, "kind": self.kind, "text": self.text}
        doc.update((k, v) for k, v in self.fields.items() if k not in doc)
        return doc

    # Kept as the procmon spelling too.
    to_dict = to_bson

    @classmethod
    def from_bson(cls, doc: Any) -> DaemonEvent:
        what = "a daemon event"
        doc = _doc(doc, what)
        fields = {k: v for k, v in doc.items() if k not in ("time", "kind", "text")}
        if "uuid" in fields and fields["uuid"] is not None and not isinstance(fields["uuid"], str):
            raise ValueError(f"{what}: 'uuid' must be a string, not {fields['uuid']!r}")
        return cls(time=_float(doc, "time", what), kind=_str(doc, "kind", what),
                   text=_str(doc, "text", what), fields=fields)  # fmt: skip
