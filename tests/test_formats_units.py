"""Video and native as pure functions: VAST reading and wrapping, video fitting, Native 1.2
request parsing (string, object, legacy and pre-1.1 forms), fitting and the response; lenient
decoding of the type deviations real exchanges send."""
from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

import msgspec
import pytest

from bidder import native, video
from bidder.openrtb import InvalidRequest, Video, decode, decode_request

# Native 1.2 specification, section 6.1 "Social Context, Clickout Response": the request, typed
# in from the spec (its curly quotes made straight, nothing else changed).
SPEC_6_1 = {
    "ver": "1.2", "context": 2, "contextsubtype": 20, "plcmttype": 11, "plcmtcnt": 1,
    "aurlsupport": 0, "privacy": 1,
    "eventrackers": [{"event": 1, "methods": [1, 2]}, {"event": 2, "methods": [1]}],
    "assets": [
        {"id": 123, "required": 1, "title": {"len": 140}},
        {"id": 128, "required": 0, "img": {"wmin": 836, "hmin": 627, "type": 3}},
        {"id": 124, "required": 1, "img": {"wmin": 50, "hmin": 50, "type": 1}},
        {"id": 126, "required": 1, "data": {"type": 1, "len": 25}},
        {"id": 127, "required": 1, "data": {"type": 2, "len": 140}},
    ],
}
# Section 6.2 "Content Context, Video Response": a native video asset (not required) too.
SPEC_6_2 = {
    "ver": "1.2", "context": 1, "contextsubtype": 10, "plcmttype": 11, "plcmtcnt": 1,
    "aurlsupport": 0, "privacy": 1,
    "eventrackers": [{"event": 1, "methods": [1, 2]}, {"event": 2, "methods": [1]}],
    "assets": [
        {"id": 4, "video": {"linearity": 1, "minduration": 15, "maxduration": 30,
                            "protocols": [2, 3], "mimes": ["video/mp4"]}},
        {"id": 123, "required": 1, "title": {"len": 140}},
        {"id": 128, "required": 0, "img": {"wmin": 836, "hmin": 627, "type": 3}},
        {"id": 124, "required": 1, "img": {"wmin": 50, "hmin": 50, "type": 1}},
        {"id": 126, "required": 1, "data": {"type": 1, "len": 25}},
        {"id": 127, "required": 1, "data": {"type": 2, "len": 140}},
    ],
}
# Section 6.3 "Third-Party Ad Serving Example".
SPEC_6_3 = {
    "ver": "1.2", "context": 2, "contextsubtype": 20, "plcmttype": 11, "plcmtcnt": 1,
    "aurlsupport": 1, "durlsupport": 1,
    "assets": [
        {"id": 123, "required": 1, "title": {"len": 140}},
        {"id": 128, "required": 0, "img": {"wmin": 836, "hmin": 627, "type": 3}},
        {"id": 124, "required": 1, "img": {"wmin": 50, "hmin": 50, "type": 1}},
        {"id": 126, "required": 1, "data": {"type": 1, "len": 25}},
        {"id": 127, "required": 1, "data": {"type": 2, "len": 140}},
    ],
}
SPEC_REQUESTS = {"6.1": SPEC_6_1, "6.2": SPEC_6_2, "6.3": SPEC_6_3}


@dataclass
class Image:
    url: str
    w: int
    h: int


@dataclass
class NativeAd:
    title: str | None = "Learn about this awesome thing"
    image: Image | None = field(default_factory=lambda: Image("https://cdn.example/main.png",
                                                              1200, 627))
    icon: Image | None = field(default_factory=lambda: Image("https://cdn.example/icon.png",
                                                             80, 80))
    sponsored: str | None = "My Brand"
    description: str | None = "Learn all about this awesome story of someone using my product."
    cta: str | None = None
    link: str | None = "https://brand.example/landing"


@dataclass
class VideoAd:
    w: int = 640
    h: int = 480
    duration: int = 15
    mimes: list = field(default_factory=lambda: ["video/mp4"])
    protocols: list = field(default_factory=lambda: [2, 3])
    attr: list = field(default_factory=list)
    vast: str | None = None
    vast_url: str | None = None


