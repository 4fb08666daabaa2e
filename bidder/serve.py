"""``bidder serve``: the real Gunicorn arbiter, configured from ``Settings`` and ``server_hooks``.

The app is preloaded in the master (catalog, model, compiled arrays built once
and shared copy-on-write by the forked workers); the hooks pin each worker to
its slot's CPU and set its scheduler slice; the balanced gthread worker keeps
HTTP/1.1 connections alive and spreads them evenly across workers.
"""
from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import shutil
import socket
import sys
import tempfile

from gunicorn.app.base import BaseApplication

from bidder import config, logs
from bidder import settings as settings_mod
from bidder.settings import Settings
from server_hooks.pinning import CpuMapError

log = logging.getLogger("bidder.serve")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    config.add_config_flag(parser)
    settings_mod.add_arguments(parser, "serve")


def gunicorn_options(s: Settings, workers: int) -> dict[str, object]:
    """Gunicorn settings derived from ours; hooks come from ``server_hooks.hooks``."""
    from server_hooks import hooks

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
        "when_ready": hooks.when_ready,
        "pre_fork": pre_fork,
        "post_fork": post_fork,
        "child_exit": hooks.child_exit,
    }


def post_fork(server, worker) -> None:
    """Worker: its slot on every line it logs from now on, then the pinning hook."""
    from server_hooks import hooks

    logs.set_worker_slot(getattr(worker, "slot", None))
    hooks.post_fork(server, worker)


def pre_fork(server, worker) -> None:
    """The CPU-slot hook, then the last good model for the new worker (a respawn or a HUP must
    not fork with an older model than its siblings serve)."""
    from server_hooks import hooks

    hooks.pre_fork(server, worker)
    models = getattr(server.app.callable, "models", None)
    if models is not None:
        models.adopt_last_good()


class BidderApplication(BaseApplication):
    """A Gunicorn application whose configuration is a ``Settings`` object."""

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

    def reload(self) -> None:
        """SIGHUP: re-read the model in the master so the replacement workers fork with it."""
        super().reload()
        models = getattr(self.callable, "models", None)
        if models is not None:
            models.reload()


def default_workers(s: Settings) -> int:
    """One worker per CPU the plan may use (allowed CPUs less reserved ones)."""
    from server_hooks.hooks import plan_for

    return len(plan_for(s).order)


def run(args: argparse.Namespace) -> int:
    s, _sources = config.resolve(args)
    return serve(s)


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


def serve(s: Settings) -> int:
    problem = check_bind(s.bind) or check_bind(s.admin_bind, "--admin-bind")
    if s.bind.rpartition(":")[2] == s.admin_bind.rpartition(":")[2]:
        problem = (f"--admin-bind {s.admin_bind} has the port of --bind {s.bind}: the app tells "
                   "the admin listener by its port, give it another (default 9100)")
    if problem:
        print(f"bidder serve: {problem}", file=sys.stderr)
        return 1
    metrics_dir = tempfile.mkdtemp(prefix="bidder-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir  # before prometheus_client is imported
    logs.configure(s.log_format, s.log_level)
    for warning in notice_warnings(s):
        log.warning("%s (fine for a local test)", warning)
    master = os.getpid()
    try:
        try:
            workers = s.workers or default_workers(s)
        except CpuMapError as exc:
            print(f"bidder serve: {exc}", file=sys.stderr)
            return 2
        BidderApplication(s, workers).run()
    finally:
        # A worker leaves Arbiter.run by sys.exit through these frames too (it was forked
        # inside them): only the master may remove what the live workers still write to.
        if os.getpid() == master:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0
