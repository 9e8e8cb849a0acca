"""
Large binaries as views: L{skynet._wire.decode_views} against pymongo, and
L{skynet.service.binary_views} with C{Client.service(binary_views=True)}
over real TCP.
"""

from __future__ import annotations

import os
from typing import Any

import bson
from bson.int64 import Int64
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.trial.unittest import SynchronousTestCase, TestCase

from skynet import _wire
from skynet.client import Client
from skynet.registry.memory import MemoryRegistry
from skynet.service import Service, ServiceHost, binary_views

LARGE = _wire.LARGE_BINARY

values = st.one_of(
    st.integers(-(2**31), 2**31 - 1),
    st.integers(-(2**63), 2**63 - 1).map(Int64),
    st.text(max_size=20),
    st.floats(allow_nan=False),
    st.booleans(),
    st.none(),
    st.binary(max_size=40),
    # Large binaries: made, not drawn (drawing 32 KiB is slow).
    st.tuples(st.integers(LARGE - 2, LARGE + 3000), st.integers(0, 255)).map(
        lambda t: bytes([t[1]]) * t[0]
    ),
)
flat = st.dictionaries(st.text(max_size=8).filter(lambda k: "\x00" not in k), values, max_size=6)


def plain(doc: dict[str, Any]) -> list[tuple[str, type, Any]]:
    """
    A decoded document as (name, type, value), views as the bytes they show.
    """
    return [(k, bytes if type(v) is memoryview else type(v), bytes(v) if type(v) is memoryview
             else v) for k, v in doc.items()]  # fmt: skip


class DecodeViewsTests(SynchronousTestCase):
    @given(flat, st.binary(max_size=7), st.binary(max_size=7))
    @settings(max_examples=300, deadline=None)
    def test_flat_documents_as_pymongo_decodes_them(self, doc, before, after) -> None:
        """
        Every flat document decodes as pymongo decodes it, value for value
        and type for type, wherever it lies in the frame; its large binaries
        are read-only views of the frame itself, the small ones bytes.
        """
        encoded = bson.encode(doc)
        frame = bytearray(before + encoded + after)
        decoded = _wire.decode_views(frame, len(before), len(before) + len(encoded))
        assert decoded is not None
        self.assertEqual(plain(decoded), plain(bson.decode(encoded)))
        for value in decoded.values():
            if type(value) is memoryview:
                self.assertTrue(value.readonly)
                self.assertGreaterEqual(len(value), LARGE)
                self.assertIs(value.obj, frame)
            elif type(value) is bytes:
                self.assertLess(len(value), LARGE)

    @given(flat, st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=3),
           st.integers(0, 10**6))  # fmt: skip
    @settings(max_examples=300, deadline=None)
    def test_damage_is_pymongos_to_judge(self, doc, flips, cut) -> None:
        """
        A damaged document is either declined (L{None}: pymongo decodes or
        rejects it) or decoded exactly as pymongo decodes it: never accepted
        where pymongo would refuse it, never read differently.
        """
        data = bytearray(bson.encode(doc))
        for at, byte in flips:
            data[at % len(data)] = byte
        data = data[: max(1, cut % (len(data) + 1))]
        decoded = _wire.decode_views(data, 0, len(data))
        if decoded is None:
            return
        self.assertEqual(plain(decoded), plain(bson.decode(bytes(data))))

    def test_nested_documents_and_other_types_are_declined(self) -> None:
        for doc in ({"a": {"b": 1}}, {"a": [1, 2]}, {"a": bson.Binary(b"x", 4)},
                    {"a": bson.ObjectId()}, {"a": b"x" * LARGE, "b": {"c": 1}}):  # fmt: skip
            data = bson.encode(doc)
            with self.subTest(doc=repr(doc)[:40]):
                self.assertIsNone(_wire.decode_views(data, 0, len(data)))

    def test_views_encode_as_their_bytes(self) -> None:
        """
        A result holding views (small or large) is encoded, uncopied, byte
        for byte as pymongo encodes the same bytes; views that are not
        plain bytes are pymongo's (which refuses them).
        """
        blob = os.urandom(LARGE + 10)
        data = bson.encode({"n": 3, "data": blob, "tail": b"ab"})
        views = _wire.decode_views(data, 0, len(data))
        assert views is not None
        views["small"] = memoryview(b"xyz")
        views["n"] = Int64(2**40)
        parts = _wire.encode_for_send(views)
        assert isinstance(parts, tuple)
        expected = bson.encode({k: bytes(v) if type(v) is memoryview else v
                                for k, v in views.items()})  # fmt: skip
        self.assertEqual(b"".join(bytes(p) for p in parts[0]), expected)
        self.assertEqual(parts[1], len(expected))
        self.assertIn(views["data"], parts[0])  # sent as it is
        for odd in (memoryview(bytes(8)).cast("i"), memoryview(bytes(16))[::2]):
            self.assertIsNone(_wire.encode_parts({"data": odd}))


