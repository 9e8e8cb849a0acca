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

Every process sharing a root must see the same process ids (one host, one
PID namespace): a node whose owner's pid is not visible counts as dead.
"""

from __future__ import annotations

import json
import os
import secrets
import struct
from collections.abc import Callable, Iterator
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
    MAX_VALUE_SIZE,
    IInstanceListener,
    Instance,
    InstanceDiff,
    IRegistry,
    IWatch,
    ListingMixin,
    Query,
    RegistryError,
    ValueDelivery,
    check_key,
    check_value,
    data_node_name,
    key_of_data_node,
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


def write_atomically(path: str, data: bytes, attempts: int = 5) -> None:
    """
    Replace the file at C{path} with C{data} so that a reader sees either
    the old content or the new, never part of it: write a temporary file
    (a dot file, which scanners skip) in the same directory and rename it
    into place.  Missing parent directories are created.

    @raise OSError: if it cannot be done.
    """
    directory, name = os.path.split(path)
    for attempt in range(attempts):
        temporary = os.path.join(directory, f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            os.makedirs(directory, exist_ok=True)
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileNotFoundError:
            # Another process pruned a directory of the path, empty a moment
            # ago, while we were making it or before we opened: again.
            if attempt == attempts - 1:
                raise
            continue
        try:
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
    @return: the file's cache key (inode, mtime_ns, size) as of its reading
        and its content, or L{None} if it does not exist.
    """
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            return (st.st_ino, st.st_mtime_ns, st.st_size), f.read()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None


def _parse_document(data: bytes) -> tuple[dict[str, Any], Owner | None]:
    """
    @return: a node's JSON object without its owner record, and the owner.
    @raise RegistryError: if it is not a JSON object or its owner is malformed.
    """
    try:
        doc = json.loads(data)
    except ValueError as e:
        raise RegistryError(f"not JSON: {e}") from e
    if not isinstance(doc, dict):
        raise RegistryError("not a JSON object")
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
    except (RegistryError, KeyError, TypeError):
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

        def ensure_watched(self, path: str) -> None:
            """
            Watch directory C{path} (not its subdirectories) unless watched.
            """
            self.watch(
                FilePath(path),
                mask=_WATCH_MASK,
                autoAdd=True,
                callbacks=[self._callback],
            )

        def _watch_subtree(self, path: str) -> None:
            for directory, _, _ in os.walk(path):
                try:
                    self.ensure_watched(directory)
                except inotify.INotifyError:
                    pass  # gone again already

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


