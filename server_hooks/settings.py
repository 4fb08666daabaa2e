"""How a setting is declared (name, default, CLI flag, environment variable, doc), and the
settings the hooks and the worker read.

Modelled on ``gunicorn/config.py``: a setting is a small declaration, the argument parser and
the environment lookup are generated from a list of them, and the resolved values travel as
one ``Settings`` namespace. ``bidder/settings.py`` composes the settings declared here with the
bid server's own into one list, so ``bidder serve`` has one set of flags and one set of
``BIDDER_*`` variables. The hooks read the resolved values from the arbiter's application
(``server.app.settings``) or, when Gunicorn runs them without ``bidder serve``, from the
environment (``resolve()``). Precedence: command line > environment > default.
"""
from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

ENV_PREFIX = "BIDDER_"
SERVE_COMMANDS = ("serve", "demo", "ab")  # the commands that start a server take these flags


def boolean(text: str | bool) -> bool:
    """1/0, true/false, yes/no, on/off (any case); an empty value is false."""
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


class Off:
    """What an optional setting given as none/off/empty parses to. Unlike None (not given) it
    overrides the environment and the default; ``resolve`` turns it into None."""

    def __repr__(self) -> str:
        return "off"


OFF = Off()


def optional(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """``parse``, or OFF for none/off/empty."""
    def parse_optional(text: str) -> Any:
        if text.strip().lower() in ("", "none", "off"):
            return OFF
        return parse(text)

    parse_optional.__name__ = parse.__name__
    return parse_optional


optional_positive = optional(number(float, 0.0, exclusive=True))  # a number more than 0, or None


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
    # --- read by the worker -----------------------------------------------------------------------
    Setting("offload_paths", "--offload-paths", "/notice/",
            "Path prefixes (comma-separated) whose requests go to the worker's thread pool "
            "instead of being handled inline with --threads 1: win and billing notices write "
            "the SQLite ledger (fsync, lock waits), which must not hold up bids. Empty: none.",
            metavar="PREFIX,..."),
    Setting("fast_path", "--fast-path", True, "With --threads 1, answer plain HTTP/1.x requests "
            "(GET or POST with Content-Length, no Expect, Upgrade or chunked body) on the worker's "
            "own short path: one recv, one send, no blocking-mode toggles; anything else goes to "
            "Gunicorn's parser. --no-fast-path sends every request through Gunicorn's parser "
            "(the same answers, more CPU: for comparison).", type=boolean, boolean=True),
    Setting("deadline_paths", "--deadline-paths", "/openrtb2/bid",
            "Path prefixes (comma-separated) of POSTs that carry an OpenRTB tmax. With --threads "
            "1 and the fast path, such a request taken up too late to be answered within tmax "
            "less --safety-margin-ms of its kernel receive time is answered 204 "
            "(X-Nobid-Reason: deadline) by the worker, before its JSON is decoded. Empty: none.",
            metavar="PREFIX,..."),
    Setting("wait_share", "--wait-share", 0.3,
            "Share of a request's time to its deadline (tmax less the margin) that an "
            "overloaded worker spends serving one poll's requests on --deadline-paths, oldest "
            "first; the rest of the poll gets a quick 204 (X-Nobid-Reason: overload). Lower "
            "answers sooner and more often under overload, which an exchange with a fixed pool "
            "of connections needs to carry its requests; higher bids more when every answer is "
            "followed at once by the next request. 1: only requests that would miss their "
            "deadline. At most --max-poll-ms. docs/tuning.md (Overload) gives the measurements "
            "behind the default.",
            type=number(float, 0.0, exclusive=True, maximum=1.0)),
    Setting("max_poll_ms", "--max-poll-ms", 12.0,
            "The longest, in ms, an overloaded worker spends serving one poll's requests on "
            "--deadline-paths, whatever their tmax: --wait-share of the time to the deadline, "
            "capped at this (the default is that share at tmax 50). An exchange with a fixed "
            "pool of connections carries its requests only while answers come back fast: "
            "uncapped, a share of a long tmax (33 ms at tmax 120) let an open loop at twice "
            "capacity over 256 connections queue for seconds. 'off': the share alone.",
            type=optional(number(float, 0.0, exclusive=True)), metavar="MS"),
    Setting("closed_loop_share", "--closed-loop-share", None,
            "A --wait-share (not capped by --max-poll-ms) used instead while the client keeps "
            "every connection busy, each next request coming as soon as the answer before it "
            "(for a second on end); off (the default): --wait-share whatever the client does. "
            "Against a closed loop (a fixed number of requests in flight, as wrk sends) longer "
            "polls make more bids with fewer no-bids. But an exchange whose pool of "
            "connections has run dry looks the same, and longer polls then answer fewer "
            "requests than it sends: its queue grows without bound (p99 0.2-0.8 s at twice "
            "capacity with 0.5). docs/tuning.md (Overload) gives the measurements.",
            type=optional(number(float, 0.0, exclusive=True, maximum=1.0)), metavar="SHARE"),
    Setting("max_body_bytes", "--max-body-bytes", 64 * 1024,
            "Largest request body accepted (after gzip decoding); larger gets 413.",
            type=number(int, 1)),
    # --- pinning and scheduling, read by the hooks -----------------------------------------------
    Setting("pin", "--pin", True, "Pin each worker to its own CPU right after fork. Pinned "
            "workers kept far more of their bids under overload; below saturation, where "
            "memcached or other busy processes share their CPUs, unpinned ones used up to "
            "11 percent less CPU per request (docs/tuning.md, Pinning; measure with "
            "`bidder ab`).",
            type=boolean, boolean=True),
    Setting("cpu_map", "--cpu-map", None,
            "Explicit slot->CPU map, '0=2,1=3' or a list '2,3' (slot i gets the i-th CPU).",
            metavar="MAP"),
    Setting("reserve_cpus", "--reserve-cpus", "", "CPUs left free for other processes "
            "(memcached, load generator, sshd), e.g. '0' or '0,1'. Pinning avoids them.",
            metavar="CPUS"),
    Setting("slice_ms", "--slice-ms", None, "Per-worker EEVDF slice in ms (Linux >= 6.12, "
            "sched_setattr sched_runtime; clamped by the kernel to 0.1-100). 'off' leaves the "
            "kernel default.", type=optional_positive, metavar="MS"),
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


def add_arguments(parser: argparse.ArgumentParser, command: str,
                  declared: Iterable[Setting] = SETTINGS) -> None:
    """Add the flags of every ``declared`` setting that applies to ``command``."""
    group = parser.add_argument_group("server settings (each also read from BIDDER_<NAME>)")
    for s in declared:
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
            declared: Iterable[Setting] = SETTINGS, **overrides: Any) -> Settings:
    """The ``declared`` settings from the command line (``args``) > environment > defaults,
    then ``overrides``."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for s in declared:
        value = getattr(args, s.name, None) if args is not None else None
        if value is None and s.env in environ:
            raw = environ[s.env]
            try:
                value = boolean(raw) if s.boolean else s.type(raw)
            except (ValueError, argparse.ArgumentTypeError) as exc:
                raise SystemExit(f"bidder: {s.env}={raw!r} is not valid for {s.flag}: {exc}")
        values[s.name] = s.default if value is None else None if value is OFF else value
    values.update({name: None if value is OFF else value for name, value in overrides.items()})
    return Settings(values)
