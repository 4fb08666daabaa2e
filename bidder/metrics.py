"""Prometheus metrics shared by all workers of one server (multiprocess mode).

The CLI entry points ``PROMETHEUS_MULTIPROC_DIR`` at a fresh directory before
anything imports prometheus_client (``bidder/metrics_dir.py``), so every worker's
samples are summed (or listed per pid) when any worker answers ``GET /metrics``.

The bid path does not write those files per request: ``tally`` adds its counts
and latencies up in the process, and a daemon thread writes the sums every
``FLUSH_S`` (so does ``render``, for the answering worker, and the exit of a
process). A write into a multiprocess file costs a ``getpid`` syscall, a lock
and an mmap store; the five a bid request made cost 26 us of a worker's CPU
under load (``bidder bench``: 370 -> 344 us a request, 7 %).
"""
from __future__ import annotations

import atexit
import bisect
import os
import threading
from functools import lru_cache

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import multiprocess
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04,
                   0.05, 0.075, 0.1, 0.25)

REQUESTS = Counter("bidder_bid_requests_total", "Bid requests answered, by HTTP status.",
                   ["status"])
NOBIDS = Counter("bidder_nobids_total", "No-bid (204) answers, by reason.", ["reason"])
BIDS = Counter("bidder_bids_total", "Bids returned (one per imp bid on).")
BAD_REQUESTS = Counter("bidder_bad_requests_total",
                       "Requests on any path refused with a 4xx (bids, notices, unknown paths), "
                       "by status.", ["status"])
LENIENT = Counter("bidder_lenient_requests_total",
                  "Bid requests whose numbers needed lenient decoding (a string or an integral "
                  "float in an integer or float field).")
LATENCY = Histogram("bidder_bid_latency_seconds", "Time from arrival to answer on /openrtb2/bid.",
                    buckets=LATENCY_BUCKETS)
FEATURE_STORE = Counter("bidder_feature_store_lookups_total",
                        "User feature look-ups, by outcome (hit, miss, error, skipped).",
                        ["outcome"])
FEATURE_STORE_READS = Counter(
    "bidder_feature_store_round_trips_total", "memcached get round trips of the bid path: one "
    "per server for all the look-ups of a worker's poll (prefetch), else one per look-up.")
NOTICES = Counter("bidder_notices_total", "Win, billing and loss notices, by kind and outcome "
                  "(booked, duplicate, refused, expired).", ["kind", "outcome"])
LOSSES = Counter("bidder_loss_notices_total", "Loss notices booked, by OpenRTB loss reason code "
                 "(${AUCTION_LOSS}; 'other' above 1000, 'unknown' when not substituted).",
                 ["reason"])
SPEND_MICROS = Counter("bidder_spend_micros_total",
                       "Spend booked from billing notices, in USD micros.", ["campaign"])
RESERVATIONS_EXPIRED = Counter(
    "bidder_budget_reservations_expired_total",
    "Bid reservations released by the reservation lifetime (no billing or loss notice came).")
# Pacing state. Fleet-wide values come from the ledger (each worker writes what it last read:
# the most recent is shown); this host's lease headroom and reservations are summed.
_FLEET = dict(labelnames=["campaign", "period"], multiprocess_mode="livemostrecent")
_HOST = dict(labelnames=["campaign", "period"], multiprocess_mode="livesum")
BUDGET_MICROS = Gauge("bidder_budget_micros", "Budget of the current period (total: lifetime, "
                      "daily: the campaign-local day), USD micros.", **_FLEET)
BUDGET_LEASE_LIMIT = Gauge("bidder_budget_lease_limit_micros",
                           "What the fleet may lease of the period now: the budget, or for a "
                           "daily budget its even line plus the catch-up allowance.", **_FLEET)
BUDGET_LEASED = Gauge("bidder_budget_leased_micros", "Leased out to the fleet's workers.", **_FLEET)
BUDGET_SPENT = Gauge("bidder_budget_spent_micros", "Billed, fleet-wide (ledger).", **_FLEET)
BUDGET_AVAILABLE = Gauge("bidder_budget_available_micros",
                         "This host's leases not yet spent or reserved.", **_HOST)
BUDGET_RESERVED = Gauge("bidder_budget_reserved_micros",
                        "Reserved by this host's bids awaiting their billing or loss notice.",
                        **_HOST)
BUDGET_STATE = Gauge("bidder_budget_state", "0 bidding, 1 paced (lease used up, waiting for a "
                     "refill or the pacing line), 2 exhausted (the period's budget is leased out).",
                     ["campaign"], multiprocess_mode="livemax")
MODEL_RELOADS = Counter("bidder_model_reloads_total", "Model artifact reloads, by outcome.",
                        ["outcome"])
# At 0 from the start: a counter whose first sample is 1 shows no increase() to an alert.
for _outcome in ("loaded", "refused"):
    MODEL_RELOADS.labels(_outcome)
for _outcome in ("hit", "miss", "error", "skipped"):
    FEATURE_STORE.labels(_outcome)


FLUSH_S = 0.1  # how late a bid request's counts may reach /metrics


