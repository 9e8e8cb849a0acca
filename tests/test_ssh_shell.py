"""
The interactive shell as operators use it: the real OpenSSH client into
C{twistd skynet-daemon --ssh}, and C{sky cli} on a local pty, both driven
through tmux (C{send-keys}, C{capture-pane}); and the key handling of
L{skynet.manhole}.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from skynet.manhole import (
    _new_ed25519,
    _write_private,
    ensure_client_key,
    ensure_host_key,
    loopback_unless_told,
    pick_ssh_port,
    read_authorized_keys,
)
from tests.processes import ROOT
from tests.test_sky import Cluster, wait_until


def require_tools() -> None:
    missing = [tool for tool in ("ssh", "tmux") if shutil.which(tool) is None]
    if missing:
        raise AssertionError(
            f"{' and '.join(missing)} not found: these tests drive the real OpenSSH client "
            "through tmux; install them with apt-get install openssh-client tmux "
            "(.ci/run does)"
        )


class Tmux:
    """
    A private tmux server (its own socket in a temporary directory) whose
    sessions run commands on a pty.
    """

    def __init__(self, directory: str, env: dict[str, str]) -> None:
        self.socket = os.path.join(directory, "tmux.sock")
        self.env = dict(env, TERM="xterm")

    def tmux(self, *args: str) -> str:
        result = subprocess.run(
            ["tmux", "-S", self.socket, "-f", "/dev/null", *args],
            env=self.env, capture_output=True, text=True, timeout=20,
        )  # fmt: skip
        if result.returncode != 0:
            raise AssertionError(f"tmux {' '.join(args)}: {result.stderr}")
        return result.stdout

    def start(self, name: str, command: list[str]) -> None:
        self.tmux("new-session", "-d", "-s", name, "-x", "160", "-y", "50",
                  shlex.join(command) + "; echo '[exited]' $?; sleep 600")  # fmt: skip

    def keys(self, name: str, *keys: str) -> None:
        self.tmux("send-keys", "-t", name, *keys)

    def type(self, name: str, text: str) -> None:
        self.tmux("send-keys", "-t", name, "-l", text)

    def screen(self, name: str) -> str:
        text = self.tmux("capture-pane", "-p", "-J", "-t", name, "-S", "-300")
        # Without the pane's blank bottom lines, so that lengths mark progress.
        return "\n".join(line.rstrip() for line in text.splitlines()).rstrip("\n")

    def last_line(self, name: str) -> str:
        lines = [line for line in self.screen(name).splitlines() if line.strip()]
        return lines[-1].rstrip() if lines else ""

    def wait(self, name: str, pattern: str, timeout: float = 15.0, after: int = 0) -> re.Match:
        """
        Wait until C{pattern} appears on the screen after its first
        C{after} characters.
        """

        def found() -> Any:
            return re.search(pattern, self.screen(name)[after:], re.MULTILINE)

        try:
            return wait_until(found, timeout, repr(pattern))
        except AssertionError:
            raise AssertionError(
                f"{pattern!r} not on the screen of {name}:\n{self.screen(name)}"
            ) from None

    def wait_last(self, name: str, text: str, timeout: float = 15.0) -> None:
        try:
            wait_until(lambda: self.last_line(name) == text, timeout, repr(text))
        except AssertionError:
            raise AssertionError(
                f"last line of {name} is not {text!r}:\n{self.screen(name)}"
            ) from None

    def mark(self, name: str) -> int:
        return len(self.screen(name))

    def stop(self) -> None:
        subprocess.run(["tmux", "-S", self.socket, "kill-server"], env=self.env,
                       capture_output=True, timeout=20)  # fmt: skip


class InteractiveShellTests(SynchronousTestCase):
    """
    One daemon, serving SSH on loopback, supervising two Fibonacci and two
    Sleeper instances, with a TestService beside it.
    """

    cluster: Cluster
    tmux: Tmux

    @classmethod
    def setUpClass(cls) -> None:
        require_tools()
        cls.cluster = Cluster()
        cls.tmux = Tmux(cls.cluster.home, cls.cluster.env)
        try:
            cls.ssh_dir = os.path.join(cls.cluster.home, "ssh")
            cls.key = ensure_client_key(cls.ssh_dir, os.path.join(cls.cluster.home, "no-user-keys"))
            cls.cluster.start_daemon(
                ["examples.fibonacci:Fibonacci"] * 2 + ["examples.sleeper:Sleeper"] * 2,
                "--ssh", "tcp:0",
            )  # fmt: skip
            cls.cluster.start_service("examples.testservice:TestService")
            cls.cluster.wait_for_instances(6, registered=True)
            found = wait_until(cls._ssh_port, 20, "the SSH shell's port in the daemon's log")
            cls.port = int(found)
        except BaseException:
            logs = cls.cluster.logs()
            cls.tmux.stop()
            cls.cluster.stop()
            raise AssertionError(f"the cluster did not start:\n{logs}") from None

    @classmethod
    def _ssh_port(cls) -> str | None:
        with open(cls.cluster.daemon_log, errors="replace") as f:
            match = re.search(r"SSH shell on 127\.0\.0\.1:(\d+)", f.read())
        return match.group(1) if match else None

    @classmethod
    def tearDownClass(cls) -> None:
        cls.tmux.stop()
        cls.cluster.stop()

    def ssh_command(self, identity: str | None = None, *options: str) -> list[str]:
        return [
            "ssh", "-p", str(self.port),
            "-i", identity or str(self.key.identity),
            "-o", "IdentitiesOnly=yes",
            "-o", "StrictHostKeyChecking=no",
            "-o", f"UserKnownHostsFile={self.cluster.home}/known_hosts",
            "-o", "LogLevel=ERROR",
            *options,
            "admin@127.0.0.1",
        ]  # fmt: skip

    def a_sleeper(self) -> Any:
        sleepers = self.cluster.instances(service="Sleeper", registered=True)
        self.assertTrue(sleepers, "no Sleeper left to stop")
        return sleepers[0]

    def drive(self, name: str, history_prompt_check: bool = True) -> None:
        """
        The same session, whether over SSH or on the local terminal.
        """
        t = self.tmux
        t.wait(name, r"Skynet Interactive Shell")
        t.wait_last(name, ">")
        # A filter, its value completed with Tab.
        t.type(name, "service Fib")
        t.keys(name, "Tab")
        t.wait_last(name, "> service Fibonacci")
        t.keys(name, "Enter")
        t.wait(name, r"^Service: Fibonacci$")
        mark = t.mark(name)
        t.type(name, "instances")
        t.keys(name, "Enter")
        t.wait(
            name,
            r"(?s)Fibonacci unknown \[Registered\].*Fibonacci unknown \[Registered\]\n>",
            after=mark,
        )
        listing = t.screen(name)[mark:]
        self.assertNotIn("TestService", listing)
        self.assertNotIn("Sleeper", listing)
        # Up recalls the command.
        mark = t.mark(name)
        t.keys(name, "Up")
        t.wait_last(name, "> instances")
        t.keys(name, "Enter")
        t.wait(name, r"Fibonacci unknown \[Registered\]", after=mark)
        # Stop an instance, after answering Y.
        sleeper = self.a_sleeper()
        t.type(name, "reset")
        t.keys(name, "Enter")
        t.type(name, f"port {sleeper.port}")
        t.keys(name, "Enter")
        t.wait(name, rf"^Port: {sleeper.port}$")
        t.type(name, "stop")
        t.keys(name, "Enter")
        t.wait_last(name, "1 instance will be stopped, Are you sure? (Y/N) >")
        self.assertEqual(self.cluster.instances(uuid=sleeper.uuid)[0].uuid, sleeper.uuid)
        t.type(name, "Y")
        t.keys(name, "Enter")
        t.wait(name, rf"^Stopped service with UUID {sleeper.uuid}\.$")
        wait_until(lambda: not self.cluster.instances(uuid=sleeper.uuid), 20, "the Sleeper gone")
        # Python, against the live registry, and back with Ctrl-D.
        t.type(name, "reset")
        t.keys(name, "Enter")
        t.type(name, "python")
        t.keys(name, "Enter")
        t.wait(name, r"Python manhole")
        t.wait_last(name, ">>>")
        mark = t.mark(name)
        t.type(name, "sorted({i.name for i in registry.query(Query()).result} - {'Sleeper'})")
        t.keys(name, "Enter")
        t.wait(name, r"^\['Fibonacci', 'SkynetDaemon', 'TestService'\]$", after=mark)
        t.type(name, f"registry.query(Query(uuid={sleeper.uuid!r})).result")
        t.keys(name, "Enter")
        t.wait(name, r"^\[\]$", after=mark)
        t.keys(name, "C-d")
        t.wait_last(name, ">")
        # A resized terminal keeps working (and leaves no traceback behind).
        t.tmux("resize-window", "-t", name, "-x", "120", "-y", "40")
        mark = t.mark(name)
        t.type(name, "services")
        t.keys(name, "Enter")
        t.wait(name, r"^SkynetDaemon$", after=mark)
        t.type(name, "exit")
        t.keys(name, "Enter")
        t.wait(name, r"^\[exited\] 0$")

    def recall_after_login(self, name: str) -> None:
        t = self.tmux
        t.wait_last(name, ">")
        t.keys(name, "Up")
        t.wait_last(name, "> exit")
        t.keys(name, "Up")
        t.wait_last(name, "> services")
        t.keys(name, "C-u", "C-d")
        t.wait(name, r"^\[exited\] 0$")

    def test_ssh(self) -> None:
        self.tmux.start("ssh", self.ssh_command())
        try:
            self.drive("ssh")
            # The history was kept for the next login.
            self.tmux.start("ssh2", self.ssh_command())
            self.recall_after_login("ssh2")
        except AssertionError as e:
            raise AssertionError(f"{e}\n{self.cluster.logs()}") from None
        history = os.path.join(self.ssh_dir, "history-admin")
        self.assertEqual(stat.S_IMODE(os.stat(history).st_mode), 0o600)
        with open(history) as f:
            self.assertIn("service Fibonacci\n", f.read())
        with open(self.cluster.daemon_log, errors="replace") as f:
            log = f.read()
        self.assertNotIn("Traceback", log)
        self.assertNotIn("NotImplementedError", log)

    def test_wrong_key_refused(self) -> None:
        other = os.path.join(self.cluster.home, "other_key")
        private, _ = _new_ed25519()
        _write_private(other, private)
        result = subprocess.run(
            self.ssh_command(other, "-o", "BatchMode=yes", "-T"),
            capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        self.assertEqual(result.returncode, 255, result.stderr)
        self.assertIn("Permission denied (publickey)", result.stderr)
        # No password to try either: public keys only.
        result = subprocess.run(
            self.ssh_command(other, "-o", "BatchMode=yes", "-o", "PubkeyAuthentication=no",
                             "-o", "PreferredAuthentications=password,keyboard-interactive", "-T"),
            capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        self.assertEqual(result.returncode, 255, result.stderr)
        self.assertIn("Permission denied (publickey)", result.stderr)

    def test_command_refused_readably(self) -> None:
        """
        C{ssh host COMMAND}: OpenSSH shows the server's reason and exits 1;
        the daemon logs a warning, not a traceback.
        """
        result = subprocess.run(
            self.ssh_command(None, "-o", "BatchMode=yes", "-T") + ["instances"],
            capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertEqual(result.stdout, "")
        self.assertIn("skynet: commands are not run over SSH (got 'instances')", result.stderr)
        self.assertIn("ssh without a command", result.stderr)
        self.assertNotIn("exec request failed", result.stderr)

        def logged() -> str | None:
            with open(self.cluster.daemon_log, errors="replace") as f:
                lines = [ln for ln in f if "refused SSH command 'instances'" in ln]
            return lines[0] if lines else None

        line = wait_until(logged, 20, "the refusal in the daemon's log")
        self.assertIn("#warn]", line)
        self.assertIn("from admin", line)
        with open(self.cluster.daemon_log, errors="replace") as f:
            log = f.read()
        self.assertNotIn("#critical]", log)
        self.assertNotIn("ConchError", log)

    def test_host_key_stored_private(self) -> None:
        host_key = os.path.join(self.ssh_dir, "host_key")
        self.assertEqual(stat.S_IMODE(os.stat(host_key).st_mode), 0o600)
        with open(os.path.join(self.cluster.home, "known_hosts"), "a"):
            pass
        key = ensure_host_key(host_key)
        self.assertEqual(key.sshType(), b"ssh-ed25519")

    def test_sky_cli_on_a_local_terminal(self) -> None:
        command = [sys.executable, "-m", "skynet.sky", "--registry", self.cluster.url, "cli"]
        self.tmux.start("cli", ["env", "-C", str(ROOT), *command])
        try:
            self.drive("cli")
            self.tmux.start("cli2", ["env", "-C", str(ROOT), *command])
            self.recall_after_login("cli2")
        except AssertionError as e:
            raise AssertionError(f"{e}\n{self.cluster.logs()}") from None
        with open(os.path.join(self.cluster.home, "history")) as f:
            self.assertIn("service Fibonacci\n", f.read())


class KeyTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.home = tempfile.mkdtemp(prefix="skynet-keys-")
        self.addCleanup(shutil.rmtree, self.home, True)

    def test_host_key_made_once_mode_0600(self) -> None:
        path = os.path.join(self.home, "ssh", "host_key")
        old = os.umask(0)
        try:
            key = ensure_host_key(path)
        finally:
            os.umask(old)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertFalse(key.isPublic())
        self.assertEqual(ensure_host_key(path), key)
        os.chmod(path, 0o644)
        ensure_host_key(path)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)

    def test_host_key_must_be_a_private_key(self) -> None:
        path = os.path.join(self.home, "not_a_key")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, b"hello\n")
        os.close(fd)
        self.assertRaises(ValueError, ensure_host_key, path)

    def test_client_key_generated_when_the_user_has_none(self) -> None:
        ssh_dir = os.path.join(self.home, "ssh")
        key = ensure_client_key(ssh_dir, os.path.join(self.home, "empty"))
        self.assertTrue(key.generated)
        self.assertEqual(key.identity, os.path.join(ssh_dir, "id_ed25519"))
        self.assertEqual(stat.S_IMODE(os.stat(key.identity).st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(key.authorized_keys).st_mode), 0o600)
        [authorized] = read_authorized_keys(key.authorized_keys)
        self.assertEqual(
            authorized.toString("openssh").split()[:2], key.public.encode().split()[:2]
        )
        self.assertEqual(key.ssh_command(2222), f"ssh -p 2222 -i {key.identity} admin@127.0.0.1")
        again = ensure_client_key(ssh_dir, os.path.join(self.home, "empty"))
        self.assertFalse(again.generated)
        self.assertEqual(again.public, key.public)
        self.assertEqual(len(read_authorized_keys(key.authorized_keys)), 1)

    def test_users_own_key_preferred(self) -> None:
        user = os.path.join(self.home, "dot-ssh")
        private, public = _new_ed25519("me@here")
        _write_private(os.path.join(user, "id_ed25519"), private)
        with open(os.path.join(user, "id_ed25519.pub"), "wb") as f:
            f.write(public)
        key = ensure_client_key(os.path.join(self.home, "ssh"), user)
        self.assertIsNone(key.identity)
        self.assertFalse(key.generated)
        self.assertEqual(key.public, public.decode().strip())
        self.assertEqual(key.ssh_command(2222), "ssh -p 2222 admin@127.0.0.1")
        self.assertFalse(os.path.exists(os.path.join(self.home, "ssh", "id_ed25519")))

    def test_authorized_keys_skips_junk(self) -> None:
        _, public = _new_ed25519()
        path = os.path.join(self.home, "authorized_keys")
        with open(path, "wb") as f:
            f.write(b"# comment\n\nnot a key\n" + public)
        self.assertEqual(len(read_authorized_keys(path)), 1)
        self.assertEqual(read_authorized_keys(os.path.join(self.home, "missing")), [])

    def test_pick_ssh_port(self) -> None:
        import socket

        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            taken = busy.getsockname()[1]
            port = pick_ssh_port(taken)
            self.assertNotEqual(port, taken)
            self.assertGreater(port, 0)
        self.assertEqual(pick_ssh_port(port), port)

    def test_loopback_unless_told(self) -> None:
        self.assertEqual(loopback_unless_told("2222"), "tcp:2222:interface=127.0.0.1")
        self.assertEqual(loopback_unless_told("tcp:2222"), "tcp:2222:interface=127.0.0.1")
        self.assertEqual(
            loopback_unless_told("tcp:2222:interface=0.0.0.0"), "tcp:2222:interface=0.0.0.0"
        )
        self.assertEqual(loopback_unless_told("unix:/tmp/s"), "unix:/tmp/s")
