"""Runs every benchmark client on one dflockd server, interleaved, and prints one table with
each client's ratios to the Go client (the dflockd project's own `cmd/bench`).

Clients (all the same workload: N workers x M rounds of acquire + release, each worker on its
own random key over one persistent connection):
  go cmd/bench         .tools/bin/bench (built by `make setup` from github.com/mtingers/dflockd)
  swift callbacks      dflockd-bench, completion handlers on the loop thread
  swift --metrics      the same, with swift-metrics bootstrapped to an in-process Prometheus registry
  swift --pipeline     dflockd-bench, release and next acquire written together
  swift --api async    dflockd-bench, async/await
  swift --api async-loop  dflockd-bench, async/await in tasks preferring the loop's executor
  swift window Nus     dflockd-bench --batching-window-us N          (optional: --window-us)
  python async         Benchmarks/python_bench.py, the PyPI dflockd-client
  C floor              Benchmarks/floor/floor.c, bare epoll           (optional: --floor)

Throughput, p50 and p99 are each client's own figures (it times its workers); client CPU per
op is measured here, the same way for every client: the child's user + system time from
wait4(2) (getrusage of the child, its whole life including start-up), divided by its ops. The
server's CPU per op comes from /proc/<pid>/stat around each run.

Run it under Tests/scripts/with-server (that is what `make bench` does): it reads the server's
port from DFLOCKD_PORT, its pid from DFLOCKD_SERVER_PID and its kind from DFLOCKD_SERVER_KIND.

    Tests/scripts/with-server --server go --max-locks 100000 -- .venv/bin/python Benchmarks/compare.py \\
        --go-bench .tools/bin/bench --bench .build/release/dflockd-bench --workers 100 --rounds 1000 \\
        --chart Benchmarks/results/bench-go.png --table Benchmarks/results/bench-go.txt
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
SERVER_NAMES = {"go": "dflockd 1.10.0 (Go)", "py": "dflockd 0.5.0 (Python)"}


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


def parse_go_bench(text: str) -> dict:
    """The figures of cmd/bench's text report ("  throughput: 48211.3 ops/s" etc.)."""
    def figure(name: str) -> float:
        match = re.search(rf"^\s*{name}\s*:\s*([0-9.]+)", text, re.MULTILINE)
        if not match:
            sys.exit(f"compare: cmd/bench printed no '{name}' line:\n{text}")
        return float(match.group(1))
    return {"total_ops": int(figure("total ops")), "throughput_ops_per_s": figure("throughput"),
            "p50_ms": figure("p50"), "p99_ms": figure("p99")}


def run(label: str, command: list[str], kind: str, server_pid: int | None) -> dict:
    """Runs one client to completion; its figures, with CPU from wait4 of the child."""
    print(f"compare: {label}: {' '.join(command)}", file=sys.stderr, flush=True)
    cpu0 = server_cpu_s(server_pid)
    machine0 = machine_ticks()
    t0 = time.monotonic()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    output = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    elapsed = time.monotonic() - t0
    cpu1 = server_cpu_s(server_pid)
    machine1 = machine_ticks()
    if child.returncode != 0:
        sys.exit(f"compare: {label} failed with status {child.returncode}:\n{output}")
    result = parse_go_bench(output) if kind == "go" else json.loads(output)
    result["label"] = label
    result["client_cpu_s"] = usage.ru_utime + usage.ru_stime
    result["cpu_us_per_op"] = result["client_cpu_s"] / result["total_ops"] * 1e6
    result["machine_busy"] = (machine1[0] - machine0[0]) / max(1, machine1[1] - machine0[1])
    if cpu0 is not None and cpu1 is not None:
        result["server_busy"] = (cpu1 - cpu0) / elapsed
        result["server_cpu_us_per_op"] = (cpu1 - cpu0) / result["total_ops"] * 1e6
    print(f"compare: {label}: {result['throughput_ops_per_s']:.1f} ops/s, p50 {result['p50_ms']:.3f} ms, "
          f"p99 {result['p99_ms']:.3f} ms, client CPU/op {result['cpu_us_per_op']:.2f} us, "
          f"all CPUs {result['machine_busy'] * 100:.0f} % busy", file=sys.stderr, flush=True)
    return result


