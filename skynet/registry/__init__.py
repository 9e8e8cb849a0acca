"""
Where services register and clients find them.

L{registry_from_url} picks a backend from a URL:

    (none)                       C{$SKYNET_REGISTRY}, else the embedded registry
    file:///abs/path             the embedded registry rooted at that directory
    memory://name                a named in-memory registry (this process only)
    zk://host:port,.../chroot    ZooKeeper

@see: L{skynet.registry.base.IRegistry}
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

from skynet.registry.base import (
    Address,
    IInstanceListener,
    Instance,
    IRegistry,
    IWatch,
    Query,
    RegistryError,
)

if TYPE_CHECKING:
    from skynet.registry.files import FileRegistry, default_registry_root
    from skynet.registry.memory import MemoryRegistry, named_store

#: Names served lazily from the backend modules, so that importing
#: C{skynet.registry} imports no backend (and never kazoo).
_LAZY = {
    "FileRegistry": "skynet.registry.files",
    "default_registry_root": "skynet.registry.files",
    "MemoryRegistry": "skynet.registry.memory",
    "named_store": "skynet.registry.memory",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


#: The environment variable naming the registry URL used when none is given.
DEFAULT_REGISTRY_ENV = "SKYNET_REGISTRY"

_SCHEMES = "file:///absolute/path, memory://name or zk://host:port[,host:port]/chroot"

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def registry_from_url(
    url: str | None, reactor: Any = None, *, zk_session_timeout: float | None = None
) -> IRegistry:
    """
    Make the registry a URL names (not started).

    @param url: C{file:///abs/path} (options C{?poll_interval=0.5&inotify=0}),
        C{memory://name} (one store per name for the life of the process),
        C{zk://host:port,host:port/chroot}; L{None} or C{""} for
        C{$SKYNET_REGISTRY} if set, else the embedded registry at
        L{default_registry_root}.
    @param zk_session_timeout: the session timeout, in seconds, of a
        ZooKeeper registry (winning over the URL's C{session_timeout});
        ignored by registries without sessions.
    @raise RegistryError: if the URL is not one of those.
    """
    if not url:
        url = os.environ.get(DEFAULT_REGISTRY_ENV)
        if not url:
            from skynet.registry.files import FileRegistry, default_registry_root

            return FileRegistry(default_registry_root(), reactor=reactor)
    try:
        parts = urlsplit(url)
    except ValueError as e:
        raise RegistryError(f"bad registry URL {url!r} ({e}); use {_SCHEMES}") from None
    scheme = parts.scheme.lower()
    if scheme == "file":
        return _file_registry(url, parts, reactor)
    if scheme == "memory":
        if parts.path.strip("/") or parts.query or parts.fragment:
            raise RegistryError(f"bad registry URL {url!r}: use memory://name")
        from skynet.registry.memory import MemoryRegistry, named_store

        return MemoryRegistry(reactor=reactor, store=named_store(parts.netloc))
    if scheme == "zk":
        try:
            from skynet.registry.zookeeper import ZooKeeperRegistry
        except ImportError as e:
            raise RegistryError(f"cannot use {url!r}: ZooKeeper support: {e}") from e
        if zk_session_timeout is None:
            return ZooKeeperRegistry.from_url(url, reactor=reactor)
        return ZooKeeperRegistry.from_url(url, reactor=reactor, session_timeout=zk_session_timeout)
    raise RegistryError(f"unsupported registry URL {url!r}; use {_SCHEMES}")


def _file_registry(url: str, parts: Any, reactor: Any) -> FileRegistry:
    from skynet.registry.files import FileRegistry

    if parts.netloc not in ("", "localhost") or parts.fragment:
        raise RegistryError(f"bad registry URL {url!r}: use file:///absolute/path")
    path = unquote(parts.path)
    if not path.startswith("/") or path == "/":
        raise RegistryError(f"bad registry URL {url!r}: use file:///absolute/path")
    try:
        options = parse_qs(parts.query, strict_parsing=bool(parts.query))
    except ValueError as e:
        raise RegistryError(f"bad registry URL {url!r}: {e}") from None
    unknown = set(options) - {"poll_interval", "inotify"}
    if unknown:
        raise RegistryError(
            f"bad registry URL {url!r}: unknown option(s) {', '.join(sorted(unknown))}"
            " (known: poll_interval, inotify)"
        )
    kwargs: dict[str, Any] = {}
    if "poll_interval" in options:
        try:
            kwargs["poll_interval"] = float(options["poll_interval"][-1])
        except ValueError:
            raise RegistryError(f"bad registry URL {url!r}: poll_interval") from None
        if not kwargs["poll_interval"] > 0:
            raise RegistryError(f"bad registry URL {url!r}: poll_interval must be > 0")
    if "inotify" in options:
        value = options["inotify"][-1].lower()
        if value not in _TRUE + _FALSE:
            raise RegistryError(f"bad registry URL {url!r}: inotify must be 1 or 0")
        kwargs["use_inotify"] = value in _TRUE
    return FileRegistry(path, reactor=reactor, **kwargs)


__all__ = [
    "DEFAULT_REGISTRY_ENV",
    "Address",
    "FileRegistry",
    "IInstanceListener",
    "IRegistry",
    "IWatch",
    "Instance",
    "MemoryRegistry",
    "Query",
    "RegistryError",
    "default_registry_root",
    "named_store",
    "registry_from_url",
]
