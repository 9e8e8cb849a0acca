"""
The embedded registry: a directory tree shared by every process on one host.

This is the zero-setup default.  The tree on disk is the protocol's registry
layout, below a root directory (by default L{default_registry_root}):

    <root>/services/<Name>/<Version>/<Region>/<Host>/<Port>     the instance
    <root>/statistics/<Name>/<Version>/<Region>/<Host>/<Port>   its statistics
    <root>/data/<escaped key>                                   a data node

Each file holds the Go-shaped JSON document plus an C{"Owner"} record:
C{{"pid", "start_time", "registry"}}, the writing process's id, its start
time (so that a reused pid does not count) and a token naming the
L{FileRegistry} object that wrote it.

Files are written atomically (a temporary file in the same directory, then
C{os.replace}), so a reader sees the old document or the new one, never a
part.  There is no session to expire as in ZooKeeper: instead every reader
checks that the owner of each node is still alive, hides the nodes of dead
owners and deletes them (with their statistics).  Readers learn about
changes from inotify where Linux offers it, and by polling otherwise; process
deaths make no file event, so owners' liveness is swept every
C{poll_interval} either way.

Data nodes (L{FileRegistry.get_value} and friends) are plain files holding
the value's bytes, with no owner: they outlive their writer.  Their
watches stat their file every C{poll_interval}, and at once on an inotify
event in C{<root>/data} or a write of this registry object.

What the registry creates is private, whatever the umask: directories
0700, files 0600.  L{FileRegistry.start} refuses a root (or top directory)
that another user could write to, and scans skip tree directories that
another user could have written, so another local user can neither add a
fake instance nor read admin addresses.

Every process sharing a root must see the same process ids (one host, one
PID namespace): a node whose owner's pid is not visible counts as dead.
"""

from __future__ import annotations

import errno
import json
import math
import os
import secrets
import stat
import struct
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from urllib.parse import quote
from uuid import uuid4

import attr
import psutil
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorFDSet
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.filepath import FilePath
from zope.interface import implementer

from skynet.config import default_reactor, skynet_path
from skynet.registry.base import (
    MAX_NODE_SIZE,
    MAX_VALUE_SIZE,
    IInstanceListener,
    Instance,
    InstanceDiff,
    IRegistry,
    IWatch,
    ListingMixin,
    NodeWarnings,
    Query,
    RegistryError,
    ValueDelivery,
    check_component,
    check_key,
    check_value,
    data_node_name,
    key_of_data_node,
    parse_json_node,
    parse_written_node,
    sort_instances,
)

try:
    from twisted.internet import inotify
except ImportError:  # not Linux
    inotify = None  # type: ignore[assignment]

#: Seconds to wait after a file event before rescanning, so that a burst of
#: events (a writer's temporary file, its rename, its parents) costs one scan.
DEBOUNCE = 0.02

#: With inotify, a full rescan every this many liveness sweeps anyway, in
#: case an event was lost (queue overflow, a directory watched too late).
SAFETY_RESCAN_TICKS = 10

#: The C{"Owner"} key we add beside the Go keys.
OWNER_KEY = "Owner"

_StartTime = int | float


def default_registry_root() -> str:
    """
    Where the embedded registry lives: C{$SKYNET_HOME/registry} if
    C{SKYNET_HOME} is set, else C{~/.skynet/registry}.
    """
    return skynet_path("registry")


# Owners and their liveness.

_PROC = os.path.exists("/proc/self/stat")


class _Unknown:
    """
    The start time of a process we may not inspect: count it as alive.
    """


_UNKNOWN = _Unknown()


def process_start_time(pid: int) -> _StartTime | None | _Unknown:
    """
    The start time of process C{pid}, in a unit stable for the life of the
    machine's boot: clock ticks since boot (field 22 of C{/proc/<pid>/stat})
    on Linux, else psutil's C{create_time()}.

    @return: L{None} if there is no such process or it is a zombie (dead,
        not yet reaped); L{_UNKNOWN} if we may not look.
    """
    if _PROC:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                data = f.read()
        except (FileNotFoundError, ProcessLookupError):
            return None
        except PermissionError:
            return _UNKNOWN
        # The command name (field 2) is in parentheses and may hold spaces and
        # parentheses itself: split after the last one.
        fields = data[data.rfind(b")") + 2 :].split()
        if not fields or fields[0] in (b"Z", b"X"):
            return None
        return int(fields[19])
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return None
        return process.create_time()
    except psutil.NoSuchProcess:
        return None
    except psutil.AccessDenied:
        return _UNKNOWN


@attr.frozen
class Owner:
    """
    Who wrote a node: a process (its pid and start time) and the
    L{FileRegistry} object in it (a token).
    """

    pid: int
    start_time: _StartTime
    registry: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "start_time": self.start_time,
            "registry": self.registry,
        }

    @classmethod
    def from_json(cls, data: Any) -> Owner:
        """
        @raise RegistryError: if C{data} is not an owner record.
        """
        if not isinstance(data, dict):
            raise RegistryError(f"owner record is not an object: {data!r}")
        pid = data.get("pid")
        start_time = data.get("start_time")
        registry = data.get("registry")
        if (
            not isinstance(pid, int)
            or isinstance(pid, bool)
            or not isinstance(start_time, (int, float))
            or isinstance(start_time, bool)
            or not math.isfinite(start_time)
            or not (registry is None or isinstance(registry, str))
        ):
            raise RegistryError(f"malformed owner record: {data!r}")
        return cls(pid, start_time, registry)


_own_start: dict[int, _StartTime] = {}


def current_owner(registry: str | None = None) -> Owner:
    """
    The L{Owner} record of this process (computed afresh after a fork).
    """
    pid = os.getpid()
    start = _own_start.get(pid)
    if start is None:
        found = process_start_time(pid)
        if not isinstance(found, (int, float)):
            raise RegistryError("cannot read this process's start time")
        start = _own_start[pid] = found
    return Owner(pid, start, registry)


class Liveness:
    """
    One sweep's view of which owners are alive: each pid is looked up at
    most once, however many nodes it owns.
    """

    def __init__(self) -> None:
        self._starts: dict[int, _StartTime | None | _Unknown] = {}

    def alive(self, owner: Owner) -> bool:
        if owner.pid in self._starts:
            start = self._starts[owner.pid]
        else:
            start = self._starts[owner.pid] = process_start_time(owner.pid)
        if start is _UNKNOWN:
            return True
        return start is not None and start == owner.start_time


