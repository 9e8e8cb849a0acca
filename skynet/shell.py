"""
The sky command language, shared by C{sky}, C{sky cli} and the SSH shell.

One L{Shell} holds a session's persistent filters and runs commands:

    queries     services, hosts, regions, versions, instances, topology
    filters     service, version, host, port, region, registered <value>;
                filters; reset [<filter>]
    actions     register, unregister, stop, restart, deploy MODULE:CLASS [args]
    more        call SERVICE METHOD '{json}', watch [seconds], stats, help,
                python (interactive only), exit

Output is what Go Skynet's C{sky} printed (C{instances}: C{IP:PORT - Name
Version [Registered]}), or JSON with C{--json}.  Actions on more than one
instance (and, in the interactive shell, on any) ask C{N instances will be
stopped, Are you sure? (Y/N) > } unless C{--yes}.

Actions go through the L{DAEMON_SERVICE} of the instance's host when that
daemon supervises it (it knows its children by their instance uuid), and
otherwise through the instance's admin endpoint (Go Skynet's raw
C{Admin.Register}, C{Admin.Unregister}, C{Admin.Stop}).  Restarting needs a
daemon: nothing else can start the process again.

A L{Shell} writes to an L{IShellIO}: L{BufferIO} collects output (tests),
C{skynet.sky} writes to stdout and stderr, and L{ShellProtocol} serves the
language on a terminal (line editing, history kept in a file, Tab
completion of commands, filter names and live values from the registry),
over SSH (L{skynet.manhole}) or on the local terminal (C{sky cli}).
"""

from __future__ import annotations

import datetime
import json
import os
import shlex
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol

import attr
from twisted.conch import recvline
from twisted.conch.manhole import ColoredManhole
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred, succeed
from twisted.internet.task import deferLater
from twisted.logger import Logger
from zope.interface import implementer

from skynet.admin import admin_call, call_instance
from skynet.config import default_reactor, skynet_path
from skynet.control import (
    ADMIN_ACTIONS,
    DAEMON_ACTIONS,
    DAEMON_SERVICE,
    LIST_SUB_SERVICES,
    sub_services_from_bson,
)
from skynet.errors import (
    ConnectionFailed,
    NoInstances,
    RemoteCallError,
    RequestTimeout,
    ServiceError,
    SkynetError,
)
from skynet.registry.base import (
    Address,
    IInstanceListener,
    Instance,
    Query,
    RegistryError,
    sort_instances,
)

#: The persistent filters, in the order C{filters} shows them.
FILTER_NAMES = ("region", "host", "port", "service", "version", "registered")

#: Every command of the language (what Tab completes first).
COMMANDS = (
    "apply",
    "call",
    "deploy",
    "deployments",
    "exit",
    "filters",
    "help",
    "host",
    "hosts",
    "instances",
    "logs",  # (observe hook) skynet.observe.commands
    "port",
    "python",
    "quit",
    "region",
    "trace",  # (trace hook) skynet.observe.tracing via skynet.observe.commands
    "regions",
    "register",
    "registered",
    "reset",
    "restart",
    "rollout",
    "scale",
    "service",
    "services",
    "stats",
    "stop",
    "topology",
    "undeploy",
    "unregister",
    "version",
    "versions",
    "watch",
)

#: The actions on instances, and the words of their messages.
_ACTIONS = {
    "register": ("registered", "Registered"),
    "unregister": ("unregistered", "Unregistered"),
    "stop": ("stopped", "Stopped"),
    "restart": ("restarted", "Restarted"),
}

_TRUE = ("true", "yes", "1", "on")
_FALSE = ("false", "no", "0", "off")

HELP = """\
Commands:
  services       List the services that match the filters
  hosts          List the hosts that match the filters
  regions        List the regions that match the filters
  versions       List the versions of a service (needs the service filter)
  instances      List the instances that match the filters: IP:PORT - Name Version [Registered]
  topology       Print the hierarchy of regions/hosts/services/versions/instances
  register       Register the instances that match the filters
  unregister     Unregister the instances that match the filters
  stop           Stop the instances that match the filters
  restart [--all-at-once]
                 Restart the instances that match the filters (through their host's SkynetDaemon):
                 several one at a time, each replaced by a fresh process that answers before the
                 old one stops (--all-at-once: all together, in place)
  deploy MODULE:CLASS [args]
                 Start a new instance on every host that matches the filters (through its SkynetDaemon)
  call SERVICE METHOD ['{"json": "params"}']
                 Call a method of a service and print its result as JSON
  watch [SECONDS]
                 Print instances as they are added, updated and removed (Ctrl-C stops)
  stats          Requests, clients and response times of the instances that match the filters
  stats --by-method
                 Requests, errors, rate, p50/p99 per service and method (from the buckets)
  logs [--grep REGEX] [--since 10m] [--level warn] [--request-id ID] [--uuid U] [--limit N] [-f]
                 Search the logs of the hosts that match the filters (through their SkynetDaemon)
  call --trace SERVICE METHOD ['{"json": "params"}']
                 The call's result, then its call tree through every service it reached
  trace REQUEST_ID | trace --slowest N [--since 1h]
                 The call tree of an earlier request; or the slowest recent calls, one per request
  python         A Python shell with registry, client and daemon bound (Ctrl-D returns)
  help           This help
  exit           Leave the shell (or Ctrl-D)

The cluster (desired state across hosts, kept by the leading daemon; see docs/cluster.md):
  apply FILE [--prune] [--dry-run] [--json] [--ready-timeout S]
                 Store the deployments of a TOML file ([services.NAME] run=..., instances=N)
  scale NAME=N [NAME=N ...]
                 Change how many instances of deployments should run
  undeploy NAME [NAME ...]
                 Remove deployments; their instances are drained and stopped
  deployments [--json]
                 Each deployment: desired, ready, starting, per host, state and why
  rollout status NAME [--timeout S] [--no-follow]
                 Follow a rolling replacement until it is done (0), stopped (1) or times out (3)
  rollout restart NAME
                 Replace every instance of a deployment, one at a time

Filters:
  filters                 List the current filters
  reset [<filter>]        Reset all filters, or the one named
  region <region>         Set the region filter: all commands are scoped to it until reset
  host <host>             Set the host filter
  port <port>             Set the port filter
  service <service>       Set the service filter
  version <version>       Set the version filter
  registered <true|false> Set the registered filter

Options (before or after a command; filters given this way apply to that command only):
  --service S --version V --host H --port P --region R --registered true|false
  --json                  Print JSON for scripts
  --yes                   Do not ask for confirmation
"""


class ShellError(Exception):
    """
    A command failed for a reason the user can act on; the message is one
    line and says what to do.
    """


class UsageError(ShellError):
    """
    A command was given wrongly.
    """


class IShellIO(Protocol):
    """
    Where a L{Shell} writes, and how it asks.
    """

    def out(self, text: str) -> None:
        """
        Write C{text} and a newline to the output.
        """

    def err(self, text: str) -> None:
        """
        Write C{text} and a newline to the error output.
        """

    def confirm(self, question: str) -> Deferred[bool]:
        """
        Ask C{question} (it ends with C{"(Y/N) > "}); fire with the answer.
        """

    def python(self, namespace: dict[str, Any]) -> None:
        """
        Switch to a Python shell with C{namespace} bound.

        @raise ShellError: if this output cannot (it is not a terminal).
        """

    def exit(self) -> None:
        """
        Leave the shell.
        """


