"""Locust load test of the bid server, with an open-loop mode that does not hide queueing.

    locust -f loadtests/locustfile.py --host http://127.0.0.1:8080 --headless \
        -u 50 -r 50 -t 30s --rate 500 --sla-p99-ms 50

``--mode open`` (default): the users together send ``--rate`` requests per second
at fixed intended times (each user every ``users/rate`` s, phases spread), the
way an exchange sends whatever our answers; the latency of each request is
counted from its *intended* send time into a microsecond HdrHistogram, so a
stall is charged for the queue it builds (Locust's own statistics measure from
the actual send and so show the closed-loop view next to it). ``--mode closed``:
each user sends back to back. Requests are pre-generated OpenRTB 2.6 bodies
(``loadtests.traffic``, ``--mix``).

At the end it prints p50/p90/p99/p99.9/max, the no-bid share, errors and the
achieved vs offered rate, and exits non-zero when p99 exceeds ``--sla-p99-ms``
or any request failed. Distributed runs (``--master``/``--worker``) merge the
workers' histograms exactly: each stats report carries the histogram of the
samples since the last one. With ``--csv PREFIX`` the summary is also written to
``PREFIX_latency.csv``. The rate is split over the user count at test start.
Workers flush their last samples to the master when they stop, so the verdict
counts every answer.
"""
from __future__ import annotations

import csv
import math
import random
import sys
import time
from collections import Counter
from typing import Any

import gevent
from locust import FastHttpUser, events, task
from locust.env import Environment
from locust.runners import MasterRunner, WorkerRunner

from loadtests import stats, traffic

BID_PATH = "/openrtb2/bid"


