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
    """

    version: str | None = None
    region: str | None = None
    bind_ip: str | None = None
    registry: str | None = None
    min_port: str | None = None
    max_port: str | None = None
    otlp_endpoint: str | None = None


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
    )
