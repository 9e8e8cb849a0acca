"""
Supervision of child processes, on the model of L{twisted.runner.procmon}
(by composition: see L{Supervisor}).

L{Supervisor}, an C{IService}, runs its children and

    - keeps, per child, its pid, start time, restart count and last exit
      (code, signal, uptime), for C{ListSubServices} and the dashboard;
    - restarts a dead child with exponential back-off: a child that dies
      before it has stayed up C{stable_after} seconds waits 1, 2, 4 ... s
      (up to a cap) before its next start; one that had stayed up restarts
      at once and its back-off starts over.  A child is never abandoned;
    - records every start, exit, restart and stop as an L{Event} in a bounded
      L{EventLog} and logs it with named fields;
    - writes each child's stdout and stderr to its own (rotated) log file and
      to the daemon's log, each line tagged with the child's label;
    - gives every child a stdin pipe it never writes and never closes, so
      that a child can tell its supervisor is gone (the pipe's end), even
      when the supervisor is killed with SIGKILL;
    - runs every child in a session of its own (C{setsid}), so that a
      terminal's Ctrl-C reaches the supervisor alone, which then stops its
      children gracefully, rather than every child at once;
    - stops a child gracefully: an optional polite request (the daemon asks
      the service's admin listener to C{Stop}), then SIGTERM after a grace
      period, then SIGKILL after C{kill_time}.

    - runs a child as another user and group when asked (C{uid}, C{gid}),
      and refuses such a child up front when it cannot (not root).

ProcessMonitor has no public hook for a child's exit and gives children an
empty environment by default, which is why this does not inherit from it.
"""

from __future__ import annotations

import os
import re
import shutil
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import attr
from twisted.application import service
from twisted.internet import error
from twisted.internet.defer import CancelledError, Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger, LogLevel, formatEvent
from twisted.python.failure import Failure
from twisted.python.logfile import LogFile
from zope.interface import Interface

from skynet.config import default_reactor
from skynet.control import DaemonEvent, ExitStatus

#: Lines longer than this (bytes) are cut into pieces in the daemon's log.
MAX_LINE = 64 * 1024

#: A child's log file rotates at this size, keeping this many old ones.
LOG_ROTATE_LENGTH = 10 * 1024 * 1024
LOG_ROTATED_FILES = 3

#: How long a restart may wait for L{IChildObserver.child_exited}'s cleanup.
CLEANUP_TIMEOUT = 5.0

#: How many of a process's last output lines are kept (for the reason a
#: deployment failed: an ImportError's traceback ends there).
TAIL_LINES = 20

_SIGNAL_NAMES: dict[int, str] = {}


def signal_name(number: int | None) -> str | None:
    """
    C{"SIGKILL"} for 9, and so on (L{None} for L{None}).
    """
    if number is None:
        return None
    if not _SIGNAL_NAMES:
        import signal

        for sig in signal.Signals:
            _SIGNAL_NAMES[int(sig)] = sig.name
    return _SIGNAL_NAMES.get(number, f"signal {number}")


@attr.frozen
class ExitRecord:
    """
    How a child process ended.

    @ivar code: its exit code, or L{None} if a signal ended it (or it never
        started).
    @ivar signal: the number of the signal that ended it, or L{None}.
    @ivar time: when it ended (the reactor's clock, POSIX seconds).
    @ivar uptime: how long it had run, in seconds.
    @ivar pid: its process id, if it had one.
    @ivar error: why it could not be started, if it could not.
    """

    code: int | None
    signal: int | None
    time: float
    uptime: float
    pid: int | None = None
    error: str | None = None

    @classmethod
    def from_reason(cls, reason: Failure | None, time: float, uptime: float,
                    pid: int | None) -> "ExitRecord":  # fmt: skip
        value = reason.value if reason is not None else None
        if isinstance(value, (error.ProcessDone, error.ProcessTerminated)):
            return cls(code=value.exitCode, signal=value.signal, time=time, uptime=uptime, pid=pid)
        return cls(code=None, signal=None, time=time, uptime=uptime, pid=pid,
                   error=repr(value) if value is not None else None)  # fmt: skip

    def describe(self) -> str:
        if self.error is not None:
            return f"failed to start: {self.error}"
        if self.signal is not None:
            return f"killed by {signal_name(self.signal)}"
        return f"exited with code {self.code}"

    def to_status(self) -> ExitStatus:
        """
        The control record of this exit (what C{ListSubServices} says).
        """
        return ExitStatus(code=self.code, signal=self.signal, signal_name=signal_name(self.signal),
                          time=self.time, uptime=self.uptime, pid=self.pid, error=self.error,
                          text=self.describe())  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        """
        A plain document (BSON and JSON friendly).
        """
        return self.to_status().to_bson()