class BufferIO:
    """
    An L{IShellIO} that keeps what is written, answers confirmations from
    a list, and records requests to switch to Python or to exit; for tests.

    @ivar answers: the answers to give, in order (then C{False}).
    @ivar questions: the questions asked.
    """

    def __init__(self, answers: Iterable[bool] = ()) -> None:
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self.answers = list(answers)
        self.questions: list[str] = []
        self.namespace: dict[str, Any] | None = None
        self.exited = False

    def out(self, text: str) -> None:
        self.stdout.extend(text.split("\n"))

    def err(self, text: str) -> None:
        self.stderr.extend(text.split("\n"))

    def confirm(self, question: str) -> Deferred[bool]:
        self.questions.append(question)
        return succeed(self.answers.pop(0) if self.answers else False)

    def python(self, namespace: dict[str, Any]) -> None:
        self.namespace = namespace

    def exit(self) -> None:
        self.exited = True

    @property
    def output(self) -> str:
        return "\n".join(self.stdout)

    @property
    def errors(self) -> str:
        return "\n".join(self.stderr)


# Filters and parsing


def parse_registered(value: str) -> bool:
    """
    C{true} or C{false} (also yes/no, 1/0, on/off).

    @raise UsageError: for anything else.
    """
    lowered = value.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise UsageError(f"registered must be true or false, not {value!r}")


def parse_port(value: str) -> int:
    """
    @raise UsageError: unless C{value} is a port number.
    """
    try:
        port = int(value)
    except ValueError:
        raise UsageError(f"port must be a number, not {value!r}") from None
    if not 0 < port < 65536:
        raise UsageError(f"port must be between 1 and 65535, not {port}")
    return port


@attr.s(auto_attribs=True)
class Filters:
    """
    The filters of a session (or of one command): L{None} matches anything.
    """

    region: str | None = None
    host: str | None = None
    port: int | None = None
    service: str | None = None
    version: str | None = None
    registered: bool | None = None

    def set(self, name: str, value: str) -> None:
        """
        Set filter C{name} from its text.

        @raise UsageError: for an unknown filter or a bad value.
        """
        if name not in FILTER_NAMES:
            raise UsageError(f"unknown filter {name!r}; filters are {', '.join(FILTER_NAMES)}")
        parsed: Any = value
        if name == "port":
            parsed = parse_port(value)
        elif name == "registered":
            parsed = parse_registered(value)
        setattr(self, name, parsed)

    def reset(self, name: str | None = None) -> None:
        """
        Reset filter C{name}, or all of them.
        """
        if name is None:
            for each in FILTER_NAMES:
                setattr(self, each, None)
            return
        if name not in FILTER_NAMES:
            raise UsageError(f"unknown filter {name!r}; filters are {', '.join(FILTER_NAMES)}")
        setattr(self, name, None)

    def overlaid(self, other: Filters) -> Filters:
        """
        These filters with those set in C{other} replacing them.
        """
        values = {n: getattr(self, n) for n in FILTER_NAMES}
        values.update({n: getattr(other, n) for n in FILTER_NAMES if getattr(other, n) is not None})
        return Filters(**values)

    def without(self, name: str) -> Filters:
        values = {n: getattr(self, n) for n in FILTER_NAMES if n != name}
        return Filters(**values)

    def query(self) -> Query:
        return Query(
            service=self.service,
            version=self.version,
            region=self.region,
            host=self.host,
            port=self.port,
            registered=self.registered,
        )

    def text(self, name: str) -> str:
        value = getattr(self, name)
        if value is None:
            return ""
        if isinstance(value, bool):
            return "true" if value else "false"
        return str(value)

    def to_json(self) -> dict[str, Any]:
        return {n: getattr(self, n) for n in FILTER_NAMES}


@attr.s(auto_attribs=True)
class Invocation:
    """
    One parsed command: its name, its arguments, its one-off filters and
    flags.
    """

    command: str | None
    args: list[str]
    filters: Filters
    json: bool = False
    yes: bool = False
    all_at_once: bool = False


_VALUE_OPTIONS = FILTER_NAMES
_FLAG_OPTIONS = {"json": "json", "yes": "yes", "y": "yes", "all-at-once": "all_at_once"}


def parse(argv: list[str]) -> Invocation:
    """
    Split C{argv} into the command, its arguments and options.

    Options (C{--service S}, C{--service=S}, C{-service S}, C{--json},
    C{--yes}) may come before or after the command; after C{deploy}'s
    C{MODULE:CLASS} everything is the service's arguments, and after C{--}
    everything is an argument.

    @raise UsageError: for an unknown option or a bad value.
    """
    filters = Filters()
    flags = {"json": False, "yes": False, "all_at_once": False}
    command: str | None = None
    args: list[str] = []
    i = 0
    while i < len(argv):
        word = argv[i]
        i += 1
        passthrough = command == "deploy" and args
        if word == "--" and not passthrough:
            args.extend(argv[i:])
            break
        if word.startswith("-") and len(word) > 1 and not passthrough:
            name, eq, value = word.lstrip("-").partition("=")
            if name in _FLAG_OPTIONS and not eq:
                flags[_FLAG_OPTIONS[name]] = True
                continue
            if name in _VALUE_OPTIONS:
                if not eq:
                    if i >= len(argv):
                        raise UsageError(f"option --{name} needs a value")
                    value = argv[i]
                    i += 1
                filters.set(name, value)
                continue
            raise UsageError(f"unknown option {word}")
        if command is None:
            command = word
        else:
            args.append(word)
    return Invocation(command, args, filters, json=flags["json"], yes=flags["yes"],
                      all_at_once=flags["all_at_once"])  # fmt: skip


#: The cluster's commands (L{skynet.cluster.commands}): their own options.
CLUSTER_COMMANDS = frozenset({"apply", "scale", "undeploy", "deployments", "rollout"})


def cluster_argv(argv: list[str]) -> list[str] | None:
    """
    C{argv} as L{skynet.cluster.commands.run_command} takes it (options
    given before the command moved after it), if it names a cluster
    command; else L{None}.
    """
    for index, word in enumerate(argv):
        if word == "--":
            return None
        if not word.startswith("-") or len(word) == 1:
            if word not in CLUSTER_COMMANDS:
                return None
            return [word, *argv[index + 1 :], *argv[:index]]
    return None


class _LineWriter:
    """
    A text stream for L{skynet.cluster.commands.run_command} whose
    complete lines go to C{emit} (a shell IO's C{out} or C{err}).
    """

    def __init__(self, emit: Callable[[str], Any]) -> None:
        self.emit = emit
        self.buffer = ""

    def write(self, text: str) -> int:
        self.buffer += text
        *lines, self.buffer = self.buffer.split("\n")
        for line in lines:
            self.emit(line)
        return len(text)

    def flush(self) -> None:
        if self.buffer:
            line, self.buffer = self.buffer, ""
            self.emit(line)


def split_line(line: str) -> list[str]:
    """
    Split a command line as a POSIX shell does (quotes keep JSON whole).

    @raise UsageError: for an unclosed quote.
    """
    try:
        return shlex.split(line)
    except ValueError as e:
        raise UsageError(f"cannot parse the line: {e}") from None


# Formatting


