"""
OTLP export from real processes: two C{twistd skynet-service} Fibonacci
instances started with C{--otlp-endpoint}, and a collector in this process
(a Twisted web server on 127.0.0.1, port 0) that keeps what it is POSTed.
A traced call of C{Index 5} arrives as one trace whose spans form the call
tree; with the collector down, calls still succeed, the service warns, and
the queued spans go out once the collector is up.
"""

from __future__ import annotations

import glob
import json
import os
import socket
import tempfile
from typing import Any

import pytest
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.protocols.policies import WrappingFactory
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from skynet.client import Client
from skynet.observe import otlp, tracing
from skynet.protocol import RequestInfo, new_request_id
from skynet.registry import Query
from skynet.registry.files import FileRegistry
from tests.processes import ServiceProcess, served_calls, sleep, wait_for

pytestmark = pytest.mark.slow


class Collector(Resource):
    """
    An OTLP/HTTP collector that keeps every POST.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.posts: list[dict[str, Any]] = []

    def render_POST(self, request: Any) -> bytes:
        self.posts.append(
            {
                "path": request.path,
                "content_type": request.getHeader("content-type"),
                "doc": json.loads(request.content.read()),
            }
        )
        request.setHeader("content-type", "application/json")
        return b"{}"

    def spans(self, trace: str) -> list[dict[str, Any]]:
        """
        The spans of one trace, each with its resource's attributes as
        C{"resource"}.
        """
        out = []
        for post in self.posts:
            for resource_spans in post["doc"]["resourceSpans"]:
                resource = _attributes(resource_spans["resource"])
                for scope in resource_spans["scopeSpans"]:
                    for span in scope["spans"]:
                        if span["traceId"] == trace:
                            out.append({**span, "resource": resource})
        return out


def _attributes(thing: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for a in thing.get("attributes", []):
        (value,) = a["value"].values()
        out[a["key"]] = value
    return out


class OTLPExportTests(TestCase):
    timeout = 240

    def setUp(self) -> None:
        self.home = tempfile.mkdtemp(prefix="skynet-home-")
        self.root = tempfile.mkdtemp(prefix="skynet-registry-")

    def collect(self, port: int = 0) -> tuple[Collector, str]:
        collector = Collector()
        factory = WrappingFactory(Site(collector))
        listening = reactor.listenTCP(port, factory, interface="127.0.0.1")

        async def close() -> None:
            for protocol in list(factory.protocols):
                protocol.transport.abortConnection()
            await listening.stopListening()
            await sleep(0.1)  # the aborted connections' connectionLost

        self.addCleanup(lambda: Deferred.fromCoroutine(close()))
        return collector, f"http://127.0.0.1:{listening.getHost().port}"

    def fibonacci(self, *args: str, env: dict[str, str] | None = None) -> ServiceProcess:
        process = ServiceProcess(
            "examples.fibonacci:Fibonacci", f"file://{self.root}", *args,
            env={"SKYNET_HOME": self.home, **(env or {})},
        ).start()  # fmt: skip
        self.addCleanup(process.stop)
        return process

    async def registry(self, count: int) -> FileRegistry:
        registry = FileRegistry(self.root, reactor=reactor)
        await registry.start()
        self.addCleanup(registry.stop)

        async def registered():
            found = await registry.query(Query(service="Fibonacci"))
            return len([i for i in found if i.registered]) == count

        await wait_for(registered, timeout=60, what=f"{count} Fibonacci instance(s) registered")
        return registry

    async def call_index_5(self, registry: FileRegistry) -> tuple[Client, str]:
        """
        Call C{Fibonacci.Index 5} with a new request id from a client of this
        process; the client and the request id.
        """
        client = Client(registry=registry, reactor=reactor)
        self.addCleanup(client.stop)
        request_id = new_request_id()
        result = await client.service("Fibonacci").call(
            "Index", {"index": 5}, RequestInfo(request_id)
        )
        self.assertEqual(result["value"], 5)
        return client, request_id

    async def test_traced_call_arrives_as_one_tree(self) -> None:
        self.assertTrue(tracing.ENABLED, "span recording is off in the test process")
        collector, url = self.collect()
        for _ in range(2):
            self.fibonacci("--otlp-endpoint", url)
        registry = await self.registry(2)
        instances = await registry.query(Query(service="Fibonacci"))

        # This process exports its own client span: the root of the trace.
        exporter = otlp.OTLPExporter(url, otlp.Resource("otlp-test", "1", "test-process"),
                                     reactor=reactor, interval=0.2)  # fmt: skip
        exporter.startService()
        self.addCleanup(exporter.stopService)
        client, request_id = await self.call_index_5(registry)

        # Independently: the calls of Index the instances served.
        calls = await served_calls(registry, instances, "Index")
        self.assertGreater(calls, 2)
        trace = otlp.trace_id(request_id)

        def arrived():
            spans = collector.spans(trace)
            kinds = [s["kind"] for s in spans]
            return spans if (kinds.count(2), kinds.count(3)) == (calls, calls) else None

        spans = await wait_for(arrived, timeout=60, interval=0.2, what=f"{2 * calls} spans")
        for post in collector.posts:
            self.assertEqual((post["path"], post["content_type"]),
                             (b"/v1/traces", "application/json"))  # fmt: skip

        ids = {s["spanId"]: s for s in spans}
        self.assertEqual(len(ids), len(spans), "span ids are unique")
        roots = [s for s in spans if "parentSpanId" not in s]
        self.assertEqual(len(roots), 1, roots)
        [root] = roots
        self.assertEqual((root["kind"], root["name"], root["resource"]["service.name"]),
                         (3, "Fibonacci.Index", "otlp-test"))  # fmt: skip
        uuids = {i.uuid for i in instances}
        for span in spans:
            self.assertEqual(span["name"], "Fibonacci.Index")
            self.assertEqual(span["status"], {"code": 1})
            self.assertEqual(_attributes(span)["skynet.request_id"], request_id)
            if span is root:
                continue
            parent = ids[span["parentSpanId"]]  # in the set
            self.assertEqual(span["resource"]["service.name"], "Fibonacci")
            self.assertIn(span["resource"]["service.instance.id"], uuids)
            self.assertTrue(span["resource"]["host.name"])
            if span["kind"] == 2:
                # A server span's parent is the client span that sent it,
                # in this process or an instance.
                self.assertEqual(parent["kind"], 3)
                self.assertLessEqual(int(parent["startTimeUnixNano"]),
                                     int(span["startTimeUnixNano"]))  # fmt: skip
            else:
                # A client span's parent is the server span it was made in,
                # in the same instance.
                self.assertEqual(parent["kind"], 2)
                self.assertEqual(parent["resource"], span["resource"])
        # Each server span is the only child of its client span (one attempt each).
        parents = [s["parentSpanId"] for s in spans if s["kind"] == 2]
        self.assertEqual(len(set(parents)), len(parents))

    async def test_collector_down_calls_succeed_and_the_service_warns(self) -> None:
        with socket.socket() as s:  # a port nobody listens on (until we do)
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        url = f"http://127.0.0.1:{port}"
        log_dir = tempfile.mkdtemp(prefix="skynet-logs-")
        process = self.fibonacci("--otlp-endpoint", url, env={"SKYNET_LOG_DIR": log_dir})
        registry = await self.registry(1)
        client, request_id = await self.call_index_5(registry)

        def events() -> list[dict[str, Any]]:
            out = []
            for path in glob.glob(os.path.join(log_dir, "*.json")):
                with open(path) as f:
                    for line in f:
                        try:
                            out.append(json.loads(line.strip().lstrip("\x1e")))
                        except ValueError:
                            pass
            return out

        def warned():
            return [e for e in events() if e.get("log_namespace", "").startswith("skynet.observe.otlp")
                    and e.get("skynet_level") == "warn"]  # fmt: skip

        [warning] = await wait_for(warned, timeout=30, what="the export warning")
        self.assertEqual(warning["endpoint"], f"{url}/v1/traces")
        self.assertIn("refused", warning["error"].lower(), warning)
        # More calls while it is down: still answered, and no new warning.
        for index in (7, 8):
            self.assertEqual(
                (await client.service("Fibonacci").call("Index", {"index": index}))["index"],
                index,
            )
        await sleep(3)
        self.assertEqual(len(warned()), 1, warned())
        self.assertIsNone(process.popen.poll())

        # The collector comes up: the queued spans of the first call go out.
        collector, _ = self.collect(port)
        trace = otlp.trace_id(request_id)
        spans = await wait_for(lambda: collector.spans(trace), timeout=60, interval=0.25,
                               what="the queued spans")  # fmt: skip
        self.assertTrue(all(s["name"] == "Fibonacci.Index" for s in spans))

        def recovered():
            return [e for e in events() if e.get("log_namespace", "").startswith("skynet.observe.otlp")
                    and "works again" in e.get("log_format", "")]  # fmt: skip

        [back] = await wait_for(recovered, timeout=10, what="the recovery event")
        self.assertGreaterEqual(back["failures"], 1)
