"""Fleet-wide budgets: leases from the ledger, reservations at bid time, daily pacing.

Each worker process is a lease *holder*. It leases slices of a campaign's budget from the
ledger (a conditional update there: the leases of the whole fleet never add up to more than
the limit) and reserves each bid's most costly bill (bid price plus the price tolerance,
/ 1000) against its slice, in memory, on the bid path. A billing notice turns a reservation
into spend (the holder learns it from the ledger, whatever host booked it); a loss notice,
or the reservation lifetime, releases it. Slices are refilled by a thread of the worker,
never by a bid: a bid never waits on the database.

A period is the campaign's lifetime (``budget``) or its campaign-local day (``daily_budget``,
in its ``timezone``). Daily budgets are paced: the pool of a day is leased out only up to
the budget x the elapsed share of the day, plus a catch-up allowance, so a campaign cannot
spend its day in minutes.

Overspend bound: grants never exceed the limit and every bill fits the reservation it
settles, so spend goes over the limit only by bills that arrive after their reservation was
released: after the reservation lifetime (``--reservation-ttl-s``), or after the lease of a
holder that died was reclaimed (``--lease-ttl-s`` without renewal). At most the reservations
a dead holder had open, <= its last slice and refill threshold, per dead holder.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from time import monotonic
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from zoneinfo import ZoneInfo

from bidder import metrics
from bidder.ledger import TOTAL, Ledger, Sync

log = logging.getLogger("bidder.leases")

SECONDS_PER_DAY = 86400
UTC = ZoneInfo("UTC")
SETTLED_WINDOW_S = 5.0  # notices are read back this far before the last sync (commit delays)
MIN_SLICE_MICROS = 10_000  # a cent: a few impressions at least, however small the share
STATE_OK, STATE_PACED, STATE_EXHAUSTED = 0, 1, 2


class Clock:
    """Budget time: the wall clock, or (to run a day in minutes) an accelerated one:
    ``SIM_START,WALL_START,RATE`` maps wall time w to SIM_START + (w - WALL_START) x RATE."""

    def __init__(self, spec: str | None = None) -> None:
        self.sim_start = self.wall_start = 0.0
        self.rate = 1.0
        if spec:
            try:
                sim, wall, rate = (float(x) for x in spec.split(","))
            except ValueError:
                raise ValueError(f"budget clock {spec!r}: write SIM_START,WALL_START,RATE in "
                                 "Unix seconds, e.g. 1780000000,1770000000,360") from None
            if not rate > 0:
                raise ValueError(f"budget clock {spec!r}: RATE must be positive")
            self.sim_start, self.wall_start, self.rate = sim, wall, rate

    def set(self, sim_now: float, rate: float = 1.0) -> None:
        """Budget time is ``sim_now`` at this wall instant and runs ``rate`` times as fast."""
        self.sim_start, self.wall_start, self.rate = sim_now, time.time(), rate

    def of(self, wall: float) -> float:
        if self.rate == 1.0 and self.sim_start == self.wall_start:
            return wall
        return self.sim_start + (wall - self.wall_start) * self.rate

    def now(self) -> float:
        return self.of(time.time())


def day_of(t: float, zone: ZoneInfo) -> tuple[str, float]:
    """(campaign-local day 'YYYY-MM-DD', elapsed share of that day 0..1) at Unix time ``t``."""
    local = datetime.fromtimestamp(t, zone)
    midnight = local.replace(hour=0, minute=0, second=0, microsecond=0)
    # a day of 23 or 25 hours (daylight saving) is paced over its own length
    start = midnight.timestamp()
    end = (midnight.replace(tzinfo=None) + _ONE_DAY).replace(tzinfo=zone).timestamp()
    return local.date().isoformat(), min(1.0, max(0.0, (t - start) / (end - start)))


_ONE_DAY = datetime(2000, 1, 2) - datetime(2000, 1, 1)


@dataclass(frozen=True)
class BudgetRule:
    """A campaign's budgets, USD micros: lifetime and daily (in ``zone``)."""

    index: int
    campaign: str
    total_micros: int | None
    daily_micros: int | None
    zone: ZoneInfo = UTC


@dataclass
class Slot:
    """One (campaign, period) lease of this holder, as last synced plus local reservations."""

    period: str
    limit: int  # what the fleet may lease of this period now (pacing included)
    granted: int = 0
    spent: int = 0
    pending: int = 0  # reserved by bids not yet billed, lost or expired
    want: int = 0  # the next slice to ask for
    low: int = 0  # refill below this (half a slice)
    cost: int = 0  # the last bid's reservation: less available than that blocks the campaign
    exhausted: bool = False  # the pool is at the period's full budget

    @property
    def available(self) -> int:
        return self.granted - self.spent - self.pending


@dataclass
class Settings:
    slice_share: float = 0.01  # a slice is this share of the period's budget
    refill_s: float = 0.1  # the refill thread's period
    reservation_ttl_s: float = 300.0
    lease_ttl_s: float = 30.0
    catchup_s: float = 300.0  # daily pacing allowance ahead of the even line, in day seconds


