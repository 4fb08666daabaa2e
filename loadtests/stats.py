"""Latency histograms and the statistics of an A/B: percentiles, bootstrap CIs, permutation tests.

Latencies are kept in HdrHistograms at microsecond resolution (1 us .. 60 s,
3 significant digits), which merge exactly across processes and machines,
unlike averages of percentiles. An A/B compares arms over *repetitions* (each
a fresh server), the unit that is independent; requests within one run are not.
"""
from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from hdrh.histogram import HdrHistogram

LOWEST_US = 1
HIGHEST_US = 60_000_000
SIGNIFICANT_DIGITS = 3
PERCENTILES = (50.0, 90.0, 99.0, 99.9)


def new_histogram() -> HdrHistogram:
    """An empty latency histogram in microseconds."""
    return HdrHistogram(LOWEST_US, HIGHEST_US, SIGNIFICANT_DIGITS)


def record_us(histogram: HdrHistogram, micros: float) -> None:
    """Record one latency, clamped into the histogram's range (never silently dropped)."""
    histogram.record_value(min(max(int(micros), LOWEST_US), HIGHEST_US))


def encode(histogram: HdrHistogram) -> str:
    """Compressed base64 text of a histogram, for messages between processes and for files."""
    return histogram.encode().decode("ascii")


def decode(text: str | bytes) -> HdrHistogram:
    return HdrHistogram.decode(text.encode("ascii") if isinstance(text, str) else text)


def merge(histograms: Sequence[HdrHistogram]) -> HdrHistogram:
    total = new_histogram()
    for h in histograms:
        total.add(h)
    return total


def summary_ms(histogram: HdrHistogram) -> dict[str, float]:
    """count, p50/p90/p99/p99.9, max and mean of a histogram, in milliseconds."""
    out: dict[str, float] = {"count": histogram.get_total_count()}
    for p in PERCENTILES:
        key = f"p{p:g}".replace(".", "_") + "_ms"
        out[key] = histogram.get_value_at_percentile(p) / 1000.0 if out["count"] else math.nan
    out["max_ms"] = histogram.get_max_value() / 1000.0 if out["count"] else math.nan
    out["mean_ms"] = histogram.get_mean_value() / 1000.0 if out["count"] else math.nan
    return out


def cdf_ms(histogram: HdrHistogram) -> tuple[list[float], list[float]]:
    """(latency ms, cumulative fraction) at every recorded value, for plotting a CDF."""
    xs: list[float] = []
    ys: list[float] = []
    for item in histogram.get_recorded_iterator():
        xs.append(item.value_iterated_to / 1000.0)
        ys.append(item.percentile / 100.0)
    return xs, ys


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def bootstrap_ratio_ci(a: Sequence[float], b: Sequence[float], confidence: float = 0.95,
                       n_boot: int = 10_000, seed: int = 0) -> tuple[float, float, float]:
    """mean(a)/mean(b) and its percentile-bootstrap CI, resampling each arm's reps independently."""
    if not a or not b:
        raise ValueError("bootstrap needs at least one value per arm")
    ratio = _ratio(mean(a), mean(b))
    rng = random.Random(seed)
    boots = sorted(_ratio(mean(rng.choices(a, k=len(a))), mean(rng.choices(b, k=len(b))))
                   for _ in range(n_boot))
    finite = [x for x in boots if math.isfinite(x)]
    if not finite:
        return ratio, math.nan, math.nan
    tail = (1.0 - confidence) / 2.0
    return ratio, _quantile(finite, tail), _quantile(finite, 1.0 - tail)


def permutation_pvalue(a: Sequence[float], b: Sequence[float], n_perm: int = 20_000,
                       seed: int = 0) -> float:
    """Two-sided p-value of mean(a) != mean(b) under label exchange (exact when small)."""
    pooled = list(a) + list(b)
    n_a = len(a)
    observed = abs(mean(a) - mean(b))
    eps = 1e-12 * max(1.0, abs(observed))
    total = sum(pooled)
    if math.comb(len(pooled), n_a) <= n_perm:
        splits = itertools.combinations(range(len(pooled)), n_a)
        count = hits = 0
        for idx in splits:
            s_a = sum(pooled[i] for i in idx)
            diff = abs(s_a / n_a - (total - s_a) / (len(pooled) - n_a))
            hits += diff >= observed - eps
            count += 1
        return hits / count
    rng = random.Random(seed)
    hits = 0
    for _ in range(n_perm):
        rng.shuffle(pooled)
        diff = abs(mean(pooled[:n_a]) - mean(pooled[n_a:]))
        hits += diff >= observed - eps
    return (hits + 1) / (n_perm + 1)


def smallest_pvalue(n_a: int, n_b: int) -> float:
    """The smallest two-sided p an exact permutation test can give with these rep counts."""
    return min(1.0, 2.0 / math.comb(n_a + n_b, n_a))


@dataclass(frozen=True)
class Comparison:
    """One metric of arm A against arm B over repetitions."""

    a_mean: float
    b_mean: float
    ratio: float
    ci_low: float
    ci_high: float
    p_value: float
    verdict: str

    def as_dict(self) -> dict[str, float | str]:
        return asdict(self)


def compare(a: Sequence[float], b: Sequence[float], alpha: float = 0.05,
            seed: int = 0) -> Comparison:
    """Ratio A/B with a (1-alpha) bootstrap CI, a permutation p-value and a plain verdict.

    ``significant`` needs both the CI to exclude 1 and p <= alpha. When there are
    too few reps for the permutation test to ever reach alpha the verdict says so
    instead of pretending (3 vs 3 reps: the smallest possible p is 0.1).
    """
    ratio, low, high = bootstrap_ratio_ci(a, b, 1.0 - alpha, seed=seed)
    p = permutation_pvalue(a, b, seed=seed)
    excludes_one = math.isfinite(low) and (low > 1.0 or high < 1.0)
    floor_p = smallest_pvalue(len(a), len(b))
    if min(len(a), len(b)) < 2:  # one run an arm: the "interval" is a single point
        verdict = "one run per arm: no interval, no test"
    elif excludes_one and p <= alpha:
        verdict = "significant"
    elif floor_p > alpha:
        verdict = ("suggestive (CI excludes 1" if excludes_one else "no difference seen (") + (
            "; too few reps to test)" if excludes_one else "too few reps to test)")
    else:
        verdict = "not significant"
    return Comparison(mean(a), mean(b), ratio, low, high, p, verdict)


def _ratio(x: float, y: float) -> float:
    if y == 0:
        return math.nan if x == 0 else math.inf
    return x / y


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile of already sorted values."""
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)
