"""
Searching the JSON logs of a host (L{skynet.observe.logs}), for the daemon's
C{SearchLogs} method, and C{sky logs}, which asks every daemon of the hosts
that match its filters and merges their answers by time (L{fan_out}, which
the dashboard's logs view, L{skynet.web.logs}, uses too).

A search without a cursor answers the newest C{limit} matching events
(oldest first) and a cursor at the end of every file as it was when the
search began.  A search with a cursor answers the matching events written
since, and a new cursor: a caller polling with the cursor of each answer
misses nothing and sees nothing twice, across rotations (the cursor holds
an offset per file identity, device and inode, and a rotated file keeps
its inode).

C{SearchLogs} parameters (all optional):

    service, version, uuid, request_id   exact matches
    grep          a regular expression (Python syntax) searched in the text
    since, until  POSIX times
    level         the least level: debug, info, warn, error, critical
    limit         most events in the answer (default 100, at most 10000)
    cursor        from a previous answer: only what was written since

answer: C{{events: [event], cursor, more, errors: [str]}}, each event
C{{time, level, service, version, uuid, host, request_id, method, text,
namespace, file}}; C{more} is true when a limit or the read budget stopped
the search early (poll again at once); C{errors} names files that could
not be read (the others are still searched).
"""

from __future__ import annotations

import base64
import heapq
import json
import os
import re
import time
from collections.abc import Iterator
from typing import Any

import attr

from skynet.observe.logs import JSON_SUFFIX, json_log_name

#: The levels, least severe first.
LEVELS = ("debug", "info", "warn", "error", "critical")
_LEVEL_ALIASES = {"warning": "warn", "err": "error", "fatal": "critical", "crit": "critical"}

DEFAULT_LIMIT = 100
MAX_LIMIT = 10000
#: Bytes read backwards at a time.
BLOCK = 1 << 20
#: Bytes a follow poll reads per file at most (the rest comes next poll).
FOLLOW_BUDGET = 16 << 20

_RS = b"\x1e"
_TEXT = b'"skynet_text": "'
_TIME = re.compile(rb'"log_time": (-?[0-9.eE+\-]+)')
_LITERAL = re.compile(r"[\w ,/:=@'<>%!-]+")


class SearchError(ValueError):
    """
    A search cannot be run as asked (the message says why).
    """


def parse_level(value: str) -> str:
    """
    @raise SearchError: unless C{value} names a level.
    """
    lowered = _LEVEL_ALIASES.get(value.lower(), value.lower())
    if lowered not in LEVELS:
        raise SearchError(f"unknown level {value!r}; levels are {', '.join(LEVELS)}")
    return lowered


def _optional_str(params: dict[str, Any], key: str) -> str | None:
    value = params.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise SearchError(f"{key} must be a string, not {type(value).__name__}")
    return value


def _optional_time(params: dict[str, Any], key: str) -> float | None:
    value = params.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SearchError(f"{key} must be a POSIX time, not {value!r}")
    return float(value)


@attr.s(frozen=True, slots=True, auto_attribs=True)
class LogQuery:
    """
    One search (see the module docstring for the fields).
    """

    service: str | None = None
    version: str | None = None
    uuid: str | None = None
    request_id: str | None = None
    grep: str | None = None
    since: float | None = None
    until: float | None = None
    level: str | None = None
    limit: int = DEFAULT_LIMIT
    cursor: str | None = None

    @classmethod
    def from_bson(cls, params: Any) -> LogQuery:
        """
        @raise SearchError: naming the bad parameter.
        """
        if not isinstance(params, dict):
            raise SearchError("the parameters must be a document")
        limit = params.get("limit", DEFAULT_LIMIT)
        if limit is None:
            limit = DEFAULT_LIMIT
        if isinstance(limit, bool) or not isinstance(limit, int) or not 0 < limit <= MAX_LIMIT:
            raise SearchError(f"limit must be a whole number from 1 to {MAX_LIMIT}, not {limit!r}")
        level = _optional_str(params, "level")
        query = cls(
            service=_optional_str(params, "service"),
            version=_optional_str(params, "version"),
            uuid=_optional_str(params, "uuid"),
            request_id=_optional_str(params, "request_id"),
            grep=_optional_str(params, "grep"),
            since=_optional_time(params, "since"),
            until=_optional_time(params, "until"),
            level=parse_level(level) if level else None,
            limit=int(limit),
            cursor=_optional_str(params, "cursor"),
        )
        query.pattern()  # checks the expression
        return query

    def to_bson(self) -> dict[str, Any]:
        return {k: v for k, v in attr.asdict(self).items() if v is not None}

    def pattern(self) -> re.Pattern[str] | None:
        """
        @raise SearchError: for a bad regular expression.
        """
        if self.grep is None:
            return None
        try:
            return _compile(self.grep)
        except re.error as e:
            raise SearchError(f"bad regular expression {self.grep!r}: {e}") from None