def kinds(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={type(v).__name__}" for k, v in params.items())


class Blobs(Service):
    name = "Blobs"

    @binary_views
    def Echo(self, request_info: Any, params: dict[str, Any]) -> dict[str, Any]:
        return {"kinds": kinds(params), **params}

    @binary_views
    def Nest(self, request_info: Any, params: dict[str, Any]) -> dict[str, Any]:
        return {"kinds": kinds(params), "inner": params}

    def Copy(self, request_info: Any, params: dict[str, Any]) -> dict[str, Any]:
        return {"kinds": kinds(params), **params}


class ServedViewsTests(TestCase):
    """
    A service and a client on the reactor, over loopback TCP.
    """

    def setUp(self) -> None:
        self.registry = MemoryRegistry()
        self.host = ServiceHost(Blobs(), self.registry,
                                [TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")])  # fmt: skip
        self.host.startService()
        self.client = Client(registry=MemoryRegistry(store=self.registry.store))

    async def _stop(self) -> None:
        await self.client.stop()
        await self.host.stopService()

    def tearDown(self) -> Any:
        return ensureDeferred(self._stop())

    def test_a_marked_method_and_a_views_client(self) -> Any:
        """
        A method marked L{binary_views} gets its large binary as a view and
        its small one as bytes, and its answer with the view goes back
        whole; a client asking for views gets the large binary of the answer
        as one, another client gets bytes.  An unmarked method gets bytes.
        """
        blob = os.urandom(3 * 1024 * 1024 + 7)

        async def check() -> None:
            views = self.client.service("Blobs", binary_views=True)
            plain_client = self.client.service("Blobs")
            self.assertIsNot(views, plain_client)
            params = {"blob": blob, "small": b"ab", "n": 1}
            got = await views.call("Echo", params, timeout=30)
            self.assertEqual(got["kinds"], "blob=memoryview small=bytes n=int")
            self.assertIs(type(got["blob"]), memoryview)
            self.assertTrue(got["blob"].readonly)
            self.assertEqual(bytes(got["blob"]), blob)
            self.assertEqual(got["small"], b"ab")
            got = await plain_client.call("Echo", params, timeout=30)
            self.assertIs(type(got["blob"]), bytes)
            self.assertEqual(got["blob"], blob)
            got = await views.call("Copy", params, timeout=30)
            self.assertEqual(got["kinds"], "blob=bytes small=bytes n=int")
            self.assertEqual(bytes(got["blob"]), blob)
            # Views in a nested result are sent as bytes, and read as bytes:
            # only flat documents are made of views.
            nested = await views.call("Nest", params, timeout=30)
            self.assertEqual(nested["kinds"], "blob=memoryview small=bytes n=int")
            self.assertIs(type(nested["inner"]["blob"]), bytes)
            self.assertEqual(nested["inner"], params)
            got = await views.call("Echo", {"inner": {"blob": blob}}, timeout=30)
            self.assertEqual(got["kinds"], "inner=dict")
            self.assertEqual(got["inner"], {"blob": blob})

        return ensureDeferred(check())


def test_every_client_sends_views_as_parameters() -> None:
    """
    The encoders of both clients take views anywhere in the parameters: a
    flat document's as they are, a nested one's as the bytes they show.
    """
    blob = os.urandom(LARGE + 1)
    view = memoryview(bytearray(blob)).toreadonly()
    for doc in ({"blob": view, "n": 1}, {"inner": {"blob": view}, "list": [view[:3]]}):
        expected = bson.encode({"blob": blob, "n": 1} if "n" in doc
                               else {"inner": {"blob": blob}, "list": [blob[:3]]})  # fmt: skip
        sent = _wire.encode_for_send(doc)  # the Twisted client's
        joined = sent if type(sent) is bytes else b"".join(bytes(p) for p in sent[0])
        assert joined == expected
        assert _wire.encode_large(doc) == expected  # skynet.sync's
