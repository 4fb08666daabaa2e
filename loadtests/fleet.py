"""``bidder fleet``: money across a fleet. N ``bidder serve`` hosts, one ledger, one budget.

An exchange stand-in sends bid requests to random hosts; of the bids, a share wins: its win
and billing notices go, after a random delay, to a random host (the notice URL is the load
balancer's), and a share of billing notices is sent again to another host (a retry); the
lost bids get their loss notice (lurl). Optionally one host is SIGKILLed mid-run (its
notices are then sent to the others, as an exchange retries). Printed at the end:
bookings, double bookings, spend against the budget (ledger and the exchange's own count),
and how long hosts kept bidding after the budget was gone.

``--ledger postgresql`` (default) starts a private PostgreSQL all hosts share;
``--ledger sqlite`` gives each host its own SQLite ledger, as before the fleet ledger (to
see what it fixes).
"""
from __future__ import annotations

import argparse
import heapq
import http.client
import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from urllib.parse import urlsplit

from bidder.ledger import open_ledger
from loadtests.memcached_proc import EmbeddedMemcached
from loadtests.postgres_proc import EmbeddedPostgres
from bidder.seed import seed_users
from bidder.settings import number
from loadtests import stack

CAMPAIGN = "fleet-budget"
LB_URL = "https://bidder-lb.example"  # what the exchange is told; the harness routes it
USERS = 2000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hosts", type=number(int, 1, maximum=8), default=3)
    parser.add_argument("--workers", type=number(int, 1, maximum=4), default=1,
                        help="workers per host")
    parser.add_argument("--ledger", choices=("postgresql", "sqlite"), default="postgresql",
                        help="one PostgreSQL for the fleet, or an SQLite file per host")
    parser.add_argument("--budget", type=number(float, 0, exclusive=True), default=3.0,
                        help="the campaign's budget, USD")
    parser.add_argument("--rate", type=number(float, 1, maximum=2000), default=150.0,
                        help="bid requests a second, over all hosts")
    parser.add_argument("--duration", type=number(float, 1, maximum=600), default=30.0,
                        help="longest run, s (it ends 3 s after the hosts stop bidding)")
    parser.add_argument("--win-share", type=number(float, 0, maximum=1), default=0.5)
    parser.add_argument("--retry-share", type=number(float, 0, maximum=1), default=0.2,
                        help="billing notices sent a second time, to another host")
    parser.add_argument("--notice-delay", type=number(float, 0, maximum=60), default=1.0,
                        help="notices are sent 0..this many s after the bid")
    parser.add_argument("--kill-at", type=number(float, 0), default=None,
                        help="SIGKILL one host this many s into the run")
    parser.add_argument("--lease-ttl-s", type=number(float, 1), default=3.0)
    parser.add_argument("--seed", type=number(int, 0), default=1)
    parser.add_argument("--out", default=None, help="write the result as JSON here")


@dataclass
class Bid:
    bid_id: str
    host: int
    at: float
    price: float  # CPM, USD
    burl: str
    nurl: str
    lurl: str
    won: bool = False
    clearing: float = 0.0
    billing: list[str] = field(default_factory=list)  # answers to its billing notices
    lost_answers: int = 0  # billing notices sent to a host that died before it answered


@dataclass
class Result:
    hosts: int
    ledger: str
    budget_usd: float
    requests: int = 0
    bids: int = 0
    nobids: dict = field(default_factory=dict)
    wins: int = 0
    billing_sent: int = 0
    billing_retries: int = 0
    rerouted: int = 0  # notices whose host was gone, sent to another
    booked: int = 0
    duplicates: int = 0
    # won bids whose booking answer died with its host: the ledger has them, and the exchange's
    # next try on another host was answered "duplicate"
    booked_unanswered: int = 0
    refused: int = 0
    failed: int = 0
    double_bookings: int = 0
    ledger_billings: int = 0
    spend_usd: float = 0.0  # ledger
    exchange_spend_usd: float = 0.0  # what the exchange billed (each won bid once)
    max_impression_usd: float = 0.0
    spend_ratio: float = 0.0
    overspend_impressions: float = 0.0
    budget_gone_s: float | None = None
    last_bid_s: float | None = None
    stop_after_gone_s: float | None = None
    bids_after_gone: int = 0
    killed_host: int | None = None
    killed_at_s: float | None = None


