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

With ``--threads 1`` (the default) a request is handled inline, in the poller's
thread, and nothing else of the worker runs meanwhile: a parser waiting for a
stalled client's bytes would hold every other connection's request past its
``tmax``. So a connection is handed to the parser only once its next request
is entirely in the kernel's socket buffer: one ``MSG_PEEK`` recv and a few
``bytes.find`` calls (:func:`arrival`) check for the end of the headers and of
the body (``Content-Length``, or the last chunk of a chunked body), about 1.5 us
per request. A partial request (a client stalled mid-headers or mid-body, a
lossy link) is read into the parser's buffer as its bytes come
and waits in the poller, costing no other connection anything; one still
incomplete :data:`ARRIVAL_S` after it was first seen is answered 408 and
closed. ``Expect: 100-continue`` gets its ``100 Continue`` while waiting (the
client sends the body only after it). Framing no more bytes can fix (a bad
length or chunk, a body announced over the limit, a Transfer-Encoding not ending
in chunked) is answered 400 or 413 by this check and closed, since a parser
would wait for it; a head over Gunicorn's limits goes to the parser, which
rejects it from the bytes at hand. Requests whose path starts with one of the app's
``offload_paths`` (the bidder's win and billing notices, which write its
SQLite ledger) go to gthread's pool thread instead, so their disk writes and
lock waits never hold up the bids behind them.

The same peek reads the kernel's receive timestamp of the request's first bytes
(``SO_TIMESTAMPNS``), and that is the arrival the app measures ``tmax`` from
(``bidder.ready_at``): a request that waited in the socket buffer while the
worker was busy with others (a slow memcached, a burst) has that wait counted,
so the bid path skips its look-up or answers no-bid instead of answering late.
"""
from __future__ import annotations

import io
import selectors
import socket
import struct
import time
from collections import deque
from concurrent import futures
from functools import partial

from gunicorn.workers.gthread import TConn, ThreadWorker

from server_hooks import metrics
from server_hooks.environ import READY_AT
from server_hooks.slots import ConnectionBoard

# Linux: receive timestamps (struct timespec, CLOCK_REALTIME) of the bytes at the head of a
# socket's queue, delivered with recvmsg even when peeking (not in Python's socket module).
SO_TIMESTAMPNS = 35
TIMESTAMP_SPACE = socket.CMSG_SPACE(16)
MAX_QUEUED_S = 60.0  # an age past this (or negative) is a clock step, not a queue: ignored

# Kernel send/receive timeouts while a request is handled inline: a backstop, as a request
# reaches the parser only once whole (see arrival()); it bounds sending the answer to a client
# that does not read it, since nothing else of the worker runs meanwhile.
IO_STALL_S = 1

# A request must have arrived entirely within this of its first bytes being seen, or its
# connection is answered 408 and closed (it waits in the poller meanwhile, blocking nothing).
ARRIVAL_S = 3.0

# One MSG_PEEK of this much sees any ordinary request whole; a larger one is read in pieces.
PEEK_BYTES = 65536
HEAD_PEEK = 256  # bytes kept of a request's start: its method and path, for offloading
PEEK = socket.MSG_PEEK | socket.MSG_DONTWAIT

# What arrival() finds at the head of a connection's bytes.
READY = 0  # a whole request (or bytes the parser rejects at once): handle it
MORE = 1  # part of a request: wait for the rest
CONTINUE = 2  # a whole head with "Expect: 100-continue": wait for the body after a 100
GONE = 3  # the peer closed or reset the connection
MALFORMED = 4  # framing that can never make a request (bad length or chunk): 400 and close
TOO_LARGE = 5  # a body announced or framed over the limit: 413 and close

CONTINUE_100 = b"HTTP/1.1 100 Continue\r\n\r\n"
TIMEOUT_408 = (b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n"
               b"\r\n")


def _refusal(status: bytes, message: bytes) -> bytes:
    body = b'{"error": "' + message + b'"}'
    return (b"HTTP/1.1 " + status + b"\r\nConnection: close\r\nContent-Type: application/json"
            b"\r\nContent-Length: " + b"%d" % len(body) + b"\r\n\r\n" + body)


REFUSED_STATUS = {MALFORMED: "400", TOO_LARGE: "413"}

# Answered by the arrival check itself: handing such bytes to the parser would have it wait,
# in the worker's only thread, for a body that cannot come right.
REFUSALS = {
    MALFORMED: _refusal(b"400 Bad Request", b"malformed request framing: a Content-Length that "
                        b"is not a number, a bad chunk size or chunk end, or a Transfer-Encoding "
                        b"not ending in chunked (RFC 9112 6)"),
    TOO_LARGE: _refusal(b"413 Content Too Large", b"request body over this server's limit "
                        b"(--max-body-bytes)"),
}

# How often a worker that is not accepting re-reads the board: the longest a new connection
# can wait in the backlog when the worker whose turn it is has just become eligible.
RECHECK_S = 0.005


def arrival(data: bytes, head_limit: int, body_limit: int) -> int:
    """Whether ``data``, a connection's bytes so far, begins with a whole HTTP/1.x request:
    :data:`READY`, :data:`MORE` or :data:`CONTINUE`; :data:`MALFORMED` or :data:`TOO_LARGE`
    for framing no more bytes can fix (a bad length or chunk, a body over ``body_limit``).
    Only framing is checked: a head over ``head_limit`` is READY, as the parser rejects it
    from the bytes at hand. Later pipelined requests are not looked at."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return READY if len(data) >= head_limit or b"\n\n" in data else MORE
    head = data[:end].lower()
    start = end + 4
    coding = _field(head, b"\ntransfer-encoding:")
    if coding is not None:
        if not coding.endswith(b"chunked"):
            return MALFORMED  # RFC 9112 6.3: a request's length must then be refused
        state = _chunked_arrival(data, start, body_limit)
    else:
        length = _field(head, b"\ncontent-length:")
        if length is None:
            return READY  # no body
        if not length.isdigit():
            return MALFORMED
        size = int(length)
        if size > body_limit:
            return TOO_LARGE
        state = READY if len(data) - start >= size else MORE
    if state > CONTINUE:
        return state
    if state == MORE and len(data) == start \
            and head[:head.find(b"\r\n")].endswith(b"http/1.1") \
            and _field(head, b"\nexpect:") == b"100-continue":
        return CONTINUE  # HTTP/1.0 clients send the body without waiting (RFC 9110 10.1.1)
    return state


