"""``bidder bench``: the bidder's throughput as a ratio to hello-world Falcon, and its capacity.

In one run, on one Gunicorn configuration (``bidder serve`` with the same
options; the hello app is swapped in with ``--app``, so worker class, workers,
keep-alive and pinning are identical), a closed-loop load of a fixed number of
keep-alive connections for a fixed time measures the maximum throughput of
``loadtests.hello_app`` and of the full bidder with the same realistic
requests, interleaved (hello, bidder, bidder, hello, ...). Then a short capacity
search finds the bidder's highest open-loop rate with p99 under the SLA.

The load generator's own CPU use is reported: when it is near one full core
the generator, not the server, limited the hello-world number, which makes the
ratio look better than it is; on a 2-CPU machine it also takes CPU from the
server, so the numbers say what this box does, not what a server would.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import time
from typing import Any

from bidder.memcached_proc import EmbeddedMemcached
from bidder.settings import number
from loadtests import capacity, openloop, stack, stats, traffic
from loadtests.ab import interleaved_order

HELLO_APP = "loadtests.hello_app:app"
TARGET_RATIO = 0.6
SATURATED = 0.9  # generator CPU share of one core above which it is the bottleneck
CAPACITY_STEP_S, CAPACITY_WARMUP_S = 3.0, 1.0  # each step of the capacity search


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--duration", type=number(float, 0, exclusive=True), default=8.0,
                        help="Measured s per closed-loop run.")
    parser.add_argument("--warmup", type=number(float, 0), default=2.0,
                        help="Unmeasured s before each run.")
    parser.add_argument("--connections", type=number(int, 1), default=32,
                        help="Keep-alive connections.")
    parser.add_argument("--reps", type=number(int, 1), default=2,
                        help="Closed-loop runs per app (interleaved).")
    parser.add_argument("--serve", default="", help="bidder serve options, the same for both apps.")
    parser.add_argument("--users", type=number(int, 1), default=10_000, help="Users to seed.")
    parser.add_argument("--mix", default="",
                        help="Traffic mix NAME=VALUE,... (loadtests.traffic.Mix).")
    parser.add_argument("--sla-p99-ms", type=number(float, 0, exclusive=True), default=50.0,
                        help="p99 SLA of the capacity search.")
    parser.add_argument("--capacity-budget", type=number(float, 0), default=60.0,
                        help="Seconds for the capacity search (0 skips it).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the run order.")
    parser.add_argument("--out", default="bench-report", help="Directory for bench.json and logs.")


@stack.reports_errors("bench")
def run(args: argparse.Namespace) -> int:
    traffic.Mix.parse(args.mix)  # a bad --mix fails now, not after starting servers
    if args.capacity_budget > 0:  # 0 skips the search
        capacity.check_budget(args.capacity_budget, CAPACITY_WARMUP_S, CAPACITY_STEP_S)
    out = stack.workdir(args.out)
    logs = os.path.join(out, "logs")
    os.makedirs(logs, exist_ok=True)
    placement = stack.Placement.plan()
    stack.log(f"placement: {placement.note}")
    serve_args = shlex.split(args.serve)
    runs: list[dict[str, Any]] = []
    cap = None
    with EmbeddedMemcached() as memcached:
        placement.confine_helper(memcached.process.pid)
        stack.log(f"embedded memcached on {memcached.address}; seeding {args.users} users")
        stack.seed_users(memcached.address, args.users)
        for app in interleaved_order(["hello", "bidder"], args.reps, args.seed):
            result = closed_run(app, serve_args, memcached.address, logs, placement, args)
            runs.append(result)
            stack.log(f"{app}: {result['rps']:.0f} requests/s (p50 {result['p50_ms']:.2f} ms, "
                      f"p99 {result['p99_ms']:.2f} ms), {result['cpu_us_per_request']:.0f} us CPU/"
                      f"request, workers busy {result['server_cpus_busy']:.2f} CPUs, "
                      f"generator {result['generator_utilisation']:.0%} of a core, "
                      f"failed {result['failed']}")
        if args.capacity_budget > 0:
            bidder_rps = stats.mean([r["rps"] for r in runs if r["app"] == "bidder"])
            with stack.Server(serve_args, memcached.address, logs,
                              cpus=placement.server_cpus) as server:
                cap = capacity.search(server.url, args.sla_p99_ms, max(10.0, 0.4 * bidder_rps),
                                      1.3, 8, CAPACITY_STEP_S, CAPACITY_WARMUP_S,
                                      args.capacity_budget, 64, logs, args.users, args.mix,
                                      placement.generator_cpus)
    doc = summarise(runs, cap, placement, args)
    with open(os.path.join(out, "bench.json"), "w") as f:
        json.dump(doc, f, indent=2)
    print(format_summary(doc))
    return 0


def closed_run(app: str, serve_args: list[str], memcached: str, logs: str,
               placement: stack.Placement, args: argparse.Namespace) -> dict[str, Any]:
    """One server start, warm-up and closed-loop measurement of ``app`` (hello or bidder)."""
    gen_out = os.path.join(logs, "generator.json")
    with stack.Server(serve_args, memcached, logs, cpus=placement.server_cpus,
                      app=HELLO_APP if app == "hello" else None) as server:
        gen = dict(connections=args.connections, mix=args.mix, users=args.users,
                   cpus=placement.generator_cpus)
        openloop.run_process(openloop.command(server.url, args.warmup, None, out=gen_out, **gen),
                             gen_out, args.warmup + 60)
        workers = server.workers()
        before = stack.read_counters(workers)
        t0 = time.monotonic()
        load = openloop.run_process(openloop.command(server.url, args.duration, None,
                                                     out=gen_out, **gen), gen_out,
                                    args.duration + 60)
        cpu_s = (stack.read_counters(workers) - before).cpu_s
        busy = cpu_s / (time.monotonic() - t0)
    lat = load["latency"]
    return {"app": app, "rps": load["achieved_rps"], "requests": load["ok"],
            "failed": load["failed"], "p50_ms": lat["p50_ms"], "p99_ms": lat["p99_ms"],
            "nobid_share": load["nobid_share"], "server_cpus_busy": busy,
            "cpu_us_per_request": cpu_s * 1e6 / max(1, load["ok"]),
            "workers": len(workers), "generator_utilisation": load["generator_utilisation"]}


def summarise(runs: list[dict[str, Any]], cap: capacity.Capacity | None,
              placement: stack.Placement, args: argparse.Namespace) -> dict[str, Any]:
    apps = {app: [r for r in runs if r["app"] == app] for app in ("hello", "bidder")}
    rps = {app: stats.mean([r["rps"] for r in rs]) for app, rs in apps.items()}
    cpu = {app: stats.mean([r["cpu_us_per_request"] for r in rs]) for app, rs in apps.items()}
    ratio = rps["bidder"] / rps["hello"] if rps["hello"] else float("nan")
    gen_hello = max(r["generator_utilisation"] for r in apps["hello"])
    notes = [placement.note]
    if gen_hello > SATURATED:
        notes.append(f"the load generator used {gen_hello:.0%} of a core on the hello app: it, not "
                     "the server, limited hello-world throughput, so the ratio is an upper bound")
    return {
        "hello_rps": rps["hello"], "bidder_rps": rps["bidder"], "ratio": ratio,
        "hello_cpu_us_per_request": cpu["hello"], "bidder_cpu_us_per_request": cpu["bidder"],
        # what the throughput ratio would be if both were CPU-bound: robust to a noisy shared box
        "cpu_ratio": cpu["hello"] / cpu["bidder"] if cpu["bidder"] else float("nan"),
        "target_ratio": TARGET_RATIO, "ratio_met": ratio >= TARGET_RATIO,
        "capacity_rps_at_sla": cap.rate if cap else None,
        "capacity_bracketed": cap.bracketed if cap else None,
        "sla_p99_ms": args.sla_p99_ms, "serve": args.serve, "connections": args.connections,
        "duration_s": args.duration, "reps": args.reps, "runs": runs,
        "capacity": cap.as_dict() if cap else None, "notes": notes,
    }


def format_summary(doc: dict[str, Any]) -> str:
    lines = [f"bench: bidder serve {doc['serve'] or '(defaults)'}, {doc['connections']} keep-alive "
             f"connections, {doc['duration_s']:g} s closed loop x {doc['reps']} each",
             f"  hello-world Falcon: {doc['hello_rps']:8.0f} requests/s{_spread(doc, 'hello')}",
             f"  bidder:             {doc['bidder_rps']:8.0f} requests/s{_spread(doc, 'bidder')}",
             f"  ratio bidder/hello: {doc['ratio']:8.2f}   (target >= {doc['target_ratio']:g}: "
             f"{'met' if doc['ratio_met'] else 'NOT met'})",
             f"  worker CPU per request: hello {doc['hello_cpu_us_per_request']:.0f} us, bidder "
             f"{doc['bidder_cpu_us_per_request']:.0f} us (ratio {doc['cpu_ratio']:.2f}: the "
             "throughput ratio if both were CPU-bound)"]
    if doc["capacity_rps_at_sla"] is not None:
        bound = "" if doc["capacity_bracketed"] else " (budget ran out before a failing step)"
        lines.append(f"  bidder capacity at p99 <= {doc['sla_p99_ms']:g} ms: "
                     f"{doc['capacity_rps_at_sla']:.0f} requests/s (open loop){bound}")
    lines += [f"  note: {n}" for n in doc["notes"]]
    return "\n".join(lines)


def _spread(doc: dict[str, Any], app: str) -> str:
    """`` (runs: min-max)`` when there were several runs: a noisy box shows here first."""
    values = [r["rps"] for r in doc["runs"] if r["app"] == app]
    return f"  (runs {min(values):.0f}-{max(values):.0f})" if len(values) > 1 else ""
