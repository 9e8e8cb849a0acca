"""
The ZooKeeper registry: the tree of the Go Skynet protocol kept in a
ZooKeeper ensemble, readable by any ZooKeeper client in any language.

Under a chroot (default C{/skynet}):

    /services/<Name>/<Version>/<Region>/<Host>/<Port>     the instance (JSON)
    /statistics/<Name>/<Version>/<Region>/<Host>/<Port>   its statistics (JSON)
    /data/<escaped key>                                   a data node (bytes)

Data nodes are persistent (they outlive their writer's session); Go Skynet
never reads C{/data}.  Instance and statistics leaves are ephemeral nodes of this registry's session: they vanish when
the process dies (after the session timeout) or closes its session.  Parent
nodes are created as needed and pruned when a removal leaves them empty.

Threads
=======
Threads elsewhere in skynet are few and named: L{skynet.sync} runs its
registry on a private reactor in a daemon thread, L{skynet.registry.locks}
blocks in a pool of its own, log searches (L{skynet.observe.logsearch}) run
in the reactor's thread pool and C{sky} reads stdin in a thread.  Here,
kazoo runs its
connection and its callbacks on threads of its own; everything that comes
back from kazoo is hopped onto the reactor thread with C{callFromThread}:

  - data calls use kazoo's C{*_async} methods, whose results fire a
    L{Deferred} through C{IAsyncResult.rawlink} and C{callFromThread};
  - kazoo's blocking C{start_async} and C{stop} run in a thread pool (given,
    or owned by the registry and stopped with it);
  - every watch and connection-state callback is hopped to the reactor.

Sessions
========
The registry remembers what it wrote (the nodes it owns and their latest
contents), so it can rewrite them whenever ZooKeeper has lost them:

  - While the connection is I{suspended} (a server died, the client is
    moving to another one) nothing is forgotten: watches keep their known
    instances and report no removals; writes wait for the connection and are
    retried.
  - When the session has I{expired}, kazoo opens a new one and the registry
    re-creates every node it owns on it, then re-reads its watches and
    reports only the differences.
  - When ZooKeeper stays unreachable for longer than the session timeout,
    the registry goes I{offline}: writes are recorded and their Deferreds fire
    at once (they are applied when ZooKeeper is back), and queries fail with
    L{RegistryError}.

L{ZooKeeperRegistry.start} waits at most C{connect_timeout} seconds (2 by
default) for a session.  If ZooKeeper is unreachable it logs
C{"ZooKeeper at {hosts} unreachable; waiting to register"}, goes offline
and fires anyway, so a service can serve direct connections while kazoo
keeps trying; its nodes are written as soon as a session is established.
"""

# twisted.logger.Logger spells it warn(), not warning():
# ruff: noqa: G010

from __future__ import annotations

import json
import logging
import math
import os
import stat
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import attr
from kazoo.client import KazooClient, KazooState  # type: ignore[import-untyped]
from kazoo.exceptions import (  # type: ignore[import-untyped]
    EXCEPTIONS,
    AuthFailedError,
    BadVersionError,
    ConnectionClosedError,
    ConnectionLoss,
    KazooException,
    NoAuthError,
    NodeExistsError,
    NoNodeError,
    NotEmptyError,
    OperationTimeoutError,
    RolledBackError,
    RuntimeInconsistency,
    SessionExpiredError,
    UnimplementedError,
)
from kazoo.protocol.serialization import (  # type: ignore[import-untyped]
    MultiHeader,
    Watch,
    int_struct,
    multiheader_struct,
    read_string,
    stat_struct,
    write_string,
)
from kazoo.protocol.states import EventType, ZnodeStat  # type: ignore[import-untyped]
from kazoo.retry import KazooRetry  # type: ignore[import-untyped]
from kazoo.security import make_acl, make_digest_acl  # type: ignore[import-untyped]
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredList,
    DeferredLock,
    fail,
    succeed,
)
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from skynet.config import default_reactor
from skynet.registry.base import (
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
    parse_json_node,
    sort_instances,
)

__all__ = ["DEFAULT_CHROOT", "DEFAULT_SESSION_TIMEOUT", "ZooKeeperRegistry"]

DEFAULT_CHROOT = "/skynet"
DEFAULT_SESSION_TIMEOUT = 4.0
DEFAULT_CONNECT_TIMEOUT = 2.0
DEFAULT_PORT = 2181

#: Depth of an instance node below C{/services}: Name/Version/Region/Host/Port.
LEAF_DEPTH = 5

#: Errors that mean "the connection is gone for now": retry once it is back.
_CONNECTION_ERRORS = (
    ConnectionLoss,
    ConnectionClosedError,
    OperationTimeoutError,
    SessionExpiredError,
)

#: kazoo logs every failed reconnection attempt as a warning; the registry
#: reports connection changes itself through twisted.logger, so kazoo's own
#: logger only shows errors unless the application configures it.
_kazoo_log = logging.getLogger("skynet.registry.zookeeper.kazoo")
if _kazoo_log.level == logging.NOTSET:
    _kazoo_log.setLevel(logging.ERROR)


def _parse_hosts(hosts: str) -> str:
    """
    Check a kazoo host list C{h1:2181,h2:2181} and return it normalized.

    @raise ValueError: if it is empty or a port is not a number.
    """
    if not isinstance(hosts, str) or not hosts.strip():
        raise ValueError("no ZooKeeper hosts given")
    result = []
    for item in hosts.split(","):
        item = item.strip()
        if not item:
            raise ValueError(f"empty host in {hosts!r}")
        if item.startswith("["):
            host, sep, rest = item[1:].partition("]")
            if not sep or not host or (rest and not rest.startswith(":")):
                raise ValueError(f"bad IPv6 host {item!r}")
            port_text = rest[1:] if rest else ""
            host = f"[{host}]"
        else:
            host, _, port_text = item.partition(":")
            if not host or "/" in host or "@" in host:
                raise ValueError(f"bad host {item!r}")
        if port_text:
            if not port_text.isdigit() or not 0 < int(port_text) < 65536:
                raise ValueError(f"bad port in {item!r}")
            port = int(port_text)
        else:
            port = DEFAULT_PORT
        result.append(f"{host}:{port}")
    return ",".join(result)


def _parse_chroot(chroot: str) -> str:
    """
    Check a chroot path and return it without a trailing slash (C{""} for
    the root itself).

    @raise ValueError: if it is not an absolute path of valid components.
    """
    if not isinstance(chroot, str) or not chroot.startswith("/"):
        raise ValueError(f"chroot must be an absolute path, not {chroot!r}")
    parts = [p for p in chroot.split("/") if p]
    for part in parts:
        check_component("chroot component", part)
    return "".join("/" + p for p in parts)


def _parse_timeout(what: str, value: Any) -> float:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number of seconds, not {value!r}") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"{what} must be positive, not {value!r}")
    return seconds


def _prefix_of(query: Query) -> list[str]:
    """
    The path components below C{/services} that C{query} fixes, in order
    (Name, Version, Region, Host, Port), up to the first one it leaves open.
    """
    parts = []
    values = (query.service, query.version, query.region, query.host, query.port)
    names = ("service name", "version", "region", "host", "port")
    for name, value in zip(names, values, strict=True):
        if value is None:
            break
        parts.append(check_component(name, str(value)))
    return parts


def _wanted(query: Query, depth: int, name: str) -> bool:
    """
    Whether a child called C{name} at C{depth} below C{/services} (1 for a
    service name, 5 for a port) can hold instances matching C{query}.
    """
    values = (query.service, query.version, query.region, query.host, query.port)
    value = values[depth - 1]
    return value is None or str(value) == name


def _first_error(results: list[tuple[bool, Any]]) -> list[Any]:
    """
    The values of a consumed L{DeferredList}, raising its first failure.
    """
    for ok, value in results:
        if not ok:
            value.raiseException()
    return [value for _, value in results]


@attr.frozen(repr=False)
class Credentials:
    """
    A ZooKeeper digest identity: the cluster's members share one.

    @ivar user: the digest user name.
    @ivar secret: its password (never shown by C{repr}).
    @ivar file: the credentials file it was read from, if any.
    """

    user: str
    secret: str
    file: str | None = None

    def __repr__(self) -> str:
        return f"<Credentials {self.user}:***{' from ' + self.file if self.file else ''}>"

    @classmethod
    def parse(cls, text: str, file: str | None = None) -> Credentials:
        """
        Read C{user:secret}.

        @raise ValueError: if either part is empty.
        """
        user, sep, secret = text.strip().partition(":")
        if not sep or not user or not secret or "\n" in secret:
            where = f" in {file}" if file else ""
            raise ValueError(f"ZooKeeper credentials{where} must be one line user:secret")
        return cls(user, secret, file)

    @classmethod
    def from_file(cls, path: str) -> Credentials:
        """
        Read C{user:secret} from a file that only its owner may read.

        @raise ValueError: if the file is missing, not a regular file,
            readable or writable by group or others, or malformed.
        """
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as e:
            raise ValueError(f"cannot read ZooKeeper credentials file {path}: {e}") from None
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ValueError(f"ZooKeeper credentials file {path} is not a regular file")
            if st.st_mode & 0o077:
                raise ValueError(
                    f"ZooKeeper credentials file {path} is accessible by other users"
                    f" (mode {stat.S_IMODE(st.st_mode):04o}): chmod 600 {path}"
                )
            data = f.read(4096)
        try:
            return cls.parse(data.decode("utf-8"), path)
        except UnicodeDecodeError:
            raise ValueError(f"ZooKeeper credentials file {path} is not UTF-8") from None

    def acl(self, open_reads: bool) -> list[Any]:
        """
        The ACL of every node this registry creates: all permissions for
        the members, and read for anyone if C{open_reads}.
        """
        acl = [make_digest_acl(self.user, self.secret, all=True)]
        if open_reads:
            acl.append(make_acl("world", "anyone", read=True))
        return acl