def format_instance(instance: Instance) -> str:
    """
    An instance as Go Skynet's C{sky instances} printed it.
    """
    registered = " [Registered]" if instance.registered else ""
    return f"{instance.host}:{instance.port} - {instance.name} {instance.version}{registered}"


def instance_json(instance: Instance) -> dict[str, Any]:
    """
    An instance for C{--json} output.
    """
    return {
        "uuid": instance.uuid,
        "name": instance.name,
        "version": instance.version,
        "region": instance.region,
        "host": instance.host,
        "port": instance.port,
        "address": str(instance.address),
        "admin": str(instance.admin) if instance.admin is not None else None,
        "registered": instance.registered,
        "pid": instance.pid,
    }


def topology(instances: Iterable[Instance]) -> dict[str, Any]:
    """
    Region > host > service > version > instances.
    """
    tree: dict[str, Any] = {}
    for i in sort_instances(instances):
        versions = tree.setdefault(i.region, {}).setdefault(i.host, {}).setdefault(i.name, {})
        versions.setdefault(i.version, []).append(i)
    return tree


def format_topology(instances: Iterable[Instance]) -> list[str]:
    """
    The topology as Go Skynet's C{sky topology} printed it (sorted).
    """
    lines = []
    for region, hosts in sorted(topology(instances).items()):
        lines.append(f"Region: {region}")
        for host, services in sorted(hosts.items()):
            lines.append(f"\tHost: {host}")
            for name, versions in sorted(services.items()):
                lines.append(f"\t\tService: {name}")
                for version, found in sorted(versions.items()):
                    lines.append(f"\t\t\tVersion: {version}")
                    for i in found:
                        registered = " [Registered]" if i.registered else ""
                        lines.append(f"\t\t\t\t{i.host}:{i.port}{registered}")
    return lines


def topology_json(instances: Iterable[Instance]) -> dict[str, Any]:
    return {
        region: {
            host: {
                name: {version: [instance_json(i) for i in found] for version, found in vs.items()}
                for name, vs in services.items()
            }
            for host, services in hosts.items()
        }
        for region, hosts in topology(instances).items()
    }


def plural(count: int, word: str, words: str | None = None) -> str:
    """
    C{"1 request"}, C{"2 requests"}.
    """
    return f"{count} {word if count == 1 else (words or word + 's')}"


def iso_time(value: Any) -> Any:
    """
    A Go Skynet time (C{2026-12-01T07:47:34Z+0000}, the layout the wire
    keeps) as ISO 8601 in UTC (C{2026-12-01T07:47:34Z}); anything else as
    it is.
    """
    if not isinstance(value, str) or not value:
        return value
    for layout in ("%Y-%m-%dT%H:%M:%SZ%z", "%Y-%m-%dT%H:%M:%S%z"):
        try:
            parsed = datetime.datetime.strptime(value, layout)
        except ValueError:
            continue
        return parsed.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return value


def stats_json(stats: dict[str, Any] | None) -> dict[str, Any] | None:
    """
    Statistics for C{--json}: Go Skynet's fields as published (their units
    are in docs/operators.md), with the times (C{StartTime}, C{LastRequest},
    C{Updated}) in ISO 8601.
    """
    if not stats:
        return stats
    out = dict(stats)
    for name in ("StartTime", "LastRequest", "Updated"):
        if name in out:
            out[name] = iso_time(out[name])
    return out


def _ms(nanoseconds: Any) -> str:
    try:
        return f"{float(nanoseconds) / 1e6:.2f} ms"
    except (TypeError, ValueError):
        return "? ms"


def format_stats(instance: Instance, stats: dict[str, Any] | None) -> str:
    """
    One instance's statistics on one line.
    """
    head = format_instance(instance)
    if not stats:
        return f"{head}: no statistics yet"
    parts = [
        plural(_int(stats.get("RequestsServed", 0)), "request"),
        plural(_int(stats.get("Errors", 0)), "error"),
        plural(_int(stats.get("Clients", 0)), "client"),
        f"avg {_ms(stats.get('AverageResponseTime', 0))}",
    ]
    if "P50ResponseTime" in stats:
        parts.append(f"p50 {_ms(stats['P50ResponseTime'])}")
    if "P99ResponseTime" in stats:
        parts.append(f"p99 {_ms(stats['P99ResponseTime'])}")
    if stats.get("LastRequest"):
        parts.append(f"last request {iso_time(stats['LastRequest'])}")
    return f"{head}: {', '.join(parts)}"


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def to_json(value: Any, pretty: bool = False) -> str:
    """
    JSON text of a result (BSON's types as their nearest JSON).
    """

    def default(o: Any) -> Any:
        if isinstance(o, bytes):
            return o.hex()
        return str(o)

    if pretty:
        return json.dumps(value, indent=2, sort_keys=True, default=default)
    return json.dumps(value, sort_keys=True, default=default)


# Remote calls: admin endpoints and exactly one instance


@attr.s(auto_attribs=True)
class ActionResult:
    """
    What one action did to one instance (or, for deploy, on one host).
    """

    action: str
    ok: bool
    message: str
    uuid: str | None = None
    service: str | None = None
    address: str | None = None
    host: str | None = None
    via: str | None = None

    def to_json(self) -> dict[str, Any]:
        return attr.asdict(self)


# The language


@implementer(IInstanceListener)
class _WatchPrinter:
    def __init__(self, io: IShellIO, as_json: bool) -> None:
        self.io = io
        self.as_json = as_json

    def _print(self, event: str, instance: Instance) -> None:
        if self.as_json:
            self.io.out(to_json({"event": event, "instance": instance_json(instance)}))
        else:
            self.io.out(f"{event} {format_instance(instance)}")

    def snapshot(self, instances: list[Instance]) -> None:
        for i in instances:
            self._print("present", i)

    def added(self, instance: Instance) -> None:
        self._print("added", instance)

    def updated(self, instance: Instance) -> None:
        self._print("updated", instance)

    def removed(self, instance: Instance) -> None:
        self._print("removed", instance)