_patterns: dict[str, re.Pattern[str]] = {}


def _compile(expression: str) -> re.Pattern[str]:
    pattern = _patterns.get(expression)
    if pattern is None:
        if len(_patterns) > 256:
            _patterns.clear()
        pattern = _patterns[expression] = re.compile(expression)
    return pattern


def _needle(value: str) -> bytes:
    # How a string value appears inside a JSON record (eventAsJSON's escaping).
    return json.dumps(value)[1:-1].encode()


class _Matcher:
    """
    The query as fast necessary checks on the raw line, then the exact
    check on the decoded record.
    """

    def __init__(self, query: LogQuery) -> None:
        self.query = query
        self.pattern = query.pattern()
        needles = [
            _needle(v) for v in (query.service, query.version, query.uuid, query.request_id) if v
        ]
        if query.grep:
            literal = query.grep if _LITERAL.fullmatch(query.grep) else required_literal(query.grep)
            if literal:
                needles.append(_needle(literal))
        self.needles = needles
        #: The longest needle, looked for in whole blocks before any line is split.
        self.key = max(needles, key=len) if needles else None
        self.min_level = LEVELS.index(query.level) if query.level else 0

    def raw_ok(self, line: bytes) -> bool:
        for needle in self.needles:
            if needle not in line:
                return False
        if self.pattern is not None:
            text = _fast_text(line)
            if text is not None and self.pattern.search(text) is None:
                return False
        return True

    def event(self, line: bytes, file: str) -> dict[str, Any] | None:
        """
        The decoded event if it matches, else L{None}.
        """
        try:
            record = json.loads(line.lstrip(_RS))
        except (ValueError, UnicodeDecodeError):
            return None
        if not isinstance(record, dict):
            return None
        event = _event(record, file)
        q = self.query
        if q.service is not None and event["service"] != q.service:
            return None
        if q.version is not None and event["version"] != q.version:
            return None
        if q.uuid is not None and event["uuid"] != q.uuid:
            return None
        if q.request_id is not None and event["request_id"] != q.request_id:
            return None
        t = event["time"]
        if q.since is not None and (t is None or t < q.since):
            return None
        if q.until is not None and (t is None or t > q.until):
            return None
        level = event["level"]
        if self.min_level and (level not in LEVELS or LEVELS.index(level) < self.min_level):
            return None
        if self.pattern is not None and self.pattern.search(event["text"]) is None:
            return None
        return event


def required_literal(expression: str) -> str | None:
    """
    The longest run of plain characters that every match of C{expression}
    contains, or L{None} when there is none worth looking for (an
    alternation at the top, case-insensitive or verbose flags, a run
    shorter than 3 characters).
    """
    try:
        from re import _constants as constants  # type: ignore[attr-defined]
        from re import _parser as parser  # type: ignore[attr-defined]

        parsed = parser.parse(expression)
    except Exception:
        return None
    if parsed.state.flags & (re.IGNORECASE | re.VERBOSE):
        return None
    best, run = "", ""
    for op, arg in parsed:
        if op is constants.LITERAL:
            run += chr(arg)
            continue
        best = max(best, run, key=len)
        run = ""
    best = max(best, run, key=len)
    return best if len(best) >= 3 else None


