"""
The dashboard's hardening without sockets: sessions and their expiry, the
Host check, CSRF and origin rules of L{DashboardApp.authorized}, the access
log line without a query string.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from skynet.registry.memory import MemoryRegistry
from skynet.web.app import (
    CSRF_HEADER,
    SESSION_COOKIE,
    DashboardApp,
    Sessions,
    access_log_line,
    request_hostname,
)
from skynet.web.model import DashboardModel

TOKEN = "t0ken"


def request(host: str | None = "127.0.0.1:8080", **headers: str) -> DummyRequest:
    r = DummyRequest([b""])
    r.received_cookies = {}  # as twisted.web's Request has
    if host is not None:
        r.requestHeaders.setRawHeaders(b"host", [host.encode()])
    for name, value in headers.items():
        r.requestHeaders.setRawHeaders(name.replace("_", "-").encode(), [value.encode()])
    return r


class SessionsTests(SynchronousTestCase):
    def test_expiry_and_limit(self) -> None:
        clock = Clock()
        sessions = Sessions(clock, ttl=10.0, limit=2)
        first, csrf = sessions.create()
        self.assertEqual(sessions.csrf(first), csrf)
        self.assertIsNone(sessions.csrf("forged"))
        self.assertIsNone(sessions.csrf(None))
        clock.advance(11)
        self.assertIsNone(sessions.csrf(first))
        a, _ = sessions.create()
        b, _ = sessions.create()
        c, _ = sessions.create()  # the oldest goes
        self.assertIsNone(sessions.csrf(a))
        self.assertIsNotNone(sessions.csrf(b))
        sessions.end(c)
        self.assertIsNone(sessions.csrf(c))


class HostNameTests(SynchronousTestCase):
    def test_request_hostname(self) -> None:
        for header, name in (("127.0.0.1:8080", "127.0.0.1"), ("LOCALHOST", "localhost"),
                             ("[::1]:8080", "::1"), ("Evil.Example:80", "evil.example"),
                             ("::1", "::1")):  # fmt: skip
            self.assertEqual(request_hostname(request(header)), name, header)
        self.assertIsNone(request_hostname(request(None)))

    def test_allowed(self) -> None:
        app = DashboardApp(DashboardModel(MemoryRegistry(), reactor=Clock()), TOKEN,
                           allowed_hosts=["Dash.Example.com"])  # fmt: skip
        for host in ("127.0.0.1:1", "localhost", "[::1]:2", "dash.example.com:8080"):
            self.assertTrue(app.host_allowed(request(host)), host)
        for host in ("evil.example", "127.0.0.1.evil.example", "10.0.0.1", None):
            self.assertFalse(app.host_allowed(request(host)), host)


class AuthorizedTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.app = DashboardApp(DashboardModel(MemoryRegistry(), reactor=Clock()), TOKEN)
        self.session, self.csrf = self.app.sessions.create()

    def with_session(self, **headers: str) -> DummyRequest:
        r = request(**headers)
        r.received_cookies[SESSION_COOKIE] = self.session.encode()
        return r

    def test_bearer(self) -> None:
        self.assertTrue(self.app.authorized(request(authorization=f"Bearer {TOKEN}")))
        self.assertFalse(self.app.authorized(request(authorization=f"Bearer {TOKEN}x")))
        self.assertFalse(self.app.authorized(request()))

    def test_session_needs_csrf_for_changes(self) -> None:
        header = CSRF_HEADER.decode()
        self.assertTrue(self.app.authorized(self.with_session(), state_changing=False))
        self.assertFalse(self.app.authorized(self.with_session()))
        self.assertFalse(self.app.authorized(self.with_session(**{header: "nope"})))
        self.assertTrue(self.app.authorized(self.with_session(**{header: self.csrf})))
        cross = self.with_session(**{header: self.csrf, "origin": "http://evil.example"})
        self.assertFalse(self.app.authorized(cross))
        same = self.with_session(**{header: self.csrf, "origin": "http://127.0.0.1:8080"})
        self.assertTrue(self.app.authorized(same))

    def test_read_only_never(self) -> None:
        app = DashboardApp(DashboardModel(MemoryRegistry(), reactor=Clock()), None)
        self.assertFalse(app.authorized(request(authorization="Bearer anything")))


class AccessLogTests(SynchronousTestCase):
    def test_no_query_string(self) -> None:
        r = DummyRequest([b""])
        r.uri = b"/?token=" + TOKEN.encode() + b"&x=1"
        r.method = b"GET"
        r.clientproto = b"HTTP/1.1"
        r.code = 200
        r.sentLength = 12
        r.requestHeaders.setRawHeaders(b"referer", [b"http://x/?token=" + TOKEN.encode()])
        r.requestHeaders.setRawHeaders(b"user-agent", [b'agent "quoted"'])
        line = access_log_line("[01/Dec/2026:09:00:00 +0000]", r)
        self.assertNotIn(TOKEN, line)
        self.assertIn('"GET / HTTP/1.1" 200 12', line)
        self.assertIn('agent \\"quoted\\"', line)
