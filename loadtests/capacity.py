"""``bidder capacity``: the highest open-loop rate at which p99 stays under the SLA.

Steps the offered rate up geometrically from ``--start`` until a step fails
(p99 over the SLA, a failed request, or the server answering clearly fewer
requests than offered), then bisects between the last pass and the first
failure, all within ``--max-steps`` steps and ``--budget`` seconds. Each step
is an open-loop run (``loadtests.openloop``) with latency from the intended send
time, so the answer is the rate an exchange could really send. Without
``--url`` it starts its own memcached, users and ``bidder serve``.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import time
from dataclasses import asdict, dataclass
from typing import Any

from loadtests.memcached_proc import EmbeddedMemcached
from bidder.settings import number
from loadtests import openloop, stack, traffic

ACHIEVED_SHARE = 0.95  # a step passes only if this share of the offered rate was answered
REFINE_TO = 0.05  # stop bisecting once the bracket is within 5 %


@dataclass(frozen=True)
class Step:
    offered_rps: float
    achieved_rps: float
    p50_ms: float
    p99_ms: float
    p99_9_ms: float
    failed: int
    nobid_share: float
    passed: bool
    why: str


@dataclass
class Capacity:
    """The search's answer: ``rate`` is the highest passing offered rate (0 if none passed)."""

    rate: float
    sla_p99_ms: float
    steps: list[Step]
    bracketed: bool  # a failing step above ``rate`` was seen (else the budget ran out first)

    def as_dict(self) -> dict[str, Any]:
        return {"rate": self.rate, "sla_p99_ms": self.sla_p99_ms, "bracketed": self.bracketed,
                "steps": [asdict(s) for s in self.steps]}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=None,
                        help="A running server; default: start memcached, users and bidder serve.")
    parser.add_argument("--serve", default="", help="bidder serve options when starting one.")
    parser.add_argument("--sla-p99-ms", type=number(float, 0, exclusive=True), default=50.0,
                        help="p99 latency SLA, ms.")
    parser.add_argument("--start", type=number(float, 0, exclusive=True), default=100.0,
                        help="First offered rate, requests/s.")
    parser.add_argument("--factor", type=number(float, 1, exclusive=True), default=1.5,
                        help="Rate multiplier while passing.")
    parser.add_argument("--max-steps", type=number(int, 1), default=10,
                        help="At most this many steps.")
    parser.add_argument("--step-duration", type=number(float, 0, exclusive=True), default=5.0,
                        help="Measured s per step.")
    parser.add_argument("--warmup", type=number(float, 0), default=1.0,
                        help="Unmeasured s before each step.")
    parser.add_argument("--budget", type=number(float, 0, exclusive=True), default=120.0,
                        help="Stop starting steps after this many seconds.")
    parser.add_argument("--connections", type=number(int, 1), default=64,
                        help="Keep-alive connections.")
    parser.add_argument("--users", type=number(int, 1), default=10_000,
                        help="Users to seed / to address.")
    parser.add_argument("--mix", default="",
                        help="Traffic mix NAME=VALUE,... (loadtests.traffic.Mix).")
    parser.add_argument("--out", default="capacity-report", help="Directory for capacity.json/png.")


def check_budget(budget_s: float, warmup_s: float, step_s: float) -> None:
    """ValueError when not even one step fits in the budget (it would report a capacity of 0)."""
    if warmup_s + step_s >= budget_s:
        raise ValueError(f"a capacity budget of {budget_s:g} s holds no step of {warmup_s:g} s "
                         f"warm-up + {step_s:g} s: give it more time or shorten the steps")


def search(url: str, sla_p99_ms: float, start: float, factor: float, max_steps: int,
           step_s: float, warmup_s: float, budget_s: float, connections: int, workdir: str,
           users: int = 10_000, mix: str = "", generator_cpus: str | None = None) -> Capacity:
    """Step and bisect the offered rate against ``url``; see the module doc."""
    if start <= 0 or factor <= 1.0 or max_steps < 1:
        raise ValueError("capacity: need --start > 0, --factor > 1 and --max-steps >= 1")
    check_budget(budget_s, warmup_s, step_s)
    gen_out = os.path.join(workdir, "capacity-step.json")
    deadline = time.monotonic() + budget_s
    steps: list[Step] = []
    best, worst = 0.0, None
    rate = start
    while len(steps) < max_steps and time.monotonic() + warmup_s + step_s < deadline:
        argv = openloop.command(url, step_s, rate, connections, gen_out, warmup_s=warmup_s,
                                users=users, mix=mix, cpus=generator_cpus)
        load = openloop.run_process(argv, gen_out, step_s + warmup_s + 60)
        step = _judge(rate, load, sla_p99_ms)
        steps.append(step)
        stack.log(f"capacity: {rate:.0f}/s -> achieved {step.achieved_rps:.0f}/s, "
                  f"p99 {step.p99_ms:.2f} ms: {'pass' if step.passed else 'FAIL ' + step.why}")
        if step.passed:
            best = max(best, rate)
        else:
            worst = rate if worst is None else min(worst, rate)
        if worst is None:
            rate *= factor
        elif best == 0.0:
            rate = worst / (factor * factor)  # even the start failed: look lower
            if rate < 1.0:
                break
        elif (worst - best) / best <= REFINE_TO:
            break
        else:
            rate = (best + worst) / 2.0
        time.sleep(0.5)  # let the last step's queue drain
    return Capacity(best, sla_p99_ms, steps, worst is not None)


