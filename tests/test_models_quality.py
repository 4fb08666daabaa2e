"""Model quality on synthetic data with a known truth: LR near the truth, FM above LR on interactions."""
from __future__ import annotations

import numpy as np
import pytest

from models import evaluate, synthetic
from models.fm import FactorizationMachine
from models.lr import FTRLLogisticRegression

BITS = 16


def _splits(n: int, interaction: float, seed: int):
    data = synthetic.generate(n, seed=seed, interaction=interaction).encode(BITS)
    a, b = int(n * 0.7), int(n * 0.85)
    return data.take(slice(0, a)), data.take(slice(a, b)), data.take(slice(b, n))


@pytest.fixture(scope="module")
def default_data():
    return _splits(1_200_000, interaction=synthetic.DEFAULT_INTERACTION, seed=11)


def test_lr_auc_and_calibration_near_the_ground_truth(default_data):
    train, cal, test = default_data
    model = FTRLLogisticRegression(hash_bits=BITS).fit(train.X, train.y)
    model.fit_calibration(cal.X, cal.y)
    p = model.predict_proba(test.X)
    assert evaluate.auc(test.y, p) > evaluate.auc(test.y, test.p_true) - 0.01
    # Predicted clicks over the truth's expected clicks: free of the test split's label noise.
    assert abs(p.sum() / test.p_true.sum() - 1) < 0.05


def test_platt_calibration_repairs_a_biased_model(default_data):
    train, cal, test = default_data
    model = FTRLLogisticRegression(hash_bits=BITS).fit(train.X, train.y)
    model.w[model.bias_index] += 1.0  # predicts ~2.7x too many clicks
    assert evaluate.calibration(test.y, model.predict_proba(test.X)) > 2.0
    model.fit_calibration(cal.X, cal.y)
    p = model.predict_proba(test.X)
    assert abs(p.sum() / test.p_true.sum() - 1) < 0.05


def test_fm_beats_lr_when_the_truth_has_interactions():
    train, _, test = _splits(400_000, interaction=1.0, seed=12)
    lr = FTRLLogisticRegression(hash_bits=BITS).fit(train.X, train.y)
    fm = FactorizationMachine(hash_bits=BITS).fit(train.X, train.y)
    auc_lr = evaluate.auc(test.y, lr.predict_proba(test.X))
    auc_fm = evaluate.auc(test.y, fm.predict_proba(test.X))
    assert auc_fm > auc_lr + 0.01
    assert evaluate.log_loss(test.y, fm.predict_proba(test.X)) < evaluate.log_loss(test.y, lr.predict_proba(test.X))


def test_auc_handles_ties_and_matches_pair_counting():
    rng = np.random.default_rng(0)
    y = rng.random(400) < 0.3
    p = rng.integers(0, 5, 400).astype(float)  # many ties
    pos, neg = p[y], p[~y]
    pairs = (pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()
    assert evaluate.auc(y, p) == pytest.approx(pairs)
