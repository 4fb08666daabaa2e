"""``python -m server_hooks.parserbench``: the fast path's request parser against httptools.

The worker's fast path (``server_hooks.fastpath``) parses a request's head with a regular
expression and ``bytes.split`` into the WSGI environ. Issue 11 asked for httptools (the C
parser of the uvicorn stack) unless a small parser of our own measures the same. This
measures both on requests shaped as an exchange sends bid requests (its usual head fields, a
JSON body of 0.5-2 KB), each turning the bytes into the same environ (httptools through its
callbacks, as uvicorn drives it), in one process on one CPU: the minimum over ``--reps``
rounds of microseconds per request. Ours is measured twice: as in service, where an
exchange's few heads are remembered (see ``FastPath.parse``), and with every head new.
httptools comes with the ``[load]`` extra; the server itself does not use it.
"""
from __future__ import annotations

import argparse
import io
import json
import random
import sys
import time

from gunicorn.config import Config
from gunicorn.glogging import Logger

from server_hooks.fastpath import FastPath

CLIENT, SERVER = ("127.0.0.1", 40000), ("127.0.0.1", 8080)


def wire_requests(n: int, seed: int = 0) -> list[bytes]:
    """``n`` POSTs shaped as an exchange sends bid requests."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        body = json.dumps({"id": f"req-{i:010d}", "tmax": rng.choice((50, 80, 120)),
                           "imp": [{"id": "1", "banner": {"w": 300, "h": 250}}],
                           "ext": {"pad": "x" * rng.randrange(400, 1900)}}).encode()
        head = ["POST /openrtb2/bid HTTP/1.1", "Host: bidder.example.com",
                f"User-Agent: exchange/{rng.randrange(1, 9)}.0", "Content-Type: application/json",
                "x-openrtb-version: 2.6", f"Content-Length: {len(body)}"]
        if rng.random() < 0.5:
            head.insert(3, "Accept-Encoding: gzip")
        out.append(("\r\n".join(head) + "\r\n\r\n").encode() + body)
    return out


class HttptoolsParser:
    """httptools' callbacks into the environ FastPath.parse gives (the keys the app reads)."""

    def __init__(self, fast: FastPath) -> None:
        import httptools
        self.base = fast.base
        self.parser = httptools.HttpRequestParser(self)
        self.parse_url = httptools.parse_url

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.done = True

    def parse(self, data: bytes) -> dict:
        self.url, self.headers, self.body, self.done = b"", [], [], False
        self.parser.feed_data(data)
        environ = self.base.copy()
        for name, value in self.headers:
            key = name.decode("latin-1").upper().replace("-", "_")
            if key not in ("CONTENT_TYPE", "CONTENT_LENGTH"):
                key = "HTTP_" + key
            environ[key] = value.decode("latin-1")
        url = self.parse_url(self.url)
        environ["wsgi.input"] = io.BytesIO(b"".join(self.body))
        environ["REQUEST_METHOD"] = self.parser.get_method().decode()
        environ["PATH_INFO"] = url.path.decode()
        environ["QUERY_STRING"] = (url.query or b"").decode()
        environ["RAW_URI"] = self.url.decode()
        environ["SERVER_PROTOCOL"] = "HTTP/" + self.parser.get_http_version()
        environ["REMOTE_ADDR"], environ["REMOTE_PORT"] = CLIENT[0], str(CLIENT[1])
        environ["SERVER_NAME"], environ["SERVER_PORT"] = SERVER[0], str(SERVER[1])
        environ["keep_alive"] = self.parser.should_keep_alive()
        return environ


def measure(parse, requests: list[bytes], reps: int) -> float:
    """Least microseconds of CPU per request over ``reps`` rounds of all ``requests``."""
    best = float("inf")
    for _ in range(reps):
        start = time.process_time()
        for data in requests:
            parse(data)
        best = min(best, (time.process_time() - start) / len(requests) * 1e6)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server_hooks.parserbench",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=4096, help="Distinct bid requests.")
    parser.add_argument("--reps", type=int, default=7, help="Rounds; the least is reported.")
    args = parser.parse_args(argv)
    cfg = Config()
    fast = FastPath(cfg, lambda environ, start: [], Logger(cfg), 1 << 20)
    requests = wire_requests(args.requests)
    if any(fast.parse(data, CLIENT, SERVER) is None for data in requests):
        print("a request did not take the fast path: the comparison would be void",
              file=sys.stderr)
        return 1
    ours = measure(lambda data: fast.parse(data, CLIENT, SERVER), requests, args.reps)

    def first_sight(data: bytes) -> None:
        fast._heads.clear()  # as if every head were new: what the parser itself costs
        fast.parse(data, CLIENT, SERVER)

    new = measure(first_sight, requests, args.reps)
    try:
        theirs = HttptoolsParser(fast)
    except ImportError:
        print(f"fast path parser: {ours:.1f} us per request ({new:.1f} with every head new); "
              "httptools is not installed: "
              "pip install 'bidder[load]' (or httptools) to compare", file=sys.stderr)
        return 2
    # the same environ from both, or the comparison is void
    for data in requests[:50]:
        a, b = fast.parse(data, CLIENT, SERVER).environ, theirs.parse(data)
        for key in a:
            if key != "wsgi.input" and key in b:
                assert a[key] == b[key], (key, a[key], b[key])
        assert a["wsgi.input"].getvalue() == b["wsgi.input"].getvalue()
    other = measure(theirs.parse, requests, args.reps)
    print(f"head + body into the WSGI environ, {args.requests} bid-request POSTs, least of "
          f"{args.reps} rounds:\n  fast path parser, heads seen before  {ours:6.1f} us per "
          f"request\n  fast path parser, every head new     {new:6.1f} us per request\n"
          f"  httptools                            {other:6.1f} us per request\n  ratio "
          f"ours/httptools {ours / other:.2f} (every head new: {new / other:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
