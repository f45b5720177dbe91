"""Runs dflockd-bench and the Python client's benchmark on one server, one after the other,
and prints one table: throughput, p50, p99 and client CPU per op of each, with the ratios.

Run it under Tests/scripts/with-server (that is what `make bench` does): it reads the server's
port from DFLOCKD_PORT and, when set, its process id from DFLOCKD_SERVER_PID, to show how busy
the server was during each run (dflockd 0.5.0 is one Python process: near 100 % of a core
means the server, not the client, set the pace).

    Tests/scripts/with-server --max-locks 100000 -- .venv/bin/python Benchmarks/compare.py \\
        --bench .build/release/dflockd-bench --floor .build/dflockd-floor --workers 100 --rounds 500

With --floor it also runs Benchmarks/floor/floor.c, the same workload with bare epoll and one
write per request: the least CPU per op any client can spend here, almost all of it the
kernel's loopback TCP, against which the CPU target is judged reachable or not.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def server_cpu_s(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    # fields[0] is the state (field 3); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def machine_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs so far, from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return sum(values) - idle, sum(values)


def run(label: str, command: list[str], server_pid: int | None) -> dict:
    print(f"compare: {label}: {' '.join(command)}", file=sys.stderr, flush=True)
    cpu0 = server_cpu_s(server_pid)
    machine0 = machine_ticks()
    t0 = time.monotonic()
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    elapsed = time.monotonic() - t0
    cpu1 = server_cpu_s(server_pid)
    machine1 = machine_ticks()
    if done.returncode != 0:
        sys.exit(f"compare: {label} failed with status {done.returncode}")
    result = json.loads(done.stdout)
    result["label"] = label
    result["machine_busy"] = (machine1[0] - machine0[0]) / max(1, machine1[1] - machine0[1])
    if cpu0 is not None and cpu1 is not None:
        result["server_busy"] = (cpu1 - cpu0) / elapsed
        result["server_cpu_us_per_op"] = (cpu1 - cpu0) / result["total_ops"] * 1e6
    print(f"compare: {label}: {result['throughput_ops_per_s']:.1f} ops/s, p50 {result['p50_ms']:.3f} ms, "
          f"p99 {result['p99_ms']:.3f} ms, CPU/op {result['cpu_us_per_op']:.2f} us, "
          f"all CPUs {result['machine_busy'] * 100:.0f} % busy", file=sys.stderr, flush=True)
    return result


def median_of(results: list[dict]) -> dict:
    """Each numeric figure's median over the runs, and the throughput's spread."""
    merged = dict(results[0])
    for name, value in results[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            merged[name] = statistics.median(r[name] for r in results)
    throughputs = [r["throughput_ops_per_s"] for r in results]
    merged["throughput_range"] = (min(throughputs), max(throughputs))
    return merged


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bench", required=True, help="path of the dflockd-bench binary")
    parser.add_argument("--python", default=sys.executable, help="Python with dflockd-client installed")
    parser.add_argument("--floor", help="path of the floor binary built from Benchmarks/floor/floor.c")
    parser.add_argument("--window-us", type=int, default=300,
                        help="batching window of the 'swift window' run (EventLoop(batchingWindow:))")
    parser.add_argument("--workers", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=500)
    parser.add_argument("--lease", type=int, default=10)
    parser.add_argument("--timeout", type=int, default=30)
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs of each client, interleaved; the table shows each figure's median")
    args = parser.parse_args()

    port = os.environ.get("DFLOCKD_PORT")
    if not port:
        sys.exit("compare: DFLOCKD_PORT is not set; run under Tests/scripts/with-server")
    pid_text = os.environ.get("DFLOCKD_SERVER_PID")
    server_pid = int(pid_text) if pid_text else None
    common = ["--servers", f"127.0.0.1:{port}", "--workers", str(args.workers), "--rounds", str(args.rounds),
              "--lease", str(args.lease), "--timeout", str(args.timeout), "--json"]

    window = ["--batching-window-us", str(args.window_us)]
    clients = [
        ("swift callbacks", [args.bench, *common]),
        (f"swift window {args.window_us}us", [args.bench, *common, *window]),
        ("swift --pipeline", [args.bench, *common, "--pipeline"]),
        ("swift --api async", [args.bench, *common, "--api", "async"]),
        ("swift --api async-loop", [args.bench, *common, "--api", "async-loop"]),
        ("python async", [args.python, os.path.join(HERE, "python_bench.py"), *common]),
    ]
    if args.floor:
        clients += [
            ("C floor", [args.floor, *common]),
            (f"C floor window {args.window_us}us", [args.floor, *common, *window]),
        ]
    # Interleaved, and each round starting with the next client, so that a change in the
    # machine's other load falls on every client alike.
    samples: dict[str, list[dict]] = {label: [] for label, _ in clients}
    for round_index in range(args.repeat):
        for offset in range(len(clients)):
            label, command = clients[(round_index + offset) % len(clients)]
            samples[label].append(run(label, command, server_pid))
    runs = [median_of(samples[label]) for label, _ in clients]
    swift, windowed, pipelined, python = runs[0], runs[1], runs[2], runs[4]
    floors = [r for r in runs if r["label"].startswith("C floor")]

    load = os.getloadavg()
    print()
    print(f"workload: {args.workers} workers x {args.rounds} rounds of acquire + release, each worker on its own key "
          f"and one persistent connection (lease {args.lease} s); each client run {args.repeat} times, interleaved: "
          f"medians, throughput range in brackets")
    print(f"server:   dflockd 0.5.0 (Python) on 127.0.0.1:{port}; machine: {os.cpu_count()} CPUs, "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} after the runs")
    print()
    header = (f"{'client':<26}{'ops/s':>9}{'[min..max]':>17}{'p50 ms':>9}{'p99 ms':>9}{'CPU/op us':>11}"
              f"{'server busy':>13}{'all CPUs busy':>15}")
    print(header)
    print("-" * len(header))
    for r in runs:
        busy = f"{r['server_busy'] * 100:.0f} %" if "server_busy" in r else "n/a"
        low, high = r["throughput_range"]
        spread = f"[{low:.0f}..{high:.0f}]"
        print(f"{r['label']:<26}{r['throughput_ops_per_s']:>9.1f}{spread:>17}{r['p50_ms']:>9.3f}{r['p99_ms']:>9.3f}"
              f"{r['cpu_us_per_op']:>11.2f}{busy:>13}{r['machine_busy'] * 100:>13.0f} %")
    print("(server busy: the dflockd process's CPU time over the run, in % of one core; all CPUs busy: "
          "the whole machine, every process, from /proc/stat)")
    print()

    def ratio(name: str, a: dict, b: dict) -> float:
        return a[name] / b[name]

    def ratios(a: dict, b: dict) -> str:
        return (f"throughput x{ratio('throughput_ops_per_s', a, b):.2f}, p50 x{ratio('p50_ms', a, b):.2f}, "
                f"p99 x{ratio('p99_ms', a, b):.2f}, CPU/op x{ratio('cpu_us_per_op', a, b):.3f} "
                f"(1/{b['cpu_us_per_op'] / a['cpu_us_per_op']:.1f})")

    print(f"{'swift callbacks / python async:':<40}{ratios(swift, python)}")
    print(f"{windowed['label'] + ' / python async:':<40}{ratios(windowed, python)}")
    print(f"{'swift --pipeline / callbacks:':<40}throughput x{ratio('throughput_ops_per_s', pipelined, swift):.2f}, "
          f"CPU/op x{ratio('cpu_us_per_op', pipelined, swift):.3f}")
    for floor in floors:
        print(f"{floor['label'] + ' / python async:':<40}{ratios(floor, python)}")
    print()
    def at_least(a: dict, b: dict) -> str:
        """A throughput target: met by the medians, or missed within or beyond the runs' spread."""
        if a["throughput_ops_per_s"] >= b["throughput_ops_per_s"]:
            return "met"
        if a["throughput_range"][1] >= b["throughput_range"][0]:
            return "NOT met by the medians, within the run-to-run spread"
        return "NOT met"

    cpu_limit = python["cpu_us_per_op"] / 8
    best = min((swift, windowed, pipelined), key=lambda r: r["cpu_us_per_op"])
    cpu_verdict = "met" if best["cpu_us_per_op"] <= cpu_limit else "NOT met"
    cpu_verdict += f" (best: {best['label']}, {best['cpu_us_per_op']:.1f} us; limit {cpu_limit:.1f} us"
    if floors:
        lowest = min(floors, key=lambda r: r["cpu_us_per_op"])
        reachable = "reachable" if lowest["cpu_us_per_op"] <= cpu_limit else "below what even the C floor spends"
        cpu_verdict += f"; C floor at best {lowest['cpu_us_per_op']:.1f} us: the limit is {reachable}"
    cpu_verdict += ")"
    checks = [
        ("client CPU per op <= 1/8 of python's", cpu_verdict),
        ("throughput >= python's (callbacks)", at_least(swift, python)),
        (f"throughput >= python's ({windowed['label']})", at_least(windowed, python)),
        ("--pipeline no slower than without", at_least(pipelined, swift)),
    ]
    for name, verdict in checks:
        print(f"  target {name:<46} {verdict}")
    for r in (swift, windowed):
        describe_server(r)
    return 0


def describe_server(run: dict) -> None:
    if "server_busy" in run:
        if run["server_busy"] >= 0.8:
            verdict = "the server sets the pace"
        elif run["machine_busy"] >= 0.9:
            verdict = "every CPU of the machine was busy: the server (and the clients) waited for CPU, not for each other"
        else:
            verdict = "the server had room to spare"
        print(f"  during the {run['label']} run the server used {run['server_busy'] * 100:.0f} % of one core "
              f"({run['server_cpu_us_per_op']:.0f} us of server CPU per op) and the machine was "
              f"{run['machine_busy'] * 100:.0f} % busy: {verdict}")


if __name__ == "__main__":
    sys.exit(main())
