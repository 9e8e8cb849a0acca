"""
The C{sky} commands over observability data, run inside the shell
language (so C{sky}, C{sky cli} and the SSH shell have them alike):

    stats --by-method     per service and method: requests, errors, rate,
                          p50 and p99 from the published buckets
    logs [filters] ...    live log search across the hosts' daemons
                          (L{skynet.observe.logsearch})
    trace ID | trace --slowest N [--since 1h]
                          a request's call tree, or the slowest recent
                          calls (L{skynet.observe.tracing})

L{dispatch} is called by L{skynet.shell.Shell} before its own parser (a
one-line hook) and answers L{None} for every command it does not own.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from skynet.observe.histogram import Histogram, format_seconds, method_histograms
from skynet.registry.base import parse_go_time

#: Options of these commands that take no value / one value.
FLAG_OPTIONS = ("--by-method", "--follow", "-f", "--trace")
VALUE_OPTIONS = ("--grep", "--since", "--until", "--level", "--request-id", "--uuid", "--limit",
                 "--slowest")  # fmt: skip


def by_method_rows(nodes: Iterable[tuple[str, Mapping[str, Any] | None]]) -> list[dict[str, Any]]:
    """
    Per service and method, summed over the instances: C{requests},
    C{errors}, C{rate} (requests per second since each instance started,
    summed), C{p50} and C{p99} (seconds, from the summed buckets) and
    C{instances}.

    @param nodes: (service name, statistics node) of each instance.
    """
    sums: dict[tuple[str, str], Histogram] = {}
    rates: dict[tuple[str, str], float] = {}
    counts: dict[tuple[str, str], int] = {}
    for service, node in nodes:
        start = parse_go_time((node or {}).get("StartTime"))
        updated = parse_go_time((node or {}).get("Updated"))
        elapsed = (updated - start) if start is not None and updated is not None else 0.0
        for method, h in method_histograms(node).items():
            key = (service, method)
            if key in sums and sums[key].bounds != h.bounds:
                continue
            sums[key] = sums[key] + h if key in sums else h
            rates[key] = rates.get(key, 0.0) + (h.requests / elapsed if elapsed > 0 else 0.0)
            counts[key] = counts.get(key, 0) + 1
    rows = []
    for (service, method), h in sorted(sums.items()):
        rows.append(
            {
                "service": service,
                "method": method,
                "requests": h.requests,
                "errors": h.errors,
                "rate": rates[(service, method)],
                "p50": h.quantile(0.5),
                "p99": h.quantile(0.99),
                "mean": h.total / h.requests if h.requests else None,
                "instances": counts[(service, method)],
                "buckets": {"le": list(h.bounds), "counts": h.cumulative()},
            }
        )
    return rows


def format_by_method(rows: list[dict[str, Any]]) -> list[str]:
    """
    The rows of L{by_method_rows} as an aligned table.
    """
    if not rows:
        return ["no per-method statistics (instances publish none yet)"]
    table = [("METHOD", "REQUESTS", "ERRORS", "REQ/S", "P50", "P99", "MEAN", "INSTANCES")]
    for r in rows:
        table.append(
            (
                f"{r['service']}.{r['method']}",
                str(r["requests"]),
                str(r["errors"]),
                f"{r['rate']:.2f}",
                format_seconds(r["p50"]),
                format_seconds(r["p99"]),
                format_seconds(r["mean"]),
                str(r["instances"]),
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return [
        "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in
                  enumerate(zip(row, widths, strict=True))).rstrip()
        for row in table
    ]  # fmt: skip


def split_options(argv: list[str]) -> tuple[dict[str, Any], list[str]]:
    """
    Take this module's options out of C{argv}: (options by name without
    dashes, the remaining words for the shell's parser).
    """
    options: dict[str, Any] = {}
    rest: list[str] = []
    i = 0
    while i < len(argv):
        word = argv[i]
        i += 1
        if word == "--":
            rest.extend(argv[i - 1 :])
            break
        name, eq, value = word.partition("=")
        if name in FLAG_OPTIONS and not eq:
            options[{"-f": "follow"}.get(name, name.lstrip("-"))] = True
            continue
        if name in VALUE_OPTIONS:
            if not eq:
                if i >= len(argv):
                    from skynet.shell import UsageError

                    raise UsageError(f"option {name} needs a value")
                value = argv[i]
                i += 1
            options[name.lstrip("-")] = value
            continue
        rest.append(word)
    return options, rest


def shell_argv(argv: list[str]) -> list[str]:
    """
    C{argv} without this module's options, for the shell's parser to check
    the rest (C{sky} checks its command line before starting).
    """
    try:
        return split_options(argv)[1]
    except Exception:
        return argv


async def dispatch(shell: Any, argv: list[str], io: Any) -> int | None:
    """
    Run C{argv} if it is one of this module's commands; L{None} otherwise
    (the shell runs it).  Errors are raised as the shell's own
    (C{UsageError}, C{ShellError}), which it reports.
    """
    from skynet.shell import UsageError, parse

    options, rest = split_options(argv)
    if not options and (not rest or _command(rest) not in ("logs", "trace")):
        return None
    inv = parse(rest)
    filters = shell.filters.overlaid(inv.filters)
    if inv.command in ("trace", "call") and (inv.command == "trace" or "trace" in options):
        # (trace hook) sky call --trace, sky trace: skynet.observe.tracing
        from skynet.observe.tracing import run_trace_command

        allowed = {"trace"} if inv.command == "call" else {"slowest", "since"}
        if set(options) - allowed:
            raise UsageError(f"{inv.command} does not take {', '.join('--' + o for o in options)}")
        return await run_trace_command(shell, filters, inv, io, options)
    if inv.command == "stats":
        if set(options) - {"by-method"}:
            raise UsageError("stats takes --by-method (and filters, --json) only")
        if inv.args:
            raise UsageError("Usage: stats [--by-method]")
        return await _stats_by_method(shell, filters, inv, io)
    if inv.command == "logs":
        from skynet.observe.logsearch import run_logs_command

        return await run_logs_command(shell, filters, inv, options, io)
    if inv.command is None:
        return None
    raise UsageError(f"{inv.command} does not take {', '.join('--' + o for o in options)}")


def _command(words: list[str]) -> str | None:
    from skynet.shell import parse

    try:
        return parse(words).command
    except Exception:
        return None


async def _stats_by_method(shell: Any, filters: Any, inv: Any, io: Any) -> int:
    from skynet.registry.base import RegistryError
    from skynet.shell import to_json

    found = await shell.registry.query(filters.query())
    nodes = []
    for instance in found:
        try:
            node = await shell.registry.get_stats(instance)
        except RegistryError:
            node = None
        nodes.append((instance.name, node))
    rows = by_method_rows(nodes)
    if inv.json:
        io.out(to_json(rows))
    else:
        for line in format_by_method(rows):
            io.out(line)
    return 0


__all__ = ["by_method_rows", "dispatch", "format_by_method", "shell_argv", "split_options"]
