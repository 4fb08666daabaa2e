"""``bidder serve``: the real Gunicorn arbiter, configured from ``Settings``; the server's life
cycle, top to bottom, in the order the arbiter runs it.

Master
  0. ``bidder.cli`` has pointed prometheus_client at a fresh multiprocess directory before
     any module that imports it was imported (``/metrics`` sums every worker's samples).
  1. ``serve``: the addresses are checked, logging set up, ``BidderApplication.run`` starts
     the arbiter (listening on ``--bind`` and the admin listener ``--admin-bind``).
  2. ``BidderApplication.load`` (``preload_app``): ``create_app`` builds the catalog, the
     model and the compiled arrays once; the workers share them copy-on-write.
  3. ``when_ready``: slot -> CPU plan, open-files limit, the preloaded heap frozen.
  4. ``pre_fork``, before each worker: its slot and the shared connection board; the last
     good model, so a respawned worker serves what its siblings serve.
Worker
  5. ``post_fork``: its slot on its log lines, pinned to its slot's CPU (``--pin``) or kept
     off the reserved ones, its slice set, where it runs published; then the app's
     per-process state: a metrics tally, memcached clients and ledger connections of its
     own, a thread that watches the model file.
Master
  6. ``child_exit``: the slot is freed for the replacement, the worker's gauges dropped.
  7. ``on_reload`` (SIGHUP, before the new workers fork): the model is re-read.
  8. ``serve`` returns; the CLI entry removes the metrics directory.

The CPU and scheduling steps are ``server_hooks.hooks``; the app's are here.
"""
from __future__ import annotations

import argparse
import errno
import importlib
import logging
import socket
import sys

from gunicorn.app.base import BaseApplication

from bidder import config, logs, metrics, metrics_dir
from bidder import settings as settings_mod
from bidder.settings import Settings
from server_hooks import hooks
from server_hooks.pinning import CpuMapError

log = logging.getLogger("bidder.serve")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    config.add_config_flag(parser)
    settings_mod.add_arguments(parser, "serve")


def run(args: argparse.Namespace) -> int:
    s, _sources = config.resolve(args)
    return serve(s)


def serve(s: Settings) -> int:
    """1. Check the addresses, then run the arbiter until it stops (the master returns here)."""
    if not metrics_dir.is_set():  # bidder.cli sets it before prometheus_client loads
        raise RuntimeError(f"{metrics_dir.ENV} is not set: start the server with `bidder serve` "
                           "or `python -m bidder serve`, or /metrics would show one worker")
    problem = check_bind(s.bind) or check_bind(s.admin_bind, "--admin-bind")
    if s.bind.rpartition(":")[2] == s.admin_bind.rpartition(":")[2]:
        problem = (f"--admin-bind {s.admin_bind} has the port of --bind {s.bind}: the app tells "
                   "the admin listener by its port, give it another (default 9100)")
    if problem:
        print(f"bidder serve: {problem}", file=sys.stderr)
        return 1
    logs.configure(s.log_format, s.log_level)
    for warning in notice_warnings(s):
        log.warning("%s (fine for a local test)", warning)
    try:
        workers = s.workers or default_workers(s)
    except CpuMapError as exc:
        print(f"bidder serve: {exc}", file=sys.stderr)
        return 2
    BidderApplication(s, workers).run()
    return 0


class BidderApplication(BaseApplication):
    """A Gunicorn application whose configuration is a ``Settings`` object; ``load`` is step 2."""

    def __init__(self, settings: Settings, workers: int) -> None:
        self.settings = settings
        self.workers = workers
        super().__init__(prog="bidder serve")

    def load_config(self) -> None:
        for key, value in gunicorn_options(self.settings, self.workers).items():
            self.cfg.set(key, value)

    def load(self):
        if self.settings.app:
            module_name, _, attr = self.settings.app.partition(":")
            return getattr(importlib.import_module(module_name), attr or "app")
        from bidder.app import create_app, StartupError

        try:
            return create_app(self.settings)
        except StartupError as exc:
            print(f"bidder serve: {exc}", file=sys.stderr)
            sys.exit(2)


