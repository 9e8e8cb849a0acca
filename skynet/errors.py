"""
The exceptions a caller of skynet sees, each carrying the server's message.
"""

from __future__ import annotations


class SkynetError(Exception):
    """
    Base class of every skynet error.
    """


class ServiceError(SkynetError):
    """
    The remote method failed: its message is the service's C{errstring}.

    A service method may raise this to fail a call with exactly this message
    (any other exception is reported as C{"<Type>: <message>"}).
    """


class RemoteCallError(SkynetError):
    """
    The service refused the call before reaching the method (the response
    header's C{error}): unknown method, bad client id, undecodable body.
    """


class RequestTimeout(SkynetError):
    """
    No instance answered before the give-up timeout.
    """


class NoInstances(SkynetError):
    """
    No registered instance of the service could be found in time.
    """


class ConnectionFailed(SkynetError):
    """
    The connection to an instance failed or was lost before the answer
    came; the client retries such calls on another instance.
    """


class ServiceUnregistered(ConnectionFailed):
    """
    The instance answered the handshake with C{registered: false}.
    """


class ProtocolError(ConnectionFailed):
    """
    The peer broke the wire protocol (bad frame, undecodable header).
    """
