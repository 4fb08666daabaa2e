"""Privacy signals of a bid request: may this bidder use what it knows of the user?

"What it knows" is the user's features in memcached and the frequency counts:
without leave, a request is bid on its context alone (no look-up, no counts, no
user key in the notice URLs), as under COPPA.

Signals are read on the safe side and never refused with a 400: a flag counts as
set unless it is absent, null, 0 or "0"; a consent must be a non-blank string
and is not parsed (the exchange that sends one vouches for it). GPP strings are
decoded as far as this bidder acts on them: which sections they hold (the
header's Fibonacci-coded id range) and the opt-outs of the US sections below.
"""
from __future__ import annotations

from functools import lru_cache

from bidder.openrtb import BidRequest

# GPP section ids (IAB GPP v1 section list) and what each needs to let user data be used
GPP_TCF_EU, GPP_TCF_CA = 2, 5  # a consent framework: the section must hold a consent string
GPP_USP = 6  # the CCPA string ("1YYN"), as regs.us_privacy
GPP_US_NATIONAL, GPP_US_CALIFORNIA = 7, 8  # bit fields with opt-outs (2 bits each, 1 = opted out)
# bit offsets of the opt-outs in each US section's core segment (after 6 bits of version and
# the notices): sale, sharing and, nationally, targeted advertising
US_OPT_OUT_BITS = {GPP_US_NATIONAL: (18, 20, 22), GPP_US_CALIFORNIA: (12, 14)}
OPTED_OUT = 1
GPC_SEGMENT = 1  # optional segment type: Global Privacy Control, one bit
BASE64_URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
SEXTETS = {c: i for i, c in enumerate(BASE64_URL)}
HEADER_CHARS = 64  # a header lists a few section ids in a few characters; decode no more
CORE_CHARS = 8  # 48 bits: the US sections' opt-outs are within the first 24
GPP_CACHED_CHARS = 2048  # longer strings are decoded each time (4096 cached: at most ~8 MB)


def personal_data_allowed(r: BidRequest) -> bool:
    """Not under COPPA (``regs.coppa``); not under the GDPR (``regs.gdpr``) without a TCF
    consent string (``user.consent``); not when the user opted out of sale
    (``regs.us_privacy`` with "Y" third); not when ``regs.gpp`` says no for a section of
    ``regs.gpp_sid`` (``gpp_allows``). 2.5's places (``regs.ext.gdpr``,
    ``regs.ext.us_privacy``, ``user.ext.consent``) count too."""
    regs = r.regs
    if regs is None:
        return True
    if _flag_set(regs.coppa):
        return False
    gdpr = regs.gdpr if regs.gdpr is not None else _ext_field(regs.ext, "gdpr")
    if _flag_set(gdpr):
        user = r.user
        consent = user and (user.consent if user.consent is not None
                            else _ext_field(user.ext, "consent"))
        if not _is_consent(consent):
            return False
    us_privacy = regs.us_privacy or _ext_field(regs.ext, "us_privacy")
    if _usp_opted_out(us_privacy):
        return False
    if regs.gpp is None and regs.gpp_sid is None:
        return True
    sids = regs.gpp_sid
    if sids is not None and not (isinstance(sids, list) and all(type(s) is int for s in sids)):
        return False  # which sections apply cannot be read
    gpp = regs.gpp if isinstance(regs.gpp, str) else ""
    applicable = None if sids is None else tuple(sorted({s for s in sids if s > 0}))
    if len(gpp) > GPP_CACHED_CHARS:  # not kept: a cache of long strings costs memory
        return gpp_allows.__wrapped__(gpp, applicable)
    return gpp_allows(gpp, applicable)


