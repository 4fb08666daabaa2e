"""``bidder demo``: the whole product on one machine, end to end, then a report.

memcached (embedded, on a Unix socket as a co-located memcached is best reached, unless
``--memcached`` is given) ->
seeded users -> ``bidder serve`` (the real Gunicorn master and workers) -> a
few requests shown in full, with their win and billing notices booked -> an
open-loop latency burst -> percentiles -> everything shut down.
"""
from __future__ import annotations

import argparse
import gzip
import http.client
import json
import sys
import tempfile
from contextlib import ExitStack

from loadtests import memcached_proc
from bidder.seed import seed_users
from bidder.settings import number
from loadtests import openloop, traffic
from loadtests import stack as harness


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--memcached", default=None, metavar="HOST:PORT|unix:PATH[,...]",
                        help="use these memcached servers instead of starting an embedded one")
    parser.add_argument("--users", type=number(int, 1), default=20_000, help="users to seed")
    parser.add_argument("--workers", type=number(int, 0), default=0,
                        help="workers (0: one per CPU)")
    parser.add_argument("--rate", type=number(float, 0, exclusive=True), default=300.0,
                        help="offered open-loop rate of the latency burst, requests/s")
    parser.add_argument("--duration", type=number(float, 0, exclusive=True), default=5.0,
                        help="latency burst length, s")
    parser.add_argument("--show", type=number(int, 0), default=3, help="requests to show in full")
    parser.add_argument("--model", default=None, metavar="PATH", help="model artifact")
    parser.add_argument("--campaigns", default=None, metavar="PATH", help="campaign catalog")
    parser.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                        help="extra argument for 'bidder serve' (repeatable), e.g. --serve-arg=--no-pin")
    parser.add_argument("--fleet", type=number(int, 0, maximum=4), default=0, metavar="N",
                        help="instead: N hosts on one private PostgreSQL ledger, notices sent to "
                             "any host and retried on another, booked spend against the budget, "
                             "then a day of daily pacing in 120 s drawn to --pacing-plot")
    parser.add_argument("--pacing-plot", default="fleet-pacing.png", metavar="PNG",
                        help="where --fleet draws its paced day")


def say(message: str) -> None:
    print(f"[demo] {message}", file=sys.stderr, flush=True)


def serve_args(args: argparse.Namespace) -> list[str]:
    """The ``bidder serve`` options this demo run asks for."""
    argv = ["--log-level", "warning"]
    if args.workers:
        argv += ["--workers", str(args.workers)]
    if args.model:
        argv += ["--model", args.model]
    if args.campaigns:
        argv += ["--campaigns", args.campaigns]
    return argv + args.serve_arg


FORMATS = {1: "banner", 2: "video", 4: "native"}  # Bid.mtype


