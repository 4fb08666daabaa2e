"""Logistic regression trained with FTRL-Proximal over hashed features.

The method of McMahan et al., "Ad Click Prediction: a View from the Trenches"
(KDD 2013), algorithm 1: per-coordinate learning rates
``eta_i = alpha / (beta + sqrt(sum g_i^2))``, L1 (which makes rare features
exactly zero) and L2, with the weights recomputed lazily from the ``z`` and
``n`` accumulators of the coordinates a mini-batch touches. The batch's
gradients are summed per coordinate (``np.bincount``), so one update costs a
few array operations, not a Python loop per impression.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from models.base import HashedModel, sigmoid_
from models.features import DEFAULT_HASH_BITS
from models.logs import PAD


_ONES: dict[tuple[int, np.dtype], np.ndarray] = {}


def _ones(n: int, dtype: np.dtype) -> np.ndarray:
    """A cached read-only vector of ``n`` ones (the row-sum operand)."""
    key = (n, np.dtype(dtype))
    ones = _ONES.get(key)
    if ones is None:
        ones = _ONES[key] = np.ones(n, dtype=dtype)
        ones.flags.writeable = False
    return ones


class FTRLLogisticRegression(HashedModel):
    """Hashed logistic regression; ``w`` holds one float per bucket, the bias and a zero pad."""

    kind = "lr"

    def __init__(self, hash_bits: int = DEFAULT_HASH_BITS, alpha: float = 0.1, beta: float = 1.0,
                 l1: float = 0.1, l2: float = 0.1, batch_size: int = 256, epochs: int = 2,
                 seed: int = 0):
        super().__init__(hash_bits, batch_size, epochs, seed)
        self.alpha, self.beta, self.l1, self.l2 = alpha, beta, l1, l2
        self._reset()

    def _reset(self) -> None:
        self.w = np.zeros(self.n_rows, dtype=np.float64)
        self._z = np.zeros(self.n_rows, dtype=np.float64)
        self._n = np.zeros(self.n_rows, dtype=np.float64)

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        w = self.w
        # Row sums as a matrix-vector product: far faster than .sum(axis=1) on narrow rows.
        return np.add(w[X] @ _ones(X.shape[1], w.dtype), float(w[self.bias_index]),
                      dtype=np.float64)

    def _linear(self, candidates: np.ndarray) -> np.ndarray:
        """Sum of ``w`` over each candidate row's indices (float64)."""
        w = self.w
        return np.asarray(w[candidates] @ _ones(candidates.shape[1], w.dtype), dtype=np.float64)

    def _shared_linear(self, shared: np.ndarray) -> float:
        """The bias plus the sum of ``w`` over the shared indices."""
        w = self.w
        return float(w[self.bias_index]) + float(np.add.reduce(w[shared], dtype=np.float64))

    def candidate_terms(self, candidates: np.ndarray) -> tuple[np.ndarray, ...]:
        """``(a/2 * sum of w over each candidate's indices,)``."""
        return (self._half_a * self._linear(candidates),)

    def shared_terms(self, shared: np.ndarray) -> tuple:
        return (self._half_a * self._shared_linear(shared) + self._half_b,)

    def _half_logit(self, shared_terms: tuple, terms: tuple[np.ndarray, ...],
                    rows: np.ndarray | slice) -> np.ndarray:
        return np.add(terms[0][rows], shared_terms[0])

    def _update(self, X: np.ndarray, y: np.ndarray) -> None:
        self._ftrl_step(X, sigmoid_(self.decision_function(X)) - y)

    def _ftrl_step(self, X: np.ndarray, g: np.ndarray) -> None:
        """FTRL-Proximal update of the linear weights, given d(loss)/d(logit) ``g`` of each row."""
        flat = X.reshape(-1)
        keep = flat != PAD
        idx = np.concatenate([flat[keep], [self.bias_index]])
        grads = np.concatenate([np.repeat(g, X.shape[1])[keep], [g.sum()]])
        coords, inverse = np.unique(idx, return_inverse=True)
        gsum = np.bincount(inverse, weights=grads, minlength=len(coords))
        n_old = self._n[coords]
        n_new = n_old + gsum * gsum
        sigma = (np.sqrt(n_new) - np.sqrt(n_old)) / self.alpha
        z = self._z[coords] + gsum - sigma * self.w[coords]
        self._z[coords] = z
        self._n[coords] = n_new
        shrunk = np.sign(z) * np.maximum(np.abs(z) - self.l1, 0.0)
        self.w[coords] = -shrunk / ((self.beta + np.sqrt(n_new)) / self.alpha + self.l2)

    def params(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "beta": self.beta, "l1": self.l1, "l2": self.l2,
                "batch_size": self.batch_size, "epochs": self.epochs, "seed": self.seed}

    def arrays(self) -> dict[str, np.ndarray]:
        return {"w": self.w.astype(np.float32), "calibration": self.calibration.astype(np.float64)}

    @classmethod
    def from_arrays(cls, hash_bits: int, params: Mapping[str, Any],
                    arrays: Mapping[str, np.ndarray]) -> "FTRLLogisticRegression":
        model = cls.__new__(cls)
        HashedModel.__init__(model, hash_bits, params["batch_size"], params["epochs"], params["seed"])
        model.alpha, model.beta, model.l1, model.l2 = (params[k] for k in ("alpha", "beta", "l1", "l2"))
        model.w = arrays["w"]
        model.calibration = np.asarray(arrays["calibration"], dtype=np.float64)
        model.trainable = False
        return model
