"""
skynet from asyncio: await calls directly.

    import asyncio
    from skynet.aio import Client

    async def main():
        async with Client() as client:
            fib = client.service("Fibonacci")
            print((await fib.call("Index", {"index": 30}))["value"])

    asyncio.run(main())

This is L{skynet.client} itself (same discovery, pools, balancing, hedged
retries, timeouts and errors) running on Twisted's asyncio reactor, which
drives its sockets from the running asyncio loop: no thread, no copy of the
client.  Each call's Deferred is handed to asyncio with
C{Deferred.asFuture}.

The first L{Client} made in a process installs Twisted's
C{AsyncioSelectorReactor} on the running loop, unless a reactor is installed
already; that one must then be an asyncio reactor on this very loop (for
example a service run with C{twistd --reactor=asyncio}, whose methods may
then C{await} asyncio code and these calls).  Twisted has one reactor per
process: all clients share the loop they were first made on.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from skynet import client as _client
from skynet.config import environment_defaults
from skynet.protocol import RequestInfo

__all__ = ["Client", "ServiceClient", "asyncio_reactor"]


def asyncio_reactor(loop: asyncio.AbstractEventLoop | None = None) -> Any:
    """
    Twisted's reactor running on C{loop} (default: the running loop),
    installed and started here if no reactor is installed yet.

    @raise RuntimeError: if the installed reactor is not an asyncio
        reactor on C{loop}.
    """
    if loop is None:
        loop = asyncio.get_running_loop()
    if "twisted.internet.reactor" not in sys.modules:
        from twisted.internet import asyncioreactor

        asyncioreactor.install(loop)
    from twisted.internet import reactor

    if getattr(reactor, "_asyncioEventloop", None) is not loop:
        raise RuntimeError(
            f"skynet.aio needs Twisted's asyncio reactor on this loop; {type(reactor).__name__} "
            "is installed (import skynet.aio before anything that installs a reactor, or run "
            "twistd with --reactor=asyncio)"
        )
    if not reactor.running:
        # The loop runs already (asyncio.run): only mark the reactor running,
        # which fires its start-up triggers; never reactor.run(), which would
        # run the loop a second time.  No signal handlers: they are the
        # asyncio program's.
        reactor.startRunning(installSignalHandlers=False)  # type: ignore[attr-defined]
    return reactor


class ServiceClient:
    """
    A L{skynet.client.ServiceClient} whose calls are awaited from asyncio.
    """

    def __init__(self, service: _client.ServiceClient, loop: asyncio.AbstractEventLoop) -> None:
        self.service = service
        self.loop = loop

    async def call(self, method: str, params: dict[str, Any] | None = None,
                   request_info: RequestInfo | None = None, *, timeout: float | None = None,
                   retry_interval: float | None = None) -> dict[str, Any]:  # fmt: skip
        """
        L{skynet.client.ServiceClient.call}, awaited.  Cancelling the task
        cancels the call.
        """
        d = self.service.call(method, params, request_info, timeout=timeout,
                              retry_interval=retry_interval)  # fmt: skip
        return await d.asFuture(self.loop)  # type: ignore[no-any-return]

    async def call_once(self, method: str, params: dict[str, Any] | None = None,
                        request_info: RequestInfo | None = None, *,
                        timeout: float | None = None) -> dict[str, Any]:  # fmt: skip
        d = self.service.call_once(method, params, request_info, timeout=timeout)
        return await d.asFuture(self.loop)  # type: ignore[no-any-return]


class Client:
    """
    L{skynet.client.Client} for asyncio code; make it inside a coroutine
    (it binds to the running loop).  Keyword arguments are those of
    L{skynet.client.Client}; C{region} and C{host} default to
    C{$SKYNET_REGION} and C{$SKYNET_BIND_IP} (this is an edge: user code
    builds it).
    """

    def __init__(self, registry: Any = None, **options: Any) -> None:
        env = environment_defaults()
        if options.get("region") is None:
            options["region"] = env.region
        if options.get("host") is None:
            options["host"] = env.bind_ip
        self.loop = asyncio.get_running_loop()
        self.reactor = asyncio_reactor(self.loop)
        self.client = _client.Client(registry, reactor=self.reactor, **options)

    def service(self, name: str, version: str | None = None, region: str | None = None,
                host: str | None = None, **options: Any) -> ServiceClient:  # fmt: skip
        """
        L{skynet.client.Client.service}, with awaitable calls.
        """
        return ServiceClient(self.client.service(name, version, region, host, **options),
                             self.loop)  # fmt: skip

    async def close(self) -> None:
        """
        Stop watching, close every connection, stop the registry if this
        client made it.
        """
        await self.client.stop().asFuture(self.loop)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()
