"""
The SSH shell: the sky command language (L{skynet.shell}) over SSH, with a
Python manhole one command away (C{python}).

    ssh -p 2222 admin@127.0.0.1

L{ManholeService} is an L{IService} that listens on the endpoints it is
given (loopback only, unless told otherwise), accepts public-key
authentication only (the keys of one C{authorized_keys} file, read at each
login, whatever the user name), and generates its host key on first start,
stored with mode 0600.  C{twistd skynet-daemon --ssh tcp:2222:interface=127.0.0.1
--authorized-keys FILE} runs one beside the daemon.

L{ensure_client_key} prepares a local user to log in: it finds the user's
own key pair, or makes one under C{$SKYNET_HOME/ssh}, and puts its public
half into an C{authorized_keys} file there.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

import attr
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.application.service import Service
from twisted.conch import interfaces as iconch
from twisted.conch.checkers import IAuthorizedKeysDB, SSHPublicKeyChecker
from twisted.conch.insults import insults
from twisted.conch.manhole_ssh import (
    ConchFactory,
    TerminalSession,
    TerminalSessionTransport,
    TerminalUser,
)
from twisted.conch.ssh import keys
from twisted.conch.ssh.transport import SSHServerTransport
from twisted.cred.portal import IRealm, Portal
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred, succeed
from twisted.internet.error import ConnectionDone, ProcessDone, ProcessTerminated
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python import components
from twisted.python.failure import Failure
from zope.interface import implementer

from skynet.config import default_reactor
from skynet.config import skynet_home as config_skynet_home
from skynet.shell import History, Shell, ShellProtocol

#: The port of the SSH shell in examples and docs.
DEFAULT_SSH_PORT = 2222

#: The endpoint of the SSH shell in examples and docs: loopback only.
DEFAULT_SSH_ENDPOINT = f"tcp:{DEFAULT_SSH_PORT}:interface=127.0.0.1"

#: Seconds a connection has to authenticate (OpenSSH's LoginGraceTime).
LOGIN_TIMEOUT = 30.0  # security (issue 12)


def pick_ssh_port(preferred: int = DEFAULT_SSH_PORT, interface: str = "127.0.0.1") -> int:
    """
    C{preferred} if nothing listens on it, else a free port the system
    picks (for a local demo: another process may still take it before the
    SSH server listens).
    """
    import socket

    for port in (preferred, 0):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((interface, port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise OSError(f"no free port on {interface}")


def loopback_unless_told(spec: str) -> str:
    """
    An SSH endpoint description, bound to 127.0.0.1 unless it names an
    interface: C{2222} and C{tcp:2222} become
    C{tcp:2222:interface=127.0.0.1}; C{tcp:2222:interface=0.0.0.0} listens
    everywhere because it says so.
    """
    spec = spec.strip()
    if spec.isdigit():
        spec = f"tcp:{spec}"
    kind = spec.split(":", 1)[0].lower()
    if kind in ("tcp", "tcp6") and "interface=" not in spec:
        spec += ":interface=" + ("::1" if kind == "tcp6" else "127.0.0.1")
    return spec


def skynet_home() -> str:
    """
    C{$SKYNET_HOME}, else C{~/.skynet} (L{skynet.config.skynet_home}).
    """
    return config_skynet_home()


def default_ssh_dir() -> str:
    """
    Where the SSH shell keeps its files: C{$SKYNET_HOME/ssh}.
    """
    return os.path.join(skynet_home(), "ssh")


# Keys


def _write_private(path: str, data: bytes) -> None:
    """
    Write a new private key file readable by its owner only (created with
    mode 0600, never widened by the umask).
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
    temporary = f"{path}.{os.getpid()}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(temporary, 0o600)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def _new_ed25519(comment: str = "") -> tuple[bytes, bytes]:
    """
    A new ed25519 key pair: (private key in OpenSSH format, public key line).
    """
    private = ed25519.Ed25519PrivateKey.generate()
    private_bytes = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public_line = private.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    if comment:
        public_line += b" " + comment.encode("utf-8")
    return private_bytes, public_line + b"\n"


