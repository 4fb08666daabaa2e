"""Request framing as the inline worker sees it: pure functions over a connection's bytes.

With ``--threads 1`` a request is handled in the poller's thread, and nothing else of the
worker runs meanwhile: a parser waiting for a stalled client's bytes would hold every other
connection's request past its ``tmax``. So a connection is handed on only once its next
request is entirely in the kernel's socket buffer. :func:`arrival` decides that from one
``MSG_PEEK`` and a few ``bytes.find`` calls (about 1.5 us per request): the end of the headers
and of the body (``Content-Length``, or the last chunk of a chunked body). Framing no more
bytes can fix (a bad length or chunk, a body announced over the limit, a Transfer-Encoding not
ending in chunked) is refused here with 400 or 413 (:data:`REFUSALS`), since a parser would
wait for it; a head over Gunicorn's limits is :attr:`Arrival.READY`, as the parser rejects it
from the bytes at hand.

:func:`kernel_arrival` turns the receive timestamp the same peek reads (``SO_TIMESTAMPNS``)
into the request's arrival on the monotonic clock, and :func:`peek_tmax` reads a bid request's
``tmax`` from its bytes without decoding the JSON, so an overloaded worker can answer a request
whose deadline has passed before spending a decode on it.
"""
from __future__ import annotations

import re
import socket
import struct
import time
import zlib
from enum import IntEnum

# Linux: receive timestamps (struct timespec, CLOCK_REALTIME) of the bytes at the head of a
# socket's queue, delivered with recvmsg even when peeking (not in Python's socket module).
SO_TIMESTAMPNS = 35
TIMESTAMP_SPACE = socket.CMSG_SPACE(16)
MAX_QUEUED_S = 60.0  # an age past this (or negative) is a clock step, not a queue: ignored

# A request must have arrived entirely within this of its first bytes being seen, or its
# connection is answered 408 and closed (it waits in the poller meanwhile, blocking nothing).
ARRIVAL_S = 3.0

# Longer Content-Length values exceed any body limit (and int() refuses 4300 digits or more).
LENGTH_DIGITS = 18


class Arrival(IntEnum):
    """What :func:`arrival` finds at the head of a connection's bytes."""

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


REFUSED_STATUS = {Arrival.MALFORMED: "400", Arrival.TOO_LARGE: "413"}

# Answered by the arrival check itself: handing such bytes to the parser would have it wait,
# in the worker's only thread, for a body that cannot come right.
REFUSALS = {
    Arrival.MALFORMED: _refusal(
        b"400 Bad Request", b"malformed request framing: a Content-Length that is not a number, "
        b"a bad chunk size or chunk end, or a Transfer-Encoding not ending in chunked "
        b"(RFC 9112 6)"),
    Arrival.TOO_LARGE: _refusal(b"413 Content Too Large", b"request body over this server's "
                                b"limit (--max-body-bytes)"),
}


