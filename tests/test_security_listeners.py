"""
Nothing skynet opens by default listens beyond loopback: C{make cluster}
(examples/local_cluster.py: a daemon, its five children, the SSH shell,
the dashboard) and a bare daemon and service started with no options,
checked with C{psutil} on every process they run.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
from twisted.trial.unittest import SynchronousTestCase

from tests.processes import ROOT, terminate, twistd

pytestmark = pytest.mark.slow


def _env(home: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("SKYNET_BIND_IP", "SKYNET_REGISTRY", "SKYNET_TLS")}  # fmt: skip
    env.update(HOME=home, SKYNET_HOME=os.path.join(home, ".skynet"), PYTHONUNBUFFERED="1")
    return env


def listeners(pid: int) -> list[tuple[str, str, int, str]]:
    """
    Every listening TCP socket of C{pid} and its descendants: (process
    name, address, port, command line head).
    """
    found = []
    root = psutil.Process(pid)
    for process in [root, *root.children(recursive=True)]:
        try:
            connections = process.net_connections(kind="inet")
            cmdline = " ".join(process.cmdline()[3:7])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        for c in connections:
            if c.status == psutil.CONN_LISTEN:
                found.append((process.name(), c.laddr.ip, c.laddr.port, cmdline))
    return found


def wait_output(path: Path, text: str, popen: subprocess.Popen, timeout: float = 90.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        output = path.read_text(errors="replace") if path.exists() else ""
        if text in output:
            return output
        if popen.poll() is not None:
            raise AssertionError(f"exited {popen.returncode}:\n{output[-4000:]}")
        time.sleep(0.2)
    raise AssertionError(f"no {text!r} within {timeout}s:\n{output[-4000:]}")


class DefaultListenersTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.home = tempfile.mkdtemp(prefix="skynet-listen-")
        self.addCleanup(shutil.rmtree, self.home, True)

    def start(self, command: list[str], name: str) -> tuple[subprocess.Popen, Path]:
        log = Path(self.home) / f"{name}.log"
        out = open(log, "wb")
        self.addCleanup(out.close)
        popen = subprocess.Popen(command, cwd=ROOT, env=_env(self.home), stdout=out,
                                 stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)  # fmt: skip
        self.addCleanup(terminate, popen, 30)
        return popen, log

    def assert_loopback_only(self, found: list[tuple[str, str, int, str]]) -> None:
        exposed = [f for f in found if not ipaddress.ip_address(f[1]).is_loopback]
        self.assertEqual(exposed, [], f"listening beyond loopback: {exposed}")

    def test_make_cluster(self) -> None:
        """
        The cluster of C{make cluster}: every listener of every process on
        loopback, and all of them there (daemon RPC and admin, SSH, the
        dashboard, each child's service and admin ports).
        """
        popen, log = self.start([sys.executable, "-m", "examples.local_cluster"], "cluster")
        wait_output(log, "Ctrl-C stops the cluster", popen, timeout=120)
        found = listeners(popen.pid)
        print("\nmake cluster listeners:")
        for entry in sorted(found, key=lambda f: f[3]):
            print(f"  {entry[1]}:{entry[2]}  {entry[3]}")
        self.assert_loopback_only(found)
        # 2 (daemon) + 1 (ssh) + 1 (dashboard) + 2 per child, five children.
        self.assertGreaterEqual(len(found), 14, found)

    def test_bare_daemon_and_service(self) -> None:
        """
        A daemon and a service started with no options at all.
        """
        registry = f"file://{self.home}/registry"
        daemon, dlog = self.start([twistd(), "-n", "--pidfile=", "skynet-daemon",
                                   "--registry", registry], "daemon")  # fmt: skip
        service, slog = self.start([twistd(), "-n", "--pidfile=", "skynet-service",
                                    "--service", "examples.fibonacci:Fibonacci",
                                    "--registry", registry], "service")  # fmt: skip
        wait_output(dlog, "listening on", daemon)
        wait_output(slog, "listening on", service)
        found = listeners(daemon.pid) + listeners(service.pid)
        self.assert_loopback_only(found)
        self.assertEqual(len(found), 4, found)

    def test_dashboard_default_endpoint(self) -> None:
        """
        The dashboard's default C{--listen} (not started here: its port
        8080 may be another's) names loopback.
        """
        from twisted.internet.endpoints import serverFromString

        from skynet import tls
        from skynet.dashboard_tap import Options

        endpoint = serverFromString(None, Options()["listen"])
        self.assertTrue(tls.is_loopback(tls.endpoint_interface(endpoint) or ""))
