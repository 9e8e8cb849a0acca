"""
L{skynet.procmon}: the supervisor, on a fake process reactor and a fake
clock (real processes are in C{tests/test_daemon.py}).
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import sys
import tempfile
from typing import Any

import pytest
from twisted.application.service import IService
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.interfaces import IProcessTransport, IReactorProcess
from twisted.internet.task import Clock, deferLater
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from skynet import procmon
from skynet.procmon import CLEANUP_TIMEOUT, EventLog, ExitRecord, IChildObserver, Supervisor
from tests.processes import ROOT

_SIGNALS = {"TERM": signal.SIGTERM, "KILL": signal.SIGKILL, "INT": signal.SIGINT}


@implementer(IProcessTransport)
class FakeProcess:
    """
    A child process that does what the test says: exit, write output,
    obey or ignore signals.
    """

    def __init__(self, reactor: "FakeProcessReactor", protocol: Any, pid: int, args: list[str],
                 env: dict, path: str | None, child_fds: dict | None) -> None:  # fmt: skip
        self.reactor = reactor
        self.proto = protocol
        self.pid = pid
        self.args = list(args)
        self.env = env
        self.path = path
        self.child_fds = child_fds
        self.uid: int | None = None
        self.gid: int | None = None
        self.signals: list[str] = []
        self.obey_term = True
        self.ended = False
        self.started_at = reactor.seconds()

    def signalProcess(self, name: str) -> None:
        if self.ended:
            raise ProcessExitedAlready()
        self.signals.append(name)
        if name == "KILL" or (name == "TERM" and self.obey_term):
            self.exit(signal=_SIGNALS[name])

    def exit(self, code: int | None = 0, signal: int | None = None) -> None:
        assert not self.ended, "exited twice"
        self.ended = True
        if signal is None and code == 0:
            reason = Failure(ProcessDone(0))
        else:
            reason = Failure(ProcessTerminated(exitCode=None if signal else code, signal=signal))
        self.proto.processEnded(reason)

    def output(self, fd: int, data: bytes) -> None:
        self.proto.childDataReceived(fd, data)

    # The rest of IProcessTransport, unused.
    def closeStdin(self) -> None: ...
    def closeStdout(self) -> None: ...
    def closeStderr(self) -> None: ...
    def closeChildFD(self, descriptor: int) -> None: ...
    def writeToChild(self, childFD: int, data: bytes) -> None: ...
    def loseConnection(self) -> None: ...
    def write(self, data: bytes) -> None: ...
    def writeSequence(self, data: list[bytes]) -> None: ...
    def getPeer(self) -> Any: ...
    def getHost(self) -> Any: ...


@implementer(IReactorProcess)
class FakeProcessReactor(Clock):
    """
    A L{Clock} that also "spawns" L{FakeProcess}es.

    @ivar on_spawn: called with each new process, if set.
    """

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[FakeProcess] = []
        self.next_pid = 1000
        self.fail_spawn = False
        self.on_spawn: Any = None

    def spawnProcess(self, processProtocol, executable, args=(), env=None, path=None, uid=None,
                     gid=None, usePTY=False, childFDs=None) -> FakeProcess:  # fmt: skip
        if self.fail_spawn:
            raise OSError(2, "No such file or directory", executable)
        self.next_pid += 1
        process = FakeProcess(self, processProtocol, self.next_pid, list(args), env, path,
                              childFDs)  # fmt: skip
        process.uid, process.gid = uid, gid
        processProtocol.makeConnection(process)
        self.spawned.append(process)
        if self.on_spawn is not None:
            self.on_spawn(process)
        return process

    def running(self) -> list[FakeProcess]:
        return [p for p in self.spawned if not p.ended]

    def last(self) -> FakeProcess:
        return self.spawned[-1]


@implementer(IChildObserver)
class RecordingObserver:
    def __init__(self) -> None:
        self.started: list[tuple[str, int]] = []
        self.exited: list[tuple[str, ExitRecord]] = []
        self.cleanup: Deferred | None = None

    def child_started(self, name: str, pid: int) -> None:
        self.started.append((name, pid))

    def child_exited(self, name: str, record: ExitRecord) -> Any:
        self.exited.append((name, record))
        return self.cleanup


def make_supervisor(**kwargs: Any) -> tuple[Supervisor, FakeProcessReactor]:
    reactor = FakeProcessReactor()
    kwargs.setdefault("stable_after", 10.0)
    kwargs.setdefault("max_restart_delay", 8.0)
    kwargs.setdefault("own_session", False)
    supervisor = Supervisor(reactor, **kwargs)
    return supervisor, reactor


def kinds(supervisor: Supervisor, kind: str | None = None) -> list[str]:
    return [e.kind for e in supervisor.events.recent(kind=kind)]


class SupervisorTests(SynchronousTestCase):
    def test_is_a_service(self) -> None:
        supervisor, _ = make_supervisor()
        verifyObject(IService, supervisor)
        verifyObject(IChildObserver, RecordingObserver())

    def test_kill_child_skips_the_polite_stop_and_restarts_with_back_off(self) -> None:
        """
        A hung child: SIGTERM with SIGCONT (no polite request), SIGKILL
        after the kill time, then a restart as after any death.
        """
        asked: list[str] = []
        supervisor, reactor = make_supervisor(kill_time=2.0,
                                              polite_stop=lambda n: asked.append(n))  # fmt: skip
        supervisor.startService()
        supervisor.add_child("a", ["/bin/a"])
        first = reactor.last()
        first.obey_term = False  # (SIGSTOP'd)
        reactor.advance(3.0)
        d = supervisor.kill_child("a")
        self.assertEqual((first.signals, asked), (["TERM", "CONT"], []))
        supervisor.kill_child("a")  # again: nothing more
        self.assertEqual(first.signals, ["TERM", "CONT"])
        reactor.advance(2.0)
        self.assertEqual(first.signals, ["TERM", "CONT", "KILL"])
        self.assertEqual(self.successResultOf(d).signal, 9)
        # Up 5 s, under stable_after: the usual back-off of 1 s.
        self.assertEqual(supervisor.children["a"].next_restart, reactor.seconds() + 1.0)
        reactor.advance(1.0)
        self.assertIsNot(reactor.last(), first)
        self.assertEqual(supervisor.children["a"].restarts, 1)
        self.assertEqual(kinds(supervisor), ["started", "terminating", "killing", "exited",
                                             "restart_scheduled", "started"])  # fmt: skip

    def test_last_lines_of_output_are_kept_per_process(self) -> None:
        supervisor, reactor = make_supervisor()
        supervisor.startService()
        supervisor.add_child("a", ["/bin/a"])
        first = reactor.last()
        for i in range(30):
            first.output(1 + i % 2, f"line {i}\n".encode())
        first.output(2, b"ImportError: no module")  # no newline: flushed at the end
        child = supervisor.children["a"]
        self.assertEqual(list(child.output)[-1], "line 29")
        self.assertEqual(len(child.output), procmon.TAIL_LINES)
        first.exit(1)
        self.assertEqual(child.last_output[-2:], ("line 29", "ImportError: no module"))
        self.assertEqual(len(child.last_output), procmon.TAIL_LINES)
        reactor.advance(1.0)  # the next process starts with none
        self.assertEqual(list(child.output), [])
        self.assertEqual(child.last_output[-1], "ImportError: no module")

    def test_uid_and_gid_are_honoured(self) -> None:
        supervisor, reactor = make_supervisor()
        supervisor.startService()
        supervisor.add_child("a", ["/bin/a"], uid=os.geteuid(), gid=os.getegid())
        supervisor.add_child("b", ["/bin/b"])
        a, b = reactor.spawned
        self.assertEqual((a.uid, a.gid), (os.geteuid(), os.getegid()))
        self.assertEqual((b.uid, b.gid), (None, None))

    def test_uid_and_gid_refused_when_they_cannot_be(self) -> None:
        """
        Not root: another user or group is refused at once, with why, and
        nothing is added or spawned.
        """
        supervisor, reactor = make_supervisor()
        supervisor.startService()
        self.patch(procmon.os, "geteuid", lambda: 1000)
        self.patch(procmon.os, "getegid", lambda: 1000)
        supervisor.add_child("mine", ["/bin/a"], uid=1000, gid=1000)
        for ids in ({"uid": 0}, {"gid": 5}):
            with self.assertRaises(ValueError) as e:
                supervisor.add_child("other", ["/bin/a"], **ids)
            self.assertIn("only a supervisor running as root", str(e.exception))
        self.assertEqual(list(supervisor.children), ["mine"])
        self.assertEqual(len(reactor.spawned), 1)

    def test_environment_is_never_empty(self) -> None:
        """
        Without an explicit environment a child gets this process's (not
        ProcessMonitor's empty one); with one, exactly that.
        """
        supervisor, reactor = make_supervisor()
        supervisor.startService()
        supervisor.add_child("a", ["/bin/a"])
        supervisor.add_child("b", ["/bin/b"], env={"ONLY": "this"}, cwd="/tmp")
        a, b = reactor.spawned
        self.assertEqual(a.env, dict(os.environ))
        self.assertIn("PATH", a.env)
        self.assertEqual(b.env, {"ONLY": "this"})
        self.assertEqual(b.path, "/tmp")

    def test_stdin_is_a_pipe_kept_open(self) -> None:
        supervisor, reactor = make_supervisor()
        supervisor.startService()
        supervisor.add_child("a", ["/bin/a"])
        self.assertEqual(reactor.last().child_fds, {0: "w", 1: "r", 2: "r"})

    def test_own_session(self) -> None:
        """
        By default a child runs through C{setsid} (same pid, a session of its
        own: a terminal's Ctrl-C reaches only the supervisor).
        """
        supervisor, reactor = make_supervisor(own_session=True)
        supervisor.startService()
        supervisor.add_child("a", ["/bin/a", "x"])
        setsid = shutil.which("setsid")
        if setsid is None:
            self.assertEqual(reactor.last().args, ["/bin/a", "x"])
        else:
            self.assertEqual(reactor.last().args, [setsid, "/bin/a", "x"])
        self.assertEqual(supervisor.status("a")["args"], ["/bin/a", "x"])

    def test_start_is_recorded(self) -> None:
        observer = RecordingObserver()
        supervisor, reactor = make_supervisor(observer=observer)
        supervisor.add_child("u1", ["/bin/a", "x"], label="Fibonacci")
        self.assertEqual(reactor.spawned, [])
        reactor.advance(5)
        supervisor.startService()
        process = reactor.last()
        status = supervisor.status("u1")
        self.assertEqual(status["running"], True)
        self.assertEqual(status["pid"], process.pid)
        self.assertEqual(status["started"], 5.0)
        self.assertEqual(status["restarts"], 0)
        self.assertIsNone(status["last_exit"])
        self.assertEqual(observer.started, [("u1", process.pid)])
        [event] = supervisor.events.recent(kind="started")
        self.assertEqual(event.fields["pid"], process.pid)
        self.assertEqual(event.fields["uuid"], "u1")
        self.assertEqual(event.fields["service"], "Fibonacci")
        self.assertEqual(event.fields["args"], ["/bin/a", "x"])

    def test_back_off_doubles_to_the_cap(self) -> None:
        """
        A child dying before it is stable waits 1, 2, 4 ... s, up to the cap.
        """
        supervisor, reactor = make_supervisor()
        supervisor.startService()
        supervisor.add_child("u1", ["/bin/crash"])
        starts = [reactor.seconds()]
        for _ in range(6):
            reactor.advance(0.5)
            reactor.last().exit(1)
            count = len(reactor.spawned)
            while len(reactor.spawned) == count:
                reactor.advance(0.25)
            starts.append(reactor.seconds())
        waits = [b - a - 0.5 for a, b in itertools.pairwise(starts)]
        self.assertEqual(waits, [1.0, 2.0, 4.0, 8.0, 8.0, 8.0])
        delays = [e.fields["delay"] for e in supervisor.events.recent(kind="restart_scheduled")]
        self.assertEqual(delays, [1.0, 2.0, 4.0, 8.0, 8.0, 8.0])
        self.assertEqual(supervisor.status("u1")["restarts"], 6)

    def test_back_off_resets_once_stable(self) -> None:
        """
        A child that stayed up restarts at once, and its back-off starts
        over at 1 s.
        """
        supervisor, reactor = make_supervisor()
        supervisor.startService()
        supervisor.add_child("u1", ["/bin/x"])
        for delay in (1, 2, 4):
            reactor.last().exit(1)
            reactor.advance(delay)
        self.assertEqual(len(reactor.spawned), 4)
        reactor.advance(11)
        reactor.last().exit(1)
        reactor.advance(0)
        self.assertEqual(len(reactor.spawned), 5)  # at once
        reactor.last().exit(1)
        reactor.advance(0.99)
        self.assertEqual(len(reactor.spawned), 5)
        reactor.advance(0.01)
        self.assertEqual(len(reactor.spawned), 6)

    def test_exit_records(self) -> None:
        observer = RecordingObserver()
        supervisor, reactor = make_supervisor(observer=observer)
        supervisor.startService()
        supervisor.add_child("u1", ["/bin/x"], label="Sleeper")
        first = reactor.last()
        reactor.advance(3)
        first.exit(signal=signal.SIGKILL)
        [(name, record)] = observer.exited
        self.assertEqual(name, "u1")
        self.assertEqual((record.code, record.signal, record.uptime, record.pid),
                         (None, signal.SIGKILL, 3.0, first.pid))  # fmt: skip
        self.assertEqual(record.describe(), "killed by SIGKILL")
        last_exit = supervisor.status("u1")["last_exit"]
        self.assertEqual(last_exit["signal_name"], "SIGKILL")
        self.assertEqual(last_exit["time"], 3.0)
        [event] = supervisor.events.recent(kind="exited")
        self.assertEqual(event.fields["signal"], signal.SIGKILL)
        self.assertEqual(event.fields["code"], None)
        self.assertEqual(event.fields["pid"], first.pid)
        self.assertFalse(event.fields["expected"])
        reactor.advance(1)
        reactor.last().exit(3)
        self.assertEqual(observer.exited[-1][1].code, 3)
        self.assertEqual(observer.exited[-1][1].describe(), "exited with code 3")

    def test_spawn_failure_is_retried(self) -> None:
        """
        A child that cannot even be spawned is retried with back-off, never
        abandoned.
        """
        supervisor, reactor = make_supervisor()
        reactor.fail_spawn = True
        supervisor.startService()
        supervisor.add_child("u1", ["/no/such/program"])
        status = supervisor.status("u1")
        self.assertFalse(status["running"])
        self.assertIn("No such file", status["last_exit"]["error"])
        self.assertEqual(status["next_restart"], 1.0)
        reactor.advance(1)
        reactor.advance(2)
        self.assertEqual(supervisor.status("u1")["restarts"], 2)
        reactor.fail_spawn = False
        reactor.advance(4)
        self.assertTrue(supervisor.status("u1")["running"])

    def test_restart_waits_for_cleanup(self) -> None:
        """
        The observer's cleanup after an exit finishes before the restart
        (so it cannot race the new process), but at most CLEANUP_TIMEOUT.
        """
        observer = RecordingObserver()
        supervisor, reactor = make_supervisor(observer=observer)
        supervisor.startService()
        supervisor.add_child("u1", ["/bin/x"])
        observer.cleanup = Deferred()
        reactor.advance(20)
        reactor.last().exit(1)  # stable: restart at once, after the cleanup
        reactor.advance(1)
        self.assertEqual(len(reactor.spawned), 1)
        observer.cleanup.callback(None)
        reactor.advance(0)
        self.assertEqual(len(reactor.spawned), 2)
        observer.cleanup = Deferred()
        reactor.advance(20)
        reactor.last().exit(1)
        reactor.advance(CLEANUP_TIMEOUT - 0.1)
        self.assertEqual(len(reactor.spawned), 2)
        reactor.advance(0.1)
        reactor.advance(0)
        self.assertEqual(len(reactor.spawned), 3)

    def test_output_to_file_and_to_the_log(self) -> None:
        log_dir = tempfile.mkdtemp(prefix="skynet-procmon-")
        supervisor, reactor = make_supervisor(log_dir=log_dir)
        supervisor.startService()
        supervisor.add_child("u1", ["/bin/x"], label="TestService")
        process = reactor.last()
        with capturedLogs() as events:
            process.output(1, b"hello\npart")
            process.output(2, b"oops\n")
            process.output(1, b"ial\n")
            process.output(1, b"no newline")
            process.exit(0)
        lines = [(e["stream"], e["line"], e["service"], e["uuid"]) for e in events if "line" in e]
        self.assertEqual(lines, [
            ("stdout", "hello", "TestService", "u1"),
            ("stderr", "oops", "TestService", "u1"),
            ("stdout", "partial", "TestService", "u1"),
            ("stdout", "no newline", "TestService", "u1"),
        ])  # fmt: skip
        path = supervisor.status("u1")["log"]
        self.assertEqual(os.path.dirname(path), log_dir)
        self.assertTrue(os.path.basename(path).startswith("TestService-u1"))
        with open(path, "rb") as f:
            self.assertEqual(f.read(), b"hello\npartoops\nial\nno newline")
        supervisor.stopService()

    def test_graceful_stop_sequence(self) -> None:
        """
        A polite request first; SIGTERM after the grace period; SIGKILL
        kill_time later.
        """
        asked: list[str] = []
        supervisor, reactor = make_supervisor(
            polite_stop=lambda name: asked.append(name) or succeed(None),
            stop_grace=10, kill_time=3,
        )  # fmt: skip
        supervisor.startService()
        supervisor.add_child("u1", ["/bin/x"])
        process = reactor.last()
        process.obey_term = False
        d = supervisor.stop_child("u1")
        self.assertEqual(asked, ["u1"])
        self.assertNoResult(d)
        reactor.advance(9.9)
        self.assertEqual(process.signals, [])
        reactor.advance(0.1)
        self.assertEqual(process.signals, ["TERM"])
        reactor.advance(3)
        self.assertEqual(process.signals, ["TERM", "KILL"])
        record = self.successResultOf(d)
        self.assertEqual(record.signal, signal.SIGKILL)
        sequence = [k for k in kinds(supervisor) if k not in ("started", "restart_scheduled")]
        self.assertEqual(sequence, ["stopping", "terminating", "killing", "exited"])

    def test_polite_stop_that_works_sends_no_signal(self) -> None:
        supervisor, reactor = make_supervisor(polite_stop=lambda name: succeed(None))
        supervisor.startService()
        supervisor.add_child("u1", ["/bin/x"])
        process = reactor.last()
        d = supervisor.stop_child("u1")
        reactor.advance(1)
        process.exit(0)
        self.assertEqual(self.successResultOf(d).code, 0)
        reactor.advance(100)
        self.assertEqual(process.signals, [])

    def test_polite_stop_failing_means_sigterm_now(self) -> None:
        def refuse(name: str) -> Deferred:
            raise ConnectionError("no admin")

        supervisor, reactor = make_supervisor(polite_stop=refuse)
        supervisor.startService()
        supervisor.add_child("u1", ["/bin/x"])
        process = reactor.last()
        d = supervisor.stop_child("u1")
        self.assertEqual(process.signals, ["TERM"])
        self.assertEqual(self.successResultOf(d).signal, signal.SIGTERM)
        [event] = supervisor.events.recent(kind="stop_request_failed")
        self.assertEqual(event.fields["error"], "no admin")

    def test_remove_child_does_not_restart(self) -> None:
        supervisor, reactor = make_supervisor()
        supervisor.startService()
        supervisor.add_child("u1", ["/bin/x"])
        d = supervisor.remove_child("u1")
        self.successResultOf(d)
        reactor.advance(100)
        self.assertEqual(len(reactor.spawned), 1)
        self.assertEqual(supervisor.children, {})
        self.assertEqual(kinds(supervisor)[-1], "removed")
        # The name can be used again.
        supervisor.add_child("u1", ["/bin/x"])
        self.assertEqual(len(reactor.spawned), 2)

    def test_remove_child_waiting_for_back_off(self) -> None:
        supervisor, reactor = make_supervisor()
        supervisor.startService()
        supervisor.add_child("u1", ["/bin/x"])
        reactor.last().exit(1)
        self.successResultOf(supervisor.remove_child("u1"))
        reactor.advance(100)
        self.assertEqual(len(reactor.spawned), 1)

    def test_restart_child_at_once_without_back_off(self) -> None:
        supervisor, reactor = make_supervisor(polite_stop=lambda name: succeed(None))
        supervisor.startService()
        supervisor.add_child("u1", ["/bin/x"])
        for delay in (1, 2):
            reactor.last().exit(1)
            reactor.advance(delay)
        first_of_three = reactor.last()
        supervisor.restart_child("u1")
        first_of_three.exit(0)
        reactor.advance(0)
        self.assertEqual(len(reactor.spawned), 4)
        self.assertEqual(supervisor.status("u1")["restarts"], 3)
        # A restart asked for while waiting for back-off starts now.
        reactor.last().exit(1)
        self.assertEqual(len(reactor.spawned), 4)
        supervisor.restart_child("u1")
        self.assertEqual(len(reactor.spawned), 5)
        reactor.advance(100)
        self.assertEqual(len(reactor.spawned), 5)

    def test_set_args_apply_to_the_next_start(self) -> None:
        supervisor, reactor = make_supervisor()
        supervisor.startService()
        supervisor.add_child("u1", ["/bin/x", "--registered"])
        supervisor.set_args("u1", ["/bin/x", "--unregistered"])
        self.assertEqual(reactor.last().args, ["/bin/x", "--registered"])
        reactor.last().exit(1)
        reactor.advance(1)
        self.assertEqual(reactor.last().args, ["/bin/x", "--unregistered"])

    def test_stop_service_stops_every_child_and_waits(self) -> None:
        supervisor, reactor = make_supervisor(stop_grace=5, kill_time=5)
        supervisor.startService()
        supervisor.add_child("u1", ["/bin/x"])
        supervisor.add_child("u2", ["/bin/y"])
        supervisor.add_child("u3", ["/bin/z"])
        reactor.spawned[2].exit(1)  # waiting for back-off
        first, second = reactor.running()
        second.obey_term = False
        d = supervisor.stopService()
        self.assertEqual(first.signals, ["TERM"])
        self.assertNoResult(d)
        reactor.advance(5)
        self.successResultOf(d)
        self.assertEqual(second.signals, ["TERM", "KILL"])
        reactor.advance(100)
        self.assertEqual(reactor.running(), [])
        self.assertEqual(len(reactor.spawned), 3)
        self.assertEqual(reactor.getDelayedCalls(), [])

    def test_restart_all(self) -> None:
        supervisor, reactor = make_supervisor()
        supervisor.startService()
        supervisor.add_child("u1", ["/bin/x"])
        supervisor.add_child("u2", ["/bin/y"])
        supervisor.restart_all()
        reactor.advance(0)
        self.assertEqual(len(reactor.spawned), 4)
        self.assertEqual(len(reactor.running()), 2)


class EventLogTests(SynchronousTestCase):
    def test_bounded_logged_and_followed(self) -> None:
        clock = Clock()
        events = EventLog(clock, max_events=3)
        seen = []
        unsubscribe = events.subscribe(seen.append)
        with capturedLogs() as logged:
            for i in range(5):
                clock.advance(1)
                events.record("tick" if i % 2 else "tock", "number {n}", n=i)
        self.assertEqual([e.fields["n"] for e in events.recent()], [2, 3, 4])
        self.assertEqual([e.time for e in events.recent()], [3.0, 4.0, 5.0])
        self.assertEqual([e.text for e in events.recent(kind="tock")], ["number 2", "number 4"])
        self.assertEqual([e.fields["n"] for e in events.recent(limit=1)], [4])
        self.assertEqual([e["n"] for e in logged], [0, 1, 2, 3, 4])
        self.assertEqual(logged[0]["event_kind"], "tock")
        self.assertEqual(len(seen), 5)
        unsubscribe()
        events.record("tick", "again")
        self.assertEqual(len(seen), 5)
        self.assertEqual(events.recent()[-1].to_dict(), {"time": 5.0, "kind": "tick",
                                                         "text": "again"})  # fmt: skip


# A real child


_LOGGING_CHILD = """
import sys
from twisted.internet import reactor
from twisted.logger import Logger, globalLogBeginner, textFileLogObserver
from skynet.service_tap import SupervisorWatch

# As twistd -n does: the log goes to stdout, and --supervised watches stdin.
globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)], redirectStandardIO=False)
SupervisorWatch(reactor).startService()
log = Logger()

