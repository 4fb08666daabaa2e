"""OpenRTB Native 1.2: the request an imp carries, whether a creative can fill it, the response.

The request (Native 1.2 section 4) arrives in ``imp.native.request`` as a JSON
string, or, as some exchanges send it, as an object there or in ``imp.native``
itself; the pre-1.1 form wraps it in ``{"native": {...}}``. Only the assets a
catalog creative can fill are read: a title, an image of type 1 (icon) or 3
(main), data of type 1 (sponsored), 2 (description) or 12 (call to action).
A creative fits when it fills every asset marked ``required``; the optional
ones it can fill go in the response too. The response (section 5) is a JSON
string for ``Bid.adm``: the assets with the request's ids, and ``link.url``.
"""
from __future__ import annotations

import mimetypes
from typing import Any, Protocol

import msgspec
from msgspec import Struct

VERSION = "1.2"
IMAGE_ICON, IMAGE_LOGO, IMAGE_MAIN = 1, 2, 3  # Image Asset Types (2 merged into 1 in 1.2)
DATA_SPONSORED, DATA_DESCRIPTION, DATA_CTA = 1, 2, 12  # Data Asset Types


class TitleRequest(Struct, omit_defaults=True, gc=False):
    len: int | None = None  # maximum length of the title


class ImageRequest(Struct, omit_defaults=True, gc=False):
    type: int | None = None
    w: int | None = None  # exact width, unless wmin is given
    h: int | None = None
    wmin: int | None = None
    hmin: int | None = None
    mimes: list[str] | None = None  # empty or absent: any image type


class DataRequest(Struct, omit_defaults=True, gc=False):
    type: int | None = None
    len: int | None = None


class AssetRequest(Struct, omit_defaults=True, gc=False):
    id: int
    required: int | None = 0
    title: TitleRequest | None = None
    img: ImageRequest | None = None
    data: DataRequest | None = None
    video: Any = None  # a native video asset: never filled (no catalog creative has one)


class NativeRequest(Struct, omit_defaults=True, gc=False):
    ver: str | None = None
    assets: list[AssetRequest] | None = None


class _Wrapped(Struct, gc=False):
    """The pre-1.1 request: ``{"native": {...}}``."""

    native: NativeRequest | None = None


class NativeError(ValueError):
    """The imp's native request is missing, is not JSON, or has the wrong shape."""


class Image(Protocol):
    url: str
    w: int
    h: int


class NativeCreative(Protocol):
    """What a native catalog creative offers (``bidder.catalog.Creative`` with format native)."""

    title: str | None
    image: Image | None
    icon: Image | None
    sponsored: str | None
    description: str | None
    cta: str | None
    link: str | None


def _decode(raw: Any, type_: type, strict: bool):
    if isinstance(raw, str):
        return msgspec.json.decode(raw, type=type_, strict=strict)
    return msgspec.convert(raw, type_, strict=strict)


def parse_request(native: Any) -> tuple[NativeRequest, bool]:
    """The Native request of ``imp.native`` (``bidder.openrtb.Native``) and whether it needed
    lax decoding (numbers as strings or integral floats); raise ``NativeError``."""
    raw = native.request
    if raw is None:  # the legacy form: the request's fields are imp.native's own
        if native.assets is None:
            raise NativeError("no request: send the Native 1.2 request as a JSON string in "
                              "imp.native.request")
        request, lax = NativeRequest(ver=native.ver, assets=native.assets), False
    elif isinstance(raw, (str, dict)):
        try:
            try:
                request, lax = _decode(raw, NativeRequest, True), False
                if request.assets is None:
                    request = _decode(raw, _Wrapped, True).native or request
            except msgspec.ValidationError:
                request, lax = _decode(raw, NativeRequest, False), True
                if request.assets is None:
                    request = _decode(raw, _Wrapped, False).native or request
        except msgspec.DecodeError as exc:  # ValidationError is a DecodeError
            raise NativeError(f"request is not a Native 1.2 request: {exc}") from None
        except RecursionError:
            raise NativeError("request is nested too deeply") from None
    else:
        raise NativeError(f"request must be a JSON string (or an object) holding the Native 1.2 "
                          f"request, not {type(raw).__name__}")
    if not request.assets:
        raise NativeError("request has no assets: a Native 1.2 request lists at least one")
    ids = [a.id for a in request.assets]
    if len(set(ids)) < len(ids):
        raise NativeError(f"asset ids {ids} are not unique: the response could not be aligned")
    return request, lax


