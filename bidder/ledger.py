"""The money journal: every win and billing notice recorded exactly once, durably.

SQLite in WAL mode, shared by the workers of one host. A notice's primary key
is ``(kind, bid_id)``, so a notice the exchange sends twice (retries happen) is
stored and counted once; a billing notice adds its clearing price, in integer
USD micros, to the campaign's spend row in the same transaction. Spend is read
back by every worker every 0.25 s (and at once by the worker that books a billing notice)
to stop campaigns that reached their budget.

Notice URLs point back at the host that bid (``--notice-url``), so each host's
ledger holds the spend it caused; a fleet splits a campaign budget across hosts.
"""
from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass

SCHEMA = """
CREATE TABLE IF NOT EXISTS notices (
    kind TEXT NOT NULL,            -- 'win' or 'billing'
    bid_id TEXT NOT NULL,
    campaign TEXT NOT NULL,
    creative TEXT NOT NULL,
    imp_id TEXT NOT NULL,
    user_key TEXT NOT NULL,
    price_micros INTEGER NOT NULL, -- clearing price in USD micros (CPM)
    currency TEXT NOT NULL,        -- currency the exchange cleared in
    test INTEGER NOT NULL,         -- 1: test traffic, never billed
    received_at REAL NOT NULL,
    PRIMARY KEY (kind, bid_id)
);
CREATE TABLE IF NOT EXISTS spend (
    campaign TEXT PRIMARY KEY,
    micros INTEGER NOT NULL        -- sum of billed CPM prices / 1000, in USD micros
);
"""


@dataclass(frozen=True)
class Notice:
    kind: str
    bid_id: str
    campaign: str
    creative: str
    imp_id: str
    user_key: str
    price_micros: int  # CPM clearing price in USD micros
    currency: str
    test: bool


class Ledger:
    """One connection per worker process (open it after fork)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, timeout=10.0, isolation_level=None,
                                   check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # money: durable at commit
        self._db.executescript(SCHEMA)

    def record(self, notice: Notice) -> bool:
        """Store ``notice``; True if it is new, False if this bid's notice was already stored."""
        # One impression costs CPM / 1000: integer division keeps micros exact and never rounds up.
        cost_micros = notice.price_micros // 1000
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                inserted = self._db.execute(
                    "INSERT OR IGNORE INTO notices VALUES (?,?,?,?,?,?,?,?,?,?)",
                    (notice.kind, notice.bid_id, notice.campaign, notice.creative,
                     notice.imp_id, notice.user_key, notice.price_micros, notice.currency,
                     int(notice.test), time.time())).rowcount == 1
                if inserted and notice.kind == "billing" and not notice.test:
                    self._db.execute(
                        "INSERT INTO spend VALUES (?, ?) ON CONFLICT(campaign) "
                        "DO UPDATE SET micros = micros + excluded.micros",
                        (notice.campaign, cost_micros))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return inserted

    def spend(self) -> dict[str, int]:
        """Campaign id -> billed spend in USD micros."""
        with self._lock:
            return dict(self._db.execute("SELECT campaign, micros FROM spend").fetchall())

    def count(self, kind: str) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM notices WHERE kind = ?",
                                    (kind,)).fetchone()[0]

    def close(self) -> None:
        self._db.close()