def median_of(results: list[dict]) -> dict:
    """Each figure's median over the runs, with the throughput's and CPU/op's range."""
    merged = dict(results[0])
    for name, value in results[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            merged[name] = statistics.median(r[name] for r in results)
    for name in ("throughput_ops_per_s", "cpu_us_per_op"):
        values = [r[name] for r in results]
        merged[name + "_range"] = (min(values), max(values))
    return merged


def table(runs: list[dict], go: dict, header_lines: list[str]) -> str:
    lines = list(header_lines)
    lines.append("")
    head = (f"{'client':<22}{'ops/s':>9}{'[min..max]':>17}{'p50 ms':>8}{'p99 ms':>8}{'CPU/op us':>10}"
            f"{'[min..max]':>15}{'srv CPU/op':>11}{'x go ops/s':>11}{'x go CPU/op':>12}")
    lines.append(head)
    lines.append("-" * len(head))
    for r in runs:
        low, high = r["throughput_ops_per_s_range"]
        cpu_low, cpu_high = r["cpu_us_per_op_range"]
        server = f"{r['server_cpu_us_per_op']:.1f} us" if "server_cpu_us_per_op" in r else "n/a"
        lines.append(
            f"{r['label']:<22}{r['throughput_ops_per_s']:>9.0f}{f'[{low:.0f}..{high:.0f}]':>17}"
            f"{r['p50_ms']:>8.2f}{r['p99_ms']:>8.2f}{r['cpu_us_per_op']:>10.1f}"
            f"{f'[{cpu_low:.1f}..{cpu_high:.1f}]':>15}{server:>11}"
            f"{r['throughput_ops_per_s'] / go['throughput_ops_per_s']:>11.2f}"
            f"{r['cpu_us_per_op'] / go['cpu_us_per_op']:>12.2f}")
    lines.append("")
    lines.append("ops/s, p50, p99: each client's own timing of its workers. CPU/op: the client process's user + "
                 "system time (wait4 of the child, its whole life) / ops, the same for every client. srv CPU/op: "
                 "the server process's CPU over the run / ops. x go: ratio to the go cmd/bench row (CPU/op below "
                 "1 is less CPU than Go's client).")
    return "\n".join(lines)


def chart(runs: list[dict], title: str, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["label"] for r in runs]
    colors = ["#4c72b0" if r["label"].startswith("go ") else "#dd8452" if r["label"].startswith("swift")
              else "#55a868" if r["label"].startswith("python") else "#8c8c8c" for r in runs]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8), constrained_layout=True)
    for axis, name, unit in ((left, "throughput_ops_per_s", "ops/s (median, range of the runs)"),
                             (right, "cpu_us_per_op", "client CPU per op, us (median, range)")):
        values = [r[name] for r in runs]
        low = [r[name] - r[name + "_range"][0] for r in runs]
        high = [r[name + "_range"][1] - r[name] for r in runs]
        axis.barh(labels, values, xerr=[low, high], color=colors, capsize=3)
        axis.invert_yaxis()
        axis.set_xlabel(unit)
        axis.grid(axis="x", alpha=0.3)
        # The value inside the bar's base, clear of the range whiskers at its end.
        for y, value in enumerate(values):
            axis.text(max(values) * 0.01, y, f"{value:,.0f}" if name.startswith("throughput") else f"{value:.1f}",
                      va="center", ha="left", fontsize=8, color="white", fontweight="bold")
        axis.margins(x=0.05)
    right.set_yticklabels([])
    fig.suptitle(title, fontsize=10)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"compare: chart written to {path}", file=sys.stderr)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bench", required=True, help="path of the dflockd-bench binary")
    parser.add_argument("--go-bench", required=True, help="path of the Go cmd/bench binary (.tools/bin/bench)")
    parser.add_argument("--python", default=sys.executable, help="Python with dflockd-client installed")
    parser.add_argument("--floor", help="path of the floor binary built from Benchmarks/floor/floor.c")
    parser.add_argument("--window-us", type=int, default=300,
                        help="batching window of the 'swift window' run (EventLoop(batchingWindow:)); 0: no such row")
    parser.add_argument("--shared-connections", type=int, default=2,
                        help="the 'swift session' row: DistributedLocks on one LockSession with this many connections; 0: no such row")
    parser.add_argument("--workers", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=1000)
    parser.add_argument("--lease", type=int, default=10)
    parser.add_argument("--timeout", type=int, default=30)
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs of each client, interleaved; the table shows each figure's median")
    parser.add_argument("--only", metavar="LABELS",
                        help="comma-separated client labels (or their prefixes) to run; Go cmd/bench always runs "
                             "first, as every ratio's base (e.g. 'swift callbacks,swift session')")
    parser.add_argument("--chart", help="write a PNG chart of throughput and CPU per op here")
    parser.add_argument("--table", help="also write the table (text) here")
    parser.add_argument("--data", help="also write every run's figures (JSON) here")
    parser.add_argument("--replot", metavar="DATA",
                        help="draw --chart from a --data file of an earlier run, and run nothing")
    args = parser.parse_args()

    if args.replot:
        with open(args.replot) as f:
            saved = json.load(f)
        chart(saved["runs"], saved["title"], args.chart or os.path.splitext(args.replot)[0] + ".png")
        return 0

    port = os.environ.get("DFLOCKD_PORT")
    if not port:
        sys.exit("compare: DFLOCKD_PORT is not set; run under Tests/scripts/with-server")
    pid_text = os.environ.get("DFLOCKD_SERVER_PID")
    server_pid = int(pid_text) if pid_text else None
    server_kind = os.environ.get("DFLOCKD_SERVER_KIND", "py")
    servers = f"127.0.0.1:{port}"
    shape = ["--workers", str(args.workers), "--rounds", str(args.rounds), "--lease", str(args.lease),
             "--timeout", str(args.timeout)]
    common = ["--servers", servers, *shape, "--json"]

    clients = [
        ("go cmd/bench", "go", [args.go_bench, "--servers", servers, *shape]),
        ("swift callbacks", "json", [args.bench, *common]),
        ("swift --metrics", "json", [args.bench, *common, "--metrics"]),
        ("swift --pipeline", "json", [args.bench, *common, "--pipeline"]),
        ("swift --api async", "json", [args.bench, *common, "--api", "async"]),
        ("swift --api async-loop", "json", [args.bench, *common, "--api", "async-loop"]),
    ]
    if args.shared_connections > 0:
        clients.append((f"swift session {args.shared_connections}conn", "json",
                        [args.bench, *common, "--shared-connections", str(args.shared_connections)]))
    if args.window_us > 0:
        clients.append((f"swift window {args.window_us}us", "json",
                        [args.bench, *common, "--batching-window-us", str(args.window_us)]))
    clients.append(("python async", "json", [args.python, os.path.join(HERE, "python_bench.py"), *common]))
    if args.floor:
        clients.append(("C floor", "json", [args.floor, *common]))
    if args.only:
        wanted = [part.strip() for part in args.only.split(",") if part.strip()]
        unknown = [want for want in wanted if not any(label.startswith(want) for label, _, _ in clients)]
        if unknown:
            sys.exit(f"compare: --only names no client: {', '.join(unknown)}; the clients are: "
                     f"{', '.join(label for label, _, _ in clients)}")
        clients = [clients[0]] + [client for client in clients[1:] if any(client[0].startswith(want) for want in wanted)]
    # Interleaved, each round starting with the next client, so that a change in the machine's
    # other load falls on every client alike.
    samples: dict[str, list[dict]] = {label: [] for label, _, _ in clients}
    for round_index in range(args.repeat):
        for offset in range(len(clients)):
            label, kind, command = clients[(round_index + offset) % len(clients)]
            samples[label].append(run(label, command, kind, server_pid))
    runs = [median_of(samples[label]) for label, _, _ in clients]
    go = runs[0]

    load = os.getloadavg()
    server_name = SERVER_NAMES.get(server_kind, server_kind)
    header = [
        f"workload: {args.workers} workers x {args.rounds} rounds of acquire + release, each worker on its own key "
        f"and one persistent connection (lease {args.lease} s); each client run {args.repeat} times, interleaved: "
        f"medians, [min..max] of the runs",
        f"server:   {server_name} on {servers}; machine: {os.cpu_count()} CPUs, "
        f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} after the runs",
    ]
    text = table(runs, go, header)
    print()
    print(text)
    if args.table:
        os.makedirs(os.path.dirname(os.path.abspath(args.table)), exist_ok=True)
        with open(args.table, "w") as f:
            f.write(text + "\n")
    title = (f"{args.workers} workers x {args.rounds} rounds on {server_name}, "
             f"{args.repeat} interleaved run{'s' if args.repeat != 1 else ''} each")
    if args.data:
        os.makedirs(os.path.dirname(os.path.abspath(args.data)), exist_ok=True)
        with open(args.data, "w") as f:
            json.dump({"title": title, "header": header, "runs": runs, "samples": samples}, f, indent=1)
    if args.chart:
        chart(runs, title, args.chart)
    return 0


if __name__ == "__main__":
    sys.exit(main())
