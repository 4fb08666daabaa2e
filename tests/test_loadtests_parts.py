"""Small parts of the harness: CPU placement, run order, /proc counters, perf output parsing."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from loadtests import perf, stack
from loadtests.ab import interleaved_order


def test_placement_separates_the_generator_on_many_cpus():
    p = stack.Placement.plan(list(range(8)))
    assert p.separated
    assert p.server_cpus == "0,1,2,3,4,5" and p.generator_cpus == "6,7"


def test_placement_says_plainly_when_it_cannot_separate():
    p = stack.Placement.plan([0, 1])
    assert not p.separated and p.server_cpus is None and p.generator_cpus is None
    assert "not representative of a many-core server" in p.note


def test_interleaved_order_pairs_both_arms_and_is_seeded():
    order = interleaved_order(["a", "b"], 6, seed=3)
    pairs = [order[i:i + 2] for i in range(0, 12, 2)]
    assert all(sorted(pair) == ["a", "b"] for pair in pairs)
    assert len({tuple(p) for p in pairs}) == 2  # both AB and BA occur: not AAA BBB
    assert order == interleaved_order(["a", "b"], 6, seed=3)


def test_proc_counters_move_with_work_and_sleep():
    before = stack.read_counters([os.getpid()])
    deadline = time.process_time() + 0.05
    while time.process_time() < deadline:
        pass
    for _ in range(5):
        time.sleep(0.001)
    delta = stack.read_counters([os.getpid()]) - before
    assert delta.cpu_s > 0.0
    assert delta.voluntary >= 5
    assert delta.migrations >= 0 and delta.involuntary >= 0


def test_children_lists_direct_children(tmp_path):
    import subprocess
    child = subprocess.Popen(["sleep", "5"])
    try:
        assert child.pid in stack.children(os.getpid())
    finally:
        child.kill()
        child.wait()


def test_perf_output_parsing_skips_unsupported_events():
    text = ("123,,cycles,100.0,100.00,,\n456,,cpu_core/instructions/,1,1,,\n"
            "<not supported>,,cache-misses,0,100,,\n")
    assert perf._parse(text) == {"cycles": 123.0, "instructions": 456.0}
    assert perf._parse("<not supported>,,cycles,0,100.00,,\n") == {}


@pytest.mark.parametrize("argv, says", [
    (["bench", "--reps", "0"], "argument --reps: must be at least 1"),
    (["bench", "--capacity-budget", "3"], "a capacity budget of 3 s holds no step"),
    (["capacity", "--budget", "2"], "a capacity budget of 2 s holds no step"),
    (["ab", "--rate", "-5"], "argument --rate: must be more than 0"),
    (["demo", "--users", "0"], "argument --users: must be at least 1"),
    (["seed", "--users", "-5"], "argument --users: must be at least 1"),
    (["train", "--synthetic", "2000", "--out", "x.npz", "--hash-bits", "0"],
     "argument --hash-bits: must be at least 4 and at most 30"),  # was a ValueError traceback
    (["train", "--synthetic", "2000", "--out", "x.npz", "--model", "fm", "--k", "0"],
     "argument --k: must be at least 1"),  # was a TypeError traceback from numpy
    (["train", "--synthetic", "2000", "--out", "x.npz", "--epochs", "0"],
     "argument --epochs: must be at least 1"),  # saved an untrained model
])
def test_command_arguments_that_cannot_work_are_refused_before_anything_starts(argv, says):
    """Each of these used to run: a bench with zero reps failed after its capacity search
    (max() of nothing), a budget shorter than one step reported a capacity of 0, and a demo
    with negative users ended in a traceback."""
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "bidder.cli", *argv], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode != 0 and says in result.stderr, result.stderr[-500:]
    assert "Traceback" not in result.stderr and time.monotonic() - started < 20
