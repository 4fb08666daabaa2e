"""The main job, end to end, as a new user runs it (small sizes)."""
from __future__ import annotations

import os
import subprocess
import sys


def test_demo_runs_end_to_end_and_reports():
    result = subprocess.run(
        [sys.executable, "-m", "bidder.cli", "demo", "--users", "500", "--rate", "100",
         "--duration", "2", "--workers", "2"],
        capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "Sample bids" in out and " bid " in out
    for kind in ("banner", "video", "native"):  # the bundled catalog and traffic have each
        assert f" {kind} " in out, kind
    assert "adm <VAST" in out and 'adm {"ver":"1.2","assets":[' in out
    assert "nurl -> 200" in out and "burl -> 200" in out and '"booked"' in out
    assert "latency ms (from intended send time): p50" in out and "p99" in out
    assert "Result: OK" in out
    assert "seeding 500 users" in result.stderr
    assert "started embedded memcached on unix:/" in result.stderr  # served over its socket
    # reached over the socket (a probe may time out on a loaded box, never be refused)
    assert "memcached answering" in result.stderr or "timed out" in result.stderr


def test_demo_without_memcached_says_how_to_install_it(tmp_path):
    python_only = tmp_path / "bin"
    python_only.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "bidder.cli", "demo", "--users", "10"],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "PATH": str(python_only)})
    assert result.returncode == 1
    assert "memcached is not installed" in result.stderr and "apt-get install" in result.stderr
