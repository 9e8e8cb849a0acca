"""
Tests for L{skynet.cluster.reconciler} on a L{MemoryRegistry}, a L{Clock}
and fake daemons: a host lost and back, scaling, rolling replacement (and
a broken one), failing deployments, undeploy, a leader change, adoption.
"""

from __future__ import annotations

from itertools import count
from typing import Any

import attr
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from skynet.cluster.reconciler import (
    STATE_KEY,
    IDaemonExecutor,
    Reconciler,
    RpcDaemonExecutor,
    StoredState,
    host_view,
)
from skynet.cluster.service import ClusterService
from skynet.cluster.spec import DESIRED_KEY, ClusterDeployment, DesiredState
from skynet.errors import ConnectionFailed
from skynet.registry.base import IInstanceListener, Instance, Query
from skynet.registry.memory import MemoryRegistry, MemoryStore

FIB = ClusterDeployment(
    name="Fib", run="examples.fibonacci:Fibonacci", instances=3, ready_timeout=10.0
)
START_DELAY = 1.0


class FakeHost:
    """
    One host: its daemon's node and the children it runs, on a registry
    object of its own (so that crashing it removes exactly its nodes).
    """

    def __init__(self, cluster: "FakeCluster", host: str, region: str = "default") -> None:
        self.cluster = cluster
        self.host = host
        self.region = region
        self.alive = False
        self.overloaded = False
        self.capacity: int | None = None
        self.children: dict[str, dict[str, Any]] = {}
        self.daemon = Instance(
            uuid=f"daemon-{host}", name="SkynetDaemon", version="1", region=region,
            host=host, port=9000,
        )  # fmt: skip
        self.up()

    def up(self) -> None:
        self.registry = MemoryRegistry(reactor=self.cluster.clock, store=self.cluster.store)
        self.alive = True
        self.registry.add(self.daemon)
        self.publish()
        # Its daemon restarts the children it had (its state file).
        for uuid in self.children:
            self.cluster.clock.callLater(START_DELAY, self.register, uuid)

    def publish(self) -> None:
        host: dict[str, Any] = {
            "cpu": 10.0,
            "memory": {"percent": 20.0},
            "load_guard": {"overloaded": self.overloaded},
            "children": {u: {} for u in self.children},
        }
        if self.capacity is not None:
            host["capacity"] = self.capacity
        self.registry.publish_stats(self.daemon, {"Host": host})

    def crash(self) -> None:
        self.alive = False
        self.registry.crash()

    def instance(self, uuid: str) -> Instance:
        child = self.children[uuid]
        return Instance(
            uuid=uuid, name="Fibonacci", version=child["version"], region=self.region,
            host=self.host, port=child["port"],
        )  # fmt: skip

    def register(self, uuid: str) -> None:
        child = self.children.get(uuid)
        if not self.alive or child is None or child["broken"]:
            return
        self.registry.add(self.instance(uuid))

    def deploy(self, run: str, args: list[str]) -> str:
        uuid = f"{self.host}-{next(self.cluster.ids)}"
        version = args[args.index("--version") + 1] if "--version" in args else "1"
        self.children[uuid] = {
            "service": run,
            "args": list(args),
            "port": 10000 + next(self.cluster.ids),
            "version": version,
            "broken": "nosuch" in run or version == "broken",
            "restarts": 0,
            "last_exit": None,
            "log": f"/logs/{uuid}.log",
        }
        if self.children[uuid]["broken"]:
            # It crash-loops: the daemon's listing says how it last exited.
            self.children[uuid]["last_exit"] = {"code": 1, "signal": None, "uptime": 0.4,
                                                "time": 1.0, "pid": 4, "error": None}  # fmt: skip
        self.publish()
        self.cluster.clock.callLater(START_DELAY, self.register, uuid)
        return uuid

    def stop(self, uuid: str) -> None:
        if uuid not in self.children:
            return
        instance = self.instance(uuid)
        del self.children[uuid]
        self.registry.remove(instance)
        self.publish()