class _Commands:
    """
    The commands that read (queries, watch, call) and those of the session
    (filters, help, python, exit): a part of L{Shell}.
    """

    registry: Any
    client: Any
    reactor: Any
    filters: Filters
    call_timeout: float | None

    namespace: Callable[[], dict[str, Any]]

    @staticmethod
    def _need_args(inv: Invocation, least: int, most: int, usage: str) -> None:
        if not least <= len(inv.args) <= most:
            raise UsageError(f"Usage: {usage}")

    # The simple commands (COMMAND_TABLE names the others' methods)

    async def _help(self, inv: Invocation, filters: Filters, io: IShellIO) -> int:
        io.out(HELP.rstrip("\n"))
        return 0

    async def _instances(self, inv: Invocation, filters: Filters, io: IShellIO) -> int:
        found = await self._matching(filters)
        if inv.json:
            io.out(to_json([instance_json(i) for i in found]))
        else:
            for i in found:
                io.out(format_instance(i))
        return 0

    async def _topology(self, inv: Invocation, filters: Filters, io: IShellIO) -> int:
        found = await self._matching(filters)
        if inv.json:
            io.out(to_json(topology_json(found)))
        else:
            for line in format_topology(found):
                io.out(line)
        return 0

    async def _filter(self, inv: Invocation, filters: Filters, io: IShellIO) -> int:
        name = inv.command
        assert name is not None
        if inv.args:
            self.filters.set(name, inv.args[0])
        if inv.json:
            io.out(to_json({name: getattr(self.filters, name)}))
        else:
            io.out(f"{name.capitalize()}: {self.filters.text(name)}")
        return 0

    async def _filters(self, inv: Invocation, filters: Filters, io: IShellIO) -> int:
        if inv.json:
            io.out(to_json(self.filters.to_json()))
        else:
            for name in FILTER_NAMES:
                io.out(f"{name.capitalize()}: {self.filters.text(name)}")
        return 0

    async def _reset(self, inv: Invocation, filters: Filters, io: IShellIO) -> int:
        self.filters.reset(inv.args[0] if inv.args else None)
        return 0

    async def _python(self, inv: Invocation, filters: Filters, io: IShellIO) -> int:
        io.python(self.namespace())
        return 0

    async def _exit(self, inv: Invocation, filters: Filters, io: IShellIO) -> int:
        io.exit()
        return 0

    # Queries

    async def _matching(self, filters: Filters) -> list[Instance]:
        """
        The instances matching C{filters}.

        @raise ShellError: if none does (a query that finds nothing exits 1,
            so that a typo does not look like an empty cluster).
        """
        found = await self.registry.query(filters.query())
        if not found:
            raise ShellError(_no_match(filters))
        return list(found)

    async def _list(self, command: str, filters: Filters, inv: Invocation, io: IShellIO) -> int:
        self._need_args(inv, 0, 0, command)
        if command == "versions" and filters.service is None:
            raise UsageError("Service name is required (set the service filter or --service)")
        field = {"services": "name", "hosts": "host", "regions": "region", "versions": "version"}
        found = await self._matching(filters)
        values = sorted({getattr(i, field[command]) for i in found})
        if inv.json:
            io.out(to_json(values))
        else:
            for value in values:
                io.out(value)
        return 0

    async def _stats(self, filters: Filters, inv: Invocation, io: IShellIO) -> int:
        found = await self._matching(filters)
        rows = []
        for instance in found:
            try:
                stats = await self.registry.get_stats(instance)
            except RegistryError:
                stats = None
            rows.append((instance, stats))
        if inv.json:
            io.out(
                to_json([{"instance": instance_json(i), "stats": stats_json(s)} for i, s in rows])
            )
        else:
            for instance, stats in rows:
                io.out(format_stats(instance, stats))
        return 0

    # Watching

    async def _watch(self, args: list[str], filters: Filters, inv: Invocation, io: IShellIO) -> int:
        seconds: float | None = None
        if args:
            try:
                seconds = float(args[0])
            except ValueError:
                raise UsageError(f"watch takes a number of seconds, not {args[0]!r}") from None
        watch = self.registry.watch(filters.query(), _WatchPrinter(io, inv.json))
        try:
            if seconds is None:
                await Deferred()  # until cancelled
            else:
                await deferLater(self.reactor, seconds, lambda: None)
        except CancelledError:
            return 0
        finally:
            watch.stop()
        return 0

    # Calls

    async def _call(self, args: list[str], filters: Filters, inv: Invocation, io: IShellIO) -> int:
        name, method = args[0], args[1]
        params: Any = {}
        if len(args) == 3:
            try:
                params = json.loads(args[2])
            except ValueError as e:
                raise UsageError(f"the parameters are not JSON: {e}") from None
            if not isinstance(params, dict):
                raise UsageError("the parameters must be a JSON object, like '{\"key\": 1}'")
        query = Query(
            service=name, version=filters.version, region=filters.region, host=filters.host
        )
        found = await self.registry.query(query)
        if not found:
            raise ShellError(f"no such service: {name}{_scope(filters)}")
        if not any(i.registered for i in found):
            raise ShellError(f"{name} has no registered instance{_scope(filters)}")
        service = self.client.service(
            name, version=filters.version, region=filters.region, host=filters.host
        )
        try:
            result = await service.call(method, params, timeout=self.call_timeout)
        except ServiceError as e:
            raise ShellError(f"{name}.{method} failed: {e}") from None
        except (RemoteCallError, RequestTimeout, NoInstances, ConnectionFailed) as e:
            raise ShellError(f"{name}.{method}: {e}") from None
        io.out(to_json(result, pretty=not inv.json))
        return 0


class _Completion:
    """
    Tab completion from the command names and the live registry: a part of
    L{Shell}.
    """

    registry: Any
    filters: Filters

    # Completion

    def complete(self, line: str) -> Deferred[list[str]]:
        """
        The completions of C{line} (the text before the cursor), each a
        whole line: commands, filter names, and live values from the
        registry (service names, versions, hosts, regions).
        """
        return ensureDeferred(self._complete(line))

    async def _complete(self, line: str) -> list[str]:
        words = line.split()
        if line.endswith(" ") or not words:
            words.append("")
        if len(words) == 1:
            return [c + " " for c in COMMANDS if c.startswith(words[0])]
        command, prefix = words[0], words[-1]
        head = line[: len(line) - len(prefix)]
        values: Iterable[str] = ()
        if len(words) == 2:
            if command in ("reset",):
                values = FILTER_NAMES
            elif command == "help":
                values = COMMANDS
            elif command == "registered":
                values = ("true", "false")
            elif command in ("service", "version", "host", "region", "port"):
                values = await self._live_values(command)
            elif command == "call":
                values = await self._live_values("service", registered_only=True)
        return [head + v + " " for v in sorted(set(values)) if v.startswith(prefix)]

    async def _live_values(self, name: str, registered_only: bool = False) -> list[str]:
        query = self.filters.without(name).query()
        if registered_only:
            query = attr.evolve(query, registered=True)
        try:
            found = await self.registry.query(query)
        except Exception:
            return []
        field = {"service": "name", "version": "version", "host": "host", "region": "region"}
        if name == "port":
            return [str(i.port) for i in found]
        return [getattr(i, field[name]) for i in found]


