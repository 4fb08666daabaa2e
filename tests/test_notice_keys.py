"""Notice lifetime and key rotation: expired, forged, edited and other-key notices are refused
(400, counted, never booked); a rotation in the middle of a run loses no notice; a loss notice
(lurl) releases the bid's budget reservation."""
from __future__ import annotations

import json
import os
import re
import time
from urllib.parse import parse_qsl, urlsplit

import pytest

from bidder.ledger import open_ledger
from bidder.notices import NoticeError, NoticeExpired, NoticeSigner, key_id
from tests.test_bid_http import CATALOG, bids_of, site_request
from tests.test_money_and_faults import bids_until_budget_refuses, notice_path

OLD, NEW = "old-secret-1", "new-secret-2"


def params(url: str, price: str = "1.0") -> dict[str, str]:
    return dict(parse_qsl(urlsplit(url.replace("${AUCTION_PRICE}", price)).query))


def test_signer_refuses_expired_future_forged_and_unknown_key_notices():
    clock = [1_800_000_000.0]
    signer = NoticeSigner("http://b.example", NEW, (OLD,), ttl_s=3600, clock=lambda: clock[0])
    nurl, burl, lurl = signer.urls("bid1", "1", "c1", "cr1", "u:x", "USD", 0, 2.0, "holder1")
    assert signer.verify("billing", params(burl)).fields["h"] == "holder1"
    assert signer.verify("loss", params(lurl, "${AUCTION_PRICE}")).price == 0.0  # no price: fine
    clock[0] += 3601
    with pytest.raises(NoticeExpired, match="past the notice lifetime"):
        signer.verify("billing", params(burl))
    clock[0] -= 3601 + 301
    with pytest.raises(NoticeError, match="in the future"):
        signer.verify("billing", params(burl))
    clock[0] += 301
    edited = params(burl) | {"ts": str(int(clock[0]) + 10)}  # a younger issued-at: not ours
    with pytest.raises(NoticeError, match="signature"):
        signer.verify("billing", edited)
    with pytest.raises(NoticeError, match="signature"):  # a win URL is no billing notice
        signer.verify("billing", params(nurl))
    stranger = NoticeSigner("http://b.example", "someone-else")
    _, foreign, _ = stranger.urls("bid1", "1", "c1", "cr1", "u:x", "USD", 0, 2.0, "holder1")
    with pytest.raises(NoticeError, match="--notice-verify-secrets"):
        signer.verify("billing", params(foreign))
    # the old key still verifies (rotation), and a notice names its key by id only
    old = NoticeSigner("http://b.example", OLD, clock=lambda: clock[0])
    _, old_burl, _ = old.urls("bid2", "1", "c1", "cr1", "u:x", "USD", 0, 2.0, "holder1")
    assert params(old_burl)["k"] == key_id(OLD) and OLD not in old_burl
    assert signer.verify("billing", params(old_burl)).fields["b"] == "bid2"


def test_a_key_rotation_in_the_middle_of_a_run_loses_no_notice(start_server, memcached, tmp_path):
    """Step 1: every host verifies NEW too. Step 2: hosts sign with NEW one by one, OLD kept for
    verifying: notices of either key book on any host. Step 3 (after the lifetime): OLD dropped,
    its notices refused."""
    ledger = str(tmp_path / "ledger.sqlite3")
    common = ("--campaigns", CATALOG, "--workers", "1", "--ledger", ledger)
    a = start_server(*common, "--notice-secret", OLD, "--notice-verify-secrets", NEW,
                     memcached=memcached.address)
    b = start_server(*common, "--notice-secret", NEW, "--notice-verify-secrets", OLD,
                     memcached=memcached.address)
    signed_old = [bids_of(a.bid(site_request())[2])[0] for _ in range(3)]
    signed_new = [bids_of(b.bid(site_request())[2])[0] for _ in range(3)]
    for bid, host in [(x, b) for x in signed_old] + [(x, a) for x in signed_new]:
        status, _, body = host.request("GET", notice_path(bid["burl"], "0.5"))
        assert status == 200 and json.loads(body)["status"] == "booked"
    c = start_server(*common, "--notice-secret", NEW, memcached=memcached.address)
    late = bids_of(a.bid(site_request())[2])[0]
    status, _, body = c.request("GET", notice_path(late["burl"], "0.5"))
    assert status == 400 and "--notice-verify-secrets" in json.loads(body)["error"]
    book = open_ledger(ledger)
    assert book.count("billing") == 6
    book.close()
    assert 'bidder_notices_total{kind="billing",outcome="refused"} 1.0' in c.metrics()


def test_expired_and_edited_notices_get_400_are_counted_and_never_booked(start_server, memcached,
                                                                         tmp_path):
    server = start_server("--campaigns", CATALOG, "--notice-secret", NEW, "--notice-ttl-s", "3600",
                          memcached=memcached.address)
    bid = bids_of(server.bid(site_request())[2])[0]
    # the same notice as a host would have minted two hours ago (the test holds the secret)
    base = bid["burl"].split("/notice/")[0]
    past = NoticeSigner(base, NEW, clock=lambda: time.time() - 7200)
    fields = params(bid["burl"])
    _, old_burl, _ = past.urls(fields["b"], fields["i"], fields["c"], fields["r"], fields["u"],
                               fields["cur"], int(fields["t"]), float(fields["bp"]), fields["h"])
    status, _, body = server.request("GET", notice_path(old_burl, "0.5"))
    assert status == 400 and "notice lifetime" in json.loads(body)["error"]
    younger = re.sub(r"([?&]ts=)(\d+)", lambda m: m.group(1) + str(int(m.group(2)) + 60),
                     notice_path(bid["burl"], "0.5"))
    assert server.request("GET", younger)[0] == 400
    metrics = server.metrics()
    assert 'bidder_notices_total{kind="billing",outcome="expired"} 1.0' in metrics
    assert 'bidder_notices_total{kind="billing",outcome="refused"} 1.0' in metrics
    book = open_ledger(os.path.join(server.workdir, "ledger.sqlite3"))
    assert book.count("billing") == 0
    book.close()
    assert server.request("GET", notice_path(bid["burl"], "0.5"))[0] == 200  # the real one


def test_a_loss_notice_releases_the_reservation_at_once(start_server, memcached):
    """Budget 8 USD, a few USD an impression: the bids in flight hold it; a loss notice gives
    one back, so the campaign bids again; a second loss notice is a duplicate."""
    server = start_server("--campaigns", CATALOG, "--workers", "1", memcached=memcached.address)
    bids = bids_until_budget_refuses(server, country="CAN")
    bid = bids[0]
    assert "${AUCTION_LOSS}" in bid["lurl"] and "${AUCTION_PRICE}" in bid["lurl"]
    lurl = notice_path(bid["lurl"], "9000").replace("${AUCTION_LOSS}", "102")
    status, _, body = server.request("GET", lurl)
    assert status == 200 and json.loads(body)["status"] == "booked"
    assert json.loads(server.request("GET", lurl)[2])["status"] == "duplicate"
    assert server.bid(site_request(country="CAN"))[0] == 200
    assert 'bidder_loss_notices_total{reason="102"} 1.0' in server.metrics()