#: One thing the supervisor or a guard did or saw (the control record).
Event = DaemonEvent


class EventLog:
    """
    A bounded, in-memory list of recent L{Event}s, each also logged with
    its named fields; listeners may follow new ones as they happen.

    @param clock: an L{IReactorTime} for the events' times.
    @param max_events: how many are kept (the oldest go first).
    """

    log = Logger(namespace="skynet.events")

    def __init__(self, clock: Any, max_events: int = 1000) -> None:
        self.clock = clock
        self.events: deque[Event] = deque(maxlen=max_events)
        self.listeners: list[Callable[[Event], None]] = []

    def record(self, kind: str, format: str, *, level: LogLevel = LogLevel.info,
               log: Logger | None = None, **fields: Any) -> Event:  # fmt: skip
        """
        Keep an event and log it: C{format} is a PEP 3101 string over
        C{fields}.
        """
        text = formatEvent({"log_format": format, **fields})
        event = Event(time=self.clock.seconds(), kind=kind, fields=dict(fields), text=text)
        self.events.append(event)
        (log or self.log).emit(level, format, event_kind=kind, **fields)
        for listener in list(self.listeners):
            try:
                listener(event)
            except Exception:
                self.log.failure("event listener {listener!r} failed", listener=listener)
        return event

    def recent(self, limit: int | None = None, kind: str | None = None) -> list[Event]:
        """
        The kept events, oldest first: the last C{limit} of them, of one
        C{kind} if given.
        """
        events = [e for e in self.events if kind is None or e.kind == kind]
        return events[-limit:] if limit else events

    def subscribe(self, listener: Callable[[Event], None]) -> Callable[[], None]:
        """
        Call C{listener} with each new event; returns a function undoing it.
        """
        self.listeners.append(listener)
        return lambda: self.listeners.remove(listener) if listener in self.listeners else None


class IChildObserver(Interface):
    """
    Told about a L{Supervisor}'s children starting and ending.
    """

    def child_started(name: str, pid: int) -> None:
        """
        Child C{name} is running as process C{pid}.
        """

    def child_exited(name: str, record: ExitRecord) -> Any:
        """
        Child C{name} ended.  May return a Deferred: a restart waits for it
        (at most L{CLEANUP_TIMEOUT} seconds), so that cleaning up after the
        old process cannot race the new one.
        """


@attr.s(auto_attribs=True)
class Child:
    """
    Everything a L{Supervisor} knows about one child: the one table of its
    children.

    @ivar name: unique name (the daemon uses the instance's uuid).
    @ivar label: what its output lines are tagged with (the service name).
    @ivar args: the command line of the next start (may be changed).
    @ivar uid: the user id it runs as (L{None}: the supervisor's).
    @ivar gid: the group id likewise.
    @ivar protocol: its running process's L{ChildProtocol}, if running.
    @ivar delay: the back-off before its next restart after a quick death.
    @ivar output: the last L{TAIL_LINES} lines of its current process.
    @ivar last_output: those of its last process that ended.
    """

    name: str
    label: str
    args: list[str]
    env: dict[str, str]
    cwd: str | None = None
    uid: int | None = None
    gid: int | None = None
    pid: int | None = None
    started: float | None = None
    starts: int = 0
    restarts: int = 0
    last_exit: ExitRecord | None = None
    next_restart: float | None = None
    log_path: str | None = None
    stopping: bool = False
    removing: bool = False
    restart_requested: bool = False
    delay: float = 1.0
    waiters: list[Deferred] = attr.Factory(list)
    output: deque[str] = attr.Factory(lambda: deque(maxlen=TAIL_LINES))
    last_output: tuple[str, ...] = ()
    protocol: Any = None
    log_file: LogFile | None = None
    restart_call: Any = None
    grace_call: Any = None
    kill_call: Any = None

    @property
    def running(self) -> bool:
        return self.pid is not None


