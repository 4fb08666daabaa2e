"""The campaign catalog: load, validate, and compile into indexes for eligibility and scoring.

Validation is by msgspec while decoding: the rules of single fields are declared on the types
(``Meta`` constraints, ``Literal``s), the few that span fields are checked after. A catalog
that fails is refused at start with a message naming the campaign, the creative, the field,
what to do, and the JSON path. Compiling builds, by plain functions, the campaign sets by
targeting value (``targeting_sets``, Python ints as bitsets) and one row per campaign x
creative (a *candidate*) in numpy arrays (``candidate_arrays``), so a request's eligibility
is a handful of ``&``s.

A creative is a banner (the default ``format``), a video (an inline VAST document or the URL
of one) or a native ad (title, images, texts, link); the fields of each format are checked
together after decoding, the inline VAST by parsing it.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from importlib import resources
from typing import Annotated, Literal, NamedTuple
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec
import msgspec.inspect
import numpy as np
from msgspec import Meta

from bidder import native, video
from bidder.currency import Rates, to_micros
from bidder.domains import domain_and_parents


MAX_VALUE_PER_CLICK_USD = 1000.0  # a sanity limit: above it, a typo or a wrong currency
MAX_WINDOW_S = 366 * 86400  # memcached's expiry of a counter is a 32-bit Unix time
BANNER_TYPES = (1, 2, 3, 4)  # OpenRTB banner ad types: XHTML text, XHTML banner, JavaScript, iframe

# The rules of single fields are declared on their types: msgspec checks them while decoding
# and names the path ($.campaigns[1].creatives[0].w); each ``description`` is the advice the
# error message adds. Patterns end in \Z: msgspec searches, and $ lets a final newline through.
CampaignId = Annotated[str, Meta(
    pattern=r"^[A-Za-z0-9._:-]{1,64}\Z",
    description="campaign id: use 1-64 letters, digits and . _ : - (it is part of notice URLs "
                "and memcached keys)")]
AdvertiserDomains = Annotated[list[Annotated[str, Meta(pattern=r"\S")]], Meta(
    min_length=1,
    description="list at least one advertiser domain, none empty (OpenRTB Bid.adomain)")]
IabCategory = Annotated[str, Meta(
    pattern=r"^(?i:IAB\d{1,2}(-\d{1,3})?)\Z",
    description="use IAB Content Category 1.0 codes such as IAB18 or IAB18-1 (the taxonomy bcat "
                "and acat are checked in)")]
ValuePerClick = Annotated[float, Meta(gt=0, description="must be a positive amount")]
Budget = Annotated[float, Meta(gt=0, description="must be a positive amount (or absent for no "
                                                 "cap)")]
CountryCode = Annotated[str, Meta(
    pattern=r"^[A-Za-z]{3}\Z",
    description="use ISO-3166-1 alpha-3 codes such as JPN or USA (OpenRTB's geo.country)")]
DeviceType = Annotated[int, Meta(
    ge=1, le=8,
    description="use AdCOM 1.0 device types, 1 to 8 (1 mobile/tablet, 2 PC, 3 CTV, 4 phone, "
                "5 tablet, ...)")]
Creatives = Annotated[list["Creative"], Meta(
    min_length=1, description="a campaign needs at least one creative")]
CreativeId = Annotated[str, Meta(
    pattern=r"\S", description="every creative needs a non-empty id (the bid's crid)")]
Pixels = Annotated[int, Meta(gt=0, description="w and h: the creative's size in pixels, "
                                               "positive integers")]
Markup = Annotated[str, Meta(min_length=1, description="adm: the creative's markup, not empty")]
CreativeFormat = Annotated[Literal["banner", "video", "native"], Meta(
    description='format must be "banner" (the default), "video" or "native"')]
Seconds = Annotated[int, Meta(gt=0, description="duration: the video's length in whole seconds")]
MimeType = Annotated[str, Meta(
    pattern=r"^[a-z]+/[A-Za-z0-9.+-]+\Z",
    description="mimes: the video's MIME types, such as video/mp4 (what imp.video.mimes lists)")]
VideoProtocol = Annotated[int, Meta(
    ge=1, le=14, description="protocols: AdCOM 1.0 video protocol codes, 1 to 14 (e.g. 3 VAST "
                             "3.0, 6 VAST 3.0 wrapper, 7 VAST 4.0)")]
Url = Annotated[str, Meta(pattern=r"^https?://\S+\Z",
                          description="use an absolute http(s) URL (https for secure inventory)")]
Text = Annotated[str, Meta(pattern=r"\S", description="must not be empty")]
BannerType = Annotated[Literal[1, 2, 3, 4], Meta(
    description=f"type must be one of {BANNER_TYPES} (1 XHTML text, 2 XHTML banner, "
                "3 JavaScript, 4 iframe)")]
CREATIVE_ATTRIBUTES_ADVICE = ("attr must hold distinct AdCOM 1.0 Creative Attributes codes, 1 to "
                              "17 (e.g. 1 audio auto-play, 6 in-banner video)")
CreativeAttributes = Annotated[list[Annotated[int, Meta(ge=1, le=17)]], Meta(
    description=CREATIVE_ATTRIBUTES_ADVICE)]
FREQUENCY_CAP_ADVICE = ("impressions must be positive and window_s between 1 s and "
                        f"{MAX_WINDOW_S // 86400} days")
Impressions = Annotated[int, Meta(gt=0, description=FREQUENCY_CAP_ADVICE)]
WindowSeconds = Annotated[int, Meta(ge=1, le=MAX_WINDOW_S, description=FREQUENCY_CAP_ADVICE)]


class Image(msgspec.Struct, forbid_unknown_fields=True):
    """A native creative's image: its URL and size in pixels."""

    url: Url
    w: Pixels
    h: Pixels


