"""The balanced worker's inline mode tells the app when its request was seen, so time spent
queued behind other requests counts against the deadline."""
from __future__ import annotations

import http.client
import json
import os
import signal
import time


def test_queued_time_counts_from_when_the_poller_saw_the_request(start_server):
    server = start_server("--workers", "1", "--app", "tests.apps.slow_echo:app")
    status, _, body = server.request("GET", "/")
    first = json.loads(body)
    assert status == 200 and first["ready_at"] is not None and 0.0 <= first["waited_s"] < 1.0

    conns = [http.client.HTTPConnection("127.0.0.1", server.port, timeout=10) for _ in range(12)]
    for conn in conns:  # open and warm every connection: exchanges hold keep-alive connections
        conn.request("GET", "/")
        conn.getresponse().read()
    for conn in conns:  # every request is on the wire before the first answer is read
        conn.request("GET", "/")
    waits = [json.loads(conn.getresponse().read())["waited_s"] for conn in conns]
    # 12 requests of 20 ms on one worker: the last ones waited for the others, and say so
    assert max(waits) >= 0.1, waits
    for conn in conns:
        conn.close()


def test_a_request_that_came_before_its_connection_was_accepted_keeps_its_arrival(start_server):
    """The kernel stamps arriving bytes only while some socket asks for it. The worker asks
    on its listeners for its whole life: bytes sent on a new connection after a quiet moment
    (no stamped connection open), while the worker could not accept it, still carry their
    time. Without that they came unstamped, counted as seen when the worker got to them, and
    sorted after requests that came later."""
    server = start_server("--workers", "1", "--app", "tests.apps.slow_echo:app")
    server.request("GET", "/")  # its connection is closed: none open now
    time.sleep(0.5)  # the kernel turns stamping off from a work queue
    worker = server.worker_pids()[0]
    os.kill(worker, signal.SIGSTOP)  # busy elsewhere: the connection waits in the backlog
    try:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        conn.request("GET", "/?sleep=0")
        time.sleep(0.2)
    finally:
        os.kill(worker, signal.SIGCONT)
    answer = json.loads(conn.getresponse().read())
    conn.close()
    assert answer["waited_s"] >= 0.15, answer  # from the kernel's time, not the worker's
