"""
The ordered services of L{skynet._services}, on a fake clock.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from skynet._services import RetryingStart, SequentialMultiService, StartAfter


class Recorder(Service):
    """
    Records its start and stop in a shared journal; its stop fires when the
    test says.
    """

    def __init__(self, name: str, journal: list[str]) -> None:
        self.setName(name)
        self.journal = journal
        self.stopping: Deferred | None = None

    def startService(self) -> None:
        super().startService()
        self.journal.append(f"start {self.name}")

    def stopService(self) -> Deferred:  # type: ignore[override]
        super().stopService()
        self.journal.append(f"stop {self.name}")
        self.stopping = Deferred()
        self.stopping.addCallback(lambda _: self.journal.append(f"stopped {self.name}"))
        return self.stopping


class SequentialMultiServiceTests(SynchronousTestCase):
    def test_start_in_order_stop_in_reverse_each_awaited(self) -> None:
        journal: list[str] = []
        parent = SequentialMultiService()
        a, b, c = (Recorder(n, journal) for n in "abc")
        for child in (a, b, c):
            child.setServiceParent(parent)
        self.assertIsNone(parent.startService())
        self.assertEqual(journal, ["start a", "start b", "start c"])
        del journal[:]
        stopped = parent.stopService()
        self.assertEqual(journal, ["stop c"])  # b waits for c
        c.stopping.callback(None)
        self.assertEqual(journal, ["stop c", "stopped c", "stop b"])
        self.assertNoResult(stopped)
        b.stopping.callback(None)
        a.stopping.callback(None)
        self.successResultOf(stopped)
        self.assertEqual(journal[-2:], ["stop a", "stopped a"])
        self.assertIs(parent.stopService(), stopped)  # once

    def test_a_failing_stop_is_logged_and_the_rest_stop(self) -> None:
        journal: list[str] = []
        parent = SequentialMultiService()
        a, b = Recorder("a", journal), Recorder("b", journal)
        a.setServiceParent(parent)
        b.setServiceParent(parent)
        parent.startService()
        stopped = parent.stopService()
        b.stopping.errback(RuntimeError("stuck"))
        a.stopping.callback(None)
        self.successResultOf(stopped)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertIn("stopped a", journal)


class RetryingStartTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.attempts: list[float] = []
        self.stops = 0
        self.outcomes: list[Any] = []

    def start(self) -> Deferred:
        self.attempts.append(self.clock.seconds())
        outcome = self.outcomes.pop(0) if self.outcomes else None
        if isinstance(outcome, Exception):
            return fail(outcome)
        if isinstance(outcome, Deferred):
            return outcome
        return succeed(None)

    def stop(self) -> None:
        self.stops += 1

    def make(self, **kw: Any) -> RetryingStart:
        return RetryingStart(self.start, self.stop, what="start the registry", reactor=self.clock,
                             **kw)  # fmt: skip

    def test_retries_with_backoff_until_it_succeeds(self) -> None:
        self.outcomes = [ConnectionError("down")] * 4
        service = self.make()
        started = service.when_started()
        with capturedLogs() as events:
            self.assertIsNone(service.startService())
            self.clock.pump([0.5, 1.0, 2.0, 4.0])
        self.assertEqual(self.attempts, [0.0, 0.5, 1.5, 3.5, 7.5])
        self.successResultOf(started)
        self.assertTrue(service.started)
        warnings = [e for e in events if e.get("what") == "start the registry"]
        self.assertEqual([e["delay"] for e in warnings], [0.5, 1.0, 2.0, 4.0])
        self.assertEqual(warnings[0]["error"], "down")
        self.assertEqual(self.flushLoggedErrors(), [])  # a warning, not a failure
        self.successResultOf(service.when_started())
        self.successResultOf(service.stopService())
        self.assertEqual(self.stops, 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_the_delay_is_capped(self) -> None:
        self.outcomes = [ConnectionError("down")] * 8
        service = self.make()
        service.startService()
        self.clock.pump([0.5, 1, 2, 4, 8, 10, 10])
        self.assertEqual(self.attempts[-1] - self.attempts[-2], 10.0)

    def test_stop_cancels_the_retry(self) -> None:
        self.outcomes = [ConnectionError("down")]
        service = self.make()
        waiting = service.when_started()
        service.startService()
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.successResultOf(service.stopService())
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.failureResultOf(waiting, CancelledError)
        self.clock.advance(100)
        self.assertEqual(self.attempts, [0.0])
        self.assertEqual(self.stops, 0)  # never started, nothing to undo

    def test_stop_waits_for_an_attempt_in_flight(self) -> None:
        pending: Deferred = Deferred()
        self.outcomes = [pending]
        service = self.make()
        service.startService()
        stopped = service.stopService()
        self.assertNoResult(stopped)
        pending.callback(None)  # it started after all: undone
        self.successResultOf(stopped)
        self.assertEqual(self.stops, 1)

    def test_a_failing_undo_is_a_warning(self) -> None:
        """
        The registry gone at stop is an outage, not a bug: a warning.
        """
        service = RetryingStart(lambda: None, lambda: fail(ConnectionError("gone")),
                                what="start the registry", reactor=self.clock)  # fmt: skip
        service.startService()
        with capturedLogs() as events:
            self.successResultOf(service.stopService())
        self.assertEqual([str(e["error"]) for e in events if "error" in e], ["gone"])
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_injected_policy(self) -> None:
        self.outcomes = [ConnectionError("down")] * 2
        service = self.make(policy=lambda n: 3.0)
        service.startService()
        self.clock.pump([3.0, 3.0])
        self.assertEqual(self.attempts, [0.0, 3.0, 6.0])


class StartAfterTests(SynchronousTestCase):
    def test_starts_once_the_gate_has(self) -> None:
        clock = Clock()
        gate_open: Deferred = Deferred()
        gate = RetryingStart(lambda: gate_open, reactor=clock)
        journal: list[str] = []
        inner = Recorder("host", journal)
        after = StartAfter(gate, inner)
        gate.startService()
        after.startService()
        self.assertEqual(journal, [])
        gate_open.callback(None)
        self.assertEqual(journal, ["start host"])
        stopped = after.stopService()
        inner.stopping.callback(None)
        self.successResultOf(stopped)

    def test_never_starts_if_stopped_first(self) -> None:
        clock = Clock()
        gate = RetryingStart(lambda: fail(ConnectionError("down")), reactor=clock)
        journal: list[str] = []
        after = StartAfter(gate, Recorder("host", journal))
        gate.startService()
        after.startService()
        self.successResultOf(after.stopService())
        self.successResultOf(gate.stopService())
        self.assertEqual(journal, [])
