"""Log lines as text or JSON (``--log-format``), and faults logged once per interval with a count.

Every line carries the time, level, logger, pid and worker slot (none in the master); JSON
lines add the event's fields (``extra=``) as keys, so a log pipeline can filter on them. The
bidder's own loggers, Gunicorn's error log and its access log all go through the same
formatter. Nothing logged carries a secret or a user id: the access log writes the path
without its query string (a notice URL holds the user key and its signature), and bid-path
faults name the request, never the user.

Bid-path events are counted in /metrics, not logged per request: a fault that repeats (a
malformed request on every call, a bug answered no-bid) is logged by :class:`FaultLog` once
per interval, with how many times it happened since its last line.
"""
from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any

from gunicorn import glogging

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s [%(process)d] [%(slot_label)s] [%(levelname)s] %(name)s: %(message)s"
# Gunicorn's access_log_format: the path without the query string (%(U)s, not %(r)s)
ACCESS_FORMAT = '%(h)s "%(m)s %(U)s %(H)s" %(s)s %(B)s %(M)sms'
FAULT_INTERVAL_S = 10.0
FAULT_KEYS_MAX = 256  # distinct faults remembered; a flood of new ones starts over

_slot: int | None = None  # this process's worker slot (None: the master, or not a worker)
_format = "text"
# LogRecord's own attributes: everything else on a record came with ``extra=`` (event fields)
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "slot", "slot_label"}


def set_worker_slot(slot: int | None) -> None:
    """Called in each worker right after fork: its slot appears on every line it logs."""
    global _slot
    _slot = slot


def fields(record: logging.LogRecord) -> dict[str, Any]:
    """The event fields of a record: what its ``extra=`` added."""
    return {k: v for k, v in vars(record).items() if k not in _RECORD_ATTRS}


def access_fields(record: logging.LogRecord) -> dict[str, Any]:
    """An access line's request as fields: method, path (no query), status, bytes, duration
    and client address, from Gunicorn's atoms (empty for any other record)."""
    atoms = record.args
    if record.name != "gunicorn.access" or not isinstance(atoms, Mapping) or "U" not in atoms:
        return {}
    status = str(atoms.get("s"))
    return {"event": "request", "method": atoms.get("m"), "path": atoms.get("U"),
            "status": int(status) if status.isdigit() else status, "bytes": atoms.get("B"),
            "duration_ms": atoms.get("M"), "remote": atoms.get("h")}


class SlotFilter(logging.Filter):
    """Adds ``slot`` (and ``slot_label`` for text lines) to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.slot = _slot
        record.slot_label = "master" if _slot is None else f"slot {_slot}"
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601, ms), level, logger, pid, slot, message,
    the event's fields, and the traceback as ``exception`` when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                    + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "slot": getattr(record, "slot", _slot),
            "message": record.getMessage(),
        }
        for key, value in {**fields(record), **access_fields(record)}.items():
            line.setdefault(key, value)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """Gunicorn's line with the slot and logger, and the event's fields as ``key=value``."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT, "%Y-%m-%d %H:%M:%S %z")

    def format(self, record: logging.LogRecord) -> str:
        if not hasattr(record, "slot_label"):
            SlotFilter().filter(record)
        text = super().format(record)
        extra = fields(record)
        if extra:
            head, sep, tail = text.partition("\n")  # a traceback stays below the fields
            text = head + " " + " ".join(f"{k}={v}" for k, v in extra.items()) + sep + tail
        return text


def formatter(log_format: str | None = None) -> logging.Formatter:
    return JsonFormatter() if (log_format or _format) == "json" else TextFormatter()


def configure(log_format: str, level: str) -> None:
    """The root logger (the bidder's own loggers) writes ``log_format`` lines to stderr; Gunicorn's
    loggers follow through :class:`GunicornLogger`. Call in the master before Gunicorn starts."""
    global _format
    if log_format not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {log_format!r}")
    _format = log_format
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter())
    handler.addFilter(SlotFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())


class GunicornLogger(glogging.Logger):
    """Gunicorn's logger with the server's formatter on its error and access logs (whose line,
    ``ACCESS_FORMAT``, has no query string: notice URLs carry the user key and a signature).
    ``access`` stays Gunicorn's, so the worker's fast path logs only with ``--access-log``."""

    def setup(self, cfg) -> None:
        super().setup(cfg)
        for log in (self.error_log, self.access_log):
            for handler in log.handlers:
                handler.setFormatter(formatter())
                handler.addFilter(SlotFilter())



class FaultLog:
    """Logs a recurring fault once per ``interval_s`` per key, with its count since the last
    line: a fault on every request costs one line an interval, not one a request (each
    occurrence is counted in /metrics when it happens). Keys are few and fixed (a status and
    a route, an exception type), never request data."""

    def __init__(self, logger: logging.Logger, interval_s: float = FAULT_INTERVAL_S) -> None:
        self.logger = logger
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._faults: dict[str, list] = {}  # key -> [time of its last line, count since]

    def log(self, level: int, key: str, msg: str, *args: Any, exc_info: Any = None,
            **event: Any) -> bool:
        """Log ``msg`` now if ``key`` was not logged within the interval, else count it.
        True if a line was written."""
        now = time.monotonic()
        with self._lock:
            last = self._faults.get(key)
            if last is not None and now - last[0] < self.interval_s:
                last[1] += 1
                return False
            if len(self._faults) >= FAULT_KEYS_MAX:
                self._faults.clear()
            count = 1 if last is None else last[1] + 1
            self._faults[key] = [now, 0]
        if count > 1:
            msg += f" ({count} times since the last such line)"
        self.logger.log(level, msg, *args, exc_info=exc_info,
                        extra={"event": "fault", "fault": key, "count": count, **event})
        return True

    def warning(self, key: str, msg: str, *args: Any, **event: Any) -> bool:
        return self.log(logging.WARNING, key, msg, *args, **event)

    def error(self, key: str, msg: str, *args: Any, **event: Any) -> bool:
        return self.log(logging.ERROR, key, msg, *args, **event)