def _judge(rate: float, load: dict[str, Any], sla_p99_ms: float) -> Step:
    lat = load["latency"]
    why = []
    if load["ok"] == 0:
        why.append("nothing answered")
    elif lat["p99_ms"] > sla_p99_ms:
        why.append(f"p99 {lat['p99_ms']:.1f} ms > {sla_p99_ms:g} ms")
    if load["failed"]:
        why.append(f"{load['failed']} failed")
    if load["achieved_rps"] < ACHIEVED_SHARE * rate:
        why.append(f"answered only {load['achieved_rps']:.0f}/s")
    return Step(rate, load["achieved_rps"], lat["p50_ms"], lat["p99_ms"], lat["p99_9_ms"],
                load["failed"], load["nobid_share"], not why, "; ".join(why))


def table(result: Capacity) -> str:
    lines = [f"{'offered/s':>10} {'achieved/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'p99.9 ms':>9} "
             f"{'failed':>6} {'no-bid':>7}  verdict"]
    for s in result.steps:
        lines.append(f"{s.offered_rps:>10.0f} {s.achieved_rps:>10.0f} {s.p50_ms:>8.2f} "
                     f"{s.p99_ms:>8.2f} {s.p99_9_ms:>9.2f} {s.failed:>6} {s.nobid_share:>7.1%}  "
                     + ("pass" if s.passed else "FAIL: " + s.why))
    bound = "" if result.bracketed else " (no failing step seen: the true capacity may be higher)"
    lines.append(f"capacity at p99 <= {result.sla_p99_ms:g} ms: "
                 f"{result.rate:.0f} requests/s{bound}")
    return "\n".join(lines)


def plot(result: Capacity, path: str) -> None:
    """p99 and achieved rate against the offered rate, SLA line, capacity marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = sorted(result.steps, key=lambda s: s.offered_rps)
    x = [s.offered_rps for s in steps]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    left.plot(x, [s.p99_ms for s in steps], "o-", label="p99")
    left.plot(x, [s.p50_ms for s in steps], "s--", label="p50", alpha=0.7)
    left.axhline(result.sla_p99_ms, color="red", ls=":", label=f"SLA {result.sla_p99_ms:g} ms")
    left.set_yscale("log")
    left.set_xlabel("offered requests/s (open loop)")
    left.set_ylabel("latency from intended send time (ms)")
    right.plot(x, [s.achieved_rps for s in steps], "o-", label="achieved")
    right.plot(x, x, ":", color="grey", label="offered")
    right.set_xlabel("offered requests/s")
    right.set_ylabel("answered requests/s")
    for ax in (left, right):
        if result.rate:
            ax.axvline(result.rate, color="green", ls="--", label=f"capacity {result.rate:.0f}/s")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("capacity search: highest offered rate with p99 under the SLA")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@stack.reports_errors("capacity")
def run(args: argparse.Namespace) -> int:
    traffic.Mix.parse(args.mix)  # a bad --mix fails now, not after starting servers
    check_budget(args.budget, args.warmup, args.step_duration)
    out = stack.workdir(args.out)
    placement = stack.Placement.plan()
    stack.log(f"placement: {placement.note}")
    params = dict(sla_p99_ms=args.sla_p99_ms, start=args.start, factor=args.factor,
                  max_steps=args.max_steps, step_s=args.step_duration, warmup_s=args.warmup,
                  budget_s=args.budget, connections=args.connections, workdir=out,
                  users=args.users, mix=args.mix, generator_cpus=placement.generator_cpus)
    if args.url:
        result = search(args.url, **params)
    else:
        with EmbeddedMemcached() as memcached:
            placement.confine_helper(memcached.process.pid)
            stack.log(f"embedded memcached on {memcached.address}; seeding {args.users} users")
            stack.seed_users(memcached.address, args.users)
            with stack.Server(shlex.split(args.serve), memcached.address, out,
                              cpus=placement.server_cpus) as server:
                stack.log(f"bidder serve {args.serve} on {server.url}")
                result = search(server.url, **params)
    print(table(result))
    with open(os.path.join(out, "capacity.json"), "w") as f:
        json.dump(result.as_dict(), f, indent=2)
    plot(result, os.path.join(out, "capacity.png"))
    stack.log(f"wrote {out}/capacity.json, {out}/capacity.png")
    return 0 if result.rate > 0 else 1