class _Tally:
    """This process's samples since the last report (workers) or in total (master, local)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.histogram = stats.new_histogram()
        self.statuses: Counter = Counter()
        self.failed = 0

    def absorb(self, data: dict[str, Any]) -> None:
        self.histogram.add(stats.decode(data["histogram"]))
        self.statuses.update({int(k): v for k, v in data["statuses"].items()})
        self.failed += data["failed"]

    def drain(self) -> dict[str, Any]:
        data = {"histogram": stats.encode(self.histogram),
                "statuses": {str(k): v for k, v in self.statuses.items()}, "failed": self.failed}
        self.reset()
        return data


TALLY = _Tally()
_RUN: dict[str, float] = {}
_REQUESTS: list[traffic.BidRequest] = []


@events.init_command_line_parser.add_listener
def _arguments(parser) -> None:
    group = parser.add_argument_group("bidder load test")
    group.add_argument("--mode", choices=("open", "closed"), default="open",
                       help="open: fixed-rate sends, latency from the intended time; "
                            "closed: back to back.")
    group.add_argument("--rate", type=float, default=200.0,
                       help="Open loop: total requests per second over all users and workers.")
    group.add_argument("--sla-p99-ms", type=float, default=50.0,
                       help="Exit non-zero when p99 latency exceeds this many ms.")
    group.add_argument("--mix", default="",
                       help="Traffic mix NAME=VALUE,... (see loadtests.traffic.Mix), "
                            "e.g. app=0.5,gzip=0.2.")
    group.add_argument("--seeded-users", type=int, default=10_000,
                       help="Users seeded in memcached (user ids world.user_id(0..N-1)).")
    group.add_argument("--traffic-seed", type=int, default=0, help="Seed of the generated traffic.")
    group.add_argument("--distinct-requests", type=int, default=4096,
                       help="Pre-generated request bodies, cycled.")


@events.init.add_listener
def _init(environment: Environment, **_: Any) -> None:
    # gevent's loop time is stale by however long Locust took to import this file: a --run-time
    # timer scheduled from it would end the run that much early (a 2 s run lasted 0.7 s)
    gevent.get_hub().loop.update_now()
    if isinstance(environment.runner, MasterRunner):
        # a worker's last samples arrive in this message, before the master's test_stop
        environment.runner.register_message(
            "bidder_tally", lambda environment, msg, **__: TALLY.absorb(msg.data))
    if environment.web_ui is not None:
        @environment.web_ui.app.route("/bidder-latency")
        def _latency() -> dict[str, Any]:
            return {k: None if isinstance(v, float) and math.isnan(v) else v
                    for k, v in _report(environment).items()}


@events.test_start.add_listener
def _test_start(environment: Environment, **_: Any) -> None:
    global TALLY
    if not isinstance(environment.runner, WorkerRunner):
        TALLY = _Tally()
        _RUN.clear()
        _RUN["start"] = time.monotonic()
        # custom options travel to the workers with every spawn message: tell them the total
        environment.parsed_options.open_loop_users = max(1, environment.runner.target_user_count)


@events.test_stop.add_listener
def _test_stop(environment: Environment, **_: Any) -> None:
    if isinstance(environment.runner, WorkerRunner):
        # flush now: Locust's own final stats report reaches the master only after its
        # quitting hook, where the SLA verdict is made
        environment.runner.send_message("bidder_tally", TALLY.drain())
    else:
        _RUN["stop"] = time.monotonic()


@events.report_to_master.add_listener
def _report_to_master(client_id: str, data: dict[str, Any]) -> None:
    data["bidder"] = TALLY.drain()


@events.worker_report.add_listener
def _worker_report(client_id: str, data: dict[str, Any]) -> None:
    if "bidder" in data:
        TALLY.absorb(data["bidder"])


@events.quitting.add_listener
def _quitting(environment: Environment, **_: Any) -> None:
    if isinstance(environment.runner, WorkerRunner) or environment.parsed_options is None \
            or "start" not in _RUN:  # a worker, or a web UI closed before any test ran
        return
    report = _report(environment)
    print(_format(report), file=sys.stderr)
    prefix = getattr(environment.parsed_options, "csv_prefix", None)
    if prefix:
        with open(f"{prefix}_latency.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(list(report))
            writer.writerow(list(report.values()))
    problems = []
    if report["count"] == 0:
        problems.append("no request was answered")
    if math.isfinite(report["p99_ms"]) and report["p99_ms"] > report["sla_p99_ms"]:
        problems.append(f"p99 {report['p99_ms']:.2f} ms > SLA {report['sla_p99_ms']:g} ms")
    if report["failed"]:
        problems.append(f"{report['failed']} requests failed")
    if problems:
        print("SLA check FAILED: " + "; ".join(problems), file=sys.stderr)
        environment.process_exit_code = 1
    else:
        print("SLA check passed", file=sys.stderr)


def _report(environment: Environment) -> dict[str, Any]:
    opts = environment.parsed_options
    summary = stats.summary_ms(TALLY.histogram)
    ok = TALLY.statuses.get(200, 0) + TALLY.statuses.get(204, 0)
    elapsed = _RUN.get("stop", time.monotonic()) - _RUN.get("start", time.monotonic())
    failed = max(TALLY.failed, environment.stats.total.num_failures)
    return {
        "mode": opts.mode, "offered_rps": opts.rate if opts.mode == "open" else None,
        "achieved_rps": ok / elapsed if elapsed > 0 else 0.0, **summary,
        "nobid_share": TALLY.statuses.get(204, 0) / ok if ok else 0.0, "failed": failed,
        "statuses": dict(sorted(TALLY.statuses.items())), "sla_p99_ms": opts.sla_p99_ms,
    }


def _format(r: dict[str, Any]) -> str:
    offered = f"{r['offered_rps']:.0f}/s" if r["offered_rps"] else "closed loop"
    head = "latency from intended send time" if r["mode"] == "open" else "latency (closed loop)"
    return (f"\nbidder {head}, {r['count']} answers, offered {offered}, "
            f"achieved {r['achieved_rps']:.1f}/s\n"
            f"  p50 {r['p50_ms']:.2f} ms  p90 {r['p90_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms  "
            f"p99.9 {r['p99_9_ms']:.2f} ms  max {r['max_ms']:.2f} ms\n"
            f"  no-bid share {r['nobid_share']:.1%}  failed {r['failed']}  "
            f"statuses {r['statuses']}")


def _requests(environment: Environment) -> list[traffic.BidRequest]:
    if not _REQUESTS:
        opts = environment.parsed_options
        mix = traffic.Mix.parse(f"users={opts.seeded_users},{opts.mix}")
        _REQUESTS.extend(traffic.generate(opts.distinct_requests, mix, opts.traffic_seed))
    return _REQUESTS


class Bidder(FastHttpUser):
    """An exchange connection: keep-alive, OpenRTB 2.6 bid requests, open or closed loop."""

    def on_start(self) -> None:
        opts = self.environment.parsed_options
        self.requests = _requests(self.environment)
        self.index = random.randrange(len(self.requests))
        self.open = opts.mode == "open"
        if self.open:
            users = (getattr(opts, "open_loop_users", None)
                     or self.environment.runner.target_user_count)
            self.interval = max(1, users) / opts.rate
            self.next_due = time.perf_counter() + random.uniform(0, self.interval)

    def wait_time(self) -> float:
        return 0.0  # pacing is done in bid(): open loop waits for the intended time

    @task
    def bid(self) -> None:
        request = self.requests[self.index % len(self.requests)]
        self.index += 1
        if self.open:
            due, self.next_due = self.next_due, self.next_due + self.interval
            delay = due - time.perf_counter()
            if delay > 0:
                gevent.sleep(delay)
            start = due
        else:
            start = time.perf_counter()
        with self.client.post(BID_PATH, data=request.body, headers=request.headers,
                              name=BID_PATH, catch_response=True) as response:
            status = response.status_code
            if status in (200, 204):
                response.success()
                stats.record_us(TALLY.histogram, (time.perf_counter() - start) * 1e6)
                TALLY.statuses[status] += 1
            else:
                response.failure(f"HTTP {status}")
                TALLY.statuses[status] += 1
                TALLY.failed += 1
