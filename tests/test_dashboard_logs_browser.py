"""
The dashboard's logs view in real Chromium (Playwright), against a real
C{twistd skynet-daemon} supervising two instances of a service that logs
what it is told, and a real C{twistd skynet-dashboard}: a search, one
instance's logs from its row, a line that arrives in the live tail, and a
log line holding markup shown as text.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import uuid as uuid_module
from pathlib import Path
from typing import Any

import pytest
from twisted.logger import Logger

from skynet.service import Service
from tests.processes import ROOT, twistd
from tests.test_dashboard_browser import (
    TOKEN,
    Process,
    http,
    launch,
    require_browser,
    wait_until,
)

pytestmark = pytest.mark.slow


class Chatty(Service):
    """
    Logs the text it is given, inside its remote method.
    """

    log = Logger()

    def Say(self, request_info: Any, params: dict[str, Any]) -> dict[str, Any]:
        self.log.info("said {text}", text=params.get("text"))
        return {"ok": True}


def say(registry: str, text: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "skynet.sky", "--registry", registry, "call", "Chatty", "Say",
         json.dumps({"text": text})],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


@pytest.fixture
def cluster() -> Any:
    require_browser()
    directory = Path(tempfile.mkdtemp(prefix="skynet-dashlogs-"))
    logs = directory / "logs"
    logs.mkdir()
    registry = f"file://{directory / 'registry'}"
    token_file = directory / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    args = "--listen tcp:0:interface=127.0.0.1 --stats-interval 0.5"
    deploy = directory / "deploy.txt"
    deploy.write_text(f"tests.test_dashboard_logs_browser:Chatty {args}\n" * 2)
    processes = []
    try:
        processes.append(Process("daemon", [
            twistd(), "-n", "--pidfile=", "skynet-daemon", "--registry", registry,
            "--listen", "tcp:0:interface=127.0.0.1", "--deploy", str(deploy),
            "--log-dir", str(logs), "--stats-interval", "0.5", "--stop-grace", "5",
        ], directory, env={"SKYNET_HOME": str(directory)}))  # fmt: skip
        dashboard = Process("dashboard", [
            twistd(), "-n", "--pidfile=", "skynet-dashboard", "--registry", registry,
            "--listen", "tcp:0:interface=127.0.0.1", "--token-file", str(token_file),
            "--stats-interval", "0.5",
        ], directory, env={"SKYNET_HOME": str(directory)})  # fmt: skip
        processes.append(dashboard)
        import re

        found = wait_until(
            lambda: re.search(r"skynet dashboard on (http://\S+/)", dashboard.output()), 30,
            "the dashboard's URL",
        )  # fmt: skip
        url = found.group(1).rstrip("/")

        def rows() -> list[dict[str, Any]]:
            code, body = http(url + "/api/state")
            assert code == 200, body
            return body["rows"]

        wait_until(
            lambda: (
                sorted(r["service"] for r in rows() if r["registered"])
                == ["Chatty", "Chatty", "SkynetDaemon"]
            ),
            60,
            "the daemon and two Chatty instances",
        )
        yield {"url": url, "registry": registry, "rows": rows, "processes": processes}
    except BaseException:
        for p in processes:
            print(f"--- {p.name} ---\n{p.output()[-4000:]}")
        raise
    finally:
        for p in reversed(processes):
            p.stop()
        shutil.rmtree(directory, ignore_errors=True)


def test_logs_view_search_instance_and_live_tail(cluster: dict[str, Any]) -> None:
    sync_api = require_browser()
    registry, url = cluster["registry"], cluster["url"]
    word = f"zebra{uuid_module.uuid4().hex[:6]}"
    for n in range(6):
        say(registry, f"{word} line {n}")
    evil = '<img src=x onerror="window.__owned = 1">'
    say(registry, f"{word} evil {evil}")
    chatty = sorted(r["uuid"] for r in cluster["rows"]() if r["service"] == "Chatty")

    with sync_api.sync_playwright() as playwright:
        browser = launch(playwright)
        try:
            errors: list[str] = []
            # Without the page's CSP, so that only text rendering stands
            # between a log line and the DOM.
            page = browser.new_page(viewport={"width": 1600, "height": 1000}, bypass_csp=True)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url + "/")
            page.wait_for_selector(f'tr[data-uuid="{chatty[0]}"] button[data-logs]')

            def lines() -> list[str]:
                return page.evaluate("window.skynetLogs.lines()")

            def line_uuids() -> list[str]:
                return page.evaluate(
                    "Array.from(document.querySelectorAll('#log-lines li'))"
                    ".map((li) => li.dataset.uuid)"
                )

            # Type a search: only the matching lines.
            page.fill("#log-grep", rf"{word} line [0-4]$")
            wait_until(lambda: sorted(lines()) == [f"said {word} line {n}" for n in range(5)],
                       30, "the five matching lines")  # fmt: skip

            # Markup in a log line is text: the line is there, no element made.
            page.fill("#log-grep", f"{word} evil")
            wait_until(lambda: lines() == [f"said {word} evil {evil}"], 30, "the evil line")
            assert page.locator("#log-lines img").count() == 0
            page.wait_for_timeout(300)  # an image that loaded would have fired by now
            assert page.evaluate("window.__owned") is None

            # An instance row's logs link: that instance's lines only.
            page.fill("#log-grep", "")
            page.click(f'tr[data-uuid="{chatty[0]}"] button[data-logs]')
            wait_until(lambda: line_uuids() and set(line_uuids()) == {chatty[0]}, 30,
                       "the lines of one instance")  # fmt: skip
            assert chatty[0] in page.inner_text("#log-scope")
            page.click(f'tr[data-uuid="{chatty[1]}"] button[data-logs]')
            wait_until(lambda: line_uuids() and set(line_uuids()) == {chatty[1]}, 30,
                       "the lines of the other instance")  # fmt: skip

            # An event's logs button: the lines of the event's instance.
            page.click(f'#event-list li[data-uuid="{chatty[0]}"] button[data-logs]')
            wait_until(lambda: line_uuids() and set(line_uuids()) == {chatty[0]}, 30,
                       "the lines of the event's instance")  # fmt: skip
            # A host header's logs button: every instance of the host.
            page.click('.host-head button[data-logs-host="127.0.0.1"]')
            wait_until(lambda: set(chatty) <= set(line_uuids()), 30, "the host's lines")
            assert "host 127.0.0.1" in page.inner_text("#log-scope")

            # Live tail: back to every instance, search for a word not yet
            # written, write it, see it arrive.
            page.click("#log-instance-clear")
            tail = f"tail{uuid_module.uuid4().hex[:6]}"
            page.fill("#log-grep", tail)
            wait_until(lambda: "no matching lines" in page.inner_text("#log-status"), 30,
                       "the empty first page")  # fmt: skip
            say(registry, f"{tail} arrives")
            wait_until(lambda: lines() == [f"said {tail} arrives"], 30, "the live line")
            say(registry, f"{tail} again")
            wait_until(lambda: lines() == [f"said {tail} arrives", f"said {tail} again"], 30,
                       "the second live line, and the first not twice")  # fmt: skip

            # A line's request id: every line of that request (here one).
            page.click("#log-lines li:first-child [data-request]")
            wait_until(lambda: lines() == [f"said {tail} arrives"], 30, "the request's line")
            assert "request " in page.inner_text("#log-scope")
            assert errors == [], errors
        finally:
            browser.close()
