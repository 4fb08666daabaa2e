"""Hand-written OpenRTB 2.6 requests in the shapes exchanges send, with every field we do not
read present too (ext, regs, source, content, data, video, native): they must be accepted and
answered by the rules, against the bundled catalog and model."""
from __future__ import annotations

import json

import pytest

from tests.conftest import launch_server

SITE_BANNER = {
    "id": "9b2e1f0c-site-banner", "at": 1, "cur": ["USD"], "tmax": 120,
    "imp": [{"id": "1", "tagid": "leaderboard-top", "bidfloor": 0.05, "bidfloorcur": "USD",
             "secure": 1, "banner": {"w": 300, "h": 250, "pos": 1, "battr": [13, 14],
                                     "expdir": [2, 4], "api": [3, 5], "topframe": 1},
             "ext": {"gpid": "/1234/home#top"}}],
    "site": {"id": "s-77", "domain": "news.example", "cat": ["IAB12"], "page":
             "https://news.example/world/today", "ref": "https://search.example/?q=x",
             "publisher": {"id": "p-9", "name": "News Co", "domain": "news.example"},
             "content": {"language": "en", "keywords": "world,politics"}},
    "device": {"ua": "Mozilla/5.0 (Windows NT 10.0; Win64; x64)", "ip": "203.0.113.7",
               "devicetype": 2, "os": "Windows", "language": "en", "js": 1, "dnt": 0,
               "geo": {"country": "USA", "region": "CA", "lat": 37.77, "lon": -122.41,
                       "type": 2, "utcoffset": -480}},
    "user": {"id": "exchange-user-1", "buyeruid": "user-00000042",
             "data": [{"id": "dp1", "segment": [{"id": "s1"}, {"id": "s2"}]}],
             "ext": {"consent": "CPXxRfAPXxRfAAfKABENB"}},
    "source": {"tid": "tx-1", "schain": {"complete": 1, "ver": "1.0", "nodes": []}},
    "regs": {"coppa": 0, "gdpr": 0, "us_privacy": "1---"},
    "bcat": ["IAB25", "IAB26"], "badv": ["competitor.example"],
    "ext": {"exchange": "example"},
}

APP_MULTI_IMP = {
    "id": "app-multi-imp-1", "at": 2, "tmax": 80,
    "imp": [
        {"id": "top", "instl": 0, "bidfloor": 0.1,
         "banner": {"format": [{"w": 320, "h": 50}, {"w": 300, "h": 250}]}},
        {"id": "interstitial", "instl": 1, "bidfloor": 0.2,
         "banner": {"format": [{"w": 300, "h": 600}, {"w": 160, "h": 600}]}},
        {"id": "rewarded", "bidfloor": 1.0, "rwdd": 1,
         "video": {"mimes": ["video/mp4"], "minduration": 5, "maxduration": 30,
                   "protocols": [2, 3, 5, 6], "w": 640, "h": 480}},
    ],
    "app": {"id": "a-1", "bundle": "com.example.puzzle", "storeurl":
            "https://play.example/store/apps/details?id=com.example.puzzle",
            "cat": ["IAB9-30"], "ver": "3.2.1", "publisher": {"id": "pub-2"}},
    "device": {"ifa": "6D92078A-8246-4BA4-AE5B-76104861E7DC", "devicetype": 4, "os": "iOS",
               "osv": "17.1", "make": "Apple", "model": "iPhone", "carrier": "Example Mobile",
               "connectiontype": 6, "lmt": 0, "geo": {"country": "JPN", "type": 2}},
    "user": {"id": "user-00000007"},
}

