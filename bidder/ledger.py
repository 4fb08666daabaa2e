"""The money journal: every notice booked exactly once, spend by (campaign, day), budget leases.

Two backends behind one interface (``open_ledger``): an SQLite file (the single-host default,
WAL mode, shared by the workers of one host) and PostgreSQL (psycopg 3), the store a fleet of
hosts shares. Both run the same transactions:

- a notice is ``INSERT ... ON CONFLICT (kind, bid_id) DO NOTHING RETURNING``: a retry landing on
  any host, any worker, finds the row and is a duplicate; a billing notice that is new adds its
  cost (clearing CPM / 1000, integer USD micros) to ``spend (campaign, day)`` and to the lease
  of the worker that made the bid, in the same transaction;
- budgets are held by leases (``bidder.budget``): ``pools (campaign, period)`` holds how much of
  a period's budget is leased out, ``leases (campaign, period, holder)`` what one worker was
  granted and what its bids were billed. A grant is a conditional update of the pool
  (``leased + grant <= limit``), so the leases of the whole fleet never add up to more than
  the limit; a billing over its holder's grant (a bill that came after the reservation was
  released, or after a dead holder's lease was reclaimed) raises grant and pool with it, so
  the pool always covers every booked cost and the overshoot is visible.

A connection is opened per process and thread that books (after fork): never shared.
"""
from __future__ import annotations

import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

SCHEMA_VERSION = 2
TOTAL = "total"  # the period of a lifetime budget; daily periods are 'YYYY-MM-DD', campaign-local
KINDS = ("win", "billing", "loss")
RETRIES = 5  # a transaction aborted by a deadlock or a serialization failure is run again

TABLES = (
    """CREATE TABLE IF NOT EXISTS notices (
    kind TEXT NOT NULL,            -- 'win', 'billing' or 'loss'
    bid_id TEXT NOT NULL,
    campaign TEXT NOT NULL,
    creative TEXT NOT NULL,
    imp_id TEXT NOT NULL,
    user_key TEXT NOT NULL,
    price_micros BIGINT NOT NULL,  -- clearing price in USD micros (CPM)
    currency TEXT NOT NULL,        -- currency the exchange cleared in
    test INTEGER NOT NULL,         -- 1: test traffic, never billed
    received_at DOUBLE PRECISION NOT NULL,
    holder TEXT NOT NULL DEFAULT '', -- the worker whose bid it is (its budget lease)
    day TEXT NOT NULL DEFAULT '',    -- the bid's campaign-local day
    PRIMARY KEY (kind, bid_id))""",
    "CREATE INDEX IF NOT EXISTS notices_by_holder ON notices (holder, received_at)",
    """CREATE TABLE IF NOT EXISTS spend (
    campaign TEXT NOT NULL,
    day TEXT NOT NULL,             -- campaign-local day of the bid ('' for spend booked before days)
    micros BIGINT NOT NULL,        -- sum of billed CPM prices / 1000, in USD micros
    PRIMARY KEY (campaign, day))""",
    """CREATE TABLE IF NOT EXISTS pools (
    campaign TEXT NOT NULL,
    period TEXT NOT NULL,          -- 'total' or a campaign-local day
    leased BIGINT NOT NULL,        -- USD micros leased out to holders (covers all their spend)
    PRIMARY KEY (campaign, period))""",
    """CREATE TABLE IF NOT EXISTS leases (
    campaign TEXT NOT NULL,
    period TEXT NOT NULL,
    holder TEXT NOT NULL,
    granted BIGINT NOT NULL,       -- USD micros this holder may commit
    spent BIGINT NOT NULL,         -- USD micros of its bids billed so far
    renewed_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (campaign, period, holder))""",
    "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)",
)


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
    holder: str = ""  # the worker that made the bid
    day: str = ""  # the bid's campaign-local day


@dataclass(frozen=True)
class Lease:
    granted: int
    spent: int


@dataclass(frozen=True)
class Sync:
    """What a holder reads each refill: one consistent snapshot."""

    leases: dict[tuple[str, str], Lease]  # (campaign, period) -> this holder's lease
    pools: dict[tuple[str, str], int]  # (campaign, period) -> leased out, fleet-wide
    spend: dict[tuple[str, str], int]  # (campaign, period) -> billed, fleet-wide
    settled: list[tuple[str, str]]  # (kind, bid_id) of this holder's billing and loss notices


class LedgerError(RuntimeError):
    """The ledger cannot be opened or has a schema this version does not know."""


