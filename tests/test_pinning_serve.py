"""End to end through ``bidder serve`` (real Gunicorn): pinning, respawn on the same CPU, --no-pin,
the slice in every worker, and the fallback when the kernel refuses a CPU."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from server_hooks import sched

APP = ("--app", "loadtests.balance:app")
ALLOWED = os.sched_getaffinity(0)


def affinity(pid: int) -> set[int]:
    return os.sched_getaffinity(pid)


def wait_for_workers(server, count: int, exclude=(), timeout: float = 20.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = [p for p in server.worker_pids() if p not in exclude]
        if len(pids) == count and all(f"pid={p} " in server.log() for p in pids):
            return pids
        time.sleep(0.05)
    raise AssertionError(f"workers not up:\n{server.log()}")


@pytest.mark.skipif(len(ALLOWED) < 2, reason="needs 2 allowed CPUs")
def test_pinned_workers_and_respawn_on_the_same_cpu(start_server):
    server = start_server("--workers", "2", "--pin", "--slice-ms", "10", *APP)
    pids = wait_for_workers(server, 2)
    cpus = {pid: affinity(pid) for pid in pids}
    assert all(len(c) == 1 for c in cpus.values()), cpus
    assert cpus[pids[0]] != cpus[pids[1]]
    if sched.kernel_version() >= sched.SLICE_KERNEL:
        assert [sched.read_slice(pid) for pid in pids] == [10_000_000, 10_000_000]

    victim = pids[0]
    os.kill(victim, signal.SIGKILL)
    survivor, = [p for p in pids if p != victim]
    new, = [p for p in wait_for_workers(server, 2, exclude=[victim]) if p != survivor]
    assert affinity(new) == cpus[victim]
    assert affinity(survivor) == cpus[survivor]
    log = server.log()
    slot_of_victim = next(line for line in log.splitlines() if f"pid={victim} " in line)
    slot_of_new = next(line for line in log.splitlines() if f"pid={new} " in line)
    assert slot_of_victim.split("slot=")[1].split()[0] == slot_of_new.split("slot=")[1].split()[0]


def test_workers_are_pinned_by_default(start_server):
    server = start_server("--workers", "2", *APP)
    for pid in wait_for_workers(server, 2):
        assert len(affinity(pid)) == 1 and affinity(pid) <= ALLOWED
    assert "pinning on" in server.log()


def test_no_pin_leaves_affinity_untouched(start_server):
    server = start_server("--workers", "2", "--no-pin", *APP)
    for pid in wait_for_workers(server, 2):
        assert affinity(pid) == ALLOWED
    assert "pinning off" in server.log()


@pytest.mark.skipif(len(ALLOWED) < 2, reason="needs 2 allowed CPUs")
def test_unpinned_workers_keep_off_the_reserved_cpus(start_server):
    reserved = min(ALLOWED)
    server = start_server("--workers", "2", "--no-pin", "--reserve-cpus", str(reserved), *APP)
    for pid in wait_for_workers(server, 2):
        assert affinity(pid) == ALLOWED - {reserved}


def test_a_cpu_map_without_pin_is_warned_about(start_server):
    server = start_server("--workers", "1", "--no-pin", "--cpu-map", str(min(ALLOWED)), *APP)
    pid, = wait_for_workers(server, 1)
    assert affinity(pid) == ALLOWED
    assert "--cpu-map is used with --pin only" in server.log()


def test_one_allowed_cpu_more_workers_than_cpus(start_server):
    """Started under a one-CPU affinity (as taskset/cpuset): three workers share it and serve."""
    cpu = max(ALLOWED)
    os.sched_setaffinity(0, {cpu})  # the server inherits it
    try:
        server = start_server("--workers", "3", "--pin", "--reserve-cpus", str(cpu), *APP)
    finally:
        os.sched_setaffinity(0, ALLOWED)
    pids = wait_for_workers(server, 3)
    assert "leaves no CPU" in server.log()  # reserving the only CPU is warned about, ignored
    assert [affinity(p) for p in pids] == [{cpu}] * 3
    status, _, body = server.request("GET", "/")
    assert status == 200 and int(body) in pids


def test_bad_cpu_map_stops_with_a_clear_error(start_server):
    server = start_server("--workers", "2", "--cpu-map", "0=4095,1=0", *APP, ready=False)
    assert server.process.wait(timeout=30) != 0
    assert "names CPU 4095" in server.log() and "may only run on CPUs" in server.log()


def test_pin_failure_is_a_warning_not_a_crash():
    code = ("import os; from server_hooks.pinning import pin; before = os.sched_getaffinity(0); "
            "w = pin(4095); print(w); assert os.sched_getaffinity(0) == before")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert "could not pin to CPU 4095" in done.stdout and "serving unpinned" in done.stdout


def test_metrics_show_where_every_worker_runs(start_server):
    """The real bid app: GET /metrics lists slot, pid, CPUs and slice of each live worker."""
    server = start_server("--workers", "2", "--pin", "--slice-ms", "10")
    pids = wait_for_workers(server, 2)
    status, _, body = server.admin("GET", "/metrics")
    assert status == 200
    lines = [line for line in body.decode().splitlines()
             if line.startswith("bidder_worker_info{")]
    for pid in pids:
        line, = [line for line in lines if f'pid="{pid}"' in line]
        assert f'cpus="{",".join(map(str, sorted(affinity(pid))))}"' in line
        assert 'slot="' in line and line.endswith(" 1.0")
        if sched.kernel_version() >= sched.SLICE_KERNEL:
            assert 'slice_ns="10000000"' in line


@pytest.mark.skipif(len(ALLOWED) < 2, reason="needs 2 allowed CPUs")
def test_reload_keeps_one_worker_per_cpu_and_respawns_in_place(start_server):
    """SIGHUP forks new workers before the old ones stop; slots shift, CPUs stay covered."""
    server = start_server("--workers", "2", "--pin", *APP)
    old = wait_for_workers(server, 2)
    os.kill(server.master_pid, signal.SIGHUP)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        new = [p for p in server.worker_pids() if p not in old]
        if len(new) == 2 and len(server.worker_pids()) == 2 and \
                all(f"pid={p} " in server.log() for p in new):
            break
        time.sleep(0.05)
    else:
        raise AssertionError(server.log())
    cpus = {pid: affinity(pid) for pid in new}
    assert all(len(c) == 1 for c in cpus.values())
    assert sorted(min(c) for c in cpus.values()) == sorted(ALLOWED)[:2]  # one on each CPU
    os.kill(new[1], signal.SIGKILL)
    replacement, = [p for p in wait_for_workers(server, 2, exclude=[new[1]]) if p != new[0]]
    assert affinity(replacement) == cpus[new[1]]
