"""
C{Sleeper.Sleep}: the tool of failover tests.

    {duration: int64 ns, message: str, unregisterhalfwaythrough: bool,
     unregisterwhendone: bool, exitwhendone: bool, panicwhendone: bool}
    -> {message}

It sleeps, can unregister half way through or when done, and can end its
process when done: cleanly (C{exitwhendone}) or as a crash
(C{panicwhendone}), right after its answer has gone out.
"""

import os

from twisted.internet.task import deferLater
from twisted.logger import Logger

from skynet.service import Service


class Sleeper(Service):
    name = "Sleeper"
    log = Logger()

    async def Sleep(self, request_info, params):
        reactor = self.host.reactor
        duration = max(0, int(params.get("duration", 0) or 0)) / 1e9
        if params.get("unregisterhalfwaythrough"):
            await deferLater(reactor, duration / 2, lambda: None)
            await self.host.set_registered(False)
            await deferLater(reactor, duration / 2, lambda: None)
        else:
            await deferLater(reactor, duration, lambda: None)
        if params.get("unregisterwhendone"):
            await self.host.set_registered(False)
        if params.get("panicwhendone"):
            self.log.critical("Sleeper {uuid} panicking as asked", uuid=self.info.uuid)
            reactor.callLater(0.05, os._exit, 2)
        elif params.get("exitwhendone"):
            self.log.info("Sleeper {uuid} exiting as asked", uuid=self.info.uuid)
            reactor.callLater(0.05, os._exit, 0)
        return {"message": params.get("message", "")}