def _safe_file_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)[:80] or "child"


class _Lines:
    """
    Cuts one output stream into lines for the daemon's log.
    """

    def __init__(self, emit: Callable[[bytes], None]) -> None:
        self.emit = emit
        self.buffer = b""

    def feed(self, data: bytes) -> None:
        data = self.buffer + data
        *lines, self.buffer = data.split(b"\n")
        for line in lines:
            self.emit(line)
        while len(self.buffer) > MAX_LINE:
            self.emit(self.buffer[:MAX_LINE])
            self.buffer = self.buffer[MAX_LINE:]

    def flush(self) -> None:
        if self.buffer:
            line, self.buffer = self.buffer, b""
            self.emit(line)


class ChildProtocol(ProcessProtocol):
    """
    One run of a child: its output to its log file and, line by line, to
    the daemon's log; its end to the L{Supervisor}.

    The child's stdin is a pipe this side keeps open and never writes: it
    closes only when the supervisor's process ends (however it ends).
    """

    def __init__(self, supervisor: "Supervisor", child: Child, log_file: LogFile | None) -> None:
        self.supervisor = supervisor
        self.child = child
        self.log_file = log_file
        self.streams = {
            1: _Lines(lambda line: self._line("stdout", line)),
            2: _Lines(lambda line: self._line("stderr", line)),
        }
        self.ended = False

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if self.log_file is not None:
            try:
                self.log_file.write(data)
            except (OSError, ValueError) as e:
                self.supervisor.log.warn(
                    "cannot write the log of {service} ({uuid}): {error}",
                    service=self.child.label, uuid=self.child.name, error=e,
                )  # fmt: skip
                self.log_file = None
        stream = self.streams.get(childFD)
        if stream is not None:
            stream.feed(data)

    def _line(self, stream: str, line: bytes) -> None:
        text = line.rstrip(b"\r").decode("utf-8", "replace")
        if self.child.protocol is self:
            self.child.output.append(text)
        self.supervisor.log.info(
            "[{service}] {line}",
            service=self.child.label,
            uuid=self.child.name,
            stream=stream,
            line=text,
        )

    def processEnded(self, reason: Failure) -> None:
        self.ended = True
        for stream in self.streams.values():
            stream.flush()
        self.supervisor._child_ended(self, reason)