def gunicorn_options(s: Settings, workers: int) -> dict[str, object]:
    """Gunicorn settings derived from ours, with the life cycle hooks below."""
    return {
        "bind": [s.bind, s.admin_bind],
        "workers": workers,
        "worker_class": s.worker_class,
        "threads": s.threads,
        "keepalive": s.keepalive,
        "worker_connections": s.worker_connections,
        "timeout": s.timeout,
        "graceful_timeout": 10,
        "preload_app": True,
        "pidfile": s.pid,
        "loglevel": s.log_level,
        "accesslog": "-" if s.access_log else None,
        "logger_class": logs.GunicornLogger,
        "access_log_format": logs.ACCESS_FORMAT,
        "proc_name": "bidder",
        "control_socket_disable": True,  # one fixed path per user: concurrent servers would collide
        "when_ready": when_ready,
        "pre_fork": pre_fork,
        "post_fork": post_fork,
        "child_exit": child_exit,
        "on_reload": on_reload,
    }


def _bidder_app(server):
    """The preloaded bidder app, or None when ``--app`` serves another WSGI app."""
    app = server.app.callable
    return app if hasattr(app, "models") else None


def when_ready(server) -> None:
    """3. Master, listening, app loaded: plan CPUs, raise the open-files limit, freeze the heap."""
    hooks.when_ready(server)


def pre_fork(server, worker) -> None:
    """4. Master, before a fork: the worker's slot, then the last good model (a respawn or a HUP
    must not fork with an older model than its siblings serve)."""
    hooks.pre_fork(server, worker)
    app = _bidder_app(server)
    if app is not None:
        app.models.adopt_last_good()


def post_fork(server, worker) -> None:
    """5. Worker, just after fork: its slot on every line it logs; pin, slice, publish; then
    the app's per-process state."""
    logs.set_worker_slot(getattr(worker, "slot", None))
    hooks.post_fork(server, worker)
    metrics.tally.after_fork()  # the master's pending counts are the master's to write
    app = _bidder_app(server)
    if app is not None:
        app.state.after_fork()  # sockets and SQLite connections never cross a fork
        app.models.start_watcher()  # no request pays for a model load
        app.budgets.after_fork()  # a lease holder of its own, leased before its first bid


def child_exit(server, worker) -> None:
    """6. Master, after a worker exited (any cause): free its slot, drop its live gauges."""
    hooks.child_exit(server, worker)


def on_reload(server) -> None:
    """7. Master, SIGHUP, before the replacement workers fork: re-read the model so they fork
    with it (a refused file keeps the current one)."""
    app = _bidder_app(server)
    if app is not None:
        app.models.reload()


def default_workers(s: Settings) -> int:
    """One worker per CPU the plan may use (allowed CPUs less reserved ones)."""
    return len(hooks.plan_for(s).order)


def check_bind(bind: str, flag: str = "--bind") -> str | None:
    """Why ``bind`` cannot be listened on, said so a person can act on it (None if it can)."""
    host, sep, port = bind.rpartition(":")
    if not sep or not port.isdigit():
        return f"{flag} {bind!r}: write it as HOST:PORT, e.g. 127.0.0.1:8080"
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host.strip("[]"), int(port)))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return (f"{bind} is already in use by another process: stop it, or choose "
                        f"another address with {flag} HOST:PORT")
            return f"cannot listen on {bind}: {exc.strerror}"
    return None


def notice_warnings(s: Settings) -> list[str]:
    """What about the notice settings would lose or expose money in production."""
    warnings = []
    host = s.bind.rpartition(":")[0].strip("[]")
    if not s.notice_url and (host in ("0.0.0.0", "::", "") or host.startswith("127.")
                             or host in ("localhost", "::1")):
        warnings.append(f"win/billing notice URLs point at http://{s.bind}, which an exchange "
                        "cannot call back: no spend or frequency would be booked. Set --notice-url "
                        "to the address exchanges reach this host at")
    if s.notice_secret == settings_mod.DEFAULT_NOTICE_SECRET:
        warnings.append("notice URLs are signed with the default --notice-secret, which anyone "
                        "can read: set a secret of your own (BIDDER_NOTICE_SECRET)")
    return warnings
