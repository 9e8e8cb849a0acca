"""
Tests for L{skynet.config}.
"""

import os
import subprocess
import sys
from unittest import mock

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from skynet.client import Client
from skynet.config import (
    EnvDefaults,
    default_reactor,
    environment_defaults,
    skynet_home,
    skynet_path,
)
from skynet.registry.memory import MemoryRegistry
from skynet.service import Service, ServiceHost, advertised_address

GO_ENV = {
    "SKYNET_VERSION": "7",
    "SKYNET_REGION": "Mars",
    "SKYNET_BIND_IP": "127.0.0.9",
    "SKYNET_REGISTRY": "memory://env",
    "SKYNET_MIN_PORT": "9100",
    "SKYNET_MAX_PORT": "9200",
}


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


class EnvironmentDefaultsTests(SynchronousTestCase):
    def test_reads_go_variables(self):
        """Each of Go Skynet's variables lands in its field."""
        self.assertEqual(
            environment_defaults(GO_ENV),
            EnvDefaults(version="7", region="Mars", bind_ip="127.0.0.9",
                        registry="memory://env", min_port="9100", max_port="9200"),
        )  # fmt: skip

    def test_unset_and_empty_are_none(self):
        """An unset or empty variable is L{None}, not C{""}."""
        self.assertEqual(environment_defaults({}), EnvDefaults())
        self.assertIsNone(environment_defaults({"SKYNET_REGION": ""}).region)

    def test_default_is_os_environ(self):
        """Without an argument, the process's environment, read at call time."""
        with mock.patch.dict(os.environ, {"SKYNET_REGION": "Phobos"}):
            self.assertEqual(environment_defaults().region, "Phobos")

    def test_frozen(self):
        """The record cannot be changed after the edge read it."""
        import attr

        with self.assertRaises(attr.exceptions.FrozenInstanceError):
            environment_defaults({}).region = "x"  # type: ignore[misc]


class Anonymous(Service):
    """A service class naming no version or region."""

    def Echo(self, params):
        return params


class Named(Service):
    """A service class naming its version and region."""

    version = "3"
    region = "Earth"

    def Echo(self, params):
        return params


class LibraryIgnoresEnvironmentTests(SynchronousTestCase):
    """
    Objects built in code take Go Skynet's environment only as parameters;
    the edges (taps, C{sky}, examples, L{skynet.sync}, L{skynet.aio}) read it.
    """

    def host(self, **kwargs):
        return ServiceHost(Anonymous(), MemoryRegistry(), [], reactor=Clock(), **kwargs)

    def test_service_host_ignores_os_environ(self):
        """A ServiceHost built in code with SKYNET_* set keeps its defaults."""
        with mock.patch.dict(os.environ, GO_ENV):
            host = self.host()
        self.assertEqual((host.version, host.region), ("unknown", "unknown"))

    def test_service_host_takes_defaults(self):
        """The edge's L{EnvDefaults} fill in what neither argument nor class says."""
        host = self.host(defaults=environment_defaults(GO_ENV))
        self.assertEqual((host.version, host.region), ("7", "Mars"))
        explicit = self.host(defaults=environment_defaults(GO_ENV), version="9", region="Venus")
        self.assertEqual((explicit.version, explicit.region), ("9", "Venus"))

    def test_class_wins_over_defaults(self):
        """A class's own version and region win over the environment's."""
        host = ServiceHost(Named(), MemoryRegistry(), [], reactor=Clock(),
                           defaults=environment_defaults(GO_ENV))  # fmt: skip
        self.assertEqual((host.version, host.region), ("3", "Earth"))

    def test_advertised_address(self):
        """A wildcard listener advertises the given bind IP, never os.environ's."""
        self.assertEqual(advertised_address("0.0.0.0", "127.0.0.9"), "127.0.0.9")
        self.assertEqual(advertised_address("127.0.0.5", "127.0.0.9"), "127.0.0.5")
        with mock.patch.dict(os.environ, GO_ENV):
            self.assertNotEqual(advertised_address("0.0.0.0"), "127.0.0.9")

    def test_host_client_prefers_defaults(self):
        """A host's own client prefers the edge's region and host."""
        host = self.host(defaults=environment_defaults(GO_ENV))
        self.assertEqual((host.client.region, host.client.host), ("Mars", "127.0.0.9"))
        with mock.patch.dict(os.environ, GO_ENV):
            bare = self.host()
            self.assertEqual((bare.client.region, bare.client.host), (None, None))

    def test_client_ignores_os_environ(self):
        """A Twisted L{Client} built in code prefers no region unless told."""
        with mock.patch.dict(os.environ, GO_ENV):
            client = Client(registry=MemoryRegistry(), reactor=Clock())
            told = Client(registry=MemoryRegistry(), reactor=Clock(), region="Io", host="h")
        self.assertEqual((client.region, client.host), (None, None))
        self.assertEqual((told.region, told.host), ("Io", "h"))

    def test_sync_client_honours_environment(self):
        """L{skynet.sync.Client} is an edge: it reads SKYNET_REGION/BIND_IP when made."""
        from skynet import sync

        with mock.patch.dict(os.environ, GO_ENV):
            client = sync.Client("memory://sync-env")
            told = sync.Client("memory://sync-env", region="Io", host="h")
        self.addCleanup(client.close)
        self.addCleanup(told.close)
        self.assertEqual((client.region, client.host), ("Mars", "127.0.0.9"))
        self.assertEqual((told.region, told.host), ("Io", "h"))


