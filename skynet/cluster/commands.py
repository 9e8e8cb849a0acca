"""
The cluster's commands, for C{sky} to hook in (and C{python -m
skynet.cluster} meanwhile):

    apply FILE [--prune] [--dry-run] [--json] [--ready-timeout S]
                                                store the file's deployments
    scale NAME=N [NAME=N ...]                   change instance counts
    undeploy NAME [NAME ...]                    remove deployments (their
                                                instances are stopped)
    deployments [--json]                        desired vs actual, per host
    rollout status NAME [--timeout S] [--no-follow]
                                                follow a rolling replacement
    rollout restart NAME                        replace every instance, rolling

Each writes only the desired state (L{skynet.cluster.spec.DESIRED_KEY}); the
elected reconciler does the rest.  L{run_command} is the entry point for
code (tests, C{sky}): it takes a started registry and two text streams.
L{main} is the one for a process: it opens the registry named by
C{--registry} (default C{$SKYNET_REGISTRY}, else the embedded one).

Exit codes: 0 done (for C{rollout status}: the rollout finished), 1 it
failed (bad file, unknown name, registry error; a stopped rollout), 2 usage
error, 3 C{rollout status} timed out.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import IO, Any

import attr
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

from skynet.cluster.leader import LEADER_LOCK
from skynet.cluster.reconciler import (
    DAEMON_SERVICE,
    STATE_KEY,
    DeploymentStatus,
    StoredState,
    deployment_status,
)
from skynet.cluster.spec import (
    DESIRED_KEY,
    Change,
    DesiredState,
    SpecError,
    apply_changes,
    diff,
    parse_apply_file,
)
from skynet.config import default_reactor
from skynet.registry.base import Query, RegistryError

__all__ = ["main", "run_command", "read_statuses"]


class CommandError(Exception):
    """
    The command cannot be done; the message says why (exit code 1).
    """


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # type: ignore[override]
        raise _UsageError(f"{self.prog}: {message}")


class _UsageError(Exception):
    pass


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sky", add_help=False)
    parser.add_argument("--registry", default=None)
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    apply = sub.add_parser("apply", add_help=False)
    apply.add_argument("file")
    apply.add_argument("--prune", action="store_true")
    apply.add_argument("--dry-run", action="store_true")
    apply.add_argument("--json", action="store_true")
    apply.add_argument("--ready-timeout", type=float, default=None)
    scale = sub.add_parser("scale", add_help=False)
    scale.add_argument("counts", nargs="+", metavar="NAME=N")
    scale.add_argument("--json", action="store_true")
    undeploy = sub.add_parser("undeploy", add_help=False)
    undeploy.add_argument("names", nargs="+", metavar="NAME")
    undeploy.add_argument("--json", action="store_true")
    deployments = sub.add_parser("deployments", add_help=False)
    deployments.add_argument("--json", action="store_true")
    rollout = sub.add_parser("rollout", add_help=False)
    rollout.add_argument("action", choices=["status", "restart"])
    rollout.add_argument("name")
    rollout.add_argument("--timeout", type=float, default=300.0)
    rollout.add_argument("--no-follow", action="store_true")
    rollout.add_argument("--interval", type=float, default=0.5, help=argparse.SUPPRESS)
    for command in (apply, scale, undeploy, deployments, rollout):
        # --registry before or after the command, as sky takes it.
        command.add_argument("--registry", default=argparse.SUPPRESS)
    return parser


USAGE = "usage: sky [--registry URL] COMMAND ...\n" + (__doc__.split("\n\n")[1] if __doc__ else "")


async def run_command(
    argv: list[str], registry: Any, out: IO[str], err: IO[str], *, reactor: Any = None
) -> int:
    """
    Run one command on a started registry.

    @return: the exit code.
    """
    reactor = default_reactor(reactor)
    try:
        args = _parser().parse_args(argv)
    except _UsageError as e:
        err.write(f"{e}\n{USAGE}\n")
        return 2
    if args.command is None:
        err.write(f"sky: a command is needed\n{USAGE}\n")
        return 2
    try:
        if args.command == "apply":
            return await _apply(args, registry, out)
        if args.command == "scale":
            return await _scale(args, registry, out)
        if args.command == "undeploy":
            return await _undeploy(args, registry, out)
        if args.command == "deployments":
            return await _deployments(args, registry, out, reactor)
        if args.action == "restart":
            return await _rollout_restart(args, registry, out)
        return await _rollout_status(args, registry, out, reactor)
    except (CommandError, SpecError, RegistryError) as e:
        err.write(f"sky {args.command}: {e}\n")
        return 1
    except _UsageError as e:
        err.write(f"{e}\n")
        return 2


async def _desired(registry: Any) -> DesiredState:
    return DesiredState.from_bytes(await registry.get_value(DESIRED_KEY))


async def _store(registry: Any, state: DesiredState) -> None:
    await registry.set_value(DESIRED_KEY, state.to_bytes())


def _print_changes(changes: list[Change], out: IO[str], as_json: bool, dry_run: bool) -> None:
    real = [c for c in changes if c.kind != "same"]
    if as_json:
        out.write(json.dumps({"changes": [c.to_json() for c in real], "applied": not dry_run}))
        out.write("\n")
        return
    for change in changes:
        out.write(change.describe() + "\n")
    if not real:
        out.write("No changes.\n")
    elif dry_run:
        out.write(f"{len(real)} change(s) not applied (--dry-run).\n")
    else:
        out.write(f"Applied {len(real)} change(s).\n")


async def _apply(args: Any, registry: Any, out: IO[str]) -> int:
    wanted = parse_apply_file(args.file)
    if args.ready_timeout is not None:
        # The command line wins over the file: every deployment's new
        # instances have this long to become ready.
        wanted = [attr.evolve(d, ready_timeout=args.ready_timeout) for d in wanted]
    stored = await _desired(registry)
    changes = diff(stored, wanted, prune=args.prune)
    if any(c.kind != "same" for c in changes) and not args.dry_run:
        await _store(registry, apply_changes(stored, changes))
    _print_changes(changes, out, args.json, args.dry_run)
    return 0


async def _scale(args: Any, registry: Any, out: IO[str]) -> int:
    counts: dict[str, int] = {}
    for word in args.counts:
        name, sep, number = word.partition("=")
        if not sep or not name:
            raise _UsageError(f"sky scale: {word!r} is not NAME=N")
        try:
            value = int(number)
        except ValueError:
            raise _UsageError(f"sky scale: {word!r}: N must be a whole number") from None
        counts[name] = value
    stored = await _desired(registry)
    wanted = []
    for name, value in counts.items():
        deployment = stored.get(name)
        if deployment is None:
            raise CommandError(f"no deployment named {name!r} (`sky deployments` lists them)")
        try:
            wanted.append(attr.evolve(deployment, instances=value))
        except SpecError as e:
            raise SpecError(f"{name}: {e}") from None
    changes = diff(stored, wanted)
    if any(c.kind != "same" for c in changes):
        await _store(registry, apply_changes(stored, changes))
    _print_changes(changes, out, args.json, False)
    return 0


async def _undeploy(args: Any, registry: Any, out: IO[str]) -> int:
    stored = await _desired(registry)
    missing = [n for n in args.names if stored.get(n) is None]
    if missing:
        raise CommandError(
            f"no deployment named {', '.join(map(repr, missing))} (`sky deployments` lists them)"
        )
    changes = [Change("remove", name, stored.get(name), None) for name in args.names]
    await _store(registry, apply_changes(stored, changes))
    _print_changes(changes, out, args.json, False)
    return 0


async def read_statuses(registry: Any) -> tuple[list[DeploymentStatus], StoredState, Any]:
    """
    Every deployment's status from the registry: the desired state, the
    leader's stored state and the live instances.

    @return: the statuses, the stored state and the leader (or L{None}).
    """
    desired = await _desired(registry)
    try:
        stored = StoredState.from_bytes(await registry.get_value(STATE_KEY))
    except SpecError:
        stored = StoredState()
    instances = await registry.query(Query())
    registered = {i.uuid for i in instances if i.registered}
    live_hosts = {i.host for i in instances if i.name == DAEMON_SERVICE}
    statuses = []
    for deployment in desired.deployments:
        record = stored.deployments.get(deployment.name)
        if record is None:
            statuses.append(
                DeploymentStatus(
                    name=deployment.name,
                    desired=deployment.instances,
                    state="progressing" if deployment.instances else "ok",
                    reason="not placed yet: waiting for the leader",
                )
            )
            continue
        status = deployment_status(deployment, record, registered, live_hosts, {})
        if status.state == "degraded" and record.status == "degraded" and record.reason:
            status = attr.evolve(status, reason=record.reason)
        statuses.append(status)
    leader = await _leader(registry)
    return statuses, stored, leader


async def _leader(registry: Any) -> Any:
    from skynet.registry.locks import registry_lock

    try:
        lock = registry_lock(registry, LEADER_LOCK)
    except TypeError:
        return None
    try:
        return await lock.holder()
    except Exception:
        return None
    finally:
        await lock.release()


def _hosts_text(status: DeploymentStatus) -> str:
    parts = []
    for host, counts in sorted(status.hosts.items()):
        text = f"{host}={counts['registered']}"
        if counts["starting"]:
            text += f"(+{counts['starting']} starting)"
        if counts["running"] > counts["registered"]:
            text += f"({counts['running'] - counts['registered']} unregistered)"
        parts.append(text)
    return " ".join(parts) or "-"


#: Seconds a daemon has to answer C{ListSubServices} for C{deployments}.
CHILDREN_TIMEOUT = 2.0


async def daemon_children(
    registry: Any, stored: StoredState, names: list[str], reactor: Any
) -> dict[str, list[dict[str, Any]]]:
    """
    What the daemons say of the recorded instances of the deployments
    C{names} that are not registered: per deployment, C{{uuid, host,
    state, last_error}} from its daemon's C{ListSubServices} (the state
    C{"unknown"} if the daemon does not answer within L{CHILDREN_TIMEOUT},
    C{"gone"} if it no longer has the child).
    """
    from twisted.internet.defer import DeferredList

    from skynet.admin import call_instance
    from skynet.control import sub_services_from_bson

    instances = await registry.query(Query())
    registered = {i.uuid for i in instances if i.registered}
    daemons = {i.host: i for i in instances if i.name == DAEMON_SERVICE and i.registered}
    wanted: dict[str, list[tuple[str, str]]] = {}
    for name in names:
        record = stored.deployments.get(name)
        for uuid, r in sorted((record.instances if record else {}).items()):
            if uuid not in registered:
                wanted.setdefault(name, []).append((uuid, r.host))
    hosts = sorted({host for pairs in wanted.values() for _, host in pairs if host in daemons})

    async def listing(host: str) -> Any:
        try:
            answer = await call_instance(reactor, daemons[host], "ListSubServices", {},
                                         CHILDREN_TIMEOUT)  # fmt: skip
            return sub_services_from_bson(answer)
        except Exception:
            return None

    answers = await DeferredList(
        [Deferred.fromCoroutine(listing(h)) for h in hosts], consumeErrors=True
    )
    listings = {h: (a[1] if a[0] else None) for h, a in zip(hosts, answers, strict=True)}
    found: dict[str, list[dict[str, Any]]] = {}
    for name, pairs in wanted.items():
        for uuid, host in pairs:
            children = listings.get(host)
            child = children.get(uuid) if children else None
            state = child.state if child else ("gone" if children is not None else "unknown")
            found.setdefault(name, []).append({
                "uuid": uuid, "host": host, "state": state,
                "last_error": child.last_error if child else None})  # fmt: skip
    return found


async def _deployments(args: Any, registry: Any, out: IO[str], reactor: Any = None) -> int:
    statuses, stored, leader = await read_statuses(registry)
    troubled = [s.name for s in statuses if s.state != "ok"]
    children = await daemon_children(registry, stored, troubled, default_reactor(reactor))
    if args.json:
        docs = []
        for status in statuses:
            doc = status.to_json()
            if status.name in children:
                doc["children"] = children[status.name]
            docs.append(doc)
        doc = {
            "leader": leader,
            "deployments": docs,
            "events": list(stored.events[-20:]),
        }
        out.write(json.dumps(doc, indent=1) + "\n")
        return 0
    if not statuses:
        out.write("No deployments (`sky apply FILE` makes some).\n")
    else:
        rows = [("DEPLOYMENT", "STATE", "READY", "DESIRED", "STARTING", "RESTARTS", "HOSTS")]
        for s in statuses:
            rows.append(
                (
                    s.name,
                    s.state,
                    str(s.ready),
                    str(s.desired),
                    str(s.starting),
                    str(s.restarts),
                    _hosts_text(s),
                )  # fmt: skip
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
        for row in rows:
            cells = [c.ljust(w) for c, w in zip(row, widths, strict=False)] + [row[-1]]
            out.write("  ".join(cells).rstrip() + "\n")
        for s in statuses:
            if s.reason or (s.state == "failing" and s.last_error):
                out.write(f"{s.name}: {s.reason or s.last_error}\n")
            for child in children.get(s.name, []):
                line = f"  {s.name} {child['uuid'][:8]} on {child['host']}: {child['state']}"
                if child["last_error"]:
                    line += f" ({child['last_error']})"
                out.write(line + "\n")
    out.write(f"Leader: {leader or 'none (no reconciler is running)'}\n")
    events = [e for e in stored.events if e.get("kind") != "status"][-5:]
    if events:
        out.write("Recent placement events:\n")
        for event in events:
            out.write(f"  {_clock(event.get('time'))}  {event.get('message', '')}\n")
    return 0


def _clock(seconds: Any) -> str:
    import time

    if not isinstance(seconds, (int, float)):
        return "--:--:--"
    return time.strftime("%H:%M:%S", time.gmtime(seconds))


def _rollout_line(status: DeploymentStatus) -> str:
    rollout = status.rollout
    where = f"{status.ready}/{status.desired} ready, {status.starting} starting"
    if rollout is None:
        return f"{status.name}: no rollout; {status.state}, {where}"
    reason = f": {rollout.reason}" if rollout.reason else ""
    return f"{status.name}: rollout to {rollout.to} {rollout.state}{reason}; {where}"


async def _rollout_restart(args: Any, registry: Any, out: IO[str]) -> int:
    stored = await _desired(registry)
    deployment = stored.get(args.name)
    if deployment is None:
        raise CommandError(f"no deployment named {args.name!r} (`sky deployments` lists them)")
    restarted = attr.evolve(deployment, generation=deployment.generation + 1)
    await _store(registry, stored.with_deployment(restarted))
    out.write(
        f"~ {args.name}: rolling restart of {deployment.instances} instance(s)"
        f" (generation {restarted.generation}); `sky rollout status {args.name}` follows it\n"
    )
    return 0


async def _rollout_status(args: Any, registry: Any, out: IO[str], reactor: Any) -> int:
    deadline = reactor.seconds() + args.timeout
    last = None
    while True:
        statuses, _stored, _leader = await read_statuses(registry)
        found = [s for s in statuses if s.name == args.name]
        if not found:
            raise CommandError(f"no deployment named {args.name!r}")
        status = found[0]
        line = _rollout_line(status)
        if line != last:
            out.write(line + "\n")
            last = line
        rollout = status.rollout
        desired = (await _desired(registry)).get(args.name)
        assert desired is not None
        current = rollout is not None and rollout.to == desired.fingerprint
        if current and rollout is not None and rollout.state == "stopped":
            return 1
        if (rollout is None or current) and status.state == "ok":
            out.write(f"{args.name}: rolled out.\n" if rollout else f"{args.name}: ok.\n")
            return 0
        if args.no_follow:
            return 0
        if reactor.seconds() >= deadline:
            out.write(f"{args.name}: still {status.state} after {args.timeout:g}s.\n")
            return 3
        await deferLater(reactor, args.interval, lambda: None)


def main(argv: list[str] | None = None) -> int:
    """
    Run a command in a process of its own; returns the exit code.
    """
    from twisted.internet import reactor

    from skynet.registry import registry_from_url

    argv = list(sys.argv[1:] if argv is None else argv)
    result: list[int] = []

    async def run() -> None:
        url = None
        if "--registry" in argv:
            index = argv.index("--registry")
            if index + 1 < len(argv):
                url = argv[index + 1]
        try:
            registry = registry_from_url(url, reactor)
            await registry.start()
        except RegistryError as e:
            sys.stderr.write(f"sky: {e}\n")
            result.append(1)
            return
        try:
            result.append(await run_command(argv, registry, sys.stdout, sys.stderr,
                                            reactor=reactor))  # fmt: skip
        finally:
            await registry.stop()

    def failed(failure: Any) -> None:
        sys.stderr.write(f"sky: {failure.value}\n")
        result.append(1)

    def start() -> None:
        d = Deferred.fromCoroutine(run())
        d.addErrback(failed)
        d.addBoth(lambda _: reactor.stop())  # type: ignore[attr-defined]

    reactor.callWhenRunning(start)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]
    sys.stdout.flush()
    return result[0] if result else 1
