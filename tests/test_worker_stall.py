"""A client that stalls mid-request must not hold up the other connections of its worker: with
``--threads 1`` the balanced worker hands a connection to the parser only once its request is
whole (``server_hooks.framing.arrival``). Real ``bidder serve`` with one worker, real sockets."""
from __future__ import annotations

import gzip
import http.client
import json
import socket
import threading
import time

import pytest

from server_hooks.framing import ARRIVAL_S, Arrival, arrival
from tests.conftest import launch_server

BODY = json.dumps({
    "id": "stall-1", "tmax": 200,
    "imp": [{"id": "1", "banner": {"format": [{"w": 300, "h": 250}]}, "bidfloor": 0.01}],
    "site": {"id": "s1", "domain": "news.example", "page": "https://news.example/a"},
    "device": {"devicetype": 2, "os": "Windows", "geo": {"country": "JPN"}},
}).encode()
HEAD = (b"POST /openrtb2/bid HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(BODY))
ANSWERED = (200, 204)  # bid or no-bid: either is the bid path's normal answer


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = launch_server(tmp_path_factory.mktemp("stall"), "--workers", "1")
    yield srv
    srv.stop()


def connect(server, timeout: float = 10.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=timeout)


def response(sock: socket.socket) -> tuple[int, bytes]:
    """Read one response (skipping 1xx) from a raw socket, leaving the connection usable."""
    resp = http.client.HTTPResponse(sock)
    resp.begin()
    return resp.status, resp.read()


def bid_latencies(server, seconds: float, connections: int = 3) -> list[float]:
    """Seconds each bid request took on ``connections`` keep-alive connections, every 20 ms."""
    conns = [http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
             for _ in range(connections)]
    latencies = []
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            for conn in conns:
                started = time.monotonic()
                conn.request("POST", "/openrtb2/bid", BODY, {"Content-Type": "application/json"})
                resp = conn.getresponse()
                resp.read()
                assert resp.status in ANSWERED
                latencies.append(time.monotonic() - started)
            time.sleep(0.02)
    finally:
        for conn in conns:
            conn.close()
    return latencies


@pytest.mark.parametrize("partial", [HEAD[:HEAD.index(b"Content-Ty") + 10], HEAD + BODY[:7]],
                         ids=["mid-headers", "mid-body"])
def test_stalled_client_delays_no_other_connection_and_is_closed(server, partial):
    stalled = connect(server)
    try:
        stalled.sendall(partial)
        stalled_at = time.monotonic()
        latencies = bid_latencies(server, 1.5)
        assert len(latencies) > 30 and max(latencies) < 0.2, max(latencies)
        # ... and the stalled request itself is answered 408, then closed, after ARRIVAL_S
        answer = b""
        while chunk := stalled.recv(4096):
            answer += chunk
        waited = time.monotonic() - stalled_at
    finally:
        stalled.close()
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert ARRIVAL_S - 0.1 < waited < ARRIVAL_S + 1.0, waited


def test_body_in_two_parts_gets_its_answer_and_blocks_no_one(server):
    sock = connect(server)
    try:
        sock.sendall(HEAD + BODY[:40])
        others = bid_latencies(server, 0.3, connections=1)  # while the rest is on its way
        sock.sendall(BODY[40:])
        status, _ = response(sock)
        sock.sendall(HEAD + BODY)  # still a keep-alive connection
        again, _ = response(sock)
    finally:
        sock.close()
    assert status in ANSWERED and again in ANSWERED
    assert max(others) < 0.2, others


def test_chunked_body_sent_in_pieces(server):
    sock = connect(server)
    try:
        sock.sendall(b"POST /openrtb2/bid HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        for piece in (BODY[:50], BODY[50:]):
            time.sleep(0.1)
            sock.sendall(b"%x;ext=1\r\n%s\r\n" % (len(piece), piece))
        time.sleep(0.1)
        sock.sendall(b"0\r\n")
        time.sleep(0.1)
        sock.sendall(b"\r\n")
        status, _ = response(sock)
    finally:
        sock.close()
    assert status in ANSWERED


CHUNKED = (HEAD.replace(b"Content-Length: %d" % len(BODY), b"Transfer-Encoding: chunked"),
           b"%x\r\n%s\r\n0\r\n\r\n" % (len(BODY), BODY))


@pytest.mark.parametrize("head, body", [(HEAD, BODY), CHUNKED], ids=["length", "chunked"])
def test_expect_100_continue_gets_one_100_then_the_answer(server, head, body):
    sock = connect(server)
    try:
        sock.sendall(head.replace(b"Host: x\r\n", b"Host: x\r\nExpect: 100-continue\r\n"))
        sock.settimeout(0.5)  # a client waiting for the 100 before it sends the body (curl: 1 s)
        interim = sock.recv(4096)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.settimeout(10.0)
        sock.sendall(body)
        rest = b""
        while b"\r\n\r\n" not in rest:
            rest += sock.recv(4096)
    finally:
        sock.close()
    assert rest.startswith((b"HTTP/1.1 200 ", b"HTTP/1.1 204 ")), rest  # no second 100


def test_pipelined_http10_and_gzip_requests(server):
    zipped = gzip.compress(BODY)
    gz_head = HEAD.replace(b"Content-Length: %d" % len(BODY),
                           b"Content-Length: %d\r\nContent-Encoding: gzip" % len(zipped))
    sock = connect(server)
    try:
        sock.sendall(HEAD + BODY + gz_head + zipped[:10])  # one whole request, one partial
        first, _ = response(sock)
        sock.sendall(zipped[10:])
        second, _ = response(sock)
    finally:
        sock.close()
    old = connect(server)
    try:
        old.sendall(HEAD.replace(b"HTTP/1.1", b"HTTP/1.0") + BODY[:20])
        time.sleep(0.1)
        old.sendall(BODY[20:])
        status, _ = response(old)
    finally:
        old.close()
    assert first in ANSWERED and second in ANSWERED and status in ANSWERED


def test_peer_gone_mid_request_leaves_the_worker_serving(server):
    for _ in range(3):
        sock = connect(server)
        sock.sendall(HEAD + BODY[:10])
        sock.close()
    sock = connect(server)
    sock.sendall(HEAD[:20])
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()  # reset
    assert max(bid_latencies(server, 0.2, connections=1)) < 0.2


def test_arrival_reads_the_framing():
    head, body = 200_000, 100_000
    assert arrival(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", head, body) == Arrival.READY
    assert arrival(b"GET / HTTP/1.1\r\nHost: x\r\n", head, body) == Arrival.MORE
    assert arrival(HEAD + BODY, head, body) == Arrival.READY
    assert arrival(HEAD + BODY[:-1], head, body) == Arrival.MORE
    assert arrival(HEAD.replace(b"Content-Length", b"cOnTeNt-LeNgTh") + BODY[:-1],
                   head, body) == Arrival.MORE
    assert arrival(HEAD + BODY + HEAD, head, body) == Arrival.READY  # the first request is whole
    expect = HEAD.replace(b"Host: x\r\n", b"Host: x\r\nExpect: 100-Continue\r\n")
    assert arrival(expect, head, body) == Arrival.CONTINUE
    assert arrival(expect.replace(b"HTTP/1.1", b"HTTP/1.0"), head, body) == Arrival.MORE
    chunked = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert arrival(chunked.replace(b"\r\n\r\n", b"\r\nExpect: 100-continue\r\n\r\n"),
                   head, body) == Arrival.CONTINUE
    assert arrival(chunked + b"5\r\nhello\r\n0\r\n\r\n", head, body) == Arrival.READY
    assert arrival(chunked + b"5\r\nhello\r\n0\r\nX-T: 1\r\n\r\n", head, body) == Arrival.READY
    assert arrival(chunked + b"5\r\nhello\r\n0\r\n", head, body) == Arrival.MORE
    assert arrival(chunked + b"5\r\n0\r\n\r\n", head, body) == Arrival.MORE  # "0\r\n\r\n" is data here
    # a head over the limit goes to the parser, which rejects it from the bytes at hand
    assert arrival(b"GET /" + b"a" * head, head, body) == Arrival.READY
    # framing no more bytes can fix is refused by the check itself: the parser would wait
    assert arrival(HEAD.replace(b"%d" % len(BODY), b"x1"), head, body) == Arrival.MALFORMED
    assert arrival(HEAD.replace(b"%d" % len(BODY), b"-1"), head, body) == Arrival.MALFORMED
    assert arrival(HEAD.replace(b"%d" % len(BODY), b"%d" % (body + 1)), head, body) == Arrival.TOO_LARGE
    assert arrival(chunked + b"zz\r\n", head, body) == Arrival.MALFORMED
    assert arrival(chunked + b"\x1f\x8b\x08", head, body) == Arrival.MALFORMED  # gzip bytes, not chunks
    assert arrival(chunked + b"1f", head, body) == Arrival.MORE  # a size line still arriving
    assert arrival(chunked + b"-2\r\n", head, body) == Arrival.MALFORMED
    assert arrival(chunked + b"0" * 1100, head, body) == Arrival.MALFORMED  # a chunk-size line that long
    assert arrival(chunked + b"%x\r\n{" % (body + 1), head, body) == Arrival.TOO_LARGE
    assert arrival(chunked + b"2\r\n{}XX0\r\n\r\n", head, body) == Arrival.MALFORMED  # no CRLF
    identity = HEAD.replace(b"Host: x\r\n", b"Host: x\r\nTransfer-Encoding: identity\r\n")
    assert arrival(identity, head, body) == Arrival.MALFORMED  # RFC 9112 6.3


@pytest.mark.parametrize("framing", [
    b"Transfer-Encoding: chunked\r\n\r\n20000\r\n{\"id\":",  # a chunk over the limit
    b"Transfer-Encoding: identity\r\nContent-Length: 100\r\n\r\n{\"id\":",
    b"Transfer-Encoding: chunked\r\n\r\n" + b"0" * 1100,  # an endless chunk-size line
    b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",  # not a chunk size
    b"Content-Length: 99999999\r\n\r\n{\"id\":",  # announced over the limit
])
def test_framing_that_cannot_come_right_is_refused_at_once(server, framing):
    """Review 3 (R2, R3): such bytes used to reach the parser, which then waited for the rest
    in the worker's only thread (1-3 s for everyone), or raised into the app (500)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        started = time.monotonic()
        sock.sendall(b"POST /openrtb2/bid HTTP/1.1\r\nHost: x\r\nContent-Type: "
                     b"application/json\r\n" + framing)
        answer = sock.recv(4096)
        took = time.monotonic() - started
    assert answer.startswith((b"HTTP/1.1 400", b"HTTP/1.1 413")), answer
    assert b"connection: close" in answer.lower() and b'{"error": ' in answer
    assert took < 0.2, f"{took:.2f} s"
    status = answer[9:12].decode()
    text = server.admin("GET", "/metrics")[2].decode()
    assert f'bidder_refused_requests_total{{status="{status}"}}' in text


def test_a_stalled_client_per_worker_stops_nothing(tmp_path):
    """The review's worst case: every worker holds a stalled client (two workers, two each)."""
    srv = launch_server(tmp_path, "--workers", "2")
    stalled = []
    try:
        for _ in range(4):
            sock = connect(srv)
            sock.sendall(HEAD + BODY[:7])
            stalled.append(sock)
        results: list[float] = []
        threads = [threading.Thread(target=lambda: results.extend(bid_latencies(srv, 1.0, 2)))
                   for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        for sock in stalled:
            sock.close()
        srv.stop()
    assert len(results) > 20 and max(results) < 0.2, max(results)


@pytest.mark.parametrize("chunks", [
    b"2;\x01\r\n{}\r\n0\r\n\r\n",  # a chunk extension the parser refuses
    b"2\r\n{}\r\n0\r\nbad trailer\r\n\r\n",  # a trailer line that is no header field
])
def test_framing_the_parser_refuses_is_a_400_not_a_500(server, chunks):
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"POST /openrtb2/bid HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                     b"\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks)
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 400"), answer
