"""Sleeps 20 ms, then answers how long ago the worker's poller saw the request."""
import json
import time


def app(environ, start_response):
    ready_at = environ.get("bidder.ready_at")
    time.sleep(0.02)
    body = json.dumps({"ready_at": ready_at, "waited_s": None if ready_at is None
                       else time.monotonic() - ready_at}).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]
