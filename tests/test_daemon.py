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
from unittest import mock

import attr
import psutil
import pytest
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.logger import capturedLogs
from twisted.python import usage
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase, TestCase
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
    ProbeConfig,
    ProbeGuard,
    PsutilSampler,
    RegistrationPolicy,
    Release,
    Restart,
    Unresponsive,
    Usage,
    command_line,
    load_reading,
    load_state,
    make_deployment,
    parse_deploy_file,
    save_state,
)
from skynet.daemon.status import deployment_state
from skynet.daemon_tap import Options
from skynet.errors import RemoteCallError, ServiceError
from skynet.reactor_lag import ReactorLag
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
    missing_here,
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
        self.pings: list[str] = []
        self.hung: set[int] = set()  # pids whose admin listener never answers
        self.closed: set[int] = set()  # pids draining after Admin.Stop: listeners closed
        self.drain_time = 0.2
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
        uuid = args[args.index("--uuid") + 1] if "--uuid" in args else process.env["SKYNET_UUID"]
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
                current = self.current(instance)
                if current is not None:
                    return current
        return None

    def current(self, instance: Instance) -> Instance | None:
        node = self.store.nodes.get(instance.path)
        return node.value if node is not None else None

    def admin(self, address: Address, method: str, params: dict) -> Deferred:
        process, registry, instance = self.by_admin[address.port]
        if method == "Admin.Ping":
            self.pings.append(instance.uuid)
        else:
            self.calls.append((instance.uuid, method))
        if process.ended:
            return Deferred.fromCoroutine(_refused())
        if process.pid in self.hung:
            return Deferred()  # (SIGSTOP'd: no answer, ever)
        if process.pid in self.closed:
            return Deferred.fromCoroutine(_refused())
        if method == "Admin.Ping":
            return Deferred.fromCoroutine(_no_such_method())
        if method in ("Admin.Register", "Admin.Unregister"):
            registry.update(attr.evolve(instance, registered=method == "Admin.Register"))
        elif method == "Admin.Stop":
            registry.update(attr.evolve(instance, registered=False))
            self.closed.add(process.pid)

            def stop() -> None:
                registry.remove(instance)
                if not process.ended:
                    process.exit(0)

            self.reactor.callLater(self.drain_time, stop)
        return succeed(None)


async def _refused() -> None:
    raise ConnectionRefusedError("gone")