def cost_micros(price_micros: int) -> int:
    """One impression costs CPM / 1000: integer division keeps micros exact, never rounds up."""
    return price_micros // 1000


class Ledger(ABC):
    """One connection (open it after fork, one per thread that uses it)."""

    placeholder = "?"
    for_update = ""  # row locks where the engine has them (SQLite locks the whole file)
    retryable: tuple[type[BaseException], ...] = ()

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self._lock = threading.Lock()  # a connection is used by one statement at a time

    # --- engine-specific --------------------------------------------------------------------
    @abstractmethod
    def _execute(self, sql: str, params: tuple = ()) -> Any:
        """Run ``sql`` (``%s`` placeholders) and return a cursor."""

    @abstractmethod
    def _transaction(self, write: bool) -> Any:
        """A context manager around one transaction."""

    @abstractmethod
    def close(self) -> None: ...

    # --- shared -----------------------------------------------------------------------------
    def _sql(self, sql: str) -> str:
        return sql.replace("%s", self.placeholder).replace("{for_update}", self.for_update)

    @contextmanager
    def _tx(self, write: bool = True) -> Iterator[None]:
        with self._lock, self._transaction(write):
            yield

    @contextmanager
    def _begun(self, begin: str) -> Iterator[None]:
        """``begin`` (a BEGIN statement), then COMMIT, or ROLLBACK when the block raises."""
        self._execute(begin)
        try:
            yield
        except BaseException:
            self._execute("ROLLBACK")
            raise
        self._execute("COMMIT")

    def _retrying(self, work: Callable[[], Any], write: bool = True) -> Any:
        for attempt in range(RETRIES):
            try:
                with self._tx(write):
                    return work()
            except self.retryable:
                if attempt == RETRIES - 1:
                    raise
                time.sleep(0.005 * (attempt + 1))

    def _one(self, sql: str, params: tuple = ()) -> tuple | None:
        return self._execute(self._sql(sql), params).fetchone()

    def _all(self, sql: str, params: tuple = ()) -> list[tuple]:
        return self._execute(self._sql(sql), params).fetchall()

    def _create_schema(self) -> None:
        for statement in TABLES:
            self._execute(statement)
        row = self._one("SELECT max(version) FROM schema_version")
        version = row[0] if row else None
        if version is None:
            self._execute(self._sql("INSERT INTO schema_version VALUES (%s)"), (SCHEMA_VERSION,))
        elif version > SCHEMA_VERSION:
            raise LedgerError(f"ledger {self.spec} has schema version {version}, newer than this "
                              f"bidder's {SCHEMA_VERSION}: upgrade the bidder")

    def record(self, notice: Notice, periods: tuple[str, ...] = ()) -> bool:
        """Store ``notice``; True if it is new, False if this bid's notice of that kind is
        already stored. A new billing notice books its cost to ``spend`` and, for each budget
        period in ``periods``, to its holder's lease. A loss notice for a bid already billed is
        not stored (the bid was won)."""
        n = notice
        row = (n.kind, n.bid_id, n.campaign, n.creative, n.imp_id, n.user_key, n.price_micros,
               n.currency, int(n.test), time.time(), n.holder, n.day)

        def book() -> bool:
            columns = ("INSERT INTO notices (kind, bid_id, campaign, creative, imp_id, user_key, "
                       "price_micros, currency, test, received_at, holder, day) ")
            if n.kind == "loss":
                inserted = self._one(
                    columns + "SELECT %s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s WHERE NOT EXISTS "
                    "(SELECT 1 FROM notices WHERE kind = 'billing' AND bid_id = %s) "
                    "ON CONFLICT (kind, bid_id) DO NOTHING RETURNING 1", row + (n.bid_id,))
            else:
                inserted = self._one(columns + "VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s) "
                                     "ON CONFLICT (kind, bid_id) DO NOTHING RETURNING 1", row)
            if inserted is None:
                return False
            if n.kind == "billing" and not n.test:
                cost = cost_micros(n.price_micros)
                self._execute(self._sql(
                    "INSERT INTO spend VALUES (%s, %s, %s) ON CONFLICT (campaign, day) "
                    "DO UPDATE SET micros = spend.micros + excluded.micros"),
                    (n.campaign, n.day, cost))
                for period in periods:
                    self._book_to_lease(n.campaign, period, n.holder, cost)
            return True

        return self._retrying(book)

    def _book_to_lease(self, campaign: str, period: str, holder: str, cost: int) -> None:
        """Add ``cost`` to the holder's lease; what goes over its grant raises grant and pool."""
        key = (campaign, period, holder)
        self._execute(self._sql("INSERT INTO leases VALUES (%s, %s, %s, 0, 0, 0) "
                                "ON CONFLICT (campaign, period, holder) DO NOTHING"), key)
        granted, spent = self._one("SELECT granted, spent FROM leases WHERE campaign = %s AND "
                                   "period = %s AND holder = %s {for_update}", key)
        over = max(0, spent + cost - granted)
        self._execute(self._sql("UPDATE leases SET spent = spent + %s, granted = granted + %s "
                                "WHERE campaign = %s AND period = %s AND holder = %s"),
                      (cost, over) + key)
        if over:
            self._execute(self._sql(
                "INSERT INTO pools VALUES (%s, %s, %s) ON CONFLICT (campaign, period) "
                "DO UPDATE SET leased = pools.leased + excluded.leased"), (campaign, period, over))

    def grant(self, holder: str, campaign: str, period: str, want: int, limit: int) -> int:
        """Lease up to ``want`` micros of ``campaign``'s ``period`` to ``holder`` without the
        pool going over ``limit``; returns what was granted (0 when nothing is left). Renews
        the holder's lease either way."""
        def lease() -> int:
            self._execute(self._sql("INSERT INTO pools VALUES (%s, %s, 0) "
                                    "ON CONFLICT (campaign, period) DO NOTHING"), (campaign, period))
            (leased,) = self._one("SELECT leased FROM pools WHERE campaign = %s AND period = %s "
                                  "{for_update}", (campaign, period))
            amount = min(want, limit - leased)
            if amount > 0:
                updated = self._one("UPDATE pools SET leased = leased + %s WHERE campaign = %s "
                                    "AND period = %s AND leased + %s <= %s RETURNING leased",
                                    (amount, campaign, period, amount, limit))
                if updated is None:  # cannot happen under the row lock; never grant past it
                    amount = 0
            amount = max(amount, 0)
            self._execute(self._sql(
                "INSERT INTO leases VALUES (%s, %s, %s, %s, 0, %s) "
                "ON CONFLICT (campaign, period, holder) DO UPDATE SET "
                "granted = leases.granted + excluded.granted, renewed_at = excluded.renewed_at"),
                (campaign, period, holder, amount, time.time()))
            return amount

        return self._retrying(lease)

    def sync(self, holder: str, since: float, periods: tuple[str, ...]) -> Sync:
        """This holder's leases, the fleet's pools and spend for ``periods`` ('total' is the
        lifetime sum of every day), and this holder's billing and loss notices received since
        ``since`` (wall time), all from one snapshot; renews the holder's leases after."""
        def read() -> Sync:
            leases = {(c, p): Lease(g, s) for c, p, g, s in self._all(
                "SELECT campaign, period, granted, spent FROM leases WHERE holder = %s",
                (holder,))}
            wanted = set(periods)
            pools = {(c, p): leased for c, p, leased in self._all(
                "SELECT campaign, period, leased FROM pools") if p in wanted}
            spend: dict[tuple[str, str], int] = {}
            for campaign, day, micros in self._all("SELECT campaign, day, micros FROM spend"):
                spend[(campaign, TOTAL)] = spend.get((campaign, TOTAL), 0) + micros
                if day in wanted:
                    spend[(campaign, day)] = micros
            settled = self._all("SELECT kind, bid_id FROM notices WHERE holder = %s AND "
                                "received_at >= %s AND kind <> 'win'", (holder, since))
            return Sync(leases, pools, spend, [tuple(s) for s in settled])

        snapshot = self._retrying(read, write=False)
        self._retrying(lambda: self._execute(self._sql(
            "UPDATE leases SET renewed_at = %s WHERE holder = %s"), (time.time(), holder)))
        return snapshot

    def reclaim(self, older_than: float) -> int:
        """Give back to their pools the unspent part of leases not renewed since
        ``older_than`` (wall time): their holder is gone. Returns the micros reclaimed."""
        def give_back() -> int:
            total = 0
            for campaign, period, holder in self._all(
                    "SELECT campaign, period, holder FROM leases WHERE renewed_at < %s "
                    "AND granted > spent", (older_than,)):
                # pool first, then lease: the order grant() takes its locks in
                self._one("SELECT leased FROM pools WHERE campaign = %s AND period = %s "
                          "{for_update}", (campaign, period))
                row = self._one("SELECT granted - spent FROM leases WHERE campaign = %s AND "
                                "period = %s AND holder = %s AND renewed_at < %s {for_update}",
                                (campaign, period, holder, older_than))
                if not row or row[0] <= 0:
                    continue
                self._execute(self._sql("UPDATE pools SET leased = leased - %s WHERE "
                                        "campaign = %s AND period = %s"), (row[0], campaign, period))
                self._execute(self._sql("UPDATE leases SET granted = spent WHERE campaign = %s "
                                        "AND period = %s AND holder = %s"),
                              (campaign, period, holder))
                total += row[0]
            return total

        return self._retrying(give_back)

    def spend(self) -> dict[str, int]:
        """Campaign id -> billed spend in USD micros, all days."""
        with self._tx(write=False):
            return {c: int(m) for c, m in self._all(
                "SELECT campaign, sum(micros) FROM spend GROUP BY campaign")}

    def spend_by_day(self) -> dict[tuple[str, str], int]:
        """(campaign, campaign-local day) -> billed spend in USD micros."""
        with self._tx(write=False):
            return {(c, d): m for c, d, m in self._all("SELECT campaign, day, micros FROM spend")}

    def count(self, kind: str) -> int:
        with self._tx(write=False):
            return self._one("SELECT count(*) FROM notices WHERE kind = %s", (kind,))[0]


