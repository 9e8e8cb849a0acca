"""
The dashboard's web application: Klein routes and an Autobahn WebSocket
on one port.

    GET  /                          the page (static/index.html)
    GET  /static/...                its script and style
    GET  /ws                        the WebSocket: a snapshot, then deltas
    GET  /api/state                 the snapshot, as JSON
    GET  /api/series?key=K&key=...  full time series (i:<uuid>, s:<service>, h:<host>)
    GET  /api/auth                  200 if the request's token allows actions, else 403
    POST /api/instances/<uuid>/<action>   register, unregister, stop, restart
    GET  /metrics                   Prometheus text format

Actions need the configured token in an C{Authorization: Bearer <token>}
header.  Without a configured token the dashboard is read-only: every
action is refused with 403 and changes nothing, as is any action without
the right token.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny
from klein import Klein
from twisted.internet.defer import ensureDeferred
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.static import File

from skynet.web.actions import ACTIONS, ActionError, InstanceActions
from skynet.web.metrics import PROMETHEUS_CONTENT_TYPE, prometheus_text
from skynet.web.model import DashboardModel

#: Where the page's files are.
STATIC_DIR = Path(__file__).resolve().parent / "static"

_SECURITY_HEADERS = {
    b"X-Content-Type-Options": b"nosniff",
    # The page may be opened with ?token=...: never send it on as a referrer.
    b"Referrer-Policy": b"no-referrer",
    b"X-Frame-Options": b"DENY",
    b"Content-Security-Policy": (
        b"default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; "
        b"style-src 'self'; script-src 'self'; frame-ancestors 'none'"
    ),
}


def _json(request: Any, body: Any, status: int = 200) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json; charset=utf-8")
    request.setHeader(b"Cache-Control", b"no-store")
    return json.dumps(body, separators=(",", ":")).encode("utf-8")


def bearer_token(request: Any) -> str | None:
    """
    The token of a request's C{Authorization: Bearer} header, if any.
    """
    raw = request.getHeader(b"authorization")
    if not raw:
        return None
    header = raw.decode("latin-1") if isinstance(raw, bytes) else raw
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def same_origin(origin: str | None, host: str | None) -> bool:
    """
    Whether a browser's C{Origin} names the host the request went to.
    A request without an Origin (not from a browser page) passes.
    """
    if not origin or origin == "null":
        return not origin
    try:
        netloc = urlsplit(origin).netloc
    except ValueError:
        return False
    return bool(host) and netloc.lower() == (host or "").lower()


class _StaticFiles(File):
    """
    The page's files, without directory listings.
    """

    contentTypes = dict(File.contentTypes, **{".js": "text/javascript", ".css": "text/css"})
    indexNames: list[str] = []

    def directoryListing(self) -> Resource:
        return self.childNotFound


class DashboardSocket(WebSocketServerProtocol):
    """
    One page's WebSocket: a snapshot on open, then every delta; the page
    may ask for full series with C{{"type": "series", "keys": [...]}}.
    """

    # Autobahn's own txaio logger stays (it filters its per-frame debug lines).
    factory: DashboardSocketFactory
    _unsubscribe: Callable[[], None] | None = None

    def onConnect(self, request: Any) -> None:
        if not same_origin(request.origin, request.headers.get("host")):
            raise ConnectionDeny(403, "cross-origin WebSocket refused")

    def onOpen(self) -> None:
        model = self.factory.model
        self.send_json(self.factory.app.snapshot())
        self._unsubscribe = model.subscribe(self.send_json)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if isBinary:
            return
        try:
            message = json.loads(payload)
        except ValueError:
            return
        if not isinstance(message, dict):
            return
        if message.get("type") == "series":
            keys = [k for k in message.get("keys") or [] if isinstance(k, str)][:1000]
            self.send_json(self.factory.model.series_message(keys))
        elif message.get("type") == "ping":
            self.send_json({"type": "pong", "time": self.factory.model.reactor.seconds()})

    def onClose(self, wasClean: bool, code: Any, reason: Any) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None

    def send_json(self, message: dict[str, Any]) -> None:
        self.sendMessage(json.dumps(message, separators=(",", ":")).encode("utf-8"))


class DashboardSocketFactory(WebSocketServerFactory):
    protocol = DashboardSocket  # type: ignore[assignment]

    def __init__(self, app: DashboardApp) -> None:
        super().__init__()
        self.app = app
        self.model = app.model
        # Deltas of 500 instances are small, but a snapshot may not be.
        self.setProtocolOptions(autoPingInterval=20, autoPingTimeout=20)


class DashboardApp:
    """
    The dashboard's routes over a L{DashboardModel}.

    @param token: the secret that enables actions, or L{None} for a
        read-only dashboard.
    """

    app = Klein()
    log = Logger()

    def __init__(
        self,
        model: DashboardModel,
        token: str | None = None,
        actions: InstanceActions | None = None,
        static_dir: Path = STATIC_DIR,
    ) -> None:
        self.model = model
        self.token = token or None
        self.actions = actions or InstanceActions(model, model.reactor)
        self.static_dir = static_dir
        self.socket_factory = DashboardSocketFactory(self)

    def resource(self) -> Resource:
        return self.app.resource()

    def site(self) -> Site:
        site = Site(self.resource())
        site.displayTracebacks = False
        return site

    def authorized(self, request: Any) -> bool:
        """
        Whether the request carries the configured token (never when none
        is configured).
        """
        if self.token is None:
            return False
        presented = bearer_token(request)
        if presented is None:
            return False
        return hmac.compare_digest(presented.encode("utf-8"), self.token.encode("utf-8"))

    def snapshot(self) -> dict[str, Any]:
        message = self.model.snapshot_message()
        message["config"]["actions"] = self.token is not None
        message["config"]["action_names"] = list(ACTIONS)
        return message

    def _secure(self, request: Any) -> None:
        for name, value in _SECURITY_HEADERS.items():
            request.setHeader(name, value)

    @app.route("/", methods=["GET", "HEAD"])
    def index(self, request: Any) -> bytes:
        self._secure(request)
        request.setHeader(b"Cache-Control", b"no-cache")
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        return (self.static_dir / "index.html").read_bytes()

    @app.route("/favicon.ico", methods=["GET", "HEAD"])
    def favicon(self, request: Any) -> bytes:
        request.setResponseCode(204)
        return b""

    @app.route("/static/", branch=True, methods=["GET", "HEAD"])
    def static(self, request: Any) -> Any:
        self._secure(request)
        request.setHeader(b"Cache-Control", b"no-cache")
        return _StaticFiles(str(self.static_dir))

    @app.route("/ws", methods=["GET"])
    def websocket(self, request: Any) -> Any:
        return WebSocketResource(self.socket_factory)

    @app.route("/api/state", methods=["GET"])
    def state(self, request: Any) -> bytes:
        return _json(request, self.snapshot())

    @app.route("/api/series", methods=["GET"])
    def series(self, request: Any) -> bytes:
        keys = [k.decode("utf-8", "replace") for k in request.args.get(b"key", [])][:1000]
        return _json(request, self.model.series_message(keys))

    @app.route("/api/auth", methods=["GET"])
    def auth(self, request: Any) -> bytes:
        if self.token is None:
            return _json(request, {"ok": False, "error": "read-only: no token configured"}, 403)
        if not self.authorized(request):
            return _json(request, {"ok": False, "error": "wrong or missing token"}, 403)
        return _json(request, {"ok": True})

    @app.route("/api/instances/<uuid>/<action>", methods=["POST"])
    def act(self, request: Any, uuid: str, action: str) -> Any:
        if self.token is None:
            self._refused(request, action, uuid, "read-only")
            return _json(request, {"ok": False, "error": "read-only: no token configured"}, 403)
        if not self.authorized(request):
            self._refused(request, action, uuid, "wrong or missing token")
            return _json(request, {"ok": False, "error": "wrong or missing token"}, 403)
        return ensureDeferred(self._act(request, uuid, action))

    def _refused(self, request: Any, action: str, uuid: str, why: str) -> None:
        peer = request.getClientAddress()
        self.log.warn(
            "refused {action} of {uuid} from {peer}: {why}",
            action=action,
            uuid=uuid,
            peer=getattr(peer, "host", peer),
            why=why,
        )

    async def _act(self, request: Any, uuid: str, action: str) -> bytes:
        peer = request.getClientAddress()
        who = f"{getattr(peer, 'host', '?')}"
        try:
            result = await self.actions.perform(action, uuid, who=who)
        except ActionError as e:
            return _json(request, {"ok": False, "error": e.message}, e.status)
        return _json(request, result)

    @app.route("/metrics", methods=["GET"])
    def metrics(self, request: Any) -> bytes:
        request.setHeader(b"Content-Type", PROMETHEUS_CONTENT_TYPE.encode())
        return prometheus_text(self.model).encode("utf-8")


__all__ = ["STATIC_DIR", "DashboardApp", "DashboardSocket", "bearer_token", "same_origin"]
