"""Gunicorn server hooks: the CPU slots, pinning and scheduling steps of the life cycle.

``bidder/serve.py`` wires the life cycle top to bottom and calls these from its
hooks (a plain Gunicorn config can install them directly). They read the
settings of ``server_hooks/settings.py`` from ``server.app.settings`` (the
arbiter's application), or from ``BIDDER_*`` environment variables.

Master: ``when_ready`` plans slot -> CPU once (a bad ``--cpu-map`` stops the
start with a clear message), raises the open-files soft limit to the hard one
and freezes the preloaded heap; ``pre_fork`` gives the new worker a stable
slot and the shared connection board; ``child_exit`` frees the slot. Worker:
``post_fork`` pins to the slot's CPU, sets the EEVDF slice and reports where it
runs (log line and ``bidder_worker_info`` on ``/metrics``).
"""
from __future__ import annotations

import gc
import os
import queue
import resource
import signal

from server_hooks import metrics, sched
from server_hooks.pinning import CpuMapError, CpuPlan, pin, plan_cpus
from server_hooks.settings import Settings, resolve
from server_hooks.slots import SlotTable
from server_hooks.topology import Topology, format_cpulist

_plan: CpuPlan | None = None
_slots: SlotTable | None = None


def _settings(server) -> Settings:
    settings = getattr(server.app, "settings", None)
    return settings if isinstance(settings, Settings) else resolve()


def plan_for(settings: Settings, allowed: set[int] | None = None) -> CpuPlan:
    """The slot -> CPU plan of these settings on this machine (raises CpuMapError).

    Planned with ``--no-pin`` too (nothing is pinned then), so both arms of an
    A/B run the same number of workers in the same slots.
    """
    allowed = os.sched_getaffinity(0) if allowed is None else allowed
    return plan_cpus(allowed, Topology.from_sysfs(), settings.reserve_cpus or "",
                     settings.cpu_map)


def when_ready(server) -> None:
    """Master is listening; the app (preloaded) is loaded. Plan CPUs, freeze the heap."""
    global _plan, _slots
    settings = _settings(server)
    try:
        _plan = plan_for(settings)
    except CpuMapError as exc:
        raise RuntimeError(str(exc)) from None  # Gunicorn prints "Error: ..." and exits 1
    for warning in _plan.warnings:
        server.log.warning("pinning: %s", warning)
    _slots = SlotTable(_plan.cpu_for, len(_plan.order))
    if settings.pin:
        server.log.info("pinning on: slot i -> CPU %s[i %% %d]", list(_plan.order),
                        len(_plan.order))
    else:
        server.log.info("pinning off: workers run on CPUs %s",
                        format_cpulist(set(_plan.order) if settings.reserve_cpus
                                       else os.sched_getaffinity(0)))
        if settings.cpu_map:
            server.log.warning("pinning: --cpu-map is used with --pin only; workers are not "
                               "pinned (add --pin)")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:  # one descriptor per keep-alive connection: use all the host allows
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        server.log.info("open files limit raised from %s to %s", soft, hard)
    metrics.publish_exit_causes()
    gc.collect()
    gc.freeze()  # preloaded catalog and model arrays stay shared copy-on-write


def pre_fork(server, worker) -> None:
    """Master, just before fork: give the worker a stable slot and the shared board."""
    live = {getattr(w, "slot", None) for w in server.WORKERS.values()}
    for slot in _slots.taken - live:  # a worker gone without child_exit (kill_worker ESRCH)
        _slots.release(slot)
    worker.slot = _slots.acquire()
    worker.board = _slots.board


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)


def stop_early(worker, inherited: queue.SimpleQueue | None = None) -> None:
    """Make a stop signal that arrives before the worker's own handlers count.

    Until Gunicorn's ``init_signals`` (after ``post_fork`` and the app's per-process set-up),
    the child runs the master's handlers, which only queue a signal for the master's loop: a
    SIGTERM sent then (a server stopped or reloaded just after it started) was lost, and the
    worker served on until the master killed it after the graceful timeout. With these, the
    worker leaves its loop as soon as it would enter it. One that came even before them, while
    the child was still on its way to ``post_fork``, sits in the child's copy of the master's
    queue (``inherited``, the arbiter's ``SIG_QUEUE``): it counts too."""
    def stop(signum, frame) -> None:
        worker.alive = False

    for signum in STOP_SIGNALS:
        signal.signal(signum, stop)
    while inherited is not None and not inherited.empty():  # handlers only ever add to it
        if inherited.get_nowait() in STOP_SIGNALS:
            worker.alive = False


def post_fork(server, worker) -> None:
    """Worker, just after fork: heed stop signals, pin, set the slice, say where it runs."""
    stop_early(worker, getattr(server, "SIG_QUEUE", None))
    settings = _settings(server)
    if settings.pin or settings.reserve_cpus:
        # unpinned, a worker still keeps off the reserved CPUs: it may run on any of the rest
        warning = pin(_plan.cpu_for(worker.slot) if settings.pin else _plan.order)
        if warning:
            server.log.warning("worker slot=%s: %s", worker.slot, warning)
    if settings.slice_ms:
        slice_ns, warning = sched.apply_slice(settings.slice_ms)
        if warning:
            server.log.warning("worker slot=%s: %s", worker.slot, warning)
    else:
        slice_ns = sched.read_slice()
    cpus = format_cpulist(os.sched_getaffinity(0))
    try:
        metrics.record_worker(slot=worker.slot, pid=os.getpid(), cpus=cpus, slice_ns=slice_ns)
    except OSError as exc:  # a metrics file problem must not stop the worker from booting
        server.log.warning("worker slot=%s: not published on /metrics: %s", worker.slot, exc)
    server.log.info("worker slot=%s pid=%s cpus=%s slice_ns=%s", worker.slot, os.getpid(), cpus,
                    slice_ns)


def child_exit(server, worker) -> None:
    """Master, after a worker exited (any cause): free its slot for the replacement."""
    slot = getattr(worker, "slot", None)
    if slot is not None and _slots is not None:
        _slots.release(slot)
    cause = metrics.exit_cause(not server.LISTENERS, len(server.WORKERS), server.num_workers)
    metrics.mark_worker_dead(worker.pid, cause)
