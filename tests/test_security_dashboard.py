"""
The dashboard hardened, on a real C{twistd -n skynet-dashboard} and a real
service whose name and version are markup: the token exchanged for an
HttpOnly, SameSite=Strict session whose CSRF token every action needs;
requests for foreign host names (DNS rebinding) and cross-origin
WebSockets refused; no token in the access log; and, in real Chromium,
everything from the registry rendered as text.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import socket
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from twisted.trial.unittest import SynchronousTestCase

from tests.processes import ServiceProcess
from tests.test_dashboard_browser import Process, launch, require_browser, twistd, wait_until

pytestmark = pytest.mark.slow

TOKEN = "s3cret-dashboard-token"
XSS_NAME = "<img src=x onerror=window.__xss=1>"
XSS_VERSION = "<svg onload=window.__xss=2>"


def request(url: str, method: str = "GET", headers: dict[str, str] | None = None,
            ) -> tuple[int, dict[str, str], Any]:  # fmt: skip
    req = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as response:
            status, head, raw = response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as e:
        status, head, raw = e.code, dict(e.headers), e.read()
    try:
        body = json.loads(raw)
    except ValueError:
        body = raw
    return status, head, body


def websocket_status(port: int, origin: str | None, host: str) -> int:
    """
    The HTTP status of a WebSocket upgrade of C{/ws} with C{origin}.
    """
    key = base64.b64encode(os.urandom(16)).decode()
    lines = ["GET /ws HTTP/1.1", f"Host: {host}", "Upgrade: websocket",
             "Connection: Upgrade", f"Sec-WebSocket-Key: {key}",
             "Sec-WebSocket-Version: 13"]  # fmt: skip
    if origin is not None:
        lines.append(f"Origin: {origin}")
    with socket.create_connection(("127.0.0.1", port), 10) as s:
        s.settimeout(10)
        s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        answer = b""
        while b"\r\n" not in answer:
            chunk = s.recv(1024)
            if not chunk:
                break
            answer += chunk
    return int(answer.split(b" ", 2)[1])


class HardenedDashboardTests(SynchronousTestCase):
    @classmethod
    def setUpClass(cls) -> None:
        cls.directory = Path(tempfile.mkdtemp(prefix="skynet-secdash-"))
        registry = f"file://{cls.directory}/registry"
        token_file = cls.directory / "token"
        token_file.write_text(TOKEN + "\n")
        token_file.chmod(0o600)
        cls.service = ServiceProcess("examples.testservice:TestService", registry, "--name",
                                     XSS_NAME, "--version", XSS_VERSION,
                                     log_dir=str(cls.directory)).start()  # fmt: skip
        cls.dashboard = Process("dashboard", [
            twistd(), "-n", "--pidfile=", "skynet-dashboard", "--registry", registry,
            "--listen", "tcp:0:interface=127.0.0.1", "--token-file", str(token_file),
            "--stats-interval", "0.5",
        ], cls.directory)  # fmt: skip
        try:
            found = wait_until(
                lambda: re.search(r"skynet dashboard on (http://\S+/)", cls.dashboard.output()),
                30, "the dashboard's URL",
            )  # fmt: skip
            cls.url = found.group(1).rstrip("/")
            cls.port = int(cls.url.rsplit(":", 1)[1])
            cls.uuid = wait_until(lambda: cls.rows(), 30, "the instance")[0]["uuid"]
        except BaseException:
            cls.tearDownClass()
            raise

    @classmethod
    def rows(cls) -> list[dict[str, Any]]:
        status, _, body = request(cls.url + "/api/state")
        return body["rows"] if status == 200 else []

    @classmethod
    def tearDownClass(cls) -> None:
        cls.service.stop()
        cls.dashboard.stop()
        shutil.rmtree(cls.directory, ignore_errors=True)

    def login(self) -> tuple[str, str]:
        status, headers, body = request(self.url + "/api/session", "POST",
                                        {"Authorization": f"Bearer {TOKEN}"})  # fmt: skip
        self.assertEqual(status, 200, body)
        cookie = headers["Set-Cookie"]
        attributes = {a.strip().lower() for a in cookie.split(";")}
        self.assertIn("httponly", attributes)
        self.assertIn("samesite=strict", attributes)
        return cookie.split(";")[0], body["csrf"]

    def act(self, action: str, headers: dict[str, str]) -> int:
        status, _, _ = request(f"{self.url}/api/instances/{self.uuid}/{action}", "POST", headers)
        return status

    def test_actions_need_the_session_and_its_csrf_token(self) -> None:
        cookie, csrf = self.login()
        origin = self.url
        for headers in (
            {},
            {"Cookie": cookie},                                       # no CSRF token
            {"X-Skynet-CSRF": csrf},                                  # no session
            {"Cookie": cookie, "X-Skynet-CSRF": csrf + "x"},          # wrong token
            {"Cookie": "skynet_session=forged", "X-Skynet-CSRF": csrf},
            {"Cookie": cookie, "X-Skynet-CSRF": csrf, "Origin": "http://evil.example"},
        ):  # fmt: skip
            self.assertEqual(self.act("unregister", headers), 403, headers)
        self.assertTrue(self.rows()[0]["registered"])
        good = {"Cookie": cookie, "X-Skynet-CSRF": csrf, "Origin": origin}
        self.assertEqual(self.act("unregister", good), 200)
        wait_until(lambda: not self.rows()[0]["registered"], 15, "unregistered")
        self.assertEqual(self.act("register", good), 200)
        wait_until(lambda: self.rows()[0]["registered"], 15, "registered again")
        # Ended: the same cookie and token no longer act.
        status, _, _ = request(self.url + "/api/session", "DELETE", good)
        self.assertEqual(status, 200)
        self.assertEqual(self.act("unregister", good), 403)

    def test_wrong_token_gets_no_session(self) -> None:
        status, headers, _ = request(self.url + "/api/session", "POST",
                                     {"Authorization": "Bearer wrong"})  # fmt: skip
        self.assertEqual(status, 403)
        self.assertNotIn("Set-Cookie", headers)
        status, _, _ = request(self.url + "/api/session", "POST",
                               {"Authorization": f"Bearer {TOKEN}",
                                "Origin": "http://evil.example"})  # fmt: skip
        self.assertEqual(status, 403)

    def test_foreign_host_names_refused(self) -> None:
        """
        DNS rebinding: a page of evil.example whose name now resolves to
        127.0.0.1 sends C{Host: evil.example}; it reads nothing.
        """
        for path in ("/api/state", "/", "/metrics", "/ws"):
            status, _, body = request(
                self.url + path, headers={"Host": f"evil.example:{self.port}"}
            )
            self.assertEqual(status, 421, (path, body))
        self.assertEqual(websocket_status(self.port, None, f"evil.example:{self.port}"), 421)
        for host in (f"127.0.0.1:{self.port}", f"localhost:{self.port}"):
            status, _, _ = request(self.url + "/api/state", headers={"Host": host})
            self.assertEqual(status, 200, host)

    def test_cross_origin_websocket_refused(self) -> None:
        host = f"127.0.0.1:{self.port}"
        self.assertEqual(websocket_status(self.port, "http://evil.example", host), 403)
        self.assertEqual(websocket_status(self.port, f"http://{host}", host), 101)

    def test_no_token_in_the_access_log(self) -> None:
        request(f"{self.url}/?token={TOKEN}")
        request(f"{self.url}/api/state?token={TOKEN}")
        self.login()
        request(self.url + "/api/session", "POST", {"Authorization": "Bearer " + TOKEN + "x"})
        wait_until(lambda: "/api/state" in self.dashboard.output(), 10, "the access log")
        log = self.dashboard.output()
        self.assertIn('"GET / HTTP/1.1" 200', log)
        self.assertNotIn(TOKEN, log)

    def test_registry_text_rendered_as_text_in_chromium(self) -> None:
        """
        An instance named C{<img src=x onerror=...>}, version C{<svg
        onload=...>}: the page shows the characters, runs nothing and makes
        no such elements, with actions unlocked by the token in the URL.
        """
        sync_api = require_browser()
        with sync_api.sync_playwright() as playwright:
            browser = launch(playwright)
            try:
                page = browser.new_page()
                errors: list[str] = []
                page.on("pageerror", lambda e: errors.append(str(e)))
                page.goto(f"{self.url}/?token={TOKEN}")
                page.wait_for_function(
                    "(name) => document.body.innerText.includes(name)", arg=XSS_NAME,
                    timeout=30000,
                )  # fmt: skip
                page.wait_for_function("() => document.body.classList.contains('can-act')",
                                       timeout=15000)  # fmt: skip
                self.assertNotIn("token=", page.url)
                text = page.evaluate("() => document.body.innerText")
                self.assertIn(XSS_NAME, text)
                self.assertIn(XSS_VERSION, text)
                self.assertIsNone(page.evaluate("() => window.__xss"))
                self.assertEqual(
                    page.evaluate(
                        "() => document.querySelectorAll('img[src=\"x\"], svg[onload]').length"
                    ),
                    0,
                )
                # The session cookie is not readable by the page's scripts.
                self.assertNotIn("skynet_session", page.evaluate("() => document.cookie"))
                self.assertEqual(errors, [])
            finally:
                browser.close()


class TLSDashboardTests(SynchronousTestCase):
    """
    A dashboard with credentials (C{--tls}) acts on a service whose admin
    endpoint speaks TLS and on a plain one (as a Go service's is), each as
    its registry entry advertises.
    """

    def test_actions_on_tls_and_plain_admin_endpoints(self) -> None:
        from skynet import tls

        directory = Path(tempfile.mkdtemp(prefix="skynet-tlsdash-"))
        self.addCleanup(shutil.rmtree, directory, True)
        secure_home, plain_home = directory / "secure", directory / "plain"
        tls.init_cluster(str(secure_home / "tls"))
        plain_home.mkdir()
        registry = f"file://{directory}/registry"
        token_file = directory / "token"
        token_file.write_text(TOKEN)
        token_file.chmod(0o600)
        secure = ServiceProcess(
            "examples.testservice:TestService",
            registry,
            "--name",
            "Secure",
            log_dir=str(directory),
            env={"SKYNET_HOME": str(secure_home)},
        )
        plain = ServiceProcess(
            "examples.testservice:TestService",
            registry,
            "--name",
            "Plain",
            log_dir=str(directory),
            env={"SKYNET_HOME": str(plain_home)},
        )
        for service in (secure.start(), plain.start()):
            self.addCleanup(service.stop)
        dashboard = Process("dashboard", [
            twistd(), "-n", "--pidfile=", "skynet-dashboard", "--registry", registry,
            "--listen", "tcp:0:interface=127.0.0.1", "--token-file", str(token_file),
            "--stats-interval", "0.5", "--tls", str(secure_home / "tls" / "operator"),
        ], directory)  # fmt: skip
        self.addCleanup(dashboard.stop)
        url = wait_until(
            lambda: re.search(r"skynet dashboard on (http://\S+/)", dashboard.output()),
            30, "the dashboard's URL",
        ).group(1).rstrip("/")  # fmt: skip

        def rows() -> dict[str, dict[str, Any]]:
            status, _, body = request(url + "/api/state")
            return {r["service"]: r for r in body["rows"]} if status == 200 else {}

        found = wait_until(lambda: len(rows()) == 2 and rows(), 30, "both instances")
        entries = {}
        for path in (directory / "registry" / "services").rglob("*"):
            if path.is_file():
                doc = json.loads(path.read_text())
                entries[doc["Config"]["Name"]] = doc.get("Extra", {})
        self.assertEqual(entries["Secure"].get("AdminTLS"), True)
        self.assertNotIn("AdminTLS", entries["Plain"])
        for name in ("Secure", "Plain"):
            status, _, body = request(f"{url}/api/instances/{found[name]['uuid']}/unregister",
                                      "POST", {"Authorization": f"Bearer {TOKEN}"})  # fmt: skip
            self.assertEqual(status, 200, (name, body, dashboard.output()[-3000:]))
        wait_until(lambda: not any(r["registered"] for r in rows().values()), 15,
                   "both unregistered")  # fmt: skip

    def test_https_dashboard_marks_the_cookie_secure(self) -> None:
        """
        Served over HTTPS with the host's credentials (an C{ssl:}
        endpoint): the logged URL is https and the session cookie Secure.
        """
        import ssl

        from skynet import tls

        directory = Path(tempfile.mkdtemp(prefix="skynet-httpsdash-"))
        self.addCleanup(shutil.rmtree, directory, True)
        creds = directory / "tls"
        tls.init_cluster(str(creds))
        token_file = directory / "token"
        token_file.write_text(TOKEN)
        token_file.chmod(0o600)
        endpoint = (f"ssl:0:interface=127.0.0.1:privateKey={creds}/key.pem:"
                    f"certKey={creds}/cert.pem")  # fmt: skip
        dashboard = Process("dashboard", [
            twistd(), "-n", "--pidfile=", "skynet-dashboard", "--registry",
            f"file://{directory}/registry", "--listen", endpoint, "--token-file", str(token_file),
        ], directory)  # fmt: skip
        self.addCleanup(dashboard.stop)
        url = wait_until(
            lambda: re.search(r"skynet dashboard on (https://\S+/)", dashboard.output()),
            30, "the dashboard's https URL",
        ).group(1)  # fmt: skip
        context = ssl.create_default_context(cafile=str(creds / "ca.pem"))
        login = urllib.request.Request(url + "api/session", method="POST",
                                       headers={"Authorization": f"Bearer {TOKEN}"})  # fmt: skip
        with urllib.request.urlopen(login, context=context, timeout=10) as response:
            cookie = response.headers["Set-Cookie"]
        attributes = {a.strip().lower() for a in cookie.split(";")}
        self.assertTrue({"secure", "httponly", "samesite=strict"} <= attributes, cookie)
