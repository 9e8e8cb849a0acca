"""
C{twistd skynet-dashboard}: the live web dashboard and metrics endpoint.

    twistd -n skynet-dashboard [--listen tcp:8080:interface=127.0.0.1] \\
        [--registry URL] [--token-file FILE] [--graphite tcp:HOST:2003] \\
        [--stats-interval SECONDS] [--history SECONDS] [--allowed-host NAME]... \\
        [--tls DIR]

Without C{--token-file} the dashboard is read-only.  The URL it serves on
is logged once it listens (C{skynet dashboard on http://...}).  It answers
only requests for its own names (loopback, the interface it listens on,
each C{--allowed-host}); with C{--tls DIR} (or C{$SKYNET_HOME/tls}) it
presents those credentials when it acts through daemons and admin
endpoints.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.logger import Logger
from twisted.python import usage

from skynet.config import tune_malloc
from skynet.taps import number, open_registry


def read_token(path: str) -> str:
    """
    The token in C{path} (surrounding whitespace removed).

    @raise usage.UsageError: if it cannot be read or is empty.
    """
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise usage.UsageError(f"cannot read --token-file {path}: {e}") from e
    if not token:
        raise usage.UsageError(f"--token-file {path} is empty")
    if any(c.isspace() for c in token):
        raise usage.UsageError(f"--token-file {path}: the token may not contain whitespace")
    return token


class Options(usage.Options):
    synopsis = "[--listen ENDPOINT] [--registry URL] [--token-file FILE] [--graphite ENDPOINT]"
    longdesc = (
        "Serve the live dashboard of a skynet cluster (topology, statistics, graphs, events, "
        "actions) and a Prometheus /metrics endpoint."
    )

    optParameters = [
        ["listen", "l", "tcp:8080:interface=127.0.0.1", "Endpoint to serve the dashboard on."],
        ["registry", "r", None,
         "Registry URL: file:///path, zk://host:port,.../chroot (default $SKYNET_REGISTRY, "
         "else the embedded registry)."],
        ["token-file", None, None,
         "File holding the secret that enables actions (default: read-only dashboard)."],
        ["graphite", None, None,
         "Push figures to Graphite's plaintext port at this client endpoint "
         "(e.g. tcp:HOST:2003)."],
        ["graphite-prefix", None, "skynet", "Prefix of the Graphite metric paths."],
        ["stats-interval", None, 2.0,
         "Seconds between reads of every instance's statistics (and graph points).",
         number("stats-interval", positive=True)],
        ["history", None, 900.0, "Seconds of time series kept for the graphs.",
         number("history", positive=True)],
        ["tls", None, None,
         "Credentials directory the dashboard presents to daemons and admin endpoints "
         "(default $SKYNET_TLS, else $SKYNET_HOME/tls if present)."],
    ]  # fmt: skip

    token: str | None = None
    registry: Any = None

    def opt_allowed_host(self, name: str) -> None:
        """A host name the dashboard is reached by (its Host header); repeatable."""
        self.setdefault("allowed-host", []).append(name)

    def postOptions(self) -> None:
        from twisted.internet import reactor

        self.token = read_token(self["token-file"]) if self["token-file"] else None
        try:
            self.endpoint = serverFromString(reactor, self["listen"])
        except (ValueError, TypeError, KeyError) as e:
            raise usage.UsageError(f"bad --listen endpoint {self['listen']!r}: {e}") from e
        self.graphite = None
        if self["graphite"]:
            try:
                self.graphite = clientFromString(reactor, self["graphite"])
            except (ValueError, TypeError, KeyError) as e:
                raise usage.UsageError(f"bad --graphite endpoint {self['graphite']!r}: {e}") from e
        self.registry = open_registry(reactor, self["registry"])
        from skynet import tls

        self.allowed_hosts = list(self.get("allowed-host", []))
        interface = tls.endpoint_interface(self.endpoint)
        if interface and interface not in ("unix", "0.0.0.0", "::"):
            self.allowed_hosts.append(interface)
        if self["tls"]:
            try:
                tls.set_client_identity(tls.load_credentials(self["tls"]))
            except tls.TLSError as e:
                raise usage.UsageError(f"--tls: {e}") from None


class DashboardServer(Service):
    """
    Listens with the dashboard's site and logs its URL; a failure to listen
    ends the process (a dashboard nobody can reach is no use).
    """

    log = Logger()

    def __init__(self, endpoint: Any, site: Any, reactor: Any) -> None:
        self.endpoint = endpoint
        self.site = site
        self.reactor = reactor
        self.port: Any = None
        self._listening: Deferred | None = None

    def startService(self) -> None:
        super().startService()
        self._listening = ensureDeferred(self._listen())

    async def _listen(self) -> None:
        try:
            self.port = await self.endpoint.listen(self.site)
        except Exception as e:
            self.log.error("skynet dashboard cannot listen: {error}", error=e)
            self.reactor.callLater(0, self.reactor.stop)
            return
        address = self.port.getHost()
        host = getattr(address, "host", "")
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        scheme = "https" if type(self.endpoint).__name__.startswith("SSL") else "http"
        self.url = f"{scheme}://{host}:{getattr(address, 'port', '')}/"
        self.log.info("skynet dashboard on {url}", url=self.url)

    def stopService(self) -> Any:
        super().stopService()
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()
        return None


def makeService(options: Options) -> MultiService:
    """
    The model, the web server and (if asked) the Graphite pusher.
    """
    tune_malloc()  # large messages: heap reuse, not fresh pages
    import txaio
    from twisted.internet import reactor

    from skynet.web.app import DashboardApp
    from skynet.web.metrics import GraphitePusher
    from skynet.web.model import DashboardModel

    # Autobahn logs every frame at debug level, and twistd keeps every level.
    txaio.set_global_log_level("info")  # type: ignore[attr-defined]
    top = MultiService()
    model = DashboardModel(
        options.registry,
        reactor=reactor,
        stats_interval=options["stats-interval"],
        history=options["history"],
        own_registry=True,
    )
    model.setServiceParent(top)
    app = DashboardApp(model, token=options.token, allowed_hosts=options.allowed_hosts)
    DashboardServer(options.endpoint, app.site(), reactor).setServiceParent(top)
    if options.graphite is not None:
        GraphitePusher(model, options.graphite, prefix=options["graphite-prefix"]).setServiceParent(
            top
        )
    return top