def ensure_host_key(path: str) -> keys.Key:
    """
    The SSH server's host key at C{path}, generated (ed25519) on first use
    and stored with mode 0600.  An existing file readable by others is made
    0600.

    @raise ValueError: if the file exists but is not a private key.
    """
    log = Logger()
    if not os.path.exists(path):
        private, _ = _new_ed25519("skynet host key")
        try:
            _write_private(path, private)
            log.info("Generated the SSH host key {path}", path=path)
        except FileExistsError:
            pass  # another process made it first
    mode = os.stat(path).st_mode & 0o777
    if mode & 0o077:
        os.chmod(path, 0o600)
        log.warn(
            "{path} was readable by others (mode {mode:o}): made it 0600", path=path, mode=mode
        )
    with open(path, "rb") as f:
        data = f.read()
    try:
        key = keys.Key.fromString(data)
    except (keys.BadKeyError, keys.EncryptedKeyError, ValueError) as e:
        raise ValueError(f"{path} is not a usable private key: {e}") from None
    if key.isPublic():
        raise ValueError(f"{path} holds a public key; the host key must be private")
    return key


def read_authorized_keys(path: str) -> list[keys.Key]:
    """
    The public keys of an C{authorized_keys} file (lines that do not parse,
    and lines with options, are skipped); none if the file is missing.
    """
    try:
        with open(path, "rb") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return []
    found = []
    for line in lines:
        line = line.strip()
        if not line or line.startswith(b"#"):
            continue
        try:
            found.append(keys.Key.fromString(line))
        except (keys.BadKeyError, ValueError, IndexError, TypeError):
            continue
    return found


@implementer(IAuthorizedKeysDB)
class AuthorizedKeysFile:
    """
    The keys of one C{authorized_keys} file for every user name, read at
    each login (so that edits apply at once).
    """

    log = Logger()

    def __init__(self, path: str) -> None:
        self.path = path

    def getAuthorizedKeys(self, avatarId: bytes) -> Iterable[keys.Key]:
        unsafe = unsafe_permissions(self.path)  # security (issue 12): StrictModes
        if unsafe is not None:
            self.log.error("refusing every key of {path}: {reason}", path=self.path,
                           reason=unsafe)  # fmt: skip
            return []
        return read_authorized_keys(self.path)


def unsafe_permissions(path: str) -> str | None:
    """
    Why C{path} (an C{authorized_keys} file) and its directory cannot be
    trusted, as OpenSSH's StrictModes says: writable by group or others, or
    owned by another user than root or this one; L{None} if they can.
    """
    for target in (path, os.path.dirname(os.path.abspath(path))):
        try:
            info = os.stat(target)
        except FileNotFoundError:
            continue
        if info.st_uid not in (0, os.getuid()):
            return f"{target} is owned by uid {info.st_uid}, not by this user or root"
        if info.st_mode & 0o022:
            mode = f"{info.st_mode & 0o777:o}"
            return f"{target} is writable by others (mode {mode}); chmod go-w {target}"
    return None


@attr.frozen
class ClientKey:
    """
    How the local user logs in to the SSH shell.

    @ivar identity: the private key file to give C{ssh -i}, or L{None}
        when it is one that C{ssh} tries by itself (C{~/.ssh/id_*}).
    @ivar public: the public key line.
    @ivar authorized_keys: the C{authorized_keys} file that admits it.
    @ivar generated: whether the key was made just now.
    """

    identity: str | None
    public: str
    authorized_keys: str
    generated: bool

    def ssh_command(self, port: int, host: str = "127.0.0.1", user: str = "admin") -> str:
        """
        The command line that opens the shell.
        """
        identity = f" -i {self.identity}" if self.identity else ""
        return f"ssh -p {port}{identity} {user}@{host}"


_USER_KEYS = ("id_ed25519", "id_ecdsa", "id_rsa")


