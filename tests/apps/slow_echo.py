"""Sleeps 20 ms, then answers how long ago the worker's poller saw the request.

A query string can ask for more: ``sleep=S`` sleeps S seconds instead, and ``started=PATH``
creates the file PATH when the app takes the request up, so a test knows the worker is busy
before it sends what must queue behind it."""
import json
import time
from urllib.parse import parse_qs


def app(environ, start_response):
    ready_at = environ.get("bidder.ready_at")
    asked = parse_qs(environ.get("QUERY_STRING", ""))
    if "started" in asked:
        open(asked["started"][0], "w").close()
    time.sleep(float(asked.get("sleep", ["0.02"])[0]))
    body = json.dumps({"ready_at": ready_at, "waited_s": None if ready_at is None
                       else time.monotonic() - ready_at}).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]
