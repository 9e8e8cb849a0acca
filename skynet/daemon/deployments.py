"""
What a daemon deploys: checking a C{Deploy} request, deployment files,
the state file kept across restarts, and the command line of each child.

Pure functions plus file I/O; no reactor.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
import uuid as uuid_module
from collections.abc import Iterator
from typing import Any

import attr

from skynet.control import Deployment
from skynet.protocol import new_id

__all__ = [
    "DaemonState",
    "Deployment",
    "DeploymentStore",
    "command_line",
    "load_state",
    "make_deployment",
    "parse_deploy_file",
    "save_state",
    "twistd_command",
]

_CLASS_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
_DEPLOY_NAMESPACE = uuid_module.UUID("6f1c2f4e-5a0e-4b8e-9a57-736b796e6574")


def make_deployment(service: Any, args: Any = None, registered: Any = True, *,
                    uuid: Any = None) -> Deployment:  # fmt: skip
    """
    Check and normalise what C{Deploy} (or a file) asks for.

    @param args: a list of strings, one string (split as a shell would), or
        L{None}.  C{--unregistered} among them means C{registered=False}.
    @raise ValueError: with what is wrong.
    """
    if not isinstance(service, str) or not service.strip():
        raise ValueError("service must be module:Class or a command line")
    service = service.strip()
    if args is None:
        args = []
    elif isinstance(args, str):
        args = shlex.split(args)
    elif not isinstance(args, (list, tuple)) or not all(isinstance(a, str) for a in args):
        raise ValueError("args must be a list of strings or one string")
    if not isinstance(registered, bool):
        raise ValueError("registered must be true or false")
    if not _CLASS_SPEC.match(service):
        try:
            if not shlex.split(service):
                raise ValueError("empty command line")
        except ValueError as e:
            raise ValueError(f"bad command line {service!r}: {e}") from None
    else:
        if "--unregistered" in args or "-u" in args:
            registered = False
            args = [a for a in args if a not in ("--unregistered", "-u")]
    if uuid is None:
        uuid = new_id()
    elif not isinstance(uuid, str) or not re.match(r"^[\w-]{1,64}$", uuid):
        raise ValueError(f"bad uuid {uuid!r}")
    return Deployment(uuid=uuid, service=service, args=tuple(args), registered=registered)


def parse_deploy_file(path: str) -> list[Deployment]:
    """
    Read a deployment file: one service per line, C{module:Class args...}
    (or a full command line), C{#} comments and blank lines ignored.

    Each line gets a uuid derived from the file's path, the line's text and
    how many identical lines came before it, so that the same file deploys
    the same uuids at every start (and a state file can tell them apart).

    @raise ValueError: naming the line that is wrong.
    """
    path = os.path.abspath(path)
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    seen: dict[str, int] = {}
    deployments = []
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            words = shlex.split(line, comments=True)
        except ValueError as e:
            raise ValueError(f"{path}:{number}: {e}") from None
        if not words:
            continue
        normal = shlex.join(words)
        occurrence = seen.get(normal, 0)
        seen[normal] = occurrence + 1
        stable = str(uuid_module.uuid5(_DEPLOY_NAMESPACE, f"{path}\n{occurrence}\n{normal}"))
        if _CLASS_SPEC.match(words[0]):
            service, args = words[0], words[1:]
        else:
            service, args = normal, []
        try:
            deployments.append(make_deployment(service, args, uuid=stable))
        except ValueError as e:
            raise ValueError(f"{path}:{number}: {e}") from None
    return deployments


@attr.frozen
class DaemonState:
    """
    What a state file holds: the daemon's own uuid and the deployments.
    """

    uuid: str | None = None
    deployments: tuple[Deployment, ...] = ()


def _checked(deployment: Deployment) -> Deployment:
    return make_deployment(deployment.service, list(deployment.args), deployment.registered,
                           uuid=deployment.uuid)  # fmt: skip


def load_state(path: str) -> DaemonState:
    """
    Read a state file; a missing one is an empty state.

    @raise ValueError: if it is not a state file.
    """
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except FileNotFoundError:
        return DaemonState()
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read the state file {path}: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("services", []), list):
        raise ValueError(f"{path} is not a skynet-daemon state file")
    try:
        deployments = tuple(_checked(Deployment.from_bson(d)) for d in doc.get("services", []))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    daemon_uuid = doc.get("daemon_uuid")
    return DaemonState(uuid=daemon_uuid if isinstance(daemon_uuid, str) else None,
                       deployments=deployments)  # fmt: skip


def save_state(path: str, state: DaemonState) -> None:
    """
    Write a state file atomically (a reader sees the old or the new one).
    """
    doc = {
        "daemon_uuid": state.uuid,
        "services": [d.to_bson() for d in state.deployments],
    }
    directory = os.path.dirname(os.path.abspath(path))
    temporary = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    with open(temporary, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def twistd_command() -> list[str]:
    """
    How to run C{twistd} with the Python running this daemon.
    """
    path = os.path.join(os.path.dirname(sys.executable), "twistd")
    if os.access(path, os.X_OK):
        return [path]
    return [sys.executable, "-c",
            "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()"]  # fmt: skip


def command_line(deployment: Deployment, *, service_command: list[str], registry_url: str,
                 registered: bool) -> list[str]:  # fmt: skip
    """
    The command line of C{deployment}'s next start: C{twistd -n
    skynet-service ...} for a class (started C{--unregistered} unless
    C{registered}), the command itself otherwise.
    """
    if not deployment.is_class:
        return shlex.split(deployment.service) + list(deployment.args)
    command = [*service_command, "-n", "--pidfile=", "skynet-service",
               "--service", deployment.service, "--uuid", deployment.uuid,
               "--registry", registry_url, "--supervised"]  # fmt: skip
    if not registered:
        command.append("--unregistered")
    return command + list(deployment.args)


class DeploymentStore:
    """
    The deployments of one daemon, in the order they were made, mirrored
    to a state file (if it has one) at every change.

    @ivar deployments: uuid -> L{Deployment}.
    """

    def __init__(self, state_path: str | None = None) -> None:
        self.state_path = state_path
        self.deployments: dict[str, Deployment] = {}

    def __iter__(self) -> Iterator[Deployment]:
        return iter(list(self.deployments.values()))

    def __contains__(self, uuid: object) -> bool:
        return uuid in self.deployments

    def __len__(self) -> int:
        return len(self.deployments)

    def get(self, uuid: str) -> Deployment | None:
        return self.deployments.get(uuid)

    def add(self, deployment: Deployment) -> None:
        """
        @raise ValueError: if its uuid is deployed already.
        """
        if deployment.uuid in self.deployments:
            raise ValueError(f"{deployment.uuid} is deployed already")
        self.deployments[deployment.uuid] = deployment

    def remove(self, uuid: str) -> Deployment:
        return self.deployments.pop(uuid)

    def set_registered(self, uuid: str, registered: bool) -> bool:
        """
        Record the operator's wish; whether it changed.
        """
        deployment = self.deployments[uuid]
        if deployment.registered == registered:
            return False
        self.deployments[uuid] = attr.evolve(deployment, registered=registered)
        return True

    def save(self, daemon_uuid: str) -> None:
        """
        Rewrite the state file (if there is one).

        @raise OSError: if it cannot be written.
        """
        if self.state_path is not None:
            state = DaemonState(uuid=daemon_uuid, deployments=tuple(self.deployments.values()))
            save_state(self.state_path, state)
