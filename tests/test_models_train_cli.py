"""`bidder train` end to end: synthetic and TSV input, the JSON line, the artifact and the plot."""
from __future__ import annotations

import json
import subprocess
import sys

from models import artifact


def _bidder(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "bidder.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_train_synthetic_prints_metrics_and_writes_artifact(tmp_path):
    out = tmp_path / "m.npz"
    proc = _bidder("train", "--synthetic", "100000", "--model", "lr", "--hash-bits", "14", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    for key in ("auc", "log_loss", "calibration"):
        assert key in result and key in result["truth"]
    assert 0.6 < result["auc"] <= 1 and result["truth"]["auc"] > 0.6
    assert "epoch" in proc.stderr  # progress goes to stderr
    model = artifact.load(out)
    assert model.kind == "lr" and model.hash_bits == 14 and model.metrics["auc"] == result["auc"]
    assert (tmp_path / "m.calibration.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_train_fm_on_a_tsv_log(tmp_path):
    log = tmp_path / "log.tsv"
    gen = subprocess.run([sys.executable, "-m", "models.synthetic", "--rows", "20000", "--out", str(log)],
                         capture_output=True, text=True, timeout=60)
    assert gen.returncode == 0, gen.stderr
    header = log.read_text().splitlines()[0].split("\t")
    assert header[:11] == ["inventory", "devicetype", "os", "country", "hour", "segment", "campaign",
                           "creative", "size", "format", "click"]
    out = tmp_path / "fm.npz"
    proc = _bidder("train", "--data", str(log), "--model", "fm", "--hash-bits", "14", "--epochs", "1",
                   "--out", str(out), "--no-plot")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["model"] == "fm" and result["rows"] == 20000 and "truth" in result
    assert artifact.load(out).kind == "fm"


def test_bad_input_gets_a_message_not_a_traceback(tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("inventory\tclick\nsite:x\t1\n")
    proc = _bidder("train", "--data", str(bad), "--out", str(tmp_path / "x.npz"))
    assert proc.returncode == 2
    assert "header lacks column(s) devicetype" in proc.stderr and "Traceback" not in proc.stderr