@lru_cache(maxsize=4096)  # GPP strings repeat: an exchange's few consent states
def gpp_allows(gpp: str, applicable: tuple[int, ...] | None) -> bool:
    """Whether the GPP string ``gpp`` lets user data be used under its ``applicable`` sections
    (``regs.gpp_sid``; None: every section the string holds).

    TCF sections (EU, Canada) need a consent string; US Privacy, US national and California
    need no opt-out of sale, sharing or targeted advertising, and no Global Privacy Control.
    A section this bidder does not read, one that is missing or a string that does not decode
    keep user data out: it cannot be shown that the user did not opt out.
    """
    if applicable == ():
        return True
    try:
        sections = gpp_sections(gpp)
    except ValueError:
        return False
    for sid in sections if applicable is None else applicable:
        section = sections.get(sid)
        if section is None:
            return False
        if sid in (GPP_TCF_EU, GPP_TCF_CA):
            if not section:
                return False
        elif sid == GPP_USP:
            if _usp_opted_out(section) or len(section) < 3:
                return False
        elif sid in US_OPT_OUT_BITS:
            if _us_section_opted_out(section, US_OPT_OUT_BITS[sid]):
                return False
        else:
            return False
    return True


def gpp_sections(gpp: str) -> dict[int, str]:
    """``{section id: encoded section}`` of a GPP string ``HEADER~SECTION~...``; ValueError
    when the header is not a GPP v1 header or lists a different number of sections."""
    header, *sections = gpp.strip().split("~")
    bits = _bits(header[:HEADER_CHARS])
    if len(bits) < 24 or int(bits[0:6], 2) != 3:
        raise ValueError("not a GPP header (type 3)")
    ids = _fibonacci_range(bits, 12)
    if len(ids) != len(sections):
        raise ValueError(f"the header lists {len(ids)} sections, the string holds {len(sections)}")
    return dict(zip(ids, sections))


def _us_section_opted_out(section: str, offsets: tuple[int, ...]) -> bool:
    """An opt-out (2 bits, 1 = opted out) at one of ``offsets`` of the core segment, or the
    Global Privacy Control bit of an optional GPC segment; True when it does not decode."""
    core, *optional = section.split(".")
    try:
        bits = _bits(core[:CORE_CHARS])
        if len(bits) < max(offsets) + 2:
            return True
        if any(int(bits[o:o + 2], 2) == OPTED_OUT for o in offsets):
            return True
        for segment in optional:
            seg = _bits(segment[:1])
            if int(seg[0:2], 2) == GPC_SEGMENT and seg[2:3] == "1":
                return True
    except ValueError:
        return True
    return False


def _bits(encoded: str) -> str:
    """The bit string of GPP's base64url (6 bits a character, no padding)."""
    try:
        return "".join(format(SEXTETS[c], "06b") for c in encoded)
    except KeyError as exc:
        raise ValueError(f"not base64url: {exc}") from None


def _fibonacci_range(bits: str, at: int) -> list[int]:
    """GPP's Fibonacci-coded integer range: a 12-bit count, then per entry a group bit and
    either an id or a start and a length, each as an offset from the previous id."""
    count, at = int(bits[at:at + 12], 2), at + 12
    ids: list[int] = []
    last = 0
    for _ in range(count):
        group, at = bits[at:at + 1], at + 1
        offset, at = _fibonacci(bits, at)
        if group == "1":
            length, at = _fibonacci(bits, at)
            ids += range(last + offset, last + offset + length + 1)
        else:
            ids.append(last + offset)
        last = ids[-1]
    return ids


def _fibonacci(bits: str, at: int) -> tuple[int, int]:
    """One Fibonacci-coded integer at ``at`` (bit i weighs F(i+2): 1, 2, 3, 5...; "11" ends it)
    and the position after it."""
    value, weight, previous, last = 0, 1, 1, "0"
    while at < len(bits):
        bit, at = bits[at], at + 1
        if bit == "1" and last == "1":
            return value, at
        if bit == "1":
            value += weight
        weight, previous, last = weight + previous, weight, bit
    raise ValueError("Fibonacci integer without its end mark")


def _usp_opted_out(us_privacy: object) -> bool:
    return isinstance(us_privacy, str) and us_privacy[2:3].upper() == "Y"


def _is_consent(value: object) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _flag_set(value: object) -> bool:
    return value not in (None, 0, "0")  # 0 == False == 0.0


def _ext_field(ext: object, name: str) -> object:
    """``ext[name]`` of a free-form ext object, None when it is not an object."""
    return ext.get(name) if isinstance(ext, dict) else None