# Files.


#: The modes of what the embedded registry creates, whatever the umask:
#: other users may neither read (admin addresses) nor write (fake instances).
DIRECTORY_MODE = 0o700
FILE_MODE = 0o600


def make_private_dirs(path: str) -> None:
    """
    C{os.makedirs}, but every directory it creates is mode
    L{DIRECTORY_MODE}, whatever the umask.
    """
    missing = []
    while path and not os.path.isdir(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, DIRECTORY_MODE)
        except FileExistsError:
            continue  # made by another process meanwhile
        os.chmod(directory, DIRECTORY_MODE)


def check_private_dir(path: str, uid: int | None = None) -> bool:
    """
    Refuse a registry directory that another user could write to (a fake
    instance there would take a service's traffic), and make one of ours
    that others may read private.

    @return: whether it exists.
    @raise RegistryError: if it is not a directory, belongs to another user
        (other than root), or is writable by group or others.
    """
    uid = os.geteuid() if uid is None else uid
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISDIR(st.st_mode):
        raise RegistryError(f"registry path {path} is not a directory")
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid not in (uid, 0):
        raise RegistryError(
            f"registry directory {path} belongs to another user (uid {st.st_uid}):"
            " refusing it; use a registry directory of your own"
        )
    if mode & 0o022:
        raise RegistryError(
            f"registry directory {path} is writable by other users (mode {mode:04o}), who"
            f" could add fake instances: refusing it; run chmod 700 {path}"
        )
    if mode & 0o077 and st.st_uid == uid:
        os.chmod(path, DIRECTORY_MODE)
    return True


