"""Fit a CTR model on an impression log (or synthetic data), evaluate, save: ``bidder train``.

The command line (flags, messages, the plot) is ``bidder/train.py``; ``train`` takes its
parsed arguments and raises ``TrainError`` for what the user must change.

Rows are split in order: the first part trains, the next ``--holdout``/2 fits
the Platt calibration, the last ``--holdout``/2 is the test split the metrics
are measured on. Progress goes to stderr.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import numpy as np

from models import artifact, evaluate, logs
from models.base import HashedModel


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


class TrainError(ValueError):
    """Arguments or data that cannot train a model; the message says what to change."""


@dataclass
class Trained:
    """What a training run produced: the metrics line, and the held-out predictions to plot."""
    result: dict[str, object]
    y_test: np.ndarray
    curves: dict[str, np.ndarray]  # label -> predicted CTR of each test row
    title: str


def train(args: argparse.Namespace) -> Trained:
    """Fit, calibrate, evaluate on the test split and save to ``args.out``."""
    if not 0.02 <= args.holdout <= 0.9:
        raise TrainError(f"--holdout must be in 0.02..0.9, got {args.holdout}")
    if args.synthetic is not None and args.synthetic < 1000:
        raise TrainError("--synthetic needs at least 1000 impressions")
    try:
        data = load_data(args)
    except (OSError, ValueError) as exc:
        raise TrainError(str(exc)) from None
    n = len(data)
    cut_train = int(n * (1 - args.holdout))
    cut_cal = cut_train + (n - cut_train) // 2
    train, cal, test = data.take(slice(0, cut_train)), data.take(slice(cut_train, cut_cal)), data.take(slice(cut_cal, n))
    if test.y.sum() == 0 or test.y.sum() == len(test):
        raise TrainError("the test split holds only one class; give more rows")
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
    return Trained(result, test.y, curves, f"{model.kind} on {len(test):,} held-out impressions")
