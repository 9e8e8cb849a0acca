"""
The cluster's desired state: which services should run, how many instances
of each, and where.

A L{ClusterDeployment} is one service the cluster keeps running.  All of
them together are a L{DesiredState}, stored as one JSON document in the
registry data node L{DESIRED_KEY} (C{cluster/desired}) on every backend, so
that it outlives every process and one write changes it atomically::

    {"format": 1,
     "deployments": {
        "Fibonacci": {"run": "examples.fibonacci:Fibonacci", "instances": 3,
                      "args": [], "version": null, "region": null,
                      "spread": "host", "hosts": [], "ready_timeout": 30.0,
                      "generation": 0}}}

C{sky apply FILE} reads a TOML file (L{parse_apply_text}), one table per
service::

    [services.Fibonacci]
    run = "examples.fibonacci:Fibonacci"   # or a command line
    instances = 3
    args = ["--stats-interval", "1"]       # or one string, split as a shell would
    version = "2"                          # optional
    region = "eu"                          # optional: only hosts of that region
    spread = "host"                        # host (default) | region | none
    hosts = ["127.0.0.2", "127.0.0.3"]     # optional: only these hosts
    ready_timeout = 30                     # seconds a new instance has to register

and L{diff} says what applying it changes.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import tomllib
from collections.abc import Iterable, Mapping
from typing import Any

import attr

__all__ = [
    "DESIRED_KEY",
    "SPREADS",
    "Change",
    "ClusterDeployment",
    "DesiredState",
    "SpecError",
    "diff",
    "make_deployment",
    "parse_apply_file",
    "parse_apply_text",
]

#: The registry data node holding the L{DesiredState}.
DESIRED_KEY = "cluster/desired"

#: The version of the stored document's shape.
FORMAT = 1

#: How instances of one deployment are spread over the hosts.
SPREADS = ("host", "region", "none")

#: The default seconds a new instance has to register before it counts as
#: failed (and a rollout stops).
DEFAULT_READY_TIMEOUT = 30.0

#: The most instances one deployment may ask for (a typo guard).
MAX_INSTANCES = 10_000

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")
_CLASS_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
_HOST = re.compile(r"^[A-Za-z0-9_.:-]{1,255}$")
_LABEL = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")

#: The fields of a deployment, in the order messages list them.
FIELDS = ("run", "instances", "args", "version", "region", "spread", "hosts", "ready_timeout")


class SpecError(ValueError):
    """
    A deployment, an apply file or a stored document is malformed; the
    message names the table (or deployment) and the field.
    """


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise SpecError(
            f"deployment name must be a letter or _ followed by up to 63 letters, digits,"
            f" _ . or -, not {name!r}"
        )
    return name


def _check_run(run: Any) -> str:
    if not isinstance(run, str) or not run.strip():
        raise SpecError("run must be module:Class or a command line")
    run = run.strip()
    if not _CLASS_SPEC.match(run):
        try:
            words = shlex.split(run)
        except ValueError as e:
            raise SpecError(f"run is not a valid command line ({e}): {run!r}") from None
        if not words:
            raise SpecError("run must be module:Class or a command line")
    return run


def _check_instances(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"instances must be a whole number, not {value!r}")
    if not 0 <= value <= MAX_INSTANCES:
        raise SpecError(f"instances must be between 0 and {MAX_INSTANCES}, not {value}")
    return value


def _check_args(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        try:
            return tuple(shlex.split(value))
        except ValueError as e:
            raise SpecError(f"args is not a valid argument string ({e}): {value!r}") from None
    if isinstance(value, (list, tuple)) and all(isinstance(a, str) for a in value):
        return tuple(value)
    raise SpecError(f"args must be a list of strings or one string, not {value!r}")


def _check_label(what: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not _LABEL.match(value):
        raise SpecError(f"{what} must be up to 64 letters, digits, _ . or -, not {value!r}")
    return value


def _check_spread(value: Any) -> str:
    if value not in SPREADS:
        raise SpecError(f"spread must be one of {', '.join(SPREADS)}, not {value!r}")
    return str(value)


def _check_hosts(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise SpecError(f"hosts must be a list of host addresses, not {value!r}")
    for host in value:
        if not isinstance(host, str) or not _HOST.match(host):
            raise SpecError(f"hosts must be a list of host addresses; {host!r} is not one")
    if len(set(value)) != len(value):
        raise SpecError(f"hosts lists a host twice: {list(value)!r}")
    return tuple(sorted(value))


def _check_generation(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise SpecError(f"generation must be a whole number >= 0, not {value!r}")
    return value


def _check_timeout(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SpecError(f"ready_timeout must be a number of seconds, not {value!r}")
    if not 0 < value <= 24 * 3600:
        raise SpecError(f"ready_timeout must be above 0 and at most a day, not {value}")
    return float(value)


@attr.frozen
class ClusterDeployment:
    """
    One service the cluster keeps running.

    @ivar name: the deployment's name (the TOML table name).
    @ivar run: C{module:Class}, run as C{twistd skynet-service}, or a command
        line, as for the daemon's C{Deploy}.
    @ivar instances: how many instances should run.
    @ivar args: further arguments of each instance.
    @ivar version: passed as C{--version} to a C{module:Class} service; a
        change rolls the instances.
    @ivar region: only hosts of this region are eligible (and a
        C{module:Class} service gets C{--region}).
    @ivar spread: C{host}: no two instances on one host while another
        eligible host has fewer; C{region}: the same across regions first;
        C{none}: the least loaded hosts.
    @ivar hosts: only these host addresses are eligible (empty: any).
    @ivar ready_timeout: seconds a new instance has to register before it
        counts as failed.
    @ivar generation: bumped by C{sky rollout restart} to replace every
        instance rolling; not in apply files, kept across applies.
    """

    name: str = attr.field(validator=lambda _i, _a, v: _check_name(v))
    run: str = attr.field(converter=_check_run)
    instances: int = attr.field(default=1, validator=lambda _i, _a, v: _check_instances(v))
    args: tuple[str, ...] = attr.field(default=(), converter=_check_args)
    version: str | None = attr.field(
        default=None, validator=lambda _i, _a, v: _check_label("version", v)
    )
    region: str | None = attr.field(
        default=None, validator=lambda _i, _a, v: _check_label("region", v)
    )
    spread: str = attr.field(default="host", validator=lambda _i, _a, v: _check_spread(v))
    hosts: tuple[str, ...] = attr.field(default=(), converter=_check_hosts)
    ready_timeout: float = attr.field(default=DEFAULT_READY_TIMEOUT, converter=_check_timeout)
    generation: int = attr.field(default=0, validator=lambda _i, _a, v: _check_generation(v))

    @property
    def is_class(self) -> bool:
        """
        Whether C{run} is C{module:Class} (rather than a command line).
        """
        return bool(_CLASS_SPEC.match(self.run))

    def deploy_args(self) -> list[str]:
        """
        The C{args} of the daemon's C{Deploy} for one instance: C{args}, and
        for a C{module:Class} service its C{--version} and C{--region}.
        """
        extra = []
        if self.is_class:
            if self.version is not None:
                extra += ["--version", self.version]
            if self.region is not None:
                extra += ["--region", self.region]
        return extra + list(self.args)

    @property
    def fingerprint(self) -> str:
        """
        What an instance was started from: a change of C{run}, C{args},
        C{version} or C{region} changes it (and rolls the instances), as
        does a new C{generation}; a change of count or placement does not.
        """
        doc = json.dumps([self.run, list(self.args), self.version, self.region])
        if self.generation:
            doc += f"/{self.generation}"
        return hashlib.sha256(doc.encode("utf-8")).hexdigest()[:16]

    def to_json(self) -> dict[str, Any]:
        """
        The deployment as a JSON object (without its name, the key it is
        stored under).
        """
        return {
            "run": self.run,
            "instances": self.instances,
            "args": list(self.args),
            "version": self.version,
            "region": self.region,
            "spread": self.spread,
            "hosts": list(self.hosts),
            "ready_timeout": self.ready_timeout,
            "generation": self.generation,
        }

    @classmethod
    def from_json(cls, name: str, doc: Any) -> "ClusterDeployment":
        """
        @raise SpecError: naming the deployment and what is wrong.
        """
        return make_deployment(name, doc, where=f"deployment {name!r}", stored=True)

    def describe(self) -> str:
        """
        One line for people: C{3 x examples.fibonacci:Fibonacci (spread host)}.
        """
        words = [f"{self.instances} x {self.run}"]
        if self.args:
            words.append(shlex.join(self.args))
        extras = [f"spread {self.spread}"]
        if self.version is not None:
            extras.append(f"version {self.version}")
        if self.region is not None:
            extras.append(f"region {self.region}")
        if self.hosts:
            extras.append(f"hosts {','.join(self.hosts)}")
        return " ".join(words) + f" ({', '.join(extras)})"


def make_deployment(
    name: Any, table: Any, *, where: str | None = None, stored: bool = False
) -> ClusterDeployment:
    """
    Make a L{ClusterDeployment} from a mapping of its fields (a TOML table
    or a stored JSON object), checking every field.

    @param where: names the table in messages (default: the name).
    @raise SpecError: C{"<where>: <field>: <what is wrong>"}.
    """
    where = where or repr(name)
    try:
        _check_name(name)
    except SpecError as e:
        raise SpecError(f"{where}: {e}") from None
    if not isinstance(table, Mapping):
        raise SpecError(f"{where}: must be a table of fields, not {table!r}")
    known = FIELDS + (("generation",) if stored else ())
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise SpecError(
            f"{where}: unknown field{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}"
            f" (known: {', '.join(FIELDS)})"
        )
    if "run" not in table:
        raise SpecError(f"{where}: run is required (module:Class or a command line)")
    fields: dict[str, Any] = {}
    checks = {
        "run": _check_run,
        "instances": _check_instances,
        "args": _check_args,
        "version": lambda v: _check_label("version", v),
        "region": lambda v: _check_label("region", v),
        "spread": _check_spread,
        "hosts": _check_hosts,
        "ready_timeout": _check_timeout,
        "generation": _check_generation,
    }
    for field in known:
        if field not in table:
            continue
        try:
            fields[field] = checks[field](table[field])
        except SpecError as e:
            raise SpecError(f"{where}: {e}") from None
    return ClusterDeployment(name=name, **fields)


@attr.frozen
class DesiredState:
    """
    Every deployment of the cluster, as stored under L{DESIRED_KEY}.
    """

    deployments: tuple[ClusterDeployment, ...] = attr.field(
        default=(), converter=lambda ds: tuple(sorted(ds, key=lambda d: d.name))
    )

    def __attrs_post_init__(self) -> None:
        names = [d.name for d in self.deployments]
        if len(set(names)) != len(names):
            raise SpecError(f"deployment names must be unique: {names!r}")

    def get(self, name: str) -> ClusterDeployment | None:
        for deployment in self.deployments:
            if deployment.name == name:
                return deployment
        return None

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.deployments]

    def with_deployment(self, deployment: ClusterDeployment) -> "DesiredState":
        """
        This state with C{deployment} added or replaced.
        """
        others = [d for d in self.deployments if d.name != deployment.name]
        return DesiredState(others + [deployment])

    def without(self, name: str) -> "DesiredState":
        return DesiredState([d for d in self.deployments if d.name != name])

    def to_bytes(self) -> bytes:
        doc = {
            "format": FORMAT,
            "deployments": {d.name: d.to_json() for d in self.deployments},
        }
        return json.dumps(doc, sort_keys=True, indent=1).encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes | None) -> "DesiredState":
        """
        Read a stored document; L{None} (no node yet) is the empty state.

        @raise SpecError: if it is not a desired-state document.
        """
        if data is None:
            return cls()
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise SpecError(f"{DESIRED_KEY} is not JSON: {e}") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("deployments"), dict):
            raise SpecError(f"{DESIRED_KEY} is not a desired-state document")
        if doc.get("format") != FORMAT:
            raise SpecError(
                f"{DESIRED_KEY} has format {doc.get('format')!r}; this skynet reads {FORMAT}"
            )
        return cls(
            ClusterDeployment.from_json(name, table) for name, table in doc["deployments"].items()
        )


def parse_apply_text(text: str, source: str = "<apply file>") -> list[ClusterDeployment]:
    """
    Read the TOML of C{sky apply}: a C{[services.<Name>]} table per
    deployment.

    @param source: the file name, for messages.
    @raise SpecError: naming the file, the table and the field.
    """
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"{source}: not valid TOML: {e}") from None
    unknown = sorted(set(doc) - {"services"})
    if unknown:
        raise SpecError(
            f"{source}: unknown top-level key{'s' if len(unknown) > 1 else ''}"
            f" {', '.join(unknown)} (deployments go in [services.<Name>] tables)"
        )
    services = doc.get("services")
    if services is None:
        raise SpecError(f"{source}: no [services.<Name>] table")
    if not isinstance(services, dict):
        raise SpecError(f"{source}: services must be tables, [services.<Name>]")
    return [
        make_deployment(name, table, where=f"{source}: [services.{name}]")
        for name, table in services.items()
    ]


def parse_apply_file(path: str) -> list[ClusterDeployment]:
    """
    Read an apply file (see L{parse_apply_text}).

    @raise SpecError: if it cannot be read or is malformed.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise SpecError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SpecError(f"{path}: not UTF-8: {e}") from None
    return parse_apply_text(text, path)


