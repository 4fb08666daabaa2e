"""The feature store against real memcached servers: serde, keys, sharding, counters, faults."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import deque

import pymemcache.serde
from pymemcache.client.base import Client

from bidder.featurestore import (FeatureStore, UserFeatures, frequency_key, parse_servers,
                                 pending_key, user_key)
from loadtests.memcached_proc import EmbeddedMemcached
from bidder.seed import seed_users
from models import world
from tests.fakes import GarbageServer

import pytest


def store_for(address: str, timeout_ms: float = 200.0) -> FeatureStore:
    return FeatureStore(parse_servers(address), 200.0, timeout_ms, 500.0)


def test_two_servers_shard_users_the_same_way_as_the_seeder():
    with EmbeddedMemcached(memory_mb=16) as a, EmbeddedMemcached(memory_mb=16) as b:
        both = f"{a.address},{b.address}"
        assert seed_users(both, 400, progress=False) == 400
        store = store_for(both)
        for n in range(0, 400, 7):
            features, counters = store.lookup([user_key(world.user_id(n))], [], 1.0)
            assert features.segments == list(world.user_segments(n)), n
            assert counters == {}
        # both servers hold a share of the users
        for server in (a, b):
            single = store_for(server.address)
            hits = sum(single.lookup([user_key(world.user_id(n))], [], 1.0)[0].segments != []
                       for n in range(200))
            assert 20 < hits < 180


def test_first_known_id_wins_and_missing_users_get_defaults(memcached):
    store = store_for(memcached.address)
    known = user_key(world.user_id(5))
    features, _ = store.lookup([user_key("nobody"), known], [], 1.0)
    assert features.segments == list(world.user_segments(5))
    features, counters = store.lookup([user_key("nobody")], [], 1.0)
    assert features == UserFeatures() and counters == {}


def test_unsafe_ids_are_hashed_into_valid_keys(memcached):
    store = store_for(memcached.address)
    for raw in ("with space", "ü-unicode", "x" * 400, "ctrl\x01char"):
        key = user_key(raw)
        assert len(key) < 250 and key.isascii() and " " not in key
        store.shard_of(key).client.set(key, UserFeatures([1, 2]))
        assert store.lookup([key], [], 1.0)[0].segments == [1, 2]


def test_frequency_counters_count_and_read_back(memcached):
    store = store_for(memcached.address)
    key = frequency_key("c1", user_key("freq-counter-user"))
    _, counters = store.lookup([user_key("freq-counter-user")], [key], 1.0)
    assert counters == {}
    for _ in range(3):
        store.count_impression(key, window_s=60)
    _, counters = store.lookup([user_key("freq-counter-user")], [key], 1.0)
    assert counters == {key: 3}


def test_counters_with_windows_over_30_days_are_kept(memcached):
    """memcached reads an exptime over 30 days as a Unix time: a 40-day window passed as is
    was a date in 1970, so the counter expired at once and the cap never held."""
    store = store_for(memcached.address)
    key = frequency_key("c1", user_key("long-window-user"))
    for _ in range(2):
        store.count_impression(key, window_s=40 * 86400)
    _, counters = store.lookup([user_key("long-window-user")], [key], 1.0)
    assert counters == {key: 2}


def test_down_server_and_too_little_time_give_unknown_counters():
    mc = EmbeddedMemcached(memory_mb=16).start()
    store = store_for(mc.address)
    assert store.lookup([user_key("u")], ["f:c:x"], 1.0)[1] == {}
    assert store.lookup([user_key("u")], ["f:c:x"], 0.0001)[1] is None  # no time to ask
    mc.stop()
    features, counters = store.lookup([user_key("u")], ["f:c:x"], 1.0)
    assert features == UserFeatures() and counters is None
    assert store.status()["ok"] is False and store.status()["last_error"]


@pytest.mark.parametrize("spec", ["localhost", "a:b", ":11211"])
def test_bad_server_addresses_are_refused_with_the_expected_form(spec):
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_servers(spec)


def test_a_shard_answering_garbage_costs_only_its_own_keys(memcached):
    """Review 3 (R6): a shard answering garbage failed every look-up; review 4 (N8): a failed
    shard's keys must be unknown, not re-homed to another shard, where a frequency counter
    would read 0 and let a capped user through."""
    garbage = GarbageServer()
    try:
        store = store_for(f"{memcached.address},{garbage.address}")
        on_healthy = {n for n in range(100)
                      if store.shard_of(user_key(world.user_id(n))).name == memcached.address}
        assert 20 < len(on_healthy) < 80
        for n in range(100):
            features, _ = store.lookup([user_key(world.user_id(n))], [], 1.0)
            assert features.segments == (list(world.user_segments(n)) if n in on_healthy
                                         else []), n
        counter = next(k for k in (frequency_key("c", user_key(f"u{i}")) for i in range(100))
                       if store.shard_of(k).name == garbage.address)
        _, counters = store.lookup([user_key(world.user_id(min(on_healthy)))], [counter], 1.0)
        assert counters == {counter: None}  # unknown: the capped campaign sits out
    finally:
        garbage.close()


def test_impressions_billed_while_memcached_is_down_are_counted_when_it_returns():
    """Review 3 (R9): a count that could not be written used to be lost, resetting the cap.
    The notice thread keeps it; the bid thread's next answered look-ups write it (review 4:
    each thread has its own store, so the kept queue is shared). Kept writes are replayed at
    least once: a timed-out incr memcached did apply counts twice, toward fewer impressions."""
    with EmbeddedMemcached(memory_mb=16) as mc:
        kept: deque = deque()
        notices = FeatureStore(parse_servers(mc.address), 200.0, 50.0, 500.0, kept)
        bids = FeatureStore(parse_servers(mc.address), 200.0, 50.0, 500.0, kept)
        key = frequency_key("capped", user_key("u-outage"))
        notices.count_impression(key, 600)
        mc.process.send_signal(signal.SIGSTOP)  # hung: writes time out
        time.sleep(0.05)  # stopped for sure (an incr that reached it would count twice)
        try:
            for _ in range(3):
                notices.count_impression(key, 600)
        finally:
            mc.process.send_signal(signal.SIGCONT)
        assert len(kept) == 3
        for _ in range(2):  # each answered look-up writes back a few kept impressions
            bids.lookup([user_key("u-outage")], [key], 1.0)
        assert not kept
        assert bids.lookup([user_key("u-outage")], [key], 1.0)[1] == {key: 4}


def test_a_unix_socket_server_is_seeded_and_read_like_a_tcp_one():
    """`--memcached unix:PATH` (a co-located memcached): the seeder and the bid path agree."""
    with EmbeddedMemcached(memory_mb=16, unix_socket=True) as mc:
        assert mc.address.startswith("unix:/") and parse_servers(mc.address) == [mc.socket_path]
        seeded = subprocess.run([sys.executable, "-m", "bidder", "seed", "--memcached",
                                 mc.address, "--users", "50"], capture_output=True, text=True,
                                timeout=60)
        assert seeded.returncode == 0 and "seeded 50 users" in seeded.stdout, seeded.stderr
        store = store_for(mc.address)
        key = frequency_key("c1", user_key(world.user_id(7)))
        store.count_impression(key, 60)
        features, counters = store.lookup([user_key("nobody"), user_key(world.user_id(7))],
                                          [key], 1.0)
        assert features.segments == list(world.user_segments(7)) and counters == {key: 1}
        assert store.status()["ok"] is True
    features, counters = store.lookup([user_key(world.user_id(7))], [key], 1.0)  # stopped
    assert features == UserFeatures() and counters is None and store.status()["ok"] is False


def test_unix_addresses_are_made_absolute_and_need_a_path():
    assert parse_servers("unix:relative/mc.sock") == [os.path.abspath("relative/mc.sock")]
    with pytest.raises(ValueError, match="unix:PATH"):
        parse_servers("unix:")


def test_values_larger_than_one_read_and_many_keys_are_read_whole(memcached):
    store = store_for(memcached.address)
    big = UserFeatures(list(range(40_000)))  # ~120 KB of msgpack: several recv calls
    keys = [user_key(f"big-{n}") for n in range(3)]
    for key in keys:
        store.shard_of(key).client.set(key, big)
    found = store.shard_of(keys[0]).client.get_many(keys + [user_key("absent")])
    assert found == {key: big for key in keys}
    assert store.lookup([user_key("absent"), keys[1]], [], 1.0)[0] == big


def test_flags_are_pymemcache_serdes_and_old_counters_still_count(memcached):
    """Counters carry pymemcache.serde.FLAG_INTEGER, so a stock client reads them as ints;
    counters written by earlier versions (flag 1) still count toward the cap."""
    store = store_for(memcached.address)
    key = frequency_key("c1", user_key("flag-user"))
    store.count_impression(key, 60)
    stock = Client(parse_servers(memcached.address)[0], serde=pymemcache.serde.pickle_serde)
    assert stock.get(key) == 1
    legacy = frequency_key("c2", user_key("flag-user"))
    stock.set(legacy, b"4", flags=1, noreply=False)
    assert store.lookup([user_key("flag-user")], [key, legacy], 1.0)[1] == {key: 1, legacy: 4}


def test_a_bug_raises_and_does_not_mark_the_server_down(memcached):
    """Only what a server or the network does is a fault: a key that is no memcached key (a
    bug of ours) raises, and the server's other users keep their features."""
    store = store_for(memcached.address)
    with pytest.raises(ValueError, match="not memcached keys"):
        store.lookup(["u:with space"], [], 1.0)
    with pytest.raises(ValueError, match="not memcached keys"):
        store.count_impression("f:c1:" + "x" * 300, 60)
    assert store.last_error is None and not any(s.down_until for s in store.shards.values())
    assert store.lookup([user_key(world.user_id(3))], [], 1.0)[0].segments == \
        list(world.user_segments(3))