@implementer(IDaemonExecutor)
class FakeExecutor:
    def __init__(self, cluster: "FakeCluster") -> None:
        self.cluster = cluster
        self.calls: list[tuple[str, str]] = []

    def _host(self, daemon: Instance) -> FakeHost | None:
        host = self.cluster.hosts.get(daemon.host)
        return host if host is not None and host.alive else None

    def deploy(self, daemon: Instance, run: str, args: list[str]):
        self.calls.append(("deploy", daemon.host))
        host = self._host(daemon)
        if host is None:
            return fail(ConnectionFailed(f"{daemon.host} unreachable"))
        return succeed(host.deploy(run, args))

    def stop(self, daemon: Instance, uuid: str):
        self.calls.append(("stop", uuid))
        host = self._host(daemon)
        if host is None:
            return fail(ConnectionFailed(f"{daemon.host} unreachable"))
        host.stop(uuid)
        return succeed({"ok": True, "uuid": uuid})

    def list(self, daemon: Instance):
        host = self._host(daemon)
        if host is None:
            return fail(ConnectionFailed(f"{daemon.host} unreachable"))
        if daemon.host in self.cluster.garbage:
            return succeed(["not", "a", "listing"])
        if daemon.host in self.cluster.hanging:
            d: Deferred = Deferred()
            self.cluster.hung.append(d)
            return d
        return succeed({u: dict(c) for u, c in host.children.items()})


@implementer(IInstanceListener)
class Capacity:
    """
    Follows the registered instances of Fibonacci, recording the lowest
    count seen once it was armed.
    """

    def __init__(self) -> None:
        self.registered: set[str] = set()
        self.lowest: int | None = None
        self.armed = False

    def _seen(self) -> None:
        if self.armed:
            n = len(self.registered)
            self.lowest = n if self.lowest is None else min(self.lowest, n)

    def snapshot(self, instances: list[Instance]) -> None:
        self.registered = {i.uuid for i in instances}
        self._seen()

    def added(self, instance: Instance) -> None:
        self.registered.add(instance.uuid)
        self._seen()

    def updated(self, instance: Instance) -> None:
        self.added(instance)

    def removed(self, instance: Instance) -> None:
        self.registered.discard(instance.uuid)
        self._seen()


class FakeCluster:
    def __init__(self, hosts: list[str]) -> None:
        self.clock = Clock()
        self.store = MemoryStore()
        self.ids = count(1)
        self.garbage: set[str] = set()
        self.hanging: set[str] = set()
        self.hung: list[Deferred] = []
        self.hosts: dict[str, FakeHost] = {}
        for h in hosts:
            self.hosts[h] = FakeHost(self, h)
        self.registry = MemoryRegistry(reactor=self.clock, store=self.store)
        self.executor = FakeExecutor(self)
        self.reconciler = self.new_reconciler("first")

    def new_reconciler(self, name: str) -> Reconciler:
        return Reconciler(
            self.registry, self.executor, reactor=self.clock, interval=1.0,
            list_interval=5.0, identifier=name,
        )  # fmt: skip

    def apply(self, *deployments: ClusterDeployment) -> None:
        self.registry.set_value(DESIRED_KEY, DesiredState(deployments).to_bytes())

    def run(self, seconds: float, step: float = 0.25) -> None:
        for _ in range(int(seconds / step)):
            self.clock.advance(step)

    def children(self, name_run: str = FIB.run) -> dict[str, list[str]]:
        return {
            h.host: sorted(u for u, c in h.children.items() if c["service"] == name_run)
            for h in self.hosts.values()
            if h.alive
        }

    def per_host(self) -> dict[str, int]:
        return {h: len(u) for h, u in self.children().items()}

    def registered(self) -> list[Instance]:
        return [i for i in self.store.instances() if i.name == "Fibonacci" and i.registered]

    def stored(self) -> StoredState:
        return StoredState.from_bytes(self.store.values.get(STATE_KEY))


HOSTS = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]


class ReconcilerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.cluster = FakeCluster(HOSTS)
        self.reconciler = self.cluster.reconciler
        self.successResultOf(self.reconciler.start())

    def tearDown(self) -> None:
        self.successResultOf(self.reconciler.stop())
        self.assertEqual(
            [
                c
                for c in self.cluster.clock.getDelayedCalls()
                if c.active() and "register" not in repr(c.func)
            ],
            [],
        )

    def status(self, name: str = "Fib"):
        return {s.name: s for s in self.reconciler.statuses()}[name]

    def converge(self, *deployments: ClusterDeployment, seconds: float = 10.0) -> None:
        self.cluster.apply(*deployments)
        self.cluster.run(seconds)

    def test_executor_interfaces(self) -> None:
        verifyObject(IDaemonExecutor, self.cluster.executor)
        verifyObject(IDaemonExecutor, RpcDaemonExecutor(reactor=self.cluster.clock))

    def test_apply_spreads_by_host_and_is_ok(self) -> None:
        self.converge(FIB)
        self.assertEqual(self.cluster.per_host(), dict.fromkeys(HOSTS, 1))
        self.assertEqual(len(self.cluster.registered()), 3)
        status = self.status()
        self.assertEqual((status.state, status.ready, status.desired), ("ok", 3, 3))
        self.assertEqual(status.hosts["127.0.0.2"], {"starting": 0, "running": 1, "registered": 1})
        stored = self.cluster.stored()
        self.assertEqual(len(stored.deployments["Fib"].instances), 3)
        self.assertEqual(stored.deployments["Fib"].status, "ok")
        kinds = [e["kind"] for e in stored.events]
        self.assertEqual(kinds.count("started"), 3)
        self.assertIn("leader", kinds)
        # Settled: more time changes nothing, and the stored state is not
        # rewritten.
        calls = len(self.cluster.executor.calls)
        writes: list[str] = []
        original = self.cluster.registry.set_value
        self.cluster.registry.set_value = lambda key, value: (  # type: ignore[method-assign]
            writes.append(key) or original(key, value)
        )
        self.cluster.run(20)
        self.assertEqual(len(self.cluster.executor.calls), calls)
        self.assertEqual(writes, [])

    def test_progressing_while_starting(self) -> None:
        self.cluster.apply(FIB)
        self.cluster.run(0.5)
        status = self.status()
        self.assertEqual((status.state, status.starting, status.ready), ("progressing", 3, 0))

    def test_host_lost_then_back(self) -> None:
        self.converge(FIB)
        lost = self.cluster.hosts["127.0.0.4"]
        lost.crash()
        self.cluster.run(5)
        # Replaced on the survivors: 3 registered again.
        self.assertEqual(len(self.cluster.registered()), 3)
        self.assertEqual(sum(self.cluster.per_host().values()), 3)
        self.assertEqual(self.status().state, "ok")
        self.assertIn("127.0.0.4", {e.get("host") for e in self.cluster.stored().events})
        # The host comes back with its old instance: one is stopped, so that
        # exactly 3 remain, one per host.
        lost.up()
        self.cluster.run(10)
        self.assertEqual(self.cluster.per_host(), dict.fromkeys(HOSTS, 1))
        self.assertEqual(len(self.cluster.registered()), 3)
        stops = [c for c in self.cluster.executor.calls if c[0] == "stop"]
        self.assertEqual(len(stops), 1)
        # No flapping afterwards.
        calls = len(self.cluster.executor.calls)
        self.cluster.run(30)
        self.assertEqual(len(self.cluster.executor.calls), calls)

    def test_scale_up_and_down(self) -> None:
        self.converge(FIB)
        self.converge(attr.evolve(FIB, instances=5))
        self.assertEqual(sorted(self.cluster.per_host().values()), [1, 2, 2])
        self.converge(attr.evolve(FIB, instances=1))
        self.assertEqual(sum(self.cluster.per_host().values()), 1)
        self.assertEqual(self.status().state, "ok")

    def test_rolling_replacement_keeps_capacity(self) -> None:
        d = attr.evolve(FIB, instances=4)
        self.converge(d)
        old = {u for us in self.cluster.children().values() for u in us}
        self.assertEqual(len(old), 4)
        watcher = Capacity()
        self.cluster.registry.watch(Query(service="Fibonacci", registered=True), watcher)
        self.cluster.clock.advance(0)
        watcher.armed = True
        self.converge(attr.evolve(d, version="2"), seconds=40)
        now = {u for us in self.cluster.children().values() for u in us}
        self.assertEqual(len(now), 4)
        self.assertFalse(now & old)
        self.assertEqual({i.version for i in self.cluster.registered()}, {"2"})
        self.assertEqual(watcher.lowest, 4)
        record = self.cluster.stored().deployments["Fib"]
        assert record.rollout is not None
        self.assertEqual(record.rollout.state, "done")
        self.assertEqual(self.status().state, "ok")

    def test_broken_rollout_stops_and_old_keep_serving(self) -> None:
        self.converge(FIB)
        old = {u for us in self.cluster.children().values() for u in us}
        self.converge(attr.evolve(FIB, version="broken"), seconds=40)
        # The new instance never registered: it was stopped, the rollout
        # stopped, the old ones serve.
        self.assertEqual({u for us in self.cluster.children().values() for u in us}, old)
        self.assertEqual(len(self.cluster.registered()), 3)
        status = self.status()
        self.assertEqual(status.state, "failing")
        self.assertIn("rollout stopped", status.reason)
        self.assertIn("did not register within 10s", status.reason)
        self.assertEqual(status.restarts, 1)
        deploys = [c for c in self.cluster.executor.calls if c[0] == "deploy"]
        self.assertEqual(len(deploys), 4)
        # A fixed version rolls again.
        self.converge(attr.evolve(FIB, version="3"), seconds=40)
        self.assertEqual({i.version for i in self.cluster.registered()}, {"3"})
        self.assertEqual(self.status().state, "ok")

    def test_failing_deployment_backs_off(self) -> None:
        broken = ClusterDeployment(name="Broken", run="examples.nosuch:Broken", instances=1,
                                   ready_timeout=5.0)  # fmt: skip
        self.cluster.apply(broken)
        self.cluster.run(60)
        status = self.status("Broken")
        self.assertEqual(status.state, "failing")
        self.assertIn("did not register within 5s", status.last_error)
        self.assertIn("(last exit: code 1 after 0.4s)", status.last_error)
        self.assertIn("its log: /logs/", status.last_error)
        self.assertGreaterEqual(status.restarts, 3)
        deploys = [c for c in self.cluster.executor.calls if c[0] == "deploy"]
        # 5 s timeouts with a growing back-off: far fewer than 60 / 5 starts.
        self.assertLess(len(deploys), 9)
        self.assertEqual(len(deploys) - 1, status.restarts)

    def test_undeploy_stops_everything(self) -> None:
        self.converge(FIB)
        self.converge()
        self.assertEqual(sum(self.cluster.per_host().values()), 0)
        self.assertEqual(self.cluster.registered(), [])
        self.assertNotIn("Fib", self.cluster.stored().deployments)

    def test_out_of_rotation_and_capacity(self) -> None:
        self.cluster.hosts["127.0.0.2"].overloaded = True
        self.cluster.hosts["127.0.0.2"].publish()
        self.cluster.hosts["127.0.0.3"].capacity = 1
        self.cluster.hosts["127.0.0.3"].publish()
        self.converge(FIB)
        self.assertEqual(self.cluster.per_host(), {"127.0.0.2": 0, "127.0.0.3": 1, "127.0.0.4": 2})

    def test_unplaceable_is_degraded(self) -> None:
        self.converge(attr.evolve(FIB, hosts=("127.0.0.9",)))
        status = self.status()
        self.assertEqual(status.state, "degraded")
        self.assertIn("no eligible host", status.reason)

    def test_deploy_failure_is_reported(self) -> None:
        self.cluster.apply(FIB)
        host = self.cluster.hosts["127.0.0.3"]
        host.alive = False  # its daemon stops answering, its node stays
        self.cluster.run(3)
        record = self.cluster.stored().deployments["Fib"]
        self.assertIn("Deploy on 127.0.0.3 failed", record.last_error)

    def test_new_leader_carries_on_from_stored_state(self) -> None:
        self.converge(FIB)
        self.successResultOf(self.reconciler.stop())
        calls = len(self.cluster.executor.calls)
        # A new leader (another process: nothing shared but the registry).
        self.reconciler = self.cluster.new_reconciler("second")
        self.successResultOf(self.reconciler.start())
        self.cluster.run(10)
        self.assertEqual(len(self.cluster.executor.calls), calls)
        self.assertEqual(self.status().state, "ok")
        self.assertEqual(self.cluster.stored().leader, "second")
        self.assertEqual(self.cluster.stored().term, 2)
        # And acts: a host lost is replaced.
        self.cluster.hosts["127.0.0.2"].crash()
        self.cluster.run(5)
        self.assertEqual(len(self.cluster.registered()), 3)

    def test_unrecorded_child_is_adopted(self) -> None:
        # A previous leader started this child and died before recording it.
        host = self.cluster.hosts["127.0.0.2"]
        host.deploy(FIB.run, FIB.deploy_args())
        self.cluster.apply(FIB)
        self.cluster.run(10)
        self.assertEqual(self.cluster.per_host(), dict.fromkeys(HOSTS, 1))
        kinds = [e["kind"] for e in self.cluster.stored().events]
        self.assertIn("adopted", kinds)
        self.assertEqual(kinds.count("started"), 2)

    def test_removed_child_is_forgotten_and_replaced(self) -> None:
        self.converge(FIB)
        host = self.cluster.hosts["127.0.0.3"]
        (uuid,) = host.children
        host.stop(uuid)  # someone ran `sky stop` on it
        self.cluster.run(10)
        self.assertEqual(sum(self.cluster.per_host().values()), 3)
        kinds = [e["kind"] for e in self.cluster.stored().events]
        self.assertIn("forgotten", kinds)

    def test_garbage_desired_state_keeps_the_last_good(self) -> None:
        self.converge(FIB)
        self.cluster.registry.set_value(DESIRED_KEY, b"{garbage")
        self.cluster.run(5)
        self.assertEqual(sum(self.cluster.per_host().values()), 3)
        self.assertIn("not JSON", self.reconciler.desired_error)
        self.assertEqual(len(self.flushLoggedErrors()), 0)

    def test_ready_only_once_it_answers_the_probe(self) -> None:
        self.successResultOf(self.reconciler.stop())
        silent = {"127.0.0.3"}
        probed: list[str] = []

        def probe(instance: Instance):
            probed.append(instance.host)
            return succeed(instance.host not in silent)

        self.reconciler = self.cluster.new_reconciler("probing")
        self.reconciler.probe = probe
        self.successResultOf(self.reconciler.start())
        self.cluster.apply(attr.evolve(FIB, ready_timeout=30.0))
        self.cluster.run(5)
        status = self.status()
        # Registered on all three, but one does not answer: still starting.
        self.assertEqual(len(self.cluster.registered()), 3)
        self.assertEqual((status.state, status.ready, status.starting), ("progressing", 2, 1))
        silent.clear()
        self.cluster.run(3)
        self.assertEqual(self.status().state, "ok")
        # Probed until it answered, then never again.
        count = len(probed)
        self.cluster.run(10)
        self.assertEqual(len(probed), count)

    def test_a_daemon_that_does_not_answer_holds_nothing_up(self) -> None:
        self.converge(FIB)
        # 127.0.0.3's daemon stops answering (its node is still there), and
        # 127.0.0.4 melts: the replacement is not held up by the listing.
        self.cluster.hanging.add("127.0.0.3")
        self.cluster.run(6)
        self.assertTrue(self.cluster.hung)
        self.cluster.hosts["127.0.0.4"].crash()
        self.cluster.run(3)
        self.assertEqual(len(self.cluster.registered()), 3)
        for d in self.cluster.hung:
            d.callback({})

    def test_garbage_listing_is_ignored(self) -> None:
        self.cluster.garbage.add("127.0.0.3")
        self.converge(FIB)
        self.assertEqual(self.cluster.per_host(), dict.fromkeys(HOSTS, 1))
        self.assertEqual(self.status().state, "ok")

    def test_garbage_stored_state_starts_empty(self) -> None:
        self.successResultOf(self.reconciler.stop())
        self.cluster.registry.set_value(STATE_KEY, b"[1, 2")
        self.reconciler = self.cluster.new_reconciler("second")
        self.successResultOf(self.reconciler.start())
        self.converge(FIB)
        self.assertEqual(self.status().state, "ok")

    def test_stopped_reconciler_does_nothing(self) -> None:
        self.successResultOf(self.reconciler.stop())
        self.cluster.apply(FIB)
        self.cluster.run(5)
        self.assertEqual(self.cluster.executor.calls, [])


