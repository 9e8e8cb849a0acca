"""
The dashboard's actions on instances: register, unregister, stop, restart.

An instance supervised by a skynet daemon is acted on through that daemon
(C{RegisterSubService}, C{UnregisterSubService}, C{StopSubService},
C{RestartSubService} with C{{uuid}}), so the daemon knows what was asked;
any other instance through its admin endpoint (Go Skynet's raw
C{Admin.Register {}}, C{Admin.Unregister {}}, C{Admin.Stop
{waitforclients}}).  Restarting needs a daemon: only a supervisor can start
the process again.
"""

from __future__ import annotations

from typing import Any

import bson
from bson.int64 import Int64
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from skynet.protocol import DEFAULT_MAX_FRAME, FrameProtocol, RequestInfo, new_id
from skynet.registry.base import Address, Instance

#: The actions the dashboard offers.
ACTIONS = ("register", "unregister", "stop", "restart")

_ADMIN_METHODS = {
    "register": ("Admin.Register", {}),
    "unregister": ("Admin.Unregister", {}),
    "stop": ("Admin.Stop", {"waitforclients": True}),
}

_DAEMON_METHODS = {
    "register": "RegisterSubService",
    "unregister": "UnregisterSubService",
    "stop": "StopSubService",
    "restart": "RestartSubService",
}


class ActionError(Exception):
    """
    An action could not be done; C{status} is the HTTP status to answer.
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _AdminCall(FrameProtocol):
    """
    One admin call: send a header and a body, read the answering pair.
    """

    def __init__(self, servicemethod: str, params: dict[str, Any]) -> None:
        self.servicemethod = servicemethod
        self.params = params
        self.frames: list[bytes] = []
        self.done: Deferred = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(  # type: ignore[union-attr]
            bson.encode({"servicemethod": self.servicemethod, "seq": Int64(0)})
            + bson.encode(self.params)
        )

    def frame_received(self, frame: bytes) -> None:
        self.frames.append(frame)
        if len(self.frames) == 2 and not self.done.called:
            self.done.callback(bson.decode(self.frames[0]))
            self.close_connection()

    def connectionLost(self, reason: Any = None) -> None:
        if not self.done.called:
            self.done.errback(ConnectionError("admin connection closed before the answer"))


class _AdminFactory(Factory):
    def __init__(self, servicemethod: str, params: dict[str, Any]) -> None:
        self.servicemethod = servicemethod
        self.params = params

    def buildProtocol(self, addr: Any) -> _AdminCall:
        return _AdminCall(self.servicemethod, self.params)


async def admin_call(
    reactor: Any, address: Address, servicemethod: str, params: dict[str, Any], timeout: float
) -> dict[str, Any]:
    """
    One raw admin call to C{address}.  @return: the answer's header.
    """
    endpoint = TCP4ClientEndpoint(reactor, address.ip_address, address.port, timeout=timeout)
    protocol = await endpoint.connect(_AdminFactory(servicemethod, params))
    assert isinstance(protocol, _AdminCall)
    timer = reactor.callLater(timeout, protocol.done.cancel)
    try:
        return await protocol.done
    except CancelledError:
        raise TimeoutError(f"no answer from {address} within {timeout}s") from None
    finally:
        if timer.active():
            timer.cancel()
        if protocol.transport is not None:
            protocol.transport.loseConnection()


async def service_call(
    reactor: Any, instance: Instance, method: str, params: dict[str, Any], timeout: float
) -> dict[str, Any]:
    """
    One call to exactly this C{instance} (not load balanced: it must be
    the daemon supervising the target).
    """
    from skynet.client import tcp_connector

    connect = tcp_connector(reactor, timeout, DEFAULT_MAX_FRAME)
    protocol = await connect(instance)
    try:
        d = protocol.call(method, params, RequestInfo(request_id=new_id()))
        timer = reactor.callLater(timeout, d.cancel)
        try:
            return await d
        except CancelledError:
            raise TimeoutError(f"no answer from {instance.address} within {timeout}s") from None
        finally:
            if timer.active():
                timer.cancel()
    finally:
        protocol.close_connection()


class InstanceActions:
    """
    Does the dashboard's actions on the instances of a
    L{skynet.web.model.DashboardModel}.
    """

    log = Logger()

    def __init__(self, model: Any, reactor: Any = None, timeout: float = 10.0) -> None:
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self.model = model
        self.reactor = reactor
        self.timeout = timeout

    def describe(self, uuid: str) -> dict[str, bool]:
        """
        Which actions are possible on C{uuid} (restart only with a daemon).
        """
        state = self.model.find(uuid)
        if state is None:
            return dict.fromkeys(ACTIONS, False)
        daemon = self.model.daemon_of(uuid) is not None
        admin = state.instance.admin is not None
        return {a: daemon or (admin and a in _ADMIN_METHODS) for a in ACTIONS}

    async def perform(self, action: str, uuid: str, who: str = "") -> dict[str, Any]:
        """
        Do C{action} on instance C{uuid}.

        @return: C{{"ok": True, "via": "daemon" | "admin", ...}}.
        @raise ActionError: 404 for an unknown action or instance, 409 when
            it cannot be done this way (no daemon for a restart, no admin
            endpoint), 502 when the instance or daemon refused or failed.
        """
        if action not in ACTIONS:
            raise ActionError(404, f"unknown action {action!r}; known: {', '.join(ACTIONS)}")
        state = self.model.find(uuid)
        if state is None:
            raise ActionError(404, f"no instance {uuid!r}")
        instance = state.instance
        daemon = self.model.daemon_of(uuid)
        via = "daemon" if daemon is not None else "admin"
        try:
            if daemon is not None:
                result = await service_call(
                    self.reactor, daemon, _DAEMON_METHODS[action], {"uuid": uuid}, self.timeout
                )
                error = ""
            elif action == "restart":
                raise ActionError(
                    409,
                    "restart needs a skynet daemon supervising the instance; "
                    f"{instance.name} {instance.address} has none (stop it, or run it "
                    "under twistd skynet-daemon)",
                )
            elif instance.admin is None:
                raise ActionError(409, f"{instance.name} {instance.address} has no admin endpoint")
            else:
                method, params = _ADMIN_METHODS[action]
                header = await admin_call(
                    self.reactor, instance.admin, method, params, self.timeout
                )
                error = str(header.get("error") or "")
                result = {}
        except ActionError as e:
            self.model.add_event(
                "action-refused", f"{action} of {{service}} {{address}}: {e.message}", instance
            )
            raise
        except Exception as e:
            message = f"{action} of {instance.name} {instance.address} via {via} failed: {e}"
            self.model.add_event("action-failed", message, instance)
            raise ActionError(502, message) from e
        if error:
            message = f"{action} of {instance.name} {instance.address} refused: {error}"
            self.model.add_event("action-failed", message, instance)
            raise ActionError(502, message)
        by = f" by {who}" if who else ""
        self.model.add_event(
            "action", f"{action} of {{service}} {{address}} via {via}{by}", instance, action=action
        )
        return {"ok": True, "action": action, "uuid": uuid, "via": via, "result": result}


__all__ = ["ACTIONS", "ActionError", "InstanceActions", "admin_call", "service_call"]
