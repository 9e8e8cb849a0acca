"""
Real ZooKeeper servers for tests: a standalone server or a 3-node ensemble
on free loopback ports, started from Debian's C{zookeeper} package (see
C{/work/shared/platform-notes.md}).

Everything here is blocking and quick (a four-letter-word command on
loopback takes a millisecond or two) except the C{wait_*} methods; tests
running under the reactor poll the quick checks with C{deferLater} instead.

Every server started here is killed at interpreter exit, and gets SIGKILL
from the kernel if the test process dies (C{setpriv --pdeathsig}).

Run C{python -m tests.zkserver hold URL JSON} to get a process that
registers instances through L{skynet.registry.zookeeper.ZooKeeperRegistry},
prints C{READY <session id>} and runs until killed.
"""

from __future__ import annotations

import atexit
import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ZOOKEEPER_JAR = Path("/usr/share/java/zookeeper.jar")
CLASSPATH_JARS = [
    ZOOKEEPER_JAR,
    Path("/usr/share/java/slf4j-log4j12.jar"),
    Path("/usr/share/java/log4j-1.2.jar"),
]
TICK_TIME_MS = 500

_live: set[ZooKeeperServer] = set()


class ZooKeeperMissing(RuntimeError):
    """
    The ZooKeeper server or Java is not installed.
    """


def require_zookeeper() -> str:
    """
    @return: the path of C{java}.
    @raise ZooKeeperMissing: with the command that installs what is missing.
    """
    java = shutil.which("java")
    missing = [str(p) for p in CLASSPATH_JARS if not p.exists()]
    if java is None or missing:
        what = ", ".join(missing + ([] if java else ["java"]))
        raise ZooKeeperMissing(
            f"ZooKeeper server not installed ({what} missing): "
            "run `apt-get install -y zookeeper` (not zookeeperd)"
        )
    return java


def free_ports(count: int) -> list[int]:
    """
    C{count} distinct TCP ports that were free on 127.0.0.1 a moment ago.
    """
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def four_letter_word(port: int, command: str, timeout: float = 1.0) -> str | None:
    """
    Send a four-letter-word command; L{None} if the server does not answer.
    """
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(command.encode("ascii"))
            chunks = []
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
    except OSError:
        return None
    return b"".join(chunks).decode("utf-8", "replace")


def _die_with_parent() -> list[str]:
    """
    A command prefix that makes the kernel SIGKILL the child when the test
    process dies (a C{preexec_fn} would not be safe beside kazoo's threads).
    """
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "KILL"] if setpriv else []


