"""
An in-memory registry, for unit tests.

Several L{MemoryRegistry} objects may share one L{MemoryStore}, so a test can
give a "service process" and a "client process" each their own view of the
same registry::

    services = MemoryRegistry(reactor=clock)
    clients = MemoryRegistry(reactor=clock, store=services.store)

Each object owns the nodes it added, as a ZooKeeper session owns its
ephemeral nodes: L{MemoryRegistry.stop} removes them, and
L{MemoryRegistry.crash} drops them as if the owning process had died.

Listener events are delivered through the reactor (C{callLater(0, ...)}),
never inside the call that caused them, in the order the changes happened;
with a L{twisted.internet.task.Clock} a test delivers them with
C{clock.advance(0)}.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import attr
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.logger import Logger
from zope.interface import implementer

from skynet.config import default_reactor
from skynet.registry.base import (
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
    sort_instances,
)

_anonymous = itertools.count(1)


@attr.s(auto_attribs=True, slots=True)
class _Node:
    value: Any
    owner: MemoryRegistry


class MemoryStore:
    """
    The shared state behind one or more L{MemoryRegistry} objects: the
    instance nodes and statistics nodes keyed by path, and the running
    watches.

    @ivar name: names the store in its registries' URL (C{memory://<name>}).
    """

    def __init__(self, name: str | None = None) -> None:
        self.name = name if name is not None else f"anonymous-{next(_anonymous)}"
        self.nodes: dict[str, _Node] = {}
        #: uuid -> path of its node.
        self.paths_by_uuid: dict[str, str] = {}
        self.stats: dict[str, _Node] = {}
        self.watches: list[_MemoryWatch] = []
        #: Data nodes: key -> value.  They belong to no registry object.
        self.values: dict[str, bytes] = {}
        self.value_watches: list[_MemoryValueWatch] = []

    def set_value(self, key: str, value: bytes | None) -> None:
        if value is None:
            self.values.pop(key, None)
        else:
            self.values[key] = value
        for watch in list(self.value_watches):
            if watch.key == key:
                watch.schedule()

    def instances(self) -> list[Instance]:
        """
        All instances in the store, sorted by path.
        """
        return sort_instances(node.value for node in self.nodes.values())

    def set(self, instance: Instance, owner: MemoryRegistry, keep_owner: bool) -> None:
        path = instance.path
        node = self.nodes.get(path)
        old = node.value if node is not None else None
        if node is not None and keep_owner:
            node.value = instance
        else:
            self.nodes[path] = _Node(instance, owner)
        if old is not None and self.paths_by_uuid.get(old.uuid) == path:
            del self.paths_by_uuid[old.uuid]
        self.paths_by_uuid[instance.uuid] = path
        self._changed(old, instance)

    def delete(self, path: str) -> None:
        self.stats.pop(path, None)
        node = self.nodes.pop(path, None)
        if node is not None:
            if self.paths_by_uuid.get(node.value.uuid) == path:
                del self.paths_by_uuid[node.value.uuid]
            self._changed(node.value, None)

    def drop_owner(self, owner: MemoryRegistry) -> None:
        """
        Delete every node owned by C{owner}.
        """
        for path, node in list(self.stats.items()):
            if node.owner is owner:
                del self.stats[path]
        for path, node in list(self.nodes.items()):
            if node.owner is owner:
                self.delete(path)

    def _changed(self, old: Instance | None, new: Instance | None) -> None:
        for watch in list(self.watches):
            watch.enqueue((old, new))


@implementer(IWatch)
class _MemoryWatch:
    """
    Queues a watch's changes and delivers them from the reactor.
    """

    log = Logger()

    def __init__(self, store: MemoryStore, query: Query, listener: IInstanceListener, reactor):
        self._store = store
        self._reactor = reactor
        self._diff = InstanceDiff(query, listener)
        # The snapshot is taken now so that changes queued after it apply to it.
        self._queue: list[Any] = [store.instances()]
        self._pending = None
        self._schedule()

    def enqueue(self, change: tuple[Instance | None, Instance | None]) -> None:
        self._queue.append(change)
        self._schedule()

    def _schedule(self) -> None:
        if self._pending is None and not self._diff.stopped:
            self._pending = self._reactor.callLater(0, self._deliver)

    def _deliver(self) -> None:
        self._pending = None
        queue, self._queue = self._queue, []
        for item in queue:
            if self._diff.stopped:
                return
            if isinstance(item, list):
                self._diff.feed(item)
            else:
                self._diff.change(*item)

    def stop(self) -> None:
        self._diff.stopped = True
        self._queue = []
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None
        if self in self._store.watches:
            self._store.watches.remove(self)


class _MemoryValueWatch(ValueDelivery):
    """
    A watch of one data node: delivers the store's current value from the
    reactor whenever it may have changed.
    """

    def __init__(self, store: MemoryStore, key: str, callback, reactor, on_stop) -> None:
        ValueDelivery.__init__(self, key, callback, on_stop)
        self._store = store
        self._reactor = reactor
        self._pending: Any = None
        self.schedule()

    def schedule(self) -> None:
        if self._pending is None and not self.stopped:
            self._pending = self._reactor.callLater(0, self._deliver)

    def _deliver(self) -> None:
        self._pending = None
        self.deliver(self._store.values.get(self.key))

    def stop(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None
        if self in self._store.value_watches:
            self._store.value_watches.remove(self)
        ValueDelivery.stop(self)


@implementer(IRegistry)
class MemoryRegistry(ListingMixin):
    """
    A registry held in memory, for tests.

    @ivar store: the L{MemoryStore} holding the nodes; pass it as C{store} to
        another L{MemoryRegistry} to share it.
    """

    log = Logger()

    def __init__(self, reactor=None, store: MemoryStore | None = None) -> None:
        self._reactor = default_reactor(reactor)
        self.store = store if store is not None else MemoryStore()
        self._watches: list[_MemoryWatch] = []
        self._value_watches: list[_MemoryValueWatch] = []
        self._stopped = False

    @property
    def url(self) -> str:
        return f"memory://{self.store.name}"

    def __repr__(self) -> str:
        return f"<MemoryRegistry {self.url} at 0x{id(self):x}>"

    def _check(self) -> None:
        if self._stopped:
            raise RegistryError(f"{self!r} is stopped")

    def start(self) -> Deferred[None]:
        self._stopped = False
        return succeed(None)

    def stop(self) -> Deferred[None]:
        """
        Remove the nodes this object owns and stop its watches.
        """
        self._shutdown()
        return succeed(None)

    def crash(self) -> None:
        """
        Drop this object's nodes as if its process had died: watches on the
        store see them removed, and this object stops.
        """
        self.log.info("Memory registry {url} crashed", url=self.url)
        self._shutdown()

    def _shutdown(self) -> None:
        for watch in self._watches:
            watch.stop()
        self._watches = []
        for value_watch in list(self._value_watches):
            value_watch.stop()
        self.store.drop_owner(self)
        self._stopped = True

    def add(self, instance: Instance) -> Deferred[None]:
        return maybeDeferred(self._set, instance, False)

    def update(self, instance: Instance) -> Deferred[None]:
        """
        Rewrite the node; its owner stays whoever created it (like a
        ZooKeeper C{set} on another session's ephemeral node).
        """
        return maybeDeferred(self._set, instance, True)

    def _set(self, instance: Instance, keep_owner: bool) -> None:
        instance.checked_json()
        self._check()
        self.store.set(instance, self, keep_owner=keep_owner)

    def remove(self, instance: Instance) -> Deferred[None]:
        def remove() -> None:
            self._check()
            node = self.store.nodes.get(instance.path)
            # A successor on the same host and port is not ours to delete.
            if node is None or node.value.uuid == instance.uuid:
                self.store.delete(instance.path)

        return maybeDeferred(remove)

    def publish_stats(self, instance: Instance, stats: dict[str, Any]) -> Deferred[None]:
        def publish() -> None:
            self._check()
            path = instance.path
            node = self.store.stats.get(path)
            owner = node.owner if node is not None else self
            self.store.stats[path] = _Node(dict(stats), owner)

        return maybeDeferred(publish)

    def get_stats(self, instance: Instance) -> Deferred[dict[str, Any] | None]:
        node = self.store.stats.get(instance.path)
        return succeed(dict(node.value) if node is not None else None)

    def query(self, query: Query) -> Deferred[list[Instance]]:
        return succeed(query.filter(self.store.instances()))

    def get(self, uuid: str) -> Deferred[Instance | None]:
        path = self.store.paths_by_uuid.get(uuid)
        node = self.store.nodes.get(path) if path is not None else None
        return succeed(node.value if node is not None else None)

    def watch(self, query: Query, listener: IInstanceListener) -> IWatch:
        self._check()
        watch = _MemoryWatch(self.store, query, listener, self._reactor)
        self.store.watches.append(watch)
        self._watches.append(watch)
        return watch

    # Data nodes.

    def get_value(self, key: str) -> Deferred[bytes | None]:
        def get() -> bytes | None:
            check_key(key)
            self._check()
            return self.store.values.get(key)

        return maybeDeferred(get)

    def set_value(self, key: str, value: bytes) -> Deferred[None]:
        def set_() -> None:
            check_key(key)
            check_value(value)
            self._check()
            self.store.set_value(key, value)

        return maybeDeferred(set_)

    def delete_value(self, key: str) -> Deferred[None]:
        def delete() -> None:
            check_key(key)
            self._check()
            self.store.set_value(key, None)

        return maybeDeferred(delete)

    def watch_value(self, key: str, callback: Callable[[bytes | None], None]) -> IWatch:
        check_key(key)
        self._check()

        def forget() -> None:
            if watch in self._value_watches:
                self._value_watches.remove(watch)

        watch = _MemoryValueWatch(self.store, key, callback, self._reactor, forget)
        self.store.value_watches.append(watch)
        self._value_watches.append(watch)
        return watch


#: Stores reachable by name through C{memory://<name>} URLs, for the life of
#: the process.
_named_stores: dict[str, MemoryStore] = {}


def named_store(name: str) -> MemoryStore:
    """
    The process-wide L{MemoryStore} called C{name}, created on first use.
    """
    store = _named_stores.get(name)
    if store is None:
        store = _named_stores[name] = MemoryStore(name)
    return store
