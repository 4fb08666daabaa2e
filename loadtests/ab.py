"""``bidder ab``: two server configurations, everything else equal, interleaved repetitions.

Default: pinned workers (``--pin``) against unpinned (``--no-pin``); any other
pair of ``bidder serve`` options works the same way (``--a "--slice-ms 3"
--b "--slice-ms off"``). Each run restarts the server (fresh processes, fresh
caches), warms it up, then offers the same open-loop rate for the same time and
reads what the workers spent: CPU time, migrations and context switches from
``/proc``, hardware counters from ``perf stat`` when the machine has them. The
order of the runs is randomised in pairs (AB or BA, so drift over time hits
both arms alike), and arms are compared over repetitions with bootstrap CIs and
a permutation test (``loadtests.stats.compare``).
"""
from __future__ import annotations

import argparse
import os
import platform
import random
import shlex
import time
from typing import Any

from bidder import settings as settings_mod
from loadtests.memcached_proc import EmbeddedMemcached
from bidder.settings import number
from loadtests import openloop, perf, report, stack, stats, traffic

# The per-run metrics compared between arms (lower is better for all but rps).
PER_REQUEST = ("cpu_us_per_request", "migrations_per_request", "context_switches_per_request",
               "voluntary_cs_per_request", "involuntary_cs_per_request", "cycles_per_request",
               "instructions_per_request", "cache_misses_per_request")
METRICS = ("rps", "p50_ms", "p99_ms", "p99_9_ms") + PER_REQUEST
NOT_FORWARDED = ("bind", "pid", "memcached")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--duration", type=number(float, 0, exclusive=True), default=10.0,
                        help="Measured seconds per run.")
    parser.add_argument("--reps", type=number(int, 1), default=3, help="Runs per arm.")
    parser.add_argument("--rate", type=number(float, 0, exclusive=True), default=200.0,
                        help="Offered open-loop requests/s.")
    parser.add_argument("--warmup", type=number(float, 0), default=2.0,
                        help="Unmeasured seconds per run first.")
    parser.add_argument("--connections", type=number(int, 1), default=32,
                        help="Keep-alive connections of the load generator.")
    parser.add_argument("--out", default="ab-report", help="Directory for the report files.")
    parser.add_argument("--a", default="--pin", help="bidder serve options of arm A.")
    parser.add_argument("--b", default="--no-pin", help="bidder serve options of arm B.")
    parser.add_argument("--a-name", default=None, help="Name of arm A (default: pinned for the "
                        "default arms, else the options).")
    parser.add_argument("--b-name", default=None, help="Name of arm B.")
    parser.add_argument("--users", type=number(int, 1), default=10_000, help="Users to seed.")
    parser.add_argument("--mix", default="",
                        help="Traffic mix NAME=VALUE,... (loadtests.traffic.Mix).")
    parser.add_argument("--seed", type=int, default=0,
                        help="Seed of the run order and the traffic.")
    parser.add_argument("--alpha", type=float, default=0.05, help="Significance level.")
    settings_mod.add_arguments(parser, "ab")


@stack.reports_errors("ab")
def run(args: argparse.Namespace) -> int:
    traffic.Mix.parse(args.mix)  # a bad --mix fails now, not after starting servers
    arms = _arms(args)
    out = stack.workdir(args.out)
    common = _forwarded(args)
    placement = stack.Placement.plan()
    perf_state = perf.probe()
    stack.log(f"placement: {placement.note}")
    stack.log(f"perf: {perf_state.reason}")
    order = interleaved_order(list(arms), args.reps, args.seed)
    stack.log(f"{len(order)} runs of {args.duration:g} s at {args.rate:g}/s, order "
              + " ".join(order))
    memcached = None
    try:
        if args.memcached:
            address = args.memcached
        else:
            memcached = EmbeddedMemcached().start()
            placement.confine_helper(memcached.process.pid)
            address = memcached.address
            stack.log(f"embedded memcached on {address}; seeding {args.users} users")
            stack.seed_users(address, args.users)
        runs = []
        for i, name in enumerate(order):
            stack.log(f"run {i + 1}/{len(order)}: {name} ({shlex.join(arms[name])})")
            result = run_once(common + arms[name], address, out, placement, args,
                              perf_state.usable)
            result.update(arm=name, index=i)
            runs.append(result)
            stack.log(f"  {name}: {result['requests']} answers, {result['rps']:.0f}/s, "
                      f"p99 {result['p99_ms']:.2f} ms, "
                      f"cpu {result['cpu_us_per_request']:.0f} us/req, "
                      f"migrations {result['migrations_per_request']:.3f}/req, "
                      f"failed {result['failed']}, "
                      f"other load {result['other_cpus_busy']:.2f} CPUs")
    finally:
        if memcached is not None:
            memcached.stop()
    doc = build_report(runs, arms, common, placement, perf_state, args)
    paths = report.write(doc, runs, out)
    stack.log("wrote " + ", ".join(paths))
    return 0


