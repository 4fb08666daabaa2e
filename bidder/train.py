"""``bidder train``: the command line of ``models.train`` (fit a CTR model, evaluate, save),
with its reliability diagram (matplotlib, the ``[train]`` extra). One JSON line goes to
stdout, progress to stderr."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from bidder.settings import number
from models import evaluate, train
from models.base import MAX_HASH_BITS, MIN_HASH_BITS
from models.features import DEFAULT_HASH_BITS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", metavar="FILE", help="impression log TSV (format: docs/models.md)")
    source.add_argument("--synthetic", type=int, metavar="N",
                        help="train on N synthetic impressions with a known ground truth")
    parser.add_argument("--model", choices=("lr", "fm"), default="lr",
                        help="lr: FTRL logistic regression; fm: factorization machine")
    parser.add_argument("--out", required=True, metavar="PATH", help="artifact file to write")
    parser.add_argument("--hash-bits", type=number(int, MIN_HASH_BITS, maximum=MAX_HASH_BITS),
                        default=DEFAULT_HASH_BITS,
                        help="hash space 2**bits (file size ~ 4 * 2**bits bytes for lr, x(2+k) for fm)")
    parser.add_argument("--epochs", type=number(int, 1),
                        help="passes over the training split (default: lr 2, fm 3)")
    parser.add_argument("--alpha", type=number(float, 0, exclusive=True), default=0.1,
                        help="FTRL learning rate alpha")
    parser.add_argument("--beta", type=number(float, 0), default=1.0, help="FTRL beta")
    parser.add_argument("--l1", type=number(float, 0), default=0.1, help="FTRL L1 strength")
    parser.add_argument("--l2", type=number(float, 0), default=0.1, help="FTRL L2 strength")
    parser.add_argument("--k", type=number(int, 1), default=8, help="FM factors per feature")
    parser.add_argument("--lr-v", type=number(float, 0, exclusive=True), default=0.05,
                        help="FM factor learning rate (AdaGrad)")
    parser.add_argument("--l2-v", type=number(float, 0), default=1e-2,
                        help="FM factor L2 strength")
    parser.add_argument("--holdout", type=float, default=0.3,
                        help="fraction of rows held out (half calibrates, half tests)")
    parser.add_argument("--no-calibration", action="store_true", help="skip Platt calibration")
    parser.add_argument("--seed", type=int, default=0, help="seed of data generation and training")
    parser.add_argument("--interaction", type=float, default=0.15,
                        help="synthetic only: scale of the ground truth's interaction terms")
    parser.add_argument("--plot", metavar="PATH",
                        help="reliability diagram PNG (default: next to --out, .calibration.png)")
    parser.add_argument("--no-plot", action="store_true", help="do not draw the reliability diagram")


def run(args: argparse.Namespace) -> int:
    """Train, evaluate and save as ``args`` say; one JSON line on stdout, progress on stderr."""
    start = time.monotonic()
    try:
        trained = train.train(args)
    except train.TrainError as exc:
        print(f"bidder train: {exc}", file=sys.stderr)
        return 2
    result = trained.result
    if not args.no_plot:
        plot = Path(args.plot) if args.plot else Path(args.out).with_suffix(".calibration.png")
        plot_reliability(plot, trained.y_test, trained.curves, trained.title)
        result["plot"] = str(plot)
    result["seconds"] = round(time.monotonic() - start, 1)
    print(json.dumps(result), flush=True)
    return 0


def plot_reliability(path: str | Path, y: np.ndarray, curves: dict[str, np.ndarray], title: str) -> None:
    """Write a reliability diagram (observed vs predicted CTR per quantile bin) as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5))
    top = 0.0
    for label, p in curves.items():
        pred, obs, _ = evaluate.reliability_bins(y, p)
        ax.plot(pred, obs, marker="o", ms=3, label=f"{label} (pred/obs {evaluate.calibration(y, p):.3f})")
        top = max(top, pred.max(), obs.max())
    ax.plot([0, top], [0, top], color="grey", lw=0.8, ls="--", label="perfect")
    ax.set_xlabel("mean predicted CTR (20 quantile bins)")
    ax.set_ylabel("observed CTR")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
