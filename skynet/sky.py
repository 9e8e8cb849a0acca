"""
C{sky}: operate a skynet cluster from the command line.

    sky [--registry URL] [--json] [--yes] [filters] COMMAND [arguments]
    sky cli                      the interactive shell on this terminal

The commands are those of the shell (L{skynet.shell}): C{services},
C{hosts}, C{regions}, C{versions}, C{instances}, C{topology}, C{register},
C{unregister}, C{stop}, C{restart}, C{deploy MODULE:CLASS [args]}, C{call
SERVICE METHOD '{json}'}, C{watch [SECONDS]}, C{stats}.  Filters:
C{--service S --version V --host H --port P --region R --registered
true|false}.  The registry is C{--registry URL}, else C{$SKYNET_REGISTRY},
else the embedded registry.

Exit status: 0 on success, 1 when something failed (one line on stderr
says what), 2 for a usage error, 130 when interrupted.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any, NoReturn

from twisted.internet.defer import Deferred, ensureDeferred

from skynet.config import environment_defaults
from skynet.observe.commands import shell_argv  # (observe hook)
from skynet.shell import (
    HELP,
    Filters,
    History,
    Shell,
    ShellError,
    ShellProtocol,
    UsageError,
    cluster_argv,
    default_history_path,
    parse,
)

USAGE = """\
Usage: sky [--registry URL] [--json] [--yes] [filters] COMMAND [arguments]
       sky cli          the interactive shell (line editing, history, Tab completion)

  --registry URL  file:///path, zk://host:port,.../chroot (default: $SKYNET_REGISTRY,
                  else the embedded registry in $SKYNET_HOME/registry or ~/.skynet/registry)
  --timeout S     seconds to wait for the registry, a daemon or an admin endpoint (default 30)
  --create-registry  make the file:// registry directory if it does not exist (without it,
                  a file:// URL naming no directory is an error: a typo is not an empty cluster)