_FAULTS = """
import resource, sys
from skynet import config
if sys.argv[1:] == ["client"]:  # a process that only makes a client
    import skynet.client
    skynet.client.Client(registry="file:///nonexistent/registry")
    tuned = config._malloc_tuned
elif sys.argv[1:] == ["client-untuned"]:
    import skynet.client
    skynet.client.Client(registry="file:///nonexistent/registry", tune_malloc=False)
    tuned = config._malloc_tuned
elif sys.argv[1:] == ["sync"]:
    import skynet.sync
    skynet.sync.Client("file:///nonexistent/registry").close()
    tuned = config._malloc_tuned
else:
    tuned = config.tune_malloc()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
held = []
for _ in range(5):  # warm up
    bytes(bytearray(1 << 20))
before = faults()
for i in range(200):
    # messages of 1-1.4 MiB arriving (written, as received bytes are) while
    # the two before them are still in use
    held.append(bytearray((1 << 20) + (i % 7) * 65536))
    if len(held) > 2:
        del held[0]
print(tuned, faults() - before)
"""


class TuneMallocTests(SynchronousTestCase):
    """
    L{skynet.config.tune_malloc}: heap reuse for large blocks, shown by the
    page faults of allocating and freeing 1 MiB 200 times, in a fresh
    process each (the setting is per process).
    """

    def run_faults(self, *argv: str, **env: str) -> tuple[str, int]:
        environ = {k: v for k, v in os.environ.items()
                   if k not in ("SKYNET_TUNE_MALLOC", "MALLOC_MMAP_THRESHOLD_",
                                "MALLOC_TRIM_THRESHOLD_")}  # fmt: skip
        out = subprocess.run([sys.executable, "-c", _FAULTS, *argv], env={**environ, **env},
                             capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
        tuned, faults = out.stdout.split()
        return tuned, int(faults)

    def test_tuned_blocks_are_reused(self) -> None:
        tuned, faults = self.run_faults()
        self.assertEqual(tuned, "True")
        untuned, untuned_faults = self.run_faults(SKYNET_TUNE_MALLOC="0")
        self.assertEqual(untuned, "False")
        # glibc maps fresh pages for many of these blocks and unmaps them on
        # free (a fault per 4 KiB page each time); the tuned heap reuses them
        # (measured here: 608 against 2966).
        self.assertLess(faults * 3, untuned_faults, (faults, untuned_faults))

    def test_clients_tune_their_process(self) -> None:
        """
        A process that makes a L{skynet.client.Client} or a
        L{skynet.sync.Client} reuses large blocks as a service does, unless
        told not to (C{tune_malloc=False}, or C{SKYNET_TUNE_MALLOC=0}).
        """
        untuned, untuned_faults = self.run_faults("client-untuned")
        self.assertEqual(untuned, "None")  # not even decided
        for kind in ("client", "sync"):
            tuned, faults = self.run_faults(kind)
            self.assertEqual(tuned, "True", kind)
            self.assertLess(faults * 3, untuned_faults, (kind, faults, untuned_faults))
            refused, _ = self.run_faults(kind, SKYNET_TUNE_MALLOC="0")
            self.assertEqual(refused, "False", kind)

    def test_the_users_glibc_settings_stand(self) -> None:
        tuned, _ = self.run_faults(MALLOC_MMAP_THRESHOLD_="131072")
        self.assertEqual(tuned, "False")

    def test_once_per_process(self) -> None:
        import skynet.config as config

        with mock.patch.object(config, "_malloc_tuned", None):
            self.assertFalse(config.tune_malloc({"SKYNET_TUNE_MALLOC": "off"}))
            # decided: a later call with another environment does not redo it
            self.assertFalse(config.tune_malloc({}))
