"""``bidder tune``: knobs per kernel era, apply/revert round trip on a temp tree (never the host),
and the real ``bidder tune check`` as root and as an unprivileged user."""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from server_hooks import tune

DEFAULTS = {  # what a stock kernel shows, per file
    "kernel/sched_min_granularity_ns": "3000000", "kernel/sched_wakeup_granularity_ns": "4000000",
    "kernel/sched_migration_cost_ns": "500000", "sched/min_granularity_ns": "3000000",
    "sched/wakeup_granularity_ns": "4000000", "sched/migration_cost_ns": "500000",
    "sched/base_slice_ns": "3000000", "net/core/somaxconn": "4096",
    "net/ipv4/tcp_max_syn_backlog": "2048", "net/ipv4/ip_local_port_range": "32768\t60999",
    "fs/file-max": "9223372036854775807",
}


def make_host(tmp_path: Path, release: str, debugfs: bool = True, root: bool = True) -> tune.Host:
    proc_sys, debug = tmp_path / "proc_sys", tmp_path / "debug"
    debug.mkdir(parents=True, exist_ok=True)
    for rel, value in DEFAULTS.items():
        base = debug if rel.startswith("sched/") else proc_sys
        if rel.startswith("sched/") and not debugfs:
            continue
        (base / rel).parent.mkdir(parents=True, exist_ok=True)
        (base / rel).write_text(value + "\n")
    return tune.Host(proc_sys, debug, release, root)


def snapshot(tmp_path: Path) -> dict[str, str]:
    return {str(p.relative_to(tmp_path)): p.read_text() for p in sorted(tmp_path.rglob("*"))
            if p.is_file() and p.suffix != ".json"}


@pytest.mark.parametrize("release, names", [
    ("5.4.0-150-generic", {"kernel.sched_min_granularity_ns", "kernel.sched_wakeup_granularity_ns",
                           "kernel.sched_migration_cost_ns"}),
    ("5.15.0", {"sched/min_granularity_ns", "sched/wakeup_granularity_ns",
                "sched/migration_cost_ns"}),
    ("6.6.30", {"sched/base_slice_ns", "sched/migration_cost_ns"}),
    ("6.18.44-fc", {"sched/base_slice_ns", "sched/migration_cost_ns", "per-worker slice"}),
])
def test_knobs_per_era(release, names):
    found = {k.name for k in tune.knobs(tune.Host(release=release).version)}
    scheduler = {n for n in found if n.startswith(("sched", "kernel.", "per-worker"))}
    assert scheduler == names
    assert {"net.core.somaxconn", "net.ipv4.tcp_max_syn_backlog", "net.ipv4.ip_local_port_range",
            "fs.file-max", "nofile (hard limit)"} <= found


@pytest.mark.parametrize("release", ["5.4.0", "5.15.0", "6.6.30", "6.18.44"])
def test_apply_then_revert_restores_exactly(tmp_path, release):
    host = make_host(tmp_path / "tree", release)
    before = snapshot(tmp_path / "tree")
    state = tmp_path / "state" / "tune.json"
    out = io.StringIO()
    assert tune.check(host, out) == 1 and "differs" in out.getvalue()

    out = io.StringIO()
    tune.apply(host, state, out)
    after = snapshot(tmp_path / "tree")
    assert after != before
    assert "set net.core.somaxconn: 4096 -> 65535" in out.getvalue()
    assert after["proc_sys/fs/file-max"] == before["proc_sys/fs/file-max"]  # never lowered
    scheduler = [k for k in tune.knobs(host.version) if k.kind in ("sysctl", "debugfs")
                 and "sched" in k.path]
    for knob in scheduler:
        assert tune.read(host, knob).current == knob.recommended
    saved = json.loads(state.read_text())
    assert saved[str(host.proc_sys / "net/ipv4/ip_local_port_range")] == "32768 60999"

    tune.apply(host, state, io.StringIO())  # a second apply must keep the original values
    assert json.loads(state.read_text()) == saved

    out = io.StringIO()
    assert tune.revert(host, state, out) == 0
    restored = snapshot(tmp_path / "tree")
    assert {k: " ".join(v.split()) for k, v in restored.items()} == \
           {k: " ".join(v.split()) for k, v in before.items()}
    assert not state.exists()


def test_debugfs_not_mounted_is_explained_not_fatal(tmp_path):
    host = make_host(tmp_path, "6.18.0", debugfs=False)
    out = io.StringIO()
    assert tune.check(host, out) == 1
    assert "debugfs is not mounted" in out.getvalue()
    assert "mount -t debugfs none /sys/kernel/debug" in out.getvalue()
    out = io.StringIO()
    assert tune.apply(host, tmp_path / "s.json", out) == 1  # some knobs could not be set
    assert "skip sched/base_slice_ns" in out.getvalue()
    assert "set net.core.somaxconn" in out.getvalue()


def test_not_root_only_says_what_it_would_do(tmp_path):
    host = make_host(tmp_path / "tree", "6.18.0", root=False)
    before = snapshot(tmp_path / "tree")
    out = io.StringIO()
    assert tune.apply(host, tmp_path / "s.json", out) == 1
    assert "would set net.core.somaxconn: 4096 -> 65535" in out.getvalue()
    assert "sudo bidder tune apply" in out.getvalue()
    assert snapshot(tmp_path / "tree") == before and not (tmp_path / "s.json").exists()


def test_check_passes_once_applied(tmp_path):
    host = make_host(tmp_path, "6.6.0")
    tune.apply(host, tmp_path / "s.json", io.StringIO())
    out = io.StringIO()
    code = tune.check(host, out)
    lines = [line for line in out.getvalue().splitlines()
             if line.startswith(("sched", "net", "fs"))]
    assert all(line.rstrip().endswith("ok") for line in lines), out.getvalue()
    # only the per-process nofile hard limit (not a host file) can still differ
    assert code == (0 if tune.read(host, tune.knobs(host.version)[-1]).ok else 1)


def bidder(*args: str, user: str | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "bidder.cli", "tune", *args]
    if user:
        command = ["setpriv", "--reuid", user, "--regid", user, "--clear-groups", *command]
    return subprocess.run(command, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "HOME": "/tmp"})


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root + setpriv")
def test_real_check_as_root_and_as_nobody():
    as_root = bidder("check")
    assert as_root.returncode in (0, 1), as_root.stderr
    assert "running as root" in as_root.stdout and "net.core.somaxconn" in as_root.stdout
    as_nobody = bidder("check", user="65534")
    assert as_nobody.returncode in (0, 1), as_nobody.stderr
    assert "running as uid 65534 (not root)" in as_nobody.stdout
    assert "KNOB" in as_nobody.stdout and "Traceback" not in as_nobody.stderr
    applied = bidder("apply", "--state", "/tmp/bidder-tune-test-never.json", user="65534")
    assert applied.returncode == 1 and "not root: nothing changed" in applied.stdout
    assert not Path("/tmp/bidder-tune-test-never.json").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="apply writes only as root")
def test_cli_round_trip_on_a_tree(tmp_path):
    host = make_host(tmp_path / "tree", "5.10.0")
    before = snapshot(tmp_path / "tree")
    roots = ["--proc-sys", str(host.proc_sys), "--debugfs", str(host.debugfs),
             "--kernel-release", "5.10.0", "--state", str(tmp_path / "state.json")]
    assert "kernel.sched_min_granularity_ns" in bidder("apply", *roots).stdout
    assert bidder("revert", *roots).returncode == 0
    assert {k: " ".join(v.split()) for k, v in snapshot(tmp_path / "tree").items()} == \
           {k: " ".join(v.split()) for k, v in before.items()}
