"""Campaign budgets on the bid path: which campaigns may spend, and a reservation per bid.

The bid path asks ``spendable`` (a campaign set) and ``reserve`` (an in-memory step) only;
everything else (leases from the ledger, daily pacing, releasing reservations) is
``bidder.leases``, run by a thread of each worker. Built once in the master; the per-process
part (``BudgetLeases``, its holder id and thread) is made in each worker on first use.
"""
from __future__ import annotations

from collections.abc import Callable

from bidder.catalog import Bits, Catalog
from bidder.currency import Rates
from bidder.leases import UTC, BudgetLeases, BudgetRule, Clock, Settings, day_of
from bidder.ledger import TOTAL, Ledger
from bidder.notices import price_tolerance


def rules_of(catalog: Catalog) -> list[BudgetRule]:
    """The campaigns with a budget, lifetime and daily, in USD micros."""
    return [BudgetRule(i, c.id, total, daily, zone) for i, (c, total, daily, zone) in enumerate(
        zip(catalog.campaigns, catalog.budget_micros, catalog.daily_budget_micros,
            catalog.zones)) if total is not None or daily is not None]


class Budgets:
    """The budgets of ``catalog``, held through leases from the ledger ``open_ledger`` opens."""

    def __init__(self, catalog: Catalog, rates: Rates, open_ledger: Callable[[], Ledger],
                 clock: Clock | None = None, settings: Settings | None = None) -> None:
        self.rules = rules_of(catalog)
        self.limited: frozenset[int] = frozenset(r.index for r in self.rules)
        self.rates = rates
        self.clock = clock or Clock()
        self._open_ledger = open_ledger
        self._settings = settings or Settings()
        self.reservation_ttl_s = self._settings.reservation_ttl_s
        self._all: Bits = (1 << len(catalog.campaigns)) - 1
        self._leases: BudgetLeases | None = None

    def after_fork(self) -> None:
        """In a new worker (the ``post_fork`` hook): a holder of its own, its leases refilled
        from the start, before its first bid (the parent's reservations are not ours)."""
        self._leases = None
        self.start()

    @property
    def leases(self) -> BudgetLeases:
        """This process's leases, made and started on first use (after fork)."""
        leases = self._leases
        if leases is None:
            leases = self._leases = BudgetLeases(self.rules, self._open_ledger, self.clock,
                                                 self._settings)
            leases.start()
        return leases

    def start(self) -> None:
        """Make this process's leases and start their refill (a worker, after fork)."""
        if self.limited:
            self.leases  # noqa: B018 - made and started on first use

    def status(self) -> dict:
        """For ``/readyz``: ready once this worker's first refill read the ledger."""
        if not self.limited:
            return {"ok": True, "campaigns": 0}
        leases = self.leases
        ok = leases.ready.wait(2.0) and leases.last_error is None
        return {"ok": ok, "campaigns": len(self.rules), "holder": leases.holder,
                "last_error": leases.last_error}

    @property
    def holder(self) -> str:
        """This worker's lease holder id (carried by its notices)."""
        return self.leases.holder

    @property
    def spendable(self) -> Bits:
        """Campaigns that may bid now: no budget, or a lease that covers a bid."""
        if not self.limited:
            return self._all
        return self._all & ~self.leases.blocked

    def reason(self, index: int | None = None) -> str:
        """Why campaign ``index`` (None: every budgeted campaign left) may not bid: its budget
        is leased out, or its lease is used up until a refill or the pacing line."""
        leases = self.leases
        if index is not None:
            return "budget_exhausted" if leases.exhausted >> index & 1 else "budget_paced"
        blocked = leases.blocked
        return "budget_exhausted" if blocked and leases.exhausted & blocked == blocked \
            else "budget_paced"

    def reserve(self, index: int, bid_id: str, price: float, currency: str) -> bool:
        """Reserve the most a bid at ``price`` CPM in ``currency`` can be billed (the price
        tolerance included); True when campaign ``index`` has no budget."""
        if index not in self.limited:
            return True
        # USD micros of the CPM / 1000, rounded up: never less than the bill
        cost = int(self.rates.to_usd(price + price_tolerance(currency), currency) * 1000) + 1
        return self.leases.reserve(index, bid_id, cost)

    def release(self, bid_id: str) -> bool:
        """A loss notice for one of this worker's bids: its reservation goes back at once."""
        return self._leases is not None and self._leases.release(bid_id)

    def periods_of(self, rule: BudgetRule | None, issued_at: float) -> tuple[str, tuple[str, ...]]:
        """A notice's campaign-local day (its bid's, in budget time) and the budget periods a
        billing of it is booked to."""
        day = day_of(self.clock.of(issued_at), rule.zone if rule is not None else UTC)[0]
        if rule is None:
            return day, ()
        periods = (TOTAL,) if rule.total_micros is not None else ()
        return day, periods + ((day,) if rule.daily_micros is not None else ())
