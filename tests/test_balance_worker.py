"""BalancedThreadWorker end to end (``bidder serve``, real Gunicorn): keep-alive connections end up
evenly spread over the workers, also after a worker is killed, with 1 worker and with --no-pin."""
from __future__ import annotations

import http.client
import os
import signal
import time
from collections import Counter

import pytest

APP = ("--app", "loadtests.balance:app")


class Pool:
    """N keep-alive connections, reopened when the server closes or drops them (a client pool)."""

    def __init__(self, port: int, size: int):
        self.conns = [http.client.HTTPConnection("127.0.0.1", port, timeout=5) for _ in range(size)]
        for conn in self.conns:
            conn.connect()  # all opened at once, before any request

    def round(self) -> list[int]:
        """One request on every connection; the pid of the worker that answered each."""
        pids = []
        for conn in self.conns:
            for attempt in range(3):
                try:
                    conn.request("GET", "/")
                    response = conn.getresponse()
                    pids.append(int(response.read()))
                    if response.will_close:
                        conn.close()
                    break
                except (OSError, http.client.HTTPException):
                    conn.close()  # reopened by the next request
                    if attempt == 2:
                        raise
        return pids

    def spread(self, seconds: float) -> Counter:
        deadline = time.monotonic() + seconds
        pids: list[int] = []
        while time.monotonic() < deadline:
            pids = self.round()
            time.sleep(0.005)
        return Counter(pids)

    def close(self) -> None:
        for conn in self.conns:
            conn.close()


def up(server, count: int) -> list[int]:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        pids = server.worker_pids()
        if len(pids) == count and all(f"pid={p} " in server.log() for p in pids):
            return pids
        time.sleep(0.05)
    raise AssertionError(server.log())


@pytest.mark.parametrize("pin", ["--pin", "--no-pin"])
def test_eight_connections_split_four_four(start_server, pin):
    server = start_server("--workers", "2", pin, *APP)
    pids = up(server, 2)
    pool = Pool(server.port, 8)
    try:
        spread = pool.spread(0.5)
    finally:
        pool.close()
    assert sorted(spread.values()) == [4, 4] and set(spread) == set(pids), spread


def test_killed_worker_replacement_gets_its_share_back(start_server):
    server = start_server("--workers", "2", *APP)
    pids = up(server, 2)
    pool = Pool(server.port, 8)
    try:
        assert sorted(pool.spread(0.3).values()) == [4, 4]
        os.kill(pids[0], signal.SIGKILL)
        spread = pool.spread(0.3)  # the dead worker's connections are reopened on the survivor
        live = up(server, 2)
        spread = pool.spread(1.5)  # ... which sheds them, one at a time, to the replacement
    finally:
        pool.close()
    assert set(spread) == set(live) and sorted(spread.values()) == [4, 4], spread
    assert "Worker (pid:%d) was sent SIGKILL" % pids[0] in server.log()


def test_one_worker_serves_every_connection(start_server):
    server = start_server("--workers", "1", *APP)
    pid, = up(server, 1)
    pool = Pool(server.port, 8)
    try:
        spread = pool.spread(0.3)
    finally:
        pool.close()
    assert spread == Counter({pid: 8})


def test_new_connections_never_wait_for_a_turn(start_server):
    """Connections opened one by one (kept open) alternate between workers; none waits long for
    the worker whose turn it is to notice (it re-reads the board every RECHECK_S)."""
    server = start_server("--workers", "2", *APP)
    pids = up(server, 2)
    held, waits, owners = [], [], []
    try:
        for _ in range(12):
            started = time.perf_counter()
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
            conn.request("GET", "/")
            owners.append(int(conn.getresponse().read()))
            waits.append(time.perf_counter() - started)
            held.append(conn)
    finally:
        for conn in held:
            conn.close()
    assert Counter(owners) == Counter({pids[0]: 6, pids[1]: 6})
    assert max(waits) < 0.25, waits
