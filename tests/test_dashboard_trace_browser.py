"""
The dashboard's trace waterfall in real Chromium (Playwright), on a real
local cluster: a C{twistd skynet-daemon} supervising a Front service (it
logs, then calls Fibonacci with its request info) and two Fibonacci, and a
real C{twistd skynet-dashboard}.  A call with a known request id; its log
line found in the logs view; a click on its request id shows a waterfall
of as many bars as the calls in C{/api/trace}'s tree; the slow calls list
opens it too; a failed call's markup-laden error is shown as text, marked.
"""

from __future__ import annotations

import uuid as uuid_module
from typing import Any

import pytest
from twisted.logger import Logger

from skynet.errors import ServiceError
from skynet.service import Service
from tests.dashboard_cluster import daemon_and_dashboard
from tests.test_dashboard_browser import http, launch, open_page, require_browser, wait_until

pytestmark = pytest.mark.slow

EVIL = '<img src=x onerror="window.__owned = 1">'


class Front(Service):
    """
    Logs inside its method, then asks Fibonacci, passing its request on.
    """

    log = Logger()

    async def Ask(self, request_info: Any, params: dict[str, Any]) -> dict[str, Any]:
        self.log.info("front asked {tag} for {index}", tag=params.get("tag"),
                      index=params.get("index"))  # fmt: skip
        fibonacci = self.client.service("Fibonacci")
        return await fibonacci.call("Index", {"index": params.get("index")}, request_info)

    def Fail(self, request_info: Any, params: dict[str, Any]) -> dict[str, Any]:
        raise ServiceError(f"refused {EVIL}")


def _walk(calls: list[dict[str, Any]], depth: int = 0) -> list[tuple[int, dict[str, Any]]]:
    out = []
    for call in calls:
        out.append((depth, call))
        out.extend(_walk(call["children"], depth + 1))
    return out


@pytest.fixture
def cluster() -> Any:
    require_browser()
    services = ["tests.test_dashboard_trace_browser:Front"] + ["examples.fibonacci:Fibonacci"] * 2
    with daemon_and_dashboard("skynet-dashtrace-", services) as c:
        yield c


