"""Offline metrics of click predictions: AUC, log loss, calibration, reliability bins."""
from __future__ import annotations

import numpy as np


def auc(y: np.ndarray, p: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties counted as half)."""
    y = np.asarray(y, dtype=bool)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(p, kind="mergesort")
    sorted_p = np.asarray(p)[order]
    # Average rank of each group of equal scores.
    _, first, counts = np.unique(sorted_p, return_index=True, return_counts=True)
    avg_rank = first + (counts + 1) / 2.0
    ranks = np.repeat(avg_rank, counts)
    pos_rank_sum = ranks[y[order]].sum()
    return float((pos_rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def log_loss(y: np.ndarray, p: np.ndarray, eps: float = 1e-12) -> float:
    """Mean negative log likelihood of the labels."""
    p = np.clip(p, eps, 1 - eps)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def calibration(y: np.ndarray, p: np.ndarray) -> float:
    """Predicted clicks over observed clicks (1.0 is perfectly calibrated on average)."""
    observed = float(np.sum(y))
    return float(np.sum(p) / observed) if observed else float("nan")


def report(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    """The metrics ``bidder train`` prints, rounded for reading."""
    return {"auc": round(auc(y, p), 5), "log_loss": round(log_loss(y, p), 6),
            "calibration": round(calibration(y, p), 4)}


def reliability_bins(y: np.ndarray, p: np.ndarray, bins: int = 20) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean predicted, observed CTR and count per quantile bin of the prediction."""
    order = np.argsort(p, kind="mergesort")
    groups = np.array_split(order, bins)
    groups = [g for g in groups if len(g)]
    pred = np.array([p[g].mean() for g in groups])
    obs = np.array([y[g].mean() for g in groups])
    count = np.array([len(g) for g in groups])
    return pred, obs, count
