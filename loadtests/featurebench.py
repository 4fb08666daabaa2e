"""The feature look-up in-process: what one ``FeatureStore.lookup`` costs the worker's thread.

A real memcached over loopback TCP and another over a Unix socket, both seeded with the
bidder's users; ``FeatureStore.lookup`` called as the bid path calls it (user keys and
frequency counter keys of request-shaped look-ups: one known user among the ids, one counter
that exists), with the shipped client and with pymemcache's stock ``Client.get_many``
(everything else the same). Variants run interleaved in a fresh random order each rep, so a
noisy neighbour hits them alike; per variant it reports the wall time, the calling thread's
CPU time (user + system: what a worker pays) and memcached's CPU time (its threads'
``schedstat``: what the look-up costs the rest of a shared box) per look-up, median over reps
with the spread::

    python -m loadtests.featurebench --lookups 5000 --reps 5 --out featurebench-report
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from pymemcache.client.base import Client

from bidder.featurestore import FeatureStore, frequency_key, parse_servers, user_key
from loadtests.memcached_proc import EmbeddedMemcached
from bidder.seed import seed_users
from bidder.settings import number
from models import world

TRANSPORTS = ("tcp", "unix")
CLIENTS = ("pymemcache", "shipped")
BASELINE = "pymemcache/tcp"
WARMUP_LOOKUPS = 300


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadtests.featurebench",
                                description=__doc__.splitlines()[0])
    p.add_argument("--lookups", type=number(int, 1), default=5000, help="Look-ups per run.")
    p.add_argument("--reps", type=number(int, 1), default=5, help="Runs per variant.")
    p.add_argument("--users", type=number(int, 1), default=2000, help="Users to seed.")
    p.add_argument("--user-keys", type=number(int, 1), default=2,
                   help="User ids per look-up (the known one is the last).")
    p.add_argument("--counter-keys", type=number(int, 0), default=2,
                   help="Frequency counters per look-up (the first one exists).")
    p.add_argument("--seed", type=int, default=0, help="Seed of the run order.")
    p.add_argument("--out", default="featurebench-report", help="Directory for JSON and PNG.")
    return p


def lookups(n: int, users: int, user_keys: int, counter_keys: int) -> list[tuple[list, list]]:
    """Request-shaped key lists: unknown ids first, then a seeded user; counters of capped
    campaigns for the first id."""
    shaped = []
    for i in range(n):
        ids = [user_key(f"unknown-{k}-{i}") for k in range(user_keys - 1)]
        ids.append(user_key(world.user_id(i % users)))
        counters = [frequency_key(f"c{c}", ids[0]) for c in range(counter_keys)]
        shaped.append((ids, counters))
    return shaped


def make_store(address: str, client: str) -> FeatureStore:
    """The bid path's store; ``pymemcache`` swaps in its stock client, all else the same."""
    store = FeatureStore(parse_servers(address), 200.0, 200.0, 1000.0)
    if client == "pymemcache":
        for shard in store.shards.values():
            shard.client = Client(shard.client.server, **store.client_options)
    return store


def cpu_ns(pid: int) -> int:
    """CPU time of all threads of ``pid`` so far, ns (``/proc/PID/task/*/schedstat``)."""
    return sum(int((task / "schedstat").read_text().split()[0])
               for task in Path(f"/proc/{pid}/task").iterdir())


def measure(store: FeatureStore, shaped: list[tuple[list, list]],
            memcached_pid: int) -> tuple[float, float, float]:
    """(wall us, thread CPU us, memcached CPU us) per look-up over ``shaped``."""
    lookup = store.lookup
    for ids, counters in shaped[:WARMUP_LOOKUPS]:
        lookup(ids, counters, 1.0)
    mc0 = cpu_ns(memcached_pid)
    wall0, cpu0 = time.perf_counter_ns(), time.thread_time_ns()
    for ids, counters in shaped:
        lookup(ids, counters, 1.0)
    wall, cpu = time.perf_counter_ns() - wall0, time.thread_time_ns() - cpu0
    n = len(shaped) * 1e3
    return wall / n, cpu / n, (cpu_ns(memcached_pid) - mc0) / n


def check(store: FeatureStore, shaped: list[tuple[list, list]], users: int) -> None:
    """Every variant answers what was seeded (a fast wrong client would measure nothing)."""
    ids, counters = shaped[0]
    features, counts = store.lookup(ids, counters, 1.0)
    if features.segments != list(world.user_segments(0)) or (counters and counts != {
            counters[0]: 2}):
        raise RuntimeError(f"look-up answered {features}, {counts}: not what was seeded")
    if store.last_error:
        raise RuntimeError(f"look-up failed: {store.last_error}")


