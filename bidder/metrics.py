"""Prometheus metrics shared by all workers of one server (multiprocess mode).

``bidder serve`` points ``PROMETHEUS_MULTIPROC_DIR`` at a fresh directory in the
master before anything imports prometheus_client, so every worker's samples
are summed (or listed per pid) when any worker answers ``GET /metrics``.
"""
from __future__ import annotations

import os
from functools import lru_cache

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import multiprocess

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04,
                   0.05, 0.075, 0.1, 0.25)

REQUESTS = Counter("bidder_bid_requests_total", "Bid requests answered, by HTTP status.",
                   ["status"])
NOBIDS = Counter("bidder_nobids_total", "No-bid (204) answers, by reason.", ["reason"])
BIDS = Counter("bidder_bids_total", "Bids returned (one per imp bid on).")
BAD_REQUESTS = Counter("bidder_bad_requests_total",
                       "Requests on any path refused with a 4xx (bids, notices, unknown paths), "
                       "by status.", ["status"])
LATENCY = Histogram("bidder_bid_latency_seconds", "Time from arrival to answer on /openrtb2/bid.",
                    buckets=LATENCY_BUCKETS)
REFUSED = Counter("bidder_refused_requests_total",
                  "Requests the worker answered before the app: malformed framing (400), a body "
                  "over the limit (413), not arrived whole within 3 s (408).", ["status"])
FEATURE_STORE = Counter("bidder_feature_store_lookups_total",
                        "User feature look-ups, by outcome (hit, miss, error, skipped).",
                        ["outcome"])
NOTICES = Counter("bidder_notices_total", "Win and billing notices, by kind and outcome.",
                  ["kind", "outcome"])
SPEND_MICROS = Counter("bidder_spend_micros_total",
                       "Spend booked from billing notices, in USD micros.", ["campaign"])
MODEL_RELOADS = Counter("bidder_model_reloads_total", "Model artifact reloads, by outcome.",
                        ["outcome"])
WORKER_INFO = Gauge("bidder_worker_info",
                    "1 per live worker: its slot, pid, the CPUs it may run on and its slice.",
                    ["slot", "pid", "cpus", "slice_ns"], multiprocess_mode="liveall")


@lru_cache(maxsize=1024)
def child(metric, *labels: str):
    """``metric.labels(*labels)``, looked up once: label sets on the bid path are few and fixed
    (statuses, no-bid reasons, outcomes), and the lookup cost more than the increment."""
    return metric.labels(*labels)


def record_worker(slot: int, pid: int, cpus: str, slice_ns: int | None) -> None:
    """Publish where a worker runs (called from the ``post_fork`` hook)."""
    WORKER_INFO.labels(slot=str(slot), pid=str(pid), cpus=cpus,
                       slice_ns="" if slice_ns is None else str(slice_ns)).set(1)


def mark_worker_dead(pid: int) -> None:
    """Drop a dead worker's live gauges (called from the master's ``child_exit`` hook)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.mark_process_dead(pid)


def render() -> bytes:
    """The text exposition of every worker's metrics, summed."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)
    from prometheus_client import REGISTRY
    return generate_latest(REGISTRY)
