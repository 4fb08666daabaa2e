"""The HTTP contract of POST /openrtb2/bid against a real ``bidder serve`` and a real memcached."""
from __future__ import annotations

import copy
import gzip
import http.client
import json
import os
import time

import pytest

from models import world
from tests.conftest import launch_server

CATALOG = os.path.join(os.path.dirname(__file__), "data", "campaigns.json")


@pytest.fixture(scope="module")
def server(memcached, tmp_path_factory):
    srv = launch_server(tmp_path_factory.mktemp("bid-http"), "--workers", "2",
                        "--campaigns", CATALOG, "--currency-rates", "EUR=1.10,JPY=0.0070",
                        "--memcached-timeout-ms", "100",
                        memcached=memcached.address)
    yield srv
    srv.stop()


def site_request(country="JPN", w=300, h=250, floor=0.01, **extra) -> dict:
    req = {
        "id": "req-1",
        "imp": [{"id": "1", "banner": {"format": [{"w": w, "h": h}]}, "bidfloor": floor,
                 "bidfloorcur": "USD"}],
        "site": {"id": "s1", "domain": "news.example", "page": "https://news.example/a"},
        "device": {"devicetype": 2, "os": "Windows", "geo": {"country": country}},
        "user": {"id": world.user_id(7)},
        "tmax": 200,
    }
    req.update(extra)
    return req


def bids_of(body: bytes) -> list[dict]:
    answer = json.loads(body)
    return [b for sb in answer["seatbid"] for b in sb["bid"]]


def test_banner_site_request_gets_a_priced_bid(server):
    req = site_request(floor=0.5)
    status, headers, body = server.bid(req)
    assert status == 200, body
    assert headers["x-openrtb-version"] == "2.6"
    answer = json.loads(body)
    assert answer["id"] == "req-1" and answer["cur"] == "USD"
    [bid] = bids_of(body)
    assert bid["impid"] == "1" and bid["cid"] == "jp-shoes" and bid["crid"] == "jp-shoes-300x250"
    assert bid["price"] >= 0.5
    assert (bid["w"], bid["h"]) == (300, 250)
    assert bid["adomain"] == ["shoes.example"] and bid["cat"] == ["IAB18-1"] and bid["adm"]
    assert "${AUCTION_PRICE}" in bid["nurl"] and "${AUCTION_PRICE}" in bid["burl"]
    assert "/notice/win?" in bid["nurl"] and "/notice/billing?" in bid["burl"]


def test_multi_imp_at_most_one_bid_per_imp(server):
    req = site_request(country="USA")
    req["imp"] = [
        {"id": "a", "banner": {"format": [{"w": 728, "h": 90}, {"w": 320, "h": 50}]}},
        {"id": "b", "banner": {"w": 320, "h": 50}},
        {"id": "c", "banner": {"w": 160, "h": 600}},     # no creative of that size
        {"id": "d", "video": {"mimes": ["video/mp4"]}},  # not a banner
    ]
    status, _, body = server.bid(req)
    assert status == 200, body
    bids = bids_of(body)
    assert sorted(b["impid"] for b in bids) == ["a", "b"]
    assert json.loads(body)["seatbid"][0]["seat"] == "seat-b"
    sizes = {b["impid"]: (b["w"], b["h"]) for b in bids}
    assert sizes["a"] in [(728, 90), (320, 50)] and sizes["b"] == (320, 50)


def test_app_request_and_bapp_block(server):
    req = site_request(country="GBR", w=320, h=50)
    del req["site"]
    req["app"] = {"id": "a1", "bundle": "com.example.puzzle"}
    status, _, body = server.bid(req)
    assert status == 200 and bids_of(body)[0]["cid"] == "game-app"
    assert bids_of(body)[0]["bundle"] == "com.example.game"
    status, headers, _ = server.bid({**req, "bapp": ["com.example.game"]})
    assert status == 204 and headers["x-nobid-reason"] == "blocked_by_request"


def test_floor_too_high_is_a_nobid_with_reason(server):
    status, headers, body = server.bid(site_request(floor=100000.0))
    assert status == 204 and body == b""
    assert headers["x-nobid-reason"] == "below_floor"
    assert "content-encoding" not in headers


def test_deal_floor_wins_over_imp_floor(server):
    req = site_request(country="DEU", floor=100000.0)
    req["imp"][0]["pmp"] = {"private_auction": 1,
                            "deals": [{"id": "d1", "bidfloor": 0.2, "bidfloorcur": "USD"}]}
    status, _, body = server.bid(req)
    assert status == 200, body
    [bid] = bids_of(body)
    assert bid["dealid"] == "d1" and bid["cid"] == "deal-only" and 0.2 <= bid["price"] < 100000
    req["imp"][0]["pmp"]["deals"] = [{"id": "someone-else", "bidfloor": 0.1}]
    status, headers, _ = server.bid(req)
    assert status == 204 and headers["x-nobid-reason"] == "no_deal_in_private_auction"
    # a deal restricted to other seats is not ours either
    req["imp"][0]["pmp"]["deals"] = [{"id": "d1", "bidfloor": 0.1, "wseat": ["agency-9"]}]
    assert server.bid(req)[0] == 204
    # open auction: the deal-only campaign still may bid on the deal at the deal floor
    req["imp"][0]["pmp"] = {"private_auction": 0, "deals": [{"id": "d1", "bidfloor": 0.3}]}
    status, _, body = server.bid(req)
    assert status == 200 and bids_of(body)[0]["dealid"] == "d1"