def arrival(data: bytes, head_limit: int, body_limit: int) -> Arrival:
    """Whether ``data``, a connection's bytes so far, begins with a whole HTTP/1.x request:
    READY, MORE or CONTINUE; MALFORMED or TOO_LARGE for framing no more bytes can fix (a bad
    length or chunk, a body over ``body_limit``). Only framing is checked: a head over
    ``head_limit`` is READY, as the parser rejects it from the bytes at hand. Later pipelined
    requests are not looked at."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return Arrival.READY if len(data) >= head_limit or b"\n\n" in data else Arrival.MORE
    head = data[:end].lower()
    start = end + 4
    coding = _field(head, b"\ntransfer-encoding:")
    if coding is not None:
        if not coding.endswith(b"chunked"):
            return Arrival.MALFORMED  # RFC 9112 6.3: a request's length must then be refused
        state = _chunked_arrival(data, start, body_limit)
    else:
        length = _field(head, b"\ncontent-length:")
        if length is None:
            return Arrival.READY  # no body
        if not length.isdigit():
            return Arrival.MALFORMED
        if len(length) > LENGTH_DIGITS:
            return Arrival.TOO_LARGE
        size = int(length)
        if size > body_limit:
            return Arrival.TOO_LARGE
        state = Arrival.READY if len(data) - start >= size else Arrival.MORE
    if state > Arrival.CONTINUE:
        return state
    if state == Arrival.MORE and len(data) == start \
            and head[:head.find(b"\r\n")].endswith(b"http/1.1") \
            and _field(head, b"\nexpect:") == b"100-continue":
        return Arrival.CONTINUE  # HTTP/1.0 clients send the body without waiting (RFC 9110 10.1.1)
    return state


def _field(head: bytes, name: bytes) -> bytes | None:
    """The stripped value of the first ``name`` header in a lower-cased head, or None."""
    at = head.find(name)
    if at < 0:
        return None
    at += len(name)
    end = head.find(b"\r\n", at)
    return head[at:end if end >= 0 else len(head)].strip()


def _chunked_arrival(data: bytes, at: int, body_limit: int) -> Arrival:
    """Whether the chunked body starting at ``data[at]`` has arrived up to its trailer's end."""
    start = at
    while True:
        line = data.find(b"\r\n", at)
        if line < 0:
            partial = data[at:at + 1024]
            if len(partial) == 1024 or (b";" not in partial
                                        and partial.strip(b"0123456789abcdefABCDEF \t\r")):
                return Arrival.MALFORMED  # no chunk-size line is that long, or starts that way
            return Arrival.MORE
        digits = data[at:line].split(b";", 1)[0].strip(b" \t")
        if not digits or digits.strip(b"0123456789abcdefABCDEF"):
            return Arrival.MALFORMED
        size = int(digits, 16)
        if size == 0:  # last chunk, then trailer fields, then an empty line
            if data.startswith(b"\r\n", line + 2) or data.find(b"\r\n\r\n", line) >= 0:
                return Arrival.READY
            return Arrival.MORE if len(data) - line < 8192 else Arrival.MALFORMED
        at = line + 2 + size + 2
        if at - start > body_limit:
            return Arrival.TOO_LARGE
        if at > len(data):
            return Arrival.MORE
        if data[at - 2:at] != b"\r\n":
            return Arrival.MALFORMED  # chunk data not followed by its CRLF


def kernel_arrival(ancillary: list) -> float | None:
    """When the kernel received the peeked bytes, on the ``time.monotonic()`` clock, from
    ``recvmsg``'s ancillary data (``SO_TIMESTAMPNS``); None when absent or implausible."""
    if not ancillary:
        return None
    seconds, nanoseconds = struct.unpack_from("ll", ancillary[0][2])
    queued = time.time() - seconds - nanoseconds * 1e-9
    if 0.0 <= queued < MAX_QUEUED_S:
        return time.monotonic() - queued
    return None


# "tmax" as a member name: inside a JSON string a quote is escaped, so these bytes can only be
# a key (of the BidRequest, or of some object in it: hence the largest of them is taken).
_TMAX = re.compile(rb'"tmax"[ \t\r\n]*:[ \t\r\n]*(\d{1,9})(?![\d.eE])')


GZIP_CODINGS = ("gzip", "x-gzip")  # RFC 9110 8.4.1.3: x-gzip is gzip


class InflatesTooLarge(ValueError):
    """A gzip body that inflates past the body limit."""


def gunzip(data: bytes, limit: int) -> bytes:
    """Inflate every member of a gzip body (RFC 1952: a gzip file is a series of members),
    each whole with its CRC trailer, the total capped at ``limit``. ValueError says why one
    does not inflate (InflatesTooLarge: past the limit)."""
    body = b""
    while data:
        inflater = zlib.decompressobj(wbits=31)
        try:
            body += inflater.decompress(data, limit + 1 - len(body))
        except zlib.error as exc:
            raise ValueError(f"Content-Encoding is gzip but the body does not inflate: {exc}")
        if len(body) > limit or inflater.unconsumed_tail:
            raise InflatesTooLarge(f"body inflates to more than the {limit}-byte limit")
        if not inflater.eof:
            raise ValueError("Content-Encoding is gzip but the body is truncated: a gzip "
                             "member ends without its trailer")
        data = inflater.unused_data
    return body


def peek_tmax(body: bytes) -> int | None:
    """The largest integer ``tmax`` member in a JSON body, without decoding it; None if there
    is none (the app then applies its default). Taking the largest errs on the side of serving:
    a worker deciding on it never sheds a request the app would still have answered in time."""
    found = _TMAX.findall(body)
    if not found:
        return None
    return max(int(value) for value in found)
