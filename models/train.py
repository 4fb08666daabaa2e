"""``bidder train``: fit a CTR model on an impression log (or synthetic data), evaluate, save.

Rows are split in order: the first part trains, the next ``--holdout``/2 fits
the Platt calibration, the last ``--holdout``/2 is the test split the metrics
are measured on. One JSON line goes to stdout, progress to stderr.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from bidder.settings import number
from models import artifact, evaluate, logs
from models.base import MAX_HASH_BITS, MIN_HASH_BITS, HashedModel
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


def build_model(args: argparse.Namespace) -> HashedModel:
    common = dict(hash_bits=args.hash_bits, alpha=args.alpha, beta=args.beta, l1=args.l1, l2=args.l2,
                  seed=args.seed)
    if args.model == "fm":
        from models.fm import FactorizationMachine
        return FactorizationMachine(k=args.k, lr_v=args.lr_v, l2_v=args.l2_v,
                                    epochs=args.epochs or 3, **common)
    from models.lr import FTRLLogisticRegression
    return FTRLLogisticRegression(epochs=args.epochs or 2, **common)


def load_data(args: argparse.Namespace) -> logs.Impressions:
    if args.synthetic is not None:
        from models import synthetic
        print(f"generating {args.synthetic:,} synthetic impressions", file=sys.stderr)
        return synthetic.generate(args.synthetic, seed=args.seed, interaction=args.interaction).encode(args.hash_bits)
    print(f"reading {args.data}", file=sys.stderr)
    return logs.read_tsv(args.data, args.hash_bits)


def run(args: argparse.Namespace) -> int:
    start = time.monotonic()
    if not 0.02 <= args.holdout <= 0.9:
        print(f"bidder train: --holdout must be in 0.02..0.9, got {args.holdout}", file=sys.stderr)
        return 2
    if args.synthetic is not None and args.synthetic < 1000:
        print("bidder train: --synthetic needs at least 1000 impressions", file=sys.stderr)
        return 2
    try:
        data = load_data(args)
    except (OSError, ValueError) as exc:
        print(f"bidder train: {exc}", file=sys.stderr)
        return 2
    n = len(data)
    cut_train = int(n * (1 - args.holdout))
    cut_cal = cut_train + (n - cut_train) // 2
    train, cal, test = data.take(slice(0, cut_train)), data.take(slice(cut_train, cut_cal)), data.take(slice(cut_cal, n))
    if test.y.sum() == 0 or test.y.sum() == len(test):
        print("bidder train: the test split holds only one class; give more rows", file=sys.stderr)
        return 2
    model = build_model(args)
    print(f"training {model.kind} on {len(train):,} rows (2**{model.hash_bits} buckets, "
          f"{model.epochs} epochs, {int(train.y.sum()):,} clicks)", file=sys.stderr)
    model.fit(train.X, train.y, progress=True)
    if not args.no_calibration:
        a, b = model.fit_calibration(cal.X, cal.y)
        print(f"Platt calibration on {len(cal):,} rows: a={a:.4f} b={b:.4f}", file=sys.stderr)
    p = model.predict_proba(test.X)
    result: dict[str, object] = {"model": model.kind, "rows": n, "train_rows": len(train),
                                 "test_rows": len(test), "test_clicks": int(test.y.sum()),
                                 "hash_bits": model.hash_bits, **evaluate.report(test.y, p)}
    curves = {model.kind: p}
    if test.p_true is not None:
        result["truth"] = evaluate.report(test.y, test.p_true)
        result["calibration_vs_truth"] = round(float(p.sum() / test.p_true.sum()), 4)
        curves["ground truth"] = test.p_true
    meta = artifact.save(model, args.out, metrics=result)
    result["version"] = meta["version"]
    result["out"] = str(args.out)
    if not args.no_plot:
        plot = Path(args.plot) if args.plot else Path(args.out).with_suffix(".calibration.png")
        evaluate.plot_reliability(plot, test.y, curves,
                                  f"{model.kind} on {len(test):,} held-out impressions")
        result["plot"] = str(plot)
    result["seconds"] = round(time.monotonic() - start, 1)
    print(json.dumps(result), flush=True)
    return 0
