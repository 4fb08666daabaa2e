"""Campaign budgets: which campaigns may still spend, from the billed spend in the ledger.

The bid path asks only ``spendable`` (a campaign set, read as often as every request);
``refresh`` reads the ledger at most every ``REFRESH_S`` and at once (``force``) after a
billing notice is booked. Everything budget-related goes through this class, so where the
spend comes from (this host's ledger today) can change without touching the auction.
"""
from __future__ import annotations

from bidder.catalog import Bits, Catalog
from bidder.ledger import Ledger

REFRESH_S = 0.25  # how stale another worker's billing may be when a budget is checked


class Budgets:
    """The campaigns of ``catalog`` whose billed spend is under their budget (per process)."""

    def __init__(self, catalog: Catalog, refresh_s: float = REFRESH_S) -> None:
        self.catalog = catalog
        self.refresh_s = refresh_s
        self._all: Bits = (1 << len(catalog.campaigns)) - 1
        self._limited = [(i, c.id, limit) for i, (c, limit)
                         in enumerate(zip(catalog.campaigns, catalog.budget_micros))
                         if limit is not None]
        self.spendable: Bits = self._all  # campaigns that may still spend
        self._refreshed_at = float("-inf")

    def can_spend(self, campaign_id: str) -> bool:
        """Whether the campaign ``campaign_id`` is under its budget (or has none)."""
        return bool(self.spendable >> self.catalog.index[campaign_id] & 1)

    def refresh(self, ledger: Ledger, now: float, force: bool = False) -> None:
        """Read the billed spend from ``ledger`` if ``refresh_s`` passed since the last read
        (or ``force``), and stop the campaigns that reached their budget."""
        if not self._limited or (not force and now - self._refreshed_at < self.refresh_s):
            return
        self._refreshed_at = now
        spend = ledger.spend()
        exhausted = sum(1 << i for i, campaign_id, limit in self._limited
                        if spend.get(campaign_id, 0) >= limit)
        self.spendable = self._all & ~exhausted
