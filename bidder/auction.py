"""The bid decision: request in, eligible candidates, one vectorised score, priced bids out.

Order of work, cheapest first, so a request that cannot be bid on costs little:
response currency -> campaign-level eligibility (targeting, blocks, seats,
budget) -> per imp: the creatives of every format it offers (banner sizes,
video, native), secure and deal eligibility (``ImpPlan``) ->
one memcached round trip (user features + frequency counters), only when some
imp can be bid on -> per imp: one model call over every eligible campaign x
creative, the best candidate that clears its floor.

Eligibility and imp plans are cached by *shape*: each filter by the fields it reads,
normalised as it reads them (the user's country, device type and OS; the inventory; the
request's category and advertiser blocks; its seats; an imp's sizes, floor currency, secure
flag and blocked types and attributes, with the campaigns left). Each of these takes few
values, where their combinations do not. Budgets are applied on every request after the
cached filters and are part of the plans' key, so a campaign that exhausts its budget stops
on the next request.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import NamedTuple, TypeVar

import numpy as np

from bidder import native, video
from bidder.budget import Budgets
from bidder.catalog import Bits, Campaign, Candidates, Catalog
from bidder.currency import Rates
from bidder.domains import domain_and_parents, host_of
from bidder.featurestore import FeatureStore, frequency_key, pending_key, user_key
from bidder.notices import NoticeSigner
from bidder.openrtb import Bid, BidRequest, BidResponse, Deal, Imp, SeatBid
from bidder.privacy import personal_data_allowed
from models import features as F
from models.world import inventory_key

FIRST_PRICE_SHADE = 0.85  # first-price auctions (at=1): bid this share of the expected value
SHAPE_CACHE_SIZE = 8192  # shapes remembered per process, in each cache
T = TypeVar("T")
# No-bid reasons of one imp, from the one closest to a bid. no_creative_fits: banner.
IMP_REASON_RANK = ("budget_paced", "budget_exhausted", "below_floor", "no_creative_fits",
                   "no_video_creative_fits", "no_native_creative_fits",
                   "no_deal_in_private_auction", "floor_currency_unknown", "no_banner_size",
                   "no_supported_format")
MTYPE = {"banner": 1, "video": 2, "native": 4}  # 2.6 Bid.mtype


def country_of(r: BidRequest) -> str | None:
    """The user's country: ``device.geo``, else ``user.geo`` (2.6 recommends device.geo)."""
    for geo in (r.device.geo if r.device else None, r.user.geo if r.user else None):
        if geo is not None and geo.country:
            return geo.country.upper()  # ISO-3166-1 alpha-3, whatever the sender's case
    return None


def inventory_of(r: BidRequest) -> tuple[str | None, str | None, str | None]:
    """What a request's inventory goes by: the host of ``site.domain`` (else of ``site.page``,
    which many requests carry alone) or of ``app.domain``; the app bundle (lower case); the
    publisher's domain."""
    site, app = r.site, r.app
    if site is not None:
        host, publisher = host_of(site.domain) or host_of(site.page), site.publisher
    elif app is not None:
        host, publisher = host_of(app.domain), app.publisher
    else:
        host = publisher = None
    return (host, app.bundle.lower() if app is not None and app.bundle else None,
            publisher.domain if publisher is not None and publisher.domain else None)


@dataclass(frozen=True)
class NoBid:
    reason: str


class ImpPlan(NamedTuple):
    """What an imp can be bid with, known before the user's features are fetched."""

    imp: Imp
    candidates: Candidates
    deal_of: dict[int, Deal]  # campaign index -> the deal it bids through

    @property
    def campaigns(self) -> Bits:
        return self.candidates.campaigns


def banner_sizes(banner) -> tuple[tuple[int, int], ...]:
    """The sizes a banner takes: its ``format`` list, else its ``w`` x ``h``."""
    sizes = tuple((f.w, f.h) for f in banner.format or () if f.w and f.h)
    if not sizes and banner.w and banner.h:
        sizes = ((banner.w, banner.h),)
    return sizes


