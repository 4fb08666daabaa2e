"""Connection balancing: each worker accepts only while it holds the fewest open connections.

Plain Gunicorn workers race on ``accept`` on the shared listener: whichever wakes first takes
the connection, and one worker often ends up with most of an exchange's long-lived keep-alive
connections. Unpinned, the kernel moves the busy worker around; pinned, its neighbours idle
while its queue grows.

A worker keeps the listener registered only while it holds no more open connections than its
least-loaded live sibling. Counts live in a shared-memory
:class:`~server_hooks.slots.ConnectionBoard` (one cell per slot, written on every change of the
worker's count), so the decision needs no messages. The true least-loaded worker always sees
itself eligible (a count is published the moment it grows, so a stale cell can only look
busier than it is), so the listener is never orphaned for longer than :data:`RECHECK_S`, the
poll interval of a worker waiting for its turn. Connections therefore differ by at most one
between workers.

Gating accepts cannot fix connections taken before a sibling existed (a worker still booting, a
replacement after ``kill -9``): a worker holding two or more connections above the least-loaded
sibling answers its next request with ``Connection: close`` (one connection at a time), and the
client's reconnect lands on the sibling. Without a slot (hooks not installed) or with one
worker, nothing is gated.
"""
from __future__ import annotations

from server_hooks.slots import ConnectionBoard

# How often a worker that is not accepting re-reads the board: the longest a new connection
# can wait in the backlog when the worker whose turn it is has just become eligible.
RECHECK_S = 0.005


class Balancer:
    """One worker's cell on the connection board and the decisions read from it."""

    def __init__(self, board: ConnectionBoard | None, slot: int | None) -> None:
        self.board = board
        self.slot = slot
        self.joined = False
        self._shed_at: int | None = None  # the count when the last shed was decided

    def join(self, conns: int) -> bool:
        """Take this worker's cell (False without one: hooks not installed)."""
        if self.board is not None and self.slot is not None and self.board.covers(self.slot):
            self.joined = True
            self.board.set(self.slot, conns)
        return self.joined

    def publish(self, conns: int) -> None:
        if self.joined:
            self.board.set(self.slot, conns)

    def may_accept(self, conns: int) -> bool:
        """Whether no live sibling holds fewer connections than ``conns``."""
        return not (self.joined and self.board.any_below(conns))

    def should_shed(self, conns: int) -> bool:
        """Whether the answer in hand should close its connection (``Connection: close``) so
        the client reconnects to a sibling holding two fewer; one such close in flight."""
        if self.joined and conns >= 2 and conns != self._shed_at \
                and self.board.any_below(conns - 1):
            self._shed_at = conns
            return True
        return False

    def leave(self) -> None:
        """Free the cell: a stopping worker must not hold its siblings' turn."""
        if self.joined:
            self.joined = False
            self.board.clear(self.slot)