def catalog(path: str, budget: float | None = None, daily_budget: float | None = None,
            timezone: str = "UTC") -> None:
    """One campaign with a budget (lifetime or daily), everywhere, one 300x250 creative."""
    campaign = {"id": CAMPAIGN, "adomain": ["fleet.example"], "cat": ["IAB3"],
                "value_per_click": 0.2, "timezone": timezone,
                "creatives": [{"id": "fleet-300x250", "w": 300, "h": 250,
                               "adm": "<a href='https://fleet.example'>ad</a>"}]}
    if budget is not None:
        campaign["budget"] = budget
    if daily_budget is not None:
        campaign["daily_budget"] = daily_budget
    with open(path, "w") as fh:
        json.dump({"campaigns": [campaign]}, fh)


def bid_request(rng: random.Random, serial: int) -> bytes:
    return json.dumps({
        "id": f"r{serial}", "tmax": 100,
        "imp": [{"id": "1", "banner": {"format": [{"w": 300, "h": 250}]}, "bidfloor": 0.01,
                 "bidfloorcur": "USD"}],
        "site": {"id": "s1", "domain": "news.example", "page": "https://news.example/a"},
        "device": {"devicetype": 2, "os": "Windows", "geo": {"country": "USA"}},
        "user": {"id": f"user-{rng.randrange(USERS):08d}"}}).encode()


