"""Video (VAST) and native (1.2) bids from a real server, checked by parsing them: the IAB
OpenRTB 2.6 video example and the Native 1.2 spec's request examples bid with a matching
catalog; one auction scores every format an imp offers; lenient decoding is counted."""
from __future__ import annotations

import copy
import json
import re
import xml.etree.ElementTree as ET

import pytest

from tests.conftest import launch_server
from tests.test_formats_units import SPEC_REQUESTS

INLINE_VAST = ('<VAST version="3.0"><Ad id="v1"><InLine><AdSystem>brand</AdSystem><AdTitle>Car'
               '</AdTitle><Impression>https://t.cars.example/i</Impression><Creatives><Creative>'
               '<Linear><Duration>00:00:15</Duration><MediaFiles><MediaFile delivery="progressive"'
               ' type="video/mp4" width="640" height="480">https://cdn.cars.example/15s.mp4'
               '</MediaFile></MediaFiles></Linear></Creative></Creatives></InLine></Ad></VAST>')


def catalog(banner_value: float = 0.5, video_value: float = 0.5,
            native_value: float = 0.5) -> dict:
    return {"campaigns": [
        {"id": "ban", "adomain": ["shoes.example"], "cat": ["IAB18"],
         "value_per_click": banner_value,
         "creatives": [{"id": "ban-300x250", "w": 300, "h": 250,
                        "adm": "<a href=\"https://shoes.example\">shoes</a>"}]},
        {"id": "vid", "adomain": ["cars.example"], "cat": ["IAB2"], "value_per_click": video_value,
         "creatives": [
             {"id": "vid-inline", "format": "video", "w": 640, "h": 480, "duration": 15,
              "mimes": ["video/mp4"], "protocols": [2, 3], "vast": INLINE_VAST},
             {"id": "vid-wrapped", "format": "video", "w": 1280, "h": 720, "duration": 30,
              "mimes": ["video/mp4", "video/webm"], "protocols": [5, 6, 8],
              "vast_url": "https://ads.cars.example/vast/30s.xml?c=1&d=2"}]},
        {"id": "nat", "adomain": ["travel.example"], "cat": ["IAB20"],
         "value_per_click": native_value,
         "creatives": [{"id": "nat-1", "format": "native",
                        "title": "Learn about this awesome thing",
                        "image": {"url": "https://cdn.travel.example/main.jpg", "w": 1200,
                                  "h": 627},
                        "icon": {"url": "https://cdn.travel.example/icon.png", "w": 80, "h": 80},
                        "sponsored": "Travel Co",
                        "description": "Learn all about this awesome story of someone using "
                                       "my product.",
                        "cta": "Book now", "link": "https://travel.example/offer"}]},
    ]}


# IAB OpenRTB 2.6 section 6.2.4, "Example 4 - Video", typed in from the specification.
IAB_VIDEO_EXAMPLE = {
    "id": "1234567893", "at": 2, "tmax": 120,
    "imp": [{"id": "1", "bidfloor": 0.03, "video": {
        "w": 640, "h": 480, "pos": 1, "startdelay": 0, "minduration": 5, "maxduration": 30,
        "maxextended": 30, "minbitrate": 300, "maxbitrate": 1500, "apis": [1, 2],
        "protocols": [2, 3], "mimes": ["video/x-flv", "video/mp4", "application/javascript"],
        "linearity": 1, "boxingallowed": 1, "playbackmethod": [1, 3], "delivery": [2],
        "battr": [13, 14],
        "companionad": [{"id": "1234567893-1", "w": 300, "h": 250, "pos": 1, "battr": [13, 14],
                         "expdir": [2, 4]},
                        {"id": "1234567893-2", "w": 728, "h": 90, "pos": 1,
                         "battr": [13, 14]}],
        "companiontype": [1, 2]}}],
    "site": {"id": "1345135123", "name": "Site ABCD", "domain": "siteabcd.com",
             "cat": ["IAB2-1", "IAB2-2"], "page": "http://siteabcd.com/page.htm",
             "ref": "http://referringsite.com/referringpage.htm", "privacypolicy": 1,
             "publisher": {"id": "pub12345", "name": "Publisher A"},
             "content": {"id": "1234567", "series": "All About Cars", "season": "2",
                         "episode": 23, "title": "Car Show", "cat": ["IAB2-2"],
                         "keywords": "keyword-a,keyword-b,keyword-c"}},
    "device": {"ua": "Mozilla/5.0 (Macintosh; U; Intel Mac OS X 10.6; en-US; rv:1.9.2.16) "
                     "Gecko/20110319 Firefox/3.6.16", "os": "OS X", "js": 1},
    "user": {"id": "456789876567897654678987656789",
             "buyeruid": "545678765467876567898765678987654",
             "data": [{"id": "6", "name": "Data Provider 1",
                       "segment": [{"id": "12341318394918", "name": "auto intenders"},
                                   {"id": "1234131839491234", "name": "auto enthusiasts"}]}]},
}


