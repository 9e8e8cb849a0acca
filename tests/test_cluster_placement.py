"""
Tests for L{skynet.cluster.placement}: the pure placement function, case
by case, and its properties under hypothesis (a simulated cluster that
carries out every step converges, spread holds, nothing flaps).
"""

from __future__ import annotations

from collections import Counter
from itertools import count

import attr
from hypothesis import given, settings
from hypothesis import strategies as st

from skynet.cluster.placement import HostView, LiveInstance, Start, Stop, plan
from skynet.cluster.spec import ClusterDeployment

FIB = ClusterDeployment(name="Fib", run="examples.fibonacci:Fibonacci", instances=3)
HOSTS = [HostView("127.0.0.2"), HostView("127.0.0.3"), HostView("127.0.0.4")]
_ids = count()


def live(deployment: ClusterDeployment, host: str, ready: bool = True, **kw) -> LiveInstance:
    kw.setdefault("fingerprint", deployment.fingerprint)
    kw.setdefault("uuid", f"u{next(_ids):04d}")
    kw.setdefault("started", float(next(_ids)))
    return LiveInstance(deployment=deployment.name, host=host, ready=ready, **kw)


class Cluster:
    """
    A simulated cluster that carries out plans: a start becomes a starting
    instance, L{settle} makes starting instances ready.
    """

    def __init__(self, hosts: list[HostView], deployments: list[ClusterDeployment]) -> None:
        self.hosts = list(hosts)
        self.deployments = {d.name: d for d in deployments}
        self.instances: list[LiveInstance] = []
        self.clock = 0.0
        self.history: list[Start | Stop] = []

    def views(self) -> list[HostView]:
        totals = Counter(i.host for i in self.instances)
        return [attr.evolve(h, instance_count=totals[h.host]) for h in self.hosts]

    def step(self, paused=()) -> list[Start | Stop]:
        p = plan(self.deployments.values(), self.views(), self.instances, paused=paused)
        for action in p.actions:
            self.clock += 1
            if isinstance(action, Start):
                view = next(h for h in self.hosts if h.host == action.host)
                here = sum(1 for i in self.instances if i.host == action.host)
                assert view.in_rotation, action
                assert view.capacity is None or here < view.capacity, action
                d = self.deployments[action.deployment]
                self.instances.append(
                    LiveInstance(
                        uuid=f"s{self.clock:05.0f}",
                        deployment=d.name,
                        host=action.host,
                        fingerprint=d.fingerprint,
                        ready=False,
                        started=self.clock,
                    )
                )
            else:
                before = len(self.instances)
                self.instances = [i for i in self.instances if i.uuid != action.uuid]
                assert len(self.instances) == before - 1, action
        self.history.extend(p.actions)
        return list(p.actions)

    def settle(self) -> None:
        self.instances = [attr.evolve(i, ready=True) for i in self.instances]

    def converge(self, limit: int = 200) -> int:
        """Step and settle until a step does nothing; return the steps."""
        for n in range(limit):
            live_hosts = {h.host for h in self.hosts}
            self.instances = [i for i in self.instances if i.host in live_hosts]
            if not self.step():
                return n
            self.settle()
        raise AssertionError(f"no convergence after {limit} steps: {self.history[-10:]}")

    def per_host(self, name: str) -> dict[str, int]:
        counts = {h.host: 0 for h in self.hosts}
        for i in self.instances:
            if i.deployment == name and i.host in counts:
                counts[i.host] += 1
        return counts


def test_empty_cluster_spreads_one_per_host() -> None:
    p = plan([FIB], HOSTS, [])
    assert sorted(a.host for a in p.starts) == ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    assert not p.stops and not p.unplaced


def test_two_on_one_host_only_when_no_host_has_fewer() -> None:
    d = attr.evolve(FIB, instances=5)
    hosts = Counter(a.host for a in plan([d], HOSTS, []).starts)
    assert sorted(hosts.values()) == [1, 2, 2]


def test_nothing_to_do_when_it_matches() -> None:
    instances = [live(FIB, h.host) for h in HOSTS]
    assert plan([FIB], HOSTS, instances).actions == ()


def test_host_lost_replacement_goes_to_survivors() -> None:
    instances = [live(FIB, h.host) for h in HOSTS]
    survivors = HOSTS[:2]
    p = plan([FIB], survivors, instances)
    assert [type(a) for a in p.actions] == [Start]
    assert p.starts[0].host in {"127.0.0.2", "127.0.0.3"}


