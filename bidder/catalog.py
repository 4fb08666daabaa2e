"""The campaign catalog: load, validate, and compile into arrays for vectorised eligibility.

A catalog that fails validation is refused at start with a message naming the
campaign and the field. Compiling turns the campaigns into one row per
campaign x creative (a *candidate*) plus per-campaign boolean masks keyed by
targeting value, so a request's eligibility is a handful of numpy ``&``s.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from importlib import resources
from typing import NamedTuple

import msgspec
import numpy as np

from bidder.currency import Rates, to_micros
from bidder.domains import domain_and_parents


CREATIVE_ATTRIBUTES = range(1, 18)  # AdCOM 1.0 list "Creative Attributes"
DEVICE_TYPES = range(1, 9)  # AdCOM 1.0 list "Device Types"
ISO_ALPHA3 = re.compile(r"[A-Za-z]{3}")
IAB_CATEGORY = re.compile(r"IAB\d{1,2}(-\d{1,3})?", re.IGNORECASE)
MAX_VALUE_PER_CLICK_USD = 1000.0  # a sanity limit: above it, a typo or a wrong currency
MAX_WINDOW_S = 366 * 86400  # memcached's expiry of a counter is a 32-bit Unix time
BANNER_TYPES = (1, 2, 3, 4)  # OpenRTB banner ad types: XHTML text, XHTML banner, JavaScript, iframe


class Creative(msgspec.Struct, forbid_unknown_fields=True):
    id: str
    w: int
    h: int
    adm: str
    type: int = 2  # banner ad type (BANNER_TYPES), what an imp's banner.btype may block
    attr: list[int] = []  # AdCOM 1.0 Creative Attributes (1-17), what banner.battr may block


class FrequencyCap(msgspec.Struct, forbid_unknown_fields=True):
    impressions: int
    window_s: int = 86400


class Targeting(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    countries: list[str] = []
    devicetypes: list[int] = []
    domains_block: list[str] = []
    domains_allow: list[str] = []
    oses: list[str] = []


class Campaign(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    id: str
    adomain: list[str]
    cat: list[str]
    value_per_click: float
    creatives: list[Creative]
    currency: str = "USD"
    targeting: Targeting | None = None
    seat: str = "bidder"
    bundle: str | None = None
    deals: list[str] = []
    budget: float | None = None  # total spend cap, in ``currency``
    frequency_cap: FrequencyCap | None = None


class CatalogFile(msgspec.Struct, forbid_unknown_fields=True):
    campaigns: list[Campaign]


ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,64}")


class CatalogError(ValueError):
    """The catalog file is unreadable or a campaign breaks a rule."""


def bundled_path() -> str:
    return str(resources.files("bidder") / "data" / "campaigns.json")


def load(path: str | None, rates: Rates) -> "Catalog":
    """Read, validate and compile the catalog at ``path`` (the bundled sample when None)."""
    path = path or bundled_path()
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise CatalogError(f"cannot read campaign catalog {path}: {exc.strerror}") from None
    try:
        parsed = msgspec.json.decode(raw, type=CatalogFile)
    except msgspec.ValidationError as exc:
        raise CatalogError(f"campaign catalog {path}: {_name_campaign(raw, str(exc))}") from None
    except msgspec.DecodeError as exc:
        raise CatalogError(f"campaign catalog {path} is not valid JSON: {exc}") from None
    for campaign in parsed.campaigns:
        _validate(campaign, rates)
    ids = [c.id for c in parsed.campaigns]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise CatalogError(f"campaign catalog {path}: duplicate campaign id(s) {duplicates}")
    return Catalog(parsed.campaigns, rates, os.path.abspath(path))


def _name_campaign(raw: bytes, message: str) -> str:
    """Turn msgspec's ``$.campaigns[3].cat`` into ``campaign 'c4': ... at $.campaigns[3].cat``."""
    marker = "$.campaigns["
    if marker not in message:
        return message
    index = int(message.split(marker, 1)[1].split("]", 1)[0])
    try:
        campaign_id = msgspec.json.decode(raw)["campaigns"][index].get("id", f"#{index}")
    except (msgspec.DecodeError, KeyError, IndexError, AttributeError, TypeError):
        campaign_id = f"#{index}"
    return f"campaign {campaign_id!r}: {message}"


