"""Stable worker slots (master side) and the shared board of open connections per slot.

Gunicorn numbers workers by ``age``, which grows with every respawn, so it
cannot say "the worker on CPU 1 died, start the next one there". The master
keeps a :class:`SlotTable` instead: a new worker takes a free slot on the CPU
with the fewest live workers (the lowest such slot), so a replacement lands in
the dead worker's slot and CPU, and after a HUP reload the respawns still
cover every CPU once.

The :class:`ConnectionBoard` is one page of anonymous shared memory created
in the master before the first fork; every worker writes its own cell (its
open connection count) and reads its siblings' to decide whether it should
accept (see ``server_hooks.worker``). A cell of -1 means "no accepting worker
in this slot"; the master writes it only for a slot with no live process.
"""
from __future__ import annotations

import mmap
from collections.abc import Callable

FREE = -1


class ConnectionBoard:
    """Open connections per slot in shared memory; cell 0 holds how many slot cells are in use."""

    def __init__(self, capacity: int = 1023):
        self.capacity = capacity
        self._memory = mmap.mmap(-1, 4 * (capacity + 1))  # MAP_SHARED | MAP_ANONYMOUS
        self._cells = memoryview(self._memory).cast("i")
        self._cells[0] = 0
        for index in range(1, capacity + 1):
            self._cells[index] = FREE

    def covers(self, slot: int) -> bool:
        return 0 <= slot < self.capacity

    def open(self, slot: int) -> None:
        """Make ``slot`` visible to the siblings' scans (master, before fork)."""
        self._cells[0] = max(self._cells[0], slot + 1)

    def set(self, slot: int, connections: int) -> None:
        self._cells[slot + 1] = connections

    def get(self, slot: int) -> int:
        return self._cells[slot + 1]

    def clear(self, slot: int) -> None:
        """The slot has no accepting worker: siblings stop waiting for it."""
        self._cells[slot + 1] = FREE

    def any_below(self, connections: int) -> bool:
        """True when some accepting slot has fewer than ``connections`` open."""
        cells = self._cells
        for index in range(1, cells[0] + 1):
            value = cells[index]
            if value != FREE and value < connections:
                return True
        return False

    def snapshot(self) -> dict[int, int]:
        """{slot: open connections} of every accepting slot."""
        cells = self._cells
        return {index - 1: cells[index] for index in range(1, cells[0] + 1)
                if cells[index] != FREE}


class SlotTable:
    """Master-side slot bookkeeping: which slots are taken, on which CPU each one sits."""

    def __init__(self, cpu_for: Callable[[int], int], width: int,
                 board: ConnectionBoard | None = None):
        self._cpu_for = cpu_for
        self._width = max(1, width)  # CPUs in the plan: a free slot on every CPU is found
        self.board = board if board is not None else ConnectionBoard()
        self.taken: set[int] = set()

    def acquire(self) -> int:
        """Take the lowest free slot on the CPU with the fewest live workers."""
        load: dict[int, int] = {}
        for slot in self.taken:
            cpu = self._cpu_for(slot)
            load[cpu] = load.get(cpu, 0) + 1
        limit = max(self.taken, default=-1) + self._width + 1
        slot = min((s for s in range(limit) if s not in self.taken),
                   key=lambda s: (load.get(self._cpu_for(s), 0), s))
        self.taken.add(slot)
        if self.board.covers(slot):
            self.board.clear(slot)
            self.board.open(slot)
        return slot

    def release(self, slot: int) -> None:
        """The slot's worker is gone (idempotent)."""
        self.taken.discard(slot)
        if self.board.covers(slot):
            self.board.clear(slot)
