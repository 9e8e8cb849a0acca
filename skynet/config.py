"""
One place for the idioms every module needs: the lazy reactor default and
the paths under C{$SKYNET_HOME}, and Go Skynet's environment variables.

Library code takes its reactor as a parameter and calls L{default_reactor}
only when none was given, so that importing a skynet module never installs a
reactor. The environment (C{SKYNET_HOME}, and the C{SKYNET_*} variables of
L{environment_defaults}) is read here and only by the edges that call these
functions: the twistd taps, C{sky}, the examples, and the constructors of
L{skynet.sync.Client} and L{skynet.aio.Client}.  Library objects built in
code (L{skynet.service.ServiceHost}, L{skynet.client.Client}) take these
values as parameters and never look at C{os.environ}.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import attr

__all__ = ["EnvDefaults", "default_reactor", "environment_defaults", "skynet_home", "skynet_path"]


def default_reactor(reactor: Any = None) -> Any:
    """
    Return C{reactor}, or the global reactor when it is C{None}.

    The global reactor is imported here, at call time, never at import time.
    """
    if reactor is not None:
        return reactor
    from twisted.internet import reactor as global_reactor

    return global_reactor


def skynet_home(environ: dict[str, str] | None = None) -> str:
    """
    Skynet's own directory: C{$SKYNET_HOME} if set, else C{~/.skynet}.
    """
    env = os.environ if environ is None else environ
    return env.get("SKYNET_HOME") or os.path.join(os.path.expanduser("~"), ".skynet")


def skynet_path(name: str, environ: dict[str, str] | None = None) -> str:
    """
    A path under L{skynet_home}: C{$SKYNET_HOME/<name>}.
    """
    return os.path.join(skynet_home(environ), name)


@attr.frozen
class EnvDefaults:
    """
    Go Skynet's environment variables, as the edges read them.  L{None}
    means unset (or empty).

    @ivar version: C{SKYNET_VERSION}, a service's version.
    @ivar region: C{SKYNET_REGION}, a service's region, and the region a
        client prefers.
    @ivar bind_ip: C{SKYNET_BIND_IP}, where a service listens and what it
        advertises, and the host a client prefers.
    @ivar registry: C{SKYNET_REGISTRY}, the registry URL.
    @ivar min_port: C{SKYNET_MIN_PORT}, unparsed (see L{skynet.taps.port_range}).
    @ivar max_port: C{SKYNET_MAX_PORT}, unparsed.
    @ivar otlp_endpoint: C{SKYNET_OTLP_ENDPOINT}, the OTLP/HTTP collector
        spans are exported to (L{skynet.observe.otlp}), unparsed.
    @ivar busy_poll: C{SKYNET_BUSY_POLL}, microseconds a service's reactor
        polls before it sleeps (L{skynet.busypoll}), unparsed.
    """

    version: str | None = None
    region: str | None = None
    bind_ip: str | None = None
    registry: str | None = None
    min_port: str | None = None
    max_port: str | None = None
    otlp_endpoint: str | None = None
    busy_poll: str | None = None


def environment_defaults(environ: Mapping[str, str] | None = None) -> EnvDefaults:
    """
    Read L{EnvDefaults} from C{environ} (default: C{os.environ}).
    """
    env = os.environ if environ is None else environ

    def get(name: str) -> str | None:
        return env.get(name) or None

    return EnvDefaults(
        version=get("SKYNET_VERSION"),
        region=get("SKYNET_REGION"),
        bind_ip=get("SKYNET_BIND_IP"),
        registry=get("SKYNET_REGISTRY"),
        min_port=get("SKYNET_MIN_PORT"),
        max_port=get("SKYNET_MAX_PORT"),
        otlp_endpoint=get("SKYNET_OTLP_ENDPOINT"),
        busy_poll=get("SKYNET_BUSY_POLL"),
    )


# The C allocator, for processes that move large messages

#: glibc's mallopt() parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: Allocations below this come from the heap, where freed memory is reused,
#: instead of fresh mmap()ed pages: glibc's largest allowed value, above the
#: default 16 MiB frame limit.
MMAP_THRESHOLD = 32 * 1024 * 1024
#: Free memory kept at the top of the heap before it is given back.
TRIM_THRESHOLD = 128 * 1024 * 1024

_malloc_tuned: bool | None = None


def tune_malloc(environ: Mapping[str, str] | None = None) -> bool:
    """
    Make glibc's malloc reuse freed memory for large blocks (up to
    L{MMAP_THRESHOLD}) instead of mapping fresh pages for each and unmapping
    them on free: with 1 MB messages every fresh page is a page fault and a
    page zeroed, which cost several times the copying itself (1 MB calls
    went from about 280 to 1,400-1,600 a second, one at a time, on the test
    machine).  The price is up to L{TRIM_THRESHOLD} of free memory kept in
    the process after a burst of large messages.

    Called by the twistd plugins (services, daemons, dashboards) at start,
    and by L{skynet.client.Client} and L{skynet.sync.Client} when made
    (unless given C{tune_malloc=False}).  Nothing is
    changed where the environment says otherwise: C{SKYNET_TUNE_MALLOC=0},
    or glibc's own C{MALLOC_MMAP_THRESHOLD_} / C{MALLOC_TRIM_THRESHOLD_}
    set (the user's choice stands); nor on a C library without
    C{mallopt} (musl answers 0 and is left alone).  Once per process.

    @return: whether the settings are in effect.
    """
    global _malloc_tuned
    if _malloc_tuned is not None:
        return _malloc_tuned
    environ = os.environ if environ is None else environ
    _malloc_tuned = False
    if environ.get("SKYNET_TUNE_MALLOC", "1").lower() in ("0", "off", "no", "false"):
        return False
    if "MALLOC_MMAP_THRESHOLD_" in environ or "MALLOC_TRIM_THRESHOLD_" in environ:
        return False
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    _malloc_tuned = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
    return _malloc_tuned