INLINE_VAST = ('<VAST version="3.0"><Ad id="a1"><InLine><AdSystem>x</AdSystem><AdTitle>t'
               '</AdTitle><Impression>https://t.example/i</Impression><Creatives><Creative>'
               '<Linear><Duration>00:00:15</Duration><MediaFiles><MediaFile delivery='
               '"progressive" type="video/mp4" width="640" height="480">https://cdn.example/a.mp4'
               '</MediaFile></MediaFiles></Linear></Creative></Creatives></InLine></Ad></VAST>')


def parse(request) -> native.NativeRequest:
    imp = {"id": "1", "native": request}
    return decode_request(json.dumps({"id": "r", "imp": [imp]}).encode()).imp[0].native.request


@pytest.mark.parametrize("name", sorted(SPEC_REQUESTS))
def test_native_spec_requests_parse_in_every_form_and_fit(name):
    spec = SPEC_REQUESTS[name]
    forms = [{"ver": "1.2", "request": json.dumps(spec)},  # OpenRTB 2.x: a JSON string
             {"request": spec},  # an object in request
             spec,  # the legacy form: imp.native is the request
             {"request": json.dumps({"native": spec})}]  # pre-1.1 wrapper
    for form in forms:
        request = parse(form)
        assert [a.id for a in request.assets] == [a["id"] for a in spec["assets"]]
        adm = native.markup(NativeAd(), request)
        response = json.loads(adm)
        assert response["link"]["url"] == "https://brand.example/landing"
        ids = {a["id"] for a in response["assets"]}
        required = {a["id"] for a in spec["assets"] if a.get("required") == 1}
        assert required <= ids
        assert 128 in ids  # the optional main image: the creative has one that is large enough
        by_id = {a["id"]: a for a in response["assets"]}
        assert by_id[124]["img"]["url"].endswith("icon.png")
        assert by_id[126]["data"]["value"] == "My Brand"


def test_native_required_asset_missing_or_too_long_does_not_fit():
    request = parse({"request": json.dumps(SPEC_6_1)})
    assert not native.fits(NativeAd(icon=None), request)  # required icon
    assert not native.fits(NativeAd(icon=Image("https://cdn.example/i.png", 40, 40)), request)
    assert not native.fits(NativeAd(sponsored="A sponsor name far longer than 25"), request)
    assert not native.fits(NativeAd(description=None), request)
    # the optional main image is left out when the creative has none, the rest still fits
    assets = native.fill(NativeAd(image=None), request)
    assert assets is not None and 128 not in {a["id"] for a in assets}


def test_native_exact_sizes_mimes_and_cta():
    request = parse({"request": json.dumps({"assets": [
        {"id": 1, "required": 1, "img": {"type": 3, "w": 1200, "h": 627,
                                         "mimes": ["image/jpg"]}},
        {"id": 2, "required": 1, "data": {"type": 12, "len": 15}}]})})
    ad = NativeAd(image=Image("https://cdn.example/m.jpg", 1200, 627), cta="Install now")
    assert json.loads(native.markup(ad, request))["assets"] == [
        {"id": 1, "img": {"url": "https://cdn.example/m.jpg", "w": 1200, "h": 627}},
        {"id": 2, "data": {"value": "Install now"}}]
    assert not native.fits(NativeAd(image=Image("https://cdn.example/m.png", 1200, 627),
                                    cta="Install now"), request)  # png, jpeg asked
    assert not native.fits(NativeAd(image=Image("https://cdn.example/m.jpg", 1201, 627),
                                    cta="Install now"), request)  # w without wmin is exact
    assert not native.fits(ad.__class__(image=ad.image, cta=None), request)


@pytest.mark.parametrize("bad, says", [
    ({"request": "{not json"}, "not a Native 1.2 request"),
    ({"request": json.dumps({"ver": "1.2"})}, "no assets"),
    ({"request": json.dumps({"assets": [{"id": 1}, {"id": 1}]})}, "not unique"),
    ({"request": json.dumps({"assets": [{"title": {"len": 9}}]})}, "id"),
    ({"request": 5}, "JSON string"),
    ({"ver": "1.2"}, "no request"),
])
def test_bad_native_requests_are_refused_naming_the_imp(bad, says):
    with pytest.raises(InvalidRequest) as exc:
        parse(bad)
    assert "Imp '1': native" in str(exc.value) and says in str(exc.value)


