"""Budget leases against a real ledger (SQLite file) on a settable clock: daily pacing leases
up to the even line plus the catch-up allowance, campaign-local days roll over at their own
midnight, and several holders never reserve more than the budget together."""
from __future__ import annotations

import time
from datetime import datetime
from zoneinfo import ZoneInfo

from bidder.leases import BudgetLeases, BudgetRule, Clock, Settings, day_of
from bidder.ledger import open_ledger

DAILY = 1_000_000  # 1 USD
COST = 1_000  # one bid at 1 USD CPM


def holders(tmp_path, n: int, clock: Clock, rule: BudgetRule) -> list[BudgetLeases]:
    spec = str(tmp_path / "ledger.sqlite3")
    return [BudgetLeases([rule], lambda: open_ledger(spec), clock, Settings(catchup_s=300))
            for _ in range(n)]


def reserve_all(leases: list[BudgetLeases], rounds: int = 200) -> int:
    """Reserve bids round-robin, refilling as a worker's thread would, until none fits."""
    reserved = 0
    for n in range(rounds):
        progress = False
        for h in leases:
            h.refill()
            while h.reserve(0, f"{h.holder}-{n}-{reserved}", COST):
                reserved += COST
                progress = True
        if not progress:
            break
    return reserved


def test_a_daily_budget_is_leased_up_to_the_even_line_plus_catch_up(tmp_path):
    zone = ZoneInfo("America/New_York")
    clock = Clock()
    noon = datetime(2026, 6, 1, 12, 0, tzinfo=zone).timestamp()
    clock.set(noon)
    fleet = holders(tmp_path, 3, clock, BudgetRule(0, "c1", None, DAILY, zone))
    reserved = reserve_all(fleet)
    line = DAILY * (0.5 + 300 / 86400)  # elapsed share of the day + 5 minutes of catch-up
    assert line - 3 * COST < reserved <= line
    assert all(h.blocked & 1 and not h.exhausted & 1 for h in fleet)  # paced, not exhausted
    # an hour later the line has moved: one twenty-fourth of the budget more
    clock.set(noon + 3600)
    more = reserve_all(fleet)
    assert abs(more - DAILY / 24) <= 3 * COST
    # the last minutes of the day: the whole day's budget, and no more
    clock.set(datetime(2026, 6, 1, 23, 59, tzinfo=zone).timestamp())
    total = reserved + more + reserve_all(fleet)
    assert DAILY - 3 * COST < total <= DAILY  # a slice may strand under one bid per holder
    assert all(h.exhausted & 1 for h in fleet)


def test_a_campaign_day_rolls_over_at_its_own_midnight(tmp_path):
    zone = ZoneInfo("Asia/Tokyo")
    before = datetime(2026, 6, 1, 23, 59, tzinfo=zone).timestamp()
    assert day_of(before, zone)[0] == "2026-06-01"  # 14:59 UTC: still June 1st in Tokyo
    clock = Clock()
    clock.set(before)
    [h] = holders(tmp_path, 1, clock, BudgetRule(0, "c1", None, DAILY, zone))
    assert reserve_all([h]) == DAILY
    clock.set(before + 120)  # 00:01 on June 2nd, Tokyo: a new day, a new budget
    assert day_of(clock.now(), zone)[0] == "2026-06-02"
    assert 0 < reserve_all([h]) <= DAILY * (61 / 86400 + 300 / 86400) + COST


def test_holders_together_never_reserve_more_than_a_lifetime_budget(tmp_path):
    fleet = holders(tmp_path, 4, Clock(), BudgetRule(0, "c1", 500_000, None))
    assert 500_000 - 4 * COST < reserve_all(fleet) <= 500_000
    assert all(h.exhausted & 1 for h in fleet)


def test_reservations_expire_oldest_first_and_only_once_past_their_ttl(tmp_path):
    """A refill frees the reservations past reservation_ttl_s (their notice never came) and
    keeps the younger ones, whatever was released in between."""
    spec = str(tmp_path / "ledger.sqlite3")
    h = BudgetLeases([BudgetRule(0, "c1", 500_000, None)], lambda: open_ledger(spec), Clock(),
                     Settings(reservation_ttl_s=0.3))
    h.refill()
    for bid_id in ("a", "b", "c"):
        assert h.reserve(0, bid_id, COST)
    assert h.release("b")  # its loss notice came
    time.sleep(0.35)
    assert h.reserve(0, "d", COST)
    h.refill()
    status = h.status()
    assert status["reservations"] == 1
    assert status["campaigns"]["c1"]["slots"]["total"]["reserved"] == COST  # d's alone
    assert not h.release("a") and not h.release("c")  # expired: gone
    assert h.release("d")
    assert h.status()["campaigns"]["c1"]["slots"]["total"]["reserved"] == 0
