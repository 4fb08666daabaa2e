"""The ledger's transactions on both backends (SQLite and a private PostgreSQL): exactly-once
booking from many connections at once, leases that never add up past their limit, reclaimed
leases, bills over a grant, schema versions."""
from __future__ import annotations

import sqlite3
import threading
import time

import pytest

from bidder.ledger import TOTAL, LedgerError, Notice, open_ledger


@pytest.fixture(params=["sqlite", "postgresql"])
def spec(request, tmp_path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "ledger.sqlite3")
    return request.getfixturevalue("pg_url")


def billing(bid_id: str, holder: str = "h1", price_micros: int = 2_000_000, **kw) -> Notice:
    return Notice("billing", bid_id, kw.get("campaign", "c1"), "cr", "1", "u", price_micros,
                  "USD", kw.get("test", False), holder, kw.get("day", "2026-11-29"))


def run_threads(n: int, target) -> None:
    threads = [threading.Thread(target=target, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def test_a_notice_booked_from_many_connections_at_once_counts_once(spec):
    open_ledger(spec).close()
    outcomes: list[bool] = []

    def book(i: int) -> None:
        ledger = open_ledger(spec)
        for n in range(20):  # every connection books the same 20 bids, racing the others
            outcomes.append(ledger.record(billing(f"bid-{n}", holder=f"h{n % 3}"), (TOTAL,)))
        ledger.close()

    run_threads(6, book)
    assert outcomes.count(True) == 20 and outcomes.count(False) == 100
    ledger = open_ledger(spec)
    assert ledger.spend() == {"c1": 20 * 2000}
    assert ledger.spend_by_day() == {("c1", "2026-11-29"): 20 * 2000}
    assert ledger.count("billing") == 20
    ledger.close()


def test_leases_granted_concurrently_never_pass_the_limit(spec):
    open_ledger(spec).close()
    granted: list[int] = []

    def lease(i: int) -> None:
        ledger = open_ledger(spec)
        granted.append(sum(ledger.grant(f"h{i}", "c1", TOTAL, 700, 10_000) for _ in range(10)))
        ledger.close()

    run_threads(5, lease)
    assert sum(granted) == 10_000  # 5 x 10 x 700 asked; the last grant is the remainder
    ledger = open_ledger(spec)
    assert ledger.sync("h0", 0, (TOTAL,)).pools == {("c1", TOTAL): 10_000}
    assert ledger.grant("h9", "c1", TOTAL, 700, 10_000) == 0
    assert ledger.grant("h9", "c1", TOTAL, 700, 12_000) == 700  # a higher limit (pacing) grants
    ledger.close()


def test_a_bill_over_its_grant_raises_grant_and_pool(spec):
    ledger = open_ledger(spec)
    assert ledger.grant("h1", "c1", TOTAL, 3000, 10_000) == 3000
    assert ledger.record(billing("b1"), (TOTAL,))  # 2000 of 3000
    assert ledger.record(billing("b2"), (TOTAL,))  # 4000: 1000 over
    sync = ledger.sync("h1", 0, (TOTAL,))
    assert sync.leases[("c1", TOTAL)].granted == 4000 and sync.leases[("c1", TOTAL)].spent == 4000
    assert sync.pools[("c1", TOTAL)] == 4000 and sync.spend[("c1", TOTAL)] == 4000
    assert sorted(sync.settled) == [("billing", "b1"), ("billing", "b2")]
    assert ledger.record(billing("b3", test=True), (TOTAL,))  # stored...
    assert ledger.spend() == {"c1": 4000}  # ...but test traffic is never billed
    ledger.close()


def test_a_loss_after_a_bill_is_not_stored_and_reads_back_as_settled(spec):
    ledger = open_ledger(spec)
    assert ledger.record(billing("b1"), (TOTAL,))
    assert not ledger.record(Notice("loss", "b1", "c1", "cr", "1", "u", 0, "USD", False, "h1"))
    assert ledger.record(Notice("loss", "b2", "c1", "cr", "1", "u", 0, "USD", False, "h1"))
    assert sorted(ledger.sync("h1", 0, ()).settled) == [("billing", "b1"), ("loss", "b2")]
    assert ledger.sync("h2", 0, ()).settled == []
    ledger.close()


def test_a_gone_holders_unspent_lease_goes_back_to_the_pool(spec):
    ledger = open_ledger(spec)
    ledger.grant("dead", "c1", TOTAL, 5000, 10_000)
    ledger.grant("alive", "c1", TOTAL, 5000, 10_000)
    ledger.record(billing("b1", holder="dead"), (TOTAL,))
    time.sleep(0.05)
    ledger.sync("alive", 0, (TOTAL,))  # renews alive's lease
    assert ledger.reclaim(time.time() - 0.02) == 3000  # dead's 5000 less its 2000 spent
    assert ledger.reclaim(time.time() - 0.02) == 0  # once
    assert ledger.sync("alive", 0, (TOTAL,)).pools[("c1", TOTAL)] == 7000
    assert ledger.grant("alive", "c1", TOTAL, 5000, 10_000) == 3000
    ledger.close()


def test_schema_version_is_kept_and_a_newer_one_refused(spec):
    ledger = open_ledger(spec)
    ledger.close()
    ledger = open_ledger(spec)  # created idempotently
    ledger._execute("UPDATE schema_version SET version = 99")
    ledger.close()
    with pytest.raises(LedgerError, match="upgrade the bidder"):
        open_ledger(spec)


def test_a_schema_1_sqlite_ledger_is_migrated_keeping_its_spend(tmp_path):
    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE notices (kind TEXT NOT NULL, bid_id TEXT NOT NULL, campaign TEXT NOT NULL,
            creative TEXT NOT NULL, imp_id TEXT NOT NULL, user_key TEXT NOT NULL,
            price_micros INTEGER NOT NULL, currency TEXT NOT NULL, test INTEGER NOT NULL,
            received_at REAL NOT NULL, PRIMARY KEY (kind, bid_id));
        CREATE TABLE spend (campaign TEXT PRIMARY KEY, micros INTEGER NOT NULL);
        INSERT INTO notices VALUES ('billing','old-1','c1','cr','1','u',5000000,'USD',0,1.0);
        INSERT INTO spend VALUES ('c1', 5000);""")
    db.commit()
    db.close()
    ledger = open_ledger(str(path))
    assert ledger.spend() == {"c1": 5000}
    assert not ledger.record(billing("old-1"), (TOTAL,))  # still a duplicate
    assert ledger.record(billing("new-1"), (TOTAL,))
    assert ledger.spend() == {"c1": 7000}
    ledger.close()


def test_an_unreachable_postgresql_is_a_clear_error():
    with pytest.raises(LedgerError, match="cannot use the PostgreSQL ledger"):
        open_ledger("postgresql://bidder@127.0.0.1:1/postgres")
