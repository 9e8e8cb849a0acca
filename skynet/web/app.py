"""
The dashboard's web application: Klein routes and an Autobahn WebSocket
on one port.

    GET  /                          the page (static/index.html)
    GET  /static/...                its script and style
    GET  /ws                        the WebSocket: a snapshot, then deltas
    GET  /api/state                 the snapshot, as JSON
    GET  /api/series?key=K&key=...  full time series (i:<uuid>, s:<service>, h:<host>)
    GET  /api/auth                  200 if the request may act (token or session), else 403
    POST /api/session               the token (Authorization: Bearer) for a session cookie
    DELETE /api/session             end the session
    POST /api/instances/<uuid>/<action>   register, unregister, stop, restart
    GET  /api/logs?grep=RE&...      the logs view: the daemons' SearchLogs (skynet.web.logs)
    GET  /api/trace/<request_id>    one request's call tree (skynet.web.traces)
    GET  /api/slow?limit=N&since=S  the slowest recent calls of the cluster
    GET  /metrics                   Prometheus text format

Actions need the configured token in an C{Authorization: Bearer <token>}
header (scripts), or a session: the page exchanges the token once at
C{POST /api/session} for an C{HttpOnly}, C{SameSite=Strict} cookie and a
CSRF token it sends back in C{X-Skynet-CSRF} with every action (a page of
another site can neither read it nor set the header).  Without a configured
token the dashboard is read-only: every action is refused with 403 and
changes nothing, as is any action without the right token or session.

Every request must name, in its C{Host} header, a name the dashboard
serves (loopback, its interface, and C{--allowed-host} names), so that a
page whose DNS name was rebound to this address cannot read it; a
WebSocket's C{Origin} must be the dashboard's own.  The access log has no
query strings (a token given as C{/?token=...} never reaches it).
"""

from __future__ import annotations

import hmac
import json
import secrets
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
from twisted.web.resource import ErrorPage, Resource
from twisted.web.server import Site
from twisted.web.static import File

from skynet.observe.logsearch import SearchError
from skynet.web.actions import ACTIONS, ActionError, InstanceActions
from skynet.web.logs import DashboardLogs
from skynet.web.metrics import PROMETHEUS_CONTENT_TYPE, prometheus_text
from skynet.web.model import DashboardModel
from skynet.web.traces import DashboardTraces, TraceError

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


#: The session cookie and the header that must repeat its CSRF token.
SESSION_COOKIE = b"skynet_session"
CSRF_HEADER = b"x-skynet-csrf"

#: Names every dashboard answers to.
LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})


def request_hostname(request: Any) -> str | None:
    """
    The host name of a request's C{Host} header, without the port,
    lower-cased (L{None} without one).
    """
    raw = request.getHeader(b"host")
    if not raw:
        return None
    host = raw.decode("latin-1") if isinstance(raw, bytes) else raw
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def access_log_line(timestamp: str, request: Any) -> str:
    """
    A combined-log-format line without the query string (which may hold a
    token) and without the referrer (which may too).
    """

    def text(value: Any) -> str:
        raw = value.decode("latin-1") if isinstance(value, bytes) else str(value)
        return json.dumps(raw)[1:-1]  # quotes and control characters escaped

    ip = getattr(request.getClientAddress(), "host", "-")
    path = request.uri.split(b"?", 1)[0]
    agent = request.getHeader(b"user-agent") or b"-"
    return (
        f'"{text(ip)}" - - {timestamp} "{text(request.method)} {text(path)} '
        f'{text(request.clientproto)}" {request.code} {request.sentLength or "-"} "-" '
        f'"{text(agent)}"'
    )


class Sessions:
    """
    The dashboard's sessions: an id (the cookie) and a CSRF token each,
    for C{ttl} seconds; at most C{limit} (the oldest go first).
    """

    def __init__(self, clock: Any, ttl: float = 12 * 3600.0, limit: int = 256) -> None:
        self.clock = clock
        self.ttl = ttl
        self.limit = limit
        self._sessions: dict[str, tuple[str, float]] = {}

    def create(self) -> tuple[str, str]:
        while len(self._sessions) >= self.limit:
            self._sessions.pop(next(iter(self._sessions)))
        session, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        self._sessions[session] = (csrf, self.clock.seconds() + self.ttl)
        return session, csrf

    def csrf(self, session: str | None) -> str | None:
        """
        The CSRF token of a live session, else L{None}.
        """
        if not session:
            return None
        entry = self._sessions.get(session)
        if entry is None:
            return None
        if entry[1] < self.clock.seconds():
            del self._sessions[session]
            return None
        return entry[0]

    def end(self, session: str | None) -> None:
        if session:
            self._sessions.pop(session, None)


