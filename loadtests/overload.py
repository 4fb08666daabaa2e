"""``bidder bench --overload``: the bidder pushed past its capacity, as an exchange pushes it.

One ``bidder serve`` (``--serve`` options) with memcached and seeded users, and the same
realistic requests, every one with the same ``tmax`` (50 ms unless ``--mix`` says
otherwise), in four runs of ``--duration`` s each after a warm-up:

- *normal*: a closed loop over 4 keep-alive connections per worker;
- *4x* and *32x*: closed loops over 4 and 32 times as many connections;
- *open 2x*: an open loop at twice the rate the normal run answered, over the 32x
  connections (requests wait for a free connection as they would at an exchange).

The load comes from the generator's lean engine (``loadtests.rawload``: plain sockets, about
a fifth of gevent's CPU per request), so that on a machine where it shares the server's CPUs
it is not the generator's own queue that is measured at these rates. Each run reports bids/s
(200), no-bids/s (204), p50/p99/max from the client (from the intended send time in the open
loop) and unanswered requests (no answer within the
generator's 2 s timeout, or a broken connection). An exchange times a bidder out at about
``tmax`` and throttles one that answers late or not at all, so the verdict per overload
run is: p99 <= tmax + 10 ms, nothing unanswered, and bids/s at least 0.7 of the normal
run's. Writes ``overload.json`` and ``overload.png``.

The four runs come in ``--reps`` rounds (3 by default), each round's open loop at twice its
own normal rate, and each run's figures pool its rounds (answers over the time of all, p99
of all latencies together). On a shared machine whose speed drifts by a sixth within a
minute, one normal run at the start made a poor yardstick for the runs half a minute later:
the bid shares of single rounds are listed too, to show that spread.
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
from loadtests import openloop, stack, stats, traffic

CONNECTIONS_PER_WORKER = 4  # the normal load
LEVELS = (("normal", 1), ("4x", 4), ("32x", 32))  # closed loops: connection multiples
OPEN_FACTOR = 2.0  # the open loop offers this multiple of the normal run's answered rate
DEFAULT_MIX = "no_tmax=0,tmax_ms=50"  # every request carries the same tmax
P99_ALLOWANCE_MS = 10.0  # p99 may exceed tmax by this much (network, client)
MIN_BID_SHARE = 0.7  # bids/s under overload, relative to the normal run
DEFAULT_REPS = 3  # rounds of the four runs


@dataclass(frozen=True)
class Level:
    """One run: what was offered and what came back."""

    name: str
    mode: str  # closed or open
    connections: int
    offered_rps: float | None
    answered_rps: float
    bids_per_s: float
    nobids_per_s: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    unanswered: int  # no answer within the timeout, or a broken connection
    other_statuses: int  # answered, but neither 200 nor 204
    sent: int
    generator_utilisation: float


def pooled(loads: list[dict[str, Any]]) -> dict[str, Any]:
    """One run's generator results over several rounds as if they were one result: counts
    summed, rates over the time of all, latencies merged."""
    def summed(key: str) -> dict[str, int]:
        total: dict[str, int] = {}
        for load in loads:
            for k, v in load[key].items():
                total[k] = total.get(k, 0) + v
        return total

    elapsed = sum(load["elapsed_s"] for load in loads)
    offered = [load["offered_rps"] for load in loads if load["offered_rps"]]
    histogram = stats.merge([stats.decode(load["histogram"]) for load in loads])
    return {"mode": loads[0]["mode"], "elapsed_s": elapsed,
            "offered_rps": sum(offered) / len(offered) if offered else None,
            "achieved_rps": sum(load["achieved_rps"] * load["elapsed_s"] for load in loads)
            / (elapsed or 1.0),
            "statuses": summed("statuses"), "errors": summed("errors"),
            "failed": sum(load["failed"] for load in loads),
            "sent": sum(load["sent"] for load in loads),
            "latency": stats.summary_ms(histogram),
            "generator_utilisation": sum(load["generator_utilisation"] for load in loads)
            / len(loads)}


def level_of(name: str, connections: int, load: dict[str, Any]) -> Level:
    elapsed = load["elapsed_s"] or 1.0
    statuses = load["statuses"]
    unanswered = sum(load["errors"].values())
    lat = load["latency"]
    return Level(name, load["mode"], connections, load["offered_rps"], load["achieved_rps"],
                 statuses.get("200", 0) / elapsed, statuses.get("204", 0) / elapsed,
                 lat["p50_ms"], lat["p99_ms"], lat["max_ms"], unanswered,
                 load["failed"] - unanswered, load["sent"], load["generator_utilisation"])


def bid_share(level: Level, normal: Level) -> float:
    """Bids/s of ``level`` as a share of the normal run's."""
    return level.bids_per_s / normal.bids_per_s if normal.bids_per_s else 0.0


