"""
The dashboard shows the cluster's deployments, in Chromium: a real daemon
(the leader) places a good deployment and fails to start a broken one; the
page shows desired vs actual per deployment, the broken one as a failing
row with its error, and the placement events.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.processes import ROOT, child_env, twistd
from tests.test_dashboard_browser import Process, http, launch, require_browser, wait_until

pytestmark = pytest.mark.slow

CLUSTER = """
[services.Fibonacci]
run = "examples.fibonacci:Fibonacci"
instances = 2
args = ["--stats-interval", "0.5"]

[services.Broken]
run = "examples.nosuch:Thing"
ready_timeout = 3
"""


def test_deployments_in_chromium() -> None:
    sync_api = require_browser()
    directory = Path(tempfile.mkdtemp(prefix="skynet-cluster-dashboard-"))
    logs = directory / "logs"
    logs.mkdir()
    registry = f"file://{directory / 'registry'}"
    processes: list[Process] = []
    try:
        processes.append(Process("daemon", [
            twistd(), "-n", "--pidfile=", "skynet-daemon", "--registry", registry,
            "--listen", "tcp:0:interface=127.0.0.1", "--log-dir", str(logs),
            "--stats-interval", "0.5", "--cluster-interval", "0.5", "--stop-grace", "3",
        ], logs, env={"SKYNET_HOME": str(directory)}))  # fmt: skip
        dashboard = Process("dashboard", [
            twistd(), "-n", "--pidfile=", "skynet-dashboard", "--registry", registry,
            "--listen", "tcp:0:interface=127.0.0.1", "--stats-interval", "0.5",
        ], logs, env={"SKYNET_HOME": str(directory)})  # fmt: skip
        processes.append(dashboard)
        found = wait_until(
            lambda: re.search(r"skynet dashboard on (http://\S+/)", dashboard.output()),
            30, "the dashboard's URL",
        )  # fmt: skip
        url = found.group(1).rstrip("/")
        path = directory / "cluster.toml"
        path.write_text(CLUSTER)
        applied = subprocess.run(
            [sys.executable, "-m", "skynet.sky", "--registry", registry, "apply", str(path)],
            cwd=ROOT, env=child_env(SKYNET_HOME=str(directory)), capture_output=True,
            text=True, timeout=60,
        )  # fmt: skip
        assert applied.returncode == 0, applied.stderr

        def api_ready() -> bool:
            code, body = http(url + "/api/deployments")
            assert code == 200, body
            states = {d["name"]: d["state"] for d in body["deployments"]}
            return states == {"Fibonacci": "ok", "Broken": "failing"}

        wait_until(api_ready, 90, "Fibonacci ok and Broken failing", interval=0.3)

        with sync_api.sync_playwright() as playwright:
            browser = launch(playwright)
            try:
                page = browser.new_page()
                page.goto(url + "/")
                page.wait_for_selector("#deployments:not([hidden]) tr.deployment", timeout=20000)
                good = page.locator('tr.deployment[data-name="Fibonacci"] td')
                assert good.nth(1).inner_text() == "ok"
                assert good.nth(2).inner_text() == "2/2"
                assert good.nth(3).inner_text() == "127.0.0.1=2"
                bad = page.locator('tr.deployment[data-name="Broken"]')
                assert "failing" in (bad.get_attribute("class") or "")
                assert bad.locator("td").nth(2).inner_text().startswith("0/1")
                why = page.locator("tr.why.failing td").inner_text()
                assert "did not register" in why or "examples.nosuch" in why, why
                # A failing row stands out: its cells have a background of their own.
                background = bad.locator("td").first.evaluate(
                    "td => getComputedStyle(td).backgroundColor"
                )
                assert background not in ("rgba(0, 0, 0, 0)", "transparent"), background
                events = page.locator("#placement-list li").all_inner_texts()
                assert any("Fibonacci instance" in e and "started on 127.0.0.1" in e
                           for e in events), events  # fmt: skip
                leader = page.locator("#deployment-leader").inner_text()
                assert leader.startswith("leader: daemon "), leader
            finally:
                browser.close()
    except BaseException:
        for p in processes:
            print(f"--- {p.name}\n{p.output()[-3000:]}")
        raise
    finally:
        for p in reversed(processes):
            p.stop()
        shutil.rmtree(directory, ignore_errors=True)
