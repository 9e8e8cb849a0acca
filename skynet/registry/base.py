"""
The registry's records and interfaces, shared by every backend.

A registry holds one node per service instance, laid out as the tree of the
Go Skynet protocol (see C{docs/architecture.md}):

    /services/<Name>/<Version>/<Region>/<Host>/<Port>     the instance (JSON)
    /statistics/<Name>/<Version>/<Region>/<Host>/<Port>   its statistics (JSON)
    /data/<key>                                           a data node (bytes)

Data nodes (L{IRegistry.get_value} and friends) are small persistent values
that outlive their writer, for cluster-wide settings and state of our own
(revocation lists, desired state).  Go Skynet reads only C{/services} and
C{/statistics}, so it never sees them.  A key is a C{/}-separated name; each
backend stores it as one node directly below C{/data}, named by
L{data_node_name} (the key with C{/} escaped as C{%2F}), so that C{a} and
C{a/b} are independent keys on every backend.

Every backend (L{skynet.registry.memory.MemoryRegistry}, the embedded
L{skynet.registry.files.FileRegistry} and ZooKeeper) implements L{IRegistry}
and delivers the same events to an L{IInstanceListener}.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any
from urllib.parse import quote, unquote

import attr
from twisted.logger import Logger
from zope.interface import Attribute, Interface, implementer

#: Go Skynet's defaults for the load balancer's critical thresholds.
DEFAULT_CRITICAL_CLIENT_COUNT = 100
DEFAULT_CRITICAL_AVERAGE_RESPONSE_TIME = 5.0  # seconds

#: Characters that cannot appear in one path component of the tree.
_FORBIDDEN_IN_COMPONENT = ("/", "\x00")

#: The subtree, beside C{/services} and C{/statistics}, of the data nodes.
DATA_DIR = "data"

#: The largest value a data node may hold, in bytes (ZooKeeper refuses
#: nodes near 1 MiB by default; a data node is meant to be small).
MAX_VALUE_SIZE = 512 * 1024

#: The longest data node name (a key once escaped), so that it fits a file
#: name on every file system.
MAX_KEY_LENGTH = 200


class RegistryError(Exception):
    """
    The registry could not do what was asked: it is unreachable, a node is
    malformed, or a URL is wrong.  The message says which.
    """


def check_component(what: str, value: str) -> str:
    """
    Check that C{value} can be one component of a registry path.

    @raise ValueError: if it is empty, C{.}, C{..} or holds a slash or NUL.
    """
    if not isinstance(value, str) or not value or value in (".", ".."):
        raise ValueError(f"{what} must be a non-empty name, not {value!r}")
    for bad in _FORBIDDEN_IN_COMPONENT:
        if bad in value:
            raise ValueError(f"{what} may not contain {bad!r}: {value!r}")
    return value


def check_key(key: str) -> str:
    """
    Check that C{key} names a data node: C{/}-separated components, each a
    valid path component (see L{check_component}), at most
    L{MAX_KEY_LENGTH} characters once escaped.

    @raise ValueError: if it does not.
    """
    if not isinstance(key, str) or not key:
        raise ValueError(f"a data key must be a non-empty string, not {key!r}")
    for part in key.split("/"):
        check_component("data key component", part)
    if len(data_node_name(key)) > MAX_KEY_LENGTH:
        raise ValueError(f"data key too long (at most {MAX_KEY_LENGTH} once escaped): {key!r}")
    return key


def check_value(value: bytes) -> bytes:
    """
    Check that C{value} can be stored in a data node.

    @raise TypeError: if it is not L{bytes}.
    @raise ValueError: if it is larger than L{MAX_VALUE_SIZE}.
    """
    if not isinstance(value, bytes):
        raise TypeError(f"a data value must be bytes, not {type(value).__name__}")
    if len(value) > MAX_VALUE_SIZE:
        raise ValueError(f"data value of {len(value)} bytes; at most {MAX_VALUE_SIZE}")
    return value


def data_node_name(key: str) -> str:
    """
    The name of the node (or file) below C{/data} that holds C{key}: the key
    percent-escaped so that it is one path component (C{a/b} is C{a%2Fb}),
    with a leading dot escaped too (dot files are temporary files).
    """
    name = quote(key, safe="")
    if name.startswith("."):
        name = "%2E" + name[1:]
    return name


def key_of_data_node(name: str) -> str | None:
    """
    The key a node below C{/data} holds, or L{None} if C{name} is not the
    name of a data node (L{data_node_name} is its inverse).
    """
    key = unquote(name, errors="strict") if "%" in name else name
    try:
        check_key(key)
    except (ValueError, UnicodeDecodeError):
        return None
    return key if data_node_name(key) == name else None


@attr.frozen
class Address:
    """
    A network address in the Go shape C{{"IPAddress", "Port", "MaxPort"}}.
    """

    ip_address: str
    port: int
    max_port: int = 0

    def to_go(self) -> dict[str, Any]:
        return {"IPAddress": self.ip_address, "Port": self.port, "MaxPort": self.max_port}

    @classmethod
    def from_go(cls, data: Any) -> "Address" | None:
        """
        Read an address from its Go shape, strictly: an object with a string
        C{IPAddress}, a C{Port} 1..65535 and an optional C{MaxPort}
        0..65535.  L{None}, an empty object and a port of 0 (Go's "not
        bound") are no address.

        @raise RegistryError: if C{data} is anything else.
        """
        if data is None:
            return None
        if not isinstance(data, dict):
            raise RegistryError(f"an address must be an object, not {_describe(data)}")
        if not data:
            return None
        port = _integer(data.get("Port", 0), "Port", 0, MAX_PORT)
        if port == 0:
            return None
        return cls(
            ip_address=_text(data.get("IPAddress"), "IPAddress"),
            port=port,
            max_port=_integer(data.get("MaxPort", 0) or 0, "MaxPort", 0, MAX_PORT),
        )

    def __str__(self) -> str:
        return f"{self.ip_address}:{self.port}"


@attr.frozen
class Instance:
    """
    One running service instance, as the registry stores it.

    @ivar uuid: unique id of the instance (stable across its registrations).
    @ivar host: the IP address clients connect to.
    @ivar admin: the admin endpoint's address, or L{None}.
    @ivar registered: whether it accepts new clients.
    @ivar critical_average_response_time: seconds (nanoseconds on the wire).
    @ivar pid: the process id of the instance (an extra key of ours).
    @ivar extra: further keys of ours, kept as they are.
    """

    uuid: str
    name: str
    version: str
    region: str
    host: str
    port: int
    admin: Address | None = None
    registered: bool = True
    critical_client_count: int = DEFAULT_CRITICAL_CLIENT_COUNT
    critical_average_response_time: float = DEFAULT_CRITICAL_AVERAGE_RESPONSE_TIME
    pid: int | None = None
    extra: dict[str, Any] = attr.field(factory=dict, eq=False, hash=False)

    @property
    def address(self) -> Address:
        return Address(self.host, self.port)

    @property
    def path(self) -> str:
        """
        The node's path below C{/services} (and C{/statistics}), starting
        with a slash: C{/<Name>/<Version>/<Region>/<Host>/<Port>}.
        """
        return instance_path(self.name, self.version, self.region, self.host, self.port)

    def to_go(self) -> dict[str, Any]:
        """
        The instance in the Go Skynet JSON shape, plus our own keys.
        """
        doc: dict[str, Any] = {
            "Config": {
                "UUID": self.uuid,
                "Name": self.name,
                "Version": self.version,
                "Region": self.region,
                "ServiceAddr": Address(self.host, self.port).to_go(),
                "AdminAddr": self.admin.to_go() if self.admin is not None else None,
                "CriticalClientCount": self.critical_client_count,
                "CriticalAverageResponseTime": round(self.critical_average_response_time * 1e9),
            },
            "Registered": self.registered,
        }
        if self.pid is not None:
            doc["PID"] = self.pid
        if self.extra:
            doc["Extra"] = self.extra
        return doc

    def to_json(self) -> bytes:
        return json.dumps(self.to_go(), sort_keys=False).encode("utf-8")

    def checked_json(self) -> bytes:
        """
        L{to_json}, for writing: a node that every reader will accept.

        @raise ValueError: if the node would be larger than L{MAX_NODE_SIZE}
            less 1 KiB for a backend's own keys (readers ignore larger
            nodes), or readers would refuse it.
        """
        data = self.to_json()
        if len(data) > MAX_NODE_SIZE - 1024:
            raise ValueError(
                f"instance node of {len(data)} bytes; at most {MAX_NODE_SIZE - 1024} are written"
            )
        try:
            Instance.from_json(data, self.path)
        except RegistryError as e:
            raise ValueError(f"readers would refuse this instance: {e}") from None
        return data

    @classmethod
    def from_go(cls, doc: Any) -> "Instance":
        """
        Read an instance from its Go-shaped JSON document, treating it as
        untrusted: every field must have its type (strings that can name a
        path component, ports 1..65535, finite numbers, booleans that are
        booleans, objects where objects belong).

        @raise RegistryError: naming the first field that is wrong; never
            anything else, whatever C{doc} is.
        """
        try:
            return cls._from_go(doc)
        except RegistryError:
            raise
        except Exception as e:  # noqa: BLE001 (untrusted input: any failure is a bad node)
            raise RegistryError(f"malformed instance node: {e!r}") from e

    @classmethod
    def _from_go(cls, doc: Any) -> "Instance":
        if not isinstance(doc, dict):
            raise RegistryError(f"an instance node must be an object, not {_describe(doc)}")
        config = doc.get("Config")
        if not isinstance(config, dict):
            raise RegistryError(f"Config must be an object, not {_describe(config)}")
        addr = config.get("ServiceAddr")
        if not isinstance(addr, dict):
            raise RegistryError(f"ServiceAddr must be an object, not {_describe(addr)}")
        registered = doc.get("Registered", False)
        if not isinstance(registered, bool):
            raise RegistryError(f"Registered must be true or false, not {_describe(registered)}")
        pid = doc.get("PID")
        extra = doc.get("Extra")
        if extra is not None and not isinstance(extra, dict):
            raise RegistryError(f"Extra must be an object, not {_describe(extra)}")
        response_time = _number(
            config.get(
                "CriticalAverageResponseTime",
                int(DEFAULT_CRITICAL_AVERAGE_RESPONSE_TIME * 1e9),
            ),
            "CriticalAverageResponseTime",
            0,
            2**53,  # nanoseconds: 104 days, and exact in a float
        )
        return cls(
            uuid=_text(config.get("UUID"), "UUID"),
            name=_component(config.get("Name"), "Name"),
            version=_component(config.get("Version"), "Version"),
            region=_component(config.get("Region"), "Region"),
            host=_component(addr.get("IPAddress"), "ServiceAddr.IPAddress"),
            port=_integer(addr.get("Port"), "ServiceAddr.Port", 1, MAX_PORT),
            admin=Address.from_go(config.get("AdminAddr")),
            registered=registered,
            critical_client_count=_integer(
                config.get("CriticalClientCount", DEFAULT_CRITICAL_CLIENT_COUNT),
                "CriticalClientCount",
                -(2**63),
                2**63 - 1,
            ),
            critical_average_response_time=round(response_time) / 1e9,
            pid=None if pid is None else _integer(pid, "PID", 1, 2**63 - 1),
            extra=dict(extra or {}),
        )

    @classmethod
    def from_json(cls, data: bytes, path: str | None = None) -> "Instance":
        """
        Read an instance node's bytes, treating them as untrusted.

        @param path: the node's path below C{/services}, if known: the
            document must describe the instance at that path.
        @raise RegistryError: if the node is larger than L{MAX_NODE_SIZE},
            is not a JSON object (nested too deep included) or
            L{from_go} refuses it; never anything else.
        """
        fast = parse_written_node(data, path)
        if fast is not None:
            return fast[0]
        instance = cls.from_go(parse_json_node(data))
        if path is not None and instance.path != path:
            raise RegistryError(f"the node describes {instance.path}")
        return instance


#: The largest instance or statistics node a reader accepts, in bytes (a
#: real one is well under 1 KiB).
MAX_NODE_SIZE = 64 * 1024

#: The largest port number.
MAX_PORT = 65535


def parse_json_node(data: bytes) -> dict[str, Any]:
    """
    Parse an untrusted registry node holding a JSON object.

    @raise RegistryError: if it is larger than L{MAX_NODE_SIZE}, not UTF-8,
        not JSON, nested too deep to parse, or not an object; never
        anything else.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise RegistryError(f"a node must be bytes, not {_describe(data)}")
    if len(data) > MAX_NODE_SIZE:
        raise RegistryError(f"node of {len(data)} bytes; at most {MAX_NODE_SIZE} are read")
    try:
        doc = json.loads(bytes(data))
    except RecursionError:
        raise RegistryError("JSON nested too deep") from None
    except ValueError as e:  # also UnicodeDecodeError, and too many digits
        raise RegistryError(f"not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise RegistryError(f"not a JSON object but {_describe(doc)}")
    return doc


# The fast path: a node of exactly the shape skynet writes.

#: Printable ASCII but C{"} and C{\\}: a JSON string's characters that need
#: no escape, so the text between the quotes is the string itself.
_TEXT = r"[ !#-\[\]-~]"
#: The same without C{/}: a path component (C{.} and C{..} are checked after).
_PART = r"[ !#-.0-\[\]-~]"
#: A JSON integer that fits in 64 bits (more digits: the careful parser).
_INT = r"-?(?:0|[1-9][0-9]{0,18})"
_WRITTEN_NODE = re.compile(
    rf'\{{"Config": \{{"UUID": "({_TEXT}+)", "Name": "({_PART}+)", "Version": "({_PART}+)",'
    rf' "Region": "({_PART}+)", "ServiceAddr": \{{"IPAddress": "({_PART}+)", "Port": ({_INT}),'
    rf' "MaxPort": {_INT}\}}, "AdminAddr": (?:null|\{{"IPAddress": "({_TEXT}+)", "Port": ({_INT}),'
    rf' "MaxPort": ({_INT})\}}), "CriticalClientCount": ({_INT}),'
    rf' "CriticalAverageResponseTime": ({_INT})\}}, "Registered": (true|false)'
    rf'(?:, "PID": ({_INT}))?'
    r'(?:, "Extra": \{((?:"\w+": (?:true|false), )*"\w+": (?:true|false))\})?'
    rf'(?:, "Owner": \{{"pid": ({_INT}), "start_time": ({_INT}),'
    rf' "registry": (?:null|"({_TEXT}*)")\}})?\}}',
    re.ASCII,
)
_EXTRA_MEMBER = re.compile(r'"(\w+)": (true|false)', re.ASCII)
_DOTS = (".", "..")
_intern = sys.intern


def parse_written_node(
    data: Any, path: str | None = None
) -> tuple[Instance, tuple[int, int, str | None] | None] | None:
    """
    The fast path of L{Instance.from_json}, for a node of exactly the shape
    skynet writes (L{Instance.to_json}, with C{json.dumps}' separators and
    ASCII escapes, and the embedded registry's C{"Owner"} record at the
    end): one regular expression match instead of a parse and a walk of
    the document.

    It answers only when the careful parser would accept the node and build
    the same instance; anything else (another shape, another spacing, an
    escape in a string, a value out of range, an C{Extra} other than
    booleans, a node not at C{path}) is L{None}, for the careful parser to
    decide.  C{tests/test_registry_untrusted.py} checks this against the
    careful parser on fuzzed nodes.

    @param path: the node's path below C{/services}, if known: the node
        must describe the instance at that path.
    @return: the instance and the owner record's C{(pid, start_time,
        registry)} (L{None} without one), or L{None}.
    """
    if type(data) is not bytes or len(data) > MAX_NODE_SIZE:
        return None
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        return None
    match = _WRITTEN_NODE.fullmatch(text)
    if match is None:
        return None
    (uuid, name, version, region, host, port_text, admin_ip, admin_port, admin_max,
     count, response, registered, pid, extra, owner_pid, owner_start, owner_registry,
     ) = match.groups()  # fmt: skip
    if name in _DOTS or version in _DOTS or region in _DOTS or host in _DOTS:
        return None
    port = int(port_text)
    if not 0 < port <= MAX_PORT:
        return None
    if path is not None and path != f"/{name}/{version}/{region}/{host}/{port}":
        return None
    admin = None
    if admin_port is not None:
        admin_number = int(admin_port)
        if admin_number:
            admin_top = int(admin_max)
            if not 0 < admin_number <= MAX_PORT or not 0 <= admin_top <= MAX_PORT:
                return None
            admin = Address(admin_ip, admin_number, admin_top)
    critical_count = int(count)
    nanoseconds = int(response)
    if not -(2**63) <= critical_count < 2**63 or not 0 <= nanoseconds <= 2**53:
        return None
    pid_number = None if pid is None else int(pid)
    if pid_number is not None and not 0 < pid_number < 2**63:
        return None
    instance = Instance(
        uuid=uuid,
        name=_intern(name),
        version=_intern(version),
        region=_intern(region),
        host=_intern(host),
        port=port,
        admin=admin,
        registered=registered == "true",
        critical_client_count=critical_count,
        critical_average_response_time=nanoseconds / 1e9,
        pid=pid_number,
        extra={} if extra is None else {k: v == "true" for k, v in _EXTRA_MEMBER.findall(extra)},
    )
    if owner_pid is None:
        return instance, None
    return instance, (int(owner_pid), int(owner_start), owner_registry)


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise RegistryError(f"{what} must be a non-empty string, not {_describe(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise RegistryError(f"{what} is not valid Unicode: {value!r}") from None
    return value


def _component(value: Any, what: str) -> str:
    _text(value, what)
    try:
        check_component(what, value)
    except ValueError as e:
        raise RegistryError(str(e)) from None
    # Names, versions, regions and hosts repeat across thousands of
    # instances: one copy each (a watch of 10,000 instances saves ~2 MB).
    return sys.intern(value)


def _integer(value: Any, what: str, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise RegistryError(f"{what} must be an integer, not {_describe(value)}")
    if not low <= value <= high:
        raise RegistryError(f"{what} must be in {low}..{high}, not {value}")
    return value


def _number(value: Any, what: str, low: float, high: float) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise RegistryError(f"{what} must be a number, not {_describe(value)}")
    if not math.isfinite(value) or not low <= value <= high:
        raise RegistryError(f"{what} must be a finite number in {low}..{high}, not {value}")
    return value


class NodeWarnings:
    """
    Logs a bad registry node once, not at every read: one warning per node
    path per C{interval} seconds, naming the node and what is wrong.
    """

    def __init__(self, log: Logger, clock: Any, interval: float = 60.0) -> None:
        self._log = log
        self._clock = clock
        self._interval = interval
        self._last: dict[str, float] = {}

    def warn(self, path: str, error: object) -> None:
        now = self._clock.seconds()
        last = self._last.get(path)
        if last is not None and now - last < self._interval:
            return
        if len(self._last) > 10_000:
            self._last = {p: t for p, t in self._last.items() if now - t < self._interval}
        self._last[path] = now
        self._log.warn(  # noqa: G010 (twisted.logger's name)
            "Ignoring registry node {path}: {error}", path=path, error=str(error)
        )


def instance_path(name: str, version: str, region: str, host: str, port: int) -> str:
    """
    The path of an instance below C{/services}, checking each component.
    """
    parts = [
        check_component("service name", name),
        check_component("version", version),
        check_component("region", region),
        check_component("host", host),
        check_component("port", str(int(port))),
    ]
    return "/" + "/".join(parts)


@attr.frozen
class Query:
    """
    Which instances to find.  L{None} matches anything; other values match
    exactly.
    """

    service: str | None = None
    version: str | None = None
    region: str | None = None
    host: str | None = None
    port: int | None = None
    uuid: str | None = None
    registered: bool | None = None

    def matches(self, instance: Instance) -> bool:
        return (
            (self.service is None or self.service == instance.name)
            and (self.version is None or self.version == instance.version)
            and (self.region is None or self.region == instance.region)
            and (self.host is None or self.host == instance.host)
            and (self.port is None or self.port == instance.port)
            and (self.uuid is None or self.uuid == instance.uuid)
            and (self.registered is None or self.registered == instance.registered)
        )

    def filter(self, instances: Iterable[Instance]) -> list[Instance]:
        return [i for i in instances if self.matches(i)]

    def describe(self) -> str:
        """
        The service and what narrows it, for messages: C{Fibonacci (version=1,
        region=eu)}.
        """
        parts = [f"{k}={v}" for k, v in (("version", self.version), ("region", self.region),
                                            ("host", self.host)) if v is not None]  # fmt: skip
        return (self.service or "any service") + (f" ({', '.join(parts)})" if parts else "")


class IInstanceListener(Interface):
    """
    Receives a watch's view of the instances matching its query.  All calls
    arrive in the reactor thread, in order per instance.  Changes may be
    coalesced: a listener sees the latest state, not every intermediate one.
    """

    def snapshot(instances: list[Instance]) -> None:
        """
        The instances matching the query when the watch started.  Called once,
        before any other method.
        """

    def added(instance: Instance) -> None:
        """
        An instance now matches (it is new, or it changed to match).
        """

    def updated(instance: Instance) -> None:
        """
        An instance that matched and still matches changed.
        """

    def removed(instance: Instance) -> None:
        """
        An instance no longer matches: it is gone, died, or changed so that it
        does not match (for example it unregistered under a C{registered=True}
        query).  C{instance} is its last known state.
        """


class IWatch(Interface):
    """
    A running watch.
    """

    def stop() -> None:
        """
        Stop delivering events.  Idempotent.
        """


class IRegistry(Interface):
    """
    Where service instances are registered and found.

    Nodes written through one registry object are owned by it, as a ZooKeeper
    session owns its ephemeral nodes: they vanish when its process dies, and
    L{stop} removes them.
    """

    url = Attribute("The registry URL, for messages and for child processes.")

    def start():
        """
        Connect.  @return: a Deferred firing when the registry is usable.
        """

    def stop():
        """
        Remove the nodes this object owns and disconnect; stop all watches.
        @return: a Deferred firing when done.
        """

    def add(instance: Instance):
        """
        Create (or overwrite) the node of C{instance}, owned by this registry.
        @return: a Deferred firing with L{None}.
        """

    def update(instance: Instance):
        """
        Rewrite the node of C{instance} (for example its C{registered} flag).
        @return: a Deferred firing with L{None}.
        """

    def remove(instance: Instance):
        """
        Delete the instance's node and its statistics; prune empty parents.
        Removing an absent instance is not an error.
        @return: a Deferred firing with L{None}.
        """

    def publish_stats(instance: Instance, stats: dict[str, Any]):
        """
        Write the statistics node of C{instance} (a JSON object).
        @return: a Deferred firing with L{None}.
        """

    def get_stats(instance: Instance):
        """
        @return: a Deferred firing with the statistics of C{instance} as a
            dict, or L{None} if it has none.
        """

    def query(query: Query):
        """
        @return: a Deferred firing with a list of the live L{Instance}s
            matching C{query}, sorted by path.
        """

    def get(uuid: str):
        """
        Find one live instance by its uuid, from what the backend already
        knows where it can (no walk of the whole tree for a known uuid).

        @return: a Deferred firing with the L{Instance}, or L{None} if no
            live instance has that uuid.
        """

    def watch(query: Query, listener: IInstanceListener) -> IWatch:
        """
        Deliver the instances matching C{query} to C{listener}: first a
        snapshot, then added/updated/removed events.
        """

    def get_value(key: str):
        """
        Read a data node.

        @param key: a C{/}-separated name (see L{check_key}).
        @return: a Deferred firing with its value (L{bytes}), or L{None} if
            there is no such node; failing with L{ValueError} for a bad key
            and L{RegistryError} if the registry cannot be read.
        """

    def set_value(key: str, value: bytes):
        """
        Create or replace a data node, atomically: a reader sees the old
        value or the new one, never a mix.  Data nodes are persistent: they
        belong to nobody and stay when their writer stops or dies.

        @param value: at most L{MAX_VALUE_SIZE} bytes.
        @return: a Deferred firing with L{None} once stored; failing with
            L{ValueError}/L{TypeError} for a bad key or value, and
            L{RegistryError} if the registry cannot be written.
        """

    def delete_value(key: str):
        """
        Delete a data node; deleting an absent one is not an error.
        @return: a Deferred firing with L{None}.
        """

    def watch_value(key: str, callback: Callable[[bytes | None], None]) -> IWatch:
        """
        Call C{callback} with the value of a data node (L{None} while there
        is none) as soon as it is known, then again whenever it changes.

        Calls arrive in the reactor thread, never from inside
        C{watch_value} or the write that caused them.  They are coalesced:
        C{callback} sees the latest value, not necessarily every
        intermediate one, and never the same value twice in a row.  A
        callback that raises is logged and keeps being called.

        @raise ValueError: if C{key} is malformed.
        """


@implementer(IWatch)
class ValueDelivery:
    """
    The part of a value watch every backend shares: it calls the callback
    with each new value (not twice the same in a row), survives the
    callback's exceptions, and stops.

    @ivar stopped: set by L{stop}; a backend checks it before reading.
    """

    log = Logger()
    _unknown = object()

    def __init__(
        self,
        key: str,
        callback: Callable[[bytes | None], None],
        on_stop: Callable[[], None] | None = None,
    ) -> None:
        self.key = check_key(key)
        self.callback = callback
        self.stopped = False
        self._last: Any = self._unknown
        self._on_stop = on_stop

    def deliver(self, value: bytes | None) -> None:
        """
        The node holds C{value} now.
        """
        if self.stopped or value == self._last:
            return
        self._last = value
        try:
            self.callback(value)
        except Exception:  # noqa: BLE001 (the callback's bug must not stop the watch)
            self.log.failure(
                "Callback {callback!r} of the watch of data node {key} failed",
                callback=self.callback,
                key=self.key,
            )

    def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            if self._on_stop is not None:
                self._on_stop()


class ListingMixin:
    """
    The listing calls every registry offers, built on C{query}.
    """

    query: Callable[..., Any]

    def instances(self, query: Query | None = None):
        return self.query(query or Query())

    def _distinct(self, field: str, query: Query | None):
        d = self.query(query or Query())
        d.addCallback(lambda found: sorted({getattr(i, field) for i in found}))
        return d

    def services(self, query: Query | None = None):
        """@return: Deferred firing with the sorted distinct service names."""
        return self._distinct("name", query)

    def versions(self, query: Query | None = None):
        """@return: Deferred firing with the sorted distinct versions."""
        return self._distinct("version", query)

    def regions(self, query: Query | None = None):
        """@return: Deferred firing with the sorted distinct regions."""
        return self._distinct("region", query)

    def hosts(self, query: Query | None = None):
        """@return: Deferred firing with the sorted distinct hosts."""
        return self._distinct("host", query)


class InstanceDiff:
    """
    Turns successive full views of a registry into listener events.

    Backends that learn about changes by re-reading (the file registry) or by
    per-node notifications (ZooKeeper) feed their current view here; it
    delivers a snapshot first and then only the differences, keyed by uuid.

    A listener that raises is logged, and its view still moves on: one
    listener's bug never stops a watch or the listeners of other watches.
    """

    log = Logger()

    def __init__(self, query: Query, listener: IInstanceListener) -> None:
        self.query = query
        self.listener = listener
        self.known: dict[str, Instance] | None = None
        self.stopped = False

    def _tell(self, method: Callable[[Any], None], argument: Any) -> None:
        try:
            method(argument)
        except Exception:  # noqa: BLE001 (one listener's bug must not stop the rest)
            self.log.failure("Registry listener {listener!r} failed", listener=self.listener)

    def feed(self, instances: Iterable[Instance]) -> None:
        """
        The full current set of live instances (unfiltered is fine).
        """
        if self.stopped:
            return
        current = {i.uuid: i for i in instances if self.query.matches(i)}
        if self.known is None:
            self.known = current
            self._tell(self.listener.snapshot, sorted(current.values(), key=_sort_key))
            return
        previous = self.known
        self.known = current
        for uuid, old in previous.items():
            if uuid not in current:
                self._tell(self.listener.removed, old)
        for uuid, new in current.items():
            known = previous.get(uuid)
            if known is None:
                self._tell(self.listener.added, new)
            elif _differs(known, new):
                self._tell(self.listener.updated, new)

    def change(self, old: Instance | None, new: Instance | None) -> None:
        """
        One node changed from C{old} to C{new} (either may be L{None}; a node
        now holding another uuid is one instance leaving and another
        arriving).  Only valid after the first L{feed}.
        """
        if self.stopped or self.known is None:
            return
        if old is not None and new is not None and old.uuid != new.uuid:
            # Another instance took over the node (a new process on the same
            # host and port): the old one left, the new one arrived.
            self.change(old, None)
            self.change(None, new)
            return
        if old is None and new is None:
            return
        uuid = (new or old).uuid  # type: ignore[union-attr]
        was = self.known.get(uuid)
        if new is not None and self.query.matches(new):
            self.known[uuid] = new
            if was is None:
                self._tell(self.listener.added, new)
            elif _differs(was, new):
                self._tell(self.listener.updated, new)
        elif was is not None:
            del self.known[uuid]
            self._tell(self.listener.removed, was)


def _differs(a: Instance, b: Instance) -> bool:
    return a != b or a.extra != b.extra


def _sort_key(instance: Instance) -> tuple[str, str, str, str, int, str]:
    return (
        instance.name,
        instance.version,
        instance.region,
        instance.host,
        instance.port,
        instance.uuid,
    )


def sort_instances(instances: Iterable[Instance]) -> list[Instance]:
    """
    Sort instances by their registry path (then uuid).
    """
    return sorted(instances, key=_sort_key)


_GO_FORMATS = ("%Y-%m-%dT%H:%M:%SZ%z", "%Y-%m-%dT%H:%M:%S%z", "%Y-%m-%dT%H:%M:%S.%f%z")


def parse_go_time(value: Any) -> float | None:
    """
    A Go Skynet time (C{2006-01-02T15:04:05Z-0700}) as POSIX seconds, or
    L{None} if it is empty or unreadable.
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, str) or not value:
        return None
    for layout in _GO_FORMATS:
        try:
            return datetime.strptime(value, layout).timestamp()
        except ValueError:
            continue
    return None