def write():
    for n in range({count}):
        log.info("line {{n}} " + "x" * 200, n=n)
    reactor.stop()

reactor.callWhenRunning(write)
reactor.run()
"""


@pytest.mark.slow
class RealChildLogTests(TestCase):
    """
    A supervised skynet child writing its log to stdout while the supervisor
    is not reading it (a daemon stopped with SIGSTOP, here paused): the child
    waits, and not one line is lost.
    """

    timeout = 60

    async def test_no_line_lost_while_the_reader_is_paused(self) -> None:
        from twisted.internet import reactor

        count = 2000  # about 440 KB: many times what a pipe holds
        directory = tempfile.mkdtemp(prefix="skynet-logs-")
        script = os.path.join(directory, "child.py")
        with open(script, "w") as f:
            f.write(_LOGGING_CHILD.format(count=count))
        supervisor = Supervisor(reactor, log_dir=directory, own_session=False)
        env = dict(os.environ, PYTHONPATH=ROOT)
        supervisor.add_child("c", [sys.executable, script], env=env, label="logger")
        child = supervisor.children["c"]
        supervisor.startService()
        self.addCleanup(supervisor.stopService)
        child.protocol.transport.pauseProducing()
        await deferLater(reactor, 3.0, lambda: None)
        self.assertTrue(child.running)  # blocked on its full pipe, not dropping
        child.protocol.transport.resumeProducing()
        record = await supervisor.when_exited("c")
        self.assertEqual(record.code, 0)
        with open(child.log_path, encoding="utf-8") as f:
            numbers = [int(m.group(1)) for m in re.finditer(r"line (\d+) x", f.read())]
        self.assertEqual(numbers, list(range(count)))
