"""Mutated requests and notices against a real server: whatever an exchange sends, the answer
is a bid, a no-bid with a reason or a 400 that says what is wrong, never a 5xx or an internal
error.

Each request is one of ``loadtests.traffic``'s (the bundled catalog, so the mutations reach
scoring, pricing and notices) with one to three values replaced, anywhere in the document or at
places the bid rules read, by values of every JSON type and odd edges. A rule that trips over a
shape it did not expect answers ``internal_error`` (a caught exception): that is a failure here.
Notices are the nurl/burl of real bids with parameters dropped, replaced, added or repeated.
"""
from __future__ import annotations

import copy
import gzip
import http.client
import json
import random
from urllib.parse import parse_qsl, urlencode, urlsplit

import pytest

from loadtests import traffic
from tests.conftest import launch_server

REQUESTS = 1500
NOTICES = 1500
NOTICE_VALUES = ["", "x", "-1", "1e308", "nan", "inf", "0", "${AUCTION_PRICE}", "1.5", "%ZZ", "é",
                 "9" * 400]
VALUES = [None, 0, 1, -1, 2, 3, 9, 2**31, 2**63, -2**63, 1e308, 0.5, "", "x", "1", "USD", "jpy",
          "ÄÖ", "1YYN", "DBABLA~BVVVVVVVVWA", [], [1], [0, 99], ["a"], [None], {}, {"a": 1},
          True, False]
RULE_PATHS = [("regs",), ("regs", "ext"), ("regs", "gpp"), ("regs", "gpp_sid"), ("user", "ext"),
              ("user", "consent"), ("imp", 0, "banner", "battr"), ("imp", 0, "banner", "btype"),
              ("imp", 0, "pmp"), ("imp", 0, "pmp", "deals"), ("imp", 0, "secure"),
              ("imp", 0, "bidfloorcur"), ("cur",), ("bcat",), ("acat",), ("cattax",), ("badv",),
              ("bapp",), ("wseat",), ("bseat",), ("at",), ("tmax",), ("test",),
              ("device", "geo", "utcoffset"), ("site", "page"), ("app",)]


@pytest.fixture(scope="module")
def server(memcached, tmp_path_factory):
    srv = launch_server(tmp_path_factory.mktemp("fuzz"), "--workers", "1",
                        memcached=memcached.address)
    yield srv
    srv.stop()


def _paths(node, prefix=()):
    yield prefix
    items = node.items() if isinstance(node, dict) else (
        enumerate(node) if isinstance(node, list) else ())
    for key, child in items:
        yield from _paths(child, prefix + (key,))


def _set(document, path, value) -> None:
    for key in path[:-1]:
        document = document[key]
    document[path[-1]] = value


def _mutants(n: int, seed: int):
    rng = random.Random(seed)
    bases = [json.loads(gzip.decompress(r.body) if r.body[:2] == b"\x1f\x8b" else r.body)
             for r in traffic.generate(200, traffic.Mix(users=1000), seed)]
    for _ in range(n):
        request = copy.deepcopy(rng.choice(bases))
        for _ in range(rng.randint(1, 3)):
            path = rng.choice(list(_paths(request))[1:] + RULE_PATHS)
            try:
                _set(request, path, copy.deepcopy(rng.choice(VALUES)))
            except (KeyError, IndexError, TypeError):  # the path's parent is gone or not a container
                pass
        yield json.dumps(request).encode()


def test_mutated_requests_get_a_bid_a_reasoned_no_bid_or_a_clear_400(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    seen: dict[int, int] = {}
    try:
        for body in _mutants(REQUESTS, seed=3):
            conn.request("POST", "/openrtb2/bid", body, {"Content-Type": "application/json"})
            response = conn.getresponse()
            answer = response.read()
            status = response.status
            seen[status] = seen.get(status, 0) + 1
            assert status in (200, 204, 400), (status, body[:400])
            if status == 204:
                reason = response.getheader("X-Nobid-Reason")
                assert reason and reason != "internal_error", body[:400]
            elif status == 400:
                assert json.loads(answer)["error"].startswith("invalid OpenRTB 2.6 BidRequest")
            else:
                assert json.loads(answer)["seatbid"], body[:400]
    finally:
        conn.close()
    assert seen.get(200, 0) > 100 and seen.get(400, 0) > 100  # the fuzz reached both sides
    assert "Traceback" not in server.log()


def _notice_urls(server, n: int) -> list[str]:
    """The nurl and burl of the bids ``n`` realistic requests get."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    urls = []
    try:
        for r in traffic.generate(n, traffic.Mix(users=1000, accept_gzip=0.0), 5):
            conn.request("POST", "/openrtb2/bid", r.body, r.headers)
            response = conn.getresponse()
            answer = response.read()
            if response.status == 200:
                urls += [u for sb in json.loads(answer)["seatbid"] for b in sb["bid"]
                         for u in (b["nurl"], b["burl"])]
    finally:
        conn.close()
    return urls


def test_mutated_notices_are_booked_or_refused_with_a_400(server):
    urls = _notice_urls(server, 100)
    assert len(urls) > 50
    rng = random.Random(4)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    seen: dict[int, int] = {}
    try:
        for _ in range(NOTICES):
            url = urlsplit(rng.choice(urls))
            params = [(k, v.replace("${AUCTION_PRICE}", "0.5"))
                      for k, v in parse_qsl(url.query, keep_blank_values=True)]
            for _ in range(rng.randint(0, 3)):
                op = rng.random()
                if op < 0.3 and params:
                    params.pop(rng.randrange(len(params)))
                elif op < 0.7 and params:
                    i = rng.randrange(len(params))
                    params[i] = (params[i][0], rng.choice(NOTICE_VALUES))
                elif op < 0.85:
                    params.append((rng.choice("psbz"), rng.choice(NOTICE_VALUES)))
                else:
                    params = params + params
            path = f"{url.path}?{urlencode(params, safe='$')}"
            conn.request(rng.choice(("GET", "GET", "POST")), path)
            response = conn.getresponse()
            answer = response.read()
            seen[response.status] = seen.get(response.status, 0) + 1
            assert response.status in (200, 400), (response.status, path[:300], answer[:200])
            if response.status == 400:
                assert json.loads(answer)["error"], path[:300]
    finally:
        conn.close()
    assert seen.get(200, 0) > 100 and seen.get(400, 0) > 100
    assert "Traceback" not in server.log()
