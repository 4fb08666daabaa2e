"""The balanced worker's inline mode tells the app when its request was seen, so time spent
queued behind other requests counts against the deadline."""
from __future__ import annotations

import http.client
import json


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
