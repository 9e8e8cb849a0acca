"""
The leader's loop: make the live cluster match the desired state.

A L{Reconciler} runs only in the elected leader (start it from
L{skynet.cluster.leader.LeaderService}'s C{on_elected}, stop it from
C{on_deposed}).  It follows three things in the registry:

 - the desired state, L{skynet.cluster.spec.DESIRED_KEY}
   (C{watch_value});
 - the live instances (C{watch}): the daemons are the instances of the
   service C{SkynetDaemon}, one per host (the address their services bind);
   the daemons' statistics nodes carry their host statistics (C{Host}:
   CPU, memory, the load guard, the children, optionally C{capacity});
 - its own stored state, L{STATE_KEY} (C{cluster/state}): which instance
   (daemon uuid) belongs to which deployment, on which host, started from
   which fingerprint; per-deployment failures, rollouts; recent placement
   events.  A new leader reads it first, so it carries on where the last
   one stopped, never from memory alone.

Each pass computes L{skynet.cluster.placement.plan} and carries the actions
out through an L{IDaemonExecutor} (in production L{RpcDaemonExecutor}: the
daemons' C{Deploy}, C{StopSubService} and C{ListSubServices} calls).  An
instance is ready when it is registered in the registry and (with a probe,
L{call_probe}) answers a call.  One that is not
ready within its deployment's C{ready_timeout} (and is not on a host held
out of rotation) has failed: it is stopped, the failure counted, and its
deployment backs off before the next start; during a rollout this stops
the rollout and the old instances keep serving.

The children of the daemons are matched to deployments by the uuids the
daemons' C{Deploy} answers, stored at once; a child the leader started but
could not record (it died in between) is adopted by the next leader from
the daemons' C{ListSubServices}: a child whose service and arguments are
those of a deployment belongs to it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import attr
from twisted.internet.defer import Deferred, DeferredList
from twisted.logger import Logger
from zope.interface import Interface, implementer

from skynet.cluster.placement import HostView, LiveInstance, Start, Stop, plan
from skynet.cluster.spec import DESIRED_KEY, ClusterDeployment, DesiredState, SpecError
from skynet.config import default_reactor
from skynet.registry.base import IInstanceListener, Instance, Query

__all__ = [
    "DAEMON_SERVICE",
    "STATE_KEY",
    "DeploymentStatus",
    "IDaemonExecutor",
    "Reconciler",
    "RpcDaemonExecutor",
    "StoredState",
    "call_probe",
]

#: The registry data node where the leader keeps what it did.
STATE_KEY = "cluster/state"

#: The service name of the daemons (as C{skynet.daemon.DAEMON_SERVICE_NAME}).
DAEMON_SERVICE = "SkynetDaemon"

#: How many placement events the stored state keeps.
MAX_EVENTS = 100

#: Back-off after consecutive failed starts of one deployment, in seconds.
MIN_BACKOFF = 1.0
MAX_BACKOFF = 60.0


class IDaemonExecutor(Interface):
    """
    How the reconciler acts on hosts: through their daemons.
    """

    def deploy(daemon: Instance, run: str, args: list[str]) -> Deferred:
        """
        Start one instance of C{run} with C{args} on C{daemon}'s host.

        @return: a Deferred firing with the new child's uuid.
        """

    def stop(daemon: Instance, uuid: str) -> Deferred:
        """
        Stop (drain) the child C{uuid} of C{daemon} and forget it.
        """

    def list(daemon: Instance) -> Deferred:
        """
        @return: a Deferred firing with C{{uuid: {"service", "args",
            "restarts", "last_exit", ...}}}, as C{ListSubServices} answers.
        """


@implementer(IDaemonExecutor)
class RpcDaemonExecutor:
    """
    The daemons' own remote methods, one connection per call.

    @param connector: how to reach an instance (a L{skynet.client.Client}'s
        C{connector}; default TCP).
    """

    def __init__(
        self,
        reactor: Any = None,
        timeout: float = 10.0,
        connector: Any = None,
        list_timeout: float = 3.0,
    ) -> None:
        self.reactor = default_reactor(reactor)
        self.timeout = timeout
        self.list_timeout = list_timeout
        self.connector = connector

    def _call(
        self, daemon: Instance, method: str, params: dict[str, Any], timeout: float | None = None
    ) -> Deferred:
        from skynet.admin import call_instance

        return call_instance(
            self.reactor, daemon, method, params, timeout or self.timeout, self.connector
        )

    def deploy(self, daemon: Instance, run: str, args: list[str]) -> Deferred:
        # (heal, issue 16: Deploy now waits for the child to register by
        # default; the reconciler tracks readiness itself, so it asks for
        # the answer at once, as before.)
        params = {"service": run, "args": list(args), "registered": True, "start_timeout": 0}
        d = self._call(daemon, "Deploy", params)
        return d.addCallback(lambda answer: str(answer["uuid"]))

    def stop(self, daemon: Instance, uuid: str) -> Deferred:
        return self._call(daemon, "StopSubService", {"uuid": uuid})

    def list(self, daemon: Instance) -> Deferred:
        d = self._call(daemon, "ListSubServices", {}, self.list_timeout)
        return d.addCallback(lambda answer: dict(answer.get("services") or {}))


# The stored state


@attr.frozen
class InstanceRecord:
    """
    One instance the cluster started (or adopted).
    """

    uuid: str
    host: str
    fingerprint: str
    started: float
    daemon: str = ""
    #: When it was first seen ready (None: never).
    ready_at: float | None = None
    #: When it was last seen not ready after having been ready.
    unready_since: float | None = None

    def to_json(self) -> dict[str, Any]:
        return attr.asdict(self)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> "InstanceRecord":
        return cls(
            uuid=str(doc["uuid"]),
            host=str(doc["host"]),
            fingerprint=str(doc["fingerprint"]),
            started=float(doc["started"]),
            daemon=str(doc.get("daemon", "")),
            ready_at=None if doc.get("ready_at") is None else float(doc["ready_at"]),
            unready_since=(
                None if doc.get("unready_since") is None else float(doc["unready_since"])
            ),
        )


@attr.frozen
class Rollout:
    """
    A replacement of a deployment's instances by ones of a new fingerprint.

    @ivar state: C{progressing}, C{done} or C{stopped}.
    """

    to: str
    state: str = "progressing"
    started: float = 0.0
    reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        return attr.asdict(self)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> "Rollout":
        return cls(
            to=str(doc["to"]),
            state=str(doc.get("state", "progressing")),
            started=float(doc.get("started", 0.0)),
            reason=doc.get("reason"),
        )


@attr.frozen
class DeploymentRecord:
    """
    What the leader keeps about one deployment.

    @ivar restarts: instances that failed and were replaced, in all.
    @ivar failures: consecutive failures since an instance last became
        ready (drives the back-off and the C{failing} state).
    """

    instances: dict[str, InstanceRecord] = attr.field(factory=dict)
    restarts: int = 0
    failures: int = 0
    last_error: str | None = None
    retry_at: float = 0.0
    rollout: Rollout | None = None
    status: str = "progressing"
    reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "instances": {u: r.to_json() for u, r in sorted(self.instances.items())},
            "restarts": self.restarts,
            "failures": self.failures,
            "last_error": self.last_error,
            "retry_at": self.retry_at,
            "rollout": None if self.rollout is None else self.rollout.to_json(),
            "status": self.status,
            "reason": self.reason,
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> "DeploymentRecord":
        return cls(
            instances={
                str(u): InstanceRecord.from_json(r) for u, r in (doc.get("instances") or {}).items()
            },
            restarts=int(doc.get("restarts", 0)),
            failures=int(doc.get("failures", 0)),
            last_error=doc.get("last_error"),
            retry_at=float(doc.get("retry_at", 0.0)),
            rollout=None if not doc.get("rollout") else Rollout.from_json(doc["rollout"]),
            status=str(doc.get("status", "progressing")),
            reason=doc.get("reason"),
        )


@attr.frozen
class StoredState:
    """
    The document under L{STATE_KEY}.
    """

    deployments: dict[str, DeploymentRecord] = attr.field(factory=dict)
    events: tuple[dict[str, Any], ...] = ()
    leader: str | None = None
    term: int = 0
    hosts: dict[str, dict[str, Any]] = attr.field(factory=dict)

    def to_bytes(self) -> bytes:
        doc = {
            "format": 1,
            "leader": self.leader,
            "term": self.term,
            "deployments": {n: r.to_json() for n, r in sorted(self.deployments.items())},
            "hosts": self.hosts,
            "events": list(self.events),
        }
        return json.dumps(doc, sort_keys=True).encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes | None) -> "StoredState":
        """
        @raise SpecError: if it is not a state document.
        """
        if data is None:
            return cls()
        try:
            doc = json.loads(data)
            return cls(
                deployments={
                    str(n): DeploymentRecord.from_json(r)
                    for n, r in (doc.get("deployments") or {}).items()
                },
                events=tuple(doc.get("events") or ()),
                leader=doc.get("leader"),
                term=int(doc.get("term", 0)),
                hosts=dict(doc.get("hosts") or {}),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise SpecError(f"{STATE_KEY} is not a cluster state document: {e!r}") from None


@attr.frozen
class DeploymentStatus:
    """
    One deployment as C{sky deployments} shows it.

    @ivar state: C{ok}, C{progressing}, C{degraded} or C{failing}.
    @ivar hosts: host -> C{{"starting": n, "running": n, "registered": n}}.
    """

    name: str
    desired: int
    state: str
    ready: int = 0
    starting: int = 0
    hosts: dict[str, dict[str, int]] = attr.field(factory=dict)
    restarts: int = 0
    last_error: str | None = None
    reason: str | None = None
    rollout: Rollout | None = None

    def to_json(self) -> dict[str, Any]:
        doc = attr.asdict(self, recurse=False)
        doc["rollout"] = None if self.rollout is None else self.rollout.to_json()
        return doc


# The loop


@implementer(IInstanceListener)
class _Live:
    """
    The registry's live view: every instance by uuid.
    """

    def __init__(self, changed: Callable[[], None]) -> None:
        self.instances: dict[str, Instance] = {}
        self.known = False
        self.changed = changed

    def snapshot(self, instances: list[Instance]) -> None:
        self.instances = {i.uuid: i for i in instances}
        self.known = True
        self.changed()

    def added(self, instance: Instance) -> None:
        self.instances[instance.uuid] = instance
        self.changed()

    updated = added

    def removed(self, instance: Instance) -> None:
        self.instances.pop(instance.uuid, None)
        self.changed()


class Reconciler:
    """
    The leader's loop (see the module docstring).

    @param registry: a started registry.
    @param executor: an L{IDaemonExecutor}.
    @param interval: seconds between passes when nothing changes (ready
        timeouts, host statistics).
    @param list_interval: seconds between listings of every daemon's
        children (adoption of unrecorded ones, forgetting removed ones).
    @param identifier: who leads, for the stored state.
    @param probe: C{probe(instance)} returning a Deferred firing with
        whether a newly registered instance answers (L{call_probe}); it is
        ready only then.  L{None}: registered is ready.
    """

    log = Logger()

    def __init__(
        self,
        registry: Any,
        executor: Any,
        *,
        reactor: Any = None,
        interval: float = 2.0,
        list_interval: float = 30.0,
        debounce: float = 0.05,
        identifier: str = "",
        probe: Callable[[Instance], Deferred] | None = None,
    ) -> None:
        self.registry = registry
        self.executor = executor
        self.probe = probe
        self.reactor = default_reactor(reactor)
        self.interval = interval
        self.list_interval = list_interval
        self.debounce = debounce
        self.identifier = identifier
        self.desired: DesiredState | None = None
        self.desired_error: str | None = None
        self.state = StoredState()
        self.running = False
        self.passes = 0
        self._live = _Live(self._trigger)
        self._watches: list[Any] = []
        self._timer: Any = None
        self._pass: Deferred | None = None
        self._again = False
        self._listed_at: float | None = None
        self._listing: dict[str, dict[str, Any]] = {}
        self._stored: bytes | None = None
        self._unplaced: dict[str, int] = {}
        self._background: Deferred | None = None

    # Start and stop

    def start(self) -> Deferred:
        """
        Load the stored state, then follow the registry.  Fires once the
        stored state is loaded.
        """
        return Deferred.fromCoroutine(self._start())

    async def _start(self) -> None:
        self.running = True
        # Nothing from an earlier term: only the registry counts.
        self._live = _Live(self._trigger)
        self.desired = None
        self._listing = {}
        data = await self.registry.get_value(STATE_KEY)
        try:
            self.state = StoredState.from_bytes(data)
        except SpecError as e:
            self.log.error("{error}; starting from an empty state", error=e)
            self.state = StoredState()
        if not self.running:
            return
        self._stored = data
        self.state = attr.evolve(self.state, leader=self.identifier, term=self.state.term + 1)
        self._listed_at = None
        self._watches.append(self.registry.watch_value(DESIRED_KEY, self._desired_changed))
        self._watches.append(self.registry.watch(Query(), self._live))
        self._event("leader", "{leader} leads the cluster (term {term})",
                    leader=self.identifier, term=self.state.term)  # fmt: skip
        self._schedule(self.interval)

    def stop(self) -> Deferred:
        """
        Stop acting (deposed, or stopping): no new action starts; the one
        running finishes.  Fires when it has.
        """
        self.running = False
        for watch in self._watches:
            watch.stop()
        self._watches = []
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        d: Deferred = Deferred()
        if self._pass is None:
            d.callback(None)
        else:
            self._pass.addBoth(lambda _: d.callback(None))
        return d

    # Triggers

    def _desired_changed(self, value: bytes | None) -> None:
        try:
            self.desired = DesiredState.from_bytes(value)
            self.desired_error = None
        except SpecError as e:
            # Keep acting on the last good state; say why.
            self.desired_error = str(e)
            self.log.error("the desired state is unreadable: {error}", error=e)
        self._trigger()

    def _trigger(self) -> None:
        self._schedule(self.debounce)

    def _schedule(self, delay: float) -> None:
        if not self.running:
            return
        if self._pass is not None:
            self._again = True
            return
        if self._timer is not None and self._timer.active():
            if self._timer.getTime() <= self.reactor.seconds() + delay:
                return
            self._timer.cancel()
        self._timer = self.reactor.callLater(delay, self._run_pass)

    def _run_pass(self) -> None:
        self._timer = None
        if not self.running or self._pass is not None:
            return
        self._again = False
        self._pass = Deferred.fromCoroutine(self.reconcile())

        def done(result: Any) -> None:
            self._pass = None
            if hasattr(result, "check"):
                self.log.failure("a reconciliation pass failed", result)
            if self.running:
                self._schedule(self.debounce if self._again else self.interval)

        self._pass.addBoth(done)

    # One pass

    def daemons(self) -> dict[str, Instance]:
        """
        The live daemons by host (the first by uuid where a host has two).
        """
        found: dict[str, Instance] = {}
        for i in sorted(self._live.instances.values(), key=lambda i: i.uuid):
            if i.name == DAEMON_SERVICE:
                found.setdefault(i.host, i)
        return found

    async def _host_views(self, daemons: dict[str, Instance]) -> list[HostView]:
        views = []
        hosts_doc = {}
        for host, daemon in sorted(daemons.items()):
            try:
                stats = await self.registry.get_stats(daemon) or {}
            except Exception as e:
                self.log.warn("cannot read the statistics of {host}: {error}", host=host, error=e)
                stats = {}
            view = host_view(daemon, stats)
            views.append(view)
            hosts_doc[host] = {
                "daemon": daemon.uuid,
                "region": view.region,
                "in_rotation": view.in_rotation,
                "capacity": view.capacity,
                "instances": view.instance_count,
            }
        self.state = attr.evolve(self.state, hosts=hosts_doc)
        return views

    async def _list_children(self, daemons: dict[str, Instance]) -> None:
        """
        Ask every daemon for its children: adopt unrecorded children of
        deployments, forget recorded ones their daemon no longer has.
        """
        listing: dict[str, dict[str, Any]] = {}
        answered: set[str] = set()
        results = await DeferredList(
            [self.executor.list(d) for d in daemons.values()], consumeErrors=True
        )
        if not self.running:
            return
        for (host, daemon), (ok, result) in zip(daemons.items(), results, strict=True):
            if not ok:
                self.log.warn("cannot list the children of {host}: {error}",
                              host=host, error=result.value)  # fmt: skip
                continue
            if not isinstance(result, dict):
                self.log.warn("the daemon of {host} listed its children as {answer!r}; ignored",
                              host=host, answer=result)  # fmt: skip
                continue
            answered.add(host)
            for uuid, child in result.items():
                if isinstance(uuid, str) and isinstance(child, dict):
                    listing[uuid] = dict(child, host=host, daemon=daemon.uuid)
        self._listing = listing
        desired = self.desired or DesiredState()
        recorded = {u for r in self.state.deployments.values() for u in r.instances}
        now = self.reactor.seconds()
        for name, record in list(self.state.deployments.items()):
            gone = [
                u for u, r in record.instances.items() if r.host in answered and u not in listing
            ]
            for uuid in gone:
                self._event("forgotten", "{deployment} instance {uuid} on {host} is gone",
                            deployment=name, uuid=uuid,
                            host=record.instances[uuid].host)  # fmt: skip
            if gone:
                self._set_record(
                    name,
                    attr.evolve(
                        record,
                        instances={u: r for u, r in record.instances.items() if u not in gone},
                    ),
                )
        for uuid, child in sorted(listing.items()):
            if uuid in recorded:
                continue
            for deployment in desired.deployments:
                if _runs(child, deployment):
                    record = self._record(deployment.name)
                    instances = dict(record.instances)
                    instances[uuid] = InstanceRecord(
                        uuid=uuid,
                        host=child["host"],
                        fingerprint=deployment.fingerprint,
                        started=now,
                        daemon=child["daemon"],
                    )
                    self._set_record(deployment.name, attr.evolve(record, instances=instances))
                    self._event("adopted", "{deployment} instance {uuid} on {host} adopted",
                                deployment=deployment.name, uuid=uuid,
                                host=child["host"])  # fmt: skip
                    break
        self._listed_at = now

    def _record(self, name: str) -> DeploymentRecord:
        return self.state.deployments.get(name) or DeploymentRecord()

    def _set_record(self, name: str, record: DeploymentRecord) -> None:
        deployments = dict(self.state.deployments)
        deployments[name] = record
        self.state = attr.evolve(self.state, deployments=deployments)

    def _event(self, kind: str, message: str, **fields: Any) -> None:
        now = self.reactor.seconds()
        self.log.info(message, event_kind=kind, **fields)
        text = message.format(**fields)
        event = {"time": now, "kind": kind, "message": text, **_plain(fields)}
        self.state = attr.evolve(self.state, events=(self.state.events + (event,))[-MAX_EVENTS:])

    async def reconcile(self) -> None:
        """
        One pass: observe, plan, act, store.
        """
        if self.desired is None or not self._live.known:
            return
        self.passes += 1
        desired = self.desired
        now = self.reactor.seconds()
        daemons = self.daemons()
        registered = {u for u, i in self._live.instances.items() if i.registered}
        if self._listed_at is None or self._overdue(desired, daemons, registered, now):
            # First thing in a term (adoption before placing anything), and
            # when an instance is about to be declared failed (its daemon's
            # listing says how it last exited): wait for the listing.
            await self._list_children(daemons)
            if not self.running:
                return
        elif now - self._listed_at >= self.list_interval and self._background is None:
            # Otherwise in the background: a daemon that does not answer
            # (its host just cut off) must not hold up the replacements.
            self._listed_at = now
            background = Deferred.fromCoroutine(self._list_children(daemons))
            if not background.called:
                self._background = background

                def over(_: Any) -> None:
                    self._background = None
                    self._trigger()

                background.addErrback(lambda f: self.log.failure("listing failed", f))
                background.addBoth(over)
        views = await self._host_views(daemons)
        in_rotation = {v.host: v.in_rotation for v in views}
        registered = await self._answering(desired, daemons, registered)
        if not self.running:
            return
        live: list[LiveInstance] = []
        stops_for_failure: list[tuple[str, InstanceRecord, str]] = []
        # Readiness and timeouts.
        for deployment in desired.deployments:
            record = self._record(deployment.name)
            instances = {}
            failures, last_error, restarts = record.failures, record.last_error, record.restarts
            rollout = record.rollout
            for uuid, inst in record.instances.items():
                if inst.host not in daemons:
                    instances[uuid] = inst  # its host is lost; kept for its return
                    continue
                if uuid in registered:
                    if inst.ready_at is None:
                        failures = 0
                        inst = attr.evolve(inst, ready_at=now)
                    if inst.unready_since is not None:
                        inst = attr.evolve(inst, unready_since=None)
                elif inst.ready_at is not None and inst.unready_since is None:
                    inst = attr.evolve(inst, unready_since=now)
                since = inst.started if inst.ready_at is None else inst.unready_since
                timed_out = (
                    uuid not in registered
                    and since is not None
                    and now - since >= deployment.ready_timeout
                    and in_rotation.get(inst.host, True)
                )
                if timed_out:
                    why = (
                        f"did not register within {deployment.ready_timeout:g}s"
                        if inst.ready_at is None
                        else f"unregistered for {deployment.ready_timeout:g}s"
                    )
                    child = self._listing.get(uuid) or {}
                    if child.get("last_exit"):
                        why += f" (last exit: {_exit_text(child['last_exit'])})"
                    if child.get("log"):
                        why += f"; its log: {child['log']} on {inst.host}"
                    stops_for_failure.append((deployment.name, inst, why))
                    failures += 1
                    restarts += 1
                    last_error = f"instance {uuid} on {inst.host} {why}"
                    if (
                        rollout is not None
                        and rollout.state == "progressing"
                        and inst.fingerprint == rollout.to
                    ):
                        rollout = attr.evolve(
                            rollout, state="stopped", reason=f"new instance {uuid} {why}"
                        )
                        self._event("rollout_stopped",
                                    "{deployment} rollout stopped: new instance {uuid} {why};"
                                    " the old instances keep serving",
                                    deployment=deployment.name, uuid=uuid, why=why)  # fmt: skip
                    continue
                instances[uuid] = inst
                live.append(
                    LiveInstance(
                        uuid=uuid,
                        deployment=deployment.name,
                        host=inst.host,
                        fingerprint=inst.fingerprint,
                        ready=uuid in registered,
                        started=inst.started,
                    )
                )
            retry_at = record.retry_at
            if failures > record.failures:
                retry_at = now + min(MAX_BACKOFF, MIN_BACKOFF * 2 ** (failures - 1))
            # Rollouts.
            old = [i for i in instances.values() if i.fingerprint != deployment.fingerprint]
            if old and (rollout is None or rollout.to != deployment.fingerprint):
                rollout = Rollout(to=deployment.fingerprint, started=now)
                self._event("rollout", "{deployment} rolling to {fingerprint}: {count} to replace",
                            deployment=deployment.name, fingerprint=deployment.fingerprint,
                            count=len(old))  # fmt: skip
            elif not old and rollout is not None and rollout.state == "progressing":
                rollout = attr.evolve(rollout, state="done")
                self._event("rollout_done", "{deployment} rollout to {fingerprint} done",
                            deployment=deployment.name,
                            fingerprint=deployment.fingerprint)  # fmt: skip
            self._set_record(
                deployment.name,
                attr.evolve(
                    record,
                    instances=instances,
                    failures=failures,
                    restarts=restarts,
                    last_error=last_error,
                    retry_at=retry_at,
                    rollout=rollout,
                ),
            )
        # Instances of deployments no longer desired.
        for name, record in self.state.deployments.items():
            if desired.get(name) is None:
                for uuid, inst in record.instances.items():
                    if inst.host in daemons:
                        live.append(
                            LiveInstance(
                                uuid,
                                name,
                                inst.host,
                                inst.fingerprint,
                                uuid in registered,
                                inst.started,
                            )  # fmt: skip
                        )
        paused = {
            name
            for name, r in self.state.deployments.items()
            if r.rollout is not None and r.rollout.state == "stopped"
        }
        step = plan(desired.deployments, views, live, paused=paused)
        actions: list[Any] = []
        for action in step.actions:
            if isinstance(action, Start) and self._record(action.deployment).retry_at > now:
                continue  # backing off after failures
            actions.append(action)
        for name, inst, why in stops_for_failure:
            actions.append(Stop(name, inst.uuid, inst.host, f"failed: {why}"))
        await self._store()
        if actions and self.running:
            await DeferredList(
                [Deferred.fromCoroutine(self._act(a, desired, daemons)) for a in actions],
                consumeErrors=True,
            )
        self._unplaced = dict(step.unplaced)
        self._update_status(desired, step.unplaced, registered, daemons)
        # Forget deployments that are gone and have no instances left.
        leftover = {
            n: r
            for n, r in self.state.deployments.items()
            if desired.get(n) is not None or r.instances
        }
        if leftover != self.state.deployments:
            self.state = attr.evolve(self.state, deployments=leftover)
        await self._store()

    async def _answering(
        self, desired: DesiredState, daemons: dict[str, Instance], registered: set[str]
    ) -> set[str]:
        """
        C{registered} without the newly registered instances that do not
        answer the probe yet.
        """
        if self.probe is None:
            return registered
        fresh = [
            uuid
            for d in desired.deployments
            for uuid, inst in self._record(d.name).instances.items()
            if inst.ready_at is None
            and inst.host in daemons
            and uuid in registered
            and uuid in self._live.instances
        ]
        if not fresh:
            return registered
        results = await DeferredList(
            [self.probe(self._live.instances[u]) for u in fresh], consumeErrors=True
        )
        silent = {u for u, (ok, answer) in zip(fresh, results, strict=True) if not (ok and answer)}
        return registered - silent

    def _overdue(
        self, desired: DesiredState, daemons: dict[str, Instance], registered: set[str], now: float
    ) -> bool:
        for deployment in desired.deployments:
            for uuid, inst in self._record(deployment.name).instances.items():
                since = inst.started if inst.ready_at is None else inst.unready_since
                if (
                    inst.host in daemons
                    and uuid not in registered
                    and since is not None
                    and now - since >= deployment.ready_timeout
                ):
                    return True
        return False

    async def _act(self, action: Any, desired: DesiredState, daemons: dict[str, Instance]) -> None:
        if not self.running:
            return
        daemon = daemons.get(action.host)
        if daemon is None:
            return
        if isinstance(action, Start):
            deployment = desired.get(action.deployment)
            assert deployment is not None
            started = self.reactor.seconds()
            try:
                uuid = await self.executor.deploy(daemon, deployment.run, deployment.deploy_args())
            except Exception as e:
                record = self._record(deployment.name)
                failures = record.failures + 1
                self._set_record(
                    deployment.name,
                    attr.evolve(
                        record,
                        failures=failures,
                        last_error=f"Deploy on {action.host} failed: {e}",
                        retry_at=self.reactor.seconds()
                        + min(MAX_BACKOFF, MIN_BACKOFF * 2 ** (failures - 1)),
                    ),
                )
                self._event("start_failed", "{deployment}: Deploy on {host} failed: {error}",
                            deployment=deployment.name, host=action.host,
                            error=str(e))  # fmt: skip
                return
            record = self._record(deployment.name)
            instances = dict(record.instances)
            instances[uuid] = InstanceRecord(
                uuid=uuid,
                host=action.host,
                fingerprint=deployment.fingerprint,
                started=started,
                daemon=daemon.uuid,
            )
            self._set_record(deployment.name, attr.evolve(record, instances=instances))
            self._event("started", "{deployment} instance {uuid} started on {host} ({reason})",
                        deployment=deployment.name, uuid=uuid, host=action.host,
                        reason=action.reason)  # fmt: skip
            # Recorded at once: a new leader must know this child.
            await self._store()
        else:
            record = self._record(action.deployment)
            if action.uuid in record.instances:
                instances = {u: r for u, r in record.instances.items() if u != action.uuid}
                self._set_record(action.deployment, attr.evolve(record, instances=instances))
            try:
                await self.executor.stop(daemon, action.uuid)
            except Exception as e:
                # Forgotten all the same: if it still runs, the next listing
                # adopts it and it is stopped again.
                self._event("stop_failed", "{deployment}: stopping {uuid} on {host} failed: "
                            "{error}", deployment=action.deployment, uuid=action.uuid,
                            host=action.host, error=str(e))  # fmt: skip
                return
            self._event("stopped", "{deployment} instance {uuid} on {host} stopped ({reason})",
                        deployment=action.deployment, uuid=action.uuid, host=action.host,
                        reason=action.reason)  # fmt: skip

    def _update_status(
        self,
        desired: DesiredState,
        unplaced: dict[str, int],
        registered: set[str],
        daemons: dict[str, Instance],
    ) -> None:
        for deployment in desired.deployments:
            record = self._record(deployment.name)
            status = deployment_status(deployment, record, registered, set(daemons), unplaced)
            if (status.state, status.reason) != (record.status, record.reason):
                self._event("status", "{deployment} is {state}{why}",
                            deployment=deployment.name, state=status.state,
                            why=f": {status.reason}" if status.reason else "")  # fmt: skip
                self._set_record(
                    deployment.name, attr.evolve(record, status=status.state, reason=status.reason)
                )

    async def _store(self) -> None:
        data = self.state.to_bytes()
        if data == self._stored or not self.running:
            return
        try:
            await self.registry.set_value(STATE_KEY, data)
        except Exception as e:
            self.log.warn("cannot store the cluster state: {error}", error=e)
            return
        self._stored = data

    # Status

    def statuses(self) -> list[DeploymentStatus]:
        desired = self.desired or DesiredState()
        registered = {u for u, i in self._live.instances.items() if i.registered}
        return [
            deployment_status(
                d, self._record(d.name), registered, set(self.daemons()), self._unplaced
            )
            for d in desired.deployments
        ]


#: The method a readiness probe calls: no service has it, and any answer
#: (the error "unknown method" included) shows that the instance answers.
PROBE_METHOD = "SkynetCluster.Probe"


def call_probe(
    reactor: Any = None, timeout: float = 2.0, connector: Any = None
) -> Callable[[Instance], Deferred]:
    """
    A readiness probe for L{Reconciler}: one call to exactly the instance,
    over a connection of its own.  An answer, even an error, is ready; no
    connection, no handshake or no answer within C{timeout} is not.
    """
    from skynet.admin import call_instance
    from skynet.errors import RemoteCallError, ServiceError

    reactor = default_reactor(reactor)

    async def probe(instance: Instance) -> bool:
        try:
            await call_instance(reactor, instance, PROBE_METHOD, {}, timeout, connector)
        except (ServiceError, RemoteCallError):
            return True
        except Exception:
            return False
        return True

    return lambda instance: Deferred.fromCoroutine(probe(instance))


def deployment_status(
    deployment: ClusterDeployment,
    record: Any,
    registered: set[str],
    live_hosts: set[str],
    unplaced: dict[str, int],
) -> DeploymentStatus:
    """
    A deployment's state from its record and the live view.
    """
    hosts: dict[str, dict[str, int]] = {}
    ready = starting = 0
    old = 0
    for uuid, inst in record.instances.items():
        if inst.host not in live_hosts:
            continue
        counts = hosts.setdefault(inst.host, {"starting": 0, "running": 0, "registered": 0})
        if uuid in registered and inst.ready_at is not None:
            # (Ready once the leader saw it registered and answering.)
            counts["registered"] += 1
            counts["running"] += 1
            ready += 1
        elif inst.ready_at is not None:
            counts["running"] += 1
        else:
            counts["starting"] += 1
            starting += 1
        if inst.fingerprint != deployment.fingerprint:
            old += 1
    desired = deployment.instances
    rollout = record.rollout
    reason = None
    if rollout is not None and rollout.state == "stopped" and rollout.to == deployment.fingerprint:
        state, reason = "failing", f"rollout stopped: {rollout.reason}"
    elif record.failures and ready < desired:
        state, reason = "failing", record.last_error
    elif ready == desired and not old and not starting:
        state = "ok"
    elif unplaced.get(deployment.name) and not starting:
        state = "degraded"
        reason = f"{unplaced[deployment.name]} instance(s) have no eligible host"
    elif ready < desired and not starting:
        state, reason = "degraded", f"{ready} of {desired} ready"
    else:
        state = "progressing"
    return DeploymentStatus(
        name=deployment.name,
        desired=desired,
        state=state,
        ready=ready,
        starting=starting,
        hosts=hosts,
        restarts=record.restarts,
        last_error=record.last_error,
        reason=reason,
        rollout=rollout,
    )


def host_view(daemon: Instance, stats: dict[str, Any]) -> HostView:
    """
    A host as placement sees it, from its daemon's registry node and
    statistics (C{Host}: see C{skynet.daemon.Daemon.host_stats}; a
    C{capacity} there, or in the daemon's C{Extra}, limits its instances).
    """
    host = _dict(stats.get("Host"))
    guard = _dict(host.get("load_guard"))
    children = _dict(host.get("children"))
    capacity = host.get("capacity", daemon.extra.get("capacity"))
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
        capacity = None
    cpu = host.get("cpu")
    memory = _dict(host.get("memory"))
    used = max(
        float(cpu) if isinstance(cpu, (int, float)) else 0.0,
        float(memory.get("percent", 0.0) or 0.0),
    )
    return HostView(
        host=daemon.host,
        region=daemon.region,
        in_rotation=daemon.registered and not guard.get("overloaded", False),
        capacity=capacity,
        instance_count=len(children),
        free=max(0.0, min(1.0, 1.0 - used / 100.0)),
        daemon=daemon.uuid,
    )


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _runs(child: dict[str, Any], deployment: ClusterDeployment) -> bool:
    """
    Whether a daemon's child (from C{ListSubServices}) runs C{deployment}.
    """
    return child.get("service") == deployment.run and list(child.get("args") or []) == (
        deployment.deploy_args()
    )


def _exit_text(last_exit: Any) -> str:
    """
    A daemon's C{last_exit} record (L{skynet.procmon.ExitRecord} as a dict)
    in a few words: C{code 1 after 0.4s}.
    """
    if not isinstance(last_exit, dict):
        return str(last_exit)[:300]
    words = []
    if last_exit.get("code") is not None:
        words.append(f"code {last_exit['code']}")
    if last_exit.get("signal") is not None:
        words.append(f"signal {last_exit['signal']}")
    if last_exit.get("error"):
        words.append(str(last_exit["error"])[:200])
    if isinstance(last_exit.get("uptime"), (int, float)):
        words.append(f"after {last_exit['uptime']:.1f}s")
    return " ".join(words) or "unknown"


def _plain(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: v if isinstance(v, (str, int, float, bool, type(None))) else str(v)
            for k, v in fields.items()}  # fmt: skip
