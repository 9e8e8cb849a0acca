"""
Structured JSON logs and their search, on files in a temporary directory:
the context fields, rotation, the cursor (nothing missed, nothing twice),
filters, and the clear errors.
"""

from __future__ import annotations

import os
import tempfile
import time

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import Logger, LogPublisher
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase

from skynet.observe.histogram import MethodStats
from skynet.observe.logs import InstanceLog, add_instance_log, json_log_name
from skynet.observe.logsearch import (
    LogQuery,
    LogSearch,
    SearchError,
    decode_cursor,
    format_event,
    parse_duration,
    parse_since,
)
from skynet.protocol import RequestInfo


class FakeInstance:
    host = "127.0.0.9"


class FakeHost:
    service_name = "Svc"
    version = "2.1"
    uuid = "1111-aaaa"
    instance = FakeInstance()


class Writer:
    """
    An instance log on its own publisher, and a logger that writes to it.
    """

    def __init__(self, directory: str, host: object = None, max_bytes: int = 10**7,
                 keep: int = 5) -> None:  # fmt: skip
        self.host = host or FakeHost()
        self.publisher = LogPublisher()
        self.path = os.path.join(directory, json_log_name(self.host.service_name, self.host.uuid))
        self.log_file = InstanceLog(self.host, self.path, max_bytes, keep)
        self.log_file.start(self.publisher)
        self.log = Logger(namespace="test", observer=self.publisher)

    def stop(self) -> None:
        self.log_file.stop(self.publisher)


class LogTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="skynet-logs-")
        self.writer = Writer(self.dir)
        self.addCleanup(self.writer.stop)
        self.search = LogSearch(self.dir)

    def test_context_fields_and_request_id_inside_a_method(self) -> None:
        log = self.writer.log
        log.info("outside {n}", n=1)
        waiting: Deferred = Deferred()

        async def method(info, params):
            log.warn("inside before {n}", n=2)
            await waiting
            log.error("inside after {n}", n=3)
            return {}

        wrapped = MethodStats(Clock().seconds).instrument({"M": method}, "Svc", "1111-aaaa")["M"]
        d = wrapped(RequestInfo("rid-42"), {})
        log.info("between")  # another event while the method waits: not its request
        waiting.callback(None)
        self.successResultOf(d)
        answer = self.search.search(LogQuery())
        texts = [(e["text"], e["request_id"]) for e in answer["events"]]
        self.assertEqual(
            texts,
            [("outside 1", ""), ("inside before 2", "rid-42"), ("between", ""),
             ("inside after 3", "rid-42")],
        )  # fmt: skip
        event = answer["events"][1]
        self.assertEqual((event["service"], event["version"], event["uuid"], event["host"]),
                         ("Svc", "2.1", "1111-aaaa", "127.0.0.9"))  # fmt: skip
        self.assertEqual((event["level"], event["method"]), ("warn", "M"))
        by_id = self.search.search(LogQuery(request_id="rid-42"))["events"]
        self.assertEqual([e["text"] for e in by_id], ["inside before 2", "inside after 3"])

    def test_filters(self) -> None:
        log = self.writer.log
        for i in range(20):
            (log.error if i % 5 == 0 else log.info)("line {i} of {what}", i=i, what="x")
        q = self.search.search
        self.assertEqual(len(q(LogQuery(grep=r"line 1\d of"))["events"]), 10)
        self.assertEqual(len(q(LogQuery(grep="line 1 of"))["events"]), 1)  # a literal
        self.assertEqual([e["text"] for e in q(LogQuery(level="error"))["events"]],
                         ["line 0 of x", "line 5 of x", "line 10 of x", "line 15 of x"])  # fmt: skip
        newest = q(LogQuery(limit=3))
        self.assertEqual([e["text"] for e in newest["events"]],
                         ["line 17 of x", "line 18 of x", "line 19 of x"])  # fmt: skip
        self.assertTrue(newest["more"])
        self.assertEqual(q(LogQuery(service="Other"))["events"], [])
        self.assertEqual(len(q(LogQuery(service="Svc", version="2.1"))["events"]), 20)
        self.assertEqual(q(LogQuery(since=time.time() + 60))["events"], [])
        self.assertEqual(q(LogQuery(until=time.time() - 3600))["events"], [])
        self.assertEqual(len(q(LogQuery(since=time.time() - 60))["events"]), 20)

    def test_text_with_quotes_and_escapes_still_matches(self) -> None:
        self.writer.log.info('said "hi"\tthere \u00e9 {x}', x="\\")
        [event] = self.search.search(LogQuery(grep=r'"hi"\tthere é \\'))["events"]
        self.assertIn('"hi"', event["text"])

    def test_cursor_misses_nothing_and_repeats_nothing_across_rotation(self) -> None:
        writer = Writer(self.dir, host=type("H", (FakeHost,), {"uuid": "2222-bbbb"})(),
                        max_bytes=4096, keep=50)  # fmt: skip
        self.addCleanup(writer.stop)
        search = LogSearch(self.dir)
        seen: list[str] = []
        answer = search.search(LogQuery(uuid="2222-bbbb"))
        cursor = answer["cursor"]
        n = 0
        for _ in range(30):
            for _ in range(7):
                writer.log.info("event number {n} with some padding to rotate", n=n)
                n += 1
            answer = search.search(LogQuery(uuid="2222-bbbb", cursor=cursor, limit=10000))
            seen.extend(e["text"] for e in answer["events"])
            cursor = answer["cursor"]
        rotated = [f for f in os.listdir(self.dir) if ".json." in f]
        self.assertGreater(len(rotated), 3)  # it did rotate, several times
        expected = [f"event number {i} with some padding to rotate" for i in range(n)]
        self.assertEqual(seen, expected)

    def test_follow_with_a_small_limit_pages_on(self) -> None:
        cursor = self.search.search(LogQuery())["cursor"]
        for i in range(25):
            self.writer.log.info("new {i}", i=i)
        seen = []
        for _ in range(5):
            answer = self.search.search(LogQuery(cursor=cursor, limit=10))
            seen.extend(e["text"] for e in answer["events"])
            cursor = answer["cursor"]
        self.assertEqual(seen, [f"new {i}" for i in range(25)])

    def test_partial_last_line_left_for_later(self) -> None:
        self.writer.log.info("whole")
        cursor = self.search.search(LogQuery())["cursor"]
        with open(self.writer.path, "ab") as f:
            f.write(b'\x1e{"log_time": 1, "skynet_text": "half')
        self.assertEqual(self.search.search(LogQuery(cursor=cursor))["events"], [])
        with open(self.writer.path, "ab") as f:
            f.write(b' done", "skynet_level": "info"}\n')
        later = self.search.search(LogQuery(cursor=cursor))["events"]
        self.assertEqual([e["text"] for e in later], ["half done"])

    def test_bad_input_gives_clear_errors(self) -> None:
        with self.assertRaises(SearchError) as e:
            LogQuery.from_bson({"grep": "(unclosed"})
        self.assertIn("bad regular expression '(unclosed'", str(e.exception))
        for params, word in [
            ({"limit": 0}, "limit"),
            ({"level": "loud"}, "unknown level"),
            ({"since": "yesterday"}, "since"),
            ({"service": 3}, "service"),
        ]:
            with self.assertRaises(SearchError) as e:
                LogQuery.from_bson(params)
            self.assertIn(word, str(e.exception))
        with self.assertRaises(SearchError):
            self.search.search(LogQuery(cursor="not a cursor!"))
        self.assertRaises(SearchError, decode_cursor, "e30x")
        with self.assertRaises(SearchError):
            parse_since("next tuesday")

    def test_unreadable_file_is_named_and_the_rest_searched(self) -> None:
        self.writer.log.info("still found")
        os.mkdir(os.path.join(self.dir, "Broken-uuid.json"))  # cannot be read as a file
        answer = self.search.search(LogQuery())
        self.assertEqual([e["text"] for e in answer["events"]], ["still found"])
        [error] = answer["errors"]
        self.assertIn("cannot read", error)
        self.assertIn("Broken-uuid.json", error)

    def test_garbage_lines_are_skipped(self) -> None:
        with open(os.path.join(self.dir, "X-y.json"), "wb") as f:
            f.write(b'not json at all\n\x1e[1, 2]\n\x1e{"log_time": 5, "skynet_text": "ok"}\n')
        answer = self.search.search(LogQuery(service=None))
        self.assertIn("ok", [e["text"] for e in answer["events"]])

    def test_format_event(self) -> None:
        line = format_event({"time": 0.25, "host": "", "service": "Svc", "uuid": "12345678-9",
                             "level": "warn", "text": "a\nb", "request_id": "r1"}, "h1")  # fmt: skip
        self.assertIn(" h1 Svc/12345678 WARN  a\\nb [request r1]", line)

    def test_parse_duration(self) -> None:
        self.assertEqual([parse_duration(v) for v in ("250ms", "30s", "10M", "2h", "1.5d")],
                         [0.25, 30.0, 600.0, 7200.0, 129600.0])  # fmt: skip
        for other in ("", "10", "-5m", "1w", "m", "10 m"):
            self.assertIsNone(parse_duration(other), other)

    def test_parse_since(self) -> None:
        self.assertEqual(parse_since("10m", now=1000.0), 400.0)
        self.assertEqual(parse_since("1500", now=0), 1500.0)
        self.assertEqual(parse_since("1970-01-01T00:00:10Z"), 10.0)


