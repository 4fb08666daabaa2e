"""A gthread worker that shares keep-alive connections evenly with its siblings.

Plain Gunicorn workers race on ``accept`` on the shared listener: whichever
wakes first takes the connection, and one worker often ends up with most of an
exchange's long-lived keep-alive connections. Unpinned, the kernel moves the
busy worker around; pinned, its neighbours idle while its queue grows.

:class:`BalancedThreadWorker` keeps the listener registered only while it holds
no more open connections than its least-loaded live sibling. Counts live in a
shared-memory :class:`~server_hooks.slots.ConnectionBoard` (one cell per slot,
written on every change of ``nr_conns``), so the decision needs no messages.
The true least-loaded worker always sees itself eligible (a count is published
the moment it grows, so a stale cell can only look busier than it is), so the
listener is never orphaned for longer than :data:`RECHECK_S`, the poll interval
of a worker waiting for its turn. Connections therefore differ by at most one
between workers.

Gating accepts cannot fix connections taken before a sibling existed (a worker
still booting, a replacement after ``kill -9``): a worker holding two or more
connections above the least-loaded sibling answers its next request with
``Connection: close`` (one connection at a time), and the client's reconnect
lands on the sibling. Without a slot (hooks not installed) or with one worker
it behaves exactly like gthread.
"""
from __future__ import annotations

import selectors
import socket
import struct
import time
from concurrent import futures
from functools import partial

from gunicorn.workers.gthread import TConn, ThreadWorker

from server_hooks.slots import ConnectionBoard

READY_AT = "bidder.ready_at"  # WSGI environ key: when the poller saw the request (monotonic s)

# A request that has started must arrive (and its answer leave) within this, or its connection
# is dropped: a stalled client must not hold the one thread that serves every connection.
IO_STALL_S = 1

# How often a worker that is not accepting re-reads the board: the longest a new connection
# can wait in the backlog when the worker whose turn it is has just become eligible.
RECHECK_S = 0.005


class BalancedThreadWorker(ThreadWorker):
    """gthread, accepting only while this worker holds the fewest open connections."""

    slot: int | None = None  # set by the master's pre_fork hook
    board: ConnectionBoard | None = None  # idem, shared by all workers of the master
    _joined = False
    _conns = 0
    _shed_at: int | None = None  # nr_conns when the last shed was decided: one in flight
    _checked_at: int | None = None  # nr_conns when eligibility was last decided

    @property  # type: ignore[override]
    def nr_conns(self) -> int:
        return self._conns

    @nr_conns.setter
    def nr_conns(self, value: int) -> None:
        # gthread changes nr_conns on accept and close; publish every change at once.
        self._conns = value
        if self._joined:
            self.board.set(self.slot, value)

    def run(self) -> None:
        if self.board is not None and self.slot is not None and self.board.covers(self.slot):
            self._joined = True
            self.board.set(self.slot, self._conns)
        else:
            self.log.warning("worker pid=%s has no connection board slot (server_hooks.hooks not "
                             "installed?): accepting without balancing", self.pid)
        if self.cfg.threads <= 1:
            self._stamp_readiness()
        try:
            super().run()
        finally:
            self._leave()

    def _stamp_readiness(self) -> None:
        """Give the app the moment the poller saw its request's bytes (``bidder.ready_at`` in
        the WSGI environ, ``time.monotonic()``): requests handled one after another from one
        poll waited for each other, and that wait counts against the exchange's ``tmax``."""
        select, app = self.poller.select, self.wsgi
        self._ready_at = time.monotonic()

        def timed_select(timeout=None):
            events = select(timeout)
            self._ready_at = time.monotonic()
            return events

        def stamped_app(environ, start_response):
            environ[READY_AT] = self._ready_at
            return app(environ, start_response)

        self.poller.select = timed_select
        self.wsgi = stamped_app

    def set_accept_enabled(self, enabled: bool) -> None:
        if enabled and self._joined and self.board.any_below(self._conns):
            enabled = False
        self._checked_at = self._conns
        super().set_accept_enabled(enabled)

    def wait_for_and_dispatch_events(self, timeout: float) -> None:
        if self._joined:
            if not self.alive:
                self._leave()  # stopping: siblings must not wait for this worker's turn
            elif not self._accepting or self._conns != self._checked_at:
                # While accepting with an unchanged count the answer can only be stale in
                # this worker's disfavour by one connection, which the next accept re-checks.
                self.set_accept_enabled(self._conns < self.worker_connections)
                if not self._accepting:
                    timeout = min(timeout, RECHECK_S)
        super().wait_for_and_dispatch_events(timeout)

    # --- one thread: handle requests in the poller's thread -----------------------------------
    # With ``--threads 1`` (the default) the pool holds one thread anyway, and handing every
    # request to it costs a future, a pipe write and two GIL hand-offs, more so when the
    # request itself waits on memcached. Inline, a request runs where its readiness was seen:
    # 8 % less CPU per request (docs/ab/inline: one worker, against plain gthread). A new
    # connection waits in the poller until it has sent something, so a silent client never
    # blocks the worker.

    def accept(self, listener) -> None:
        if self.cfg.threads > 1:
            return super().accept(listener)
        try:
            client_sock, client_addr = listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        self.nr_conns += 1
        # Kernel-level timeouts survive gthread's setblocking(True) while a request is read.
        stall = struct.pack("ll", IO_STALL_S, 0)
        client_sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, stall)
        client_sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, stall)
        conn = TConn(self.cfg, client_sock, client_addr, listener.getsockname())
        conn.timeout = time.monotonic() + self.cfg.keepalive
        self.pending_conns.append(conn)
        self.poller.register(client_sock, selectors.EVENT_READ,
                             partial(self.on_pending_socket_readable, conn))

    def enqueue_req(self, conn) -> None:
        if self.cfg.threads > 1:
            return super().enqueue_req(conn)
        done: futures.Future = futures.Future()
        try:
            done.set_result(self.handle(conn))
        except BaseException as exc:  # finish_request closes the connection, as gthread does
            done.set_exception(exc)
        self.finish_request(conn, done)

    def handle_request(self, req, conn):
        conns = self._conns
        if self._joined and conns >= 2 and conns != self._shed_at \
                and self.board.any_below(conns - 1):
            self._shed_at = conns  # a sibling holds two fewer: hand this connection over
            req.must_close = True  # "Connection: close": the client reconnects elsewhere
        return super().handle_request(req, conn)

    def _leave(self) -> None:
        if self._joined:
            self._joined = False
            self.board.clear(self.slot)
