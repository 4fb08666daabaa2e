"""ModelHandle: watched hot reload, atomic swap, refusal of bad artifacts, SIGHUP-style reload."""
from __future__ import annotations

import shutil
import threading
import time

import numpy as np
import pytest
from prometheus_client import REGISTRY

from bidder import model_handle
from bidder.model_handle import ModelHandle
from models import artifact, features, synthetic
from models.lr import FTRLLogisticRegression

BITS = 12


@pytest.fixture(scope="module")
def two_artifacts(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    data = synthetic.generate(20_000, seed=7).encode(BITS)
    paths = []
    for i, l2 in enumerate((0.1, 50.0)):  # two different models
        m = FTRLLogisticRegression(hash_bits=BITS, l2=l2, epochs=1).fit(data.X, data.y)
        m.version = f"v{i}"
        artifact.save(m, d / f"m{i}.npz")
        paths.append(d / f"m{i}.npz")
    return paths


@pytest.fixture(autouse=True)
def snapshots(tmp_path, monkeypatch):
    monkeypatch.setattr(model_handle, "SNAPSHOT_DIR", tmp_path / "snapshots")


def _install(src, dst):
    """Replace ``dst`` atomically, as ``bidder train --out`` does."""
    tmp = dst.with_suffix(".tmp")
    shutil.copyfile(src, tmp)
    tmp.replace(dst)


def _score(model):
    shared = features.shared_indices({"inventory": "site:news.example", "devicetype": 4, "os": "iOS",
                                      "country": "USA", "hour": 12}, [2, 9], model.hash_bits)
    cands = features.candidate_indices([{"campaign": "c01", "creative": "c01-cr1", "size": "728x90"},
                                        {"campaign": "c05", "creative": "c05-cr1", "size": "300x250"}],
                                       model.hash_bits)
    return model.predict_proba_shared(shared, cands)


def _reloads(outcome):
    return REGISTRY.get_sample_value("bidder_model_reloads_total", {"outcome": outcome}) or 0.0


def test_watch_swaps_a_new_artifact_and_keeps_in_flight_models(two_artifacts, tmp_path):
    live = tmp_path / "model.npz"
    _install(two_artifacts[0], live)
    handle = ModelHandle(live, watch_s=0.05)
    old = handle.current
    before = _score(old)
    assert handle.maybe_reload() is False  # not due yet, nothing changed
    loaded = _reloads("loaded")
    _install(two_artifacts[1], live)
    time.sleep(0.06)
    assert handle.maybe_reload() is True
    assert handle.current is not old and handle.current.version.startswith("v1")
    assert _reloads("loaded") == loaded + 1
    np.testing.assert_array_equal(_score(old), before)  # the old object still scores as before
    assert not np.allclose(_score(handle.current), before)
    time.sleep(0.06)
    assert handle.maybe_reload() is False  # unchanged file: no reload
    assert handle.status()["reloads"] == 1 and handle.status()["version"].startswith("v1")


def test_bad_artifact_is_refused_and_the_old_model_keeps_serving(two_artifacts, tmp_path):
    live = tmp_path / "model.npz"
    _install(two_artifacts[0], live)
    handle = ModelHandle(live, watch_s=0.01)
    good = handle.current
    refused = _reloads("refused")
    live.write_bytes(two_artifacts[1].read_bytes()[:3000])  # rewritten in place, truncated
    time.sleep(0.02)
    assert handle.maybe_reload() is False
    assert handle.current is good
    assert _reloads("refused") == refused + 1
    status = handle.status()
    assert status["refused"] == 1 and str(live) in status["last_error"]
    # The mapped model is a snapshot: rewriting the user's file in place did not touch it.
    assert np.all(np.isfinite(_score(good)))
    # Once the file is whole again (its stat changes) the next check loads it.
    _install(two_artifacts[1], live)
    time.sleep(0.02)
    assert handle.maybe_reload() is True and handle.current.version.startswith("v1")


def test_reload_now_and_watch_disabled(two_artifacts, tmp_path):
    live = tmp_path / "model.npz"
    _install(two_artifacts[0], live)
    handle = ModelHandle(live, watch_s=0)
    _install(two_artifacts[1], live)
    time.sleep(0.01)
    assert handle.maybe_reload() is False  # watch disabled
    assert handle.reload() is True  # what SIGHUP does
    assert handle.current.version.startswith("v1")


def test_scoring_never_fails_while_reloading(two_artifacts, tmp_path):
    live = tmp_path / "model.npz"
    _install(two_artifacts[0], live)
    handle = ModelHandle(live, watch_s=0)
    errors, scored = [], [0]
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                p = _score(handle.current)
                assert p.shape == (2,) and np.all((p > 0) & (p < 1))
                scored[0] += 1
            except Exception as exc:  # noqa: BLE001 - any failure fails the test
                errors.append(exc)

    thread = threading.Thread(target=serve)
    thread.start()
    for i in range(20):
        _install(two_artifacts[i % 2], live)
        handle.reload()
    stop.set()
    thread.join()
    assert not errors and scored[0] > 0 and handle.reloads == 20


def test_missing_model_fails_at_start_with_a_clear_message(tmp_path):
    with pytest.raises(artifact.ArtifactError, match="does not exist.*bidder train"):
        ModelHandle(tmp_path / "nope.npz", watch_s=1)


def test_default_is_the_bundled_model():
    handle = ModelHandle(None, watch_s=1)
    assert handle.status()["path"] == str(model_handle.BUNDLED) and handle.current.kind in ("lr", "fm")


def test_workers_loading_the_same_version_share_one_mapped_file(two_artifacts, tmp_path):
    live = tmp_path / "model.npz"
    _install(two_artifacts[0], live)
    first, second = ModelHandle(live, watch_s=0), ModelHandle(live, watch_s=0)
    snaps = list((tmp_path / "snapshots").glob("*.npz"))
    assert len(snaps) == 1
    # Both models' weights are views of a mapping of that one snapshot file.
    maps = open("/proc/self/maps").read()
    assert str(snaps[0]) in maps
    np.testing.assert_array_equal(first.current.w, second.current.w)
    assert not first.current.w.flags.writeable
