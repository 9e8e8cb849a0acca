"""
Structured logs of skynet processes: every event a service logs carries
its instance (service, version, uuid, host) and, inside a remote method,
the request id of the call it serves; services started by a daemon write
them as JSON lines to a per-instance file that rotates.

The file is C{<log-dir>/<service>-<uuid>.json}, written by
C{twisted.logger}'s L{jsonFileLogObserver} (one record per line, each
starting with the record separator C{\\x1e}) through a L{LogFile} that
rotates at C{$SKYNET_LOG_MAX_BYTES} (default 10 MB) and keeps
C{$SKYNET_LOG_KEEP} old files (default 5: C{.json.1} is the newest).
The daemon tells its children the directory in C{$SKYNET_LOG_DIR}; both
settings pass from the daemon's environment to its children.

Each record holds the event's own fields (C{log_format}, C{log_time},
C{log_level}, C{log_namespace}, named fields) and these:

    skynet_text        the event formatted, as a person reads it
    skynet_level       debug, info, warn, error or critical
    skynet_service     the instance's service name
    skynet_version     its version
    skynet_uuid        its uuid
    skynet_host        the host it advertises
    skynet_request_id  the request being served (absent outside a method)
    skynet_method      the method serving it (likewise)
"""

from __future__ import annotations

import os
import re
from typing import Any

from twisted.application.service import Service
from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    Logger,
    formatEvent,
    globalLogPublisher,
    jsonFileLogObserver,
)
from twisted.python.logfile import LogFile
from zope.interface import implementer

from skynet.observe.histogram import current_call

#: Defaults of the rotation settings.
DEFAULT_MAX_BYTES = 10 * 1024 * 1024
DEFAULT_KEEP = 5

#: The extension of the JSON log files (rotated ones add C{.1}, C{.2} ...).
JSON_SUFFIX = ".json"

_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]")


def json_log_name(service: str, uuid: str) -> str:
    """
    The file name of an instance's JSON log.
    """
    return f"{_UNSAFE.sub('_', service) or '_'}-{_UNSAFE.sub('_', uuid)}{JSON_SUFFIX}"


def _env_int(environ: dict[str, str], name: str, default: int, least: int) -> int:
    raw = environ.get(name, "")
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"${name} must be a whole number, not {raw!r}") from None
    if value < least:
        raise ValueError(f"${name} must be at least {least}, not {value}")
    return value


@implementer(ILogObserver)
class ContextObserver:
    """
    Adds the C{skynet_*} fields of the instance and of the request being
    served to each event, then hands a copy to C{observer}.

    @param host: the L{skynet.service.ServiceHost} whose instance the
        events belong to (read at each event: its host and port are known
        only once it listens).
    """

    def __init__(self, observer: ILogObserver, host: Any) -> None:
        self.observer = observer
        self.host = host

    def __call__(self, event: dict[str, Any]) -> None:
        self.observer(with_context(event, self.host))


def with_context(event: dict[str, Any], host: Any = None) -> dict[str, Any]:
    """
    A copy of C{event} with the C{skynet_*} fields added.
    """
    out = dict(event)
    try:
        out["skynet_text"] = formatEvent(event)
    except Exception:
        out["skynet_text"] = str(event.get("log_format", ""))
    failure = event.get("log_failure")
    if failure is not None:
        try:
            out["skynet_text"] += "\n" + failure.getTraceback()
        except Exception:
            pass
    level = event.get("log_level")
    out["skynet_level"] = getattr(level, "name", "info")
    if host is not None:
        instance = getattr(host, "instance", None)
        out["skynet_service"] = getattr(host, "service_name", "")
        out["skynet_version"] = getattr(host, "version", "")
        out["skynet_uuid"] = getattr(host, "uuid", "")
        out["skynet_host"] = getattr(instance, "host", "") or ""
    call = current_call()
    if call is not None:
        out["skynet_request_id"] = call.request_id
        out["skynet_method"] = call.method
        if call.service:
            out["skynet_service"] = call.service
        if call.uuid:
            out["skynet_uuid"] = call.uuid
    return out


def json_log_observer(
    path: str, max_bytes: int = DEFAULT_MAX_BYTES, keep: int = DEFAULT_KEEP
) -> tuple[FileLogObserver, LogFile]:
    """
    A JSON-lines observer writing to C{path}, rotated at C{max_bytes}
    with C{keep} old files.
    """
    directory, name = os.path.split(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    logfile = LogFile(name, directory, rotateLength=max_bytes, maxRotatedFiles=keep)
    # A LogFile is file-like (write, flush): what the observer needs.
    return jsonFileLogObserver(logfile), logfile  # type: ignore[arg-type]


class InstanceLog:
    """
    The JSON log of one service instance: added to the global log
    publisher at start, removed at stop.
    """

    log = Logger()

    def __init__(self, host: Any, path: str, max_bytes: int, keep: int) -> None:
        self.path = path
        self.observer, self.logfile = json_log_observer(path, max_bytes, keep)
        self.context = ContextObserver(self.observer, host)

    def start(self, publisher: Any = globalLogPublisher) -> None:
        publisher.addObserver(self.context)
        self.log.info("writing JSON logs to {path}", path=self.path)

    def stop(self, publisher: Any = globalLogPublisher) -> None:
        publisher.removeObserver(self.context)
        self.logfile.close()


def instance_log_from_environment(
    host: Any, environ: dict[str, str] | None = None
) -> InstanceLog | None:
    """
    The JSON log a service started by a daemon writes (C{$SKYNET_LOG_DIR}
    set), or L{None}.

    @raise ValueError: for bad rotation settings.
    """
    environ = dict(os.environ if environ is None else environ)
    directory = environ.get("SKYNET_LOG_DIR", "")
    if not directory:
        return None
    max_bytes = _env_int(environ, "SKYNET_LOG_MAX_BYTES", DEFAULT_MAX_BYTES, 1024)
    keep = _env_int(environ, "SKYNET_LOG_KEEP", DEFAULT_KEEP, 1)
    path = os.path.join(directory, json_log_name(host.service_name, host.uuid))
    return InstanceLog(host, path, max_bytes, keep)


__all__ = [
    "ContextObserver",
    "InstanceLog",
    "InstanceLogService",
    "add_instance_log",
    "instance_log_from_environment",
    "json_log_name",
    "json_log_observer",
    "with_context",
]


class InstanceLogService(Service):
    """
    Keeps an L{InstanceLog} for the life of its service parent.
    """

    def __init__(self, instance_log: InstanceLog) -> None:
        self.instance_log = instance_log

    def stopService(self) -> Any:
        super().stopService()
        self.instance_log.stop()


def add_instance_log(parent: Any, host: Any, environ: dict[str, str] | None = None) -> Any:
    """
    Start the JSON log of C{host} now (when C{$SKYNET_LOG_DIR} says where)
    and stop it when C{parent} stops; add this before the host to C{parent},
    so that the host's last events are written.

    @return: the L{InstanceLog}, or L{None}.
    @raise twisted.python.usage.UsageError: for bad rotation settings.
    """
    from twisted.python import usage

    try:
        instance_log = instance_log_from_environment(host, environ)
    except (ValueError, OSError) as e:
        raise usage.UsageError(f"cannot write the JSON log: {e}") from None
    if instance_log is None:
        return None
    instance_log.start()
    InstanceLogService(instance_log).setServiceParent(parent)
    return instance_log
