"""
Spans through the daemon, on real processes: a C{twistd skynet-daemon}
supervising two Fibonacci children answers one request's spans with one
C{SearchSpans} call (it asks its children's admin listeners), and
L{tracing.gather} needs no other call; the C{slowest} form lists the
request too.  Then two daemons on two loopback "hosts": one call each.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import pytest
from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from skynet.admin import call_instance
from skynet.client import Client, tcp_connector
from skynet.control import DAEMON_SERVICE, SEARCH_SPANS
from skynet.observe import tracing
from skynet.protocol import DEFAULT_MAX_FRAME, RequestInfo
from skynet.registry import Query
from skynet.registry.files import FileRegistry
from tests.processes import ROOT, wait_for

pytestmark = pytest.mark.slow


def _walk(calls: list[dict]) -> list[dict]:
    out = []
    for call in calls:
        out.append(call)
        out.extend(_walk(call["children"]))
    return out


class SpansThroughTheDaemonTests(TestCase):
    timeout = 180

    async def test_one_call_per_host_answers_for_its_children(self) -> None:
        from tests.test_daemon import DaemonProcess, kill_strays

        root = tempfile.mkdtemp(prefix="skynet-trace-daemon-")
        self.addCleanup(kill_strays, root)
        registry = FileRegistry(os.path.join(root, "registry"), reactor=reactor)
        await registry.start()
        self.addCleanup(registry.stop)
        client = Client(registry=registry, reactor=reactor)
        self.addCleanup(client.stop)
        deploy = os.path.join(root, "deploy")
        with open(deploy, "w") as f:
            args = "--listen tcp:0:interface=127.0.0.1 --stats-interval 0.5"
            f.write(f"examples.fibonacci:Fibonacci {args}\n" * 2)
        daemon_process = DaemonProcess(root, "--deploy", deploy).start()
        self.addCleanup(daemon_process.stop)

        async def up() -> list | None:
            found = await registry.query(Query(registered=True))
            fibs = [i for i in found if i.name == "Fibonacci"]
            daemons = [i for i in found if i.name == DAEMON_SERVICE]
            return [daemons, fibs] if len(fibs) == 2 and len(daemons) == 1 else None

        [daemon], fibs = await wait_for(up, timeout=90, what="the daemon and two Fibonacci")
        self.assertTrue(all(f.admin is not None for f in fibs))

        request_id = "trace-daemon-6"
        fibonacci = client.service("Fibonacci")
        answer = await fibonacci.call("Index", {"index": 6}, RequestInfo(request_id), timeout=30)
        self.assertEqual(answer["value"], 8)

        # Independently: how many calls of Index the instances served
        # (their published statistics, settled).
        async def served() -> int:
            total = 0
            for instance in fibs:
                node = await registry.get_stats(instance) or {}
                total += (node.get("Methods", {}).get("Index") or {}).get("Requests", 0)
            return total

        readings: list[int] = []

        async def settled() -> int | None:
            readings.append(await served())
            return readings[-1] if len(readings) > 8 and len(set(readings[-8:])) == 1 else None

        total = await wait_for(settled, timeout=60, interval=0.25, what="statistics settled")

        # The daemon's one answer: every server span of the request, from
        # both children, labelled with the child that served it.
        answer = await call_instance(reactor, daemon, SEARCH_SPANS,
                                     {"request_id": request_id}, 10.0)  # fmt: skip
        self.assertEqual(answer["errors"], [])
        self.assertEqual(sorted(answer["instances"]), sorted(f.uuid for f in fibs))
        servers = [s for s in answer["spans"] if s["kind"] == "server"]
        where = {f.uuid: f"{f.host}:{f.port}" for f in fibs}
        self.assertEqual([s["address"] for s in servers], [where[s["uuid"]] for s in servers])
        self.assertEqual({s["uuid"] for s in servers}, set(where))  # both served some
        self.assertEqual(len(servers), total)

        # gather, as sky trace and the dashboard use it: only the daemon is
        # asked (its children are covered), and the tree has every call.
        connected: list[str] = []
        tcp = tcp_connector(reactor, 10.0, DEFAULT_MAX_FRAME)

        def connector(instance):
            connected.append(instance.name)
            return tcp(instance)

        instances = await registry.query(Query())
        found = await tracing.gather(reactor, instances, {"request_id": request_id}, 10.0,
                                     connector)  # fmt: skip
        self.assertEqual(connected, [DAEMON_SERVICE])
        self.assertEqual(found.errors, [])
        roots = tracing.build_tree(found.spans)
        self.assertEqual(len(roots), 1)  # this process's client span is the root
        self.assertIsNotNone(roots[0]["client"])
        self.assertEqual(tracing.count_calls(roots), total)

        # sky trace, as an operator runs it, reads the same tree.
        result = await deferToThread(
            subprocess.run,
            [sys.executable, "-m", "skynet.sky", "--registry", f"file://{root}/registry",
             "trace", request_id, "--json"],
            capture_output=True, text=True, timeout=60, cwd=ROOT,
        )  # fmt: skip
        self.assertEqual(result.returncode, 0, result.stderr)
        doc = json.loads(result.stdout)
        self.assertEqual(len(_walk(doc["calls"])), total)
        self.assertTrue(all(c["server_spans"] for c in _walk(doc["calls"])))

        # The slowest form: one span per request, longest first, each the
        # longest of its request.
        again = await fibonacci.call("Index", {"index": 7}, RequestInfo("trace-daemon-7"),
                                     timeout=30)  # fmt: skip
        self.assertEqual(again["value"], 13)
        answer = await call_instance(reactor, daemon, SEARCH_SPANS, {"slowest": 10, "since": 600},
                                     10.0)  # fmt: skip
        slow = answer["spans"]
        self.assertEqual(sorted(s["request_id"] for s in slow), [request_id, "trace-daemon-7"])
        durations = [s["duration"] for s in slow]
        self.assertEqual(durations, sorted(durations, reverse=True))
        longest = max(s["duration"] for s in servers)
        [mine] = [s for s in slow if s["request_id"] == request_id]
        self.assertEqual(mine["duration"], longest)
        self.assertEqual((mine["service"], mine["method"]), ("Fibonacci", "Index"))

        # sky trace --slowest, as an operator lists them.
        result = await deferToThread(
            subprocess.run,
            [sys.executable, "-m", "skynet.sky", "--registry", f"file://{root}/registry",
             "trace", "--slowest", "5", "--since", "10m"],
            capture_output=True, text=True, timeout=60, cwd=ROOT,
        )  # fmt: skip
        self.assertEqual(result.returncode, 0, result.stderr)
        lines = result.stdout.splitlines()
        self.assertEqual(sorted(line.split()[-1] for line in lines),
                         [request_id, "trace-daemon-7"])  # fmt: skip
        self.assertTrue(all(" Fibonacci.Index 127.0.0.1:" in line for line in lines), lines)

    async def test_two_hosts_one_call_each(self) -> None:
        """
        Two "hosts" on loopback (127.0.0.2, 127.0.0.3), each a daemon with
        one Fibonacci: the tree of a request that reached both, from one
        C{SearchSpans} call per host, each server span labelled with the
        host that served it.
        """
        from tests.test_daemon import loopback_cluster

        hosts = ["127.0.0.2", "127.0.0.3"]
        url, registry, client = await loopback_cluster(
            self, "skynet-trace-hosts-", [(host, "examples.fibonacci:Fibonacci") for host in hosts]
        )

        async def up() -> list | None:
            found = await registry.query(Query(registered=True))
            fibs = [i for i in found if i.name == "Fibonacci"]
            daemons = [i for i in found if i.name == DAEMON_SERVICE]
            ready = sorted(i.host for i in fibs) == hosts == sorted(d.host for d in daemons)
            return fibs if ready else None

        fibs = await wait_for(up, timeout=90, what="a daemon and a Fibonacci on each host")
        # One request that reaches both hosts (a Fibonacci keeps its recursion
        # on its own host, the client's balancer preferring it): a call to each.
        request_id = "trace-two-hosts"
        for host in hosts:
            fibonacci = client.service("Fibonacci", host=host)
            answer = await fibonacci.call("Index", {"index": 6}, RequestInfo(request_id),
                                          timeout=30)  # fmt: skip
            self.assertEqual(answer["value"], 8)

        readings: list[int] = []

        async def settled() -> int | None:
            total = 0
            for instance in fibs:
                node = await registry.get_stats(instance) or {}
                total += (node.get("Methods", {}).get("Index") or {}).get("Requests", 0)
            readings.append(total)
            return total if len(readings) > 8 and len(set(readings[-8:])) == 1 else None

        total = await wait_for(settled, timeout=60, interval=0.25, what="statistics settled")

        connected: list[tuple[str, str]] = []
        tcp = tcp_connector(reactor, 10.0, DEFAULT_MAX_FRAME)

        def connector(instance):
            connected.append((instance.name, instance.host))
            return tcp(instance)

        found = await tracing.gather(reactor, await registry.query(Query()),
                                     {"request_id": request_id}, 10.0, connector)  # fmt: skip
        self.assertEqual(sorted(connected), [(DAEMON_SERVICE, h) for h in hosts])
        self.assertEqual(found.errors, [])
        roots = tracing.build_tree(found.spans)
        self.assertEqual(len(roots), 2)  # this process's two calls
        self.assertEqual(tracing.count_calls(roots), total)
        servers = [s for s in found.spans if s["kind"] == "server"]
        where = {f.uuid: f"{f.host}:{f.port}" for f in fibs}
        self.assertEqual([s["address"] for s in servers], [where[s["uuid"]] for s in servers])
        self.assertEqual({s["address"].split(":")[0] for s in servers}, set(hosts))