def _fast_text(line: bytes) -> str | None:
    """
    The C{skynet_text} of a raw record without decoding it all, when it
    holds no escape; L{None} when it cannot be read this way.
    """
    i = line.find(_TEXT)
    if i < 0:
        return None
    start = i + len(_TEXT)
    end = line.find(b'"', start)
    if end < 0:
        return None
    segment = line[start:end]
    if b"\\" in segment:
        return None
    try:
        return segment.decode()
    except UnicodeDecodeError:
        return None


def _fast_time(line: bytes) -> float | None:
    m = _TIME.search(line)
    if m is None:
        return None
    try:
        return float(m.group(1))
    except ValueError:
        return None


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _event(record: dict[str, Any], file: str) -> dict[str, Any]:
    level = record.get("skynet_level")
    if not isinstance(level, str):
        raw = record.get("log_level")
        level = raw.get("name", "info") if isinstance(raw, dict) else "info"
    t = record.get("log_time")
    text = record.get("skynet_text")
    if not isinstance(text, str):
        text = _str(record.get("log_format"))
    return {
        "time": float(t) if isinstance(t, (int, float)) and not isinstance(t, bool) else None,
        "level": level,
        "service": _str(record.get("skynet_service")),
        "version": _str(record.get("skynet_version")),
        "uuid": _str(record.get("skynet_uuid")),
        "host": _str(record.get("skynet_host")),
        "request_id": _str(record.get("skynet_request_id")),
        "method": _str(record.get("skynet_method")),
        "namespace": _str(record.get("log_namespace")),
        "text": text,
        "file": file,
    }


# Cursors


def encode_cursor(offsets: dict[str, int]) -> str:
    raw = json.dumps(offsets, separators=(",", ":"), sort_keys=True).encode()
    return base64.urlsafe_b64encode(raw).decode()


def decode_cursor(cursor: str) -> dict[str, int]:
    """
    @raise SearchError: for anything not made by L{encode_cursor}.
    """
    try:
        offsets = json.loads(base64.urlsafe_b64decode(cursor.encode()))
    except (ValueError, TypeError):
        raise SearchError("bad cursor (use the cursor of a previous answer)") from None
    if not isinstance(offsets, dict) or not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 0
        for k, v in offsets.items()
    ):
        raise SearchError("bad cursor (use the cursor of a previous answer)")
    return offsets


@attr.s(frozen=True, slots=True, auto_attribs=True)
class _File:
    path: str
    key: str
    size: int
    mtime: float


