"""
The sky command language (L{skynet.shell}) on an in-memory cluster and a
fake clock: parsing, filters, output formats, C{--json}, confirmations,
routing of actions through daemons and admin endpoints, completion, and
the terminal protocol driven keystroke by keystroke.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from typing import Any

from twisted.conch.insults.insults import ServerProtocol
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from examples.fibonacci import Fibonacci
from examples.testservice import TestService
from skynet.errors import ConnectionFailed
from skynet.registry.base import Address, Instance
from skynet.registry.memory import MemoryRegistry
from skynet.shell import (
    BufferIO,
    Filters,
    History,
    Shell,
    ShellProtocol,
    UsageError,
    format_instance,
    parse,
    split_line,
)
from skynet.testing import FakeDaemon, LocalCluster


class FakeAdmin:
    """
    Records admin calls; fails for the addresses in C{broken}.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, dict]] = []
        self.tls: list[bool | None] = []
        self.broken: set[str] = set()

    def __call__(self, address: Address, method: str, params: dict,
                 tls: bool | None = None) -> Deferred:  # fmt: skip
        self.calls.append((str(address), method, params))
        self.tls.append(tls)
        if str(address) in self.broken:
            return fail(ConnectionFailed(f"cannot reach the admin endpoint {address}"))
        return succeed(None)


class ShellTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.cluster = LocalCluster()
        self.addCleanup(self.cluster.stop)
        self.clock = self.cluster.clock
        self.admin = FakeAdmin()
        # Instances written straight into the registry (with admin
        # addresses), beside the served ones.
        self.writer = MemoryRegistry(reactor=self.clock, store=self.cluster.registry.store)

    def shell(self, **kwargs: Any) -> Shell:
        return Shell(
            self.cluster.registry,
            self.cluster.client(),
            reactor=self.clock,
            admin=self.admin,
            **kwargs,
        )

    def sh(self, shell: Shell, line: str, answers=()) -> tuple[int, BufferIO]:
        io = BufferIO(answers)
        d = shell.run_line(line, io)
        for _ in range(20):
            self.cluster.settle()
            if d.called:
                break
            self.clock.advance(0.1)
        return self.successResultOf(d), io

    def record(self, **fields: Any) -> Instance:
        values: dict[str, Any] = {
            "uuid": f"u-{fields.get('port', 1)}",
            "name": "Sleeper",
            "version": "1",
            "region": "north",
            "host": "10.0.0.9",
            "port": 1,
            "admin": Address("10.0.0.9", 20000 + fields.get("port", 1)),
        }
        values.update(fields)
        instance = Instance(**values)
        self.successResultOf(self.writer.add(instance))
        return instance


class ParseTests(SynchronousTestCase):
    def test_options_before_and_after(self) -> None:
        inv = parse(["--service", "Fib", "instances", "--json", "--host=10.0.0.1", "-port", "9"])
        self.assertEqual(inv.command, "instances")
        self.assertEqual(inv.args, [])
        self.assertEqual((inv.filters.service, inv.filters.host, inv.filters.port),
                         ("Fib", "10.0.0.1", 9))  # fmt: skip
        self.assertTrue(inv.json)
        self.assertFalse(inv.yes)

    def test_registered_and_yes(self) -> None:
        inv = parse(["stop", "--registered", "false", "-y"])
        self.assertIs(inv.filters.registered, False)
        self.assertTrue(inv.yes)

    def test_deploy_arguments_pass_through(self) -> None:
        inv = parse(["--host", "h", "deploy", "m:C", "--region", "x", "--json"])
        self.assertEqual(inv.args, ["m:C", "--region", "x", "--json"])
        self.assertEqual(inv.filters.host, "h")
        self.assertIsNone(inv.filters.region)
        self.assertFalse(inv.json)

    def test_double_dash(self) -> None:
        self.assertEqual(parse(["call", "--", "-S", "M"]).args, ["-S", "M"])

    def test_errors(self) -> None:
        for argv, message in [
            (["--bogus", "services"], "unknown option --bogus"),
            (["--port", "http", "instances"], "port must be a number"),
            (["--port", "0", "instances"], "between 1 and 65535"),
            (["--registered", "maybe", "instances"], "registered must be true or false"),
            (["instances", "--service"], "needs a value"),
        ]:
            with self.assertRaises(UsageError) as e:
                parse(argv)
            self.assertIn(message, str(e.exception))

    def test_split_line_keeps_json(self) -> None:
        self.assertEqual(
            split_line("""call TestService Upcase '{"data": "a b"}'"""),
            ["call", "TestService", "Upcase", '{"data": "a b"}'],
        )
        with self.assertRaises(UsageError):
            split_line("call 'unclosed")

    def test_filters(self) -> None:
        f = Filters()
        f.set("port", "9000")
        f.set("registered", "yes")
        self.assertEqual((f.port, f.registered), (9000, True))
        self.assertEqual(f.overlaid(Filters(service="S")).query().service, "S")
        f.reset("port")
        self.assertIsNone(f.port)
        with self.assertRaises(UsageError):
            f.reset("colour")