def write_atomically(path: str, data: bytes, attempts: int = 5) -> None:
    """
    Replace the file at C{path} with C{data} so that a reader sees either
    the old content or the new, never part of it: write a temporary file
    (a dot file, which scanners skip) in the same directory and rename it
    into place.  Missing parent directories are created.  The file is mode
    L{FILE_MODE} and new directories L{DIRECTORY_MODE}, whatever the umask.

    @raise OSError: if it cannot be done.
    """
    directory, name = os.path.split(path)
    for attempt in range(attempts):
        temporary = os.path.join(directory, f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            make_private_dirs(directory)
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        except FileNotFoundError:
            # Another process pruned a directory of the path, empty a moment
            # ago, while we were making it or before we opened: again.
            if attempt == attempts - 1:
                raise
            continue
        try:
            os.fchmod(fd, FILE_MODE)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(temporary, path)
        except BaseException:
            _unlink(temporary)
            raise
        return


def _unlink(path: str) -> bool:
    """
    Delete a file; it being gone already is fine.

    @return: whether this call deleted it.
    """
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


def prune_empty_dirs(top: str, directory: str) -> None:
    """
    Remove C{directory} and its parents up to (not including) C{top} while
    they are empty.  Racing with other processes is fine: a directory that
    is not empty or already gone ends the pruning.
    """
    top = os.path.normpath(top)
    directory = os.path.normpath(directory)
    while directory.startswith(top + os.sep):
        try:
            os.rmdir(directory)
        except OSError:
            return
        directory = os.path.dirname(directory)


def _read_file(path: str) -> tuple[tuple[int, int, int], bytes] | None:
    """
    Read a node file, as untrusted: never through a symbolic link, never
    blocking on a FIFO or device, at most L{MAX_NODE_SIZE} + 1 bytes.

    @return: the file's cache key (inode, mtime_ns, size) as of its reading
        and its content, or L{None} if there is no regular file there.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:  # a symbolic link: not a node
            return None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        # Plain os.read: no file object per node (a snapshot reads 10,000).
        # One read returns the whole of a small regular file; more only if
        # it is larger than it said or a read came back short.
        limit = MAX_NODE_SIZE + 1
        data = os.read(fd, limit)
        while len(data) < limit and len(data) < st.st_size:
            more = os.read(fd, limit - len(data))
            if not more:
                break
            data += more
        return (st.st_ino, st.st_mtime_ns, st.st_size), data
    finally:
        os.close(fd)


def _parse_document(data: bytes) -> tuple[dict[str, Any], Owner | None]:
    """
    @return: a node's JSON object without its owner record, and the owner.
    @raise RegistryError: if it is not a JSON object (see
        L{parse_json_node}) or its owner is malformed; never anything else.
    """
    doc = parse_json_node(data)
    owner_data = doc.pop(OWNER_KEY, None)
    owner = Owner.from_json(owner_data) if owner_data is not None else None
    return doc, owner


def _node_uuid(path: str) -> str | None:
    """
    The uuid of the instance in the node at C{path}, or L{None} if there is
    no readable node.
    """
    found = _read_file(path)
    if found is None:
        return None
    try:
        doc, _ = _parse_document(found[1])
        return str(doc["Config"]["UUID"])
    except (RegistryError, KeyError, TypeError, ValueError):
        return None


def encode_node(doc: dict[str, Any], owner: Owner) -> bytes:
    """
    The bytes of a node file: C{doc} plus the owner record.
    """
    return json.dumps({**doc, OWNER_KEY: owner.to_json()}).encode("utf-8")


@attr.s(slots=True, auto_attribs=True)
class _Entry:
    """
    One parsed instance file, as of C{key} (inode, mtime_ns, size).
    C{instance} is L{None} if the file is malformed.
    """

    key: tuple[int, int, int]
    instance: Instance | None
    owner: Owner | None


# Change notification.

if inotify is not None:
    _WATCH_MASK = (
        inotify.IN_CREATE
        | inotify.IN_DELETE
        | inotify.IN_MOVED_FROM
        | inotify.IN_MOVED_TO
        | inotify.IN_CLOSE_WRITE
        | inotify.IN_DELETE_SELF
        | inotify.IN_MOVE_SELF
        # Never through a link: a directory link in the tree is not watched.
        | inotify.IN_DONT_FOLLOW
        | inotify.IN_ONLYDIR
    )

    class _TreeNotify(inotify.INotify):
        """
        L{inotify.INotify} fixed for a tree whose directories come and go.

        Twisted's reader (up to 26.x at least) closes the whole inotify
        descriptor when any watched directory is deleted (C{IN_DELETE_SELF}),
        and adds the contents of new directories from C{callLater(0)}
        calls, which a stopping test then finds dirty.  Here a deleted
        directory only loses its own watch, a new directory's subtree is
        watched at once (the rescan every event causes finds its files), and
        a queue overflow is reported as an event on the root.
        """

        def __init__(self, reactor, root: str, callback: Callable[..., None]) -> None:
            inotify.INotify.__init__(self, reactor=reactor)
            self._root = FilePath(root)
            self._callback = callback
            #: Directories watched, as C{str} paths.
            self._watched: set[str] = set()

        def ensure_watched(self, path: str) -> None:
            """
            Watch directory C{path} (not its subdirectories) unless watched.
            """
            if path in self._watched:
                return  # the common case, without Twisted's FilePath work
            self.watch(
                FilePath(path),
                mask=_WATCH_MASK,
                autoAdd=True,
                callbacks=[self._callback],
            )
            self._watched.add(path)

        def _watch_subtree(self, path: str) -> None:
            """
            Watch C{path} and the directories below it down to the depth
            of instance files, never following links.
            """
            root = os.fsdecode(self._root.path)
            rel = os.path.relpath(path, root)
            depth = 0 if rel == "." else rel.count(os.sep) + 1
            stack = [(path, depth)]
            while stack:
                directory, depth = stack.pop()
                try:
                    self.ensure_watched(directory)
                except inotify.INotifyError:
                    continue  # gone again already (or out of watches: the scan says so)
                if depth >= 4:
                    continue
                try:
                    with os.scandir(directory) as entries:
                        for entry in entries:
                            if not entry.name.startswith(".") and entry.is_dir(
                                follow_symlinks=False
                            ):
                                stack.append((entry.path, depth + 1))
                except OSError:
                    continue

        def _doRead(self, in_: bytes) -> None:
            self._buffer += in_
            while len(self._buffer) >= 16:
                wd, mask, _cookie, size = struct.unpack("=LLLL", self._buffer[0:16])
                name = self._buffer[16 : 16 + size].rstrip(b"\0") if size else None
                self._buffer = self._buffer[16 + size :]
                if mask & inotify.IN_Q_OVERFLOW:
                    self._callback(None, self._root, mask)
                    continue
                iwp = self._watchpoints.get(wd)
                if iwp is None:
                    continue
                if mask & inotify.IN_IGNORED:
                    # The kernel dropped this watch: its directory is gone.
                    del self._watchpoints[wd]
                    if self._watchpaths.get(iwp.path) == wd:
                        del self._watchpaths[iwp.path]
                    self._watched.discard(os.fsdecode(iwp.path.path))
                    iwp._notify(iwp.path, mask)
                    continue
                path = iwp.path.child(name) if name else iwp.path
                if (
                    iwp.autoAdd
                    and mask & inotify.IN_ISDIR
                    and mask & (inotify.IN_CREATE | inotify.IN_MOVED_TO)
                ):
                    self._watch_subtree(os.fsdecode(path.path))
                iwp._notify(path, mask)


# The scanner, shared by every watch on one tree in this process.

#: Depth of an instance file below C{services}: Name/Version/Region/Host/Port.
LEAF_DEPTH = 5


def query_base(query: Query) -> str:
    """
    The subtree below C{services} that holds every instance C{query} can
    match: the path components it fixes, in order, up to the first it
    leaves open (C{""} for the whole tree).
    """
    parts = []
    for name, value in (
        ("service name", query.service),
        ("version", query.version),
        ("region", query.region),
        ("host", query.host),
        ("port", query.port),
    ):
        if value is None:
            break
        parts.append("/" + check_component(name, str(value)))
    return "".join(parts)


def _outermost(bases: Iterable[str]) -> list[str]:
    """
    The subtrees among C{bases} that no other one contains.
    """
    result: list[str] = []
    for base in sorted(set(bases)):
        if not any(base == r or base.startswith(r + "/") or r == "" for r in result):
            result.append(base)
    return result


def _covering(bases: list[str]) -> Callable[[str], bool]:
    """
    A test of whether a path lies in one of the subtrees C{bases}.
    """
    if "" in bases:
        return lambda rel: True
    prefixes = tuple(b + "/" for b in bases)
    exact = set(bases)
    return lambda rel: rel in exact or rel.startswith(prefixes)


@implementer(IWatch)
class _FileWatch:
    def __init__(
        self, scanner: _Scanner, diff: InstanceDiff, on_stop: Callable[[_FileWatch], None]
    ) -> None:
        self.scanner = scanner
        self.diff = diff
        #: The subtree below C{services} its query can match (C{""}: all).
        self.base = query_base(diff.query)
        #: The scanner's change sequence number its snapshot included.
        self.seen = -1
        self._on_stop = on_stop

    def stop(self) -> None:
        if not self.diff.stopped:
            self.diff.stopped = True
            self.scanner.remove_watch(self)
            self._on_stop(self)


class _Scanner:
    """
    Reads the tree of one root, keeping each parsed file until its inode,
    mtime or size change, hides and prunes the nodes of dead owners, and
    feeds the live instances to every watch's L{InstanceDiff}.

    @ivar reads: how many files were parsed, for tests and benchmarks.
    @ivar notifier: the inotify reader while there are watches, if any.
    """

    log = Logger()

    def __init__(self, root: str, reactor, poll_interval: float, use_inotify: bool) -> None:
        self.root = root
        self.services = os.path.join(root, "services")
        self.statistics = os.path.join(root, "statistics")
        self._reactor = reactor
        self._poll_interval = poll_interval
        self._use_inotify = use_inotify
        self._cache: dict[str, _Entry] = {}
        self._dead: set[str] = set()
        #: The live instances by path below C{services}.
        self._live: dict[str, Instance] = {}
        #: Changes to C{_live} not yet delivered: (sequence, old, new).
        self._changes: list[tuple[int, Instance | None, Instance | None]] = []
        self._sequence = 0
        #: Whether the scan under way keeps its changes for the watches.
        self._recording = False
        self._delivery: Any = None
        #: Subtrees to rescan at the next scan.
        self._dirty: set[str] = set()
        #: Subtrees read by a scan since the watches started.
        self._scanned_bases: set[str] = set()
        self.generation = 0
        self.reads = 0
        self.users = 0
        self._watches: list[_FileWatch] = []
        self._pending = None
        self._loop: LoopingCall | None = None
        self._ticks = 0
        self._unwatched = False
        self._warned_unwatched = False
        self._unprunable: set[tuple[str, tuple[int, int, int]]] = set()
        self.notifier = None
        self.bad_nodes = NodeWarnings(self.log, reactor)
        self._by_uuid: dict[str, str] = {}
        self._uid = os.geteuid()

    # Scanning.

    def _walk(self, base: str) -> Iterator[tuple[str, str, os.stat_result | None]]:
        """
        Yield C{(relative path, path, stat or None)} of every file at instance depth
        below C{services + base}, skipping dot files (temporary files),
        links and directories another user could write.  Each directory is
        watched before it is listed, so that nothing created in it
        afterwards goes unnoticed; so are the directories above C{base}.
        """
        parts = [p for p in base.split("/") if p]
        rel = ""
        for part in parts[:-1] if len(parts) == LEAF_DEPTH else parts:
            self._watch_directory(self.services + rel)
            rel += "/" + part
            try:
                st = os.stat(self.services + rel, follow_symlinks=False)
            except OSError:
                return
            if not stat.S_ISDIR(st.st_mode) or self._foreign(self.services + rel, st):
                return
        if len(parts) == LEAF_DEPTH:
            # One instance's path: its host directory, then the one file.
            self._watch_directory(self.services + rel)
            try:
                st = os.stat(self.services + base, follow_symlinks=False)
            except OSError:
                return
            if stat.S_ISREG(st.st_mode):
                yield base, self.services + base, st
            return
        stack = [(self.services + base, len(parts), base)]
        while stack:
            directory, depth, rel = stack.pop()
            self._watch_directory(directory)
            try:
                entries = os.scandir(directory)
            except (FileNotFoundError, NotADirectoryError):
                continue
            except OSError as e:
                self.log.warn(  # noqa: G010 (twisted.logger's name)
                    "Cannot list registry directory {directory}: {error}",
                    directory=directory,
                    error=e,
                )
                continue
            with entries:
                for entry in entries:
                    if entry.name.startswith("."):
                        continue
                    try:
                        if depth < LEAF_DEPTH - 1:
                            if entry.is_dir(follow_symlinks=False):
                                st = entry.stat(follow_symlinks=False)
                                if self._foreign(entry.path, st):
                                    continue
                                stack.append((entry.path, depth + 1, f"{rel}/{entry.name}"))
                            continue
                        if not entry.is_file(follow_symlinks=False):
                            continue
                    except OSError:
                        continue  # gone meanwhile, or not ours to see
                    # The file's status only if the scan needs it: a file not
                    # read before is read (and its status taken) at once.
                    yield f"{rel}/{entry.name}", entry.path, None

    def _watch_directory(self, directory: str) -> None:
        if self.notifier is None:
            return
        try:
            self.notifier.ensure_watched(directory)
        except inotify.INotifyError:
            # Gone (then listing fails too), or out of inotify watches: then
            # poll, as without inotify.
            if os.path.isdir(directory):
                self._unwatched = True
            if self._unwatched and not self._warned_unwatched:
                self._warned_unwatched = True
                self.log.warn(  # noqa: G010 (twisted.logger's name)
                    "Cannot watch {directory} with inotify: polling",
                    directory=directory,
                )

    def _foreign(self, path: str, st: os.stat_result) -> bool:
        """
        Whether a directory of the tree could have been written by another
        user (group or other writable, or another user's): its nodes are
        not trusted, and it is skipped with a warning.
        """
        if st.st_uid in (self._uid, 0) and not st.st_mode & 0o022:
            return False
        self.bad_nodes.warn(
            path,
            f"directory writable by other users (mode {stat.S_IMODE(st.st_mode):04o},"
            f" uid {st.st_uid}): skipped",
        )
        return True

    def _parse(
        self,
        rel: str,
        path: str,
        st: os.stat_result | None,
        owners: dict[tuple[int, int, str | None], Owner],
    ) -> _Entry | None:
        """
        Parse one node file, as untrusted: whatever it holds, a bad node
        becomes an entry without an instance (kept until the file changes)
        and one warning naming it.

        @param st: the file's status if known (else it is read from the
            open file).
        @param owners: the owner records read by this scan, so that the
            nodes of one owner share one record.
        """
        try:
            found = _read_file(path)
        except OSError as e:
            self.bad_nodes.warn(path, f"cannot read it: {e}")
            try:
                st = st or os.stat(path, follow_symlinks=False)
            except OSError:
                return None
            return _Entry((st.st_ino, st.st_mtime_ns, st.st_size), None, None)
        if found is None:
            return None
        key, data = found
        self.reads += 1
        written = parse_written_node(data, rel)
        if written is not None:
            instance, record = written
            if record is None:
                return _Entry(key, instance, None)
            owner = owners.get(record)
            if owner is None:
                owner = owners[record] = Owner(*record)
            return _Entry(key, instance, owner)
        try:
            doc, owner = _parse_document(data)
            instance = Instance.from_go(doc)
            if instance.path != rel:
                raise RegistryError(f"the node describes {instance.path}")
        except Exception as e:  # noqa: BLE001 (untrusted: no node may fail a scan)
            self.bad_nodes.warn(path, e)
            return _Entry(key, None, None)
        return _Entry(key, instance, owner)

    def scan(self, bases: Iterable[str] = ("",)) -> tuple[dict[str, Instance], bool]:
        """
        Bring the cache of the subtrees C{bases} (paths below C{services},
        C{""} for all) up to date with the disk, parsing only files whose
        inode, mtime or size changed, and hide and prune the nodes of dead
        owners there.  The changes are queued for the watches (L{deliver}).

        @return: the live instances by path (of the whole cache), and
            whether this scan changed any.
        """
        bases = _outermost(bases)
        scanned: dict[str, _Entry] = {}
        owners: dict[tuple[int, int, str | None], Owner] = {}
        cache = self._cache
        for base in bases:
            for rel, path, st in self._walk(base):
                entry = cache.get(rel)
                if entry is None:
                    # Not read before: no need to stat it first.
                    entry = self._parse(rel, path, None, owners)
                    if entry is None:
                        continue
                else:
                    if st is None:
                        try:
                            st = os.stat(path, follow_symlinks=False)
                        except OSError:
                            continue  # gone meanwhile
                        if not stat.S_ISREG(st.st_mode):
                            continue
                    if entry.key != (st.st_ino, st.st_mtime_ns, st.st_size):
                        entry = self._parse(rel, path, st, owners)
                        if entry is None:
                            continue
                scanned[rel] = entry
        covered = _covering(bases)
        sequence_before = self._sequence
        # Changes are kept only for watches that have had their snapshot
        # (the others get one from the live view): not for a first snapshot
        # of 10,000 instances, nor forever when nobody watches (queries).
        self._recording = any(w.diff.known is not None for w in self._watches)
        for rel in [r for r in self._cache if covered(r) and r not in scanned]:
            del self._cache[rel]
            self._dead.discard(rel)
            self._set_live(rel, None)
        liveness = Liveness()
        for rel, entry in scanned.items():
            self._cache[rel] = entry
            if entry.instance is None:
                self._dead.discard(rel)
                self._set_live(rel, None)
            elif entry.owner is not None and not liveness.alive(entry.owner):
                self._dead.add(rel)
                self._set_live(rel, None)
                self._prune(rel, entry, liveness)
            else:
                self._dead.discard(rel)
                self._set_live(rel, entry.instance)
        self._scanned_bases.update(bases)
        changed = self._sequence > sequence_before
        if changed:
            self.generation += 1
            self._schedule_delivery()
        return self._live, changed

    def _set_live(self, rel: str, instance: Instance | None) -> None:
        old = self._live.get(rel)
        if old is instance:
            return
        if instance is None:
            del self._live[rel]
            if self._by_uuid.get(old.uuid) == rel:  # type: ignore[union-attr]
                del self._by_uuid[old.uuid]  # type: ignore[union-attr]
        else:
            self._live[rel] = instance
            if old is not None and self._by_uuid.get(old.uuid) == rel:
                del self._by_uuid[old.uuid]
            self._by_uuid[instance.uuid] = rel
        self._sequence += 1
        if self._recording:
            self._changes.append((self._sequence, old, instance))

    def _covered(self, base: str) -> bool:
        """
        Whether a scan has read the subtree C{base} (and inotify, if any,
        watches it since).
        """
        return any(base == b or base.startswith(b + "/") or b == "" for b in self._scanned_bases)

    def fresh(self, base: str = "") -> bool:
        """
        Whether the cache of C{base} is as current as a scan would make it:
        inotify watches the tree, a scan has read C{base}, and no event (or
        own write) has come since.
        """
        return (
            self.notifier is not None
            and not self._unwatched
            and self._pending is None
            and not self._dirty
            and self._covered(base)
        )

    def get(self, uuid: str) -> Instance | None:
        """
        The live instance with C{uuid}: from the cache when it is
        L{fresh} (checking only its owner's liveness), else after a scan
        (which re-reads only changed files).
        """
        if not self.fresh():
            self.scan()
        rel = self._by_uuid.get(uuid)
        if rel is None:
            return None
        entry = self._cache.get(rel)
        if entry is None or entry.instance is None or rel in self._dead:
            return None
        if entry.owner is not None and not Liveness().alive(entry.owner):
            self.request_scan(0, [rel])  # pruned, and the watches told
            return None
        return entry.instance

    def live_under(self, base: str) -> list[Instance]:
        covered = _covering([base])
        return [instance for rel, instance in self._live.items() if covered(rel)]

    def _prune(self, rel: str, entry: _Entry, liveness: Liveness) -> None:
        """
        Delete the node of a dead owner, and its statistics if they are the
        dead owner's too.
        """
        path = self.services + rel
        # Check that the file is still the one judged, not one a new owner
        # has just put in its place.  (A replacement landing between this
        # check and the unlink would be lost; the window is microseconds.)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            st = None
        if st is not None and (st.st_ino, st.st_mtime_ns, st.st_size) == entry.key:
            try:
                if _unlink(path):
                    self.log.info(
                        "Pruned {path}: its owner, process {pid}, is gone",
                        path=rel,
                        pid=entry.owner.pid if entry.owner else None,
                    )
                prune_empty_dirs(self.services, os.path.dirname(path))
            except OSError as e:
                if (rel, entry.key) not in self._unprunable:
                    self._unprunable.add((rel, entry.key))
                    self.log.warn(  # noqa: G010 (twisted.logger's name)
                        "Cannot prune {path}: {error}", path=path, error=e
                    )
        prune_dead_stats(self.statistics + rel, self.statistics, liveness)

    # Watches and timers.

    def add_watch(self, watch: _FileWatch) -> None:
        self._watches.append(watch)
        if len(self._watches) == 1:
            self._start_timers()
        self.request_scan(0, [watch.base])

    def remove_watch(self, watch: _FileWatch) -> None:
        if watch in self._watches:
            self._watches.remove(watch)
            if not self._watches:
                self._stop_timers()
                self._scanned_bases.clear()

    def request_scan(self, delay: float = DEBOUNCE, bases: Iterable[str] | None = None) -> None:
        """
        Rescan C{bases} (by default every watched subtree) and deliver the
        changes after C{delay} seconds (or sooner, if a scan is due sooner
        already).
        """
        if not self._watches:
            return
        self._dirty.update(bases if bases is not None else [w.base for w in self._watches])
        if self._pending is None:
            self._pending = self._reactor.callLater(delay, self._scan_and_feed)
        elif self._pending.getTime() - self._reactor.seconds() > delay:
            self._pending.reset(delay)

    def _watched_bases(self) -> list[str]:
        return _outermost(w.base for w in self._watches)

    def _scan_and_feed(self) -> None:
        if self._pending is not None:
            if self._pending.active():
                self._pending.cancel()
            self._pending = None
        dirty, self._dirty = self._dirty, set()
        watched = self._watched_bases()
        inside = _covering(watched)
        # Only what a watch can see: the dirty subtrees within the watched
        # ones, and the watched ones within a dirty subtree.
        bases = [d for d in dirty if inside(d)] + [
            w for w in watched if any(w.startswith(d + "/") or d == "" for d in dirty)
        ]
        try:
            if bases:
                self.scan(bases)
        except OSError as e:
            self.log.warn(  # noqa: G010 (twisted.logger's name)
                "Cannot scan registry {root}: {error}", root=self.root, error=e
            )
        except Exception:  # noqa: BLE001 (keep watching; the next scan may do)
            self.log.failure("Scanning registry {root} failed", root=self.root)
        self.deliver()

    def _schedule_delivery(self) -> None:
        if self._delivery is None and self._watches:
            self._delivery = self._reactor.callLater(0, self.deliver)

    def deliver(self) -> None:
        """
        Give every watch its snapshot, once its subtree has been scanned,
        and then the changes it has not seen, in order.
        """
        if self._delivery is not None:
            if self._delivery.active():
                self._delivery.cancel()
            self._delivery = None
        changes, self._changes = self._changes, []
        for watch in list(self._watches):
            if watch.diff.stopped:
                continue
            if watch.diff.known is None:
                if self._covered(watch.base):
                    watch.seen = self._sequence
                    watch.diff.feed(self.live_under(watch.base))
                continue
            for sequence, old, new in changes:
                if sequence > watch.seen:
                    watch.diff.change(old, new)
            watch.seen = self._sequence

    def _tick(self) -> None:
        """
        Every C{poll_interval}: rescan when polling; with inotify, rescan
        only if an owner died (which makes no file event), and now and then
        in case an event was lost.
        """
        self._ticks += 1
        if (
            self.notifier is None
            or self._unwatched
            or self._ticks % SAFETY_RESCAN_TICKS == 0
            or self._an_owner_died()
        ):
            self.request_scan(0)

    def _an_owner_died(self) -> bool:
        liveness = Liveness()
        owners = {self._cache[rel].owner for rel in self._live}
        return not all(liveness.alive(owner) for owner in owners if owner is not None)

    def _on_event(self, _watch: object, path: FilePath, mask: int) -> None:
        name = os.path.basename(os.fsencode(path.path))
        if name.startswith(b".") and not mask & inotify.IN_IGNORED:
            return  # a writer's temporary file
        full = os.fsdecode(path.path)
        if mask & inotify.IN_Q_OVERFLOW or not full.startswith(self.services + "/"):
            self.request_scan(DEBOUNCE)  # events lost, or the top itself: all
            return
        rel = full[len(self.services) :]
        if rel.count("/") == LEAF_DEPTH:
            rel = rel.rpartition("/")[0]  # a node: its host directory
        self.request_scan(DEBOUNCE, [rel])

    def _start_timers(self) -> None:
        # What was scanned without inotify may have changed unseen.
        self._scanned_bases.clear()
        if self._use_inotify:
            self.notifier = self._start_inotify()
        self._ticks = 0
        self._loop = LoopingCall(self._tick)
        self._loop.clock = self._reactor
        self._loop.start(self._poll_interval, now=False)

    def _start_inotify(self):
        if inotify is None or not IReactorFDSet.providedBy(self._reactor):
            self.log.info(
                "No inotify here: polling {root} every {interval}s",
                root=self.root,
                interval=self._poll_interval,
            )
            return None
        try:
            make_private_dirs(self.services)
            notifier = _TreeNotify(self._reactor, self.services, self._on_event)
        except (OSError, inotify.INotifyError) as e:
            self.log.warn(  # noqa: G010 (twisted.logger's name)
                "Cannot use inotify ({error}): polling {root}", error=e, root=self.root
            )
            return None
        # Not Twisted's recursive watch: it follows directory links (and
        # fails on a link loop).  The scan that follows watches every
        # directory it lists; this only makes sure the top is watched now.
        try:
            notifier.ensure_watched(self.services)
        except (OSError, inotify.INotifyError) as e:
            self.log.warn(  # noqa: G010 (twisted.logger's name)
                "Cannot watch {root} ({error})", root=self.services, error=e
            )
        notifier.startReading()
        return notifier

    def _stop_timers(self) -> None:
        if self._loop is not None:
            if self._loop.running:
                self._loop.stop()
            self._loop = None
        if self._pending is not None:
            if self._pending.active():
                self._pending.cancel()
            self._pending = None
        if self._delivery is not None:
            if self._delivery.active():
                self._delivery.cancel()
            self._delivery = None
        self._dirty.clear()
        if self.notifier is not None:
            self.notifier.loseConnection()
            self.notifier = None


def prune_dead_stats(path: str, top: str, liveness: Liveness) -> bool:
    """
    Delete the statistics node at C{path} if its owner is dead.

    @return: whether it was deleted (or absent).
    """
    found = _read_file(path)
    if found is None:
        return True
    try:
        _, owner = _parse_document(found[1])
    except RegistryError:
        return False
    if owner is None or liveness.alive(owner):
        return False
    try:
        _unlink(path)
        prune_empty_dirs(top, os.path.dirname(path))
    except OSError:
        return False
    return True


#: Scanners by (reactor, real root, poll interval, inotify): every registry
#: object of this process on one tree shares one.
_scanners: dict[tuple[Any, str, float, bool], _Scanner] = {}


def _acquire_scanner(reactor, root: str, poll_interval: float, use_inotify: bool) -> _Scanner:
    key = (reactor, os.path.realpath(root), poll_interval, use_inotify)
    scanner = _scanners.get(key)
    if scanner is None:
        scanner = _scanners[key] = _Scanner(root, reactor, poll_interval, use_inotify)
    scanner.users += 1
    return scanner


def _release_scanner(scanner: _Scanner) -> None:
    scanner.users -= 1
    if scanner.users <= 0:
        scanner._stop_timers()
        for key, value in list(_scanners.items()):
            if value is scanner:
                del _scanners[key]


@implementer(IRegistry)
class FileRegistry(ListingMixin):
    """
    The embedded registry: the protocol's tree as files below C{root},
    shared by every process on this host.

    @param root: the registry directory, created by L{start} if missing.
    @param reactor: provides time (and file descriptors, for inotify).
    @param poll_interval: seconds between sweeps of owners' liveness, and
        between rescans when polling.
    @param use_inotify: learn about changes from inotify where available
        rather than by polling.
    """

    log = Logger()

    def __init__(
        self,
        root: str | os.PathLike[str],
        reactor=None,
        poll_interval: float = 0.5,
        use_inotify: bool = True,
    ) -> None:
        reactor = default_reactor(reactor)
        self.root = os.path.abspath(os.fspath(root))
        self.services_dir = os.path.join(self.root, "services")
        self.statistics_dir = os.path.join(self.root, "statistics")
        self.data_dir = os.path.join(self.root, "data")
        self.poll_interval = poll_interval
        self.use_inotify = use_inotify
        self._reactor = reactor
        self._token = uuid4().hex
        self._owned: set[str] = set()
        self._owned_stats: set[str] = set()
        self._watches: list[_FileWatch] = []
        self._scanner: _Scanner | None = None
        self._values = _DataWatches(self)
        self._stopped = False

    @property
    def url(self) -> str:
        return "file://" + quote(self.root)

    def __repr__(self) -> str:
        return f"<FileRegistry {self.url} at 0x{id(self):x}>"

    def _owner(self) -> Owner:
        return current_owner(self._token)

    def _get_scanner(self) -> _Scanner:
        if self._stopped:
            raise RegistryError(f"{self!r} is stopped")
        if self._scanner is None:
            self._scanner = _acquire_scanner(
                self._reactor, self.root, self.poll_interval, self.use_inotify
            )
        return self._scanner

    def _changed(self, rel: str | None = None) -> None:
        """
        Our own write (of the node at C{rel}, or of several): let this
        process's watches see it without waiting for inotify or polling.
        """
        if self._scanner is not None:
            bases = None if rel is None else [rel.rpartition("/")[0]]
            self._scanner.request_scan(DEBOUNCE, bases)

    def _io(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        def call():
            if self._stopped:
                raise RegistryError(f"{self!r} is stopped")
            try:
                return f(*args)
            except OSError as e:
                raise RegistryError(f"registry {self.root}: {e}") from e

        return maybeDeferred(call)

    # IRegistry

    def start(self) -> Deferred[None]:
        """
        Create the root (and its C{services} and C{statistics}) if missing,
        mode 0700.

        @raise RegistryError: (through the Deferred) if the root, or one of
            its top directories, could be written by another user (see
            L{check_private_dir}).
        """

        def make() -> None:
            for directory in (self.root, self.services_dir, self.statistics_dir, self.data_dir):
                check_private_dir(directory)
            make_private_dirs(self.services_dir)
            make_private_dirs(self.statistics_dir)

        self._stopped = False
        return self._io(make)

    def stop(self) -> Deferred[None]:
        """
        Delete the nodes this object wrote (unless another has overwritten
        them since), and stop its watches.
        """
        if self._stopped:
            return succeed(None)
        for watch in list(self._watches):
            watch.stop()
        self._values.stop()
        for rel in sorted(self._owned):
            self._delete_if_mine(self.services_dir, rel)
        for rel in sorted(self._owned_stats):
            self._delete_if_mine(self.statistics_dir, rel)
        self._owned.clear()
        self._owned_stats.clear()
        self._changed()
        if self._scanner is not None:
            _release_scanner(self._scanner)
            self._scanner = None
        self._stopped = True
        return succeed(None)

    def _delete_if_mine(self, top: str, rel: str) -> None:
        path = top + rel
        found = _read_file(path)
        if found is None:
            return
        try:
            _, owner = _parse_document(found[1])
        except RegistryError:
            return
        if owner is None or owner.registry != self._token or owner.pid != os.getpid():
            return
        try:
            _unlink(path)
            prune_empty_dirs(top, os.path.dirname(path))
        except OSError as e:
            self.log.warn(  # noqa: G010 (twisted.logger's name)
                "Cannot remove {path}: {error}", path=path, error=e
            )

    def add(self, instance: Instance) -> Deferred[None]:
        """
        Write the node of C{instance}, owned by this object (overwriting any).
        """
        return self._io(self._write_instance, instance, False)

    def update(self, instance: Instance) -> Deferred[None]:
        """
        Rewrite the node of C{instance}; an existing node keeps its owner.
        """
        return self._io(self._write_instance, instance, True)

    def _write_instance(self, instance: Instance, keep_owner: bool) -> None:
        instance.checked_json()
        rel = instance.path
        path = self.services_dir + rel
        owner = self._owner()
        if keep_owner:
            found = _read_file(path)
            if found is not None:
                try:
                    _, existing = _parse_document(found[1])
                except RegistryError:
                    existing = None
                if existing is not None:
                    owner = existing
        write_atomically(path, encode_node(instance.to_go(), owner))
        if owner.registry == self._token:
            self._owned.add(rel)
        self._changed(rel)

    def remove(self, instance: Instance) -> Deferred[None]:
        """
        Delete the node of C{instance} and its statistics, and prune the
        directories left empty.
        """

        def remove() -> None:
            rel = instance.path
            if _node_uuid(self.services_dir + rel) not in (None, instance.uuid):
                # Another instance has taken over this host and port since:
                # its nodes are not ours to delete.
                return
            for top in (self.services_dir, self.statistics_dir):
                _unlink(top + rel)
                prune_empty_dirs(top, os.path.dirname(top + rel))
            self._owned.discard(rel)
            self._owned_stats.discard(rel)
            self._changed(rel)

        return self._io(remove)

    def publish_stats(self, instance: Instance, stats: dict[str, Any]) -> Deferred[None]:
        """
        Write the statistics of C{instance}.  A C{"Owner"} key in C{stats} is
        replaced by ours.
        """

        def publish() -> None:
            rel = instance.path
            write_atomically(self.statistics_dir + rel, encode_node(dict(stats), self._owner()))
            self._owned_stats.add(rel)

        return self._io(publish)

    def get_stats(self, instance: Instance) -> Deferred[dict[str, Any] | None]:
        """
        The statistics of C{instance}, or L{None} if it has none or their
        owner is dead (then they are deleted).
        """

        def get() -> dict[str, Any] | None:
            path = self.statistics_dir + instance.path
            found = _read_file(path)
            if found is None:
                return None
            try:
                doc, owner = _parse_document(found[1])
            except RegistryError as e:
                self.log.warn(  # noqa: G010 (twisted.logger's name)
                    "Skipping malformed statistics node {path}: {error}",
                    path=path,
                    error=str(e),
                )
                return None
            if owner is not None and not Liveness().alive(owner):
                prune_dead_stats(path, self.statistics_dir, Liveness())
                return None
            return doc

        return self._io(get)

    def query(self, query: Query) -> Deferred[list[Instance]]:
        """
        Read the tree now (re-reading only changed files) and return the live
        instances matching C{query}.
        """

        def run() -> list[Instance]:
            scanner = self._get_scanner()
            base = query_base(query)
            scanner.scan([base])
            return query.filter(sort_instances(scanner.live_under(base)))

        return self._io(run)

    def get(self, uuid: str) -> Deferred[Instance | None]:
        """
        The live instance with C{uuid}, or L{None}, from the scanner's cache
        (see L{_Scanner.get}).
        """
        return self._io(lambda: self._get_scanner().get(uuid))

    def watch(self, query: Query, listener: IInstanceListener) -> IWatch:
        """
        Watch the tree: the snapshot comes from the reactor, soon after.
        """
        scanner = self._get_scanner()
        watch = _FileWatch(scanner, InstanceDiff(query, listener), self._forget_watch)
        self._watches.append(watch)
        scanner.add_watch(watch)
        return watch

    def _forget_watch(self, watch: _FileWatch) -> None:
        if watch in self._watches:
            self._watches.remove(watch)

    # Data nodes.

    def _data_path(self, key: str) -> str:
        return os.path.join(self.data_dir, data_node_name(check_key(key)))

    def get_value(self, key: str) -> Deferred[bytes | None]:
        """
        The bytes of the data node C{key}, or L{None}.
        """
        return self._io(lambda: _read_value(self._data_path(key)))

    def set_value(self, key: str, value: bytes) -> Deferred[None]:
        """
        Replace the file of data node C{key} atomically.
        """

        def write() -> None:
            path = self._data_path(key)
            write_atomically(path, check_value(value))
            self._values.changed(key)

        return self._io(write)

    def delete_value(self, key: str) -> Deferred[None]:
        def delete() -> None:
            _unlink(self._data_path(key))
            self._values.changed(key)

        return self._io(delete)

    def watch_value(self, key: str, callback: Callable[[bytes | None], None]) -> IWatch:
        """
        Watch the data node C{key}: its file is checked soon, then every
        C{poll_interval}, and at once when inotify reports a change.
        """
        if self._stopped:
            raise RegistryError(f"{self!r} is stopped")
        return self._values.watch(self._data_path(key), key, callback)


_MISSING = object()


def _read_value(path: str) -> bytes | None:
    """
    The bytes of the data node file at C{path}, or L{None} if there is none.

    @raise RegistryError: if it is larger than a data node may be.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise RegistryError(f"data node {path} is a symbolic link") from None
        raise
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise RegistryError(f"data node {path} is not a regular file")
        data = f.read(MAX_VALUE_SIZE + 1)
    if len(data) > MAX_VALUE_SIZE:
        raise RegistryError(f"data node {path} is larger than {MAX_VALUE_SIZE} bytes")
    return data


class _FileValueWatch(ValueDelivery):
    def __init__(self, path: str, key: str, callback, on_stop) -> None:
        ValueDelivery.__init__(self, key, callback, on_stop)
        self.path = path
        self._seen: Any = _MISSING

    def check(self) -> None:
        """
        Re-read the file if its inode, mtime or size changed.
        """
        if self.stopped:
            return
        try:
            st = os.stat(self.path)
            seen: Any = (st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            seen = None
        except OSError as e:
            self.log.warn(  # noqa: G010 (twisted.logger's name)
                "Cannot read data node {path}: {error}", path=self.path, error=e
            )
            return
        if seen == self._seen:
            return
        try:
            value = _read_value(self.path)
        except (OSError, RegistryError) as e:
            self.log.warn(  # noqa: G010 (twisted.logger's name)
                "Cannot read data node {path}: {error}", path=self.path, error=e
            )
            return
        self._seen = seen
        self.deliver(value)


class _DataWatches:
    """
    The value watches of one L{FileRegistry}: a poll every
    C{poll_interval} while there are any, an inotify watch of the data
    directory where available, and a check soon after each own write.
    """

    log = Logger()

    def __init__(self, registry: FileRegistry) -> None:
        self._registry = registry
        self._reactor = registry._reactor
        self._watches: dict[str, list[_FileValueWatch]] = {}
        self._loop: LoopingCall | None = None
        self._notifier: Any = None
        self._soon: dict[str, Any] = {}

    def watch(self, path: str, key: str, callback) -> _FileValueWatch:
        def forget() -> None:
            self._forget(key, watch)

        watch = _FileValueWatch(path, key, callback, forget)
        self._watches.setdefault(key, []).append(watch)
        if self._loop is None:
            self._start()
        self.changed(key)
        return watch

    def changed(self, key: str) -> None:
        """
        Check the watches of C{key} from the reactor, soon.
        """
        if key in self._watches and key not in self._soon:
            self._soon[key] = self._reactor.callLater(0, self._check, key)

    def _check(self, key: str) -> None:
        self._soon.pop(key, None)
        for watch in list(self._watches.get(key, ())):
            watch.check()

    def _poll(self) -> None:
        for key in list(self._watches):
            self._check(key)

    def _forget(self, key: str, watch: _FileValueWatch) -> None:
        watches = self._watches.get(key, [])
        if watch in watches:
            watches.remove(watch)
        if not watches:
            self._watches.pop(key, None)
            call = self._soon.pop(key, None)
            if call is not None and call.active():
                call.cancel()
        if not self._watches:
            self._stop_timers()

    def _start(self) -> None:
        self._loop = LoopingCall(self._poll)
        self._loop.clock = self._reactor
        self._loop.start(self._registry.poll_interval, now=False)
        if (
            self._registry.use_inotify
            and inotify is not None
            and IReactorFDSet.providedBy(self._reactor)
        ):
            try:
                make_private_dirs(self._registry.data_dir)
                notifier = _TreeNotify(self._reactor, self._registry.data_dir, self._on_event)
                notifier.ensure_watched(self._registry.data_dir)
            except (OSError, inotify.INotifyError) as e:
                self.log.warn(  # noqa: G010 (twisted.logger's name)
                    "Cannot watch {directory} with inotify ({error}): polling",
                    directory=self._registry.data_dir,
                    error=e,
                )
            else:
                notifier.startReading()
                self._notifier = notifier

    def _on_event(self, _watch: object, path: FilePath, mask: int) -> None:
        name = os.path.basename(os.fsdecode(path.path))
        if name == os.path.basename(self._registry.data_dir) or mask & inotify.IN_Q_OVERFLOW:
            self._poll()  # the directory itself, or events were lost
            return
        key = key_of_data_node(name)
        if key is not None:
            self.changed(key)

    def _stop_timers(self) -> None:
        if self._loop is not None:
            if self._loop.running:
                self._loop.stop()
            self._loop = None
        for call in self._soon.values():
            if call.active():
                call.cancel()
        self._soon.clear()
        if self._notifier is not None:
            self._notifier.loseConnection()
            self._notifier = None

    def stop(self) -> None:
        for watches in list(self._watches.values()):
            for watch in list(watches):
                watch.stop()
        self._stop_timers()


__all__ = [
    "FileRegistry",
    "Owner",
    "current_owner",
    "default_registry_root",
    "encode_node",
    "process_start_time",
    "write_atomically",
]
