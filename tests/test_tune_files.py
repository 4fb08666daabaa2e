"""The operator files in server_hooks/host say the same values as ``bidder tune`` recommends."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from server_hooks.tune import RECOMMENDED

HOST = Path(__file__).resolve().parent.parent / "server_hooks" / "host"


def settings(path: Path) -> dict[str, str]:
    """key = value lines (commented ones too: they document the older kernels)."""
    found = {}
    for line in path.read_text().splitlines():
        match = re.fullmatch(r"#?\s*([\w./-]+)\s*=\s*(.+?)\s*", line)
        if match and not match.group(1).startswith(("summary", "include")):
            found[match.group(1)] = match.group(2)
    return found


@pytest.mark.parametrize("name", ["tuned/bidder/tuned.conf", "tuned/bidder-eevdf/tuned.conf",
                                  "sysctl.d/99-bidder.conf"])
def test_network_values_match(name):
    values = settings(HOST / name)
    for key in ("net.core.somaxconn", "net.ipv4.tcp_max_syn_backlog",
                "net.ipv4.ip_local_port_range", "fs.file-max"):
        assert values[key] == RECOMMENDED[key], (name, key)


def test_scheduler_values_match_per_era():
    cfs = settings(HOST / "tuned/bidder/tuned.conf")
    for key in ("sched_min_granularity_ns", "sched_wakeup_granularity_ns",
                "sched_migration_cost_ns"):
        assert cfs[key] == RECOMMENDED[key]
    eevdf = settings(HOST / "tuned/bidder-eevdf/tuned.conf")
    assert eevdf["/sys/kernel/debug/sched/base_slice_ns"] == RECOMMENDED["base_slice_ns"]
    assert eevdf["/sys/kernel/debug/sched/migration_cost_ns"] == \
        RECOMMENDED["sched_migration_cost_ns"]
    sysctl = settings(HOST / "sysctl.d/99-bidder.conf")
    assert sysctl["kernel.sched_min_granularity_ns"] == RECOMMENDED["sched_min_granularity_ns"]
    for name in ("tuned/bidder/tuned.conf", "tuned/bidder-eevdf/tuned.conf"):
        assert "include=throughput-performance" in (HOST / name).read_text()


def test_nofile_matches():
    assert f"LimitNOFILE={RECOMMENDED['nofile']}" in (HOST / "systemd/limits.conf").read_text()
    limits = (HOST / "limits.d/bidder.conf").read_text()
    assert re.search(rf"hard\s+nofile\s+{RECOMMENDED['nofile']}", limits)
