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
WORKER_INFO = Gauge("bidder_worker_info",
                    "1 per live worker: its slot, pid, the CPUs it may run on and its slice.",
                    ["slot", "pid", "cpus", "slice_ns"], multiprocess_mode="liveall")


def record_worker(slot: int, pid: int, cpus: str, slice_ns: int | None) -> None:
    """Publish where a worker runs (called from the ``post_fork`` hook)."""
    WORKER_INFO.labels(slot=str(slot), pid=str(pid), cpus=cpus,
                       slice_ns="" if slice_ns is None else str(slice_ns)).set(1)


def mark_worker_dead(pid: int) -> None:
    """Drop a dead worker's live gauges (called from the master's ``child_exit`` hook)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.mark_process_dead(pid)