@attr.frozen
class Change:
    """
    What applying a file does to one deployment.

    @ivar kind: C{add}, C{change}, C{remove} or C{same}.
    @ivar fields: for C{change}, C{(field, old, new)} for each field that
        changes.
    @ivar rolls: whether the change replaces the running instances (their
        L{ClusterDeployment.fingerprint} changes).
    """

    kind: str
    name: str
    old: ClusterDeployment | None = None
    new: ClusterDeployment | None = None
    fields: tuple[tuple[str, Any, Any], ...] = ()

    @property
    def rolls(self) -> bool:
        return (
            self.kind == "change"
            and self.old is not None
            and self.new is not None
            and self.old.fingerprint != self.new.fingerprint
        )

    def describe(self) -> str:
        """
        One line for people, as C{sky apply} prints it.
        """
        if self.kind == "add":
            assert self.new is not None
            return f"+ {self.name}: {self.new.describe()}"
        if self.kind == "remove":
            return f"- {self.name}: removed (its instances are stopped)"
        if self.kind == "same":
            return f"= {self.name}: unchanged"
        parts = [f"{field} {_show(old)} -> {_show(new)}" for field, old, new in self.fields]
        suffix = " (rolling replacement)" if self.rolls else ""
        return f"~ {self.name}: {', '.join(parts)}{suffix}"

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "fields": [
                {"field": f, "old": _jsonable(o), "new": _jsonable(n)} for f, o, n in self.fields
            ],  # fmt: skip
            "rolls": self.rolls,
        }


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return "[" + ", ".join(value) + "]"
    if value is None:
        return "(none)"
    return str(value)