def _usable_private_key(path: str) -> bool:
    """
    Whether C{ssh} can use the private key at C{path} without asking: it
    parses without a passphrase, or an agent is there to hold it.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return False
    try:
        keys.Key.fromString(data)
        return True
    except keys.EncryptedKeyError:
        return bool(os.environ.get("SSH_AUTH_SOCK"))
    except (keys.BadKeyError, ValueError, TypeError):
        return False


def ensure_client_key(ssh_dir: str | None = None, user_ssh_dir: str | None = None) -> ClientKey:
    """
    Make sure the local user can log in to the SSH shell by key.

    Uses the user's own key pair (C{~/.ssh/id_ed25519}, C{id_ecdsa} or
    C{id_rsa}, with its C{.pub}) if one is usable; otherwise generates
    C{<ssh_dir>/id_ed25519} (mode 0600) and its C{.pub} (once; later calls
    reuse it).  Either way its public key is in C{<ssh_dir>/authorized_keys}
    afterwards.

    @param ssh_dir: default C{$SKYNET_HOME/ssh}.
    @param user_ssh_dir: default C{~/.ssh}.
    """
    ssh_dir = ssh_dir or default_ssh_dir()
    user_ssh_dir = user_ssh_dir or os.path.join(os.path.expanduser("~"), ".ssh")
    os.makedirs(ssh_dir, mode=0o700, exist_ok=True)
    authorized = os.path.join(ssh_dir, "authorized_keys")
    identity: str | None = None
    public: bytes | None = None
    generated = False
    for name in _USER_KEYS:
        private_path = os.path.join(user_ssh_dir, name)
        try:
            with open(private_path + ".pub", "rb") as f:
                candidate = f.read().strip()
        except OSError:
            continue
        if candidate and _usable_private_key(private_path):
            public = candidate
            break
    if public is None:
        identity = os.path.join(ssh_dir, "id_ed25519")
        if not (os.path.exists(identity) and os.path.exists(identity + ".pub")):
            private, line = _new_ed25519(f"skynet shell key of {_user_name()}")
            if os.path.exists(identity):
                os.unlink(identity)
            _write_private(identity, private)
            with open(identity + ".pub", "wb") as f:
                f.write(line)
            generated = True
        with open(identity + ".pub", "rb") as f:
            public = f.read().strip()
    _authorize(authorized, public)
    return ClientKey(identity, public.decode("ascii", "replace"), authorized, generated)


def _user_name() -> str:
    try:
        import pwd

        return pwd.getpwuid(os.getuid()).pw_name
    except (ImportError, KeyError):
        return os.environ.get("USER", "user")


def _authorize(authorized: str, public: bytes) -> None:
    """
    Add the public key line C{public} to the C{authorized_keys} file
    unless a line there has the same key.
    """
    blob = public.split()[:2]
    try:
        with open(authorized, "rb") as f:
            existing = f.read()
    except FileNotFoundError:
        existing = b""
    for line in existing.splitlines():
        if line.split()[:2] == blob:
            return
    fd = os.open(authorized, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "ab") as f:
        if existing and not existing.endswith(b"\n"):
            f.write(b"\n")
        f.write(public + b"\n")


# Sessions


class ShellSessionTransport(TerminalSessionTransport):
    """
    Joins an SSH session and its terminal; when the shell ends, the client
    is told its exit status (0), as after a login shell, before the channel
    closes (without it OpenSSH's C{ssh} reports 255).
    """

    def __init__(self, proto: Any, chainedProtocol: Any, avatar: Any, width: int, height: int):
        super().__init__(proto, chainedProtocol, avatar, width, height)
        chainedProtocol.transport.loseConnection = lambda: proto.processEnded(
            Failure(ProcessDone(0))
        )


class ShellSession(TerminalSession):
    """
    One SSH session: a terminal running the shell.  Exec requests are
    refused (there is only the interactive shell); window changes reach
    the shell; EOF from the client is ignored (a terminal's Ctrl-D is a
    keystroke, not an EOF).
    """

    transportFactory = ShellSessionTransport
    chained: insults.ServerProtocol | None = None
    terminal_factory: Callable[[], insults.ServerProtocol] = insults.ServerProtocol

    def openShell(self, proto: Any) -> None:
        self.chained = self.terminal_factory()
        self.transportFactory(
            proto,
            self.chained,
            iconch.IConchUser(self.original),
            getattr(self, "width", 80),
            getattr(self, "height", 24),
        )

    #: Schedules the answer to a refused command (L{None}: the global reactor).
    reactor: Any = None
    #: The authenticated user (the avatar id), for the log.
    user: bytes | str = "?"

    log = Logger()

    def execCommand(self, proto: Any, cmd: bytes) -> None:
        """
        Refuse C{ssh host COMMAND} readably: the request is accepted, so
        that the client shows what comes on the channel, then a line on its
        standard error, exit status 1, and the channel closes.
        """
        user = self.user
        command = cmd.decode("utf-8", "replace")
        self.log.warn(
            "refused SSH command {command!r} from {user}: only the interactive shell is served",
            command=command,
            user=user.decode("utf-8", "replace") if isinstance(user, bytes) else user,
        )
        message = (
            f"skynet: commands are not run over SSH (got {command!r}); this server offers only"
            " the interactive shell: ssh without a command, then type it (or run"
            f" 'sky {command}' where the registry is reachable)\r\n"
        )

        def refuse() -> None:
            proto.errReceived(message.encode("utf-8"))
            proto.processEnded(Failure(ProcessTerminated(exitCode=1)))

        # After conch has answered the exec request itself.
        default_reactor(self.reactor).callLater(0, refuse)

    def windowChanged(self, newWindowSize: tuple[int, ...]) -> None:
        rows, cols = newWindowSize[0], newWindowSize[1]
        self.height, self.width = rows, cols
        terminal = self.chained.terminalProtocol if self.chained is not None else None
        if terminal is not None:
            terminal.terminalSize(cols, rows)

    def eofReceived(self) -> None:
        pass

    def closed(self) -> None:
        if self.chained is not None:
            chained, self.chained = self.chained, None
            chained.connectionLost(Failure(ConnectionDone("the SSH session closed")))


@implementer(IRealm)
class ShellRealm:
    """
    Gives every authenticated user a terminal running the shell; each
    user's history is kept in its own file.

    @param shell_factory: makes a L{Shell} per session.
    @param history_dir: where the history files go (L{None}: none kept).
    """

    def __init__(self, shell_factory: Callable[[], Shell], history_dir: str | None) -> None:
        self.shell_factory = shell_factory
        self.history_dir = history_dir
        self.sessions: list[ShellSession] = []

    def history_for(self, avatar_id: bytes | str) -> History:
        if self.history_dir is None:
            return History(None)
        name = avatar_id.decode("utf-8", "replace") if isinstance(avatar_id, bytes) else avatar_id
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "user"
        return History(os.path.join(self.history_dir, f"history-{safe}"))

    def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> Any:
        if iconch.IConchUser not in interfaces:
            raise NotImplementedError("only SSH sessions are offered")
        history = self.history_for(avatarId)
        component = components.Componentized()
        user = TerminalUser(component, avatarId)
        session = ShellSession(component)
        session.user = avatarId

        def terminal() -> insults.ServerProtocol:
            return insults.ServerProtocol(ShellProtocol, self.shell_factory, history)

        session.terminal_factory = terminal
        component.setComponent(iconch.IConchUser, user)
        component.setComponent(iconch.ISession, session)
        self.sessions.append(session)

        def logout() -> None:
            if session in self.sessions:
                self.sessions.remove(session)

        return iconch.IConchUser, user, logout


class _ServerTransport(SSHServerTransport):
    """
    The server side of one SSH connection, known to its factory while it
    lasts (so that stopping the service closes it).
    """

    def _connections(self) -> list[Any]:
        return getattr(self.factory, "connections", [])

    _login_timer: Any = None

    def connectionMade(self) -> None:
        self._connections().append(self)
        super().connectionMade()
        # security (issue 12): who has not authenticated in time is cut off.
        clock = getattr(self.factory, "reactor", None)
        if clock is not None:
            timeout = getattr(self.factory, "login_timeout", LOGIN_TIMEOUT)
            self._login_timer = clock.callLater(timeout, self._login_timed_out)

    def setService(self, service: Any) -> None:
        if service.name == b"ssh-connection" and self._login_timer is not None:
            if self._login_timer.active():
                self._login_timer.cancel()
            self._login_timer = None
        super().setService(service)

    def _login_timed_out(self) -> None:
        self._login_timer = None
        peer = self.transport.getPeer()  # type: ignore[union-attr]
        Logger().warn("SSH login timeout: {peer} did not authenticate",
                      peer=f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')}")  # fmt: skip
        self.transport.abortConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Any = None) -> None:
        if self._login_timer is not None and self._login_timer.active():
            self._login_timer.cancel()
        if self in self._connections():
            self._connections().remove(self)
        super().connectionLost(reason)


class ShellSSHFactory(ConchFactory):
    """
    L{ConchFactory} with this server's own host keys (not the class-level
    dictionaries every instance would share), keeping its connections.
    """

    protocol = _ServerTransport

    def __init__(self, portal: Portal, host_key: keys.Key) -> None:
        super().__init__(portal)
        public: dict[bytes, Any] = {host_key.sshType(): host_key.public()}
        private: dict[bytes, Any] = {host_key.sshType(): host_key}
        self.publicKeys = public
        self.privateKeys = private
        self.connections: list[_ServerTransport] = []
        self.reactor: Any = None  # security (issue 12): the login timeout's clock
        self.login_timeout = LOGIN_TIMEOUT


class ManholeService(Service):
    """
    The SSH shell as an L{IService}: put it in the same L{MultiService} as
    the daemon (or anything holding a registry).

    @param registry: the registry the shell queries (started by its owner).
    @param endpoints: server endpoints to listen on (all of them).
    @param authorized_keys: the C{authorized_keys} file of the users
        allowed in.
    @param host_key: the host key file (made on first start, mode 0600).
    @param daemon: the daemon object bound as C{daemon} in C{python}.
    @param client: a L{skynet.client.Client} on C{registry} (default: one
        of its own, stopped with this service).
    @param history_dir: where each user's command history is kept
        (default: beside the host key).
    @param namespace: more objects to bind in C{python}.
    """

    log = Logger()

    def __init__(
        self,
        registry: Any,
        endpoints: Iterable[IStreamServerEndpoint],
        authorized_keys: str,
        host_key: str,
        *,
        reactor: Any = None,
        daemon: Any = None,
        client: Any = None,
        history_dir: str | None = None,
        namespace: dict[str, Any] | None = None,
        defaults: Any = None,
    ) -> None:
        #: Go Skynet's environment as the edge read it (skynet.config.EnvDefaults):
        #: the region and host the shell's own client prefers.
        self.defaults = defaults
        self.reactor = reactor = default_reactor(reactor)
        self.registry = registry
        self.endpoints = list(endpoints)
        self.authorized_keys = os.path.abspath(authorized_keys)
        self.host_key = os.path.abspath(host_key)
        self.daemon = daemon
        self.history_dir = history_dir or os.path.dirname(self.host_key)
        self.namespace = dict(namespace or {})
        self._client = client
        self._own_client = client is None
        self.ports: list[Any] = []
        self.factory: ShellSSHFactory | None = None
        self.realm: ShellRealm | None = None
        self._starting: Deferred | None = None

    @property
    def client(self) -> Any:
        if self._client is None:
            from skynet.client import Client

            region = self.defaults.region if self.defaults else None
            host = self.defaults.bind_ip if self.defaults else None
            self._client = Client(registry=self.registry, reactor=self.reactor,
                                  region=region, host=host)  # fmt: skip
        return self._client

    def make_shell(self) -> Shell:
        return Shell(
            self.registry,
            self.client,
            reactor=self.reactor,
            daemon=self.daemon,
            interactive=True,
            namespace=self.namespace,
        )

    def startService(self) -> None:
        # Returns None as IService says; callers that must wait use when_started.
        super().startService()
        self._starting = ensureDeferred(self._start())
        self._starting.addErrback(lambda f: self.log.failure("the SSH shell could not start", f))

    def when_started(self) -> Deferred:
        """
        Fires (with L{None}) when the start is done: listening on every
        endpoint, or its failure logged.  At once if it was never started.
        """
        d: Deferred = Deferred()
        if self._starting is None:
            d.callback(None)
            return d

        def fire(result: Any) -> Any:
            d.callback(None)
            return result

        self._starting.addBoth(fire)
        return d

    async def _start(self) -> None:
        key = ensure_host_key(self.host_key)
        if not os.path.exists(self.authorized_keys):
            self.log.warn(
                "{path} does not exist: nobody can log in to the SSH shell until it does",
                path=self.authorized_keys,
            )
        self.realm = ShellRealm(self.make_shell, self.history_dir)
        portal = Portal(self.realm, [SSHPublicKeyChecker(AuthorizedKeysFile(self.authorized_keys))])
        self.factory = ShellSSHFactory(portal, key)
        self.factory.reactor = self.reactor  # security (issue 12): the login timeout's clock
        unsafe = unsafe_permissions(self.authorized_keys)
        if unsafe is not None:
            self.log.error("nobody can log in to the SSH shell: {reason}", reason=unsafe)
        for endpoint in self.endpoints:
            port = await endpoint.listen(self.factory)
            self.ports.append(port)
            address: Any = port.getHost()
            self.log.info(
                "SSH shell on {host}:{port} (keys in {keys})",
                host=address.host,
                port=address.port,
                keys=self.authorized_keys,
            )

    def stopService(self) -> Deferred:  # type: ignore[override]
        super().stopService()
        if self._starting is not None and not self._starting.called:
            self._starting.cancel()
        ports, self.ports = self.ports, []
        waits = [port.stopListening() for port in ports]
        if self.factory is not None:
            for protocol in list(self.factory.connections):
                if protocol.transport is not None:
                    protocol.transport.loseConnection()
        if self._own_client and self._client is not None:
            waits.append(self._client.stop())
            self._client = None
        if not waits:
            return succeed(None)
        return DeferredList(waits, consumeErrors=True).addCallback(lambda _: None)

    def addresses(self) -> list[Any]:
        """
        Where it listens (once started).
        """
        return [port.getHost() for port in self.ports]


__all__ = [
    "DEFAULT_SSH_ENDPOINT",
    "DEFAULT_SSH_PORT",
    "AuthorizedKeysFile",
    "ClientKey",
    "ManholeService",
    "ShellRealm",
    "ShellSession",
    "ShellSSHFactory",
    "default_ssh_dir",
    "loopback_unless_told",
    "pick_ssh_port",
    "ensure_client_key",
    "ensure_host_key",
    "read_authorized_keys",
]
