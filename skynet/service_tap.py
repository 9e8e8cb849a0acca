"""
C{twistd skynet-service}: run one service instance.

    twistd -n skynet-service --service examples.tutorial:TutorialService \\
        [--name N] [--version V] [--region R] \\
        [--listen tcp:0:interface=127.0.0.1] [--admin ENDPOINT] \\
        [--registry URL] [--zk-session-timeout SECONDS] [--unregistered] [--uuid UUID] \\
        [--otlp-endpoint URL [--otlp-header NAME=VALUE ...]]

Defaults follow Go Skynet's environment: C{SKYNET_BIND_IP} (127.0.0.1) and
the port range C{SKYNET_MIN_PORT}..C{SKYNET_MAX_PORT} (9000..9999) for the
listener, C{SKYNET_REGION}, C{SKYNET_VERSION}, and C{SKYNET_REGISTRY}.

C{--zk-session-timeout} sets the ZooKeeper session timeout of a C{zk://}
registry (winning over the URL's C{?session_timeout=}; 4 s if neither says);
other registries have no sessions and ignore it.

C{--otlp-endpoint} (default C{SKYNET_OTLP_ENDPOINT}) exports the spans the
instance records to an OpenTelemetry collector, OTLP over HTTP
(L{skynet.observe.otlp}).
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from typing import Any

from twisted.application.service import MultiService
from twisted.application.service import Service as Service_
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python import usage

from skynet import (
    busypoll,
    tls,  # security hook (issue 12)
)
from skynet.config import default_reactor, environment_defaults, tune_malloc
from skynet.service import Service, ServiceHost
from skynet.taps import (
    ZK_SESSION_TIMEOUT_OPTION,
    number,
    open_registry,
    run_plugin,
    service_endpoints,
)


def load_service_class(spec: str) -> type[Service]:
    """
    Import C{module:Class}; the working directory is importable, so
    services in the current tree (like C{examples.tutorial}) load.

    @raise usage.UsageError: with what went wrong.
    """
    module_name, sep, class_name = spec.partition(":")
    if not sep or not module_name or not class_name:
        raise usage.UsageError(f"--service must look like module:Class, not {spec!r}")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        raise usage.UsageError(f"cannot import {module_name!r}: {e}") from e
    cls = getattr(module, class_name, None)
    if cls is None:
        raise usage.UsageError(f"module {module_name!r} has no {class_name!r}")
    if not (isinstance(cls, type) and issubclass(cls, Service)):
        raise usage.UsageError(f"{spec} is not a subclass of skynet.service.Service")
    return cls


class Options(usage.Options):
    synopsis = "--service module:Class [options]"
    longdesc = "Run one skynet service instance, registered in the registry."

    optParameters = [
        ["service", "s", None, "The service class, as module:Class."],
        ["name", None, None, "Service name (default: the class's name)."],
        ["region", None, None, "Region (default: the class's, else $SKYNET_REGION)."],
        ["listen", "l", None,
         "Endpoint to serve on (default: $SKYNET_BIND_IP and the first free port of "
         "$SKYNET_MIN_PORT..$SKYNET_MAX_PORT)."],
        ["admin", None, "tcp:0:interface=127.0.0.1",
         "Endpoint of the admin listener, or 'none'."],
        ["registry", "r", None,
         "Registry URL: file:///path, zk://host:port,.../chroot (default $SKYNET_REGISTRY, "
         "else the embedded registry)."],
        ZK_SESSION_TIMEOUT_OPTION,
        ["uuid", None, None, "Instance uuid (default: a new one; the daemon passes its own)."],
        ["host", None, None, "Address to advertise (default: the listener's interface)."],
        ["max-frame", None, None,
         "Largest accepted request, in bytes (default: the service class's max_request_size, "
         "4 MiB unless it says otherwise).", number("max-frame", int, minimum=5)],
        ["max-connections", None, None,
         "Most connections served at once (default 4,096, fewer when the process may open "
         "fewer descriptors).", number("max-connections", int, minimum=1)],
        ["max-connections-per-peer", None, 256, "Most connections from one peer address.",
         number("max-connections-per-peer", int, minimum=1)],
        ["drain-timeout", None, 10.0, "Seconds to let requests in flight finish on stop.",
         number("drain-timeout")],
        ["linger", None, 0.5,
         "Seconds to keep serving after unregistering on stop, so that every client sees the "
         "unregistration before the instance leaves (0: none).", number("linger")],
        ["stats-interval", None, 5.0, "Seconds between statistics updates in the registry.",
         number("stats-interval", positive=True)],
        ["busy-poll", None, None,
         "Microseconds the reactor polls for the next event before it sleeps, backing off "
         "after polls in vain (default $SKYNET_BUSY_POLL, else 200; 0: never).",
         number("busy-poll")],
        ["otlp-endpoint", None, None,
         "Export spans to this OpenTelemetry collector, OTLP/HTTP JSON: http[s]://host:port"
         "[/path] (no path: /v1/traces; default $SKYNET_OTLP_ENDPOINT)."],
    ]  # fmt: skip
    optFlags = [
        ["unregistered", "u", "Start unregistered (not taking new clients)."],
        ["supervised", None,
         "Run under a skynet daemon: stdin is a pipe from it, and its end (the daemon "
         "died) stops this service."],
    ]  # fmt: skip

    service_class: type[Service]
    registry: Any

    def __init__(self) -> None:
        super().__init__()
        self["version"] = None
        self["otlp-headers"] = []

    def opt_otlp_header(self, header: str) -> None:
        """
        A header NAME=VALUE for the OTLP collector, e.g. its auth (repeatable).
        """
        from skynet.observe.otlp import parse_header

        try:
            self["otlp-headers"].append(parse_header(header))
        except ValueError as e:
            raise usage.UsageError(f"--otlp-header: {e}") from None

    def opt_version(self, version: str) -> None:  # type: ignore[override]
        """
        Version (default: the class's, else $SKYNET_VERSION).
        """
        # usage.Options has its own --version (print Twisted's and exit);
        # here, as in Go Skynet, it is the service's version.
        self["version"] = version

    def postOptions(self) -> None:
        reactor = default_reactor()
        if not self["service"]:
            raise usage.UsageError("--service module:Class is required")
        self.service_class = load_service_class(self["service"])
        self.endpoints, self.admin_endpoints = service_endpoints(
            reactor, self["listen"], self["admin"]
        )
        self.registry = open_registry(reactor, self["registry"], self["zk-session-timeout"])
        self.tls = tls.tap_tls(self, reactor)  # security hook (issue 12)
        self.otlp_endpoint = _otlp_endpoint(self)
        self.busy_poll = _busy_poll(self)


def _busy_poll(options: Options) -> float:
    """
    The busy-poll budget in seconds: C{--busy-poll}, else
    C{$SKYNET_BUSY_POLL}, else L{skynet.busypoll.DEFAULT_BUDGET}.
    """
    if options["busy-poll"] is not None:
        return float(options["busy-poll"]) / 1e6
    value = environment_defaults().busy_poll
    if value is None or not value.strip():
        return busypoll.DEFAULT_BUDGET
    try:
        return float(number("busy-poll")(value)) / 1e6
    except usage.UsageError as e:
        raise usage.UsageError(f"$SKYNET_BUSY_POLL: {e}") from None


def _otlp_endpoint(options: Options) -> str | None:
    """
    The collector's traces URL (C{--otlp-endpoint}, else
    C{$SKYNET_OTLP_ENDPOINT}), checked; L{None} for no export.
    """
    url = options["otlp-endpoint"] or environment_defaults().otlp_endpoint
    if not url:
        if options["otlp-headers"]:
            raise usage.UsageError("--otlp-header needs --otlp-endpoint")
        return None
    from skynet.observe import otlp, tracing

    try:
        endpoint = otlp.parse_endpoint(url)
    except ValueError as e:
        source = "--otlp-endpoint" if options["otlp-endpoint"] else "$SKYNET_OTLP_ENDPOINT"
        raise usage.UsageError(f"{source}: {e}") from None
    if not tracing.ENABLED:
        raise usage.UsageError(
            "--otlp-endpoint exports spans, but recording them is off "
            "($SKYNET_TRACE=0 or $SKYNET_TRACE_RING=0)"
        )
    return endpoint


tls.add_tls_options(Options, service=True)  # security hook: --tls, --insecure, ...


class _SupervisorPipe(Protocol):
    """
    Reads the supervising daemon's pipe on stdin; its end means the daemon
    is gone, and this service stops (gracefully) rather than outlive it.
    """

    log = Logger()

    def __init__(self, stop: Callable[[], Any]) -> None:
        self.stop = stop

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Any = None) -> None:
        self.log.warn("supervisor pipe closed: the daemon is gone; stopping")
        self.stop()


class SupervisorWatch(Service_):
    """
    Watches stdin while running (see C{--supervised}).
    """

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.stdio: Any = None

    def startService(self) -> None:
        super().startService()
        from twisted.internet.stdio import StandardIO

        # (daemon helper hook) Only stdin is watched: StandardIO's writer gets
        # /dev/null, not fd 1, which it would make non-blocking, so that the
        # log written to stdout would lose lines (EAGAIN) while the daemon
        # reading it is stopped, instead of waiting for it.
        null = os.open(os.devnull, os.O_WRONLY)
        self.stdio = StandardIO(_SupervisorPipe(self._stop), stdout=null, reactor=self.reactor)  # type: ignore[call-arg]

    def _stop(self) -> None:
        if self.running and self.reactor.running:
            self.reactor.stop()


def makeService(options: Options) -> MultiService:
    """
    The service host (and, if supervised, the pipe watch) for twistd.
    """
    tune_malloc()  # large messages: heap reuse, not fresh pages
    reactor = default_reactor()
    busypoll.install(reactor, options.busy_poll)  # no sleep between quick events
    service = options.service_class()
    top = MultiService()
    if options["supervised"]:
        SupervisorWatch(reactor).setServiceParent(top)
    # security hook (issue 12): TLS listeners, the listening policy.
    listeners = tls.tap_listeners("skynet-service", options, options.endpoints,
                                  options.admin_endpoints, registry=options.registry,
                                  reactor=reactor)  # fmt: skip
    for extra_service in listeners.services:
        extra_service.setServiceParent(top)
    host = ServiceHost(
        service,
        options.registry,
        listeners.endpoints,
        listeners.admin_endpoints,
        reactor=reactor,
        name=options["name"],
        version=options["version"],
        region=options["region"],
        uuid=options["uuid"],
        registered=not options["unregistered"],
        advertise_host=options["host"],
        max_frame=options["max-frame"],
        max_connections=options["max-connections"],
        max_connections_per_peer=options["max-connections-per-peer"],
        drain_timeout=options["drain-timeout"],
        linger=options["linger"],
        stats_interval=options["stats-interval"],
        own_registry=True,
        defaults=environment_defaults(),  # the edge reads SKYNET_VERSION/REGION/BIND_IP
    )
    host.instance_extra = listeners.extra  # security hook (issue 12)
    # (observe hook) a daemon's child writes its JSON log: skynet.observe.logs
    from skynet.observe.logs import add_instance_log

    add_instance_log(top, host)
    if options.otlp_endpoint:
        # Export spans; the exporter stops after the host, so that the spans
        # of the requests drained at stop go out too.
        from skynet.observe.otlp import ExportingService, OTLPExporter, Resource

        exporter = OTLPExporter(
            options.otlp_endpoint,
            lambda: Resource(host.service_name, host.version or "", host.uuid),
            headers=options["otlp-headers"],
            reactor=reactor,
        )
        exporting = ExportingService(exporter)
        exporting.setServiceParent(top)
        host.setServiceParent(exporting)
    else:
        host.setServiceParent(top)
    return top


def main(argv: list[str] | None = None) -> None:
    """
    Run as C{python -m skynet.service_tap ...}: the same as C{twistd -n}.
    """
    run_plugin("skynet-service", argv)


if __name__ == "__main__":
    main()
