"""The inline worker's own HTTP/1.1 path for the requests an exchange sends.

Gunicorn's general-purpose path costs a bid request more than the bid logic does: its parser
reads the socket through a buffer object, builds a ``Request`` and a ``Response``, toggles the
socket's blocking mode and writes the head and the body with two ``sendall`` calls. When the
arrival check has already seen the whole request in the kernel's buffer, none of that is
needed: :meth:`FastPath.parse` reads the head from the peeked bytes, :meth:`FastPath.respond`
calls the app with a minimal WSGI environ (every key the app and Falcon read, the same values
Gunicorn would give) and returns the status line, headers and body as one ``bytes``, for one
``send``. Connection semantics follow RFC 9112 as Gunicorn's do: keep-alive by default for
HTTP/1.1, ``Connection: close`` honoured, HTTP/1.0 closed unless it asks for keep-alive.

Only the plain shapes an exchange sends take this path: ``GET`` or ``POST`` with a
``Content-Length`` body, an origin-form target without percent-escapes, HTTP/1.0 or 1.1, token
header names without underscores, no repeated field, no ``Transfer-Encoding``, ``Expect``,
``Upgrade`` or scheme-forwarding header, within Gunicorn's size limits. :meth:`FastPath.parse`
returns None for anything else and the worker hands the request to Gunicorn's parser exactly
as before, so unusual requests are answered as they always were.

The parser is a regular expression over the head plus ``bytes.split``, with the header names
an exchange sends cached to their environ keys. An exchange sends a few heads over and over,
differing only in ``Content-Length``, so what each says is remembered under the head less that
value: a known head costs a dictionary look-up and a copy, below what httptools' C parser
costs through its Python callbacks (``python -m server_hooks.parserbench``), with no
dependency.
"""
from __future__ import annotations

import io
import logging
import os
import re
import time
from datetime import timedelta
from email.utils import formatdate
from types import SimpleNamespace
from typing import Any, Callable, NamedTuple

from gunicorn import SERVER
from gunicorn.config import PostRequest, PreRequest
from gunicorn.glogging import Logger
from gunicorn.http.message import TOKEN_RE
from gunicorn.http.wsgi import HEADER_VALUE_RE, base_environ
from gunicorn.util import hop_headers

from server_hooks.framing import LENGTH_DIGITS

# GET or POST, an origin-form target of printable ASCII without "%" (escapes), "#" (fragment)
# or a leading "//" (which URL splitting reads as an authority), HTTP/1.0 or 1.1.
REQUEST_LINE = re.compile(rb'(GET|POST) (/(?!/)[!"$&-~]*) HTTP/1\.([01])')
# Header fields: a token name without "_" (Gunicorn drops those), no space before the colon,
# a value of visible characters, spaces and tabs (no obs-fold: a continuation line is no token).
FIELDS = re.compile(rb"(?:[!#$%&'*+\-.^`|~0-9A-Za-z]+:[\t\x20-\x7e\x80-\xff]*\r\n)*")
# Fields whose handling is Gunicorn's: framing, expectations, protocol switches.
GUNICORN_FIELDS = frozenset({b"TRANSFER-ENCODING", b"EXPECT", b"UPGRADE", b"HTTP2-SETTINGS"})
OPENRTB_VERSION = "2.6"  # of the bid app's answers (X-OpenRTB-Version), for the worker's no-bids
KNOWN_NAMES = 1024  # header names remembered with their environ key (a peer cannot grow it more)
KNOWN_HEADS = 1024  # request heads remembered with their parsed form (idem)
LENGTH_FIELD = b"\r\nContent-Length: "  # as exchanges spell it: its value is left out of the key

INTERNAL_ERROR = ("<html>\n  <head>\n    <title>Internal Server Error</title>\n  </head>\n"
                  "  <body>\n    <h1><p>Internal Server Error</p></h1>\n    \n  </body>\n"
                  "</html>\n")


class Request(NamedTuple):
    """A request read by :meth:`FastPath.parse`."""

    environ: dict[str, Any]
    size: int  # bytes of head and body: the request's share of the connection's bytes
    close: bool  # the client asked for the connection to close after the answer
    http10: bool


