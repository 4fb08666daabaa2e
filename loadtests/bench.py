"""``bidder bench``: the bidder against stock Gunicorn's hello world, and its capacity.

In one run, a closed-loop load of a fixed number of keep-alive connections for a
fixed time, with the same realistic requests, measures the throughput and the
worker CPU per request of, interleaved in random order each rep:

- the full bidder (``bidder serve`` with ``--serve`` options; the headline);
- ``loadtests.hello_app`` on *stock* Gunicorn, ``gunicorn -k gthread`` and
  ``gunicorn -k sync`` with as many workers as the bidder: Gunicorn's own HTTP
  path, nothing of ours (what a team would start from);
- ``loadtests.hello_app`` through the very same ``bidder serve`` (``--app``), so
  worker class, workers, keep-alive and pinning are identical: the cost of the
  bid logic alone;
- the bidder again with ``--baseline`` options added (default ``--no-fast-path``:
  every request through Gunicorn's own parser, as before the worker had its own
  path, so none of the poll's look-ups are read together either): what the
  worker path saves per bid request, measured in the same run.

Then a short capacity search finds the bidder's highest open-loop rate with p99
under the SLA. ``--overload`` instead drives the bidder past its capacity
(``loadtests.overload``).

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
import sys
import time
from typing import Any

from bidder import settings
from loadtests.memcached_proc import EmbeddedMemcached
from bidder.serve import default_workers
from bidder.settings import number
from loadtests import capacity, openloop, overload, stack, stats, traffic
from loadtests.ab import interleaved_order

HELLO_APP = "loadtests.hello_app:app"
STOCK = {"stock-gthread": "gthread", "stock-sync": "sync"}  # run name -> gunicorn -k
TARGET_RATIO = 0.6  # bidder / hello-world on the same server configuration
STOCK_TARGET_RATIO = 1.0  # bidder / hello-world on stock Gunicorn
BASELINE_TARGET = -0.30  # bidder's worker CPU per request against the baseline's
SATURATED = 0.9  # generator CPU share of one core above which it is the bottleneck
CAPACITY_STEP_S, CAPACITY_WARMUP_S = 3.0, 1.0  # each step of the capacity search
DEFAULT_REPS = 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--duration", type=number(float, 0, exclusive=True), default=8.0,
                        help="Measured s per closed-loop run.")
    parser.add_argument("--warmup", type=number(float, 0), default=2.0,
                        help="Unmeasured s before each run.")
    parser.add_argument("--connections", type=number(int, 1), default=32,
                        help="Keep-alive connections.")
    parser.add_argument("--reps", type=number(int, 1), default=None,
                        help=f"Closed-loop runs per app, interleaved (default {DEFAULT_REPS}); "
                             "with --overload, rounds of its four runs, pooled per run "
                             f"(default {overload.DEFAULT_REPS}).")
    parser.add_argument("--serve", default="",
                        help="bidder serve options, the same for the bidder and hello-world.")
    parser.add_argument("--baseline", default="--no-fast-path",
                        help="bidder serve options added to --serve for a second bidder run "
                             "(the 'before' of the CPU per request; 'none': no such run).")
    parser.add_argument("--stock", default="gthread,sync",
                        help="Stock Gunicorn worker classes to compare with, comma-separated "
                             "('none': only the same-configuration comparison).")
    parser.add_argument("--overload", action="store_true",
                        help="Drive the bidder past capacity instead: 4x and 32x the normal "
                             "connections and an open loop at 2x its capacity (bids/s, "
                             "no-bids/s, p99, unanswered; overload.json and overload.png).")
    parser.add_argument("--users", type=number(int, 1), default=10_000, help="Users to seed.")
    parser.add_argument("--unix-memcached", action="store_true",
                        help="The embedded memcached listens on a Unix socket (--memcached "
                             "unix:PATH, as a co-located one would) instead of loopback TCP.")
    parser.add_argument("--mix", default="",
                        help="Traffic mix NAME=VALUE,... (loadtests.traffic.Mix).")
    parser.add_argument("--sla-p99-ms", type=number(float, 0, exclusive=True), default=50.0,
                        help="p99 SLA of the capacity search.")
    parser.add_argument("--capacity-budget", type=number(float, 0), default=60.0,
                        help="Seconds for the capacity search (0 skips it).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the run order.")
    parser.add_argument("--out", default="bench-report", help="Directory for bench.json and logs.")


def stock_classes(spec: str) -> list[str]:
    """``--stock gthread,sync`` -> the run names; ValueError naming what is allowed."""
    if spec.strip().lower() == "none":
        return []
    names = [f"stock-{k.strip()}" for k in spec.split(",") if k.strip()]
    unknown = [n.removeprefix("stock-") for n in names if n not in STOCK]
    if unknown:
        raise ValueError(f"--stock {spec!r}: {', '.join(unknown)} not known; use gthread, sync "
                         "or both comma-separated, or none")
    return names


def serve_workers(serve_args: list[str]) -> int:
    """How many workers ``bidder serve SERVE_ARGS`` starts (stock Gunicorn gets as many)."""
    parser = argparse.ArgumentParser(add_help=False)
    settings.add_arguments(parser, "serve")
    s = settings.resolve(parser.parse_args(serve_args))
    return s.workers or default_workers(s)


class StockGunicorn(stack.Server):
    """Hello-world Falcon on stock Gunicorn (``python -m gunicorn -k CLASS -w N``): Gunicorn's
    own worker class and HTTP path, no hooks, settings or worker of ours."""

    def __init__(self, worker_class: str, workers: int, workdir: str,
                 cpus: str | None = None) -> None:
        super().__init__([], "none", workdir, cpus=cpus, app=HELLO_APP)
        self.admin_url = self.url  # no admin listener: hello-world answers /readyz on its port
        self.worker_class = worker_class
        self.n_workers = workers

    def argv(self) -> list[str]:
        argv = [sys.executable, "-m", "gunicorn", "--worker-class", self.worker_class,
                "--workers", str(self.n_workers), "--bind", f"127.0.0.1:{self.port}",
                "--pid", self.pidfile, HELLO_APP]
        return (["taskset", "-c", self.cpus] if self.cpus else []) + argv


@stack.reports_errors("bench")
def run(args: argparse.Namespace) -> int:
    traffic.Mix.parse(args.mix)  # a bad --mix fails now, not after starting servers
    if args.overload:
        return overload.run(args)
    args.reps = args.reps or DEFAULT_REPS
    stock = stock_classes(args.stock)
    if args.capacity_budget > 0:  # 0 skips the search
        capacity.check_budget(args.capacity_budget, CAPACITY_WARMUP_S, CAPACITY_STEP_S)
    out = stack.workdir(args.out)
    logs = os.path.join(out, "logs")
    os.makedirs(logs, exist_ok=True)
    placement = stack.Placement.plan()
    stack.log(f"placement: {placement.note}")
    serve_args = shlex.split(args.serve)
    workers = serve_workers(serve_args)
    runs: list[dict[str, Any]] = []
    cap = None
    with EmbeddedMemcached(unix_socket=args.unix_memcached) as memcached:
        placement.confine_helper(memcached.process.pid)
        stack.log(f"embedded memcached on {memcached.address}; seeding {args.users} users")
        stack.seed_users(memcached.address, args.users)
        baseline = [] if args.baseline.strip().lower() == "none" else ["baseline"]
        for app in interleaved_order(stock + ["hello", "bidder"] + baseline, args.reps,
                                     args.seed):
            if app in STOCK:
                server: stack.Server = StockGunicorn(STOCK[app], workers, logs,
                                                     placement.server_cpus)
            elif app == "baseline":
                server = stack.Server(serve_args + shlex.split(args.baseline), memcached.address,
                                      logs, cpus=placement.server_cpus)
            else:
                server = stack.Server(serve_args, memcached.address, logs,
                                      cpus=placement.server_cpus,
                                      app=HELLO_APP if app == "hello" else None)
            result = closed_run(app, server, workers, logs, placement, args)
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
    doc = summarise(runs, cap, placement, args, workers)
    with open(os.path.join(out, "bench.json"), "w") as f:
        json.dump(doc, f, indent=2)
    plot(doc, os.path.join(out, "bench.png"))
    print(format_summary(doc))
    stack.log(f"wrote {out}/bench.json, {out}/bench.png")
    return 0


def closed_run(app: str, server: stack.Server, workers: int, logs: str,
               placement: stack.Placement, args: argparse.Namespace) -> dict[str, Any]:
    """One server start, warm-up and closed-loop measurement of ``app``."""
    gen_out = os.path.join(logs, "generator.json")
    server.start(workers=workers)
    try:
        gen = dict(connections=args.connections, mix=args.mix, users=args.users,
                   cpus=placement.generator_cpus)
        openloop.run_process(openloop.command(server.url, args.warmup, None, out=gen_out, **gen),
                             gen_out, args.warmup + 60)
        pids = server.workers()
        before = stack.read_counters(pids)
        t0 = time.monotonic()
        load = openloop.run_process(openloop.command(server.url, args.duration, None,
                                                     out=gen_out, **gen), gen_out,
                                    args.duration + 60)
        cpu_s = (stack.read_counters(pids) - before).cpu_s
        busy = cpu_s / (time.monotonic() - t0)
    finally:
        server.stop()
    lat = load["latency"]
    return {"app": app, "rps": load["achieved_rps"], "requests": load["ok"],
            "failed": load["failed"], "p50_ms": lat["p50_ms"], "p99_ms": lat["p99_ms"],
            "nobid_share": load["nobid_share"], "server_cpus_busy": busy,
            "cpu_us_per_request": cpu_s * 1e6 / max(1, load["ok"]),
            "workers": len(pids), "generator_utilisation": load["generator_utilisation"]}


def summarise(runs: list[dict[str, Any]], cap: capacity.Capacity | None,
              placement: stack.Placement, args: argparse.Namespace,
              workers: int) -> dict[str, Any]:
    names = list(dict.fromkeys(r["app"] for r in runs))
    apps = {app: [r for r in runs if r["app"] == app] for app in names}
    rps = {app: stats.mean([r["rps"] for r in rs]) for app, rs in apps.items()}
    cpu = {app: stats.mean([r["cpu_us_per_request"] for r in rs]) for app, rs in apps.items()}

    def versus(other: str, target: float) -> dict[str, Any]:
        ratio = rps["bidder"] / rps[other] if rps[other] else float("nan")
        return {"rps": rps[other], "cpu_us_per_request": cpu[other], "ratio": ratio,
                # the throughput ratio if both were CPU-bound: robust to a noisy shared box
                "cpu_ratio": cpu[other] / cpu["bidder"] if cpu["bidder"] else float("nan"),
                "target_ratio": target, "ratio_met": ratio >= target}

    notes = [placement.note]
    for app in names:
        if app == "bidder":
            continue
        gen = max(r["generator_utilisation"] for r in apps[app])
        if gen > SATURATED:
            notes.append(f"the load generator used {gen:.0%} of a core on {app}: it, not the "
                         f"server, limited that throughput, so ratios to it are upper bounds")
    if any(r["workers"] != workers for r in runs):
        notes.append(f"not every server ran {workers} workers: "
                     + ", ".join(sorted({f"{r['app']} {r['workers']}" for r in runs})))
    same = versus("hello", TARGET_RATIO)
    before = None
    if "baseline" in apps:
        change = cpu["bidder"] / cpu["baseline"] - 1 if cpu["baseline"] else float("nan")
        before = {"serve": args.baseline, "rps": rps["baseline"],
                  "cpu_us_per_request": cpu["baseline"], "cpu_change": change,
                  "target_change": BASELINE_TARGET, "met": change <= BASELINE_TARGET}
    return {
        "stock": {STOCK[app]: versus(app, STOCK_TARGET_RATIO) for app in names if app in STOCK},
        "baseline": before,
        "hello_rps": rps["hello"], "bidder_rps": rps["bidder"], "ratio": same["ratio"],
        "hello_cpu_us_per_request": cpu["hello"], "bidder_cpu_us_per_request": cpu["bidder"],
        "cpu_ratio": same["cpu_ratio"], "target_ratio": TARGET_RATIO,
        "ratio_met": same["ratio_met"], "stock_target_ratio": STOCK_TARGET_RATIO,
        "capacity_rps_at_sla": cap.rate if cap else None,
        "capacity_bracketed": cap.bracketed if cap else None,
        "sla_p99_ms": args.sla_p99_ms, "serve": args.serve, "workers": workers,
        "memcached": "unix" if args.unix_memcached else "tcp",
        "connections": args.connections, "duration_s": args.duration, "reps": args.reps,
        "runs": runs, "capacity": cap.as_dict() if cap else None, "notes": notes,
    }


def format_summary(doc: dict[str, Any]) -> str:
    lines = [f"bench: bidder serve {doc['serve'] or '(defaults)'}, {doc['workers']} workers, "
             f"memcached over {doc['memcached']}, {doc['connections']} keep-alive connections, "
             f"{doc['duration_s']:g} s closed loop x {doc['reps']} each",
             f"  {'':34} {'requests/s':>10} {'':17} {'worker CPU/request':>18}",
             _row("bidder", "bidder", doc["bidder_rps"], doc["bidder_cpu_us_per_request"], doc)]
    before = doc.get("baseline")
    if before:
        lines += [_row("baseline", f"bidder {before['serve']}", before["rps"],
                       before["cpu_us_per_request"], doc),
                  f"    bidder's CPU per request against it: {before['cpu_change']:+.0%} (target "
                  f"<= {before['target_change']:+.0%}: {'met' if before['met'] else 'NOT met'})"]
    if doc["stock"]:
        lines.append("  against hello-world Falcon on stock Gunicorn (its own HTTP path, as many "
                     "workers):")
        for kind, v in doc["stock"].items():
            lines.append(_row(f"stock-{kind}", f"gunicorn -k {kind}", v["rps"],
                              v["cpu_us_per_request"], doc))
            lines.append(f"    ratio bidder/stock {kind}: {v['ratio']:5.2f} (target >= "
                         f"{v['target_ratio']:g}: {'met' if v['ratio_met'] else 'NOT met'}); "
                         f"CPU ratio {v['cpu_ratio']:.2f} (the throughput ratio if both were "
                         "CPU-bound)")
    lines += ["  against hello-world Falcon on the same server configuration (bidder serve --app):",
              _row("hello", "hello-world", doc["hello_rps"], doc["hello_cpu_us_per_request"], doc),
              f"    ratio bidder/hello: {doc['ratio']:5.2f} (target >= {doc['target_ratio']:g}: "
              f"{'met' if doc['ratio_met'] else 'NOT met'}); CPU ratio {doc['cpu_ratio']:.2f}"]
    if doc["capacity_rps_at_sla"] is not None:
        bound = "" if doc["capacity_bracketed"] else " (budget ran out before a failing step)"
        lines.append(f"  bidder capacity at p99 <= {doc['sla_p99_ms']:g} ms: "
                     f"{doc['capacity_rps_at_sla']:.0f} requests/s (open loop){bound}")
    lines += [f"  note: {n}" for n in doc["notes"]]
    return "\n".join(lines)


def _row(app: str, label: str, rps: float, cpu_us: float, doc: dict[str, Any]) -> str:
    return f"    {label:<30} {rps:10.0f} {_spread(doc, app):17} {cpu_us:15.0f} us"


def _spread(doc: dict[str, Any], app: str) -> str:
    """``(runs min-max)`` when there were several runs: a noisy box shows here first."""
    values = [r["rps"] for r in doc["runs"] if r["app"] == app]
    return f"(runs {min(values):.0f}-{max(values):.0f})" if len(values) > 1 else ""


def plot(doc: dict[str, Any], path: str) -> None:
    """Requests/s and worker CPU per request of each server, each run a dot."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["app"] for r in doc["runs"]))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, metric, label in ((left, "rps", "requests/s (closed loop)"),
                              (right, "cpu_us_per_request", "worker CPU per request (us)")):
        for i, app in enumerate(names):
            values = [r[metric] for r in doc["runs"] if r["app"] == app]
            ax.bar(i, stats.mean(values), color="tab:red" if app == "bidder" else "tab:blue",
                   alpha=0.7)
            ax.plot([i] * len(values), values, "k.", ms=5)
        ax.set_xticks(range(len(names)), names, rotation=15)
        ax.set_ylabel(label)
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(f"bidder vs hello-world Falcon: {doc['workers']} workers, "
                 f"{doc['connections']} connections (bars: mean, dots: runs)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
