"""
Named locks on a registry, that a dead process cannot keep: the basis of
the cluster's leader election (L{skynet.cluster.leader}).

L{registry_lock} makes the right L{ILock} for a registry:

 - the embedded L{FileRegistry}: C{fcntl.flock} on C{<root>/locks/<name>},
   held by an open descriptor, so the kernel releases it the moment the
   holder dies (C{kill -9} included); waiters poll;
 - ZooKeeper: kazoo's C{Lock} recipe (an ephemeral sequential node under
   C{<chroot>/locks/<name>}) on the registry's own kazoo client: its
   blocking calls run in a thread pool of the lock's own, and kazoo's state
   changes hop to the reactor with C{callFromThread}.  A holder whose
   connection is suspended stops counting as holder at once (it may be
   expired on the servers), counts again if the same session comes back,
   and loses the lock for good when the session is lost;
 - L{MemoryRegistry}: a lock in its store, shared by every registry object
   on the store.

A lock's name is a C{/}-separated key, as for data nodes.
"""

from __future__ import annotations

import fcntl
import json
import os
import weakref
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import Attribute, Interface, implementer

from skynet.config import default_reactor
from skynet.registry.base import RegistryError, check_key, data_node_name

__all__ = [
    "FileLock",
    "ILock",
    "MemoryLock",
    "ZooKeeperLock",
    "registry_lock",
]

#: The subtree (beside C{services}, C{statistics} and C{data}) of locks.
LOCKS_DIR = "locks"


class ILock(Interface):
    """
    A named lock that at most one holder has at a time, anywhere.
    """

    name = Attribute("The lock's name.")
    held = Attribute("Whether this object holds the lock now.")
    can_resume = Attribute(
        "Whether a lock that stopped being held may count again without a new"
        " acquire (a suspended ZooKeeper session); false for good losses."
    )

    def acquire() -> Deferred:
        """
        Wait until this object holds the lock.

        @return: a Deferred firing with L{None} once held; cancel it to stop
            waiting.
        """

    def release() -> Deferred:
        """
        Let go of the lock (or stop waiting for it).  Idempotent.

        @return: a Deferred firing when done.
        """

    def holder() -> Deferred:
        """
        @return: a Deferred firing with the identifier of the current holder
            (a string), or L{None} if nobody holds the lock.
        """

    def observe(callback: Callable[[bool, str], None]) -> None:
        """
        Call C{callback(held, reason)} in the reactor thread when a held
        lock stops being held without L{release} (C{held} false: connection
        suspended, session lost, lock file replaced) or counts again
        (C{held} true: the same session came back).  After a loss for good
        L{held} stays false; L{acquire} campaigns again.
        """


class _Observed:
    _observers: list[Callable[[bool, str], None]]
    log = Logger()

    def observe(self, callback: Callable[[bool, str], None]) -> None:
        self._observers.append(callback)

    def _tell(self, held: bool, reason: str) -> None:
        for callback in list(self._observers):
            try:
                callback(held, reason)
            except Exception:  # noqa: BLE001 (one observer's bug must not stop the others)
                self.log.failure("lock observer {callback!r} failed", callback=callback)


# The embedded registry: flock


@implementer(ILock)
class FileLock(_Observed):
    """
    An exclusive C{flock} on a file, held by an open descriptor: the kernel
    lets go when the process dies.

    While it holds the lock it checks every C{poll_interval} seconds that
    the file at C{path} is still the one it locked (someone may have
    removed it, letting a newcomer lock a new file): if not, the lock is
    lost.

    @param identifier: written into the file while held, for L{holder}.
    """

    def __init__(
        self,
        path: str,
        *,
        identifier: str | None = None,
        reactor: Any = None,
        poll_interval: float = 0.2,
    ) -> None:
        self.path = path
        self.name = os.path.basename(path)
        self.identifier = identifier or f"pid {os.getpid()}"
        self.poll_interval = poll_interval
        self._reactor = default_reactor(reactor)
        self._fd: int | None = None
        self._waiting: Deferred | None = None
        self._check: Any = None
        self._observers = []
        self._released = False

    can_resume = False

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> Deferred:
        if self.held:
            return succeed(None)
        self._released = False
        d = Deferred.fromCoroutine(self._acquire())
        return d

    async def _acquire(self) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        while True:
            fd = self._try()
            if fd is not None:
                self._fd = fd
                self._write_identifier()
                self._check = self._reactor.callLater(self.poll_interval, self._still_mine)
                return
            self._waiting = deferLater(self._reactor, self.poll_interval, lambda: None)
            try:
                await self._waiting
            finally:
                self._waiting = None

    def _try(self) -> int | None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        if not self._is_current(fd):
            # Replaced between our open and our lock: try the new file.
            os.close(fd)
            return None
        return fd

    def _is_current(self, fd: int) -> bool:
        try:
            now = os.stat(self.path)
        except FileNotFoundError:
            return False
        mine = os.fstat(fd)
        return (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino)

    def _write_identifier(self) -> None:
        assert self._fd is not None
        doc = json.dumps({"holder": self.identifier, "pid": os.getpid()}).encode("utf-8")
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, doc, 0)

    def _still_mine(self) -> None:
        self._check = None
        if self._fd is None:
            return
        if self._is_current(self._fd):
            self._check = self._reactor.callLater(self.poll_interval, self._still_mine)
            return
        self.log.warn("lock file {path} was replaced: lock lost", path=self.path)
        os.close(self._fd)
        self._fd = None
        self._tell(False, "lock file replaced")

    def release(self) -> Deferred:
        self._released = True
        if self._waiting is not None:
            self._waiting.cancel()
        if self._check is not None and self._check.active():
            self._check.cancel()
        self._check = None
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.ftruncate(fd, 0)
            except OSError:
                pass
            os.close(fd)  # closing the last descriptor releases the flock
        return succeed(None)

    def holder(self) -> Deferred:
        return succeed(read_file_lock_holder(self.path))