def _validate(c: Campaign, rates: Rates) -> None:
    def fail(field_name: str, why: str) -> None:
        raise CatalogError(f"campaign {c.id!r}, field {field_name!r}: {why}")

    if not ID_PATTERN.fullmatch(c.id):
        raise CatalogError(f"campaign id {c.id!r}: use 1-64 letters, digits and . _ : - "
                           "(it is part of notice URLs and memcached keys)")
    if not c.adomain or not all(d.strip() for d in c.adomain):
        fail("adomain", "list at least one advertiser domain, none empty (OpenRTB Bid.adomain)")
    if not all(IAB_CATEGORY.fullmatch(k) for k in c.cat):
        fail("cat", f"{c.cat}: use IAB Content Category 1.0 codes such as IAB18 or IAB18-1 (the "
                    "taxonomy bcat and acat are checked in)")
    if not rates.knows(c.currency):
        fail("currency", f"{c.currency!r} has no rate; add it with --currency-rates")
    if not (c.value_per_click > 0):  # also NaN
        fail("value_per_click", "must be a positive amount")
    usd = rates.to_usd(c.value_per_click, c.currency)
    if not usd <= MAX_VALUE_PER_CLICK_USD:
        fail("value_per_click", f"{c.value_per_click} {c.currency} ({usd:.6g} USD) a click is over "
                                f"the {MAX_VALUE_PER_CLICK_USD:g} USD sanity limit: check the "
                                "amount and its currency")
    targeting = c.targeting or Targeting()
    if not all(ISO_ALPHA3.fullmatch(k) for k in targeting.countries):
        fail("targeting.countries", f"{targeting.countries}: use ISO-3166-1 alpha-3 codes such as "
                                    "JPN or USA (OpenRTB's geo.country)")
    if not all(t in DEVICE_TYPES for t in targeting.devicetypes):
        fail("targeting.devicetypes", f"{targeting.devicetypes}: use AdCOM 1.0 device types, 1 to "
                                      "8 (1 mobile/tablet, 2 PC, 3 CTV, 4 phone, 5 tablet, ...)")
    if not c.creatives:
        fail("creatives", "a campaign needs at least one creative")
    seen: set[str] = set()
    for cr in c.creatives:
        if not cr.id.strip():
            fail("creatives", "every creative needs a non-empty id (the bid's crid)")
        if cr.id in seen:
            fail("creatives", f"duplicate creative id {cr.id!r}")
        seen.add(cr.id)
        if cr.w <= 0 or cr.h <= 0:
            fail("creatives", f"creative {cr.id!r} needs positive w and h")
        if not cr.adm:
            fail("creatives", f"creative {cr.id!r} has an empty adm")
        if cr.type not in BANNER_TYPES:
            fail("creatives", f"creative {cr.id!r}: type must be one of {BANNER_TYPES} (1 XHTML "
                              "text, 2 XHTML banner, 3 JavaScript, 4 iframe)")
        if any(a not in CREATIVE_ATTRIBUTES for a in cr.attr) or len(set(cr.attr)) < len(cr.attr):
            fail("creatives", f"creative {cr.id!r}: attr must hold distinct AdCOM 1.0 Creative "
                              "Attributes codes, 1 to 17 (e.g. 1 audio auto-play, 6 in-banner "
                              "video)")
    if c.budget is not None and not c.budget > 0:
        fail("budget", "must be a positive amount (or absent for no cap)")
    if c.frequency_cap is not None and (c.frequency_cap.impressions <= 0
                                        or not 0 < c.frequency_cap.window_s <= MAX_WINDOW_S):
        fail("frequency_cap", "impressions must be positive and window_s between 1 s and "
                              f"{MAX_WINDOW_S // 86400} days")


Bits = int  # a set of campaigns: bit i is campaign i


