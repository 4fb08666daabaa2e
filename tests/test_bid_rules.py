"""Rules found in review: case and subdomains, clearing prices rendered rounded, Accept-Encoding
weights, x-gzip, no-bid reasons of multi-imp requests, ids (geo fallback and currency case are
in test_bid_http)."""
from __future__ import annotations

import copy
import gzip
import json

import pytest

from bidder.app import accepts_gzip
from bidder.domains import domain_and_parents, host_of
from tests.conftest import launch_server
from tests.test_bid_http import CATALOG, bids_of, site_request
from tests.test_money_and_faults import notice_path


@pytest.fixture(scope="module")
def server(memcached, tmp_path_factory):
    srv = launch_server(tmp_path_factory.mktemp("bid-rules"), "--workers", "1",
                        "--campaigns", CATALOG, "--currency-rates", "EUR=1.10,JPY=0.0070",
                        "--memcached-timeout-ms", "100", memcached=memcached.address)
    yield srv
    srv.stop()


def test_domain_blocks_ignore_case_and_cover_subdomains(server):
    for domain in ("BAD.example", "www.bad.example", "a.b.Bad.Example."):
        req = site_request()
        req["site"]["domain"] = domain
        status, headers, _ = server.bid(req)
        assert status == 204 and headers["x-nobid-reason"] == "no_campaign_targets_inventory"
    req = site_request()
    req["site"]["domain"] = "notbad.example"
    assert server.bid(req)[0] == 200
    assert domain_and_parents("www.News.example") == ["www.news.example", "news.example",
                                                      "example"]


def test_badv_and_bapp_ignore_case_and_cover_subdomains(server):
    status, headers, _ = server.bid(site_request(badv=["SHOES.example"]))
    assert status == 204 and headers["x-nobid-reason"] == "blocked_by_request"
    # a blocked domain covers its subdomains, not its parents (2.6 3.2.1 badv: "ford.com")
    status, headers, _ = server.bid(site_request(badv=[" example."]))
    assert status == 204 and headers["x-nobid-reason"] == "blocked_by_request"
    assert server.bid(site_request(badv=["www.shoes.example"]))[0] == 200
    app = site_request(country="GBR", w=320, h=50, bapp=["COM.EXAMPLE.GAME"])
    del app["site"]
    app["app"] = {"bundle": "com.example.puzzle"}
    assert server.bid(app)[0] == 204


def test_a_clearing_price_rendered_rounded_up_is_still_booked(server):
    [bid] = bids_of(server.bid(site_request(at=1))[2])
    rounded_up = f"{int(bid['price'] * 100 + 1) / 100:.2f}"  # the next cent above our bid
    status, _, body = server.request("GET", notice_path(bid["burl"], rounded_up))
    assert status == 200 and json.loads(body)["status"] == "booked"
    status, _, _ = server.request("GET", notice_path(bid["nurl"], f"{bid['price'] + 1:.2f}"))
    assert status == 400  # a whole unit above our bid is not our price


def test_accept_encoding_weights_and_x_gzip(server):
    _, headers, _ = server.bid(site_request(), {"Accept-Encoding": "gzip;q=0, deflate"})
    assert "content-encoding" not in headers
    _, headers, body = server.bid(site_request(), {"Accept-Encoding": "br, *;q=0.5"})
    assert headers["content-encoding"] == "gzip" and json.loads(gzip.decompress(body))
    body = gzip.compress(json.dumps(site_request()).encode())
    assert server.bid(body, {"Content-Encoding": "x-gzip"})[0] == 200
    assert accepts_gzip("*, gzip;q=0") is False and accepts_gzip(None) is False


def test_multi_imp_nobid_reports_the_imp_closest_to_a_bid(server):
    req = site_request(floor=1e9)
    req["imp"].append({"id": "2", "video": {"mimes": ["video/mp4"]}})
    status, headers, _ = server.bid(req)
    assert status == 204 and headers["x-nobid-reason"] == "below_floor"


def test_capped_campaigns_sit_out_for_users_without_an_id(server):
    req = site_request(country="FRA")
    del req["user"]
    status, headers, _ = server.bid(req)
    assert status == 204 and headers["x-nobid-reason"] == "frequency_unknown"


@pytest.mark.parametrize("bad_id", ["has space", "x" * 65, "", "tab\tid", "ü"])
def test_campaign_ids_that_cannot_travel_are_refused(tmp_path, bad_id):
    from bidder.catalog import CatalogError, load
    from bidder.currency import Rates
    catalog = json.load(open(CATALOG))
    catalog = copy.deepcopy(catalog)
    catalog["campaigns"][0]["id"] = bad_id
    path = tmp_path / "c.json"
    path.write_text(json.dumps(catalog))
    with pytest.raises(CatalogError, match="campaign id"):
        load(str(path), Rates.parse("EUR=1.1"))


def test_secure_imps_get_only_creatives_without_plain_http_urls(server):
    """imp.secure=1 requires HTTPS assets and markup (2.6 3.2.4); omitted or 0, http may do."""
    for secure in (None, 0):
        req = site_request(country="ITA")
        if secure is not None:
            req["imp"][0]["secure"] = secure
        [bid] = bids_of(server.bid(req)[2])
        assert bid["crid"] == "plain-http-300x250"
    req = site_request(country="ITA")
    req["imp"][0]["secure"] = 1
    status, headers, _ = server.bid(req)
    assert status == 204 and headers["x-nobid-reason"] == "no_creative_fits"
    req["imp"][0]["banner"]["format"].append({"w": 728, "h": 90})  # an HTTPS creative fits
    [bid] = bids_of(server.bid(req)[2])
    assert bid["crid"] == "plain-https-728x90" and "http://" not in bid["adm"]


def test_open_auction_deal_campaign_below_its_deal_floor_bids_in_the_open_market(server):
    """private_auction=0: "bids from all bidders are accepted" (2.6 3.2.11), so a campaign whose
    value does not reach its deal's floor may still bid at the imp floor, without the deal."""
    req = site_request(country="DEU", floor=0.01)
    req["imp"][0]["pmp"] = {"private_auction": 0, "deals": [{"id": "d1", "bidfloor": 90000.0}]}
    [bid] = bids_of(server.bid(req)[2])
    assert bid["cid"] == "deal-only" and "dealid" not in bid and 0.01 <= bid["price"] < 90000
    req["imp"][0]["pmp"]["private_auction"] = 1  # private: the deal or nothing
    status, headers, _ = server.bid(req)
    assert status == 204 and headers["x-nobid-reason"] == "below_floor"
    req["imp"][0]["pmp"] = {"private_auction": 0, "deals": [{"id": "d1", "bidfloor": 0.02}]}
    [bid] = bids_of(server.bid(req)[2])
    assert bid["dealid"] == "d1" and bid["price"] >= 0.02  # reaching the deal floor: the deal


def _feature_lookups(server) -> float:
    text = server.metrics()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("bidder_feature_store_lookups_total{"))


def test_requests_no_imp_can_take_cost_no_memcached_round_trip(server):
    before = _feature_lookups(server)
    video = site_request()
    video["imp"] = [{"id": "1", "video": {"mimes": ["video/mp4"], "w": 640, "h": 360}}]
    status, headers, _ = server.bid(video)
    assert status == 204 and headers["x-nobid-reason"] == "no_video_creative_fits"
    status, headers, _ = server.bid(site_request(w=1, h=1))
    assert status == 204 and headers["x-nobid-reason"] == "no_creative_fits"
    assert _feature_lookups(server) == before
    assert server.bid(site_request())[0] == 200
    assert _feature_lookups(server) == before + 1