def _field(head: bytes, name: bytes) -> bytes | None:
    """The stripped value of the first ``name`` header in a lower-cased head, or None."""
    at = head.find(name)
    if at < 0:
        return None
    at += len(name)
    end = head.find(b"\r\n", at)
    return head[at:end if end >= 0 else len(head)].strip()


def _chunked_arrival(data: bytes, at: int, body_limit: int) -> int:
    """Whether the chunked body starting at ``data[at]`` has arrived up to its trailer's end."""
    start = at
    while True:
        line = data.find(b"\r\n", at)
        if line < 0:
            partial = data[at:at + 1024]
            if len(partial) == 1024 or (b";" not in partial
                                        and partial.strip(b"0123456789abcdefABCDEF \t\r")):
                return MALFORMED  # no chunk-size line is that long, or starts that way
            return MORE
        digits = data[at:line].split(b";", 1)[0].strip(b" \t")
        if not digits or digits.strip(b"0123456789abcdefABCDEF"):
            return MALFORMED
        size = int(digits, 16)
        if size == 0:  # last chunk, then trailer fields, then an empty line
            if data.startswith(b"\r\n", line + 2) or data.find(b"\r\n\r\n", line) >= 0:
                return READY
            return MORE if len(data) - line < 8192 else MALFORMED
        at = line + 2 + size + 2
        if at - start > body_limit:
            return TOO_LARGE
        if at > len(data):
            return MORE
        if data[at - 2:at] != b"\r\n":
            return MALFORMED  # chunk data not followed by its CRLF