class LogSearch:
    """
    Searches the JSON log files of one directory (a host's log directory).
    """

    def __init__(self, directory: str, follow_budget: int = FOLLOW_BUDGET) -> None:
        self.directory = directory
        self.follow_budget = follow_budget

    def files(self, errors: list[str]) -> list[_File]:
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        except OSError as e:
            errors.append(f"cannot list the log directory {self.directory}: {e.strerror or e}")
            return []
        found = []
        for name in sorted(names):
            base, _, rotation = name.partition(JSON_SUFFIX)
            if not base or (rotation and not (rotation[:1] == "." and rotation[1:].isdigit())):
                continue
            path = os.path.join(self.directory, name)
            try:
                st = os.stat(path)
            except OSError as e:
                errors.append(f"cannot read {path}: {e.strerror or e}")
                continue
            found.append(_File(path, f"{st.st_dev}:{st.st_ino}", st.st_size, st.st_mtime))
        return found

    def search(self, query: LogQuery) -> dict[str, Any]:
        """
        Run C{query}: the answer of C{SearchLogs} (module docstring).

        @raise SearchError: for a bad query or cursor.
        """
        matcher = _Matcher(query)
        errors: list[str] = []
        files = [f for f in self.files(errors) if _may_hold(f.path, query)]
        if query.cursor is None:
            events, more, offsets = self._newest(files, matcher, query, errors)
        else:
            events, more, offsets = self._since(
                files, matcher, query, decode_cursor(query.cursor), errors
            )
        return {"events": events, "cursor": encode_cursor(offsets), "more": more,
                "errors": errors}  # fmt: skip

    def _newest(self, files, matcher, query, errors):
        offsets: dict[str, int] = {}
        streams = []
        for f in files:
            try:
                handle = open(f.path, "rb")
            except OSError as e:
                errors.append(f"cannot read {f.path}: {e.strerror or e}")
                continue
            end = _last_line_end(handle, f.size)
            offsets[f.key] = end
            if query.since is not None and f.mtime < query.since:
                handle.close()
                continue
            streams.append(_backwards(handle, end, matcher, query.since, f.path))
        events: list[dict[str, Any]] = []
        more = False
        merged = heapq.merge(*streams, key=lambda e: -(e["time"] or 0.0))
        for event in merged:
            if len(events) >= query.limit:
                more = True
                break
            events.append(event)
        for stream in streams:
            stream.close()
        events.reverse()
        return events, more, offsets

    def _since(self, files, matcher, query, cursor, errors):
        offsets: dict[str, int] = {}
        events: list[dict[str, Any]] = []
        more = False
        for f in files:
            start = cursor.get(f.key, 0)
            if start > f.size:  # truncated or a new file on a reused inode
                start = 0
            offsets[f.key] = start
            if start == f.size:
                continue
            try:
                with open(f.path, "rb") as handle:
                    handle.seek(start)
                    data = handle.read(min(f.size - start, self.follow_budget))
            except OSError as e:
                errors.append(f"cannot read {f.path}: {e.strerror or e}")
                continue
            cut = data.rfind(b"\n") + 1
            if start + len(data) < f.size:
                more = True
            pos = start
            for line in data[:cut].split(b"\n")[:-1]:
                pos += len(line) + 1
                if not line or not matcher.raw_ok(line):
                    continue
                event = matcher.event(line, f.path)
                if event is not None:
                    events.append(event)
                    if len(events) >= query.limit:
                        more = True
                        break
            offsets[f.key] = pos if len(events) >= query.limit else start + cut
            if len(events) >= query.limit:
                for rest in files[files.index(f) + 1 :]:
                    offsets[rest.key] = min(cursor.get(rest.key, 0), rest.size)
                break
        events.sort(key=lambda e: e["time"] or 0.0)
        return events, more, offsets


def _may_hold(path: str, query: LogQuery) -> bool:
    """
    Whether a file may hold events of the query's service and uuid, by its
    name (C{json_log_name}); files named otherwise are always searched.
    """
    name = os.path.basename(path)
    if query.uuid is None and query.service is None:
        return True
    if query.service is not None and query.uuid is not None:
        return name.startswith(json_log_name(query.service, query.uuid))
    if query.uuid is not None:
        safe = json_log_name("x", query.uuid)[1:]  # "-<uuid>.json"
        return safe in name
    # A service name alone: files of other services are named "<Other>-<uuid>.json".
    return name.startswith(json_log_name(query.service or "", "")[: -len(JSON_SUFFIX)])


def _last_line_end(handle: Any, size: int) -> int:
    """
    The offset just after the last newline at or before C{size}: a line
    being written is left for the next read.
    """
    pos = size
    while pos > 0:
        step = min(4096, pos)
        handle.seek(pos - step)
        chunk = handle.read(step)
        i = chunk.rfind(b"\n")
        if i >= 0:
            return pos - step + i + 1
        pos -= step
    return 0


def _candidates(block: bytes, start: int, key: bytes | None) -> list[bytes]:
    """
    The whole lines of C{block} from C{start}, or only those holding
    C{key}, found by searching the whole block (at C speed, no copy)
    rather than line by line.
    """
    if key is None:
        return block[start:].split(b"\n")
    hits = []
    i = block.find(key, start)
    while i >= 0:
        begin = max(block.rfind(b"\n", start, i) + 1, start)
        end = block.find(b"\n", i)
        if end < 0:
            end = len(block)
        hits.append(block[begin:end])
        i = block.find(key, end)
    return hits


