"""
Tests for L{skynet.cluster.commands}: apply, scale, undeploy, deployments
and rollout status, called as C{sky} will call them (L{run_command} on a
registry, with a reconciler on fake daemons where it matters), and
C{python -m skynet.cluster} as a process on the embedded registry.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from skynet.cluster.commands import run_command
from skynet.cluster.spec import DESIRED_KEY, DesiredState
from tests.test_cluster_reconciler import FakeCluster

ROOT = Path(__file__).resolve().parent.parent

FILE = """
[services.Fib]
run = "examples.fibonacci:Fibonacci"
instances = 3
ready_timeout = 10
"""


class CommandTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.cluster = FakeCluster(["127.0.0.2", "127.0.0.3", "127.0.0.4"])
        self.directory = tempfile.mkdtemp(prefix="skynet-cluster-")
        self.addCleanup(lambda: __import__("shutil").rmtree(self.directory, True))

    def file(self, text: str, name: str = "cluster.toml") -> str:
        path = os.path.join(self.directory, name)
        with open(path, "w") as f:
            f.write(text)
        return path

    def sky(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        d = Deferred.fromCoroutine(
            run_command(list(argv), self.cluster.registry, out, err, reactor=self.cluster.clock)
        )
        for _ in range(2000):
            if d.called:
                break
            self.cluster.clock.advance(0.25)
        code = self.successResultOf(d)
        return code, out.getvalue(), err.getvalue()

    def desired(self) -> DesiredState:
        return DesiredState.from_bytes(self.cluster.store.values.get(DESIRED_KEY))

    def lead(self) -> None:
        self.successResultOf(self.cluster.reconciler.start())
        self.addCleanup(lambda: self.successResultOf(self.cluster.reconciler.stop()))

    def test_apply_is_idempotent_and_says_what_changes(self) -> None:
        path = self.file(FILE)
        code, out, err = self.sky("apply", path)
        self.assertEqual((code, err), (0, ""))
        self.assertIn("+ Fib: 3 x examples.fibonacci:Fibonacci (spread host)", out)
        self.assertIn("Applied 1 change(s).", out)
        self.assertEqual(self.desired().get("Fib").instances, 3)
        code, out, _ = self.sky("apply", path)
        self.assertEqual(code, 0)
        self.assertIn("= Fib: unchanged", out)
        self.assertIn("No changes.", out)
        code, out, _ = self.sky("apply", self.file(FILE.replace("3", "4")), "--json")
        doc = json.loads(out)
        self.assertEqual(doc["changes"][0]["fields"], [{"field": "instances", "old": 3, "new": 4}])

    def test_apply_ready_timeout_option_wins_over_the_file(self) -> None:
        """
        C{--ready-timeout} gives every deployment of the file that long for
        its new instances; a bad value is a usage error that stores nothing.
        """
        path = self.file(FILE)
        code, _, err = self.sky("apply", path, "--ready-timeout", "45")
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(self.desired().get("Fib").ready_timeout, 45.0)
        code, _, err = self.sky("apply", path, "--ready-timeout", "0")
        self.assertEqual(code, 1, err)
        self.assertIn("ready_timeout", err)
        self.assertEqual(self.desired().get("Fib").ready_timeout, 45.0)

    def test_apply_dry_run_and_prune(self) -> None:
        self.sky("apply", self.file(FILE))
        other = self.file('[services.Echo]\nrun = "m:Echo"\n', "other.toml")
        code, out, _ = self.sky("apply", other, "--prune", "--dry-run")
        self.assertIn("- Fib: removed", out)
        self.assertIn("not applied (--dry-run)", out)
        self.assertEqual(self.desired().names, ["Fib"])
        self.sky("apply", other, "--prune")
        self.assertEqual(self.desired().names, ["Echo"])

    def test_apply_bad_file_changes_nothing(self) -> None:
        self.sky("apply", self.file(FILE))
        before = self.cluster.store.values[DESIRED_KEY]
        bad = self.file('[services.Fib]\nrun = "m:F"\ninstances = "many"\n', "bad.toml")
        code, out, err = self.sky("apply", bad)
        self.assertEqual(code, 1)
        self.assertIn("[services.Fib]: instances must be a whole number", err)
        self.assertEqual(self.cluster.store.values[DESIRED_KEY], before)
        code, _, err = self.sky("apply", os.path.join(self.directory, "missing.toml"))
        self.assertEqual(code, 1)
        self.assertIn("cannot read", err)

    def test_scale(self) -> None:
        self.sky("apply", self.file(FILE))
        code, out, _ = self.sky("scale", "Fib=5")
        self.assertEqual(code, 0)
        self.assertIn("~ Fib: instances 3 -> 5", out)
        self.assertEqual(self.desired().get("Fib").instances, 5)
        self.assertEqual(self.sky("scale", "Nope=1")[0], 1)
        self.assertIn("no deployment named 'Nope'", self.sky("scale", "Nope=1")[2])
        self.assertEqual(self.sky("scale", "Fib")[0], 2)
        self.assertEqual(self.sky("scale", "Fib=x")[0], 2)
        code, _, err = self.sky("scale", "Fib=-1")
        self.assertEqual(code, 1)
        self.assertIn("instances must be between 0", err)
        self.assertEqual(self.desired().get("Fib").instances, 5)

    def test_undeploy(self) -> None:
        self.sky("apply", self.file(FILE))
        code, out, _ = self.sky("undeploy", "Fib")
        self.assertEqual(code, 0)
        self.assertIn("- Fib: removed", out)
        self.assertEqual(self.desired().names, [])
        self.assertEqual(self.sky("undeploy", "Fib")[0], 1)

    def test_usage_errors(self) -> None:
        code, _, err = self.sky()
        self.assertEqual(code, 2)
        self.assertIn("apply FILE", err)
        self.assertEqual(self.sky("frobnicate")[0], 2)
        self.assertEqual(self.sky("rollout", "undo", "Fib")[0], 2)

    def test_deployments_without_a_leader(self) -> None:
        code, out, _ = self.sky("deployments")
        self.assertIn("No deployments", out)
        self.sky("apply", self.file(FILE))
        code, out, _ = self.sky("deployments")
        self.assertEqual(code, 0)
        self.assertIn("Fib", out)
        self.assertIn("progressing", out)
        self.assertIn("Leader: none", out)

    def test_deployments_with_a_leader(self) -> None:
        self.lead()
        self.sky("apply", self.file(FILE))
        self.cluster.run(10)
        code, out, _ = self.sky("deployments")
        lines = out.splitlines()
        self.assertEqual(lines[0].split()[:4], ["DEPLOYMENT", "STATE", "READY", "DESIRED"])
        self.assertEqual(lines[1].split()[:4], ["Fib", "ok", "3", "3"])
        self.assertIn("127.0.0.2=1 127.0.0.3=1 127.0.0.4=1", lines[1])
        self.assertIn("Recent placement events:", out)
        self.assertIn("Fib instance 127.0.0.", out)
        self.assertIn("started on 127.0.0.", out)
        doc = json.loads(self.sky("deployments", "--json")[1])
        (fib,) = doc["deployments"]
        self.assertEqual((fib["state"], fib["ready"], fib["desired"]), ("ok", 3, 3))
        self.assertIn("started", [e["kind"] for e in doc["events"]])

    def test_failing_deployment_is_listed_with_its_error(self) -> None:
        self.lead()
        self.sky("apply", self.file('[services.Bad]\nrun = "examples.nosuch:Thing"\n'
                                    "ready_timeout = 5\n"))  # fmt: skip
        self.cluster.run(20)
        code, out, _ = self.sky("deployments")
        self.assertIn("failing", out)
        self.assertIn("Bad: instance", out)
        self.assertIn("did not register within 5s", out)
        self.sky("undeploy", "Bad")
        self.cluster.run(5)
        self.assertEqual([c for h in self.cluster.hosts.values() for c in h.children.values()], [])

    def test_rollout_status_follows_to_the_end(self) -> None:
        self.lead()
        self.sky("apply", self.file(FILE))
        self.cluster.run(10)
        self.sky("apply", self.file(FILE + 'version = "2"\n'))
        code, out, _ = self.sky("rollout", "status", "Fib", "--timeout", "120")
        self.assertEqual(code, 0, out)
        self.assertIn("rollout to", out)
        self.assertIn("Fib: rolled out.", out)
        self.assertGreater(len(out.splitlines()), 2)

    def test_rollout_restart_replaces_every_instance_and_apply_keeps_it(self) -> None:
        self.lead()
        path = self.file(FILE)
        self.sky("apply", path)
        self.cluster.run(10)
        before = {u for h in self.cluster.hosts.values() for u in h.children}
        code, out, _ = self.sky("rollout", "restart", "Fib")
        self.assertEqual(code, 0)
        self.assertIn("~ Fib: rolling restart of 3 instance(s) (generation 1)", out)
        code, out, _ = self.sky("rollout", "status", "Fib", "--timeout", "120")
        self.assertEqual(code, 0, out)
        after = {u for h in self.cluster.hosts.values() for u in h.children}
        self.assertEqual(len(after), 3)
        self.assertFalse(before & after)
        # Applying the file again neither resets the generation nor rolls.
        code, out, _ = self.sky("apply", path)
        self.assertIn("No changes.", out)
        self.assertEqual(self.desired().get("Fib").generation, 1)
        self.cluster.run(10)
        self.assertEqual({u for h in self.cluster.hosts.values() for u in h.children}, after)
        self.assertEqual(self.sky("rollout", "restart", "Nope")[0], 1)

    def test_rollout_status_of_a_broken_rollout(self) -> None:
        self.lead()
        self.sky("apply", self.file(FILE))
        self.cluster.run(10)
        self.sky("apply", self.file(FILE + 'version = "broken"\n'))
        code, out, _ = self.sky("rollout", "status", "Fib", "--timeout", "120")
        self.assertEqual(code, 1, out)
        self.assertIn("stopped: new instance", out)

    def test_rollout_status_times_out_without_a_leader(self) -> None:
        self.sky("apply", self.file(FILE))
        code, out, _ = self.sky("rollout", "status", "Fib", "--timeout", "5")
        self.assertEqual(code, 3)
        self.assertIn("still progressing after 5s", out)
        self.assertEqual(self.sky("rollout", "status", "Nope")[0], 1)


@pytest.mark.slow
def test_python_m_skynet_cluster_on_the_embedded_registry() -> None:
    with tempfile.TemporaryDirectory() as home:
        url = "file://" + os.path.join(home, "registry")
        path = os.path.join(home, "cluster.toml")
        with open(path, "w") as f:
            f.write(FILE)
        env = dict(os.environ, SKYNET_HOME=home)

        def sky(*argv: str) -> subprocess.CompletedProcess:
            return subprocess.run(
                [sys.executable, "-m", "skynet.cluster", "--registry", url, *argv],
                cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
            )  # fmt: skip

        first = sky("apply", path)
        assert first.returncode == 0, first.stderr
        assert "+ Fib: 3 x examples.fibonacci:Fibonacci" in first.stdout
        again = sky("apply", path)
        assert "No changes." in again.stdout
        listing = sky("deployments", "--json")
        assert listing.returncode == 0, listing.stderr
        doc = json.loads(listing.stdout)
        assert [d["name"] for d in doc["deployments"]] == ["Fib"]
        assert doc["leader"] is None
        bad = sky("scale", "Fib=lots")
        assert bad.returncode == 2
        assert sky("undeploy", "Fib").returncode == 0
        assert "No deployments" in sky("deployments").stdout
        # --registry after the command works too.
        after = subprocess.run(
            [sys.executable, "-m", "skynet.cluster", "deployments", "--registry", url],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert after.returncode == 0 and "No deployments" in after.stdout, after.stderr