def test_replacement_prefers_fewer_instances_then_free_capacity() -> None:
    instances = [live(FIB, "127.0.0.2")]
    hosts = [
        HostView("127.0.0.2", instance_count=1),
        HostView("127.0.0.3", instance_count=4, free=0.9),
        HostView("127.0.0.4", instance_count=1, free=0.2),
        HostView("127.0.0.5", instance_count=1, free=0.8),
    ]
    d = attr.evolve(FIB, instances=2)
    # 127.0.0.3 runs more instances; of 4 and 5, 5 has more free capacity.
    assert plan([d], hosts, instances).starts == [Start("Fib", "127.0.0.5", "scale")]


def test_small_free_capacity_noise_does_not_decide() -> None:
    hosts = [HostView("127.0.0.3", free=0.51), HostView("127.0.0.2", free=0.53)]
    d = attr.evolve(FIB, instances=1)
    assert plan([d], hosts, []).starts == [Start("Fib", "127.0.0.2", "scale")]
    hosts = [HostView("127.0.0.3", free=0.59), HostView("127.0.0.2", free=0.41)]
    assert plan([d], hosts, []).starts == [Start("Fib", "127.0.0.3", "scale")]


def test_host_returns_surplus_stopped_from_the_crowded_host() -> None:
    a1, a2 = live(FIB, "127.0.0.2"), live(FIB, "127.0.0.2")
    b1, c1 = live(FIB, "127.0.0.3"), live(FIB, "127.0.0.4")
    p = plan([FIB], HOSTS, [a1, a2, b1, c1])
    # The newest of the two on 127.0.0.2 goes; nothing else moves.
    assert p.actions == (Stop("Fib", a2.uuid, "127.0.0.2", "surplus"),)


def test_surplus_waits_for_starting_instances() -> None:
    # A replacement is still starting when the lost host is back: nothing
    # is stopped until it is ready, then the crowded host gives one up.
    a1, b1, c1 = live(FIB, "127.0.0.2"), live(FIB, "127.0.0.3"), live(FIB, "127.0.0.4")
    starting = live(FIB, "127.0.0.2", ready=False)
    assert plan([FIB], HOSTS, [a1, b1, c1, starting]).actions == ()
    ready = attr.evolve(starting, ready=True)
    assert plan([FIB], HOSTS, [a1, b1, c1, ready]).actions == (
        Stop("Fib", ready.uuid, "127.0.0.2", "surplus"),
    )


def test_starting_instances_count() -> None:
    instances = [live(FIB, h.host, ready=False) for h in HOSTS]
    assert plan([FIB], HOSTS, instances).actions == ()


def test_out_of_rotation_host_gets_nothing_new_and_keeps_its_own() -> None:
    hosts = [attr.evolve(HOSTS[0], in_rotation=False), *HOSTS[1:]]
    p = plan([FIB], hosts, [])
    assert len(p.starts) == 3
    assert Counter(a.host for a in p.starts) in (
        Counter({"127.0.0.3": 2, "127.0.0.4": 1}),
        Counter({"127.0.0.3": 1, "127.0.0.4": 2}),
    )
    instances = [live(FIB, h.host) for h in HOSTS]
    assert plan([FIB], hosts, instances).actions == ()


def test_instances_held_by_a_load_guard_block_nothing() -> None:
    # 127.0.0.2 is out of rotation, its instance unregistered: a rollout
    # and a scale-down go on around it.
    hosts = [attr.evolve(HOSTS[0], in_rotation=False), *HOSTS[1:]]
    held = live(FIB, "127.0.0.2", ready=False)
    others = [live(FIB, "127.0.0.3"), live(FIB, "127.0.0.4")]
    d2 = attr.evolve(FIB, version="2")
    assert plan([d2], hosts, [held, *others]).starts == [Start("Fib", "127.0.0.3", "rollout")]
    down = attr.evolve(FIB, instances=1)
    stops = plan([down], hosts, [held, *others]).stops
    assert len(stops) == 2
    assert held.uuid in {s.uuid for s in stops}  # the unregistered one goes first


def test_capacity_limit_and_unplaced() -> None:
    hosts = [HostView("127.0.0.2", capacity=1), HostView("127.0.0.3", capacity=2, instance_count=2)]
    p = plan([FIB], hosts, [])
    assert p.starts == [Start("Fib", "127.0.0.2", "scale")]
    assert p.unplaced == {"Fib": 2}