def gets_served(address: str) -> int:
    """memcached's count of keys asked by get commands (``stats``: cmd_get)."""
    return int(Client(parse_servers(address)[0]).stats()[b"cmd_get"])


def test_a_prefetch_answers_its_polls_lookups_in_one_round_trip(memcached):
    """One poll's look-ups read at once: each lookup whose keys were all asked costs memcached
    nothing more; a lookup outside them, or after forget_prefetched, reads memcached."""
    seed_users(memcached.address, 20, progress=False)
    store = store_for(memcached.address)
    users = [user_key(world.user_id(n)) for n in range(3)]
    counter = frequency_key("c1", users[0])
    store.count_impression(counter, window_s=60)
    before = gets_served(memcached.address)
    store.prefetch(users + [counter], 1.0)
    assert gets_served(memcached.address) == before + 4
    for n, key in enumerate(users):
        features, counters = store.lookup([key], [counter] if n == 0 else [], 1.0)
        assert features.segments == list(world.user_segments(n))
        assert counters == ({counter: 1} if n == 0 else {})
    assert gets_served(memcached.address) == before + 4  # no further round trip
    store.lookup([user_key(world.user_id(7))], [], 1.0)  # not prefetched: read
    assert gets_served(memcached.address) == before + 5
    store.forget_prefetched()
    store.lookup([users[0]], [], 1.0)
    assert gets_served(memcached.address) == before + 6