PMP_PRIVATE = {
    "id": "pmp-private-1",
    "imp": [{"id": "1", "bidfloor": 0.03, "banner": {"w": 300, "h": 250},
             "pmp": {"private_auction": 1, "deals": [
                 {"id": "deal-premium", "at": 1, "bidfloor": 2.5, "bidfloorcur": "USD"},
                 {"id": "other-agency-deal", "at": 2, "bidfloor": 2.0,
                  "wseat": ["Agency2"]}]}}],
    "site": {"id": "s-1", "domain": "travel.example"},
    "device": {"devicetype": 2, "geo": {"country": "USA"}},
}

VIDEO_ONLY = {
    "id": "video-only-1", "imp": [{"id": "1", "video": {"mimes": ["video/mp4"], "w": 640,
                                                        "h": 480}}],
    "site": {"domain": "movies.example"},
}

NATIVE_ONLY = {
    "id": "native-only-1", "imp": [{"id": "1", "native": {"request": json.dumps({
        "ver": "1.2", "assets": [{"id": 1, "required": 1, "title": {"len": 90}},
                                 {"id": 2, "required": 1, "img": {"type": 3, "wmin": 600,
                                                                  "hmin": 314}}]}),
                                                          "ver": "1.2"}}],
    "app": {"bundle": "com.example.maps"},
}


@pytest.fixture(scope="module")
def server(memcached, tmp_path_factory):
    srv = launch_server(tmp_path_factory.mktemp("examples"), "--workers", "1",
                        "--memcached-timeout-ms", "100", memcached=memcached.address)
    yield srv
    srv.stop()


def answer(server, request: dict) -> tuple[int, dict, dict | None]:
    status, headers, body = server.bid(request)
    assert status in (200, 204), body
    return status, headers, json.loads(body) if status == 200 else None


def test_site_banner_first_price(server):
    status, _, response = answer(server, SITE_BANNER)
    assert status == 200 and response["id"] == SITE_BANNER["id"]
    [bid] = response["seatbid"][0]["bid"]
    assert bid["impid"] == "1" and (bid["w"], bid["h"]) == (300, 250)
    assert bid["price"] >= 0.05
    assert not set(bid["cat"]) & {"IAB25", "IAB26"}
    assert "competitor.example" not in bid["adomain"]


def test_app_multi_imp(server):
    status, headers, response = answer(server, APP_MULTI_IMP)
    if status == 204:
        assert headers["x-nobid-reason"]
        return
    bids = [b for sb in response["seatbid"] for b in sb["bid"]]
    floors = {imp["id"]: imp["bidfloor"] for imp in APP_MULTI_IMP["imp"]}
    assert len({b["impid"] for b in bids}) == len(bids)
    assert all(b["mtype"] == (2 if b["impid"] == "rewarded" else 1) for b in bids)
    assert all(b["price"] >= floors[b["impid"]] for b in bids)


def test_private_deal_with_foreign_seats(server):
    status, headers, response = answer(server, PMP_PRIVATE)
    if status == 200:  # only through our own deal, at or above its floor
        [bid] = response["seatbid"][0]["bid"]
        assert bid["dealid"] == "deal-premium" and bid["price"] >= 2.5
    else:
        assert headers["x-nobid-reason"] in ("below_floor", "no_deal_in_private_auction",
                                             "no_campaign_targets_user", "no_creative_fits")


@pytest.mark.parametrize("request_, mtype", [(VIDEO_ONLY, 2), (NATIVE_ONLY, 4)])
def test_video_and_native_imps_bid_from_the_bundled_catalog(server, request_, mtype):
    status, headers, response = answer(server, request_)
    assert status == 200, headers.get("x-nobid-reason")
    [bid] = response["seatbid"][0]["bid"]
    assert bid["mtype"] == mtype and bid["adm"]


def test_formats_we_do_not_sell_are_a_clean_nobid(server):
    audio = {"id": "audio-only-1", "imp": [{"id": "1", "audio": {"mimes": ["audio/mp4"]}}],
             "site": {"domain": "music.example"}}
    status, headers, _ = answer(server, audio)
    assert status == 204 and headers["x-nobid-reason"] == "no_supported_format"
