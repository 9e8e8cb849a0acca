"""
The daemon's control-plane records: each round-trips through BSON in one
spelling, and a document that breaks the contract is refused with a
L{ValueError} naming what is wrong.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import bson
from twisted.trial.unittest import SynchronousTestCase

from skynet import control
from skynet.control import (
    ChildStats,
    DaemonEvent,
    DaemonProcess,
    Deployment,
    ExitStatus,
    HostFigures,
    HostMemory,
    HostStats,
    LoadGuardStatus,
    ProcessUsage,
    SubServiceStatus,
    sub_services_from_bson,
    sub_services_to_bson,
)


def through_bson(doc: dict[str, Any]) -> dict[str, Any]:
    """
    What a peer reads after C{doc} crossed the wire.
    """
    return bson.decode(bson.encode(doc))


EXIT = ExitStatus(code=None, signal=9, signal_name="SIGKILL", time=100.5, uptime=3.0, pid=41,
                  error=None, text="killed by SIGKILL")  # fmt: skip

STATUS = SubServiceStatus(
    uuid="u-1", service="m:A", args=("-x",), running=True, pid=42, restarts=2, started=99.0,
    registered=False, last_exit=EXIT, desired_registered=True, held=("memory",),
    in_registry=False, next_restart=None, backoff=2.0, log="/logs/A-u-1.log", cpu=1.5,
    rss=1 << 20,
)  # fmt: skip

HOST = HostStats(
    daemon=DaemonProcess(uuid="d-1", pid=7, uptime=5.0, usage=ProcessUsage(cpu=0.5, rss=100)),
    load_guard=LoadGuardStatus(reading=1.5, high=4.0, low=2.0, overloaded=False),
    children=(ChildStats(uuid="u-1", service="A", pid=42, running=True,
                         usage=ProcessUsage(cpu=1.5, rss=1 << 20)),
              ChildStats(uuid="u-2", service="B", pid=None, running=False)),
    figures=HostFigures(cpu=12.5, cpus=2, memory=HostMemory(total=100, available=60, used=40,
                        percent=40.0), load=(0.5, 0.25, 0.125), uptime=10.0, boot_time=1e9,
                        hostname="box"),
)  # fmt: skip


class RoundTripTests(SynchronousTestCase):
    def test_deployment(self) -> None:
        d = Deployment(uuid="u-1", service="m:A", args=("--x", "y z"), registered=False)
        self.assertEqual(d.to_bson(), {"uuid": "u-1", "service": "m:A", "args": ["--x", "y z"],
                                       "registered": False})  # fmt: skip
        self.assertEqual(Deployment.from_bson(through_bson(d.to_bson())), d)
        self.assertEqual((d.is_class, d.label), (True, "A"))
        self.assertEqual(Deployment(uuid="u", service="/bin/sleep 1").label, "sleep")

    def test_sub_services(self) -> None:
        answer = sub_services_to_bson([STATUS])
        self.assertEqual(list(answer["services"]), ["u-1"])
        self.assertNotIn("uuid", answer["services"]["u-1"])
        self.assertEqual(answer["services"]["u-1"]["last_exit"]["signal_name"], "SIGKILL")
        self.assertEqual(sub_services_from_bson(through_bson(answer)), {"u-1": STATUS})
        self.assertEqual(sub_services_from_bson({"services": {}}), {})

    def test_host_stats(self) -> None:
        doc = HOST.to_bson()
        # The one spelling, as today's dashboards read it.
        self.assertEqual(doc["load"], [0.5, 0.25, 0.125])
        self.assertEqual(doc["memory"]["total"], 100)
        self.assertEqual(doc["children"]["u-1"], {"service": "A", "pid": 42, "running": True,
                                                  "cpu": 1.5, "rss": 1 << 20})  # fmt: skip
        self.assertEqual(doc["children"]["u-2"]["cpu"], None)
        self.assertEqual(doc["daemon"], {"uuid": "d-1", "pid": 7, "uptime": 5.0, "cpu": 0.5,
                                         "rss": 100})  # fmt: skip
        self.assertEqual(HostStats.from_bson(through_bson(doc)), HOST)

    def test_host_not_measured(self) -> None:
        stats = HostStats(daemon=DaemonProcess(uuid="d", pid=1, uptime=0.0),
                          load_guard=LoadGuardStatus())  # fmt: skip
        doc = stats.to_bson()
        self.assertEqual((doc["cpu"], doc["memory"], doc["load"]), (None, None, None))
        self.assertEqual(HostStats.from_bson(through_bson(doc)), stats)

    def test_event(self) -> None:
        event = DaemonEvent(time=12.25, kind="exited", text="A (u-1) exited",
                            fields={"uuid": "u-1", "service": "A", "code": 1})  # fmt: skip
        doc = event.to_bson()
        self.assertEqual(list(doc)[:3], ["time", "kind", "text"])
        again = DaemonEvent.from_bson(through_bson(doc))
        self.assertEqual((again, again.fields, again.uuid), (event, event.fields, "u-1"))
        self.assertIsNone(DaemonEvent(time=1.0, kind="k", text="t").uuid)

    def test_no_twisted(self) -> None:
        """
        The contract imports nothing of Twisted: any tool may use it.
        """
        code = (
            "import sys, skynet.control; print(any(m.startswith('twisted') for m in sys.modules))"
        )
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                check=True)  # fmt: skip
        self.assertEqual(result.stdout.strip(), "False")

    def test_actions(self) -> None:
        from skynet import admin

        self.assertIs(admin.ADMIN_ACTIONS, control.ADMIN_ACTIONS)
        self.assertEqual(set(control.DAEMON_ACTIONS.values()) <= set(control.DAEMON_METHODS), True)


class StrictTests(SynchronousTestCase):
    """
    Wrong types and missing keys are refused, naming the key.
    """

    def refused(self, reader: Any, doc: Any, reason: str) -> None:
        with self.assertRaises(ValueError) as e:
            reader(doc)
        self.assertIn(reason, str(e.exception))

    def test_deployment(self) -> None:
        good = Deployment(uuid="u", service="m:A").to_bson()
        self.refused(Deployment.from_bson, [good], "must be a document")
        self.refused(Deployment.from_bson, {k: v for k, v in good.items() if k != "args"},
                     "has no 'args'")  # fmt: skip
        self.refused(Deployment.from_bson, dict(good, args=[1]), "'args' must be a list of strings")
        self.refused(
            Deployment.from_bson, dict(good, registered="yes"), "'registered' must be true"
        )
        self.refused(Deployment.from_bson, dict(good, uuid=5), "'uuid' must be a string")

    def test_sub_services(self) -> None:
        good = sub_services_to_bson([STATUS])
        entry = good["services"]["u-1"]
        self.refused(sub_services_from_bson, None, "must be a document")
        self.refused(sub_services_from_bson, {}, "has no 'services'")
        self.refused(sub_services_from_bson, {"services": [{"uuid": "u-1"}]}, "must be a document")
        self.refused(sub_services_from_bson, {"services": {"u-1": {"service": "m:A"}}},
                     "sub-service u-1 has no ")  # fmt: skip
        for key, value, reason in [
            ("running", 1, "'running' must be true or false"),
            ("pid", "42", "'pid' must be a number"),
            ("restarts", 1.5, "'restarts' must be a whole number"),
            ("restarts", None, "'restarts' must be a number"),
            ("started", float("inf"), "'started' must be finite"),
            ("held", "memory", "'held' must be a list of strings"),
            ("last_exit", {"code": 1}, "an exit status has no"),
            ("cpu", True, "'cpu' must be a number"),
        ]:
            bad = {"services": {"u-1": dict(entry, **{key: value})}}
            self.refused(sub_services_from_bson, bad, reason)

    def test_host_stats(self) -> None:
        good = HOST.to_bson()
        self.refused(HostStats.from_bson, "x", "must be a document")
        for key in ("daemon", "load_guard", "children", "cpu"):
            self.refused(HostStats.from_bson, {k: v for k, v in good.items() if k != key},
                         f"has no {key!r}")  # fmt: skip
        self.refused(HostStats.from_bson, dict(good, load=[1, 2]), "three numbers")
        self.refused(HostStats.from_bson, dict(good, load=[1, "2", 3]), "must be a number")
        self.refused(HostStats.from_bson, dict(good, memory={"total": 1}), "has no 'available'")
        self.refused(HostStats.from_bson, dict(good, children=[]), "must be a document")
        child = dict(good["children"]["u-1"], rss=None)
        self.refused(HostStats.from_bson, dict(good, children={"u-1": child}), "both known")
        self.refused(HostStats.from_bson, dict(good, daemon=dict(good["daemon"], pid=None)),
                     "'pid' must be a number")  # fmt: skip
        guard = dict(good["load_guard"], overloaded="no")
        self.refused(HostStats.from_bson, dict(good, load_guard=guard), "'overloaded' must be")

    def test_event(self) -> None:
        good = {"time": 1.0, "kind": "started", "text": "t"}
        self.refused(DaemonEvent.from_bson, 3, "must be a document")
        self.refused(DaemonEvent.from_bson, {"kind": "k", "text": "t"}, "has no 'time'")
        self.refused(DaemonEvent.from_bson, dict(good, time="now"), "'time' must be a number")
        self.refused(DaemonEvent.from_bson, dict(good, text=None), "'text' must be a string")
        self.refused(DaemonEvent.from_bson, dict(good, uuid=7), "'uuid' must be a string")

    def test_unknown_keys_are_ignored(self) -> None:
        """
        A newer daemon may say more: what a reader does not know it skips.
        """
        doc = dict(HOST.to_bson(), swap={"total": 1})
        self.assertEqual(HostStats.from_bson(doc), HOST)