class Shell(_Commands, _Completion):
    """
    A session of the command language: its filters and the objects it acts
    on.

    @param registry: a started L{skynet.registry.IRegistry}.
    @param client: a L{skynet.client.Client} on that registry (for C{call}
        and for reaching daemons through its C{connector}).
    @param daemon: the local daemon object, if any (bound in C{python}).
    @param interactive: ask for confirmation before any action, not only
        those on several instances (as Go Skynet's C{sky cli} did).
    @param admin: how to make an admin call: C{admin(address,
        servicemethod, params, tls=...)} returning a Deferred (default:
        L{admin_call}, over TLS when the instance advertises C{AdminTLS}).
    @param timeout: seconds a daemon or an admin endpoint has to answer.
    @param namespace: more objects to bind in C{python}.
    """

    log = Logger()

    def __init__(
        self,
        registry: Any,
        client: Any,
        *,
        reactor: Any = None,
        daemon: Any = None,
        interactive: bool = False,
        admin: Callable[..., Deferred] | None = None,
        timeout: float = 30.0,
        call_timeout: float | None = None,
        namespace: dict[str, Any] | None = None,
    ) -> None:
        self.reactor = reactor = default_reactor(reactor)
        self.registry = registry
        self.client = client
        self.daemon = daemon
        self.interactive = interactive
        self.timeout = timeout
        self.call_timeout = call_timeout
        self.filters = Filters()
        self.extra_namespace = dict(namespace or {})
        self._admin: Callable[..., Deferred] = admin or self._admin_call

    def _admin_call(self, address: Address, method: str, params: dict[str, Any],
                    tls: bool | None = None) -> Deferred:  # fmt: skip
        return admin_call(self.reactor, address, method, params, self.timeout, tls=tls)

    # Running commands

    def run_line(self, line: str, io: IShellIO) -> Deferred[int]:
        """
        Run one command line; fire with its exit status (0 when it
        succeeded).  Cancelling the Deferred interrupts the command.
        """
        try:
            argv = split_line(line)
        except ShellError as e:
            io.err(str(e))
            return succeed(2)
        return self.run(argv, io)

    def run(self, argv: list[str], io: IShellIO) -> Deferred[int]:
        """
        Run one command given as words; fire with its exit status: 0 for
        success, 1 for a failure, 2 for a usage error.  Errors are written
        to C{io} as one line; the Deferred never fails.
        """
        return ensureDeferred(self._run(argv, io))

    async def _run(self, argv: list[str], io: IShellIO) -> int:
        cluster_words = cluster_argv(argv)
        if cluster_words is not None:
            return await self._cluster(cluster_words, io)
        try:
            # (observe hook) stats --by-method, logs: skynet.observe.commands
            from skynet.observe.commands import dispatch as observe_dispatch

            status = await observe_dispatch(self, argv, io)
            if status is not None:
                return status
            invocation = parse(argv)
            return await self._dispatch(invocation, io)
        except UsageError as e:
            io.err(str(e))
            return 2
        except ShellError as e:
            io.err(str(e))
            return 1
        except RegistryError as e:
            io.err(f"registry unreachable ({getattr(self.registry, 'url', '?')}): {e}")
            return 1
        except CancelledError:
            io.err("interrupted")
            return 130
        except Exception as e:
            self.log.failure("command {argv!r} failed", argv=argv)
            io.err(f"error: {type(e).__name__}: {e}")
            return 1

    async def _dispatch(self, inv: Invocation, io: IShellIO) -> int:
        if inv.command is None:
            if inv.json:
                io.out(to_json(self.filters.to_json()))
            return 0
        spec = COMMAND_TABLE.get(inv.command)
        if spec is None:
            raise UsageError(
                f"Unknown command {inv.command!r} - type 'help' for a list of commands"
            )
        if spec.least is not None and not (
            spec.least <= len(inv.args) <= (len(inv.args) if spec.most is None else spec.most)
        ):
            raise UsageError(f"Usage: {spec.usage}")
        return await spec.run(self, inv, self.filters.overlaid(inv.filters), io)

    async def _cluster(self, argv: list[str], io: IShellIO) -> int:
        """
        A cluster command (L{skynet.cluster.commands.run_command}), its
        output line by line on C{io}.
        """
        from skynet.cluster.commands import run_command

        out, err = _LineWriter(io.out), _LineWriter(io.err)
        try:
            return await run_command(argv, self.registry, out, err,  # type: ignore[arg-type]
                                     reactor=self.reactor)  # fmt: skip
        except CancelledError:
            io.err("interrupted")
            return 130
        except Exception as e:
            self.log.failure("command {argv!r} failed", argv=argv)
            io.err(f"error: {type(e).__name__}: {e}")
            return 1
        finally:
            out.flush()
            err.flush()

    def namespace(self) -> dict[str, Any]:
        """
        What C{python} binds: C{registry}, C{client}, C{daemon}, C{shell},
        C{reactor}, C{Query}, and the extra objects given.
        """
        namespace = {
            "registry": self.registry,
            "client": self.client,
            "daemon": self.daemon,
            "shell": self,
            "reactor": self.reactor,
            "Query": Query,
        }
        namespace.update(self.extra_namespace)
        return namespace

    # Actions

    async def _confirm(self, io: IShellIO, inv: Invocation, count: int, question: str) -> bool:
        if inv.yes or count == 0 or (count == 1 and not self.interactive):
            return True
        return bool(await io.confirm(f"{question}, Are you sure? (Y/N) > "))

    async def _daemons(self) -> dict[str, list[Instance]]:
        daemons: dict[str, list[Instance]] = {}
        for d in await self.registry.query(Query(service=DAEMON_SERVICE, registered=True)):
            daemons.setdefault(d.host, []).append(d)
        return daemons

    async def _ask_daemon(self, daemon: Instance, method: str, params: dict[str, Any]) -> Any:
        try:
            return await call_instance(
                self.reactor, daemon, method, params, self.timeout, self.client.connector
            )
        except (ConnectionFailed, ConnectionError, OSError) as e:
            raise ShellError(f"daemon not reachable on host {daemon.host}: {e}") from None

    async def _routes(
        self, instances: list[Instance]
    ) -> tuple[dict[str, Instance], dict[str, str]]:
        """
        Which daemon supervises each instance, and the hosts whose daemon
        could not be asked (with why).
        """
        daemons = await self._daemons()
        supervisor: dict[str, Instance] = {}
        unreachable: dict[str, str] = {}
        for host in sorted({i.host for i in instances}):
            for daemon in daemons.get(host, []):
                try:
                    answer = await self._ask_daemon(daemon, LIST_SUB_SERVICES, {})
                except ShellError as e:
                    unreachable[host] = str(e)
                    continue
                except SkynetError as e:
                    unreachable[host] = f"daemon on host {host} failed: {e}"
                    continue
                try:
                    managed = sub_services_from_bson(answer)
                except ValueError as e:
                    unreachable[host] = f"daemon on host {host} answered ListSubServices badly: {e}"
                    continue
                for uuid in managed:
                    supervisor[uuid] = daemon
        return supervisor, unreachable

    async def _act(self, action: str, filters: Filters, inv: Invocation, io: IShellIO) -> int:
        found = await self.registry.query(filters.query())
        instances = [i for i in found if i.name != DAEMON_SERVICE]
        if not instances:
            daemons = [i for i in found if i.name == DAEMON_SERVICE]
            if daemons:
                raise ShellError(_daemon_refusal(action, daemons))
            raise ShellError(_no_match(filters))
        past, _ = _ACTIONS[action]
        question = f"{plural(len(instances), 'instance')} will be {past}"
        if not await self._confirm(io, inv, len(instances), question):
            io.err("Cancelled.")
            return 1
        supervisor, unreachable = await self._routes(instances)
        if action == "restart" and len(instances) > 1 and not inv.all_at_once:
            return await self._rolling_restart(instances, supervisor, unreachable, inv, io)
        results = []
        for instance in instances:
            result = await self._act_on(action, instance, supervisor, unreachable)
            results.append(result)
            if not inv.json:
                (io.out if result.ok else io.err)(result.message)
        if inv.json:
            io.out(to_json([r.to_json() for r in results]))
        return 0 if all(r.ok for r in results) else 1

    async def _rolling_restart(
        self,
        instances: list[Instance],
        supervisor: dict[str, Instance],
        unreachable: dict[str, str],
        inv: Invocation,
        io: IShellIO,
    ) -> int:
        """
        Restart several instances one at a time, capacity never below what
        it was: for each, its daemon starts a fresh process of the same
        service and arguments (a new uuid); once that one is registered
        and answers a call, the old one is stopped (it drains).  The first
        failure stops the restart; the instances not reached yet are left
        as they were.
        """
        from skynet.cluster.reconciler import STATE_KEY, StoredState, call_probe

        # A cluster deployment's instances are the leader's to replace: a new
        # uuid here would be adopted and the old one re-created (churn).
        try:
            stored = StoredState.from_bytes(await self.registry.get_value(STATE_KEY))
        except Exception:
            stored = StoredState()
        owners = {u: name for name, record in stored.deployments.items()
                  for u in record.instances}  # fmt: skip
        managed = sorted({owners[i.uuid] for i in instances if i.uuid in owners})
        if managed:
            raise ShellError(
                f"these instances belong to the cluster deployment(s) {', '.join(managed)}: "
                f"`sky rollout restart {managed[0]}` replaces them one at a time through the "
                "leader (or restart with --all-at-once, in place)"
            )
        probe = call_probe(self.reactor, timeout=min(self.timeout, 5.0),
                           connector=self.client.connector)  # fmt: skip
        results: list[ActionResult] = []

        def report(r: ActionResult) -> None:
            results.append(r)
            if not inv.json:
                (io.out if r.ok else io.err)(r.message)

        for index, instance in enumerate(sorted(instances, key=lambda i: (i.host, i.uuid))):
            uuid = instance.uuid

            def failed(why: str, uuid: str = uuid, instance: Instance = instance) -> ActionResult:
                return ActionResult("restart", False,
                                    f"Could not restart service with UUID {uuid}: {why}", uuid,
                                    instance.name, str(instance.address), instance.host,
                                    "daemon")  # fmt: skip

            daemon = supervisor.get(uuid)
            if daemon is None:
                report(await self._act_on("restart", instance, supervisor, unreachable))
                break
            try:
                listing = sub_services_from_bson(
                    await self._ask_daemon(daemon, "ListSubServices", {})
                )
                sub = listing.get(uuid)
                if sub is None:
                    report(failed(f"the daemon on host {daemon.host} no longer runs it"))
                    break
                answer = await self._ask_daemon(daemon, "Deploy", {
                    "service": sub.service, "args": list(sub.args), "registered": True})  # fmt: skip
                new_uuid = answer.get("uuid") if isinstance(answer, dict) else None
                if not isinstance(new_uuid, str):
                    report(failed(f"the daemon on host {daemon.host} answered {answer!r}"))
                    break
                fresh = await self._wait_answering(new_uuid, probe)
                if fresh is None:
                    await self._ask_daemon(daemon, "StopSubService", {"uuid": new_uuid})
                    report(failed(f"its replacement {new_uuid} did not answer within "
                                  f"{self.timeout:g}s (stopped; the old one keeps serving)"))  # fmt: skip
                    break
                await self._ask_daemon(daemon, "StopSubService", {"uuid": uuid})
            except (ShellError, SkynetError, ValueError) as e:
                report(failed(str(e)))
                break
            report(ActionResult(
                "restart", True,
                f"Restarted service with UUID {uuid} ({index + 1}/{len(instances)}): now "
                f"{new_uuid} at {fresh.address}, registered and answering.",
                uuid, instance.name, str(instance.address), instance.host, "daemon"))  # fmt: skip
        ok = len(results) == len(instances) and all(r.ok for r in results)
        if inv.json:
            io.out(to_json([r.to_json() for r in results]))
        elif ok:
            io.out(f"Restarted {plural(len(instances), 'instance')}, one at a time.")
        return 0 if ok else 1

    async def _wait_answering(self, uuid: str, probe: Callable[[Instance], Any]) -> Any:
        """
        The instance C{uuid} once it is registered and answers a call, or
        L{None} after C{self.timeout} seconds.
        """
        deadline = self.reactor.seconds() + self.timeout
        while self.reactor.seconds() < deadline:
            found = await self.registry.query(Query(uuid=uuid, registered=True))
            if found and await probe(found[0]):
                return found[0]
            await deferLater(self.reactor, 0.1, lambda: None)
        return None

    async def _act_on(
        self,
        action: str,
        instance: Instance,
        supervisor: dict[str, Instance],
        unreachable: dict[str, str],
    ) -> ActionResult:
        _, done = _ACTIONS[action]
        uuid = instance.uuid

        def result(ok: bool, message: str, via: str | None) -> ActionResult:
            return ActionResult(
                action=action,
                ok=ok,
                message=message,
                uuid=uuid,
                service=instance.name,
                address=str(instance.address),
                host=instance.host,
                via=via,
            )

        def failed(why: str, via: str | None) -> ActionResult:
            return result(False, f"Could not {action} service with UUID {uuid}: {why}", via)

        daemon = supervisor.get(uuid)
        if daemon is not None:
            try:
                answer = await self._ask_daemon(daemon, DAEMON_ACTIONS[action], {"uuid": uuid})
            except ShellError as e:
                return failed(str(e), "daemon")
            except SkynetError as e:
                return failed(f"the daemon on host {daemon.host} said: {e}", "daemon")
            if isinstance(answer, dict) and answer.get("ok") is False:
                if action == "stop":
                    return result(True, f"Service with UUID {uuid} is already stopped.", "daemon")
                if action == "restart":
                    return result(False, f"Service with UUID {uuid} is not running.", "daemon")
            return result(True, f"{done} service with UUID {uuid}.", "daemon")
        if instance.host in unreachable:
            return failed(unreachable[instance.host], "daemon")
        if action == "restart":
            return failed(
                f"no {DAEMON_SERVICE} supervises {instance.name} at {instance.address}; restart"
                " is only possible through a daemon (stop it, or run it under twistd"
                " skynet-daemon)",
                None,
            )
        if instance.admin is None:
            return failed(
                f"no {DAEMON_SERVICE} supervises {instance.name} at {instance.address} and it"
                " has no admin endpoint",
                None,
            )
        method, params = ADMIN_ACTIONS[action]
        try:
            # TLS exactly when the instance advertises it: a process with
            # credentials still reaches a Go service's plain admin endpoint.
            await self._admin(instance.admin, method, params,
                              tls=bool(instance.extra.get("AdminTLS")))  # fmt: skip
        except (ConnectionFailed, RemoteCallError, ConnectionError, OSError) as e:
            return failed(f"admin endpoint {instance.admin}: {e}", "admin")
        return result(True, f"{done} service with UUID {uuid}.", "admin")

    async def _deploy(
        self, spec: str, args: list[str], filters: Filters, inv: Invocation, io: IShellIO
    ) -> int:
        if ":" not in spec:
            raise UsageError(f"deploy needs MODULE:CLASS, not {spec!r}")
        found = await self.registry.query(filters.query())
        hosts = sorted({i.host for i in found})
        daemons = await self._daemons()
        targets = [h for h in hosts if h in daemons]
        if not inv.json:
            for host in hosts:
                if host not in daemons:
                    io.err(f"Skipping host {host}: no {DAEMON_SERVICE} runs there.")
        if not targets:
            raise ShellError(
                f"no {DAEMON_SERVICE} runs on a host matching the filters{_filter_text(filters)}"
            )
        question = f"Service will be deployed to {plural(len(targets), 'host')}"
        if not await self._confirm(io, inv, len(targets), question):
            io.err("Cancelled.")
            return 1
        if not inv.json:
            io.out(f"deploying {' '.join([spec] + args)}")
        results = []
        for host in targets:
            daemon = daemons[host][0]
            params = {"service": spec, "args": list(args), "registered": True}
            try:
                answer = await self._ask_daemon(daemon, "Deploy", params)
            except (ShellError, SkynetError) as e:
                ok, uuid, message = False, None, f"Could not deploy {spec} to {host}: {e}"
            else:
                uuid = answer.get("uuid") if isinstance(answer, dict) else None
                ok, message = True, f"Deployed service with UUID {uuid}."
            r = ActionResult("deploy", ok, message, uuid, spec, None, host, "daemon")
            results.append(r)
            if not inv.json:
                (io.out if r.ok else io.err)(r.message)
        if inv.json:
            io.out(to_json([r.to_json() for r in results]))
        return 0 if all(r.ok for r in results) else 1