def test_host_view_from_daemon_statistics() -> None:
    daemon = Instance(uuid="d", name="SkynetDaemon", version="1", region="eu",
                      host="127.0.0.2", port=1)  # fmt: skip
    view = host_view(
        daemon,
        {"Host": {"cpu": 30.0, "memory": {"percent": 60.0}, "capacity": 4,
                  "load_guard": {"overloaded": True}, "children": {"a": {}, "b": {}}}},
    )  # fmt: skip
    assert (view.region, view.in_rotation, view.capacity, view.instance_count) == (
        "eu", False, 4, 2,
    )  # fmt: skip
    assert abs(view.free - 0.4) < 1e-9
    blank = host_view(daemon, {"Host": "garbage"})
    assert (blank.in_rotation, blank.capacity, blank.free) == (True, None, 1.0)
    assert not host_view(attr.evolve(daemon, registered=False), {}).in_rotation


class ClusterServiceTests(SynchronousTestCase):
    def test_one_daemon_reconciles_then_the_next(self) -> None:
        cluster = FakeCluster(HOSTS)
        told: list[tuple[str, str]] = []

        def service(name: str) -> ClusterService:
            return ClusterService(
                cluster.registry, executor=cluster.executor, reactor=cluster.clock,
                identifier=name, interval=1.0, list_interval=5.0, probe=None,
                on_change=lambda what: told.append((name, what)),
            )  # fmt: skip

        a, b = service("a"), service("b")
        a.startService()
        b.startService()
        cluster.apply(FIB)
        cluster.run(10)
        self.assertTrue(a.leading and not b.leading)
        self.assertEqual(cluster.per_host(), dict.fromkeys(HOSTS, 1))
        calls = len(cluster.executor.calls)
        self.successResultOf(a.stopService())
        self.assertTrue(b.leading)
        cluster.run(10)
        self.assertEqual(len(cluster.executor.calls), calls)
        cluster.hosts["127.0.0.2"].crash()
        cluster.run(5)
        self.assertEqual(len(cluster.registered()), 3)
        self.assertEqual(cluster.stored().leader, "b")
        self.assertEqual(told, [("a", "elected"), ("a", "deposed: stopping"), ("b", "elected")])
        self.successResultOf(b.stopService())
        self.assertFalse(a.reconciler.running or b.reconciler.running)