def remember(cache: dict, key: object, value: T) -> T:
    """``cache[key] = value``, emptied first when full (shapes are few; a flood of new ones
    must not grow a worker without bound)."""
    if len(cache) >= SHAPE_CACHE_SIZE:
        cache.clear()
    cache[key] = value
    return value


@dataclass
class FrequencyCaps:
    """This user's frequency caps during one request: the campaigns no cap stops yet, and the
    impressions each capped campaign may still bid for."""

    uncapped: Bits
    allowance: dict[int, int]  # capped campaign index -> impressions it may still bid for

    @classmethod
    def of(cls, capped: list[tuple[int, Campaign, str, str]],
           counters: dict[str, int | None] | None, campaigns: Bits) -> FrequencyCaps:
        """``campaigns`` less the ``capped`` ones (index, campaign, billed and pending counter
        keys) whose billed impressions and bids in flight reached the cap; an unknown count
        (no user id, store down) never breaks a cap."""
        uncapped = campaigns
        allowance: dict[int, int] = {}
        for i, c, key, pending in capped:
            billed = None if counters is None else counters.get(key, 0)
            in_flight = None if counters is None else counters.get(pending, 0)
            left = 0 if billed is None or in_flight is None else \
                c.frequency_cap.impressions - billed - in_flight
            if left > 0:
                allowance[i] = left
            else:
                uncapped &= ~(1 << i)
        return cls(uncapped, allowance)

    def count(self, campaign: int) -> None:
        """A bid of campaign index ``campaign``: the imps of one request count against a cap."""
        left = self.allowance.get(campaign)
        if left is None:
            return
        if left > 1:
            self.allowance[campaign] = left - 1
        else:
            del self.allowance[campaign]
            self.uncapped &= ~(1 << campaign)


class Prepared(NamedTuple):
    """A bid request's part of :meth:`Auction.prepare`: what its look-up reads and its bidding
    then uses."""

    campaigns: Bits  # eligible
    bidding: Bits  # the eligible ones some imp could be bid with: only their counts matter
    plans: list  # ImpPlan or NoBid per imp
    currency: str  # of the response
    identity: str  # the user key counters are kept under ("": none)
    user_keys: list[str]
    counter_keys: list[str]  # billed and pending counts of the capped campaigns that could bid
    capped: list[tuple[int, Campaign, str, str]]  # (index, campaign, billed key, pending key)


def user_keys(r: BidRequest) -> list[str]:
    """The feature-store keys of the user's ids (buyeruid, user.id, device.ifa), most
    specific first; none when the privacy signals forbid using personal data."""
    if not personal_data_allowed(r):  # no look-up, no profile, no frequency counts
        return []
    ids = [i for i in ((r.user.buyeruid, r.user.id) if r.user else ()) if i]
    if r.device is not None and r.device.ifa:
        ids.append(r.device.ifa)
    return [user_key(i) for i in ids]


def closest_reason(outcomes: list) -> NoBid:
    """The no-bid of the imp that came closest to a bid, speaking for the whole request."""
    return NoBid(min((o.reason for o in outcomes if isinstance(o, NoBid)),
                     key=IMP_REASON_RANK.index))


