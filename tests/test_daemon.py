"""
The daemon: unit tests on fakes (a fake process reactor, an in-memory
registry, fake measurements and admin calls), then real processes: C{twistd
-n skynet-daemon} deploying real services through its RPC, killed,
restarted and guarded.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

import attr
import psutil
import pytest
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.threads import deferToThread
from twisted.logger import capturedLogs
from twisted.python import usage
from twisted.python.usage import UsageError
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from zope.interface import implementer

from skynet.client import Client
from skynet.control import sub_services_from_bson
from skynet.daemon import (
    ChildGuard,
    ChildInstances,
    Daemon,
    DaemonState,
    Deployment,
    DeploymentStore,
    FakeSampler,
    GuardConfig,
    ISampler,
    LoadGuard,
    PsutilSampler,
    RegistrationPolicy,
    Release,
    Restart,
    Usage,
    command_line,
    load_reading,
    load_state,
    make_deployment,
    parse_deploy_file,
    save_state,
)
from skynet.daemon_tap import Options
from skynet.errors import ServiceError
from skynet.registry import Query, registry_from_url
from skynet.registry.base import Address, IInstanceListener, Instance
from skynet.registry.files import FileRegistry
from skynet.registry.memory import MemoryRegistry
from skynet.service import Service
from skynet.testing import LocalCluster, MemoryServerEndpoint
from skynet.web.hosts import read_daemon_node
from tests.processes import (
    ROOT,
    child_env,
    fibonacci_load,
    sleep,
    terminate,
    twistd,
    wait_for,
)
from tests.test_procmon import FakeProcess, FakeProcessReactor

# Fakes


class FakeChildren:
    """
    Plays the services the daemon spawns: each fake process registers (in
    the same in-memory store) under the uuid its command line names, with
    an admin address; admin calls act on it as a real service would.
    """

    def __init__(self, reactor: FakeProcessReactor, store: Any) -> None:
        self.reactor = reactor
        self.store = store
        self.by_admin: dict[int, tuple[FakeProcess, MemoryRegistry, Instance]] = {}
        self.calls: list[tuple[str, str]] = []
        self.port = 20000
        self.auto_register = True
        reactor.on_spawn = self.spawned

    def spawned(self, process: FakeProcess) -> None:
        if self.auto_register:
            self.reactor.callLater(0.1, self.register, process)

    def register(self, process: FakeProcess) -> Instance | None:
        if process.ended:
            return None
        args = process.args
        uuid = args[args.index("--uuid") + 1]
        self.port += 2
        instance = Instance(uuid=uuid, name="Fake", version="1", region="r", host="10.0.0.9",
                            port=self.port, admin=Address("10.0.0.9", self.port + 1),
                            registered="--unregistered" not in args, pid=process.pid)  # fmt: skip
        registry = MemoryRegistry(reactor=self.reactor, store=self.store)
        registry.add(instance)
        self.by_admin[self.port + 1] = (process, registry, instance)
        proto = process.proto
        original = proto.processEnded

        def ended(reason: Any) -> None:
            registry.crash()  # a dead process's nodes go (file registry: invisible)
            original(reason)

        proto.processEnded = ended
        return instance

    def instance(self, uuid: str) -> Instance | None:
        for process, _, instance in self.by_admin.values():
            if instance.uuid == uuid and not process.ended:
                return self.current(instance)
        return None

    def current(self, instance: Instance) -> Instance:
        return self.store.nodes[instance.path].value

    def admin(self, address: Address, method: str, params: dict) -> Deferred:
        process, registry, instance = self.by_admin[address.port]
        self.calls.append((instance.uuid, method))
        if process.ended:
            return Deferred.fromCoroutine(_refused())
        if method in ("Admin.Register", "Admin.Unregister"):
            registry.update(attr.evolve(instance, registered=method == "Admin.Register"))
        elif method == "Admin.Stop":
            registry.update(attr.evolve(instance, registered=False))

            def stop() -> None:
                registry.remove(instance)
                if not process.ended:
                    process.exit(0)

            self.reactor.callLater(0.2, stop)
        return succeed(None)


async def _refused() -> None:
    raise ConnectionRefusedError("gone")


class DaemonUnitTests(SynchronousTestCase):
    """
    The daemon's logic on a fake clock: RPC through an in-memory cluster,
    guards on fake measurements, registry cleanup.
    """

    def make(self, **kwargs: Any) -> Daemon:
        self.clock = FakeProcessReactor()
        self.cluster = LocalCluster(reactor=self.clock)
        self.children = FakeChildren(self.clock, self.cluster.registry.store)
        self.sampler = FakeSampler()
        self.loads: list[float] = []
        kwargs.setdefault("guards", GuardConfig(sample_interval=1.0))
        kwargs.setdefault("load", lambda: self.loads.pop(0) if self.loads else 0.0)
        registry = MemoryRegistry(reactor=self.clock, store=self.cluster.registry.store)
        daemon = Daemon(
            registry,
            [MemoryServerEndpoint(self.cluster)],
            reactor=self.clock,
            registry_url="file:///fake/registry",
            sampler=self.sampler,
            admin=self.children.admin,
            service_command=["/venv/bin/twistd"],
            stop_grace=5.0,
            kill_time=2.0,
            own_session=False,
            **kwargs,
        )
        self.daemon = daemon
        daemon.startService()
        self.settle()
        self.addCleanup(self._stop)
        return daemon

    def _stop(self) -> None:
        d = self.daemon.stopService()
        for _ in range(100):
            self.clock.advance(0.1)
        self.successResultOf(d)
        self.successResultOf(self.cluster.stop())
        # Stopped means stopped: no timer of the daemon's is left behind.
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def settle(self, seconds: float = 0.0) -> None:
        steps = int(seconds / 0.05)
        for _ in range(steps):
            self.clock.advance(0.05)
        self.cluster.settle()

    def call(self, method: str, params: dict | None = None) -> Any:
        d = self.cluster.call("SkynetDaemon", method, params or {})
        self.settle()
        return d

    def test_remote_methods(self) -> None:
        self.make()
        self.assertEqual(
            sorted(self.daemon.host.methods),
            ["Deploy", "HostStats", "ListSubServices", "RegisterSubService",
             "RestartAllSubServices", "RestartSubService",
             "SearchLogs",  # (observe) skynet.observe.logsearch
             "StopAllSubServices", "StopSubService", "UnregisterSubService"],
        )  # fmt: skip

    def test_deploy_and_list(self) -> None:
        self.make()
        result = self.successResultOf(self.call("Deploy", {
            "service": "examples.fibonacci:Fibonacci", "args": ["--region", "Mars"]}))  # fmt: skip
        uuid = result["uuid"]
        process = self.clock.last()
        self.assertEqual(process.args, [
            "/venv/bin/twistd", "-n", "--pidfile=", "skynet-service",
            "--service", "examples.fibonacci:Fibonacci", "--uuid", uuid,
            "--registry", "file:///fake/registry", "--supervised", "--region", "Mars"])  # fmt: skip
        self.assertEqual(process.env["SKYNET_UUID"], uuid)
        self.assertEqual(process.env["PYTHONUNBUFFERED"], "1")
        self.assertEqual(process.env["PATH"], os.environ["PATH"])
        self.settle(0.5)
        answer = self.successResultOf(self.call("ListSubServices"))
        self.assertEqual(sub_services_from_bson(answer)[uuid].pid, process.pid)
        listing = answer["services"]
        entry = listing[uuid]
        self.assertEqual(
            {k: entry[k] for k in ("service", "args", "running", "pid", "restarts", "started",
                                   "registered", "last_exit", "in_registry")},
            {"service": "examples.fibonacci:Fibonacci", "args": ["--region", "Mars"],
             "running": True, "pid": process.pid, "restarts": 0, "started": 0.0,
             "registered": True, "last_exit": None, "in_registry": True},
        )  # fmt: skip
        # registered: false starts it unregistered; a command line runs as it is.
        second = self.successResultOf(self.call("Deploy", {
            "service": "examples.sleeper:Sleeper", "registered": False}))["uuid"]  # fmt: skip
        self.assertIn("--unregistered", self.clock.last().args)
        third = self.successResultOf(
            self.call(
                "Deploy",
                {"service": "/usr/bin/env python3 -m http.server", "args": "8000 --bind 127.0.0.1"},
            )
        )
        self.assertEqual(self.clock.last().args, ["/usr/bin/env", "python3", "-m", "http.server",
                                                  "8000", "--bind", "127.0.0.1"])  # fmt: skip
        self.assertEqual(self.clock.last().env["SKYNET_UUID"], third["uuid"])
        listing = self.successResultOf(self.call("ListSubServices"))["services"]
        self.assertEqual(listing[second]["registered"], False)
        self.assertEqual(len(listing), 3)

    def test_errors(self) -> None:
        self.make()
        for method in ("StopSubService", "RestartSubService", "RegisterSubService",
                       "UnregisterSubService"):  # fmt: skip
            failure = self.failureResultOf(self.call(method, {"uuid": "no-such"}), ServiceError)
            self.assertEqual(str(failure.value), "no sub-service with uuid no-such on this host")
            failure = self.failureResultOf(self.call(method, {}), ServiceError)
            self.assertEqual(str(failure.value), "uuid is required")
        for params in ({}, {"service": ""}, {"service": "a:B", "args": [1]},
                       {"service": "a:B", "registered": "yes"}, {"service": "'unclosed"}):  # fmt: skip
            failure = self.failureResultOf(self.call("Deploy", params), ServiceError)
            self.assertTrue(str(failure.value).startswith("cannot deploy: "), failure.value)
        self.assertEqual(self.clock.spawned, [])

    def test_stop_restart_register(self) -> None:
        self.make()
        uuid = self.successResultOf(self.call("Deploy", {"service": "m:A"}))["uuid"]
        other = self.successResultOf(self.call("Deploy", {"service": "m:B"}))["uuid"]
        self.settle(0.5)
        first = self.clock.spawned[0]
        self.successResultOf(self.call("UnregisterSubService", {"uuid": uuid}))
        self.assertEqual(self.children.calls[-1], (uuid, "Admin.Unregister"))
        self.assertFalse(self.children.instance(uuid).registered)
        # Its next start keeps the wish.
        self.assertIn("--unregistered", self.daemon.supervisor.children[uuid].args)
        result = self.successResultOf(self.call("RegisterSubService", {"uuid": uuid}))
        self.assertEqual(result, {"ok": True, "uuid": uuid, "registered": True})
        self.assertTrue(self.children.instance(uuid).registered)
        result = self.successResultOf(self.call("RestartSubService", {"uuid": uuid}))
        self.assertEqual(result, {"ok": True, "uuid": uuid})
        self.assertEqual(self.children.calls[-1], (uuid, "Admin.Stop"))
        self.settle(0.5)
        self.assertTrue(first.ended)
        self.assertEqual(first.signals, [])
        listing = self.successResultOf(self.call("ListSubServices"))["services"]
        self.assertEqual(listing[uuid]["restarts"], 1)
        self.assertNotEqual(listing[uuid]["pid"], first.pid)
        result = self.successResultOf(self.call("StopSubService", {"uuid": other}))
        self.assertEqual(result, {"ok": True, "uuid": other})
        self.settle(0.5)
        listing = self.successResultOf(self.call("ListSubServices"))["services"]
        self.assertEqual(list(listing), [uuid])
        self.assertIsNone(self.children.instance(other))
        self.settle(10)
        self.assertEqual(len(self.clock.running()), 1)
        result = self.successResultOf(self.call("StopAllSubServices"))
        self.assertEqual(result, {"ok": True, "uuids": [uuid]})
        self.settle(1)
        self.assertEqual(self.clock.running(), [])

    def test_dead_child_leaves_the_registry_before_its_restart(self) -> None:
        """
        Nodes a dead process left behind (a ZooKeeper session that has not
        expired yet) are deleted by uuid before the restart.
        """
        self.make()
        uuid = self.successResultOf(self.call("Deploy", {"service": "m:A"}))["uuid"]
        self.settle(0.5)
        process = self.clock.last()
        _, registry, instance = self.children.by_admin[max(self.children.by_admin)]
        registry.crash = lambda: None  # the nodes outlive the process
        self.children.auto_register = False
        process.exit(signal=signal.SIGKILL)
        self.settle()
        self.assertEqual(self.successResultOf(registry.query(Query(uuid=uuid))), [])
        [event] = self.daemon.events.recent(kind="registry_cleanup")
        self.assertEqual(event.fields["path"], instance.path)
        self.assertEqual(self.clock.running(), [])
        self.settle(1.0)  # back-off: it died young
        self.assertEqual(len(self.clock.running()), 1)

    def test_memory_guard(self) -> None:
        """
        Over its RSS threshold for N samples: unregistered, restarted
        (unregistered), and registered again once the new process is
        healthy; every step an event with the measured values.
        """
        self.make(guards=GuardConfig(sample_interval=1.0, child_max_rss=100 << 20,
                                     child_samples=3))  # fmt: skip
        uuid = self.successResultOf(self.call("Deploy", {"service": "m:Hog"}))["uuid"]
        self.settle(1.5)
        first = self.clock.last()
        self.sampler.table[first.pid] = Usage(cpu=5.0, rss=150 << 20)
        self.settle(2.0)
        self.assertTrue(self.children.instance(uuid).registered)  # two samples: not yet
        self.settle(1.0)
        self.assertEqual(
            self.children.calls[:2], [(uuid, "Admin.Unregister"), (uuid, "Admin.Stop")]
        )
        self.settle(0.5)
        self.assertTrue(first.ended)
        second = self.clock.last()
        self.assertIsNot(second, first)
        self.assertIn("--unregistered", second.args)
        self.assertFalse(self.children.instance(uuid).registered)
        self.settle(1.0)
        self.assertTrue(self.children.instance(uuid).registered)
        self.assertEqual(self.children.calls[-1], (uuid, "Admin.Register"))
        events = [e for e in self.daemon.events.recent() if e.kind.startswith("guard_")]
        self.assertEqual([e.kind for e in events],
                         ["guard_unregister", "guard_restart", "guard_register"])  # fmt: skip
        self.assertEqual(events[0].fields["rss"], 150 << 20)
        self.assertEqual(events[0].fields["max_rss"], 100 << 20)
        self.assertEqual(events[0].fields["reasons"], "memory")
        self.assertEqual(events[0].fields["pid"], first.pid)
        self.assertEqual(events[2].fields["rss"], 50 << 20)
        self.assertEqual(events[2].fields["pid"], second.pid)
        self.assertNotIn("--unregistered", self.daemon.supervisor.children[uuid].args)
        listing = self.successResultOf(self.call("ListSubServices"))["services"][uuid]
        self.assertEqual((listing["restarts"], listing["registered"], listing["held"]),
                         (1, True, []))  # fmt: skip

    def test_guard_restarts_again_a_new_process_still_over(self) -> None:
        self.make(guards=GuardConfig(sample_interval=1.0, child_max_rss=100 << 20,
                                     child_samples=2))  # fmt: skip
        uuid = self.successResultOf(self.call("Deploy", {"service": "m:Hog"}))["uuid"]
        self.settle(0.5)
        first = self.clock.last()
        self.sampler.table[first.pid] = Usage(cpu=5.0, rss=150 << 20)
        self.settle(2.0)
        self.assertTrue(first.ended)
        second = self.clock.last()
        self.sampler.table[second.pid] = Usage(cpu=5.0, rss=150 << 20)
        self.settle(2.0)
        self.assertTrue(second.ended)
        third = self.clock.last()
        self.assertIn("--unregistered", third.args)
        self.assertFalse(self.children.instance(uuid).registered)
        self.settle(1.0)
        self.assertTrue(self.children.instance(uuid).registered)
        kinds = [e.kind for e in self.daemon.events.recent() if e.kind.startswith("guard_")]
        self.assertEqual(kinds, ["guard_unregister", "guard_restart"] * 2 + ["guard_register"])

    def test_cpu_guard_needs_consecutive_samples(self) -> None:
        self.make(guards=GuardConfig(sample_interval=1.0, child_max_cpu=90.0, child_samples=2))
        self.successResultOf(self.call("Deploy", {"service": "m:Busy"}))
        self.settle(1.5)
        pid = self.clock.last().pid
        for cpu in (95.0, 10.0, 95.0, 10.0, 95.0, 10.0):
            self.sampler.table[pid] = Usage(cpu=cpu, rss=1)
            self.settle(1.0)
        self.assertEqual(self.children.calls, [])
        self.sampler.table[pid] = Usage(cpu=150.0, rss=1)
        self.settle(2.0)
        [event] = self.daemon.events.recent(kind="guard_unregister")
        self.assertEqual((event.fields["reasons"], event.fields["cpu"]), ("cpu", 150.0))

    def test_host_load_guard_hysteresis(self) -> None:
        """
        Above the high-water mark for N samples: every child unregistered;
        below the low-water mark for N samples: registered again; readings
        between the marks change nothing.
        """
        self.make(guards=GuardConfig(sample_interval=1.0, load_high=4.0, load_low=2.0,
                                     load_samples=2))  # fmt: skip
        uuids = [self.successResultOf(self.call("Deploy", {"service": f"m:S{i}"}))["uuid"]
                 for i in range(2)]  # fmt: skip
        self.settle(0.5)
        readings = [5.0, 3.0, 5.0, 5.0, 3.0, 1.0, 3.0, 4.0, 1.5, 1.0, 3.0, 3.9, 5.0, 3.0]
        self.loads.extend(readings)
        states = []
        for _ in readings:
            self.settle(1.0)
            states.append(tuple(self.children.instance(u).registered for u in uuids))
        self.assertEqual([s[0] for s in states],
                         [True, True, True, False, False, False, False, False, False, True,
                          True, True, True, True])  # fmt: skip
        self.assertEqual(states[-1], (True, True))
        self.assertEqual(
            [e.kind for e in self.daemon.events.recent() if e.kind.startswith("host_")],
            ["host_overloaded", "host_recovered"],
        )
        overloaded = self.daemon.events.recent(kind="host_overloaded")[0]
        self.assertEqual((overloaded.fields["load"], overloaded.fields["high"],
                          overloaded.fields["samples"]), (5.0, 4.0, 2))  # fmt: skip
        recovered = self.daemon.events.recent(kind="host_recovered")[0]
        self.assertEqual((recovered.fields["load"], recovered.fields["low"]), (1.0, 2.0))
        self.assertTrue(self.daemon.host.registered)  # the daemon itself stays

    def test_child_started_while_overloaded_starts_unregistered(self) -> None:
        self.make(guards=GuardConfig(sample_interval=1.0, load_high=4.0, load_samples=1))
        self.loads.extend([9.0] * 5)
        self.settle(1.0)
        self.assertTrue(self.daemon.overloaded)
        uuid = self.successResultOf(self.call("Deploy", {"service": "m:A"}))["uuid"]
        self.assertIn("--unregistered", self.clock.last().args)
        listing = self.successResultOf(self.call("ListSubServices"))["services"][uuid]
        self.assertEqual((listing["registered"], listing["held"]), (False, ["host-load"]))

    def test_statistics_node(self) -> None:
        """
        The daemon's statistics node: the Go keys, and the host, its
        children and recent events beside them.
        """
        self.make()
        uuid = self.successResultOf(self.call("Deploy", {"service": "m:A"}))["uuid"]
        self.settle(1.5)
        stats = self.daemon.host.statistics()
        self.assertEqual(stats["UUID"], self.daemon.uuid)
        self.assertIn("RequestsServed", stats)
        host = stats["Host"]
        self.assertEqual((host["cpu"], host["load"], host["uptime"]), (12.5, [0.5, 0.4, 0.3],
                                                                        1000.0))  # fmt: skip
        self.assertEqual(host["children"][uuid]["rss"], 50 << 20)
        self.assertEqual(host["daemon"]["uuid"], self.daemon.uuid)
        self.assertEqual([e["kind"] for e in stats["Events"]], ["started", "deployed"])
        # The node follows the contract the dashboard reads strictly.
        reading = read_daemon_node(stats)
        self.assertEqual(reading.host.children[0].usage, Usage(cpu=1.0, rss=50 << 20))
        self.assertEqual(reading.host.daemon.usage, Usage(cpu=0.5, rss=10 << 20))
        self.assertEqual([e.kind for e in reading.events], ["started", "deployed"])
        self.assertEqual(self.successResultOf(self.call("HostStats"))["children"][uuid]["cpu"], 1.0)

    def test_cleanup_with_the_registry_down_is_a_warning(self) -> None:
        self.make()
        uuid = self.successResultOf(self.call("Deploy", {"service": "m:A"}))["uuid"]
        self.settle(0.5)
        _, registry, _ = self.children.by_admin[max(self.children.by_admin)]
        registry.crash = lambda: None  # the node outlives the process
        self.daemon.registry.remove = lambda i: Deferred.fromCoroutine(_refused())  # type: ignore[method-assign]
        with capturedLogs() as events:
            self.clock.last().exit(signal=signal.SIGKILL)
            self.settle()
        [warning] = [e for e in events if e.get("uuid") == uuid and e.get("error") is not None]
        self.assertIn("gone", str(warning["error"]))
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertEqual(self.daemon.events.recent(kind="registry_cleanup"), [])
        self.settle(1.0)
        self.assertEqual(len(self.clock.running()), 1)  # restarted all the same

    def test_fire_and_forget_failures_are_logged(self) -> None:
        """
        A coroutine the daemon does not wait for logs its unexpected failure
        with what it was doing (not "Unhandled error in Deferred" at garbage
        collection).
        """
        self.make()

        async def broken() -> None:
            raise RuntimeError("surprise")

        with capturedLogs() as events:
            self.daemon._spawn(broken(), "registering", uuid="u-1")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        [event] = [e for e in events if e.get("what") == "registering"]
        self.assertEqual(event["uuid"], "u-1")

    def test_state_file(self) -> None:
        path = os.path.join(tempfile.mkdtemp(prefix="skynet-state-"), "state.json")
        deployments = [make_deployment("m:A", ["-x"]), make_deployment("m:B", registered=False)]
        save_state(path, DaemonState(uuid="daemon-1", deployments=tuple(deployments)))
        state = load_state(path)
        self.assertEqual(state, DaemonState(uuid="daemon-1", deployments=tuple(deployments)))
        daemon = self.make(deployments=state.deployments, uuid=state.uuid, state_path=path)
        self.assertEqual(len(self.clock.spawned), 2)
        uuid = self.successResultOf(self.call("Deploy", {"service": "m:C"}))["uuid"]
        self.successResultOf(self.call("StopSubService", {"uuid": deployments[0].uuid}))
        again = load_state(path)
        self.assertEqual(again.uuid, daemon.uuid)
        self.assertEqual(daemon.uuid, "daemon-1")
        self.assertEqual([d.uuid for d in again.deployments], [deployments[1].uuid, uuid])
        self.assertEqual(load_state(path + ".missing"), DaemonState())
        with open(path, "w") as f:
            f.write("[1, 2]")
        self.assertRaises(ValueError, load_state, path)


class PolicyTests(SynchronousTestCase):
    """
    The registration policy alone: wish x holds x overload.
    """

    def test_wish_holds_and_overload(self) -> None:
        policy = RegistrationPolicy()
        self.assertTrue(policy.effective("a", True))
        self.assertFalse(policy.effective("a", False))
        self.assertFalse(policy.effective("a", None))  # not deployed
        policy.hold("a", ["memory"])
        policy.hold("a", ["cpu"])
        self.assertFalse(policy.effective("a", True))
        self.assertTrue(policy.effective("b", True))
        self.assertEqual(policy.held("a"), ("cpu", "memory"))
        policy.overloaded = True
        self.assertFalse(policy.effective("b", True))
        self.assertEqual(policy.held("a"), ("cpu", "memory", "host-load"))
        self.assertEqual(policy.release("a"), {"cpu", "memory"})
        self.assertEqual(policy.held("a"), ("host-load",))
        policy.overloaded = False
        self.assertTrue(policy.effective("a", True))
        self.assertEqual(policy.release("a"), set())


class ChildGuardTests(SynchronousTestCase):
    """
    The child guard as a state machine fed samples.
    """

    def test_consecutive_samples_then_restart_then_release(self) -> None:
        guard = ChildGuard(GuardConfig(child_max_rss=100, child_max_cpu=90.0, child_samples=3))
        hog, fine = Usage(cpu=1.0, rss=150), Usage(cpu=1.0, rss=50)
        self.assertIsNone(guard.sample("a", 10, hog, in_registry=True))
        self.assertIsNone(guard.sample("a", 10, fine, in_registry=True))  # the count starts over
        self.assertIsNone(guard.sample("a", 10, hog, in_registry=True))
        self.assertIsNone(guard.sample("a", 10, hog, in_registry=True))
        decision = guard.sample("a", 10, hog, in_registry=True)
        self.assertEqual(decision, Restart(uuid="a", pid=10, usage=hog, reasons=("memory",)))
        self.assertEqual(guard.restarting, {"a": 10})
        # The old process is being restarted: its samples count for nothing.
        self.assertIsNone(guard.sample("a", 10, hog, in_registry=True))
        # The new one is released once healthy and in the registry.
        self.assertIsNone(guard.sample("a", 11, fine, in_registry=False))
        self.assertEqual(guard.sample("a", 11, fine, in_registry=True),
                         Release(uuid="a", pid=11, usage=fine))  # fmt: skip
        self.assertEqual(guard.restarting, {})
        self.assertIsNone(guard.sample("a", 11, fine, in_registry=True))

    def test_both_reasons_and_a_new_process_over_again(self) -> None:
        guard = ChildGuard(GuardConfig(child_max_rss=100, child_max_cpu=90.0, child_samples=1))
        both = Usage(cpu=95.0, rss=150)
        self.assertEqual(guard.sample("a", 1, both, in_registry=True).reasons, ("cpu", "memory"))
        self.assertEqual(guard.sample("a", 2, both, in_registry=True).pid, 2)
        self.assertEqual(guard.restarting, {"a": 2})
        guard.forget("a")
        self.assertEqual(guard.restarting, {})

    def test_off_by_default(self) -> None:
        guard = ChildGuard(GuardConfig(child_samples=1))
        self.assertIsNone(guard.sample("a", 1, Usage(cpu=1e6, rss=1 << 40), in_registry=True))

    def test_a_start_resets_the_count(self) -> None:
        guard = ChildGuard(GuardConfig(child_max_cpu=10.0, child_samples=2))
        guard.sample("a", 1, Usage(cpu=50.0, rss=1), in_registry=True)
        guard.started("a")
        self.assertIsNone(guard.sample("a", 1, Usage(cpu=50.0, rss=1), in_registry=True))


class LoadGuardTests(SynchronousTestCase):
    def test_hysteresis(self) -> None:
        guard = LoadGuard(GuardConfig(load_high=4.0, load_low=2.0, load_samples=2))
        readings = [5.0, 3.0, 5.0, 5.0, 3.0, 1.0, 3.0, 1.0, 1.0, 5.0]
        changes = [guard.sample(r) for r in readings]
        self.assertEqual(changes, [None, None, None, "overloaded", None, None, None, None,
                                   "recovered", None])  # fmt: skip
        self.assertEqual(guard.last, 5.0)
        self.assertEqual(guard.fields()["low"], 2.0)

    def test_off(self) -> None:
        guard = LoadGuard(GuardConfig())
        self.assertFalse(guard.enabled)
        self.assertEqual([guard.sample(99.0) for _ in range(5)], [None] * 5)
        self.assertFalse(guard.overloaded)


class SamplerTests(SynchronousTestCase):
    def test_interfaces(self) -> None:
        from zope.interface.verify import verifyObject

        verifyObject(ISampler, FakeSampler())
        real = PsutilSampler()
        verifyObject(ISampler, real)
        usage = real.usage(os.getpid())
        self.assertGreater(usage.rss, 0)
        self.assertIsNone(real.usage(2**22 + 12345))
        self.assertEqual(real.host().cpus, psutil.cpu_count())


class DeploymentStoreTests(SynchronousTestCase):
    def test_command_lines(self) -> None:
        d = make_deployment("m:A", ["-x"], uuid="u-1")
        self.assertEqual(
            command_line(d, service_command=["twistd"], registry_url="file:///r", registered=False),
            ["twistd", "-n", "--pidfile=", "skynet-service", "--service", "m:A", "--uuid", "u-1",
             "--registry", "file:///r", "--supervised", "--unregistered", "-x"],
        )  # fmt: skip
        plain = make_deployment("/bin/sleep 10", ["20"])
        self.assertEqual(command_line(plain, service_command=["twistd"], registry_url="r",
                                      registered=True), ["/bin/sleep", "10", "20"])  # fmt: skip

    def test_store_and_state_file(self) -> None:
        path = os.path.join(tempfile.mkdtemp(prefix="skynet-state-"), "state.json")
        store = DeploymentStore(path)
        a, b = make_deployment("m:A"), make_deployment("m:B")
        store.add(a)
        store.add(b)
        self.assertRaises(ValueError, store.add, a)
        self.assertTrue(store.set_registered(a.uuid, False))
        self.assertFalse(store.set_registered(a.uuid, False))
        store.remove(b.uuid)
        store.save("daemon-9")
        state = load_state(path)
        self.assertEqual(state.uuid, "daemon-9")
        self.assertEqual(state.deployments, (attr.evolve(a, registered=False),))
        self.assertEqual([d.uuid for d in store], [a.uuid])


class ChildInstancesTests(SynchronousTestCase):
    """
    The daemon's view of its children, on an in-memory registry.
    """

    def setUp(self) -> None:
        self.clock = FakeProcessReactor()
        self.registry = MemoryRegistry(reactor=self.clock)
        self.pids = {"u-1": 100}
        self.new: list[Instance] = []
        self.view = ChildInstances(
            self.registry,
            lambda i: i.uuid in self.pids and i.pid in (None, self.pids[i.uuid]),
            self.new.append,
        )
        self.successResultOf(self.registry.start())
        self.view.startService()

    def node(self, uuid: str = "u-1", pid: int = 100, port: int = 1, **kw: Any) -> Instance:
        return Instance(uuid=uuid, name="S", version="1", region="r", host="10.0.0.1",
                        port=port, pid=pid, **kw)  # fmt: skip

    def test_follows_its_children_only(self) -> None:
        mine = self.node()
        self.registry.add(mine)
        self.registry.add(self.node("stranger", pid=5, port=2))
        self.registry.add(self.node(pid=99, port=3))  # an old process of it
        self.clock.advance(0)
        self.assertEqual(self.view.get("u-1"), mine)
        self.assertIsNone(self.view.get("stranger"))
        self.assertEqual(self.new, [mine])
        self.registry.update(attr.evolve(mine, registered=False))
        self.clock.advance(0)
        self.assertFalse(self.view.get("u-1").registered)
        self.assertEqual(len(self.new), 1)  # the same process
        self.assertEqual(self.view.live("u-1", 100), self.view.get("u-1"))
        self.assertIsNone(self.view.live("u-1", 101))
        self.assertIsNone(self.view.live("u-1", None))

    def test_a_dead_child_is_removed_by_its_node_without_a_query(self) -> None:
        mine = self.node()
        self.registry.add(mine)
        self.clock.advance(0)
        queries: list[Any] = []
        original = self.registry.query
        self.registry.query = lambda q: queries.append(q) or original(q)  # type: ignore[method-assign]
        removed = self.successResultOf(Deferred.fromCoroutine(self.view.remove_dead("u-1", 100)))
        self.assertEqual(removed, mine)
        self.assertEqual(queries, [])
        self.assertEqual(self.successResultOf(original(Query(uuid="u-1"))), [])
        # Nothing known: nothing to do.
        self.assertIsNone(
            self.successResultOf(Deferred.fromCoroutine(self.view.remove_dead("u-1", 100)))
        )

    def test_stop_ends_the_watch(self) -> None:
        self.view.stopService()
        self.registry.add(self.node())
        self.clock.advance(0)
        self.assertIsNone(self.view.get("u-1"))


class DaemonLifecycleTests(SynchronousTestCase):
    """
    The daemon's children start in order and stop in reverse; a registry
    that is down at start is retried while the children run.
    """

    def test_registry_down_at_start_then_ordered_stop(self) -> None:
        clock = FakeProcessReactor()
        cluster = LocalCluster(reactor=clock)
        registry = MemoryRegistry(reactor=clock, store=cluster.registry.store)
        attempts: list[float] = []
        real_start = registry.start

        def flaky_start() -> Deferred:
            attempts.append(clock.seconds())
            if len(attempts) < 3:
                return Deferred.fromCoroutine(_refused())
            return real_start()

        registry.start = flaky_start  # type: ignore[method-assign]
        order: list[str] = []
        real_stop = registry.stop
        registry.stop = lambda: order.append("registry") or real_stop()  # type: ignore[method-assign]
        daemon = Daemon(registry, [MemoryServerEndpoint(cluster)], reactor=clock,
                        registry_url="file:///fake", sampler=FakeSampler(),
                        deployments=[make_deployment("m:A")], service_command=["twistd"],
                        own_session=False, admin=lambda *a: succeed(None))  # fmt: skip
        self.assertEqual([s.name for s in daemon],
                         ["registry", "children", "supervisor", "host", "guards"])  # fmt: skip
        with capturedLogs() as events:
            self.assertIsNone(daemon.startService())
            self.assertEqual(len(clock.spawned), 1)  # children start without the registry
            self.assertFalse(daemon.host.running)
            clock.advance(0.5)
            self.assertFalse(daemon.host.running)
            clock.advance(1.0)
        self.assertEqual(attempts, [0.0, 0.5, 1.5])
        self.assertTrue(daemon.host.running)
        self.assertTrue(daemon.sampling.running)
        warnings = [e for e in events if e.get("what", "").startswith("start the registry")]
        self.assertEqual(len(warnings), 2)
        self.assertEqual(self.flushLoggedErrors(), [])
        for name, part in [("host", daemon.host), ("supervisor", daemon.supervisor),
                           ("children", daemon.children)]:  # fmt: skip
            original = part.stopService
            part.stopService = (lambda n, o: lambda: order.append(n) or o())(name, original)  # type: ignore[method-assign]
        stopped = daemon.stopService()
        for _ in range(100):
            clock.advance(0.1)
        self.successResultOf(stopped)
        self.assertEqual(order, ["host", "supervisor", "children", "registry"])
        self.assertFalse(daemon.sampling.running)
        self.successResultOf(cluster.stop())
        self.assertEqual(clock.getDelayedCalls(), [])


class ImportTests(SynchronousTestCase):
    def test_importing_the_daemon_is_cheap(self) -> None:
        """
        C{import skynet.daemon} loads none of its parts nor Twisted's
        process machinery; a name is imported from its part on first use.
        """
        code = (
            "import sys, skynet.daemon as d\n"
            "print(sorted(m for m in sys.modules if m.startswith(('skynet.daemon.', "
            "'twisted.runner', 'twisted.internet.process', 'psutil'))))\n"
            "d.GuardConfig\n"
            "print('skynet.daemon.guards' in sys.modules, 'skynet.daemon.service' in sys.modules)\n"
        )
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                cwd=ROOT, check=True)  # fmt: skip
        self.assertEqual(result.stdout.splitlines(), ["[]", "True False"])


class DeploymentFileTests(SynchronousTestCase):
    def write(self, text: str) -> str:
        path = os.path.join(tempfile.mkdtemp(prefix="skynet-deploy-"), "deploy")
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_parse(self) -> None:
        path = self.write(
            "# the examples\n"
            "examples.fibonacci:Fibonacci\n"
            "\n"
            "examples.fibonacci:Fibonacci   # a second one\n"
            "examples.tutorial:TutorialService --region 'Far Away' --unregistered\n"
            "/usr/bin/env python3 -m http.server\n"
        )
        first = parse_deploy_file(path)
        self.assertEqual([(d.service, d.args, d.registered) for d in first], [
            ("examples.fibonacci:Fibonacci", (), True),
            ("examples.fibonacci:Fibonacci", (), True),
            ("examples.tutorial:TutorialService", ("--region", "Far Away"), False),
            ("/usr/bin/env python3 -m http.server", (), True),
        ])  # fmt: skip
        self.assertEqual(len({d.uuid for d in first}), 4)
        self.assertEqual(first, parse_deploy_file(path))  # the same uuids every time

    def test_bad_line(self) -> None:
        path = self.write("examples.fibonacci:Fibonacci\nexamples.x:Y 'unclosed\n")
        with self.assertRaises(ValueError) as e:
            parse_deploy_file(path)
        self.assertIn(f"{path}:2:", str(e.exception))

    def test_deployment_records(self) -> None:
        d = make_deployment("a.b:C", "--x 'y z'")
        self.assertEqual((d.args, d.is_class, d.label), (("--x", "y z"), True, "C"))
        self.assertEqual(Deployment.from_bson(d.to_bson()), d)
        self.assertEqual(make_deployment("/bin/sleep 10").label, "sleep")

    def test_load_readings(self) -> None:
        path = self.write(" 3.5\n")
        self.assertEqual(load_reading(f"file:{path}")(), 3.5)
        self.assertIsInstance(load_reading("loadavg")(), float)
        self.assertRaises(ValueError, load_reading, "sometimes")


class OptionsTests(SynchronousTestCase):
    def parse(self, *args: str) -> Options:
        options = Options()
        home = tempfile.mkdtemp(prefix="skynet-home-")
        base = ["--registry", f"file://{home}/registry", "--log-dir", f"{home}/logs"]
        options.parseOptions(base + list(args))
        return options

    def test_defaults(self) -> None:
        options = self.parse()
        self.assertEqual(options.guards, GuardConfig())
        self.assertEqual(options.deployments, [])
        self.assertIsNone(options.daemon_uuid)

    def test_guard_options(self) -> None:
        options = self.parse("--child-max-rss", "150", "--child-max-cpu", "80",
                             "--child-samples", "2", "--load-high", "4", "--load-samples", "5",
                             "--sample-interval", "0.5")  # fmt: skip
        self.assertEqual(options.guards, GuardConfig(
            sample_interval=0.5, child_max_cpu=80.0, child_max_rss=150 << 20, child_samples=2,
            load_high=4.0, load_low=None, load_samples=5))  # fmt: skip
        self.assertEqual(options.guards.load_low_mark, 2.0)

    def test_zk_session_timeout_reaches_the_children(self) -> None:
        options = Options()
        options.parseOptions(["--registry", "zk://127.0.0.1:1/skynet", "--zk-session-timeout",
                              "3", "--log-dir", tempfile.mkdtemp()])  # fmt: skip
        self.assertEqual(options.registry.session_timeout, 3.0)
        self.assertEqual(options.registry_url, "zk://127.0.0.1:1/skynet?session_timeout=3")
        with self.assertRaises(UsageError):
            options = Options()
            options.parseOptions(["--registry", "zk://127.0.0.1:1/skynet",
                                  "--zk-session-timeout", "never"])  # fmt: skip

    def test_bad_options(self) -> None:
        directory = tempfile.mkdtemp(prefix="skynet-bad-")
        for args, message in [
            (["--load-high", "1", "--load-low", "5"], "low-water mark"),
            (["--load-low", "1"], "--load-low needs --load-high"),
            (["--child-samples", "0"], "--child-samples must be at least 1"),
            (["--sample-interval", "0"], "--sample-interval must be positive"),
            (["--child-max-rss", "lots"], "--child-max-rss must be a number"),
            (["--load-source", "weather"], "unknown load source"),
            (["--registry", "memory://x"], "memory://"),
            (["--registry", "bogus://x"], "unsupported registry URL"),
            (["--state", "/no/such/dir/state.json"], "no directory"),
            (["--deploy", f"{directory}/missing"], "--deploy"),
            (["--listen", "nonsense:1:2"], "bad endpoint"),
        ]:  # fmt: skip
            with self.assertRaises(usage.UsageError) as e:
                self.parse(*args)
            self.assertIn(message, str(e.exception), args)


class ExtraStatisticsTests(SynchronousTestCase):
    """
    The general hook: C{Service.extra_statistics} is merged into the
    statistics node, beside (never over) the Go keys.
    """

    def test_merged_beside_go_keys(self) -> None:
        class Rich(Service):
            def extra_statistics(self) -> dict[str, Any]:
                return {"Host": {"cpu": 1}, "Clients": "not replaced"}

        cluster = LocalCluster()
        host = cluster.add(Rich())
        stats = host.statistics()
        self.assertEqual(stats["Host"], {"cpu": 1})
        self.assertEqual(stats["Clients"], 0)
        self.assertNotIn("extra_statistics", host.methods)
        self.successResultOf(cluster.stop())

    def test_failure_is_logged_not_fatal(self) -> None:
        class Broken(Service):
            def extra_statistics(self) -> dict[str, Any]:
                raise RuntimeError("no")

        cluster = LocalCluster()
        host = cluster.add(Broken())
        with capturedLogs() as events:
            stats = host.statistics()
        self.assertIn("RequestsServed", stats)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertTrue(any("extra statistics" in e.get("log_format", "") for e in events))
        self.successResultOf(cluster.stop())


# Real processes


SERVICE_ARGS = ["--listen", "tcp:0:interface=127.0.0.1", "--stats-interval", "0.5"]


@implementer(IInstanceListener)
class RegistryRecorder:
    """
    Every registry event for the watched instances, in order, as
    C{(uuid, pid, registered)}; C{registered} is None on removal.
    """

    def __init__(self) -> None:
        self.log: list[tuple[str, int | None, bool | None]] = []

    def snapshot(self, instances: list[Instance]) -> None:
        for instance in instances:
            self.added(instance)

    def added(self, instance: Instance) -> None:
        self.log.append((instance.uuid, instance.pid, instance.registered))

    updated = added

    def removed(self, instance: Instance) -> None:
        self.log.append((instance.uuid, instance.pid, None))

    def of(self, uuid: str) -> list[tuple[int | None, bool | None]]:
        states = [(pid, registered) for u, pid, registered in self.log if u == uuid]
        return [s for i, s in enumerate(states) if i == 0 or s != states[i - 1]]


def gone(pid: int) -> bool:
    """
    Whether process C{pid} has ended (a zombie nobody reaps counts).
    """
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


class DaemonProcess:
    """
    One C{twistd -n skynet-daemon} on a registry of its own temp dir.
    """

    def __init__(self, root: str, *args: str, registry: str | None = None) -> None:
        self.root = root
        self.args = list(args)
        self.registry = registry or f"file://{root}/registry"
        self.popen: subprocess.Popen | None = None
        self.log_path = os.path.join(root, "daemon.log")

    def start(self) -> "DaemonProcess":
        command = [
            twistd(), "-n", "--pidfile=", "skynet-daemon",
            "--registry", self.registry,
            "--listen", "tcp:0:interface=127.0.0.1",
            "--log-dir", os.path.join(self.root, "logs"),
            "--stats-interval", "0.5", "--stop-grace", "5", "--kill-time", "2",
        ] + self.args  # fmt: skip
        self.log = open(self.log_path, "ab")
        self.popen = subprocess.Popen(command, cwd=ROOT, env=child_env(SKYNET_HOME=self.root),
                                      stdin=subprocess.DEVNULL, stdout=self.log,
                                      stderr=subprocess.STDOUT)  # fmt: skip
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def output(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def stop(self) -> None:
        if self.popen is None:
            return
        terminate(self.popen, grace=30)
        self.log.close()


def kill_strays(root: str) -> None:
    """
    Kill, by pid, any process still running whose command line names this
    test's temp dir (children of a daemon the test killed): nothing else.
    """
    for process in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmdline = " ".join(process.info["cmdline"] or [])
            if root in cmdline and process.pid != os.getpid():
                process.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass


class _DaemonHarness(TestCase):
    """
    Helpers for tests of C{twistd -n skynet-daemon} with real children,
    reached through discovery.
    """

    pytestmark = [pytest.mark.slow]
    timeout = 120

    async def start_daemon(self, *args: str, root: str | None = None,
                           registry: str | None = None) -> DaemonProcess:  # fmt: skip
        if root is None:
            root = tempfile.mkdtemp(prefix="skynet-daemon-")
            self.addCleanup(kill_strays, root)
            self.root = root
            self.registry = FileRegistry(os.path.join(root, "registry"), reactor=reactor)
            await self.registry.start()
            self.addCleanup(self.registry.stop)
            self.client = Client(registry=self.registry, reactor=reactor)
            self.addCleanup(self.client.stop)
        daemon = DaemonProcess(root, *args, registry=registry).start()
        self.addCleanup(daemon.stop)
        self.daemon = daemon

        async def up() -> bool:
            found = await self.registry.query(Query(service="SkynetDaemon", registered=True))
            return any(i.pid == daemon.pid for i in found)

        await wait_for(up, timeout=30, what="SkynetDaemon registered")
        return daemon

    def call(self, method: str, params: dict | None = None) -> Deferred:
        return self.client.service("SkynetDaemon").call(method, params or {})

    async def deploy(self, service: str, *args: str, registered: bool = True) -> str:
        result = await self.call("Deploy", {"service": service, "args": SERVICE_ARGS + list(args),
                                            "registered": registered})  # fmt: skip
        return result["uuid"]

    async def listing(self) -> dict[str, Any]:
        return (await self.call("ListSubServices"))["services"]

    async def registered(self, uuids: list[str], registered: bool = True) -> list[Instance]:
        """
        Wait until each of C{uuids} is in the registry (registered or not,
        as asked) under its current pid; return the instances.
        """
        listing = await self.listing()

        async def check() -> Any:
            found = {i.uuid: i for i in await self.registry.query(Query())}
            ok = all(u in found and found[u].registered == registered
                     and found[u].pid == listing[u]["pid"] for u in uuids)  # fmt: skip
            return [found[u] for u in uuids] if ok else None

        return await wait_for(check, timeout=30, what=f"{uuids} registered={registered}")

    def logs(self) -> str:
        return self.daemon.output()[-6000:]

    async def _registered_with_new_pid(self, uuid: str, old_pid: int) -> Any:
        found = await self.registry.query(Query(uuid=uuid, registered=True))
        return found if found and found[0].pid != old_pid else None


class DaemonProcessTests(_DaemonHarness):
    """
    The daemon on the embedded registry.
    """

    async def test_deploy_call_kill_and_operate(self) -> None:
        """
        Two Fibonacci and a Sleeper deployed through the daemon's RPC and
        called through discovery; C{kill -9} of one Fibonacci while calls
        run: zero failed calls, restarted, back in the registry; then the
        operator's methods.
        """
        await self.start_daemon()
        fibs = [await self.deploy("examples.fibonacci:Fibonacci") for _ in range(2)]
        sleeper = await self.deploy("examples.sleeper:Sleeper")
        instances = await self.registered(fibs + [sleeper])
        self.assertEqual([i.name for i in instances], ["Fibonacci", "Fibonacci", "Sleeper"])
        fib = self.client.service("Fibonacci")
        self.assertEqual(await fib.call("Index", {"index": 30}), {"index": 30, "value": 832040})
        reply = await self.client.service("Sleeper").call("Sleep", {"message": "zzz"})
        self.assertEqual(reply, {"message": "zzz"})
        listing = await self.listing()
        self.assertEqual(sorted(listing), sorted(fibs + [sleeper]))
        self.assertTrue(all(s["running"] and s["restarts"] == 0 for s in listing.values()))
        self.assertTrue(os.path.exists(listing[sleeper]["log"]))

        # kill -9 of a child while calls run.
        callers, results = fibonacci_load(fib, seconds=4.0, indexes=60)
        await sleep(1.0)
        victim, old_pid = fibs[0], listing[fibs[0]]["pid"]
        killed_at = time.monotonic()
        os.kill(old_pid, signal.SIGKILL)

        async def noticed() -> Any:
            entry = (await self.listing())[victim]
            return entry if entry["last_exit"] and entry["last_exit"]["pid"] == old_pid else None

        entry = await wait_for(noticed, timeout=10, what="the daemon noticed the kill")
        detected = time.monotonic() - killed_at
        self.assertEqual(entry["last_exit"]["signal"], signal.SIGKILL)
        self.assertEqual(entry["last_exit"]["signal_name"], "SIGKILL")

        async def back() -> Any:
            found = await self.registry.query(Query(uuid=victim, registered=True))
            return found if found and found[0].pid != old_pid else None

        [again] = await wait_for(back, timeout=15, what="restarted and registered")
        back_after = time.monotonic() - killed_at
        await callers
        self.assertEqual(results["failed"], [], self.logs())
        self.assertGreater(results["ok"], 50)
        entry = (await self.listing())[victim]
        self.assertEqual((entry["restarts"], entry["pid"], entry["running"]),
                         (1, again.pid, True))  # fmt: skip
        self.assertTrue(gone(old_pid))
        print(
            f"\nkill -9 of a child: the daemon knew in {detected:.2f}s; back in the registry "
            f"(new pid, same uuid) after {back_after:.2f}s; {results['ok']} calls, 0 failed"
        )

        # Unknown uuid: a clear error.
        with self.assertRaises(ServiceError) as e:
            await self.call("RestartSubService", {"uuid": "no-such-uuid"})
        self.assertEqual(str(e.exception), "no sub-service with uuid no-such-uuid on this host")

        # Unregister and register through the child's admin listener.
        await self.call("UnregisterSubService", {"uuid": sleeper})
        await self.registered([sleeper], registered=False)
        await self.call("RegisterSubService", {"uuid": sleeper})
        await self.registered([sleeper])

        # Restart: new process, same uuid, no back-off.
        sleeper_pid = (await self.listing())[sleeper]["pid"]
        restarted_at = time.monotonic()
        self.assertEqual(await self.call("RestartSubService", {"uuid": sleeper}),
                         {"ok": True, "uuid": sleeper})  # fmt: skip
        [instance] = await wait_for(
            lambda: self._registered_with_new_pid(sleeper, sleeper_pid), what="restarted sleeper"
        )
        restart_took = time.monotonic() - restarted_at
        self.assertTrue(gone(sleeper_pid))
        self.assertEqual(instance.uuid, sleeper)
        self.assertEqual((await self.listing())[sleeper]["last_exit"]["code"], 0)  # Admin.Stop
        print(f"RestartSubService: back in the registry after {restart_took:.2f}s")

        # Stop: gone from the list, the process and the registry.
        second_pid = (await self.listing())[fibs[1]]["pid"]
        self.assertEqual(await self.call("StopSubService", {"uuid": fibs[1]}),
                         {"ok": True, "uuid": fibs[1]})  # fmt: skip
        self.assertNotIn(fibs[1], await self.listing())
        await wait_for(lambda: gone(second_pid), timeout=15, what="stopped child exits")
        self.assertEqual(await self.registry.query(Query(uuid=fibs[1])), [])

        # Host statistics, by RPC and in the daemon's statistics node.
        stats = await self.call("HostStats")
        self.assertTrue({"cpu", "memory", "load", "uptime", "children"} <= set(stats))
        self.assertEqual(stats["cpus"], psutil.cpu_count())
        self.assertTrue(all(c["running"] for c in stats["children"].values()))
        # The daemon's own process, without its children.
        own = psutil.Process(stats["daemon"]["pid"]).memory_info().rss
        self.assertGreater(stats["daemon"]["rss"], own // 2)
        self.assertLess(stats["daemon"]["rss"], own * 2)
        self.assertGreaterEqual(stats["daemon"]["cpu"], 0.0)

        async def measured() -> Any:
            children = (await self.call("HostStats"))["children"]
            return children if children[sleeper]["rss"] else None

        self.assertGreater((await wait_for(measured))[sleeper]["rss"], 10 << 20)
        [daemon_instance] = await self.registry.query(Query(service="SkynetDaemon"))

        async def published() -> Any:
            node = await self.registry.get_stats(daemon_instance)
            return node if node and "Host" in node else None

        node = await wait_for(published, timeout=10, what="host statistics published")
        self.assertIn("RequestsServed", node)
        self.assertIn(victim, node["Host"]["children"])
        self.assertIn("exited", [e["kind"] for e in node["Events"]])

    async def test_crash_at_start_backs_off(self) -> None:
        """
        A child that dies at start-up restarts after 1, 2, 4 ... s, and
        C{ListSubServices} shows it.
        """
        await self.start_daemon()
        uuid = await self.deploy("examples.no_such_module:Nothing")
        began = time.monotonic()
        delays: dict[float, float] = {}
        while True:
            entry = (await self.listing())[uuid]
            last = entry["last_exit"]
            if last is not None and entry["next_restart"] is not None:
                delays[last["time"]] = entry["next_restart"] - last["time"]
            if entry["restarts"] >= 3:
                break
            self.assertLess(time.monotonic() - began, 30, self.logs())
            await sleep(0.1)
        took = time.monotonic() - began
        self.assertEqual(last["code"], 1)
        self.assertIsNone(last["signal"])
        self.assertEqual([round(d, 3) for _, d in sorted(delays.items())][:3], [1.0, 2.0, 4.0])
        # Three restarts cannot come before 1 + 2 + 4 s; start-ups add a little.
        self.assertGreaterEqual(took, 7.0)
        self.assertLess(took, 30.0)
        print(f"\ncrash loop: 3 restarts after {took:.2f}s (waits 1+2+4 s plus start-ups)")
        self.assertIn("No module named 'examples.no_such_module'", open(entry["log"]).read())
        # It is never abandoned: a 4th start follows.
        await wait_for(lambda: self._restarts(uuid, 4), timeout=15, what="restart 4")

    async def _restarts(self, uuid: str, n: int) -> bool:
        return (await self.listing())[uuid]["restarts"] >= n

    async def test_memory_guard(self) -> None:
        """
        A child whose memory grows past its threshold: unregistered, then
        restarted, then registered.
        """
        await self.start_daemon("--child-max-rss", "150", "--child-samples", "2",
                                "--sample-interval", "0.5")  # fmt: skip
        uuid = await self.deploy("examples.memhog:MemoryHog")
        [first] = await self.registered([uuid])
        recorder = RegistryRecorder()
        watch = self.registry.watch(Query(uuid=uuid), recorder)
        self.addCleanup(watch.stop)
        reply = await self.client.service("MemoryHog").call("Allocate", {"megabytes": 200})
        self.assertGreater(reply["rss"], 200 << 20)
        [second] = await wait_for(lambda: self._registered_with_new_pid(uuid, first.pid),
                                  timeout=30, what="restarted and registered")  # fmt: skip
        # The old process was unregistered before it was asked to stop (the
        # registry's watch may coalesce that with its removal: its log says).
        with open((await self.listing())[uuid]["log"], errors="replace") as f:
            log = f.read()
        unregistered = log.index(f"MemoryHog instance {uuid} unregistered")
        self.assertLess(unregistered, log.index("MemoryHog asked to stop (wait for clients: True)"))
        # The new one started unregistered, and was registered once healthy.
        states = recorder.of(uuid)
        self.assertEqual(states[0], (first.pid, True))
        new = [registered for pid, registered in states if pid == second.pid]
        self.assertEqual(new, [False, True])
        entry = (await self.listing())[uuid]
        self.assertEqual((entry["restarts"], entry["registered"], entry["held"]), (1, True, []))
        self.assertEqual(entry["last_exit"]["code"], 0)  # stopped through Admin.Stop
        [daemon_instance] = await self.registry.query(Query(service="SkynetDaemon"))

        async def guard_events() -> Any:
            node = await self.registry.get_stats(daemon_instance) or {}
            events = [e for e in node.get("Events", []) if e["kind"].startswith("guard_")]
            return events if len(events) == 3 else None

        events = await wait_for(guard_events, timeout=10, what="guard events published")
        self.assertEqual([e["kind"] for e in events],
                         ["guard_unregister", "guard_restart", "guard_register"])  # fmt: skip
        self.assertGreater(events[0]["rss"], 150 << 20)
        self.assertEqual(events[0]["max_rss"], 150 << 20)
        self.assertLess(events[2]["rss"], 150 << 20)

    async def test_host_load_guard(self) -> None:
        """
        The host guard driven by a load reading from a file: unregistered
        above the high-water mark, registered again below the low one,
        no flapping between.
        """
        root = tempfile.mkdtemp(prefix="skynet-daemon-")
        self.addCleanup(kill_strays, root)
        load = os.path.join(root, "load")
        self._write(load, 1)
        self.registry = FileRegistry(os.path.join(root, "registry"), reactor=reactor)
        await self.registry.start()
        self.addCleanup(self.registry.stop)
        self.client = Client(registry=self.registry, reactor=reactor)
        self.addCleanup(self.client.stop)
        await self.start_daemon(f"--load-source=file:{load}", "--load-high", "5", "--load-low", "2",
                                "--load-samples", "2", "--sample-interval", "0.3",
                                root=root)  # fmt: skip
        uuids = [await self.deploy("examples.testservice:TestService") for _ in range(2)]
        await self.registered(uuids)
        recorder = RegistryRecorder()
        watch = self.registry.watch(Query(service="TestService"), recorder)
        self.addCleanup(watch.stop)
        self._write(load, 9)
        await self.registered(uuids, registered=False)
        self._write(load, 3)  # between the marks: nothing changes
        await sleep(2.0)
        await self.registered(uuids, registered=False)
        late = await self.deploy("examples.testservice:TestService")  # starts unregistered
        await self.registered([late], registered=False)
        self._write(load, 1)
        await self.registered(uuids + [late])
        self._write(load, 3)
        await sleep(2.0)
        for uuid in uuids:
            self.assertEqual([r for _, r in recorder.of(uuid)], [True, False, True])
        self.assertEqual([r for _, r in recorder.of(late)], [False, True])
        stats = await self.call("HostStats")
        self.assertEqual(stats["load_guard"]["reading"], 3.0)
        self.assertFalse(stats["load_guard"]["overloaded"])
        [daemon_instance] = await self.registry.query(Query(service="SkynetDaemon"))
        self.assertTrue(daemon_instance.registered)

    @staticmethod
    def _write(path: str, value: float) -> None:
        with open(path + ".tmp", "w") as f:
            f.write(f"{value}\n")
        os.replace(path + ".tmp", path)

    async def test_kill_9_daemon_then_restart_with_state(self) -> None:
        """
        C{kill -9} of the daemon: its children end within 5 s.  Started
        again with the same C{--state} (and C{--deploy}): the same services,
        the same uuids, new processes.
        """
        root = tempfile.mkdtemp(prefix="skynet-daemon-")
        state = os.path.join(root, "state.json")
        deploy_file = os.path.join(root, "deploy")
        with open(deploy_file, "w") as f:
            f.write("examples.tutorial:TutorialService --listen tcp:0:interface=127.0.0.1\n")
        args = ("--state", state, "--deploy", deploy_file)
        self.addCleanup(kill_strays, root)
        self.registry = FileRegistry(os.path.join(root, "registry"), reactor=reactor)
        await self.registry.start()
        self.addCleanup(self.registry.stop)
        self.client = Client(registry=self.registry, reactor=reactor)
        self.addCleanup(self.client.stop)
        first = await self.start_daemon(*args, root=root)
        deployed = [await self.deploy("examples.testservice:TestService"),
                    await self.deploy("examples.sleeper:Sleeper", registered=False)]  # fmt: skip
        listing = await self.listing()
        self.assertEqual(len(listing), 3)
        [from_file] = [u for u in listing if u not in deployed]
        await self.registered(deployed[:1] + [from_file])
        await self.registered(deployed[1:], registered=False)
        pids = [s["pid"] for s in listing.values()]

        first.popen.kill()
        killed_at = time.monotonic()
        await deferToThread(first.popen.wait, 10)
        await wait_for(lambda: all(gone(p) for p in pids), timeout=10, what="children exit")
        children_gone = time.monotonic() - killed_at
        self.assertLess(children_gone, 5.0)
        print(f"\nkill -9 of the daemon: its children exited within {children_gone:.2f}s")
        await wait_for(lambda: self._none_left(), timeout=10, what="registry emptied")

        await self.start_daemon(*args, root=root)
        again = await self.listing()
        self.assertEqual(sorted(again), sorted(listing))
        for uuid in again:
            self.assertEqual(again[uuid]["service"], listing[uuid]["service"])
            self.assertEqual(again[uuid]["args"], listing[uuid]["args"])
        instances = await self.registered(deployed[:1] + [from_file])
        self.assertTrue(all(i.pid not in pids for i in instances))
        await self.registered(deployed[1:], registered=False)
        reply = await self.client.service("TestService").call("Upcase", {"data": "back"})
        self.assertEqual(reply, {"data": "BACK"})

    async def _none_left(self) -> bool:
        found = await self.registry.query(Query())
        return not [i for i in found if i.name != "SkynetDaemon"]


class ZooKeeperDaemonTests(_DaemonHarness):
    """
    On ZooKeeper, a killed child's ephemeral nodes would outlive it until
    its session expires: the daemon deletes them at once.
    """

    async def test_dead_child_nodes_deleted_at_once(self) -> None:
        from tests.zkserver import ZooKeeperCluster, ZooKeeperMissing

        try:
            cluster = ZooKeeperCluster(1)
        except ZooKeeperMissing as e:
            raise SkipTest(str(e)) from None
        self.addCleanup(cluster.close)
        await deferToThread(cluster.start)
        url = cluster.url("/daemon-test", session_timeout=8)
        root = tempfile.mkdtemp(prefix="skynet-daemon-")
        self.addCleanup(kill_strays, root)
        self.registry = registry_from_url(url, reactor=reactor)
        await self.registry.start()
        self.addCleanup(self.registry.stop)
        self.client = Client(registry=self.registry, reactor=reactor)
        self.addCleanup(self.client.stop)
        await self.start_daemon(root=root, registry=url)
        uuid = await self.deploy("examples.testservice:TestService")
        [instance] = await self.registered([uuid])
        os.kill(instance.pid, signal.SIGKILL)
        killed_at = time.monotonic()

        async def old_node_gone() -> bool:
            found = await self.registry.query(Query(uuid=uuid))
            return all(i.pid != instance.pid for i in found)

        await wait_for(old_node_gone, timeout=10, what="the dead child's node deleted")
        took = time.monotonic() - killed_at
        self.assertLess(took, 4.0)  # its session (8 s) has not expired
        print(f"\nZooKeeper: a kill -9'd child's node was deleted after {took:.2f}s")
        [again] = await wait_for(lambda: self._registered_with_new_pid(uuid, instance.pid),
                                 timeout=30, what="restarted")  # fmt: skip
        self.assertEqual(again.uuid, uuid)


class CommandLineTests(TestCase):
    pytestmark = [pytest.mark.slow]
    timeout = 60

    async def test_help_lists_the_daemon(self) -> None:
        result = await deferToThread(subprocess.run, [twistd(), "--help"], cwd=ROOT,
                                     capture_output=True, text=True, timeout=30)  # fmt: skip
        self.assertIn("skynet-daemon", result.stdout)

    async def test_bad_options_are_usage_errors(self) -> None:
        home = tempfile.mkdtemp(prefix="skynet-home-")
        cases = [
            (["--load-high", "1", "--load-low", "5"], "low-water mark"),
            (["--registry", "bogus://nowhere"], "unsupported registry URL"),
            (["--child-samples", "0"], "--child-samples must be at least 1"),
            (["--deploy", os.path.join(home, "missing")], "--deploy"),
            (["--no-such-option"], "no-such-option"),
        ]

        def run(args: list[str]) -> subprocess.CompletedProcess:
            return subprocess.run(
                [twistd(), "-n", "--pidfile=", "skynet-daemon", *args], cwd=ROOT,
                env=child_env(SKYNET_HOME=home), capture_output=True, text=True, timeout=30,
            )  # fmt: skip

        results = await DeferredList([deferToThread(run, args) for args, _ in cases])
        for (args, message), (_, result) in zip(cases, results, strict=True):
            output = result.stdout + result.stderr
            self.assertNotEqual(result.returncode, 0, args)
            self.assertIn(message, output, args)
            self.assertNotIn("Traceback", output, args)