def test_native_request_numbers_as_strings_are_lenient():
    body = json.dumps({"id": "r", "imp": [{"id": "1", "native": {"request": json.dumps(
        {"assets": [{"id": "3", "required": "1", "title": {"len": "90"}}]})}}]}).encode()
    decoded = decode(body)
    assert decoded.lenient
    assert decoded.request.imp[0].native.request.assets[0].id == 3


def test_inspect_reads_inline_vast_and_refuses_what_a_player_cannot_use():
    assert video.inspect(INLINE_VAST) == video.Vast("3.0", frozenset({"video/mp4"}))
    for bad, says in [("<VAST", "well-formed"), ("<VMAP/>", "root"),
                      ('<VAST version="3.0"/>', "no <Ad>"),
                      ('<VAST version="3.0"><Ad><Wrapper/></Ad></VAST>', "without <InLine>"),
                      ('<VAST version="3.0"><Ad><InLine/></Ad></VAST>', "no <MediaFile>"),
                      ("<VAST><Ad><InLine/></Ad></VAST>", "version")]:
        with pytest.raises(video.VastError, match=says):
            video.inspect(bad)


def imp_video(**fields) -> Video:
    return msgspec.convert(fields, Video)


def test_video_fits_each_constraint():
    ad = VideoAd()
    assert video.fits(ad, imp_video(mimes=["video/mp4"], minduration=5, maxduration=30,
                                    protocols=[2, 3], w=640, h=480))
    assert video.fits(ad, imp_video())  # nothing asked, nothing refused
    assert not video.fits(ad, imp_video(mimes=["video/webm"]))
    assert not video.fits(ad, imp_video(minduration=16))
    assert not video.fits(ad, imp_video(maxduration=10))
    assert video.fits(ad, imp_video(rqddurs=[15, 30], maxduration=10))  # rqddurs decides
    assert not video.fits(ad, imp_video(rqddurs=[6, 30]))
    assert not video.fits(ad, imp_video(protocols=[7, 8]))
    assert video.fits(ad, imp_video(protocol=3))  # 2.5's single protocol
    assert not video.fits(ad, imp_video(protocol=5))
    assert not video.fits(ad, imp_video(w=1280, h=720))
    assert video.fits(ad, imp_video(w=1280))  # a size needs both w and h
    assert not video.fits(ad, imp_video(linearity=2))
    assert not video.fits(VideoAd(attr=[14]), imp_video(battr=[13, 14]))


def test_wrapper_takes_the_newest_version_both_accept_and_parses():
    ad = VideoAd(protocols=[5, 6, 8], vast_url="https://ads.example/vast?a=1&b=2")
    adm = video.markup(ad, imp_video(protocols=[2, 3, 5, 6]), "cr-1")
    root = ET.fromstring(adm)
    assert root.get("version") == "3.0"
    assert root.find("Ad").get("id") == "cr-1"
    assert root.find("Ad/Wrapper/VASTAdTagURI").text == "https://ads.example/vast?a=1&b=2"
    assert ET.fromstring(video.markup(ad, imp_video(), "x")).get("version") == "4.0"
    assert video.markup(VideoAd(vast=INLINE_VAST), imp_video(), "x") == INLINE_VAST


@pytest.mark.parametrize("body", [
    {"id": "r", "tmax": 120.0, "imp": [{"id": "1", "secure": "1",
                                        "banner": {"w": 300.0, "h": "250"}}]},
    {"id": "r", "imp": [{"id": "1", "bidfloor": "0.5", "banner": {"w": 300, "h": 250}}]},
])
def test_integral_floats_and_numeric_strings_decode_leniently(body):
    decoded = decode(json.dumps(body).encode())
    assert decoded.lenient
    imp = decoded.request.imp[0]
    assert (imp.banner.w, imp.banner.h) == (300, 250) or imp.bidfloor == 0.5


