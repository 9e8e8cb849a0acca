"""
The daemon itself: L{Daemon} wires the parts of L{skynet.daemon} into one
service tree, and L{SkynetDaemon} is its RPC face (thin adapters that
answer with the records of L{skynet.control}).

Its children, in start order (stopped in reverse, each awaited):

    1. the registry's start, retried with back-off until it succeeds;
    2. the view of its children in the registry (once the registry is up);
    3. the L{Supervisor} of the deployed services (they need no registry);
    4. the L{ServiceHost} of C{SkynetDaemon} (once the registry is up);
    5. the guards' sampling timer (once the registry is up);
    6. the liveness probes of the children (once the registry is up).

So on stop: the probes, the guards, then C{SkynetDaemon}, then every child
(gracefully, their nodes removed while the registry is still up), then the
view, then the registry.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Coroutine, Iterable
from functools import partial
from typing import Any

from twisted.application.internet import TimerService
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.logger import Logger, LogLevel
from zope.interface import implementer

from skynet import control
from skynet._services import RetryingStart, SequentialMultiService, StartAfter
from skynet.admin import admin_call
from skynet.config import EnvDefaults, default_reactor
from skynet.control import (
    Deployment,
    HostStats,
    SubServiceStatus,
)
from skynet.daemon import status
from skynet.daemon.children import ChildInstances
from skynet.daemon.deployments import DeploymentStore, command_line, make_deployment, twistd_command
from skynet.daemon.guards import GuardConfig, PsutilSampler, Usage
from skynet.daemon.policy import RegistrationPolicy
from skynet.daemon.probes import ProbeConfig
from skynet.daemon.probing import ProbeRunner
from skynet.daemon.sampling import GuardRunner
from skynet.errors import ConnectionFailed, ServiceError
from skynet.procmon import EventLog, ExitRecord, IChildObserver, Supervisor
from skynet.registry.base import Instance
from skynet.service import Service, ServiceHost

__all__ = ["DAEMON_SERVICE_NAME", "DEFAULT_START_TIMEOUT", "EVENTS_IN_STATISTICS", "Daemon",
           "DeployFailed", "SkynetDaemon", "UnknownSubService"]  # fmt: skip

#: The daemon's service name (L{skynet.control.DAEMON_SERVICE}).
DAEMON_SERVICE_NAME = control.DAEMON_SERVICE

#: How many recent events go into the daemon's statistics node.
EVENTS_IN_STATISTICS = 20

#: Seconds C{Deploy} waits for a new child to register (or fail).
DEFAULT_START_TIMEOUT = 15.0

#: How many of a failed child's last output lines a C{Deploy} error quotes.
ERROR_LINES = 10


class DeployFailed(ServiceError):
    """
    A deployed child ended, or did not register within the start timeout,
    before C{Deploy} answered.  The deployment stays (it restarts with
    back-off, listed as failing) until it is stopped.
    """


class UnknownSubService(ServiceError):
    """
    No sub-service with that uuid runs on this host.
    """


@implementer(IChildObserver)
class Daemon(SequentialMultiService):
    """
    The daemon of one host: a L{Supervisor} of the deployed services, the
    L{ServiceHost} of its own C{SkynetDaemon} service, and the guards (see
    the module docstring for the order of its children).  Other services
    (an SSH shell) belong beside it, in the same parent.

    (Its policy, guards, registry view, deployments and status records are
    in their own modules; what stays is the wiring and the operations
    C{SkynetDaemon} exposes.)

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
    @param sampler: an L{ISampler} (default L{PsutilSampler}).
    @param admin: makes admin calls, C{admin(address, servicemethod,
        params)} returning a Deferred (default L{admin_call}).
    @param service_command: how to run C{twistd} (default
        L{twistd_command}).
    @param own_session: run each child in a session of its own (see
        L{Supervisor}).
    @param probes: the L{ProbeConfig} of the children's liveness probes.
    @param start_timeout: how long C{Deploy} waits for a new child to be
        in the registry (or to fail) before it answers (0: not at all).
    @param cluster: campaign for the cluster's leadership and, while
        leading, run its reconciler (L{skynet.cluster.service.ClusterService};
        C{twistd skynet-daemon} does unless C{--no-cluster}).
    @param capacity: how many instances the cluster's placement may put on
        this host (published as C{Host.capacity}; L{None}: no limit).
    @param cluster_interval: seconds between two reconciler passes.
    @param cluster_list_interval: seconds between two listings of every
        daemon's children by the reconciler.
    @param defaults: Go Skynet's environment as the edge read it, for the
        daemon's own L{ServiceHost} (see there); C{os.environ} is not read.
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
        start_timeout: float = DEFAULT_START_TIMEOUT,
        probes: ProbeConfig | None = None,
        cluster: bool = False,
        capacity: int | None = None,
        cluster_interval: float = 2.0,
        cluster_list_interval: float = 30.0,
        defaults: EnvDefaults | None = None,
        deploy_check: Callable[[Any], None] | None = None,
    ) -> None:
        super().__init__()
        # Refuses (ValueError) what this host may not run: skynet.tls.DeployPolicy.
        self.deploy_check = deploy_check
        self.capacity = capacity
        self.start_timeout = start_timeout
        # uuid -> Deferreds of Deploy calls waiting for its first node.
        self._start_waiters: dict[str, list[Deferred]] = {}
        # uuid -> the pid of its last process seen in the registry.
        self.registered_pids: dict[str, int | None] = {}
        self.reactor = reactor = default_reactor(reactor)
        self.registry = registry
        self.registry_url = registry_url or registry.url
        self.cwd = cwd or os.getcwd()
        self.guards = guards or GuardConfig()
        self.sampler = sampler if sampler is not None else PsutilSampler()
        self.load = load or (lambda: os.getloadavg()[0])
        self.admin = admin or partial(admin_call, reactor)
        self.service_command = service_command or twistd_command()
        self.events = EventLog(reactor, max_events)
        self.started_at = reactor.seconds()
        self.store = DeploymentStore(state_path)
        self.policy = RegistrationPolicy()
        self.guard_runner = GuardRunner(self, self.guards, self.sampler, self.load)

        self.registry_start = RetryingStart(registry.start, registry.stop, reactor=reactor,
                                            what=f"start the registry {self.registry_url}")  # fmt: skip
        self.children = ChildInstances(registry, self._accepts, self._new_process)
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
        self.service = SkynetDaemon(self)
        self.host = ServiceHost(self.service, registry, endpoints, admin_endpoints,
                                reactor=reactor, uuid=uuid, stats_interval=stats_interval,
                                advertise_host=advertise_host, defaults=defaults)  # fmt: skip
        self.sampling = TimerService(self.guards.sample_interval, self.sample)
        self.sampling.clock = reactor
        self.probes = ProbeRunner(self, probes or ProbeConfig())
        gate = self.registry_start
        parts: list[tuple[str, Any]] = [
            ("registry", gate),
            ("children", StartAfter(gate, self.children)),
            ("supervisor", self.supervisor),
            ("host", StartAfter(gate, self.host)),
            ("guards", StartAfter(gate, self.sampling)),
            ("probes", StartAfter(gate, self.probes)),
        ]
        self.cluster: Any = None
        if cluster:
            # Last added: it starts after the host is up and stops first.
            from skynet.cluster.service import ClusterService

            self.cluster = ClusterService(
                registry,
                reactor=reactor,
                identifier=f"daemon {self.host.uuid} pid {os.getpid()}",
                interval=cluster_interval,
                list_interval=cluster_list_interval,
                on_change=self._cluster_changed,
            )
            parts.append(("cluster", StartAfter(gate, self.cluster)))
        for name, child in parts:
            child.setName(name)
            child.setServiceParent(self)
        for deployment in deployments:
            self._add(deployment)

    @property
    def uuid(self) -> str:
        return self.host.uuid

    def _cluster_changed(self, what: str) -> None:
        kind, _, reason = what.partition(": ")
        if kind == "elected":
            self.events.record("cluster_elected",
                               "this daemon leads the cluster: its reconciler runs")  # fmt: skip
        else:
            self.events.record("cluster_deposed",
                               "this daemon no longer leads the cluster: {reason}",
                               reason=reason)  # fmt: skip

    @property
    def deployments(self) -> dict[str, Deployment]:
        """
        uuid -> L{Deployment}, in the order they were made.
        """
        return self.store.deployments

    @property
    def overloaded(self) -> bool:
        return self.policy.overloaded

    @property
    def holds(self) -> dict[str, set[str]]:
        return self.policy.holds

    @property
    def usage(self) -> dict[str, Usage]:
        """
        Per child, its last sample.
        """
        return self.guard_runner.usage

    @property
    def instances(self) -> dict[str, Instance]:
        return self.children.instances

    def _spawn(self, coro: Coroutine[Any, Any, Any], what: str, **fields: Any) -> Deferred:
        """
        Run C{coro} without waiting for it; an unexpected failure is logged.
        """
        d = Deferred.fromCoroutine(coro)
        d.addErrback(lambda f: self.log.failure("{what} failed", f, what=what, **fields))
        return d

    # Deployments

    def _add(self, deployment: Deployment) -> None:
        self.store.add(deployment)
        env = dict(os.environ)
        env.update(PYTHONUNBUFFERED="1", SKYNET_REGISTRY=self.registry_url,
                   SKYNET_UUID=deployment.uuid)  # fmt: skip
        if self.supervisor.log_dir:  # (observe hook) children write JSON logs there
            env["SKYNET_LOG_DIR"] = self.supervisor.log_dir
        if "SKYNET_BUSY_POLL" not in env and (self.guards.child_max_cpu or self.guards.load_high):
            # A child's busy polling (skynet.busypoll) reads as CPU use and
            # load: under a CPU or load guard, children do not poll unless
            # the daemon's environment says so.
            env["SKYNET_BUSY_POLL"] = "0"
        self.supervisor.add_child(deployment.uuid, self.command(deployment), env=env,
                                   cwd=self.cwd, label=deployment.label)  # fmt: skip

    def command(self, deployment: Deployment) -> list[str]:
        """
        The command line of C{deployment}'s next start.
        """
        return command_line(deployment, service_command=self.service_command,
                            registry_url=self.registry_url,
                            registered=self.effective_registered(deployment.uuid))  # fmt: skip

    def deploy(self, service: Any, args: Any = None, registered: Any = True,
               uuid: Any = None) -> str:  # fmt: skip
        """
        Deploy a service on this host now.

        @param uuid: the instance's uuid (default: a new one).  Deploying
            again what a uuid already names changes nothing (so that a
            retried C{Deploy} does not start a second instance).
        @return: its uuid.
        @raise ValueError: if the request is malformed, C{uuid} names
            another deployment, or C{deploy_check} refuses C{service}.
        """
        if self.deploy_check is not None:
            self.deploy_check(service)
        deployment = make_deployment(service, args, registered, uuid=uuid)
        known = self.store.get(deployment.uuid)
        if known is not None:
            if known != deployment:
                raise ValueError(f"{deployment.uuid} is deployed already, as {known.service} "
                                 f"{' '.join(known.args)}".rstrip())  # fmt: skip
            return known.uuid
        self._add(deployment)
        self.events.record("deployed", "{service} ({uuid}) deployed: {spec} {args}",
                           log=self.log, service=deployment.label, uuid=deployment.uuid,
                           spec=deployment.service, args=list(deployment.args),
                           registered=deployment.registered)  # fmt: skip
        self.save_state()
        return deployment.uuid

    async def wait_started(self, uuid: str, timeout: float | None = None) -> Instance | None:
        """
        Wait until the current (or next) process of C{uuid} is in the
        registry.

        @param timeout: seconds (default L{start_timeout}); 0: do not wait.
        @return: its node (L{None} if not waiting).
        @raise DeployFailed: if its process ends first, or the time runs
            out: with how it ended and its last lines of output.
        """
        timeout = self.start_timeout if timeout is None else timeout
        if timeout <= 0:
            return None
        instance = self._live_instance(uuid)
        if instance is not None:
            return instance
        d: Deferred = Deferred()
        self._start_waiters.setdefault(uuid, []).append(d)

        def expire() -> None:
            if d.called:
                return
            self._start_waiters.get(uuid, []).remove(d)
            child = self.supervisor.children.get(uuid)
            lines = list(child.output) if child is not None else []
            label = self.store.deployments[uuid].label if uuid in self.store else uuid
            d.errback(DeployFailed(_why(f"{label} ({uuid}) did not register within "
                                        f"{timeout:g}s", uuid, lines, running=True)))  # fmt: skip

        timer = self.reactor.callLater(timeout, expire)

        def done(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            return result

        return await d.addBoth(done)

    def _fire_waiters(self, uuid: str, instance: Instance) -> None:
        for d in self._start_waiters.pop(uuid, []):
            d.callback(instance)

    def _fail_waiters(self, uuid: str, error: Exception) -> None:
        for d in self._start_waiters.pop(uuid, []):
            d.errback(error)

    def _deployment(self, uuid: Any) -> Deployment:
        if not isinstance(uuid, str) or not uuid:
            raise ServiceError("uuid is required")
        deployment = self.store.get(uuid)
        if deployment is None:
            raise UnknownSubService(f"no sub-service with uuid {uuid} on this host")
        return deployment

    def stop(self, uuid: Any) -> Deferred:
        """
        Stop a sub-service for good (gracefully) and forget it.  Fires when
        its process has ended.
        """
        deployment = self._deployment(uuid)
        self.store.remove(deployment.uuid)
        self.policy.forget(deployment.uuid)
        self.guard_runner.forget(deployment.uuid)
        self.probes.guard.forget(deployment.uuid)
        self.children.forget(deployment.uuid)
        self.registered_pids.pop(deployment.uuid, None)
        self._fail_waiters(
            deployment.uuid,
            DeployFailed(
                f"{deployment.label} ({deployment.uuid}) was stopped before it registered"
            ),
        )
        self.save_state()
        return self.supervisor.remove_child(deployment.uuid)

    def restart(self, uuid: Any) -> Deferred:
        """
        Restart a sub-service now (gracefully, then at once, no back-off).
        """
        return self.supervisor.restart_child(self._deployment(uuid).uuid)

    def save_state(self) -> None:
        """
        Rewrite the state file (if there is one).
        """
        try:
            self.store.save(self.uuid)
        except OSError as e:
            self.log.error("cannot write the state file {path}: {error}",
                           path=self.store.state_path, error=e)  # fmt: skip

    # Registration

    def effective_registered(self, uuid: str) -> bool:
        """
        Whether C{uuid} is meant to be registered now: the operator wants it
        and no guard holds it.
        """
        deployment = self.store.get(uuid)
        return self.policy.effective(uuid, deployment.registered if deployment else None)

    async def set_registered(self, uuid: Any, registered: bool) -> bool:
        """
        The operator's wish: register or unregister a sub-service (through
        its admin listener).  A guard may keep it unregistered for a while.

        @return: whether it is now meant to be registered.
        """
        deployment = self._deployment(uuid)
        if self.store.set_registered(deployment.uuid, registered):
            self.save_state()
        await self._apply_registration(deployment.uuid, require=True)
        return self.effective_registered(deployment.uuid)

    def _live_instance(self, uuid: str) -> Instance | None:
        """
        The registry's node of the running process of C{uuid}, if any.
        """
        child = self.supervisor.children.get(uuid)
        return self.children.live(uuid, child.pid if child is not None else None)

    async def _apply_registration(self, uuid: str, require: bool = False) -> bool:
        """
        Make the child's registration match L{effective_registered}: its
        next start's arguments, and its running process through its admin
        listener (if it is in the registry yet; if not, when its node
        appears).

        @param require: fail with L{ServiceError} if the admin call fails.
        @return: whether the running process was told.
        """
        deployment = self.store.get(uuid)
        if deployment is None:
            return False
        self.supervisor.set_args(uuid, self.command(deployment))
        instance = self._live_instance(uuid)
        if instance is None or instance.admin is None:
            return False  # told when its node appears (_new_process)
        method = "Admin.Register" if self.effective_registered(uuid) else "Admin.Unregister"
        try:
            await self.admin(instance.admin, method, {})
        except Exception as e:
            self.log.warn("{method} on {uuid} ({address}) failed: {error}", method=method,
                          uuid=uuid, address=str(instance.admin), error=e)  # fmt: skip
            if require:
                raise ServiceError(f"{method} on {uuid} failed: {e}") from None
            return False
        return True

    def _accepts(self, instance: Instance) -> bool:
        if instance.uuid not in self.store:
            return False
        child = self.supervisor.children.get(instance.uuid)
        return child is not None and (instance.pid is None or instance.pid == child.pid)

    def _new_process(self, instance: Instance) -> None:
        self.registered_pids[instance.uuid] = instance.pid
        self._fire_waiters(instance.uuid, instance)
        # It started as its arguments said, but the wish may have changed since.
        if instance.registered != self.effective_registered(instance.uuid):
            self._spawn(self._apply_registration(instance.uuid), "registering", uuid=instance.uuid)

    def _apply_all(self) -> None:
        for uuid in list(self.store.deployments):
            self._spawn(self._apply_registration(uuid), "registering", uuid=uuid)

    # IChildObserver

    def child_started(self, name: str, pid: int) -> None:
        self.guard_runner.child_guard.started(name)
        self.probes.guard.started(name)

    def child_exited(self, name: str, record: ExitRecord) -> Deferred:
        """
        A child died: its registry nodes go now, not at session expiry.  The
        file registry already hides the nodes of dead processes; ZooKeeper
        keeps a killed process's ephemeral nodes until its session expires,
        so they are deleted here, by the node in hand, before the restart.
        """
        self.usage.pop(name, None)
        if name in self._start_waiters:
            child = self.supervisor.children.get(name)
            label = self.store.deployments[name].label if name in self.store else name
            lines = list(child.last_output) if child is not None else []
            self._fail_waiters(
                name,
                DeployFailed(
                    _why(f"{label} ({name}) {record.describe()} before it registered", name, lines)
                ),
            )
        if not self.registry_start.started:
            self.children.forget(name)
            return succeed(None)
        return Deferred.fromCoroutine(self._remove_nodes(name, record))

    async def _remove_nodes(self, uuid: str, record: ExitRecord) -> None:
        try:
            instance = await self.children.remove_dead(uuid, record.pid)
        except Exception as e:
            # The registry unreachable: an outage, not a bug; the node goes
            # at session expiry instead.
            self.log.warn("cannot remove the node of dead {uuid} (pid {pid}): {error}",
                          uuid=uuid, pid=record.pid, error=e)  # fmt: skip
            return
        if instance is not None:
            self.events.record("registry_cleanup",
                               "{service} ({uuid}) removed from the registry: {path}",
                               log=self.log, service=instance.name, uuid=uuid,
                               path=instance.path, pid=record.pid)  # fmt: skip

    def _polite_stop(self, name: str) -> Deferred:
        instance = self._live_instance(name)
        if instance is None or instance.admin is None:
            return Deferred.fromCoroutine(_refuse("not in the registry (no admin address)"))
        return self.admin(instance.admin, "Admin.Stop", {"waitforclients": True})

    # Guards

    def sample(self) -> None:
        """
        One round of measurements and guard decisions (see L{GuardRunner}).
        """
        self.guard_runner.sample()

    # Reading

    def sub_services(self) -> list[SubServiceStatus]:
        """
        Every sub-service, as C{ListSubServices} answers.
        """
        return status.sub_services(self)

    def host_stats(self) -> HostStats:
        """
        The host and this daemon's children, as C{HostStats} answers.
        """
        return status.host_stats(self)

    def extra_statistics(self) -> dict[str, Any]:
        host = self.host_stats().to_bson()
        if self.capacity is not None:
            # Read by the cluster's placement (skynet.cluster.reconciler).
            host["capacity"] = self.capacity
        return {
            "Host": host,
            "Events": [e.to_bson() for e in self.events.recent(EVENTS_IN_STATISTICS)],
        }

    # IService

    def startService(self) -> None:
        self.log.info("skynet daemon {uuid} starting with {count} sub-services on {registry}",
                      uuid=self.uuid, count=len(self.store),
                      registry=self.registry_url)  # fmt: skip
        self.save_state()
        super().startService()

    async def _stop_children(self) -> None:
        # A Deploy waiting for its child answers now, not after the drain.
        for uuid in list(self._start_waiters):
            self._fail_waiters(uuid, DeployFailed(
                f"the daemon is stopping before {uuid} registered"))  # fmt: skip
        await super()._stop_children()
        self.log.info("skynet daemon {uuid} stopped", uuid=self.uuid)


_log = Logger()


def _why(what: str, uuid: str, lines: list[str], *, running: bool = False) -> str:
    """
    The text of a L{DeployFailed}: what happened, what to do, the output.
    """
    if running:
        text = f"{what}; it is still running; StopSubService {uuid} removes it"
    else:
        text = f"{what}; it restarts with back-off until stopped (StopSubService {uuid})"
    if lines:
        text += "; its last output:\n" + "\n".join(lines[-ERROR_LINES:])
    return text


async def _refuse(why: str) -> None:
    raise ConnectionFailed(why)


# The remote methods


def _uuid(params: dict[str, Any]) -> Any:
    return params.get("uuid") if isinstance(params, dict) else None


class SkynetDaemon(Service):
    """
    The daemon's remote methods (L{skynet.control}'s names), each a thin
    adapter to its L{Daemon} answering with control records.
    """

    name = control.DAEMON_SERVICE

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    def _later(self, d: Deferred, what: str, uuid: Any) -> None:
        d.addErrback(lambda f: _log.failure("{what} {uuid} failed", f, what=what, uuid=uuid))

    async def Deploy(self, request_info: Any, params: dict[str, Any]) -> dict[str, Any]:
        """
        C{{service, args, registered[, start_timeout][, uuid]}} -> C{{uuid}}:
        start a service here, and answer once it is in the registry (the
        same request with the same C{uuid} again starts nothing new).  A child
        that ends first, or is not there within the start timeout, fails
        the call with how it ended and its last lines of output (it stays
        deployed, listed as failing, until stopped).
        """
        timeout = params.get("start_timeout") if isinstance(params, dict) else None
        if timeout is not None and (isinstance(timeout, bool)
                                    or not isinstance(timeout, (int, float))
                                    or not 0 <= timeout < 3600):  # fmt: skip
            raise ServiceError(f"cannot deploy: start_timeout must be 0..3600 s, not {timeout!r}")
        try:
            uuid = self.daemon.deploy(params.get("service"), params.get("args"),
                                      params.get("registered", True),
                                      params.get("uuid"))  # fmt: skip
        except ValueError as e:
            raise ServiceError(f"cannot deploy: {e}") from None
        try:
            await self.daemon.wait_started(uuid, timeout)
        except DeployFailed as e:
            deployment = self.daemon.store.get(uuid)
            self.daemon.events.record("deploy_failed", "{service} ({uuid}) deploy failed: {error}",
                                      level=LogLevel.warn, log=_log,
                                      service=deployment.label if deployment else uuid,
                                      uuid=uuid, error=str(e))  # fmt: skip
            raise DeployFailed(f"cannot deploy {params.get('service')}: {e}") from None
        return {"uuid": uuid}

    def SearchLogs(self, request_info: Any, params: dict[str, Any]) -> Any:
        """
        (observe hook) Search this host's JSON logs: skynet.observe.logsearch.
        """
        from skynet.observe.logsearch import search_logs

        return search_logs(self.daemon.supervisor.log_dir, params, self.daemon.reactor)

    async def SearchSpans(self, request_info: Any, params: dict[str, Any]) -> dict[str, Any]:
        """
        (trace hook) C{{request_id}} or C{{slowest[, since]}} -> C{{spans,
        instances, errors}}: the spans of this host's children, asked of
        their admin listeners (skynet.observe.tracing.host_spans).
        """
        from skynet.observe.tracing import host_spans

        live = (self.daemon._live_instance(uuid) for uuid in sorted(self.daemon.store.deployments))
        instances = [i for i in live if i is not None]
        return await host_spans(self.daemon.reactor, instances, params, self.daemon.admin)

    def ListSubServices(self, request_info: Any, params: dict[str, Any]) -> dict[str, Any]:
        """
        C{{}} -> C{{services: {uuid: SubServiceStatus}}}.
        """
        return control.sub_services_to_bson(self.daemon.sub_services())

    def StopSubService(self, request_info: Any, params: dict[str, Any]) -> dict[str, Any]:
        """
        C{{uuid}} -> C{{ok, uuid}}: stop it gracefully and forget it.  The
        answer comes at once; the process ends after draining.
        """
        uuid = _uuid(params)
        self._later(self.daemon.stop(uuid), "stopping", uuid)
        return {"ok": True, "uuid": uuid}

    def StopAllSubServices(self, request_info: Any, params: dict[str, Any]) -> dict[str, Any]:
        uuids = sorted(self.daemon.deployments)
        for uuid in uuids:
            self._later(self.daemon.stop(uuid), "stopping", uuid)
        return {"ok": True, "uuids": uuids}

    def RestartSubService(self, request_info: Any, params: dict[str, Any]) -> dict[str, Any]:
        """
        C{{uuid}} -> C{{ok, uuid}}: restart it gracefully, without back-off.
        """
        uuid = _uuid(params)
        self._later(self.daemon.restart(uuid), "restarting", uuid)
        return {"ok": True, "uuid": uuid}

    def RestartAllSubServices(self, request_info: Any, params: dict[str, Any]) -> dict[str, Any]:
        uuids = sorted(self.daemon.deployments)
        for uuid in uuids:
            self._later(self.daemon.restart(uuid), "restarting", uuid)
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
        C{{}} -> L{control.HostStats}.
        """
        return self.daemon.host_stats().to_bson()

    def extra_statistics(self) -> dict[str, Any]:
        return self.daemon.extra_statistics()