class Exchange:
    """The exchange stand-in: bid requests out, notices back, routed at random."""

    def __init__(self, servers: list[stack.Server], args: argparse.Namespace) -> None:
        self.servers = servers
        self.args = args
        self.alive = list(range(len(servers)))
        self.rng = random.Random(args.seed)
        self.lock = threading.Lock()
        self.bids: list[Bid] = []
        self.result = Result(len(servers), args.ledger, args.budget)
        self.queue: list[tuple[float, int, str, str, Bid | None, int]] = []
        self.queued = threading.Condition()
        self.serial = 0
        self.started = time.monotonic()
        self.stop_sending = threading.Event()
        self.done = threading.Event()
        self.crashed: list[str] = []  # a thread that died: its counts are missing

    def guarded(self, target: Callable[..., None]) -> Callable[..., None]:
        """``target`` for a thread, its failure recorded (the run is then refused, not
        reported with counts short of what happened)."""
        def run(*args: object) -> None:
            try:
                target(*args)
            except BaseException as exc:
                with self.lock:
                    self.crashed.append(f"{target.__name__}: {exc!r}")
                raise
        return run

    # --- routing ----------------------------------------------------------------------------
    def pick(self, avoid: int | None = None) -> int:
        with self.lock:
            choices = [h for h in self.alive if h != avoid] or list(self.alive)
            return self.rng.choice(choices)

    def kill(self, host: int) -> None:
        with self.lock:
            self.alive.remove(host)
        os.killpg(self.servers[host].process.pid, signal.SIGKILL)
        self.result.killed_host, self.result.killed_at_s = host, self.now()

    def now(self) -> float:
        return time.monotonic() - self.started

    # --- notices ----------------------------------------------------------------------------
    def schedule(self, delay: float, kind: str, url: str, bid: Bid | None, host: int) -> None:
        with self.queued:
            self.serial += 1
            heapq.heappush(self.queue, (time.monotonic() + delay, self.serial, kind, url, bid, host))
            self.queued.notify()

    def notice_sender(self) -> None:
        conns: dict[int, http.client.HTTPConnection] = {}
        while True:
            with self.queued:
                while not self.queue or self.queue[0][0] > time.monotonic():
                    if self.done.is_set() and not self.queue:
                        return
                    self.queued.wait(0.05 if not self.queue else
                                     max(0.0, self.queue[0][0] - time.monotonic()))
                _, _, kind, url, bid, host = heapq.heappop(self.queue)
            self.send_notice(conns, kind, url, bid, host)

    def send_notice(self, conns: dict, kind: str, url: str, bid: Bid | None, host: int) -> None:
        parts = urlsplit(url)
        path = f"{parts.path}?{parts.query}"
        for _ in range(len(self.servers) + 1):
            if host not in self.alive:
                host = self.pick()
                self.result.rerouted += 1
            try:
                conn = conns.get(host) or http.client.HTTPConnection(
                    "127.0.0.1", self.servers[host].port, timeout=10)
                conns[host] = conn
                conn.request("GET", path)
                response = conn.getresponse()
                body = response.read()
            except (OSError, http.client.HTTPException):  # gone, or killed mid-answer
                conns.pop(host, None)
                if kind == "billing":
                    with self.lock:
                        bid.lost_answers += 1  # type: ignore[union-attr]
                if host in self.alive:
                    time.sleep(0.05)
                host = self.pick(avoid=host)
                continue
            if response.status >= 500:  # the ledger unreachable: the exchange tries again
                time.sleep(0.2)
                host = self.pick(avoid=host)
                continue
            break
        else:
            with self.lock:
                self.result.failed += 1
            return
        with self.lock:
            if kind != "billing":
                return
            if response.status != 200:
                self.result.refused += 1
                return
            status = json.loads(body)["status"]
            bid.billing.append(status)  # type: ignore[union-attr]
            if status == "booked":
                self.result.booked += 1
            else:
                self.result.duplicates += 1

    # --- bids -------------------------------------------------------------------------------
    def bidder(self, index: int, rate: float, until: float) -> None:
        rng = random.Random(self.args.seed * 1000 + index)
        conns: dict[int, http.client.HTTPConnection] = {}
        interval = 1.0 / rate
        next_at = time.monotonic()
        serial = index * 10_000_000
        while not self.stop_sending.is_set() and time.monotonic() < until:
            next_at += interval
            host = self.pick()
            serial += 1
            try:
                conn = conns.get(host) or http.client.HTTPConnection(
                    "127.0.0.1", self.servers[host].port, timeout=5)
                conns[host] = conn
                conn.request("POST", "/openrtb2/bid", body=bid_request(rng, serial),
                             headers={"Content-Type": "application/json"})
                response = conn.getresponse()
                body = response.read()
            except (OSError, http.client.HTTPException):  # gone, or killed mid-answer
                conns.pop(host, None)
                continue
            self.on_answer(rng, host, response.status, response.getheader("X-Nobid-Reason"),
                           body)
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)

    def on_answer(self, rng: random.Random, host: int, status: int, reason: str | None,
                  body: bytes) -> None:
        r = self.result
        with self.lock:
            r.requests += 1
            if status != 200:
                r.nobids[reason or str(status)] = r.nobids.get(reason or str(status), 0) + 1
                return
        for seatbid in json.loads(body)["seatbid"]:
            for b in seatbid["bid"]:
                bid = Bid(b["id"], host, self.now(), b["price"], b["burl"], b["nurl"], b["lurl"])
                delay = self.args.notice_delay
                with self.lock:
                    r.bids += 1
                    self.bids.append(bid)
                    bid.won = rng.random() < self.args.win_share
                if not bid.won:
                    loss = bid.lurl.replace("${AUCTION_LOSS}", "102").replace(
                        "${AUCTION_PRICE}", f"{bid.price * 1.1:.6f}")
                    self.schedule(rng.uniform(0, delay), "loss", loss, None, self.pick())
                    continue
                bid.clearing = round(bid.price * rng.uniform(0.5, 1.0), 6)
                price = f"{bid.clearing:.6f}"
                with self.lock:
                    r.wins += 1
                    r.billing_sent += 1
                first = self.pick()
                self.schedule(rng.uniform(0, delay), "win",
                              bid.nurl.replace("${AUCTION_PRICE}", price), None, first)
                when = rng.uniform(0, delay)
                self.schedule(when, "billing", bid.burl.replace("${AUCTION_PRICE}", price),
                              bid, first)
                if rng.random() < self.args.retry_share:
                    with self.lock:
                        r.billing_retries += 1
                    self.schedule(when + rng.uniform(0.05, 1.0), "billing",
                                  bid.burl.replace("${AUCTION_PRICE}", price), bid,
                                  self.pick(avoid=first))


