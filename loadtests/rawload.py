"""The load generator's lean engine: plain non-blocking sockets and one epoll, no gevent.

:func:`loadtests.openloop.generate_load` drives the server through geventhttpclient, at about
130 us of the generator's own CPU per request. On a machine where the generator shares the
server's CPUs (these have 2), that is a third of what a bid costs the server, and past the
server's capacity the generator falls behind itself: an open loop at twice the capacity, or a
closed loop over hundreds of connections, then measures the generator's queue as much as the
server's. This engine offers the same load (same requests, same open or closed loop, latency
from the intended send time, the same :class:`~loadtests.openloop.Result`) at about a fifth of
that CPU: each request is one prepared ``bytes`` sent with one ``send``, each answer is read
with ``recv`` and framed by its ``Content-Length`` (the bidder always sends one; 204 and 304
have no body), and a connection the server closes (``Connection: close``, a reset) is
reopened. ``python -m loadtests.openloop --engine raw`` selects it; ``bidder bench
--overload`` uses it.
"""
from __future__ import annotations

import select
import socket
import time
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from loadtests import stats, traffic

if TYPE_CHECKING:
    from loadtests.openloop import Result

RECV_BYTES = 65536
CHECK_TIMEOUTS_S = 0.05  # how often requests are checked against the timeout
# An open loop wakes at most this often: it sleeps out the rest of the quantum, then sends
# what is due and reads what came. Latency still counts from each request's intended send
# time, so what the quantum adds (at most 1 ms, to a send or to noting an answer) is charged
# to the server, not hidden. Waking for every request and every answer (20,000 times a
# second at 10,000 requests/s) cost the generator 0.30-0.32 of a CPU against 0.18-0.23 with
# the quantum, on a machine where it shares the server's 2 CPUs.
SEND_QUANTUM_S = 0.001
LATE_S = SEND_QUANTUM_S + 0.001  # a request leaving later than this after its time is late


class Connection:
    """One keep-alive connection and the request it carries (if any)."""

    __slots__ = ("sock", "intended", "sent_at", "buf", "result")

    def __init__(self, address: tuple[str, int], timeout_s: float) -> None:
        self.sock = socket.create_connection(address, timeout=timeout_s)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setblocking(False)
        self.intended = 0.0  # when its request was due (latency counts from here)
        self.sent_at = 0.0
        self.buf = b""
        self.result: Result | None = None  # the run its request counts in; None: warm-up

    @property
    def busy(self) -> bool:
        return self.sent_at > 0.0


def encode_requests(url: str, path: str, requests: Sequence[traffic.BidRequest]) -> list[bytes]:
    """Each request as the bytes of one HTTP/1.1 POST."""
    host = urlsplit(url).netloc
    out = []
    for req in requests:
        head = [f"POST {path} HTTP/1.1", f"Host: {host}"]
        head += [f"{name}: {value}" for name, value in req.headers.items()]
        head.append(f"Content-Length: {len(req.body)}")
        out.append(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + req.body)
    return out