def read_file_lock_holder(path: str) -> str | None:
    """
    Who holds the C{flock} on C{path}: the identifier it wrote, or L{None}
    if nobody holds it.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            pass  # held by someone: read who
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        data = os.pread(fd, 4096, 0)
    finally:
        os.close(fd)
    try:
        return str(json.loads(data)["holder"])
    except (ValueError, KeyError, TypeError):
        return "(unknown holder)"


# The memory registry


class _MemoryLocks:
    def __init__(self) -> None:
        self.holders: dict[str, MemoryLock] = {}
        self.waiters: dict[str, list[tuple[MemoryLock, Deferred]]] = {}


_memory_locks: weakref.WeakKeyDictionary[Any, _MemoryLocks] = weakref.WeakKeyDictionary()


@implementer(ILock)
class MemoryLock(_Observed):
    """
    A lock in a L{MemoryStore}: waiters get it in order when the holder
    releases it or L{lose}s it.
    """

    def __init__(self, store: Any, name: str, *, identifier: str | None = None) -> None:
        self.name = check_key(name)
        self.identifier = identifier or f"memory lock 0x{id(self):x}"
        self._locks = _memory_locks.setdefault(store, _MemoryLocks())
        self._observers = []

    can_resume = False

    @property
    def held(self) -> bool:
        return self._locks.holders.get(self.name) is self

    def acquire(self) -> Deferred:
        if self.held:
            return succeed(None)
        if self.name not in self._locks.holders:
            self._locks.holders[self.name] = self
            return succeed(None)
        queue = self._locks.waiters.setdefault(self.name, [])

        def cancel(d: Deferred) -> None:
            queue[:] = [(lock, w) for lock, w in queue if w is not d]

        d: Deferred = Deferred(cancel)
        queue.append((self, d))
        return d

    def _hand_on(self) -> None:
        self._locks.holders.pop(self.name, None)
        queue = self._locks.waiters.get(self.name, [])
        if queue:
            lock, d = queue.pop(0)
            self._locks.holders[self.name] = lock
            d.callback(None)

    def release(self) -> Deferred:
        queue = self._locks.waiters.get(self.name, [])
        for lock, d in list(queue):
            if lock is self:
                queue.remove((lock, d))
                d.cancel()
        if self.held:
            self._hand_on()
        return succeed(None)

    def lose(self, reason: str = "session lost") -> None:
        """
        For tests: lose the lock as a holder whose session ended would.
        """
        if self.held:
            self._hand_on()
            self._tell(False, reason)

    def holder(self) -> Deferred:
        lock = self._locks.holders.get(self.name)
        return succeed(None if lock is None else lock.identifier)


# ZooKeeper


@implementer(ILock)
class ZooKeeperLock(_Observed):
    """
    kazoo's C{Lock} recipe on a registry's kazoo client, bridged to the
    reactor.

    @param client: the started C{KazooClient} (the registry's).
    @param path: the lock's node (its contenders are children of it).
    """

    def __init__(
        self,
        client: Any,
        path: str,
        *,
        identifier: str | None = None,
        reactor: Any = None,
    ) -> None:
        self.name = path.rsplit("/", 1)[-1]
        self.path = path
        self.identifier = identifier or f"pid {os.getpid()}"
        self._client = client
        self._reactor = default_reactor(reactor)
        self._pool = ThreadPool(minthreads=0, maxthreads=1, name=f"skynet-lock-{self.name}")
        self._recipe: Any = None
        self._held = False
        self._lost = False
        self._observers = []
        self._listening = False

    @property
    def held(self) -> bool:
        return self._held

    @property
    def can_resume(self) -> bool:
        return not self._held and self._recipe is not None and not self._lost

    def _start_pool(self) -> None:
        if self._pool.joined:
            # Stopped by an earlier release: a thread pool does not restart.
            self._pool = ThreadPool(minthreads=0, maxthreads=1, name=self._pool.name)
        if not self._pool.started:
            self._pool.start()

    def acquire(self) -> Deferred:
        if self._held:
            return succeed(None)
        from kazoo.recipe.lock import Lock  # type: ignore[import-untyped]

        self._start_pool()
        recipe = self._recipe = Lock(self._client, self.path, self.identifier)
        self._lost = False
        if not self._listening:
            self._client.add_listener(self._state_from_kazoo)
            self._listening = True

        def cancel(_d: Deferred) -> None:
            recipe.cancel()  # thread-safe: sets a flag and wakes the waiter

        result: Deferred = Deferred(cancel)
        waiting = deferToThreadPool(self._reactor, self._pool, recipe.acquire)

        def got(_ignored: Any) -> None:
            if result.called:
                # Cancelled meanwhile, but it was acquired: let it go.
                self._release_recipe(recipe)
                return
            self._held = True
            result.callback(None)

        def failed(failure: Failure) -> None:
            if result.called:
                return
            from kazoo.exceptions import CancelledError as KazooCancelled  # type: ignore[import-untyped]

            if failure.check(KazooCancelled):
                result.errback(Failure(CancelledError()))
            else:
                result.errback(
                    Failure(RegistryError(f"cannot take lock {self.path}: {failure.value}"))
                )

        waiting.addCallbacks(got, failed)
        return result

    def _release_recipe(self, recipe: Any) -> Deferred:
        d = deferToThreadPool(self._reactor, self._pool, recipe.release)
        d.addErrback(lambda f: self.log.warn("releasing lock {path} failed: {error}",
                                             path=self.path, error=f.value))  # fmt: skip
        return d

    def _state_from_kazoo(self, state: str) -> None:
        # In kazoo's connection thread.
        self._reactor.callFromThread(self._state_changed, state)

    def _state_changed(self, state: str) -> None:
        from kazoo.client import KazooState  # type: ignore[import-untyped]

        if self._recipe is None:
            return
        if state == KazooState.SUSPENDED and self._held:
            self._held = False
            self._tell(False, "connection to ZooKeeper suspended")
        elif state == KazooState.LOST:
            was = self._held
            self._held = False
            self._lost = True
            if self._recipe.is_acquired or was:
                self._recipe = None
                self._tell(False, "ZooKeeper session lost")
        elif state == KazooState.CONNECTED and not self._held and not self._lost:
            recipe = self._recipe
            if recipe is not None and recipe.is_acquired:
                # The same session is back: its lock node never went away.
                self._held = True
                self._tell(True, "ZooKeeper connection resumed")

    def release(self) -> Deferred:
        return Deferred.fromCoroutine(self._release())

    async def _release(self) -> None:
        recipe, self._recipe = self._recipe, None
        self._held = False
        if self._listening:
            self._client.remove_listener(self._state_from_kazoo)
            self._listening = False
        if recipe is not None:
            recipe.cancel()
            if self._pool.started:
                await self._release_recipe(recipe)
        if self._pool.started:
            self._pool.stop()

    def holder(self) -> Deferred:
        from kazoo.recipe.lock import Lock

        self._start_pool()
        recipe = self._recipe or Lock(self._client, self.path, self.identifier)

        def first() -> str | None:
            contenders = recipe.contenders()
            return contenders[0] if contenders else None

        return deferToThreadPool(self._reactor, self._pool, first)


def registry_lock(
    registry: Any, name: str, *, identifier: str | None = None, reactor: Any = None
) -> ILock:
    """
    The L{ILock} named C{name} on C{registry} (started, for ZooKeeper).

    @raise TypeError: if the registry's kind has no locks.
    @raise ValueError: if C{name} is malformed.
    """
    check_key(name)
    from skynet.registry.files import FileRegistry
    from skynet.registry.memory import MemoryRegistry

    if isinstance(registry, FileRegistry):
        path = os.path.join(registry.root, LOCKS_DIR, data_node_name(name))
        return FileLock(path, identifier=identifier, reactor=reactor)
    if isinstance(registry, MemoryRegistry):
        return MemoryLock(registry.store, name, identifier=identifier)
    try:
        from skynet.registry.zookeeper import ZooKeeperRegistry
    except ImportError:  # pragma: no cover (kazoo is a dependency)
        ZooKeeperRegistry = None  # type: ignore[assignment,misc]
    if ZooKeeperRegistry is not None and isinstance(registry, ZooKeeperRegistry):
        root = registry.chroot.rstrip("/")
        path = f"{root}/{LOCKS_DIR}/{data_node_name(name)}"
        return ZooKeeperLock(registry.kazoo_client, path, identifier=identifier, reactor=reactor)
    raise TypeError(f"no locks on {registry!r}")
