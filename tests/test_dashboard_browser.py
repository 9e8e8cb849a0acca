"""
The dashboard in a real browser: Debian's Chromium driven by Playwright,
against a real local cluster (a C{twistd skynet-daemon} supervising
Fibonacci and TestService, and standalone TutorialService and Sleeper, on a
temporary embedded registry) and a real C{twistd skynet-dashboard}.

Chromium and Playwright are required: CI installs them (C{.ci/run}); when
they are missing these tests fail, saying what to install.

This module also runs on its own:

    python -m tests.test_dashboard_browser --screenshot docs/dashboard.png

starts the example cluster and the dashboard, puts some load on it for a
while and saves a screenshot.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.processes import ROOT, ServiceProcess, child_env, twistd

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
TOKEN = "browser-test-token"
INTERVAL = "0.5"


def require_browser() -> Any:
    """
    The Playwright module, or a failure naming what is missing.
    """
    try:
        from playwright import sync_api
    except ImportError:
        pytest.fail(
            "the Python package 'playwright' is missing: pip install playwright "
            "(the package only; the browser is Debian's chromium)",
            pytrace=False,
        )
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(
            f"{CHROMIUM} is missing: apt-get install chromium (Debian's; no browser downloads)",
            pytrace=False,
        )
    return sync_api


def free_of_ansi(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


class Process:
    """
    One child process in its own process group, its output in a log file;
    L{stop} ends it and everything it started.
    """

    def __init__(self, name: str, command: list[str], log_dir: Path,
                 env: dict[str, str] | None = None) -> None:  # fmt: skip
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self.log = open(self.log_path, "wb")
        self.popen = subprocess.Popen(
            command, cwd=ROOT, env=child_env(**(env or {})), stdin=subprocess.DEVNULL,
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip

    def output(self) -> str:
        return free_of_ansi(self.log_path.read_text(errors="replace"))

    def stop(self, grace: float = 15.0) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)  # what it started, if anything is left
        except (ProcessLookupError, PermissionError):
            pass
        if self.popen.poll() is None:
            self.popen.wait(5)
        self.log.close()


def wait_until(predicate: Callable[[], Any], timeout: float, what: str,
               interval: float = 0.1) -> Any:  # fmt: skip
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def http(url: str, method: str = "GET", token: str | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(url, method=method)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def admin_call(address: str, servicemethod: str, params: dict[str, Any]) -> dict[str, Any]:
    """
    One raw admin call (as Go Skynet's tools made them).
    """
    import socket
    import struct

    import bson
    from bson.int64 import Int64

    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(bson.encode({"servicemethod": servicemethod, "seq": Int64(0)})
                  + bson.encode(params))  # fmt: skip
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
            if len(data) >= 4:
                first = struct.unpack_from("<i", data)[0]
                if (
                    len(data) >= first + 4
                    and len(data) >= first + struct.unpack_from("<i", data, first)[0]
                ):
                    break
    return bson.decode(data[: struct.unpack_from("<i", data)[0]])


class Cluster:
    """
    The example cluster, a dashboard and some load, all in one temporary
    directory; L{stop} ends every process.
    """

    def __init__(self, load_seconds: float = 120.0) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="skynet-dashboard-"))
        self.registry_root = self.directory / "registry"
        self.registry = f"file://{self.registry_root}"
        self.load_seconds = load_seconds
        self.processes: list[Process] = []
        self.services: list[ServiceProcess] = []
        self.daemon_available = (ROOT / "skynet" / "daemon_tap.py").exists()
        self.url = ""
        self.seen_pids: set[int] = set()

    def start(self) -> "Cluster":
        logs = self.directory / "logs"
        logs.mkdir()
        token_file = self.directory / "token"
        token_file.write_text(TOKEN + "\n")
        token_file.chmod(0o600)
        child_args = f"--listen tcp:0:interface=127.0.0.1 --stats-interval {INTERVAL}"
        if self.daemon_available:
            deploy = self.directory / "deploy.txt"
            deploy.write_text(
                f"examples.fibonacci:Fibonacci {child_args}\n"
                f"examples.fibonacci:Fibonacci {child_args}\n"
                f"examples.testservice:TestService {child_args}\n"
            )
            self.processes.append(Process("daemon", [
                twistd(), "-n", "--pidfile=", "skynet-daemon", "--registry", self.registry,
                "--listen", "tcp:0:interface=127.0.0.1", "--deploy", str(deploy),
                "--log-dir", str(logs), "--stats-interval", INTERVAL,
                "--sample-interval", INTERVAL, "--stop-grace", "5",
            ], logs))  # fmt: skip
        else:
            for spec in ("examples.fibonacci:Fibonacci", "examples.fibonacci:Fibonacci",
                         "examples.testservice:TestService"):  # fmt: skip
                self.services.append(ServiceProcess(spec, self.registry, log_dir=str(logs)))
        for spec in ("examples.tutorial:TutorialService", "examples.sleeper:Sleeper"):
            self.services.append(ServiceProcess(spec, self.registry, log_dir=str(logs)))
        for service in self.services:
            service.start()
        self.dashboard = Process("dashboard", [
            twistd(), "-n", "--pidfile=", "skynet-dashboard", "--registry", self.registry,
            "--listen", "tcp:0:interface=127.0.0.1", "--token-file", str(token_file),
            "--stats-interval", INTERVAL,
        ], logs)  # fmt: skip
        self.processes.append(self.dashboard)
        found = wait_until(
            lambda: re.search(r"skynet dashboard on (http://\S+/)", self.dashboard.output())
            or self._died(),
            30, "the dashboard's URL",
        )  # fmt: skip
        self.url = found.group(1).rstrip("/")
        self.processes.append(Process("load", [
            sys.executable, "-m", "tests.test_dashboard_browser", "--load", self.registry,
            str(self.load_seconds),
        ], logs))  # fmt: skip
        return self

    def _died(self) -> None:
        for p in self.processes:
            if p.popen.poll() is not None:
                raise AssertionError(f"{p.name} exited early:\n{p.output()[-3000:]}")

    def state(self) -> dict[str, Any]:
        code, body = http(self.url + "/api/state")
        assert code == 200, body
        return body

    def rows(self) -> dict[str, dict[str, Any]]:
        rows = {row["uuid"]: row for row in self.state()["rows"]}
        self.seen_pids.update(row["pid"] for row in rows.values() if row["pid"])
        return rows

    def wait_for_all(self) -> int:
        """
        Wait until the dashboard lists every instance of the cluster (the
        daemon and its three children, or three standalone ones instead,
        and two standalone ones).  @return: how many.
        """
        expected = 6 if self.daemon_available else 5
        wait_until(lambda: len(self.rows()) == expected, 30, f"{expected} instances")
        return expected

    def logs(self) -> str:
        parts = [f"--- {p.name} ---\n{p.output()[-4000:]}" for p in self.processes]
        parts += [f"--- {s.service} ---\n{s.output()[-2000:]}" for s in self.services]
        return "\n".join(parts)

    def stop(self) -> None:
        for service in self.services:
            service.stop()
        for process in reversed(self.processes):
            process.stop()
        # The daemon's children live in sessions of their own: a daemon that
        # failed to stop them leaves them to us.  Only processes of this
        # cluster's registry are ours.
        for pid in self.seen_pids:
            try:
                command = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if str(self.registry_root).encode() in command:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def launch(playwright: Any) -> Any:
    return playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)


def open_page(browser: Any, url: str, errors: list[str], width: int = 1600,
              height: int = 1000) -> Any:  # fmt: skip
    """
    A page at C{url}, without the page's CSP (so that only the page's own
    text rendering stands between the cluster's names and the DOM), its
    script errors appended to C{errors}.
    """
    page = browser.new_page(viewport={"width": width, "height": height}, bypass_csp=True)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url)
    return page


def colored_pixels(page: Any, index: int = 0) -> int:
    """
    How many pixels of a chart's plot area (below its legend) are drawn in
    a saturated colour: the lines, not the grey grid.
    """
    return page.evaluate(
        """(index) => {
            const canvas = document.querySelectorAll('#charts canvas')[index];
            const ctx = canvas.getContext('2d');
            const data = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
            const skip = Math.round(24 * (window.devicePixelRatio || 1));
            let count = 0;
            for (let y = skip; y < canvas.height; y++) {
                for (let x = 0; x < canvas.width; x++) {
                    const i = (y * canvas.width + x) * 4;
                    const r = data[i], g = data[i + 1], b = data[i + 2], a = data[i + 3];
                    if (a > 100 && Math.max(r, g, b) - Math.min(r, g, b) > 80) count++;
                }
            }
            return count;
        }""",
        index,
    )


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    require_browser()
    started = Cluster()
    try:
        started.start()
        yield started
    finally:
        started.stop()
        shutil.rmtree(started.directory, ignore_errors=True)


def test_dashboard_in_chromium(cluster: Cluster) -> None:
    sync_api = require_browser()
    try:
        cluster.wait_for_all()
        rows = cluster.rows()
        by_service: dict[str, list[dict[str, Any]]] = {}
        for row in rows.values():
            by_service.setdefault(row["service"], []).append(row)
        with sync_api.sync_playwright() as playwright:
            browser = launch(playwright)
            try:
                run_browser_checks(cluster, browser, rows, by_service)
            finally:
                browser.close()
    except BaseException:
        print(cluster.logs())
        raise


def run_browser_checks(cluster: Cluster, browser: Any, rows: dict[str, Any],
                       by_service: dict[str, list[dict[str, Any]]]) -> None:  # fmt: skip
    errors: list[str] = []
    # Every instance is on the page, read-only without a token.
    page = open_page(browser, cluster.url + "/", errors)
    page.wait_for_function(f"window.skynetDashboard && "
                           f"window.skynetDashboard.stats().rows === {len(rows)}")  # fmt: skip
    for uuid, row in rows.items():
        locator = page.locator(f'tr[data-uuid="{uuid}"]')
        assert locator.is_visible(), row
        assert row["address"] in locator.inner_text()
    assert page.locator("#mode").inner_text() == "read-only"
    assert not page.locator("body.can-act").count()
    assert page.locator("#conn").inner_text() == "live"
    page.evaluate("window.__sameDocument = true")

    # kill -9 of one instance: its row goes away, without a reload.
    [tutorial] = by_service["TutorialService"]
    victim = next(s for s in cluster.services if s.service.endswith(":TutorialService"))
    victim.kill(signal.SIGKILL)
    page.wait_for_selector(f'tr[data-uuid="{tutorial["uuid"]}"]', state="detached",
                           timeout=10_000)  # fmt: skip
    assert page.evaluate("window.__sameDocument === true")
    page.wait_for_selector(f'#event-list li[data-kind="removed"][data-uuid="{tutorial["uuid"]}"]')

    # An unregister flips its state on the page.
    [sleeper] = by_service["Sleeper"]
    sleeper_row = page.locator(f'tr[data-uuid="{sleeper["uuid"]}"]')
    assert sleeper_row.locator(".badge").inner_text() == "registered"
    assert admin_call(sleeper["admin"], "Admin.Unregister", {})["error"] == ""
    page.wait_for_function(
        f"""document.querySelector('tr[data-uuid="{sleeper["uuid"]}"] .badge')
            .textContent === 'unregistered'"""
    )
    assert "unregistered" in (sleeper_row.get_attribute("class") or "")
    # The "registered" filter hides it, "all" shows it again.
    page.click('label:has(input[value="registered"])')
    page.wait_for_function(
        f"""document.querySelector('tr[data-uuid="{sleeper["uuid"]}"]').hidden"""
    )
    page.click('label:has(input[value="all"])')
    assert sleeper_row.is_visible()

    # Without the token, actions are refused and change nothing.
    target = (by_service.get("Fibonacci") or [])[0]
    before = cluster.rows()[target["uuid"]]
    for token in (None, "wrong-token"):
        status = page.evaluate(
            """async ([uuid, token]) => {
                const headers = token ? {Authorization: 'Bearer ' + token} : {};
                const r = await fetch('/api/instances/' + uuid + '/restart',
                                      {method: 'POST', headers});
                return r.status;
            }""",
            [target["uuid"], token],
        )
        assert status == 403, (token, status)
    time.sleep(1.5)
    after = cluster.rows()[target["uuid"]]
    assert (after["pid"], after["start"]) == (before["pid"], before["start"])

    # With the token (given as ?token=, then taken off the address bar).
    armed = browser.new_page(viewport={"width": 1600, "height": 1000}, bypass_csp=True)
    armed.on("pageerror", lambda e: errors.append(str(e)))
    armed.goto(cluster.url + f"/?token={TOKEN}")
    armed.wait_for_selector("body.can-act")
    assert "token" not in armed.url
    assert armed.locator("#mode").inner_text() == "actions enabled"

    # Register the Sleeper again from the page, after a confirmation.
    armed.click(f'tr[data-uuid="{sleeper["uuid"]}"] button[data-action="register"]')
    armed.wait_for_selector("#modal:not([hidden])")
    armed.click("#modal-ok")
    armed.wait_for_function(
        f"""document.querySelector('tr[data-uuid="{sleeper["uuid"]}"] .badge')
            .textContent === 'registered'"""
    )
    page.wait_for_function(
        f"""document.querySelector('tr[data-uuid="{sleeper["uuid"]}"] .badge')
            .textContent === 'registered'"""
    )

    if cluster.daemon_available:
        # Restart a supervised instance through its daemon.
        restart = armed.locator(f'tr[data-uuid="{target["uuid"]}"] button[data-action="restart"]')
        armed.wait_for_selector(
            f'tr[data-uuid="{target["uuid"]}"] button[data-action="restart"]:not([disabled])'
        )
        # Cancelling the confirmation does nothing.
        restart.click()
        armed.click("#modal-cancel")
        restart.click()
        armed.click("#modal-ok")
        armed.wait_for_selector(".toast:not(.error)")
        wait_until(lambda: cluster.rows().get(target["uuid"], {}).get("pid") not in
                   (None, before["pid"]), 30, "the restarted process")  # fmt: skip
        armed.wait_for_selector(
            f'#event-list li[data-kind="restarted"][data-uuid="{target["uuid"]}"]',
            timeout=15_000,
        )
        page.wait_for_selector(f'tr[data-uuid="{target["uuid"]}"]')
        # A standalone instance cannot be restarted: the page says why.
        title = armed.locator(
            f'tr[data-uuid="{sleeper["uuid"]}"] button[data-action="restart"]'
        ).get_attribute("title")
        assert "daemon" in (title or ""), title
    else:
        # No daemon in this tree: stop a standalone instance through its
        # admin endpoint instead (restart needs the daemon).
        armed.click(f'tr[data-uuid="{sleeper["uuid"]}"] button[data-action="stop"]')
        armed.click("#modal-ok")
        armed.wait_for_selector(f'tr[data-uuid="{sleeper["uuid"]}"]', state="detached",
                                timeout=15_000)  # fmt: skip

    # The graphs: drawn from live points, with pixels to show for it.
    page.wait_for_function(
        """(() => {
            const charts = window.skynetDashboard.graphData();
            return charts.length && charts[0].lines.some((l) => l.points >= 3 && l.max > 0);
        })()""",
        timeout=20_000,
    )
    charts = page.evaluate("window.skynetDashboard.graphData()")
    busy = [line for line in charts[0]["lines"] if line["max"] > 0]
    assert {"Fibonacci", "TestService"} <= {line["label"] for line in busy}, charts[0]
    assert colored_pixels(page, 0) > 50
    # One instance's graphs, after a click on its row.
    page.click(f'tr[data-uuid="{target["uuid"]}"] td.c-address')
    page.wait_for_function(
        """(() => {
            const charts = window.skynetDashboard.graphData();
            return charts[0] && charts[0].lines.length && charts[0].lines[0].points >= 2;
        })()""",
        timeout=10_000,
    )
    stats = page.evaluate("window.skynetDashboard.stats()")
    assert stats["connects"] == 1 and stats["snapshots"] == 1, stats
    assert errors == [], errors


def test_at_1400_px_one_table_per_host_and_no_daemon_actions(cluster: Cluster) -> None:
    """
    A 1400 px window: the host's table fits, actions included; the host is
    one table although its instances are in two regions (a column says
    which); the daemon's row offers no stop or unregister.
    """
    sync_api = require_browser()
    try:
        count = cluster.wait_for_all()
        rows = cluster.rows()
        assert {r["region"] for r in rows.values()} == {"Development", "unknown"}, rows
        with sync_api.sync_playwright() as playwright:
            browser = launch(playwright)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 900}, bypass_csp=True)
                page.goto(cluster.url + f"/?token={TOKEN}")
                page.wait_for_selector("body.can-act")
                page.wait_for_function(f"window.skynetDashboard.stats().rows === {count}")
                check_layout(page, rows, cluster.daemon_available)
            finally:
                browser.close()
    except BaseException:
        print(cluster.logs())
        raise


def check_layout(page: Any, rows: dict[str, Any], daemon_available: bool) -> None:
    assert page.locator("section.host").count() == 1
    head = page.locator("section.host .host-head .region").inner_text()
    assert head == "Development, unknown", head
    for uuid, row in rows.items():
        cell = page.locator(f'tr[data-uuid="{uuid}"] td.c-region')
        assert cell.inner_text() == row["region"], (row, cell.inner_text())
    # Nothing hidden behind a horizontal scrollbar, every button in the window.
    overflow = page.evaluate("""Array.from(document.querySelectorAll('section.host'))
                                .map((s) => s.scrollWidth - s.clientWidth)""")
    assert overflow == [0], overflow
    assert page.evaluate("document.documentElement.scrollWidth") <= 1400
    buttons = page.locator("td.c-actions button")
    assert buttons.count() >= 3 * (len(rows) - (1 if daemon_available else 0))
    for i in range(buttons.count()):
        box = buttons.nth(i).bounding_box()
        assert box is not None and box["x"] + box["width"] <= 1400, box
    for uuid, row in rows.items():
        actions = page.locator(f'tr[data-uuid="{uuid}"] td.c-actions')
        names = [b.get_attribute("data-action") for b in actions.locator("button").all()]
        if row["is_daemon"]:
            assert names == [], names
            assert actions.inner_text() == "host daemon"
        else:
            assert "stop" in names and ("register" in names) != ("unregister" in names), names
    # The region tab filters rows, not tables.
    page.click('nav#tabs button[data-region="Development"]')
    visible = page.evaluate("""Array.from(document.querySelectorAll('tbody tr'))
                               .filter((tr) => !tr.hidden).map((tr) => tr.dataset.uuid)""")
    assert visible == [u for u, r in rows.items() if r["region"] == "Development"], visible
    page.click('nav#tabs button[data-region="*"]')


def test_the_page_reconnects_after_a_dashboard_restart(cluster: Cluster) -> None:
    sync_api = require_browser()
    try:
        count = cluster.wait_for_all()
        with sync_api.sync_playwright() as playwright:
            browser = launch(playwright)
            try:
                page = browser.new_page(bypass_csp=True)
                page.goto(cluster.url + "/")
                page.wait_for_function(f"window.skynetDashboard.stats().rows === {count}")
                page.evaluate("window.__sameDocument = true")
                port = cluster.url.rsplit(":", 1)[1]
                cluster.dashboard.stop()
                page.wait_for_function("!window.skynetDashboard.stats().connected")
                assert "reconnecting" in page.locator("#conn").inner_text()
                cluster.dashboard = Process("dashboard-again", [
                    twistd(), "-n", "--pidfile=", "skynet-dashboard",
                    "--registry", cluster.registry,
                    "--listen", f"tcp:{port}:interface=127.0.0.1", "--stats-interval", INTERVAL,
                ], cluster.directory / "logs")  # fmt: skip
                cluster.processes.append(cluster.dashboard)
                page.wait_for_function(
                    "window.skynetDashboard.stats().snapshots === 2", timeout=20_000
                )
                assert page.evaluate("window.__sameDocument === true")
                assert page.locator("#conn").inner_text() == "live"
                page.wait_for_function(f"window.skynetDashboard.stats().rows === {count}")
                # The new dashboard has no token: read-only.
                assert page.locator("#mode").inner_text() == "read-only"
            finally:
                browser.close()
    except BaseException:
        print(cluster.logs())
        raise


def test_five_hundred_instances_stay_smooth() -> None:
    """
    500 instances whose statistics all change every second: the page shows
    them all and applies each delta without redrawing the tables.
    """
    sync_api = require_browser()
    directory = Path(tempfile.mkdtemp(prefix="skynet-dashboard-500-"))
    registry = f"file://{directory / 'registry'}"
    logs = directory / "logs"
    logs.mkdir()
    processes = []
    try:
        processes.append(Process("fake-instances", [
            sys.executable, "-m", "tests.test_dashboard_browser", "--fake-instances", registry,
            "500",
        ], logs))  # fmt: skip
        dashboard = Process("dashboard", [
            twistd(), "-n", "--pidfile=", "skynet-dashboard", "--registry", registry,
            "--listen", "tcp:0:interface=127.0.0.1", "--stats-interval", "1",
        ], logs)  # fmt: skip
        processes.append(dashboard)
        found = wait_until(lambda: re.search(r"skynet dashboard on (http://\S+/)",
                                             dashboard.output()), 30, "the URL")  # fmt: skip
        url = found.group(1)
        wait_until(lambda: len(http(url + "api/state")[1]["rows"]) == 500, 60, "500 instances")
        with sync_api.sync_playwright() as playwright:
            browser = launch(playwright)
            try:
                page = browser.new_page(viewport={"width": 1600, "height": 1000}, bypass_csp=True)
                page.goto(url)
                page.wait_for_function("window.skynetDashboard.stats().rows === 500")
                assert page.locator("tbody tr").count() == 500
                # Mark every row element; deltas must update them in place.
                page.evaluate("""document.querySelectorAll('tbody tr')
                                 .forEach((tr) => { tr.__probe = true; })""")
                page.evaluate("window.skynetDashboard.state.stats.maxApplyMs = 0")
                deltas = page.evaluate("window.skynetDashboard.stats().deltas")
                page.wait_for_function(
                    f"window.skynetDashboard.stats().deltas >= {deltas + 4}", timeout=20_000
                )
                stats = page.evaluate("window.skynetDashboard.stats()")
                kept = page.evaluate("""Array.from(document.querySelectorAll('tbody tr'))
                                        .filter((tr) => tr.__probe).length""")
                assert kept == 500, kept
                # Every row changed (requests count up), each delta applied in
                # well under a frame budget of a slow machine.
                assert stats["maxApplyMs"] < 150, stats
                changed = page.evaluate("""window.skynetDashboard.rows()
                                           .filter((r) => r.requests > 1).length""")
                assert changed == 500, changed
            finally:
                browser.close()
    except BaseException:
        for p in processes:
            print(f"--- {p.name} ---\n{p.output()[-3000:]}")
        raise
    finally:
        for p in reversed(processes):
            p.stop()
        shutil.rmtree(directory, ignore_errors=True)


# Helpers run as child processes, and the screenshot


def run_load(registry: str, seconds: float) -> None:
    """
    Call the example services for C{seconds}, with some failing calls.
    """
    import random

    from twisted.internet.defer import DeferredList, ensureDeferred
    from twisted.internet.task import deferLater, react

    from skynet.client import Client

    async def main(reactor: Any) -> None:
        client = Client(registry=registry, reactor=reactor, giveup_timeout=3.0)
        end = reactor.seconds() + seconds

        async def loop(service: str, method: str, params: Callable[[], dict], pause: float):
            target = client.service(service)
            while reactor.seconds() < end:
                try:
                    await target.call(method, params())
                except Exception:
                    pass  # failures are part of the picture (and of the errors graph)
                await deferLater(reactor, pause * random.random(), lambda: None)

        calls = [
            loop("Fibonacci", "Index", lambda: {"index": random.randint(5, 22)}, 0.06),
            loop("Fibonacci", "Index", lambda: {"index": random.randint(5, 22)}, 0.06),
            loop("Fibonacci", "Index", lambda: {"index": -1}, 1.5),
            loop("TestService", "Upcase", lambda: {"data": "hello"}, 0.03),
            loop("TutorialService", "AddOne", lambda: {"value": 41}, 0.15),
            loop("Sleeper", "Sleep", lambda: {"duration": 20_000_000, "message": "z"}, 0.5),
        ]
        await DeferredList([ensureDeferred(c) for c in calls])
        await client.stop()

    react(lambda reactor: ensureDeferred(main(reactor)))


def run_fake_instances(registry: str, count: int) -> None:
    """
    Register C{count} instances that serve nothing, and publish changing
    statistics for each every second, until killed.
    """
    import random

    from twisted.internet.defer import ensureDeferred
    from twisted.internet.task import deferLater, react

    from skynet.registry import registry_from_url
    from skynet.registry.base import Address, Instance
    from skynet.service import go_time

    async def main(reactor: Any) -> None:
        store = registry_from_url(registry, reactor=reactor)
        await store.start()
        instances = [
            Instance(
                uuid=f"fake-{n:04d}",
                name=f"Service{n % 12}",
                version="1",
                region=("east", "west")[n % 2],
                host=f"10.0.{n % 10}.1",
                port=20000 + n,
                admin=Address("127.0.0.1", 1),
                pid=os.getpid(),
            )  # fmt: skip
            for n in range(count)
        ]
        for instance in instances:
            await store.add(instance)
        started = go_time(time.time())
        served = [0] * count
        while True:
            for n, instance in enumerate(instances):
                served[n] += random.randint(1, 50)
                await store.publish_stats(instance, {
                    "Clients": random.randint(0, 9), "StartTime": started,
                    "LastRequest": go_time(time.time()), "RequestsServed": served[n],
                    "AverageResponseTime": random.randint(100_000, 9_000_000), "Errors": n % 3,
                    "InFlight": 0, "P50ResponseTime": 1_000_000, "P99ResponseTime": 9_000_000,
                })  # fmt: skip
            await deferLater(reactor, 1.0, lambda: None)

    react(lambda reactor: ensureDeferred(main(reactor)))


def take_screenshot(path: str, seconds: float) -> None:
    """
    Start the example cluster, load it for C{seconds}, save a screenshot.
    """
    from playwright.sync_api import sync_playwright

    cluster = Cluster(load_seconds=seconds + 60)
    try:
        cluster.start()
        print(f"dashboard at {cluster.url}; loading for {seconds:.0f}s", flush=True)
        cluster.wait_for_all()
        time.sleep(seconds / 2)
        # Something for the events list: an unregistered instance, a restart.
        rows = list(cluster.rows().values())
        sleeper = next(r for r in rows if r["service"] == "Sleeper")
        admin_call(sleeper["admin"], "Admin.Unregister", {})
        supervised = [r for r in rows if r["daemon"]]
        if supervised:
            http(f"{cluster.url}/api/instances/{supervised[0]['uuid']}/restart", "POST", TOKEN)
        time.sleep(seconds / 2)
        with sync_playwright() as playwright:
            browser = launch(playwright)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1000}, bypass_csp=True)
                page.goto(cluster.url + f"/?token={TOKEN}")
                page.wait_for_selector("body.can-act")
                # Settled: every row there, and the graphs have points to draw.
                count = len(cluster.rows())
                page.wait_for_function(f"window.skynetDashboard.stats().rows === {count}")
                page.wait_for_function(
                    """(() => {
                        const charts = window.skynetDashboard.graphData();
                        return charts.length
                            && charts[0].lines.some((l) => l.points >= 5 && l.max > 0);
                    })()""",
                    timeout=30_000,
                )
                # The slowest call's waterfall, opened from the slow calls list.
                page.click("#slow-refresh")
                page.wait_for_selector("#slow-list [data-request]", timeout=30_000)
                page.click("#slow-list li:first-child [data-request]")
                page.wait_for_function("window.skynetTrace.bars() > 0", timeout=30_000)
                page.evaluate("window.scrollTo(0, 0)")  # the sticky header at the top
                page.wait_for_timeout(1500)
                page.screenshot(path=path, full_page=True)
            finally:
                browser.close()
        print(f"saved {path}")
    finally:
        cluster.stop()
        shutil.rmtree(cluster.directory, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--load", nargs=2, metavar=("REGISTRY", "SECONDS"))
    group.add_argument("--fake-instances", nargs=2, metavar=("REGISTRY", "COUNT"))
    group.add_argument("--screenshot", metavar="PNG")
    parser.add_argument("--seconds", type=float, default=120.0, help="load before a screenshot")
    args = parser.parse_args(argv)
    if args.load:
        run_load(args.load[0], float(args.load[1]))
    elif args.fake_instances:
        run_fake_instances(args.fake_instances[0], int(args.fake_instances[1]))
    else:
        take_screenshot(args.screenshot, args.seconds)


if __name__ == "__main__":
    main()