def diff(
    stored: DesiredState, wanted: Iterable[ClusterDeployment], *, prune: bool = False
) -> list[Change]:
    """
    What storing C{wanted} over C{stored} changes, one L{Change} per
    deployment, sorted by name.

    @param prune: deployments of C{stored} missing from C{wanted} are
        removed (else they are left as they are and not listed).
    @raise SpecError: if C{wanted} names a deployment twice.
    """
    wanted = list(wanted)
    names = [d.name for d in wanted]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise SpecError(f"deployment named twice: {', '.join(duplicates)}")
    changes = []
    for new in wanted:
        old = stored.get(new.name)
        if old is None:
            changes.append(Change("add", new.name, None, new))
            continue
        # A file carries no generation: the stored one stays.
        new = attr.evolve(new, generation=old.generation)
        fields = tuple(
            (field, getattr(old, field), getattr(new, field))
            for field in FIELDS
            if getattr(old, field) != getattr(new, field)
        )
        changes.append(Change("change" if fields else "same", new.name, old, new, fields))
    if prune:
        for old in stored.deployments:
            if old.name not in names:
                changes.append(Change("remove", old.name, old, None))
    return sorted(changes, key=lambda c: c.name)


def apply_changes(stored: DesiredState, changes: Iterable[Change]) -> DesiredState:
    """
    The state C{changes} (from L{diff}) make of C{stored}.
    """
    state = stored
    for change in changes:
        if change.kind in ("add", "change") and change.new is not None:
            state = state.with_deployment(change.new)
        elif change.kind == "remove":
            state = state.without(change.name)
    return state