@attr.s(frozen=True, auto_attribs=True)
class CommandSpec:
    """
    One command of the language: what runs it, and the number of its
    arguments (C{least} L{None}: not checked; C{most} L{None}: no limit).
    """

    run: Callable[[Shell, Invocation, Filters, IShellIO], Awaitable[int]]
    least: int | None = None
    most: int | None = None
    usage: str = ""


async def _observe_logs(shell: Shell, inv: Invocation, filters: Filters, io: IShellIO) -> int:
    from skynet.observe.logsearch import run_logs_command  # (observe hook)

    return await run_logs_command(shell, filters, inv, {}, io)


async def _observe_trace(shell: Shell, inv: Invocation, filters: Filters, io: IShellIO) -> int:
    from skynet.observe.tracing import run_trace_command  # (trace hook)

    return await run_trace_command(shell, filters, inv, io)


def _table() -> dict[str, CommandSpec]:
    table = {
        "help": CommandSpec(Shell._help),
        "h": CommandSpec(Shell._help),
        "instances": CommandSpec(Shell._instances),
        "topology": CommandSpec(Shell._topology),
        "filters": CommandSpec(Shell._filters),
        "reset": CommandSpec(Shell._reset, 0, 1, "reset [<filter>]"),
        "deploy": CommandSpec(
            lambda sh, inv, f, io: sh._deploy(inv.args[0], inv.args[1:], f, inv, io),
            1,
            None,
            "deploy <MODULE:CLASS> <args>",
        ),  # fmt: skip
        "call": CommandSpec(
            lambda sh, inv, f, io: sh._call(inv.args, f, inv, io),
            2,
            3,
            'call SERVICE METHOD [\'{"json": "params"}\']',
        ),  # fmt: skip
        "watch": CommandSpec(
            lambda sh, inv, f, io: sh._watch(inv.args, f, inv, io), 0, 1, "watch [SECONDS]"
        ),  # fmt: skip
        "stats": CommandSpec(lambda sh, inv, f, io: sh._stats(f, inv, io), 0, 0, "stats"),
        "python": CommandSpec(Shell._python),
        # (observe hook) logs and its options are run by skynet.observe.commands.dispatch
        "logs": CommandSpec(lambda sh, inv, f, io: _observe_logs(sh, inv, f, io)),
        "trace": CommandSpec(  # (trace hook) skynet.observe.tracing
            lambda sh, inv, f, io: _observe_trace(sh, inv, f, io), 1, 1, "trace REQUEST_ID"
        ),
        "exit": CommandSpec(Shell._exit),
        "quit": CommandSpec(Shell._exit),
    }
    for name in ("services", "hosts", "regions", "versions"):
        table[name] = CommandSpec(lambda sh, inv, f, io: sh._list(str(inv.command), f, inv, io))
    for name in FILTER_NAMES:
        table[name] = CommandSpec(Shell._filter, 0, 1, f"{name} [<{name}>]")
    for name in _ACTIONS:
        table[name] = CommandSpec(lambda sh, inv, f, io: sh._act(str(inv.command), f, inv, io), 0,
                                  0, name)  # fmt: skip
    return table


