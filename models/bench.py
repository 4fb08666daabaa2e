"""``python -m models.bench``: microseconds per scored candidate for LR and FM, 1 to 1000 candidates.

Times ``predict_proba_terms`` exactly as the bid path calls it (one request's
shared indices against n eligible rows of candidate terms computed once), on
models loaded from artifacts the way the server loads them (memory-mapped
float32 arrays).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from models import artifact, features
from models.base import HashedModel
from models.fm import FactorizationMachine
from models.lr import FTRLLogisticRegression

SIZES = (1, 10, 100, 1000)


def _random_model(kind: str, hash_bits: int, k: int, directory: Path) -> HashedModel:
    """A model with random weights, saved and loaded back (mapped) as the server would hold it."""
    rng = np.random.default_rng(0)
    model: HashedModel
    if kind == "lr":
        model = FTRLLogisticRegression(hash_bits=hash_bits)
    else:
        model = FactorizationMachine(hash_bits=hash_bits, k=k)
        model.V[:-1] = rng.normal(0, 0.05, (model.n_rows - 1, k))
    model.w[:-1] = rng.normal(0, 0.3, model.n_rows - 1)
    path = directory / f"{kind}.npz"
    artifact.save(model, path)
    return artifact.load(path, mmap=True)


def time_call(model: HashedModel, n: int, min_time_s: float, rng: np.random.Generator) -> float:
    """Median seconds of one ``predict_proba_terms`` over ``n`` eligible candidates."""
    request = {"inventory": "site:news.example", "devicetype": 2, "os": "Windows", "country": "USA", "hour": 14}
    shared = features.shared_indices(request, [3, 17, 42, 60], model.hash_bits)
    cands = rng.integers(0, 1 << model.hash_bits, (n, len(features.CANDIDATE_FIELDS)), dtype=np.int64)
    terms = model.candidate_terms(cands)
    rows = np.arange(n)
    for _ in range(20):
        model.predict_proba_terms(model.shared_terms(shared), terms, rows)
    times = []
    deadline = time.perf_counter() + min_time_s
    while time.perf_counter() < deadline or len(times) < 50:
        t0 = time.perf_counter()
        model.predict_proba_terms(model.shared_terms(shared), terms, rows)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--hash-bits", type=int, default=features.DEFAULT_HASH_BITS)
    parser.add_argument("--k", type=int, default=8, help="FM factors")
    parser.add_argument("--seconds", type=float, default=0.3, help="minimum timing per size")
    parser.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(1)
    results: dict[str, dict[int, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("lr", "fm"):
            print(f"timing {kind} (2**{args.hash_bits} buckets)", file=sys.stderr)
            model = _random_model(kind, args.hash_bits, args.k, Path(tmp))
            results[kind] = {}
            for n in SIZES:
                call = time_call(model, n, args.seconds, rng)
                results[kind][n] = {"us_per_call": round(call * 1e6, 2),
                                    "us_per_candidate": round(call * 1e6 / n, 3)}
    if args.json:
        print(json.dumps({"hash_bits": args.hash_bits, "k": args.k, "results": results}))
        return 0
    print(f"{'model':<6}{'candidates':>11}{'us/call':>10}{'us/candidate':>14}")
    for kind, rows in results.items():
        for n, r in rows.items():
            print(f"{kind:<6}{n:>11}{r['us_per_call']:>10.2f}{r['us_per_candidate']:>14.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