def test_blocks_bcat_badv_and_domain(server):
    base = site_request()
    assert server.bid(base)[0] == 200
    for blocked in ({"bcat": ["IAB18"]}, {"bcat": ["IAB18-1"]}, {"badv": ["shoes.example"]}):
        status, headers, _ = server.bid({**base, **blocked})
        assert status == 204 and headers["x-nobid-reason"] == "blocked_by_request", blocked
    assert server.bid({**base, "bcat": ["IAB18-2"]})[0] == 200  # a sibling subcategory
    bad_site = copy.deepcopy(base)
    bad_site["site"]["domain"] = "bad.example"
    status, headers, _ = server.bid(bad_site)
    assert status == 204 and headers["x-nobid-reason"] == "no_campaign_targets_inventory"


def test_seats(server):
    usa = site_request(country="USA", w=728, h=90)
    assert server.bid({**usa, "wseat": ["seat-b"]})[0] == 200
    status, headers, _ = server.bid({**usa, "wseat": ["other"]})
    assert status == 204 and headers["x-nobid-reason"] == "seat_not_allowed"
    assert server.bid({**usa, "bseat": ["seat-b"]})[0] == 204


def test_targeting_country_devicetype_size(server):
    status, headers, _ = server.bid(site_request(country="BRA"))
    assert status == 204 and headers["x-nobid-reason"] == "no_campaign_targets_user"
    req = site_request()
    req["device"]["devicetype"] = 3  # CTV: jp-shoes targets 1, 2, 4
    assert server.bid(req)[0] == 204
    status, headers, _ = server.bid(site_request(w=728, h=90))
    assert status == 204 and headers["x-nobid-reason"] == "no_creative_fits"
    # country from user.geo when device.geo is absent or names no country
    for device_geo in (None, {"region": "13"}):
        req = site_request()
        if device_geo is None:
            del req["device"]["geo"]
        else:
            req["device"]["geo"] = device_geo
        req["user"]["geo"] = {"country": "JPN"}
        assert server.bid(req)[0] == 200


@pytest.mark.parametrize("eur", ["EUR", "eur"])  # ISO-4217 codes in any case
def test_currencies(server, eur):
    req = site_request(cur=[eur])
    req["imp"][0].update(bidfloor=0.5, bidfloorcur=eur)
    status, _, body = server.bid(req)
    assert status == 200 and json.loads(body)["cur"] == "EUR"
    assert bids_of(body)[0]["price"] >= 0.5
    req = site_request()
    req["imp"][0].update(bidfloor=100.0, bidfloorcur="JPY")  # 0.70 USD
    status, _, body = server.bid(req)
    assert status == 200 and bids_of(body)[0]["price"] >= 0.70 - 1e-9
    status, headers, _ = server.bid(site_request(cur=["XXX"]))
    assert status == 204 and headers["x-nobid-reason"] == "currency_not_supported"
    req = site_request()
    req["imp"][0]["bidfloorcur"] = "ZZZ"
    status, headers, _ = server.bid(req)
    assert status == 204 and headers["x-nobid-reason"] == "floor_currency_unknown"


def test_gzip_request_and_response(server):
    body = gzip.compress(json.dumps(site_request()).encode())
    status, headers, data = server.bid(body, {"Content-Encoding": "gzip",
                                              "Accept-Encoding": "gzip, deflate"})
    assert status == 200 and headers["content-encoding"] == "gzip"
    assert json.loads(gzip.decompress(data))["id"] == "req-1"
    status, headers, data = server.bid(site_request(floor=1e6), {"Accept-Encoding": "gzip"})
    assert status == 204 and data == b"" and "content-encoding" not in headers


@pytest.mark.parametrize("body, fragment", [
    (b"{not json", "invalid OpenRTB"),
    (b'{"imp": [{"id": "1"}]}', "id"),
    (b'{"id": "x"}', "imp"),
    (b'{"id": "x", "imp": []}', "at least one Imp"),
    (b'{"id": "x", "imp": [{"id": "1", "bidfloor": "cheap"}]}', "bidfloor"),
    (b'{"id": "x", "imp": [{"id": "1", "banner": {"w": 300.5, "h": 250}}]}', "banner.w"),
    (b'{"id": 5, "imp": [{"id": "1"}]}', "id"),
    (b'{"id": "x", "imp": [{"id": "1"}, {"id": "1"}]}', "duplicate Imp.id"),
    (b'[1, 2]', "invalid OpenRTB"),
    (b'', "empty body"),
])
def test_bad_requests_get_400_with_json_error(server, body, fragment):
    status, headers, data = server.bid(body)
    assert status == 400, data
    error = json.loads(data)["error"]
    assert fragment in error


