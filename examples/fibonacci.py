"""
C{Fibonacci.Index {index: int32} -> {index, value: int64}}.

F(n) is computed by asking the Fibonacci service itself for F(n-1) and
F(n-2), passing the request info on, so one request id follows the whole
computation through the cluster.  Each instance remembers what it learnt.
"""

from bson.int64 import Int64
from twisted.internet.defer import gatherResults

from skynet.errors import ServiceError
from skynet.service import Service

#: F(92) is the largest Fibonacci number that fits an int64.
MAX_INDEX = 92


class Fibonacci(Service):
    name = "Fibonacci"

    def __init__(self) -> None:
        self.known: dict[int, int] = {0: 0, 1: 1}

    async def Index(self, request_info, params):
        index = params.get("index")
        if not isinstance(index, int) or isinstance(index, bool):
            raise ServiceError("Index needs an integer 'index'")
        if index < 0:
            raise ServiceError(f"negative index {index}")
        if index > MAX_INDEX:
            raise ServiceError(f"index {index} is too large (at most {MAX_INDEX})")
        value = self.known.get(index)
        if value is None:
            fibonacci = self.client.service(self.info.name)
            a, b = await gatherResults(
                [
                    fibonacci.call("Index", {"index": index - 1}, request_info),
                    fibonacci.call("Index", {"index": index - 2}, request_info),
                ],
                consumeErrors=True,
            )
            value = a["value"] + b["value"]
            self.known[index] = value
        return {"index": index, "value": Int64(value)}
