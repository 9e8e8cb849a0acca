"""
Tests for L{skynet.taps.number}, the coerce column of the taps' number
options, through the options of each tap as a user gives them.
"""

from __future__ import annotations

import tempfile

from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from skynet import daemon_tap, dashboard_tap, service_tap
from skynet.taps import number


class NumberTests(SynchronousTestCase):
    def refused(self, coerce, value, message):
        with self.assertRaises(usage.UsageError) as e:
            coerce(value)
        self.assertIn(message, str(e.exception))

    def test_accepts_and_converts(self):
        """A good value comes back as the number of its kind."""
        self.assertEqual(number("x")("1.5"), 1.5)
        self.assertEqual(number("x")("0"), 0.0)
        self.assertEqual(number("n", int, minimum=1)("3"), 3)
        self.assertIsInstance(number("n", int)("3"), int)

    def test_refuses_naming_the_option(self):
        """Each bad value gets a L{usage.UsageError} naming the option and the value."""
        self.refused(number("delay"), "soon", "--delay must be a number, not 'soon'")
        self.refused(number("n", int), "1.5", "--n must be a number (an integer), not '1.5'")
        self.refused(number("delay"), "nan", "--delay must be finite")
        self.refused(number("delay"), "inf", "--delay must be finite")
        self.refused(number("delay"), "-1", "--delay must not be negative")
        self.refused(number("delay", positive=True), "0", "--delay must be positive")
        self.refused(number("n", int, minimum=5), "4", "--n must be at least 5")


class TapOptionTests(SynchronousTestCase):
    """
    The taps' number options, parsed as twistd parses them: a bad value is a
    L{usage.UsageError} naming the option (twistd prints it and exits 1).
    """

    def refused(self, options_class, args, message):
        with self.assertRaises(usage.UsageError) as e:
            options_class().parseOptions(args)
        self.assertIn(message, str(e.exception), args)

    def service(self, *args):
        options = service_tap.Options()
        options.parseOptions(["--service", "examples.testservice:TestService",
                              "--registry", "memory://taps", "--listen",
                              "tcp:0:interface=127.0.0.1", *args])  # fmt: skip
        return options

    def test_service_numbers(self):
        """skynet-service: converted numbers, defaults kept, bad values refused."""
        options = self.service("--max-frame", "1024", "--linger", "0", "--drain-timeout", "2.5")
        self.assertEqual((options["max-frame"], options["linger"], options["drain-timeout"]),
                         (1024, 0.0, 2.5))  # fmt: skip
        self.assertEqual(self.service()["stats-interval"], 5.0)
        self.assertIsNone(self.service()["max-frame"])
        for args, message in [
            (["--max-frame", "4"], "--max-frame must be at least 5"),
            (["--max-frame", "big"], "--max-frame must be a number (an integer)"),
            (["--linger", "-1"], "--linger must not be negative"),
            (["--stats-interval", "0"], "--stats-interval must be positive"),
            (["--zk-session-timeout", "never"], "--zk-session-timeout must be a number"),
            (["--max-connections-per-peer", "0"], "--max-connections-per-peer must be at least 1"),
            (["--max-connections", "lots"], "--max-connections must be a number (an integer)"),
        ]:
            self.refused(service_tap.Options, args, message)

    def test_service_connection_limits_reach_the_host(self):
        """--max-connections and --max-connections-per-peer are the host's limits."""
        from skynet.service import ServiceHost

        options = self.service("--max-connections", "50", "--max-connections-per-peer", "2000")
        [host] = [s for s in service_tap.makeService(options) if isinstance(s, ServiceHost)]
        self.assertEqual((host.max_connections, host.max_connections_per_peer), (50, 2000))
        [host] = [s for s in service_tap.makeService(self.service()) if isinstance(s, ServiceHost)]
        self.assertEqual(host.max_connections_per_peer, 256)

    def test_dashboard_numbers(self):
        """skynet-dashboard: --stats-interval and --history must be positive."""
        self.refused(dashboard_tap.Options, ["--history", "0"], "--history must be positive")
        self.refused(dashboard_tap.Options, ["--stats-interval", "x"],
                     "--stats-interval must be a number")  # fmt: skip

    def test_daemon_numbers(self):
        """skynet-daemon: every number option checked by its row."""
        logs = ["--log-dir", tempfile.mkdtemp(prefix="skynet-taps-")]
        for args, message in [
            (["--max-restart-delay", "0.5"], "--max-restart-delay must be at least 1"),
            (["--probe-failures", "0"], "--probe-failures must be at least 1"),
            (["--capacity", "many"], "--capacity must be a number (an integer)"),
            (["--load-low", "-2"], "--load-low must not be negative"),
            (["--cluster-list-interval", "0"], "--cluster-list-interval must be positive"),
            (["--kill-time", "inf"], "--kill-time must be finite"),
        ]:
            self.refused(daemon_tap.Options, logs + args, message)
