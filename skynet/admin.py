"""
Acting on one particular instance, as operators' tools do: its admin
listener (Go Skynet's raw C{Admin.Register {}}, C{Admin.Unregister {}},
C{Admin.Stop {waitforclients}}, and skynet's C{Admin.Spans}), or a call to
exactly that instance rather than to whichever the load balancer picks (to
ask a host's daemon about its own children).

Used by the daemon, C{sky} and its shell, and the dashboard.  The action
tables (L{ADMIN_ACTIONS}, L{DAEMON_ACTIONS}) live in L{skynet.control} with
the rest of the daemon's contract; they are re-exported here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import bson
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.internet.error import ConnectError
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure

from skynet.control import ADMIN_ACTIONS, DAEMON_ACTIONS
from skynet.errors import ConnectionFailed, RemoteCallError
from skynet.protocol import (
    DEFAULT_MAX_FRAME,
    ClientProtocol,
    FrameProtocol,
    RequestInfo,
    encode_header,
    new_id,
)
from skynet.registry.base import Address, Instance


class _AdminCall(FrameProtocol):
    """
    One raw admin call: a header and a body out, the answering pair in.
    """

    def __init__(self, servicemethod: str, params: dict[str, Any]) -> None:
        self.request = encode_header(servicemethod, 0) + bson.encode(params)
        self.result: Deferred[dict[str, Any]] = Deferred()
        self._error: str | None = None

    def connectionMade(self) -> None:
        self.transport.write(self.request)  # type: ignore[union-attr]

    def frame_received(self, frame: bytes) -> None:
        if self._error is None:
            try:
                error = bson.decode(frame).get("error", "")
            except Exception as e:
                error = f"undecodable admin response: {e}"
            self._error = error if isinstance(error, str) else ""
            return
        error, self._error = self._error, None
        self.close_connection()
        if not self.result.called:
            if error:
                self.result.errback(RemoteCallError(error))
                return
            try:
                body = bson.decode(frame)
            except Exception as e:
                self.result.errback(RemoteCallError(f"undecodable admin response body: {e}"))
                return
            self.result.callback(body)

    def connectionLost(self, reason: Any = None) -> None:
        if not self.result.called:
            self.result.errback(ConnectionFailed("the admin connection closed before the answer"))


def admin_call(
    reactor: Any,
    address: Address,
    servicemethod: str,
    params: dict[str, Any] | None = None,
    timeout: float = 5.0,
    tls: bool | None = None,
) -> Deferred[dict[str, Any]]:
    """
    Call C{servicemethod} (C{Admin.Register}, C{Admin.Unregister},
    C{Admin.Stop}, C{Admin.Spans}) on the admin listener at C{address}.

    @param tls: speak TLS (L{True}: the instance advertises C{AdminTLS}) or
        not; L{None}: when this process has credentials (L{skynet.tls}).
    @return: a Deferred firing with the answer's body (C{{}} for all but
        C{Admin.Spans}), or failing with
        L{RemoteCallError} (the answer's error) or L{ConnectionFailed}
        (unreachable, closed, or no answer within C{timeout}).
    """
    # security hook (issue 12): TLS with this process's credentials, if it has any.
    from skynet.tls import client_endpoint

    endpoint = client_endpoint(reactor, address.ip_address, address.port, timeout, tls=tls)
    protocol = _AdminCall(servicemethod, params or {})
    factory = Factory.forProtocol(lambda: protocol)
    factory.noisy = False
    d = endpoint.connect(factory)
    d.addCallback(lambda _: protocol.result)
    timer = reactor.callLater(timeout, d.cancel)

    def done(result: Any) -> Any:
        if timer.active():
            timer.cancel()
        if protocol.transport is not None:
            protocol.transport.loseConnection()
        if isinstance(result, Failure):
            if result.check(CancelledError):
                return Failure(ConnectionFailed(f"no answer from {address} within {timeout}s"))
            if not result.check(RemoteCallError, ConnectionFailed):
                return Failure(ConnectionFailed(f"cannot reach the admin endpoint {address}: "
                                                f"{result.getErrorMessage()}"))  # fmt: skip
        return result

    return d.addBoth(done)


def call_instance(
    reactor: Any,
    instance: Instance,
    method: str,
    params: dict[str, Any],
    timeout: float,
    connector: Callable[[Instance], Deferred[ClientProtocol]] | None = None,
) -> Deferred[dict[str, Any]]:
    """
    One call to exactly C{instance}, over a connection of its own.

    @param connector: how to reach an instance (a L{skynet.client.Client}'s
        C{connector}; default TCP).
    @return: a Deferred firing with the result, or failing with
        L{skynet.errors.ServiceError} or L{RemoteCallError} as the instance
        answered, or L{ConnectionFailed}.
    """
    return ensureDeferred(_call_instance(reactor, instance, method, params, timeout, connector))


async def _call_instance(
    reactor: Any,
    instance: Instance,
    method: str,
    params: dict[str, Any],
    timeout: float,
    connector: Callable[[Instance], Deferred[ClientProtocol]] | None,
) -> dict[str, Any]:
    if connector is None:
        from skynet.client import tcp_connector

        connector = tcp_connector(reactor, timeout, DEFAULT_MAX_FRAME)
    try:
        protocol = await with_timeout(reactor, connector(instance), timeout)
    except CancelledError:
        raise ConnectionFailed(f"no handshake from {instance.address} in {timeout}s") from None
    except (ConnectError, OSError) as e:
        raise ConnectionFailed(f"cannot connect to {instance.address}: {e}") from None
    try:
        d = protocol.call(method, params, RequestInfo(request_id=new_id()))
        try:
            return await with_timeout(reactor, d, timeout)
        except CancelledError:
            raise ConnectionFailed(f"no answer from {instance.address} in {timeout}s") from None
    finally:
        protocol.closed_by_us = True
        protocol.close_connection()


def with_timeout(reactor: Any, d: Deferred[Any], timeout: float) -> Deferred[Any]:
    """
    C{d}, cancelled if it has not fired after C{timeout} seconds.
    """
    timer = reactor.callLater(timeout, d.cancel)

    def done(result: Any) -> Any:
        if timer.active():
            timer.cancel()
        return result

    return d.addBoth(done)


__all__ = ["ADMIN_ACTIONS", "DAEMON_ACTIONS", "admin_call", "call_instance"]