@implementer(IWatch)
class _FileWatch:
    def __init__(self, scanner: _Scanner, registry: FileRegistry, diff: InstanceDiff) -> None:
        self.scanner = scanner
        self.registry = registry
        self.diff = diff
        self.fed_generation = -1

    def stop(self) -> None:
        if not self.diff.stopped:
            self.diff.stopped = True
            self.scanner.remove_watch(self)
            self.registry._forget_watch(self)


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
        self._owners: set[Owner] = set()
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

    # Scanning.

    def _walk(self) -> Iterator[tuple[str, str, os.stat_result]]:
        """
        Yield C{(relative path, path, stat)} of every file at instance depth
        below C{services}, skipping dot files (temporary files).  Each
        directory is watched before it is listed, so that nothing created in
        it afterwards goes unnoticed.
        """
        self._unwatched = False
        stack = [(self.services, 0, "")]
        while stack:
            directory, depth, rel = stack.pop()
            if self.notifier is not None:
                try:
                    self.notifier.ensure_watched(directory)
                except inotify.INotifyError:
                    # Gone (then listing fails too), or out of inotify
                    # watches: then poll, as without inotify.
                    if os.path.isdir(directory):
                        self._unwatched = True
                    if self._unwatched and not self._warned_unwatched:
                        self._warned_unwatched = True
                        self.log.warn(  # noqa: G010 (twisted.logger's name)
                            "Cannot watch {directory} with inotify: polling",
                            directory=directory,
                        )
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
                        if depth < 4:
                            if entry.is_dir(follow_symlinks=False):
                                stack.append((entry.path, depth + 1, f"{rel}/{entry.name}"))
                            continue
                        if not entry.is_file(follow_symlinks=False):
                            continue
                        st = entry.stat(follow_symlinks=False)
                    except OSError:
                        continue  # gone meanwhile, or not ours to see
                    yield f"{rel}/{entry.name}", entry.path, st

    def _parse(self, rel: str, path: str, st: os.stat_result) -> _Entry | None:
        try:
            found = _read_file(path)
        except OSError as e:
            self.log.warn(  # noqa: G010 (twisted.logger's name)
                "Cannot read registry node {path}: {error}", path=path, error=e
            )
            return _Entry((st.st_ino, st.st_mtime_ns, st.st_size), None, None)
        if found is None:
            return None
        key, data = found
        self.reads += 1
        try:
            doc, owner = _parse_document(data)
            instance = Instance.from_go(doc)
            if instance.path != rel:
                raise RegistryError(f"it describes {instance.path}")
        except (RegistryError, ValueError) as e:
            self.log.warn(  # noqa: G010 (twisted.logger's name)
                "Skipping malformed registry node {path}: {error}",
                path=path,
                error=str(e),
            )
            return _Entry(key, None, None)
        return _Entry(key, instance, owner)

    def scan(self) -> tuple[dict[str, Instance], bool]:
        """
        Bring the cache up to date with the disk (parsing only files whose
        inode, mtime or size changed), and hide and prune the nodes of dead
        owners.

        @return: the live instances by path, and whether they may differ from
            the previous scan's.
        """
        changed = False
        cache: dict[str, _Entry] = {}
        for rel, path, st in self._walk():
            entry = self._cache.get(rel)
            if entry is None or entry.key != (st.st_ino, st.st_mtime_ns, st.st_size):
                entry = self._parse(rel, path, st)
                if entry is None:
                    continue
                changed = True
            cache[rel] = entry
        if len(cache) != len(self._cache):
            changed = True
        self._cache = cache

        liveness = Liveness()
        live: dict[str, Instance] = {}
        dead: set[str] = set()
        owners: set[Owner] = set()
        for rel, entry in cache.items():
            if entry.instance is None:
                continue
            if entry.owner is not None:
                if not liveness.alive(entry.owner):
                    dead.add(rel)
                    continue
                owners.add(entry.owner)
            live[rel] = entry.instance
        for rel in dead:
            self._prune(rel, cache[rel], liveness)
        if dead != self._dead:
            changed = True
        self._dead = dead
        self._owners = owners
        if changed:
            self.generation += 1
        return live, changed

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
        self.request_scan(0)

    def remove_watch(self, watch: _FileWatch) -> None:
        if watch in self._watches:
            self._watches.remove(watch)
            if not self._watches:
                self._stop_timers()

    def request_scan(self, delay: float = DEBOUNCE) -> None:
        """
        Rescan and feed the watches after C{delay} seconds (or sooner, if a
        scan is due sooner already).
        """
        if not self._watches:
            return
        if self._pending is None:
            self._pending = self._reactor.callLater(delay, self._scan_and_feed)
        elif self._pending.getTime() - self._reactor.seconds() > delay:
            self._pending.reset(delay)

    def _scan_and_feed(self) -> None:
        if self._pending is not None:
            if self._pending.active():
                self._pending.cancel()
            self._pending = None
        try:
            live, _ = self.scan()
        except Exception:  # noqa: BLE001 (keep watching; the next scan may do)
            self.log.failure("Scanning registry {root} failed", root=self.root)
            return
        for watch in list(self._watches):
            if watch.diff.stopped or watch.fed_generation == self.generation:
                continue
            watch.fed_generation = self.generation
            try:
                watch.diff.feed(live.values())
            except Exception:  # noqa: BLE001 (one listener's bug must not stop the rest)
                self.log.failure(
                    "Registry listener {listener!r} failed",
                    listener=watch.diff.listener,
                )

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
            self._scan_and_feed()

    def _an_owner_died(self) -> bool:
        liveness = Liveness()
        return not all(liveness.alive(owner) for owner in self._owners)

    def _on_event(self, _watch: object, path: FilePath, mask: int) -> None:
        name = os.path.basename(os.fsencode(path.path))
        if name.startswith(b".") and not mask & inotify.IN_IGNORED:
            return  # a writer's temporary file
        self.request_scan(DEBOUNCE)

    def _start_timers(self) -> None:
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
            os.makedirs(self.services, exist_ok=True)
            notifier = _TreeNotify(self._reactor, self.services, self._on_event)
        except (OSError, inotify.INotifyError) as e:
            self.log.warn(  # noqa: G010 (twisted.logger's name)
                "Cannot use inotify ({error}): polling {root}", error=e, root=self.root
            )
            return None
        try:
            notifier.watch(
                FilePath(self.services),
                mask=_WATCH_MASK,
                autoAdd=True,
                callbacks=[self._on_event],
                recursive=True,
            )
        except (OSError, inotify.INotifyError) as e:
            # The scan that follows watches what it can.
            self.log.warn(  # noqa: G010 (twisted.logger's name)
                "Cannot watch all of {root} ({error})", root=self.services, error=e
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

    def _changed(self) -> None:
        """
        Our own write: let this process's watches see it without waiting for
        inotify or polling.
        """
        if self._scanner is not None:
            self._scanner.request_scan(DEBOUNCE)

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
        Create the root (and its C{services} and C{statistics}) if missing.
        """

        def make() -> None:
            os.makedirs(self.services_dir, exist_ok=True)
            os.makedirs(self.statistics_dir, exist_ok=True)

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
        self._changed()

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
            self._changed()

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
            live, changed = scanner.scan()
            if changed:
                scanner.request_scan(0)
            return query.filter(sort_instances(live.values()))

        return self._io(run)

    def watch(self, query: Query, listener: IInstanceListener) -> IWatch:
        """
        Watch the tree: the snapshot comes from the reactor, soon after.
        """
        scanner = self._get_scanner()
        watch = _FileWatch(scanner, self, InstanceDiff(query, listener))
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
        with open(path, "rb") as f:
            data = f.read(MAX_VALUE_SIZE + 1)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None
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
                os.makedirs(self._registry.data_dir, exist_ok=True)
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