history = st.lists(
    st.one_of(
        st.tuples(st.just("crash"), st.integers(0, 2)),
        st.tuples(st.just("revive"), st.integers(0, 2)),
        st.tuples(st.just("scale"), st.integers(0, 6)),
        st.tuples(st.just("version"), st.sampled_from(["1", "2", "3"])),
        st.tuples(st.just("wait"), st.sampled_from([0.25, 1.0, 3.0, 12.0])),
    ),
    max_size=10,
)


@settings(max_examples=40, deadline=None)
@given(history)
def test_any_history_settles_to_exactly_the_desired_instances(events) -> None:
    """
    Whatever happens (hosts lost and back, scaling, new versions, at any
    moment), once things calm down exactly the desired number of instances
    is registered, all of the current version, spread by host, with no
    child left over on any host.
    """
    cluster = FakeCluster(HOSTS)
    reconciler = cluster.reconciler
    reconciler.start()
    current = attr.evolve(FIB, version="1")
    cluster.apply(current)
    cluster.run(5)
    hosts = [cluster.hosts[h] for h in HOSTS]
    for kind, arg in events:
        if kind == "crash" and hosts[arg].alive and sum(h.alive for h in hosts) > 1:
            hosts[arg].crash()
        elif kind == "revive" and not hosts[arg].alive:
            hosts[arg].up()
        elif kind == "scale":
            current = attr.evolve(current, instances=arg)
            cluster.apply(current)
        elif kind == "version":
            current = attr.evolve(current, version=arg)
            cluster.apply(current)
        elif kind == "wait":
            cluster.run(arg)
    cluster.run(120, step=0.5)
    registered = cluster.registered()
    assert len(registered) == current.instances, (events, cluster.per_host())
    assert {i.version for i in registered} <= {current.version}
    per_host = cluster.per_host()
    assert sum(per_host.values()) == current.instances, (events, per_host)
    assert max(per_host.values()) - min(per_host.values()) <= 1, (events, per_host)
    status = {s.name: s for s in reconciler.statuses()}["Fib"]
    assert status.state == "ok", (events, status)
    reconciler.stop()
