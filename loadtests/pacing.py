"""``bidder pacing``: one campaign day in accelerated time, spend drawn against the even line.

Hosts run on a settable budget clock (``--budget-clock``): a day of ``--day-s`` seconds
starting at the campaign's local midnight. Demand is several times what the daily budget
can buy, so pacing alone decides the spend: leases are granted up to the budget x the
elapsed share of the day plus the catch-up allowance. The ledger's spend for the day is
sampled as the day goes, compared with the even line at every hour, and plotted (PNG).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from bidder.ledger import open_ledger
from loadtests.memcached_proc import EmbeddedMemcached
from loadtests.postgres_proc import EmbeddedPostgres
from bidder.seed import seed_users
from bidder.settings import number
from loadtests import stack
from loadtests.fleet import CAMPAIGN, LB_URL, USERS, Exchange, catalog, wait_ready

TOLERANCE = 0.10  # Done when: within +-10 % of the even line at every hour after the first
START_DELAY_S = 8.0  # wall seconds for the hosts to start before the day begins


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hosts", type=number(int, 1, maximum=4), default=2)
    parser.add_argument("--daily-budget", type=number(float, 0, exclusive=True), default=5.0,
                        help="the campaign's daily budget, USD")
    parser.add_argument("--timezone", default="America/New_York",
                        help="the campaign's time zone (its day starts at its midnight)")
    parser.add_argument("--day-s", type=number(float, 24, maximum=3600), default=240.0,
                        help="wall seconds one day lasts")
    parser.add_argument("--rate", type=number(float, 1, maximum=1000), default=80.0,
                        help="bid requests a second (several times what the budget buys)")
    parser.add_argument("--notice-delay", type=number(float, 0, maximum=10), default=0.2)
    parser.add_argument("--catchup-s", type=number(float, 0), default=300.0,
                        help="--pacing-catchup-s of the hosts")
    parser.add_argument("--seed", type=number(int, 0), default=1)
    parser.add_argument("--out", default="pacing-day.png", help="the plot (PNG)")


def run_day(args: argparse.Namespace, say=print) -> dict:
    zone = ZoneInfo(args.timezone)
    midnight = datetime.now(zone).replace(hour=0, minute=0, second=0, microsecond=0) \
        + timedelta(days=1)
    rate = 86400.0 / args.day_s
    with ExitStack() as stack_:
        workdir = stack_.enter_context(tempfile.TemporaryDirectory(prefix="bidder-pacing-"))
        mc = stack_.enter_context(EmbeddedMemcached(memory_mb=32))
        seed_users(mc.address, USERS, progress=False)
        catalog_path = os.path.join(workdir, "catalog.json")
        catalog(catalog_path, daily_budget=args.daily_budget, timezone=args.timezone)
        pg = stack_.enter_context(EmbeddedPostgres())
        wall_start = time.time() + START_DELAY_S
        clock = f"{midnight.timestamp():.3f},{wall_start:.3f},{rate:g}"
        servers = [stack.Server(
            ["--campaigns", catalog_path, "--workers", "1", "--no-pin", "--ledger", pg.url,
             "--notice-url", LB_URL, "--notice-secret", "pacing-secret", "--budget-clock", clock,
             "--pacing-catchup-s", str(args.catchup_s), "--reservation-ttl-s", "30",
             "--log-level", "warning"], mc.address, workdir) for _ in range(args.hosts)]
        for server in servers:
            server.launch()
            stack_.callback(server.stop)
        for server in servers:
            wait_ready(server)
        time.sleep(max(0.0, wall_start - time.time()))
        day = midnight.date().isoformat()
        say(f"{args.hosts} hosts; day {day} ({args.timezone}) in {args.day_s:g} s, daily "
            f"budget {args.daily_budget:g} USD, {args.rate:g} requests/s")
        options = argparse.Namespace(notice_delay=args.notice_delay, win_share=0.5,
                                     retry_share=0.2, seed=args.seed, ledger="postgresql",
                                     budget=args.daily_budget)
        exchange = Exchange(servers, options)
        until = wall_start + args.day_s
        bidders = [threading.Thread(target=exchange.guarded(exchange.bidder),
                                    args=(i, args.rate / 4, time.monotonic() + args.day_s))
                   for i in range(4)]
        senders = [threading.Thread(target=exchange.guarded(exchange.notice_sender))
                   for _ in range(4)]
        for t in bidders + senders:
            t.start()
        samples: list[tuple[float, float]] = []  # (hour of the day, spend USD)
        ledger = open_ledger(pg.url)
        next_hour = 1
        while time.time() < until:
            time.sleep(0.25)
            hour = (time.time() - wall_start) * rate / 3600
            spend = ledger.spend_by_day().get((CAMPAIGN, day), 0) / 1e6
            samples.append((min(hour, 24.0), spend))
            if hour >= next_hour:
                say(f"hour {next_hour:2d}: spend {spend:.4f} USD, even line "
                    f"{args.daily_budget * next_hour / 24:.4f} USD")
                next_hour += 1
        exchange.stop_sending.set()
        for t in bidders:
            t.join()
        exchange.done.set()
        for t in senders:
            t.join()
        final = ledger.spend_by_day().get((CAMPAIGN, day), 0) / 1e6
        ledger.close()
        if exchange.crashed:
            raise RuntimeError(f"the exchange stand-in failed, so the day's spend is short: "
                               f"{exchange.crashed}")
    hours = check_hours(samples, args.daily_budget)
    result = {"day": day, "timezone": args.timezone, "daily_budget_usd": args.daily_budget,
              "day_s": args.day_s, "final_spend_usd": final, "hours": hours,
              "worst_deviation_after_first_hour": max(
                  (h["deviation"] for h in hours if h["hour"] >= 1), key=abs, default=None),
              "within_tolerance": all(abs(h["deviation"]) <= TOLERANCE
                                      for h in hours if h["hour"] >= 1)}
    plot(samples, args, result)
    return result


def check_hours(samples: list[tuple[float, float]], budget: float) -> list[dict]:
    """At each whole hour: the spend (the sample nearest after it) against the even line."""
    hours = []
    for h in range(1, 25):
        after = [s for s in samples if s[0] >= h]
        if not after:
            break
        hour, spend = after[0]
        even = budget * h / 24
        hours.append({"hour": h, "spend": round(spend, 6), "even": round(even, 6),
                      "deviation": round(spend / even - 1, 4)})
    return hours


def plot(samples: list[tuple[float, float]], args: argparse.Namespace, result: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    hours = [h for h, _ in samples]
    ax.plot(hours, [s for _, s in samples], label="spend (ledger)", color="tab:blue")
    line = [args.daily_budget * h / 24 for h in hours]
    ax.plot(hours, line, "--", color="black", label="even line (budget x elapsed share)")
    ax.fill_between(hours, [v * (1 - TOLERANCE) for v in line], [v * (1 + TOLERANCE) for v in line],
                    color="gray", alpha=0.2, label="+-10 %")
    ax.axhline(args.daily_budget, color="tab:red", lw=0.8, label="daily budget")
    ax.set_xlim(0, 24)
    ax.set_xticks(range(0, 25, 3))
    ax.set_xlabel(f"hour of the campaign's day ({args.timezone}); the day ran in "
                  f"{args.day_s:g} s")
    ax.set_ylabel("spend, USD")
    worst = result["worst_deviation_after_first_hour"]
    ax.set_title(f"Daily pacing, {args.hosts} hosts, one ledger: worst hour after the first "
                 f"{worst:+.1%}" if worst is not None else "Daily pacing")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    def say(message: str) -> None:
        print(f"[pacing] {message}", file=sys.stderr, flush=True)

    result = run_day(args, say)
    for h in result["hours"]:
        print(f"hour {h['hour']:2d}: spend {h['spend']:.4f} USD  even {h['even']:.4f} USD  "
              f"{h['deviation']:+.1%}")
    print(f"final spend {result['final_spend_usd']:.4f} of {result['daily_budget_usd']:g} USD; "
          f"worst hour after the first {result['worst_deviation_after_first_hour']:+.1%}: "
          f"{'within' if result['within_tolerance'] else 'OUTSIDE'} +-10 %; plot {args.out}")
    with open(os.path.splitext(args.out)[0] + ".json", "w") as fh:
        json.dump(result, fh, indent=1)
    return 0 if result["within_tolerance"] else 1