async def _no_such_method() -> None:
    # What a service of today answers an Admin.Ping.
    raise RemoteCallError("rpc: can't find method Admin.Ping")


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
        kwargs.setdefault("probes", ProbeConfig(interval=0))
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
        # (Deploy answers once the fake child is in the registry: 0.1 s.)
        self.settle(0.3 if method == "Deploy" else 0.0)
        return d

    def deployed_env(self, guards: GuardConfig, environ: dict[str, str]) -> dict[str, str]:
        with mock.patch.dict(os.environ, environ):
            self.make(guards=guards)
            self.successResultOf(self.call("Deploy", {"service": "examples.fibonacci:Fibonacci"}))
        return self.clock.last().env  # type: ignore[no-any-return]

    def test_children_under_a_cpu_guard_do_not_busy_poll(self) -> None:
        """
        Busy polling reads as CPU use and load, so with C{--child-max-cpu} or
        C{--load-high} the children get C{SKYNET_BUSY_POLL=0}.
        """
        env = self.deployed_env(GuardConfig(sample_interval=1.0, child_max_cpu=80.0), {})
        self.assertEqual(env["SKYNET_BUSY_POLL"], "0")

    def test_children_under_a_load_guard_do_not_busy_poll(self) -> None:
        env = self.deployed_env(GuardConfig(sample_interval=1.0, load_high=4.0), {})
        self.assertEqual(env["SKYNET_BUSY_POLL"], "0")

    def test_the_daemons_environment_decides_busy_polling_first(self) -> None:
        guards = GuardConfig(sample_interval=1.0, child_max_cpu=80.0)
        env = self.deployed_env(guards, {"SKYNET_BUSY_POLL": "50"})
        self.assertEqual(env["SKYNET_BUSY_POLL"], "50")

    def test_remote_methods(self) -> None:
        self.make()
        self.assertEqual(
            sorted(self.daemon.host.methods),
            ["Deploy", "HostStats", "ListSubServices", "RegisterSubService",
             "RestartAllSubServices", "RestartSubService",
             "SearchLogs",  # (observe) skynet.observe.logsearch
             "SearchSpans",  # (trace) skynet.observe.tracing.host_spans
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
        self.assertNotIn("SKYNET_BUSY_POLL", process.env)  # no guard: it polls
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

    def test_deploy_fails_when_the_child_dies_before_registering(self) -> None:
        """
        A child that exits before it is in the registry fails C{Deploy}
        with how it ended and its last output; it stays deployed, listed as
        failing with its last error and restart count, until stopped.
        """
        self.make()
        self.children.auto_register = False
        d = self.call("Deploy", {"service": "examples.nosuch:Thing"})
        process = self.clock.last()
        process.output(2, b"Traceback (most recent call last):\n")
        process.output(2, b"twistd: cannot import 'examples.nosuch': No module named "
                          b"'examples.nosuch'")  # fmt: skip
        self.assertNoResult(d)
        process.exit(1)
        self.settle()
        failure = self.failureResultOf(d, ServiceError)
        message = str(failure.value)
        uuid = self.daemon.deployments and next(iter(self.daemon.deployments))
        self.assertIn(f"cannot deploy examples.nosuch:Thing: Thing ({uuid}) exited with code 1 "
                      "before it registered", message)  # fmt: skip
        self.assertIn("No module named 'examples.nosuch'", message)
        self.assertIn(f"StopSubService {uuid}", message)
        [event] = self.daemon.events.recent(kind="deploy_failed")
        self.assertEqual((event.uuid, event.fields["service"]), (uuid, "Thing"))
        self.assertIn("No module named 'examples.nosuch'", event.fields["error"])
        entry = sub_services_from_bson(self.successResultOf(self.call("ListSubServices")))[uuid]
        self.assertEqual((entry.state, entry.restarts, entry.running), ("failing", 0, False))
        self.assertIn("exited with code 1", entry.last_error)
        self.assertIn("No module named 'examples.nosuch'", entry.last_error)
        # Its restart (after the back-off) dies again: still failing, counted.
        self.settle(1.1)
        self.clock.last().exit(1)
        self.settle()
        entry = sub_services_from_bson(self.successResultOf(self.call("ListSubServices")))[uuid]
        self.assertEqual((entry.state, entry.restarts), ("failing", 1))
        # Stopped by uuid: gone.
        self.successResultOf(self.call("StopSubService", {"uuid": uuid}))
        self.settle(3.0)
        self.assertEqual(self.successResultOf(self.call("ListSubServices")), {"services": {}})

    def test_deploy_waits_for_the_registry_then_states(self) -> None:
        """
        C{Deploy} answers once the child is in the registry; one that is
        not there within the start timeout (per call) fails the call, and
        the listing says C{starting} until it registers, then C{running}.
        """
        self.make()
        self.children.auto_register = False
        d = self.call("Deploy", {"service": "m:Slow", "start_timeout": 2})
        self.settle(1.5)
        self.assertNoResult(d)
        self.clock.last().output(1, b"still importing\n")
        self.settle(0.3)
        message = str(self.failureResultOf(d, ServiceError).value)
        self.assertIn("did not register within 2s", message)
        self.assertIn("still importing", message)
        self.assertIn("it is still running; StopSubService", message)
        [entry] = sub_services_from_bson(
            self.successResultOf(self.call("ListSubServices"))
        ).values()
        self.assertEqual((entry.state, entry.last_error), ("starting", None))
        self.children.register(self.clock.last())
        self.settle()
        [entry] = sub_services_from_bson(
            self.successResultOf(self.call("ListSubServices"))
        ).values()
        self.assertEqual(entry.state, "running")
        # Registered at once: the answer comes then; start_timeout 0: at once.
        d = self.call("Deploy", {"service": "m:Quick"})
        self.assertNoResult(d)
        self.children.register(self.clock.last())
        self.settle()
        self.assertEqual(set(self.successResultOf(d)), {"uuid"})
        d = self.call("Deploy", {"service": "m:Now", "start_timeout": 0})
        self.assertEqual(set(self.successResultOf(d)), {"uuid"})
        for bad in (-1, "5", True, 1e9):
            d = self.call("Deploy", {"service": "m:Bad", "start_timeout": bad})
            self.assertIn("start_timeout", str(self.failureResultOf(d, ServiceError).value))
        self.assertEqual(len(self.daemon.deployments), 3)

        # A Deploy still waiting when the daemon stops answers at once.
        waiting = self.call("Deploy", {"service": "m:Late"})
        self.daemon.stopService()  # (the cleanup's stop waits for this one)
        self.settle()
        self.assertIn("the daemon is stopping", str(self.failureResultOf(waiting).value))

    def test_unresponsive_child_is_unregistered_killed_and_restarted(self) -> None:
        """
        A child whose admin listener stops answering (SIGSTOP'd) fails its
        probes; after N in a row: out of the registry at once, SIGTERM (and
        SIGCONT), SIGKILL after the kill time, restarted, an C{unresponsive}
        event.
        """
        self.make(probes=ProbeConfig(interval=1.0, timeout=0.5, failures=3))
        uuid = self.successResultOf(self.call("Deploy", {"service": "m:Fib"}))["uuid"]
        first = self.clock.last()
        self.settle(3.0)
        self.assertGreaterEqual(self.children.pings.count(uuid), 2)  # it answers: nothing
        self.assertEqual(self.daemon.events.recent(kind="unresponsive"), [])
        self.children.hung.add(first.pid)
        first.obey_term = False  # a stopped process does not act on SIGTERM
        self.settle(2.0)  # (probes at each whole second, timing out half a second later)
        self.assertEqual(self.daemon.events.recent(kind="unresponsive"), [])
        entry = sub_services_from_bson(self.successResultOf(self.call("ListSubServices")))[uuid]
        self.assertEqual(entry.probe_failures, 1)  # (one failed, the next one in flight)
        self.settle(1.4)
        [event] = self.daemon.events.recent(kind="unresponsive")
        self.assertEqual((event.fields["pid"], event.fields["failures"], event.fields["reason"]),
                         (first.pid, 3, "unresponsive"))  # fmt: skip
        self.assertEqual(event.fields["error"], "no answer within 0.5s")
        self.assertIsNone(self.children.instance(uuid))  # unregistered at once
        self.assertEqual(first.signals, ["TERM", "CONT"])
        self.assertFalse(first.ended)
        self.settle(2.1)  # the kill time
        self.assertEqual(first.signals, ["TERM", "CONT", "KILL"])
        self.assertTrue(first.ended)
        self.settle(1.5)  # the back-off, and the new process registers
        second = self.clock.last()
        self.assertIsNot(second, first)
        self.assertEqual(self.children.instance(uuid).pid, second.pid)
        entry = sub_services_from_bson(self.successResultOf(self.call("ListSubServices")))[uuid]
        self.assertEqual((entry.state, entry.restarts, entry.pid), ("running", 1, second.pid))
        # The new process is probed afresh and left alone while it answers.
        self.settle(4.0)
        self.assertEqual(len(self.daemon.events.recent(kind="unresponsive")), 1)
        self.assertFalse(second.ended)

    def test_a_draining_child_is_not_probed_to_death(self) -> None:
        """
        A child stopping gracefully has closed its listeners while it
        drains: its refused probes do not get it killed.
        """
        self.make(probes=ProbeConfig(interval=1.0, timeout=0.5, failures=2))
        self.children.drain_time = 4.0
        uuid = self.successResultOf(self.call("Deploy", {"service": "m:Slow"}))["uuid"]
        process = self.clock.last()
        self.settle(2.0)
        d = self.daemon.restart(uuid)
        self.settle(4.5)
        self.assertTrue(process.ended)
        self.assertEqual(process.signals, [])  # it left by itself, after draining
        self.successResultOf(d)
        self.assertEqual(self.daemon.events.recent(kind="unresponsive"), [])

    def test_a_probe_that_cannot_be_sent_is_a_failure_not_a_stuck_probe(self) -> None:
        self.make(probes=ProbeConfig(interval=1.0, timeout=0.5, failures=2))
        uuid = self.successResultOf(self.call("Deploy", {"service": "m:A"}))["uuid"]

        def broken(*args: Any) -> Deferred:
            raise OSError("no route")

        self.daemon.admin = broken
        self.settle(2.2)
        [event] = self.daemon.events.recent(kind="unresponsive")
        self.assertEqual((event.uuid, event.fields["error"]), (uuid, "no route"))

    def test_reactor_lag_over_the_threshold_counts_as_failing(self) -> None:
        self.make(probes=ProbeConfig(interval=1.0, timeout=0.5, failures=2, max_lag=1.0))
        uuid = self.successResultOf(self.call("Deploy", {"service": "m:Busy"}))["uuid"]
        process = self.clock.last()
        [(_, registry, instance)] = self.children.by_admin.values()
        registry.publish_stats(instance, {"ReactorLag": 0.2})
        self.settle(3.0)
        self.assertEqual(self.daemon.events.recent(kind="unresponsive"), [])
        registry.publish_stats(instance, {"ReactorLag": 3.0})
        self.settle(2.2)
        [event] = self.daemon.events.recent(kind="unresponsive")
        self.assertEqual((event.uuid, event.fields["pid"]), (uuid, process.pid))
        self.assertEqual(event.fields["error"], "reactor lag 3.00s over 1s")
        self.assertIn("TERM", process.signals)

    def test_deploy_with_a_uuid_is_idempotent(self) -> None:
        """
        C{Deploy} with a uuid: again (a retry, a hedged call) starts
        nothing new; the same uuid for something else is refused.
        """
        self.make()
        params = {"service": "m:A", "args": ["--region", "Mars"], "uuid": "fixed-1"}
        self.assertEqual(self.successResultOf(self.call("Deploy", params)), {"uuid": "fixed-1"})
        spawned = len(self.clock.spawned)
        self.assertEqual(self.successResultOf(self.call("Deploy", params)), {"uuid": "fixed-1"})
        self.assertEqual(len(self.clock.spawned), spawned)
        self.assertEqual(len(self.daemon.events.recent(kind="deployed")), 1)
        other = dict(params, service="m:B")
        message = str(self.failureResultOf(self.call("Deploy", other), ServiceError).value)
        self.assertEqual(
            message, "cannot deploy: fixed-1 is deployed already, as m:A --region Mars"
        )
        bad = dict(params, uuid="../etc")
        message = str(self.failureResultOf(self.call("Deploy", bad), ServiceError).value)
        self.assertEqual(message, "cannot deploy: bad uuid '../etc'")
        self.assertEqual(list(self.daemon.deployments), ["fixed-1"])

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
        self.settle(1.2)
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
        self.settle(0.9)  # (half a sample interval before the next sample)
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

    def test_capacity_is_published_for_placement(self) -> None:
        """
        C{capacity} goes into the statistics node's C{Host}, where the
        cluster's placement reads it; without it there is no limit.
        """
        from skynet.cluster.reconciler import host_view

        self.make(capacity=4)
        self.settle(1.5)
        stats = self.daemon.host.statistics()
        self.assertEqual(stats["Host"]["capacity"], 4)
        daemon_node = self.successResultOf(self.daemon.registry.query(
            Query(service="SkynetDaemon")))[0]  # fmt: skip
        self.assertEqual(host_view(daemon_node, stats).capacity, 4)
        read_daemon_node(stats)  # still the contract the dashboard reads
        self._stop()
        self.make()
        self.settle(1.5)
        stats = self.daemon.host.statistics()
        self.assertNotIn("capacity", stats["Host"])
        self.assertIsNone(host_view(daemon_node, stats).capacity)

    def test_cluster_role_campaigns_and_leads(self) -> None:
        """
        With C{cluster=True} the daemon campaigns once its host is up and
        leads (alone here); its event log says so; on stop it steps down
        first, while its registry still runs.
        """
        daemon = self.make(cluster=True, cluster_interval=0.5)
        self.settle(2.0)
        self.assertIsNotNone(daemon.cluster)
        self.assertTrue(daemon.cluster.leading)
        self.assertIn("cluster_elected", [e.kind for e in daemon.events.recent(100)])
        d = daemon.stopService()
        self.settle(30.0)
        self.successResultOf(d)
        self.assertFalse(daemon.cluster.leading)
        self.assertIn("cluster_deposed", [e.kind for e in daemon.events.recent(100)])

    def test_no_cluster_role_by_default_in_the_class(self) -> None:
        daemon = self.make()
        self.settle(2.0)
        self.assertIsNone(daemon.cluster)
        self.assertNotIn("cluster", [child.name for child in daemon])

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


class ProbeGuardTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.guard = ProbeGuard(ProbeConfig(interval=2.0, timeout=1.0, failures=3, max_lag=0.5),
                                self.clock)  # fmt: skip

    def probe(self, answered: bool, pid: int = 7, **kwargs: Any) -> Unresponsive | None:
        self.assertTrue(self.guard.due("u", pid))
        self.guard.sent("u", pid)
        self.assertFalse(self.guard.due("u", pid))  # one in flight at a time
        result = self.guard.result("u", pid, answered=answered, **kwargs)
        self.clock.advance(2.0)
        return result

    def test_due_every_interval(self) -> None:
        self.guard.sent("u", 7)
        self.guard.result("u", 7, answered=True)
        self.clock.advance(1.9)
        self.assertFalse(self.guard.due("u", 7))
        self.clock.advance(0.1)
        self.assertTrue(self.guard.due("u", 7))

    def test_failures_in_a_row(self) -> None:
        self.assertIsNone(self.probe(False, error="refused"))
        self.assertIsNone(self.probe(False, error="refused"))
        self.assertIsNone(self.probe(True))  # an answer: the count starts over
        self.assertIsNone(self.probe(False, error="a"))
        self.assertIsNone(self.probe(False, error="b"))
        self.assertEqual(self.guard.failures("u"), 2)
        self.assertEqual(
            self.probe(False),
            Unresponsive(uuid="u", pid=7, failures=3, errors=("a", "b", "no answer")),
        )
        # Condemned: no more probes of that process, its late answers ignored.
        self.assertFalse(self.guard.due("u", 7))
        self.assertIsNone(self.guard.result("u", 7, answered=False))
        # A new process starts over.
        self.guard.started("u")
        self.assertTrue(self.guard.due("u", 8))
        self.assertEqual(self.guard.failures("u"), 0)

    def test_reactor_lag_counts_as_failing(self) -> None:
        self.assertIsNone(self.probe(True, lag=0.4))
        self.assertIsNone(self.probe(True, lag=0.9))
        self.assertIsNone(self.probe(True, lag=2.0))
        decision = self.probe(True, lag=0.6)
        self.assertIsNotNone(decision)
        self.assertEqual(decision.errors[-1], "reactor lag 0.60s over 0.5s")

    def test_answer_of_a_replaced_process_is_ignored(self) -> None:
        self.guard.sent("u", 7)
        self.guard.started("u")
        self.assertTrue(self.guard.due("u", 8))
        self.assertIsNone(self.guard.result("u", 7, answered=False))
        self.assertEqual(self.guard.failures("u"), 0)

    def test_off_and_bad_configs(self) -> None:
        self.assertFalse(ProbeGuard(ProbeConfig(interval=0), self.clock).due("u", 1))
        for bad in ({"interval": -1}, {"timeout": 0}, {"failures": 0}, {"max_lag": 0}):
            with self.assertRaises(ValueError):
                ProbeConfig(**bad)


class DeploymentStateTests(SynchronousTestCase):
    def test_states(self) -> None:
        def state(**kwargs: bool) -> str:
            facts = dict(running=True, in_registry=False, exited=False, quick_death=False,
                         registered_before_exit=False)  # fmt: skip
            facts.update(kwargs)
            return deployment_state(**facts)

        self.assertEqual(state(), "starting")
        self.assertEqual(state(in_registry=True), "running")
        self.assertEqual(state(in_registry=True, exited=True, quick_death=True), "running")
        # Died before it registered, or soon after it had: failing until a new one registers.
        self.assertEqual(state(exited=True), "failing")
        self.assertEqual(state(running=False, exited=True), "failing")
        self.assertEqual(state(exited=True, quick_death=True, registered_before_exit=True),
                         "failing")  # fmt: skip
        # Had registered and stayed up: its next process is just starting.
        self.assertEqual(state(exited=True, registered_before_exit=True), "starting")
        self.assertEqual(state(running=False, exited=True, registered_before_exit=True),
                         "restarting")  # fmt: skip

    def test_the_record_is_strict(self) -> None:
        from skynet.control import SubServiceStatus

        entry = SubServiceStatus(uuid="u", service="m:A", args=(), running=False, pid=None,
                                 restarts=2, started=None, registered=True, last_exit=None,
                                 desired_registered=True, held=(), in_registry=None,
                                 next_restart=None, backoff=4.0, log=None, cpu=None, rss=None,
                                 state="failing", last_error="exited with code 1\nImportError")  # fmt: skip
        doc = entry.to_bson()
        self.assertEqual(SubServiceStatus.from_bson("u", doc), entry)
        for key in ("state", "last_error", "probe_failures"):
            with self.assertRaises(ValueError) as e:
                SubServiceStatus.from_bson("u", {k: v for k, v in doc.items() if k != key})
            self.assertIn(repr(key), str(e.exception))
        with self.assertRaises(ValueError):
            SubServiceStatus.from_bson("u", dict(doc, state="melting"))
        with self.assertRaises(ValueError):
            SubServiceStatus.from_bson("u", dict(doc, last_error=3))


class ReactorLagTests(SynchronousTestCase):
    def test_lateness_of_the_timer_over_a_window(self) -> None:
        clock = Clock()
        lag = ReactorLag(clock, interval=0.5, window=10.0)
        lag.start()
        for _ in range(4):
            clock.advance(0.5)
        self.assertEqual(lag.lag, 0.0)
        clock.advance(3.0)  # the reactor was blocked for 3 s
        self.assertEqual(lag.lag, 2.5)
        for _ in range(10):
            clock.advance(0.5)
        self.assertEqual(lag.lag, 2.5)  # still within the window
        for _ in range(12):
            clock.advance(0.5)
        self.assertEqual(lag.lag, 0.0)
        lag.stop()
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_published_in_the_statistics(self) -> None:
        clock = Clock()
        cluster = LocalCluster(reactor=clock)
        host = cluster.add(_Plain())
        cluster.settle()
        clock.advance(0.5)
        clock.advance(2.5)
        stats = host.statistics()
        self.assertEqual(stats["ReactorLag"], 2.0)
        self.assertIn("RequestsServed", stats)
        self.successResultOf(cluster.stop())


class _Plain(Service):
    name = "Plain"


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
                         ["registry", "children", "supervisor", "host", "guards", "probes"])  # fmt: skip
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
        self.assertEqual(options.probes, ProbeConfig(interval=2.0, timeout=1.0, failures=3))
        self.assertEqual(options["start-timeout"], 15.0)
        self.assertEqual(options.deployments, [])
        self.assertIsNone(options.daemon_uuid)

    def test_probe_and_start_options(self) -> None:
        options = self.parse("--probe-interval", "0.5", "--probe-timeout", "0.2",
                             "--probe-failures", "2", "--probe-max-lag", "1.5",
                             "--start-timeout", "30")  # fmt: skip
        self.assertEqual(options.probes, ProbeConfig(interval=0.5, timeout=0.2, failures=2,
                                                     max_lag=1.5))  # fmt: skip
        self.assertEqual(options["start-timeout"], 30.0)
        self.assertFalse(self.parse("--probe-interval", "0").probes.enabled)
        for bad in (["--probe-timeout", "0"], ["--probe-failures", "0"],
                    ["--probe-interval", "-1"], ["--start-timeout", "x"]):  # fmt: skip
            with self.assertRaises(UsageError):
                self.parse(*bad)

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

    def test_zk_session_timeout_in_the_url_and_the_option(self) -> None:
        """
        A URL that has C{session_timeout} and C{--zk-session-timeout}: the
        option wins, and the children's URL says it once (it said it twice,
        and every child exited with "session_timeout given twice").
        """

        options = Options()
        options.parseOptions(["--registry", "zk://127.0.0.1:1,127.0.0.1:2/skynet?session_timeout=2",
                              "--zk-session-timeout", "3", "--log-dir", tempfile.mkdtemp()])  # fmt: skip
        self.assertEqual(options.registry.session_timeout, 3.0)
        self.assertEqual(options.registry_url,
                         "zk://127.0.0.1:1,127.0.0.1:2/skynet?session_timeout=3")  # fmt: skip
        child = registry_from_url(options.registry_url)
        self.assertEqual(child.session_timeout, 3.0)

    def test_cluster_options(self) -> None:
        options = self.parse()
        self.assertFalse(options["no-cluster"])
        self.assertIsNone(options["capacity"])
        self.assertEqual((options["cluster-interval"], options["cluster-list-interval"]),
                         (2.0, 30.0))  # fmt: skip
        options = self.parse("--no-cluster", "--capacity", "5", "--cluster-interval", "0.5")
        self.assertTrue(options["no-cluster"])
        self.assertEqual(options["capacity"], 5)
        self.assertEqual(options["cluster-interval"], 0.5)
        for bad in (["--capacity", "-1"], ["--capacity", "many"], ["--cluster-interval", "0"]):
            with self.assertRaises(UsageError):
                self.parse(*bad)

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


class Blocker(Service):
    """
    A service whose C{Block} blocks its reactor (run by the daemon as
    C{tests.test_daemon:Blocker}).
    """

    name = "Blocker"

    def Block(self, request_info: Any, params: dict[str, Any]) -> dict[str, Any]:
        time.sleep(min(float(params.get("seconds", 1.0)), 10.0))
        return {}


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


def _paced_load(fibonacci: Any, seconds: float, callers: int, max_calls: int,
                pause: float) -> tuple[Deferred, dict[str, Any]]:  # fmt: skip
    """
    C{callers} loops calling C{Fibonacci.Index}, each at most C{max_calls}
    times and for at most C{seconds}, C{pause} seconds apart (a load that
    leaves the shared machine's cores to the processes under test).
    """
    results: dict[str, Any] = {"ok": 0, "failed": []}
    stop_at = time.monotonic() + seconds

    async def caller(n: int) -> None:
        for i in range(max_calls):
            if time.monotonic() >= stop_at:
                return
            index = (n * 7 + i) % 60
            try:
                reply = await fibonacci.call("Index", {"index": index})
                assert reply["index"] == index, reply
                results["ok"] += 1
            except Exception as e:
                results["failed"].append(repr(e))
            await sleep(pause)

    calls = [Deferred.fromCoroutine(caller(n)) for n in range(callers)]
    return DeferredList(calls), results


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


def loopback_daemon(root: str, ip: str, spec: str, registry: str) -> DaemonProcess:
    """
    A daemon as one "host" on loopback address C{ip}, in C{root/ip}, deploying
    C{spec} (a service class and its options) on that address; started.
    """
    directory = os.path.join(root, ip)
    os.makedirs(directory)
    deploy = os.path.join(directory, "deploy")
    with open(deploy, "w") as f:
        f.write(f"{spec} --listen tcp:0:interface={ip} --stats-interval 0.5\n")
    return DaemonProcess(directory, "--deploy", deploy, "--listen", f"tcp:0:interface={ip}",
                         registry=registry).start()  # fmt: skip


async def loopback_cluster(case: TestCase, prefix: str,
                           hosts: list[tuple[str, str]]) -> tuple[str, FileRegistry, Client]:  # fmt: skip
    """
    An embedded registry in a temp dir of its own and a L{loopback_daemon}
    per C{(ip, spec)} of C{hosts}, all stopped (and their strays killed)
    when C{case} ends: the registry's URL, the registry, and a client.
    """
    root = tempfile.mkdtemp(prefix=prefix)
    case.addCleanup(kill_strays, root)
    url = f"file://{root}/registry"
    registry = FileRegistry(os.path.join(root, "registry"), reactor=reactor)
    await registry.start()
    case.addCleanup(registry.stop)
    client = Client(registry=registry, reactor=reactor)
    case.addCleanup(client.stop)
    for ip, spec in hosts:
        case.addCleanup(loopback_daemon(root, ip, spec, url).stop)
    return url, registry, client


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

    async def deploy(self, service: str, *args: str, registered: bool = True,
                     wait: bool = True) -> str:  # fmt: skip
        """
        Deploy through the daemon; it answers once the child is in the
        registry (C{wait=False}: at once).
        """
        params = {"service": service, "args": SERVICE_ARGS + list(args), "registered": registered}
        if not wait:
            params["start_timeout"] = 0
        # Once, not hedged: Deploy waits for the child to register, and a
        # hedged second attempt would deploy a second instance.
        result = await self.client.service("SkynetDaemon").call_once("Deploy", params, timeout=30)
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
        uuid = await self.deploy("examples.no_such_module:Nothing", wait=False)
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

    async def test_sky_deploy_of_a_missing_module_fails(self) -> None:
        """
        C{sky deploy examples.nosuch:Thing}: the child dies before it
        registers, so C{Deploy} fails and C{sky} exits non-zero printing
        the import error; the listing shows the failing deployment with its
        error and restarts; C{StopSubService} removes it.
        """
        await self.start_daemon()

        def sky() -> subprocess.CompletedProcess:
            return subprocess.run(
                [sys.executable, "-m", "skynet.sky", "--registry", self.daemon.registry,
                 "deploy", "examples.nosuch:Thing"],
                cwd=ROOT, env=child_env(SKYNET_HOME=self.root), stdin=subprocess.DEVNULL,
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip

        began = time.monotonic()
        result = await deferToThread(sky)
        took = time.monotonic() - began
        self.assertNotEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("Could not deploy examples.nosuch:Thing", result.stderr)
        # It failed because the child died, not because the time ran out.
        self.assertIn("exited with code 1 before it registered", result.stderr)
        self.assertIn("No module named 'examples.nosuch'", result.stderr)
        self.assertNotIn("Traceback", result.stderr)
        print(f"\nsky deploy of a missing module: exit {result.returncode} after {took:.2f}s")
        [(uuid, entry)] = (await self.listing()).items()
        self.assertEqual(entry["service"], "examples.nosuch:Thing")
        self.assertEqual(entry["state"], "failing", entry)
        self.assertIn("No module named 'examples.nosuch'", entry["last_error"])
        await wait_for(lambda: self._restarts(uuid, 1), timeout=15, what="a restart")
        entry = (await self.listing())[uuid]
        self.assertEqual(entry["state"], "failing", entry)
        self.assertGreaterEqual(entry["restarts"], 1)
        self.assertEqual(await self.call("StopSubService", {"uuid": uuid}),
                         {"ok": True, "uuid": uuid})  # fmt: skip
        self.assertEqual(await self.listing(), {})
        await sleep(3.0)  # its back-off would have started it again by now
        self.assertEqual(await self.listing(), {})
        self.assertEqual([p for p in psutil.process_iter(["cmdline"])
                          if uuid in " ".join(p.info["cmdline"] or [])], [])  # fmt: skip

    async def test_sigstopped_child_is_killed_and_replaced(self) -> None:
        """
        Two Fibonacci under a client load; one SIGSTOP'd: its probes fail,
        and within probes x interval + the restart time it is out of the
        registry, killed and replaced (same uuid, new pid); zero failed
        calls (the client hedges); the daemon's events say "unresponsive".
        """
        await self.start_daemon("--probe-interval", "1", "--probe-timeout", "0.5",
                                "--probe-failures", "3")  # fmt: skip
        fibs = [await self.deploy("examples.fibonacci:Fibonacci") for _ in range(2)]
        instances = await self.registered(fibs)
        fib = self.client.service("Fibonacci")
        self.assertEqual(await fib.call("Index", {"index": 30}), {"index": 30, "value": 832040})
        callers, results = _paced_load(fib, seconds=14.0, callers=4, max_calls=2000, pause=0.01)
        await sleep(1.0)
        victim = instances[0]
        stopped_at = time.monotonic()
        os.kill(victim.pid, signal.SIGSTOP)
        self.addCleanup(lambda: gone(victim.pid) or os.kill(victim.pid, signal.SIGKILL))

        async def unregistered() -> bool:
            found = await self.registry.query(Query(uuid=victim.uuid))
            return all(i.pid != victim.pid for i in found)

        await wait_for(unregistered, timeout=20, what="the stopped child out of the registry")
        out_after = time.monotonic() - stopped_at
        await wait_for(lambda: gone(victim.pid), timeout=20, what="the stopped child killed")
        killed_after = time.monotonic() - stopped_at
        [again] = await wait_for(lambda: self._registered_with_new_pid(victim.uuid, victim.pid),
                                 timeout=30, what="its replacement registered")  # fmt: skip
        back_after = time.monotonic() - stopped_at
        await callers
        self.assertEqual(results["failed"], [], self.logs())
        self.assertGreater(results["ok"], 50)
        entry = (await self.listing())[victim.uuid]
        self.assertEqual((entry["state"], entry["pid"], entry["restarts"]),
                         ("running", again.pid, 1))  # fmt: skip
        self.assertEqual(entry["last_exit"]["signal_name"], "SIGKILL")
        [daemon_instance] = await self.registry.query(Query(service="SkynetDaemon"))

        async def unresponsive() -> Any:
            node = await self.registry.get_stats(daemon_instance) or {}
            return [e for e in node.get("Events", []) if e["kind"] == "unresponsive"] or None

        [event] = await wait_for(unresponsive, timeout=10, what="the event published")
        self.assertEqual((event["uuid"], event["pid"], event["reason"], event["failures"]),
                         (victim.uuid, victim.pid, "unresponsive", 3))  # fmt: skip
        self.assertIn("unresponsive", event["text"])
        # The other one was left alone.
        self.assertEqual((await self.listing())[fibs[1]]["restarts"], 0)
        # Its replacement publishes its reactor lag.
        node = await wait_for(lambda: self.registry.get_stats(again), timeout=10,
                              what="the replacement's statistics")  # fmt: skip
        self.assertIsInstance(node["ReactorLag"], float)
        print(
            f"\nSIGSTOP of a child: out of the registry after {out_after:.2f}s, killed after "
            f"{killed_after:.2f}s, replacement registered after {back_after:.2f}s; "
            f"{results['ok']} calls, 0 failed"
        )

    async def test_a_child_whose_reactor_lags_is_replaced(self) -> None:
        """
        A child that blocks its reactor for 2 s still answers its probes
        (timeout 4 s), but publishes a reactor lag over C{--probe-max-lag}:
        its probes count as failed, it is killed and replaced.
        """
        await self.start_daemon("--probe-interval", "1", "--probe-timeout", "4",
                                "--probe-failures", "2", "--probe-max-lag", "1")  # fmt: skip
        uuid = await self.deploy("tests.test_daemon:Blocker")
        [first] = await self.registered([uuid])
        await sleep(2.0)
        self.assertEqual((await self.listing())[uuid]["restarts"], 0)  # no lag: left alone
        await self.client.service("Blocker").call_once("Block", {"seconds": 2.0}, timeout=10)
        [again] = await wait_for(lambda: self._registered_with_new_pid(uuid, first.pid),
                                 timeout=30, what="its replacement registered")  # fmt: skip
        self.assertTrue(gone(first.pid))
        [daemon_instance] = await self.registry.query(Query(service="SkynetDaemon"))

        async def unresponsive() -> Any:
            node = await self.registry.get_stats(daemon_instance) or {}
            return [e for e in node.get("Events", []) if e["kind"] == "unresponsive"] or None

        [event] = await wait_for(unresponsive, timeout=10, what="the event published")
        self.assertEqual((event["uuid"], event["pid"]), (uuid, first.pid))
        # (The timer's lateness: the 2 s block less the time since its last tick.)
        self.assertRegex(event["error"], r"^reactor lag [12]\.\d\ds over 1s$")

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
            missing_here(str(e))
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
