"""FTRL-Proximal logistic regression learns a known logistic model."""
from __future__ import annotations

import numpy as np

from models.evaluate import auc
from models.logs import PAD
from models.lr import FTRLLogisticRegression


def _known_model(n: int, seed: int = 0):
    """Rows of 4 one-hot fields (20 values each) plus padding, clicks from known weights."""
    rng = np.random.default_rng(seed)
    bits = 12
    ids = rng.choice(1 << bits, 80, replace=False)  # 4 fields x 20 values, distinct buckets
    true_w = rng.normal(0, 0.8, 80)
    codes = rng.integers(0, 20, (n, 4)) + np.arange(4) * 20
    X = np.hstack([ids[codes], np.full((n, 1), PAD)])
    logit = -3.0 + true_w[codes].sum(1)
    p = 1 / (1 + np.exp(-logit))
    y = (rng.random(n) < p).astype(float)
    return bits, ids, true_w, X, y, p


def test_ftrl_recovers_known_weights_and_ranking():
    bits, ids, true_w, X, y, p = _known_model(300_000)
    model = FTRLLogisticRegression(hash_bits=bits, l1=0.0, l2=0.0, epochs=3).fit(X, y)
    learned = model.w[ids]
    # One-hot fields are identified up to a constant per field: compare centred weights.
    centred = lambda w: (w.reshape(4, 20) - w.reshape(4, 20).mean(1, keepdims=True)).ravel()
    assert np.corrcoef(centred(learned), centred(true_w))[0, 1] > 0.97
    assert abs(auc(y, model.predict_proba(X)) - auc(y, p)) < 0.005
    assert abs(model.predict_proba(X).sum() / y.sum() - 1) < 0.05


def test_l1_zeroes_unseen_and_rare_features():
    bits, ids, _, X, y, _ = _known_model(50_000)
    model = FTRLLogisticRegression(hash_bits=bits, l1=5.0).fit(X, y)
    untouched = np.setdiff1d(np.arange(1 << bits), ids)
    assert np.all(model.w[untouched] == 0.0)
    assert model.w[PAD] == 0.0  # the padding row stays zero
    assert np.count_nonzero(model.w[ids]) < len(ids)  # strong L1 prunes weak features


def test_partial_fit_continues_training():
    bits, _, _, X, y, p = _known_model(100_000)
    model = FTRLLogisticRegression(hash_bits=bits)
    model.partial_fit(X[:20_000], y[:20_000])
    early = auc(y, model.predict_proba(X))
    model.partial_fit(X[20_000:], y[20_000:])
    assert auc(y, model.predict_proba(X)) > early - 0.002
    assert auc(y, model.predict_proba(X)) > auc(y, p) - 0.01