class EnvironmentTests(SynchronousTestCase):
    def test_only_with_a_log_dir_and_good_settings(self) -> None:
        from twisted.application.service import MultiService

        parent = MultiService()
        self.assertIsNone(add_instance_log(parent, FakeHost(), {}))
        directory = tempfile.mkdtemp()
        for env in ({"SKYNET_LOG_DIR": directory, "SKYNET_LOG_MAX_BYTES": "big"},
                    {"SKYNET_LOG_DIR": directory, "SKYNET_LOG_KEEP": "0"}):  # fmt: skip
            self.assertRaises(usage.UsageError, add_instance_log, parent, FakeHost(), env)


class SearchLogsMethodTests(TestCase):
    """
    The daemon's C{SearchLogs}: answers from its thread pool, bad queries
    fail the call with a message that says why.
    """

    async def test_answer_and_errors(self) -> None:
        from twisted.internet import reactor

        from skynet.errors import ServiceError
        from skynet.observe.logsearch import search_logs

        directory = tempfile.mkdtemp(prefix="skynet-logs-")
        writer = Writer(directory)
        self.addCleanup(writer.stop)
        writer.log.info("hello {who}", who="daemon")
        answer = await search_logs(directory, {"grep": "hello"}, reactor)
        self.assertEqual([e["text"] for e in answer["events"]], ["hello daemon"])
        again = await search_logs(directory, {"cursor": answer["cursor"]}, reactor)
        self.assertEqual(again["events"], [])
        for params, message in [({"grep": "(x"}, "bad regular expression"),
                                ({"cursor": "%%%"}, "bad cursor"),
                                ({"limit": "ten"}, "limit")]:  # fmt: skip
            with self.assertRaises(ServiceError) as e:
                search_logs(directory, params, reactor)
            self.assertIn(message, str(e.exception))
        self.assertRaises(ServiceError, search_logs, None, {}, reactor)


class BlockTests(SynchronousTestCase):
    """
    Reading backwards in blocks (and finding needles in whole blocks)
    gives what a line-by-line read gives, whatever the block size.
    """

    def test_block_sizes_agree(self) -> None:
        from skynet.observe import logsearch

        directory = tempfile.mkdtemp(prefix="skynet-logs-")
        writer = Writer(directory)
        self.addCleanup(writer.stop)
        for i in range(300):
            writer.log.info("row {i} says {word}", i=i, word=["alpha", "beta", "gamma"][i % 3])
        queries = [LogQuery(limit=10000), LogQuery(grep="gamma", limit=10000),
                   LogQuery(grep=r"row 1\d+ says be", limit=10000), LogQuery(limit=7),
                   LogQuery(grep=r"says (alpha|beta)$", limit=50)]  # fmt: skip
        search = LogSearch(directory)
        expected = [[e["text"] for e in search.search(q)["events"]] for q in queries]
        self.assertEqual(len(expected[1]), 100)
        self.assertEqual(len(expected[2]), 38)  # rows 10..19 and 100..199 that say beta
        original = logsearch.BLOCK
        self.addCleanup(setattr, logsearch, "BLOCK", original)
        for block in (64, 1000, 4096):
            logsearch.BLOCK = block
            got = [[e["text"] for e in search.search(q)["events"]] for q in queries]
            self.assertEqual(got, expected, block)

    def test_required_literal(self) -> None:
        from skynet.observe.logsearch import required_literal

        self.assertEqual(required_literal(r"timeout after \d+ms"), "timeout after ")
        self.assertEqual(required_literal(r"x\.y\.z"), "x.y.z")
        self.assertIsNone(required_literal("abc|def"))
        self.assertIsNone(required_literal("(?i)hello"))
        self.assertIsNone(required_literal("ab"))
