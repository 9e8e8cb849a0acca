"""
Log search benchmark: one host's JSON log files (L{skynet.observe.logs}),
searched by L{skynet.observe.logsearch.LogSearch} as the daemon's
C{SearchLogs} does.

    python -m benchmarks.logs [--size-mb 1024] [--instances 16] [--dir DIR]
        [--keep] [--samples 20] [--json FILE]

It writes C{--size-mb} of records in the exact shape a service writes them
(the records of a real L{InstanceLog} as templates), spread over
C{--instances} instances, each as a current file and rotated ones of 10 MB
(the daemon's default rotation), the times covering the last 24 hours; then
it times the first page (limit 100) of several searches, each run twice
(the second with the files in the page cache, as on a host where they are
being written), and the follow latency: a writer appends a record at a
random moment, a poller asks with its cursor every
L{skynet.observe.logsearch.FOLLOW_INTERVAL} seconds (as C{sky logs -f}
does), and the latency is from the append to the poller having the event.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from typing import Any

from skynet.observe.logsearch import FOLLOW_INTERVAL, LogQuery, LogSearch

ROTATE = 10 * 1024 * 1024

_TEXTS = [
    "GET /api/orders/{n} answered 200 in {ms}ms",
    "cache miss for key user:{n}",
    "calling Inventory.Reserve for order {n}",
    "order {n} reserved {k} items",
    "slow query on orders: {ms}ms",
]
_RARE = "timeout after {ms}ms talking to payments (attempt {k})"


def _record(t: float, service: str, uuid: str, text: str, level: str, rid: str) -> bytes:
    event = {
        "log_format": text.replace("{", "{{").replace("}", "}}"),
        "log_level": {"name": level, "__class_uuid__": "02e59486-f24d-46ad-8224-3acdf2a5732a"},
        "log_namespace": f"services.{service.lower()}",
        "log_source": None,
        "log_time": t,
        "log_flattened": {},
        "skynet_text": text,
        "skynet_level": level,
        "skynet_service": service,
        "skynet_version": "1.4.2",
        "skynet_uuid": uuid,
        "skynet_host": "10.0.0.7",
        "skynet_request_id": rid,
        "skynet_method": "Reserve",
    }
    return b"\x1e" + json.dumps(event).encode() + b"\n"


def generate(directory: str, size: int, instances: int, seed: int = 7) -> dict[str, Any]:
    """
    Write C{size} bytes of records; return facts the searches need.
    """
    rng = random.Random(seed)
    now = time.time()
    per_instance = size // instances
    facts: dict[str, Any] = {"request_ids": [], "uuids": []}
    written = 0
    for i in range(instances):
        uuid = f"{rng.getrandbits(32):08x}-0000-4000-8000-{i:012x}"
        service = f"Service{i % 4}"
        facts["uuids"].append(uuid)
        pieces = max(1, per_instance // ROTATE)
        # Oldest first: .N ... .1, then the current file.
        names = [f"{service}-{uuid}.json.{k}" for k in range(pieces - 1, 0, -1)]
        names.append(f"{service}-{uuid}.json")
        t = now - 86400
        step = 86400 / max(1, per_instance / 330)
        for name in names:
            chunk = []
            size_here = 0
            while size_here < min(ROTATE, per_instance):
                t += step * rng.random() * 2
                roll = rng.random()
                rid = f"{rng.getrandbits(64):016x}-0000-4000-8000-{rng.getrandbits(48):012x}"
                if roll < 0.00002:
                    text, level = (
                        _RARE.format(ms=rng.randint(1000, 9999), k=rng.randint(1, 3)),
                        "error",
                    )
                    facts["request_ids"].append(rid)
                elif roll < 0.01:
                    text, level = "upstream failed: HTTP 503", "error"
                else:
                    text = rng.choice(_TEXTS).format(n=rng.randint(1, 10**6), ms=rng.randint(1, 900),
                                                     k=rng.randint(1, 9))  # fmt: skip
                    level = "info"
                line = _record(min(t, now), service, uuid, text, level, rid)
                chunk.append(line)
                size_here += len(line)
            with open(os.path.join(directory, name), "wb") as f:
                f.write(b"".join(chunk))
            written += size_here
    facts["bytes"] = written
    return facts


def timed(search: LogSearch, query: LogQuery) -> tuple[float, int, bool]:
    started = time.perf_counter()
    answer = search.search(query)
    return time.perf_counter() - started, len(answer["events"]), answer["more"]


def follow_latency(directory: str, samples: int) -> list[float]:
    """
    Seconds from an append to a cursor poller having it, C{samples} times.
    """
    path = os.path.join(directory, "Follow-ffffffff-0000-4000-8000-000000000000.json")
    open(path, "ab").close()
    search = LogSearch(directory)
    query = LogQuery(service="Follow")
    cursor = search.search(query)["cursor"]
    latencies: list[float] = []
    written: dict[str, float] = {}
    done = threading.Event()

    def writer() -> None:
        rng = random.Random(3)
        with open(path, "ab") as f:
            for n in range(samples):
                time.sleep(rng.uniform(0.1, 0.6))
                text = f"follow sample {n}"
                written[text] = time.monotonic()
                f.write(_record(time.time(), "Follow", "ffffffff", text, "info", ""))
                f.flush()
        done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    while len(latencies) < samples:
        time.sleep(FOLLOW_INTERVAL)
        answer = search.search(LogQuery(service="Follow", cursor=cursor, limit=10000))
        cursor = answer["cursor"]
        seen = time.monotonic()
        for event in answer["events"]:
            latencies.append(seen - written[event["text"]])
        if done.is_set() and not answer["events"] and len(latencies) < samples:
            break
    thread.join()
    return latencies


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description="Log search benchmark.")
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--instances", type=int, default=16)
    parser.add_argument("--dir", help="use (and keep) this directory; reuse its files")
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    directory = args.dir or tempfile.mkdtemp(prefix="skynet-logbench-")
    os.makedirs(directory, exist_ok=True)
    facts_path = os.path.join(directory, "facts")
    try:
        if os.path.exists(facts_path):
            with open(facts_path) as f:
                facts = json.load(f)
        else:
            started = time.perf_counter()
            facts = generate(directory, args.size_mb * 1024 * 1024, args.instances)
            with open(facts_path, "w") as f:
                json.dump(facts, f)
            print(f"wrote {facts['bytes'] / 2**20:.0f} MiB in {time.perf_counter() - started:.1f}s",
                  file=sys.stderr)  # fmt: skip
        search = LogSearch(directory)
        rare_rid = facts["request_ids"][len(facts["request_ids"]) // 2]
        queries = {
            "newest 100, no filter": LogQuery(),
            "--grep 'cache miss' (common literal)": LogQuery(grep="cache miss"),
            "--level error --since 10m": LogQuery(level="error", since=time.time() - 600),
            "--uuid U (one instance)": LogQuery(uuid=facts["uuids"][3]),
            "--request-id R (one match in 1 GB)": LogQuery(request_id=rare_rid),
            r"--grep 'timeout after \d+ms' (rare regex)": LogQuery(grep=r"timeout after \d+ms"),
            r"--grep '^order \d+ reserved [7-9]' (common regex)": LogQuery(
                grep=r"^order \d+ reserved [7-9]"
            ),
        }
        results: dict[str, Any] = {"bytes": facts["bytes"], "searches": {}}
        for name, query in queries.items():
            cold = timed(search, query)
            warm = timed(search, query)
            results["searches"][name] = {"first": cold[0], "again": warm[0], "events": warm[1],
                                         "more": warm[2]}  # fmt: skip
        latencies = follow_latency(directory, args.samples)
        results["follow"] = {
            "samples": len(latencies),
            "median": statistics.median(latencies) if latencies else None,
            "max": max(latencies) if latencies else None,
            "poll_interval": FOLLOW_INTERVAL,
        }
        print(f"log search over {results['bytes'] / 2**20:.0f} MiB "
              f"({args.instances} instances, 10 MB files)")  # fmt: skip
        print(f"{'search (first page, limit 100)':<52} {'first':>8} {'again':>8} {'events':>7}")
        for name, r in results["searches"].items():
            print(f"{name:<52} {r['first']:>7.3f}s {r['again']:>7.3f}s {r['events']:>7}")
        f = results["follow"]
        if f["samples"]:
            print(f"follow latency over {f['samples']} appends: median {f['median']:.3f}s,"
                  f" max {f['max']:.3f}s (poll every {FOLLOW_INTERVAL}s)")  # fmt: skip
        if args.json:
            with open(args.json, "w") as out:
                json.dump(results, out, indent=2)
        return results
    finally:
        if not args.dir and not args.keep:
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