def read_ledgers(specs: list[str]) -> tuple[float, int]:
    """(spend USD of the campaign, billing notices stored) over ``specs``."""
    spend = billings = 0
    for spec in specs:
        ledger = open_ledger(spec)
        spend += ledger.spend().get(CAMPAIGN, 0)
        billings += ledger.count("billing")
        ledger.close()
    return spend / 1e6, billings


def run_fleet(args: argparse.Namespace, say=print) -> Result:
    with ExitStack() as stack_:
        workdir = stack_.enter_context(tempfile.TemporaryDirectory(prefix="bidder-fleet-"))
        mc = stack_.enter_context(EmbeddedMemcached(memory_mb=32))
        seed_users(mc.address, USERS, progress=False)
        catalog_path = os.path.join(workdir, "catalog.json")
        catalog(catalog_path, budget=args.budget)
        if args.ledger == "postgresql":
            pg = stack_.enter_context(EmbeddedPostgres())
            specs = [pg.url] * args.hosts
            say(f"PostgreSQL ledger at {pg.url}")
        else:
            specs = [os.path.join(workdir, f"host-{i}.sqlite3") for i in range(args.hosts)]
        servers = []
        for i in range(args.hosts):
            server = stack.Server(
                ["--campaigns", catalog_path, "--workers", str(args.workers), "--no-pin",
                 "--ledger", specs[i], "--notice-url", LB_URL, "--notice-secret", "fleet-secret",
                 "--lease-ttl-s", str(args.lease_ttl_s), "--reservation-ttl-s", "30",
                 "--log-level", "warning"], mc.address, workdir)
            servers.append(server)
        for server in servers:  # started together: they share the ledger from the start
            server.launch()
        for server in servers:
            stack_.callback(server.stop)
        for server in servers:
            wait_ready(server)
        say(f"{args.hosts} hosts ready ({args.workers} worker(s) each), budget "
            f"{args.budget:g} USD, {args.rate:g} requests/s")

        exchange = Exchange(servers, args)
        until = time.monotonic() + args.duration
        threads = [threading.Thread(target=exchange.guarded(exchange.bidder),
                                    args=(i, args.rate / 8, until)) for i in range(8)]
        senders = [threading.Thread(target=exchange.guarded(exchange.notice_sender))
                   for _ in range(6)]
        for t in threads + senders:
            t.start()
        killed = False
        while any(t.is_alive() for t in threads):
            time.sleep(0.1)
            if args.kill_at is not None and not killed and exchange.now() >= args.kill_at:
                victim = len(servers) - 1
                say(f"killing host {victim} (SIGKILL) at {exchange.now():.1f} s")
                exchange.kill(victim)
                killed = True
            with exchange.lock:
                last = exchange.bids[-1].at if exchange.bids else None
            if last is not None and exchange.now() - last > 3.0 and exchange.result.requests > 50:
                exchange.stop_sending.set()  # nobody bids any more
        for t in threads:
            t.join()
        say("bidding over; waiting for the notices in flight")
        exchange.done.set()
        with exchange.queued:
            exchange.queued.notify_all()
        for t in senders:
            t.join()
        if exchange.crashed:
            raise RuntimeError(f"the exchange stand-in failed, so its counts would be short: "
                               f"{exchange.crashed}")
        result = summarize(exchange, specs, args)
        return result