def _backwards(
    handle: Any, end: int, matcher: _Matcher, since: float | None, path: str
) -> Iterator[dict[str, Any]]:
    """
    The matching events of a file from C{end} back to its start (or to
    C{since}), newest first.  Each block read ends where the previous one
    began, at a line start: the partial line at its front is read again
    with the next block rather than carried (no copies of the data).
    """
    try:
        pos = end
        step = BLOCK
        while pos > 0:
            begin = max(0, pos - step)
            handle.seek(begin)
            block = handle.read(pos - begin)
            if begin > 0:
                cut = block.find(b"\n")
                if cut < 0 or cut + 1 >= len(block):
                    # No whole line in the block (a line longer than it): read more.
                    step *= 2
                    continue
                start = cut + 1
            else:
                start = 0
            step = BLOCK
            for line in reversed(_candidates(block, start, matcher.key)):
                if not line:
                    continue
                if since is not None:
                    t = _fast_time(line)
                    if t is not None and t < since:
                        return
                if not matcher.raw_ok(line):
                    continue
                event = matcher.event(line, path)
                if event is not None:
                    yield event
            if since is not None and matcher.key is not None:
                t = _fast_time(block[start : block.find(b"\n", start)])
                if t is not None and t < since:
                    return
            pos = begin + start
    finally:
        handle.close()


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: str) -> float | None:
    """
    C{250ms}, C{30s}, C{10m}, C{2h}, C{1d} as seconds; L{None} for text
    of any other form.
    """
    m = _DURATION.fullmatch(value.strip().lower())
    return float(m.group(1)) * _UNIT_SECONDS[m.group(2)] if m else None


def parse_since(value: str, now: float | None = None) -> float:
    """
    C{10m}, C{30s}, C{2h}, C{1d} ago, or a POSIX time, or an ISO 8601 time.

    @raise SearchError: for anything else.
    """
    now = time.time() if now is None else now
    ago = parse_duration(value)
    if ago is not None:
        return now - ago
    try:
        return float(value)
    except ValueError:
        pass
    from datetime import datetime

    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        raise SearchError(
            f"cannot read the time {value!r}: give 30s, 10m, 2h, 1d, a POSIX time or ISO 8601"
        ) from None


__all__ = [
    "LEVELS",
    "LogQuery",
    "LogRound",
    "LogSearch",
    "SearchError",
    "decode_cursor",
    "encode_cursor",
    "fan_out",
    "parse_level",
    "parse_duration",
    "parse_since",
]


# The daemon's SearchLogs method

#: Longest text of one event in an answer (the rest is cut, and said).
MAX_TEXT = 16 * 1024


def _trim(answer: dict[str, Any]) -> dict[str, Any]:
    for event in answer["events"]:
        if len(event["text"]) > MAX_TEXT:
            event["text"] = event["text"][:MAX_TEXT] + f" ... ({len(event['text'])} characters)"
    return answer


def search_logs(directory: str | None, params: Any, reactor: Any) -> Any:
    """
    The daemon's C{SearchLogs}: the query checked at once (a bad one fails
    the call with a L{skynet.errors.ServiceError} saying why), the search
    run in the reactor's thread pool, so the daemon keeps serving.
    """
    from twisted.internet.threads import deferToThreadPool

    from skynet.errors import ServiceError

    if not directory:
        raise ServiceError("this daemon keeps no log directory")
    try:
        query = LogQuery.from_bson(params)
        if query.cursor is not None:
            decode_cursor(query.cursor)
    except SearchError as e:
        raise ServiceError(str(e)) from None
    search = LogSearch(directory)
    d = deferToThreadPool(reactor, reactor.getThreadPool(), search.search, query)

    def failed(failure: Any) -> Any:
        failure.trap(SearchError)
        raise ServiceError(str(failure.value))

    return d.addCallbacks(_trim, failed)


# sky logs