# these tests check what is bid: a loaded machine must not turn it into a deadline no-bid
PATIENT = ("--workers", "1", "--default-tmax-ms", "2000")


def write_catalog(path, data: dict) -> str:
    path.write_text(json.dumps(data))
    return str(path)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("formats")
    server = launch_server(workdir, *PATIENT,
                           "--campaigns", write_catalog(workdir / "catalog.json", catalog()))
    server.bid({"id": "warm-up", "imp": [{"id": "1", "banner": {"w": 300, "h": 250}}]})
    yield server
    server.stop()


def only_bid(status: int, headers: dict, data: bytes) -> dict:
    assert status == 200, (status, headers.get("x-nobid-reason"), data)
    seatbids = json.loads(data)["seatbid"]
    assert len(seatbids) == 1 and len(seatbids[0]["bid"]) == 1
    return seatbids[0]["bid"][0]


def check_vast(adm: str, mimes: list[str]) -> ET.Element:
    """The bid's VAST as a player would read it: an Ad with InLine (and a MediaFile of an
    allowed mime) or Wrapper (with the URL of the VAST to fetch)."""
    root = ET.fromstring(adm)
    assert root.tag == "VAST" and root.get("version")
    ad = root.find("Ad")
    assert ad is not None
    inline, wrapper = ad.find("InLine"), ad.find("Wrapper")
    assert (inline is None) != (wrapper is None)
    if inline is not None:
        media = inline.findall(".//MediaFile")
        assert any(m.get("type") in mimes and m.text.strip().startswith("https://")
                   for m in media)
    else:
        assert wrapper.find("VASTAdTagURI").text.startswith("https://")
    return root


def test_the_iab_video_example_bids_with_inline_vast(server):
    bid = only_bid(*server.bid(IAB_VIDEO_EXAMPLE))
    assert bid["mtype"] == 2 and bid["crid"] == "vid-inline" and bid["impid"] == "1"
    assert (bid["w"], bid["h"]) == (640, 480) and bid["price"] >= 0.03
    root = check_vast(bid["adm"], IAB_VIDEO_EXAMPLE["imp"][0]["video"]["mimes"])
    assert root.find("Ad/InLine") is not None
    assert "/notice/win" in bid["nurl"] and "/notice/billing" in bid["burl"]


def test_a_vast_url_creative_bids_a_wrapper_in_a_version_the_imp_accepts(server):
    request = copy.deepcopy(IAB_VIDEO_EXAMPLE)
    video = request["imp"][0]["video"]
    video.update(w=1280, h=720, protocols=[3, 6], mimes=["video/webm"])
    bid = only_bid(*server.bid(request))
    assert bid["mtype"] == 2 and bid["crid"] == "vid-wrapped"
    root = check_vast(bid["adm"], video["mimes"])
    assert root.get("version") == "3.0"
    assert root.find("Ad/Wrapper/VASTAdTagURI").text == \
        "https://ads.cars.example/vast/30s.xml?c=1&d=2"
    # the 2.5 single protocol: VAST 2.0 wrapper
    del video["protocols"]
    video["protocol"] = 5
    assert ET.fromstring(only_bid(*server.bid(request))["adm"]).get("version") == "2.0"


@pytest.mark.parametrize("name", sorted(SPEC_REQUESTS))
def test_native_spec_examples_bid_with_every_required_asset(server, name):
    native_request = SPEC_REQUESTS[name]
    request = {"id": f"native-{name}", "imp": [{"id": "n1", "native": {
        "ver": "1.2", "request": json.dumps(native_request)}}],
        "app": {"bundle": "com.example.news"}, "device": {"devicetype": 4, "os": "iOS"}}
    bid = only_bid(*server.bid(request))
    assert bid["mtype"] == 4 and bid["crid"] == "nat-1" and "w" not in bid
    response = json.loads(bid["adm"])  # a JSON string holding the Native 1.2 response
    assert response["link"]["url"] == "https://travel.example/offer"
    ids = {a["id"] for a in response["assets"]}
    assert {a["id"] for a in native_request["assets"] if a.get("required") == 1} <= ids
    assert ids <= {a["id"] for a in native_request["assets"]}
    for asset in response["assets"]:
        assert len([k for k in ("title", "img", "data") if k in asset]) == 1


