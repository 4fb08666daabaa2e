"""The bid path's batched metrics (``bidder.metrics.Tally``): what reaches the exposition is
what direct increments and ``observe()`` calls would have written, and it gets there without
anyone asking (the flusher thread), at most ``FLUSH_S`` late."""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram

from bidder import metrics

BUCKETS = (0.001, 0.01, 0.1)


def _values(registry: CollectorRegistry, prefix: str) -> dict[tuple, float]:
    return {(s.name.removeprefix(prefix), tuple(sorted(s.labels.items()))): s.value
            for m in registry.collect() for s in m.samples if not s.name.endswith("_created")}


def test_flushed_tally_exposes_what_direct_writes_would():
    direct, batched = CollectorRegistry(), CollectorRegistry()
    made = {}
    for name, registry in (("direct", direct), ("batched", batched)):
        made[name] = (Counter(f"{name}_requests", "r", ["status"], registry=registry),
                      Histogram(f"{name}_latency", "l", buckets=BUCKETS, registry=registry))
    tally = metrics.Tally(made["batched"][1])
    latencies = [0.0, 0.0005, 0.001, 0.0011, 0.05, 0.1, 0.5, 7.0]  # edges, inside, past the last
    for i, seconds in enumerate(latencies):
        status = "200" if i % 3 else "204"
        made["direct"][0].labels(status).inc()
        made["direct"][1].observe(seconds)
        tally.inc(made["batched"][0].labels(status))
        tally.observe(seconds)
    made["direct"][0].labels("200").inc(2.5)
    tally.inc(made["batched"][0].labels("200"), 2.5)
    tally.flush()
    assert _values(batched, "batched_") == _values(direct, "direct_")
    assert _values(batched, "batched_")[("latency_bucket", (("le", "0.001"),))] == 3
    tally.flush()  # nothing pending: nothing written twice
    assert _values(batched, "batched_") == _values(direct, "direct_")


def test_pending_counts_are_written_without_a_flush_call():
    registry = CollectorRegistry()
    counter = Counter("c", "c", registry=registry)
    tally = metrics.Tally(Histogram("h", "h", buckets=BUCKETS, registry=registry))
    tally.inc(counter, 3)
    assert registry.get_sample_value("c_total") == 0  # not yet: no write per increment
    deadline = time.monotonic() + 20 * metrics.FLUSH_S
    while registry.get_sample_value("c_total") != 3 and time.monotonic() < deadline:
        time.sleep(metrics.FLUSH_S / 4)
    assert registry.get_sample_value("c_total") == 3