def test_waterfall_from_the_logs_view_and_the_slow_list(cluster: dict[str, Any]) -> None:
    from skynet.protocol import RequestInfo
    from skynet.sync import Client

    sync_api = require_browser()
    url = cluster["url"]
    tag = f"zebra{uuid_module.uuid4().hex[:6]}"
    request_id = f"trace-{tag}"
    failing = f"fail-{tag}"
    client = Client(cluster["registry"])
    try:
        answer = client.service("Front").call("Ask", {"index": 6, "tag": tag},
                                              RequestInfo(request_id), timeout=30)  # fmt: skip
        assert answer["value"] == 8
        with pytest.raises(ServiceError, match="refused <img"):
            client.service("Front").call("Fail", {}, RequestInfo(failing), timeout=30)
    finally:
        client.close()

    # The tree the page is to draw, as the dashboard serves it.
    code, body = http(f"{url}/api/trace/{request_id}")
    assert code == 200, body
    calls = _walk(body["calls"])
    [root] = body["calls"]
    assert (root["service"], root["method"]) == ("Front", "Ask")
    assert len(calls) > 5  # Front.Ask, then Index 6 and its recursion
    assert all(c["outcome"] == "ok" for _, c in calls)

    with sync_api.sync_playwright() as playwright:
        browser = launch(playwright)
        try:
            errors: list[str] = []
            page = open_page(browser, url + "/", errors)

            # The logs view: the line Front wrote inside the call, with its request id.
            page.fill("#log-grep", f"front asked {tag}")
            page.wait_for_selector(f'#log-lines [data-request="{request_id}"]', timeout=30000)
            assert page.locator("#trace").is_hidden()
            page.click(f'#log-lines [data-request="{request_id}"]')

            def bars() -> int:
                return page.evaluate("window.skynetTrace.bars()")

            wait_until(lambda: bars() == len(calls), 30, "one bar per call of the tree")
            assert request_id in page.inner_text("#trace-id")
            rows = page.evaluate(
                """() => Array.from(document.querySelectorAll('#trace-rows li')).map((li) => {
                    const lane = li.querySelector('.trace-lane').getBoundingClientRect();
                    const bar = li.querySelector('.trace-bar').getBoundingClientRect();
                    return {depth: Number(li.dataset.depth),
                            name: li.querySelector('.trace-name').textContent,
                            address: li.querySelector('.trace-addr').textContent,
                            outcome: li.querySelector('.trace-outcome').textContent,
                            left: bar.left - lane.left, right: lane.right - bar.right,
                            width: bar.width, lane: lane.width};
                })"""
            )
            # Row by row the tree: depth, service.method, instance.
            assert [(r["depth"], r["name"], r["address"]) for r in rows] == [
                (d, f"{c['service']}.{c['method']}", c["address"]) for d, c in calls
            ]
            assert all(r["outcome"] == "ok" for r in rows)
            # Each bar inside its lane; the root's spans the whole lane, its
            # children start no earlier.
            assert all(r["width"] > 0 and r["left"] >= -0.5 and r["right"] >= -0.5 for r in rows)
            assert rows[0]["left"] < 1 and rows[0]["width"] > 0.9 * rows[0]["lane"], rows[0]
            # The logs view narrowed to the request too.
            assert f"request {request_id}" in page.inner_text("#log-scope")

            # The slow calls list: this request is among the slowest; it
            # opens the same waterfall.
            page.click("#trace-close")
            assert page.locator("#trace").is_hidden()
            assert page.evaluate("location.hash") == ""
            page.click("#slow-refresh")
            entry = f'#slow-list [data-request="{request_id}"]'
            page.wait_for_selector(entry, timeout=30000)
            page.click(entry)
            wait_until(lambda: page.locator("#trace").is_visible() and bars() == len(calls), 30,
                       "the trace opened from the slow list")  # fmt: skip

            # The page's service filter is the slow list's too.
            page.select_option("#service-filter", "Fibonacci")

            def listed() -> list[str]:
                return page.evaluate(
                    "Array.from(document.querySelectorAll('#slow-list .slow-name'))"
                    ".map((e) => e.textContent)"
                )

            wait_until(lambda: listed() == ["Fibonacci.Index"], 30,
                       "the slowest call of Fibonacci only")  # fmt: skip
            page.select_option("#service-filter", "")
            wait_until(lambda: sorted(listed()) == ["Front.Ask", "Front.Fail"], 30,
                       "every service's again")  # fmt: skip

            # The address names the trace: a new page at it shows the same.
            assert page.evaluate("location.hash") == f"#trace={request_id}"
            linked = browser.new_page(viewport={"width": 1600, "height": 1000})
            linked.on("pageerror", lambda e: errors.append(str(e)))
            linked.goto(f"{url}/#trace={request_id}")
            wait_until(lambda: linked.evaluate("window.skynetTrace.bars()") == len(calls), 30,
                       "the linked trace")  # fmt: skip
            linked.close()

            # A failed call: marked, and its markup shown as text.
            page.click(f'#slow-list [data-request="{failing}"]')
            wait_until(lambda: failing in page.inner_text("#trace-id") and bars() == 1, 30,
                       "the failed call's trace")  # fmt: skip
            assert page.locator("#trace-rows li.error").count() == 1
            assert EVIL in page.inner_text("#trace-rows .trace-outcome")
            assert page.locator("#trace-rows img, #slow-list img").count() == 0
            page.wait_for_timeout(300)  # an image that loaded would have fired by now
            assert page.evaluate("window.__owned") is None
            # A hedged call (its tree as tracing.tree_json makes it): one bar,
            # and a mark for each attempt that arrived, the failed one red.
            hedged = {"ok": True, "request_id": "hedged", "spans": 3, "errors": [], "calls": [{
                "service": "Svc", "method": "Slow", "address": "127.0.0.1:1", "start": 0.0,
                "duration": 0.3, "server_duration": 0.1, "outcome": "ok", "attempts": 2,
                "retry": 0, "client_span": "c", "server_spans": ["s1", "s2"], "children": [],
                "arrived": [
                    {"address": "127.0.0.1:1", "start": 0.0, "duration": 0.3,
                     "outcome": "error: stuck", "retry": 0},
                    {"address": "127.0.0.1:2", "start": 0.2, "duration": 0.1,
                     "outcome": "ok", "retry": 1},
                ]}]}  # fmt: skip
            page.route("**/api/trace/hedged",
                       lambda route: route.fulfill(json=hedged))  # fmt: skip
            page.evaluate("window.skynetTrace.open('hedged')")
            wait_until(lambda: "hedged" in page.inner_text("#trace-id") and bars() == 1, 30,
                       "the hedged call's trace")  # fmt: skip
            assert "2 attempts" in page.inner_text("#trace-rows .trace-info")
            marks = page.evaluate(
                """() => Array.from(document.querySelectorAll('#trace-rows .trace-attempt'))
                    .map((m) => ({error: m.classList.contains('error'), title: m.title,
                                  left: m.getBoundingClientRect().left}))"""
            )
            assert [m["error"] for m in marks] == [True, False], marks
            assert "127.0.0.1:2" in marks[1]["title"] and marks[1]["left"] > marks[0]["left"]
            assert errors == [], errors
        finally:
            browser.close()