def test_native_in_the_legacy_object_form_bids(server):
    request = {"id": "native-legacy", "imp": [{"id": "1", "native": SPEC_REQUESTS["6.1"]}]}
    bid = only_bid(*server.bid(request))
    assert {a["id"] for a in json.loads(bid["adm"])["assets"]} >= {123, 124, 126, 127}


def test_one_auction_scores_every_format_an_imp_offers(tmp_path):
    request = {"id": "multi", "imp": [{"id": "1", "banner": {"w": 300, "h": 250},
                                       "video": {"mimes": ["video/mp4"], "w": 640, "h": 480,
                                                 "protocols": [2, 3]}}]}
    winners = {}
    for favoured, values in [("video", dict(banner_value=0.01, video_value=50.0)),
                             ("banner", dict(banner_value=50.0, video_value=0.01))]:
        server = launch_server(tmp_path / favoured, *PATIENT, "--campaigns",
                               write_catalog(tmp_path / f"{favoured}.json", catalog(**values)))
        try:
            winners[favoured] = only_bid(*server.bid(request))
        finally:
            server.stop()
    assert (winners["video"]["mtype"], winners["video"]["crid"]) == (2, "vid-inline")
    assert (winners["banner"]["mtype"], winners["banner"]["crid"]) == (1, "ban-300x250")


@pytest.mark.parametrize("imp, reason", [
    ({"video": {"mimes": ["video/ogg"]}}, "no_video_creative_fits"),
    ({"video": {"mimes": ["video/mp4"], "maxduration": 10}}, "no_video_creative_fits"),
    ({"video": {"mimes": ["video/mp4"], "linearity": 2}}, "no_video_creative_fits"),
    ({"native": {"request": json.dumps({"assets": [
        {"id": 1, "required": 1, "data": {"type": 3}}]})}}, "no_native_creative_fits"),
    ({"native": {"request": json.dumps({"assets": [
        {"id": 1, "required": 1, "title": {"len": 10}}]})}}, "no_native_creative_fits"),
    ({"audio": {"mimes": ["audio/mp4"]}}, "no_supported_format"),
    ({"banner": {"w": 1, "h": 1}, "video": {"mimes": ["video/ogg"]}}, "no_creative_fits"),
])
def test_no_bid_reasons_name_the_format(server, imp, reason):
    status, headers, _ = server.bid({"id": "nb", "imp": [{"id": "1", **imp}]})
    assert status == 204 and headers["x-nobid-reason"] == reason


def test_secure_imps_take_only_https_media(tmp_path):
    data = catalog()
    data["campaigns"][1]["creatives"][0]["vast"] = INLINE_VAST.replace(
        "https://cdn.cars.example", "http://cdn.cars.example")
    server = launch_server(tmp_path / "s", *PATIENT,
                           "--campaigns", write_catalog(tmp_path / "c.json", data))
    try:
        request = copy.deepcopy(IAB_VIDEO_EXAMPLE)
        del request["tmax"]  # the server's patient default: a fresh server's first answer
        assert only_bid(*server.bid(request))["crid"] == "vid-inline"
        request["imp"][0]["secure"] = 1
        status, headers, _ = server.bid(request)
        assert status == 204 and headers["x-nobid-reason"] == "no_video_creative_fits"
    finally:
        server.stop()


def lenient_count(server) -> float:
    match = re.search(r"^bidder_lenient_requests_total (\S+)$", server.metrics(), re.M)
    return float(match.group(1)) if match else 0.0


def test_type_deviations_real_exchanges_send_are_read_and_counted(server):
    before = lenient_count(server)
    deviant = {"id": "lenient", "tmax": 120.0, "imp": [
        {"id": "1", "secure": "1", "bidfloor": "0.01", "banner": {"w": 300.0, "h": "250"}}]}
    bid = only_bid(*server.bid(deviant))
    assert (bid["w"], bid["h"]) == (300, 250)
    strict = {"id": "strict", "imp": [{"id": "1", "banner": {"w": 300, "h": 250}}]}
    only_bid(*server.bid(strict))
    assert lenient_count(server) == before + 1
    status, _, data = server.bid({"id": "x", "imp": [{"id": "1", "banner": {"w": 300.5,
                                                                             "h": 250}}]})
    assert status == 400 and b"banner.w" in data
    assert lenient_count(server) == before + 1