def test_a_bid_in_flight_counts_for_the_rest_of_its_poll(memcached):
    """reserve_pending during a prefetch keeps the prefetched count current (a second request
    of the same user in the same poll sees the first one's bid) and writes memcached."""
    store = store_for(memcached.address)
    key = pending_key("c1", user_key("pending-in-poll"))
    store.prefetch([user_key("pending-in-poll"), key], 1.0)
    assert store.lookup([user_key("pending-in-poll")], [key], 1.0)[1] == {}
    store.reserve_pending(key, 60, exists=False)
    assert store.lookup([user_key("pending-in-poll")], [key], 1.0)[1] == {key: 1}
    store.reserve_pending(key, 60, exists=True)
    assert store.lookup([user_key("pending-in-poll")], [key], 1.0)[1] == {key: 2}
    store.forget_prefetched()
    assert store.lookup([user_key("pending-in-poll")], [key], 1.0)[1] == {key: 2}  # memcached's


def test_a_prefetch_from_a_down_server_leaves_counts_unknown():
    """A prefetch that cannot reach memcached reads nothing: the lookups it covers answer
    default features and unknown counts, as a failed lookup does, without waiting again."""
    store = FeatureStore(parse_servers("127.0.0.1:1"), 50.0, 50.0, 60_000.0)
    key = frequency_key("c1", user_key("u"))
    store.prefetch([user_key("u"), key], 1.0)
    started = time.monotonic()
    features, counters = store.lookup([user_key("u")], [key], 1.0)
    assert features == UserFeatures() and counters is None
    assert time.monotonic() - started < 0.01
