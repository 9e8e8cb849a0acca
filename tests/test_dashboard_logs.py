"""
The dashboard's logs view, server side: C{GET /api/logs} under L{StubTreq}
on a fake clock, with stand-in daemons that search real JSON log files with
the daemon's own search code (L{skynet.observe.logsearch.LogSearch}).
"""

from __future__ import annotations

import json
import tempfile
import time
from typing import Any
from urllib.parse import urlencode

from treq.testing import StubTreq
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from skynet.errors import ServiceError
from skynet.observe.logsearch import LogQuery, LogSearch, SearchError
from skynet.registry.memory import MemoryRegistry
from skynet.web.app import DashboardApp
from skynet.web.logs import DashboardLogs, decode_cursors, encode_cursors
from skynet.web.model import DashboardModel
from tests.test_observe_logs import Writer
from tests.test_web import TOKEN, make_instance


def stub_get(case: SynchronousTestCase, treq: StubTreq, path: str, authority: str,
             settle: Any = None, **args: str) -> tuple[int, Any]:  # fmt: skip
    """
    GET C{path} of the dashboard behind C{treq}: the status and the body,
    decoded when it is JSON.  C{settle} (if given) runs between flushes, for
    answers that wait on a cluster.
    """
    url = f"http://{authority}{path}" + ("?" + urlencode(args) if args else "")
    d = treq.get(url)
    for _ in range(5 if settle is not None else 1):
        if settle is not None:
            settle()
        treq.flush()
    response = case.successResultOf(d)
    d = treq.content(response)
    treq.flush()
    body = case.successResultOf(d)
    return response.code, json.loads(body) if body.startswith(b"{") else body


class Host:
    """
    What L{Writer} needs of a service host.
    """

    def __init__(self, service: str, uuid: str, address: str) -> None:
        self.service_name = service
        self.version = "1"
        self.uuid = uuid
        self.instance = type("I", (), {"host": address})()


class FakeSearchingDaemons:
    """
    The C{ask} of L{DashboardLogs}: each daemon (by uuid) searches its own
    directory with the daemon's search, as C{SearchLogs} does; a daemon in
    C{down} fails as an unreachable one does.
    """

    def __init__(self) -> None:
        self.dirs: dict[str, str] = {}
        self.down: set[str] = set()
        self.asked: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, daemon: Any, params: dict[str, Any]) -> Deferred:
        self.asked.append((daemon.uuid, dict(params)))
        if daemon.uuid in self.down:
            return fail(ConnectionRefusedError("connection refused"))
        try:
            return succeed(LogSearch(self.dirs[daemon.uuid]).search(LogQuery.from_bson(params)))
        except SearchError as e:
            return fail(ServiceError(str(e)))


class DashboardLogsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        # A day ahead of the real clock, which stamps the events written.
        self.clock.advance(time.time() + 86400)
        self.services = MemoryRegistry(reactor=self.clock)
        self.registry = MemoryRegistry(reactor=self.clock, store=self.services.store)
        self.model = DashboardModel(self.registry, reactor=self.clock, stats_interval=0.1,
                                    push_interval=0.05)  # fmt: skip
        self.model.startService()
        self.addCleanup(self.model.stopService)
        self.daemons = FakeSearchingDaemons()
        logs = DashboardLogs(self.model, self.clock, ask=self.daemons)
        app = DashboardApp(self.model, token=TOKEN, allowed_hosts=["dashboard.test"], logs=logs)
        self.treq = StubTreq(app.resource())
        # Two hosts, each with its daemon and one service writing its log.
        self.writers = {}
        for n, (host, region) in enumerate((("127.0.0.1", "north"), ("127.0.0.2", "south"))):
            daemon = make_instance(100 + n, name="SkynetDaemon", host=host, region=region,
                                   uuid=f"daemon-{n}")  # fmt: skip
            self.services.add(daemon)
            self.services.add(make_instance(n, name=f"Svc{n}", host=host, region=region))
            self.daemons.dirs[daemon.uuid] = tempfile.mkdtemp(prefix="skynet-dashlogs-")
            writer = Writer(self.daemons.dirs[daemon.uuid], Host(f"Svc{n}", f"uuid-{n}", host))
            self.addCleanup(writer.stop)
            self.writers[n] = writer
        self.clock.advance(0.3)

    def get(self, path: str, authority: str = "dashboard.test", **args: str) -> tuple[int, Any]:
        return stub_get(self, self.treq, path, authority, **args)

    def test_search_across_hosts_merged_by_time(self) -> None:
        self.writers[0].log.info("order {n} reserved", n=1)
        self.writers[1].log.warn("order {n} late", n=2)
        self.writers[0].log.info("cache warm")
        code, body = self.get("/api/logs", grep=r"order \d")
        self.assertEqual(code, 200, body)
        self.assertEqual([(e["text"], e["daemon_host"], e["service"]) for e in body["events"]],
                         [("order 1 reserved", "127.0.0.1", "Svc0"),
                          ("order 2 late", "127.0.0.2", "Svc1")])  # fmt: skip
        self.assertEqual(body["errors"], [])

    def test_filters_choose_daemons_and_events(self) -> None:
        self.writers[0].log.info("north line")
        self.writers[0].log.error("north trouble")
        self.writers[1].log.info("south line")
        _, body = self.get("/api/logs", region="south")
        self.assertEqual([e["text"] for e in body["events"]], ["south line"])
        self.assertEqual({u for u, _ in self.daemons.asked}, {"daemon-1"})
        _, body = self.get("/api/logs", host="127.0.0.1", level="error")
        self.assertEqual([e["text"] for e in body["events"]], ["north trouble"])
        _, body = self.get("/api/logs", uuid="uuid-1")
        self.assertEqual([e["text"] for e in body["events"]], ["south line"])
        _, body = self.get("/api/logs", service="Svc0", limit="1")
        self.assertEqual([e["text"] for e in body["events"]], ["north trouble"])

    def test_since_is_a_time_window(self) -> None:
        # The window is counted from the dashboard's clock, a day ahead.
        self.writers[0].log.info("long ago")
        _, body = self.get("/api/logs", since="10m")
        self.assertEqual(body["events"], [])
        _, body = self.get("/api/logs", since="100000d")
        self.assertEqual([e["text"] for e in body["events"]], ["long ago"])

    def test_follow_with_the_cursor_misses_nothing_and_repeats_nothing(self) -> None:
        self.writers[0].log.info("before {n}", n=0)
        _, first = self.get("/api/logs", grep="before|after")
        self.assertEqual([e["text"] for e in first["events"]], ["before 0"])
        self.writers[0].log.info("after {n}", n=1)
        self.writers[1].log.info("after {n}", n=2)
        self.writers[1].log.info("not matching")
        _, second = self.get("/api/logs", grep="before|after", cursor=first["cursor"])
        self.assertEqual([e["text"] for e in second["events"]], ["after 1", "after 2"])
        _, third = self.get("/api/logs", grep="before|after", cursor=second["cursor"])
        self.assertEqual(third["events"], [])
        self.assertEqual(set(decode_cursors(third["cursor"])), {"daemon-0", "daemon-1"})

    def test_markup_in_a_log_line_comes_back_as_plain_json_text(self) -> None:
        line = "<img src=x onerror=\"document.title='owned'\">"
        self.writers[0].log.info("evil {line}", line=line)
        code, body = self.get("/api/logs", grep="evil")
        self.assertEqual(code, 200)
        self.assertEqual(body["events"][0]["text"], "evil " + line)

    def test_bad_input_is_a_clear_400(self) -> None:
        for args, said in (
            ({"grep": "("}, "regular expression"),
            ({"level": "loud"}, "level"),
            ({"since": "yesterday-ish"}, "cannot read the time"),
            ({"limit": "many"}, "limit"),
            ({"limit": "5000"}, "at most 1000"),
            ({"cursor": "!!not-base64"}, "cursor"),
            ({"cursor": encode_cursors({"daemon-0": None})[:-4] + "AAAA"}, "cursor"),
        ):
            code, body = self.get("/api/logs", **args)
            self.assertEqual(code, 400, args)
            self.assertFalse(body["ok"])
            self.assertIn(said, body["error"].lower(), args)
        self.assertEqual(self.daemons.asked, [])

    def test_an_unreachable_daemon_is_said_and_the_others_answer(self) -> None:
        self.writers[0].log.info("from north")
        self.writers[1].log.info("from south")
        self.daemons.down.add("daemon-1")
        code, body = self.get("/api/logs")
        self.assertEqual(code, 200)
        self.assertEqual([e["text"] for e in body["events"]], ["from north"])
        self.assertEqual(len(body["errors"]), 1)
        self.assertIn("host 127.0.0.2", body["errors"][0])
        self.assertIn("connection refused", body["errors"][0])
        # Its cursor stays empty, so when it is back its newest lines come.
        self.daemons.down.clear()
        _, body = self.get("/api/logs", cursor=body["cursor"])
        self.assertEqual([e["text"] for e in body["events"]], ["from south"])

    def test_no_daemon_on_the_chosen_hosts(self) -> None:
        code, body = self.get("/api/logs", host="10.9.9.9")
        self.assertEqual(code, 200)
        self.assertEqual(body["events"], [])
        self.assertIn("no SkynetDaemon", body["errors"][0])

    def test_foreign_host_header_is_refused(self) -> None:
        self.writers[0].log.info("secret-ish line")
        code, body = self.get("/api/logs", authority="evil.example")
        self.assertNotEqual(code, 200)
        self.assertNotIn(
            b"secret-ish", body if isinstance(body, bytes) else json.dumps(body).encode()
        )
        self.assertEqual(self.daemons.asked, [])

    def test_real_search_logs_errors_are_said(self) -> None:
        # A daemon that refuses the question (as SearchLogs does for a daemon
        # without a log directory) is reported, not fatal.
        def refuse(daemon: Any, params: dict[str, Any]) -> Deferred:
            return fail(ServiceError("this daemon keeps no log directory"))

        logs = DashboardLogs(self.model, self.clock, ask=refuse)
        answer = self.successResultOf(Deferred.fromCoroutine(logs.search({})))
        self.assertEqual(len(answer["errors"]), 2)
        self.assertTrue(all("no log directory" in e for e in answer["errors"]))

    def test_a_daemon_answering_garbage_is_said_and_the_others_answer(self) -> None:
        self.writers[1].log.info("from south")

        def ask(daemon: Any, params: dict[str, Any]) -> Deferred:
            if daemon.uuid == "daemon-0":
                return succeed(["not", "an", "answer"])
            return self.daemons(daemon, params)

        logs = DashboardLogs(self.model, self.clock, ask=ask)
        answer = self.successResultOf(Deferred.fromCoroutine(logs.search({})))
        self.assertEqual([e["text"] for e in answer["events"]], ["from south"])
        self.assertEqual(len(answer["errors"]), 1)
        self.assertIn("host 127.0.0.1: bad answer to SearchLogs", answer["errors"][0])

        def broken(daemon: Any, params: dict[str, Any]) -> Deferred:
            raise RuntimeError("the call itself broke")

        logs = DashboardLogs(self.model, self.clock, ask=broken)
        answer = self.successResultOf(Deferred.fromCoroutine(logs.search({})))
        self.assertEqual(answer["events"], [])
        self.assertTrue(all("the call itself broke" in e for e in answer["errors"]))