def _equal(a: str | None, b: str | None) -> bool:
    if not a or not b:
        return False
    return hmac.compare_digest(a.encode("utf-8"), b.encode("utf-8"))


class _HostGuard(Resource):
    """
    Answers 421 to a request whose C{Host} the dashboard does not serve
    (DNS rebinding), else hands it to the application.
    """

    isLeaf = True

    def __init__(self, app: "DashboardApp", wrapped: Resource) -> None:
        super().__init__()
        self.app = app
        self.wrapped = wrapped

    def render(self, request: Any) -> Any:
        if not self.app.host_allowed(request):
            self.app.log.warn("refused a request for host {host!r} from {peer}",
                              host=request_hostname(request),
                              peer=getattr(request.getClientAddress(), "host", "?"))  # fmt: skip
            return ErrorPage(421, "Misdirected Request", "unknown host name").render(request)
        return self.wrapped.render(request)


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
        allowed_hosts: Any = (),
        logs: DashboardLogs | None = None,
        traces: DashboardTraces | None = None,
    ) -> None:
        self.model = model
        self.token = token or None
        self.allowed_hosts = LOOPBACK_NAMES | {h.lower() for h in allowed_hosts}
        self.sessions = Sessions(model.reactor)
        self.actions = actions or InstanceActions(model, model.reactor)
        self.logs = logs or DashboardLogs(model, model.reactor)
        self.traces = traces or DashboardTraces(model, model.reactor)
        self.static_dir = static_dir
        self.socket_factory = DashboardSocketFactory(self)

    def resource(self) -> Resource:
        return _HostGuard(self, self.app.resource())

    def site(self) -> Site:
        site = Site(self.resource(), logFormatter=access_log_line)
        site.displayTracebacks = False
        return site

    def host_allowed(self, request: Any) -> bool:
        return request_hostname(request) in self.allowed_hosts

    def authorized(self, request: Any, state_changing: bool = True) -> bool:
        """
        Whether the request may act: it carries the configured token, or a
        live session cookie and (for a state-changing request) that
        session's CSRF token in C{X-Skynet-CSRF}, from no other origin.
        Never when no token is configured.
        """
        if self.token is None:
            return False
        presented = bearer_token(request)
        if presented is not None:
            return _equal(presented, self.token)
        csrf = self.sessions.csrf(self._session_id(request))
        if csrf is None:
            return False
        if not state_changing:
            return True
        origin = request.getHeader(b"origin")
        if origin is not None and not same_origin(
            origin.decode("latin-1"), (request.getHeader(b"host") or b"").decode("latin-1")
        ):
            return False
        header = request.getHeader(CSRF_HEADER)
        return _equal(header.decode("latin-1") if header else None, csrf)

    def _session_id(self, request: Any) -> str | None:
        raw = request.received_cookies.get(SESSION_COOKIE)
        return raw.decode("latin-1") if raw else None

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

    @app.route("/api/deployments", methods=["GET"])
    async def deployments(self, request: Any) -> bytes:
        """
        The cluster's deployments (desired vs actual, state and why, the
        leader) and its last placement events, as C{sky deployments --json}.
        """
        from skynet.cluster.commands import read_statuses

        try:
            statuses, stored, leader = await read_statuses(self.model.registry)
        except Exception as e:
            return _json(request, {"ok": False, "error": f"registry: {e}"}, 503)
        events = [e for e in stored.events if e.get("kind") != "status"][-20:]
        return _json(request, {"ok": True, "leader": leader,
                               "deployments": [st.to_json() for st in statuses],
                               "events": events})  # fmt: skip

    @app.route("/api/series", methods=["GET"])
    def series(self, request: Any) -> bytes:
        keys = [k.decode("utf-8", "replace") for k in request.args.get(b"key", [])][:1000]
        return _json(request, self.model.series_message(keys))

    @app.route("/api/auth", methods=["GET"])
    def auth(self, request: Any) -> bytes:
        if self.token is None:
            return _json(request, {"ok": False, "error": "read-only: no token configured"}, 403)
        if not self.authorized(request, state_changing=False):
            return _json(request, {"ok": False, "error": "wrong or missing token"}, 403)
        return _json(request, {"ok": True})

    @app.route("/api/session", methods=["POST"])
    def login(self, request: Any) -> bytes:
        """
        Exchange the token (C{Authorization: Bearer}) for a session: an
        C{HttpOnly}, C{SameSite=Strict} cookie and its CSRF token.
        """
        if self.token is None:
            return _json(request, {"ok": False, "error": "read-only: no token configured"}, 403)
        origin = request.getHeader(b"origin")
        host = (request.getHeader(b"host") or b"").decode("latin-1")
        if origin is not None and not same_origin(origin.decode("latin-1"), host):
            return _json(request, {"ok": False, "error": "cross-origin request refused"}, 403)
        if not _equal(bearer_token(request), self.token):
            self._refused(request, "login", "-", "wrong or missing token")
            return _json(request, {"ok": False, "error": "wrong or missing token"}, 403)
        session, csrf = self.sessions.create()
        request.addCookie(SESSION_COOKIE, session.encode(), path=b"/", httpOnly=True,
                          sameSite="strict", secure=request.isSecure())  # fmt: skip
        return _json(request, {"ok": True, "csrf": csrf})

    @app.route("/api/session", methods=["DELETE"])
    def logout(self, request: Any) -> bytes:
        if self.authorized(request):
            self.sessions.end(self._session_id(request))
        request.addCookie(SESSION_COOKIE, b"", path=b"/", httpOnly=True, sameSite="strict",
                          max_age=b"0")  # fmt: skip
        return _json(request, {"ok": True})

    @app.route("/api/instances/<uuid>/<action>", methods=["POST"])
    def act(self, request: Any, uuid: str, action: str) -> Any:
        if self.token is None:
            self._refused(request, action, uuid, "read-only")
            return _json(request, {"ok": False, "error": "read-only: no token configured"}, 403)
        if not self.authorized(request):
            self._refused(request, action, uuid, "wrong or missing token or session")
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

    @app.route("/api/logs", methods=["GET"])
    def search_logs(self, request: Any) -> Any:
        # Read like /api/state (the Host check of _HostGuard applies); the
        # page renders the text of the events as text, never as markup.
        args = {k.decode("utf-8", "replace"): v[0].decode("utf-8", "replace")
                for k, v in request.args.items() if v}  # fmt: skip
        return ensureDeferred(self._search_logs(request, args))

    async def _search_logs(self, request: Any, args: dict[str, str]) -> bytes:
        try:
            answer = await self.logs.search(args)
        except SearchError as e:
            return _json(request, {"ok": False, "error": str(e)}, 400)
        return _json(request, answer)

    @app.route("/api/trace/<request_id>", methods=["GET"])
    def trace(self, request: Any, request_id: str) -> Any:
        # Read like /api/logs; the page sets every name in it as text.
        return ensureDeferred(self._trace(request, request_id))

    async def _trace(self, request: Any, request_id: str) -> bytes:
        try:
            answer = await self.traces.trace(request_id)
        except TraceError as e:
            return _json(request, {"ok": False, "error": str(e)}, 400)
        if answer is None:
            return _json(request, {"ok": False, "request_id": request_id,
                                   "error": f"no spans of request {request_id} found"},
                         404)  # fmt: skip
        return _json(request, answer)

    @app.route("/api/slow", methods=["GET"])
    def slow(self, request: Any) -> Any:
        args = {k.decode("utf-8", "replace"): v[0].decode("utf-8", "replace")
                for k, v in request.args.items() if v}  # fmt: skip
        return ensureDeferred(self._slow(request, args))

    async def _slow(self, request: Any, args: dict[str, str]) -> bytes:
        try:
            answer = await self.traces.slow(args)
        except TraceError as e:
            return _json(request, {"ok": False, "error": str(e)}, 400)
        return _json(request, answer)

    @app.route("/metrics", methods=["GET"])
    def metrics(self, request: Any) -> bytes:
        request.setHeader(b"Content-Type", PROMETHEUS_CONTENT_TYPE.encode())
        return prometheus_text(self.model).encode("utf-8")


__all__ = [
    "STATIC_DIR",
    "DashboardApp",
    "DashboardSocket",
    "Sessions",
    "access_log_line",
    "bearer_token",
    "request_hostname",
    "same_origin",
]
