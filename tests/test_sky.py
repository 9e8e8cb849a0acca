"""
C{sky} against a real local cluster: a C{twistd -n skynet-daemon}
supervising two Fibonacci instances, and C{twistd -n skynet-service}
processes no daemon manages, on a temporary embedded registry.  Every
command runs as C{python -m skynet.sky ...}, as an operator would run it.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from skynet.registry import Query
from skynet.registry.base import Instance
from skynet.registry.files import FileRegistry
from tests.processes import ROOT, ServiceProcess, twistd


def wait_until(predicate: Callable[[], Any], timeout: float = 20.0, what: str = "it") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


class Cluster:
    """
    A temporary skynet home and registry, the processes started in it, and
    C{sky} run against it.  L{stop} ends every process, whatever happened.
    """

    def __init__(self) -> None:
        self.home = tempfile.mkdtemp(prefix="skynet-sky-")
        self.root = os.path.join(self.home, "registry")
        self.url = f"file://{self.root}"
        self.env = {k: v for k, v in os.environ.items() if k != "SKYNET_REGISTRY"}
        self.env.update(SKYNET_HOME=self.home, PYTHONUNBUFFERED="1")
        self.registry = FileRegistry(self.root, reactor=Clock(), use_inotify=False)
        self.services: list[ServiceProcess] = []
        self.daemon: subprocess.Popen | None = None
        self.daemon_log = os.path.join(self.home, "daemon.log")
        self.seen_pids: set[int] = set()

    # Processes

    def start_daemon(self, deploy: list[str], *args: str) -> subprocess.Popen:
        deploy_file = os.path.join(self.home, "deploy.txt")
        with open(deploy_file, "w") as f:
            f.write("\n".join(deploy) + "\n")
        command = [
            twistd(), "-n", "--pidfile=", "skynet-daemon",
            "--registry", self.url,
            "--listen", "tcp:0:interface=127.0.0.1",
            "--deploy", deploy_file,
            "--log-dir", os.path.join(self.home, "logs"),
            "--stats-interval", "0.5",
            "--stop-grace", "5",
            "--kill-time", "2",
            *args,
        ]  # fmt: skip
        with open(self.daemon_log, "ab") as log:
            self.daemon = subprocess.Popen(
                command, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        return self.daemon

    def start_service(self, spec: str, *args: str) -> ServiceProcess:
        process = ServiceProcess(spec, self.url, *args, log_dir=self.home,
                                 env={"SKYNET_HOME": self.home})  # fmt: skip
        self.services.append(process.start())
        return process

    def stop(self) -> None:
        try:
            self.seen_pids.update(i.pid for i in self.instances() if i.pid)
        except Exception:
            pass
        if self.daemon is not None and self.daemon.poll() is None:
            self.daemon.send_signal(signal.SIGCONT)
            self.daemon.terminate()
            try:
                self.daemon.wait(20)
            except subprocess.TimeoutExpired:
                self.daemon.kill()
                self.daemon.wait(5)
        for process in self.services:
            process.stop()
        # Children of the daemon end with it; make sure of it, killing only
        # processes that still run on this cluster's registry.
        for pid in self.seen_pids:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if self.root.encode() not in f.read():
                        continue
                os.kill(pid, signal.SIGKILL)
            except (OSError, ProcessLookupError):
                pass
        shutil.rmtree(self.home, ignore_errors=True)

    # The registry, read straight from disk

    def instances(self, **query: Any) -> list[Instance]:
        d = self.registry.query(Query(**query))
        found: list[Instance] = d.result  # type: ignore[attr-defined]
        self.seen_pids.update(i.pid for i in found if i.pid)
        return found

    def wait_for_instances(self, count: int, timeout: float = 30.0, **query: Any) -> list[Instance]:
        return wait_until(
            lambda: (found := self.instances(**query)) and len(found) == count and found,
            timeout,
            f"{count} instances matching {query}",
        )

    def logs(self) -> str:
        parts = []
        for path in [self.daemon_log] + [str(p.log_path) for p in self.services]:
            try:
                with open(path, errors="replace") as f:
                    parts.append(f"--- {path}\n{f.read()[-4000:]}")
            except OSError:
                pass
        return "\n".join(parts)

    def daemon_uuid(self) -> str:
        [daemon] = self.instances(service="SkynetDaemon")
        return daemon.uuid

    # sky

    def sky_command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "skynet.sky", "--registry", self.url, *args]

    def sky(
        self, *args: str, input: str | None = None, timeout: float = 60.0
    ) -> subprocess.CompletedProcess:
        return subprocess.run(
            self.sky_command(*args),
            cwd=ROOT,
            env=self.env,
            input=input if input is not None else "",
            capture_output=True,
            text=True,
            timeout=timeout,
        )


class SkyTests(SynchronousTestCase):
    """
    One cluster for the class: the daemon with two supervised Fibonacci,
    and one TestService that no daemon manages.
    """

    cluster: Cluster

    @classmethod
    def setUpClass(cls) -> None:
        cls.cluster = Cluster()
        try:
            cls.cluster.start_daemon(["examples.fibonacci:Fibonacci --stats-interval 0.5"] * 2)
            cls.cluster.start_service("examples.testservice:TestService")
            cls.cluster.wait_for_instances(4, registered=True)
        except BaseException:
            logs = cls.cluster.logs()
            cls.cluster.stop()
            raise AssertionError(f"the cluster did not start:\n{logs}") from None

    @classmethod
    def tearDownClass(cls) -> None:
        cls.cluster.stop()

    def sky(self, *args: str, status: int = 0, **kwargs: Any) -> subprocess.CompletedProcess:
        result = self.cluster.sky(*args, **kwargs)
        self.assertNotIn("Traceback", result.stderr)
        self.assertEqual(
            result.returncode,
            status,
            f"sky {' '.join(args)}: stdout {result.stdout!r} stderr {result.stderr!r}\n"
            + (self.cluster.logs() if result.returncode != status else ""),
        )
        return result

    def lines(self, *args: str, **kwargs: Any) -> list[str]:
        return self.sky(*args, **kwargs).stdout.splitlines()

    def json(self, *args: str, **kwargs: Any) -> Any:
        return json.loads(self.sky(*args, "--json", **kwargs).stdout)

    def fibonacci(self) -> list[Instance]:
        return self.cluster.instances(service="Fibonacci")

    # Queries

    def test_queries(self) -> None:
        self.assertEqual(self.lines("services"), ["Fibonacci", "SkynetDaemon", "TestService"])
        self.assertEqual(self.json("services"), ["Fibonacci", "SkynetDaemon", "TestService"])
        self.assertEqual(self.lines("hosts"), ["127.0.0.1"])
        self.assertEqual(self.json("hosts"), ["127.0.0.1"])
        self.assertEqual(self.lines("regions"), ["unknown"])
        self.assertEqual(self.json("--service", "Fibonacci", "regions"), ["unknown"])
        self.assertEqual(self.lines("versions", "--service", "Fibonacci"), ["unknown"])
        self.assertEqual(self.json("--service=TestService", "versions"), ["unknown"])
        result = self.sky("versions", status=2)
        self.assertEqual(result.stderr.strip().count("\n"), 0)
        self.assertIn("Service name is required", result.stderr)

    def test_instances(self) -> None:
        found = self.cluster.instances()
        expected = [
            f"{i.host}:{i.port} - {i.name} {i.version}{' [Registered]' if i.registered else ''}"
            for i in found
        ]
        self.assertEqual(self.lines("instances"), expected)
        docs = self.json("instances", "--service", "Fibonacci")
        self.assertEqual({d["uuid"] for d in docs}, {i.uuid for i in self.fibonacci()})
        self.assertEqual({d["name"] for d in docs}, {"Fibonacci"})
        port = docs[0]["port"]
        self.assertEqual(self.lines("--port", str(port), "instances"),
                         [f"127.0.0.1:{port} - Fibonacci unknown [Registered]"])  # fmt: skip
        # Nothing unregistered: no output, status 1, the reason on stderr.
        result = self.sky("instances", "--registered", "false", status=1)
        self.assertEqual(result.stdout, "")
        self.assertEqual(result.stderr, "no instance matches the filters (registered=false)\n")

    def test_topology(self) -> None:
        lines = self.lines("topology")
        self.assertEqual(lines[:2], ["Region: unknown", "\tHost: 127.0.0.1"])
        self.assertIn("\t\tService: Fibonacci", lines)
        self.assertIn("\t\tService: TestService", lines)
        self.assertEqual(sum(1 for line in lines if line.startswith("\t\t\t\t127.0.0.1:")), 4)
        tree = self.json("topology")
        self.assertEqual(len(tree["unknown"]["127.0.0.1"]["Fibonacci"]["unknown"]), 2)

    def test_call(self) -> None:
        result = self.sky("call", "Fibonacci", "Index", '{"index": 10}')
        self.assertEqual(json.loads(result.stdout), {"index": 10, "value": 55})
        self.assertEqual(
            self.json("call", "TestService", "Upcase", '{"data": "sky"}'), {"data": "SKY"}
        )
        result = self.sky("call", "Fibonacci", "Index", '{"index": -1}', status=1)
        self.assertEqual(result.stdout, "")
        self.assertEqual(result.stderr, "Fibonacci.Index failed: negative index -1\n")
        result = self.sky("call", "NoSuchService", "Index", status=1)
        self.assertEqual(result.stderr, "no such service: NoSuchService\n")
        self.sky("call", "Fibonacci", "Index", "{not json", status=2)

    def test_stats(self) -> None:
        self.sky("call", "TestService", "Upcase", '{"data": "x"}')
        lines = wait_until(
            lambda: [
                line
                for line in self.lines("stats", "--service", "TestService")
                if "no statistics" not in line and " 0 requests" not in line
            ],
            10,
            "statistics with a request",
        )
        self.assertRegex(
            lines[0],
            r"^127\.0\.0\.1:\d+ - TestService unknown \[Registered\]: (1 request|[1-9]\d+ requests|"
            r"[2-9] requests), 0 errors, (1 client|\d+ clients), avg [\d.]+ ms, p50 [\d.]+ ms, "
            r"p99 [\d.]+ ms, last request \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$",
        )
        docs = self.json("stats")
        self.assertEqual(len(docs), 4)
        self.assertTrue(
            all("RequestsServed" in (d["stats"] or {"RequestsServed": 0}) for d in docs)
        )

    def test_user_errors_are_one_line(self) -> None:
        for args, status, text in [
            (("--registry", "zk://127.0.0.1:1/skynet", "services"), 1, "registry unreachable"),
            (("frobnicate",), 2, "Unknown command"),
            (("--port", "x", "instances"), 2, "port must be a number"),
            (("--service", "Nope", "stop", "--yes"), 1, "no instance matches the filters"),
            (("--service", "Nope", "instances"), 1, "no instance matches the filters"),
            (("--service", "Nope", "stats"), 1, "no instance matches the filters"),
            (("--service", "Nope", "topology"), 1, "no instance matches the filters"),
            (("--service", "Nope", "hosts"), 1, "no instance matches the filters"),
            (("--service", "Nope", "versions"), 1, "no instance matches the filters"),
            (
                ("--service", "SkynetDaemon", "stop", "--yes"),
                1,
                "SkynetDaemon instances are not acted on with 'stop'",
            ),
        ]:
            result = subprocess.run(
                [sys.executable, "-m", "skynet.sky", *args]
                if args[0] == "--registry"
                else self.cluster.sky_command(*args),
                cwd=ROOT, env=self.cluster.env, capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            self.assertEqual(result.returncode, status, (args, result.stderr))
            self.assertIn(text, result.stderr)
            self.assertEqual(result.stderr.count("\n"), 1, result.stderr)
            self.assertNotIn("Traceback", result.stderr)
        self.assertIn("Usage: sky", self.sky("help").stdout)

    def test_registry_directory_must_exist(self) -> None:
        """
        A file:// registry that names no directory is an error (a typo must
        not look like an empty cluster); --create-registry makes one.
        """
        typo = os.path.join(self.cluster.home, "registyr")
        command = [sys.executable, "-m", "skynet.sky", "--registry", f"file://{typo}", "services"]
        result = subprocess.run(command, cwd=ROOT, env=self.cluster.env, capture_output=True,
                                text=True, timeout=60)  # fmt: skip
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertEqual(result.stdout, "")
        self.assertIn(f"the directory {typo} does not exist", result.stderr)
        self.assertFalse(os.path.exists(typo))
        result = subprocess.run(command[:3] + ["--create-registry"] + command[3:], cwd=ROOT,
                                env=self.cluster.env, capture_output=True, text=True,
                                timeout=60)  # fmt: skip
        self.assertEqual(result.returncode, 1, result.stderr)  # empty: nothing matches
        self.assertEqual(result.stderr.strip(), "no instance in the registry")
        self.assertTrue(os.path.isdir(typo))

    # Actions

    def test_confirmation_prompt_and_yes(self) -> None:
        before = self.fibonacci()
        result = self.sky("--service", "Fibonacci", "unregister", input="N\n", status=1)
        self.assertEqual(
            result.stderr, "2 instances will be unregistered, Are you sure? (Y/N) > Cancelled.\n"
        )
        self.assertEqual(self.fibonacci(), before)
        result = self.sky("--service", "Fibonacci", "unregister", input="y\n")
        self.assertEqual(result.stderr, "2 instances will be unregistered, Are you sure? (Y/N) > ")
        self.assertEqual(
            sorted(result.stdout.splitlines()),
            sorted(f"Unregistered service with UUID {i.uuid}." for i in before),
        )
        wait_until(lambda: not any(i.registered for i in self.fibonacci()), 10, "unregistered")
        results = self.json("--service", "Fibonacci", "register", "--yes")
        self.assertEqual({r["via"] for r in results}, {"daemon"})
        self.assertTrue(all(r["ok"] for r in results))
        wait_until(lambda: all(i.registered for i in self.fibonacci()), 10, "registered again")
        # Without a terminal and without an answer: no.
        result = self.sky("--service", "Fibonacci", "stop", input="", status=1)
        self.assertIn("Cancelled.", result.stderr)
        self.assertEqual(len(self.fibonacci()), 2)

    def test_instance_no_daemon_manages(self) -> None:
        extra = self.cluster.start_service("examples.tutorial:TutorialService")
        [instance] = self.cluster.wait_for_instances(1, service="TutorialService")
        port = str(instance.port)
        results = self.json("--port", port, "unregister")
        self.assertEqual([(r["via"], r["ok"]) for r in results], [("admin", True)])
        wait_until(
            lambda: not self.cluster.instances(uuid=instance.uuid)[0].registered, 10, "unregistered"
        )
        self.assertEqual(
            self.lines("--port", port, "register"),
            [f"Registered service with UUID {instance.uuid}."],
        )
        wait_until(
            lambda: self.cluster.instances(uuid=instance.uuid)[0].registered, 10, "registered"
        )
        result = self.sky("--port", port, "restart", status=1)
        self.assertIn("restart is only possible through a daemon", result.stderr)
        self.assertEqual(
            self.lines("stop", "--port", port), [f"Stopped service with UUID {instance.uuid}."]
        )
        self.assertEqual(extra.wait(20), 0)
        self.assertEqual(self.cluster.instances(uuid=instance.uuid), [])

    def test_cluster_commands(self) -> None:
        """
        C{sky apply}, C{deployments}, C{scale}, C{rollout status} and
        C{undeploy}, through the real C{sky}: the daemon (the only one, so
        the leader) places what the file asks for, and the shell reads the
        same.
        """
        path = os.path.join(self.cluster.home, "cluster.toml")
        with open(path, "w") as f:
            f.write('[services.Sleepers]\nrun = "examples.sleeper:Sleeper"\ninstances = 2\n'
                    'args = ["--stats-interval", "0.7"]\nready_timeout = 20\n')  # fmt: skip
        self.assertEqual(self.lines("apply", path), [
            "+ Sleepers: 2 x examples.sleeper:Sleeper --stats-interval 0.7 (spread host)",
            "Applied 1 change(s)."])  # fmt: skip
        self.assertEqual(self.lines("apply", path)[-1], "No changes.")
        self.assertEqual(self.sky("apply", "/no/such.toml", status=1).stderr.count("\n"), 1)
        self.cluster.wait_for_instances(2, timeout=60, service="Sleeper", registered=True)

        def ok() -> Any:
            listing = self.json("deployments")
            [row] = listing["deployments"]
            return row if row["state"] == "ok" else None

        row = wait_until(ok, 60, "the deployment ok")
        self.assertEqual((row["name"], row["ready"], row["desired"]), ("Sleepers", 2, 2))
        self.assertEqual(row["hosts"]["127.0.0.1"]["registered"], 2)
        lines = self.lines("deployments")
        self.assertRegex(lines[1], r"^Sleepers\s+ok\s+2\s+2\s")
        assert self.cluster.daemon is not None
        self.assertIn(f"Leader: daemon {self.cluster.daemon_uuid()} pid {self.cluster.daemon.pid}",
                      lines)  # fmt: skip
        self.assertEqual(self.lines("rollout", "status", "Sleepers", "--no-follow"),
                         ["Sleepers: no rollout; ok, 2/2 ready, 0 starting", "Sleepers: ok."])  # fmt: skip
        # The interactive shell has the same commands.
        shell = self.sky("cli", input="deployments\nscale Sleepers=1\n")
        self.assertIn("~ Sleepers: instances 2 -> 1", shell.stdout)
        self.assertRegex(shell.stdout, r"Sleepers\s+ok\s+2\s+2\s")
        self.cluster.wait_for_instances(1, timeout=60, service="Sleeper")
        self.assertEqual(self.sky("scale", "Nobody=3", status=1).stderr.strip(),
                         "sky scale: no deployment named 'Nobody' (`sky deployments` lists them)")  # fmt: skip
        self.assertEqual(self.lines("undeploy", "Sleepers")[0],
                         "- Sleepers: removed (its instances are stopped)")  # fmt: skip
        wait_until(lambda: not self.cluster.instances(service="Sleeper"), 60, "no Sleeper left")
        self.assertEqual(self.json("deployments")["deployments"], [])

    def test_cluster_deployments_show_the_daemons_view_of_a_failing_child(self) -> None:
        """
        A deployment whose instances cannot start: C{sky deployments} shows
        it failing, and for its unregistered instance what its daemon says
        (its state and last error, from C{ListSubServices}).
        """
        path = os.path.join(self.cluster.home, "broken.toml")
        with open(path, "w") as f:
            f.write('[services.Broken]\nrun = "examples.nosuch:Thing"\nready_timeout = 30\n')
        self.sky("apply", path)
        self.addCleanup(self.cluster.sky, "undeploy", "Broken")

        def child() -> Any:
            [row] = self.json("deployments")["deployments"]
            children = row.get("children") or []
            return children[0] if children and children[0]["last_error"] else None

        seen = wait_until(child, 60, "the daemon's view of the Broken child")
        self.assertIn(seen["state"], ("restarting", "failing"))
        self.assertIn("examples.nosuch", seen["last_error"])
        self.assertEqual(seen["host"], "127.0.0.1")
        lines = self.lines("deployments")
        line = next(x for x in lines if x.startswith("  Broken "))
        self.assertRegex(line, r"^  Broken [0-9a-f]{8} on 127\.0\.0\.1: (restarting|failing) \(")
        self.sky("undeploy", "Broken")

    def test_deploy_restart_stop_through_the_daemon(self) -> None:
        result = self.sky("deploy", "examples.sleeper:Sleeper", "--stats-interval", "0.5")
        lines = result.stdout.splitlines()
        self.assertEqual(lines[0], "deploying examples.sleeper:Sleeper --stats-interval 0.5")
        self.assertRegex(lines[1], r"^Deployed service with UUID [\w-]+\.$")
        uuid = lines[1].split()[-1].rstrip(".")
        [sleeper] = self.cluster.wait_for_instances(1, uuid=uuid, registered=True)
        self.assertEqual(sleeper.name, "Sleeper")
        self.assertEqual(
            self.lines("--service", "Sleeper", "restart"), [f"Restarted service with UUID {uuid}."]
        )
        wait_until(
            lambda: [
                i
                for i in self.cluster.instances(uuid=uuid)
                if i.pid != sleeper.pid and i.registered
            ],
            30,
            "the restarted Sleeper",
        )
        self.assertEqual(
            self.lines("--service", "Sleeper", "stop"), [f"Stopped service with UUID {uuid}."]
        )
        wait_until(lambda: not self.cluster.instances(uuid=uuid), 20, "the Sleeper gone")
        # The daemon no longer lists it, so nothing restarts it.
        time.sleep(1)
        self.assertEqual(self.cluster.instances(uuid=uuid), [])

    def test_watch_sees_a_kill(self) -> None:
        victim = self.cluster.start_service("examples.sleeper:Sleeper")
        [instance] = self.cluster.wait_for_instances(1, service="Sleeper", registered=True)
        watch = subprocess.Popen(
            self.cluster.sky_command("watch", "--service", "Sleeper"),
            cwd=ROOT, env=self.cluster.env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            line = self._read_line(watch, 20)
            self.assertEqual(
                line, f"present 127.0.0.1:{instance.port} - Sleeper unknown [Registered]"
            )
            victim.kill(signal.SIGKILL)
            killed = time.monotonic()
            line = self._read_line(watch, 10)
            self.assertEqual(
                line, f"removed 127.0.0.1:{instance.port} - Sleeper unknown [Registered]"
            )
            self.assertLess(time.monotonic() - killed, 5)
            watch.send_signal(signal.SIGINT)
            self.assertEqual(watch.wait(10), 0)
            self.assertNotIn("Traceback", watch.stderr.read())  # type: ignore[union-attr]
        finally:
            if watch.poll() is None:
                watch.kill()
                watch.wait(5)

    @staticmethod
    def _read_line(process: subprocess.Popen, timeout: float) -> str:
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], timeout)
        if not ready:
            raise AssertionError(f"no output from sky watch in {timeout}s")
        return process.stdout.readline().rstrip("\n")

    def test_daemon_not_reachable(self) -> None:
        daemon = self.cluster.daemon
        assert daemon is not None
        daemon.send_signal(signal.SIGSTOP)
        try:
            result = self.sky(
                "--timeout", "1", "--service", "Fibonacci", "register", "--yes", status=1
            )
        finally:
            daemon.send_signal(signal.SIGCONT)
        self.assertEqual(
            result.stderr.count("daemon not reachable on host 127.0.0.1"), 2, result.stderr
        )
        self.assertEqual(result.stdout, "")


class ConsoleScriptTests(SynchronousTestCase):
    def test_installed_sky_script(self) -> None:
        """
        The install step puts a C{sky} command beside the Python, and it
        answers --help.
        """
        script = Path(sys.executable).parent / "sky"
        self.assertTrue(script.exists(), f"{script} is missing: reinstall the package")
        result = subprocess.run([str(script), "--help"], capture_output=True, text=True,
                                timeout=60)  # fmt: skip
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("Usage: sky", result.stdout)
        self.assertIn("instances", result.stdout)