def answer_of(buf: bytes) -> tuple[int, int, bool] | None:
    """(status, bytes it takes, the server closes after it) of the answer at the start of
    ``buf``, or None while it is incomplete."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = buf[:end].lower()
    status = int(head[9:12])
    at = head.find(b"\r\ncontent-length:")
    length = 0
    if at >= 0 and status >= 200 and status not in (204, 304):
        line_end = head.find(b"\r\n", at + 2)
        length = int(head[at + 17:line_end if line_end >= 0 else len(head)])
    size = end + 4 + length
    if len(buf) < size:
        return None
    return status, size, b"\r\nconnection: close" in head


class Engine:
    """Connections, the requests waiting for one, and the epoll that serves them."""

    def __init__(self, url: str, requests: Sequence[traffic.BidRequest], connections: int,
                 timeout_s: float, path: str) -> None:
        parts = urlsplit(url)
        self.address = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.timeout_s = timeout_s
        self.payloads = encode_requests(url, path, requests)
        self.epoll = select.epoll()
        self.by_fd: dict[int, Connection] = {}
        self.free: deque[Connection] = deque()
        self.busy: set[Connection] = set()
        # latencies (us) of the measured answers, recorded into the result's histogram after
        # the run (flush): the histogram's record costs 2-3 us of Python per answer
        self.latencies_us: list[float] = []
        for _ in range(connections):
            self._open()
        self.next = 0  # index of the next request to send
        self.checked_at = time.perf_counter()

    def _open(self) -> None:
        conn = Connection(self.address, self.timeout_s)
        fd = conn.sock.fileno()
        self.epoll.register(fd, select.EPOLLIN)
        self.by_fd[fd] = conn
        self.free.append(conn)

    def _reopen(self, conn: Connection) -> None:
        fd = conn.sock.fileno()
        self.epoll.unregister(fd)
        del self.by_fd[fd]
        conn.sock.close()
        self.busy.discard(conn)
        try:
            self._open()
        except OSError:  # the server refuses: the run goes on with one connection fewer
            pass

    def send(self, intended: float, result: Result | None) -> bool:
        """Send the next request on a free connection; False if none is free."""
        if not self.free:
            return False
        conn = self.free.popleft()
        data = self.payloads[self.next % len(self.payloads)]
        self.next += 1
        conn.intended, conn.result, conn.buf = intended, result, b""
        conn.sent_at = time.perf_counter()
        try:
            sent = conn.sock.send(data)
            if sent < len(data):  # a full send buffer: rare, finish in blocking mode
                conn.sock.setblocking(True)
                conn.sock.sendall(data[sent:])
                conn.sock.setblocking(False)
        except OSError as exc:
            self._fail(conn, type(exc).__name__)
            return True
        self.busy.add(conn)
        return True

    def _fail(self, conn: Connection, why: str) -> None:
        if conn.result is not None:
            conn.result.errors[why] += 1
        conn.sent_at = 0.0
        self._reopen(conn)

    def poll(self, timeout: float, on_answer) -> None:
        """Wait up to ``timeout`` for answers; ``on_answer(conn)`` for each connection freed."""
        by_fd = self.by_fd
        for fd, _ in self.epoll.poll(timeout):
            conn = by_fd.get(fd)
            if conn is None:
                continue  # reopened earlier in this batch
            try:
                chunk = conn.sock.recv(RECV_BYTES)
            except BlockingIOError:
                continue
            except OSError as exc:
                chunk, why = b"", type(exc).__name__
            else:
                why = "connection closed by the server"
            if not chunk:
                if conn.busy:
                    self._fail(conn, why)
                else:  # an idle connection the server closed (keep-alive timeout)
                    self.free.remove(conn)
                    self._reopen(conn)
                continue
            conn.buf += chunk
            answer = answer_of(conn.buf)
            if answer is None or not conn.busy:
                continue
            status, size, close = answer
            result = conn.result
            if result is not None:
                result.statuses[status] += 1
                if status in (200, 204):
                    self.latencies_us.append((time.perf_counter() - conn.intended) * 1e6)
            conn.sent_at, conn.buf = 0.0, conn.buf[size:]
            self.busy.discard(conn)
            if close:
                self._reopen(conn)
            else:
                self.free.append(conn)
            on_answer()
        now = time.perf_counter()
        if now - self.checked_at >= CHECK_TIMEOUTS_S:
            self.checked_at = now
            for conn in [c for c in self.busy if now - c.sent_at > self.timeout_s]:
                self._fail(conn, "timeout")
                on_answer()

    def flush(self, result: Result) -> None:
        """Record the latencies noted so far into ``result``'s histogram."""
        for micros in self.latencies_us:
            stats.record_us(result.histogram, micros)
        self.latencies_us = []

    def close(self) -> None:
        for conn in self.by_fd.values():
            conn.sock.close()
        self.epoll.close()


def generate_load(url: str, requests: Sequence[traffic.BidRequest], duration_s: float,
                  rate: float | None, connections: int, warmup_s: float = 0.0,
                  timeout_s: float = 2.0, drain_s: float = 5.0, path: str = "") -> Result:
    """As :func:`loadtests.openloop.generate_load`, with this engine."""
    from loadtests.openloop import BID_PATH, Result

    engine = Engine(url, requests, connections, timeout_s,
                    urlsplit(url).path.rstrip("/") + (path or BID_PATH))
    clock = time.perf_counter

    def open_phase(seconds: float, result: Result | None) -> None:
        waiting: deque[float] = deque()  # intended send times of requests with no connection
        t0 = woke = clock()
        total = int(seconds * rate)
        i = 0

        def dispatch() -> None:
            while waiting and engine.send(waiting[0], result):
                waiting.popleft()

        while True:
            now = clock()
            while i < total and t0 + i / rate <= now:  # everything due now, even if late
                intended = t0 + i / rate
                waiting.append(intended)
                if result is not None:
                    result.sent += 1
                    result.late_starts += now - intended > LATE_S
                i += 1
            dispatch()
            if i >= total:
                break
            rest = woke + SEND_QUANTUM_S - clock()
            if rest > 0:
                time.sleep(rest)
            engine.poll(max(0.0, t0 + i / rate - clock()), dispatch)
            woke = clock()
        if result is not None:
            result.elapsed_s = clock() - t0
        drain_until = clock() + drain_s
        while (waiting or engine.busy) and clock() < drain_until:
            engine.poll(0.05, dispatch)
        if result is not None:
            result.elapsed_s = max(result.elapsed_s, min(clock() - t0, seconds + drain_s))
            unanswered = len(waiting) + sum(c.result is result for c in engine.busy)
            if unanswered:
                result.errors["not answered before drain timeout"] += unanswered

    def closed_phase(seconds: float, result: Result | None) -> None:
        t0 = clock()
        stop_at = t0 + seconds

        def refill() -> None:
            now = clock()
            while now < stop_at and engine.send(now, result):
                if result is not None:
                    result.sent += 1

        refill()
        while clock() < stop_at:
            engine.poll(min(0.05, max(0.0, stop_at - clock())), refill)
        drain_until = clock() + min(drain_s, timeout_s)
        while engine.busy and clock() < drain_until:
            engine.poll(0.05, lambda: None)
        if result is not None:
            result.elapsed_s = clock() - t0
            unanswered = sum(c.result is result for c in engine.busy)
            if unanswered:
                result.errors["timeout"] += unanswered

    result = Result("open" if rate else "closed", rate, duration_s)
    try:
        phase = open_phase if rate else closed_phase
        if warmup_s > 0:
            phase(warmup_s, None)
        cpu0 = time.process_time()
        phase(duration_s, result)
        result.cpu_s = time.process_time() - cpu0
        engine.flush(result)
    finally:
        engine.close()
    return result
