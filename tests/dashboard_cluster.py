"""
A real local cluster for the dashboard's browser tests: a C{twistd
skynet-daemon} that deploys the given services (with per-instance JSON logs)
and a C{twistd skynet-dashboard} behind a token, on the embedded registry
of a temporary directory.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.processes import twistd
from tests.test_dashboard_browser import TOKEN, Process, http, wait_until

#: The service options every deployed instance gets.
SERVICE_ARGS = "--listen tcp:0:interface=127.0.0.1 --stats-interval 0.5"


@contextmanager
def daemon_and_dashboard(prefix: str, services: list[str]) -> Iterator[dict[str, Any]]:
    """
    Start the daemon deploying C{services} (class paths, one instance
    each; repeat one for more) and the dashboard; wait until the dashboard
    shows them all registered, beside the daemon.

    @return: (as a context manager) C{{url, registry, rows, processes}}:
        C{rows()} reads C{/api/state}'s rows.  The processes' output is
        printed if the block fails; everything is stopped and removed after.
    """
    directory = Path(tempfile.mkdtemp(prefix=prefix))
    logs = directory / "logs"
    logs.mkdir()
    registry = f"file://{directory / 'registry'}"
    token_file = directory / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    deploy = directory / "deploy.txt"
    deploy.write_text("".join(f"{path} {SERVICE_ARGS}\n" for path in services))
    env = {"SKYNET_HOME": str(directory)}
    processes: list[Process] = []
    try:
        processes.append(Process("daemon", [
            twistd(), "-n", "--pidfile=", "skynet-daemon", "--registry", registry,
            "--listen", "tcp:0:interface=127.0.0.1", "--deploy", str(deploy),
            "--log-dir", str(logs), "--stats-interval", "0.5", "--stop-grace", "5",
        ], directory, env=env))  # fmt: skip
        dashboard = Process("dashboard", [
            twistd(), "-n", "--pidfile=", "skynet-dashboard", "--registry", registry,
            "--listen", "tcp:0:interface=127.0.0.1", "--token-file", str(token_file),
            "--stats-interval", "0.5",
        ], directory, env=env)  # fmt: skip
        processes.append(dashboard)
        found = wait_until(
            lambda: re.search(r"skynet dashboard on (http://\S+/)", dashboard.output()), 30,
            "the dashboard's URL",
        )  # fmt: skip
        url = found.group(1).rstrip("/")

        def rows() -> list[dict[str, Any]]:
            code, body = http(url + "/api/state")
            assert code == 200, body
            return body["rows"]  # type: ignore[no-any-return]

        expected = sorted([path.rsplit(":", 1)[1] for path in services] + ["SkynetDaemon"])
        wait_until(
            lambda: sorted(r["service"] for r in rows() if r["registered"]) == expected, 90,
            f"the daemon and {', '.join(services)}",
        )  # fmt: skip
        yield {"url": url, "registry": registry, "rows": rows, "processes": processes}
    except BaseException:
        for p in processes:
            print(f"--- {p.name} ---\n{p.output()[-4000:]}")
        raise
    finally:
        for p in reversed(processes):
            p.stop()
        shutil.rmtree(directory, ignore_errors=True)
