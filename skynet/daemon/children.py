"""
The daemon's one view of its children in the registry.

L{ChildInstances} follows one registry watch and keeps, per child uuid,
the L{Instance} node of its current process: where its admin listener is,
whether it is registered.  The daemon asks it, never the registry, for a
child's node; and when a child dies, its nodes are deleted by the
L{Instance} in hand (ZooKeeper keeps a killed process's ephemeral nodes
until its session expires), with no search of the registry by uuid.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.logger import Logger
from zope.interface import implementer

from skynet.registry.base import IInstanceListener, Instance, Query

__all__ = ["ChildInstances"]


@implementer(IInstanceListener)
class ChildInstances(Service):
    """
    A uuid -> L{Instance} view of the daemon's children, fed by one watch
    while running.

    @param registry: the daemon's (started) registry.
    @param accepts: whether a node is one of the current process of a
        child (its uuid deployed, its pid that child's, if the node says).
    @param new_process: called with the first node of each new process of
        a child (the daemon then checks its registration).
    """

    log = Logger()

    def __init__(self, registry: Any, accepts: Callable[[Instance], bool],
                 new_process: Callable[[Instance], None]) -> None:  # fmt: skip
        self.registry = registry
        self.accepts = accepts
        self.new_process = new_process
        self.instances: dict[str, Instance] = {}
        self._watch: Any = None

    # IService

    def startService(self) -> None:
        super().startService()
        self._watch = self.registry.watch(Query(), self)

    def stopService(self) -> None:  # type: ignore[override]
        super().stopService()
        if self._watch is not None:
            self._watch.stop()
            self._watch = None

    # Reading

    def get(self, uuid: str) -> Instance | None:
        """
        The last node seen of C{uuid}'s current process, if any.
        """
        return self.instances.get(uuid)

    def live(self, uuid: str, pid: int | None) -> Instance | None:
        """
        The node of process C{pid} of C{uuid}, if the registry has shown it.
        """
        if pid is None:
            return None
        instance = self.instances.get(uuid)
        if instance is None or (instance.pid is not None and instance.pid != pid):
            return None
        return instance

    def forget(self, uuid: str) -> Instance | None:
        return self.instances.pop(uuid, None)

    async def remove_dead(self, uuid: str, pid: int | None) -> Instance | None:
        """
        Delete the node of dead process C{pid} of C{uuid}, if the view holds
        one, by that node.

        @return: the node deleted, if any.
        """
        instance = self.instances.pop(uuid, None)
        if instance is None:
            return None
        if instance.pid is not None and pid is not None and instance.pid != pid:
            return None
        await self.registry.remove(instance)
        return instance

    # IInstanceListener

    def snapshot(self, instances: list[Instance]) -> None:
        for instance in instances:
            self._seen(instance)

    def added(self, instance: Instance) -> None:
        self._seen(instance)

    def updated(self, instance: Instance) -> None:
        self._seen(instance)

    def removed(self, instance: Instance) -> None:
        known = self.instances.get(instance.uuid)
        if known is not None and known.pid == instance.pid:
            del self.instances[instance.uuid]

    def _seen(self, instance: Instance) -> None:
        if not self.accepts(instance):
            return
        previous = self.instances.get(instance.uuid)
        self.instances[instance.uuid] = instance
        if previous is None or previous.pid != instance.pid:
            try:
                self.new_process(instance)
            except Exception:
                self.log.failure("handling the new node of {uuid} failed", uuid=instance.uuid)