#: Seconds between two polls of C{sky logs -f}.
FOLLOW_INTERVAL = 0.25


def format_event(event: dict[str, Any], daemon_host: str) -> str:
    """
    One event on one line: time, host, instance, level, text, request id.
    """
    t = event.get("time")
    if isinstance(t, (int, float)):
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t)) + f".{int(t % 1 * 1000):03d}"
    else:
        stamp = "-"
    host = event.get("host") or daemon_host
    instance = f"{event.get('service') or '?'}/{(event.get('uuid') or '?')[:8]}"
    text = str(event.get("text", "")).replace("\n", "\\n")
    line = f"{stamp} {host} {instance} {str(event.get('level', '')).upper():<5} {text}"
    if event.get("request_id"):
        line += f" [request {event['request_id']}]"
    return line


def query_params(filters: Any, options: dict[str, Any], now: float) -> dict[str, Any]:
    """
    The C{SearchLogs} parameters of a C{sky logs} command line.

    @raise SearchError: for a bad value.
    """
    params: dict[str, Any] = {}
    if filters.service:
        params["service"] = filters.service
    if filters.version:
        params["version"] = filters.version
    for option, key in (("uuid", "uuid"), ("request-id", "request_id"), ("grep", "grep")):
        if options.get(option):
            params[key] = options[option]
    if options.get("since"):
        params["since"] = parse_since(options["since"], now)
    if options.get("until"):
        params["until"] = parse_since(options["until"], now)
    if options.get("level"):
        params["level"] = parse_level(options["level"])
    if options.get("limit"):
        try:
            params["limit"] = int(options["limit"])
        except ValueError:
            raise SearchError(f"--limit must be a number, not {options['limit']!r}") from None
    LogQuery.from_bson(params)  # every check the daemon makes, here first
    return params


async def run_logs_command(shell: Any, filters: Any, inv: Any, options: dict[str, Any],
                           io: Any) -> int:  # fmt: skip
    """
    C{logs [filters] [--grep RE] [--since 10m] [--until T] [--level L]
    [--request-id ID] [--uuid U] [--limit N] [-f] [--json]}: ask the
    daemon of every host that matches the filters, print the events
    merged by time; with C{-f}, go on printing new ones until interrupted.
    """
    from twisted.internet.defer import CancelledError
    from twisted.internet.task import deferLater

    from skynet.control import DAEMON_SERVICE, SEARCH_LOGS
    from skynet.errors import SkynetError
    from skynet.registry.base import Query
    from skynet.shell import ShellError, UsageError, to_json

    if inv.args:
        raise UsageError("Usage: logs [filters] [--grep REGEX] [--since 10m] [--level warn] "
                         "[--request-id ID] [--uuid UUID] [--limit N] [-f] [--json]")  # fmt: skip
    unknown = set(options) - {"grep", "since", "until", "level", "request-id", "uuid", "limit",
                              "follow"}  # fmt: skip
    if unknown:
        raise UsageError(f"logs does not take {', '.join('--' + o for o in sorted(unknown))}")
    try:
        params = query_params(filters, options, shell.reactor.seconds())
    except SearchError as e:
        raise UsageError(str(e)) from None
    daemons = await shell.registry.query(
        Query(service=DAEMON_SERVICE, registered=True, host=filters.host, region=filters.region)
    )
    if not daemons:
        raise ShellError("no SkynetDaemon is registered on the hosts that match the filters"
                         " (logs are searched by the daemons)")  # fmt: skip
    limit = params.get("limit", DEFAULT_LIMIT)
    said: dict[str, list[str]] = {}

    async def ask(daemon: Any, asked: dict[str, Any]) -> Any:
        return await shell._ask_daemon(daemon, SEARCH_LOGS, asked)

    def say(answer: LogRound) -> None:
        # Each daemon's trouble once, not at every poll of -f.
        for daemon in daemons:
            errors = answer.errors.get(daemon.uuid, [])
            if errors != said.get(daemon.uuid, []):
                for error in errors:
                    io.err(f"host {daemon.host}: {error}")
            said[daemon.uuid] = errors

    def show(pairs: list[tuple[dict[str, Any], str]]) -> None:
        for event, host in pairs:
            if inv.json:
                io.out(to_json(dict(event, daemon_host=host)))
            else:
                io.out(format_event(event, host))

    cursors: dict[str, str | None] = {d.uuid: None for d in daemons}
    first = await fan_out(ask, daemons, params, cursors, (ShellError, SkynetError))
    say(first)
    show(first.events[-limit:])
    if not options.get("follow"):
        return 1 if len(first.failed) == len(daemons) else 0
    try:
        while True:
            await deferLater(shell.reactor, FOLLOW_INTERVAL, lambda: None)
            more = await fan_out(ask, daemons, params, cursors, (ShellError, SkynetError))
            say(more)
            show(more.events)
    except CancelledError:
        return 0


