"""``bidder seed``: load synthetic user features into memcached, in batches, with progress."""
from __future__ import annotations

import argparse
import sys
import time

from pymemcache.client.hash import HashClient

from bidder.featurestore import (Crc32Rendezvous, UserFeatures, UserFeaturesSerde, parse_servers,
                                 user_key)
from bidder.settings import number
from models import world

BATCH = 1000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--memcached", default="127.0.0.1:11211",
                        metavar="HOST:PORT|unix:PATH[,...]",
                        help="memcached server(s) to load, named as 'bidder serve --memcached' "
                             "names them (the same names shard users the same way)")
    parser.add_argument("--users", type=number(int, 1), default=100_000,
                        help="how many users to seed")
    parser.add_argument("--ttl", type=number(int, 0), default=0,
                        help="expiry in seconds (0: never)")


def seed_users(address: str, n: int, ttl: int = 0, progress: bool = True) -> int:
    """Write users ``world.user_id(0..n-1)`` with their segments; return how many were stored."""
    client = HashClient(parse_servers(address), hasher=Crc32Rendezvous, serde=UserFeaturesSerde(),
                        connect_timeout=2, timeout=5, retry_attempts=2, retry_timeout=0.2)
    stored = 0
    started = time.monotonic()
    try:
        for start in range(0, n, BATCH):
            batch = {user_key(world.user_id(i)): UserFeatures(list(world.user_segments(i)))
                     for i in range(start, min(n, start + BATCH))}
            failed = client.set_many(batch, expire=ttl, noreply=False)
            stored += len(batch) - len(failed)
            if progress and ((start // BATCH) % 20 == 0 or start + BATCH >= n):
                print(f"\rseeding users: {stored}/{n} ({time.monotonic() - started:.1f} s)",
                      end="", file=sys.stderr, flush=True)
    finally:
        client.close()
    if progress:
        print(file=sys.stderr)
    return stored


def run(args: argparse.Namespace) -> int:
    try:
        stored = seed_users(args.memcached, args.users, args.ttl)
    except Exception as exc:  # connection refused, timeout, server error
        print(f"bidder seed: cannot write to memcached {args.memcached}: {exc}. Is it running? "
              "Start one with 'memcached -l 127.0.0.1 -U 0 -p 11211'.", file=sys.stderr)
        return 1
    if stored != args.users:
        print(f"bidder seed: only {stored} of {args.users} users were stored", file=sys.stderr)
        return 1
    print(f"seeded {stored} users into {args.memcached}")
    return 0
