"""Dispatch: a gthread worker that balances connections, waits for whole requests and answers
the plain ones on its own short path.

:class:`BalancedThreadWorker` is Gunicorn's gthread worker with four jobs added, each in its
own module:

- connection balancing (:mod:`server_hooks.balance`): the listener is registered only while
  this worker holds no more connections than its least-loaded sibling;
- request framing (:mod:`server_hooks.framing`): with ``--threads 1`` (the default) a request
  is handled inline, in the poller's thread, and only once it is entirely in the kernel's
  buffer, so a stalled client blocks no one (answered 408 after ``ARRIVAL_S``);
- the fast path (:mod:`server_hooks.fastpath`): a plain request is read with one ``recv``,
  answered by the app and written with one ``send``, the socket staying non-blocking and
  registered in the poller; anything else goes to Gunicorn's parser as before;
- dispatch (here): which path a request takes, in which order, and the connection's life.

The peek that checks a request's arrival also reads the kernel's receive timestamp of its
first bytes (``SO_TIMESTAMPNS``), and that is the arrival the app measures ``tmax`` from
(``READY_AT`` in the WSGI environ): a request that waited in the socket buffer while the
worker was busy with others has that wait counted. The connections found readable by one poll
are served in the order of those timestamps, oldest first, not in the poller's order.

Requests whose path starts with one of the app's ``offload_paths`` (the bidder's win and
billing notices, which write its SQLite ledger) go to gthread's pool thread instead, so their
disk writes and lock waits never hold up the bids behind them.

When one poll finds several requests, the fast path first hands their environs to the app's
``prefetch(environs)`` context manager, if it has one, and serves them inside it: the bidder
decodes the bid requests and reads all their memcached look-ups in one round trip there.

With ``--threads`` above 1 the worker is gthread with balancing only. Settings are read from the
app duck-typed (``self.app.settings``): ``max_body_bytes``, ``offload_paths``, ``fast_path``.
"""
from __future__ import annotations

import io
import math
import selectors
import socket
import struct
import time
from collections import deque
from concurrent import futures
from contextlib import AbstractContextManager, nullcontext
from functools import partial
from operator import itemgetter

from gunicorn.workers.gthread import STOP_KEEPALIVE_LINGER, TConn, ThreadWorker

from server_hooks import metrics
from server_hooks.balance import RECHECK_S, Balancer
from server_hooks.environ import INFLATED, READY_AT
from server_hooks.fastpath import FastPath, Request
from server_hooks.framing import (ARRIVAL_S, CONTINUE_100, REFUSALS, REFUSED_STATUS,
                                  SO_TIMESTAMPNS, TIMEOUT_408, TIMESTAMP_SPACE, Arrival, arrival,
                                  GZIP_CODINGS, gunzip, kernel_arrival, peek_tmax)
from server_hooks.slots import ConnectionBoard

# Kernel send/receive timeouts of a client socket: a backstop, as a request is handled only
# once whole; it bounds sending an answer to a client that does not read it (Gunicorn's path
# writes in blocking mode; the fast path only when the send buffer is full).
IO_STALL_S = 1

# One MSG_PEEK of this much sees any ordinary request whole; a larger one is read in pieces.
PEEK_BYTES = 65536
HEAD_PEEK = 256  # bytes kept of a request's start: its method and path, for offloading
PEEK = socket.MSG_PEEK | socket.MSG_DONTWAIT

# A connection closed after its answer lingers this long for the client's FIN (RFC 9112 9.6:
# closing with unread input would reset it and can destroy the answer), in the poller.
CLOSE_LINGER_S = 2.0
CLOSE_DRAIN_BYTES = 65536

# How often a long poll's requests are interrupted to accept waiting connections; how many
# one accept may take at once, and how far above its least-loaded sibling that may put it.
ACCEPT_EVERY_S = 0.005
ACCEPT_BURST = 64
ACCEPT_SLACK = 16

# Weight of the latest poll in the moving average of the wall time per request with a
# deadline the worker served (about the last 4 polls count): what one taken up now should
# expect, preemption and all.
SERVICE_WEIGHT = 0.25