class BalancedThreadWorker(ThreadWorker):
    """gthread, accepting only while this worker holds the fewest open connections."""

    slot: int | None = None  # set by the master's pre_fork hook
    board: ConnectionBoard | None = None  # idem, shared by all workers of the master
    _joined = False
    _conns = 0
    _shed_at: int | None = None  # nr_conns when the last shed was decided: one in flight
    _checked_at: int | None = None  # nr_conns when eligibility was last decided
    _gated = False  # requests wait in the poller until whole (--threads 1, see _gate_requests)
    _offload: tuple = ()  # path prefixes handled in the thread pool (see _dispatch)
    _keepalive_full = False  # the keep-alive limit was reached (logged once)
    _refused = 0  # malformed requests refused since the last log line
    _refusal_logged_at = float("-inf")
    _arriving: deque | tuple = ()  # empty unless gated
    _continued: set | frozenset = frozenset()  # idem

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
            self._gate_requests()
        try:
            super().run()
        finally:
            self._leave()

    def _stamp_readiness(self) -> None:
        """Give the app its request's arrival (``bidder.ready_at`` in the WSGI environ,
        ``time.monotonic()``): the kernel's receive time of its first bytes where the arrival
        check read it, else when the poller saw them. Requests handled one after another waited
        for each other, and that wait counts against the exchange's ``tmax``."""
        select, app = self.poller.select, self.wsgi
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
        body the app takes (``max_body_bytes``, plus slack for gzip and chunk framing)."""
        cfg = self.cfg
        self._gated = not cfg.is_ssl  # TLS bytes cannot be peeked at
        # 0 means "unlimited" to Gunicorn; the line and field sizes are then its maxima.
        line, field = cfg.limit_request_line or 8190, cfg.limit_request_field_size or 8190
        self._head_limit = line + 2 + cfg.limit_request_fields * (field + 2) + 2
        settings = getattr(self.app, "settings", None)
        body = getattr(settings, "max_body_bytes", 0) or 1024 * 1024
        self._offload = tuple(b" " + p.strip().encode() for p in
                              (getattr(settings, "offload_paths", "") or "").split(",") if p.strip())
        self._head: bytes = b""  # the first bytes of the request being checked
        self._body_limit = body + body // 8 + 1024
        self._window = self._head_limit + self._body_limit
        self._arriving: deque = deque()  # connections with a partial request, oldest first
        self._arrived_at: float | None = None  # kernel arrival of the request being peeked at
        self._continued: set = set()  # connections sent a 100 Continue by this worker

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
        if self._arriving:
            timeout = min(timeout, max(0.0, self._arriving[0].timeout - time.monotonic()))
        super().wait_for_and_dispatch_events(timeout)
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
        if self._gated:
            client_sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        conn = TConn(self.cfg, client_sock, client_addr, listener.getsockname())
        conn.timeout = time.monotonic() + self.cfg.keepalive
        self.pending_conns.append(conn)
        self.poller.register(client_sock, selectors.EVENT_READ,
                             partial(self.on_pending_socket_readable, conn))

    def enqueue_req(self, conn) -> None:
        if not self._gated:
            return super().enqueue_req(conn) if self.cfg.threads > 1 else self._handle_inline(conn)
        self._arrived_at = None
        buffered = conn.parser is not None and conn.parser.unreader.buf.tell()
        state = MORE if buffered else self._peek(conn)  # read-ahead: the rest may be anywhere
        if state == MORE or state == CONTINUE:
            state = self._collect(conn)
        if state == READY:
            self._dispatch(conn, self._arrived_at)
        elif state == GONE:
            self._drop(conn)
        elif state in REFUSALS:
            self._refuse(conn, state)
        else:
            conn.arrived_at = self._arrived_at
            conn.timeout = time.monotonic() + ARRIVAL_S
            self._arriving.append(conn)
            self.poller.register(conn.sock, selectors.EVENT_READ,
                                 partial(self._on_arriving_readable, conn))

    def _peek(self, conn) -> int:
        """The fast path: the state of the request in the kernel's buffer, without reading it,
        and when its first bytes arrived (kept as the request's arrival)."""
        try:
            data, ancillary, _, _ = conn.sock.recvmsg(PEEK_BYTES, TIMESTAMP_SPACE, PEEK)
        except BlockingIOError:
            return MORE
        except OSError:
            return GONE
        if not data:
            return GONE
        self._head = data[:HEAD_PEEK]
        if ancillary:
            seconds, nanoseconds = struct.unpack_from("ll", ancillary[0][2])
            queued = time.time() - seconds - nanoseconds * 1e-9
            if 0.0 <= queued < MAX_QUEUED_S:
                self._arrived_at = time.monotonic() - queued
        return arrival(data, self._head_limit, self._body_limit)

    def _collect(self, conn) -> int:
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
                return GONE
            if not chunk:
                closed = True
                break
            buf.write(chunk)
        data = buf.getvalue()
        self._head = data[:HEAD_PEEK]
        state = arrival(data, self._head_limit, self._body_limit)
        if (state == MORE or state == CONTINUE) and len(data) >= self._window:
            state = READY  # more than a valid request can be: the parser rejects it
        if closed and state != READY:
            return GONE
        if state == CONTINUE and conn not in self._continued:
            try:
                conn.sock.send(CONTINUE_100, socket.MSG_DONTWAIT)
            except OSError:
                return GONE
            self._continued.add(conn)
        return state

    def _on_arriving_readable(self, conn, client) -> None:
        state = self._collect(conn)
        if state == MORE or state == CONTINUE:
            return  # still partial: stay in the poller
        self.poller.unregister(client)
        self._arriving.remove(conn)
        if state == READY:
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

    def _refuse(self, conn, state: int) -> None:
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
        """Handle ``conn``'s request now; ``arrived_at``: when the kernel received its first
        bytes (None: unknown, the poller's stamp stands)."""
        self._request_arrived_at = arrived_at
        done: futures.Future = futures.Future()
        try:
            done.set_result(self.handle(conn))
        except BaseException as exc:  # finish_request closes the connection, as gthread does
            done.set_exception(exc)
        if self._continued:
            self._continued.discard(conn)  # a request that failed before handle_request
        self.finish_request(conn, done)

    def handle_request(self, req, conn):
        if len(self.keepalived_conns) >= self.max_keepalived and not self._keepalive_full:
            self._keepalive_full = True  # said once: gthread now closes after every answer
            self.log.warning("worker pid=%s holds %d keep-alive connections, its limit "
                             "(--worker-connections less --threads): new answers close their "
                             "connection; raise --worker-connections or add workers",
                             self.pid, len(self.keepalived_conns))
        conns = self._conns
        if self._joined and conns >= 2 and conns != self._shed_at \
                and self.board.any_below(conns - 1):
            self._shed_at = conns  # a sibling holds two fewer: hand this connection over
            req.must_close = True  # "Connection: close": the client reconnects elsewhere
        if self._continued and conn in self._continued:
            self._continued.discard(conn)
            req._expected_100_continue = False  # this worker sent the 100 while the body came
        return super().handle_request(req, conn)

    def _leave(self) -> None:
        if self._joined:
            self._joined = False
            self.board.clear(self.slot)
