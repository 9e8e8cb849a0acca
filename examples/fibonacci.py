"""
C{Fibonacci.Index {index: int32} -> {index, value: int64}}.

F(n) is computed by asking the Fibonacci service itself for F(n-1) and
F(n-2), passing the request info on, so one request id follows the whole
computation through the cluster.  Each instance remembers what it learnt,
and computes each index at most once at a time: a second request for an
index in progress waits for the first.
"""

from bson.int64 import Int64
from twisted.internet.defer import Deferred, FirstError, gatherResults

from skynet.errors import ServiceError
from skynet.service import Service

#: F(92) is the largest Fibonacci number that fits an int64.
MAX_INDEX = 92


class Fibonacci(Service):
    name = "Fibonacci"

    def __init__(self) -> None:
        self.known: dict[int, int] = {0: 0, 1: 1}
        self.computing: dict[int, list[Deferred]] = {}

    async def Index(self, request_info, params):
        index = params.get("index")
        if not isinstance(index, int) or isinstance(index, bool):
            raise ServiceError("Index needs an integer 'index'")
        if index < 0:
            raise ServiceError(f"negative index {index}")
        if index > MAX_INDEX:
            raise ServiceError(f"index {index} is too large (at most {MAX_INDEX})")
        value = await self.value(index, request_info)
        return {"index": index, "value": Int64(value)}

    async def value(self, index, request_info):
        if index in self.known:
            return self.known[index]
        waiters = self.computing.get(index)
        if waiters is not None:
            d: Deferred = Deferred()
            waiters.append(d)
            return await d
        waiters = self.computing[index] = []
        fibonacci = self.client.service(self.info.name)
        try:
            a, b = await gatherResults(
                [
                    fibonacci.call("Index", {"index": index - 1}, request_info),
                    fibonacci.call("Index", {"index": index - 2}, request_info),
                ],
                consumeErrors=True,
            )
        except FirstError as e:
            del self.computing[index]
            for d in waiters:
                d.errback(e.subFailure)
            e.subFailure.raiseException()
        value = a["value"] + b["value"]
        self.known[index] = value
        del self.computing[index]
        for d in waiters:
            d.callback(value)
        return value