# ZooKeeper 3.6+: persistent recursive watches and batched reads.  kazoo
# 2.11 has neither; these requests follow ZooKeeper's jute records
# (AddWatchRequest, RemoveWatchesRequest, a MultiOperationRecord of reads)
# and go through kazoo's own request queue (KazooClient._call).  Servers
# before 3.6 answer "unimplemented": then the one-shot watches are used.

_ADD_WATCH = 106
_REMOVE_WATCHES = 18
_MULTI_READ = 22
_PERSISTENT_RECURSIVE = 1  # AddWatchMode
_WATCHER_PERSISTENT_RECURSIVE = 5  # WatcherType, for removeWatches
_GET_DATA = 4
_GET_CHILDREN = 8
_EVENT_CREATED, _EVENT_DELETED, _EVENT_CHANGED = 1, 2, 3

#: At most this many reads in one multiRead request.
READ_BATCH = 500


class _AddWatch:
    type = _ADD_WATCH

    def __init__(self, path: str) -> None:
        self.path = path

    def __repr__(self) -> str:
        return f"AddWatch({self.path!r}, persistent recursive)"

    def serialize(self) -> bytes:
        return bytes(write_string(self.path)) + int_struct.pack(_PERSISTENT_RECURSIVE)

    def deserialize(self, buffer: bytes, offset: int) -> bool:
        return True


class _RemoveWatches(_AddWatch):
    type = _REMOVE_WATCHES

    def __repr__(self) -> str:
        return f"RemoveWatches({self.path!r}, persistent recursive)"

    def serialize(self) -> bytes:
        return bytes(write_string(self.path)) + int_struct.pack(_WATCHER_PERSISTENT_RECURSIVE)


class _MultiRead:
    """
    Several getData / getChildren reads (without watches) in one request;
    each read has its own result or error.
    """

    type = _MULTI_READ

    def __init__(self, operations: list[tuple[int, str]]) -> None:
        self.operations = operations

    def __repr__(self) -> str:
        return f"MultiRead({len(self.operations)} reads)"

    def serialize(self) -> bytes:
        b = bytearray()
        for kind, path in self.operations:
            b.extend(MultiHeader(kind, False, -1).serialize())
            b.extend(write_string(path))
            b.append(0)  # no watch
        return bytes(b + multiheader_struct.pack(-1, True, -1))

    def deserialize(self, buffer: bytes, offset: int) -> list[Any]:
        # In kazoo's connection thread, for every answer of a snapshot's
        # reads: the structs are unpacked here, without kazoo's per-field
        # helpers and header tuples.
        results: list[Any] = []
        header, header_size = multiheader_struct.unpack_from, multiheader_struct.size
        integer, integer_size = int_struct.unpack_from, int_struct.size
        unpack_stat, stat_size, make_stat = (
            stat_struct.unpack_from,
            stat_struct.size,
            ZnodeStat._make,
        )
        kind, done, _ = header(buffer, offset)
        offset += header_size
        while done != 1:
            if kind == _GET_DATA:
                (length,) = integer(buffer, offset)
                offset += integer_size
                data = None
                if length >= 0:
                    data = buffer[offset : offset + length]
                    offset += length
                results.append((data, make_stat(unpack_stat(buffer, offset))))
                offset += stat_size
            elif kind == _GET_CHILDREN:
                (count,) = integer(buffer, offset)
                offset += integer_size
                children = []
                for _ in range(max(count, 0)):
                    child, offset = read_string(buffer, offset)
                    children.append(child)
                results.append(children)
            else:
                (error,) = integer(buffer, offset)
                offset += integer_size
                results.append(EXCEPTIONS[error]())
            kind, done, _ = header(buffer, offset)
            offset += header_size
        return results


class _Group:
    """
    The reads of one L{_ReadBatch.read_many} call: their results, in order,
    and the Deferred that fires with them once all are in.
    """

    __slots__ = ("d", "remaining", "results")

    def __init__(self, count: int) -> None:
        self.d: Deferred = Deferred()
        self.remaining = count
        self.results: list[Any] = [None] * count

    def put(self, index: int, result: Any) -> None:
        self.results[index] = result
        self.remaining -= 1
        if self.remaining == 0:
            self.d.callback(self.results)


class _ReadBatch:
    """
    Gathers the reads of one reactor turn into multiRead requests of up to
    L{READ_BATCH} reads: a snapshot of 10,000 instances is then tens of
    requests, not 15,000.  On a server without multiRead, each read goes
    alone (and C{on_unsupported} is told).

    L{read_many} asks for many nodes with one Deferred (a snapshot's 10,000
    instance reads would otherwise cost a Deferred and its callbacks each).
    """

    def __init__(
        self, zk: Any, call: Callable[..., Deferred], reactor: Any, on_unsupported
    ) -> None:
        self._zk = zk
        self._call = call
        self._reactor = reactor
        self._on_unsupported = on_unsupported
        #: (kind, path, the Deferred of a single read or the group, index).
        self._queue: list[tuple[int, str, Deferred | _Group, int]] = []
        self._flush_call: Any = None
        self.supported = True

    def read(self, kind: int, path: str) -> Deferred:
        """
        One read: a Deferred firing with its result (C{(data, stat)} or a
        list of children) or failing with its error.
        """
        if not self.supported:
            return self._alone(kind, path)
        d: Deferred = Deferred()
        self._queue.append((kind, path, d, 0))
        self._queued()
        return d

    def read_many(self, kind: int, paths: list[str]) -> Deferred:
        """
        Reads of the same kind of several nodes: a Deferred firing with a
        list, in the order of C{paths}, of each read's result or its
        exception (never failing itself).
        """
        group = _Group(len(paths))
        if not paths:
            group.d.callback([])
        elif not self.supported:
            for index, path in enumerate(paths):
                self._read_alone_into(kind, path, group, index)
        else:
            self._queue.extend((kind, path, group, index) for index, path in enumerate(paths))
            self._queued()
        return group.d

    def _queued(self) -> None:
        if len(self._queue) >= READ_BATCH:
            self._flush()
        elif self._flush_call is None:
            self._flush_call = self._reactor.callLater(0, self._flush)

    def _alone(self, kind: int, path: str) -> Deferred:
        method = self._zk.get_async if kind == _GET_DATA else self._zk.get_children_async
        return self._call(method, path)

    def _read_alone_into(self, kind: int, path: str, group: _Group, index: int) -> None:
        self._alone(kind, path).addCallbacks(
            lambda result: group.put(index, result),
            lambda failure: group.put(index, failure.value),
        )

    def _flush(self) -> None:
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        while self._queue:
            items, self._queue = self._queue[:READ_BATCH], self._queue[READ_BATCH:]
            self._send(items)

    def _send(self, items: list[tuple[int, str, Deferred | _Group, int]]) -> None:
        def multi_read() -> Any:
            result = self._zk.handler.async_result()
            self._zk._call(_MultiRead([(kind, path) for kind, path, _, _ in items]), result)
            return result

        def answered(results: list[Any]) -> None:
            for (_, _, sink, index), result in zip(items, results, strict=True):
                if isinstance(sink, _Group):
                    sink.put(index, result)
                elif isinstance(result, Exception):
                    sink.errback(Failure(result))
                else:
                    sink.callback(result)

        def failed(failure: Failure) -> None:
            if failure.check(UnimplementedError):
                self.supported = False
                self._on_unsupported()
                for kind, path, sink, index in items:
                    if isinstance(sink, _Group):
                        self._read_alone_into(kind, path, sink, index)
                    else:
                        self._alone(kind, path).chainDeferred(sink)
                return
            for _, _, sink, index in items:
                if isinstance(sink, _Group):
                    sink.put(index, failure.value)
                else:
                    sink.errback(failure)

        self._call(multi_read).addCallbacks(answered, failed)


@attr.frozen
class _WatchContext:
    """
    All a watch may use of its registry: reads with a ZooKeeper watch
    attached, whether the session is up, the hop to the reactor thread, the
    strict parse of an instance node, and leaving the registry's list of
    watches.  (A narrow internal API: watches read no private attribute of
    the registry.)

    @ivar services: the full path of C{/services}.
    @ivar get: C{get(path, watcher)} -> Deferred of C{(data, stat)}.
    @ivar get_children: C{get_children(path, watcher)} -> Deferred of names.
    @ivar exists: C{exists(path, watcher)} -> Deferred of a stat or L{None}.
    @ivar connected: C{connected()} -> whether the session is up now.
    @ivar call_from_thread: the reactor's C{callFromThread}, for watchers.
    @ivar parse_instance: C{parse_instance(path, data)} -> the instance, or
        L{None} for a bad node (logged).
    @ivar forget: C{forget(watch)}: the watch has stopped.
    """

    services: str
    get: Callable[[str, Callable[[Any], None]], Deferred]
    get_children: Callable[[str, Callable[[Any], None]], Deferred]
    exists: Callable[[str, Callable[[Any], None]], Deferred]
    connected: Callable[[], bool]
    call_from_thread: Callable[..., None]
    parse_instance: Callable[[str, bytes], Instance | None]
    forget: Callable[[Any], None]
    #: C{persistent()}: whether to use a persistent recursive watch.
    persistent: Callable[[], bool]
    #: C{watch_subtree(base, handler)} / C{unwatch_subtree(base, handler)}:
    #: a persistent recursive watch on C{base}; C{handler(type, path)} is
    #: called in the reactor for every event below it.
    watch_subtree: Callable[[str, Callable[[int, str], None]], Deferred]
    unwatch_subtree: Callable[[str, Callable[[int, str], None]], None]
    #: C{read(kind, path)}: a batched read without a watch.
    read: Callable[[int, str], Deferred]
    #: C{read_many(kind, paths)}: batched reads without a watch, one
    #: Deferred firing with each one's result or exception, in order.
    read_many: Callable[[int, list[str]], Deferred]