def verdict(level: Level, normal: Level, tmax_ms: float) -> tuple[bool, str]:
    """Whether an exchange would keep this bidder at ``level``, and why not."""
    why = []
    if level.p99_ms > tmax_ms + P99_ALLOWANCE_MS:
        why.append(f"p99 {level.p99_ms:.1f} ms > tmax + {P99_ALLOWANCE_MS:g} ms")
    if level.unanswered:
        why.append(f"{level.unanswered} unanswered")
    if level.other_statuses:
        why.append(f"{level.other_statuses} answers neither 200 nor 204")
    share = bid_share(level, normal)
    if share < MIN_BID_SHARE:
        why.append(f"bids/s {share:.2f} of normal < {MIN_BID_SHARE:g}")
    return not why, "; ".join(why)


def tmax_of(mix: traffic.Mix) -> float:
    """The one tmax every request carries (the verdict needs one)."""
    if mix.no_tmax > 0 or len(mix.tmax_ms) != 1:
        raise ValueError("--overload needs one tmax for every request: leave tmax out of --mix "
                         "or give a single value, e.g. --mix tmax_ms=80")
    return float(mix.tmax_ms[0])


@stack.reports_errors("bench --overload")
def run(args: argparse.Namespace) -> int:
    mix_text = ",".join(filter(None, (DEFAULT_MIX, args.mix)))
    tmax_ms = tmax_of(traffic.Mix.parse(mix_text))
    out = stack.workdir(args.out)
    logs = os.path.join(out, "logs")
    os.makedirs(logs, exist_ok=True)
    placement = stack.Placement.plan()
    stack.log(f"placement: {placement.note}")
    reps = args.reps or DEFAULT_REPS
    gen_out = os.path.join(logs, "overload-generator.json")
    with EmbeddedMemcached(unix_socket=args.unix_memcached) as memcached:
        placement.confine_helper(memcached.process.pid)
        stack.log(f"embedded memcached on {memcached.address}; seeding {args.users} users")
        stack.seed_users(memcached.address, args.users)
        with stack.Server(shlex.split(args.serve), memcached.address, logs,
                          cpus=placement.server_cpus) as server:
            base = CONNECTIONS_PER_WORKER * len(server.workers())
            # the lean engine: gevent's client costs a third of a bid per request and, past
            # the server's capacity on shared CPUs, falls behind itself (loadtests.rawload)
            gen = dict(mix=mix_text, users=args.users, cpus=placement.generator_cpus,
                       engine="raw")
            plan = [(name, base * k, False) for name, k in LEVELS]
            plan.append(("open 2x", base * LEVELS[-1][1], True))
            loads: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in plan}
            for rep in range(1, reps + 1):
                for name, connections, open_loop in plan:
                    # the open loop offers twice what this round's normal run answered
                    rate = OPEN_FACTOR * loads["normal"][-1]["achieved_rps"] if open_loop \
                        else None
                    stack.log(f"overload {name}, round {rep}/{reps}: {connections} connections"
                              + (f", open loop at {rate:.0f}/s" if rate else ", closed loop"))
                    argv = openloop.command(server.url, args.duration, rate, connections,
                                            gen_out, warmup_s=args.warmup, **gen)
                    load = openloop.run_process(argv, gen_out, args.duration + args.warmup + 90)
                    loads[name].append(load)
                    last = level_of(name, connections, load)
                    stack.log(f"  {last.bids_per_s:.0f} bids/s, {last.nobids_per_s:.0f} "
                              f"no-bids/s, p99 {last.p99_ms:.1f} ms, {last.unanswered} "
                              "unanswered")
                    time.sleep(0.5)  # let queues drain before the next run
    levels = [level_of(name, connections, pooled(loads[name])) for name, connections, _ in plan]
    rounds = {name: [(bid_share(level_of(name, 0, load), level_of("normal", 0, normal)),
                      load["latency"]["p99_ms"])
                     for load, normal in zip(loads[name], loads["normal"])] for name in loads}
    doc = summarise(levels, rounds, tmax_ms, args)
    with open(os.path.join(out, "overload.json"), "w") as f:
        json.dump(doc, f, indent=2)
    plot(doc, os.path.join(out, "overload.png"))
    print(table(doc))
    stack.log(f"wrote {out}/overload.json, {out}/overload.png")
    return 0