def test_body_cap_and_media_type(server):
    big = site_request()
    big["site"]["page"] = "x" * (70 * 1024)
    status, _, data = server.bid(big)
    assert status == 413 and "limit" in json.loads(data)["error"]
    bomb = gzip.compress(b"{" + b" " * (2 * 1024 * 1024) + b"}")
    status, _, _ = server.bid(bomb, {"Content-Encoding": "gzip"})
    assert status == 413
    status, _, data = server.request("POST", "/openrtb2/bid", b"{}", {"Content-Type": "text/html"})
    assert status == 415 and "application/json" in json.loads(data)["error"]
    status, _, _ = server.bid(b"{}", {"Content-Encoding": "br"})
    assert status == 415
    status, _, _ = server.bid(gzip.compress(b"x")[:5], {"Content-Encoding": "gzip"})
    assert status == 400


def test_deadline_is_answered_204_not_late(server):
    req = site_request(tmax=5)
    req["imp"] = [{"id": str(i), "banner": {"w": 300, "h": 250}} for i in range(300)]
    started = time.monotonic()
    status, headers, _ = server.bid(req)
    assert status == 204 and headers["x-nobid-reason"] == "deadline"
    assert time.monotonic() - started < 1.0


def test_unknown_and_seeded_users_both_bid(server):
    seen = site_request()
    unseen = site_request(user={"id": "never-seeded"})
    no_user = site_request()
    del no_user["user"]
    for req in (seen, unseen, no_user):
        assert server.bid(req)[0] == 200
    text = server.metrics()
    assert 'bidder_feature_store_lookups_total{outcome="hit"}' in text
    assert 'bidder_feature_store_lookups_total{outcome="miss"}' in text


def test_keep_alive_serves_many_requests_on_one_connection(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    body = json.dumps(site_request()).encode()
    for _ in range(20):
        conn.request("POST", "/openrtb2/bid", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        assert response.status == 200
        assert (response.getheader("Connection") or "").lower() != "close"
    conn.close()


def test_health_ready_metrics_and_routing(server):
    assert server.request("GET", "/healthz")[0] == 200
    status, _, body = server.admin("GET", "/readyz")
    ready = json.loads(body)
    assert status == 200 and ready["ready"] is True
    assert set(ready["components"]) == {"catalog", "model", "memcached", "budgets"}
    assert ready["components"]["budgets"]["ok"] is True
    assert ready["components"]["catalog"]["campaigns"] == 7
    assert ready["components"]["memcached"]["ok"] is True
    status, _, body = server.admin("GET", "/metrics")
    assert status == 200 and b"bidder_bid_requests_total" in body
    assert server.request("GET", "/nope")[0] == 404
    assert server.request("GET", "/openrtb2/bid")[0] == 405


def test_metrics_and_readiness_answer_on_the_admin_listener_only(server):
    """The bid port exchanges call shows no spend, campaign ids, pids or file paths."""
    for path in ("/metrics", "/readyz"):
        status, _, body = server.request("GET", path)
        assert status == 404, (path, body)
        assert server.admin("GET", path)[0] == 200
    assert server.request("GET", "/healthz")[0] == 200
    assert server.admin("POST", "/openrtb2/bid", body=b"{}")[0] == 404  # no bids there
    assert server.admin("GET", "/notice/win")[0] == 404


def test_json_media_bodies_are_msgspec_and_a_bad_one_is_a_400(tmp_path):
    """The app's JSON media handler (Falcon's msgspec recipe): compact UTF-8 out; an empty,
    truncated or non-UTF-8 body in is a 400 naming the problem, never an uncaught error."""
    import io

    import falcon

    from bidder.app import create_app
    from bidder.settings import resolve
    app = create_app(resolve(environ={}, memcached="none", ledger=str(tmp_path / "l.db")))
    handler = app.req_options.media_handlers[falcon.MEDIA_JSON]
    assert app.resp_options.media_handlers[falcon.MEDIA_JSON] is handler
    assert handler.serialize({"status": "ok", "ü": 1.5}, falcon.MEDIA_JSON) == \
        '{"status":"ok","ü":1.5}'.encode()
    assert handler.deserialize(io.BytesIO(b'{"a": [1]}'), falcon.MEDIA_JSON, 10) == {"a": [1]}
    for body, says in ((b"", "empty JSON body"), (b'{"a":', "truncated"), (b"\xff", "utf-8")):
        with pytest.raises(falcon.HTTPBadRequest) as refused:
            handler.deserialize(io.BytesIO(body), falcon.MEDIA_JSON, len(body))
        assert says in refused.value.description