def _arms(args: argparse.Namespace) -> dict[str, list[str]]:
    a, b = shlex.split(args.a), shlex.split(args.b)
    default = args.a == "--pin" and args.b == "--no-pin"
    a_name = args.a_name or ("pinned" if default else args.a or "A")
    b_name = args.b_name or ("unpinned" if default else args.b or "B")
    if a_name == b_name:
        raise SystemExit(f"bidder ab: both arms are named {a_name!r}; give --a-name/--b-name")
    return {a_name: a, b_name: b}


def _forwarded(args: argparse.Namespace) -> list[str]:
    """Server settings given to ``bidder ab`` itself, as ``bidder serve`` flags for both arms."""
    out: list[str] = []
    for s in settings_mod.SETTINGS:
        value = getattr(args, s.name, None)
        if value is None or s.name in NOT_FORWARDED or "ab" not in s.commands:
            continue
        if s.boolean:
            out.append(s.flag if value else "--no-" + s.flag[2:])
        else:
            out += [s.flag, str(value)]
    return out


def interleaved_order(arms: list[str], reps: int, seed: int) -> list[str]:
    """``reps`` pairs, each in random order (AB or BA): ABBA..., never AAA BBB."""
    rng = random.Random(seed)
    order: list[str] = []
    for _ in range(reps):
        pair = list(arms)
        rng.shuffle(pair)
        order += pair
    return order


def run_once(serve_args: list[str], memcached: str, out: str, placement: stack.Placement,
             args: argparse.Namespace, use_perf: bool) -> dict[str, Any]:
    """Start a server, warm it, measure one open-loop run, stop it; the run's metrics."""
    logs = os.path.join(out, "logs")
    os.makedirs(logs, exist_ok=True)
    gen_out = os.path.join(logs, "generator.json")
    with stack.Server(serve_args, memcached, logs, cpus=placement.server_cpus) as server:
        gen = dict(connections=args.connections, mix=args.mix, users=args.users, seed=args.seed,
                   cpus=placement.generator_cpus)
        if args.warmup > 0:
            openloop.run_process(openloop.command(server.url, args.warmup, args.rate, out=gen_out,
                                                  **gen), gen_out, args.warmup + 60)
        workers = server.workers()
        counter = perf.PerfStat(workers) if use_perf else None
        before = stack.read_counters(workers)
        busy0, steal0 = stack.system_cpu()
        t0 = time.monotonic()
        load = openloop.run_process(openloop.command(server.url, args.duration, args.rate,
                                                     out=gen_out, **gen), gen_out,
                                    args.duration + 60)
        wall = time.monotonic() - t0
        delta = stack.read_counters(workers) - before
        busy1, steal1 = stack.system_cpu()
        hw = counter.stop() if counter else {}
        restarted = sorted(set(server.workers()) - set(workers))
    n = max(1, load["ok"])
    lat = load["latency"]
    result: dict[str, Any] = {
        "requests": load["ok"], "sent": load["sent"], "failed": load["failed"],
        "rps": load["achieved_rps"], "offered_rps": args.rate,
        "p50_ms": lat["p50_ms"], "p90_ms": lat["p90_ms"], "p99_ms": lat["p99_ms"],
        "p99_9_ms": lat["p99_9_ms"], "max_ms": lat["max_ms"], "nobid_share": load["nobid_share"],
        "cpu_us_per_request": delta.cpu_s * 1e6 / n,
        "migrations_per_request": delta.migrations / n,
        "context_switches_per_request": (delta.voluntary + delta.involuntary) / n,
        "voluntary_cs_per_request": delta.voluntary / n,
        "involuntary_cs_per_request": delta.involuntary / n,
        "worker_cpu_utilisation": delta.cpu_s / wall if wall else 0.0,
        # CPUs' worth of everything else on the machine (neighbours, memcached, master, ...)
        "other_cpus_busy": max(0.0, (busy1 - busy0) - delta.cpu_s - load["generator_cpu_s"]) / wall,
        "steal_cpus": (steal1 - steal0) / wall,
        "workers": len(workers), "workers_restarted": restarted,
        "statuses": load["statuses"], "errors": load["errors"], "histogram": load["histogram"],
    }
    for event, count in hw.items():
        result[event.replace("-", "_") + "_per_request"] = count / n
    return result