def test_strict_requests_are_not_counted_and_fractions_still_refused():
    assert not decode(b'{"id":"r","imp":[{"id":"1","banner":{"w":300,"h":250}}]}').lenient
    with pytest.raises(msgspec.ValidationError, match=r"\$.imp\[0\].banner.w"):
        decode_request(b'{"id":"r","imp":[{"id":"1","banner":{"w":300.5,"h":250}}]}')
    with pytest.raises(InvalidRequest, match="bidfloor"):
        decode_request(b'{"id":"r","imp":[{"id":"1","bidfloor":"nan","banner":{}}]}')


def load_catalog(tmp_path, creative: dict):
    from bidder import catalog
    from bidder.currency import Rates
    path = tmp_path / "catalog.json"
    path.write_text(json.dumps({"campaigns": [{"id": "camp", "adomain": ["a.example"],
                                               "cat": ["IAB1"], "value_per_click": 1.0,
                                               "creatives": [{"id": "cr", **creative}]}]}))
    return catalog.load(str(path), Rates.parse(""))


VIDEO = {"format": "video", "w": 640, "h": 480, "duration": 15, "mimes": ["video/mp4"],
         "protocols": [2, 3]}
NATIVE = {"format": "native", "title": "T", "sponsored": "S", "link": "https://a.example/",
          "image": {"url": "https://a.example/i.jpg", "w": 1200, "h": 627}}


@pytest.mark.parametrize("creative, field, says", [
    ({**VIDEO, "vast": "<VAST"}, "vast", "well-formed"),
    ({**VIDEO, "vast": INLINE_VAST, "vast_url": "https://a.example/v.xml"}, "vast", "either"),
    ({**VIDEO}, "vast", "either"),
    ({**VIDEO, "mimes": ["video/webm"], "vast": INLINE_VAST}, "mimes", "no MediaFile"),
    ({**VIDEO, "protocols": [5, 6], "vast": INLINE_VAST}, "protocols", "inline protocol"),
    ({**VIDEO, "protocols": [2, 3], "vast_url": "https://a.example/v.xml"}, "protocols",
     "wrapper"),
    ({**VIDEO, "duration": None, "vast": INLINE_VAST}, "duration", "needs duration"),
    ({**NATIVE, "title": None}, "title", "needs title"),
    ({**NATIVE, "vast_url": "https://a.example/v.xml"}, "vast_url", "video creatives"),
    ({"w": 300, "h": 250, "adm": "<a/>", "title": "T"}, "title", "native creatives"),
    ({"w": 300, "h": 250}, "adm", "needs adm"),
])
def test_catalog_refuses_creatives_a_format_cannot_use(tmp_path, creative, field, says):
    from bidder.catalog import CatalogError
    creative = {k: v for k, v in creative.items() if v is not None}
    with pytest.raises(CatalogError) as exc:
        load_catalog(tmp_path, creative)
    message = str(exc.value)
    assert "campaign 'camp', creative 'cr'" in message and f"field {field!r}" in message, message
    assert says in message, message


@pytest.mark.parametrize("creative, says", [
    ({**VIDEO, "format": "audio", "vast": INLINE_VAST}, "format must be"),
    ({**NATIVE, "link": "javascript:alert(1)"}, "http(s) URL"),
    ({**VIDEO, "mimes": ["mp4"], "vast": INLINE_VAST}, "MIME"),
])
def test_catalog_field_rules_name_the_path(tmp_path, creative, says):
    from bidder.catalog import CatalogError
    with pytest.raises(CatalogError, match=re.escape(says)):
        load_catalog(tmp_path, creative)


def test_catalog_compiles_each_format():
    from bidder import catalog
    from bidder.currency import Rates
    cat = catalog.load(None, Rates.parse("EUR=1.08,JPY=0.0067"))
    formats = {cr.format for _, cr in cat.candidates}
    assert formats == {"banner", "video", "native"} and cat.has_video and cat.has_native
    # a video's size is not a banner size: a 640x480 banner imp finds no video creative
    assert not cat.fits_any(((640, 480),))
    assert {cat.candidates[k][1].format for k in cat.arrays.video.tolist()} == {"video"}