class Creative(msgspec.Struct, forbid_unknown_fields=True):
    id: CreativeId
    format: CreativeFormat = "banner"
    w: Pixels | None = None  # banner and video
    h: Pixels | None = None
    attr: CreativeAttributes = []  # AdCOM 1.0 Creative Attributes, what battr may block
    # banner
    adm: Markup | None = None
    type: BannerType = 2  # banner ad type, what an imp's banner.btype may block
    # video: an inline VAST document, or the URL of one (the bid carries a wrapper around it)
    duration: Seconds | None = None
    mimes: list[MimeType] = []
    protocols: list[VideoProtocol] = []
    vast: str | None = None
    vast_url: Url | None = None
    # native
    title: Text | None = None
    image: Image | None = None  # the main image (Native 1.2 image type 3)
    icon: Image | None = None  # image type 1
    sponsored: Text | None = None  # data type 1
    description: Text | None = None  # data type 2
    cta: Text | None = None  # data type 12, the call to action
    link: Url | None = None  # where a click goes

    @property
    def size(self) -> tuple[int, int]:
        """The ``size`` model feature: w x h; a native creative's main image's."""
        if self.format == "native":
            return self.image.w, self.image.h
        return self.w, self.h

    def urls(self) -> str:
        """Every text of the creative that may hold a URL its ad loads or links to."""
        if self.format == "banner":
            return self.adm
        if self.format == "video":
            return self.vast or self.vast_url
        return " ".join(u for u in (self.image.url, self.icon.url if self.icon else None,
                                    self.link) if u)


# the fields only one format uses, and the ones it requires
FORMAT_FIELDS = {
    "banner": (("adm",), ("w", "h", "adm")),
    "video": (("duration", "mimes", "protocols", "vast", "vast_url"),
              ("w", "h", "duration", "mimes", "protocols")),
    "native": (("title", "image", "icon", "sponsored", "description", "cta", "link"),
               ("title", "image", "sponsored", "link")),
}


class FrequencyCap(msgspec.Struct, forbid_unknown_fields=True):
    impressions: Impressions
    window_s: WindowSeconds = 86400