class Tally:
    """Counter increments and ``histogram`` observations of this process, summed in memory and
    written to the shared files by ``flush`` (every FLUSH_S from a daemon thread started on
    first use in each process, and at exit)."""

    def __init__(self, histogram: Histogram) -> None:
        # the histogram's own bounds and values: observe() has no batched form in
        # prometheus_client (tests/test_metrics_tally.py checks the exposition is observe()'s)
        self._sum, self._buckets = histogram._sum, histogram._buckets
        self._bounds = tuple(histogram._upper_bounds[:-1])  # the last one is +Inf
        self._lock = threading.Lock()
        self._reset()
        self._flusher: threading.Thread | None = None
        self._stop = threading.Event()

    def _reset(self) -> None:
        self._counts: dict = {}
        self._observed = [0] * (len(self._bounds) + 1)  # the last one is +Inf
        self._observed_sum = 0.0

    def after_fork(self) -> None:
        """In a new worker (the ``post_fork`` hook): a tally of its own, its own flusher."""
        self._lock = threading.Lock()
        self._reset()  # the parent's pending counts are the parent's to write
        self._flusher = None
        self._stop = threading.Event()

    def inc(self, counter, amount: float = 1) -> None:
        """``counter.inc(amount)``, written with the next flush."""
        with self._lock:
            self._counts[counter] = self._counts.get(counter, 0) + amount
        if self._flusher is None:
            self._start()

    def observe(self, seconds: float) -> None:
        """``histogram.observe(seconds)``, written with the next flush."""
        with self._lock:
            self._observed[bisect.bisect_left(self._bounds, seconds)] += 1
            self._observed_sum += seconds
        if self._flusher is None:
            self._start()

    def flush(self) -> None:
        with self._lock:
            counts, observed, observed_sum = self._counts, self._observed, self._observed_sum
            self._reset()
        for counter, amount in counts.items():
            counter.inc(amount)
        if any(observed):
            self._sum.inc(observed_sum)
            for bucket, n in zip(self._buckets, observed):
                if n:
                    bucket.inc(n)

    def _start(self) -> None:
        with self._lock:
            if self._flusher is not None:
                return
            self._flusher = threading.Thread(target=self._flush_forever, name="metrics-flush",
                                             daemon=True)
        self._flusher.start()
        atexit.register(self._exit)

    def _flush_forever(self) -> None:
        while not self._stop.wait(FLUSH_S):
            self.flush()

    def _exit(self) -> None:
        """At exit: let a flush under way finish (its counts are off the tally), then the rest."""
        self._stop.set()
        if self._flusher is not None:
            self._flusher.join(timeout=1.0)
        self.flush()


tally = Tally(LATENCY)


@lru_cache(maxsize=1024)
def child(metric, *labels: str):
    """``metric.labels(*labels)``, looked up once: label sets on the bid path are few and fixed
    (statuses, no-bid reasons, outcomes), and the lookup cost more than the increment."""
    return metric.labels(*labels)



CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def worker_cpu(families: Iterable[Metric]) -> CounterMetricFamily:
    """``bidder_worker_cpu_seconds_total``: user + system CPU of each live worker that
    ``bidder_worker_info`` lists, read from /proc when /metrics is rendered (nothing on the
    bid path)."""
    cpu = CounterMetricFamily("bidder_worker_cpu_seconds",
                              "CPU time (user + system) of each live worker, by slot and pid.",
                              labels=["slot", "pid"])
    for family in families:
        if family.name != "bidder_worker_info":
            continue
        for sample in family.samples:
            pid = sample.labels["pid"]
            try:
                with open(f"/proc/{pid}/stat", "rb") as fh:
                    fields = fh.read().rsplit(b")", 1)[1].split()
            except (OSError, IndexError):
                continue  # exited since it was listed
            cpu.add_metric([sample.labels["slot"], pid],
                           (int(fields[11]) + int(fields[12])) / CLOCK_TICKS)
    return cpu


def model_info(status: dict[str, Any]) -> GaugeMetricFamily:
    """``bidder_model_info``: the model the answering worker serves (1), and its reload counts."""
    info = GaugeMetricFamily("bidder_model_info", "The CTR model in service: kind, version, path "
                             "and load time (UTC) as labels, value 1.",
                             labels=["kind", "version", "path", "loaded_at"])
    info.add_metric([str(status.get(k, "")) for k in ("kind", "version", "path", "loaded_at")],
                    1)
    return info


class _Families:
    """A registry-like holder of collected families, for ``generate_latest``."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


def render(model_status: Callable[[], dict[str, Any]] | None = None) -> bytes:
    """The text exposition of every worker's metrics, summed (this process's tally first;
    another worker's may be up to FLUSH_S late), with each worker's CPU time and, given
    ``model_status``, the model in service."""
    tally.flush()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        from prometheus_client import REGISTRY as registry
    families = list(registry.collect())
    families.append(worker_cpu(families))
    if model_status is not None:
        families.append(model_info(model_status()))
    return generate_latest(_Families(families))
