"""OpenRTB 2.6 BidRequest / BidResponse as typed msgspec structs.

Only the objects and fields the bidder reads are declared; every other field
(``ext``, ``source``, ``content``, audio...) is skipped by the decoder without
being built. Types are read as real exchanges send them: a request is decoded
strictly first and, only when that fails, again in msgspec's lax mode, where an
integral float (``"w": 300.0``) or a numeric string (``"secure": "1"``,
``"bidfloor": "0.5"``) fills an integer or float field (such requests are
counted); anything else of the wrong type (``"w": 300.5``) is a 400. ``null``
means absent (some exchange stacks write absent optionals as null). Field names and defaults follow 2.6.md; an
enumerated value this bidder does not know (``at: 3``) is tolerated, as 2.6's
versioning rules require, not refused.

Structs are ``gc=False``: decoded JSON holds no reference cycles, and untracked
structs are created and freed faster (decoding 1.87 -> 1.67 us a request).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import msgspec
from msgspec import Struct

from bidder.native import NativeError, NativeRequest, parse_request


class Format(Struct, omit_defaults=True, gc=False):
    w: int | None = None
    h: int | None = None


class Banner(Struct, omit_defaults=True, gc=False):
    format: list[Format] | None = None
    w: int | None = None
    h: int | None = None
    btype: list[int] | None = None
    battr: list[int] | None = None


class Video(Struct, omit_defaults=True, gc=False):
    """``imp.video``: what a video creative must match (2.6 section 3.2.7)."""

    mimes: list[str] | None = None
    minduration: int | None = None
    maxduration: int | None = None
    rqddurs: list[int] | None = None  # 2.6: the only durations allowed, instead of min/max
    protocols: list[int] | None = None  # AdCOM 1.0 Creative Subtypes - Audio/Video
    protocol: int | None = None  # 2.5, deprecated: a single protocol
    w: int | None = None
    h: int | None = None
    linearity: int | None = None  # 1 linear (in-stream), 2 non-linear (overlay)
    battr: list[int] | None = None


class Native(NativeRequest, omit_defaults=True, gc=False):
    """``imp.native``: ``request`` holds the Native 1.2 request as a JSON string (or, as some
    exchanges send it, an object); the legacy form puts the request's own fields here.
    ``decode_request`` replaces ``request`` with the parsed ``NativeRequest``."""

    request: Any = None
    battr: list[int] | None = None


class Deal(Struct, omit_defaults=True, gc=False):
    id: str
    bidfloor: float | None = 0.0  # None (null) is made the default by decode_request
    bidfloorcur: str | None = "USD"
    at: int | None = None
    wseat: list[str] | None = None
    wadomain: list[str] | None = None


class Pmp(Struct, omit_defaults=True, gc=False):
    private_auction: int | None = 0
    deals: list[Deal] | None = None


class Imp(Struct, omit_defaults=True, gc=False):
    id: str
    banner: Banner | None = None
    video: Video | None = None
    native: Native | None = None
    pmp: Pmp | None = None
    tagid: str | None = None
    bidfloor: float | None = 0.0
    bidfloorcur: str | None = "USD"
    secure: int | None = None


class Publisher(Struct, omit_defaults=True, gc=False):
    id: str | None = None
    name: str | None = None
    domain: str | None = None


class Site(Struct, omit_defaults=True, gc=False):
    id: str | None = None
    name: str | None = None
    domain: str | None = None
    page: str | None = None
    cat: list[str] | None = None
    publisher: Publisher | None = None


class App(Struct, omit_defaults=True, gc=False):
    id: str | None = None
    name: str | None = None
    bundle: str | None = None
    domain: str | None = None
    cat: list[str] | None = None
    publisher: Publisher | None = None


class Geo(Struct, omit_defaults=True, gc=False):
    country: str | None = None
    region: str | None = None
    city: str | None = None
    utcoffset: int | None = None


class Device(Struct, omit_defaults=True, gc=False):
    ua: str | None = None
    ip: str | None = None
    geo: Geo | None = None
    devicetype: int | None = None
    os: str | None = None
    ifa: str | None = None
    language: str | None = None


class User(Struct, omit_defaults=True, gc=False):
    id: str | None = None
    buyeruid: str | None = None
    yob: int | None = None
    geo: Geo | None = None
    consent: Any = None  # TCF consent string, when regs.gdpr = 1 (read leniently: never a 400)
    ext: Any = None  # free-form; read leniently (2.5's consent lived here): never a 400


class Regs(Struct, omit_defaults=True, gc=False):
    """Privacy signals, read leniently (a flag sent as "1" or true is still honoured, never a
    400) and conservatively (see ``bidder.privacy``)."""

    coppa: Any = None  # 1: the request is subject to COPPA (directed to children)
    gdpr: Any = None  # 1: subject to the GDPR; 0: not; absent: unknown
    us_privacy: Any = None  # IAB CCPA string, e.g. "1YYN" (third letter: opted out of sale)
    gpp: Any = None  # IAB Global Privacy Platform string
    gpp_sid: Any = None  # the GPP sections that apply to this request
    ext: Any = None  # free-form; 2.5's gdpr and us_privacy lived here


class BidRequest(Struct, omit_defaults=True, gc=False):
    id: str
    imp: list[Imp]
    site: Site | None = None
    app: App | None = None
    device: Device | None = None
    user: User | None = None
    regs: Regs | None = None
    test: int | None = 0
    at: int | None = 2
    tmax: int | None = None
    wseat: list[str] | None = None
    bseat: list[str] | None = None
    cur: list[str] | None = None
    cattax: int | None = None  # taxonomy of bcat/acat; absent = 1 (IAB Content Category 1.0)
    bcat: list[str] | None = None
    acat: list[str] | None = None
    badv: list[str] | None = None
    bapp: list[str] | None = None


class Bid(Struct, omit_defaults=True, gc=False):
    id: str
    impid: str
    price: float
    adm: str
    nurl: str
    burl: str
    adomain: list[str]
    crid: str
    cid: str
    cat: list[str]
    mtype: int  # 2.6 markup type: 1 banner, 2 video, 4 native
    w: int | None = None  # banner and video; a native ad has no size of its own
    h: int | None = None
    dealid: str | None = None
    bundle: str | None = None
    attr: list[int] | None = None  # the creative's attributes (AdCOM 1.0 Creative Attributes)
    lurl: str | None = None  # loss notice URL (${AUCTION_LOSS}, ${AUCTION_PRICE})


class SeatBid(Struct, omit_defaults=True, gc=False):
    bid: list[Bid]
    seat: str | None = None


class BidResponse(Struct, omit_defaults=True, gc=False):
    id: str
    seatbid: list[SeatBid]
    cur: str
    bidid: str | None = None


REQUEST_DECODER = msgspec.json.Decoder(BidRequest)
LENIENT_DECODER = msgspec.json.Decoder(BidRequest, strict=False)
RESPONSE_ENCODER = msgspec.json.Encoder()


MAX_FLOOR = 1e9  # CPM; past it a typo (and lax mode reads "inf" and "nan" strings as floats)
MAX_TMAX_MS = 2**31 - 1  # ~24 days; JSON integers are unbounded, and past ~1e308 not even a float
UTF8_BOM = b"\xef\xbb\xbf"


class InvalidRequest(ValueError):
    """The body is JSON of the wrong shape or breaks a rule of the specification."""


class Decoded(NamedTuple):
    request: BidRequest
    lenient: bool  # some number came as a string or an integral float (lax mode was needed)


def decode_request(body: bytes) -> BidRequest:
    """Decode and validate a BidRequest; raise ``msgspec.DecodeError`` or ``InvalidRequest``."""
    return decode(body).request


def decode(body: bytes) -> Decoded:
    """``decode_request``, also saying whether the request needed lenient decoding.

    A leading UTF-8 byte order mark is skipped (RFC 8259 8.1: receivers may ignore it).
    Strict first (the common case pays nothing), then lax on a type error.
    """
    if body.startswith(UTF8_BOM):
        body = body[len(UTF8_BOM):]
    lenient = False
    try:
        try:
            request = REQUEST_DECODER.decode(body)
        except msgspec.ValidationError:
            request = LENIENT_DECODER.decode(body)  # still wrong: its error is the one reported
            lenient = True
    except RecursionError:  # msgspec's depth limit, e.g. "ext": [[[[...]]]]; not a DecodeError
        raise InvalidRequest("JSON is nested too deeply for a BidRequest") from None
    except UnicodeDecodeError as exc:  # a string field with bytes that are not UTF-8
        raise InvalidRequest(f"body is not valid UTF-8 ({exc.reason} at byte {exc.start} of a "
                             "string): send the BidRequest as UTF-8 JSON") from None
    if request.test is None:
        request.test = 0
    if request.at is None:
        request.at = 2
    if not request.id:
        raise InvalidRequest("BidRequest.id must be a non-empty string")
    if not request.imp:
        raise InvalidRequest("BidRequest.imp must hold at least one Imp")
    seen: set[str] = set()
    for imp in request.imp:
        if not imp.id:
            raise InvalidRequest("every Imp needs a non-empty id")
        if imp.id in seen:
            raise InvalidRequest(f"duplicate Imp.id {imp.id!r}: imp ids must be unique in a request")
        seen.add(imp.id)
        if imp.bidfloor is None:
            imp.bidfloor = 0.0
        elif not 0 <= imp.bidfloor <= MAX_FLOOR:  # also NaN
            raise InvalidRequest(f"Imp {imp.id!r}: bidfloor must be between 0 and {MAX_FLOOR:g}")
        # ISO-4217 codes, whatever the sender's case
        imp.bidfloorcur = imp.bidfloorcur.upper() if imp.bidfloorcur else "USD"
        if imp.pmp:
            if imp.pmp.private_auction is None:
                imp.pmp.private_auction = 0
            for deal in imp.pmp.deals or ():
                if deal.bidfloor is None:
                    deal.bidfloor = 0.0
                elif not 0 <= deal.bidfloor <= MAX_FLOOR:
                    raise InvalidRequest(f"Imp {imp.id!r} deal {deal.id!r}: bidfloor must be "
                                         f"between 0 and {MAX_FLOOR:g}")
                deal.bidfloorcur = deal.bidfloorcur.upper() if deal.bidfloorcur else "USD"
        if imp.native is not None:
            try:
                imp.native.request, lax = parse_request(imp.native)
            except NativeError as exc:
                raise InvalidRequest(f"Imp {imp.id!r}: native: {exc}") from None
            lenient |= lax
    if request.cur:
        request.cur = [c.upper() for c in request.cur]
    if request.tmax is not None and not 0 < request.tmax <= MAX_TMAX_MS:
        raise InvalidRequest(
            f"tmax must be a positive number of milliseconds, at most {MAX_TMAX_MS}")
    return Decoded(request, lenient)


def encode_response(response: BidResponse) -> bytes:
    return RESPONSE_ENCODER.encode(response)
