"""Every setting of the bid server, declared once: name, default, CLI flag, environment variable, doc.

Modelled on ``gunicorn/config.py``: a setting is a small declaration, the
argument parser and the environment lookup are generated from the list, and
the resolved values travel as one ``Settings`` namespace to the app, the
Gunicorn hooks and the workers. Precedence: command line > environment > default.

The settings the hooks and the worker read (pinning, slices, offloaded paths,
the body limit) are declared in ``server_hooks/settings.py`` with the
declaration machinery; this list composes them, in their place, with the bid
server's own.
"""
from __future__ import annotations

import argparse
from typing import Any
from urllib.parse import urlsplit

from server_hooks import settings as hook_settings
from server_hooks.settings import (ENV_PREFIX, SERVE_COMMANDS, Setting, Settings, boolean, number,
                                   optional_positive)

__all__ = ["ENV_PREFIX", "SERVE_COMMANDS", "SETTINGS", "BY_NAME", "Setting", "Settings",
           "add_arguments", "boolean", "number", "optional_positive", "resolve"]

_HOOKS = hook_settings.BY_NAME
DEFAULT_NOTICE_SECRET = "change-me"  # public: serve warns when it is still in use


def _http_url(text: str) -> str:
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise argparse.ArgumentTypeError(f"expected an http:// or https:// URL with a host, got "
                                         f"{text!r} (e.g. https://bidder.example.com)")
    return text


def _host_port(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT with a port 1-65535, got {text!r} "
                                         "(e.g. 127.0.0.1:9100)")
    return text


def _log_format(text: str) -> str:
    if text not in ("text", "json"):
        raise argparse.ArgumentTypeError(f"expected text or json, got {text!r}")
    return text


