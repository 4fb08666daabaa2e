"""predict_proba_shared (the bid path's one call) equals predict_proba on the concatenated rows."""
from __future__ import annotations

import numpy as np
import pytest

from models import features, synthetic
from models.fm import FactorizationMachine
from models.logs import rows_from_shared
from models.lr import FTRLLogisticRegression

BITS = 15


@pytest.fixture(scope="module", params=["lr", "fm"])
def model(request):
    data = synthetic.generate(40_000, seed=5, interaction=1.0).encode(BITS)
    cls = FTRLLogisticRegression if request.param == "lr" else FactorizationMachine
    m = cls(hash_bits=BITS, epochs=1).fit(data.X, data.y)
    m.fit_calibration(data.X, data.y)
    return m


@pytest.mark.parametrize("segments", [(), (3,), (1, 7, 22, 40, 63)])
@pytest.mark.parametrize("n", [1, 7, 44])
def test_shared_scoring_equals_row_scoring(model, segments, n):
    request = {"inventory": "app:com.example.chess", "devicetype": 4, "os": "Android",
               "country": "JPN", "hour": 21}
    shared = features.shared_indices(request, segments, model.hash_bits)
    catalog = [(c.id, *creative) for c in synthetic.load_catalog() for creative in c.creatives]
    cands = features.candidate_indices(
        [{"campaign": c, "creative": cr, "size": s, "format": f} for c, cr, s, f in (catalog * 2)[:n]],
        model.hash_bits)
    p = model.predict_proba_shared(shared, cands)
    assert p.shape == (n,) and p.dtype == np.float64
    np.testing.assert_allclose(p, model.predict_proba(rows_from_shared(shared, cands)), rtol=1e-9)
    assert np.all((p > 0) & (p < 1))
    assert len(set(np.round(p, 12))) > 1 or n == 1  # candidates are scored differently


def test_hash_bits_change_the_indices():
    request = {"inventory": "site:news.example", "devicetype": 2, "os": "Windows", "country": "USA", "hour": 3}
    a = features.shared_indices(request, [1], 14)
    b = features.shared_indices(request, [1], 20)
    assert np.all(a < 1 << 14) and np.all(b < 1 << 20) and np.all(b & ((1 << 14) - 1) == a)


def test_kept_candidate_terms_score_any_subset_and_stay_unchanged(model):
    """The bid path keeps ``candidate_terms`` of the whole catalog and scores the eligible rows."""
    request = {"inventory": "site:news.example", "devicetype": 2, "os": "iOS", "country": "USA",
               "hour": 9}
    shared = features.shared_indices(request, (2, 9), model.hash_bits)
    catalog = [(c.id, *creative) for c in synthetic.load_catalog() for creative in c.creatives]
    cands = features.candidate_indices(
        [{"campaign": c, "creative": cr, "size": s, "format": f} for c, cr, s, f in catalog],
        model.hash_bits)
    terms = model.candidate_terms(cands)
    before = [t.copy() for t in terms]
    for rows in (np.array([0]), np.array([len(cands) - 1, 2, 0]), np.arange(len(cands))):
        p = model.predict_proba_terms(model.shared_terms(shared), terms, rows)
        np.testing.assert_allclose(p, model.predict_proba(rows_from_shared(shared, cands[rows])),
                                   rtol=1e-9)
    for t, b in zip(terms, before):
        np.testing.assert_array_equal(t, b)