def build_report(runs: list[dict[str, Any]], arms: dict[str, list[str]], common: list[str],
                 placement: stack.Placement, perf_state: perf.Availability,
                 args: argparse.Namespace) -> dict[str, Any]:
    """report.json: per-arm aggregates, A/B ratios with CIs, and the machine it ran on."""
    names = list(arms)
    by_arm = {name: [r for r in runs if r["arm"] == name] for name in names}
    doc_arms: dict[str, Any] = {}
    for name, reps in by_arm.items():
        merged = stats.merge([stats.decode(r["histogram"]) for r in reps])
        summary = stats.summary_ms(merged)
        arm: dict[str, Any] = {
            "serve_args": shlex.join(common + arms[name]), "reps": len(reps),
            "requests": sum(r["requests"] for r in reps), "failed": sum(r["failed"] for r in reps),
            "rps": stats.mean([r["rps"] for r in reps]),
            "p50_ms": summary["p50_ms"], "p90_ms": summary["p90_ms"], "p99_ms": summary["p99_ms"],
            "p99_9_ms": summary["p99_9_ms"], "max_ms": summary["max_ms"],
            "nobid_share": stats.mean([r["nobid_share"] for r in reps]),
            "other_cpus_busy": stats.mean([r["other_cpus_busy"] for r in reps]),
            "steal_cpus": stats.mean([r["steal_cpus"] for r in reps]),
        }
        for metric in PER_REQUEST:
            values = [r[metric] for r in reps if metric in r]
            if values:
                arm[metric] = stats.mean(values)
        arm["per_rep"] = {m: [r.get(m) for r in reps] for m in METRICS if m in reps[0]}
        doc_arms[name] = arm
    a, b = names
    ratios: dict[str, Any] = {}
    for metric in METRICS:
        va = [r[metric] for r in by_arm[a] if metric in r]
        vb = [r[metric] for r in by_arm[b] if metric in r]
        if va and vb:
            ratios[metric] = {"of": f"{a}/{b}", **stats.compare(va, vb, args.alpha,
                                                                args.seed).as_dict()}
    return {
        "arms": doc_arms, "ratios": ratios,
        "machine": machine_info(placement, perf_state),
        "config": {"duration_s": args.duration, "reps": args.reps, "rate": args.rate,
                   "warmup_s": args.warmup, "connections": args.connections, "users": args.users,
                   "mix": args.mix, "seed": args.seed, "alpha": args.alpha,
                   "order": [r["arm"] for r in runs],
                   "load_generator": "loadtests.openloop (gevent + geventhttpclient, open loop, "
                                     "latency from intended send time)"},
    }


def machine_info(placement: stack.Placement, perf_state: perf.Availability) -> dict[str, Any]:
    model = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpus": len(os.sched_getaffinity(0)), "cpu_model": model,
            "kernel": platform.release(), "python": platform.python_version(),
            "load_generator_separated": placement.separated, "placement": placement.note,
            "perf": perf_state.reason, "perf_usable": perf_state.usable}

