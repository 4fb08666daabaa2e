"""Gunicorn server hooks: the master/worker life cycle of the bid server, top to bottom.

``bidder serve`` installs these functions as Gunicorn's hooks. They read the
resolved ``Settings`` from ``server.app.settings`` (the arbiter's application).
"""
from __future__ import annotations

import gc
import os

from bidder import metrics


def when_ready(server) -> None:
    """Master is listening; the app (preloaded) is loaded. Freeze it so forks share it."""
    gc.collect()
    gc.freeze()  # preloaded catalog and model arrays stay shared copy-on-write


def pre_fork(server, worker) -> None:
    """Master, just before fork."""


def post_fork(server, worker) -> None:
    """Worker, just after fork: place the worker and say where it runs."""
    cpus = ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))
    metrics.record_worker(slot=worker.age, pid=os.getpid(), cpus=cpus, slice_ns=None)
    server.log.info("worker pid=%s cpus=%s", os.getpid(), cpus)


def child_exit(server, worker) -> None:
    """Master, after a worker exited (any cause)."""
    metrics.mark_worker_dead(worker.pid)