def run(args: argparse.Namespace) -> dict[str, Any]:
    shaped = lookups(args.lookups, args.users, args.user_keys, args.counter_keys)
    rng = random.Random(args.seed)
    results: dict[str, list[tuple[float, float, float]]] = {}
    with EmbeddedMemcached(memory_mb=64) as tcp, \
            EmbeddedMemcached(memory_mb=64, unix_socket=True) as unix:
        addresses = {"tcp": tcp.address, "unix": unix.address}
        pids = {"tcp": tcp.process.pid, "unix": unix.process.pid}
        for transport, address in addresses.items():
            seed_users(address, args.users, progress=False)
            seeder = FeatureStore(parse_servers(address), 200.0, 200.0, 1000.0)
            for _, counters in shaped[:1] if args.counter_keys else ():
                for _ in range(2):  # one counter that exists (shaped[0]'s first)
                    seeder.count_impression(counters[0], 600)
        stores = {f"{c}/{t}": make_store(addresses[t], c) for t in TRANSPORTS for c in CLIENTS}
        for store in stores.values():
            check(store, shaped, args.users)
        for rep in range(args.reps):
            order = list(stores)
            rng.shuffle(order)
            for name in order:
                results.setdefault(name, []).append(
                    measure(stores[name], shaped, pids[name.split("/")[1]]))
            print(f"rep {rep + 1}/{args.reps}: " + ", ".join(
                f"{n} {results[n][-1][0]:.1f}" for n in stores) + " us wall", file=sys.stderr)
    return summarise({name: results[name] for name in stores}, args)


METRICS = ("wall_us", "cpu_us", "memcached_cpu_us")


def summarise(results: dict[str, list[tuple[float, float, float]]],
              args: argparse.Namespace) -> dict[str, Any]:
    variants: dict[str, dict[str, Any]] = {}
    for name, runs in results.items():
        v = variants[name] = {}
        for k, metric in enumerate(METRICS):
            values = [run[k] for run in runs]
            v[metric], v[metric + "_runs"] = statistics.median(values), values
    base = variants[BASELINE]
    for v in variants.values():
        for metric in METRICS:
            v[metric.removesuffix("_us") + "_delta_us"] = v[metric] - base[metric]
    return {"lookups": args.lookups, "reps": args.reps, "user_keys": args.user_keys,
            "counter_keys": args.counter_keys, "baseline": BASELINE, "variants": variants,
            "load_average": os.getloadavg()}


def table(doc: dict[str, Any]) -> str:
    lines = [f"feature look-up, {doc['user_keys']} user + {doc['counter_keys']} counter keys, "
             f"{doc['lookups']} look-ups x {doc['reps']} reps, us per look-up, median [min-max] "
             f"(load average {doc['load_average'][0]:.1f})",
             f"{'variant':<17} {'wall':>19} {'thread CPU':>19} {'memcached CPU':>19}   "
             f"vs {doc['baseline']}: wall, thread CPU, memcached CPU"]
    for name, v in doc["variants"].items():
        cells = [f"{v[m]:6.1f} [{min(v[m + '_runs']):4.1f}-{max(v[m + '_runs']):5.1f}]"
                 for m in METRICS]
        deltas = ", ".join(f"{v[m.removesuffix('_us') + '_delta_us']:+5.1f}" for m in METRICS)
        lines.append(f"{name:<17} " + " ".join(f"{c:>19}" for c in cells) + f"   {deltas}")
    return "\n".join(lines)


def plot(doc: dict[str, Any], path: str) -> None:
    """Per variant: wall and thread CPU per look-up, each rep a dot, the median a bar."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(doc["variants"])
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.27
    for offset, metric, label in ((-width, "wall_us", "wall"), (0.0, "cpu_us", "thread CPU"),
                                  (width, "memcached_cpu_us", "memcached CPU")):
        xs = [i + offset for i in range(len(names))]
        ax.bar(xs, [doc["variants"][n][metric] for n in names], width, label=label, alpha=0.7)
        for x, n in zip(xs, names):
            runs = doc["variants"][n][metric + "_runs"]
            ax.plot([x] * len(runs), runs, "k.", ms=4)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("us per look-up")
    ax.set_title("FeatureStore.lookup in-process (bars: median, dots: reps)")
    ax.legend()
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    doc = run(args)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "featurebench.json"), "w") as f:
        json.dump(doc, f, indent=2)
    plot(doc, os.path.join(args.out, "featurebench.png"))
    print(table(doc))
    print(f"wrote {args.out}/featurebench.json, {args.out}/featurebench.png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
