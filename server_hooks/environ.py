"""WSGI environ keys the worker sets for the app (a light module: importing it loads no Gunicorn)."""

READY_AT = "bidder.ready_at"  # when the request arrived (time.monotonic() seconds)
INFLATED = "bidder.inflated_body"  # a gzip body as the worker inflated it for its tmax (bytes)
