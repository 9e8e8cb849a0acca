"""
The service the RPC benchmark calls: C{Adder.Add {a, b} -> {sum}}.
"""

from skynet.service import Service


class Adder(Service):
    name = "Adder"

    def Add(self, request_info, params):
        return {"sum": params["a"] + params["b"]}
