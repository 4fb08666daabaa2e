"""Notices, budgets and frequency caps (nothing lost or counted twice); memcached faults."""
from __future__ import annotations

import gzip
import http.client
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from urllib.parse import urlsplit

import pytest
from pymemcache.client.base import Client

from bidder.featurestore import frequency_key, pending_key, user_key
from bidder.ledger import open_ledger
from loadtests.memcached_proc import EmbeddedMemcached
from bidder.seed import seed_users
from tests.test_bid_http import CATALOG, bids_of, site_request


def notice_path(url: str, price: str) -> str:
    parts = urlsplit(url.replace("${AUCTION_PRICE}", price))
    return f"{parts.path}?{parts.query}"


def one_bid(server, **kwargs) -> dict:
    status, headers, body = server.bid(site_request(**kwargs))
    assert status == 200, (headers.get("x-nobid-reason"), body)
    return bids_of(body)[0]


def test_notices_are_booked_once_and_forgeries_refused(start_server, memcached):
    server = start_server("--campaigns", CATALOG, "--workers", "2", memcached=memcached.address)
    bid = one_bid(server)
    price = f"{bid['price'] * 0.5:.6f}"
    win = notice_path(bid["nurl"], price)
    billing = notice_path(bid["burl"], price)
    assert json.loads(server.request("GET", win)[2])["status"] == "booked"
    # the exchange retries: the same billing notice many times, concurrently, on both workers
    results: list[str] = []

    def send() -> None:
        results.append(json.loads(server.request("GET", billing)[2])["status"])
    threads = [threading.Thread(target=send) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["booked"] + ["duplicate"] * 11

    ledger = open_ledger(os.path.join(server.workdir, "ledger.sqlite3"))
    expected_micros = round(float(price) * 1_000_000) // 1000
    assert ledger.spend() == {"jp-shoes": expected_micros}
    assert ledger.count("billing") == 1 and ledger.count("win") == 1
    ledger.close()

    tampered = billing.replace("c=jp-shoes", "c=us-autos")
    status, _, body = server.request("GET", tampered)
    assert status == 400 and "signature" in json.loads(body)["error"]
    not_ours = re.sub(r"([?&]s=)[^&]*", r"\1%C3%A9", billing)  # a signature that is not hex
    status, _, body = server.request("GET", not_ours)
    assert status == 400 and "signature" in json.loads(body)["error"]  # was a 500
    status, _, body = server.request("GET", notice_path(bid["burl"], "${AUCTION_PRICE}"))
    assert status == 400 and "macro" in json.loads(body)["error"]
    status, _, body = server.request("GET", notice_path(bid["burl"], f"{bid['price'] * 2}"))
    assert status == 400 and "above our bid" in json.loads(body)["error"]
    status, _, _ = server.request("GET", notice_path(bid["burl"], "abc"))
    assert status == 400
    assert server.request("GET", "/notice/refund?b=1")[0] == 404
    _, _, metrics = server.admin("GET", "/metrics")
    booked = re.search(rb'bidder_spend_micros_total\{campaign="jp-shoes"\} (\S+)', metrics)
    assert booked and float(booked.group(1)) == expected_micros


def test_test_requests_are_never_billed(start_server, memcached):
    server = start_server("--campaigns", CATALOG, memcached=memcached.address)
    bid = one_bid(server, test=1)
    assert server.request("GET", notice_path(bid["burl"], "1.0"))[0] == 200
    ledger = open_ledger(os.path.join(server.workdir, "ledger.sqlite3"))
    assert ledger.count("billing") == 1 and ledger.spend() == {}
    ledger.close()


def bids_until_budget_refuses(server, **request) -> list[dict]:
    """Bid until the budget refuses (``budget_exhausted``): the bids it allowed. Pacing pauses
    (the first slice is 1 % of the budget, under one impression: the refill then leases what
    the bid needed) are waited out."""
    bids: list[dict] = []
    for _ in range(40):
        status, headers, body = server.bid(site_request(**request))
        if status == 200:
            bids += bids_of(body)
        elif headers["x-nobid-reason"] == "budget_exhausted":
            return bids
        else:
            assert headers["x-nobid-reason"] == "budget_paced"
            time.sleep(0.2)
    raise AssertionError(f"the budget never refused: {[(b['cid'], b['price']) for b in bids]} {headers} "
                         f"{server.admin('GET', '/readyz')[2]!r}\n{server.log()[-3000:]}")


def reservation_micros(price: float) -> int:
    """What a bid at ``price`` USD CPM reserves: its most costly bill, a cent CPM over."""
    return round((price + 0.01) * 1_000_000) // 1000 + 1


def test_budget_reserved_at_bid_time_stops_the_campaign_before_its_bill(start_server, memcached):
    """The budget (8 USD) holds as many impressions as their reservations fit (this campaign
    bids a few USD an impression, the price depending on the hour): bids reserve it, so the
    next bid is refused at once, before any billing notice."""
    server = start_server("--campaigns", CATALOG, "--workers", "1", memcached=memcached.address)
    bids = bids_until_budget_refuses(server, country="CAN")
    assert bids and {b["cid"] for b in bids} == {"budgeted"}
    assert len(bids) == 8_000_000 // reservation_micros(bids[0]["price"])
    for bid in bids:
        assert server.request("GET", notice_path(bid["burl"], f"{bid['price']:.6f}"))[0] == 200
    status, headers, _ = server.bid(site_request(country="CAN"))
    assert status == 204 and headers["x-nobid-reason"] == "budget_exhausted"
    assert server.bid(site_request(country="JPN"))[0] == 200  # other campaigns keep bidding


def test_frequency_cap_counts_bids_in_flight_and_billed_impressions(start_server, memcached):
    """Cap of 1: a bid in flight holds the user's one impression until its loss notice frees
    it; a billed impression holds it for the window, counted once however often it is sent."""
    server = start_server("--campaigns", CATALOG, "--memcached-timeout-ms", "100",
                          memcached=memcached.address)
    user = {"id": "freq-user-1"}
    lost = one_bid(server, country="FRA", user=user)
    assert lost["cid"] == "capped"
    status, headers, _ = server.bid(site_request(country="FRA", user=user))
    assert status == 204 and headers["x-nobid-reason"] == "frequency_capped"  # in flight
    assert server.request("GET", notice_path(lost["lurl"], "2.0").replace(
        "${AUCTION_LOSS}", "102"))[0] == 200
    bid = one_bid(server, country="FRA", user=user)  # the loss released it
    # a win alone books nothing: the cap counts billed impressions (and this bid is in flight)
    assert server.request("GET", notice_path(bid["nurl"], "1.0"))[0] == 200
    for _ in range(3):  # the exchange retries the billing notice: counted once
        assert server.request("GET", notice_path(bid["burl"], "1.0"))[0] == 200
    status, headers, _ = server.bid(site_request(country="FRA", user=user))
    assert status == 204 and headers["x-nobid-reason"] == "frequency_capped"
    assert server.bid(site_request(country="FRA", user={"id": "another-user"}))[0] == 200
    client = Client(("127.0.0.1", memcached.port))
    keys = [key("capped", user_key("freq-user-1")) for key in (frequency_key, pending_key)]
    assert [int(client.get(k)) for k in keys] == [1, 0]  # one billed, none in flight
    client.close()


def test_memcached_down_degrades_to_default_features(start_server, tmp_path):
    mc = EmbeddedMemcached(memory_mb=16).start()
    seed_users(mc.address, 50, progress=False)
    try:
        server = start_server("--campaigns", CATALOG, "--workers", "2",
                              "--memcached-retry-ms", "200", memcached=mc.address)
        assert server.bid(site_request())[0] == 200
        mc.stop()
        started = time.monotonic()
        statuses = [server.bid(site_request())[0] for _ in range(50)]
        assert set(statuses) == {200}
        assert (time.monotonic() - started) / 50 < 0.05
        # a frequency-capped campaign cannot know its count: it sits out rather than overserve
        status, headers, _ = server.bid(site_request(country="FRA"))
        assert status == 204 and headers["x-nobid-reason"] == "frequency_unknown"
        status, _, body = server.admin("GET", "/readyz")
        ready = json.loads(body)
        assert status == 200 and ready["ready"] is True  # memcached only degrades
        assert "Traceback" not in server.log()
        assert 'bidder_feature_store_lookups_total{outcome="error"}' in server.metrics()
    finally:
        mc.stop()


def test_memcached_that_hangs_costs_at_most_its_timeout(start_server):
    """A memcached that accepts but never answers (SIGSTOP): answers stay inside tmax."""
    mc = EmbeddedMemcached(memory_mb=16).start()
    try:
        server = start_server("--campaigns", CATALOG, "--workers", "1",
                              "--memcached-timeout-ms", "5", "--memcached-retry-ms", "300",
                              memcached=mc.address)
        assert server.bid(site_request())[0] == 200
        os.kill(mc.process.pid, signal.SIGSTOP)
        worst = 0.0
        for _ in range(30):
            started = time.monotonic()
            status, _, _ = server.bid(site_request(tmax=50))
            worst = max(worst, time.monotonic() - started)
            assert status == 200
        assert worst < 0.045, worst
    finally:
        os.kill(mc.process.pid, signal.SIGCONT)
        mc.stop()


def test_invalid_catalog_is_refused_at_start_naming_campaign_and_field(tmp_path):
    catalog = json.load(open(CATALOG))
    catalog["campaigns"][1]["value_per_click"] = -1
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(catalog))
    cmd = [sys.executable, "-m", "bidder.cli", "serve", "--campaigns", str(bad),
           "--memcached", "none", "--bind", "127.0.0.1:0", "--ledger", str(tmp_path / "l.db")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "us-autos" in result.stderr and "value_per_click" in result.stderr
    catalog["campaigns"][0]["creatives"][0]["w"] = "wide"
    bad.write_text(json.dumps(catalog))
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "jp-shoes" in result.stderr and "w" in result.stderr


def test_port_in_use_and_bad_memcached_address_say_what_to_do(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cmd = [sys.executable, "-m", "bidder.cli", "serve", "--bind", f"127.0.0.1:{port}",
               "--memcached", "none", "--ledger", str(tmp_path / "l.db")]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "already in use" in result.stderr
    assert "--bind" in result.stderr
    result = subprocess.run(
        [sys.executable, "-m", "bidder.cli", "serve", "--memcached", "localhost",
         "--bind", "127.0.0.1:0", "--ledger", str(tmp_path / "l.db")],
        capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "HOST:PORT" in result.stderr


def test_silent_and_stalled_clients_do_not_block_the_worker(start_server):
    """One worker serves every connection from one thread: a client that connects and says
    nothing, or stops half-way through a request, must not hold it up."""
    server = start_server("--campaigns", CATALOG, "--workers", "1")
    silent = socket.create_connection(("127.0.0.1", server.port))
    stalled = socket.create_connection(("127.0.0.1", server.port))
    stalled.sendall(b"POST /openrtb2/bid HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 500\r\n\r\n{\"id\":")
    try:
        time.sleep(0.2)
        started = time.monotonic()
        for _ in range(5):
            assert server.bid(site_request())[0] == 200
        assert time.monotonic() - started < 3.0
        assert server.request("GET", "/healthz")[0] == 200
    finally:
        silent.close()
        stalled.close()


def test_a_notice_waiting_on_the_ledger_does_not_hold_up_bids(start_server, memcached, tmp_path):
    """Review 3 (R4): notices are handled in the worker's pool thread, not inline with bids:
    while the ledger's write lock is held elsewhere (a backup, another process), a billing
    notice waits for it and bids on other connections are answered as usual."""
    ledger_path = tmp_path / "ledger.sqlite3"
    server = start_server("--workers", "1", "--ledger", str(ledger_path),
                          memcached=memcached.address)
    bid = one_bid(server)
    blocker = sqlite3.connect(ledger_path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # hold the write lock
    results: list[int] = []
    notice = threading.Thread(target=lambda: results.append(
        server.request("GET", notice_path(bid["burl"], "0.01"), timeout=10)[0]))
    notice.start()
    time.sleep(0.2)  # the notice is waiting on the lock now
    worst = 0.0
    for _ in range(10):
        started = time.monotonic()
        assert server.bid(site_request())[0] == 200
        worst = max(worst, time.monotonic() - started)
    assert notice.is_alive()  # still waiting: it was not answered by some shortcut
    blocker.execute("COMMIT")
    blocker.close()
    notice.join(10)
    assert results == [200]
    assert worst < 0.2, f"a bid took {worst * 1000:.0f} ms behind the waiting notice"


def test_bids_in_flight_for_one_user_pass_a_cap_by_at_most_the_workers_racing(start_server,
                                                                            memcached):
    """Cap 1, two workers, 12 bids at once for each of 8 users: a bid reserves a pending count
    before its answer, so at most one more bid than the cap per racing worker gets through."""
    server = start_server("--campaigns", CATALOG, "--workers", "2", "--memcached-timeout-ms", "100",
                          memcached=memcached.address)
    for n in range(8):
        user = {"id": f"racing-user-{n}"}
        answers: list[tuple[int, bytes]] = []

        def send() -> None:
            status, _, body = server.bid(site_request(country="FRA", user=user))
            answers.append((status, body))
        threads = [threading.Thread(target=send) for _ in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        capped = [b for status, body in answers if status == 200 for b in bids_of(body)
                  if b["cid"] == "capped"]
        assert 1 <= len(capped) <= 2, (user, len(capped))  # cap + (workers - 1)


@pytest.mark.parametrize("body", ["identity", "gzip", "charset"])
def test_requests_of_one_poll_share_a_round_trip_and_the_cap_still_holds(start_server,
                                                                          memcached, body):
    """Eight requests of one capped user (cap 1) reach a stopped worker together, so one poll
    serves them all: their look-ups take one memcached round trip, and the first bid's
    reservation counts for the rest of the poll, so exactly one of them bids. Alike for gzip
    bodies (the worker inflates them to read their tmax and hands the app that body) and for
    a Content-Type with a charset; before, each of those read its own look-ups: eight round
    trips."""
    server = start_server("--campaigns", CATALOG, "--workers", "1", "--fast-path",
                          memcached=memcached.address)  # the prefetch is the fast path's

    def post(payload: dict) -> bytes:
        data, fields = json.dumps(payload).encode(), b""
        if body == "gzip":
            data, fields = gzip.compress(data), b"\r\nContent-Encoding: gzip"
        elif body == "charset":
            fields = b"; charset=utf-8"
        return (b"POST /openrtb2/bid HTTP/1.1\r\nHost: bidder\r\nContent-Type: application/json"
                b"%s\r\nContent-Length: %d\r\n\r\n" % (fields, len(data)) + data)

    def answer(sock: socket.socket) -> tuple[int, str | None]:
        response = http.client.HTTPResponse(sock)
        response.begin()
        response.read()
        return response.status, response.getheader("X-Nobid-Reason")

    socks = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(8)]
    for n, s in enumerate(socks):  # each connection accepted and kept alive by the worker
        s.sendall(post(site_request(country="JPN", user={"id": f"warm-{n}"})))
        assert answer(s)[0] == 200
    before = re.search(r"^bidder_feature_store_round_trips_total (\S+)$", server.metrics(), re.M)
    worker = server.worker_pids()[0]
    for _ in range(100):  # idle in its poll, then stopped
        time.sleep(0.02)
        with open(f"/proc/{worker}/wchan") as f:
            if "poll" in f.read():
                break
    os.kill(worker, signal.SIGSTOP)
    try:
        for s in socks:
            s.sendall(post(site_request(country="FRA", user={"id": f"poll-user-{body}"})))
    finally:
        os.kill(worker, signal.SIGCONT)
    answers = [answer(s) for s in socks]
    for s in socks:
        s.close()
    assert sorted(status for status, _ in answers) == [200] + [204] * 7, answers
    assert {reason for status, reason in answers if status == 204} == {"frequency_capped"}
    after = re.search(r"^bidder_feature_store_round_trips_total (\S+)$", server.metrics(), re.M)
    assert float(after[1]) - float(before[1]) == 1.0
