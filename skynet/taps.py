"""
What the twistd taps (C{skynet-service}, C{skynet-daemon},
C{skynet-dashboard}) share: checking numbers (L{number}, their options'
coerce column), the Go defaults for where a
service listens, opening the registry, and running a plugin as a module.
Each raises L{usage.UsageError} with a message for the user.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from typing import Any

from twisted.internet.endpoints import serverFromString
from twisted.python import usage

from skynet.config import EnvDefaults, environment_defaults
from skynet.registry.base import RegistryError


def number(name: str, kind: type = float, *, positive: bool = False,
           minimum: float | None = None) -> Callable[[str], Any]:  # fmt: skip
    """
    A coerce function for the fifth column of an C{optParameters} row: the
    option's value as a finite C{kind} (C{float} or C{int}) of zero or more,
    above zero if C{positive}, at least C{minimum} if given.  A bad value
    raises L{usage.UsageError} naming the option (Twisted would wrap a
    C{ValueError} as "Parameter type enforcement failed"); one that is no
    number says "--NAME must be a number".  Defaults are not
    coerced: give them as numbers (or L{None}).

    @param name: the option, for the message.
    """
    whole = kind is int

    def coerce(value: str) -> Any:
        try:
            result = kind(value)
        except (TypeError, ValueError):
            what = "a number (an integer)" if whole else "a number"
            raise usage.UsageError(f"--{name} must be {what}, not {value!r}") from None
        if isinstance(result, float) and not math.isfinite(result):
            raise usage.UsageError(f"--{name} must be finite, not {value!r}")
        if result < 0:
            raise usage.UsageError(f"--{name} must not be negative, not {value!r}")
        if positive and result <= 0:
            raise usage.UsageError(f"--{name} must be positive, not {value!r}")
        if minimum is not None and result < minimum:
            raise usage.UsageError(f"--{name} must be at least {minimum:g}, not {value!r}")
        return result

    # No coerceDoc: Twisted would append it to the help after ". ", and the
    # rows' texts already say what they take.
    return coerce


def port_range(env: EnvDefaults | None = None) -> tuple[int, int]:
    """
    Go Skynet's C{SKYNET_MIN_PORT}..C{SKYNET_MAX_PORT} (9000..9999).

    @param env: the environment (default: L{environment_defaults} now).
    """
    env = environment_defaults() if env is None else env
    try:
        low = int(env.min_port or "9000")
        high = int(env.max_port or "9999")
    except ValueError as e:
        raise usage.UsageError(f"SKYNET_MIN_PORT/SKYNET_MAX_PORT must be integers: {e}") from e
    if not (0 < low <= high < 65536):
        raise usage.UsageError(f"bad port range SKYNET_MIN_PORT={low} SKYNET_MAX_PORT={high}")
    return low, high


#: The listen backlog of a service (Twisted's default, 50, drops connects of a
#: burst; the kernel caps it at net.core.somaxconn).
LISTEN_BACKLOG = 1024


def with_backlog(spec: str) -> str:
    """
    A C{tcp:} endpoint string with L{LISTEN_BACKLOG} unless it names one.
    """
    if spec.startswith(("tcp:", "tcp6:")) and "backlog=" not in spec:
        return f"{spec}:backlog={LISTEN_BACKLOG}"
    return spec


def service_endpoints(reactor: Any, listen: str | None, admin: str) -> tuple[list, list]:
    """
    The server endpoints of a service: C{listen}, or every port of the Go
    range on C{SKYNET_BIND_IP} (127.0.0.1), tried in order; and the admin
    endpoint unless C{admin} is C{none}.
    """
    if listen:
        specs = [with_backlog(listen)]
    else:
        env = environment_defaults()
        ip = env.bind_ip or "127.0.0.1"
        low, high = port_range(env)
        specs = [f"tcp:{p}:interface={ip}:backlog={LISTEN_BACKLOG}" for p in range(low, high + 1)]
    admin_specs = [] if admin.lower() == "none" else [admin]
    try:
        return (
            [serverFromString(reactor, s) for s in specs],
            [serverFromString(reactor, s) for s in admin_specs],
        )
    except (ValueError, TypeError, KeyError) as e:
        raise usage.UsageError(f"bad endpoint: {e}") from e


ZK_SESSION_TIMEOUT_OPTION = [
    "zk-session-timeout", None, None,
    "ZooKeeper session timeout in seconds, for a zk:// registry (default: the URL's "
    "?session_timeout=, else 4).", number("zk-session-timeout", positive=True),
]  # fmt: skip


def open_registry(reactor: Any, url: str | None, zk_session_timeout: Any = None) -> Any:
    """
    The registry at C{url} (L{None}: C{$SKYNET_REGISTRY}, else embedded).

    @param zk_session_timeout: seconds, already checked (the option's
        coerce column), or L{None}.
    """
    from skynet.registry import registry_from_url

    timeout = zk_session_timeout
    try:
        if timeout is None:
            return registry_from_url(url, reactor=reactor)
        return registry_from_url(url, reactor=reactor, zk_session_timeout=timeout)
    except (RegistryError, ValueError) as e:
        raise usage.UsageError(str(e)) from e


def run_plugin(plugin: str, argv: list[str] | None = None) -> None:
    """
    Run C{twistd -n --pidfile= <plugin> argv...} in this process.
    """
    from twisted.scripts.twistd import run

    sys.argv = ["twistd", "-n", "--pidfile=", plugin] + list(sys.argv[1:] if argv is None else argv)
    run()