class Supervisor(service.Service):
    """
    Supervises child processes: back-off, exit records, events, per-child
    log files and graceful stops (see the module docstring).

    It follows L{twisted.runner.procmon.ProcessMonitor}'s model (a child
    that dies sooner than C{stable_after} seconds waits 1, 2, 4 ... s before
    it restarts; SIGTERM, then SIGKILL after C{kill_time}) by composition:
    one L{Child} record per child holds all its state, where inheriting
    ProcessMonitor kept a second table and overrode its private methods.

    (About 420 lines, over the usual 400: a child's life, start, exit,
    back-off, graceful stop, is one state machine, clearer in one class
    than split across several.)

    @param reactor: an L{IReactorProcess} and L{IReactorTime} provider
        (default: the global reactor, imported when needed).
    @param log_dir: where each child's output goes (C{<label>-<name>.log});
        L{None}: only to the daemon's log.
    @param stable_after: seconds a child must stay up for its death not to
        count as a crash loop.
    @param min_restart_delay: the first back-off delay (1 s).
    @param max_restart_delay: the cap of the doubling back-off.
    @param stop_grace: seconds a polite stop gets before SIGTERM.
    @param kill_time: seconds SIGTERM gets before SIGKILL.
    @param polite_stop: called with a child's name to ask it to stop (a
        Deferred firing when asked); L{None}, or a failure, means SIGTERM at
        once.
    @param observer: an L{IChildObserver}, or L{None}.
    @param events: the L{EventLog} to record in (default: a new one).
    @param own_session: run each child in a new session (through
        C{setsid}, which keeps its pid), out of the terminal's reach.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any = None,
        *,
        log_dir: str | None = None,
        stable_after: float = 10.0,
        min_restart_delay: float = 1.0,
        max_restart_delay: float = 60.0,
        stop_grace: float = 15.0,
        kill_time: float = 5.0,
        polite_stop: Callable[[str], Any] | None = None,
        observer: Any = None,
        events: EventLog | None = None,
        own_session: bool = True,
    ) -> None:
        self.reactor = default_reactor(reactor)
        self.stable_after = stable_after
        self.min_restart_delay = min_restart_delay
        self.max_restart_delay = max_restart_delay
        self.kill_time = kill_time
        self.stop_grace = stop_grace
        self.log_dir = log_dir
        self.polite_stop = polite_stop
        self.observer = observer
        self.events = events if events is not None else EventLog(self.reactor)
        self.setsid = shutil.which("setsid") if own_session else None
        self.children: dict[str, Child] = {}

    def _event(self, kind: str, format: str, child: Child, *, level: LogLevel = LogLevel.info,
               **fields: Any) -> None:  # fmt: skip
        self.events.record(kind, format, level=level, log=self.log, service=child.label,
                           uuid=child.name, **fields)  # fmt: skip

    # Adding and removing children

    def add_child(
        self,
        name: str,
        args: list[str],
        *,
        uid: int | None = None,
        gid: int | None = None,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        label: str | None = None,
    ) -> None:
        """
        Add a child and start it if the supervisor is running.

        @param env: its environment (default: this process's; never an
            empty one, as ProcessMonitor's default is).
        @param uid: run it as this user (and C{gid}, this group): only a
            supervisor running as root can.
        @param label: tags the child's output (default: C{name}).
        @raise KeyError: if C{name} is taken.
        @raise ValueError: if C{uid} or C{gid} cannot be honoured.
        """
        if name in self.children:
            raise KeyError(f"remove {name} first")
        _check_ids(name, uid, gid)
        label = label or name
        child = Child(name=name, label=label, args=list(args),
                      env=dict(os.environ) if env is None else dict(env), cwd=cwd, uid=uid,
                      gid=gid, delay=self.min_restart_delay)  # fmt: skip
        if self.log_dir is not None:
            child.log_path = os.path.join(self.log_dir, f"{_safe_file_name(label)}-{name}.log")
        self.children[name] = child
        if self.running:
            self.start_child(name)

    def set_args(self, name: str, args: Iterable[str]) -> None:
        """
        The command line of the child's next start.
        """
        self.children[name].args = list(args)

    def remove_child(self, name: str) -> Deferred:
        """
        Stop a child gracefully and forget it; fires once it has exited.
        """
        child = self.children[name]
        child.removing = True
        self._cancel_restart(child)
        d = self.stop_child(name)

        def forget(_: Any) -> None:
            if self.children.get(name) is child:
                del self.children[name]
                if child.log_file is not None:
                    child.log_file.close()
                    child.log_file = None
                self._event("removed", "{service} ({uuid}) removed", child)

        return d.addCallback(forget)

    # Starting

    def start_child(self, name: str) -> None:
        """
        Start child C{name} now unless it is running: output to its file
        and as tagged lines, a stdin pipe kept open, the start recorded.
        """
        child = self.children[name]
        if child.protocol is not None:
            return
        self._cancel_restart(child)
        child.next_restart = None
        proto = child.protocol = ChildProtocol(self, child, self._log_file(child))
        child.output.clear()
        child.started = self.reactor.seconds()
        child.starts += 1
        args = [self.setsid, *child.args] if self.setsid else child.args
        try:
            transport = self.reactor.spawnProcess(proto, args[0], args, env=child.env,
                                                  path=child.cwd, uid=child.uid, gid=child.gid,
                                                  childFDs={0: "w", 1: "r", 2: "r"})  # fmt: skip
        except OSError:
            self._child_ended(proto, Failure())
            return
        child.pid = transport.pid
        self._event("started", "{service} ({uuid}) started as pid {pid} (start {starts})",
                    child, pid=child.pid, starts=child.starts,
                    restarts=child.restarts, args=list(child.args))  # fmt: skip
        if self.observer is not None:
            try:
                self.observer.child_started(name, child.pid)
            except Exception:
                self.log.failure("child_started observer failed for {uuid}", uuid=name)

    def _log_file(self, child: Child) -> LogFile | None:
        if child.log_path is None:
            return None
        if child.log_file is None or child.log_file.closed:
            try:
                child.log_file = LogFile(os.path.basename(child.log_path),
                                         os.path.dirname(child.log_path),
                                         rotateLength=LOG_ROTATE_LENGTH,
                                         maxRotatedFiles=LOG_ROTATED_FILES)  # fmt: skip
            except OSError as e:
                self.log.warn("cannot open {path}: {error}", path=child.log_path, error=e)
                return None
        return child.log_file

    # Exits and restarts

    def _child_ended(self, proto: ChildProtocol, reason: Failure | None = None) -> None:
        """
        A child's process ended: record it and schedule its restart with
        back-off.
        """
        child = proto.child
        if child.protocol is not proto:
            return
        child.protocol = None
        child.last_output = tuple(child.output)
        for name in ("kill_call", "grace_call"):
            call = getattr(child, name)
            if call is not None and call.active():
                call.cancel()
            setattr(child, name, None)
        now = self.reactor.seconds()
        uptime = now - (child.started if child.started is not None else now)
        record = ExitRecord.from_reason(reason, now, uptime, child.pid)
        child.pid = None
        child.last_exit = record
        was_stopping, child.stopping = child.stopping, False
        expected = was_stopping or child.removing or not self.running
        self._event("exited", "{service} ({uuid}) pid {pid} {how} after {uptime:.1f}s",
                    child, level=LogLevel.info if expected else LogLevel.warn, pid=record.pid,
                    how=record.describe(), code=record.code, signal=record.signal,
                    signal_name=signal_name(record.signal), uptime=uptime,
                    expected=expected, error=record.error)  # fmt: skip
        waiters, child.waiters = child.waiters, []
        for d in waiters:
            d.callback(record)
        if self.children.get(child.name) is not child:
            return

        cleanup: Deferred = succeed(None)
        if self.observer is not None:
            cleanup = maybeDeferred(self.observer.child_exited, child.name, record)
            cleanup.addErrback(self._cleanup_failed, child.name)
        if not self._should_restart(child):
            return
        if child.restart_requested:
            child.restart_requested = False
            delay = 0.0
            child.delay = self.min_restart_delay
        elif uptime < self.stable_after:
            delay = child.delay
            child.delay = min(delay * 2, self.max_restart_delay)
        else:
            delay = 0.0
            child.delay = self.min_restart_delay
        child.next_restart = now + delay
        self._event("restart_scheduled",
                    "{service} ({uuid}) restarts in {delay:.1f}s (restart {restart})",
                    child, delay=delay, restart=child.restarts + 1, uptime=uptime)  # fmt: skip

        timeout = self.reactor.callLater(CLEANUP_TIMEOUT, cleanup.cancel)

        def schedule(_: Any) -> None:
            if timeout.active():
                timeout.cancel()
            if not self._should_restart(child) or child.protocol is not None:
                return
            if child.restart_call is not None or child.next_restart is None:
                return
            remaining = max(0.0, child.next_restart - self.reactor.seconds())
            child.restart_call = self.reactor.callLater(remaining, self._restart, child)

        cleanup.addBoth(schedule)
        cleanup.addErrback(lambda f: self.log.failure("scheduling the restart of {uuid} failed", f,
                                                      uuid=child.name))  # fmt: skip

    def _cleanup_failed(self, failure: Failure, name: str) -> None:
        if failure.check(CancelledError):
            self.log.warn("cleaning up after {uuid} took over {timeout}s; restarting anyway",
                          uuid=name, timeout=CLEANUP_TIMEOUT)  # fmt: skip
        else:
            self.log.failure("cleaning up after {uuid} failed", failure, uuid=name)

    def _should_restart(self, child: Child) -> bool:
        return bool(self.running) and not child.removing and self.children.get(child.name) is child

    def _restart(self, child: Child) -> None:
        child.restart_call = None
        if self.children.get(child.name) is not child or child.protocol is not None:
            return
        child.restarts += 1
        self.start_child(child.name)

    def _cancel_restart(self, child: Child) -> None:
        call, child.restart_call = child.restart_call, None
        if call is not None and call.active():
            call.cancel()

    # Stopping

    def when_exited(self, name: str) -> Deferred:
        """
        Fires with the L{ExitRecord} when the current process of C{name}
        ends (at once with L{None} if none is running).
        """
        child = self.children[name]
        if child.protocol is None:
            return succeed(None)
        d: Deferred = Deferred()
        child.waiters.append(d)
        return d

    def _ending(self, name: str) -> tuple[Any, ChildProtocol | None, Deferred]:
        """
        The child C{name}, its running process (L{None} if none runs) and a
        Deferred firing with that process's L{ExitRecord} (at once with
        L{None} if none runs): what ending it starts from.
        """
        child = self.children[name]
        proto = child.protocol
        if proto is None:
            return child, None, succeed(None)
        return child, proto, self.when_exited(name)

    def stop_child(self, name: str) -> Deferred:
        """
        Stop the running process of C{name} gracefully: the polite request,
        SIGTERM after C{stop_grace} seconds, SIGKILL C{kill_time} seconds
        later.  Whether it restarts is decided by the caller (see
        L{restart_child} and L{remove_child}).

        @return: a Deferred firing with the L{ExitRecord} (or L{None} if it
            was not running).
        """
        child, proto, exited = self._ending(name)
        if proto is None:
            return exited
        if child.stopping:
            return exited
        child.stopping = True
        polite = self.polite_stop
        self._event("stopping", "{service} ({uuid}) pid {pid} stopping{how}", child,
                    pid=child.pid, how="" if polite else " (SIGTERM)",
                    grace=self.stop_grace)  # fmt: skip
        if polite is None:
            self._terminate(proto)
            return exited

        def asked(_: Any) -> None:
            if child.protocol is proto:
                child.grace_call = self.reactor.callLater(self.stop_grace, self._terminate, proto)

        def refused(failure: Failure) -> None:
            self._event("stop_request_failed",
                        "{service} ({uuid}) could not be asked to stop ({error}); SIGTERM",
                        child, level=LogLevel.warn, error=str(failure.value))  # fmt: skip
            self._terminate(proto)

        maybeDeferred(polite, name).addCallbacks(asked, refused)
        return exited

    def _terminate(self, proto: ChildProtocol) -> None:
        child = proto.child
        child.grace_call = None
        if child.protocol is not proto:
            return
        self._event("terminating", "{service} ({uuid}) pid {pid}: SIGTERM", child,
                    pid=child.pid, kill_time=self.kill_time)  # fmt: skip
        if self._signal(proto, "TERM"):
            child.kill_call = self.reactor.callLater(self.kill_time, self._kill, proto)

    def _kill(self, proto: ChildProtocol) -> None:
        child = proto.child
        child.kill_call = None
        if child.protocol is not proto:
            return
        self._event("killing", "{service} ({uuid}) pid {pid}: SIGKILL", child,
                    level=LogLevel.warn, pid=child.pid)  # fmt: skip
        self._signal(proto, "KILL")

    @staticmethod
    def _signal(proto: ChildProtocol, name: str) -> bool:
        """
        Send signal C{name}; whether the process was still there.
        """
        try:
            proto.transport.signalProcess(name)  # type: ignore[union-attr]
        except error.ProcessExitedAlready:
            return False
        return True

    def kill_child(self, name: str) -> Deferred:
        """
        End the running process of C{name} without asking it (it is hung:
        a polite request would go unanswered): SIGTERM (with SIGCONT, so
        that a stopped process can act on it), then SIGKILL after
        C{kill_time}.  It restarts as after any death, with the usual
        back-off.

        @return: a Deferred firing with the L{ExitRecord} once it has died
            (at once with L{None} if it was not running).
        """
        child, proto, exited = self._ending(name)
        if proto is None:
            return exited
        if child.grace_call is not None and child.grace_call.active():
            child.grace_call.cancel()
        child.grace_call = None
        if child.kill_call is None:
            child.stopping = True
            self._terminate(proto)
            self._signal(proto, "CONT")
        return exited

    def restart_child(self, name: str) -> Deferred:
        """
        Restart C{name} now: stop it gracefully and start it again at once,
        without back-off (a child waiting for its back-off starts now).
        Fires when the old process has ended.
        """
        child = self.children[name]
        if child.protocol is None:
            if self.running and not child.removing:
                child.delay = self.min_restart_delay
                self._restart(child)
            return succeed(None)
        self._event("restart_requested", "{service} ({uuid}) restart requested", child)
        child.restart_requested = True
        return self.stop_child(name)

    def restart_all(self) -> None:
        """
        Restart every child (gracefully).
        """
        for name in list(self.children):
            self.restart_child(name)

    # IService

    def startService(self) -> None:
        super().startService()
        for name in list(self.children):
            self.start_child(name)

    def stopService(self) -> Deferred:  # type: ignore[override]
        """
        Stop every child gracefully, without restarting any; fires when all
        have exited.
        """
        super().stopService()
        for child in self.children.values():
            self._cancel_restart(child)
        stops = [self.stop_child(name) for name in list(self.children)]
        d = DeferredList(stops, consumeErrors=True)

        def close_logs(_: Any) -> None:
            for child in self.children.values():
                if child.log_file is not None:
                    child.log_file.close()
                    child.log_file = None

        return d.addCallback(close_logs)

    # Reading

    def status(self, name: str) -> dict[str, Any]:
        """
        A plain document about child C{name}.
        """
        child = self.children[name]
        return {
            "label": child.label,
            "args": list(child.args),
            "running": child.running,
            "pid": child.pid,
            "started": child.started,
            "restarts": child.restarts,
            "last_exit": child.last_exit.to_dict() if child.last_exit else None,
            "next_restart": child.next_restart,
            "backoff": child.delay,
            "log": child.log_path,
        }


def _check_ids(name: str, uid: int | None, gid: int | None) -> None:
    """
    @raise ValueError: if this process cannot run a child as C{uid}/C{gid}
        (only root can change them).
    """
    if os.geteuid() == 0:
        return
    if (uid is not None and uid != os.geteuid()) or (gid is not None and gid != os.getegid()):
        raise ValueError(
            f"cannot run {name} as uid {uid} gid {gid}: only a supervisor running as root can "
            f"change a child's user or group (this one runs as uid {os.geteuid()})"
        )


__all__ = [
    "Child",
    "ChildProtocol",
    "Event",
    "EventLog",
    "ExitRecord",
    "IChildObserver",
    "Supervisor",
    "signal_name",
]
