"""Eligibility and imp plans cached by request shape: the same answers as computed afresh,
and a budget that runs out stops its campaign on the very next request of a cached shape."""
from __future__ import annotations

import gzip
import random

import msgspec
import pytest

from bidder import catalog as catalog_mod
from bidder.auction import Auction, ImpPlan, NoBid
from bidder.currency import Rates
from bidder.budget import Budgets
from bidder.ledger import TOTAL, Notice, open_ledger
from bidder.notices import NoticeSigner
from bidder.openrtb import decode_request
from bidder.settings import BY_NAME
from loadtests import traffic
from tests.test_bid_http import CATALOG, site_request

RATES = Rates.parse(BY_NAME["currency_rates"].default)


def auction(path: str | None = None, ledger: str = ":memory:") -> Auction:
    catalog = catalog_mod.load(path, RATES)
    budgets = Budgets(catalog, RATES, lambda: open_ledger(ledger))
    # refilled here, a round at a time: its thread, started with it, must not refill at once
    # (two first rounds opened the ledger together: "database is locked" on a new file)
    budgets.leases.stop()
    budgets.leases.refill()  # leased, as a worker is before it is ready: budgets do not vary
    return Auction(catalog, RATES, NoticeSigner("http://bidder", "s"), budgets)


def decoded(n: int, mix: str, seed: int) -> list:
    out = []
    for body, headers in traffic.generate(n, traffic.Mix.parse(mix), seed):
        if headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        out.append(decode_request(body))
    return out


def plans_of(a: Auction, r) -> list:
    """Eligibility and every imp plan, in a comparable form."""
    campaigns = a.eligible_campaigns(r)
    if isinstance(campaigns, NoBid):
        return [campaigns]
    return [campaigns] + [
        p if isinstance(p, NoBid) else
        (p.imp.id, p.campaigns, p.candidates.rows.tolist(), sorted(p.deal_of))
        for p in a.plan_imps(r, campaigns)]


@pytest.mark.parametrize("mix", ["", "blocks=0.9,deal=0.5,multi_imp=0.6,app=0.5,eur=0.3"])
def test_cached_answers_equal_fresh_ones_over_realistic_traffic(mix):
    requests = decoded(1500, mix, seed=3)
    warm, cold = auction(), auction()
    caches = (cold._targeting_user, cold._inventory, cold._blocks, cold._seats, cold._plans)
    random.Random(1).shuffle(requests)
    for r in requests + requests:  # the second pass answers from the cache
        for cache in caches:
            cache.clear()
        assert plans_of(warm, r) == plans_of(cold, r), r
    for cache in (warm._targeting_user, warm._inventory):
        assert 0 < len(cache) < len(requests) / 3  # these filters' shapes are few
    assert warm._blocks and warm._plans


def test_requests_that_differ_in_what_eligibility_reads_are_not_confused():
    a = auction(CATALOG)
    base = site_request(country="JPN")
    variants = [base, site_request(country="USA"), site_request(bcat=["IAB18"]),
                site_request(badv=["shoes.example"]), site_request(wseat=["nobody"]),
                site_request(site={"page": "https://bad.example/x"}),
                site_request(device={"devicetype": 3, "os": "Windows", "geo": {"country": "JPN"}}),
                site_request(bcat=["IAB18"], cattax=2)]
    answers = []
    for req in variants:
        r = decode_request(msgspec.json.encode(req))
        answers.append(plans_of(a, r))
        a_fresh = auction(CATALOG)
        assert answers[-1] == plans_of(a_fresh, r), req
    assert all(answer != answers[0] for answer in answers[1:])  # each differs from the base


def test_an_exhausted_budget_stops_its_campaign_on_the_next_request_of_a_cached_shape(tmp_path):
    spec = str(tmp_path / "ledger.sqlite3")
    a = auction(CATALOG, spec)
    r = decode_request(msgspec.json.encode(site_request(country="CAN")))
    budgeted = 1 << a.catalog.index["budgeted"]
    for _ in range(2):  # cached after the first
        campaigns = a.eligible_campaigns(r)
        assert campaigns & budgeted
        [plan] = a.plan_imps(r, campaigns)
        assert isinstance(plan, ImpPlan) and plan.campaigns & budgeted
    limit = a.catalog.budget_micros[a.catalog.index["budgeted"]]
    ledger = open_ledger(spec)  # another host books a bill of this worker's for the budget
    ledger.record(Notice("billing", "b1", "budgeted", "cr", "1", "", limit * 1000, "USD", False,
                         a.budgets.holder), (TOTAL,))
    ledger.close()
    a.budgets.leases.refill()  # the next refill reads it back
    assert a.eligible_campaigns(r) == NoBid("budget_exhausted")