@dataclass
class _Campaign:
    rule: BudgetRule
    slots: tuple[Slot, ...] = ()
    state: int = STATE_OK


class BudgetLeases:
    """This worker's leases and reservations (create it after fork; ``start`` the refill)."""

    def __init__(self, rules: list[BudgetRule], open_ledger: Callable[[], Ledger],
                 clock: Clock | None = None, settings: Settings | None = None,
                 holder: str | None = None) -> None:
        self.holder = holder or os.urandom(8).hex()
        self.clock = clock or Clock()
        self.settings = settings or Settings()
        self._reservation_ttl_s = self.settings.reservation_ttl_s
        self._open_ledger = open_ledger
        self._campaigns = {r.index: _Campaign(r) for r in rules}
        self._lock = threading.Lock()
        # bid id -> (cost, the slots it holds, when it expires, campaign index), oldest first:
        # every reservation lives reservation_ttl_s, so that is also the order they expire in,
        # and a refill finds the expired ones without looking at the others (a host bidding
        # 2000 times a second without loss notices holds some 600,000)
        self._reserved: OrderedDict[str, tuple[int, tuple[Slot, ...], float, int]] = \
            OrderedDict()
        self.blocked = sum(1 << r.index for r in rules)  # nothing leased yet
        self.exhausted = 0  # of the blocked: those whose budget (not pacing) is used up
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ledger: Ledger | None = None
        self._synced_at = 0.0
        self._reclaimed_at = 0.0
        self.last_error: str | None = None
        self.ready = threading.Event()  # set by the first refill

    # --- bid path ---------------------------------------------------------------------------
    def reserve(self, index: int, bid_id: str, cost: int) -> bool:
        """Hold ``cost`` micros of campaign ``index``'s leases for bid ``bid_id``; False (and
        the campaign blocked until a refill) when a slice cannot cover it."""
        campaign = self._campaigns.get(index)
        if campaign is None:
            return True
        low = False
        with self._lock:
            slots = campaign.slots
            if not slots:
                return False
            for slot in slots:
                if slot.granted - slot.spent - slot.pending < cost:
                    slot.want = max(slot.want, 2 * cost)
                    slot.cost = cost
                    self.blocked |= 1 << index
                    if slot.exhausted:  # nothing left to lease: not a pacing pause
                        self.exhausted |= 1 << index
                    self._wake.set()
                    return False
            for slot in slots:
                slot.pending += cost
                slot.cost = cost
                if slot.granted - slot.spent - slot.pending < slot.low:
                    low = True
            self._reserved[bid_id] = (cost, slots, monotonic() + self._reservation_ttl_s, index)
        if low:
            self._wake.set()  # below half a slice: refill now, not at the next tick
        return True

    # --- notice path ------------------------------------------------------------------------
    def release(self, bid_id: str) -> bool:
        """Release a reservation (its loss notice came here); False if it is not held."""
        with self._lock:
            held = self._reserved.pop(bid_id, None)
            if held is None:
                return False
            cost, slots, _, index = held
            for slot in slots:
                slot.pending -= cost
            if all(slot.available >= max(slot.cost, 1) for slot in slots):
                self.blocked &= ~(1 << index)  # it may bid again at once
                self.exhausted &= ~(1 << index)
        self._wake.set()
        return True

    # --- refill thread ----------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None and self._campaigns:
            self._thread = threading.Thread(target=self._run, name="budget-leases", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.refill()
                if self.last_error is not None:
                    log.info("budget ledger answers again")
                    self.last_error = None
            except Exception as exc:  # the database is down: bids go on against what is held
                if self.last_error is None:
                    log.warning("budget leases cannot be refilled (%s: %s): campaigns bid on "
                                "the slices already held, then pause until it answers",
                                type(exc).__name__, exc)
                self.last_error = f"{type(exc).__name__}: {exc}"
                self._close_ledger()
                self._stop.wait(1.0)
            self._wake.wait(self.settings.refill_s)
            self._wake.clear()

    def _close_ledger(self) -> None:
        if self._ledger is not None:
            try:
                self._ledger.close()
            except Exception:
                pass
            self._ledger = None

    def periods_now(self, rule: BudgetRule, now: float) -> list[tuple[str, int, bool]]:
        """(period, lease limit now, limit is the full budget) of each budget of ``rule``."""
        periods = []
        if rule.total_micros is not None:
            periods.append((TOTAL, rule.total_micros, True))
        if rule.daily_micros is not None:
            day, elapsed = day_of(now, rule.zone)
            share = elapsed + self.settings.catchup_s / SECONDS_PER_DAY
            limit = rule.daily_micros if share >= 1.0 else int(rule.daily_micros * share)
            periods.append((day, limit, share >= 1.0))
        return periods

    def refill(self) -> None:
        """One round: sync from the ledger, expire old reservations, lease what runs low,
        reclaim dead holders' leases now and then, publish the pacing state."""
        if self._ledger is None:
            self._ledger = self._open_ledger()
        ledger, s = self._ledger, self.settings
        now_wall = time.time()
        now = self.clock.of(now_wall)
        plan = {i: self.periods_now(c.rule, now) for i, c in self._campaigns.items()}
        wanted = tuple({p for periods in plan.values() for p, _, _ in periods})
        sync = ledger.sync(self.holder, self._synced_at - SETTLED_WINDOW_S, wanted)
        self._synced_at = now_wall
        self._apply(sync, plan)
        for i, campaign in self._campaigns.items():
            for slot in campaign.slots:
                budget = slot.limit if slot.exhausted else self._budget_of(campaign.rule, slot)
                slice_ = max(MIN_SLICE_MICROS, int(budget * s.slice_share), slot.want,
                             2 * slot.cost)  # at least two bids like the last
                slot.low = slice_ // 2
                if slot.available < max(slot.low, slot.cost):
                    granted = ledger.grant(self.holder, campaign.rule.campaign, slot.period,
                                           slice_, slot.limit)
                    with self._lock:
                        slot.granted += granted
                        if granted:
                            slot.want = 0
        if now_wall - self._reclaimed_at > s.lease_ttl_s / 3:
            self._reclaimed_at = now_wall
            ledger.reclaim(now_wall - s.lease_ttl_s)
        self._recompute_blocked(sync)
        self.ready.set()

    @staticmethod
    def _budget_of(rule: BudgetRule, slot: Slot) -> int:
        return rule.total_micros if slot.period == TOTAL else rule.daily_micros  # type: ignore

    def _apply(self, sync: Sync, plan: dict[int, list[tuple[str, int, bool]]]) -> None:
        with self._lock:
            for i, campaign in self._campaigns.items():
                old = {slot.period: slot for slot in campaign.slots}
                slots = []
                for period, limit, full in plan[i]:
                    slot = old.get(period) or Slot(period, limit)
                    slot.limit, slot.exhausted = limit, False
                    lease = sync.leases.get((campaign.rule.campaign, period))
                    if lease is not None:
                        slot.granted, slot.spent = lease.granted, lease.spent
                    leased = sync.pools.get((campaign.rule.campaign, period), 0)
                    slot.exhausted = full and leased >= limit
                    slots.append(slot)
                campaign.slots = tuple(slots)
            for _kind, bid_id in sync.settled:
                held = self._reserved.pop(bid_id, None)
                if held is not None:
                    for slot in held[1]:
                        slot.pending -= held[0]
            expired, now = 0, time.monotonic()
            while self._reserved:
                bid_id, (cost, slots, until, _) = next(iter(self._reserved.items()))
                if until >= now:
                    break
                del self._reserved[bid_id]
                for slot in slots:
                    slot.pending -= cost
                expired += 1
        if expired:
            metrics.RESERVATIONS_EXPIRED.inc(expired)

    def _recompute_blocked(self, sync: Sync) -> None:
        blocked = exhausted = 0
        with self._lock:
            for i, campaign in self._campaigns.items():
                short = [slot for slot in campaign.slots
                         if slot.available <= 0 or slot.available < slot.cost]
                state = STATE_OK
                if short:
                    blocked |= 1 << i
                    state = STATE_PACED
                    pool_left = [slot for slot in short if slot.exhausted]
                    if pool_left:
                        exhausted |= 1 << i
                        state = STATE_EXHAUSTED
                campaign.state = state
            self.blocked, self.exhausted = blocked, exhausted
        self._publish(sync)

    def _publish(self, sync: Sync) -> None:
        """Pacing state per campaign on /metrics (fleet values: any worker's latest)."""
        for campaign in self._campaigns.values():
            cid = campaign.rule.campaign
            metrics.BUDGET_STATE.labels(cid).set(campaign.state)
            for slot in campaign.slots:
                kind = "total" if slot.period == TOTAL else "daily"
                budget = self._budget_of(campaign.rule, slot)
                metrics.BUDGET_MICROS.labels(cid, kind).set(budget)
                metrics.BUDGET_LEASE_LIMIT.labels(cid, kind).set(slot.limit)
                metrics.BUDGET_LEASED.labels(cid, kind).set(sync.pools.get((cid, slot.period), 0))
                metrics.BUDGET_SPENT.labels(cid, kind).set(sync.spend.get((cid, slot.period), 0))
                metrics.BUDGET_AVAILABLE.labels(cid, kind).set(max(0, slot.available))
                metrics.BUDGET_RESERVED.labels(cid, kind).set(slot.pending)

    def status(self) -> dict:
        with self._lock:
            return {"holder": self.holder, "reservations": len(self._reserved),
                    "last_error": self.last_error,
                    "campaigns": {c.rule.campaign: {
                        "state": ("ok", "paced", "exhausted")[c.state],
                        "slots": {s.period: {"limit": s.limit, "granted": s.granted,
                                             "spent": s.spent, "reserved": s.pending}
                                  for s in c.slots}} for c in self._campaigns.values()}}