def request_key(request: NativeRequest) -> tuple:
    """What of ``request`` decides which creatives fit, hashable (eligibility is cached by it)."""
    return tuple((a.required == 1,
                  (a.title.len,) if a.title else None,
                  (a.img.type, a.img.w, a.img.h, a.img.wmin, a.img.hmin,
                   tuple(a.img.mimes or ())) if a.img else None,
                  (a.data.type, a.data.len) if a.data else None,
                  a.video is not None)
                 for a in request.assets)


def _text(value: str | None, limit: int | None) -> str | None:
    return value if value and (limit is None or limit <= 0 or len(value) <= limit) else None


def _image(creative: NativeCreative, want: ImageRequest) -> Image | None:
    image = creative.icon if want.type in (IMAGE_ICON, IMAGE_LOGO) else (
        creative.image if want.type in (IMAGE_MAIN, None) else None)
    if image is None:
        return None
    # w/h alone are exact; wmin/hmin are minimums (Native 1.2 4.4)
    if want.wmin:
        if image.w < want.wmin:
            return None
    elif want.w and image.w != want.w:
        return None
    if want.hmin:
        if image.h < want.hmin:
            return None
    elif want.h and image.h != want.h:
        return None
    if want.mimes:
        allowed = {_canonical_mime(m) for m in want.mimes}
        if _canonical_mime(mimetypes.guess_type(image.url.split("?", 1)[0])[0] or "") not in allowed:
            return None
    return image


def _canonical_mime(mime: str) -> str:
    mime = mime.strip().lower()
    return "image/jpeg" if mime in ("image/jpg", "image/pjpeg") else mime


def _asset(creative: NativeCreative, asset: AssetRequest) -> dict | None:
    """The response asset filling ``asset`` from ``creative``, or None if it cannot."""
    if asset.title is not None:
        text = _text(creative.title, asset.title.len)
        return None if text is None else {"id": asset.id, "title": {"text": text}}
    if asset.img is not None:
        image = _image(creative, asset.img)
        return None if image is None else {
            "id": asset.id, "img": {"url": image.url, "w": image.w, "h": image.h}}
    if asset.data is not None:
        source = {DATA_SPONSORED: creative.sponsored, DATA_DESCRIPTION: creative.description,
                  DATA_CTA: creative.cta}.get(asset.data.type)
        text = _text(source, asset.data.len)
        return None if text is None else {"id": asset.id, "data": {"value": text}}
    return None  # a video asset, or an asset of no known kind


def fill(creative: NativeCreative, request: NativeRequest) -> list[dict] | None:
    """The response assets of ``creative`` for ``request``: every required asset and the
    optional ones it has; None when a required asset cannot be filled."""
    out = []
    for asset in request.assets or ():
        filled = _asset(creative, asset)
        if filled is not None:
            out.append(filled)
        elif asset.required == 1:
            return None
    return out or None


def fits(creative: NativeCreative, request: NativeRequest) -> bool:
    return fill(creative, request) is not None


_ENCODE = msgspec.json.Encoder().encode


def markup(creative: NativeCreative, request: NativeRequest) -> str:
    """``Bid.adm`` for a native bid: the Native 1.2 response as a JSON string."""
    assets = fill(creative, request)
    if assets is None:
        raise ValueError("the creative does not fit this native request")
    return _ENCODE({"ver": VERSION, "assets": assets, "link": {"url": creative.link}}).decode()
