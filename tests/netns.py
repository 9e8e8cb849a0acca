"""
Scaffolding of the real-process tests that need hosts of their own or a
shared ZooKeeper:

  - L{Network}: hosts as network namespaces on one switch, and
    L{namespaces_unavailable} to say why they cannot be made here;
  - L{BridgeZooKeeper} and L{BridgeMember}: a ZooKeeper server, or a member
    of an ensemble, listening on the switch's address where every host can
    reach it;
  - L{NamespaceTestCase}: a test case that makes the network, a directory,
    and kills the processes it started (and theirs) at the end;
  - L{SharedZooKeeper}: a real ZooKeeper (one server or an ensemble) shared
    by the tests of a class.

(Used by test_zookeeper_cluster, test_cluster_netns and test_registry_untrusted.)
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

from twisted.trial.unittest import SkipTest, TestCase

from tests.processes import missing_here
from tests.zkserver import ZooKeeperCluster, ZooKeeperServer, _die_with_parent, free_ports


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def namespaces_unavailable() -> str | None:
    """
    Why network namespaces cannot be made here, or L{None}.  Under CI
    (C{$CI} set, where .ci/run installs iproute2 and runs as root) that is
    a failure, never a skip: a missing dependency must not hide the tests.
    """
    reason = None
    if os.geteuid() != 0:
        reason = "network namespaces need root"
    elif shutil.which("ip") is None:
        reason = "the ip command (iproute2) is not installed"
    if reason is not None and os.environ.get("CI"):
        raise AssertionError(f"CI must run the network-namespace tests: {reason}")
    return reason


class Network:
    """
    Hosts as network namespaces on one switch::

        root namespace  10.77.N.1  vz<pid>r --- root   --+
        <tag>-a         10.77.N.2  eth0     --- host-a --+-- br0 in <tag>-sw
        <tag>-b         10.77.N.3  eth0     --- host-b --+
        <tag>-c         10.77.N.4  eth0     --- host-c --+

    The bridge lives in a namespace of its own, so the host's firewall never
    sees the traffic between hosts.  C{N} is chosen so that no route of this
    machine already covers it.  Names carry the test process's pid; those of
    processes that are gone are deleted on creation.
    """

    PREFIX = "skz"
    ROLES = ("a", "b", "c")

    def __init__(self) -> None:
        pid = os.getpid()
        self.tag = f"{self.PREFIX}{pid}"
        self.switch = f"{self.tag}-sw"
        self.namespaces = {role: f"{self.tag}-{role}" for role in self.ROLES}
        self.root_link = f"vz{pid}r"
        self.subnet = self._free_subnet()
        self.gateway = f"{self.subnet}.1"
        self.addresses = {role: f"{self.subnet}.{i}" for i, role in enumerate(self.ROLES, 2)}

    @classmethod
    def sweep_leftovers(cls) -> None:
        """
        Delete the namespaces and links of earlier test processes that died
        without cleaning up.
        """
        names = _ip("netns", "list", check=False).stdout.split()
        for name in names:
            match = re.fullmatch(rf"{cls.PREFIX}(\d+)-(sw|a|b|c)", name)
            if match and not _alive(int(match.group(1))):
                _ip("netns", "delete", name, check=False)
        for line in _ip("-o", "link", "show", check=False).stdout.splitlines():
            match = re.search(r"^\d+: (vz(\d+)r)[@:]", line)
            if match and not _alive(int(match.group(2))):
                _ip("link", "delete", match.group(1), check=False)

    def _free_subnet(self) -> str:
        used = _ip("-4", "route", "show", "table", "all", check=False).stdout
        used += _ip("-4", "addr", "show", check=False).stdout
        for i in range(200):
            third = (os.getpid() + i) % 200 + 20
            if f"10.77.{third}." not in used:
                return f"10.77.{third}"
        raise RuntimeError("no free 10.77.x.0/24 subnet")

    def create(self) -> None:
        sw = self.switch
        result = _ip("netns", "add", sw, check=False)
        if result.returncode != 0:
            missing_here(f"cannot create network namespaces here: {result.stderr.strip()}")
        _ip("-n", sw, "link", "set", "lo", "up")
        _ip("-n", sw, "link", "add", "br0", "type", "bridge")
        _ip("-n", sw, "link", "set", "br0", "up")
        _ip("link", "add", self.root_link, "type", "veth", "peer", "name", "root", "netns", sw)
        _ip("-n", sw, "link", "set", "root", "master", "br0", "up")
        _ip("addr", "add", f"{self.gateway}/24", "dev", self.root_link)
        _ip("link", "set", self.root_link, "up")
        for role, ns in self.namespaces.items():
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
            port = f"host-{role}"  # not "a": ip reads that as "address"
            _ip("-n", sw, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("-n", sw, "link", "set", port, "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"{self.addresses[role]}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")

    def cut(self, role: str) -> None:
        """
        Pull the host's cable out of the switch.
        """
        _ip("-n", self.switch, "link", "set", f"host-{role}", "down")

    def destroy(self) -> None:
        """
        Delete everything (deleting a namespace deletes its veth ends, and so
        their peers).  Processes inside must be gone first.
        """
        for ns in [*self.namespaces.values(), self.switch]:
            _ip("netns", "delete", ns, check=False)
        _ip("link", "delete", self.root_link, check=False)

    def command(self, role: str, argv: list[str]) -> list[str]:
        """
        C{argv} run on host C{role}, killed if the test process dies.
        """
        return _die_with_parent() + ["ip", "netns", "exec", self.namespaces[role], *argv]

    def free_ports(self, count: int) -> list[int]:
        """
        C{count} ports free on the switch's address in the root namespace.
        """
        sockets = []
        for _ in range(count):
            s = socket.socket()
            s.bind((self.gateway, 0))
            sockets.append(s)
        ports = [s.getsockname()[1] for s in sockets]
        for s in sockets:
            s.close()
        return ports


def _four_letter_word(ip: str, port: int, command: str) -> str | None:
    try:
        with socket.create_connection((ip, port), timeout=0.5) as s:
            s.sendall(command.encode("ascii"))
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
    except OSError:
        return None
    return b"".join(chunks).decode("utf-8", "replace")


class BridgeZooKeeper(ZooKeeperServer):
    """
    A standalone server listening on the switch's address in the root
    namespace, where every host can reach it.
    """

    def __init__(self, directory: Path, ip: str, client_port: int) -> None:
        self.ip = ip
        super().__init__(directory, client_port)

    def _write_config(self) -> None:
        super()._write_config()
        config = self.directory / "zoo.cfg"
        text = config.read_text().replace(
            "clientPortAddress=127.0.0.1", f"clientPortAddress={self.ip}"
        )
        config.write_text(text)

    @property
    def address(self) -> str:
        return f"{self.ip}:{self.client_port}"

    def ruok(self) -> bool:
        return _four_letter_word(self.ip, self.client_port, "ruok") == "imok"

    def mode(self) -> str | None:
        answer = _four_letter_word(self.ip, self.client_port, "srvr") or ""
        for line in answer.splitlines():
            if line.startswith("Mode:"):
                return line.split(":", 1)[1].strip()
        return None


class BridgeMember(BridgeZooKeeper):
    """
    A member of an ensemble, its client port on the switch's address.
    """

    def __init__(
        self,
        directory: Path,
        ip: str,
        client_port: int,
        myid: int,
        peers: list[tuple[int, int, int]],
    ) -> None:
        self.ip = ip
        ZooKeeperServer.__init__(self, directory, client_port, myid=myid, peers=peers)


class NamespaceTestCase(TestCase):
    """
    A test on hosts that are network namespaces (L{Network}, created for
    each test and destroyed after it; skipped, saying why, where namespaces
    cannot be made), with a directory of its own and the processes it
    starts (C{self.children}) killed at the end.
    """

    directory_prefix = "skynet-netns-"

    def setUp(self) -> None:
        reason = namespaces_unavailable()
        if reason is not None:
            raise SkipTest(reason)
        Network.sweep_leftovers()
        self.network = Network()
        self.addCleanup(self.network.destroy)
        self.network.create()  # skips (fails under CI) if namespaces cannot be made
        self.directory = Path(tempfile.mkdtemp(prefix=self.directory_prefix))
        self.addCleanup(shutil.rmtree, self.directory, True)
        self.children: list[subprocess.Popen] = []
        self.addCleanup(self._stop_children)

    def _stop_children(self) -> None:
        for child in self.children:
            if child.poll() is None:
                child.kill()
        for child in self.children:
            child.wait(10)
        # Children of children (a daemon's services) may run in sessions of
        # their own: kill what is left by its command line naming this
        # test's directory.
        import psutil

        for process in psutil.process_iter(["pid", "cmdline"]):
            try:
                if str(self.directory) in " ".join(process.info["cmdline"] or []):
                    process.kill()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass

    def start_zookeeper(self) -> BridgeZooKeeper:
        """
        A standalone ZooKeeper on the switch's address (stopped at the end).
        """
        [port] = self.network.free_ports(1)
        server = BridgeZooKeeper(self.directory / "zk", self.network.gateway, port)
        self.addCleanup(server.kill)
        server.start()
        return server

    def start_ensemble(self, size: int = 3) -> list[BridgeMember]:
        """
        An ensemble whose client ports listen on the switch's address in the
        root namespace (quorum traffic stays on loopback).
        """
        client_ports = self.network.free_ports(size)
        quorum = free_ports(2 * size)
        peers = [(i + 1, quorum[2 * i], quorum[2 * i + 1]) for i in range(size)]
        members = [
            BridgeMember(
                self.directory / f"zk{i + 1}",
                self.network.gateway,
                client_ports[i],
                myid=i + 1,
                peers=peers,
            )  # fmt: skip
            for i in range(size)
        ]
        for member in members:
            self.addCleanup(member.kill)
            member.start()
        return members


class SharedZooKeeper:
    """
    A mixin for a C{TestCase}: a real ZooKeeper of C{zookeeper_size} servers
    on loopback (L{ZooKeeperCluster}), started once for the class as
    C{cls.cluster} and closed after its last test.
    """

    cluster: ZooKeeperCluster
    zookeeper_size = 1

    @classmethod
    def setUpClass(cls) -> None:
        super().setUpClass()  # type: ignore[misc]
        cls.cluster = ZooKeeperCluster(cls.zookeeper_size)
        try:
            cls.cluster.start()
        except BaseException:
            cls.cluster.close()
            raise

    @classmethod
    def tearDownClass(cls) -> None:
        cls.cluster.close()
        super().tearDownClass()  # type: ignore[misc]