def test_hosts_and_region_constraints() -> None:
    d = attr.evolve(FIB, hosts=("127.0.0.3",))
    assert {a.host for a in plan([d], HOSTS, []).starts} == {"127.0.0.3"}
    hosts = [HostView("127.0.0.2", region="eu"), HostView("127.0.0.3", region="us")]
    d = attr.evolve(FIB, region="us", instances=2)
    assert {a.host for a in plan([d], hosts, []).starts} == {"127.0.0.3"}
    d = attr.evolve(FIB, hosts=("10.9.9.9",))
    assert plan([d], HOSTS, []).unplaced == {"Fib": 3}


def test_constraint_change_moves_instances_rolling() -> None:
    d = attr.evolve(FIB, instances=1, hosts=("127.0.0.3",))
    old = live(FIB, "127.0.0.2")
    p = plan([d], HOSTS, [old])
    assert p.actions == (Start("Fib", "127.0.0.3", "rollout"),)


def test_spread_region() -> None:
    hosts = [
        HostView("127.0.0.2", region="a"),
        HostView("127.0.0.3", region="a"),
        HostView("127.0.0.4", region="b"),
    ]
    d = attr.evolve(FIB, spread="region", instances=2)
    starts = plan([d], hosts, []).starts
    assert {hosts[[h.host for h in hosts].index(s.host)].region for s in starts} == {"a", "b"}


def test_spread_none_prefers_least_loaded() -> None:
    hosts = [HostView("127.0.0.2", instance_count=0), HostView("127.0.0.3", instance_count=5)]
    d = attr.evolve(FIB, spread="none", instances=3)
    assert [s.host for s in plan([d], hosts, []).starts] == ["127.0.0.2"] * 3


def test_undeployed_instances_are_stopped() -> None:
    gone = live(FIB, "127.0.0.2")
    assert plan([], HOSTS, [gone]).actions == (Stop("Fib", gone.uuid, "127.0.0.2", "undeployed"),)


def test_scale_down_stops_the_newest_on_the_fullest() -> None:
    instances = [live(FIB, h.host) for h in HOSTS]
    d = attr.evolve(FIB, instances=1)
    stops = plan([d], HOSTS, instances).stops
    assert len(stops) == 2
    assert {s.uuid for s in stops} == {instances[1].uuid, instances[2].uuid}


def test_rolling_replacement_step_by_step() -> None:
    d1 = attr.evolve(FIB, instances=2)
    cluster = Cluster(HOSTS[:2], [d1])
    cluster.converge()
    old = {i.uuid for i in cluster.instances}
    d2 = attr.evolve(d1, version="2")
    cluster.deployments = {"Fib": d2}
    # Surge one; nothing stops while it starts.
    first = cluster.step()
    assert len(first) == 1 and isinstance(first[0], Start) and first[0].reason == "rollout"
    assert cluster.step() == []
    cluster.settle()
    ready_counts = []
    for _ in range(10):
        actions = cluster.step()
        ready_counts.append(sum(i.ready for i in cluster.instances))
        cluster.settle()
        if not actions:
            break
    assert min(ready_counts) >= 2  # capacity never below desired
    assert not old & {i.uuid for i in cluster.instances}
    assert all(i.fingerprint == d2.fingerprint for i in cluster.instances)
    assert len(cluster.instances) == 2


def test_paused_rollout_keeps_old_instances() -> None:
    old = [live(FIB, h.host) for h in HOSTS]
    d2 = attr.evolve(FIB, version="broken")
    assert plan([d2], HOSTS, old, paused=["Fib"]).actions == ()
    assert len(plan([d2], HOSTS, old).starts) == 1


def test_rollout_without_room_for_a_surge_waits() -> None:
    hosts = [HostView("127.0.0.2", capacity=1, instance_count=1)]
    d = attr.evolve(FIB, instances=1)
    old = live(FIB, "127.0.0.2")
    p = plan([attr.evolve(d, version="2")], hosts, [old])
    assert p.actions == () and p.unplaced == {"Fib": 1}


def test_rebalance_with_hysteresis() -> None:
    # A new host joins: a difference of one stays as it is...
    instances = [live(FIB, "127.0.0.2"), live(FIB, "127.0.0.3"), live(FIB, "127.0.0.4")]
    four = [*HOSTS, HostView("127.0.0.5")]
    assert plan([FIB], four, instances).actions == ()
    # ...a difference of two moves one instance, start first.
    crowded = [live(FIB, "127.0.0.2"), live(FIB, "127.0.0.2"), live(FIB, "127.0.0.3")]
    cluster = Cluster(HOSTS, [FIB])
    cluster.instances = crowded
    cluster.converge()
    assert cluster.per_host("Fib") == {"127.0.0.2": 1, "127.0.0.3": 1, "127.0.0.4": 1}
    assert [type(a) for a in cluster.history] == [Start, Stop]