def wait_ready(server: stack.Server, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"bidder serve exited: {server.log_tail()}")
        try:
            if stack.get(server.admin_url + "/readyz")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"bidder serve not ready: {server.log_tail()}")


def summarize(exchange: Exchange, specs: list[str], args: argparse.Namespace) -> Result:
    r = exchange.result
    r.double_bookings = sum(1 for b in exchange.bids if b.billing.count("booked") > 1)
    r.booked_unanswered = sum(1 for b in exchange.bids
                              if b.won and b.lost_answers and "booked" not in b.billing)
    r.spend_usd, r.ledger_billings = read_ledgers(sorted(set(specs)))
    r.exchange_spend_usd = round(sum(b.clearing for b in exchange.bids if b.won) / 1000, 6)
    r.max_impression_usd = max((b.price + 0.01) / 1000 for b in exchange.bids) \
        if exchange.bids else 0.0
    r.spend_ratio = round(r.spend_usd / args.budget, 4)
    over = r.spend_usd - args.budget
    r.overspend_impressions = round(max(0.0, over) / r.max_impression_usd, 2) \
        if r.max_impression_usd else 0.0
    # the budget is gone once the bids made so far (in bid order) are billed the budget less
    # one impression: no bid fits after that, and every later bid is a bid too many
    spent = 0.0
    for b in sorted(exchange.bids, key=lambda b: b.at):
        spent += b.clearing / 1000 if b.won else 0.0
        if r.budget_gone_s is None and spent >= args.budget - r.max_impression_usd:
            r.budget_gone_s = round(b.at, 3)
    if exchange.bids:
        r.last_bid_s = round(max(b.at for b in exchange.bids), 3)
    if r.budget_gone_s is not None and r.last_bid_s is not None:
        r.stop_after_gone_s = round(r.last_bid_s - r.budget_gone_s, 3)
        r.bids_after_gone = sum(1 for b in exchange.bids if b.at > r.budget_gone_s)
    return r


def report(r: Result) -> str:
    lines = [
        f"hosts {r.hosts} ({r.ledger} ledger); {r.requests} requests, {r.bids} bids, "
        f"{r.wins} won; no-bids {r.nobids}",
        f"billing notices: {r.billing_sent} sent + {r.billing_retries} retries on another host; "
        f"{r.booked} booked, {r.duplicates} duplicate, {r.refused} refused, {r.failed} failed, "
        f"{r.rerouted} rerouted from a dead host ({r.booked_unanswered} booked by a host that "
        f"died before it answered)",
        f"double bookings: {r.double_bookings} (ledger holds {r.ledger_billings} billing notices "
        f"for {r.wins} won bids)",
        f"spend: ledger {r.spend_usd:.6f} USD, exchange {r.exchange_spend_usd:.6f} USD, budget "
        f"{r.budget_usd:g} USD: {r.spend_ratio:.4f}x; over by {r.overspend_impressions} "
        f"impression(s) (largest {r.max_impression_usd * 1e6:.0f} micros)",
        f"budget gone (billed to within one impression) at {r.budget_gone_s} s, last bid at "
        f"{r.last_bid_s} s: bidding stopped {r.stop_after_gone_s} s after "
        f"({r.bids_after_gone} bids after)" if r.budget_gone_s is not None else
        f"budget never billed to within one impression: {r.budget_usd - r.spend_usd:.6f} USD "
        f"left in leases too small for a bid; last bid at {r.last_bid_s} s",
    ]
    if r.killed_host is not None:
        lines.append(f"host {r.killed_host} killed at {r.killed_at_s:.1f} s")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    def say(message: str) -> None:
        print(f"[fleet] {message}", file=sys.stderr, flush=True)

    result = run_fleet(args, say)
    print(report(result))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(asdict(result), fh, indent=1)
    return 0