class Candidates(NamedTuple):
    """Eligible candidates of an imp: rows of ``Catalog.candidates`` and, row by row, their
    campaign index and value per mille (USD), gathered once per cached set, not per bid."""

    rows: np.ndarray
    campaigns: Bits  # the campaigns of those rows
    campaign: np.ndarray
    value_per_mille: np.ndarray


def category_and_parent(category: str) -> tuple[str, str]:
    """``iab18-1`` -> ``("IAB18-1", "IAB18")``: an IAB category and its tier-1 parent."""
    category = category.upper()
    return category, category.split("-")[0]


ELIGIBLE_CACHE_SIZE = 4096


@dataclass
class Catalog:
    """Campaigns compiled for the bid path.

    Campaign sets are Python ints used as bitsets (bit i = campaign i): a request's
    eligibility is a dozen ``&``/``|`` on them, each far cheaper than a numpy call on a
    small array. Candidates (campaign x creative) live in numpy arrays for the scoring.
    """

    campaigns: list[Campaign]
    rates: Rates
    path: str
    budget_micros: list[int | None] = field(init=False)
    # one entry per candidate (campaign x creative)
    candidates: list[tuple[Campaign, Creative]] = field(init=False)
    cand_campaign: np.ndarray = field(init=False)
    cand_value_per_mille: np.ndarray = field(init=False)  # value_per_click (USD) x 1000

    def __post_init__(self) -> None:
        n = len(self.campaigns)
        self.n_bytes = (n + 7) // 8
        self.index = {c.id: i for i, c in enumerate(self.campaigns)}
        self.budget_micros = [None if c.budget is None
                              else to_micros(self.rates.to_usd(c.budget, c.currency))
                              for c in self.campaigns]
        self.capped = [i for i, c in enumerate(self.campaigns) if c.frequency_cap]
        self.candidates = [(c, cr) for c in self.campaigns for cr in c.creatives]
        self.cand_campaign = np.array([self.index[c.id] for c, _ in self.candidates], dtype=np.intp)
        self.cand_value_per_mille = np.array(
            [self.rates.to_usd(c.value_per_click, c.currency) * 1000.0 for c, _ in self.candidates])
        # imp.secure=1 needs HTTPS assets and markup: a creative with any http:// URL is out
        self.cand_secure = np.array(["http://" not in cr.adm.lower() for _, cr in self.candidates],
                                    dtype=bool)
        self._by_type = {t: np.array([cr.type == t for _, cr in self.candidates], dtype=bool)
                         for t in BANNER_TYPES}
        self._by_attr = {a: np.array([a in cr.attr for _, cr in self.candidates], dtype=bool)
                         for a in {a for _, cr in self.candidates for a in cr.attr}}
        # a campaign's categories with their tier-1 parents ("IAB18-1" -> "IAB18"), for acat
        self.categories = [{category_and_parent(k) for k in c.cat} for c in self.campaigns]
        self._by_size: dict[tuple[int, int], np.ndarray] = {}
        for k, (_, cr) in enumerate(self.candidates):
            self._by_size.setdefault((cr.w, cr.h), np.zeros(len(self.candidates), dtype=bool))[k] = True
        self._eligible: dict[tuple, tuple[np.ndarray, Bits]] = {}

        def allow(values_of) -> tuple[dict, Bits]:
            """value -> campaigns targeting it or not targeting that dimension; the untargeted."""
            untargeted = sum(1 << i for i, c in enumerate(self.campaigns) if not values_of(c))
            table: dict = {}
            for i, c in enumerate(self.campaigns):
                for v in values_of(c):
                    table[v] = table.get(v, untargeted) | (1 << i)
            return table, untargeted

        def member(values_of) -> dict:
            """value -> campaigns that list it."""
            table: dict = {}
            for i, c in enumerate(self.campaigns):
                for v in values_of(c):
                    table[v] = table.get(v, 0) | (1 << i)
            return table

        t = lambda c: c.targeting or Targeting()  # noqa: E731
        self.by_country, self.any_country = allow(lambda c: [k.upper() for k in t(c).countries])
        self.by_devicetype, self.any_devicetype = allow(lambda c: t(c).devicetypes)
        self.by_os, self.any_os = allow(lambda c: [o.lower() for o in t(c).oses])
        self.by_domain_allow, self.any_domain = allow(
            lambda c: [d.lower() for d in t(c).domains_allow])
        self.by_domain_block = member(lambda c: [d.lower() for d in t(c).domains_block])
        # a blocked IAB category also blocks its subcategories ("IAB18" blocks "IAB18-1")
        self.by_cat = member(lambda c: {p for k in c.cat for p in category_and_parent(k)})
        # an advertiser domain is also listed under its parents: blocking "ford.example"
        # (badv) blocks "shop.ford.example" too
        self.by_adomain = member(lambda c: {p for d in c.adomain for p in domain_and_parents(d)})
        self.by_bundle = member(lambda c: [c.bundle.lower()] if c.bundle else [])
        self.by_seat = member(lambda c: [c.seat])
        self.by_deal = member(lambda c: c.deals)

    @staticmethod
    def any_of(table: dict, values: list | None) -> Bits:
        """Campaigns that list at least one of ``values``."""
        bits = 0
        for v in values or ():
            bits |= table.get(v, 0)
        return bits

    @staticmethod
    def targeted(table: dict, untargeted: Bits, value) -> Bits:
        """Campaigns that target ``value`` or do not target that dimension at all."""
        if value is None:
            return untargeted
        return table.get(value, untargeted)

    def fits_any(self, sizes: tuple[tuple[int, int], ...]) -> bool:
        """Whether some creative of the catalog has one of ``sizes``."""
        return any(size in self._by_size for size in sizes)

    def allowed_by_categories(self, acat: list[str]) -> Bits:
        """Campaigns whose every category is in ``acat``, itself or by its tier-1 parent (a
        campaign without categories cannot show it is allowed)."""
        allowed = {k.upper() for k in acat}
        return sum(1 << i for i, cats in enumerate(self.categories)
                   if cats and all(k in allowed or parent in allowed for k, parent in cats))

    def eligible_candidates(self, campaigns: Bits, sizes: tuple[tuple[int, int], ...],
                            secure: bool, blocked_types: tuple[int, ...],
                            blocked_attrs: tuple[int, ...]) -> Candidates:
        """The candidates of ``campaigns`` whose creative has one of ``sizes``, only HTTPS URLs
        when ``secure``, a type not in ``blocked_types`` and no attribute in ``blocked_attrs``;
        read-only, cached: requests fall into few campaign sets and sizes."""
        key = (campaigns, sizes, secure, blocked_types, blocked_attrs)
        found = self._eligible.get(key)
        if found is None:
            packed = np.frombuffer(campaigns.to_bytes(self.n_bytes, "little"), dtype=np.uint8)
            per_campaign = np.unpackbits(packed, count=len(self.campaigns), bitorder="little")
            mask = per_campaign.view(bool)[self.cand_campaign]
            fits = np.zeros(len(self.candidates), dtype=bool)
            for size in sizes:
                fits |= self._by_size.get(size, False)
            if secure:
                fits &= self.cand_secure
            for t in blocked_types:
                if t in self._by_type:  # a type this bidder does not know blocks nothing
                    fits &= ~self._by_type[t]
            for a in blocked_attrs:
                if a in self._by_attr:  # an attribute no creative has blocks nothing
                    fits &= ~self._by_attr[a]
            rows = np.flatnonzero(mask & fits)
            campaign = self.cand_campaign[rows]
            value_per_mille = self.cand_value_per_mille[rows]
            for array in (rows, campaign, value_per_mille):
                array.flags.writeable = False
            found = Candidates(rows, sum(1 << i for i in set(campaign.tolist())), campaign,
                               value_per_mille)
            if len(self._eligible) >= ELIGIBLE_CACHE_SIZE:
                self._eligible.clear()
            self._eligible[key] = found
        return found
