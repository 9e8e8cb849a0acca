"""
The per-host daemon: itself a skynet service named C{SkynetDaemon}, it
deploys, supervises, restarts and guards the service instances of its host.

    twistd -n skynet-daemon [--registry URL] [--state FILE] [--deploy FILE] ...

Remote methods (Go Skynet's names where it had them):

    Deploy {service, args, registered} -> {uuid}
    ListSubServices -> {services: {uuid: {service, args, running, pid,
                        restarts, started, registered, last_exit, ...}}}
    StopSubService {uuid} -> {ok, uuid}        StopAllSubServices -> {ok, uuids}
    RestartSubService {uuid} -> {ok, uuid}     RestartAllSubServices -> {ok, uuids}
    RegisterSubService {uuid} -> {ok, uuid, registered}
    UnregisterSubService {uuid} -> {ok, uuid, registered}
    HostStats -> {cpu, memory, load, uptime, cpus, children, ...}

Each child runs as C{twistd -n --pidfile= skynet-service --service M:C
--uuid U --registry R --supervised [args...]} under a L{Supervisor}: its
uuid comes from the daemon, so the registry, C{ListSubServices} and the
dashboard agree; its stdin is a pipe from the daemon whose end stops it.

Guards sample every child's CPU and memory and the host's load (psutil):
see L{GuardConfig}.  Every action is an L{skynet.procmon.Event}.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import sys
import time
import uuid as uuid_module
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import attr
from twisted.application.service import MultiService
from twisted.application.service import Service as BaseService
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from zope.interface import implementer

from skynet.admin import admin_call
from skynet.control import (
    DAEMON_SERVICE,
    ChildStats,
    DaemonProcess,
    Deployment,
    ExitStatus,
    HostFigures,
    HostMemory,
    HostStats,
    LoadGuardStatus,
    ProcessUsage,
    SubServiceStatus,
    sub_services_to_bson,
)
from skynet.errors import ConnectionFailed, ServiceError
from skynet.procmon import EventLog, ExitRecord, IChildObserver, Supervisor
from skynet.protocol import new_id
from skynet.registry.base import IInstanceListener, Instance, Query
from skynet.service import Service, ServiceHost

#: The daemon's service name (L{skynet.control.DAEMON_SERVICE}).
DAEMON_SERVICE_NAME = DAEMON_SERVICE

#: How many recent events go into the daemon's statistics node.
EVENTS_IN_STATISTICS = 20

_CLASS_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
_DEPLOY_NAMESPACE = uuid_module.UUID("6f1c2f4e-5a0e-4b8e-9a57-736b796e6574")


# Deployments and their files


def make_deployment(service: Any, args: Any = None, registered: Any = True, *,
                    uuid: Any = None) -> Deployment:  # fmt: skip
    """
    Check and normalise what C{Deploy} (or a file) asks for.

    @param args: a list of strings, one string (split as a shell would), or
        L{None}.  C{--unregistered} among them means C{registered=False}.
    @raise ValueError: with what is wrong.
    """
    if not isinstance(service, str) or not service.strip():
        raise ValueError("service must be module:Class or a command line")
    service = service.strip()
    if args is None:
        args = []
    elif isinstance(args, str):
        args = shlex.split(args)
    elif not isinstance(args, (list, tuple)) or not all(isinstance(a, str) for a in args):
        raise ValueError("args must be a list of strings or one string")
    if not isinstance(registered, bool):
        raise ValueError("registered must be true or false")
    if not _CLASS_SPEC.match(service):
        try:
            if not shlex.split(service):
                raise ValueError("empty command line")
        except ValueError as e:
            raise ValueError(f"bad command line {service!r}: {e}") from None
    else:
        if "--unregistered" in args or "-u" in args:
            registered = False
            args = [a for a in args if a not in ("--unregistered", "-u")]
    if uuid is None:
        uuid = new_id()
    elif not isinstance(uuid, str) or not re.match(r"^[\w-]{1,64}$", uuid):
        raise ValueError(f"bad uuid {uuid!r}")
    return Deployment(uuid=uuid, service=service, args=tuple(args), registered=registered)


def parse_deploy_file(path: str) -> list[Deployment]:
    """
    Read a deployment file: one service per line, C{module:Class args...}
    (or a full command line), C{#} comments and blank lines ignored.

    Each line gets a uuid derived from the file's path, the line's text and
    how many identical lines came before it, so that the same file deploys
    the same uuids at every start (and a state file can tell them apart).

    @raise ValueError: naming the line that is wrong.
    """
    path = os.path.abspath(path)
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    seen: dict[str, int] = {}
    deployments = []
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            words = shlex.split(line, comments=True)
        except ValueError as e:
            raise ValueError(f"{path}:{number}: {e}") from None
        if not words:
            continue
        normal = shlex.join(words)
        occurrence = seen.get(normal, 0)
        seen[normal] = occurrence + 1
        stable = str(uuid_module.uuid5(_DEPLOY_NAMESPACE, f"{path}\n{occurrence}\n{normal}"))
        if _CLASS_SPEC.match(words[0]):
            service, args = words[0], words[1:]
        else:
            service, args = normal, []
        try:
            deployments.append(make_deployment(service, args, uuid=stable))
        except ValueError as e:
            raise ValueError(f"{path}:{number}: {e}") from None
    return deployments


@attr.frozen
class DaemonState:
    """
    What a state file holds: the daemon's own uuid and the deployments.
    """

    uuid: str | None = None
    deployments: tuple[Deployment, ...] = ()


def load_state(path: str) -> DaemonState:
    """
    Read a state file; a missing one is an empty state.

    @raise ValueError: if it is not a state file.
    """
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except FileNotFoundError:
        return DaemonState()
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read the state file {path}: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("services", []), list):
        raise ValueError(f"{path} is not a skynet-daemon state file")
    try:
        deployments = tuple(_checked(Deployment.from_bson(d)) for d in doc.get("services", []))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    daemon_uuid = doc.get("daemon_uuid")
    return DaemonState(uuid=daemon_uuid if isinstance(daemon_uuid, str) else None,
                       deployments=deployments)  # fmt: skip


def _checked(deployment: Deployment) -> Deployment:
    return make_deployment(deployment.service, list(deployment.args), deployment.registered,
                           uuid=deployment.uuid)  # fmt: skip


def save_state(path: str, state: DaemonState) -> None:
    """
    Write a state file atomically (a reader sees the old or the new one).
    """
    doc = {
        "daemon_uuid": state.uuid,
        "services": [d.to_bson() for d in state.deployments],
    }
    directory = os.path.dirname(os.path.abspath(path))
    temporary = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    with open(temporary, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def twistd_command() -> list[str]:
    """
    How to run C{twistd} with the Python running this daemon.
    """
    path = os.path.join(os.path.dirname(sys.executable), "twistd")
    if os.access(path, os.X_OK):
        return [path]
    return [sys.executable, "-c",
            "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()"]  # fmt: skip


# Guards and measurements


@attr.frozen
class GuardConfig:
    """
    The thresholds of the resource guards (0 or L{None} turns one off).

    @ivar sample_interval: seconds between samples.
    @ivar child_max_cpu: a child's CPU percent (100 = one core) above
        which a sample counts as over.
    @ivar child_max_rss: a child's resident memory, in bytes, likewise.
    @ivar child_samples: consecutive samples over a threshold before the
        child is unregistered, restarted, and registered again once its
        new process is healthy.
    @ivar load_high: the host's load reading above which a sample counts as
        high; after C{load_samples} of them in a row, every child is
        unregistered.
    @ivar load_low: the reading below which a sample counts as low; after
        C{load_samples} in a row, the children are registered again.
        Between the two marks nothing changes (hysteresis).
    """

    sample_interval: float = 2.0
    child_max_cpu: float | None = None
    child_max_rss: int | None = None
    child_samples: int = 3
    load_high: float | None = None
    load_low: float | None = None
    load_samples: int = 3

    def __attrs_post_init__(self) -> None:
        if self.sample_interval <= 0:
            raise ValueError("the sample interval must be positive")
        if self.child_samples < 1 or self.load_samples < 1:
            raise ValueError("sample counts must be at least 1")
        if self.load_high and self.load_low is not None and self.load_low >= self.load_high:
            raise ValueError("the low-water mark must be below the high-water mark")

    @property
    def load_low_mark(self) -> float:
        if self.load_low is not None:
            return self.load_low
        return (self.load_high or 0) / 2


#: One sample of a child (and its descendants): CPU percent and RSS bytes.
Usage = ProcessUsage


class PsutilSampler:
    """
    Measures processes and the host with psutil.  A process's CPU percent
    is over the time since its previous sample.
    """

    def __init__(self) -> None:
        import psutil

        self.psutil = psutil
        self._processes: dict[int, Any] = {}
        self._host_cpu: float = 0.0
        psutil.cpu_percent(None)

    def _process(self, pid: int) -> Any:
        process = self._processes.get(pid)
        if process is None or not process.is_running():
            process = self._processes[pid] = self.psutil.Process(pid)
            process.cpu_percent(None)
        return process

    def usage(self, pid: int) -> Usage | None:
        """
        The process C{pid} with its descendants, or L{None} if it is gone.
        """
        psutil = self.psutil
        try:
            top = self._process(pid)
            family = [top] + top.children(recursive=True)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            self._processes.pop(pid, None)
            return None
        cpu, rss = 0.0, 0
        for member in family:
            try:
                process = self._process(member.pid)
                cpu += process.cpu_percent(None)
                rss += process.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                self._processes.pop(member.pid, None)
        return Usage(cpu=cpu, rss=rss)

    def forget(self, keep: Iterable[int]) -> None:
        """
        Drop the processes not among C{keep} (or their descendants).
        """
        keep = set(keep)
        for pid in list(self._processes):
            if pid not in keep:
                try:
                    parents = {p.pid for p in self._processes[pid].parents()}
                except Exception:
                    parents = set()
                if not parents & keep:
                    del self._processes[pid]

    def sample_host(self) -> None:
        self._host_cpu = self.psutil.cpu_percent(None)

    def host(self) -> HostFigures:
        """
        The host: CPU percent (since the last L{sample_host}), memory,
        load averages, uptime.
        """
        psutil = self.psutil
        memory = psutil.virtual_memory()
        boot = psutil.boot_time()
        one, five, fifteen = os.getloadavg()
        return HostFigures(
            cpu=float(self._host_cpu),
            cpus=psutil.cpu_count() or 1,
            memory=HostMemory(
                total=memory.total,
                available=memory.available,
                used=memory.used,
                percent=float(memory.percent),
            ),  # fmt: skip
            load=(one, five, fifteen),
            uptime=max(0.0, time.time() - boot),
            boot_time=float(boot),
            hostname=socket.gethostname(),
        )

    _own: Any = None

    def own_usage(self) -> ProcessUsage | None:
        """
        This process's own CPU percent (since the last reading) and RSS,
        without its children; L{None} if it cannot be measured.
        """
        try:
            if self._own is None:
                self._own = self.psutil.Process(os.getpid())
                self._own.cpu_percent(None)
            return ProcessUsage(cpu=self._own.cpu_percent(None), rss=self._own.memory_info().rss)
        except Exception:
            return None


def load_reading(source: str, sampler: Any = None) -> Callable[[], float]:
    """
    A load reading for the host guard, from its C{--load-source} name:
    C{loadavg} (the 1-minute load average), C{cpu} (the host's CPU percent)
    or C{file:PATH} (a number read from a file at each sample: for tests and
    for external probes).

    @raise ValueError: for another name.
    """
    if source == "loadavg":
        return lambda: os.getloadavg()[0]
    if source == "cpu":
        if sampler is None:
            raise ValueError("the cpu load source needs a sampler")
        return lambda: float(sampler.host().cpu)
    if source.startswith("file:") and len(source) > 5:
        path = source[5:]

        def read() -> float:
            with open(path, encoding="ascii") as f:
                return float(f.read().strip())

        return read
    raise ValueError(f"unknown load source {source!r}: use loadavg, cpu or file:PATH")


# The daemon


@implementer(IInstanceListener)
class _ChildInstances:
    """
    Follows the registry for the daemon: which of its children are there,
    at which admin address, registered or not.
    """

    def __init__(self, daemon: "Daemon") -> None:
        self.daemon = daemon

    def snapshot(self, instances: list[Instance]) -> None:
        for instance in instances:
            self.daemon._instance_seen(instance)

    def added(self, instance: Instance) -> None:
        self.daemon._instance_seen(instance)

    def updated(self, instance: Instance) -> None:
        self.daemon._instance_seen(instance)

    def removed(self, instance: Instance) -> None:
        self.daemon._instance_gone(instance)


class UnknownSubService(ServiceError):
    """
    No sub-service with that uuid runs on this host.
    """


@implementer(IChildObserver)
class Daemon(MultiService):
    """
    The daemon of one host: a L{Supervisor} of the deployed services, the
    L{ServiceHost} of its own C{SkynetDaemon} service, and the guards.

    Its children start and stop in order: the supervised services first
    (they need no registry of ours), then the registry, then the
    C{SkynetDaemon} service; on stop, the C{SkynetDaemon} service first,
    then every child (gracefully), then the registry.  Other services (an
    SSH shell) belong beside it, in the same parent.

    @param registry: the L{IRegistry} (not started; the daemon owns it).
    @param endpoints: server endpoints for C{SkynetDaemon} (first that
        listens wins), C{admin_endpoints} likewise for its admin listener.
    @param registry_url: the URL children get (default C{registry.url}).
    @param deployments: what to deploy at start.
    @param state_path: a state file rewritten at every change.
    @param log_dir: where the children's log files go.
    @param guards: the L{GuardConfig}.
    @param load: the host guard's load reading (default: the 1-minute load
        average).
    @param sampler: measures processes and the host (default
        L{PsutilSampler}).
    @param admin: makes admin calls, C{admin(address, servicemethod,
        params)} returning a Deferred (default L{admin_call}).
    @param service_command: how to run C{twistd} (default
        L{twistd_command}).
    @param own_session: run each child in a session of its own (see
        L{Supervisor}).
    """

    log = Logger()

    def __init__(
        self,
        registry: Any,
        endpoints: Iterable[IStreamServerEndpoint],
        admin_endpoints: Iterable[IStreamServerEndpoint] = (),
        *,
        reactor: Any = None,
        registry_url: str | None = None,
        uuid: str | None = None,
        deployments: Iterable[Deployment] = (),
        state_path: str | None = None,
        log_dir: str | None = None,
        cwd: str | None = None,
        stable_after: float = 10.0,
        max_restart_delay: float = 60.0,
        stop_grace: float = 15.0,
        kill_time: float = 5.0,
        guards: GuardConfig | None = None,
        load: Callable[[], float] | None = None,
        sampler: Any = None,
        admin: Callable[..., Deferred] | None = None,
        service_command: list[str] | None = None,
        stats_interval: float = 5.0,
        max_events: int = 1000,
        advertise_host: str | None = None,
        own_session: bool = True,
    ) -> None:
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self.reactor = reactor
        self.registry = registry
        self.registry_url = registry_url or registry.url
        self.state_path = state_path
        self.cwd = cwd or os.getcwd()
        self.guards = guards or GuardConfig()
        self.sampler = sampler if sampler is not None else PsutilSampler()
        self.load = load or (lambda: os.getloadavg()[0])
        self.admin = admin or partial(admin_call, reactor)
        self.service_command = service_command or twistd_command()
        self.events = EventLog(reactor, max_events)
        self.started_at = reactor.seconds()

        self.supervisor = Supervisor(
            reactor,
            log_dir=log_dir,
            stable_after=stable_after,
            max_restart_delay=max_restart_delay,
            stop_grace=stop_grace,
            kill_time=kill_time,
            polite_stop=self._polite_stop,
            observer=self,
            events=self.events,
            own_session=own_session,
        )
        self.supervisor.setName("supervisor")
        self.supervisor.setServiceParent(self)
        self.service = SkynetDaemon(self)
        self.host = ServiceHost(
            self.service,
            registry,
            endpoints,
            admin_endpoints,
            reactor=reactor,
            uuid=uuid,
            stats_interval=stats_interval,
            advertise_host=advertise_host,
        )
        self.host.setName("host")
        self.host.setServiceParent(self)

        self.deployments: dict[str, Deployment] = {}
        self.instances: dict[str, Instance] = {}
        self.holds: dict[str, set[str]] = {}
        self.overloaded = False
        self.usage: dict[str, Usage] = {}
        self.last_load: float | None = None
        self._over: dict[str, int] = {}
        self._guard_restarts: dict[str, int | None] = {}
        self._high = 0
        self._low = 0
        self._load_failed = False
        self._watch: Any = None
        self._registry_started = False
        self._retry: Deferred | None = None
        self._starting: Deferred | None = None
        self._stopping: Deferred | None = None
        self._loop = LoopingCall(self.sample)
        self._loop.clock = reactor
        for deployment in deployments:
            self._add(deployment)

    @property
    def uuid(self) -> str:
        return self.host.uuid

    # Deployments

    def _add(self, deployment: Deployment) -> None:
        if deployment.uuid in self.deployments:
            raise ValueError(f"{deployment.uuid} is deployed already")
        self.deployments[deployment.uuid] = deployment
        env = dict(os.environ)
        env.update(PYTHONUNBUFFERED="1", SKYNET_REGISTRY=self.registry_url,
                   SKYNET_UUID=deployment.uuid)  # fmt: skip
        self.supervisor.addProcess(deployment.uuid, self.command(deployment), env=env,
                                   cwd=self.cwd, label=deployment.label)  # fmt: skip

    def command(self, deployment: Deployment) -> list[str]:
        """
        The command line of C{deployment}'s next start.
        """
        if not deployment.is_class:
            return shlex.split(deployment.service) + list(deployment.args)
        command = [*self.service_command, "-n", "--pidfile=", "skynet-service",
                   "--service", deployment.service, "--uuid", deployment.uuid,
                   "--registry", self.registry_url, "--supervised"]  # fmt: skip
        if not self.effective_registered(deployment.uuid):
            command.append("--unregistered")
        return command + list(deployment.args)

    def deploy(self, service: Any, args: Any = None, registered: Any = True) -> str:
        """
        Deploy a service on this host now.

        @return: its uuid.
        @raise ValueError: if the request is malformed.
        """
        deployment = make_deployment(service, args, registered)
        self._add(deployment)
        self.events.record("deployed", "{service} ({uuid}) deployed: {spec} {args}",
                           log=self.log, service=deployment.label, uuid=deployment.uuid,
                           spec=deployment.service, args=list(deployment.args),
                           registered=deployment.registered)  # fmt: skip
        self.save_state()
        return deployment.uuid

    def _deployment(self, uuid: Any) -> Deployment:
        if not isinstance(uuid, str) or not uuid:
            raise ServiceError("uuid is required")
        deployment = self.deployments.get(uuid)
        if deployment is None:
            raise UnknownSubService(f"no sub-service with uuid {uuid} on this host")
        return deployment

    def stop(self, uuid: Any) -> Deferred:
        """
        Stop a sub-service for good (gracefully) and forget it.  Fires when
        its process has ended.
        """
        deployment = self._deployment(uuid)
        del self.deployments[deployment.uuid]
        self._forget_guards(deployment.uuid)
        self.save_state()
        return self.supervisor.remove_child(deployment.uuid)

    def restart(self, uuid: Any) -> Deferred:
        """
        Restart a sub-service now (gracefully, then at once, no back-off).
        """
        deployment = self._deployment(uuid)
        return self.supervisor.restart_child(deployment.uuid)

    async def set_registered(self, uuid: Any, registered: bool) -> bool:
        """
        The operator's wish: register or unregister a sub-service (through
        its admin listener).  A guard may keep it unregistered for a while.

        @return: whether it is now meant to be registered.
        """
        deployment = self._deployment(uuid)
        if deployment.registered != registered:
            self.deployments[deployment.uuid] = attr.evolve(deployment, registered=registered)
            self.save_state()
        await self._apply_registration(deployment.uuid, require=True)
        return self.effective_registered(deployment.uuid)

    def effective_registered(self, uuid: str) -> bool:
        """
        Whether C{uuid} is meant to be registered now: the operator wants it
        and no guard holds it.
        """
        deployment = self.deployments.get(uuid)
        return (
            deployment is not None
            and deployment.registered
            and not self.holds.get(uuid)
            and not self.overloaded
        )

    async def _apply_registration(self, uuid: str, require: bool = False) -> bool:
        """
        Make the child's registration match L{effective_registered}: its
        next start's arguments, and its running process through its admin
        listener (if it is in the registry yet; if not, when its node
        appears).

        @param require: fail with L{ServiceError} if the admin call fails.
        @return: whether the running process was told.
        """
        deployment = self.deployments.get(uuid)
        if deployment is None:
            return False
        self.supervisor.set_args(uuid, self.command(deployment))
        instance = await self._live_instance(uuid)
        if instance is None or instance.admin is None:
            # Not in the registry yet: told when it appears (_instance_seen).
            return False
        want = self.effective_registered(uuid)
        method = "Admin.Register" if want else "Admin.Unregister"
        try:
            await self.admin(instance.admin, method, {})
        except Exception as e:
            self.log.warn("{method} on {uuid} ({address}) failed: {error}", method=method,
                          uuid=uuid, address=str(instance.admin), error=e)  # fmt: skip
            if require:
                raise ServiceError(f"{method} on {uuid} failed: {e}") from None
            return False
        return True

    async def _live_instance(self, uuid: str) -> Instance | None:
        """
        The registry's node of the running process of C{uuid}, if any.
        """
        child = self.supervisor.children.get(uuid)
        if child is None or child.pid is None:
            return None
        instance = self.instances.get(uuid)
        if instance is None or (instance.pid is not None and instance.pid != child.pid):
            try:
                found = await self.registry.query(Query(uuid=uuid))
            except Exception as e:
                self.log.warn("cannot query the registry for {uuid}: {error}", uuid=uuid, error=e)
                return None
            found = [i for i in found if i.pid is None or i.pid == child.pid]
            if not found:
                return None
            instance = found[0]
        return instance

    def save_state(self) -> None:
        """
        Rewrite the state file (if there is one).
        """
        if self.state_path is None:
            return
        state = DaemonState(uuid=self.uuid, deployments=tuple(self.deployments.values()))
        try:
            save_state(self.state_path, state)
        except OSError as e:
            self.log.error("cannot write the state file {path}: {error}",
                           path=self.state_path, error=e)  # fmt: skip

    def sub_services(self) -> list[SubServiceStatus]:
        """
        Every sub-service, as C{ListSubServices} answers.
        """
        services = []
        for uuid, deployment in self.deployments.items():
            status = self.supervisor.status(uuid)
            instance = self.instances.get(uuid)
            usage = self.usage.get(uuid)
            last_exit = status["last_exit"]
            held = sorted(self.holds.get(uuid, ())) + (["host-load"] if self.overloaded else [])
            services.append(SubServiceStatus(
                uuid=uuid,
                service=deployment.service,
                args=deployment.args,
                running=status["running"],
                pid=status["pid"],
                restarts=status["restarts"],
                started=status["started"],
                registered=self.effective_registered(uuid),
                last_exit=ExitStatus.from_bson(last_exit) if last_exit else None,
                desired_registered=deployment.registered,
                held=tuple(held),
                in_registry=None if instance is None else instance.registered,
                next_restart=status["next_restart"],
                backoff=float(status["backoff"]),
                log=status["log"],
                cpu=usage.cpu if usage else None,
                rss=usage.rss if usage else None,
            ))  # fmt: skip
        return services

    # IChildObserver

    def child_started(self, name: str, pid: int) -> None:
        self._over.pop(name, None)

    def child_exited(self, name: str, record: ExitRecord) -> Deferred:
        """
        A child died: its registry nodes go now, not at session expiry.  The
        file registry already hides the nodes of dead processes; ZooKeeper
        keeps a killed process's ephemeral nodes until its session expires,
        so they are deleted here (by uuid, before the restart).
        """
        self.usage.pop(name, None)
        self.instances.pop(name, None)
        if not self._registry_started:
            return succeed(None)
        return Deferred.fromCoroutine(self._remove_nodes(name, record))

    async def _remove_nodes(self, uuid: str, record: ExitRecord) -> None:
        found = await self.registry.query(Query(uuid=uuid))
        for instance in found:
            if instance.pid is not None and record.pid is not None and instance.pid != record.pid:
                continue
            await self.registry.remove(instance)
            self.events.record("registry_cleanup",
                               "{service} ({uuid}) removed from the registry: {path}",
                               log=self.log, service=instance.name, uuid=uuid,
                               path=instance.path, pid=record.pid)  # fmt: skip

    def _polite_stop(self, name: str) -> Deferred:
        async def ask() -> None:
            instance = await self._live_instance(name)
            if instance is None or instance.admin is None:
                raise ConnectionFailed("not in the registry (no admin address)")
            await self.admin(instance.admin, "Admin.Stop", {"waitforclients": True})

        return Deferred.fromCoroutine(ask())

    # The registry's view of the children

    def _instance_seen(self, instance: Instance) -> None:
        uuid = instance.uuid
        if uuid not in self.deployments:
            return
        child = self.supervisor.children.get(uuid)
        if child is None or (instance.pid is not None and instance.pid != child.pid):
            return
        previous = self.instances.get(uuid)
        self.instances[uuid] = instance
        if previous is None or previous.pid != instance.pid:
            # A new process is in the registry: it started as its arguments
            # said, but the wish may have changed since.
            if instance.registered != self.effective_registered(uuid):
                Deferred.fromCoroutine(self._apply_registration(uuid))

    def _instance_gone(self, instance: Instance) -> None:
        known = self.instances.get(instance.uuid)
        if known is not None and known.pid == instance.pid:
            del self.instances[instance.uuid]

    # Guards

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
        guards = self.guards
        running = {}
        for uuid, child in list(self.supervisor.children.items()):
            if child.pid is None or uuid not in self.deployments:
                self.usage.pop(uuid, None)
                self._over.pop(uuid, None)
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
            over = self._over_reasons(usage)
            if self._guard_restarts.get(uuid, -1) == child.pid:
                continue  # being restarted by a guard
            if not over:
                self._over.pop(uuid, None)
                if uuid in self._guard_restarts:
                    self._check_recovery(uuid, child.pid, usage)
                continue
            count = self._over[uuid] = self._over.get(uuid, 0) + 1
            if count >= guards.child_samples:
                # (Also when a process a guard restarted is over again: it
                # is restarted again, and stays unregistered meanwhile.)
                self._over.pop(uuid, None)
                Deferred.fromCoroutine(self._guard_restart(uuid, child.pid, usage, over))
        try:
            self.sampler.forget(running.values())
        except Exception:
            self.log.failure("pruning the sampler failed")

    def _over_reasons(self, usage: Usage) -> list[str]:
        guards = self.guards
        reasons = []
        if guards.child_max_cpu and usage.cpu > guards.child_max_cpu:
            reasons.append("cpu")
        if guards.child_max_rss and usage.rss > guards.child_max_rss:
            reasons.append("memory")
        return reasons

    def _guard_fields(self, usage: Usage) -> dict[str, Any]:
        return {"cpu": usage.cpu, "rss": usage.rss, "max_cpu": self.guards.child_max_cpu,
                "max_rss": self.guards.child_max_rss, "samples": self.guards.child_samples}  # fmt: skip

    async def _guard_restart(self, uuid: str, pid: int, usage: Usage, reasons: list[str]) -> None:
        deployment = self.deployments[uuid]
        self._guard_restarts[uuid] = pid
        self.holds.setdefault(uuid, set()).update(reasons)
        fields = self._guard_fields(usage)
        self.events.record("guard_unregister",
                           "{service} ({uuid}) pid {pid} over its {reasons} threshold for "
                           "{samples} samples (cpu {cpu:.0f}%, rss {rss} bytes): unregistering",
                           level=LogLevel.warn, log=self.log, service=deployment.label,
                           uuid=uuid, pid=pid, reasons="+".join(reasons), **fields)  # fmt: skip
        await self._apply_registration(uuid)
        if uuid not in self.deployments:
            return
        self.events.record("guard_restart",
                           "{service} ({uuid}) pid {pid}: restarting (in-flight requests finish "
                           "first); registered again when healthy",
                           level=LogLevel.warn, log=self.log, service=deployment.label, uuid=uuid,
                           pid=pid, reasons="+".join(reasons), **fields)  # fmt: skip
        await self.supervisor.restart_child(uuid)

    def _check_recovery(self, uuid: str, pid: int, usage: Usage) -> None:
        """
        A guard restarted C{uuid}: once a new process is in the registry and
        under its thresholds, let it be registered again.
        """
        instance = self.instances.get(uuid)
        if instance is None or instance.pid not in (None, pid):
            return
        del self._guard_restarts[uuid]
        reasons = self.holds.pop(uuid, set())
        self.events.record("guard_register",
                           "{service} ({uuid}) pid {pid} healthy (cpu {cpu:.0f}%, rss {rss} "
                           "bytes): registering again",
                           log=self.log, service=self.deployments[uuid].label, uuid=uuid,
                           pid=pid, reasons="+".join(sorted(reasons)),
                           **self._guard_fields(usage))  # fmt: skip
        Deferred.fromCoroutine(self._apply_registration(uuid))

    def _forget_guards(self, uuid: str) -> None:
        self.holds.pop(uuid, None)
        self._guard_restarts.pop(uuid, None)
        self._over.pop(uuid, None)
        self.usage.pop(uuid, None)
        self.instances.pop(uuid, None)

    def _sample_load(self) -> None:
        guards = self.guards
        if not guards.load_high:
            return
        try:
            reading = float(self.load())
        except Exception as e:
            if not self._load_failed:
                self.log.warn("cannot read the host load: {error}", error=e)
            self._load_failed = True
            return
        self._load_failed = False
        self.last_load = reading
        low = guards.load_low_mark
        if reading > guards.load_high:
            self._high, self._low = self._high + 1, 0
        elif reading < low:
            self._high, self._low = 0, self._low + 1
        else:
            self._high = self._low = 0
        fields: dict[str, Any] = {"load": reading, "high": guards.load_high, "low": low,
                  "samples": guards.load_samples}  # fmt: skip
        if not self.overloaded and self._high >= guards.load_samples:
            self.overloaded = True
            self.events.record("host_overloaded",
                               "host load {load} above {high} for {samples} samples: "
                               "unregistering {count} instances",
                               level=LogLevel.warn, log=self.log, count=len(self.deployments),
                               uuids=sorted(self.deployments), **fields)  # fmt: skip
            self._apply_all()
        elif self.overloaded and self._low >= guards.load_samples:
            self.overloaded = False
            self.events.record("host_recovered",
                               "host load {load} below {low} for {samples} samples: "
                               "registering {count} instances again",
                               log=self.log, count=len(self.deployments),
                               uuids=sorted(self.deployments), **fields)  # fmt: skip
            self._apply_all()

    def _apply_all(self) -> None:
        for uuid in list(self.deployments):
            Deferred.fromCoroutine(self._apply_registration(uuid))

    # Statistics

    def host_stats(self) -> HostStats:
        """
        The host and this daemon's children, as C{HostStats} answers.
        """
        try:
            figures: HostFigures | None = self.sampler.host()
        except Exception:
            self.log.failure("reading the host's statistics failed")
            figures = None
        try:
            own = self.sampler.own_usage()
        except Exception:
            own = None
        guards = self.guards
        children = []
        for uuid, deployment in self.deployments.items():
            child = self.supervisor.children[uuid]
            children.append(ChildStats(uuid=uuid, service=deployment.label, pid=child.pid,
                                       running=child.running, usage=self.usage.get(uuid)))  # fmt: skip
        return HostStats(
            daemon=DaemonProcess(
                uuid=self.uuid,
                pid=os.getpid(),
                uptime=self.reactor.seconds() - self.started_at,
                usage=own,
            ),  # fmt: skip
            load_guard=LoadGuardStatus(
                reading=self.last_load,
                high=guards.load_high,
                low=guards.load_low_mark if guards.load_high else None,
                overloaded=self.overloaded,
            ),
            children=tuple(children),
            figures=figures,
        )

    def extra_statistics(self) -> dict[str, Any]:
        return {
            "Host": self.host_stats().to_bson(),
            "Events": [e.to_bson() for e in self.events.recent(EVENTS_IN_STATISTICS)],
        }

    # IService

    def startService(self) -> Deferred:  # type: ignore[override]
        BaseService.startService(self)
        self._starting = Deferred.fromCoroutine(self._start())
        self._starting.addErrback(self._start_failed)
        return self._starting

    def _start_failed(self, failure: Failure) -> None:
        from twisted.internet.defer import CancelledError

        if not failure.check(CancelledError):
            self.log.failure("the daemon failed to start", failure)

    async def _start(self) -> None:
        self.log.info("skynet daemon {uuid} starting with {count} sub-services on {registry}",
                      uuid=self.uuid, count=len(self.deployments),
                      registry=self.registry_url)  # fmt: skip
        self.supervisor.startService()
        self.save_state()
        delay = 0.5
        while self.running:
            try:
                await self.registry.start()
            except Exception as e:
                self.log.warn("cannot start the registry {url} ({error}); retrying in {delay}s",
                              url=self.registry_url, error=e, delay=delay)  # fmt: skip
                self._retry = deferLater(self.reactor, delay, lambda: None)
                await self._retry
                delay = min(delay * 2, 10.0)
                continue
            self._registry_started = True
            break
        if not self.running:
            return
        self._watch = self.registry.watch(Query(), _ChildInstances(self))
        self.host.startService()
        await self.host.when_started()
        self._loop.start(self.guards.sample_interval, now=True).addErrback(
            lambda f: self.log.failure("the guard loop failed", f)
        )

    def stopService(self) -> Deferred:  # type: ignore[override]
        if self._stopping is None:
            self._stopping = Deferred.fromCoroutine(self._stop())
        return self._stopping

    async def _stop(self) -> None:
        BaseService.stopService(self)
        if self._loop.running:
            self._loop.stop()
        if self._retry is not None and not self._retry.called:
            self._retry.cancel()  # the start, waiting to retry the registry, ends
        if self.host.running:
            await self.host.stopService()
        if self.supervisor.running:
            await self.supervisor.stopService()
        if self._watch is not None:
            self._watch.stop()
            self._watch = None
        if self._registry_started:
            self._registry_started = False
            try:
                await self.registry.stop()
            except Exception:
                self.log.failure("stopping the registry failed")
        self.log.info("skynet daemon {uuid} stopped", uuid=self.uuid)


# The remote methods


def _uuid(params: dict[str, Any]) -> Any:
    return params.get("uuid") if isinstance(params, dict) else None


_log = Logger()


def _logged(d: Deferred, what: str, uuid: str) -> None:
    d.addErrback(lambda f: _log.failure("{what} {uuid} failed", f, what=what, uuid=uuid))


class SkynetDaemon(Service):
    """
    The daemon's remote methods; each delegates to its L{Daemon}.
    """

    name = DAEMON_SERVICE_NAME

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    def Deploy(self, request_info: Any, params: dict[str, Any]) -> dict[str, Any]:
        """
        C{{service, args, registered}} -> C{{uuid}}: start a service here.
        """
        try:
            uuid = self.daemon.deploy(params.get("service"), params.get("args"),
                                      params.get("registered", True))  # fmt: skip
        except ValueError as e:
            raise ServiceError(f"cannot deploy: {e}") from None
        return {"uuid": uuid}

    def ListSubServices(self, request_info: Any, params: dict[str, Any]) -> dict[str, Any]:
        """
        C{{}} -> C{{services: {uuid: {...}}}}.
        """
        return sub_services_to_bson(self.daemon.sub_services())

    def StopSubService(self, request_info: Any, params: dict[str, Any]) -> dict[str, Any]:
        """
        C{{uuid}} -> C{{ok, uuid}}: stop it gracefully and forget it.  The
        answer comes at once; the process ends after draining.
        """
        uuid = _uuid(params)
        _logged(self.daemon.stop(uuid), "stopping", uuid)
        return {"ok": True, "uuid": uuid}

    def StopAllSubServices(self, request_info: Any, params: dict[str, Any]) -> dict[str, Any]:
        uuids = sorted(self.daemon.deployments)
        for uuid in uuids:
            _logged(self.daemon.stop(uuid), "stopping", uuid)
        return {"ok": True, "uuids": uuids}

    def RestartSubService(self, request_info: Any, params: dict[str, Any]) -> dict[str, Any]:
        """
        C{{uuid}} -> C{{ok, uuid}}: restart it gracefully, without back-off.
        """
        uuid = _uuid(params)
        _logged(self.daemon.restart(uuid), "restarting", uuid)
        return {"ok": True, "uuid": uuid}

    def RestartAllSubServices(self, request_info: Any, params: dict[str, Any]) -> dict[str, Any]:
        uuids = sorted(self.daemon.deployments)
        for uuid in uuids:
            _logged(self.daemon.restart(uuid), "restarting", uuid)
        return {"ok": True, "uuids": uuids}

    async def RegisterSubService(self, request_info: Any, params: dict[str, Any]) -> dict[str, Any]:
        """
        C{{uuid}} -> C{{ok, uuid, registered}} (through its admin listener).
        """
        uuid = _uuid(params)
        registered = await self.daemon.set_registered(uuid, True)
        return {"ok": True, "uuid": uuid, "registered": registered}

    async def UnregisterSubService(
        self, request_info: Any, params: dict[str, Any]
    ) -> dict[str, Any]:
        uuid = _uuid(params)
        registered = await self.daemon.set_registered(uuid, False)
        return {"ok": True, "uuid": uuid, "registered": registered}

    def HostStats(self, request_info: Any, params: dict[str, Any]) -> dict[str, Any]:
        """
        C{{}} -> C{{cpu, memory, load, uptime, cpus, children, ...}}.
        """
        return self.daemon.host_stats().to_bson()

    def extra_statistics(self) -> dict[str, Any]:
        return self.daemon.extra_statistics()


__all__ = [
    "DAEMON_SERVICE_NAME",
    "Daemon",
    "DaemonState",
    "Deployment",
    "GuardConfig",
    "PsutilSampler",
    "SkynetDaemon",
    "UnknownSubService",
    "Usage",
    "admin_call",
    "load_reading",
    "load_state",
    "make_deployment",
    "parse_deploy_file",
    "save_state",
    "twistd_command",
]
