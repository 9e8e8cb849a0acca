"""
Several hosts on one machine: a skynet daemon (C{twistd -n skynet-daemon})
bound to each loopback address of L{HOSTS} (the whole 127.0.0.0/8 answers on
C{lo}; C{SKYNET_BIND_IP} makes each daemon and its children a host of their
own), each with its directory, state file and logs.

Used by C{examples/cluster_multi.py} (C{make cluster-multi}), the cluster
tests (C{tests/test_cluster_hosts.py}) and C{benchmarks/heal.py}.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent

#: The loopback addresses of the three hosts.
HOSTS = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]


def terminate(popen: subprocess.Popen, grace: float = 10.0) -> None:
    """
    SIGTERM, then SIGKILL if it is still there after C{grace} seconds.
    """
    if popen.poll() is None:
        popen.terminate()
        try:
            popen.wait(grace)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait(5)


class Host:
    """
    One daemon bound to its loopback address, with a state file (so that a
    restart brings its children back) and its log, C{daemon.log}, in its
    directory C{<root>/<address>} (also its C{SKYNET_HOME}).

    @param args: more arguments of C{skynet-daemon}.
    @param env: the environment (default: this process's), to which
        C{SKYNET_BIND_IP} and C{SKYNET_HOME} are added.
    @param own_session: start the daemon in a session of its own (so that
        a Ctrl-C in the terminal reaches only the caller, which stops the
        daemons gracefully).
    """

    def __init__(
        self,
        root: str | Path,
        address: str,
        registry: str,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        own_session: bool = False,
    ) -> None:
        self.address = address
        self.dir = Path(root) / address
        self.dir.mkdir(parents=True, exist_ok=True)
        self.registry = registry
        self.args = list(args)
        self.env = dict(os.environ if env is None else env)
        self.own_session = own_session
        self.popen: subprocess.Popen | None = None

    def start(self) -> Host:
        # The daemon gets SIGTERM if the process that started it dies.
        setpriv = shutil.which("setpriv")
        command = [*([setpriv, "--pdeathsig", "TERM"] if setpriv else []),
                   str(Path(sys.executable).parent / "twistd"), "-n", "--pidfile=",
                   "skynet-daemon", "--registry", self.registry,
                   "--listen", f"tcp:0:interface={self.address}",
                   "--state", str(self.dir / "state.json"), "--log-dir", str(self.dir / "logs"),
                   *self.args]  # fmt: skip
        env = dict(self.env, SKYNET_BIND_IP=self.address, SKYNET_HOME=str(self.dir))
        with open(self.dir / "daemon.log", "ab") as log:
            self.popen = subprocess.Popen(command, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT, env=env,
                                          start_new_session=self.own_session)  # fmt: skip
        return self

    def melt(self) -> None:
        """
        The host dies: its daemon and every child, at once, with SIGKILL.
        """
        assert self.popen is not None
        try:
            victims = psutil.Process(self.popen.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            victims = []
        self.popen.kill()
        for child in victims:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
        self.popen.wait(10)
        psutil.wait_procs(victims, timeout=10)

    def stop(self, grace: float = 20.0) -> None:
        """
        SIGTERM (the daemon stops its services gracefully), then SIGKILL
        after C{grace} seconds; wait for it.
        """
        if self.popen is not None:
            terminate(self.popen, grace)

    def output(self, last: int = 3000) -> str:
        """
        The end of the daemon's log.
        """
        try:
            return (self.dir / "daemon.log").read_text(errors="replace")[-last:]
        except OSError:
            return ""