def show_bids(port: int, requests: list[tuple[bytes, dict[str, str]]], n: int) -> None:
    """Send requests until ``n`` bids came back, including one of each format if the traffic
    has it; print each bid shown and book its notices."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    shown = 0
    unseen = set(FORMATS.values())
    for body, headers in requests:
        if shown >= n and not unseen:
            break
        conn.request("POST", "/openrtb2/bid", body=body, headers=headers)
        response = conn.getresponse()
        data = response.read()
        if response.status != 200:
            continue
        if response.getheader("Content-Encoding") == "gzip":
            data = gzip.decompress(data)
        answer = json.loads(data)
        for seat in answer["seatbid"]:
            for bid in seat["bid"]:
                kind = FORMATS.get(bid["mtype"], str(bid["mtype"]))
                if shown >= n and kind not in unseen:
                    continue
                unseen.discard(kind)
                size = f" {bid['w']}x{bid['h']}" if "w" in bid else ""
                print(f"  bid {bid['id']} imp={bid['impid']} {kind}{size} campaign={bid['cid']} "
                      f"creative={bid['crid']} price={bid['price']:.4f} "
                      f"{answer.get('cur', 'USD')} CPM adomain={bid['adomain']}"
                      + (f" deal={bid['dealid']}" if bid.get("dealid") else ""))
                print(f"    adm {bid['adm'][:100]}{'...' if len(bid['adm']) > 100 else ''}")
                clearing = f"{bid['price'] * 0.9:.6f}"
                for notice_kind in ("nurl", "burl"):
                    url = bid[notice_kind].replace("${AUCTION_PRICE}", clearing)
                    path = url.split(str(port), 1)[1]
                    conn.request("GET", path)
                    notice = conn.getresponse()
                    print(f"    {notice_kind} -> {notice.status} {notice.read().decode()}")
                shown += 1
    conn.close()


def run_fleet_demo(args: argparse.Namespace) -> int:
    """``--fleet N``: the money of a fleet, end to end (loadtests/fleet.py, loadtests/pacing.py)."""
    from loadtests import fleet, pacing

    options = argparse.Namespace(hosts=args.fleet, workers=1, ledger="postgresql", budget=1.5,
                                 rate=120.0, duration=30.0, win_share=0.5, retry_share=0.2,
                                 notice_delay=0.5, kill_at=None, lease_ttl_s=3.0, seed=1, out=None)
    say(f"{args.fleet} hosts, one PostgreSQL ledger, a {options.budget:g} USD budget; billing "
        "notices go to any host, one in five is retried on another")
    result = fleet.run_fleet(options, say)
    print("Fleet:")
    print("  " + fleet.report(result).replace("\n", "\n  "))
    day = argparse.Namespace(hosts=args.fleet, daily_budget=5.0, timezone="America/New_York",
                             day_s=120.0, rate=80.0, notice_delay=0.1, catchup_s=300.0, seed=1,
                             out=args.pacing_plot)
    say(f"a campaign day ({day.timezone}) in {day.day_s:g} s, daily budget {day.daily_budget:g} "
        "USD, paced over the day")
    paced = pacing.run_day(day, say)
    print(f"Pacing: final spend {paced['final_spend_usd']:.4f} of {day.daily_budget:g} USD; worst "
          f"hour after the first {paced['worst_deviation_after_first_hour']:+.1%} of the even "
          f"line; plot {args.pacing_plot}")
    verdict = (result.double_bookings == 0 and result.failed == 0
               and 0.8 * options.budget <= result.spend_usd
               <= 1.02 * options.budget + result.max_impression_usd
               and paced["within_tolerance"])
    print(f"Result: {'OK' if verdict else 'NOT OK'} (no double booking, spend within the "
          "budget's bound, pacing within +-10 % of the even line)")
    return 0 if verdict else 1


def run(args: argparse.Namespace) -> int:
    if args.fleet:
        return run_fleet_demo(args)
    with ExitStack() as stack:
        workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="bidder-demo-"))
        memcached = args.memcached
        if memcached is None:
            try:
                mc = stack.enter_context(memcached_proc.EmbeddedMemcached(unix_socket=True))
            except memcached_proc.MemcachedNotFound as exc:
                print(f"bidder demo: {exc}", file=sys.stderr)
                return 1
            memcached = mc.address
            say(f"started embedded memcached on {memcached}")
        say(f"seeding {args.users} users into {memcached}")
        seed_users(memcached, args.users)

        server = harness.Server(serve_args(args), memcached, workdir)
        port = server.port
        say(f"starting bidder serve on 127.0.0.1:{port}")
        try:
            stack.enter_context(server)
        except (RuntimeError, TimeoutError) as exc:  # the message carries the server's log
            print(f"bidder demo: bidder serve did not start: {exc}", file=sys.stderr)
            return 1
        ready = json.loads(harness.get(server.admin_url + "/readyz")[1])
        model, store = ready["components"]["model"], ready["components"]["memcached"]
        say(f"ready: {ready['components']['catalog']['campaigns']} campaigns, model "
            f"{model.get('kind')} {model.get('version')}, memcached "
            + ("answering" if store["ok"] else f"failing ({store.get('last_error')})"))

        requests = traffic.demo_requests(max(2000, int(args.rate * args.duration)), args.users)
        print("Sample bids (with their win and billing notices booked):")
        show_bids(port, requests, args.show)

        say(f"latency burst: {args.rate:.0f} requests/s open loop for {args.duration:.0f} s")
        pairs = [traffic.BidRequest(body, headers) for body, headers in requests]
        result = openloop.generate_load(f"http://127.0.0.1:{port}", pairs, args.duration,
                                        args.rate, connections=16, warmup_s=1.0)
        summary = result.as_dict()
        lat = summary["latency"]
        print(f"Latency burst: offered {summary['offered_rps']:.0f}/s, achieved "
              f"{summary['achieved_rps']:.0f}/s, {summary['ok']} answered, "
              f"{summary['failed']} failed")
        print(f"  statuses {summary['statuses']}  no-bid share {summary['nobid_share']:.1%}")
        print("  latency ms (from intended send time): " + "  ".join(
            f"{k.removesuffix('_ms')} {lat[k]:.2f}"
            for k in ("p50_ms", "p90_ms", "p99_ms", "p99_9_ms", "max_ms")))
        server.stop()
        verdict = summary["failed"] == 0 and lat["p99_ms"] <= 50.0
        print(f"Result: {'OK' if verdict else 'NOT OK'} (p99 <= 50 ms and no failures)")
        return 0 if verdict else 1
