"""Factorization machine (Rendle 2010) over hashed features: LR plus pairwise interactions.

``logit = bias + sum_i w_i + sum_{i<j} <v_i, v_j>`` over the indices of a row,
computed as ``0.5 * (|sum_i v_i|^2 - sum_i |v_i|^2)``. The linear part is
trained with FTRL-Proximal exactly as ``models.lr``; the factors ``V`` with
AdaGrad and L2, on the same mini-batches.

Scoring every candidate of a request is one matrix-vector product: with
``s_r = sum of v over the shared indices`` and ``s_c`` the same over a
candidate's, the interactions are ``(|s_r + s_c|^2 - q_r - q_c) / 2`` where
``q`` are sums of the precomputed squared norms ``v_sq``; everything of the
candidate alone is computed once (``candidate_terms``), leaving ``s_r . s_c``.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from models.base import HashedModel, sigmoid_
from models.features import DEFAULT_HASH_BITS
from models.logs import PAD
from models.lr import FTRLLogisticRegression, _ones

_CHUNK = 65_536  # rows scored at once, to bound the (rows, width, k) gather


class FactorizationMachine(FTRLLogisticRegression):
    """Second-order FM: ``w`` and ``V`` (``k`` factors) per bucket, bias and zero padding rows."""

    kind = "fm"

    def __init__(self, hash_bits: int = DEFAULT_HASH_BITS, k: int = 8, alpha: float = 0.1,
                 beta: float = 1.0, l1: float = 0.1, l2: float = 0.1, lr_v: float = 0.05,
                 l2_v: float = 1e-2, init_std: float = 0.01, batch_size: int = 256, epochs: int = 3,
                 seed: int = 0):
        self.k, self.lr_v, self.l2_v, self.init_std = k, lr_v, l2_v, init_std
        super().__init__(hash_bits, alpha, beta, l1, l2, batch_size, epochs, seed)

    def _reset(self) -> None:
        super()._reset()
        rng = np.random.default_rng(self.seed)
        self.V = rng.normal(0.0, self.init_std, (self.n_rows, self.k))
        self.V[self.bias_index] = 0.0
        self.V[PAD] = 0.0
        self._h = np.zeros_like(self.V)
        self.v_sq = (self.V * self.V).sum(axis=1)

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        out = np.empty(len(X), dtype=np.float64)
        for start in range(0, len(X), _CHUNK):
            rows = X[start:start + _CHUNK]
            out[start:start + len(rows)] = self._logit_and_sums(rows)[0]
        return out

    def _logit_and_sums(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ones = _ones(X.shape[1], self.V.dtype)
        s = ones @ self.V[X]  # (n, k): sums of the row's factor vectors
        inter = np.einsum("ij,ij->i", s, s) - self.v_sq[X] @ ones
        return super().decision_function(X) + 0.5 * inter, s

    def candidate_terms(self, candidates: np.ndarray) -> tuple[np.ndarray, ...]:
        """``a/2 * (w_c + (|s_c|^2 - q_c) / 2)`` and ``a/2 * s_c`` per candidate: with the shared
        side's ``s_r`` and ``q_r``, ``|s_r + s_c|^2 = |s_r|^2 + 2 s_r.s_c + |s_c|^2`` leaves one
        matrix-vector product per request."""
        ones = _ones(candidates.shape[1], self.V.dtype)
        s_c = np.asarray(ones @ self.V[candidates], dtype=np.float64)  # (n, k)
        q_c = self.v_sq[candidates] @ ones
        constant = self._linear(candidates) + 0.5 * (np.einsum("ij,ij->i", s_c, s_c) - q_c)
        return self._half_a * constant, self._half_a * s_c

    def shared_terms(self, shared: np.ndarray) -> tuple:
        s_r = np.asarray(_ones(len(shared), self.V.dtype) @ self.V[shared], dtype=np.float64)
        q_r = float(np.add.reduce(self.v_sq[shared], dtype=np.float64))
        base = self._shared_linear(shared) + 0.5 * (float(s_r @ s_r) - q_r)
        return self._half_a * base + self._half_b, s_r

    def _half_logit(self, shared_terms: tuple, terms: tuple[np.ndarray, ...],
                    rows: np.ndarray | slice) -> np.ndarray:
        constant, s_c = terms
        base, s_r = shared_terms
        z = s_c[rows] @ s_r
        z += constant[rows]
        z += base
        return z

    def _update(self, X: np.ndarray, y: np.ndarray) -> None:
        logit, s = self._logit_and_sums(X)
        g = sigmoid_(logit) - y
        self._ftrl_step(X, g)
        # d(logit)/d(v_i) = s - v_i for each index i of the row.
        flat = X.reshape(-1)
        keep = flat != PAD
        idx = flat[keep]
        rows = np.repeat(np.arange(len(X)), X.shape[1])[keep]
        grads = g[rows, None] * (s[rows] - self.V[idx])
        coords, inverse = np.unique(idx, return_inverse=True)
        G = np.empty((len(coords), self.k))
        for f in range(self.k):
            G[:, f] = np.bincount(inverse, weights=grads[:, f], minlength=len(coords))
        v = self.V[coords]
        G += self.l2_v * v
        h = self._h[coords] + G * G
        self._h[coords] = h
        v -= self.lr_v * G / (np.sqrt(h) + 1e-8)
        self.V[coords] = v
        self.v_sq[coords] = (v * v).sum(axis=1)

    def params(self) -> dict[str, Any]:
        return {**super().params(), "k": self.k, "lr_v": self.lr_v, "l2_v": self.l2_v,
                "init_std": self.init_std}

    def arrays(self) -> dict[str, np.ndarray]:
        V = self.V.astype(np.float32)
        return {**super().arrays(), "V": V, "v_sq": (V.astype(np.float64) ** 2).sum(axis=1).astype(np.float32)}

    @classmethod
    def from_arrays(cls, hash_bits: int, params: Mapping[str, Any],
                    arrays: Mapping[str, np.ndarray]) -> "FactorizationMachine":
        model = super().from_arrays(hash_bits, params, arrays)
        model.k, model.lr_v, model.l2_v, model.init_std = (params[k] for k in ("k", "lr_v", "l2_v", "init_std"))
        model.V, model.v_sq = arrays["V"], arrays["v_sq"]
        return model  # type: ignore[return-value]
