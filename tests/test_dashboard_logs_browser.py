"""
The dashboard's logs view in real Chromium (Playwright), against a real
C{twistd skynet-daemon} supervising two instances of a service that logs
what it is told, and a real C{twistd skynet-dashboard}: a search, one
instance's logs from its row, a line that arrives in the live tail, and a
log line holding markup shown as text.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid as uuid_module
from typing import Any

import pytest
from twisted.logger import Logger

from skynet.service import Service
from tests.dashboard_cluster import daemon_and_dashboard
from tests.processes import ROOT
from tests.test_dashboard_browser import (
    launch,
    open_page,
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
    with daemon_and_dashboard(
        "skynet-dashlogs-", ["tests.test_dashboard_logs_browser:Chatty"] * 2
    ) as c:
        yield c


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
            page = open_page(browser, url + "/", errors)
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
