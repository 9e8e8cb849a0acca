"""
The daemon's resource guards, as pure state machines fed samples, and the
samplers that measure processes and the host.

  - L{ChildGuard}: a child over its CPU or memory threshold for
    C{child_samples} samples in a row is to be unregistered and restarted
    (L{Restart}); once a new process of it is in the registry and under its
    thresholds, it is to be registered again (L{Release}).
  - L{LoadGuard}: the host's load above the high-water mark for
    C{load_samples} samples means overloaded (every child unregistered);
    below the low-water mark as long means recovered.  Between the marks
    nothing changes (hysteresis).

The daemon (L{skynet.daemon.service.Daemon}) feeds them and carries out
their decisions; they never touch a process, a clock or a registry.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterable
from typing import Any

import attr
from zope.interface import Interface, implementer

from skynet.control import HostFigures, HostMemory, ProcessUsage

__all__ = [
    "ChildGuard",
    "FakeSampler",
    "GuardConfig",
    "ISampler",
    "LoadGuard",
    "PsutilSampler",
    "Release",
    "Restart",
    "Usage",
    "load_reading",
]

#: One sample of a child (and its descendants): CPU percent and RSS bytes.
Usage = ProcessUsage


@attr.frozen
class GuardConfig:
    """
    The thresholds of the resource guards (0 or L{None} turns one off).

    @ivar sample_interval: seconds between samples.
    @ivar child_max_cpu: a child's CPU percent (100 = one core) above
        which a sample counts as over.
    @ivar child_max_rss: a child's resident memory, in bytes, likewise.
    @ivar child_samples: consecutive samples over a threshold before the
        child is unregistered, restarted, and registered again once its
        new process is healthy.
    @ivar load_high: the host's load reading above which a sample counts as
        high; after C{load_samples} of them in a row, every child is
        unregistered.
    @ivar load_low: the reading below which a sample counts as low; after
        C{load_samples} in a row, the children are registered again.
        Between the two marks nothing changes (hysteresis).
    """

    sample_interval: float = 2.0
    child_max_cpu: float | None = None
    child_max_rss: int | None = None
    child_samples: int = 3
    load_high: float | None = None
    load_low: float | None = None
    load_samples: int = 3

    def __attrs_post_init__(self) -> None:
        if self.sample_interval <= 0:
            raise ValueError("the sample interval must be positive")
        if self.child_samples < 1 or self.load_samples < 1:
            raise ValueError("sample counts must be at least 1")
        if self.load_high and self.load_low is not None and self.load_low >= self.load_high:
            raise ValueError("the low-water mark must be below the high-water mark")

    @property
    def load_low_mark(self) -> float:
        if self.load_low is not None:
            return self.load_low
        return (self.load_high or 0) / 2


# The child guard


@attr.frozen
class Restart:
    """
    Unregister process C{pid} of child C{uuid} and restart it: it was over
    its C{reasons} thresholds (C{"cpu"}, C{"memory"}) for long enough.
    """

    uuid: str
    pid: int
    usage: ProcessUsage
    reasons: tuple[str, ...]


@attr.frozen
class Release:
    """
    Process C{pid} of child C{uuid}, restarted by the guard, is healthy:
    let it be registered again.
    """

    uuid: str
    pid: int
    usage: ProcessUsage


class ChildGuard:
    """
    Counts, per child, the consecutive samples over a threshold.

    @ivar restarting: per child, the pid the guard restarted, until a new
        process of it is healthy.
    """

    def __init__(self, config: GuardConfig) -> None:
        self.config = config
        self.restarting: dict[str, int] = {}
        self._over: dict[str, int] = {}

    def reasons(self, usage: ProcessUsage) -> tuple[str, ...]:
        """
        The thresholds C{usage} is over.
        """
        config = self.config
        reasons = []
        if config.child_max_cpu and usage.cpu > config.child_max_cpu:
            reasons.append("cpu")
        if config.child_max_rss and usage.rss > config.child_max_rss:
            reasons.append("memory")
        return tuple(reasons)

    def sample(self, uuid: str, pid: int, usage: ProcessUsage, *,
               in_registry: bool) -> Restart | Release | None:  # fmt: skip
        """
        One sample of process C{pid} of child C{uuid}.

        @param in_registry: whether that process's node is in the registry
            (a restarted process is released only then).
        @return: what to do, if anything.
        """
        if self.restarting.get(uuid) == pid:
            return None  # being restarted by this guard
        over = self.reasons(usage)
        if not over:
            self._over.pop(uuid, None)
            if uuid in self.restarting and in_registry:
                del self.restarting[uuid]
                return Release(uuid=uuid, pid=pid, usage=usage)
            return None
        count = self._over[uuid] = self._over.get(uuid, 0) + 1
        if count < self.config.child_samples:
            return None
        # (Also when a process this guard restarted is over again: it is
        # restarted again, and stays held meanwhile.)
        self._over.pop(uuid, None)
        self.restarting[uuid] = pid
        return Restart(uuid=uuid, pid=pid, usage=usage, reasons=over)

    def started(self, uuid: str) -> None:
        """
        A new process of C{uuid} started: its count starts over.
        """
        self._over.pop(uuid, None)

    def idle(self, uuid: str) -> None:
        """
        C{uuid} has no process now.
        """
        self._over.pop(uuid, None)

    def forget(self, uuid: str) -> None:
        self._over.pop(uuid, None)
        self.restarting.pop(uuid, None)

    def fields(self, usage: ProcessUsage) -> dict[str, Any]:
        """
        The measured values and thresholds, for an event.
        """
        c = self.config
        return {"cpu": usage.cpu, "rss": usage.rss, "max_cpu": c.child_max_cpu,
                "max_rss": c.child_max_rss, "samples": c.child_samples}  # fmt: skip


# The load guard


OVERLOADED = "overloaded"
RECOVERED = "recovered"


class LoadGuard:
    """
    The host's load, with hysteresis between its two marks.

    @ivar overloaded: whether the host is overloaded now.
    @ivar last: the last reading.
    """

    def __init__(self, config: GuardConfig) -> None:
        self.config = config
        self.overloaded = False
        self.last: float | None = None
        self._high = 0
        self._low = 0

    @property
    def enabled(self) -> bool:
        return bool(self.config.load_high)

    def sample(self, reading: float) -> str | None:
        """
        One reading: L{OVERLOADED} or L{RECOVERED} when the state changes,
        else L{None}.
        """
        config = self.config
        self.last = reading
        if not config.load_high:
            return None
        if reading > config.load_high:
            self._high, self._low = self._high + 1, 0
        elif reading < config.load_low_mark:
            self._high, self._low = 0, self._low + 1
        else:
            self._high = self._low = 0
        if not self.overloaded and self._high >= config.load_samples:
            self.overloaded = True
            return OVERLOADED
        if self.overloaded and self._low >= config.load_samples:
            self.overloaded = False
            return RECOVERED
        return None

    def fields(self) -> dict[str, Any]:
        c = self.config
        return {"load": self.last, "high": c.load_high, "low": c.load_low_mark,
                "samples": c.load_samples}  # fmt: skip


# Samplers


class ISampler(Interface):
    """
    Measures processes and the host.
    """

    def sample_host() -> None:
        """
        Take the host's CPU reading (over the time since the last one).
        """

    def host() -> HostFigures:
        """
        The host's figures.
        """

    def usage(pid: int) -> ProcessUsage | None:
        """
        Process C{pid} with its descendants, or L{None} if it is gone.
        """

    def forget(keep: Iterable[int]) -> None:
        """
        Drop what is kept of processes not among C{keep}.
        """

    def own_usage() -> ProcessUsage | None:
        """
        This process alone, or L{None} if it cannot be measured.
        """


@implementer(ISampler)
class PsutilSampler:
    """
    Measures processes and the host with psutil.  A process's CPU percent
    is over the time since its previous sample.
    """

    def __init__(self) -> None:
        import psutil

        self.psutil = psutil
        self._processes: dict[int, Any] = {}
        self._host_cpu: float = 0.0
        self._own: Any = None
        psutil.cpu_percent(None)

    def _process(self, pid: int) -> Any:
        process = self._processes.get(pid)
        if process is None or not process.is_running():
            process = self._processes[pid] = self.psutil.Process(pid)
            process.cpu_percent(None)
        return process

    def usage(self, pid: int) -> ProcessUsage | None:
        psutil = self.psutil
        try:
            top = self._process(pid)
            family = [top] + top.children(recursive=True)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            self._processes.pop(pid, None)
            return None
        cpu, rss = 0.0, 0
        for member in family:
            try:
                process = self._process(member.pid)
                cpu += process.cpu_percent(None)
                rss += process.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                self._processes.pop(member.pid, None)
        return ProcessUsage(cpu=cpu, rss=rss)

    def forget(self, keep: Iterable[int]) -> None:
        keep = set(keep)
        for pid in list(self._processes):
            if pid not in keep:
                try:
                    parents = {p.pid for p in self._processes[pid].parents()}
                except Exception:
                    parents = set()
                if not parents & keep:
                    del self._processes[pid]

    def sample_host(self) -> None:
        self._host_cpu = self.psutil.cpu_percent(None)

    def host(self) -> HostFigures:
        psutil = self.psutil
        memory = psutil.virtual_memory()
        boot = psutil.boot_time()
        one, five, fifteen = os.getloadavg()
        return HostFigures(
            cpu=float(self._host_cpu),
            cpus=psutil.cpu_count() or 1,
            memory=HostMemory(
                total=memory.total,
                available=memory.available,
                used=memory.used,
                percent=float(memory.percent),
            ),  # fmt: skip
            load=(one, five, fifteen),
            uptime=max(0.0, time.time() - boot),
            boot_time=float(boot),
            hostname=socket.gethostname(),
        )

    def own_usage(self) -> ProcessUsage | None:
        try:
            if self._own is None:
                self._own = self.psutil.Process(os.getpid())
                self._own.cpu_percent(None)
            return ProcessUsage(cpu=self._own.cpu_percent(None), rss=self._own.memory_info().rss)
        except Exception:
            return None


@implementer(ISampler)
class FakeSampler:
    """
    Measurements a test sets: C{table} maps a pid to its L{ProcessUsage}
    (others measure C{default}); the host is C{figures}.
    """

    def __init__(self, default: ProcessUsage = ProcessUsage(cpu=1.0, rss=50 << 20)) -> None:
        self.table: dict[int, ProcessUsage] = {}
        self.default = default
        self.own = ProcessUsage(cpu=0.5, rss=10 << 20)
        self.figures = HostFigures(
            cpu=12.5, cpus=2, memory=HostMemory(total=100, available=60, used=40, percent=40.0),
            load=(0.5, 0.4, 0.3), uptime=1000.0, boot_time=5.0, hostname="fake",
        )  # fmt: skip

    def sample_host(self) -> None:
        pass

    def host(self) -> HostFigures:
        return self.figures

    def usage(self, pid: int) -> ProcessUsage | None:
        return self.table.get(pid, self.default)

    def forget(self, keep: Iterable[int]) -> None:
        pass

    def own_usage(self) -> ProcessUsage | None:
        return self.own


def load_reading(source: str, sampler: Any = None) -> Callable[[], float]:
    """
    A load reading for the host guard, from its C{--load-source} name:
    C{loadavg} (the 1-minute load average), C{cpu} (the host's CPU percent)
    or C{file:PATH} (a number read from a file at each sample: for tests and
    for external probes).

    @raise ValueError: for another name.
    """
    if source == "loadavg":
        return lambda: os.getloadavg()[0]
    if source == "cpu":
        if sampler is None:
            raise ValueError("the cpu load source needs a sampler")
        return lambda: float(sampler.host().cpu)
    if source.startswith("file:") and len(source) > 5:
        path = source[5:]

        def read() -> float:
            with open(path, encoding="ascii") as f:
                return float(f.read().strip())

        return read
    raise ValueError(f"unknown load source {source!r}: use loadavg, cpu or file:PATH")
