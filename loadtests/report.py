"""The A/B report files: report.json, runs.json, report.md and report.png.

The PNG is what a person looks at first: latency CDFs of both arms (log-scaled
tail, so p99 and p99.9 are visible) and one bar per run of the metrics that
decide the comparison, in run order, so drift and outliers show.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any

from loadtests import stats

BAR_METRICS = (("p99_ms", "p99 latency (ms)"), ("cpu_us_per_request", "CPU us / request"),
               ("migrations_per_request", "migrations / request"),
               ("context_switches_per_request", "context switches / request"),
               ("rps", "achieved requests / s"))
MD_METRICS = (("rps", "achieved rps", "{:.1f}"), ("p50_ms", "p50 ms", "{:.2f}"),
              ("p99_ms", "p99 ms", "{:.2f}"), ("p99_9_ms", "p99.9 ms", "{:.2f}"),
              ("cpu_us_per_request", "CPU us/request", "{:.0f}"),
              ("migrations_per_request", "migrations/request", "{:.4f}"),
              ("context_switches_per_request", "context switches/request", "{:.3f}"),
              ("voluntary_cs_per_request", "voluntary cs/request", "{:.3f}"),
              ("involuntary_cs_per_request", "involuntary cs/request", "{:.3f}"),
              ("cycles_per_request", "cycles/request", "{:.0f}"),
              ("instructions_per_request", "instructions/request", "{:.0f}"),
              ("cache_misses_per_request", "cache misses/request", "{:.0f}"))


def write(doc: dict[str, Any], runs: list[dict[str, Any]], out: str) -> list[str]:
    """Write every report file into ``out``; return their paths."""
    paths = [os.path.join(out, name) for name in ("report.json", "runs.json", "report.md",
                                                  "report.png")]
    for path, data in ((paths[0], doc), (paths[1], runs)):
        with open(path, "w") as f:
            json.dump(_finite(data), f, indent=2)
    with open(paths[2], "w") as f:
        f.write(markdown(doc))
    plot(doc, runs, paths[3])
    return paths


def _finite(value: Any) -> Any:
    """NaN/inf (e.g. a ratio of two zero counts) as null: report.json stays strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _fmt(fmt: str, value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return fmt.format(value)


def markdown(doc: dict[str, Any]) -> str:
    a, b = list(doc["arms"])
    cfg, machine = doc["config"], doc["machine"]
    lines = [f"# A/B: {a} vs {b}", "",
             f"{cfg['reps']} runs per arm of {cfg['duration_s']:g} s at an offered "
             f"{cfg['rate']:g} requests/s (open loop, {cfg['connections']} connections, "
             f"{cfg['warmup_s']:g} s warm-up), server restarted for every run, order "
             f"{' '.join(cfg['order'])}.", "",
             f"- {a}: `bidder serve {doc['arms'][a]['serve_args']}`",
             f"- {b}: `bidder serve {doc['arms'][b]['serve_args']}`", "",
             "## Per-run metrics, mean of runs", "",
             f"| metric | {a} | {b} | ratio {a}/{b} [{1 - cfg['alpha']:.0%} CI] | p | verdict |",
             "|---|---|---|---|---|---|"]
    for key, label, fmt in MD_METRICS:
        if key not in doc["ratios"]:
            continue
        r = doc["ratios"][key]
        lines.append(f"| {label} | {_fmt(fmt, r['a_mean'])} | {_fmt(fmt, r['b_mean'])} | "
                     f"{_fmt('{:.3f}', r['ratio'])} [{_fmt('{:.3f}', r['ci_low'])}, "
                     f"{_fmt('{:.3f}', r['ci_high'])}] | {r['p_value']:.3f} | {r['verdict']} |")
    n_a, n_b = doc["arms"][a]["reps"], doc["arms"][b]["reps"]
    lines += ["", "Ratios: percentile bootstrap over runs (each run a fresh server); p: exact "
              "permutation test over runs. Significant = CI excludes 1 and p <= "
              f"{cfg['alpha']:g}." + (
                  f" With {n_a} vs {n_b} runs the smallest possible p is "
                  f"{stats.smallest_pvalue(n_a, n_b):.3f}: use --reps 4 or more for a verdict."
                  if stats.smallest_pvalue(n_a, n_b) > cfg["alpha"] else ""), "",
              "## Latency over all requests of an arm (merged histograms, from the intended "
              "send time)", "",
              "| arm | requests | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | no-bid share |",
              "|---|---|---|---|---|---|---|---|"]
    for name in (a, b):
        arm = doc["arms"][name]
        lines.append(f"| {name} | {arm['requests']} | {arm['p50_ms']:.2f} | {arm['p90_ms']:.2f} | "
                     f"{arm['p99_ms']:.2f} | {arm['p99_9_ms']:.2f} | {arm['max_ms']:.2f} | "
                     f"{arm['nobid_share']:.1%} |")
    lines += ["",
              "## Machine", "",
              f"- {machine['cpus']} CPUs ({machine['cpu_model'] or 'unknown model'}), "
              f"Linux {machine['kernel']}, Python {machine['python']}",
              f"- placement: {machine['placement']}",
              f"- perf: {machine['perf']}",
              f"- load generator: {cfg['load_generator']}",
              f"- failed requests: {a} {doc['arms'][a]['failed']}, {b} {doc['arms'][b]['failed']}",
              f"- other load during the runs (CPUs busy outside the server's workers and the load "
              f"generator, mean per run): {a} {doc['arms'][a]['other_cpus_busy']:.2f}, "
              f"{b} {doc['arms'][b]['other_cpus_busy']:.2f}; VM steal {a} "
              f"{doc['arms'][a]['steal_cpus']:.2f}, {b} {doc['arms'][b]['steal_cpus']:.2f} CPUs",
              "", "![latency CDFs and per-run metrics](report.png)", ""]
    return "\n".join(lines)


def plot(doc: dict[str, Any], runs: list[dict[str, Any]], path: str) -> None:
    """Latency CCDFs per arm and per-run bars of the deciding metrics, as one PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    names = list(doc["arms"])
    colors = dict(zip(names, ("tab:blue", "tab:orange")))
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    ax = axes[0][0]
    for name in names:
        merged = stats.merge([stats.decode(r["histogram"]) for r in runs if r["arm"] == name])
        xs, ys = stats.cdf_ms(merged)
        tail = [max(1.0 - y, 1e-5) for y in ys]
        ax.step(xs, tail, where="post", color=colors[name],
                label=f"{name} (p99 {doc['arms'][name]['p99_ms']:.2f} ms)")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_yscale("log")
    ax.set_ylim(1e-4, 1.0)
    ax.set_xlabel("latency from intended send time (ms)")
    ax.set_ylabel("fraction of requests slower")
    ax.set_title("latency tail (CCDF)")
    for level, label in ((1e-2, "p99"), (1e-3, "p99.9")):
        ax.axhline(level, color="grey", lw=0.6, ls=":")
        ax.text(ax.get_xlim()[0], level, label, fontsize=7, va="bottom")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    for ax, (key, label) in zip([axes[0][1], axes[0][2], axes[1][0], axes[1][1], axes[1][2]],
                                BAR_METRICS):
        values = [r.get(key) or 0.0 for r in runs]
        ax.bar(range(len(runs)), values, color=[colors[r["arm"]] for r in runs])
        ax.set_xticks(range(len(runs)), [f"{i + 1}\n{r['arm'][:8]}" for i, r in enumerate(runs)],
                      fontsize=7)
        ax.set_title(label + " per run")
        ax.grid(True, axis="y", alpha=0.3)
    cfg = doc["config"]
    fig.suptitle(f"{names[0]} vs {names[1]}: {cfg['reps']} runs each, {cfg['rate']:g}/s open loop, "
                 f"{cfg['duration_s']:g} s per run, {doc['machine']['cpus']} CPUs"
                 + ("" if doc["machine"]["load_generator_separated"]
                    else " (load generator shares the server CPUs)"), fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
