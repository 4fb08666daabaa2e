"""The generated OpenRTB 2.6 traffic: valid requests, configured proportions, deterministic."""
from __future__ import annotations

import json

import pytest

from loadtests import traffic
from models import world

N = 3000


@pytest.fixture(scope="module")
def requests() -> list[tuple[traffic.BidRequest, dict]]:
    return [(r, traffic.decode(r)) for r in traffic.generate(N, traffic.Mix(users=500), seed=1)]


def test_every_body_is_a_valid_openrtb_request(requests):
    for raw, req in requests:
        assert raw.headers["Content-Type"] == "application/json"
        assert isinstance(req["id"], str) and req["id"]
        assert req["imp"] and len({imp["id"] for imp in req["imp"]}) == len(req["imp"])
        assert ("site" in req) != ("app" in req)
        if "site" in req:
            assert req["site"]["domain"] in world.SITES + (world.BLOCKED_DOMAIN,)
        else:
            assert req["app"]["bundle"] in world.APPS
        device = req["device"]
        assert device["geo"]["country"] in world.COUNTRIES
        assert device["devicetype"] in world.DEVICETYPES
        assert device["os"] in world.OSES
        assert req["at"] in (1, 2)
        assert req["cur"] == ["USD"]
        assert req.get("tmax", 50) in traffic.Mix().tmax_ms
        for imp in req["imp"]:
            assert {"banner", "video", "native"} & imp.keys()
            if "banner" in imp:
                banner = imp["banner"]
                assert (banner["w"], banner["h"]) in world.SIZES
                assert {"w": banner["w"], "h": banner["h"]} in banner["format"]
                assert all((f["w"], f["h"]) in world.SIZES for f in banner["format"])
            if "video" in imp:
                video = imp["video"]
                assert (video["w"], video["h"]) in traffic.VIDEO_SIZES and video["mimes"]
                assert video["minduration"] <= video["maxduration"] and video["protocols"]
            if "native" in imp:
                request = imp["native"]["request"]
                request = json.loads(request) if isinstance(request, str) else request
                assert request["ver"] == "1.2"
                assert {a["id"] for a in request["assets"] if a["required"]} >= {1, 2, 4}
            if "bidfloor" in imp:
                assert imp["bidfloor"] >= 0 and imp["bidfloorcur"] in traffic.USD_PER_UNIT
            for deal in imp.get("pmp", {}).get("deals", []):
                assert deal["id"] and deal["bidfloor"] >= imp.get("bidfloor", 0)
                assert deal["bidfloorcur"] == imp.get("bidfloorcur", deal["bidfloorcur"])


def share(requests, predicate) -> float:
    return sum(1 for raw, req in requests if predicate(raw, req)) / len(requests)


def test_proportions_follow_the_mix(requests):
    mix = traffic.Mix()
    assert share(requests, lambda _, r: "app" in r) == pytest.approx(mix.app, abs=0.04)
    assert share(requests, lambda _, r: len(r["imp"]) > 1) == pytest.approx(mix.multi_imp, abs=0.03)
    assert share(requests, lambda raw, _: raw.headers.get("Content-Encoding") == "gzip") \
        == pytest.approx(mix.gzip, abs=0.02)
    assert share(requests, lambda _, r: "bcat" in r) == pytest.approx(mix.blocks, abs=0.04)
    assert share(requests, lambda _, r: r["at"] == 2) == pytest.approx(mix.second_price, abs=0.02)
    kinds = [tuple(sorted({"banner", "video", "native"} & r["imp"][0].keys())) for _, r in requests]
    assert kinds.count(("video",)) / N == pytest.approx(mix.video, abs=0.02)
    assert kinds.count(("native",)) / N == pytest.approx(mix.native, abs=0.02)
    assert kinds.count(("banner", "video")) / N == pytest.approx(mix.banner_video, abs=0.02)
    known = [r["user"]["id"] for _, r in requests
             if r.get("user", {}).get("id", "").startswith(world.USER_ID_PREFIX)]
    assert len(known) / N == pytest.approx(mix.known_user, abs=0.04)
    assert all(int(uid[len(world.USER_ID_PREFIX):]) < 500 for uid in known)
    assert share(requests, lambda _, r: "user" not in r) == pytest.approx(
        1 - mix.known_user - mix.unknown_user, abs=0.03)
    curs = [imp["bidfloorcur"] for _, r in requests for imp in r["imp"] if "bidfloorcur" in imp]
    assert curs.count("EUR") / len(curs) == pytest.approx(mix.eur, abs=0.03)
    assert curs.count("JPY") / len(curs) == pytest.approx(mix.jpy, abs=0.02)


def test_a_custom_mix_changes_the_traffic():
    mix = traffic.Mix.parse("app=1,gzip=1,multi_imp=0,known_user=1,unknown_user=0,users=3")
    reqs = traffic.generate(200, mix, seed=2)
    assert all(r.headers["Content-Encoding"] == "gzip" for r in reqs)
    decoded = [traffic.decode(r) for r in reqs]
    assert all("app" in d and len(d["imp"]) == 1 for d in decoded)
    assert {d["user"]["id"] for d in decoded} <= {world.user_id(i) for i in range(3)}


def test_generation_is_deterministic_given_the_seed():
    assert traffic.generate(100, seed=5) == traffic.generate(100, seed=5)
    assert traffic.generate(100, seed=5) != traffic.generate(100, seed=6)


def test_mix_parse_refuses_nonsense():
    with pytest.raises(ValueError, match="nonsense"):
        traffic.Mix.parse("nonsense=1")
    with pytest.raises(ValueError, match="app=2"):
        traffic.Mix.parse("app=2")
    assert traffic.Mix.parse("tmax_ms=40/60").tmax_ms == (40, 60)


def test_demo_requests_are_body_and_headers():
    pairs = traffic.demo_requests(5, users=10)
    assert len(pairs) == 5
    assert all(isinstance(body, bytes) and "Content-Type" in headers for body, headers in pairs)
