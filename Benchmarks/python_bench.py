"""The dflockd-bench throughput workload, done by the Python client dflockd-client (async API).

N asyncio workers x M rounds of acquire + release, each worker on its own random key
(<prefix>_<n>) and its own persistent AsyncConn, exactly the Go server project's cmd/bench
lock workload. Wall time starts before the connections are opened (as in the Go tool);
latency per op runs from sending the acquire to the release's reply. CPU per op is this
process's user + system time (resource.getrusage) over the same span, divided by the ops.

    .venv/bin/python Benchmarks/python_bench.py --servers 127.0.0.1:6388 --workers 100 --rounds 500 [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import resource
import sys
import time

from dflockd_client import _async, stable_hash_shard


def parse_servers(text: str) -> list[tuple[str, int]]:
    servers = []
    for item in text.split(","):
        host, _, port = item.strip().rpartition(":")
        servers.append((host.strip("[]"), int(port)))
    return servers


async def worker(key: str, server: tuple[str, int], args: argparse.Namespace, latencies: list[float], done: list[int]) -> None:
    conns = [await _async.open_conn(server[0], server[1], ssl_context=None, connect_timeout_s=10)
             for _ in range(max(1, args.connections))]
    lease = args.lease if args.lease > 0 else None
    try:
        for i in range(args.rounds):
            conn = conns[i % len(conns)]
            t0 = time.perf_counter_ns()
            token, _lease = await _async.acquire(conn, key, args.timeout, lease)
            await _async.release(conn, key, token)
            latencies.append((time.perf_counter_ns() - t0) / 1e9)
            done[0] += 1
    finally:
        for conn in conns:
            await conn.close()


def percentile(ordered: list[float], pct: float) -> float:
    """The Go tool's percentile: linear interpolation between closest ranks."""
    if not ordered:
        return 0.0
    rank = pct / 100.0 * (len(ordered) - 1)
    lo = int(rank)
    if lo + 1 >= len(ordered):
        return ordered[lo]
    frac = rank - lo
    return ordered[lo] * (1 - frac) + ordered[lo + 1] * frac


async def progress(done: list[int], total: int, started: float) -> None:
    while True:
        await asyncio.sleep(1)
        elapsed = time.perf_counter() - started
        print(f"python bench: {done[0]}/{total} ops, {done[0] / elapsed:.0f} ops/s", file=sys.stderr, flush=True)


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--key", default="bench")
    parser.add_argument("--timeout", type=int, default=30)
    parser.add_argument("--lease", type=int, default=10)
    parser.add_argument("--servers", default="127.0.0.1:6388")
    parser.add_argument("--connections", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    servers = parse_servers(args.servers)

    numbers = random.sample(range(100_000, 10_000_000), args.workers)
    keys = [f"{args.key}_{n}" for n in numbers]
    latencies: list[list[float]] = [[] for _ in keys]
    done = [0]
    total = args.workers * args.rounds

    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    wall0 = time.perf_counter()
    ticker = asyncio.create_task(progress(done, total, wall0))
    try:
        await asyncio.gather(*(worker(key, servers[stable_hash_shard(key, len(servers))], args, latencies[i], done)
                               for i, key in enumerate(keys)))
    finally:
        ticker.cancel()
    wall = time.perf_counter() - wall0
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)

    all_latencies = sorted(x for per_worker in latencies for x in per_worker)
    ops = len(all_latencies)
    mean = sum(all_latencies) / ops
    stdev = math.sqrt(sum((x - mean) ** 2 for x in all_latencies) / (ops - 1)) if ops > 1 else 0.0
    user = cpu1.ru_utime - cpu0.ru_utime
    system = cpu1.ru_stime - cpu0.ru_stime
    result = {
        "client": "python dflockd-client async",
        "workers": args.workers,
        "rounds": args.rounds,
        "total_ops": ops,
        "wall_time_s": wall,
        "throughput_ops_per_s": ops / wall,
        "mean_ms": mean * 1000,
        "min_ms": all_latencies[0] * 1000,
        "max_ms": all_latencies[-1] * 1000,
        "p50_ms": percentile(all_latencies, 50) * 1000,
        "p99_ms": percentile(all_latencies, 99) * 1000,
        "stdev_ms": stdev * 1000,
        "cpu_user_s": user,
        "cpu_sys_s": system,
        "cpu_us_per_op": (user + system) / ops * 1e6,
        "peak_rss_kib": cpu1.ru_maxrss,
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"python bench: {args.workers} workers x {args.rounds} rounds (key_prefix={args.key!r})\n")
        for name, label, unit in [("total_ops", "total ops ", ""), ("wall_time_s", "wall time ", "s"),
                                  ("throughput_ops_per_s", "throughput", " ops/s"), ("mean_ms", "mean      ", " ms"),
                                  ("min_ms", "min       ", " ms"), ("max_ms", "max       ", " ms"),
                                  ("p50_ms", "p50       ", " ms"), ("p99_ms", "p99       ", " ms"),
                                  ("stdev_ms", "stdev     ", " ms"), ("cpu_us_per_op", "cpu/op    ", " us")]:
            value = result[name]
            print(f"  {label}: {value if isinstance(value, int) else f'{value:.3f}'}{unit}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
