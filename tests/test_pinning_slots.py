"""Stable slots in the master and the shared connection board the workers balance on."""
from __future__ import annotations

import os

from server_hooks.pinning import CpuPlan
from server_hooks.slots import ConnectionBoard, SlotTable


def table(order=(0, 1)) -> SlotTable:
    plan = CpuPlan(tuple(order))
    return SlotTable(plan.cpu_for, len(plan.order))


def test_respawn_takes_the_dead_workers_slot():
    slots = table((0, 1, 2))
    assert [slots.acquire() for _ in range(3)] == [0, 1, 2]
    slots.release(1)
    assert slots.acquire() == 1  # the replacement lands where the dead worker was
    slots.release(0)
    slots.release(0)  # idempotent
    assert slots.acquire() == 0


def test_more_workers_than_cpus_fill_cpus_evenly():
    slots = table((0, 1))
    taken = [slots.acquire() for _ in range(4)]
    assert [s % 2 for s in taken] == [0, 1, 0, 1]


def test_reload_then_respawn_keeps_every_cpu_covered():
    """HUP: new workers are forked before the old ones stop, then one of the new dies."""
    plan = CpuPlan((0, 1))
    slots = SlotTable(plan.cpu_for, 2)
    old = [slots.acquire(), slots.acquire()]
    new = [slots.acquire(), slots.acquire()]
    assert sorted(plan.cpu_for(s) for s in new) == [0, 1]
    for s in old:
        slots.release(s)
    dead = new[1]
    slots.release(dead)
    replacement = slots.acquire()
    assert plan.cpu_for(replacement) == plan.cpu_for(dead)


def test_board_is_shared_across_fork():
    board = ConnectionBoard(capacity=8)
    board.open(0)
    board.open(1)
    board.set(0, 3)
    pid = os.fork()
    if pid == 0:
        board.set(1, 5)
        os._exit(0)
    os.waitpid(pid, 0)
    assert board.snapshot() == {0: 3, 1: 5}
    assert not board.any_below(3) and board.any_below(4)
    board.clear(0)  # slot 0's worker died: nobody waits for it
    assert not board.any_below(5) and board.any_below(6)


def test_acquire_resets_a_reused_cell():
    slots = table()
    slot = slots.acquire()
    slots.board.set(slot, 7)
    slots.release(slot)
    assert slots.board.snapshot() == {}
    assert slots.acquire() == slot and slots.board.snapshot() == {}  # joins when its worker runs