SETTINGS: tuple[Setting, ...] = (
    # --- server ---------------------------------------------------------------------------------
    Setting("bind", "--bind", "127.0.0.1:8080", "Address the server listens on, HOST:PORT.",
            metavar="HOST:PORT"),
    Setting("admin_bind", "--admin-bind", "127.0.0.1:9100",
            "Address of the admin listener, HOST:PORT: /metrics (spend per campaign, worker "
            "pids) and /readyz (file paths) answer there, never on --bind, which keeps the bid "
            "and notice endpoints and /healthz. Keep it on loopback or a private address that "
            "only Prometheus and health checks reach.", type=_host_port, metavar="HOST:PORT"),
    Setting("workers", "--workers", 0, "Worker processes; 0 means one per CPU this process may use "
            "(os.sched_getaffinity, so taskset and cgroup cpusets count).", type=number(int, 0)),
    Setting("worker_class", "--worker-class", "server_hooks.worker.BalancedThreadWorker",
            "Gunicorn worker class. The default is a gthread worker that keeps HTTP/1.1 "
            "connections alive and accepts only while it holds no more connections than its "
            "least-loaded sibling, so connections spread evenly over the workers. "
            "'gthread' and 'sync' (closes every connection) are there for comparison."),
    Setting("threads", "--threads", 1, "Request threads per worker. The bid path is CPU-bound "
            "and holds the GIL, so 1 keeps one request per worker and core; keep-alive "
            "connections wait in the worker's poller, not in a thread.", type=number(int, 1)),
    _HOOKS["offload_paths"],
    _HOOKS["fast_path"],
    _HOOKS["deadline_paths"],
    _HOOKS["wait_share"],
    _HOOKS["max_poll_ms"],
    _HOOKS["closed_loop_share"],
    Setting("keepalive", "--keepalive", 30, "Seconds an idle keep-alive connection is held open.",
            type=number(int, 0)),
    Setting("worker_connections", "--worker-connections", 1000,
            "Maximum open connections per worker.", type=number(int, 1)),
    Setting("timeout", "--timeout", 30, "Seconds of silence after which the master kills a worker "
            "(0: never, as in Gunicorn).", type=number(int, 0)),
    Setting("pid", "--pid", None, "Write the master's PID to this file (as Gunicorn's --pid).",
            metavar="FILE"),
    Setting("app", "--app", None, "WSGI app to serve instead of the bidder, MODULE:CALLABLE "
            "(benchmarks serve a hello-world app through the very same server configuration).",
            metavar="MODULE:CALLABLE"),
    Setting("log_level", "--log-level", "info", "Log level: debug, info, warning, error."),
    Setting("log_format", "--log-format", "text",
            "Log lines as text, or json: one object a line with time, level, logger, pid, worker "
            "slot and the event's fields (for a log pipeline).", type=_log_format,
            metavar="text|json"),
    Setting("access_log", "--access-log", False, "Log every request (costs CPU on the bid path).",
            type=boolean, boolean=True),
    # --- data -----------------------------------------------------------------------------------
    Setting("memcached", "--memcached", "127.0.0.1:11211",
            "Feature store servers, HOST:PORT[,HOST:PORT...], or unix:PATH for a co-located "
            "memcached's Unix socket (cheaper per look-up); several are sharded by rendezvous "
            "hashing (as `bidder seed` writes them, so name them the same way there); a failed "
            "one's keys are unknown until it answers, never moved to another. 'none' runs "
            "without a feature store.",
            metavar="HOST:PORT|unix:PATH[,...]"),
    Setting("memcached_connect_timeout_ms", "--memcached-connect-timeout-ms", 3.0,
            "Connect timeout to memcached, in ms.", type=number(float, 0, exclusive=True)),
    Setting("memcached_timeout_ms", "--memcached-timeout-ms", 5.0,
            "Read/write timeout to memcached, in ms (never more than the request has left).",
            type=number(float, 0, exclusive=True)),
    Setting("memcached_retry_ms", "--memcached-retry-ms", 1000.0,
            "After a memcached fault, how long a worker answers from default features before "
            "it tries that server again, in ms.", type=number(float, 0)),
    Setting("campaigns", "--campaigns", None, "Campaign catalog JSON; default: the bundled sample.",
            metavar="PATH"),
    Setting("model", "--model", None, "CTR model artifact; default: the bundled model.",
            metavar="PATH"),
    Setting("model_watch_s", "--model-watch-s", 2.0,
            "How often each worker checks the model file for a new version, in seconds "
            "(0 disables the watch; SIGHUP to the master always reloads).",
            type=number(float, 0)),
    Setting("currency_rates", "--currency-rates", "EUR=1.08,GBP=1.27,JPY=0.0067,CAD=0.73,AUD=0.65",
            "USD value of one unit of each other currency, CUR=RATE[,...], or a JSON file "
            "{\"EUR\": 1.08, ...}. Floors in a currency not listed make that imp ineligible.",
            metavar="CUR=RATE,..."),
    Setting("ledger", "--ledger", "bidder-ledger.sqlite3",
            "The money ledger: an SQLite file (one host) or postgresql://USER@HOST:PORT/DB "
            "(a fleet: every host the same). Every notice is booked there exactly once, spend "
            "by (campaign, day), and budgets are leased from it.",
            metavar="PATH|postgresql://..."),
    Setting("notice_url", "--notice-url", None,
            "Base URL the exchange calls back for win/billing notices; default: http://BIND.",
            type=_http_url, metavar="URL"),
    Setting("notice_secret", "--notice-secret", DEFAULT_NOTICE_SECRET,
            "Key that signs win/billing/loss notice URLs (keyed BLAKE2b) so forged notices are "
            "refused; the default is public: set your own in production."),
    Setting("notice_verify_secrets", "--notice-verify-secrets", "",
            "More keys accepted when verifying notices, comma-separated: to rotate without "
            "losing a notice, add the new key here on every host, then sign with it "
            "(--notice-secret) and keep the old one here for the notice lifetime.",
            metavar="S1,S2"),
    Setting("notice_ttl_s", "--notice-ttl-s", 48 * 3600,
            "Notice lifetime, seconds: older notices get 400 and are counted, never booked "
            "(exchanges send billing notices within minutes; 48 h covers their retries and "
            "batch uploads).", type=number(float, 60)),
    # --- budgets (bidder.leases) ----------------------------------------------------------------
    Setting("reservation_ttl_s", "--reservation-ttl-s", 300.0,
            "How long a bid's budget reservation waits for its billing or loss notice before "
            "it is released; a bill arriving later is still booked and is the overspend "
            "bound's term (see README).", type=number(float, 1)),
    Setting("lease_slice", "--lease-slice", 0.01,
            "Share of a campaign's budget one worker leases at a time: smaller bounds what a "
            "dead host can leave open, larger costs fewer ledger round trips.",
            type=number(float, 0, exclusive=True, maximum=1)),
    Setting("lease_ttl_s", "--lease-ttl-s", 30.0,
            "A worker's leases not renewed for this long (it died) go back to the pool, "
            "seconds.", type=number(float, 1)),
    Setting("pacing_catchup_s", "--pacing-catchup-s", 300.0,
            "Daily pacing: how far ahead of the even line (budget x elapsed share of the day) "
            "leases may go, in seconds of the day's budget.", type=number(float, 0)),
    Setting("budget_clock", "--budget-clock", None,
            "Run budget days on an accelerated clock, SIM_START,WALL_START,RATE (Unix s): for "
            "harnesses that draw a day in minutes; default the wall clock.",
            metavar="SIM,WALL,RATE"),
    # --- bid path -------------------------------------------------------------------------------
    _HOOKS["max_body_bytes"],
    Setting("default_tmax_ms", "--default-tmax-ms", 50, "Deadline when a request has no tmax, ms.",
            type=number(int, 1)),
    Setting("safety_margin_ms", "--safety-margin-ms", 10,
            "Part of tmax kept for the network and the exchange; the bidder answers 204 once "
            "tmax - margin has passed since the request arrived.", type=number(int, 0)),
    # --- pinning and scheduling (server_hooks) --------------------------------------------------
    _HOOKS["pin"], _HOOKS["cpu_map"], _HOOKS["reserve_cpus"], _HOOKS["slice_ms"],
)

BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """Add the flags of every setting that applies to ``command``."""
    hook_settings.add_arguments(parser, command, SETTINGS)


def resolve(args: argparse.Namespace | None = None, environ: dict[str, str] | None = None,
            **overrides: Any) -> Settings:
    """Command line (``args``) > environment > defaults, then ``overrides``."""
    return hook_settings.resolve(args, environ, SETTINGS, **overrides)
