"""Money across a fleet: three ``bidder serve`` hosts on one private PostgreSQL ledger, an
exchange routing notices to random hosts and retrying a fifth of billing notices on another
host (loadtests/fleet.py). Exactly once, the budget spent and not passed; the same with a
host SIGKILLed mid-run."""
from __future__ import annotations

import argparse
import socket
import threading

import pytest

from loadtests.fleet import Bid, Exchange, report, run_fleet
from tests.fakes import LoopbackServer


def fleet_args(**overrides) -> argparse.Namespace:
    args = dict(hosts=3, workers=1, ledger="postgresql", budget=0.8, rate=120.0, duration=25.0,
                win_share=0.5, retry_share=0.2, notice_delay=0.5, kill_at=None, lease_ttl_s=2.0,
                seed=3, out=None)
    args.update(overrides)
    return argparse.Namespace(**args)


@pytest.mark.parametrize("kill_at", [None, 1.5], ids=["three-hosts", "one-host-killed"])
def test_a_fleet_books_each_notice_once_and_spends_its_budget(kill_at):
    args = fleet_args(kill_at=kill_at)
    r = run_fleet(args, say=lambda message: None)
    print(report(r))
    assert r.billing_retries > 10 and r.failed == 0 and r.refused == 0
    # exactly once: a host SIGKILLed between its commit and its answer leaves a booking the
    # exchange never heard of; its retry elsewhere is a duplicate, and the ledger holds it once
    assert r.double_bookings == 0
    assert r.booked + r.booked_unanswered == r.wins == r.ledger_billings
    assert r.duplicates == r.billing_retries + r.booked_unanswered
    if kill_at is None:
        assert r.booked_unanswered == 0
    # the ledger books what the exchange billed (each cost rounded down to the micro)
    assert 0 <= r.exchange_spend_usd - r.spend_usd <= r.wins * 1e-6
    assert r.spend_usd <= 1.02 * args.budget + r.max_impression_usd
    assert r.spend_usd >= 0.8 * args.budget  # spent, not stranded (a dead host's lease too)
    assert r.nobids.get("budget_exhausted", 0) > 0
    if kill_at is not None:
        assert r.killed_host is not None and r.rerouted > 0


class _Host(LoopbackServer):
    """A host that reads one request and answers ``answer`` (then closes)."""

    def __init__(self, answer: bytes) -> None:
        self.answer = answer
        super().__init__()

    def serve(self, conn: socket.socket) -> None:
        with conn:
            conn.recv(65536)
            conn.sendall(self.answer)


def test_a_billing_answer_cut_off_by_a_dying_host_is_retried_elsewhere_and_counted():
    """A host killed between its answer's head and its body (notices take Gunicorn's path, two
    writes): the exchange stand-in tries another host and counts the answer lost, instead of
    its sender thread dying with the notices queued behind it."""
    dying = _Host(b"HTTP/1.1 200 OK\r\nContent-Length: 44\r\n\r\n")
    body = b'{"status": "duplicate"}'
    healthy = _Host(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                    % (len(body), body))
    exchange = Exchange([dying, healthy], fleet_args(hosts=2))
    bid = Bid("b1", 0, 0.0, 1.0, "http://h/notice/billing?x=1", "", "", won=True)
    exchange.send_notice({}, "billing", bid.burl, bid, 0)
    assert bid.lost_answers == 1 and bid.billing == ["duplicate"]
    assert exchange.result.duplicates == 1 and exchange.result.failed == 0
    dying.close()
    healthy.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_crashed_exchange_thread_is_reported_not_silently_short():
    exchange = Exchange([], fleet_args(hosts=0))

    def broken() -> None:
        raise ValueError("boom")

    thread = threading.Thread(target=exchange.guarded(broken))
    thread.start()
    thread.join()
    assert exchange.crashed == ["broken: ValueError('boom')"]
