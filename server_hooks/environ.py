"""WSGI environ keys the worker sets for the app (a light module: importing it loads no Gunicorn)."""

READY_AT = "bidder.ready_at"  # when the request arrived (time.monotonic() seconds)
# A gzip body as the worker inflated it to read its tmax (bytes): the app need not inflate it again.
INFLATED = "bidder.inflated_body"