class SqliteLedger(Ledger):
    """A file shared by the workers of one host (WAL: readers never wait on the writer)."""

    retryable = ()  # BEGIN IMMEDIATE serializes writers; busy waits are the timeout's job

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self._db = sqlite3.connect(path, timeout=10.0, isolation_level=None,
                                   check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # money: durable at commit
        with self._tx():
            self._migrate_v1()
            self._create_schema()

    def _migrate_v1(self) -> None:
        """Schema 1 (no version table): spend by campaign only, notices without holder and day."""
        tables = {r[0] for r in self._db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "notices" not in tables or "schema_version" in tables:
            return
        self._db.execute("ALTER TABLE notices ADD COLUMN holder TEXT NOT NULL DEFAULT ''")
        self._db.execute("ALTER TABLE notices ADD COLUMN day TEXT NOT NULL DEFAULT ''")
        if "spend" in tables:
            self._db.execute("ALTER TABLE spend RENAME TO spend_v1")
            self._db.execute(TABLES[2])
            self._db.execute("INSERT INTO spend SELECT campaign, '', micros FROM spend_v1")
            self._db.execute("DROP TABLE spend_v1")

    def _execute(self, sql: str, params: tuple = ()) -> sqlite3.Cursor:
        return self._db.execute(sql, params)

    @contextmanager
    def _transaction(self, write: bool) -> Iterator[None]:
        with self._begun("BEGIN IMMEDIATE" if write else "BEGIN"):
            yield

    def close(self) -> None:
        self._db.close()


class PostgresLedger(Ledger):
    """PostgreSQL through psycopg 3: the ledger a fleet of hosts shares."""

    placeholder = "%s"
    for_update = "FOR UPDATE"

    def __init__(self, url: str, connect_timeout_s: float = 5.0) -> None:
        super().__init__(url)
        import psycopg
        from psycopg import errors

        self.retryable = (errors.DeadlockDetected, errors.SerializationFailure)
        try:
            self._db = psycopg.connect(url, autocommit=True, connect_timeout=connect_timeout_s)
            with self._tx():
                # hosts starting together create the schema once
                self._db.execute("SELECT pg_advisory_xact_lock(7261041)")
                self._create_schema()
        except psycopg.Error as exc:
            raise LedgerError(f"cannot use the PostgreSQL ledger {describe(url)}: "
                              f"{str(exc).strip()}") from None

    def _execute(self, sql: str, params: tuple = ()) -> Any:
        return self._db.execute(sql, params)

    @contextmanager
    def _transaction(self, write: bool) -> Iterator[None]:
        if write:
            with self._db.transaction():
                yield
            return
        with self._begun("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"):
            yield

    def close(self) -> None:
        self._db.close()


def is_postgres(spec: str) -> bool:
    return spec.startswith(("postgresql://", "postgres://"))


def open_ledger(spec: str) -> Ledger:
    """``postgresql://USER@HOST:PORT/DB`` -> PostgreSQL; anything else is an SQLite file path."""
    return PostgresLedger(spec) if is_postgres(spec) else SqliteLedger(spec)


def describe(spec: str) -> str:
    """``spec`` without a password, for logs and errors."""
    if not is_postgres(spec) or "@" not in spec:
        return spec
    scheme, rest = spec.split("://", 1)
    userinfo, host = rest.rsplit("@", 1)
    return f"{scheme}://{userinfo.split(':', 1)[0]}@{host}"