#: Every command, by name: the shell's dispatch table.
COMMAND_TABLE = _table()


def _no_match(filters: Filters) -> str:
    text = _filter_text(filters)
    return f"no instance matches the filters{text}" if text else "no instance in the registry"


def _daemon_refusal(action: str, daemons: list[Instance]) -> str:
    """
    Why C{sky stop} (and the other actions) leave daemons alone, and how
    to stop one.
    """
    where = ", ".join(
        f"on {d.host}: kill {d.pid}" if d.pid else f"on {d.host}: stop its twistd process"
        for d in sort_instances(daemons)
    )
    return (
        f"{DAEMON_SERVICE} instances are not acted on with '{action}': a daemon supervises"
        f" its host's services and they stop with it. To stop a daemon and its services,"
        f" send its process SIGTERM ({where})"
    )


def _filter_text(filters: Filters) -> str:
    set_ = [f"{n}={filters.text(n)}" for n in FILTER_NAMES if getattr(filters, n) is not None]
    return f" ({', '.join(set_)})" if set_ else ""


def _scope(filters: Filters) -> str:
    set_ = [
        f"{n}={filters.text(n)}"
        for n in ("version", "region", "host")
        if getattr(filters, n) is not None
    ]
    return f" ({', '.join(set_)})" if set_ else ""


# The shell on a terminal


class History:
    """
    Command lines kept in a file across sessions (the newest last), the
    file readable by its owner only.

    @param path: the file, or L{None} to keep nothing.
    @param limit: how many lines to keep.
    """

    def __init__(self, path: str | None, limit: int = 1000) -> None:
        self.path = path
        self.limit = limit

    def load(self) -> list[bytes]:
        if self.path is None:
            return []
        try:
            with open(self.path, "rb") as f:
                lines = f.read().splitlines()
        except OSError:
            return []
        return [line for line in lines if line][-self.limit :]

    def append(self, line: bytes) -> None:
        if self.path is None or not line.strip():
            return
        try:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            with os.fdopen(fd, "ab") as f:
                f.write(line.replace(b"\n", b" ") + b"\n")
            if os.path.getsize(self.path) > self.limit * 400:
                self._trim()
        except OSError as e:
            Shell.log.warn(
                "cannot write the shell history {path}: {error}", path=self.path, error=e
            )

    def _trim(self) -> None:
        lines = self.load()
        tmp = f"{self.path}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(b"".join(line + b"\n" for line in lines))
        os.replace(tmp, self.path)  # type: ignore[arg-type]


def default_history_path(name: str = "history") -> str:
    """
    C{$SKYNET_HOME/<name>}, else C{~/.skynet/<name>}.
    """
    return skynet_path(name)


CTRL_C = b"\x03"
CTRL_D = b"\x04"
CTRL_L = b"\x0c"
CTRL_A = b"\x01"
CTRL_E = b"\x05"
CTRL_U = b"\x15"

BANNER = "Skynet Interactive Shell (type 'help' for a list of commands)"


class PythonManhole(ColoredManhole):
    """
    The C{python} command's interpreter: a Twisted manhole on the same
    terminal; Ctrl-D on an empty line (or Ctrl-\\) gives the terminal back.
    """

    def __init__(self, namespace: dict[str, Any], on_exit: Callable[[], None]) -> None:
        super().__init__(namespace)
        self.on_exit = on_exit

    def initializeScreen(self) -> None:
        namespace: dict[str, Any] = self.namespace or {}
        names = ", ".join(sorted(k for k in namespace if not k.startswith("_")))
        self.terminal.write(f"Python manhole: {names} are bound; Ctrl-D returns to the shell.\n")
        self.terminal.write(self.ps[self.pn])
        self.setInsertMode()

    def terminalSize(self, width: int, height: int) -> None:
        self.width, self.height = width, height

    def handle_QUIT(self) -> None:
        self.on_exit()