class ZooKeeperServer:
    """
    One ZooKeeper server process: standalone, or member C{myid} of an
    ensemble whose C{peers} are C{(myid, quorum port, election port)}.
    """

    def __init__(
        self,
        directory: Path,
        client_port: int,
        myid: int | None = None,
        peers: list[tuple[int, int, int]] | None = None,
        tick_time: int = TICK_TIME_MS,
    ) -> None:
        self.java = require_zookeeper()
        self.directory = directory
        self.client_port = client_port
        self.myid = myid
        self.peers = peers or []
        self.tick_time = tick_time
        self.process: subprocess.Popen | None = None
        self._write_config()

    def __repr__(self) -> str:
        return f"<ZooKeeperServer {self.myid or 'standalone'} on {self.address}>"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def log_path(self) -> Path:
        return self.directory / "zookeeper.log"

    def _write_config(self) -> None:
        data = self.directory / "data"
        data.mkdir(parents=True, exist_ok=True)
        lines = [
            f"tickTime={self.tick_time}",
            f"dataDir={data}",
            f"clientPort={self.client_port}",
            "clientPortAddress=127.0.0.1",
            "minSessionTimeout=1000",
            "maxClientCnxns=0",
            "admin.enableServer=false",
            "4lw.commands.whitelist=srvr,ruok,mntr,stat,cons,wchs",
        ]
        if self.peers:
            lines += ["initLimit=20", "syncLimit=5"]
            for myid, quorum, election in self.peers:
                lines.append(f"server.{myid}=127.0.0.1:{quorum}:{election}")
            (data / "myid").write_text(f"{self.myid}\n")
        (self.directory / "zoo.cfg").write_text("\n".join(lines) + "\n")
        (self.directory / "log4j.properties").write_text(
            "log4j.rootLogger=INFO, FILE\n"
            "log4j.appender.FILE=org.apache.log4j.FileAppender\n"
            f"log4j.appender.FILE.File={self.log_path}\n"
            "log4j.appender.FILE.layout=org.apache.log4j.PatternLayout\n"
            "log4j.appender.FILE.layout.ConversionPattern=%d{ISO8601} %-5p [%t] %c{1}: %m%n\n"
        )

    def start(self) -> ZooKeeperServer:
        """
        Start the process (not waiting for it to serve).
        """
        if self.running:
            return self
        classpath = ":".join([str(self.directory)] + [str(p) for p in CLASSPATH_JARS])
        command = _die_with_parent() + [
            self.java,
            "-Xmx256m",
            "-XX:+UseSerialGC",
            "-XX:TieredStopAtLevel=1",
            "-Dzookeeper.forceSync=no",
            "-cp",
            classpath,
            "org.apache.zookeeper.server.quorum.QuorumPeerMain",
            str(self.directory / "zoo.cfg"),
        ]
        with open(self.directory / "console.out", "ab") as out:
            self.process = subprocess.Popen(
                command,
                cwd=self.directory,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        _live.add(self)
        return self

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def kill(self) -> None:
        """
        SIGKILL the server and reap it.
        """
        self._signal(signal.SIGKILL)

    def stop(self) -> None:
        """
        SIGTERM the server (SIGKILL after 10 s) and reap it.
        """
        self._signal(signal.SIGTERM)

    def _signal(self, signum: int) -> None:
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signum)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        self.process = None
        _live.discard(self)

    def restart(self) -> ZooKeeperServer:
        self.stop()
        return self.start()

    def ruok(self) -> bool:
        return four_letter_word(self.client_port, "ruok", timeout=0.5) == "imok"

    def mode(self) -> str | None:
        """
        C{"standalone"}, C{"leader"} or C{"follower"} while serving, else
        L{None}.
        """
        answer = four_letter_word(self.client_port, "srvr", timeout=0.5) or ""
        for line in answer.splitlines():
            if line.startswith("Mode:"):
                return line.split(":", 1)[1].strip()
        return None

    def serving(self) -> bool:
        """
        Running, answering C{ruok} with C{imok}, and serving requests (an
        ensemble member in a quorum: C{srvr} shows its mode).
        """
        return self.running and self.ruok() and self.mode() is not None

    def session_ids(self) -> set[int]:
        """
        The ids of the sessions connected to this server (C{cons}).
        """
        answer = four_letter_word(self.client_port, "cons", timeout=0.5) or ""
        found = set()
        for part in answer.split(","):
            part = part.strip()
            if part.startswith("sid=0x"):
                found.add(int(part[len("sid=0x") :], 16))
        return found

    def wait_serving(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.serving():
            if not self.running:
                raise RuntimeError(f"{self} exited:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self} not serving after {timeout}s:\n{self.log_tail()}")
            time.sleep(0.05)

    def log_tail(self, lines: int = 30) -> str:
        text = ""
        for name in ("console.out", "zookeeper.log"):
            try:
                text += (self.directory / name).read_text(errors="replace")
            except OSError:
                pass
        return "\n".join(text.splitlines()[-lines:])


class ZooKeeperCluster:
    """
    A standalone server (C{size=1}) or an ensemble of C{size} members on
    loopback, in a temporary directory removed by L{close}.
    """

    def __init__(self, size: int = 1, tick_time: int = TICK_TIME_MS) -> None:
        require_zookeeper()
        self.directory = Path(tempfile.mkdtemp(prefix="skynet-zk-"))
        ports = free_ports(3 * size)
        if size == 1:
            self.members = [ZooKeeperServer(self.directory / "zk1", ports[0], tick_time=tick_time)]
        else:
            peers = [(i + 1, ports[size + 2 * i], ports[size + 2 * i + 1]) for i in range(size)]
            self.members = [
                ZooKeeperServer(
                    self.directory / f"zk{i + 1}",
                    ports[i],
                    myid=i + 1,
                    peers=peers,
                    tick_time=tick_time,
                )
                for i in range(size)
            ]

    @property
    def hosts(self) -> str:
        """
        The kazoo host list of every member.
        """
        return ",".join(m.address for m in self.members)

    def url(self, chroot: str = "/skynet", **options: object) -> str:
        query = "&".join(f"{k}={v}" for k, v in options.items())
        return f"zk://{self.hosts}{chroot}" + (f"?{query}" if query else "")

    def start(self, wait: bool = True, timeout: float = 60.0) -> ZooKeeperCluster:
        for member in self.members:
            member.start()
        if wait:
            self.wait_serving(timeout)
        return self

    def serving(self) -> bool:
        """
        Every running member serves (the ensemble has a quorum and a leader).
        """
        running = [m for m in self.members if m.running]
        modes = [m.mode() for m in running]
        return bool(running) and None not in modes

    def wait_serving(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.serving():
            for member in self.members:
                if member.process is not None and not member.running:
                    raise RuntimeError(f"{member} exited:\n{member.log_tail()}")
            if time.monotonic() > deadline:
                tails = "\n".join(f"{m}:\n{m.log_tail(10)}" for m in self.members)
                raise RuntimeError(f"ZooKeeper not serving after {timeout}s\n{tails}")
            time.sleep(0.05)

    def leader(self) -> ZooKeeperServer | None:
        for member in self.members:
            if member.running and member.mode() in ("leader", "standalone"):
                return member
        return None

    def member_with_session(self, session_id: int) -> ZooKeeperServer | None:
        """
        The member a client session is connected to, from C{cons}.
        """
        for member in self.members:
            if member.running and session_id in member.session_ids():
                return member
        return None

    def stop(self) -> None:
        for member in self.members:
            member.stop()

    def kill(self) -> None:
        for member in self.members:
            member.kill()

    def close(self) -> None:
        """
        Kill every member and remove the directory.
        """
        self.kill()
        shutil.rmtree(self.directory, ignore_errors=True)


@atexit.register
def _kill_leftovers() -> None:
    for server in list(_live):
        server.kill()


def hold(url: str, documents: str) -> None:
    """
    Register instances (a JSON list of Go-shaped documents), publish their
    statistics, print C{READY <session id>} and run until killed: the
    process a C{kill -9} test kills.
    """
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred

    from skynet.registry.base import Instance
    from skynet.registry.zookeeper import ZooKeeperRegistry

    registry = ZooKeeperRegistry.from_url(url, reactor=reactor)
    instances = [Instance.from_go(doc) for doc in json.loads(documents)]

    async def main() -> None:
        await registry.start()
        if not registry.connected:
            raise RuntimeError(f"{url} unreachable")
        for instance in instances:
            await registry.add(instance)
            await registry.publish_stats(instance, {"Clients": 0})
        print(f"READY {registry.session_id}", flush=True)

    def failed(f: object) -> None:
        print(f"FAILED {f}", flush=True)
        reactor.stop()

    reactor.callWhenRunning(lambda: Deferred.fromCoroutine(main()).addErrback(failed))
    reactor.run()


def hold_command(url: str, instances: list) -> list[str]:
    """
    The command line of a L{hold} child registering C{instances}.
    """
    documents = json.dumps([i.to_go() for i in instances])
    return [sys.executable, "-m", "tests.zkserver", "hold", url, documents]


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "hold":
        hold(sys.argv[2], sys.argv[3])
    else:
        sys.exit(f"usage: {sys.argv[0]} hold URL JSON-LIST-OF-INSTANCES")
