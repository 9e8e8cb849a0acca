"""
One place for the idioms every module needs: the lazy reactor default and
the paths under C{$SKYNET_HOME}.

Library code takes its reactor as a parameter and calls L{default_reactor}
only when none was given, so that importing a skynet module never installs a
reactor. The environment (C{SKYNET_HOME}) is read here and only by the edges
that call these functions: the twistd taps, C{sky} and the examples.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["default_reactor", "skynet_home", "skynet_path"]


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