class Head(NamedTuple):
    """What a request head says: its environ entries, body length and connection semantics."""

    environ: dict[str, Any]  # everything but the body and the connection's addresses
    length: int
    close: bool
    http10: bool


class Answer(NamedTuple):
    """What :meth:`FastPath.respond` produced: the bytes to send and what the log reads."""

    data: bytes
    status: str
    headers: list[tuple[str, str]]
    body_size: int
    close: bool


class FastPath:
    """Parses plain HTTP/1.x requests and answers them from a WSGI app, as Gunicorn would."""

    def __init__(self, cfg: Any, app: Callable, log: Any, body_limit: int) -> None:
        self.app = app
        self.log = log
        self.body_limit = body_limit
        # 0 means "unlimited" to Gunicorn; its maxima then apply.
        self.line_limit = cfg.limit_request_line or 8190
        self.field_limit = cfg.limit_request_field_size or 8190
        self.max_fields = cfg.limit_request_fields
        self.head_limit = self.line_limit + 2 + self.max_fields * (self.field_limit + 2) + 2
        self.fallback_names = GUNICORN_FIELDS | {name.upper().encode("latin-1")
                                                 for name in cfg.secure_scheme_headers}
        environ = base_environ(cfg)
        environ.update({"wsgi.multithread": True, "wsgi.url_scheme": "http",
                        "SCRIPT_NAME": ""})
        self.base = environ
        self._keys: dict[bytes, str] = {}  # header name as sent -> environ key ("": fallback)
        self._heads: dict[bytes, Head] = {}  # request head as sent -> what it says
        self._names: set[str] = set()  # response header names already validated
        self._date_at = 0
        self._date = ""
        self._nobids: dict[tuple[bool, bool, str], bytes] = {}  # of the second _nobids_date
        self._nobids_date = ""
        # A logger that counts requests (statsd) sees every one, as on Gunicorn's path.
        self.log_access = log.access_log_enabled or type(log).access is not Logger.access
        self.log_debug = log.error_log.isEnabledFor(logging.DEBUG)

    @staticmethod
    def usable(cfg: Any) -> bool:
        """Whether a server configured so may answer on this path: no TLS, no PROXY protocol,
        no SCRIPT_NAME prefix, Gunicorn's default request hooks (they take its Request)."""
        return (not cfg.is_ssl and cfg.proxy_protocol in ("off", False, None)
                and not os.environ.get("SCRIPT_NAME")
                and cfg.pre_request is PreRequest.default
                and cfg.post_request is PostRequest.default and cfg.header_map == "drop")

    def _key(self, name: bytes) -> str:
        """The environ key of a header name, "" if the request must go to Gunicorn's path."""
        upper = name.upper()
        if b"_" in name or upper in self.fallback_names:
            key = ""
        elif upper == b"CONTENT-TYPE" or upper == b"CONTENT-LENGTH":
            key = upper.decode().replace("-", "_")
        else:
            key = "HTTP_" + upper.decode().replace("-", "_")
        if len(self._keys) < KNOWN_NAMES:
            self._keys[name] = key
        return key

    def parse(self, data: bytes, client: Any, server: Any) -> Request | None:
        """The request at the start of ``data`` if it is whole and plain, else None. An
        exchange sends the same few heads over and over, differing in ``Content-Length``
        only, so what a head says is remembered under the head less that value: a known head
        costs a look-up and the value's check."""
        end = data.find(b"\r\n\r\n")
        if end < 0 or end >= self.head_limit or not isinstance(server, tuple):
            return None
        at = data.find(LENGTH_FIELD, 0, end)
        if at >= 0:
            at += len(LENGTH_FIELD)
            line_end = data.find(b"\r\n", at, end + 2)
            value = data[at:line_end]
            key = data[:at] + data[line_end:end]
        else:
            value, key = None, data[:end]
        head = self._heads.get(key)
        if head is None:
            head = self._parse_head(data, end)
            if head is None:
                return None
            if len(self._heads) >= KNOWN_HEADS:
                self._heads.clear()  # a peer varying its heads must not grow the memory
            self._heads[key] = head
        environ = head.environ.copy()
        size = head.length
        if value is not None:
            size = self._size(value)
            if size is None:
                return None  # as _parse_head decides
            environ["CONTENT_LENGTH"] = value.decode()
        total = end + 4 + size
        if len(data) < total:
            return None
        environ["wsgi.input"] = io.BytesIO(data[end + 4:total])
        environ["REMOTE_ADDR"] = client[0]
        environ["REMOTE_PORT"] = str(client[1])
        environ["SERVER_NAME"] = server[0]
        environ["SERVER_PORT"] = str(server[1])
        return Request(environ, total, head.close, head.http10)

    def _parse_head(self, data: bytes, end: int) -> Head | None:
        """What the head ``data[:end]`` says, if it is plain, else None."""
        line = data.find(b"\r\n")
        match = REQUEST_LINE.fullmatch(data, 0, line) if line <= self.line_limit else None
        if match is None or not FIELDS.fullmatch(data, line + 2, end + 2):
            return None
        fields = data[line + 2:end].split(b"\r\n") if end > line else []
        if len(fields) > self.max_fields:
            return None
        environ = self.base.copy()
        keys = self._keys
        for field in fields:
            name, _, value = field.partition(b":")
            key = keys.get(name)
            if key is None:
                key = self._key(name)
            if not key or key in environ or len(field) + 2 > self.field_limit:
                return None  # repeated, or Gunicorn's to handle
            environ[key] = value.strip(b" \t").decode("latin-1")
        length = environ.get("CONTENT_LENGTH")
        if length is None:
            if match[1] == b"POST":
                return None  # a body without a length (chunked, or none at all)
            size = 0
        else:
            size = self._size(length)
            if size is None:
                return None  # the arrival check answers an invalid or oversized length
        target = match[2].decode()
        path, _, query = target.partition("?")
        http10 = match[3] == b"0"
        environ["REQUEST_METHOD"] = "POST" if match[1] == b"POST" else "GET"
        environ["PATH_INFO"] = path
        environ["QUERY_STRING"] = query
        environ["RAW_URI"] = target
        environ["SERVER_PROTOCOL"] = "HTTP/1.0" if http10 else "HTTP/1.1"
        # Gunicorn reads only the first Connection field: "close", "keep-alive", else the version.
        connection = environ.get("HTTP_CONNECTION")
        if connection is None:
            close = http10
        else:
            connection = connection.lower()
            close = connection == "close" or (connection != "keep-alive" and http10)
        return Head(environ, size, close, http10)

    def _size(self, length: str | bytes) -> int | None:
        """The body size a ``Content-Length`` value gives: None unless ASCII digits within
        the body limit."""
        if length.isdigit() and length.isascii() and len(length) <= LENGTH_DIGITS:
            size = int(length)
            if size <= self.body_limit:
                return size
        return None

    def respond(self, request: Request, sock: Any, close: bool) -> Answer:
        """Call the app on ``request`` and frame its answer; ``close``: the connection closes
        after it (``Connection: close``). An exception from the app propagates."""
        environ = request.environ
        environ["gunicorn.socket"] = sock
        if self.log_debug:
            self.log.debug("%s %s", environ["REQUEST_METHOD"], environ["PATH_INFO"])
        started = time.monotonic() if self.log_access else 0.0
        answer: list = []
        parts: list[bytes] = []

        def start_response(status: str, headers: list, exc_info: Any = None) -> Callable:
            if answer and exc_info is None:
                raise AssertionError("Response headers already set!")
            answer[:] = (status, headers)  # nothing is sent before the app returns
            return parts.append

        result = self.app(environ, start_response)
        try:
            parts.extend(result)
        finally:
            if hasattr(result, "close"):
                result.close()
        status, app_headers = answer
        if not isinstance(status, str):
            raise TypeError(f"{status!r} is not a string")
        code = int(status.split(None, 1)[0])
        body = b"".join(parts) if len(parts) != 1 else parts[0]
        headers, length = self._headers(app_headers)
        if code < 200 or code == 204 or code == 304:
            body = b""
        elif length is None:
            headers.append(("Content-Length", str(len(body))))
        elif length < len(body):
            body = body[:length]
        head = [("HTTP/1.0 " if request.http10 else "HTTP/1.1 "), status, "\r\nServer: ", SERVER,
                "\r\nDate: ", self._http_date(), "\r\nConnection: ",
                "close\r\n" if close else "keep-alive\r\n"]
        for name, value in headers:
            head += (name, ": ", value, "\r\n")
        head.append("\r\n")
        data = "".join(head).encode("latin-1") + body
        if self.log_access:
            self.access(environ, status, headers, len(body), time.monotonic() - started)
        return Answer(data, status, headers, len(body), close)

    def nobid(self, request: Request, close: bool, reason: str) -> bytes:
        """A 204 no-bid answered without the app (``X-Nobid-Reason: reason``), headed as the bid
        app heads its own, with the OpenRTB version exchanges read on every answer. The few
        distinct ones are kept for the current second (an overloaded worker sends thousands)."""
        date = self._http_date()
        if date is not self._nobids_date:
            self._nobids, self._nobids_date = {}, date
        key = (request.http10, close, reason)
        data = self._nobids.get(key)
        if data is None:
            data = self._nobids[key] = (
                f"{'HTTP/1.0' if request.http10 else 'HTTP/1.1'} 204 No Content\r\nServer: "
                f"{SERVER}\r\nDate: {date}\r\nConnection: {'close' if close else 'keep-alive'}"
                f"\r\nX-OpenRTB-Version: {OPENRTB_VERSION}\r\nX-Nobid-Reason: {reason}\r\n\r\n"
            ).encode("latin-1")
        if self.log_access:
            self.access(request.environ, "204 No Content", [("X-Nobid-Reason", reason)], 0, 0.0)
        return data

    def _headers(self, app_headers: list) -> tuple[list[tuple[str, str]], int | None]:
        """The app's headers as Gunicorn sends them (hop-by-hop ones dropped, values stripped,
        invalid names or values refused) and the Content-Length among them."""
        headers = []
        length = None
        names = self._names
        for name, value in app_headers:
            if name not in names:
                if not isinstance(name, str) or not TOKEN_RE.fullmatch(name):
                    raise TypeError(f"invalid response header name {name!r}")
                names.add(name)
            if not isinstance(value, str) or not HEADER_VALUE_RE.fullmatch(value):
                raise TypeError(f"invalid response header value for {name!r}")
            lname = name.lower()
            if lname == "content-length":
                length = int(value)
            elif lname in hop_headers:
                continue
            headers.append((name, value.strip(" \t")))
        return headers, length

    def _http_date(self) -> str:
        now = int(time.time())
        if now != self._date_at:
            self._date_at, self._date = now, formatdate(now, usegmt=True)
        return self._date

    def access(self, environ: dict, status: str, headers: list, sent: int,
               seconds: float) -> None:
        """One access-log line (and statsd counts), with what Gunicorn's atoms read."""
        request_headers = [(key[5:].replace("_", "-"), value) for key, value in environ.items()
                           if key.startswith("HTTP_")]
        response = SimpleNamespace(status=status, headers=headers, sent=sent)
        self.log.access(response, SimpleNamespace(headers=request_headers), environ,
                        timedelta(seconds=seconds))

    def internal_error(self, request: Request, exc: BaseException) -> bytes:
        """Log an app failure as Gunicorn does and return its 500 answer (the connection then
        closes)."""
        self.log.exception("Error handling request %s", request.environ["RAW_URI"])
        if self.log_access:
            self.access(request.environ, "500 Internal Server Error", [], len(INTERNAL_ERROR), 0.0)
        return (f"HTTP/1.1 500 Internal Server Error\r\nConnection: close\r\nContent-Type: "
                f"text/html\r\nContent-Length: {len(INTERNAL_ERROR)}\r\n\r\n"
                f"{INTERNAL_ERROR}").encode("latin-1")