def test_deterministic() -> None:
    instances = [live(FIB, "127.0.0.2"), live(FIB, "127.0.0.2")]
    hosts = list(reversed(HOSTS))
    assert plan([FIB], hosts, instances) == plan([FIB], HOSTS, list(reversed(instances)))


# Properties

host_views = st.lists(
    st.builds(
        HostView,
        host=st.sampled_from([f"127.0.0.{n}" for n in range(2, 9)]),
        region=st.sampled_from(["a", "b"]),
        in_rotation=st.booleans(),
        capacity=st.none() | st.integers(0, 6),
        free=st.floats(0, 1),
    ),
    min_size=1,
    max_size=6,
    unique_by=lambda h: h.host,
)
specs = st.lists(
    st.builds(
        ClusterDeployment,
        name=st.sampled_from(["A", "B", "C"]),
        run=st.just("m:S"),
        instances=st.integers(0, 8),
        spread=st.sampled_from(["host", "region", "none"]),
        version=st.sampled_from([None, "1"]),
    ),
    min_size=1,
    max_size=3,
    unique_by=lambda d: d.name,
)


def _room(cluster: Cluster) -> int:
    total = 0
    for h in cluster.hosts:
        if h.in_rotation:
            total += 10_000 if h.capacity is None else h.capacity
    return total


@settings(max_examples=150, deadline=None)
@given(host_views, specs, st.data())
def test_converges_to_desired_when_capacity_allows(hosts, deployments, data) -> None:
    cluster = Cluster(hosts, deployments)
    # Start from an arbitrary placement: some instances on any host, some
    # with an old fingerprint.
    for d in deployments:
        for _ in range(data.draw(st.integers(0, 5))):
            h = data.draw(st.sampled_from(hosts)).host
            fp = data.draw(st.sampled_from([d.fingerprint, "old"]))
            cluster.instances.append(live(d, h, fingerprint=fp))
    cluster.converge()
    per = Counter(i.deployment for i in cluster.instances)
    wanted = sum(d.instances for d in deployments)
    if _room(cluster) >= wanted + len(deployments) + len(cluster.instances):
        for d in deployments:
            assert per[d.name] == d.instances, (d, cluster.instances)
            mine = [i for i in cluster.instances if i.deployment == d.name]
            assert all(i.fingerprint == d.fingerprint for i in mine)
    # Never more than desired once settled.
    for d in deployments:
        assert per[d.name] <= d.instances


@settings(max_examples=150, deadline=None)
@given(
    st.integers(1, 6),
    st.integers(0, 15),
    st.lists(st.integers(0, 5), max_size=6),
)
def test_spread_host_invariant(n_hosts, instances, kills) -> None:
    """
    Under spread=host on uncapped hosts, after every settled step no host
    has two more instances than another, through host losses and returns,
    and the count is always back to the desired number.
    """
    hosts = [HostView(f"127.0.0.{n + 2}") for n in range(n_hosts)]
    d = attr.evolve(FIB, instances=instances)
    cluster = Cluster(hosts, [d])
    cluster.converge()
    lost: list[tuple[HostView, list[LiveInstance]]] = []
    for k in kills:
        if lost and k % 2:
            back, its_instances = lost.pop()
            cluster.hosts.append(back)
            # Its daemon restarts what it ran before it was lost.
            cluster.instances.extend(its_instances)
        elif len(cluster.hosts) > 1:
            victim = cluster.hosts.pop(k % len(cluster.hosts))
            lost.append((victim, [i for i in cluster.instances if i.host == victim.host]))
        cluster.converge()
        counts = cluster.per_host("Fib").values()
        assert sum(counts) == instances
        assert max(counts) - min(counts) <= 1


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 5), st.integers(1, 10))
def test_no_flapping_once_converged(n_hosts, instances) -> None:
    hosts = [HostView(f"127.0.0.{n + 2}", free=0.1 * n) for n in range(n_hosts)]
    cluster = Cluster(hosts, [attr.evolve(FIB, instances=instances)])
    cluster.converge()
    before = sorted((i.uuid, i.host) for i in cluster.instances)
    # Host statistics jitter a little; a settled cluster does not move.
    cluster.hosts = [attr.evolve(h, free=max(0.0, h.free - 0.04)) for h in hosts]
    assert cluster.step() == []
    assert sorted((i.uuid, i.host) for i in cluster.instances) == before
