"""Artifacts: round trip, memory mapping, and refusal of corrupt or mismatched files."""
from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest

from bidder.model_handle import BUNDLED
from models import artifact, synthetic
from models.artifact import ArtifactError
from models.fm import FactorizationMachine
from models.lr import FTRLLogisticRegression

BITS = 14


@pytest.fixture(scope="module")
def data():
    return synthetic.generate(30_000, seed=3, interaction=1.0).encode(BITS)


@pytest.fixture(scope="module", params=["lr", "fm"])
def saved(request, data, tmp_path_factory):
    cls = FTRLLogisticRegression if request.param == "lr" else FactorizationMachine
    model = cls(hash_bits=BITS, epochs=1).fit(data.X, data.y)
    model.fit_calibration(data.X[:5000], data.y[:5000])
    path = tmp_path_factory.mktemp("art") / f"{request.param}.npz"
    artifact.save(model, path, metrics={"auc": 0.5})
    return model, path


@pytest.mark.parametrize("mmap", [True, False])
def test_round_trip_predicts_the_same(saved, data, mmap):
    model, path = saved
    loaded = artifact.load(path, mmap=mmap)
    assert loaded.kind == model.kind and loaded.hash_bits == BITS
    assert loaded.metrics["auc"] == 0.5
    np.testing.assert_allclose(loaded.calibration, model.calibration)
    np.testing.assert_allclose(loaded.predict_proba(data.X[:2000]), model.predict_proba(data.X[:2000]),
                               rtol=1e-4)
    with pytest.raises(ValueError, match="loaded from an artifact"):
        loaded.partial_fit(data.X[:10], data.y[:10])


def test_arrays_are_aligned_and_mapped(saved):
    _, path = saved
    loaded = artifact.load(path, mmap=True)
    assert isinstance(loaded.w.base, np.memmap) or isinstance(loaded.w.base.base, np.memmap)
    assert loaded.w.ctypes.data % 64 == 0 and not loaded.w.flags.writeable
    assert np.load(path)["w"].shape == loaded.w.shape  # still a plain .npz


def _rewrite(path, tmp_path, meta_change=None, array_change=None):
    """Copy the artifact with its meta or one array changed (kept stored, not recompressed)."""
    out = tmp_path / "changed.npz"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename == artifact.META and meta_change:
                meta = json.loads(data)
                meta_change(meta)
                data = json.dumps(meta).encode()
            if info.filename == "w.npy" and array_change:
                data = array_change(bytearray(data))
            dst.writestr(info.filename, bytes(data))
    return out


def test_flipped_weight_byte_is_refused_as_corrupt(saved, tmp_path):
    _, path = saved

    def flip(b):
        b[-5] ^= 0xFF
        return b

    bad = _rewrite(path, tmp_path, array_change=flip)
    with pytest.raises(ArtifactError, match=rf"{bad}.*corrupt: checksum mismatch"):
        artifact.load(bad)


def test_truncated_or_foreign_files_are_refused(saved, tmp_path):
    _, path = saved
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ArtifactError, match=str(truncated)):
        artifact.load(truncated)
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, w=np.zeros(3))
    with pytest.raises(ArtifactError, match="not a file written by `bidder train`"):
        artifact.load(foreign)
    with pytest.raises(ArtifactError, match="does not exist"):
        artifact.load(tmp_path / "missing.npz")


@pytest.mark.parametrize("change,message", [
    (lambda m: m["features"]["candidate"].append("deal"), "trained on feature fields"),
    (lambda m: m.update(format_version=99), "format version 99"),
    (lambda m: m.update(kind="gbdt"), "unknown model kind 'gbdt'"),
    (lambda m: m.update(hash_bits=BITS + 1), "needs"),
])
def test_mismatched_metadata_is_refused(saved, tmp_path, change, message):
    _, path = saved
    with pytest.raises(ArtifactError, match=message):
        artifact.load(_rewrite(path, tmp_path, meta_change=change))


def test_bundled_artifact_loads_and_is_small():
    model = artifact.load(BUNDLED)
    assert BUNDLED.stat().st_size < 5 * 1024 * 1024
    assert model.metrics["auc"] > 0.65
