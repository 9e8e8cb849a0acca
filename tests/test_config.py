"""
Tests for L{skynet.config}.
"""

import os
import subprocess
import sys

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from skynet.config import default_reactor, skynet_home, skynet_path


class ConfigTests(SynchronousTestCase):
    def test_given_reactor_is_returned(self):
        """A reactor passed in is the one used."""
        clock = Clock()
        self.assertIs(default_reactor(clock), clock)

    def test_home_from_environment(self):
        """C{SKYNET_HOME} wins over the user's home directory."""
        self.assertEqual(skynet_home({"SKYNET_HOME": "/srv/sky"}), "/srv/sky")
        self.assertEqual(skynet_path("tls", {"SKYNET_HOME": "/srv/sky"}), "/srv/sky/tls")

    def test_home_default(self):
        """Without C{SKYNET_HOME}, C{~/.skynet}."""
        self.assertEqual(skynet_home({}), os.path.join(os.path.expanduser("~"), ".skynet"))

    def test_import_installs_no_reactor(self):
        """Importing the module leaves the reactor choice to the program."""
        code = "import sys, skynet.config\nprint('twisted.internet.reactor' in sys.modules)\n"
        out = subprocess.check_output([sys.executable, "-c", code], text=True)
        self.assertEqual(out.strip(), "False")
