"""Review of the bid path: inputs that were answered wrongly (a 5xx, a bid that breaks a deal,
targeting or auction rule, a forged notice booked), each against a real ``bidder serve`` with
the shared test catalog and EUR=1.10."""
from __future__ import annotations

import gzip
import json
import os
import socket
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

import pytest

from tests.conftest import launch_server
from tests.test_bid_http import bids_of, site_request

CATALOG = os.path.join(os.path.dirname(__file__), "data", "campaigns.json")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = launch_server(tmp_path_factory.mktemp("review-bidpath"), "--workers", "1",
                        "--campaigns", CATALOG, "--currency-rates", "EUR=1.10,JPY=0.0070")
    yield srv
    srv.stop()


def test_deeply_nested_json_is_a_400_not_a_500(server):
    depth = 20000  # fits the 64 KiB cap; msgspec raises RecursionError, not DecodeError
    body = b'{"id": "x", "ext": ' + b"[" * depth + b"]" * depth + b', "imp": [{"id": "1"}]}'
    status, _, data = server.bid(body)
    assert status == 400, data
    assert "nested" in json.loads(data)["error"]


def test_private_auction_without_deals_is_not_an_open_auction(server):
    req = site_request()  # jp-shoes bids on this in the open auction
    req["imp"][0]["pmp"] = {"private_auction": 1}
    status, headers, data = server.bid(req)
    assert status == 204, data
    assert headers["x-nobid-reason"] == "no_deal_in_private_auction"
    req["imp"][0]["pmp"] = {"private_auction": 1, "deals": []}
    assert server.bid(req)[0] == 204


def test_gzip_body_of_concatenated_members_is_read_whole(server):
    raw = json.dumps(site_request()).encode()
    body = gzip.compress(raw[:20]) + gzip.compress(raw[20:])  # RFC 1952 2.2: a gzip file
    status, _, data = server.bid(body, {"Content-Encoding": "gzip"})
    assert status == 200, data
    assert json.loads(data)["id"] == "req-1"


def test_truncated_gzip_body_is_a_400(server):
    body = gzip.compress(json.dumps(site_request()).encode())[:-8]  # CRC32 and size cut off
    status, _, data = server.bid(body, {"Content-Encoding": "gzip"})
    assert status == 400, data
    assert "gzip" in json.loads(data)["error"]


def test_fixed_price_deal_bids_the_agreed_price(server):
    """Deal.at = 3: "the value passed in bidfloor is the agreed upon deal price" (2.6, 3.2.12)."""
    req = site_request(country="DEU", floor=0.01)
    req["cur"] = ["EUR"]
    req["imp"][0]["pmp"] = {"private_auction": 1, "deals": [
        {"id": "d1", "bidfloor": 2.5, "bidfloorcur": "EUR", "at": 3}]}
    status, _, data = server.bid(req)
    assert status == 200, data
    [bid] = bids_of(data)
    assert bid["dealid"] == "d1" and bid["price"] == 2.5
    req["cur"] = ["USD"]
    [bid] = bids_of(server.bid(req)[2])
    assert bid["price"] == pytest.approx(2.75)


def test_notice_signature_cannot_be_shifted_across_fields(server):
    """An imp id holding the signer's field separator must not let its signature sign other
    fields: here, billing booked on a campaign that never bid, or a 500 on a shifted price."""
    req = site_request()
    req["imp"][0]["id"] = "1\x1fus-autos"
    [bid] = bids_of(server.bid(req)[2])
    q = dict(parse_qsl(urlsplit(bid["burl"]).query))
    assert q["c"] == "jp-shoes" and q["i"] == "1\x1fus-autos"
    shifted = [
        {"i": "1", "c": "us-autos", "r": "jp-shoes\x1f" + q["r"]},
        {"i": "1", "c": "us-autos", "r": "jp-shoes", "u": q["r"], "cur": q["u"], "t": q["cur"],
         "bp": q["t"] + "\x1f" + q["bp"]},
    ]
    for fields in shifted:
        forged = {**q, **fields, "p": "1.0"}
        status, _, data = server.request(
            "GET", "/notice/billing?" + urlencode(forged, quote_via=quote))
        assert status == 400 and "signature" in json.loads(data)["error"], data
    genuine = urlsplit(bid["burl"].replace("${AUCTION_PRICE}", "1.0"))
    status, _, data = server.request("GET", f"{genuine.path}?{genuine.query}")
    assert status == 200 and json.loads(data)["status"] == "booked"


def test_request_without_device_does_not_skip_device_targeting(server):
    """jp-shoes targets devicetypes 1, 2, 4: with no Device object the type is unknown, as with
    a Device that has no devicetype, so it must not bid."""
    req = site_request()
    del req["device"]
    req["user"]["geo"] = {"country": "JPN"}
    status, headers, data = server.bid(req)
    assert status == 204, data
    assert headers["x-nobid-reason"] == "no_campaign_targets_user"
    req["device"] = {"devicetype": 2}
    assert server.bid(req)[0] == 200


def test_body_shorter_than_its_content_length_is_a_408_not_a_500(server):
    """The client stops sending mid-body: the worker waits for the rest in its poller, then
    answers 408 and closes the connection (see tests/test_worker_stall.py)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"POST /openrtb2/bid HTTP/1.1\r\nHost: bidder\r\nContent-Type: "
                     b"application/json\r\nContent-Length: 1000\r\n\r\n{\"id\": \"x\"")
        head = sock.recv(4096).partition(b"\r\n\r\n")[0]
    assert head.startswith(b"HTTP/1.1 408"), head
    assert b"connection: close" in head.lower()


def test_integers_too_large_for_a_float_are_a_400_or_ignored_not_a_failure(server):
    """JSON integers have no size limit and msgspec decodes them to Python ints of any size."""
    huge = "1" + "0" * 400
    body = json.dumps(site_request()).encode()
    status, _, data = server.bid(body.replace(b'"tmax": 200', b'"tmax": ' + huge.encode()))
    assert status == 400 and "tmax" in json.loads(data)["error"], data
    # a Geo.utcoffset only feeds the hour-of-day feature: any value still gives an hour
    status, headers, data = server.bid(body.replace(
        b'"country": "JPN"', b'"country": "JPN", "utcoffset": ' + huge.encode()))
    assert status == 200, (status, headers.get("x-nobid-reason"))
