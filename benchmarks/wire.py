"""
Micro benchmark of the codec module, L{skynet._wire}: per-operation
microseconds of what one call does to its bytes, for payloads of 100 B,
10 KB and 1 MB, the pure-Python module against the same source compiled
by mypyc (issue 15: does a compiled codec pay?).

    python -m benchmarks.wire [--payloads 100,10000,1000000] [--repeat 5]
        [--round 0.2] [--build | --tree DIR] [--e2e [--calls 5000]] [--json FILE]

Each operation is what L{skynet.protocol} does on the hot path of one
C{add(a, b, data)} call, the document that of L{benchmarks.compare}:

  - request encode: the client's C{encode_for_send} of C{{a, b, data}},
    its request header and body joined into one frame's bytes;
  - request parse: the service's exact-layout read of that header
    (C{read_forward_header}) and body (C{read_body_span});
  - response encode: the service's encoding of C{{sum, data}}
    (C{encode_parts} or pymongo), its ok header and body joined;
  - response parse: the client's exact-layout read of the answer header
    (C{read_ok_header}) and body (C{read_ok_body_span}, and the copy of
    C{out} it hands on);
  - general decode: C{decode_header} and C{decode_response_body}, the
    readers of every other document (fast first, then pymongo).

The figures are the best of C{--repeat} rounds, each long enough to take
about C{--round} seconds (0.2).

C{--e2e} measures instead the whole per-call cost of skynet in one process:
C{Adder.Add} called through discovery by a L{skynet.client.Client} of a
L{skynet.testing.LocalCluster} (the real client, protocols and service over
in-memory connections: no kernel, no reactor), in CPU microseconds per call,
the pure module against the compiled one, each in processes of its own,
alternately, best of C{--repeat}.

C{--build} compiles C{skynet/_wire.py} with mypyc into a temporary copy of
the package (nothing is built in this checkout: the compiled module did
not pay, see docs/benchmarks.md) and measures against it; it needs mypyc
(with mypy, the dev extra), a C compiler and Python's headers.  C{--tree
DIR} imports C{skynet} from C{DIR} instead of this checkout (a copy built
before); without either, only the pure module is measured.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from benchmarks.peers import size_label

ROOT = Path(__file__).resolve().parent.parent

OPS = ["request encode", "request parse", "response encode", "response parse", "general decode"]


def missing_tools() -> str | None:
    """
    What a mypyc build lacks here (mypyc, a C compiler, Python's headers),
    or L{None}.
    """
    try:
        import mypyc  # noqa: F401
    except ImportError:
        return "mypyc is not installed (it comes with mypy, the dev extra: `make setup`)"
    compiler = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    if shutil.which(compiler.split()[0]) is None:
        return f"no C compiler ({compiler}; Debian: apt-get install gcc)"
    include = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if not include.exists():
        return f"no Python headers ({include}; Debian: apt-get install python3-dev)"
    return None


def build_compiled(tree: Path) -> Path:
    """
    Copy this checkout's C{skynet} package into C{tree} and compile the
    copy's C{_wire.py} there with mypyc, into an extension module beside
    it, which C{import skynet._wire} then loads (from C{tree}).

    @return: the compiled module's file.
    @raise RuntimeError: if the tools are missing or mypyc fails.
    """
    why = missing_tools()
    if why is not None:
        raise RuntimeError(why)
    package = tree / "skynet"
    shutil.copytree(ROOT / "skynet", package,
                    ignore=shutil.ignore_patterns("__pycache__", "*.so"))  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "mypyc", "skynet/_wire.py"],
        cwd=tree,
        env=dict(os.environ, MYPY_CACHE_DIR=str(tree / ".mypy_cache")),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    built = sorted(package.glob("_wire.*.so"))
    if done.returncode != 0 or not built:
        raise RuntimeError(f"mypyc failed:\n{done.stdout[-4000:]}")
    return built[0]


def load_modules(tree: str | None) -> tuple[ModuleType, ModuleType]:
    """
    The pure-Python codec (from its source file, under a name of its own)
    and the one C{import skynet._wire} gives (compiled, if built).
    """
    if tree is not None:
        sys.path.insert(0, tree)
    import skynet._wire as loaded

    source = Path(loaded.__file__).with_name("_wire.py")
    spec = importlib.util.spec_from_file_location("skynet._wire_pure_bench", source)
    assert spec is not None and spec.loader is not None
    pure = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pure)
    return pure, loaded


def is_compiled(module: ModuleType) -> bool:
    return not str(module.__file__).endswith(".py")


class Info:
    """
    A stand-in for L{skynet.protocol.RequestInfo} (what the codec reads).
    """

    request_id = "0f8fad5b-d9cb-469f-a165-70867728950e"
    retry_count = 0
    origin_address = ""
    connection_address = ""


def operations(wire: ModuleType, payload: int) -> dict[str, Callable[[], Any]]:
    """
    The benchmarked operations on C{wire}, for one payload size; each is
    checked once to do what it should.
    """
    import bson

    data = b"x" * payload
    params = {"a": 1, "b": 2, "data": data}
    result = {"sum": 3, "data": data}
    info = Info()
    client = wire.ClientLayout("Adder.Forward", "client-1")
    server = wire.ServerLayout("Adder", "client-1")
    method_element = wire.string_element(wire.METHOD, "Add")
    clientid_element = client.clientid_element

    def request_encode() -> bytes:
        encoded = wire.encode_for_send(params)
        if type(encoded) is tuple:
            body = wire.request_body_parts_of(
                clientid_element, method_element, info, encoded[0], encoded[1]
            )
        else:
            body = wire.request_body_parts(clientid_element, method_element, info, encoded)
        return b"".join((client.request_header(7), *body))

    request = request_encode()
    header_length = wire.unpack_length(request, 0)[0]
    request_header, request_body = request[:header_length], request[header_length:]

    def request_parse() -> Any:
        return server.read_forward_header(request_header), server.read_body_span(request_body)

    def response_encode() -> bytes:
        parts = wire.encode_parts(result)
        if parts is None:
            body = wire.response_body_parts(bson.encode(result), "")
        else:
            body = wire.response_body_parts_of(parts[0], parts[1], "")
        return b"".join((server.ok_header(7), *body))

    response = response_encode()
    header_length = wire.unpack_length(response, 0)[0]
    response_header, response_body = response[:header_length], response[header_length:]

    def response_parse() -> Any:
        seq = client.read_ok_header(response_header)
        span = client.read_ok_body_span(response_body)
        return seq, response_body[span[0] : span[1]]

    def general_decode() -> Any:
        return wire.decode_header(request_header), wire.decode_response_body(response_body)

    assert request_parse()[0] == 7 and request_parse()[1] is not None
    assert bson.decode(request_body[slice(*request_parse()[1][3:])]) == params
    assert response_parse()[0] == 7
    assert bson.decode(response_parse()[1]) == result
    assert general_decode()[0] == ("Adder.Forward", 7, None)
    return {
        "request encode": request_encode,
        "request parse": request_parse,
        "response encode": response_encode,
        "response parse": response_parse,
        "general decode": general_decode,
    }


def per_op_us(f: Callable[[], Any], repeat: int, seconds: float = 0.2) -> float:
    """
    The best of C{repeat} rounds of C{f()}, each of about C{seconds}, in
    microseconds per call.
    """
    number = 1
    while True:  # calibrate
        started = time.perf_counter()
        for _ in range(number):
            f()
        took = time.perf_counter() - started
        if took >= seconds / 4:
            break
        number *= 4
    number = max(1, int(number * seconds / took))
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        for _ in range(number):
            f()
        best = min(best, (time.perf_counter() - started) / number)
    return best * 1e6


def force_pure() -> None:
    """
    Make C{import skynet._wire} give the pure-Python source even where the
    compiled module is built (before anything imports it).
    """
    spec = importlib.util.find_spec("skynet")
    assert spec is not None and spec.submodule_search_locations is not None
    source = Path(list(spec.submodule_search_locations)[0]) / "_wire.py"
    wire_spec = importlib.util.spec_from_file_location("skynet._wire", source)
    assert wire_spec is not None and wire_spec.loader is not None
    module = importlib.util.module_from_spec(wire_spec)
    sys.modules["skynet._wire"] = module
    wire_spec.loader.exec_module(module)


def e2e_worker(variant: str, payloads: list[int], calls: int, tree: str | None) -> dict[str, Any]:
    """
    CPU microseconds per sequential call of C{Adder.Add} through a
    L{LocalCluster}, per payload, with the C{variant} codec (of the
    C{skynet} in C{tree}, if given).
    """
    if tree is not None:
        sys.path.insert(0, tree)
    if variant == "pure":
        force_pure()
    from benchmarks.compare import Adder
    from skynet import _wire
    from skynet.testing import LocalCluster

    assert is_compiled(_wire) == (variant == "compiled"), (variant, _wire.__file__)
    cluster = LocalCluster()
    cluster.add(Adder())
    service = cluster.client().service("Adder")
    figures = {}
    for payload in payloads:
        params = {"a": 1, "b": 2, "data": b"x" * payload}
        count = max(20, min(calls, calls * 1000 // max(payload, 1000)))
        for _ in range(max(20, count // 10)):  # warm up
            service.call("Add", params)
            cluster.settle()
        started = time.process_time()
        for _ in range(count):
            d = service.call("Add", params)
            cluster.settle()
            result = d.result
            if type(result) is not dict or result["sum"] != 3:
                raise AssertionError(f"Add answered {result!r}")
        figures[str(payload)] = (time.process_time() - started) / count * 1e6
    return {"variant": variant, "loaded": _wire.__file__, "figures": figures}


def run_e2e(args: argparse.Namespace) -> dict[str, Any]:
    _, loaded = load_modules(args.tree)
    variants = ["pure", "compiled"] if is_compiled(loaded) else ["pure"]
    best: dict[str, dict[str, float]] = {v: {} for v in variants}
    tree = [] if args.tree is None else ["--tree", args.tree]
    for _ in range(args.repeat):
        for variant in variants:  # alternately, so that load hits both alike
            out = subprocess.run(
                [sys.executable, "-m", "benchmarks.wire", "--e2e-worker", variant, *tree,
                 "--payloads", ",".join(map(str, args.payloads)), "--calls", str(args.calls)],
                cwd=ROOT, check=True, stdout=subprocess.PIPE, text=True,
            ).stdout  # fmt: skip
            for payload, us in json.loads(out)["figures"].items():
                best[variant][payload] = min(best[variant].get(payload, us), us)
    return {"loaded": str(loaded.__file__), "compiled": is_compiled(loaded),
            "payloads": args.payloads, "e2e": best}  # fmt: skip


def e2e_table(report: dict[str, Any]) -> str:
    e2e = report["e2e"]
    lines = [f"skynet._wire loaded from {report['loaded']}",
             "CPU us per sequential call through a LocalCluster (client + service)",
             f"{'payload':>9}{'pure us':>11}{'compiled us':>13}{'ratio':>8}"]  # fmt: skip
    for payload in report["payloads"]:
        pure = e2e["pure"][str(payload)]
        row = f"{size_label(payload):>9}{pure:11.1f}"
        if "compiled" in e2e:
            compiled = e2e["compiled"][str(payload)]
            row += f"{compiled:13.1f}{compiled / pure:8.2f}"
        lines.append(row)
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, Any]:
    pure, loaded = load_modules(args.tree)
    modules = {"pure": pure}
    if is_compiled(loaded):
        modules["compiled"] = loaded
    figures: dict[str, Any] = {name: {} for name in modules}
    for payload in args.payloads:
        ops = {name: operations(module, payload) for name, module in modules.items()}
        for op in OPS:
            for name in modules:  # side by side, in one run
                figures[name].setdefault(str(payload), {})[op] = per_op_us(
                    ops[name][op], args.repeat, args.round
                )
    return {
        "loaded": str(loaded.__file__),
        "compiled": is_compiled(loaded),
        "payloads": args.payloads,
        "figures": figures,
    }


def table(report: dict[str, Any]) -> str:
    figures = report["figures"]
    lines = [f"skynet._wire loaded from {report['loaded']}"]
    if not report["compiled"]:
        lines.append("(not compiled: --build compiles a copy; pure figures only)")
    lines.append(f"{'op':18}{'payload':>9}{'pure us':>11}{'compiled us':>13}{'ratio':>8}")
    for payload in report["payloads"]:
        for op in OPS:
            pure = figures["pure"][str(payload)][op]
            row = f"{op:18}{size_label(payload):>9}{pure:11.2f}"
            if "compiled" in figures:
                compiled = figures["compiled"][str(payload)][op]
                row += f"{compiled:13.2f}{compiled / pure:8.2f}"
            lines.append(row)
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Per-op microseconds of skynet._wire.")
    parser.add_argument("--payloads", default="100,10000,1000000",
                        type=lambda s: [int(x) for x in s.split(",")])  # fmt: skip
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--round", type=float, default=0.2, help="seconds per round")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    parser.add_argument("--tree", metavar="DIR", help="import skynet from DIR")
    parser.add_argument("--build", action="store_true",
                        help="compile a temporary copy with mypyc and measure it")  # fmt: skip
    parser.add_argument("--e2e", action="store_true", help="per-call CPU through a LocalCluster")
    parser.add_argument("--calls", type=int, default=5000, help="--e2e: calls per figure")
    parser.add_argument("--e2e-worker", choices=["pure", "compiled"], help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.e2e_worker:
        print(json.dumps(e2e_worker(args.e2e_worker, args.payloads, args.calls, args.tree)))
        return
    with tempfile.TemporaryDirectory(prefix="skynet-wire-") as work:
        if args.build:
            try:
                print(f"compiled {build_compiled(Path(work))}", flush=True)
            except RuntimeError as e:
                sys.exit(f"benchmarks.wire: cannot build the compiled module: {e}")
            args.tree = work
        if args.e2e:
            report = run_e2e(args)
            print(e2e_table(report), flush=True)
        else:
            report = run(args)
            print(table(report), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