class Targeting(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    countries: list[CountryCode] = []
    devicetypes: list[DeviceType] = []
    domains_block: list[str] = []
    domains_allow: list[str] = []
    oses: list[str] = []


class Campaign(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    id: CampaignId
    adomain: AdvertiserDomains
    cat: list[IabCategory]
    value_per_click: ValuePerClick
    creatives: Creatives
    currency: str = "USD"
    targeting: Targeting | None = None
    seat: str = "bidder"
    bundle: str | None = None
    deals: list[str] = []
    budget: Budget | None = None  # total spend cap, in ``currency``
    daily_budget: Budget | None = None  # spend cap per campaign-local day, paced over the day
    timezone: str = "UTC"  # IANA zone the campaign's days are counted in
    frequency_cap: FrequencyCap | None = None


class CatalogFile(msgspec.Struct, forbid_unknown_fields=True):
    campaigns: list[Campaign]


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
        raise CatalogError(f"campaign catalog {path}: {_explain(raw, str(exc))}") from None
    except msgspec.DecodeError as exc:
        raise CatalogError(f"campaign catalog {path} is not valid JSON: {exc}") from None
    for campaign in parsed.campaigns:
        _check_across_fields(campaign, rates)
    ids = [c.id for c in parsed.campaigns]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise CatalogError(f"campaign catalog {path}: duplicate campaign id(s) {duplicates}")
    return Catalog(parsed.campaigns, rates, os.path.abspath(path))


def _explain(raw: bytes, message: str) -> str:
    """msgspec's ``Expected `int` >= 1 - at `$.campaigns[1].creatives[0].w``` as
    ``campaign 'c2', creative 'c2-cr1', field 'w': <the rule's advice> (<msgspec's message>)``."""
    where = re.search(r"`\$\.campaigns\[(\d+)\](?:\.creatives\[(\d+)\])?\.?([^`]*)`$", message)
    if where is None:
        return message
    index, creative_index, field_path = where.groups()
    campaign = _raw_field(raw, int(index), None)
    named = f"campaign {campaign.get('id', f'#{index}')!r}"
    if creative_index is not None:
        creative = _raw_field(raw, int(index), int(creative_index))
        named += f", creative {creative.get('id', f'#{creative_index}')!r}"
        if not field_path:
            field_path = f"creatives[{creative_index}]"
    if field_path:
        named += f", field {field_path!r}"
    advice = rule_advice(where.group(0).strip("`"))
    return f"{named}: {advice} ({message})" if advice else f"{named}: {message}"


def _raw_field(raw: bytes, campaign: int, creative: int | None) -> dict:
    """The raw JSON object of a campaign (or one of its creatives), {} when it is not one."""
    try:
        node = msgspec.json.decode(raw)["campaigns"][campaign]
        if creative is not None:
            node = node["creatives"][creative]
    except (msgspec.DecodeError, KeyError, IndexError, TypeError):
        return {}
    return node if isinstance(node, dict) else {}


def rule_advice(path: str) -> str | None:
    """The advice (``description``) of the rule on ``path`` (``$.campaigns[1].cat[0]``): the
    innermost description on the way, a list's passing on to its items but not into a struct
    (whose fields have rules of their own)."""
    node: object = msgspec.inspect.type_info(CatalogFile)
    advice = None
    for name, index in re.findall(r"\.(\w+)|\[(\d+)\]", path):
        node, advice = _unwrap(node, advice)
        if name and isinstance(node, msgspec.inspect.StructType):
            node = next((f.type for f in node.fields if f.encode_name == name), None)
        elif index and isinstance(node, msgspec.inspect.ListType):
            node = node.item_type
        else:
            return advice
    return _unwrap(node, advice)[1]


def _unwrap(node: object, inherited: str | None) -> tuple[object, str | None]:
    """``node`` without its ``Annotated`` metadata and ``| None``, and the advice there: its own
    description, else ``inherited`` unless it is a struct."""
    description = None
    while True:
        if isinstance(node, msgspec.inspect.Metadata):
            description = (node.extra_json_schema or {}).get("description", description)
            node = node.type
        elif isinstance(node, msgspec.inspect.UnionType):
            node = next(t for t in node.types if not isinstance(t, msgspec.inspect.NoneType))
        else:
            break
    if description is None and not isinstance(node, msgspec.inspect.StructType):
        description = inherited
    return node, description


def _check_across_fields(c: Campaign, rates: Rates) -> None:
    """The rules a field's type cannot hold: a known currency, a sane value in USD, distinct
    creative ids and attributes."""
    def fail(field_name: str, why: str, creative: Creative | None = None) -> None:
        named = f", creative {creative.id!r}" if creative is not None else ""
        raise CatalogError(f"campaign {c.id!r}{named}, field {field_name!r}: {why}")

    if not rates.knows(c.currency):
        fail("currency", f"{c.currency!r} has no rate; add it with --currency-rates")
    usd = rates.to_usd(c.value_per_click, c.currency)
    if not usd <= MAX_VALUE_PER_CLICK_USD:
        fail("value_per_click", f"{c.value_per_click} {c.currency} ({usd:.6g} USD) a click is over "
                                f"the {MAX_VALUE_PER_CLICK_USD:g} USD sanity limit: check the "
                                "amount and its currency")
    try:
        ZoneInfo(c.timezone)
    except (ZoneInfoNotFoundError, ValueError):
        fail("timezone", f"{c.timezone!r} is not an IANA time zone: use a name such as "
                         "'America/New_York', 'Asia/Tokyo' or 'UTC'")
    seen: set[str] = set()
    for cr in c.creatives:
        if cr.id in seen:
            fail("id", f"duplicate creative id {cr.id!r}", cr)
        seen.add(cr.id)
        if len(set(cr.attr)) < len(cr.attr):
            fail("attr", f"{cr.attr}: {CREATIVE_ATTRIBUTES_ADVICE}", cr)
        problem = _format_problem(cr)
        if problem is not None:
            fail(problem[0], problem[1], cr)


def _format_problem(cr: Creative) -> tuple[str, str] | None:
    """(field, what is wrong) when ``cr`` lacks a field its format needs, has one of another
    format, or its video cannot be played; None when it is whole."""
    own, required = FORMAT_FIELDS[cr.format]
    for other, (fields, _) in FORMAT_FIELDS.items():
        for name in fields:
            value = getattr(cr, name)
            if other != cr.format and name not in own and value not in (None, []):
                return name, f"is a field of {other} creatives; this one is {cr.format} (set " \
                             f"\"format\": \"{other}\" if it is one)"
    for name in required:
        if getattr(cr, name) in (None, []):
            return name, f"a {cr.format} creative needs {name} (see the README's catalog format)"
    if cr.format != "video":
        return None
    if (cr.vast is None) == (cr.vast_url is None):
        return "vast", "give either vast (an inline VAST document) or vast_url (a wrapper's target)"
    if cr.vast is not None:
        try:
            vast = video.inspect(cr.vast)
        except video.VastError as exc:
            return "vast", f"not a playable inline VAST document: {exc}"
        missing = sorted({m.lower() for m in cr.mimes} - vast.media_types)
        if missing:
            return "mimes", f"{missing} listed, but the VAST has no MediaFile of that type"
        if not set(cr.protocols) & set(video.INLINE_PROTOCOLS):
            return "protocols", f"{cr.protocols}: an inline VAST needs an inline protocol code " \
                                f"({sorted(video.INLINE_PROTOCOLS)}, e.g. 3 for VAST 3.0)"
    elif not set(cr.protocols) & set(video.WRAPPER_PROTOCOLS):
        return "protocols", f"{cr.protocols}: a vast_url creative is bid as a VAST wrapper; " \
                            f"list a wrapper code ({sorted(video.WRAPPER_PROTOCOLS)}, e.g. 6 " \
                            "for a VAST 3.0 wrapper)"
    return None


Bits = int  # a set of campaigns: bit i is campaign i


class Candidates(NamedTuple):
    """Eligible candidates of an imp: rows of ``Catalog.candidates`` and, row by row, their
    campaign index and value per mille (USD), gathered once per cached set, not per bid."""

    rows: np.ndarray
    campaigns: Bits  # the campaigns of those rows
    campaign: np.ndarray
    value_per_mille: np.ndarray

    @classmethod
    def of(cls, rows: np.ndarray, arrays: "CandidateArrays") -> "Candidates":
        """The candidates of ``rows``, their arrays read-only (they are cached and shared)."""
        campaign = arrays.campaign[rows]
        value_per_mille = arrays.value_per_mille[rows]
        for array in (rows, campaign, value_per_mille):
            array.flags.writeable = False
        return cls(rows, sum(1 << i for i in set(campaign.tolist())), campaign, value_per_mille)

    @classmethod
    def union(cls, parts: list["Candidates"]) -> "Candidates":
        """The candidates of several formats of one imp, scored together."""
        campaigns = 0
        for part in parts:
            campaigns |= part.campaigns
        return cls(np.concatenate([p.rows for p in parts]), campaigns,
                   np.concatenate([p.campaign for p in parts]),
                   np.concatenate([p.value_per_mille for p in parts]))


def category_and_parent(category: str) -> tuple[str, str]:
    """``iab18-1`` -> ``("IAB18-1", "IAB18")``: an IAB category and its tier-1 parent."""
    category = category.upper()
    return category, category.split("-")[0]


ELIGIBLE_CACHE_SIZE = 4096


@dataclass(frozen=True, slots=True)
class TargetingSets:
    """Campaign sets by request value, for eligibility. ``by_*`` maps a value to the campaigns
    that list it; for a targeted dimension (country, device type, OS, allowed domain) it also
    holds the campaigns that do not target it, which ``any_*`` holds alone."""

    by_country: dict[str, Bits]
    any_country: Bits
    by_devicetype: dict[int, Bits]
    any_devicetype: Bits
    by_os: dict[str, Bits]
    any_os: Bits
    by_domain_allow: dict[str, Bits]
    any_domain: Bits
    by_domain_block: dict[str, Bits]
    by_cat: dict[str, Bits]  # under each category and its tier-1 parent: a blocked IAB18 blocks IAB18-1
    by_adomain: dict[str, Bits]  # under each domain and its parents: badv of x.example blocks shop.x.example
    by_bundle: dict[str, Bits]
    by_seat: dict[str, Bits]
    by_deal: dict[str, Bits]
    categories: list[set[tuple[str, str]]]  # per campaign: (category, tier-1 parent), for acat


@dataclass(frozen=True, slots=True)
class CandidateArrays:
    """Per candidate (campaign x creative) row: what eligibility and scoring read as arrays."""

    campaign: np.ndarray  # the campaign's index
    value_per_mille: np.ndarray  # value_per_click (USD) x 1000
    secure: np.ndarray  # no http:// URL in the markup (imp.secure=1 needs HTTPS throughout)
    by_size: dict[tuple[int, int], np.ndarray]  # (w, h) -> banner rows of that size
    video: np.ndarray  # the row numbers of video creatives
    native: np.ndarray  # the row numbers of native creatives
    by_type: dict[int, np.ndarray]  # banner ad type -> rows of that type
    by_attr: dict[int, np.ndarray]  # creative attribute -> rows that declare it


def allow_table(values: list[list]) -> tuple[dict, Bits]:
    """From each campaign's targeted values: value -> campaigns targeting it or not targeting
    the dimension at all; and the campaigns not targeting it."""
    untargeted = sum(1 << i for i, listed in enumerate(values) if not listed)
    table: dict = {}
    for i, listed in enumerate(values):
        for v in listed:
            table[v] = table.get(v, untargeted) | (1 << i)
    return table, untargeted


def member_table(values: list) -> dict:
    """From each campaign's listed values: value -> campaigns that list it."""
    table: dict = {}
    for i, listed in enumerate(values):
        for v in listed:
            table[v] = table.get(v, 0) | (1 << i)
    return table


def targeting_sets(campaigns: list[Campaign]) -> TargetingSets:
    """The campaign sets of ``campaigns`` by every value a request is matched on."""
    targetings = [c.targeting or Targeting() for c in campaigns]
    by_country, any_country = allow_table([[k.upper() for k in t.countries] for t in targetings])
    by_devicetype, any_devicetype = allow_table([t.devicetypes for t in targetings])
    by_os, any_os = allow_table([[o.lower() for o in t.oses] for t in targetings])
    by_domain_allow, any_domain = allow_table([[d.lower() for d in t.domains_allow]
                                               for t in targetings])
    return TargetingSets(
        by_country=by_country, any_country=any_country,
        by_devicetype=by_devicetype, any_devicetype=any_devicetype,
        by_os=by_os, any_os=any_os,
        by_domain_allow=by_domain_allow, any_domain=any_domain,
        by_domain_block=member_table([[d.lower() for d in t.domains_block] for t in targetings]),
        by_cat=member_table([{p for k in c.cat for p in category_and_parent(k)}
                             for c in campaigns]),
        by_adomain=member_table([{p for d in c.adomain for p in domain_and_parents(d)}
                                 for c in campaigns]),
        by_bundle=member_table([[c.bundle.lower()] if c.bundle else [] for c in campaigns]),
        by_seat=member_table([[c.seat] for c in campaigns]),
        by_deal=member_table([c.deals for c in campaigns]),
        categories=[{category_and_parent(k) for k in c.cat} for c in campaigns])


def candidate_arrays(candidates: list[tuple[Campaign, Creative]], index: dict[str, int],
                     rates: Rates) -> CandidateArrays:
    """The arrays of the ``candidates`` rows; ``index`` gives a campaign id's index."""
    n = len(candidates)
    by_size: dict[tuple[int, int], np.ndarray] = {}
    for k, (_, cr) in enumerate(candidates):
        if cr.format == "banner":
            by_size.setdefault((cr.w, cr.h), np.zeros(n, dtype=bool))[k] = True
    return CandidateArrays(
        campaign=np.array([index[c.id] for c, _ in candidates], dtype=np.intp),
        value_per_mille=np.array([rates.to_usd(c.value_per_click, c.currency) * 1000.0
                                  for c, _ in candidates]),
        secure=np.array(["http://" not in cr.urls().lower() for _, cr in candidates], dtype=bool),
        by_size=by_size,
        video=np.array([k for k, (_, cr) in enumerate(candidates) if cr.format == "video"],
                       dtype=np.intp),
        native=np.array([k for k, (_, cr) in enumerate(candidates) if cr.format == "native"],
                        dtype=np.intp),
        by_type={t: np.array([cr.type == t for _, cr in candidates], dtype=bool)
                 for t in BANNER_TYPES},
        by_attr={a: np.array([a in cr.attr for _, cr in candidates], dtype=bool)
                 for a in {a for _, cr in candidates for a in cr.attr}})


class Catalog:
    """Campaigns compiled for the bid path.

    Campaign sets are Python ints used as bitsets (bit i = campaign i): a request's
    eligibility is a dozen ``&``/``|`` on them, each far cheaper than a numpy call on a
    small array. Candidates (campaign x creative) live in numpy arrays for the scoring.
    """

    def __init__(self, campaigns: list[Campaign], rates: Rates, path: str) -> None:
        self.campaigns = campaigns
        self.rates = rates
        self.path = path
        self.index = {c.id: i for i, c in enumerate(campaigns)}
        self.budget_micros: list[int | None] = [
            None if c.budget is None else to_micros(rates.to_usd(c.budget, c.currency))
            for c in campaigns]
        self.daily_budget_micros: list[int | None] = [
            None if c.daily_budget is None else to_micros(rates.to_usd(c.daily_budget, c.currency))
            for c in campaigns]
        self.zones = [ZoneInfo(c.timezone) for c in campaigns]
        self.capped = [i for i, c in enumerate(campaigns) if c.frequency_cap]
        # one row per candidate (campaign x creative)
        self.candidates: list[tuple[Campaign, Creative]] = [
            (c, cr) for c in campaigns for cr in c.creatives]
        self.sets = targeting_sets(campaigns)
        self.arrays = candidate_arrays(self.candidates, self.index, rates)
        self.has_video = bool(len(self.arrays.video))
        self.has_native = bool(len(self.arrays.native))
        self._n_bytes = (len(campaigns) + 7) // 8
        self._eligible: dict[tuple, Candidates] = {}

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
        return any(size in self.arrays.by_size for size in sizes)

    def allowed_by_categories(self, acat: list[str]) -> Bits:
        """Campaigns whose every category is in ``acat``, itself or by its tier-1 parent (a
        campaign without categories cannot show it is allowed)."""
        allowed = {k.upper() for k in acat}
        return sum(1 << i for i, cats in enumerate(self.sets.categories)
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
            arrays = self.arrays
            fits = np.zeros(len(self.candidates), dtype=bool)
            for size in sizes:
                fits |= arrays.by_size.get(size, False)
            if secure:
                fits &= arrays.secure
            for t in blocked_types:
                if t in arrays.by_type:  # a type this bidder does not know blocks nothing
                    fits &= ~arrays.by_type[t]
            for a in blocked_attrs:
                if a in arrays.by_attr:  # an attribute no creative has blocks nothing
                    fits &= ~arrays.by_attr[a]
            found = self._remember(key, campaigns, fits)
        return found

    def eligible_video(self, campaigns: Bits, imp_video, secure: bool) -> Candidates:
        """The video candidates of ``campaigns`` that fit ``imp_video`` (``bidder.video.fits``),
        only HTTPS media when ``secure``; cached by what of the imp decides it."""
        key = ("video", campaigns, secure, video.fit_key(imp_video))
        found = self._eligible.get(key)
        if found is None:
            found = self._remember(key, campaigns, self._fitting(
                self.arrays.video, secure, lambda cr: video.fits(cr, imp_video)))
        return found

    def eligible_native(self, campaigns: Bits, imp_native, secure: bool) -> Candidates:
        """The native candidates of ``campaigns`` that fill every required asset of
        ``imp_native.request`` (``bidder.native.fits``), no attribute in ``imp_native.battr``,
        only HTTPS URLs when ``secure``; cached by what of the request decides it."""
        request, battr = imp_native.request, set(imp_native.battr or ())
        key = ("native", campaigns, secure, tuple(sorted(battr)), native.request_key(request))
        found = self._eligible.get(key)
        if found is None:
            found = self._remember(key, campaigns, self._fitting(
                self.arrays.native, secure,
                lambda cr: not battr & set(cr.attr) and native.fits(cr, request)))
        return found

    def _fitting(self, rows: np.ndarray, secure: bool, fits) -> np.ndarray:
        """A mask over every candidate: the ``rows`` whose creative ``fits``, HTTPS-only ones
        when ``secure``."""
        mask = np.zeros(len(self.candidates), dtype=bool)
        for k in rows.tolist():
            if (not secure or self.arrays.secure[k]) and fits(self.candidates[k][1]):
                mask[k] = True
        return mask

    def _remember(self, key: tuple, campaigns: Bits, fits: np.ndarray) -> Candidates:
        """The candidates of ``campaigns`` among the ``fits`` rows, read-only, cached under
        ``key``."""
        arrays = self.arrays
        packed = np.frombuffer(campaigns.to_bytes(self._n_bytes, "little"), dtype=np.uint8)
        per_campaign = np.unpackbits(packed, count=len(self.campaigns), bitorder="little")
        rows = np.flatnonzero(per_campaign.view(bool)[arrays.campaign] & fits)
        found = Candidates.of(rows, arrays)
        if len(self._eligible) >= ELIGIBLE_CACHE_SIZE:
            self._eligible.clear()
        self._eligible[key] = found
        return found