"""

#: Seconds the registry has to start.
REGISTRY_TIMEOUT = 10.0


def split_global_options(argv: list[str]) -> tuple[str | None, float, list[str]]:
    """
    Take C{--registry URL} and C{--timeout S} out of the words before the
    command; the rest is the shell's.  (C{--create-registry} is taken out
    by L{take_create_registry}.)

    @raise UsageError: for a missing or bad value.
    """
    registry: str | None = None
    timeout = 30.0
    rest: list[str] = []
    i = 0
    value_options = {"--service", "--version", "--host", "--port", "--region", "--registered"}
    while i < len(argv):
        word = argv[i]
        i += 1
        name, eq, value = word.partition("=")
        if name in ("--registry", "-registry", "-r", "--timeout", "-timeout"):
            if not eq:
                if i >= len(argv):
                    raise UsageError(f"option {name} needs a value")
                value = argv[i]
                i += 1
            if name.lstrip("-") in ("registry", "r"):
                registry = value
            else:
                try:
                    timeout = float(value)
                except ValueError:
                    raise UsageError(f"--timeout must be a number, not {value!r}") from None
                if timeout <= 0:
                    raise UsageError("--timeout must be positive")
            continue
        rest.append(word)
        if word.startswith("-") and len(word) > 1:
            if "--" + word.lstrip("-") in value_options and not eq and i < len(argv):
                rest.append(argv[i])
                i += 1
            continue
        rest.extend(argv[i:])
        break
    return registry, timeout, rest


def take_create_registry(argv: list[str]) -> tuple[bool, list[str]]:
    """
    Whether C{--create-registry} comes before the command, and the words
    without it.
    """
    for index, word in enumerate(argv):
        if word == "--create-registry":
            return True, argv[:index] + argv[index + 1 :]
        if not word.startswith("-"):
            break
    return False, argv


def missing_registry(registry: Any, explicit: bool) -> str | None:
    """
    Why a file registry named explicitly cannot be used: its directory does
    not exist (L{None} if it does, or for other registries and the default
    embedded one, which is made on first use).
    """
    from skynet.registry.files import FileRegistry

    if not explicit or not isinstance(registry, FileRegistry) or os.path.isdir(registry.root):
        return None
    return (
        f"no registry at {registry.url}: the directory {registry.root} does not exist"
        " (a typo? --create-registry makes an empty one there)"
    )


def _read_line(reactor: Any) -> Deferred[str]:
    """
    One line from stdin (C{""} at its end), read in a daemon thread so
    that neither the reactor nor the exit waits for it.
    """
    d: Deferred[str] = Deferred()

    def read() -> None:
        try:
            line = sys.stdin.readline()
        except (OSError, ValueError):
            line = ""
        reactor.callFromThread(lambda: None if d.called else d.callback(line))

    threading.Thread(target=read, name="sky-stdin", daemon=True).start()
    return d


class StreamIO:
    """
    The shell's output on stdout and stderr; questions on stderr (like
    C{rm -i}), answered by a line of stdin.
    """

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor

    def out(self, text: str) -> None:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()

    def err(self, text: str) -> None:
        sys.stderr.write(text + "\n")
        sys.stderr.flush()

    def confirm(self, question: str) -> Deferred[bool]:
        sys.stderr.write(question)
        sys.stderr.flush()
        d = _read_line(self.reactor)

        def answered(line: str) -> bool:
            if not line:
                sys.stderr.write("\n")
            return line.strip().upper() in ("Y", "YES")

        return d.addCallback(answered)

    def python(self, namespace: dict[str, Any]) -> None:
        raise ShellError("python is only available in the interactive shell: sky cli, or SSH")

    def exit(self) -> None:
        pass


async def run_cli(reactor: Any, shell_factory: Any, history: History) -> int:
    """
    The interactive shell on this process's terminal (conch's insults over
    stdio, the terminal in raw mode); line by line without editing when
    stdin is not a terminal.

    @return: the exit status.
    """
    if not os.isatty(0) or not os.isatty(1):
        return await _run_lines(reactor, shell_factory())
    import termios
    import tty

    from twisted.conch.insults.insults import ServerProtocol
    from twisted.internet import stdio

    saved = termios.tcgetattr(0)
    done: Deferred[int] = Deferred()

    def closed() -> None:
        if not done.called:
            done.callback(0)

    def restore() -> None:
        termios.tcsetattr(0, termios.TCSANOW, saved)
        for fd in (0, 1):
            os.set_blocking(fd, True)

    terminal = ServerProtocol(ShellProtocol, shell_factory, history, closed)
    tty.setraw(0)
    trigger = reactor.addSystemEventTrigger("after", "shutdown", restore)
    try:
        stdio.StandardIO(terminal, reactor=reactor)

        def resized(*_: Any) -> None:
            import fcntl
            import struct

            try:
                rows, cols = struct.unpack("hh", fcntl.ioctl(1, termios.TIOCGWINSZ, b"\0" * 4))
            except OSError:
                return
            if terminal.terminalProtocol is not None and rows and cols:
                terminal.terminalProtocol.terminalSize(cols, rows)

        resized()
        signal.signal(signal.SIGWINCH, lambda *a: reactor.callFromThread(resized))
        return await done
    finally:
        reactor.removeSystemEventTrigger(trigger)
        restore()


async def _run_lines(reactor: Any, shell: Shell) -> int:
    io = StreamIO(reactor)
    status = 0
    while True:
        line = await _read_line(reactor)
        if not line:
            return status
        if line.strip():
            status = await shell.run_line(line.strip(), io)


async def _main(reactor: Any, registry_url: str | None, timeout: float, argv: list[str],
                create_registry: bool = False) -> None:  # fmt: skip
    from skynet.client import Client
    from skynet.registry import registry_from_url
    from skynet.registry.base import RegistryError

    # The cluster's commands (apply, scale, ...) take their own options;
    # (observe hook) stats --by-method and logs theirs: skynet.observe.
    invocation = parse([] if cluster_argv(argv) is not None else shell_argv(argv))
    try:
        registry = registry_from_url(registry_url, reactor=reactor)
    except RegistryError as e:
        sys.stderr.write(f"sky: {e}\n")
        raise SystemExit(2) from None
    explicit = bool(registry_url or environment_defaults().registry)
    missing = None if create_registry else missing_registry(registry, explicit)
    if missing:
        sys.stderr.write(f"sky: {missing}\n")
        raise SystemExit(1)
    started = registry.start()
    timer = reactor.callLater(min(timeout, REGISTRY_TIMEOUT), started.cancel)
    try:
        await started
    except Exception as e:
        reason = "no answer" if isinstance(e, Exception) and "Cancelled" in type(e).__name__ else e
        sys.stderr.write(f"sky: registry unreachable ({registry.url}): {reason}\n")
        raise SystemExit(1) from None
    finally:
        if timer.active():
            timer.cancel()
    env = environment_defaults()  # the edge reads SKYNET_REGION/SKYNET_BIND_IP
    client = Client(registry=registry, reactor=reactor, region=env.region, host=env.bind_ip)
    status = 1
    try:
        if invocation.command == "cli":
            initial = invocation.filters

            def make_shell() -> Shell:
                shell = Shell(registry, client, reactor=reactor, interactive=True, timeout=timeout)
                shell.filters = Filters().overlaid(initial)
                return shell

            status = await run_cli(reactor, make_shell, History(default_history_path()))
        else:
            shell = Shell(registry, client, reactor=reactor, timeout=timeout)
            running = shell.run(argv, StreamIO(reactor))

            def interrupt(*_: Any) -> None:
                reactor.callFromThread(running.cancel)

            signal.signal(signal.SIGINT, interrupt)
            signal.signal(signal.SIGTERM, interrupt)
            status = await running
    finally:
        await client.stop()
        try:
            await registry.stop()
        except Exception as e:
            sys.stderr.write(f"sky: stopping the registry: {e}\n")
    raise SystemExit(status)


def main(argv: list[str] | None = None) -> NoReturn:
    """
    The C{sky} console script.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["tls"]:  # security hook (issue 12): sky tls init|issue|revoke|list
        from skynet.tls import main as tls_main

        sys.exit(tls_main(argv[1:]))
    if argv[:1] in (["-h"], ["--help"]):
        sys.stdout.write(USAGE + "\n" + HELP)
        sys.exit(0)
    try:
        create_registry, argv = take_create_registry(argv)
        registry_url, timeout, rest = split_global_options(argv)
        invocation = parse(["cluster"] if cluster_argv(rest) is not None else shell_argv(rest))
    except UsageError as e:
        sys.stderr.write(f"sky: {e}\n")
        sys.exit(2)
    if invocation.command in (None, "help", "h") and not invocation.json:
        sys.stdout.write(USAGE + "\n" + HELP)
        sys.exit(0)
    if invocation.command == "python":
        sys.stderr.write("sky: python is only available in the interactive shell (sky cli)\n")
        sys.exit(2)
    from twisted.internet.task import react

    react(lambda reactor: ensureDeferred(_main(reactor, registry_url, timeout, rest,
                                               create_registry)))  # fmt: skip
    raise SystemExit(0)  # react exits; this is for type checkers


if __name__ == "__main__":
    main()