@implementer(IRegistry)
class ZooKeeperRegistry(ListingMixin):
    """
    A registry kept in ZooKeeper through kazoo.

    @ivar url: C{zk://hosts/chroot}, for messages and for child processes.
    @ivar zk_hosts: the normalized ZooKeeper host list (C{hosts()} is the
        listing of instance hosts every registry offers).
    @ivar chroot: the root of the tree, C{/skynet} by default.
    @ivar session_timeout: the requested session timeout in seconds.
    """

    log = Logger()

    def __init__(
        self,
        hosts: str,
        chroot: str = DEFAULT_CHROOT,
        reactor: Any = None,
        session_timeout: float = DEFAULT_SESSION_TIMEOUT,
        threadpool: ThreadPool | None = None,
        *,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        credentials: Credentials | None = None,
        open_reads: bool = True,
        persistent_watches: bool = True,
    ) -> None:
        """
        @param hosts: kazoo's host list, C{"h1:2181,h2:2181"}.
        @param chroot: the root of the registry tree in ZooKeeper.
        @param reactor: the reactor; the global one by default.
        @param session_timeout: the ZooKeeper session timeout in seconds;
            the server may clamp it (to at least 2 ticks).
        @param threadpool: the pool for kazoo's blocking start and stop; by
            default the registry makes one and stops it in L{stop}.
        @param connect_timeout: how long L{start} waits for a session
            before it fires anyway and keeps trying in the background.
        @param credentials: the cluster's digest identity: the session
            authenticates with it, and every node it creates carries an ACL
            that lets only that identity create, change or delete (see
            L{Credentials.acl}).  L{None}: no authentication, open ACLs.
        @param open_reads: with C{credentials}, whether anyone may read
            the nodes this registry creates (C{False}: members only).
        @param persistent_watches: on ZooKeeper 3.6+, watch each query's
            subtree with one persistent recursive watch and read it in
            batches (C{False}, or an older server: a one-shot watch per
            node).
        @raise ValueError: if an argument is malformed.
        """
        self._reactor = default_reactor(reactor)
        self.zk_hosts = _parse_hosts(hosts)
        self.chroot = _parse_chroot(chroot) or "/"
        self._root = _parse_chroot(chroot)
        self.session_timeout = _parse_timeout("session_timeout", session_timeout)
        self.connect_timeout = _parse_timeout("connect_timeout", connect_timeout)
        self.credentials = credentials
        self.open_reads = open_reads
        self._acl = credentials.acl(open_reads) if credentials is not None else None
        options = []
        if self.session_timeout != DEFAULT_SESSION_TIMEOUT:
            options.append(f"session_timeout={self.session_timeout:g}")
        if credentials is not None and credentials.file is not None:
            options.append(f"auth={quote(credentials.file)}")
        if credentials is not None and not open_reads:
            options.append("read=members")
        query = "?" + "&".join(options) if options else ""
        userinfo = shown = ""
        if credentials is not None and credentials.file is None:
            user = quote(credentials.user, safe="")
            userinfo = f"{user}:{quote(credentials.secret, safe='')}@"
            shown = f"{user}:***@"
        self.url = f"zk://{userinfo}{self.zk_hosts}{self.chroot}{query}"
        #: The URL without an inline secret, for logs and messages.
        self.display_url = f"zk://{shown}{self.zk_hosts}{self.chroot}{query}"

        if threadpool is None:
            threadpool = ThreadPool(minthreads=0, maxthreads=1, name="skynet-zookeeper")
            self._own_pool = True
        else:
            self._own_pool = False
        self._pool = threadpool

        self._zk = KazooClient(
            hosts=self.zk_hosts,
            timeout=self.session_timeout,
            connection_retry=KazooRetry(max_tries=-1, delay=0.1, backoff=2, max_delay=1.0),
            logger=_kazoo_log,
            auth_data=(
                [("digest", f"{credentials.user}:{credentials.secret}")] if credentials else None
            ),
            default_acl=self._acl,
        )

        #: Nodes this registry owns, full path -> contents.
        self._desired: dict[str, bytes] = {}
        #: Paths whose write has not reached ZooKeeper yet.
        self._dirty: set[str] = set()
        #: Full path -> the session id that wrote it (the fast path of updates).
        self._written: dict[str, int] = {}
        #: Full path -> uuid of the instance an explicit remove() deletes.
        self._removing: dict[str, str] = {}
        self._syncs: dict[str, list[Deferred]] = {}
        self._running: set[str] = set()

        self.bad_nodes = NodeWarnings(self.log, self._reactor)
        self._watches: set[_ZooKeeperWatch] = set()
        self._value_watches: set[_ZooKeeperValueWatch] = set()
        self._waiters: list[Deferred] = []
        self._sleeps: set[Deferred] = set()
        self._connected = False
        self._offline = False
        self._session_id: int | None = None
        self._offline_call: Any = None
        #: uuid -> the full path its instance was last seen at (L{get}).
        self._paths_by_uuid: dict[str, str] = {}
        self._securing: Deferred | None = None
        self._batch = _CreateBatch(self._zk, self._call, self._reactor)
        self.persistent_watches = persistent_watches
        self._reads = _ReadBatch(self._zk, self._call, self._reactor, self._no_persistent)
        #: Persistent recursive watches: base path -> handlers.
        self._subtrees: dict[str, list[Callable[[int, str], None]]] = {}
        self._hook_watch_events()
        self._context = _WatchContext(
            services=f"{self._root}/services",
            get=lambda path, watcher: self._call(self._zk.get_async, path, watch=watcher),
            get_children=lambda path, watcher: self._call(
                self._zk.get_children_async, path, watch=watcher
            ),
            exists=lambda path, watcher: self._call(self._zk.exists_async, path, watch=watcher),
            connected=lambda: self._connected,
            call_from_thread=self._reactor.callFromThread,
            parse_instance=self.parse_instance,
            forget=self._forget_watch,
            persistent=lambda: self.persistent_watches and self._reads.supported,
            watch_subtree=self._watch_subtree,
            unwatch_subtree=self._unwatch_subtree,
            read=lambda kind, path: self._reads.read(kind, path),
            read_many=lambda kind, paths: self._reads.read_many(kind, paths),
        )
        self._started = False
        self._stopping = False
        self._start_d: Deferred | None = None
        self._kazoo_starting: Deferred | None = None
        self._stop_d: Deferred | None = None
        self._shutdown_trigger: Any = None
        #: Stop at reactor shutdown (see the hook in _start).
        self.stop_at_shutdown = True

    @classmethod
    def from_url(
        cls,
        url: str,
        reactor: Any = None,
        session_timeout: float | None = None,
    ) -> ZooKeeperRegistry:
        """
        Make a registry from
        C{zk://[user:secret@]h1:2181,h2:2181/chroot?session_timeout=4&auth=FILE&read=members}.

        The chroot defaults to C{/skynet}, the port to 2181.  An explicit
        C{session_timeout} argument wins over the URL's.  Credentials come
        from the URL's user and password (percent-escaped) or from
        C{auth=FILE}, a file holding C{user:secret} that only its owner may
        read; C{read=members} makes the nodes it creates unreadable to
        others (default C{read=open}).

        @raise RegistryError: if the URL or the credentials file is
            malformed.
        """
        try:
            parts = urlsplit(url)
        except (TypeError, ValueError, AttributeError) as e:
            raise RegistryError(f"bad ZooKeeper URL {url!r}: {e}") from None
        if parts.scheme != "zk":
            raise RegistryError(f"bad ZooKeeper URL {url!r}: the scheme must be zk://")
        if parts.fragment:
            raise RegistryError(f"bad ZooKeeper URL {url!r}: unexpected #fragment")
        try:
            options = parse_qs(
                parts.query, keep_blank_values=True, strict_parsing=bool(parts.query)
            )
        except ValueError as e:
            raise RegistryError(f"bad ZooKeeper URL {url!r}: {e}") from None
        unknown = set(options) - {"session_timeout", "auth", "read"}
        if unknown:
            raise RegistryError(
                f"bad ZooKeeper URL {url!r}: unknown option(s) {', '.join(sorted(unknown))}"
            )
        timeout: Any = DEFAULT_SESSION_TIMEOUT
        if "session_timeout" in options:
            if len(options["session_timeout"]) != 1:
                raise RegistryError(f"bad ZooKeeper URL {url!r}: session_timeout given twice")
            timeout = options["session_timeout"][0]
        if session_timeout is not None:
            timeout = session_timeout
        for name, values in options.items():
            if len(values) != 1:
                raise RegistryError(f"bad ZooKeeper URL {_redact(url)!r}: {name} given twice")
        chroot = parts.path if parts.path not in ("", "/") else DEFAULT_CHROOT
        userinfo, at, hosts = parts.netloc.rpartition("@")
        try:
            credentials = None
            if at:
                credentials = Credentials.parse(unquote(userinfo))
            if "auth" in options:
                if credentials is not None:
                    raise ValueError("give credentials in the URL or in auth=FILE, not both")
                credentials = Credentials.from_file(options["auth"][0])
            read = options.get("read", ["open"])[0]
            if read not in ("open", "members"):
                raise ValueError(f"read must be open or members, not {read!r}")
            if read == "members" and credentials is None:
                raise ValueError("read=members needs credentials")
            return cls(
                hosts,
                chroot,
                reactor=reactor,
                session_timeout=timeout,
                credentials=credentials,
                open_reads=read == "open",
            )
        except ValueError as e:
            raise RegistryError(f"bad ZooKeeper URL {_redact(url)!r}: {e}") from None

    def __repr__(self) -> str:
        return f"<ZooKeeperRegistry {self.display_url}>"

    # -- state, for callers and tests

    @property
    def connected(self) -> bool:
        """
        Whether the registry has a live session right now.
        """
        return self._connected

    @property
    def session_id(self) -> int | None:
        """
        The id of the current (or last) ZooKeeper session, the
        C{ephemeralOwner} of the nodes this registry owns.
        """
        return self._session_id

    # -- lifecycle

    # The one accessor skynet.registry.locks needs (added by the cluster
    # work, issue 16): kazoo's Lock recipe runs on this registry's session,
    # so a lock dies with the registering process's session.
    @property
    def kazoo_client(self) -> KazooClient:
        """
        The underlying kazoo client, for kazoo recipes (locks).  Its calls
        block or run on kazoo's threads: bridge them to the reactor.
        """
        return self._zk

    def start(self) -> Deferred:
        """
        Connect to ZooKeeper.

        @return: a Deferred firing with L{None} once a session is
            established, or after C{connect_timeout} seconds if ZooKeeper
            is unreachable; the registry then keeps trying and writes its
            nodes as soon as it connects.
        """
        if self._stopping:
            return fail(RegistryError(f"{self.display_url} is stopped"))
        if self._start_d is None:
            self._started = True
            self._start_d = Deferred.fromCoroutine(self._start())
        return _follow(self._start_d)

    async def _start(self) -> None:
        if self._own_pool:
            self._pool.start()
        # Hook for skynet.service.ServiceHost (wire helper): an owner that
        # stops this registry itself, after unregistering and draining, sets
        # stop_at_shutdown to False so that the registry is not stopped
        # under it by the same shutdown phase.
        if self.stop_at_shutdown:
            self._shutdown_trigger = self._reactor.addSystemEventTrigger(
                "before", "shutdown", self._stop_at_shutdown
            )
        self._zk.add_listener(self._state_from_kazoo)
        self._kazoo_starting = deferToThreadPool(self._reactor, self._pool, self._zk.start_async)
        await self._kazoo_starting
        if self._stopping:
            return
        if not self._connected:
            timer = self._reactor.callLater(self.connect_timeout, self._start_timed_out)
            try:
                await self._when_connected()
            finally:
                if timer.active():
                    timer.cancel()
        if self._securing is not None:
            # Started means the chroot is guarded.
            await _follow(self._securing)

    def _start_timed_out(self) -> None:
        self.log.warn(
            "ZooKeeper at {hosts} unreachable; waiting to register",
            hosts=self.zk_hosts,
            registry=self.display_url,
        )
        self._go_offline()

    def stop(self) -> Deferred:
        """
        Delete the nodes this registry owns (pruning empty parents), stop
        every watch and close the session.

        @return: a Deferred firing when kazoo and the owned thread pool
            have stopped.
        """
        if self._stop_d is None:
            self._stop_d = Deferred.fromCoroutine(self._stop())
        return _follow(self._stop_d)

    def _stop_at_shutdown(self) -> Deferred:
        self._shutdown_trigger = None
        return self.stop()

    async def _stop(self) -> None:
        self._stopping = True
        if self._shutdown_trigger is not None:
            self._reactor.removeSystemEventTrigger(self._shutdown_trigger)
            self._shutdown_trigger = None
        if self._offline_call is not None and self._offline_call.active():
            self._offline_call.cancel()
        for watch in list(self._watches):
            watch.stop()
        for value_watch in list(self._value_watches):
            value_watch.stop()
        if not self._started:
            return
        owned = list(self._desired)
        self._desired.clear()
        if self._connected and owned:
            # Closing the session would remove the nodes too; deleting them
            # first also prunes their empty parents.  Connection trouble ends
            # this early (_apply gives up while stopping).
            await DeferredList([self._sync(path) for path in owned], consumeErrors=True)
        self._fire_waiters(False)
        for sleep in list(self._sleeps):
            sleep.cancel()
        self._zk.remove_listener(self._state_from_kazoo)
        self._connected = False
        try:
            if self._kazoo_starting is not None:
                # Never close kazoo while its start runs (a pool may have
                # several threads).
                await DeferredList([_follow(self._kazoo_starting)], consumeErrors=True)
            await deferToThreadPool(self._reactor, self._pool, self._close_kazoo)
        finally:
            if self._own_pool:
                self._pool.stop()

    def _close_kazoo(self) -> None:
        # In the thread pool: kazoo's stop joins its threads.
        self._zk.stop()
        self._zk.close()

    # -- the bridge from kazoo's threads to the reactor

    def _call(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred:
        """
        Call one of kazoo's C{*_async} methods and return a Deferred that
        fires in the reactor thread with its result.
        """
        d: Deferred = Deferred()
        call_from_thread = self._reactor.callFromThread

        def done(result: Any) -> None:
            # In one of kazoo's threads.
            if result.successful():
                call_from_thread(d.callback, result.value)
            else:
                call_from_thread(d.errback, Failure(result.exception))

        try:
            method(*args, **kwargs).rawlink(done)
        except Exception:  # noqa: BLE001 - reported through the Deferred
            return fail()
        return d

    def _state_from_kazoo(self, state: str) -> None:
        # In kazoo's connection thread; the session id is read here because
        # it is the one the new state belongs to.
        client_id = self._zk.client_id
        session_id = client_id[0] if client_id else None
        self._reactor.callFromThread(self._state_changed, state, session_id)

    def _state_changed(self, state: str, session_id: int | None) -> None:
        if self._stopping:
            return
        if state == KazooState.CONNECTED:
            self._connected_to(session_id)
        elif state == KazooState.SUSPENDED:
            self._connected = False
            self.log.warn(
                "Connection to ZooKeeper at {hosts} lost; session {session} suspended,"
                " reconnecting",
                hosts=self.zk_hosts,
                session=_hex(self._session_id),
                registry=self.display_url,
            )
            self._start_offline_timer()
        elif state == KazooState.LOST:
            self._connected = False
            self.log.warn(
                "ZooKeeper session {session} expired; {count} nodes will be re-created"
                " on a new session",
                session=_hex(self._session_id),
                count=len(self._desired),
                hosts=self.zk_hosts,
                registry=self.display_url,
            )
            self._start_offline_timer()

    def _connected_to(self, session_id: int | None) -> None:
        new_session = session_id != self._session_id
        was_offline = self._offline
        self._connected = True
        self._offline = False
        self._session_id = session_id
        if self._offline_call is not None and self._offline_call.active():
            self._offline_call.cancel()
        self._offline_call = None
        self.log.info(
            "Connected to ZooKeeper at {hosts}, {which} session {session}",
            hosts=self.zk_hosts,
            which="new" if new_session else "resumed",
            session=_hex(session_id),
            registry=self.display_url,
            was_offline=was_offline,
        )
        # Before the waiters run: what they write now is not a re-creation.
        Deferred.fromCoroutine(self._after_connect(new_session)).addErrback(
            lambda f: self.log.failure("resynchronising with ZooKeeper failed", f)
        )
        self._fire_waiters(True)

    async def _secure_tree(self) -> None:
        """
        With credentials: make the chroot and its C{/services},
        C{/statistics} and C{/data} exist with the members' ACL, and give
        them that ACL if they were created without it (by a registry
        without credentials, or before ACLs were turned on).  Nodes below
        them that predate the ACL keep theirs.
        """
        zk = self._zk
        wanted = self._acl or []
        # Never the ZooKeeper root itself (a chroot of "/"): not ours.
        for path in ([self._root] if self._root else []) + [
            f"{self._root}/{top}" for top in ("services", "statistics", "data")
        ]:
            try:
                await self._call(zk.ensure_path_async, path, wanted)
                acl, stat_ = await self._call(zk.get_acls_async, path)
                if sorted(map(repr, acl)) != sorted(map(repr, wanted)):
                    await self._call(zk.set_acls_async, path, wanted, stat_.aversion)
                    self.log.info("Set the members' ACL on {path}", path=path)
            except _CONNECTION_ERRORS:
                return  # the next session tries again
            except KazooException as e:
                self.log.warn(
                    "Cannot set the members' ACL on {path}: {error}",
                    path=path,
                    error=_refusal(path, e, self),
                )

    async def _after_connect(self, new_session: bool) -> None:
        if new_session and self._acl is not None:
            self._securing = Deferred.fromCoroutine(self._secure_tree())
            await _follow(self._securing)
        paths = set(self._dirty)
        if new_session:
            self._written.clear()
            self._batch.forget()
            paths.update(self._desired)
            if self._desired:
                self.log.info(
                    "Re-creating {count} nodes on ZooKeeper session {session}",
                    count=len(self._desired),
                    session=_hex(self._session_id),
                    registry=self.display_url,
                )
        writes = [self._sync(path) for path in sorted(paths)]
        if new_session:
            # Our own nodes first, so that our watches do not see them missing.
            await DeferredList(writes, consumeErrors=True)
        if self._connected:
            for watch in list(self._watches):
                watch.resync()
            for value_watch in list(self._value_watches):
                value_watch.read()

    def _start_offline_timer(self) -> None:
        if self._offline or (self._offline_call is not None and self._offline_call.active()):
            return
        self._offline_call = self._reactor.callLater(self.session_timeout, self._went_offline)

    def _went_offline(self) -> None:
        self._offline_call = None
        self.log.warn(
            "ZooKeeper at {hosts} unreachable for {seconds}s; writes are queued until it is back",
            hosts=self.zk_hosts,
            seconds=self.session_timeout,
            registry=self.display_url,
        )
        self._go_offline()

    def _go_offline(self) -> None:
        self._offline = True
        self._fire_waiters(False)

    def _when_connected(self) -> Deferred:
        """
        @return: a Deferred firing with C{True} when the registry is
            connected, or C{False} if it is offline or stopping.
        """
        if self._connected:
            return succeed(True)
        if self._offline or self._stopping:
            return succeed(False)
        d: Deferred = Deferred()
        self._waiters.append(d)
        return d

    def _fire_waiters(self, connected: bool) -> None:
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(connected)

    async def _sleep(self, seconds: float) -> None:
        d = deferLater(self._reactor, seconds, lambda: None)
        self._sleeps.add(d)
        try:
            await d
        finally:
            self._sleeps.discard(d)

    # -- writes

    def _paths(self, instance: Instance) -> tuple[str, str]:
        path = instance.path
        return (f"{self._root}/services{path}", f"{self._root}/statistics{path}")

    def add(self, instance: Instance) -> Deferred:
        """
        Create (or overwrite) the ephemeral node of C{instance}.

        @return: a Deferred firing when ZooKeeper has it, or at once if
            ZooKeeper is unreachable (it is then written on reconnection).
        """
        try:
            path, _ = self._paths(instance)
            data = instance.checked_json()
        except ValueError:
            return fail()
        self._paths_by_uuid[instance.uuid] = path
        return self._set(path, data)

    def update(self, instance: Instance) -> Deferred:
        """
        Rewrite the node of C{instance}; the same as L{add}.
        """
        return self.add(instance)

    def publish_stats(self, instance: Instance, stats: dict[str, Any]) -> Deferred:
        """
        Write the ephemeral statistics node of C{instance}.
        """
        try:
            _, path = self._paths(instance)
            data = json.dumps(stats, default=str).encode("utf-8")
        except (TypeError, ValueError):
            return fail()
        return self._set(path, data)

    def remove(self, instance: Instance) -> Deferred:
        """
        Delete the nodes of C{instance} and prune their empty parents.  A
        node now owned by another session is deleted only if it holds this
        instance (same uuid), so a replacement on the same host and port
        survives.
        """
        try:
            paths = self._paths(instance)
        except ValueError:
            return fail()
        for path in paths:
            self._desired.pop(path, None)
            self._removing[path] = instance.uuid
        d = DeferredList([self._sync(path) for path in paths], consumeErrors=True)
        d.addCallback(_first_error)
        d.addCallback(lambda _: None)
        return d

    def _set(self, path: str, data: bytes) -> Deferred:
        if self._stopping:
            return fail(RegistryError(f"{self.display_url} is stopped"))
        self._desired[path] = data
        self._removing.pop(path, None)
        return self._sync(path)

    def _sync(self, path: str) -> Deferred:
        """
        Make ZooKeeper's node at C{path} match C{self._desired}.  Calls for
        one path run one at a time; those made while one runs share the
        next run (which writes the latest contents).
        """
        d: Deferred = Deferred()
        self._syncs.setdefault(path, []).append(d)
        if path not in self._running:
            self._running.add(path)
            Deferred.fromCoroutine(self._sync_loop(path))
        return d

    async def _sync_loop(self, path: str) -> None:
        try:
            while self._syncs.get(path):
                waiters = self._syncs.pop(path)
                try:
                    await self._apply(path)
                except Exception:  # noqa: BLE001 - reported to every waiter
                    failure = Failure()
                    if failure.check(KazooException):
                        # ZooKeeper said no (no permission, bad arguments):
                        # the caller is told; no traceback.
                        self.log.warn(
                            "Could not write {path} in ZooKeeper: {error!r}",
                            path=path,
                            error=failure.value,
                        )
                    else:
                        self.log.failure("could not write {path} in ZooKeeper", failure, path=path)
                    if failure.check(NoAuthError):
                        # Not ours to write: do not try again on the next
                        # session, nor delete it at stop.
                        self._desired.pop(path, None)
                        self._dirty.discard(path)
                    if failure.check(KazooException):
                        error = _refusal(path, failure.value, self)
                    else:
                        error = RegistryError(f"could not write {path}: {failure.value!r}")
                    for d in waiters:
                        d.errback(error)
                else:
                    for d in waiters:
                        d.callback(None)
        finally:
            self._running.discard(path)
            self._syncs.pop(path, None)

    async def _apply(self, path: str) -> None:
        delay = 0.05
        while True:
            if not self._connected and not await self._when_connected():
                # Offline or stopping: written again on the next session.
                if not self._stopping:
                    self._dirty.add(path)
                return
            deleting = path not in self._desired
            try:
                if deleting:
                    await self._delete(path)
                else:
                    await self._write(path)
            except _CONNECTION_ERRORS:
                if self._stopping:
                    return
                self._dirty.add(path)
                try:
                    await self._sleep(delay)
                except CancelledError:
                    return
                delay = min(delay * 2, 1.0)
                continue
            self._dirty.discard(path)
            if deleting:
                self._removing.pop(path, None)
            return

    async def _write(self, path: str) -> None:
        zk = self._zk
        while path in self._desired:
            data = self._desired[path]
            session = self._session_id
            if self._written.get(path) == session:
                try:
                    await self._call(zk.set_async, path, data)
                    return
                except NoNodeError:
                    del self._written[path]
            try:
                if not await self._batch.create(path, data):
                    await self._call(zk.create_async, path, data, ephemeral=True, makepath=True)
                self._written[path] = session  # type: ignore[assignment]
                return
            except NodeExistsError:
                pass
            stat = await self._call(zk.exists_async, path)
            if stat is None:
                continue
            if stat.ephemeralOwner == self._session_id:
                self._written[path] = stat.ephemeralOwner
                continue
            # Left by another session (a previous run of this instance whose
            # session has not expired yet): ours replaces it.
            self.log.info(
                "Replacing {path}, owned by ZooKeeper session {owner}",
                path=path,
                owner=_hex(stat.ephemeralOwner),
            )
            try:
                await self._call(zk.delete_async, path, version=stat.version)
            except (NoNodeError, BadVersionError):
                pass

    async def _delete(self, path: str) -> None:
        """
        Delete the node at C{path} unless it now belongs to someone else: an
        ephemeral node of another session is deleted only if it holds the
        instance being removed (L{remove} names it in C{self._removing}).
        A new process on the same host and port keeps its registration when
        the old one stops.
        """
        self._written.pop(path, None)
        while True:
            try:
                data, stat = await self._call(self._zk.get_async, path)
            except NoNodeError:
                break
            owner = stat.ephemeralOwner
            if owner and owner != self._session_id and not self._holds_removed(path, data):
                self.log.info(
                    "Leaving {path} alone: ZooKeeper session {owner} owns it now",
                    path=path,
                    owner=_hex(owner),
                )
                return
            try:
                await self._call(self._zk.delete_async, path, version=stat.version)
            except BadVersionError:
                continue  # rewritten meanwhile: look again
            except NoNodeError:
                pass
            break
        await self._prune(path.rpartition("/")[0])

    def _holds_removed(self, path: str, data: bytes) -> bool:
        uuid = self._removing.get(path)
        if uuid is None:
            return False
        if path.startswith(f"{self._root}/statistics/"):
            return True  # named by an explicit remove(); stats carry no uuid
        try:
            return Instance.from_json(data).uuid == uuid
        except RegistryError:
            return False

    async def _prune(self, path: str) -> None:
        """
        Delete C{path} and its ancestors while they are empty, up to (not
        including) C{/services} and C{/statistics}.
        """
        stops = {f"{self._root}/services", f"{self._root}/statistics"}
        while path and path not in stops and path.startswith(tuple(s + "/" for s in stops)):
            try:
                await self._call(self._zk.delete_async, path)
            except NoNodeError:
                pass
            except (NotEmptyError, KazooException):
                # Someone registered beside us, or the connection went:
                # an empty parent left behind is harmless.
                return
            path = path.rpartition("/")[0]

    # -- reads

    async def _read(self, operation: Callable[[], Any]) -> Any:
        """
        Run a read, retrying it across connection losses, failing at once
        while ZooKeeper is unreachable.
        """
        delay = 0.05
        while True:
            if not self._connected and not await self._when_connected():
                raise RegistryError(f"ZooKeeper at {self.zk_hosts} unreachable")
            try:
                return await operation()
            except _CONNECTION_ERRORS:
                await self._sleep(delay)
                delay = min(delay * 2, 1.0)
            except (NoAuthError, AuthFailedError) as e:
                raise _refusal(self.chroot, e, self) from None

    def query(self, query: Query) -> Deferred:
        """
        @return: a Deferred firing with the instances matching C{query},
            sorted by path.
        """
        try:
            parts = _prefix_of(query)
        except ValueError:
            return fail()
        base = f"{self._root}/services" + "".join("/" + p for p in parts)

        async def collect() -> list[Instance]:
            found = await self._collect(base, len(parts), query)
            return sort_instances(query.filter(found))

        return Deferred.fromCoroutine(self._read(collect))

    async def _collect(self, path: str, depth: int, query: Query) -> list[Instance]:
        if depth == LEAF_DEPTH:
            try:
                data, _ = await self._call(self._zk.get_async, path)
            except NoNodeError:
                return []
            found = self.parse_instance(path, data)
            return [] if found is None else [found]
        try:
            children = await self._call(self._zk.get_children_async, path)
        except NoNodeError:
            return []
        results = await DeferredList(
            [
                Deferred.fromCoroutine(self._collect(f"{path}/{child}", depth + 1, query))
                for child in children
                if _wanted(query, depth + 1, child)
            ],
            consumeErrors=True,
        )
        return [instance for found in _first_error(results) for instance in found]

    def parse_instance(self, path: str, data: bytes) -> Instance | None:
        """
        The instance an untrusted node at C{path} holds, or L{None} (and
        one rate-limited warning naming the node) if it is not a valid
        instance node describing its own path.
        """
        services = f"{self._root}/services"
        try:
            instance = Instance.from_json(data, path[len(services) :])
        except Exception as e:  # noqa: BLE001 (untrusted: no node may fail a read)
            self.bad_nodes.warn(path, e)
            return None
        self._paths_by_uuid[instance.uuid] = path
        return instance

    def _hook_watch_events(self) -> None:
        """
        Route the events of persistent recursive watches, which kazoo does
        not know (it drops events nobody registered a one-shot watcher
        for), to their handlers; kazoo's own dispatch runs as before.
        """
        zk = self._zk
        connection = zk._connection
        original = connection._read_watch_event
        subtrees = self._subtrees
        call_from_thread = self._reactor.callFromThread

        def read_watch_event(buffer: bytes, offset: int) -> Any:
            # In kazoo's connection thread.  The event goes through kazoo's
            # completion queue, as the answers read before it do, so that
            # the reactor sees them in the order the server sent them.
            if subtrees:
                event, _ = Watch.deserialize(buffer, offset)
                for base, handlers in list(subtrees.items()):
                    if event.path == base or event.path.startswith(base + "/"):
                        for handler in list(handlers):
                            zk.handler.completion_queue.put(
                                lambda h=handler, e=event: call_from_thread(h, e.type, e.path)
                            )
            return original(buffer, offset)

        connection._read_watch_event = read_watch_event

    def _watch_subtree(self, base: str, handler: Callable[[int, str], None]) -> Deferred:
        handlers = self._subtrees.setdefault(base, [])
        if handler not in handlers:
            handlers.append(handler)

        def add_watch() -> Any:
            result = self._zk.handler.async_result()
            self._zk._call(_AddWatch(base), result)
            return result

        d = self._call(add_watch)

        def unsupported(failure: Failure) -> Failure:
            if failure.check(UnimplementedError):
                self._no_persistent()
            return failure

        return d.addErrback(unsupported)

    def _unwatch_subtree(self, base: str, handler: Callable[[int, str], None]) -> None:
        handlers = self._subtrees.get(base, [])
        if handler in handlers:
            handlers.remove(handler)
        if handlers or base not in self._subtrees:
            return
        del self._subtrees[base]
        if not self._connected or self._stopping:
            return

        def remove_watches() -> Any:
            result = self._zk.handler.async_result()
            self._zk._call(_RemoveWatches(base), result)
            return result

        self._call(remove_watches).addErrback(lambda f: None)  # none left is fine

    def _no_persistent(self) -> None:
        if self._reads.supported or self.persistent_watches:
            self.log.info(
                "ZooKeeper at {hosts} has no persistent watches or multiRead (before 3.6):"
                " one watch per node",
                hosts=self.zk_hosts,
            )
        self._reads.supported = False

    def _forget_watch(self, watch: Any) -> None:
        self._watches.discard(watch)
        self._value_watches.discard(watch)

    def get(self, uuid: str) -> Deferred:
        """
        The live instance with C{uuid}, or L{None}: one read of the node it
        was last seen at (by a query, a watch or L{add}), and a walk of
        C{/services} only for a uuid not seen there.
        """

        async def get() -> Instance | None:
            path = self._paths_by_uuid.get(uuid)
            if path is not None:
                try:
                    data, _ = await self._call(self._zk.get_async, path)
                except NoNodeError:
                    data = None
                if data is not None:
                    found = self.parse_instance(path, data)
                    if found is not None and found.uuid == uuid:
                        return found
                if self._paths_by_uuid.get(uuid) == path:
                    del self._paths_by_uuid[uuid]
            query = Query(uuid=uuid)
            for instance in sort_instances(await self._collect(self._context.services, 0, query)):
                if instance.uuid == uuid:
                    return instance
            return None

        return Deferred.fromCoroutine(self._read(get))

    def get_stats(self, instance: Instance) -> Deferred:
        """
        @return: a Deferred firing with the statistics of C{instance} as a
            dict, or L{None} if it has none.
        """
        try:
            _, path = self._paths(instance)
        except ValueError:
            return fail()

        async def get() -> dict[str, Any] | None:
            try:
                data, _ = await self._call(self._zk.get_async, path)
            except NoNodeError:
                return None
            try:
                return parse_json_node(data)
            except RegistryError as e:
                self.bad_nodes.warn(path, e)
                return None

        return Deferred.fromCoroutine(self._read(get))

    def watch(self, query: Query, listener: IInstanceListener) -> IWatch:
        """
        Deliver the instances matching C{query} to C{listener}: a snapshot
        once the subtree has been read, then changes.  Only the subtree
        C{query} can match is read and watched.

        @raise ValueError: if the query names an impossible path component.
        """
        watch = _ZooKeeperWatch(self._context, query, listener)
        if not self._stopping:
            self._watches.add(watch)
            watch.resync()
        return watch

    # -- data nodes

    def _data_path(self, key: str) -> str:
        return f"{self._root}/data/{data_node_name(check_key(key))}"

    def get_value(self, key: str) -> Deferred:
        """
        @return: a Deferred firing with the bytes of data node C{key}, or
            L{None} if there is none.
        """
        try:
            path = self._data_path(key)
        except ValueError:
            return fail()

        async def get() -> bytes | None:
            try:
                data, _ = await self._call(self._zk.get_async, path)
            except NoNodeError:
                return None
            return bytes(data)

        return Deferred.fromCoroutine(self._read(get))

    def set_value(self, key: str, value: bytes) -> Deferred:
        """
        Create or replace the persistent node of data node C{key} (a
        ZooKeeper C{set} replaces the data atomically).
        """
        try:
            path = self._data_path(key)
            check_value(value)
        except (TypeError, ValueError):
            return fail()
        if self._stopping:
            return fail(RegistryError(f"{self.display_url} is stopped"))

        async def put() -> None:
            while True:
                try:
                    await self._call(self._zk.set_async, path, value)
                    return
                except NoNodeError:
                    pass
                try:
                    await self._call(self._zk.create_async, path, value, makepath=True)
                    return
                except NodeExistsError:
                    continue  # created meanwhile (or by our own retried create)

        return Deferred.fromCoroutine(self._guarded_write(path, put))

    def delete_value(self, key: str) -> Deferred:
        """
        Delete data node C{key}; an absent one is fine.
        """
        try:
            path = self._data_path(key)
        except ValueError:
            return fail()
        if self._stopping:
            return fail(RegistryError(f"{self.display_url} is stopped"))

        async def delete() -> None:
            try:
                await self._call(self._zk.delete_async, path)
            except NoNodeError:
                pass

        return Deferred.fromCoroutine(self._guarded_write(path, delete))

    async def _guarded_write(self, path: str, operation: Callable[[], Any]) -> None:
        try:
            await self._read(operation)
        except RegistryError:
            raise
        except KazooException as e:
            raise _refusal(path, e, self) from None

    def watch_value(self, key: str, callback: Callable[[bytes | None], None]) -> IWatch:
        """
        Watch data node C{key} with a ZooKeeper data watch (an exists
        watch while it is absent), re-read on every reconnection.
        """
        watch = _ZooKeeperValueWatch(self._context, self._data_path(key), key, callback)
        if not self._stopping:
            self._value_watches.add(watch)
            watch.read()
        return watch


class _ZooKeeperValueWatch(ValueDelivery):
    """
    A watch of one data node: reads it with a watch, and again on every
    event of that watch and every reconnection.
    """

    def __init__(self, context: _WatchContext, path: str, key: str, callback) -> None:
        ValueDelivery.__init__(self, key, callback, lambda: context.forget(self))
        self._context = context
        self._path = path
        self._generation = 0
        # One bound method, so kazoo keeps one watcher per path for us.
        self._watcher = self._event_from_kazoo

    def read(self) -> None:
        if self.stopped or not self._context.connected():
            return
        self._generation += 1
        Deferred.fromCoroutine(self._read(self._generation)).addErrback(
            lambda f: self.log.failure("watch of data node {path}", f, path=self._path)
        )

    async def _read(self, generation: int) -> None:
        context = self._context
        try:
            try:
                data, _ = await context.get(self._path, self._watcher)
                value: bytes | None = bytes(data)
            except NoNodeError:
                # A read of a missing node leaves no watch: watch its creation.
                stat = await context.exists(self._path, self._watcher)
                if stat is not None:
                    if generation == self._generation:
                        self.read()  # created meanwhile
                    return
                value = None
        except _CONNECTION_ERRORS:
            return  # the reconnection reads again
        except KazooException as e:
            self.log.warn("Cannot read data node {path}: {error!r}", path=self._path, error=e)
            return
        if generation == self._generation:
            self.deliver(value)

    def _event_from_kazoo(self, event: Any) -> None:
        # In one of kazoo's threads.
        self._context.call_from_thread(self._event, event)

    def _event(self, event: Any) -> None:
        if event.type != EventType.NONE:
            self.read()


#: At most this many creates, and this many bytes, in one transaction.
BATCH_OPERATIONS = 250
BATCH_BYTES = 512 * 1024


class _CreateBatch:
    """
    Gathers the creates of new ephemeral nodes made in one reactor turn
    into ZooKeeper transactions (C{multi}): one request for up to
    L{BATCH_OPERATIONS} nodes instead of one each, which is what makes
    registering thousands of instances fast (kazoo's cost is per request).
    Missing parents are created first, one transaction per depth.  Whatever
    a transaction cannot do (a node exists, a parent vanished, ...) is left
    to the caller's one-at-a-time path.
    """

    def __init__(self, zk: Any, call: Callable[..., Deferred], reactor: Any) -> None:
        self._zk = zk
        self._call = call
        self._reactor = reactor
        self._queue: list[tuple[str, bytes, Deferred]] = []
        self._flush_call: Any = None
        #: Parents known to exist (they are persistent; pruned ones are
        #: found out by a failed transaction).
        self._parents: set[str] = set()
        self._parents_lock = DeferredLock()

    def create(self, path: str, data: bytes) -> Deferred:
        """
        @return: a Deferred firing with C{True} once C{path} was created in a
            transaction, C{False} if the caller must create it alone; or
            failing with a connection error.
        """
        d: Deferred = Deferred()
        self._queue.append((path, data, d))
        if len(self._queue) >= BATCH_OPERATIONS:
            self._flush()
        elif self._flush_call is None:
            self._flush_call = self._reactor.callLater(0, self._flush)
        return d

    def _flush(self) -> None:
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        items, self._queue = self._queue, []
        if items:
            Deferred.fromCoroutine(self._run(items)).addErrback(lambda f: None)

    async def _run(self, items: list[tuple[str, bytes, Deferred]]) -> None:
        try:
            # One batch's parents at a time: concurrent ones would race to
            # make the same parents and fall back to one at a time.
            await self._parents_lock.acquire()
            try:
                await self._make_parents({path.rpartition("/")[0] for path, _, _ in items})
            finally:
                self._parents_lock.release()
        except _CONNECTION_ERRORS:
            failure = Failure()
            for _, _, d in items:
                d.errback(failure)
            return
        except Exception:  # noqa: BLE001 - a parent pruned, or refused: one at a time
            self._parents.clear()
            for _, _, d in items:
                d.callback(False)
            return
        try:
            created: set[str] = set()
            for chunk in _chunks(items):
                paths = [(path, data) for path, data, _ in chunk]
                for _ in range(3):
                    transaction = self._zk.transaction()
                    for path, data in paths:
                        transaction.create(path, data, ephemeral=True)
                    results = await self._call(transaction.commit_async)
                    if all(isinstance(r, str) for r in results):
                        created.update(path for path, _ in paths)
                        break
                    # All or nothing: drop the operations that failed (an
                    # existing node, a pruned parent) and try the rest.
                    failed = {
                        path
                        for (path, _), result in zip(paths, results, strict=False)
                        if not isinstance(result, (str, RolledBackError, RuntimeInconsistency))
                    }
                    if not failed:
                        break
                    for path in failed:
                        self._parents.discard(path.rpartition("/")[0])
                    paths = [(path, data) for path, data in paths if path not in failed]
        except Exception:  # noqa: BLE001 - each caller decides (retries connection errors)
            failure = Failure()
            for _, _, d in items:
                if not d.called:
                    d.errback(failure)
            return
        for path, _, d in items:
            d.callback(path in created)

    async def _make_parents(self, parents: set[str]) -> None:
        missing: set[str] = set()
        for parent in parents:
            while parent and parent not in self._parents and parent not in missing:
                missing.add(parent)
                parent = parent.rpartition("/")[0]
        for depth in sorted({p.count("/") for p in missing}):
            level = sorted(p for p in missing if p.count("/") == depth)
            for _ in range(3):
                if not level:
                    break
                transaction = self._zk.transaction()
                for path in level:
                    transaction.create(path, b"")
                results = await self._call(transaction.commit_async)
                failed = [
                    path
                    for path, result in zip(level, results, strict=False)
                    if isinstance(result, NodeExistsError)
                ]
                if all(isinstance(r, str) for r in results):
                    self._parents.update(level)
                    level = []
                elif failed:
                    # Those exist already; the rest were rolled back.
                    self._parents.update(failed)
                    level = [p for p in level if p not in failed]
                else:
                    break
            if level:
                # Still failing (created concurrently, over and over): one
                # at a time; an existing parent is fine.
                outcomes = await DeferredList(
                    [self._call(self._zk.create_async, p, b"") for p in level],
                    consumeErrors=True,
                )
                for path, (ok, value) in zip(level, outcomes, strict=True):
                    if ok or value.check(NodeExistsError):
                        self._parents.add(path)
                    else:
                        value.raiseException()

    def forget(self) -> None:
        """
        A new session: parents may have been pruned meanwhile.
        """
        self._parents.clear()


def _chunks(items: list[tuple[str, bytes, Deferred]]) -> list[list[tuple[str, bytes, Deferred]]]:
    chunks: list[list[tuple[str, bytes, Deferred]]] = []
    size = 0
    for item in items:
        if not chunks or len(chunks[-1]) >= BATCH_OPERATIONS or size > BATCH_BYTES:
            chunks.append([])
            size = 0
        chunks[-1].append(item)
        size += len(item[0]) + len(item[1]) + 64
    return chunks


def _redact(url: str) -> str:
    """
    C{url} with the password of its user information hidden.
    """
    scheme, sep, rest = url.partition("://")
    netloc, slash, tail = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    if not at:
        return url
    user = userinfo.partition(":")[0]
    return f"{scheme}{sep}{user}:***@{hosts}{slash}{tail}"


def _refusal(path: str, error: Exception, registry: ZooKeeperRegistry) -> RegistryError:
    """
    The error for a write or read that ZooKeeper refused.
    """
    if isinstance(error, NoAuthError):
        how = (
            "these credentials are not allowed there"
            if registry.credentials is not None
            else "give the cluster's credentials (zk://user:secret@hosts/chroot or ?auth=FILE)"
        )
        return RegistryError(f"ZooKeeper refused access to {path}: not authorized; {how}")
    if isinstance(error, AuthFailedError):
        return RegistryError(f"ZooKeeper refused the credentials of {registry.display_url}")
    return RegistryError(f"ZooKeeper refused access to {path}: {error!r}")


def _follow(d: Deferred) -> Deferred:
    """
    A new Deferred with the result of C{d}, leaving C{d}'s own result alone
    (for results several callers wait for).
    """
    follower: Deferred = Deferred()

    def chain(result: Any) -> Any:
        follower.callback(result)
        return None if isinstance(result, Failure) else result

    d.addBoth(chain)
    return follower


def _hex(session_id: int | None) -> str:
    return "none" if session_id is None else f"0x{session_id:x}"


@implementer(IWatch)
class _ZooKeeperWatch:
    """
    A mirror of the part of C{/services} one query can match, kept up to
    date with ZooKeeper watches: a child watch on every interior node and a
    data watch on every instance node.

    ZooKeeper forgets a connection's watches when it drops; the registry
    calls L{resync} on every reconnection, which reads the subtree again and
    feeds the result to the L{InstanceDiff}, so the listener sees only what
    changed meanwhile.  While disconnected, the mirror is left alone: no
    removals are reported for a mere suspension.
    """

    log = Logger()

    def __init__(self, context: _WatchContext, query: Query, listener: IInstanceListener) -> None:
        self._context = context
        self._query = query
        self._diff = InstanceDiff(query, listener)
        parts = _prefix_of(query)
        self._services = context.services
        self._base = self._services + "".join("/" + p for p in parts)
        #: Interior nodes read so far -> names of their wanted children.
        self._children: dict[str, set[str]] = {}
        #: Instance nodes read so far -> their instance (None if malformed).
        self._leaves: dict[str, Instance | None] = {}
        self._generation = 0
        self._pending = 0
        self._synced = False
        self._stopped = False
        # One bound method, so kazoo keeps one watcher per path for us.
        self._watcher = self._event_from_kazoo
        #: One persistent recursive watch on the base, or one-shot watches.
        self._persistent = False
        self._get: Callable[[str, Any], Deferred] = context.get
        self._get_children: Callable[[str, Any], Deferred] = context.get_children

    def stop(self) -> None:
        self._stopped = True
        self._diff.stopped = True
        if self._persistent:
            self._context.unwatch_subtree(self._base, self._subtree_event)
        self._context.forget(self)

    # -- reading the tree

    def resync(self) -> None:
        """
        Read the subtree afresh (a new generation: answers to older reads
        are ignored); once read, report the differences.
        """
        if self._stopped or not self._context.connected():
            return
        self._generation += 1
        self._pending = 0
        self._synced = False
        self._children = {}
        self._leaves = {}
        context = self._context
        self._persistent = context.persistent()
        if self._persistent:
            # The watch is set before the reads are answered (one session's
            # requests are handled in order): no change falls in between.
            context.watch_subtree(self._base, self._subtree_event).addErrback(
                self._subtree_refused, self._generation
            )
            self._get = lambda path, _: context.read(_GET_DATA, path)
            self._get_children = lambda path, _: context.read(_GET_CHILDREN, path)
        else:
            self._get = context.get
            self._get_children = context.get_children
        self._explore(self._base, root=True)

    def _subtree_refused(self, failure: Failure, generation: int) -> None:
        if generation != self._generation or self._stopped:
            return
        if failure.check(*_CONNECTION_ERRORS):
            return  # the reconnection's resync adds it again
        if not failure.check(UnimplementedError):
            self.log.warn(
                "Cannot watch {path} in ZooKeeper: {error!r}",
                path=self._base,
                error=failure.value,
            )
        self._context.unwatch_subtree(self._base, self._subtree_event)
        self.resync()  # with one-shot watches now

    def _depth(self, path: str) -> int:
        return path[len(self._services) :].count("/")

    def _explore(self, path: str, root: bool = False) -> None:
        if self._depth(path) == LEAF_DEPTH:
            self._read_leaf(path)
        else:
            self._list(path, root)

    def _request(
        self,
        method: Callable[..., Any],
        path: str,
        on_result: Callable[..., None],
        on_error: Callable[..., None],
    ) -> None:
        generation = self._generation
        self._pending += 1

        def result(value: Any) -> None:
            if generation == self._generation and not self._stopped:
                self._pending -= 1
                on_result(path, value)
                self._check_synced()

        def error(failure: Failure) -> None:
            if generation != self._generation or self._stopped:
                return
            self._pending -= 1
            if self._read_failed(path, failure, on_error):
                self._check_synced()

        d = method(path, self._watcher)
        d.addCallbacks(result, error)
        d.addErrback(lambda f: self.log.failure("watch of {path}", f, path=self._base))

    def _read_failed(self, path: str, failure: Failure, on_error: Callable[[str], None]) -> bool:
        """
        A read of C{path} failed: log what is unexpected, and tell
        C{on_error} unless the connection is gone (the reconnection's
        resync reads the subtree again).

        @return: whether the watch may count the read as answered.
        """
        if failure.check(*_CONNECTION_ERRORS):
            return False
        if failure.check(KazooException) and not failure.check(NoNodeError):
            self.log.warn(
                "Cannot read {path} from ZooKeeper: {error!r}", path=path, error=failure.value
            )
        elif not failure.check(NoNodeError):
            self.log.failure("reading {path} from ZooKeeper", failure, path=path)
        on_error(path)
        return True

    def _read_leaves(self, paths: list[str]) -> None:
        """
        Read several instance nodes below one listed node: with persistent
        watches, in one grouped request (one Deferred for all, not one
        each); else one read and watch each.
        """
        if self._persistent:
            self._read_group(_GET_DATA, paths, self._leaf_read)
        else:
            for path in paths:
                self._read_leaf(path)

    def _list_all(self, paths: list[str]) -> None:
        """
        List several interior nodes below one listed node, grouped as
        L{_read_leaves} reads.
        """
        if self._persistent:
            self._read_group(_GET_CHILDREN, paths, self._listed)
        else:
            for path in paths:
                self._list(path)

    def _read_group(
        self, kind: int, paths: list[str], on_result: Callable[[str, Any], None]
    ) -> None:
        if not paths:
            return
        generation = self._generation
        self._pending += 1

        def results(values: list[Any]) -> None:
            if generation != self._generation or self._stopped:
                return
            answered = True
            for path, value in zip(paths, values, strict=True):
                if isinstance(value, BaseException):
                    answered &= self._read_failed(path, Failure(value), self._drop)
                else:
                    on_result(path, value)
            # Counted as answered only now: the reads the results above
            # asked for are pending already, so the snapshot waits for them.
            self._pending -= 1
            if answered:
                self._check_synced()

        d = self._context.read_many(kind, paths)
        d.addCallback(results)
        d.addErrback(lambda f: self.log.failure("watch of {path}", f, path=self._base))

    def _list(self, path: str, root: bool = False) -> None:
        on_missing = self._base_missing if root or path == self._base else self._drop
        self._request(self._get_children, path, self._listed, on_missing)

    def _tracked(self, path: str) -> bool:
        """
        Whether C{path} is part of the mirror: the base, or a wanted child of
        a node we listed (not dropped since).
        """
        if path == self._base:
            return True
        parent, _, name = path.rpartition("/")
        return name in self._children.get(parent, ())

    def _listed(self, path: str, children: list[str]) -> None:
        if not self._tracked(path):
            return  # dropped meanwhile
        depth = self._depth(path) + 1
        wanted = {c for c in children if _wanted(self._query, depth, c)}
        known = self._children.get(path, set())
        self._children[path] = wanted
        new = [f"{path}/{name}" for name in sorted(wanted - known)]
        if depth == LEAF_DEPTH:
            self._read_leaves(new)
        elif new:
            self._list_all(new)
        for name in known - wanted:
            self._drop(f"{path}/{name}")

    def _base_missing(self, path: str) -> None:
        # The query's subtree does not exist (yet): drop what we knew and
        # wait for it to be created (a persistent watch reports that itself).
        self._drop(self._base)
        if not self._persistent:
            self._request(self._context.exists, self._base, self._base_exists, _ignore)

    def _base_exists(self, path: str, stat: Any) -> None:
        if stat is not None:
            self._explore(self._base, root=True)

    def _read_leaf(self, path: str) -> None:
        # A read of a missing node leaves no watch: the base, which has no
        # parent watched, needs an exists watch instead.
        on_missing = self._base_missing if path == self._base else self._drop
        self._request(self._get, path, self._leaf_read, on_missing)

    def _leaf_read(self, path: str, value: tuple[bytes, Any]) -> None:
        if not self._tracked(path):
            return  # dropped meanwhile
        instance = self._context.parse_instance(path, value[0])
        old = self._leaves.get(path)
        self._leaves[path] = instance
        self._changed(old, instance)

    def _drop(self, path: str) -> None:
        """
        Forget C{path} and everything below it, reporting the instances.
        """
        if self._depth(path) == LEAF_DEPTH:
            doomed = [path] if path in self._leaves else []
        else:
            prefix = path + "/"
            for node in [n for n in self._children if n == path or n.startswith(prefix)]:
                del self._children[node]
            doomed = [n for n in self._leaves if n.startswith(prefix)]
        for node in doomed:
            self._changed(self._leaves.pop(node), None)
        parent, _, name = path.rpartition("/")
        if parent in self._children:
            self._children[parent].discard(name)

    # -- events

    def _event_from_kazoo(self, event: Any) -> None:
        # In one of kazoo's threads.
        self._context.call_from_thread(self._event, event)

    def _subtree_event(self, kind: int, path: str) -> None:
        """
        An event of the persistent recursive watch: a node below the base
        was created, deleted or changed.
        """
        if self._stopped or not self._persistent or not self._context.connected():
            return
        if path == self._base:
            if kind == _EVENT_DELETED:
                self._drop(self._base)
            elif kind == _EVENT_CREATED or self._depth(path) == LEAF_DEPTH:
                self._explore(self._base, root=True)
            return
        if kind == _EVENT_DELETED:
            if self._tracked(path):
                self._drop(path)  # nothing to read
            return
        parent, _, name = path.rpartition("/")
        siblings = self._children.get(parent)
        depth = self._depth(path)
        if siblings is None or depth > LEAF_DEPTH or not _wanted(self._query, depth, name):
            return  # outside the mirror, or its parent's listing will find it
        if depth == LEAF_DEPTH:
            siblings.add(name)
            self._read_leaf(path)
        elif kind == _EVENT_CREATED and name not in siblings:
            siblings.add(name)
            self._explore(path)

    def _event(self, event: Any) -> None:
        if self._stopped or event.type == EventType.NONE:
            # NONE: the connection dropped; resync() follows reconnection.
            return
        if not self._context.connected():
            return
        path = event.path
        if event.type == EventType.DELETED and path != self._base and self._tracked(path):
            # Gone: nothing to read (the parent's child watch also fires).
            self._drop(path)
        elif path == self._base:
            self._explore(self._base, root=True)
        elif not self._tracked(path):
            return
        elif self._depth(path) == LEAF_DEPTH:
            self._read_leaf(path)
        elif event.type == EventType.DELETED:
            self._drop(path)
        else:
            self._list(path)

    # -- delivering

    def _changed(self, old: Instance | None, new: Instance | None) -> None:
        if self._synced:
            self._diff.change(old, new)

    def _check_synced(self) -> None:
        if self._pending == 0 and not self._synced:
            self._synced = True
            self._diff.feed(i for i in self._leaves.values() if i is not None)


def _ignore(*args: Any) -> None:
    pass
