"""The bid decision: request in, eligible candidates, one vectorised score, priced bids out.

Order of work, cheapest first, so a request that cannot be bid on costs little:
response currency -> campaign-level eligibility (targeting, blocks, seats,
budget) -> one memcached round trip (user features + frequency counters) ->
per imp: size and deal eligibility, one model call over every eligible
campaign x creative, the best candidate that clears its floor.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np

from bidder.catalog import Catalog
from bidder.currency import Rates
from bidder.featurestore import FeatureStore, frequency_key, user_key
from bidder.ledger import Ledger
from bidder.notices import NoticeSigner
from bidder.openrtb import Bid, BidRequest, BidResponse, Imp, SeatBid
from bidder.world import inventory_key
from models import features as F

FIRST_PRICE_SHADE = 0.85  # first-price auctions (at=1): bid this share of the expected value
SPEND_REFRESH_S = 1.0


@dataclass(frozen=True)
class NoBid:
    reason: str


class Auction:
    """Everything a worker needs to decide a bid; the per-process parts are opened after fork."""

    def __init__(self, catalog: Catalog, rates: Rates, signer: NoticeSigner) -> None:
        self.catalog = catalog
        self.rates = rates
        self.signer = signer
        self._cand_features: dict[int, np.ndarray] = {}
        self._size_code = catalog.cand_w * 100_000 + catalog.cand_h
        self._exhausted = np.zeros(len(catalog.campaigns), dtype=bool)
        self._spend_checked = 0.0
        self._capped = [(i, catalog.campaigns[i]) for i in catalog.capped]
        self._has_budgets = any(b is not None for b in catalog.budget_micros)

    def candidate_features(self, hash_bits: int) -> np.ndarray:
        """(candidates, 3) feature indices, hashed once per model hash size."""
        feats = self._cand_features.get(hash_bits)
        if feats is None:
            feats = F.candidate_indices(
                ({"campaign": c.id, "creative": cr.id, "size": F.size_key(cr.w, cr.h)}
                 for c, cr in self.catalog.candidates), hash_bits)
            self._cand_features[hash_bits] = feats
        return feats

    def refresh_spend(self, ledger: Ledger, now: float) -> None:
        """Stop campaigns whose billed spend reached their budget (read at most once a second)."""
        if not self._has_budgets or now - self._spend_checked < SPEND_REFRESH_S:
            return
        self._spend_checked = now
        spend = ledger.spend()
        cat = self.catalog
        self._exhausted = np.array(
            [b is not None and spend.get(c.id, 0) >= b
             for c, b in zip(cat.campaigns, cat.budget_micros)], dtype=bool)

    def response_currency(self, request: BidRequest) -> str | None:
        if not request.cur or "USD" in request.cur:
            return "USD"
        return next((c for c in request.cur if self.rates.knows(c)), None)

    def eligible_campaigns(self, r: BidRequest) -> np.ndarray | NoBid:
        """Campaign mask after targeting, blocks, seats and budgets; NoBid naming the first
        filter that left nothing."""
        cat = self.catalog
        device = r.device
        geo = (device.geo if device else None) or (r.user.geo if r.user else None)
        mask = cat.targeted(cat.by_country, cat.any_country, geo.country if geo else None).copy()
        if device is not None:
            mask &= cat.targeted(cat.by_devicetype, cat.any_devicetype, device.devicetype)
            mask &= cat.targeted(cat.by_os, cat.any_os, device.os.lower() if device.os else None)
        if not mask.any():
            return NoBid("no_campaign_targets_user")
        domain = r.site.domain if r.site else (r.app.domain if r.app else None)
        bundle = r.app.bundle if r.app else None
        mask &= cat.targeted(cat.by_domain_allow, cat.any_domain, domain)
        mask &= ~cat.any_of(cat.by_domain_block, [domain, bundle])
        if not mask.any():
            return NoBid("no_campaign_targets_inventory")
        if r.bcat:
            mask &= ~cat.any_of(cat.by_cat, r.bcat)
        if r.badv:
            mask &= ~cat.any_of(cat.by_adomain, r.badv)
        if r.bapp:
            mask &= ~cat.any_of(cat.by_bundle, r.bapp)
        if not mask.any():
            return NoBid("blocked_by_request")
        if r.wseat:
            mask &= cat.any_of(cat.by_seat, r.wseat)
        if r.bseat:
            mask &= ~cat.any_of(cat.by_seat, r.bseat)
        if not mask.any():
            return NoBid("seat_not_allowed")
        mask &= ~self._exhausted
        if not mask.any():
            return NoBid("budget_exhausted")
        return mask

    def bid(self, r: BidRequest, store: FeatureStore, ledger: Ledger, model,
            deadline: float) -> BidResponse | NoBid:
        now = time.monotonic()
        self.refresh_spend(ledger, now)
        currency = self.response_currency(r)
        if currency is None:
            return NoBid("currency_not_supported")
        mask = self.eligible_campaigns(r)
        if isinstance(mask, NoBid):
            return mask

        ids = [i for i in ((r.user.buyeruid, r.user.id) if r.user else ()) if i]
        if r.device is not None and r.device.ifa:
            ids.append(r.device.ifa)
        keys = [user_key(i) for i in ids]
        identity = keys[0] if keys else ""
        capped = [(i, c, frequency_key(c.id, identity)) for i, c in self._capped
                  if identity and mask[i]]
        user, counters = store.lookup(keys, [k for _, _, k in capped], deadline - now)
        for i, c, key in capped:  # unknown counts (store down) never risk breaking a cap
            if counters is None or counters.get(key, 0) >= c.frequency_cap.impressions:
                mask[i] = False
        if not mask.any():
            return NoBid("frequency_capped")

        shared = F.shared_indices(self.request_fields(r), user.segments, model.hash_bits)
        features = self.candidate_features(model.hash_bits)
        seats: dict[str, list[Bid]] = {}
        reason = "below_floor"
        for imp in r.imp:
            if time.monotonic() >= deadline:
                return NoBid("deadline")
            bid = self.bid_imp(r, imp, mask, shared, features, model, currency, identity)
            if isinstance(bid, NoBid):
                reason = bid.reason
                continue
            seat, b = bid
            seats.setdefault(seat, []).append(b)
        if not seats:
            return NoBid(reason)
        if time.monotonic() >= deadline:
            return NoBid("deadline")
        return BidResponse(id=r.id, cur=currency,
                           seatbid=[SeatBid(bid=bids, seat=seat) for seat, bids in seats.items()])

    @staticmethod
    def request_fields(r: BidRequest) -> dict[str, object]:
        device = r.device
        geo = (device.geo if device else None) or (r.user.geo if r.user else None)
        offset_min = geo.utcoffset if geo and geo.utcoffset is not None else 0
        return {
            "inventory": inventory_key(r.site.domain if r.site else None,
                                       r.app.bundle if r.app else None),
            "devicetype": device.devicetype if device and device.devicetype is not None else 0,
            "os": device.os if device and device.os else "unknown",
            "country": geo.country if geo and geo.country else "unknown",
            "hour": int((time.time() // 60 + offset_min) // 60 % 24),
        }

    def bid_imp(self, r: BidRequest, imp: Imp, campaigns: np.ndarray, shared: np.ndarray,
                features: np.ndarray, model, currency: str,
                identity: str) -> tuple[str, Bid] | NoBid:
        cat = self.catalog
        banner = imp.banner
        if banner is None:
            return NoBid("no_banner_imp")
        sizes = [(f.w, f.h) for f in banner.format or () if f.w and f.h]
        if not sizes and banner.w and banner.h:
            sizes = [(banner.w, banner.h)]
        if not sizes:
            return NoBid("no_banner_size")
        if not self.rates.knows(imp.bidfloorcur):
            return NoBid("floor_currency_unknown")
        size_ok = self._size_code == sizes[0][0] * 100_000 + sizes[0][1]
        for w, h in sizes[1:]:
            size_ok |= self._size_code == w * 100_000 + h

        # Floors per campaign in USD; a deal the campaign may use replaces the imp floor.
        open_floor = self.rates.to_usd(imp.bidfloor, imp.bidfloorcur)
        floor_usd = np.full(len(cat.campaigns), open_floor)
        allowed = campaigns.copy()
        deal_of: dict[int, object] = {}
        pmp = imp.pmp
        if pmp is not None and pmp.deals:
            in_deal = np.zeros(len(cat.campaigns), dtype=bool)
            for deal in pmp.deals:
                hit = cat.by_deal.get(deal.id)
                if hit is None or not self.rates.knows(deal.bidfloorcur):
                    continue
                hit = hit & campaigns
                if deal.wseat:
                    hit &= cat.any_of(cat.by_seat, deal.wseat)
                if deal.wadomain:
                    hit &= cat.any_of(cat.by_adomain, deal.wadomain)
                deal_floor = self.rates.to_usd(deal.bidfloor, deal.bidfloorcur)
                for i in np.flatnonzero(hit & ~in_deal):
                    floor_usd[i] = deal_floor
                    deal_of[int(i)] = deal
                in_deal |= hit
            if pmp.private_auction:
                allowed &= in_deal
                if not allowed.any():
                    return NoBid("no_deal_in_private_auction")
        eligible = np.flatnonzero(allowed[cat.cand_campaign] & size_ok)
        if eligible.size == 0:
            return NoBid("no_creative_fits")

        camp = cat.cand_campaign[eligible]
        p_click = model.predict_proba_shared(shared, features[eligible])
        value = p_click * cat.value_per_click_usd[camp] * 1000.0  # expected CPM, USD
        floors = floor_usd[camp]
        margin = np.where(value >= floors, value, -1.0)
        best = int(np.argmax(margin))
        if margin[best] <= 0.0:
            return NoBid("below_floor")

        ci = int(camp[best])
        campaign, creative = cat.candidates[int(eligible[best])]
        deal = deal_of.get(ci)
        auction_type = deal.at if deal is not None and deal.at else r.at  # a deal's own at wins
        price_usd = value[best] * FIRST_PRICE_SHADE if auction_type == 1 else value[best]
        price_usd = max(price_usd, floors[best])
        floor_cur, floor = ((deal.bidfloorcur, deal.bidfloor) if deal is not None
                            else (imp.bidfloorcur, imp.bidfloor))
        price = self.rates.from_usd(price_usd, currency)
        if floor_cur == currency:
            price = max(price, floor)  # exact in the floor's own currency, no rounding drift
        else:
            price = max(price, self.rates.from_usd(floors[best], currency))
        price = float(price)
        bid_id = os.urandom(8).hex()
        nurl, burl = self.signer.urls(bid_id, imp.id, campaign.id, creative.id, identity,
                                      currency, r.test, price)
        return campaign.seat, Bid(
            id=bid_id, impid=imp.id, price=price, adm=creative.adm, nurl=nurl, burl=burl,
            adomain=campaign.adomain, crid=creative.id, cid=campaign.id, cat=campaign.cat,
            w=creative.w, h=creative.h, mtype=1, dealid=deal.id if deal is not None else None,
            bundle=campaign.bundle)
