"""
The examples as a user runs them: the local cluster command of the README,
each example client against real services, and the Go defaults from the
environment.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile

from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from skynet.client import Client
from skynet.registry import Query
from skynet.registry.files import FileRegistry
from tests.processes import ROOT, ServiceProcess, child_env, terminate, twistd, wait_for


def run_python(*args: str, env: dict[str, str] | None = None, timeout: float = 120):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=child_env(**(env or {})))  # fmt: skip


class LocalClusterCommandTests(TestCase):
    timeout = 180

    async def test_local_cluster_once(self) -> None:
        """
        The README's run command starts the examples on the embedded
        registry, calls them through discovery, and (with --once) stops.
        """
        home = tempfile.mkdtemp(prefix="skynet-home-")
        stale = os.path.join(home, "local-cluster", "0000-from-an-earlier-run.log")
        os.makedirs(os.path.dirname(stale))
        with open(stale, "w") as f:
            f.write("old\n")
        result = await deferToThread(
            run_python, "-m", "examples.local_cluster", "--once", env={"SKYNET_HOME": home}
        )
        output = result.stdout + result.stderr
        self.assertEqual(result.returncode, 0, output)
        self.assertFalse(os.path.exists(stale), "the logs of an earlier run are removed")
        self.assertIn("\nstopping the cluster...\nstopped.\n", result.stdout)
        # The host key fingerprint, as OpenSSH computes it from the key file.
        keygen = subprocess.run(["ssh-keygen", "-l", "-f", os.path.join(home, "ssh", "host_key")],
                                capture_output=True, text=True, timeout=30)  # fmt: skip
        self.assertEqual(keygen.returncode, 0, keygen.stderr)
        fingerprint = keygen.stdout.split()[1]
        self.assertTrue(fingerprint.startswith("SHA256:"), keygen.stdout)
        self.assertIn(f"host key ED25519 {fingerprint} (what ssh asks you to check)", output)
        self.assertIn("TestService.Upcase('hello skynet') = 'HELLO SKYNET'", output)
        self.assertIn("Fibonacci.Index(50) = 12586269025", output)
        self.assertIn("TutorialService.AddOne(41) = 42", output)
        # It printed these only once the dashboard answered HTTP and the SSH
        # shell its banner.
        self.assertRegex(output, r"dashboard: http://127\.0\.0\.1:\d+/\?token=\S+")
        self.assertRegex(output, r"shell: +ssh -p \d+ .*admin@127\.0\.0\.1")
        self.assertIn("instances deployed through the daemon", output)
        # Everything it started has stopped and left the registry.
        registry = FileRegistry(os.path.join(home, "registry"), reactor=reactor)
        await registry.start()
        self.addCleanup(registry.stop)
        await wait_for(lambda: _empty(registry), timeout=10, what="registry emptied")


class LocalClusterInterruptTests(TestCase):
    timeout = 180

    async def test_ctrl_c_and_busy_ports(self) -> None:
        """
        With 8080 and 2222 taken, the cluster says which ports it uses
        instead; Ctrl-C (SIGINT to the terminal's process group) prints
        that it stops and that it stopped, and leaves no traceback in any
        log.
        """
        home = tempfile.mkdtemp(prefix="skynet-home-")
        held = []
        for port in (8080, 2222):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
                s.listen(1)
            except OSError:
                s.close()  # taken by someone else: taken all the same
                continue
            held.append(s)
        self.addCleanup(lambda: [s.close() for s in held])
        output_path = os.path.join(home, "out.txt")
        out = open(output_path, "w")
        self.addCleanup(out.close)
        popen = subprocess.Popen([sys.executable, "-m", "examples.local_cluster"], cwd=ROOT,
                                 env=child_env(SKYNET_HOME=home), stdout=out,
                                 stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 start_new_session=True)  # fmt: skip
        self.addCleanup(terminate, popen)

        def read() -> str:
            with open(output_path) as f:
                return f.read()

        await wait_for(lambda: "Ctrl-C stops the cluster." in read() or popen.poll() is not None,
                       timeout=120, what="the cluster to be up")  # fmt: skip
        self.assertIsNone(popen.poll(), read())
        os.killpg(popen.pid, signal.SIGINT)
        await deferToThread(popen.wait, 60)
        output = read()
        self.assertRegex(output, r"port 8080 is taken: the dashboard uses port \d+ instead")
        self.assertRegex(output, r"port 2222 is taken: the SSH shell uses port \d+ instead")
        self.assertIn("\nstopping the cluster...\nstopped.\n", output)
        self.assertNotIn("Traceback", output)
        logs = os.path.join(home, "local-cluster")
        for name in os.listdir(logs):
            if name.endswith(".log"):
                with open(os.path.join(logs, name), errors="replace") as f:
                    text = f.read()
                self.assertNotIn("Traceback", text, name)
                self.assertNotIn("ReactorNotRunning", text, name)
                self.assertNotIn("#critical]", text, name)


async def _empty(registry) -> bool:
    return not await registry.query(Query())


class ExampleClientTests(TestCase):
    """
    Each example service with its client script.
    """

    timeout = 120

    async def test_clients(self) -> None:
        root = tempfile.mkdtemp(prefix="skynet-registry-")
        url = f"file://{root}"
        specs = ["examples.testservice:TestService", "examples.tutorial:TutorialService",
                 "examples.fibonacci:Fibonacci", "examples.sleeper:Sleeper"]  # fmt: skip
        for spec in specs:
            process = ServiceProcess(spec, url).start()
            self.addCleanup(process.stop)
        registry = FileRegistry(root, reactor=reactor)
        await registry.start()
        self.addCleanup(registry.stop)

        async def all_up() -> bool:
            return len(await registry.query(Query(registered=True))) == len(specs)

        await wait_for(all_up, timeout=30, what="examples registered")
        cases = [
            (["examples.testservice_client", "hello"], "hello -> HELLO"),
            (["examples.tutorial_client", "--times", "2"], "AddOne(2) = 3"),
            (["examples.fibonacci_client", "10", "40"], "F(40) = 102334155"),
            (["examples.sleeper_client", "--seconds", "0.1", "--message", "zzz"], "zzz"),
        ]
        for args, expected in cases:
            result = await deferToThread(run_python, "-m", *args, "--registry", url)
            self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
            self.assertIn(expected, result.stdout)
        # A client error is one line on stderr and a non-zero exit.
        result = await deferToThread(
            run_python, "-m", "examples.fibonacci_client", "-5", "--registry", url
        )
        self.assertEqual(result.returncode, 1)
        self.assertIn("ServiceError: negative index -5", result.stderr)
        self.assertNotIn("Traceback", result.stderr)


class EnvironmentDefaultsTests(TestCase):
    timeout = 60

    async def test_go_environment(self) -> None:
        """
        Without --listen, the service takes the first free port of
        SKYNET_MIN_PORT..SKYNET_MAX_PORT on SKYNET_BIND_IP, and its region
        and version come from SKYNET_REGION and SKYNET_VERSION.
        """
        blocker = socket.socket()
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        self.addCleanup(blocker.close)
        low = blocker.getsockname()[1]
        root = tempfile.mkdtemp(prefix="skynet-registry-")
        env = child_env(SKYNET_MIN_PORT=str(low), SKYNET_MAX_PORT=str(low + 50),
                        SKYNET_BIND_IP="127.0.0.1", SKYNET_REGION="Mars",
                        SKYNET_VERSION="7")  # fmt: skip
        process = subprocess.Popen(
            [twistd(), "-n", "--pidfile=", "skynet-service", "--service",
             "examples.testservice:TestService", "--registry", f"file://{root}"],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.addCleanup(terminate, process)
        registry = FileRegistry(root, reactor=reactor)
        await registry.start()
        self.addCleanup(registry.stop)

        async def found():
            return await registry.query(Query(service="TestService"))

        [instance] = await wait_for(found, timeout=30, what="instance")
        self.assertTrue(low < instance.port <= low + 50)
        self.assertEqual((instance.host, instance.region, instance.version),
                         ("127.0.0.1", "Mars", "7"))  # fmt: skip
        # A client that connects and never sends its handshake holds up nobody.
        silent = socket.create_connection((instance.host, instance.port))
        self.addCleanup(silent.close)
        client = Client(registry=registry, reactor=reactor)
        self.addCleanup(client.stop)
        result = await client.service("TestService").call("Upcase", {"data": "go"})
        self.assertEqual(result, {"data": "GO"})

    async def test_flags_win_over_the_environment(self) -> None:
        """
        --name, --version and --region set the instance's identity, over the
        environment and the class (--version is the service's, not
        Twisted's).
        """
        root = tempfile.mkdtemp(prefix="skynet-registry-")
        process = ServiceProcess(
            "examples.tutorial:TutorialService", f"file://{root}",
            "--name", "Adder", "--version", "9", "--region", "Venus",
            env={"SKYNET_VERSION": "7", "SKYNET_REGION": "Mars"},
        ).start()  # fmt: skip
        self.addCleanup(process.stop)
        registry = FileRegistry(root, reactor=reactor)
        await registry.start()
        self.addCleanup(registry.stop)

        async def found():
            return await registry.query(Query())

        [instance] = await wait_for(found, timeout=30, what="instance")
        self.assertEqual((instance.name, instance.version, instance.region),
                         ("Adder", "9", "Venus"))  # fmt: skip
        client = Client(registry=registry, reactor=reactor)
        self.addCleanup(client.stop)
        result = await client.service("Adder", version="9").call("AddOne", {"value": 1})
        self.assertEqual(result, {"value": 2})