class QueryTests(ShellTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.fib1 = self.cluster.add(Fibonacci(), version="2", region="north")
        self.fib2 = self.cluster.add(Fibonacci(), version="3", region="north")
        self.test = self.cluster.add(TestService(), version="1", region="south", registered=False)

    def test_lists(self) -> None:
        shell = self.shell()
        self.assertEqual(self.sh(shell, "services")[1].stdout, ["Fibonacci", "TestService"])
        self.assertEqual(self.sh(shell, "hosts")[1].stdout, ["10.0.0.1"])
        self.assertEqual(self.sh(shell, "regions")[1].stdout, ["north", "south"])
        self.assertEqual(self.sh(shell, "--region south services")[1].stdout, ["TestService"])
        self.assertEqual(self.sh(shell, "versions --service Fibonacci")[1].stdout, ["2", "3"])

    def test_versions_needs_a_service(self) -> None:
        status, io = self.sh(self.shell(), "versions")
        self.assertEqual(status, 2)
        self.assertIn("Service name is required", io.errors)

    def test_instances_as_go_printed_them(self) -> None:
        status, io = self.sh(self.shell(), "instances")
        self.assertEqual(status, 0)
        p1, p2, p3 = (h.instance.port for h in (self.fib1, self.fib2, self.test))
        self.assertEqual(
            io.stdout,
            [
                f"10.0.0.1:{p1} - Fibonacci 2 [Registered]",
                f"10.0.0.1:{p2} - Fibonacci 3 [Registered]",
                f"10.0.0.1:{p3} - TestService 1",
            ],
        )

    def test_instances_json(self) -> None:
        status, io = self.sh(self.shell(), "instances --json --registered false")
        self.assertEqual(status, 0)
        (doc,) = json.loads(io.output)
        self.assertEqual(doc["uuid"], self.test.uuid)
        self.assertEqual(doc["name"], "TestService")
        self.assertEqual(doc["address"], f"10.0.0.1:{self.test.instance.port}")
        self.assertIs(doc["registered"], False)

    def test_topology(self) -> None:
        _, io = self.sh(self.shell(), "topology")
        p1, p2, p3 = (h.instance.port for h in (self.fib1, self.fib2, self.test))
        self.assertEqual(
            io.stdout,
            [
                "Region: north",
                "\tHost: 10.0.0.1",
                "\t\tService: Fibonacci",
                "\t\t\tVersion: 2",
                f"\t\t\t\t10.0.0.1:{p1} [Registered]",
                "\t\t\tVersion: 3",
                f"\t\t\t\t10.0.0.1:{p2} [Registered]",
                "Region: south",
                "\tHost: 10.0.0.1",
                "\t\tService: TestService",
                "\t\t\tVersion: 1",
                f"\t\t\t\t10.0.0.1:{p3}",
            ],
        )
        _, io = self.sh(self.shell(), "topology --json")
        tree = json.loads(io.output)
        self.assertEqual(tree["south"]["10.0.0.1"]["TestService"]["1"][0]["uuid"], self.test.uuid)

    def test_persistent_filters(self) -> None:
        shell = self.shell()
        status, io = self.sh(shell, "service Fibonacci")
        self.assertEqual((status, io.stdout), (0, ["Service: Fibonacci"]))
        self.sh(shell, "version 3")
        _, io = self.sh(shell, "instances")
        self.assertEqual(io.stdout, [format_instance(self.fib2.instance)])
        _, io = self.sh(shell, "filters")
        self.assertEqual(
            io.stdout,
            ["Region: ", "Host: ", "Port: ", "Service: Fibonacci", "Version: 3", "Registered: "],
        )
        _, io = self.sh(shell, "filters --json")
        self.assertEqual(json.loads(io.output)["version"], "3")
        # A one-off option does not stick.
        _, io = self.sh(shell, "instances --version 2")
        self.assertEqual(io.stdout, [format_instance(self.fib1.instance)])
        self.assertEqual(shell.filters.version, "3")
        self.sh(shell, "reset version")
        self.assertEqual(len(self.sh(shell, "instances")[1].stdout), 2)
        self.sh(shell, "registered false")
        self.sh(shell, "reset")
        self.assertEqual(shell.filters, Filters())
        self.assertEqual(len(self.sh(shell, "instances")[1].stdout), 3)

    def test_bad_filter_values(self) -> None:
        shell = self.shell()
        self.assertEqual(self.sh(shell, "port none")[0], 2)
        self.assertEqual(self.sh(shell, "reset colour")[0], 2)
        status, io = self.sh(shell, "frobnicate")
        self.assertEqual(status, 2)
        self.assertIn("Unknown command", io.errors)

    def test_help(self) -> None:
        status, io = self.sh(self.shell(), "help")
        self.assertEqual(status, 0)
        for word in ("instances", "topology", "deploy", "call", "watch", "stats", "python"):
            self.assertIn(word, io.output)

    def test_stats(self) -> None:
        self.successResultOf(self.fib1.publish_statistics())
        status, io = self.sh(self.shell(), "stats --service Fibonacci")
        self.assertEqual(status, 0)
        self.assertEqual(len(io.stdout), 2)
        self.assertRegex(
            io.stdout[0],
            r"^10\.0\.0\.1:\d+ - Fibonacci 2 \[Registered\]: 0 requests, 0 errors, 0 clients, "
            r"avg 0\.00 ms, p50 0\.00 ms, p99 0\.00 ms$",
        )
        self.assertRegex(io.stdout[1], r"Fibonacci 3 \[Registered\]: no statistics yet$")
        _, io = self.sh(self.shell(), "stats --json --service Fibonacci")
        docs = json.loads(io.output)
        self.assertEqual([d["instance"]["uuid"] for d in docs], [self.fib1.uuid, self.fib2.uuid])
        self.assertEqual(docs[0]["stats"]["RequestsServed"], 0)
        self.assertIsNone(docs[1]["stats"])

    def test_python_binds_live_objects(self) -> None:
        shell = self.shell(daemon="the daemon")
        status, io = self.sh(shell, "python")
        self.assertEqual(status, 0)
        assert io.namespace is not None
        self.assertIs(io.namespace["registry"], self.cluster.registry)
        self.assertIs(io.namespace["client"], shell.client)
        self.assertEqual(io.namespace["daemon"], "the daemon")

    def test_exit(self) -> None:
        _, io = self.sh(self.shell(), "exit")
        self.assertTrue(io.exited)


class CallTests(ShellTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.cluster.add(TestService())

    def test_call(self) -> None:
        status, io = self.sh(self.shell(), """call TestService Upcase '{"data": "hi"}'""")
        self.assertEqual(status, 0)
        self.assertEqual(json.loads(io.output), {"data": "HI"})

    def test_errors(self) -> None:
        shell = self.shell()
        status, io = self.sh(shell, "call Nope Upcase")
        self.assertEqual((status, io.errors), (1, "no such service: Nope"))
        status, io = self.sh(shell, "call TestService Upcase '{}'")
        self.assertEqual(status, 1)
        self.assertTrue(io.errors.startswith("TestService.Upcase failed: "), io.errors)
        status, io = self.sh(shell, "call TestService Nope")
        self.assertEqual((status, io.errors), (1, 'TestService.Nope: No such method "Nope"'))
        self.assertEqual(self.sh(shell, "call TestService Upcase '{bad'")[0], 2)
        self.assertEqual(self.sh(shell, "call TestService Upcase '[1]'")[0], 2)
        self.assertEqual(self.sh(shell, "call TestService")[0], 2)

    def test_unregistered_only(self) -> None:
        self.record(name="Lonely", registered=False)
        status, io = self.sh(self.shell(), "call Lonely Hello")
        self.assertEqual((status, io.errors), (1, "Lonely has no registered instance"))


class ActionTests(ShellTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.a = self.record(port=1)
        self.b = self.record(port=2)

    def test_admin_route(self) -> None:
        status, io = self.sh(self.shell(), "stop --yes")
        self.assertEqual(status, 0)
        self.assertEqual(io.questions, [])
        self.assertEqual(
            self.admin.calls,
            [
                ("10.0.0.9:20001", "Admin.Stop", {"waitforclients": True}),
                ("10.0.0.9:20002", "Admin.Stop", {"waitforclients": True}),
            ],
        )
        self.assertEqual(
            io.stdout,
            ["Stopped service with UUID u-1.", "Stopped service with UUID u-2."],
        )

    def test_admin_tls_as_advertised(self) -> None:
        """
        An admin endpoint is reached over TLS exactly when its instance
        advertises C{AdminTLS}: a shell with credentials still reaches a Go
        service's plain endpoint.
        """
        self.record(port=3, uuid="tls", extra={"TLS": True, "AdminTLS": True})
        status, _ = self.sh(self.shell(), "stop --yes")
        self.assertEqual(status, 0)
        by_address = dict(zip([c[0] for c in self.admin.calls], self.admin.tls, strict=True))
        self.assertEqual(by_address, {"10.0.0.9:20001": False, "10.0.0.9:20002": False,
                                      "10.0.0.9:20003": True})  # fmt: skip

    def test_register_unregister_json(self) -> None:
        shell = self.shell()
        status, io = self.sh(shell, "unregister --port 1 --json")
        self.assertEqual(status, 0)
        (result,) = json.loads(io.output)
        self.assertEqual(
            result,
            {
                "action": "unregister",
                "ok": True,
                "message": "Unregistered service with UUID u-1.",
                "uuid": "u-1",
                "service": "Sleeper",
                "address": "10.0.0.9:1",
                "host": "10.0.0.9",
                "via": "admin",
            },
        )
        self.sh(shell, "register --port 2")
        self.assertEqual(
            [c[:2] for c in self.admin.calls],
            [("10.0.0.9:20001", "Admin.Unregister"), ("10.0.0.9:20002", "Admin.Register")],
        )

    def test_confirmation_declined(self) -> None:
        status, io = self.sh(self.shell(), "stop", answers=[False])
        self.assertEqual(status, 1)
        self.assertEqual(io.questions, ["2 instances will be stopped, Are you sure? (Y/N) > "])
        self.assertEqual(io.stderr, ["Cancelled."])
        self.assertEqual(self.admin.calls, [])

    def test_confirmation_accepted(self) -> None:
        status, io = self.sh(self.shell(), "unregister", answers=[True])
        self.assertEqual(status, 0)
        self.assertEqual(io.questions, ["2 instances will be unregistered, Are you sure? (Y/N) > "])
        self.assertEqual(len(self.admin.calls), 2)

    def test_single_instance(self) -> None:
        # sky asks only for several instances; the interactive shell, like
        # Go Skynet's, always asks.
        _, io = self.sh(self.shell(), "stop --port 1")
        self.assertEqual(io.questions, [])
        status, io = self.sh(self.shell(interactive=True), "stop --port 2", answers=[False])
        self.assertEqual(io.questions, ["1 instance will be stopped, Are you sure? (Y/N) > "])
        self.assertEqual(status, 1)
        self.assertEqual(len(self.admin.calls), 1)

    def test_nothing_matches(self) -> None:
        status, io = self.sh(self.shell(), "stop --service Nope")
        self.assertEqual(status, 1)
        self.assertEqual(io.errors, "no instance matches the filters (service=Nope)")

    def test_restart_needs_a_daemon(self) -> None:
        status, io = self.sh(self.shell(), "restart --port 1")
        self.assertEqual(status, 1)
        self.assertIn("restart is only possible through a daemon", io.errors)
        self.assertEqual(self.admin.calls, [])

    def test_no_admin_endpoint(self) -> None:
        self.record(port=3, admin=None, uuid="bare")
        status, io = self.sh(self.shell(), "stop --port 3")
        self.assertEqual(status, 1)
        self.assertIn("has no admin endpoint", io.errors)

    def test_admin_failure(self) -> None:
        self.admin.broken.add("10.0.0.9:20001")
        status, io = self.sh(self.shell(), "stop --yes")
        self.assertEqual(status, 1)
        self.assertEqual(io.stdout, ["Stopped service with UUID u-2."])
        self.assertIn("Could not stop service with UUID u-1: admin endpoint", io.errors)


class DaemonRouteTests(ShellTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.fib = self.cluster.add(Fibonacci())
        self.test = self.cluster.add(TestService())
        self.daemon = FakeDaemon({self.fib.uuid})
        self.cluster.add(self.daemon)

    def test_supervised_through_daemon_others_through_admin(self) -> None:
        self.record(host="10.0.0.1", port=7, uuid="loose")
        status, io = self.sh(self.shell(), "stop --yes")
        self.assertEqual(status, 1)  # TestService has no admin endpoint here
        self.assertEqual(self.daemon.calls, [("StopSubService", self.fib.uuid)])
        self.assertEqual(
            self.admin.calls, [("10.0.0.9:20007", "Admin.Stop", {"waitforclients": True})]
        )
        self.assertIn(f"Stopped service with UUID {self.fib.uuid}.", io.stdout)
        self.assertIn("Stopped service with UUID loose.", io.stdout)
        # The daemon itself is never acted on.
        daemon_uuid = self.cluster.hosts[-1].uuid
        self.assertNotIn(daemon_uuid, io.output + io.errors)

    def test_each_action(self) -> None:
        shell = self.shell()
        for action, method, text in [
            ("register", "RegisterSubService", "Registered"),
            ("unregister", "UnregisterSubService", "Unregistered"),
            ("restart", "RestartSubService", "Restarted"),
            ("stop", "StopSubService", "Stopped"),
        ]:
            status, io = self.sh(shell, f"{action} --service Fibonacci --json")
            self.assertEqual(status, 0, io.errors)
            (result,) = json.loads(io.output)
            self.assertEqual(result["via"], "daemon")
            self.assertEqual(result["message"], f"{text} service with UUID {self.fib.uuid}.")
            self.assertEqual(self.daemon.calls[-1], (method, self.fib.uuid))

    def test_daemon_not_reachable(self) -> None:
        # A daemon in the registry that nobody can connect to.
        self.record(name="SkynetDaemon", host="10.0.0.9", port=5, uuid="ghost")
        self.record(port=6, uuid="victim")
        status, io = self.sh(self.shell(), "stop --host 10.0.0.9")
        self.assertEqual(status, 1)
        self.assertIn(
            "Could not stop service with UUID victim: daemon not reachable on host 10.0.0.9",
            io.errors,
        )
        self.assertEqual(self.admin.calls, [])

    def test_malformed_listing_is_reported(self) -> None:
        # (The daemon contract is strict: a listing of another shape is refused, not guessed at.)
        self.daemon.listing = {"services": [{"uuid": self.fib.uuid}]}
        status, io = self.sh(self.shell(), "stop --service Fibonacci")
        self.assertEqual(status, 1)
        self.assertIn("answered ListSubServices badly", io.errors)
        self.assertEqual(self.daemon.calls, [])

    def test_deploy(self) -> None:
        status, io = self.sh(self.shell(), "deploy examples.sleeper:Sleeper --version 7")
        self.assertEqual(status, 0, io.errors)
        self.assertEqual(
            self.daemon.calls,
            [
                (
                    "Deploy",
                    {
                        "service": "examples.sleeper:Sleeper",
                        "args": ["--version", "7"],
                        "registered": True,
                    },
                )
            ],  # fmt: skip
        )
        self.assertEqual(
            io.stdout,
            [
                "deploying examples.sleeper:Sleeper --version 7",
                "Deployed service with UUID deployed-uuid.",
            ],
        )

    def test_deploy_needs_a_daemon(self) -> None:
        self.record(port=1)
        status, io = self.sh(self.shell(), "--host 10.0.0.9 deploy m:C")
        self.assertEqual(status, 1)
        self.assertIn("Skipping host 10.0.0.9: no SkynetDaemon runs there.", io.stderr)
        self.assertIn(
            "no SkynetDaemon runs on a host matching the filters (host=10.0.0.9)", io.errors
        )
        self.assertEqual(self.sh(self.shell(), "deploy nocolon")[0], 2)
        self.assertEqual(self.sh(self.shell(), "deploy")[0], 2)

    def test_deploy_confirmation(self) -> None:
        status, io = self.sh(self.shell(interactive=True), "deploy m:C", answers=[False])
        self.assertEqual(status, 1)
        self.assertEqual(
            io.questions, ["Service will be deployed to 1 host, Are you sure? (Y/N) > "]
        )
        self.assertEqual(self.daemon.calls, [])


class RollingRestartGuardTests(ShellTestCase):
    def test_cluster_instances_are_the_leaders_to_restart(self) -> None:
        """
        A rolling restart of instances a cluster deployment records is
        refused (the leader replaces them: C{sky rollout restart}); nothing
        is asked of any daemon.
        """
        from skynet.cluster.reconciler import (
            STATE_KEY,
            DeploymentRecord,
            InstanceRecord,
            StoredState,
        )

        first = self.cluster.add(Fibonacci())
        second = self.cluster.add(Fibonacci())
        daemon = FakeDaemon({first.uuid, second.uuid})
        self.cluster.add(daemon)
        record = InstanceRecord(uuid=first.uuid, host="127.0.0.1", fingerprint="f", started=0.0)
        stored = StoredState(deployments={"Fib": DeploymentRecord(instances={first.uuid: record})})
        self.successResultOf(self.writer.set_value(STATE_KEY, stored.to_bytes()))
        status, io = self.sh(self.shell(), "restart --service Fibonacci --yes")
        self.assertEqual(status, 1)
        self.assertIn(
            "belong to the cluster deployment(s) Fib: `sky rollout restart Fib`", io.errors
        )
        self.assertEqual(daemon.calls, [])


class WatchTests(ShellTestCase):
    def test_watch_for_a_while(self) -> None:
        self.record(port=1)
        shell = self.shell()
        io = BufferIO()
        d = shell.run_line("watch 5", io)
        self.cluster.settle()
        self.assertEqual(io.stdout, ["present 10.0.0.9:1 - Sleeper 1 [Registered]"])
        added = self.record(port=2)
        self.cluster.settle()
        self.successResultOf(self.writer.remove(added))
        self.cluster.settle()
        self.assertNoResult(d)
        self.clock.advance(5)
        self.assertEqual(self.successResultOf(d), 0)
        self.assertEqual(
            io.stdout[1:],
            [
                "added 10.0.0.9:2 - Sleeper 1 [Registered]",
                "removed 10.0.0.9:2 - Sleeper 1 [Registered]",
            ],
        )
        self.assertEqual(self.cluster.registry.store.watches, [])

    def test_watch_until_cancelled_json(self) -> None:
        shell = self.shell()
        io = BufferIO()
        d = shell.run_line("watch --json", io)
        self.cluster.settle()
        self.record(port=3)
        self.cluster.settle()
        d.cancel()
        self.assertEqual(self.successResultOf(d), 0)
        (event,) = [json.loads(line) for line in io.stdout]
        self.assertEqual((event["event"], event["instance"]["port"]), ("added", 3))
        self.assertEqual(self.cluster.registry.store.watches, [])


class CompletionTests(ShellTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.cluster.add(Fibonacci(), version="2", region="north")
        self.cluster.add(TestService(), version="1", region="south")

    def complete(self, shell: Shell, line: str) -> list[str]:
        return self.successResultOf(shell.complete(line))

    def test_commands(self) -> None:
        shell = self.shell()
        self.assertEqual(self.complete(shell, "ins"), ["instances "])
        self.assertEqual(self.complete(shell, "re"), ["region ", "regions ", "register ",
                                                      "registered ", "reset ", "restart "])  # fmt: skip
        self.assertIn("python ", self.complete(shell, ""))

    def test_live_values(self) -> None:
        shell = self.shell()
        self.assertEqual(self.complete(shell, "service F"), ["service Fibonacci "])
        self.assertEqual(
            self.complete(shell, "service "), ["service Fibonacci ", "service TestService "]
        )
        self.assertEqual(self.complete(shell, "region "), ["region north ", "region south "])
        self.assertEqual(self.complete(shell, "host 10"), ["host 10.0.0.1 "])
        self.assertEqual(self.complete(shell, "call Te"), ["call TestService "])
        # Values are scoped by the other filters.
        self.sh(shell, "region south")
        self.assertEqual(self.complete(shell, "service "), ["service TestService "])
        self.assertEqual(self.complete(shell, "version "), ["version 1 "])

    def test_filter_names_and_fixed_values(self) -> None:
        shell = self.shell()
        self.assertEqual(self.complete(shell, "reset re"), ["reset region ", "reset registered "])
        self.assertEqual(self.complete(shell, "registered t"), ["registered true "])
        self.assertEqual(self.complete(shell, "instances x"), [])


class HistoryTests(SynchronousTestCase):
    def test_kept_in_a_private_file(self) -> None:
        path = os.path.join(tempfile.mkdtemp(), "sub", "history")
        history = History(path, limit=3)
        self.assertEqual(history.load(), [])
        for line in (b"one", b"  ", b"two", b"three", b"four"):
            history.append(line)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertEqual(History(path, limit=3).load(), [b"two", b"three", b"four"])

    def test_none(self) -> None:
        history = History(None)
        history.append(b"x")
        self.assertEqual(history.load(), [])


class Terminal:
    """
    The shell on an insults terminal over a L{StringTransport}.
    """

    def __init__(self, case: ShellTestCase, history: History, **shell_args: Any) -> None:
        self.closed = False
        self.protocol = ServerProtocol(
            ShellProtocol, lambda: case.shell(**shell_args), history, self._closed
        )
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)
        self.case = case

    def _closed(self) -> None:
        self.closed = True

    def type(self, data: bytes) -> None:
        self.protocol.dataReceived(data)
        for _ in range(3):
            self.case.cluster.settle()

    def screen(self) -> str:
        return self.transport.value().decode("utf-8", "replace").replace("\r\n", "\n")

    def clear(self) -> None:
        self.transport.clear()

    @property
    def shell(self) -> ShellProtocol:
        return self.protocol.terminalProtocol  # type: ignore[return-value]


class TerminalTests(ShellTestCase):
    UP = b"\x1b[A"

    def setUp(self) -> None:
        super().setUp()
        self.cluster.add(Fibonacci())
        self.cluster.add(TestService())
        self.history_path = os.path.join(tempfile.mkdtemp(), "history")

    def terminal(self, **shell_args: Any) -> Terminal:
        return Terminal(self, History(self.history_path), **shell_args)

    def test_banner_prompt_and_command(self) -> None:
        t = self.terminal()
        self.assertIn("Skynet Interactive Shell", t.screen())
        self.assertTrue(t.screen().endswith("> ") or "> \x1b" in t.screen())
        t.clear()
        t.type(b"services\r")
        self.assertIn("Fibonacci\nTestService\n> ", t.screen())

    def test_tab_completes_a_service(self) -> None:
        t = self.terminal()
        t.type(b"serv\t")
        self.assertEqual(b"".join(t.shell.lineBuffer), b"service")
        t.type(b" Fi\t")
        self.assertEqual(b"".join(t.shell.lineBuffer), b"service Fibonacci ")
        t.clear()
        t.type(b"\r")
        self.assertIn("Service: Fibonacci", t.screen())
        self.assertEqual(t.shell.shell.filters.service, "Fibonacci")

    def test_tab_lists_candidates(self) -> None:
        t = self.terminal()
        t.type(b"st")
        t.clear()
        t.type(b"\t")
        self.assertIn("stats  stop", t.screen())
        self.assertEqual(b"".join(t.shell.lineBuffer), b"st")

    def test_history_across_sessions(self) -> None:
        t = self.terminal()
        t.type(b"regions\r")
        t.type(b"hosts\r")
        t.protocol.connectionLost(None)
        self.assertTrue(t.closed)
        t2 = self.terminal()
        t2.type(self.UP)
        self.assertEqual(b"".join(t2.shell.lineBuffer), b"hosts")
        t2.type(self.UP)
        self.assertEqual(b"".join(t2.shell.lineBuffer), b"regions")
        t2.clear()
        t2.type(b"\r")
        self.assertIn("unknown", t2.screen())

    def test_confirmation_then_action(self) -> None:
        admin_instance = self.record(port=4)
        t = self.terminal(interactive=True)
        t.type(b"port 4\r")
        t.clear()
        t.type(b"stop\r")
        self.assertTrue(t.screen().endswith("1 instance will be stopped, Are you sure? (Y/N) > "))
        t.type(b"Y\r")
        self.assertIn(f"Stopped service with UUID {admin_instance.uuid}.", t.screen())
        self.assertEqual(len(self.admin.calls), 1)
        # The answer is not a command in the history.
        self.assertNotIn(b"Y", History(self.history_path).load())

    def test_ctrl_c_declines_and_interrupts(self) -> None:
        self.record(port=4)
        t = self.terminal(interactive=True)
        t.type(b"stop\r")
        t.type(b"\x03")
        self.assertEqual(self.admin.calls, [])
        t.clear()
        t.type(b"watch\r")
        self.assertIn("present", t.screen())
        self.assertIsNotNone(t.shell.running)
        t.type(b"\x03")
        self.assertIsNone(t.shell.running)
        self.assertTrue(t.screen().endswith("> "))
        self.assertEqual(self.cluster.registry.store.watches, [])

    def test_python_and_back(self) -> None:
        t = self.terminal(daemon="D")
        t.type(b"python\r")
        self.assertIn("Python manhole", t.screen())
        t.type(b"sorted(registry.query(Query()).result, key=lambda i: i.name)[0].name\r")
        self.assertIn("'Fibonacci'", t.screen())
        t.type(b"daemon\r")
        self.assertIn("'D'", t.screen())
        t.clear()
        t.type(b"\x04")
        self.assertIsNone(t.shell.python_shell)
        self.assertTrue(t.screen().endswith("> "))
        t.type(b"services\r")
        self.assertIn("TestService", t.screen())

    def test_exit_and_ctrl_d(self) -> None:
        t = self.terminal()
        t.type(b"exit\r")
        self.assertTrue(t.transport.disconnecting)
        t2 = self.terminal()
        t2.type(b"\x04")
        self.assertTrue(t2.transport.disconnecting)

    def test_resize_does_not_clear(self) -> None:
        t = self.terminal()
        t.clear()
        t.shell.terminalSize(100, 40)
        self.assertEqual(t.screen(), "")
        self.assertEqual((t.shell.width, t.shell.height), (100, 40))


class NoMatchTests(ShellTestCase):
    """
    Queries that find nothing exit 1 with one line on stderr, so that a typo
    does not look like an empty cluster.
    """

    def test_queries_matching_nothing(self) -> None:
        self.record(name="Sleeper", port=3)
        shell = self.shell()
        for line in ["instances --service Nope", "stats --service Nope", "topology --host nope",
                     "hosts --service Nope", "versions --service Nope", "services --region Mars",
                     "regions --port 99", "instances --service Nope --json"]:  # fmt: skip
            status, io = self.sh(shell, line)
            self.assertEqual((status, io.output), (1, ""), line)
            self.assertEqual(len(io.errors.splitlines()), 1, line)
            self.assertIn("no instance matches the filters (", io.errors)
        status, io = self.sh(shell, "instances --service Sleeper")
        self.assertEqual(status, 0)
        self.assertIn("Sleeper 1", io.output)

    def test_empty_registry(self) -> None:
        status, io = self.sh(self.shell(), "instances")
        self.assertEqual((status, io.output, io.errors), (1, "", "no instance in the registry"))


class DaemonActionTests(ShellTestCase):
    def test_acting_on_a_daemon_says_how_to_stop_one(self) -> None:
        self.record(name="SkynetDaemon", host="10.0.0.5", port=4, uuid="d1", pid=4242)
        for action in ("stop", "restart", "unregister"):
            status, io = self.sh(self.shell(), f"--service SkynetDaemon {action} --yes")
            self.assertEqual(status, 1)
            self.assertEqual(io.output, "")
            (line,) = io.errors.splitlines()
            self.assertIn(f"SkynetDaemon instances are not acted on with '{action}'", line)
            self.assertIn("on 10.0.0.5: kill 4242", line)
        self.assertEqual(self.admin.calls, [])


class OutputTests(ShellTestCase):
    def test_iso_time(self) -> None:
        from skynet.shell import iso_time

        self.assertEqual(iso_time("2026-12-01T07:47:34Z+0000"), "2026-12-01T07:47:34Z")
        self.assertEqual(iso_time("2026-12-01T08:47:34Z+0100"), "2026-12-01T07:47:34Z")
        self.assertEqual(iso_time(""), "")
        self.assertEqual(iso_time("soon"), "soon")

    def test_stats_grammar_and_times(self) -> None:
        instance = self.record(port=5)
        stats = {"RequestsServed": 1, "Errors": 0, "Clients": 1, "AverageResponseTime": 54836,
                 "LastRequest": "2026-12-01T08:47:34Z+0100"}  # fmt: skip
        self.successResultOf(self.writer.publish_stats(instance, stats))
        status, io = self.sh(self.shell(), "stats")
        self.assertEqual(status, 0, io.errors)
        self.assertIn("1 request, 0 errors, 1 client, avg 0.05 ms", io.output)
        self.assertIn("last request 2026-12-01T07:47:34Z", io.output)
        self.assertNotIn("+0", io.output)
        status, io = self.sh(self.shell(), "stats --json")
        (row,) = json.loads(io.output)
        self.assertEqual(row["stats"]["LastRequest"], "2026-12-01T07:47:34Z")
        self.assertEqual(row["stats"]["AverageResponseTime"], 54836)


class CommandTableTests(SynchronousTestCase):
    def test_every_command_is_in_the_table_and_completed(self) -> None:
        from skynet.shell import CLUSTER_COMMANDS, COMMAND_TABLE, COMMANDS

        self.assertEqual((set(COMMAND_TABLE) - {"h"}) | CLUSTER_COMMANDS, set(COMMANDS))

    def test_cluster_commands_in_the_shell(self) -> None:
        """
        The cluster's commands run in the shell on its registry, their
        options their own (before or after the command), output line by
        line, and their exit codes.
        """
        cluster = LocalCluster()
        self.addCleanup(cluster.stop)
        shell = Shell(cluster.registry, cluster.client(), reactor=cluster.clock)
        with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
            f.write('[services.Fibonacci]\nrun = "examples.fibonacci:Fibonacci"\ninstances = 3\n')
        self.addCleanup(os.unlink, f.name)

        def run(line: str) -> tuple[int, BufferIO]:
            io = BufferIO()
            return self.successResultOf(shell.run_line(line, io)), io

        status, io = run(f"apply {f.name} --dry-run")
        self.assertEqual(
            (status, io.stdout[0]),
            (0, "+ Fibonacci: 3 x examples.fibonacci:Fibonacci (spread host)"),
        )
        status, io = run(f"apply {f.name}")
        self.assertEqual(
            (status, io.stdout),
            (
                0,
                [
                    "+ Fibonacci: 3 x examples.fibonacci:Fibonacci (spread host)",
                    "Applied 1 change(s).",
                ],
            ),
        )
        status, io = run("--json deployments")
        self.assertEqual(status, 0)
        [row] = json.loads("\n".join(io.stdout))["deployments"]
        self.assertEqual(
            (row["name"], row["desired"], row["state"]), ("Fibonacci", 3, "progressing")
        )
        status, io = run("scale Fibonacci=5")
        self.assertEqual((status, io.stdout[0]), (0, "~ Fibonacci: instances 3 -> 5"))
        status, io = run("scale Fibonacci=lots")
        self.assertEqual(status, 2)
        self.assertIn("Fibonacci=lots", "\n".join(io.stderr))
        status, io = run("undeploy Nobody")
        self.assertEqual(
            (status, io.stderr),
            (1, ["sky undeploy: no deployment named 'Nobody' (`sky deployments` lists them)"]),
        )
        self.assertEqual(run("undeploy Fibonacci")[0], 0)
        self.assertEqual(run("deployments")[1].stdout[0],
                         "No deployments (`sky apply FILE` makes some).")  # fmt: skip

    def test_argument_counts_come_from_the_table(self) -> None:
        cluster = LocalCluster()
        self.addCleanup(cluster.stop)
        shell = Shell(cluster.registry, cluster.client(), reactor=cluster.clock)
        for line, usage in [("stats x", "Usage: stats"), ("call A", "Usage: call SERVICE"),
                            ("reset a b", "Usage: reset [<filter>]"), ("stop now", "Usage: stop"),
                            ("deploy", "Usage: deploy <MODULE:CLASS>"),
                            ("service a b", "Usage: service [<service>]")]:  # fmt: skip
            io = BufferIO()
            self.assertEqual(self.successResultOf(shell.run_line(line, io)), 2, line)
            self.assertTrue(io.errors.startswith(usage), (line, io.errors))
