"""Hello-world Falcon app: the ceiling the bidder's throughput is compared against.

It answers ``POST /openrtb2/bid`` (and the health routes the harness waits on)
after reading the body, the least any bidder must do, so ``bidder bench`` can
send it the very same requests on the very same Gunicorn configuration.
"""
from __future__ import annotations

import falcon


class Hello:
    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        req.bounded_stream.read()
        resp.content_type = falcon.MEDIA_TEXT
        resp.data = b"hello"

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = falcon.MEDIA_TEXT
        resp.data = b"ok"


def create_app() -> falcon.App:
    app = falcon.App()
    hello = Hello()
    for route in ("/openrtb2/bid", "/healthz", "/readyz"):
        app.add_route(route, hello)
    return app


app = create_app()
