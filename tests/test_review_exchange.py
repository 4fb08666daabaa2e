"""Review 2, an exchange integrator's checks: request encodings and framing, enumerations the
bidder does not know, category taxonomies and allow-lists, banner types, inventory named by
page only, caps across the imps of one request, rounded prices in whole-unit currencies, and
what /metrics and /readyz report."""
from __future__ import annotations

import gzip
import http.client
import json

import pytest

from bidder.catalog import CatalogError, load
from bidder.currency import Rates
from bidder.domains import host_of
from models import world
from tests.conftest import launch_server
from tests.test_bid_http import CATALOG, bids_of, site_request
from tests.test_bid_rules import server  # noqa: F401 - the same server: test catalog, 1 worker
from tests.test_money_and_faults import notice_path


def _requests_by_status(server) -> dict[str, float]:
    text = server.metrics()
    prefix = 'bidder_bid_requests_total{status="'
    return {line[len(prefix):].split('"', 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line.startswith(prefix)}


def test_invalid_utf8_is_a_400_that_says_so(server):
    body = json.dumps(site_request()).encode().replace(b'"req-1"', b'"req-\xe9"')
    status, _, answer = server.bid(body)
    assert status == 400 and "UTF-8" in json.loads(answer)["error"]
    body = json.dumps(site_request()).encode().replace(b'"news.example"', b'"\xed\xa0\x80"')
    assert server.bid(body)[0] == 400


def test_a_leading_byte_order_mark_is_skipped_and_utf16_refused(server):
    assert server.bid(b"\xef\xbb\xbf" + json.dumps(site_request()).encode())[0] == 200
    status, _, answer = server.bid(json.dumps(site_request()).encode(),
                                   {"Content-Type": "application/json; charset=UTF-16"})
    assert status == 415 and "UTF-8" in json.loads(answer)["error"]


def test_chunked_bodies_are_read(server):
    body = json.dumps(site_request()).encode()
    chunks = (body[i:i + 100] for i in range(0, len(body), 100))
    status, _, answer = server.request("POST", "/openrtb2/bid", chunks,
                                       {"Content-Type": "application/json"})
    assert status == 200 and bids_of(answer)
    packed = gzip.compress(body)
    status, _, _ = server.request("POST", "/openrtb2/bid", iter([packed[:50], packed[50:]]),
                                  {"Content-Type": "application/json", "Content-Encoding": "gzip"})
    assert status == 200


def test_a_missing_content_type_is_json(server):
    status, _, _ = server.request("POST", "/openrtb2/bid", json.dumps(site_request()).encode())
    assert status == 200
    status, _, _ = server.request("POST", "/openrtb2/bid", b"{}",
                                  {"Content-Type": "application/x-protobuf"})
    assert status == 415


def test_unknown_auction_types_are_tolerated_and_null_means_absent(server):
    for at in (0, 3, 4, 499, 500):
        status, _, body = server.bid(site_request(at=at, floor=0.5))
        assert status == 200, (at, body)
        assert bids_of(body)[0]["price"] >= 0.5
    req = site_request(test=None, at=None)
    req["imp"][0].update(bidfloor=None, bidfloorcur=None)
    assert server.bid(req)[0] == 200


def test_fixed_price_deal_without_a_price_is_not_bid_at_zero(server):
    req = site_request(country="DEU")
    req["imp"][0]["pmp"] = {"private_auction": 1, "deals": [{"id": "d1", "at": 3}]}
    status, headers, _ = server.bid(req)
    assert status == 204 and headers["x-nobid-reason"] == "no_deal_in_private_auction"
    req["imp"][0]["pmp"]["deals"][0]["bidfloor"] = 1.5
    [bid] = bids_of(server.bid(req)[2])
    assert bid["dealid"] == "d1" and bid["price"] == 1.5


def test_acat_allows_only_listed_categories_and_their_subcategories(server):
    [bid] = bids_of(server.bid(site_request(acat=["IAB18"]))[2])  # jp-shoes is IAB18-1
    assert bid["cid"] == "jp-shoes"
    status, headers, _ = server.bid(site_request(acat=["IAB2", "IAB18-2"]))
    assert status == 204 and headers["x-nobid-reason"] == "blocked_by_request"


def test_bcat_in_another_taxonomy_is_not_guessed(server):
    status, headers, _ = server.bid(site_request(cattax=7, bcat=["JLBCU7"]))
    assert status == 204 and headers["x-nobid-reason"] == "category_taxonomy_unknown"
    assert server.bid(site_request(cattax=1, bcat=["IAB1"]))[0] == 200
    assert server.bid(site_request(cattax=7))[0] == 200  # no bcat/acat: nothing to evaluate


def test_bcat_and_country_codes_in_any_case(server):
    status, headers, _ = server.bid(site_request(bcat=["iab18"]))
    assert status == 204 and headers["x-nobid-reason"] == "blocked_by_request"
    assert server.bid(site_request(country="jpn"))[0] == 200


def test_blocked_banner_types_exclude_the_creatives_of_that_type(server):
    req = site_request()
    req["imp"][0]["banner"]["btype"] = [2]  # XHTML banner ad: every creative of the catalog
    status, headers, _ = server.bid(req)
    assert status == 204 and headers["x-nobid-reason"] == "no_creative_fits"
    req["imp"][0]["banner"]["btype"] = [1, 3, 4]
    assert server.bid(req)[0] == 200
    req["imp"][0]["banner"]["btype"] = [9]  # a type no list defines: nothing to block
    assert server.bid(req)[0] == 200


def test_blocked_creative_attributes_exclude_creatives_that_have_them(server):
    """banner.battr (AdCOM Creative Attributes): the catalog's us-autos-728x90 declares 1,
    audio auto-play; the bid names its attributes in Bid.attr."""
    req = site_request(country="USA", w=728, h=90)
    [bid] = bids_of(server.bid(req)[2])
    assert bid["crid"] == "us-autos-728x90" and bid["attr"] == [1]
    req["imp"][0]["banner"]["battr"] = [1, 6]
    status, headers, _ = server.bid(req)
    assert status == 204 and headers["x-nobid-reason"] == "no_creative_fits"
    req["imp"][0]["banner"]["battr"] = [6]  # in-banner video: this creative has none
    assert server.bid(req)[0] == 200
    req = site_request(country="USA", w=320, h=50)  # a creative with no attributes
    req["imp"][0]["banner"]["battr"] = [1]
    [bid] = bids_of(server.bid(req)[2])
    assert bid["crid"] == "us-autos-320x50" and "attr" not in bid


@pytest.mark.parametrize("where, value, message", [
    (("creatives", 0, "attr"), [0], "attr must hold distinct AdCOM"),
    (("creatives", 0, "attr"), [18], "attr must hold distinct AdCOM"),
    (("creatives", 0, "attr"), [1, 1], "attr must hold distinct AdCOM"),
    (("creatives", 0, "id"), " ", "non-empty id"),
    (("value_per_click",), 1e308, "over the 1000 USD sanity limit"),
    (("value_per_click",), 0, "must be a positive amount"),
    (("targeting", "countries"), ["US"], "ISO-3166-1 alpha-3"),
    (("targeting", "devicetypes"), [0], "AdCOM 1.0 device types"),
    (("cat",), ["Automotive"], "IAB Content Category 1.0"),
    (("adomain",), [""], "none empty"),
    (("frequency_cap",), {"impressions": 1, "window_s": 400 * 86400}, "between 1 s and 366 days"),
])
def test_catalog_refuses_values_that_would_never_match_or_misprice(tmp_path, where, value,
                                                                   message):
    """Found by fuzzing the catalog: each of these loaded, then never matched a request (a
    country in alpha-2, a device type 0), bid absurd prices (a value per click of 1e308) or
    lost a frequency cap's counts."""
    catalog = json.load(open(CATALOG))
    node = catalog["campaigns"][1]
    for key in where[:-1]:
        node = node.setdefault(key, {}) if isinstance(key, str) else node[key]
    node[where[-1]] = value
    path = tmp_path / "campaigns.json"
    path.write_text(json.dumps(catalog))
    with pytest.raises(CatalogError, match=rf"us-autos.*{message}"):
        load(str(path), Rates({}))


@pytest.mark.parametrize("where, value, message", [
    (("creatives", 0, "w"), 0, r"creative 'us-autos-728x90', field 'w': .*positive.*"
                               r"at `\$\.campaigns\[1\]\.creatives\[0\]\.w`"),
    (("creatives", 0, "w"), "wide", r"field 'w': .*Expected `int \| null`, got `str`"),
    (("creatives", 0, "type"), 5, r"field 'type': type must be one of \(1, 2, 3, 4\)"),
    (("creatives", 0, "adm"), "", r"field 'adm': adm: the creative's markup, not empty"),
    (("creatives",), [], r"field 'creatives': a campaign needs at least one creative"),
    (("budget",), 0, r"field 'budget': must be a positive amount \(or absent for no cap\)"),
    (("currency",), "XYZ", r"field 'currency': 'XYZ' has no rate; add it with --currency-rates"),
    (("frequency_cap",), {"impressions": 0}, r"field 'frequency_cap.impressions': impressions"),
])
def test_catalog_errors_name_campaign_creative_field_and_path(tmp_path, where, value, message):
    """Rules declared on the catalog's types (msgspec) keep the advice and add the JSON path."""
    catalog = json.load(open(CATALOG))
    node = catalog["campaigns"][1]
    for key in where[:-1]:
        node = node[key]
    node[where[-1]] = value
    path = tmp_path / "campaigns.json"
    path.write_text(json.dumps(catalog))
    with pytest.raises(CatalogError, match=rf"campaign 'us-autos'.*{message}"):
        load(str(path), Rates({}))


def test_duplicate_creative_ids_are_refused(tmp_path):
    catalog = json.load(open(CATALOG))
    creatives = catalog["campaigns"][1]["creatives"]
    creatives[1]["id"] = creatives[0]["id"]
    path = tmp_path / "campaigns.json"
    path.write_text(json.dumps(catalog))
    with pytest.raises(CatalogError, match="campaign 'us-autos', creative 'us-autos-728x90', "
                                           "field 'id': duplicate creative id"):
        load(str(path), Rates({}))


def test_inventory_named_only_by_page_or_publisher_still_meets_domain_blocks(server):
    for site in ({"page": "https://www.bad.example/article?x=1"},
                 {"domain": " https://BAD.example/ "},
                 {"domain": "news.example", "publisher": {"domain": "bad.example"}}):
        status, headers, _ = server.bid(site_request(site=site))
        assert status == 204 and headers["x-nobid-reason"] == "no_campaign_targets_inventory"
    assert server.bid(site_request(site={"page": "https://news.example/a"}))[0] == 200
    assert host_of("https://u@Host.example:8443/p?q") == "Host.example"
    assert host_of("prebid.org") == "prebid.org" and host_of(None) is None


def test_a_frequency_cap_holds_across_the_imps_of_one_request(server):
    req = site_request(country="FRA", user={"id": "review2-fresh-user"})
    req["imp"] = [{"id": str(n), "banner": {"w": 300, "h": 250}} for n in range(1, 4)]
    status, _, body = server.bid(req)
    assert status == 200
    assert [b["cid"] for b in bids_of(body)] == ["capped"]  # cap: 1 impression


def test_rounded_clearing_prices_in_whole_unit_currencies_are_booked(server):
    [bid] = bids_of(server.bid(site_request(at=1, cur=["JPY"]))[2])
    assert bid["price"] != int(bid["price"])
    rounded_up = str(int(bid["price"]) + 1)  # the exchange renders yen without decimals
    status, _, body = server.request("GET", notice_path(bid["burl"], rounded_up))
    assert status == 200 and json.loads(body)["status"] == "booked"
    status, _, _ = server.request("GET", notice_path(bid["nurl"], str(int(bid["price"]) + 2)))
    assert status == 400


def test_metrics_count_each_answer_under_its_own_status(server):
    before = _requests_by_status(server)
    server.bid(b"{not json")
    server.bid(b"{}", {"Content-Type": "application/xml"})
    server.bid(site_request())
    after = _requests_by_status(server)
    for status in ("400", "415", "200"):
        assert after.get(status, 0) == before.get(status, 0) + 1, status


def test_readyz_reports_memcached_it_has_not_reached(memcached, tmp_path):
    srv = launch_server(tmp_path, "--workers", "1", "--campaigns", CATALOG,
                        memcached="127.0.0.1:9")  # discard port: nothing listens
    try:
        ready = json.loads(srv.admin("GET", "/readyz")[2])
        assert ready["ready"] is True  # memcached only degrades
        assert ready["components"]["memcached"]["ok"] is False
        assert ready["components"]["memcached"]["last_error"]
    finally:
        srv.stop()


def test_serve_warns_about_notice_settings_that_lose_or_expose_money(server):
    log = server.log()
    assert "--notice-url" in log and "--notice-secret" in log



def test_coppa_requests_use_no_user_data(server):
    """regs.coppa=1: no behavioural profile and no frequency counts; campaigns that need
    counts (capped) sit out, the others bid on request features alone."""
    status, headers, _ = server.bid(site_request(country="FRA", regs={"coppa": 1}))
    assert status == 204 and headers["x-nobid-reason"] == "frequency_unknown"
    [bid] = bids_of(server.bid(site_request(regs={"coppa": 1}))[2])
    assert "&u=&" in bid["burl"]  # the notice carries no user key


def test_privacy_signals_without_leave_use_no_user_data(server):
    """GDPR without a consent string, a CCPA or GPP opt-out, is treated as COPPA is: no
    look-up and no frequency counts, so the capped campaign (FRA) sits out. 2.5's ext places
    count as well."""
    no_leave = [{"regs": {"gdpr": 1}},
                {"regs": {"gdpr": 1}, "user": {"id": world.user_id(9), "consent": ""}},
                {"regs": {"ext": {"gdpr": 1}}},
                {"regs": {"us_privacy": "1YYN"}},
                {"regs": {"ext": {"us_privacy": "1-y-"}}},
                {"regs": {"ext": {"gdpr": "1"}}, "user": {"id": world.user_id(9), "ext": [1]}},
                # odd shapes are honoured, not refused, and read on the safe side
                {"regs": {"gdpr": "1"}}, {"regs": {"coppa": True}}, {"regs": {"gdpr": "yes"}},
                {"regs": {"ext": {"gdpr": 2}}},
                {"regs": {"gdpr": 1}, "user": {"id": world.user_id(9), "consent": True}},
                {"regs": {"gdpr": 1}, "user": {"id": world.user_id(9), "consent": " "}},
                {"regs": {"gdpr": 1}, "user": {"id": world.user_id(9), "ext": {"consent": 1}}},
                {"regs": {"gpp": "DBABLA~BVVVVVVVVWA", "gpp_sid": [7]}}]  # US: opted out
    for extra in no_leave:
        status, headers, _ = server.bid(site_request(country="FRA", **extra))
        assert status == 204 and headers["x-nobid-reason"] == "frequency_unknown", extra
        [bid] = bids_of(server.bid(site_request(**extra))[2])
        assert "&u=&" in bid["burl"], extra  # the notice carries no user key
    leave = [{"regs": {"gdpr": 1}, "user": {"id": world.user_id(9), "consent": "CPXxRfAPXxRfA"}},
             {"regs": {"gdpr": 1}, "user": {"id": world.user_id(9), "ext": {"consent": "CO"}}},
             {"regs": {"gdpr": 0, "us_privacy": "1YNN"}, "user": {"id": world.user_id(9)}},
             {"regs": {"us_privacy": "1---"}, "user": {"id": world.user_id(9)}},
             {"regs": {"ext": "free-form"}, "user": {"id": world.user_id(9), "ext": None}},
             {"regs": {"gdpr": "0", "coppa": False}, "user": {"id": world.user_id(9)}},
             {"regs": {"gpp": "DBABLA~BAAAAAAAAQA", "gpp_sid": [7]},
              "user": {"id": world.user_id(9)}}]
    for n, extra in enumerate(leave):
        # a user of its own: bids in flight for a user (other tests') count against the cap
        extra["user"]["id"] = f"privacy-leave-{n}"
        [bid] = bids_of(server.bid(site_request(country="FRA", **extra))[2])
        assert bid["cid"] == "capped" and "&u=&" not in bid["burl"], extra


def test_health_and_readiness_answer_head_probes(server):
    for status, _, body in (server.request("HEAD", "/healthz"), server.admin("HEAD", "/healthz"),
                            server.admin("HEAD", "/readyz")):
        assert status == 200 and body == b""


def test_a_slightly_oversized_body_leaves_its_connection_usable(server):
    """Review 2 (D20): a 413 said keep-alive, then the connection was dropped because Gunicorn
    drains at most 64 KiB of an unread body; the app now reads off such a body first."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        conn.request("POST", "/openrtb2/bid", b"x" * (70 * 1024),
                     {"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        assert response.status == 413
        conn.request("POST", "/openrtb2/bid", json.dumps(site_request()).encode(),
                     {"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        assert response.status == 200
    finally:
        conn.close()