def summarise(levels: list[Level], rounds: dict[str, list[tuple[float, float]]],
              tmax_ms: float, args: argparse.Namespace) -> dict[str, Any]:
    """The report: each run pooled over its rounds, with its verdict, and every round's bid
    share and p99 (``rounds``: run name -> (bids/normal, p99 ms) per round)."""
    normal = levels[0]
    rows = []
    for level in levels:
        ok, why = verdict(level, normal, tmax_ms) if level is not normal else (True, "")
        rows.append({**asdict(level), "bid_share_of_normal": bid_share(level, normal),
                     "bid_share_by_round": [share for share, _ in rounds[level.name]],
                     "p99_ms_by_round": [p99 for _, p99 in rounds[level.name]],
                     "passed": ok, "why": why})
    return {"serve": args.serve, "tmax_ms": tmax_ms, "duration_s": args.duration,
            "rounds": len(rounds["normal"]),
            "p99_allowance_ms": P99_ALLOWANCE_MS, "min_bid_share": MIN_BID_SHARE,
            "levels": rows, "passed": all(r["passed"] for r in rows)}


def table(doc: dict[str, Any]) -> str:
    lines = [f"overload: bidder serve {doc['serve'] or '(defaults)'}, tmax {doc['tmax_ms']:g} ms, "
             f"{doc['rounds']} rounds of {doc['duration_s']:g} s per run, pooled",
             f"{'run':<8} {'conns':>5} {'offered/s':>9} {'bids/s':>8} {'no-bids/s':>9} "
             f"{'bids/normal':>11} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'unanswered':>10}"
             "  verdict"]
    for r in doc["levels"]:
        offered = f"{r['offered_rps']:9.0f}" if r["offered_rps"] else f"{'closed':>9}"
        verdict_text = "-" if r["name"] == "normal" else ("pass" if r["passed"] else
                                                          "FAIL: " + r["why"])
        lines.append(f"{r['name']:<8} {r['connections']:>5} {offered} {r['bids_per_s']:8.0f} "
                     f"{r['nobids_per_s']:9.0f} {r['bid_share_of_normal']:11.2f} "
                     f"{r['p50_ms']:8.2f} {r['p99_ms']:8.2f} {r['max_ms']:8.1f} "
                     f"{r['unanswered']:>10}  {verdict_text}")
    lines.append("single rounds, bids/normal (p99 ms): " + "; ".join(
        f"{r['name']} " + " ".join(f"{share:.2f} ({p99:.0f})" for share, p99 in
                                   zip(r["bid_share_by_round"], r["p99_ms_by_round"]))
        for r in doc["levels"][1:]))
    lines.append(f"an exchange keeps a bidder whose p99 <= tmax + {doc['p99_allowance_ms']:g} ms, "
                 f"that leaves nothing unanswered and whose bids/s stay >= "
                 f"{doc['min_bid_share']:g} of normal: {'yes' if doc['passed'] else 'NO'}")
    return "\n".join(lines)


def plot(doc: dict[str, Any], path: str) -> None:
    """Bids/s and no-bids/s per run (stacked), p99 against tmax, unanswered marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = doc["levels"]
    names = [f"{r['name']}\n{r['connections']} conns" for r in rows]
    x = range(len(rows))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    bids = [r["bids_per_s"] for r in rows]
    left.bar(x, bids, label="bids/s (200)", color="tab:green")
    left.bar(x, [r["nobids_per_s"] for r in rows], bottom=bids, label="no-bids/s (204)",
             color="tab:grey")
    for i, r in enumerate(rows):
        if r["unanswered"]:
            left.annotate(f"{r['unanswered']} unanswered", (i, r["answered_rps"]),
                          ha="center", va="bottom", color="red", fontsize=8)
    left.set_ylabel("answers per second")
    right.bar(x, [r["p99_ms"] for r in rows], label="p99", color="tab:blue", alpha=0.8)
    right.plot(x, [r["p50_ms"] for r in rows], "ks", label="p50")
    right.axhline(doc["tmax_ms"], color="orange", ls=":", label=f"tmax {doc['tmax_ms']:g} ms")
    right.axhline(doc["tmax_ms"] + doc["p99_allowance_ms"], color="red", ls="--",
                  label=f"tmax + {doc['p99_allowance_ms']:g} ms")
    right.set_yscale("log")
    right.set_ylabel("latency from the client (ms)")
    for ax in (left, right):
        ax.set_xticks(list(x), names, fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("bidder under overload: closed loops at 1x, 4x, 32x connections; open loop at "
                 "2x capacity")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