class ShellProtocol(recvline.HistoricRecvLine):
    """
    The command language on a terminal (an insults terminal protocol):
    line editing, history kept in a file, Tab completion, Ctrl-C to
    interrupt a command (C{watch}), Ctrl-D or C{exit} to leave.

    @param shell_factory: makes the session's L{Shell}.
    @param history: where the history is kept.
    @param on_close: called once when the terminal goes away.
    """

    ps = (b"> ", b"> ")
    log = Logger()

    def __init__(
        self,
        shell_factory: Callable[[], Shell],
        history: History | None = None,
        on_close: Callable[[], None] | None = None,
        banner: str = BANNER,
    ) -> None:
        self.shell_factory = shell_factory
        self.history = history or History(None)
        self.on_close = on_close
        self.banner = banner
        self.shell: Shell | None = None
        self.running: Deferred | None = None
        self.pending: Deferred | None = None
        self.python_shell: PythonManhole | None = None
        self.closed = False
        self.exiting = False
        self._edits = 0

    # Set up

    def connectionMade(self) -> None:
        super().connectionMade()
        self.historyLines = self.history.load()
        self.historyPosition = len(self.historyLines)
        self.keyHandlers.update(
            {
                CTRL_C: self.handle_INT,
                CTRL_D: self.handle_EOF,
                CTRL_L: self.handle_FF,
                CTRL_A: self.handle_HOME,
                CTRL_E: self.handle_END,
                CTRL_U: self.handle_KILL,
            }
        )
        self.shell = self.shell_factory()

    def initializeScreen(self) -> None:
        # No reset: leave what the terminal shows above us alone.
        if self.banner:
            self.terminal.write(self.banner + "\n")
        self.terminal.write(self.ps[self.pn])
        self.setInsertMode()

    def terminalSize(self, width: int, height: int) -> None:
        self.width, self.height = width, height
        if self.python_shell is not None:
            self.python_shell.terminalSize(width, height)

    def connectionLost(self, reason: Any = None) -> None:
        if self.closed:
            return
        self.closed = True
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.callback(False)
        if self.running is not None:
            self.running.cancel()
        if self.python_shell is not None:
            self.python_shell.connectionLost(reason)
            self.python_shell = None
        if self.on_close is not None:
            self.on_close()

    # Keys

    def keystrokeReceived(self, keyID: bytes, modifier: Any) -> None:
        if self.python_shell is not None:
            self.python_shell.keystrokeReceived(keyID, modifier)
            return
        if self.running is not None and self.pending is None:
            # A command runs: only Ctrl-C (interrupt) means something.
            if keyID == CTRL_C and not self.running.called:
                self.terminal.write("^C\n")
                self.running.cancel()
            return
        self._edits += 1
        super().keystrokeReceived(keyID, modifier)

    def handle_INT(self) -> None:
        if self.pending is not None:
            self.lineBuffer, self.lineBufferIndex = [], 0
            self.terminal.write("^C\n")
            pending, self.pending = self.pending, None
            pending.callback(False)
            return
        self.lineBuffer, self.lineBufferIndex = [], 0
        self.historyPosition = len(self.historyLines)
        self.terminal.write("^C\n")
        self.terminal.write(self.ps[self.pn])

    def handle_EOF(self) -> None:
        if self.lineBuffer:
            self.handle_DELETE()
        elif self.pending is not None:
            self.handle_INT()
        else:
            self.terminal.write("\n")
            self.exit()

    def handle_FF(self) -> None:
        self.terminal.eraseDisplay()
        self.terminal.cursorHome()
        self.drawInputLine()

    def handle_KILL(self) -> None:
        self.handle_HOME()
        self.terminal.eraseToLineEnd()
        self.lineBuffer, self.lineBufferIndex = [], 0

    def handle_RETURN(self) -> None:
        if self.pending is not None:
            # An answer to a question: not a command for the history.
            return recvline.RecvLine.handle_RETURN(self)
        return super().handle_RETURN()

    def handle_TAB(self) -> None:
        if self.pending is not None or self.shell is None:
            return
        before = b"".join(self.lineBuffer[: self.lineBufferIndex]).decode("ascii", "replace")
        edits = self._edits
        d = self.shell.complete(before)
        d.addCallback(self._completed, before, edits)
        d.addErrback(lambda f: self.log.failure("completion of {line!r} failed", f, line=before))

    def _completed(self, candidates: list[str], before: str, edits: int) -> None:
        if self.closed or edits != self._edits or self.running is not None:
            return  # the line changed meanwhile
        if not candidates:
            self.terminal.write(b"\a")
            return
        common = os.path.commonprefix(candidates)
        if len(candidates) == 1 or len(common) > len(before):
            after = b"".join(self.lineBuffer[self.lineBufferIndex :])
            self._replace_line(common.encode("ascii", "replace"), after)
            return
        shown = sorted({c[len(before) - len(before.split(" ")[-1]) :].strip() for c in candidates})
        self.terminal.write("\n" + "  ".join(shown) + "\n")
        self.drawInputLine()
        back = len(self.lineBuffer) - self.lineBufferIndex
        if back:
            self.terminal.cursorBackward(back)

    def _replace_line(self, before: bytes, after: bytes) -> None:
        self.handle_HOME()
        self.terminal.eraseToLineEnd()
        text = before + after
        self.lineBuffer = [text[i : i + 1] for i in range(len(text))]
        self.lineBufferIndex = len(before)
        self.terminal.write(text)
        if after:
            self.terminal.cursorBackward(len(after))

    # Lines

    def lineReceived(self, line: bytes) -> None:
        if self.pending is not None:
            pending, self.pending = self.pending, None
            self.ps = ShellProtocol.ps
            pending.callback(line.strip().upper() in (b"Y", b"YES"))
            return
        text = line.decode("utf-8", "replace").strip()
        if not text or self.shell is None:
            self.terminal.write(self.ps[self.pn])
            return
        self.history.append(line.strip())
        self.running = self.shell.run_line(text, self)
        self.running.addBoth(self._finished)

    def _finished(self, status: Any) -> None:
        self.running = None
        if self.closed or self.exiting or self.python_shell is not None:
            return
        self.terminal.write(self.ps[self.pn])

    # IShellIO

    def out(self, text: str) -> None:
        if not self.closed:
            self.terminal.write(text + "\n")

    err = out

    def confirm(self, question: str) -> Deferred[bool]:
        if self.closed:
            return succeed(False)
        self.pending = Deferred()
        self.ps = (question.encode("utf-8"),) * 2
        self.terminal.write(self.ps[0])
        d: Deferred[bool] = self.pending
        return d

    def python(self, namespace: dict[str, Any]) -> None:
        self.python_shell = PythonManhole(namespace, self._python_done)
        self.python_shell.makeConnection(self.terminal)
        self.python_shell.terminalSize(self.width, self.height)

    def _python_done(self) -> None:
        self.python_shell = None
        self.terminal.write("\n")
        self.lineBuffer, self.lineBufferIndex = [], 0
        self.terminal.write(self.ps[self.pn])

    def exit(self) -> None:
        self.exiting = True
        if not self.closed:
            # Not self.terminal.loseConnection(): it resets (clears) the
            # user's terminal.
            self.terminal.resetModes([recvline.insults.modes.IRM])
            self.terminal.transport.loseConnection()
