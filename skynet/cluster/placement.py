"""
Placement: which instances to start where, and which to stop, so that the
live cluster comes to match the desired state.

L{plan} is a pure function of three views: the desired deployments, the
live hosts (L{HostView}: one per daemon in the registry) and the live
instances of the deployments (L{LiveInstance}).  It returns actions
(L{Start}, L{Stop}) for one step; the reconciler carries them out, waits for
the registry to show their effect and plans again.  Given the same views it
always gives the same actions (ties break by host address and uuid), so two
leaders one after the other, or one leader twice, agree.

Rules, for each deployment (by name):

 - B{Eligible hosts} for a start: in rotation (the load guard has not taken
   them out), inside the C{hosts} and C{region} constraints, and below
   their capacity (the number of instances a host may run).
 - B{Too few} (counting instances still starting): start the rest, each on
   the best eligible host: for C{spread=host} the one with the fewest
   instances of this deployment; for C{spread=region} the region with the
   fewest, then the host; then fewer instances of any kind, then more free
   capacity (in coarse steps, so noise does not decide), then the address.
 - B{Too many} (a lost host came back with its instances): stop the
   surplus: not-ready first, then from the most crowded host (so that
   the spread is restored), then the newest.  Nothing else moves.
 - B{Spread repair}, with hysteresis: under C{spread=host} (or
   C{region}), when every instance is ready and one eligible host has two
   or more instances more than another, one instance is started on the
   emptiest; the surplus rule then stops one on the fullest.  A difference
   of one is left alone, so placements never flap.
 - B{Rolling replacement}: instances whose fingerprint differs from the
   deployment's (its C{run}, C{args}, C{version} or C{region} changed) are
   replaced one at a time, surge 1: a new instance is started, and only
   when it is ready is an old one stopped; capacity never drops below the
   desired count.  A paused rollout (its new instances failed to become
   ready) starts no more new instances beyond the desired count and keeps
   the old ones.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import attr

from skynet.cluster.spec import ClusterDeployment

__all__ = ["HostView", "LiveInstance", "Plan", "Start", "Stop", "plan"]


@attr.frozen
class HostView:
    """
    One live host, as its daemon shows itself in the registry.

    @ivar host: the address its services bind and advertise.
    @ivar region: the daemon's region.
    @ivar in_rotation: L{False} while its load guard holds it out of
        rotation: no new instances go there.
    @ivar capacity: how many instances it may run in all (L{None}: no
        limit).
    @ivar instance_count: how many instances it runs now, of any kind
        (cluster deployments or not).
    @ivar free: the fraction (0 to 1) of its CPU and memory still free.
    @ivar daemon: the daemon's uuid, for the executor.
    """

    host: str
    region: str = "default"
    in_rotation: bool = True
    capacity: int | None = None
    instance_count: int = 0
    free: float = 1.0
    daemon: str = ""


@attr.frozen
class LiveInstance:
    """
    One instance of a deployment, running or starting.

    @ivar ready: registered in the registry and answering (an instance the
        reconciler started and that has not registered yet is not ready).
    @ivar started: when it was started (the reconciler's clock); the newest
        goes first when there are too many.
    """

    uuid: str
    deployment: str
    host: str
    fingerprint: str
    ready: bool = True
    started: float = 0.0


@attr.frozen
class Start:
    """
    Start one instance of C{deployment} on C{host}.
    """

    deployment: str
    host: str
    reason: str = "scale"

    def describe(self) -> str:
        return f"start {self.deployment} on {self.host} ({self.reason})"


@attr.frozen
class Stop:
    """
    Stop instance C{uuid} of C{deployment} on C{host}.
    """

    deployment: str
    uuid: str
    host: str
    reason: str = "surplus"

    def describe(self) -> str:
        return f"stop {self.deployment} {self.uuid} on {self.host} ({self.reason})"


@attr.frozen
class Plan:
    """
    One step's actions, and what could not be placed.

    @ivar unplaced: deployment -> instances that no eligible host can take.
    @ivar waiting: deployments whose rollout waits for a new instance to
        become ready.
    """

    actions: tuple[Start | Stop, ...] = ()
    unplaced: dict[str, int] = attr.field(factory=dict)
    waiting: tuple[str, ...] = ()

    @property
    def starts(self) -> list[Start]:
        return [a for a in self.actions if isinstance(a, Start)]

    @property
    def stops(self) -> list[Stop]:
        return [a for a in self.actions if isinstance(a, Stop)]


class _Hosts:
    """
    The hosts and their counts as the plan so far would leave them.
    """

    def __init__(self, hosts: Iterable[HostView], instances: list[LiveInstance]) -> None:
        self.views = {h.host: h for h in hosts}
        self.total = {h: v.instance_count for h, v in self.views.items()}
        self.started: dict[str, int] = {h: 0 for h in self.views}

    def can_take(self, host: str) -> bool:
        view = self.views[host]
        if not view.in_rotation:
            return False
        if view.capacity is None:
            return True
        return self.total[host] < view.capacity

    def allowed(self, deployment: ClusterDeployment) -> list[str]:
        """
        The live hosts inside the deployment's constraints.
        """
        return [
            h
            for h, view in sorted(self.views.items())
            if (not deployment.hosts or h in deployment.hosts)
            and (deployment.region is None or view.region == deployment.region)
        ]

    def add(self, host: str) -> None:
        self.total[host] += 1


def _free_step(free: float) -> int:
    # Free capacity in steps of 10 %: a host that is 3 % freer than another
    # is not better, and host statistics jitter.
    return -int(max(0.0, min(1.0, free)) * 10)


def plan(
    deployments: Iterable[ClusterDeployment],
    hosts: Iterable[HostView],
    instances: Iterable[LiveInstance],
    *,
    paused: Iterable[str] = (),
) -> Plan:
    """
    The actions of one step towards the desired state.

    @param instances: the live instances of the deployments; those on a
        host not in C{hosts} are taken as lost and ignored.
    @param paused: deployments whose rollout stopped (see the module's
        docstring).
    """
    host_list = list(hosts)
    live = [i for i in instances if i.host in {h.host for h in host_list}]
    state = _Hosts(host_list, live)
    paused = set(paused)
    actions: list[Start | Stop] = []
    unplaced: dict[str, int] = {}
    waiting: list[str] = []
    by_deployment: dict[str, list[LiveInstance]] = {}
    for instance in live:
        by_deployment.setdefault(instance.deployment, []).append(instance)
    wanted = sorted(deployments, key=lambda d: d.name)
    names = {d.name for d in wanted}
    # Instances of deployments that no longer exist: stop them all.
    for name in sorted(set(by_deployment) - names):
        for instance in sorted(by_deployment[name], key=lambda i: i.uuid):
            actions.append(Stop(name, instance.uuid, instance.host, "undeployed"))
    for deployment in wanted:
        mine = by_deployment.get(deployment.name, [])
        step = _plan_one(deployment, mine, state, deployment.name in paused)
        actions.extend(step.actions)
        if step.unplaced:
            unplaced[deployment.name] = step.unplaced
        if step.waiting:
            waiting.append(deployment.name)
    return Plan(tuple(actions), unplaced, tuple(waiting))


@attr.frozen
class _Step:
    actions: list[Start | Stop]
    unplaced: int = 0
    waiting: bool = False


def _plan_one(
    deployment: ClusterDeployment,
    mine: list[LiveInstance],
    state: _Hosts,
    paused: bool,
) -> _Step:
    desired = deployment.instances
    allowed = set(state.allowed(deployment))
    # Old: started from another fingerprint, or on a host the constraints
    # no longer allow.  Old instances are replaced rolling.
    current = [i for i in mine if i.fingerprint == deployment.fingerprint and i.host in allowed]
    old = [i for i in mine if i not in current]
    # Counts of this deployment per host, as the plan goes.
    count: dict[str, int] = {}
    for instance in mine:
        count[instance.host] = count.get(instance.host, 0) + 1
    actions: list[Start | Stop] = []

    def region_of(host: str) -> str:
        return state.views[host].region

    def region_count(region: str) -> int:
        return sum(n for h, n in count.items() if region_of(h) == region)

    def start_key(host: str) -> tuple[Any, ...]:
        view = state.views[host]
        mine_here = count.get(host, 0)
        free = _free_step(view.free)
        if deployment.spread == "host":
            return (mine_here, state.total[host], free, host)
        if deployment.spread == "region":
            return (region_count(view.region), mine_here, state.total[host], free, host)
        return (state.total[host], free, mine_here, host)

    def start(reason: str) -> bool:
        candidates = [h for h in sorted(allowed) if state.can_take(h)]
        if not candidates:
            return False
        host = min(candidates, key=start_key)
        actions.append(Start(deployment.name, host, reason))
        count[host] = count.get(host, 0) + 1
        state.add(host)
        return True

    def start_many(n: int, reason: str) -> int:
        """Start C{n}; return how many found no host."""
        return sum(0 if start(reason) else 1 for _ in range(n))

    def stop_key(instance: LiveInstance) -> tuple[Any, ...]:
        # Ascending: the first is stopped first.
        if deployment.spread == "host":
            crowd = count.get(instance.host, 0)
        elif deployment.spread == "region":
            crowd = region_count(region_of(instance.host)) * 100_000 + count.get(instance.host, 0)
        else:
            crowd = state.total[instance.host]
        return (
            instance.ready,
            state.views[instance.host].in_rotation,
            -crowd,
            -instance.started,
            instance.uuid,
        )

    def stop(pool: list[LiveInstance], reason: str) -> None:
        victim = min(pool, key=stop_key)
        pool.remove(victim)
        actions.append(Stop(deployment.name, victim.uuid, victim.host, reason))
        count[victim.host] -= 1

    total = len(current) + len(old)
    if total < desired:
        return _Step(actions, start_many(desired - total, "replace" if old else "scale"))
    if any(not i.ready and state.views[i.host].in_rotation for i in current):
        # Instances are starting: wait until they are ready (or the
        # reconciler gives up on them) before anything is stopped.  (Those
        # a load guard holds unregistered are not starting: they wait for
        # their host, not the other way round.)
        ready_old = [i for i in old if i.ready]
        ready_current = [i for i in current if i.ready]
        for _ in range(len(ready_old) + len(ready_current) - desired):
            # Even without them there are too many (a lost host is back,
            # or the count went down).
            if ready_old:
                stop(ready_old, "surplus")
            else:
                stop(ready_current, "surplus")
        return _Step(actions, 0, waiting=bool(old))
    if total > desired:
        olds = list(old)
        pool = list(current)
        for _ in range(total - desired):
            if olds:
                stop(olds, "rollout")
            else:
                stop(pool, "surplus")
        return _Step(actions)
    if old:
        # The right count, some old: surge one new instance.
        if paused:
            return _Step(actions)
        if not start("rollout"):
            return _Step(actions, 1)
        return _Step(actions, 0, waiting=True)
    # The right count: repair the spread if it is off by two or more.
    if deployment.spread != "none" and desired:
        takers = [h for h in sorted(allowed) if state.can_take(h)]
        if deployment.spread == "host":
            counts = [count.get(h, 0) for h in allowed if state.views[h].in_rotation]
            emptiest = min((count.get(h, 0) for h in takers), default=None)
        else:
            regions = {region_of(h) for h in allowed if state.views[h].in_rotation}
            counts = [region_count(r) for r in regions]
            emptiest = min((region_count(region_of(h)) for h in takers), default=None)
        if counts and emptiest is not None and max(counts) - emptiest >= 2:
            start("rebalance")
    return _Step(actions)
