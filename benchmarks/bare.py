"""
The floor of this design: a bare Twisted request/response loop over the same
BSON framing, with none of skynet (no handshake, no header/body pairs, no
registry).  C{python -m benchmarks.bare PORTFILE} serves C{{a, b, seq}} ->
C{{sum, seq}} on a free loopback port and writes the port to PORTFILE.
"""

import struct
import sys

import bson
from twisted.internet.protocol import Factory, Protocol

_length = struct.Struct("<i")


class BareFraming(Protocol):
    def __init__(self) -> None:
        self.buffer = b""

    def dataReceived(self, data: bytes) -> None:
        buffer = self.buffer + data
        offset = 0
        while len(buffer) - offset >= 4:
            (length,) = _length.unpack_from(buffer, offset)
            if len(buffer) - offset < length:
                break
            self.document(bson.decode(buffer[offset : offset + length]))
            offset += length
        self.buffer = buffer[offset:]

    def document(self, doc: dict) -> None:
        raise NotImplementedError


class BareServer(BareFraming):
    def document(self, doc: dict) -> None:
        self.transport.write(bson.encode({"sum": doc["a"] + doc["b"], "seq": doc["seq"]}))


class BareClient(BareFraming):
    def __init__(self) -> None:
        super().__init__()
        self.pending: dict = {}
        self.seq = 0

    def call(self, a: int, b: int):
        from twisted.internet.defer import Deferred

        self.seq += 1
        d = Deferred()
        self.pending[self.seq] = d
        self.transport.write(bson.encode({"a": a, "b": b, "seq": self.seq}))
        return d

    def document(self, doc: dict) -> None:
        self.pending.pop(doc["seq"]).callback(doc)


def serve(port_file: str) -> None:
    from twisted.internet import reactor

    port = reactor.listenTCP(0, Factory.forProtocol(BareServer), interface="127.0.0.1")
    with open(port_file, "w") as f:
        f.write(str(port.getHost().port))
    reactor.run()


if __name__ == "__main__":
    serve(sys.argv[1])
