"""Video: reading a catalog creative's VAST, whether a creative fits ``imp.video``, the bid's VAST.

A video creative carries an inline VAST document (``vast``) or the URL of one
(``vast_url``); for the latter the bid's ``adm`` is a VAST wrapper pointing at
it. Protocols are AdCOM 1.0 "Creative Subtypes - Audio/Video" codes; each VAST
version has an inline code and a wrapper code.
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import NamedTuple, Protocol
from xml.sax.saxutils import escape, quoteattr

INLINE_PROTOCOLS = {1: "1.0", 2: "2.0", 3: "3.0", 7: "4.0", 11: "4.1", 13: "4.2"}
# VAST 1.0 wrappers (code 4) had another structure (VASTAdTagURL): not built
WRAPPER_PROTOCOLS = {5: "2.0", 6: "3.0", 8: "4.0", 12: "4.1", 14: "4.2"}
NON_LINEAR = 2  # imp.video.linearity: overlay ads (catalog video creatives are linear)
AD_SYSTEM = "bidder"


class VastError(ValueError):
    """An inline VAST document that a player could not use."""


class Vast(NamedTuple):
    version: str
    media_types: frozenset[str]  # the type of every MediaFile, lower case


def inspect(document: str) -> Vast:
    """Check that ``document`` is VAST with an ``Ad`` holding ``InLine`` and linear
    ``MediaFile``s; raise ``VastError`` saying what is wrong."""
    try:
        root = ET.fromstring(document)
    except ET.ParseError as exc:
        raise VastError(f"not well-formed XML ({exc})") from None
    if root.tag != "VAST":
        raise VastError(f"the root element is <{root.tag}>, not <VAST>")
    version = root.get("version")
    if not version:
        raise VastError("<VAST> has no version attribute")
    ads = root.findall("Ad")
    if not ads:
        raise VastError("no <Ad> element")
    media: set[str] = set()
    for ad in ads:
        inline = ad.find("InLine")
        if inline is None:
            raise VastError("an <Ad> without <InLine>: give a wrapper's target as vast_url")
        for mediafile in inline.iter("MediaFile"):
            if not (mediafile.text or "").strip():
                raise VastError("a <MediaFile> without a URL")
            media.add((mediafile.get("type") or "").strip().lower())
    if not media:
        raise VastError("no <MediaFile>: an inline VAST needs a linear creative's media files")
    return Vast(version, frozenset(media))


class VideoCreative(Protocol):
    w: int
    h: int
    duration: int
    mimes: list[str]
    protocols: list[int]
    attr: list[int]
    vast: str | None
    vast_url: str | None


class VideoImp(Protocol):
    """``bidder.openrtb.Video``."""

    mimes: list[str] | None
    minduration: int | None
    maxduration: int | None
    rqddurs: list[int] | None
    protocols: list[int] | None
    protocol: int | None
    w: int | None
    h: int | None
    linearity: int | None
    battr: list[int] | None


def imp_protocols(video: VideoImp) -> frozenset[int]:
    """The protocols an imp accepts: 2.6 ``protocols``, else 2.5's single ``protocol``."""
    if video.protocols:
        return frozenset(video.protocols)
    return frozenset((video.protocol,)) if video.protocol else frozenset()


def fit_key(video: VideoImp) -> tuple:
    """What of ``video`` decides which creatives fit, hashable (eligibility is cached by it)."""
    return (tuple(video.mimes or ()), video.minduration, video.maxduration,
            tuple(video.rqddurs or ()), imp_protocols(video), video.w, video.h, video.linearity,
            tuple(video.battr or ()))


def fits(creative: VideoCreative, video: VideoImp) -> bool:
    """Whether ``creative`` may play in ``video``: a mime in common, the duration inside
    min/max (or one of ``rqddurs``), a protocol in common, the size when both w and h are
    given, linear, no blocked attribute. Absent constraints allow everything."""
    if video.mimes and not {m.lower() for m in creative.mimes} & {m.strip().lower()
                                                                 for m in video.mimes}:
        return False
    if video.rqddurs:
        if creative.duration not in video.rqddurs:
            return False
    else:
        if video.minduration and creative.duration < video.minduration:
            return False
        if video.maxduration and creative.duration > video.maxduration:
            return False
    accepted = imp_protocols(video)
    if accepted and not accepted & set(creative.protocols):
        return False
    if video.w and video.h and (creative.w, creative.h) != (video.w, video.h):
        return False
    if video.linearity == NON_LINEAR:  # catalog video creatives are linear (in-stream)
        return False
    return not (video.battr and set(video.battr) & set(creative.attr))


def wrapper(vast_url: str, version: str, ad_id: str) -> str:
    """A VAST wrapper of ``version`` whose ``VASTAdTagURI`` is ``vast_url``."""
    return (f'<VAST version="{version}"><Ad id={quoteattr(ad_id)}><Wrapper>'
            f"<AdSystem>{AD_SYSTEM}</AdSystem><VASTAdTagURI>{escape(vast_url)}</VASTAdTagURI>"
            "</Wrapper></Ad></VAST>")


def markup(creative: VideoCreative, video: VideoImp, ad_id: str) -> str:
    """``Bid.adm`` for a video bid: the inline VAST, or a wrapper around ``vast_url`` in the
    newest VAST version both the imp and the creative accept."""
    if creative.vast is not None:
        return creative.vast
    codes = [p for p in creative.protocols if p in WRAPPER_PROTOCOLS]
    accepted = imp_protocols(video)
    common = [p for p in codes if p in accepted] or codes
    version = max((WRAPPER_PROTOCOLS[p] for p in common), key=lambda v: tuple(map(int, v.split("."))))
    return wrapper(creative.vast_url, version, ad_id)