@attr.s(frozen=True, auto_attribs=True)
class LogRound:
    """
    One round of a search across daemons (L{fan_out}).

    @ivar events: C{(event, daemon host)} pairs merged by time, oldest first.
    @ivar errors: per daemon uuid, what went wrong (a failed call, files
        that could not be read).
    @ivar failed: the uuids of the daemons whose call failed.
    @ivar more: whether any daemon said it stopped early (poll again soon).
    """

    events: list[tuple[dict[str, Any], str]]
    errors: dict[str, list[str]]
    failed: frozenset[str]
    more: bool


async def fan_out(
    ask: Any,
    daemons: list[Any],
    params: dict[str, Any],
    cursors: dict[str, str | None],
    expected: tuple[type[BaseException], ...] = (Exception,),
) -> LogRound:
    """
    Ask every daemon of C{cursors} (uuids of C{daemons}) for C{params} at
    once, with its cursor when it has one (and then the largest limit), and
    merge the answers by time.  C{cursors} is updated in place with each
    answer's cursor, so that the next round (of C{sky logs -f}, or of the
    dashboard's live tail) asks only for what is new.

    @param ask: C{ask(daemon, params)} -> awaitable answer of C{SearchLogs}.
    @param expected: the failures of one daemon's call that are reported in
        the round's C{errors} instead of failing it.
    """
    from twisted.internet.defer import Deferred, DeferredList

    by_uuid = {d.uuid: d for d in daemons}
    uuids = [u for u in cursors if u in by_uuid]

    async def one(uuid: str) -> Any:
        asked = dict(params)
        if cursors[uuid] is not None:
            asked["cursor"] = cursors[uuid]
            asked["limit"] = MAX_LIMIT
        try:
            return await ask(by_uuid[uuid], asked)
        except expected as e:
            return e

    answers = await DeferredList(
        [Deferred.fromCoroutine(one(u)) for u in uuids], consumeErrors=True
    )
    events: list[tuple[dict[str, Any], str]] = []
    errors: dict[str, list[str]] = {}
    failed: set[str] = set()
    more = False
    for uuid, (ok, answer) in zip(uuids, answers, strict=True):
        if not ok:  # a failure that was not expected: said, not raised
            why = answer.getErrorMessage()
        elif isinstance(answer, BaseException):
            why = str(answer)
        elif not isinstance(answer, dict):
            why = f"bad answer to SearchLogs: {answer!r:.200}"
        else:
            why = None
        if why is not None:
            failed.add(uuid)
            errors[uuid] = [why]
            continue
        errors[uuid] = [str(error) for error in answer.get("errors", [])]
        cursors[uuid] = answer.get("cursor")
        more = more or bool(answer.get("more"))
        host = by_uuid[uuid].host
        events.extend((e, host) for e in answer.get("events", []) if isinstance(e, dict))
    events.sort(key=lambda p: _sort_time(p[0]))
    return LogRound(events, errors, frozenset(failed), more)


def _sort_time(event: dict[str, Any]) -> float:
    t = event.get("time")
    return float(t) if isinstance(t, (int, float)) else 0.0
