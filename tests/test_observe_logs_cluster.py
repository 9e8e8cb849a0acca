"""
Logs searched live on a real local cluster: a C{twistd skynet-daemon}
running two services (Front calls Back, passing its request info on), and
C{sky logs} run as an operator runs it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import uuid as uuid_module

import pytest
from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.trial.unittest import TestCase

from skynet.client import Client
from skynet.protocol import RequestInfo
from skynet.registry import Query
from skynet.registry.files import FileRegistry
from skynet.service import Service
from tests.processes import ROOT, child_env, sleep, wait_for

pytestmark = pytest.mark.slow


class Back(Service):
    """
    Logs inside its method, and answers.
    """

    log = Logger()

    def Echo(self, request_info, params):
        self.log.info("back echoing {name}", name=params.get("name"))
        return {"name": params.get("name")}


class Front(Service):
    """
    Logs inside its method and calls Back with its request info.
    """

    log = Logger()

    async def Hello(self, request_info, params):
        self.log.info("front got {name}", name=params.get("name"))
        answer = await self.client.service("Back").call("Echo", params, request_info)
        return {"echo": answer["name"]}


def sky(registry: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "skynet.sky", "--registry", registry, *args],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)  # fmt: skip


class LogsOnAClusterTests(TestCase):
    timeout = 180

    async def start_cluster(self) -> None:
        from tests.test_daemon import DaemonProcess, kill_strays

        root = tempfile.mkdtemp(prefix="skynet-observe-")
        self.addCleanup(kill_strays, root)
        self.url = f"file://{root}/registry"
        self.registry = FileRegistry(os.path.join(root, "registry"), reactor=reactor)
        await self.registry.start()
        self.addCleanup(self.registry.stop)
        self.client = Client(registry=self.registry, reactor=reactor)
        self.addCleanup(self.client.stop)
        deploy = os.path.join(root, "deploy")
        with open(deploy, "w") as f:
            args = "--listen tcp:0:interface=127.0.0.1 --stats-interval 0.5"
            f.write(f"tests.test_observe_logs_cluster:Back {args}\n")
            f.write(f"tests.test_observe_logs_cluster:Front {args}\n")
        self.daemon = DaemonProcess(root, "--deploy", deploy).start()
        self.addCleanup(self.daemon.stop)
        self.log_dir = os.path.join(root, "logs")

        async def up() -> bool:
            found = await self.registry.query(Query(registered=True))
            return {"SkynetDaemon", "Front", "Back"} <= {i.name for i in found}

        await wait_for(up, timeout=60, what="the daemon, Front and Back registered")

    async def hello(self, name: str) -> str:
        request_id = str(uuid_module.uuid4())
        answer = await self.client.service("Front").call(
            "Hello", {"name": name}, RequestInfo(request_id), timeout=20
        )
        self.assertEqual(answer, {"echo": name})
        return request_id

    async def logs(self, *args: str) -> list[dict]:
        result = await deferToThread(sky, self.url, "logs", "--json", *args)
        self.assertEqual(result.returncode, 0, result.stderr)
        return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]

    async def test_grep_request_id_and_follow(self) -> None:
        await self.start_cluster()
        name = f"zebra-{uuid_module.uuid4().hex[:8]}"
        request_id = await self.hello(name)

        # A line written inside a remote method, found by --grep, with its request id.
        async def grepped():
            return await self.logs("--grep", f"front got {name}$")

        [event] = await wait_for(grepped, timeout=30, what="the line found by sky logs --grep")
        self.assertEqual(event["request_id"], request_id)
        self.assertEqual(event["service"], "Front")
        self.assertEqual(event["method"], "Hello")
        self.assertEqual(event["daemon_host"], "127.0.0.1")

        # A search by request id: the lines of every service the request touched.
        events = await self.logs("--request-id", request_id)
        self.assertEqual({e["service"] for e in events}, {"Front", "Back"})
        self.assertEqual(sorted(e["text"] for e in events),
                         [f"back echoing {name}", f"front got {name}"])  # fmt: skip
        self.assertEqual(events, sorted(events, key=lambda e: e["time"]))

        # The text form: one line per event, with host and instance.
        text = await deferToThread(sky, self.url, "logs", "--request-id", request_id)
        self.assertEqual(text.returncode, 0, text.stderr)
        lines = text.stdout.splitlines()
        self.assertEqual(len(lines), 2)
        self.assertRegex(lines[0], r"^\S+ 127\.0\.0\.1 Front/\S{8} INFO +front got ")

        # A bad regular expression is a usage error that says so.
        bad = await deferToThread(sky, self.url, "logs", "--grep", "(oops")
        self.assertEqual(bad.returncode, 2)
        self.assertIn("bad regular expression", bad.stderr)

        # -f shows a new line as it is written, until interrupted.
        follow = subprocess.Popen(
            [sys.executable, "-m", "skynet.sky", "--registry", self.url, "logs", "-f",
             "--grep", "follow-me", "--service", "Back"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
            env=child_env(),
        )  # fmt: skip
        self.addCleanup(lambda: follow.poll() is not None or follow.kill())
        lines_seen: list[str] = []
        threading.Thread(target=lambda: lines_seen.extend(follow.stdout), daemon=True).start()
        await sleep(3)  # let it start following (an earlier line would show as well)
        await self.hello("follow-me-1")
        await wait_for(lambda: any("back echoing follow-me-1" in x for x in lines_seen),
                       timeout=20, what="the followed line")  # fmt: skip
        await self.hello("follow-me-2")
        await wait_for(lambda: any("back echoing follow-me-2" in x for x in lines_seen),
                       timeout=20, what="the second followed line")  # fmt: skip
        follow.send_signal(signal.SIGINT)
        code = await deferToThread(follow.wait, 30)
        self.assertEqual(code, 0, follow.stderr.read() if follow.stderr else "")
        self.assertEqual(sum("follow-me-1" in x for x in lines_seen), 1)  # never twice


class LogsAcrossHostsTests(TestCase):
    """
    Two "hosts" on loopback (127.0.0.1 and 127.0.0.2), a daemon each with
    its own log directory: Front on one, Back on the other.
    """

    timeout = 180

    async def test_request_id_search_merges_hosts(self) -> None:
        from tests.test_daemon import loopback_cluster

        url, registry, client = await loopback_cluster(self, "skynet-observe-", [
            ("127.0.0.1", "tests.test_observe_logs_cluster:Front"),
            ("127.0.0.2", "tests.test_observe_logs_cluster:Back"),
        ])  # fmt: skip

        async def up() -> bool:
            found = await registry.query(Query(registered=True))
            hosts = {i.host for i in found if i.name == "SkynetDaemon"}
            return {"Front", "Back"} <= {i.name for i in found} and len(hosts) == 2

        await wait_for(up, timeout=60, what="two daemons, Front and Back registered")
        request_id = str(uuid_module.uuid4())
        await client.service("Front").call("Hello", {"name": "across"}, RequestInfo(request_id),
                                           timeout=20)  # fmt: skip

        async def both():
            result = await deferToThread(sky, url, "logs", "--json", "--request-id", request_id)
            self.assertEqual(result.returncode, 0, result.stderr)
            events = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
            return events if len(events) == 2 else None

        events = await wait_for(both, timeout=30, what="the lines of both hosts")
        self.assertEqual([(e["service"], e["daemon_host"], e["host"]) for e in events],
                         [("Front", "127.0.0.1", "127.0.0.1"),
                          ("Back", "127.0.0.2", "127.0.0.2")])  # fmt: skip
        # The host filter asks only that host's daemon.
        only = await deferToThread(sky, url, "logs", "--json", "--request-id", request_id,
                                   "--host", "127.0.0.2")  # fmt: skip
        self.assertEqual(only.returncode, 0, only.stderr)
        [event] = [json.loads(x) for x in only.stdout.splitlines() if x.strip()]
        self.assertEqual(event["service"], "Back")