class Auction:
    """Everything a worker needs to decide a bid; the per-process parts are opened after fork."""

    def __init__(self, catalog: Catalog, rates: Rates, signer: NoticeSigner,
                 budgets: Budgets) -> None:
        self.catalog = catalog
        self.rates = rates
        self.signer = signer
        self.budgets = budgets
        self.pending_ttl_s = int(budgets.reservation_ttl_s)
        self._cand_features: dict[int, np.ndarray] = {}
        self._terms: tuple[object, tuple[np.ndarray, ...]] | None = None  # (model, its terms)
        self._capped = [(i, catalog.campaigns[i]) for i in catalog.capped]
        # each eligibility filter's answer by what it reads (budgets are never cached)
        self._targeting_user: dict[tuple, Bits] = {}
        self._inventory: dict[tuple, Bits] = {}
        self._blocks: dict[tuple, Bits | NoBid] = {}
        self._seats: dict[tuple, Bits] = {}
        self._plans: dict[tuple, Candidates | NoBid] = {}  # imps without pmp, by shape

    def candidate_features(self, hash_bits: int) -> np.ndarray:
        """(candidates, 4) feature indices, hashed once per model hash size."""
        feats = self._cand_features.get(hash_bits)
        if feats is None:
            feats = F.candidate_indices(
                ({"campaign": c.id, "creative": cr.id, "size": F.size_key(*cr.size),
                  "format": cr.format} for c, cr in self.catalog.candidates), hash_bits)
            self._cand_features[hash_bits] = feats
        return feats

    def scoring_terms(self, model) -> tuple[np.ndarray, ...]:
        """The catalog's candidate terms under ``model``, recomputed when the model changes."""
        if self._terms is None or self._terms[0] is not model:
            self._terms = (model, model.candidate_terms(self.candidate_features(model.hash_bits)))
        return self._terms[1]

    def response_currency(self, request: BidRequest) -> str | None:
        if not request.cur or "USD" in request.cur:
            return "USD"
        return next((c for c in request.cur if self.rates.knows(c)), None)

    def eligible_campaigns(self, r: BidRequest) -> Bits | NoBid:
        """Campaigns left after targeting, blocks, seats and budgets; NoBid naming the first
        filter that left nothing. Each filter's answer is cached by what it reads."""
        device = r.device
        key: tuple = (country_of(r), device.devicetype if device else None,
                      device.os.lower() if device and device.os else None)
        bits = self._targeting_user.get(key)
        if bits is None:
            bits = remember(self._targeting_user, key, self.targeting_user(*key))
        if not bits:
            return NoBid("no_campaign_targets_user")
        key = inventory_of(r)
        allowed = self._inventory.get(key)
        if allowed is None:
            allowed = remember(self._inventory, key, self.allowed_inventory(*key))
        bits &= allowed
        if not bits:
            return NoBid("no_campaign_targets_inventory")
        if r.bcat or r.acat or r.badv or r.bapp:
            key = (r.cattax, tuple(r.bcat or ()), tuple(r.acat or ()), tuple(r.badv or ()),
                   tuple(r.bapp or ()))
            unblocked = self._blocks.get(key)
            if unblocked is None:
                unblocked = remember(self._blocks, key, self.unblocked(*key))
            if isinstance(unblocked, NoBid):
                return unblocked
            bits &= unblocked
            if not bits:
                return NoBid("blocked_by_request")
        if r.wseat or r.bseat:
            key = (tuple(r.wseat or ()), tuple(r.bseat or ()))
            seated = self._seats.get(key)
            if seated is None:
                seated = remember(self._seats, key, self.allowed_seats(*key))
            bits &= seated
            if not bits:
                return NoBid("seat_not_allowed")
        bits &= self.budgets.spendable  # read on every request: exhaustion stops it at once
        return bits or NoBid(self.budgets.reason())

    def targeting_user(self, country: str | None, devicetype: int | None,
                       os_: str | None) -> Bits:
        """Campaigns that target the user's country, device type and OS (lower case); an
        unknown one (no Device) only those that do not target it."""
        cat = self.catalog
        sets = cat.sets
        return (cat.targeted(sets.by_country, sets.any_country, country)
                & cat.targeted(sets.by_devicetype, sets.any_devicetype, devicetype)
                & cat.targeted(sets.by_os, sets.any_os, os_))

    def allowed_inventory(self, host: str | None, bundle: str | None,
                          publisher: str | None) -> Bits:
        """Campaigns whose domain allow and block lists let this inventory through. Domains
        match case-insensitively and cover their subdomains (www.x.example is x.example);
        allow lists look at the host and bundle, block lists at the publisher's domain too,
        so a block cannot be dodged by naming the site another way."""
        cat = self.catalog
        sets = cat.sets
        named = domain_and_parents(host)
        if bundle:
            named.append(bundle)
        blocked = named + domain_and_parents(host_of(publisher)) if publisher else named
        # a mask, ANDed into the user's campaigns: ~0 is every campaign
        allowed = sets.any_domain | cat.any_of(sets.by_domain_allow, named) \
            if sets.by_domain_allow else ~0
        return allowed & ~cat.any_of(sets.by_domain_block, blocked)

    def unblocked(self, cattax: int | None, bcat: tuple[str, ...], acat: tuple[str, ...],
                  badv: tuple[str, ...], bapp: tuple[str, ...]) -> Bits | NoBid:
        """Campaigns the request's category, advertiser and app blocks (and ``acat``) allow;
        NoBid when its categories are not IAB Content Category 1.0, the only taxonomy known."""
        cat = self.catalog
        sets = cat.sets
        if (bcat or acat) and cattax not in (None, 1):
            return NoBid("category_taxonomy_unknown")
        # a blocked advertiser domain covers its subdomains (by_adomain lists their parents)
        blocked_advertisers = [a.strip().lower().strip(".") for a in badv]
        bits = ~(cat.any_of(sets.by_cat, [k.upper() for k in bcat])
                 | cat.any_of(sets.by_adomain, blocked_advertisers)
                 | cat.any_of(sets.by_bundle, [b.lower() for b in bapp]))
        if acat:
            bits &= cat.allowed_by_categories(list(acat))
        return bits

    def allowed_seats(self, wseat: tuple[str, ...], bseat: tuple[str, ...]) -> Bits:
        """Campaigns whose seat ``wseat`` allows (when given) and ``bseat`` does not block."""
        cat = self.catalog
        sets = cat.sets
        bits = cat.any_of(sets.by_seat, list(wseat)) if wseat else ~0
        return bits & ~cat.any_of(sets.by_seat, list(bseat))

    def prepare(self, r: BidRequest) -> Prepared | NoBid:
        """Everything of a bid that needs no look-up: the response currency, campaign
        eligibility, imp plans and the keys the look-up must read (user features, and the
        billed and pending counts of the capped campaigns that could bid). A worker prepares
        the requests of one poll first, so that one round trip serves all their look-ups."""
        currency = self.response_currency(r)
        if currency is None:
            return NoBid("currency_not_supported")
        campaigns = self.eligible_campaigns(r)
        if isinstance(campaigns, NoBid):
            return campaigns
        plans = self.plan_imps(r, campaigns)  # imp checks first: they need no round trip
        bidding: Bits = 0  # the campaigns some imp could be bid with: only their counts matter
        for p in plans:
            if isinstance(p, ImpPlan):
                bidding |= p.campaigns
        if not bidding:
            return closest_reason(plans)
        keys = user_keys(r)
        identity = keys[0] if keys else ""
        capped = [(i, c, frequency_key(c.id, identity), pending_key(c.id, identity))
                  for i, c in self._capped if bidding >> i & 1]
        counter_keys = [k for _, _, billed, pending in capped
                        for k in (billed, pending)] if identity else []
        return Prepared(campaigns, bidding, plans, currency, identity, keys, counter_keys, capped)

    def bid(self, r: BidRequest, store: FeatureStore, model, deadline: float,
            prepared: Prepared | NoBid | None = None) -> BidResponse | NoBid:
        """Decide the bids on ``r`` by ``deadline``: ``prepare`` (unless done already), one
        memcached look-up (user features and frequency counts; the store answers it from
        its poll's prefetch when there was one), then imp by imp bidding."""
        now = time.monotonic()
        if now >= deadline:  # queued past its deadline (an overloaded worker): shed at once
            return NoBid("deadline")
        if prepared is None:
            prepared = self.prepare(r)
        if isinstance(prepared, NoBid):
            return prepared
        capped = prepared.capped
        user, counters = store.lookup(prepared.user_keys, prepared.counter_keys, deadline - now)
        caps = FrequencyCaps.of(capped, counters, prepared.campaigns)
        if not caps.uncapped & prepared.bidding:  # every campaign that could bid is capped
            return NoBid("frequency_capped" if counters is not None else "frequency_unknown")
        outcome = self.bid_imps(r, prepared.plans, caps, user.segments, model,
                                prepared.currency, prepared.identity, deadline)
        if capped and prepared.identity and counters is not None \
                and not isinstance(outcome, NoBid):
            self.reserve_pending(outcome, capped, counters, store)
        return outcome

    def reserve_pending(self, response: BidResponse, capped: list[tuple[int, Campaign, str, str]],
                        counters: dict[str, int | None], store: FeatureStore) -> None:
        """Each bid of a capped campaign counts as pending until its billing or loss notice
        (or the reservation lifetime), so bids in flight cannot pass the cap."""
        pending = {c.id: key for _, c, _, key in capped}
        for seatbid in response.seatbid:
            for b in seatbid.bid:
                key = pending.get(b.cid)
                if key is not None:
                    store.reserve_pending(key, self.pending_ttl_s, key in counters)
                    counters[key] = (counters.get(key) or 0) + 1  # another imp's: incr

    def bid_imps(self, r: BidRequest, plans: list[ImpPlan | NoBid], caps: FrequencyCaps,
                 segments: list, model, currency: str, identity: str,
                 deadline: float) -> BidResponse | NoBid:
        """Bid imp by imp; an imp a capped campaign could have taken is planned again without
        it (a cap reached by this request's earlier imps counts too)."""
        shared = model.shared_terms(
            F.shared_indices(self.request_fields(r), segments, model.hash_bits))
        terms = self.scoring_terms(model)
        seats: dict[str, list[Bid]] = {}
        outcomes: list[NoBid] = []
        for plan in plans:
            if time.monotonic() >= deadline:
                return NoBid("deadline")
            if isinstance(plan, ImpPlan) and plan.campaigns & ~caps.uncapped:
                plan = self.plan_imp(plan.imp, caps.uncapped, r.at)
            bid = plan if isinstance(plan, NoBid) else self.bid_imp(
                r, plan, shared, terms, model, currency, identity)
            if isinstance(bid, NoBid):
                outcomes.append(bid)
                continue
            seat, b = bid
            seats.setdefault(seat, []).append(b)
            caps.count(self.catalog.index[b.cid])
        if not seats:  # the imp that came closest to a bid speaks for the request
            return closest_reason(outcomes)
        if time.monotonic() >= deadline:
            return NoBid("deadline")
        return BidResponse(id=r.id, cur=currency,
                           seatbid=[SeatBid(bid=bids, seat=seat) for seat, bids in seats.items()])

    @staticmethod
    def request_fields(r: BidRequest) -> dict[str, object]:
        device = r.device
        geo = (device.geo if device else None) or (r.user.geo if r.user else None)
        # modulo one day: the same hour, and no float overflow for an absurdly large offset
        offset_min = geo.utcoffset % 1440 if geo and geo.utcoffset is not None else 0
        country = country_of(r)
        return {
            "inventory": inventory_key(r.site.domain if r.site else None,
                                       r.app.bundle if r.app else None),
            "devicetype": device.devicetype if device and device.devicetype is not None else 0,
            "os": device.os if device and device.os else "unknown",
            "country": country or "unknown",
            "hour": int((time.time() // 60 + offset_min) // 60 % 24),
        }

    def plan_imps(self, r: BidRequest, campaigns: Bits) -> list[ImpPlan | NoBid]:
        return [self.plan_imp(imp, campaigns, r.at) for imp in r.imp]

    def plan_imp(self, imp: Imp, campaigns: Bits, auction_type: int) -> ImpPlan | NoBid:
        """The candidates that may bid on ``imp`` and the deal each campaign would bid through:
        everything of an imp that does not need the user's features. An imp that offers
        several formats gets the fitting creatives of each, scored together. Without ``pmp``
        it is cached by the imp's shape (every field ``plan_by_shape`` reads) and
        ``campaigns``; imps with deals are planned each time (their deals carry floors and
        seats)."""
        banner, video_imp, native_imp = imp.banner, imp.video, imp.native
        if banner is None and video_imp is None and native_imp is None:
            return NoBid("no_supported_format")  # audio, or nothing at all
        sizes = banner_sizes(banner) if banner is not None else ()
        if imp.pmp is not None:
            return self.plan_by_shape(imp, sizes, campaigns, auction_type)
        key = (sizes, imp.bidfloorcur, imp.secure == 1,
               tuple(banner.btype or ()) if banner is not None else None,
               tuple(banner.battr or ()) if banner is not None else None, campaigns,
               None if video_imp is None else video.fit_key(video_imp),
               None if native_imp is None else (native.request_key(native_imp.request),
                                                tuple(native_imp.battr or ())))
        found = self._plans.get(key)
        if found is None:
            plan = self.plan_by_shape(imp, sizes, campaigns, auction_type)
            found = plan if isinstance(plan, NoBid) else plan.candidates
            remember(self._plans, key, found)
        return found if isinstance(found, NoBid) else ImpPlan(imp, found, {})

    def plan_by_shape(self, imp: Imp, sizes: tuple[tuple[int, int], ...], campaigns: Bits,
                      auction_type: int) -> ImpPlan | NoBid:
        """``plan_imp`` itself: reads ``sizes``, ``imp.bidfloorcur``, ``imp.secure``,
        ``imp.banner.btype`` and ``battr``, what ``video.fit_key`` reads of ``imp.video``,
        ``imp.native``'s request key and ``battr``, and ``imp.pmp`` (never cached)."""
        cat = self.catalog
        banner, video_imp, native_imp = imp.banner, imp.video, imp.native
        reasons: list[NoBid] = []  # why an offered format can take no creative
        if banner is not None and not sizes:
            reasons.append(NoBid("no_banner_size"))
            if video_imp is None and native_imp is None:
                return reasons[0]
        if not self.rates.knows(imp.bidfloorcur):
            return NoBid("floor_currency_unknown")
        if sizes and not cat.fits_any(sizes):
            reasons.append(NoBid("no_creative_fits"))
            sizes = ()
        if video_imp is not None and not cat.has_video:
            reasons.append(NoBid("no_video_creative_fits"))
            video_imp = None
        if native_imp is not None and not cat.has_native:
            reasons.append(NoBid("no_native_creative_fits"))
            native_imp = None
        if not (sizes or video_imp or native_imp):
            return closest_reason(reasons)

        # Deals: a campaign in one of the imp's deals bids on it, at that deal's floor; in an open
        # auction, one whose value is under its deal's floor may still bid without the deal.
        deal_of: dict[int, Deal] = {}
        pmp = imp.pmp
        if pmp is not None and (pmp.deals or pmp.private_auction):  # private, no deals: no bid
            sets = cat.sets
            in_deal: Bits = 0
            for deal in pmp.deals or ():
                hit = sets.by_deal.get(deal.id, 0) & campaigns & ~in_deal
                if not hit or not self.rates.knows(deal.bidfloorcur):
                    continue
                if (deal.at or auction_type) == 3 and not deal.bidfloor:
                    continue  # a fixed-price deal whose price (bidfloor) was not given
                if deal.wseat:
                    hit &= cat.any_of(sets.by_seat, deal.wseat)
                if deal.wadomain:
                    hit &= cat.any_of(sets.by_adomain, [d.lower() for d in deal.wadomain])
                in_deal |= hit
                for i in range(hit.bit_length()):
                    if hit >> i & 1:
                        deal_of[i] = deal
            if pmp.private_auction:
                campaigns &= in_deal
                if not campaigns:
                    return NoBid("no_deal_in_private_auction")
        secure = imp.secure == 1
        found: list[Candidates] = []
        if sizes:
            candidates = cat.eligible_candidates(campaigns, sizes, secure,
                                                 tuple(banner.btype) if banner.btype else (),
                                                 tuple(banner.battr) if banner.battr else ())
            if candidates.campaigns:
                found.append(candidates)
            else:
                reasons.append(NoBid("no_creative_fits"))
        if video_imp is not None:
            candidates = cat.eligible_video(campaigns, video_imp, secure)
            if candidates.campaigns:
                found.append(candidates)
            else:
                reasons.append(NoBid("no_video_creative_fits"))
        if native_imp is not None:
            candidates = cat.eligible_native(campaigns, native_imp, secure)
            if candidates.campaigns:
                found.append(candidates)
            else:
                reasons.append(NoBid("no_native_creative_fits"))
        if not found:
            return closest_reason(reasons)
        return ImpPlan(imp, found[0] if len(found) == 1 else Candidates.union(found), deal_of)

    def bid_imp(self, r: BidRequest, plan: ImpPlan, shared: tuple,
                terms: tuple[np.ndarray, ...], model, currency: str,
                identity: str) -> tuple[str, Bid] | NoBid:
        cat = self.catalog
        imp, candidates, deal_of, pmp = plan.imp, plan.candidates, plan.deal_of, plan.imp.pmp
        open_floor = self.rates.to_usd(imp.bidfloor, imp.bidfloorcur)
        value = model.predict_proba_terms(shared, terms, candidates.rows)
        value *= candidates.value_per_mille  # expected CPM, USD
        camp = candidates.campaign
        if deal_of:
            deal_floors = np.array([self.rates.to_usd(deal_of[c].bidfloor, deal_of[c].bidfloorcur)
                                    if c in deal_of else np.inf for c in camp.tolist()])
            via_deal = value >= deal_floors
            floors = np.where(via_deal, deal_floors,
                              np.inf if pmp is not None and pmp.private_auction else open_floor)
            value = np.where(value >= floors, value, -1.0)
        best = int(np.argmax(value))
        best_value = float(value[best])
        floor_usd = float(floors[best]) if deal_of else open_floor
        if best_value <= 0.0 or best_value < floor_usd:
            return NoBid("below_floor")

        campaign, creative = cat.candidates[int(candidates.rows[best])]
        deal = deal_of[int(camp[best])] if deal_of and via_deal[best] else None
        auction_type = deal.at if deal is not None and deal.at else r.at  # a deal's own at wins
        # at 3 (fixed price) exists for deals only; elsewhere an unknown at is bid as second price
        fixed_price = deal is not None and auction_type == 3
        price_usd = best_value * FIRST_PRICE_SHADE if auction_type == 1 else best_value
        price = self.rates.from_usd(max(price_usd, floor_usd), currency)
        floor_cur, floor = ((deal.bidfloorcur, deal.bidfloor) if deal is not None
                            else (imp.bidfloorcur, imp.bidfloor))
        # never under the floor in the response currency, exact when it is the floor's own
        floor_price = floor if floor_cur == currency else self.rates.from_usd(floor_usd, currency)
        # Deal.at 3: "the value passed in bidfloor is the agreed upon deal price"
        price = floor_price if fixed_price else max(price, floor_price)
        bid_id = f"{random.getrandbits(64):016x}"  # reseeded from os.urandom in each worker
        budgets = self.budgets
        if not budgets.reserve(int(camp[best]), bid_id, price, currency):
            return NoBid(budgets.reason(int(camp[best])))
        nurl, burl, lurl = self.signer.urls(bid_id, imp.id, campaign.id, creative.id, identity,
                                            currency, r.test, price, budgets.holder)
        if creative.format == "video":
            adm = video.markup(creative, imp.video, creative.id)
        elif creative.format == "native":
            adm = native.markup(creative, imp.native.request)
        else:
            adm = creative.adm
        return campaign.seat, Bid(
            id=bid_id, impid=imp.id, price=price, adm=adm, nurl=nurl, burl=burl, lurl=lurl,
            adomain=campaign.adomain, crid=creative.id, cid=campaign.id, cat=campaign.cat,
            mtype=MTYPE[creative.format], w=creative.w, h=creative.h,
            dealid=deal.id if deal is not None else None, bundle=campaign.bundle,
            attr=creative.attr or None)
