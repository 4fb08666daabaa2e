"""What every CTR model shares: the weight layout over hashed indices, Platt calibration, batching.

Weights live in arrays of ``2**hash_bits + 2`` rows: one per hash bucket, then
the bias (row ``BIAS = 2**hash_bits``), then a padding row (the last, so the
``PAD`` index -1 of ``models.logs`` reads it) that stays zero.

Probabilities are calibrated: ``P(click) = sigmoid(a * logit + b)`` with
``(a, b)`` fitted on held-out rows (Platt scaling), because the bid price is
proportional to the probability, not only ordered by it. A fresh model has
``(1, 0)``, i.e. no correction.
"""
from __future__ import annotations

import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from models.evaluate import log_loss


def sigmoid_(z: np.ndarray) -> np.ndarray:
    """In-place logistic function of a float64 array (returns it).

    ``sigmoid(z) = (1 + tanh(z / 2)) / 2``: no overflow for any ``z``, so no ``np.clip``
    (which costs several microseconds a call, more than the arithmetic).
    """
    z *= 0.5
    np.tanh(z, out=z)
    z *= 0.5
    z += 0.5
    return z


MIN_HASH_BITS, MAX_HASH_BITS = 4, 30  # a hash space of 16 to 2**30 buckets


class HashedModel(ABC):
    """Base of the LR and FM models: ``fit`` / ``partial_fit`` / ``predict_proba`` over hashed rows."""

    kind: ClassVar[str]

    def __init__(self, hash_bits: int, batch_size: int, epochs: int, seed: int):
        if not MIN_HASH_BITS <= hash_bits <= MAX_HASH_BITS:
            raise ValueError(f"hash_bits must be in {MIN_HASH_BITS}..{MAX_HASH_BITS}, "
                             f"got {hash_bits}")
        self.hash_bits = hash_bits
        self.batch_size = batch_size
        self.epochs = epochs
        self.seed = seed
        self.calibration = np.array([1.0, 0.0])
        self.version = "untrained"
        self.trainable = True

    @property
    def n_rows(self) -> int:
        """Weight rows: the hash buckets, the bias and the padding row."""
        return (1 << self.hash_bits) + 2

    @property
    def bias_index(self) -> int:
        return 1 << self.hash_bits

    # --- each model ---------------------------------------------------------------------------
    @abstractmethod
    def decision_function(self, X: np.ndarray) -> np.ndarray:
        """Uncalibrated logit of each row of ``X`` (float64)."""
        ...

    @abstractmethod
    def candidate_terms(self, candidates: np.ndarray) -> tuple[np.ndarray, ...]:
        """The candidate side of the calibrated half-logit ``(a * logit + b) / 2`` of rows
        ``shared ++ candidates[i]``, computed once per candidate matrix (the catalog's) and
        model, so that scoring a request adds only its shared side."""
        ...

    @abstractmethod
    def shared_terms(self, shared: np.ndarray) -> tuple:
        """The shared side of that half-logit: once per request, whatever its number of imps."""
        ...

    @abstractmethod
    def _half_logit(self, shared_terms: tuple, terms: tuple[np.ndarray, ...],
                    rows: np.ndarray | slice) -> np.ndarray:
        """``(a * logit + b) / 2`` of rows ``shared ++ candidates[rows]`` (float64, a new array)."""
        ...

    @abstractmethod
    def _reset(self) -> None:
        ...

    @abstractmethod
    def _update(self, X: np.ndarray, y: np.ndarray) -> None:
        ...

    @abstractmethod
    def params(self) -> dict[str, Any]:
        """Hyper-parameters, saved in the artifact."""
        ...

    @abstractmethod
    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays scoring needs, saved in the artifact."""
        ...

    @classmethod
    @abstractmethod
    def from_arrays(cls, hash_bits: int, params: Mapping[str, Any],
                    arrays: Mapping[str, np.ndarray]) -> "HashedModel":
        """A scoring-only model from saved arrays (``partial_fit`` refuses it)."""
        ...

    # --- shared -----------------------------------------------------------------------------------
    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Calibrated P(click) per row of ``X``."""
        return self._calibrate(self.decision_function(X))

    def predict_proba_shared(self, shared: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        """Calibrated P(click) of each row ``shared ++ candidates[i]``."""
        return self.predict_proba_terms(self.shared_terms(shared),
                                        self.candidate_terms(candidates), slice(None))

    def predict_proba_terms(self, shared_terms: tuple, terms: tuple[np.ndarray, ...],
                            rows: np.ndarray | slice) -> np.ndarray:
        """Calibrated P(click) of rows ``shared ++ candidates[rows]``: the bid path's one call
        per imp, with ``terms = candidate_terms(candidates)`` kept from one request to the next
        and ``shared_terms(shared)`` computed once per request. Calibration is folded into the
        terms, so this is ``(1 + tanh(half-logit)) / 2``: four array operations."""
        z = self._half_logit(shared_terms, terms, rows)
        np.tanh(z, out=z)
        z *= 0.5
        z += 0.5
        return z

    @property
    def calibration(self) -> np.ndarray:
        """Platt's ``(a, b)``: ``P(click) = sigmoid(a * logit + b)``."""
        return self._calibration

    @calibration.setter
    def calibration(self, value: np.ndarray) -> None:
        self._calibration = np.array(value, dtype=np.float64)
        self._half_a, self._half_b = 0.5 * float(value[0]), 0.5 * float(value[1])

    def _calibrate(self, z: np.ndarray) -> np.ndarray:
        """``sigmoid(a * z + b)`` in place, folded into the tanh form."""
        z *= self._half_a
        z += self._half_b
        np.tanh(z, out=z)
        z *= 0.5
        z += 0.5
        return z

    def fit(self, X: np.ndarray, y: np.ndarray, progress: bool = False) -> "HashedModel":
        """Train from scratch: ``epochs`` shuffled passes of mini-batch updates."""
        self._reset()
        self.trainable = True
        rng = np.random.default_rng(self.seed)
        start = time.monotonic()
        for epoch in range(self.epochs):
            order = rng.permutation(len(y))
            self.partial_fit(X[order], y[order])
            if progress:
                ll = log_loss(y[:200_000], self.predict_proba(X[:200_000]))
                print(f"[{self.kind}] epoch {epoch + 1}/{self.epochs}: train log loss {ll:.5f} "
                      f"({time.monotonic() - start:.1f}s)", file=sys.stderr)
        self.version = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        return self

    def partial_fit(self, X: np.ndarray, y: np.ndarray) -> "HashedModel":
        """One pass over ``X`` in order, in mini-batches of ``batch_size`` (online learning)."""
        if not self.trainable:
            raise ValueError(f"this {self.kind} model was loaded from an artifact, which holds no "
                             "optimizer state; train a new one with fit()")
        y = np.asarray(y, dtype=np.float64)
        for start in range(0, len(y), self.batch_size):
            self._update(X[start:start + self.batch_size], y[start:start + self.batch_size])
        return self

    def fit_calibration(self, X: np.ndarray, y: np.ndarray, iterations: int = 50) -> np.ndarray:
        """Fit Platt's ``(a, b)`` on held-out rows by Newton's method; returns and keeps it."""
        z = self.decision_function(X)
        a, b = 1.0, 0.0
        for _ in range(iterations):
            p = sigmoid_(a * z + b)
            g = p - y
            w = p * (1 - p)
            grad = np.array([g @ z, g.sum()])
            hess = np.array([[w @ (z * z), w @ z], [w @ z, w.sum()]]) + 1e-6 * np.eye(2)
            step = np.linalg.solve(hess, grad)
            a, b = a - step[0], b - step[1]
            if np.abs(step).max() < 1e-9:
                break
        self.calibration = np.array([a, b])
        return self.calibration
