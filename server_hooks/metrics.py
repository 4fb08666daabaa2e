"""The worker's own Prometheus metrics: requests it answered before the app, and where it runs.

These live beside the worker, not in the app: ``server_hooks`` imports nothing of the bidder.
In multiprocess mode (``PROMETHEUS_MULTIPROC_DIR`` set by ``bidder serve`` before any import of
prometheus_client) the values of all workers are summed on ``/metrics`` with the app's own.
"""
from __future__ import annotations

import os

from prometheus_client import Counter, Gauge, multiprocess

REFUSED = Counter("bidder_refused_requests_total",
                  "Requests the worker answered before the app: malformed framing (400), a body "
                  "over the limit (413), not arrived whole within 3 s (408).", ["status"])
for _status in ("400", "408", "413"):  # at 0 from the start, for rate() and increase()
    REFUSED.labels(_status)
SHED = Counter("bidder_worker_nobids_total",
               "Bid requests the worker answered 204 (X-Nobid-Reason) without calling the app: "
               "deadline = taken up too late to answer within tmax less the safety margin, "
               "counted from the kernel's receive time; overload = past its share of the poll's "
               "serving time (--wait-share, at most --max-poll-ms, or --closed-loop-share: an "
               "overloaded worker answers the rest of a poll at once). Not in "
               "bidder_requests_total or bidder_nobids_total, which the app counts.", ["reason"])
SHED.labels("deadline")
SHED.labels("overload")
CLOSED_LOOP = Gauge("bidder_worker_closed_loop",
                    "Workers whose last clients kept every connection busy (nearly every request "
                    "back to back for a second): their overloaded polls serve for "
                    "--closed-loop-share instead of --wait-share.", multiprocess_mode="livesum")
WORKER_INFO = Gauge("bidder_worker_info",
                    "1 per live worker: its slot, pid, the CPUs it may run on and its slice.",
                    ["slot", "pid", "cpus", "slice_ns"], multiprocess_mode="liveall")
WORKER_EXITS = Counter("bidder_worker_exits_total",
                       "Worker processes that exited, by cause: died (unasked: a crash, an OOM "
                       "kill, a timeout abort), retired (replaced by SIGHUP or a scale-down), "
                       "stopped (server shutdown).", ["cause"])
EXIT_CAUSES = ("died", "retired", "stopped")


def publish_exit_causes() -> None:
    """Every cause at 0 from the start (master, ``when_ready``): a counter that first appears
    at 1 shows no ``increase()`` to an alert."""
    for cause in EXIT_CAUSES:
        WORKER_EXITS.labels(cause)


def exit_cause(stopping: bool, workers_left: int, workers_wanted: int) -> str:
    """Why a worker exited, as the master sees it once the worker is reaped: during a stop it
    was told to; with as many siblings as wanted it was replaced (SIGHUP, scale-down); else it
    died unasked."""
    if stopping:
        return "stopped"
    return "retired" if workers_left >= workers_wanted else "died"


def record_worker(slot: int, pid: int, cpus: str, slice_ns: int | None) -> None:
    """Publish where a worker runs (called from the ``post_fork`` hook)."""
    WORKER_INFO.labels(slot=str(slot), pid=str(pid), cpus=cpus,
                       slice_ns="" if slice_ns is None else str(slice_ns)).set(1)


def mark_worker_dead(pid: int, cause: str) -> None:
    """Count a worker's exit and drop its live gauges (the master's ``child_exit`` hook)."""
    WORKER_EXITS.labels(cause).inc()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.mark_process_dead(pid)
