"""Every setting of the bid server, declared once: name, default, CLI flag, environment variable, doc.

Modelled on ``gunicorn/config.py``: a setting is a small declaration, the
argument parser and the environment lookup are generated from the list, and
the resolved values travel as one ``Settings`` namespace to the app, the
Gunicorn hooks and the workers. Precedence: command line > environment > default.
"""
from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

ENV_PREFIX = "BIDDER_"
SERVE_COMMANDS = ("serve", "demo", "ab")
DEFAULT_NOTICE_SECRET = "change-me"  # public: serve warns when it is still in use


def _bool(text: str | bool) -> bool:
    if isinstance(text, bool):
        return text
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (1/0, true/false, on/off), got {text!r}")


def number(kind: type, minimum: float, exclusive: bool = False,
           maximum: float = math.inf) -> Callable[[str], Any]:
    """A parser of finite ``kind`` values at least (or, ``exclusive``, more than) ``minimum``
    and at most ``maximum``: a value that would make every request fail (a zero timeout, a
    negative body limit) stops the start with the flag named, rather than running."""
    bound = f"more than {minimum:g}" if exclusive else f"at least {minimum:g}"
    if maximum != math.inf:
        bound += f" and at most {maximum:g}"

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
        if not (value > minimum if exclusive else value >= minimum) or not value <= maximum \
                or value == math.inf:
            raise argparse.ArgumentTypeError(
                f"must be {bound}{' and finite' if kind is float else ''}, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _optional_positive(text: str) -> float | None:
    if text.strip().lower() in ("", "none", "off"):
        return None
    return number(float, 0.0, exclusive=True)(text)


def _http_url(text: str) -> str:
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise argparse.ArgumentTypeError(f"expected an http:// or https:// URL with a host, got "
                                         f"{text!r} (e.g. https://bidder.example.com)")
    return text


@dataclass(frozen=True)
class Setting:
    name: str
    flag: str
    default: Any
    doc: str
    type: Callable[[str], Any] = str
    boolean: bool = False  # a --x / --no-x pair
    commands: tuple[str, ...] = SERVE_COMMANDS
    metavar: str | None = None

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()


SETTINGS: tuple[Setting, ...] = (
    # --- server ---------------------------------------------------------------------------------
    Setting("bind", "--bind", "127.0.0.1:8080", "Address the server listens on, HOST:PORT.",
            metavar="HOST:PORT"),
    Setting("workers", "--workers", 0, "Worker processes; 0 means one per CPU this process may use "
            "(os.sched_getaffinity, so taskset and cgroup cpusets count).", type=number(int, 0)),
    Setting("worker_class", "--worker-class", "server_hooks.worker.BalancedThreadWorker",
            "Gunicorn worker class. The default is a gthread worker that keeps HTTP/1.1 "
            "connections alive and accepts only while it holds no more connections than its "
            "least-loaded sibling, so connections spread evenly over pinned workers. "
            "'gthread' and 'sync' (closes every connection) are there for comparison."),
    Setting("threads", "--threads", 1, "Request threads per worker. The bid path is CPU-bound "
            "and holds the GIL, so 1 keeps one request per pinned core; keep-alive connections "
            "wait in the worker's poller, not in a thread.", type=number(int, 1)),
    Setting("offload_paths", "--offload-paths", "/notice/",
            "Path prefixes (comma-separated) whose requests go to the worker's thread pool "
            "instead of being handled inline with --threads 1: win and billing notices write "
            "the SQLite ledger (fsync, lock waits), which must not hold up bids. Empty: none.",
            metavar="PREFIX,..."),
    Setting("fast_path", "--fast-path", True, "With --threads 1, answer plain HTTP/1.x requests "
            "(GET or POST with Content-Length, no Expect, Upgrade or chunked body) on the worker's "
            "own short path: one recv, one send, no blocking-mode toggles; anything else goes to "
            "Gunicorn's parser. --no-fast-path sends every request through Gunicorn's parser "
            "(the same answers, more CPU: for comparison).", type=_bool, boolean=True),
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
    Setting("access_log", "--access-log", False, "Log every request (costs CPU on the bid path).",
            type=_bool, boolean=True),
    # --- data -----------------------------------------------------------------------------------
    Setting("memcached", "--memcached", "127.0.0.1:11211",
            "Feature store servers, HOST:PORT[,HOST:PORT...]; several are sharded by rendezvous "
            "hashing (as `bidder seed` writes them); a failed one's keys are unknown until it "
            "answers, never moved to another. 'none' runs without a feature store.",
            metavar="HOST:PORT[,...]"),
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
            "SQLite file that journals every billing notice exactly once (spend and frequency "
            "are booked from it).", metavar="PATH"),
    Setting("notice_url", "--notice-url", None,
            "Base URL the exchange calls back for win/billing notices; default: http://BIND.",
            type=_http_url, metavar="URL"),
    Setting("notice_secret", "--notice-secret", DEFAULT_NOTICE_SECRET,
            "Key that signs win/billing notice URLs (keyed BLAKE2b) so forged notices are "
            "refused; the default is public: set your own in production."),
    # --- bid path -------------------------------------------------------------------------------
    Setting("max_body_bytes", "--max-body-bytes", 64 * 1024,
            "Largest request body accepted (after gzip decoding); larger gets 413.",
            type=number(int, 1)),
    Setting("default_tmax_ms", "--default-tmax-ms", 50, "Deadline when a request has no tmax, ms.",
            type=number(int, 1)),
    Setting("safety_margin_ms", "--safety-margin-ms", 10,
            "Part of tmax kept for the network and the exchange; the bidder answers 204 once "
            "tmax - margin has passed since the request arrived.", type=number(int, 0)),
    # --- pinning and scheduling (server_hooks) --------------------------------------------------
    Setting("pin", "--pin", True, "Pin each worker to its own CPU right after fork.",
            type=_bool, boolean=True),
    Setting("cpu_map", "--cpu-map", None,
            "Explicit slot->CPU map, '0=2,1=3' or a list '2,3' (slot i gets the i-th CPU).",
            metavar="MAP"),
    Setting("reserve_cpus", "--reserve-cpus", "", "CPUs left free for other processes "
            "(memcached, load generator, sshd), e.g. '0' or '0,1'. Pinning avoids them.",
            metavar="CPUS"),
    Setting("slice_ms", "--slice-ms", None, "Per-worker EEVDF slice in ms (Linux >= 6.12, "
            "sched_setattr sched_runtime; clamped by the kernel to 0.1-100). 'off' leaves the "
            "kernel default.", type=_optional_positive, metavar="MS"),
)

BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}


@dataclass
class Settings:
    """Resolved values, attribute per setting name."""
    values: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        try:
            return self.values[name]
        except KeyError:
            raise AttributeError(name) from None


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """Add the flags of every setting that applies to ``command``."""
    group = parser.add_argument_group("server settings (each also read from BIDDER_<NAME>)")
    for s in SETTINGS:
        if command not in s.commands:
            continue
        help_text = f"{s.doc} [env {s.env}; default {s.default!r}]"
        if s.boolean:
            group.add_argument(s.flag, dest=s.name, action=argparse.BooleanOptionalAction,
                               default=None, help=help_text)
        else:
            group.add_argument(s.flag, dest=s.name, type=s.type, default=None,
                               metavar=s.metavar, help=help_text)


def resolve(args: argparse.Namespace | None = None, environ: dict[str, str] | None = None,
            **overrides: Any) -> Settings:
    """Command line (``args``) > environment > defaults, then ``overrides``."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for s in SETTINGS:
        value = getattr(args, s.name, None) if args is not None else None
        if value is None and s.env in environ:
            raw = environ[s.env]
            try:
                value = _bool(raw) if s.boolean else s.type(raw)
            except (ValueError, argparse.ArgumentTypeError) as exc:
                raise SystemExit(f"bidder: {s.env}={raw!r} is not valid for {s.flag}: {exc}")
        values[s.name] = s.default if value is None else value
    values.update(overrides)
    return Settings(values)