# A request arriving within this of the answer before it on its connection came back to back:
# the client had it waiting (measured: 0-4 ms when every connection is kept busy, 10 ms and
# more from an open loop with connections to spare). When at least BACK_TO_BACK_SHARE of the
# requests a worker takes up in each window of BACK_TO_BACK_WINDOW_S come so for
# CLOSED_LOOP_AFTER_S on end, the client is taken for a closed loop (see _closed_loop), until
# a window has fewer than BACK_TO_BACK_KEEP_SHARE so (a few replies the client was slow to
# follow up, as on a busy machine, must not undo a second's evidence; an open loop with
# connections to spare shows none back to back).
BACK_TO_BACK_S = 0.005
BACK_TO_BACK_SHARE = 0.9
BACK_TO_BACK_KEEP_SHARE = 0.5
BACK_TO_BACK_WINDOW_S = 0.1
CLOSED_LOOP_AFTER_S = 1.0
SWITCH_LOG_S = 60.0  # at most one log line a minute about those switches (the gauge has each)


class BalancedThreadWorker(ThreadWorker):
    """gthread, accepting only while this worker holds the fewest open connections."""

    slot: int | None = None  # set by the master's pre_fork hook
    board: ConnectionBoard | None = None  # idem, shared by all workers of the master
    _balancer: Balancer | None = None
    _conns = 0
    _checked_at: int | None = None  # nr_conns when eligibility was last decided
    _gated = False  # requests wait in the poller until whole (--threads 1, see _gate_requests)
    _fast: FastPath | None = None  # the fast path, when the configuration allows it
    _offload: tuple = ()  # path prefixes handled in the thread pool (see _dispatch)
    _keepalive_full = False  # the keep-alive limit was reached (logged once)
    _refused = 0  # malformed requests refused since the last log line
    _refusal_logged_at = float("-inf")
    _arriving: deque | tuple = ()  # empty unless gated
    _continued: set | frozenset = frozenset()  # idem
    _idle: dict | tuple = ()  # fast path: kept-alive connections, by expiry (empty unless fast)
    _closing: deque | tuple = ()  # fast path: closed connections awaiting the client's FIN
    _deadline_paths: tuple = ()  # fast path: "POST /path" prefixes of requests with a tmax
    _accept_at = 0.0  # when a long poll next looks for a waiting connection
    _keepalive_s = 0.0  # cfg.keepalive (fast path)
    _service_s = 0.0  # moving average of the wall time per such request served
    _prefetch = None  # the app's prefetch(environs) context, if it has one (fast path)
    _shed_counts: dict[str, int]  # fast path: quick no-bids of this poll, by reason
    _wait_share = 1.0  # --wait-share (with deadline paths)
    _max_poll_s = math.inf  # --max-poll-ms
    _closed_loop_share: float | None = None  # --closed-loop-share (idem): None, off
    _back_to_back_since = math.inf  # since when (nearly) every request came back to back
    _window_end = 0.0  # end of the current window of requests counted for _closed_loop
    _window_back_to_back = 0  # in it: requests that came back to back
    _window_taken = 0  # in it: requests taken up
    _in_closed_loop = False  # what _closed_loop last said
    _switches = 0  # how often it changed its mind since it last said so in the log
    _switch_logged_at = -math.inf

    @property  # type: ignore[override]
    def nr_conns(self) -> int:
        return self._conns

    @nr_conns.setter
    def nr_conns(self, value: int) -> None:
        # gthread changes nr_conns on accept and close; publish every change at once.
        self._conns = value
        if self._balancer is not None:
            self._balancer.publish(value)

    def run(self) -> None:
        self._balancer = Balancer(self.board, self.slot)
        if not self._balancer.join(self._conns):
            self.log.warning("worker pid=%s has no connection board slot (server_hooks.hooks not "
                             "installed?): accepting without balancing", self.pid)
        if self.cfg.threads <= 1:
            self._stamp_readiness()
            self._gate_requests()
        try:
            super().run()
        finally:
            self._balancer.leave()

    def _stamp_readiness(self) -> None:
        """Give the app its request's arrival (``READY_AT`` in the WSGI environ,
        ``time.monotonic()``): the kernel's receive time of its first bytes where the arrival
        check read it, else when the poller saw them. Requests handled one after another waited
        for each other, and that wait counts against the exchange's ``tmax``."""
        select, app = self.poller.select, self.wsgi
        self._app = app
        self._ready_at = time.monotonic()
        self._request_arrived_at: float | None = None

        def timed_select(timeout=None):
            events = select(timeout)
            self._ready_at = time.monotonic()
            return events

        def stamped_app(environ, start_response):
            arrived = self._request_arrived_at
            environ[READY_AT] = self._ready_at if arrived is None else arrived
            return app(environ, start_response)

        self.poller.select = timed_select
        self.wsgi = stamped_app

    def _gate_requests(self) -> None:
        """Size the arrival check: the largest head Gunicorn's limits allow, and the largest
        body the app takes (``max_body_bytes``, plus slack for gzip and chunk framing); set up
        the fast path unless the app's ``fast_path`` setting is off."""
        cfg = self.cfg
        self._gated = not cfg.is_ssl  # TLS bytes cannot be peeked at
        if self._gated:
            # On the listeners, for the worker's life, not on each accepted socket (which
            # inherits it): the kernel stamps arriving packets only while some socket asks,
            # and turns that on from a work queue, so bytes that arrived just after the last
            # stamped socket closed (a quiet moment) came without a time and sorted last.
            for listener in self.sockets:
                listener.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        # 0 means "unlimited" to Gunicorn; the line and field sizes are then its maxima.
        line, field = cfg.limit_request_line or 8190, cfg.limit_request_field_size or 8190
        self._head_limit = line + 2 + cfg.limit_request_fields * (field + 2) + 2
        settings = getattr(self.app, "settings", None)
        body = getattr(settings, "max_body_bytes", 0) or 1024 * 1024
        self._offload = tuple(b" " + p.strip().encode() for p in
                              (getattr(settings, "offload_paths", "") or "").split(",") if p.strip())
        self._head: bytes = b""  # the first bytes of the request being checked
        self._max_body = body  # the app's limit, also for a body it inflates
        self._body_limit = body + body // 8 + 1024
        self._window = self._head_limit + self._body_limit
        self._arriving = deque()  # connections with a partial request, oldest first
        self._arrived_at: float | None = None  # kernel arrival of the request being peeked at
        self._continued = set()  # connections sent a 100 Continue by this worker
        if self._gated and getattr(settings, "fast_path", True) and FastPath.usable(cfg):
            self._fast = FastPath(cfg, self._app, self.log, body)
            self._keepalive_s = cfg.keepalive  # read per answer: a plain attribute, not a lookup
            self._idle = {}
            self._ready: list = []  # connections found readable by this poll
            self._closing = deque()
            self._scratch = bytearray(PEEK_BYTES)  # where a request's bytes are read to
            self._prefetch = getattr(self._app, "prefetch", None)
            self._shed_counts = {}
            self._bound_by_deadline(settings)

    def _bound_by_deadline(self, settings) -> None:
        """Read which requests carry a deadline (``deadline_paths``) and the app's rule for it
        (``default_tmax_ms``, ``safety_margin_ms``): none without all three settings; and the
        share of the time to that deadline a poll may spend serving them (``wait_share``, at
        most ``max_poll_ms``)."""
        paths = [p.strip() for p in (getattr(settings, "deadline_paths", "") or "").split(",")
                 if p.strip()]
        tmax_ms = getattr(settings, "default_tmax_ms", None)
        margin_ms = getattr(settings, "safety_margin_ms", None)
        if not paths or not tmax_ms or margin_ms is None:
            return
        self._deadline_paths = tuple(b"POST " + p.encode() for p in paths)
        self._default_tmax_s = tmax_ms / 1000.0
        self._margin_s = margin_ms / 1000.0
        self._wait_share = getattr(settings, "wait_share", 1.0)
        max_poll_ms = getattr(settings, "max_poll_ms", None)
        self._max_poll_s = math.inf if max_poll_ms is None else max_poll_ms / 1000.0
        self._closed_loop_share = getattr(settings, "closed_loop_share", None)

    def set_accept_enabled(self, enabled: bool) -> None:
        if enabled and not self._balancer.may_accept(self._conns):
            enabled = False
        self._checked_at = self._conns
        super().set_accept_enabled(enabled)

    def wait_for_and_dispatch_events(self, timeout: float) -> None:
        if self._balancer.joined:
            if not self.alive:
                self._balancer.leave()  # stopping: siblings must not wait for this worker's turn
            elif not self._accepting or self._conns != self._checked_at:
                # While accepting with an unchanged count the answer can only be stale in
                # this worker's disfavour by one connection, which the next accept re-checks.
                self.set_accept_enabled(self._conns < self.worker_connections)
                if not self._accepting:
                    timeout = min(timeout, RECHECK_S)
        now = time.monotonic()
        if self._arriving:
            timeout = min(timeout, max(0.0, self._arriving[0].timeout - now))
        if self._closing:
            timeout = min(timeout, max(0.0, self._closing[0].timeout - now))
        if self._idle and not self.alive:  # stopping: kept-alive connections linger briefly
            timeout = min(timeout, max(0.0, next(iter(self._idle)).timeout - now))
        super().wait_for_and_dispatch_events(timeout)
        if self._fast is not None and self._ready:
            self._serve_ready()
        if self._arriving:
            self._expire_arriving()

    # --- one thread: handle requests in the poller's thread -----------------------------------
    # With ``--threads 1`` (the default) the pool holds one thread anyway, and handing every
    # request to it costs a future, a pipe write and two GIL hand-offs, more so when the
    # request itself waits on memcached. Inline, a request runs where its readiness was seen:
    # 8 % less CPU per request (docs/ab/inline: one worker, against plain gthread). A connection
    # waits in the poller until its whole request has arrived (enqueue_req), so a silent or
    # stalled client never blocks the worker.

    def accept(self, listener) -> None:
        """Accept a connection (this worker's turn: the listener is registered) and, while
        more are waiting, up to ACCEPT_BURST more as long as this worker holds no more than
        ACCEPT_SLACK above its least-loaded sibling: an exchange opening its connections at
        once must not wait for the workers to take turns one connection per poll (balancing
        evens out the rest, see server_hooks.balance)."""
        if self.cfg.threads > 1:
            return super().accept(listener)
        if not self._accept_one(listener):
            return
        for _ in range(ACCEPT_BURST):
            if self._conns >= self.worker_connections \
                    or not self._balancer.may_accept(self._conns - ACCEPT_SLACK) \
                    or not self._accept_one(listener):
                return

    def _accept_one(self, listener) -> bool:
        try:
            client_sock, client_addr = listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return False
        self.nr_conns += 1
        # Kernel-level timeouts survive gthread's setblocking(True) while a request is read.
        stall = struct.pack("ll", IO_STALL_S, 0)
        client_sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, stall)
        client_sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, stall)
        conn = TConn(self.cfg, client_sock, client_addr, listener.getsockname())
        conn.timeout = time.monotonic() + self.cfg.keepalive
        conn.answered_at = 0.0
        if self._fast is not None:
            self._idle[conn] = None
            self.poller.register(client_sock, selectors.EVENT_READ,
                                 partial(self._on_readable, conn))
        else:
            self.pending_conns.append(conn)
            self.poller.register(client_sock, selectors.EVENT_READ,
                                 partial(self.on_pending_socket_readable, conn))
        return True

    def enqueue_req(self, conn) -> None:
        """A connection Gunicorn's poller found readable (it is no longer registered)."""
        if not self._gated:
            return super().enqueue_req(conn) if self.cfg.threads > 1 else self._handle_inline(conn)
        buffered = conn.parser is not None and conn.parser.unreader.buf.tell()
        if self._fast is not None and not buffered:
            # Back from Gunicorn's path: served with the others of this poll, in their order.
            self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_readable, conn))
            self._ready.append(conn)
            return
        self._arrived_at = None
        self._settle(conn, Arrival.MORE if buffered else self._peek(conn))

    def _settle(self, conn, state: Arrival) -> None:
        """Act on the arrival ``state`` of ``conn``'s next request on Gunicorn's path."""
        if state == Arrival.MORE or state == Arrival.CONTINUE:
            state = self._collect(conn)  # read-ahead: the rest may be anywhere
        if state == Arrival.READY:
            self._dispatch(conn, self._arrived_at)
        elif state == Arrival.GONE:
            self._drop(conn)
        elif state in REFUSALS:
            self._refuse(conn, state)
        else:
            conn.arrived_at = self._arrived_at
            conn.timeout = time.monotonic() + ARRIVAL_S
            self._arriving.append(conn)
            self.poller.register(conn.sock, selectors.EVENT_READ,
                                 partial(self._on_arriving_readable, conn))

    def _peek(self, conn) -> Arrival:
        """The state of the request in the kernel's buffer, without reading it, and when its
        first bytes arrived (kept as the request's arrival)."""
        try:
            data, ancillary, _, _ = conn.sock.recvmsg(PEEK_BYTES, TIMESTAMP_SPACE, PEEK)
        except BlockingIOError:
            return Arrival.MORE
        except OSError:
            return Arrival.GONE
        if not data:
            return Arrival.GONE
        self._head = data[:HEAD_PEEK]
        self._arrived_at = kernel_arrival(ancillary)
        return arrival(data, self._head_limit, self._body_limit)

    def _collect(self, conn) -> Arrival:
        """Move what the kernel holds into the parser's buffer (where the parser will read it
        first) and return the state of the request there; sends the 100 a client awaits."""
        if not conn.initialized:
            conn.init()
        unreader = conn.parser.unreader
        buf: io.BytesIO = unreader.buf
        buf.seek(0, io.SEEK_END)
        closed = False
        while buf.tell() < self._window:
            try:
                chunk = conn.sock.recv(PEEK_BYTES, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            except OSError:
                return Arrival.GONE
            if not chunk:
                closed = True
                break
            buf.write(chunk)
        data = buf.getvalue()
        self._head = data[:HEAD_PEEK]
        state = arrival(data, self._head_limit, self._body_limit)
        if (state == Arrival.MORE or state == Arrival.CONTINUE) and len(data) >= self._window:
            state = Arrival.READY  # more than a valid request can be: the parser rejects it
        if closed and state != Arrival.READY:
            return Arrival.GONE
        if state == Arrival.CONTINUE and conn not in self._continued:
            try:
                conn.sock.send(CONTINUE_100, socket.MSG_DONTWAIT)
            except OSError:
                return Arrival.GONE
            self._continued.add(conn)
        return state

    def _on_arriving_readable(self, conn, client) -> None:
        state = self._collect(conn)
        if state == Arrival.MORE or state == Arrival.CONTINUE:
            return  # still partial: stay in the poller
        self.poller.unregister(client)
        self._arriving.remove(conn)
        if state == Arrival.READY:
            conn.data_ready = True
            self._dispatch(conn, conn.arrived_at)
        elif state in REFUSALS:
            self._refuse(conn, state)
        else:
            self._drop(conn)

    def _expire_arriving(self) -> None:
        """Answer 408 and close connections whose request has not arrived within ARRIVAL_S."""
        now = time.monotonic()
        while self._arriving and self._arriving[0].timeout <= now:
            conn = self._arriving.popleft()
            self.poller.unregister(conn.sock)
            metrics.REFUSED.labels("408").inc()
            try:
                conn.sock.send(TIMEOUT_408, socket.MSG_DONTWAIT)
            except OSError:
                pass
            self._drop(conn)

    def _refuse(self, conn, state: Arrival) -> None:
        """Answer framing no bytes can fix, and close: the rest of the request is unknown.
        Logged at most once a second (a hostile peer must not flood the log)."""
        self._refused += 1
        metrics.REFUSED.labels(REFUSED_STATUS[state]).inc()
        now = time.monotonic()
        if now >= self._refusal_logged_at + 1.0:
            self.log.warning("refused %d request(s) before the app (framing no bytes can fix, "
                             "or a body over the limit), the last from %s: %s",
                             self._refused, conn.client,
                             REFUSALS[state].split(b"\r\n", 1)[0].decode())
            self._refused, self._refusal_logged_at = 0, now
        try:
            conn.sock.send(REFUSALS[state], socket.MSG_DONTWAIT)
            conn.sock.shutdown(socket.SHUT_WR)
            for _ in range(4):  # unread input would make close() a reset that can eat the answer
                if not conn.sock.recv(PEEK_BYTES, socket.MSG_DONTWAIT):
                    break
        except OSError:
            pass
        self._drop(conn)

    def _drop(self, conn) -> None:
        self._continued.discard(conn)
        self.nr_conns -= 1
        conn.close()

    def _dispatch(self, conn, arrived_at: float | None) -> None:
        """A whole request: inline, or to the thread pool when its path is offloaded (slow
        writes such as the ledger's must not hold up the requests behind them)."""
        if self._offload:
            target = self._head[self._head.find(b" "):]
            if target.startswith(self._offload):
                conn.data_ready = True
                return ThreadWorker.enqueue_req(self, conn)
        self._handle_inline(conn, arrived_at)

    def _handle_inline(self, conn, arrived_at: float | None = None) -> None:
        """Handle ``conn``'s request now on Gunicorn's path; ``arrived_at``: when the kernel
        received its first bytes (None: unknown, the poller's stamp stands)."""
        self._request_arrived_at = arrived_at
        done: futures.Future = futures.Future()
        try:
            done.set_result(self.handle(conn))
        except BaseException as exc:  # finish_request closes the connection, as gthread does
            done.set_exception(exc)
        if self._continued:
            self._continued.discard(conn)  # a request that failed before handle_request
        self.finish_request(conn, done)

    def _keepalive_full_now(self) -> bool:
        """Whether kept-alive connections are at the limit (--worker-connections less
        --threads): answers then close their connection. Said once in the log."""
        if len(self.keepalived_conns) + len(self._idle) < self.max_keepalived:
            return False
        if not self._keepalive_full:
            self._keepalive_full = True
            self.log.warning("worker pid=%s holds %d keep-alive connections, its limit "
                             "(--worker-connections less --threads): new answers close their "
                             "connection; raise --worker-connections or add workers",
                             self.pid, len(self.keepalived_conns) + len(self._idle))
        return True

    def handle_request(self, req, conn):
        if self._keepalive_full_now() or self._balancer.should_shed(self._conns):
            req.must_close = True  # "Connection: close": the client reconnects (elsewhere)
        if self._continued and conn in self._continued:
            self._continued.discard(conn)
            req._expected_100_continue = False  # this worker sent the 100 while the body came
        return super().handle_request(req, conn)

    # --- the fast path: connections stay registered and non-blocking -------------------------

    def _on_readable(self, conn, client) -> None:
        self._idle.pop(conn, None)
        self._ready.append(conn)

    def _serve_ready(self) -> None:
        """Serve the connections this poll found readable, oldest request first."""
        ready, self._ready = self._ready, []
        peeked = []
        tracking = self._closed_loop_share is not None  # else back-to-back requests don't matter
        back_to_back = 0
        for conn in ready:
            try:
                data, ancillary, _, _ = conn.sock.recvmsg(PEEK_BYTES, TIMESTAMP_SPACE, PEEK)
            except BlockingIOError:
                self._idle[conn] = None  # nothing there after all
                continue
            except OSError:
                data = b""
            if not data:
                self.poller.unregister(conn.sock)
                self._drop(conn)
                continue
            arrived = kernel_arrival(ancillary)
            if arrived is None:
                arrived = self._ready_at
            elif tracking and arrived - conn.answered_at < BACK_TO_BACK_S:
                back_to_back += 1
            peeked.append((arrived, conn, data))
        if len(peeked) > 1:
            peeked.sort(key=itemgetter(0))
        if tracking and self._closed_loop(back_to_back, len(peeked)):
            share, longest = self._closed_loop_share, math.inf
        else:
            share, longest = self._wait_share, self._max_poll_s
        # Plan the poll's requests in arrival order: one that could only be answered past its
        # deadline, or past its share of this poll's serving time (the app's time for each
        # kept before it and for itself), is answered its no-bid at once, before any is
        # served, so it waits for none of them. Serving time starts after those no-bids: the
        # share bounds how long kept requests wait for each other, and counting the no-bids
        # in it would shed late, after a whole poll's wait, requests the plan had kept.
        planned = 0.0  # serving time of the requests kept so far
        queue = []
        for arrived, conn, data in peeked:
            request = self._take(conn, data, arrived)
            if request is None:
                continue  # on Gunicorn's path, or gone
            limits = None
            if self._deadline_paths and data.startswith(self._deadline_paths):
                budget, deadline = self._limits(request, arrived)
                limits = (min(budget * share, longest), deadline)
                # the first of a poll is served unless past its deadline already: the estimate
                # is only ever corrected by serving (a worker that was descheduled for a while
                # must not go on shedding everything)
                serving = planned + self._service_s if queue else 0.0
                shed = self._shed(limits, time.monotonic() + serving, serving)
                if shed:
                    self._answer(conn, request, shed)
                    continue
                planned += self._service_s
            queue.append((conn, request, limits))
        served, serving_from = 0, time.monotonic()
        self._accept_at = serving_from + ACCEPT_EVERY_S  # this poll saw the listener
        with self._prefetched(queue):
            for n, (conn, request, limits) in enumerate(queue):
                if limits:
                    done = time.monotonic() + (self._service_s if n else 0.0)
                    shed = self._shed(limits, done, done - serving_from)
                else:
                    shed = ""
                self._answer(conn, request, shed)
                served += limits is not None and not shed
                if self._accepting and time.monotonic() >= self._accept_at:
                    self._accept_waiting()
        if self._shed_counts:  # counted once a poll: a shed must cost as little as possible
            for reason, count in self._shed_counts.items():
                metrics.SHED.labels(reason).inc(count)
            self._shed_counts = {}
        if served:  # wall time per request served, whatever else it took (preemption, GC)
            took = (time.monotonic() - serving_from) / served
            self._service_s += (took - self._service_s) * SERVICE_WEIGHT

    def _closed_loop(self, back_to_back: int, taken: int) -> bool:
        """Whether the client keeps every connection busy, sending the next request as soon
        as it has an answer: true once at least BACK_TO_BACK_SHARE of the requests taken up in
        every window of BACK_TO_BACK_WINDOW_S for CLOSED_LOOP_AFTER_S came back to back, until
        a window has fewer than BACK_TO_BACK_KEEP_SHARE so. Its
        overloaded polls may then serve for ``closed_loop_share`` of the time to the deadline
        instead of ``wait_share``: each quick no-bid only brings the next request at once, so
        fewer and longer polls answer as many bids with fewer no-bids. An open loop with
        connections to spare never looks so. One whose pool ran dry does, and the longer
        polls then keep it dry: hence off unless set (docs/tuning.md)."""
        self._window_back_to_back += back_to_back
        self._window_taken += taken
        now = self._ready_at
        if now >= self._window_end:
            needed = BACK_TO_BACK_KEEP_SHARE if self._in_closed_loop else BACK_TO_BACK_SHARE
            if self._window_back_to_back < self._window_taken * needed:
                self._back_to_back_since = math.inf
            elif self._back_to_back_since == math.inf and self._window_taken:
                self._back_to_back_since = self._window_end - BACK_TO_BACK_WINDOW_S
            self._window_back_to_back = self._window_taken = 0
            self._window_end = now + BACK_TO_BACK_WINDOW_S
        closed = now - self._back_to_back_since >= CLOSED_LOOP_AFTER_S
        if closed != self._in_closed_loop:
            self._in_closed_loop = closed
            metrics.CLOSED_LOOP.set(int(closed))
            self._switches += 1
            if now >= self._switch_logged_at + SWITCH_LOG_S:  # a client on the edge flips often
                self.log.info(
                    "worker pid=%s: %s%s", self.pid, "its clients keep every connection busy (a "
                    "closed loop): overloaded polls serve for --closed-loop-share" if closed else
                    "its clients leave connections idle again: overloaded polls serve for "
                    "--wait-share", "" if self._switches == 1 else f" ({self._switches - 1} "
                    "more switches since the last such line; bidder_worker_closed_loop follows "
                    "every one)")
                self._switches, self._switch_logged_at = 0, now
        return closed

    def _prefetched(self, queue: list) -> AbstractContextManager:
        """The app's ``prefetch`` of a poll's requests, when there are several to serve: it
        may read what they all need in one go (the bidder: one memcached round trip) while
        the worker serves them one by one inside the block."""
        if self._prefetch is None or len(queue) < 2:
            return nullcontext()
        return self._prefetch([request.environ for _, request, _ in queue])

    def _accept_waiting(self) -> None:
        """Take connections waiting in the listen backlog, if this worker's turn, between the
        requests of a long poll (at most every ACCEPT_EVERY_S): the poller sees the listener
        once a poll, and an exchange opening its connections at once would otherwise wait
        for them one poll (up to a tmax) each, its first requests aging in the backlog."""
        self._accept_at = time.monotonic() + ACCEPT_EVERY_S
        if self._conns < self.worker_connections and self._balancer.may_accept(self._conns):
            for listener in self.sockets:
                self.accept(listener)

    def _take(self, conn, data: bytes, arrived: float) -> Request | None:
        """Read the request at the start of ``data`` (peeked from ``conn``) if it is whole and
        plain; else hand the connection to Gunicorn's path (None)."""
        request = None
        if not (self._offload and data[data.find(b" "):].startswith(self._offload)):
            request = self._fast.parse(data, conn.client, conn.server)
        if request is None:
            self.poller.unregister(conn.sock)
            self._head = data[:HEAD_PEEK]
            self._arrived_at = arrived
            self._settle(conn, arrival(data, self._head_limit, self._body_limit))
            return None
        try:  # the bytes are in the kernel's buffer: this takes exactly the request's share
            taken = conn.sock.recv_into(self._scratch, request.size)
        except OSError:
            taken = -1
        if taken != request.size:
            self.poller.unregister(conn.sock)
            self._drop(conn)
            return None
        request.environ[READY_AT] = arrived
        return request

    def _limits(self, request: Request, arrived: float) -> tuple[float, float]:
        """(time from arrival to deadline, deadline) of a request with a deadline. The
        deadline is the app's: tmax (read from the bytes, else the app's default) less the
        margin, from its arrival (a gzip body is inflated to read it: about 10 us, against
        the app's decoding); a body that does not inflate, or in an encoding the app refuses,
        gets none here (infinity): the app answers it. A poll serves for at most a share of
        that time (``wait_share`` capped at ``max_poll_ms``, or ``closed_loop_share``,
        uncapped: see _closed_loop) and answers the rest a quick no-bid, so its answers come
        well inside tmax (a served request waited for at most the previous poll and this
        one's share) and an exchange's connections turn over fast enough to carry its
        requests (it would otherwise queue them on its side)."""
        environ = request.environ
        body = environ["wsgi.input"].getvalue()
        encoding = environ.get("HTTP_CONTENT_ENCODING", "identity").lower()
        if encoding in GZIP_CODINGS:
            try:
                body = environ[INFLATED] = gunzip(body, self._max_body)
            except ValueError:
                return math.inf, math.inf  # the app answers why (400 or 413)
        elif encoding != "identity":
            return math.inf, math.inf  # the app refuses it (415)
        tmax_ms = peek_tmax(body)
        tmax_s = tmax_ms / 1000.0 if tmax_ms else self._default_tmax_s
        budget = tmax_s - min(self._margin_s, tmax_s / 2)
        return budget, arrived + budget

    @staticmethod
    def _shed(limits: tuple[float, float], done: float, serving: float) -> str:
        """Why a request with ``limits``, expected to be answered at ``done``, when its poll
        will have been serving for ``serving`` seconds, gets a quick no-bid: "deadline" (it
        could not be answered in time), "overload" (past its share of the poll's serving
        time); "" if none."""
        share, deadline = limits
        if done >= deadline:
            return "deadline"
        return "overload" if serving >= share else ""

    def _answer(self, conn, request: Request, shed: str) -> None:
        """Call the app (or, ``shed``, answer that no-bid without it), send the answer, keep
        or close the connection."""
        close = request.close or not self.alive or not self._keepalive_s \
            or self._keepalive_full_now() or self._balancer.should_shed(self._conns)
        self.nr += 1
        if self.nr >= self.max_requests:
            if self.alive:
                self.log.info("Autorestarting worker after current request.")
                self.alive = False
            close = True
        if shed:
            self._shed_counts[shed] = self._shed_counts.get(shed, 0) + 1
            data = self._fast.nobid(request, close, shed)
        else:
            try:
                data = self._fast.respond(request, conn.sock, close).data
            except Exception as exc:  # as on Gunicorn's path: a 500, logged, and a close
                data, close = self._fast.internal_error(request, exc), True
        if not self._send(conn.sock, data):
            self.poller.unregister(conn.sock)
            self._drop(conn)
        elif close:
            self._close(conn)
        else:
            now = conn.answered_at = time.monotonic()
            conn.timeout = now + self._keepalive_s
            if not self.alive:
                conn.timeout = min(conn.timeout, now + STOP_KEEPALIVE_LINGER)
            self._idle[conn] = None

    @staticmethod
    def _send(sock: socket.socket, data: bytes) -> bool:
        """Send ``data`` whole; False if the connection is gone. The socket stays
        non-blocking; only when the client's window is full does the rest go out in blocking
        mode, each wait bounded by the kernel's send timeout (IO_STALL_S)."""
        try:
            sent = sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            return False
        if sent == len(data):
            return True
        try:
            sock.setblocking(True)
            sock.sendall(memoryview(data)[sent:])
            sock.setblocking(False)
        except OSError:
            return False
        return True

    def _close(self, conn) -> None:
        """Close after an answer (RFC 9112 9.6): half-close, then let the connection linger in
        the poller until the client's FIN or CLOSE_LINGER_S, draining what it still sends."""
        self.nr_conns -= 1
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self.poller.unregister(conn.sock)
            conn.close()
            return
        conn.timeout = time.monotonic() + CLOSE_LINGER_S
        conn.drained = 0
        self._closing.append(conn)
        self.poller.modify(conn.sock, selectors.EVENT_READ, partial(self._on_closing_readable, conn))

    def _on_closing_readable(self, conn, client) -> None:
        try:
            data = client.recv(CLOSE_DRAIN_BYTES)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        conn.drained += len(data)
        if not data or conn.drained > CLOSE_DRAIN_BYTES:
            self._closing.remove(conn)
            self.poller.unregister(client)
            conn.close()

    def murder_keepalived(self, force: bool = False) -> None:
        super().murder_keepalived(force)
        if self._fast is None:
            return
        now = time.monotonic()
        idle = self._idle
        while idle:
            conn = next(iter(idle))
            if conn.timeout > now and not force:
                break
            del idle[conn]
            self.poller.unregister(conn.sock)
            self._drop(conn)
        closing = self._closing
        while closing and (force or closing[0].timeout <= now):
            conn = closing.popleft()
            self.poller.unregister(conn.sock)
            conn.close()

    def _cap_keepalive(self, deadline: float) -> None:
        super()._cap_keepalive(deadline)
        for conn in self._idle:
            conn.timeout = min(conn.timeout, deadline)
