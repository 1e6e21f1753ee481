"""Example: fan out outbound calls with a Pool, the request id in every log line.

A logging filter stamps each record with the ``request_id`` contextvar. The
view sets it and calls three "backends" through ``geventctx.Pool(...).map``;
every worker runs in the view's context, so every line it logs carries the
request's id — with gevent's own Pool they would all say ``-``.

Run: ``python -m examples.fanout_pool`` (serves on 127.0.0.1:8000).
"""

from __future__ import annotations

import contextvars
import logging

import gevent
from flask import Flask, jsonify, request

import geventctx
from geventctx.flask import GeventContext

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


class RequestIdFilter(logging.Filter):
    """Put the current request id on every log record."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


log = logging.getLogger("examples.fanout")
log.addFilter(RequestIdFilter())
BACKENDS = ["inventory", "pricing", "reviews"]


def call_backend(name: str) -> dict[str, str]:
    gevent.sleep(0.01)  # the outbound HTTP call
    log.info("called %s", name)
    return {"backend": name, "request_id": request_id.get()}


def create_app(pool_size: int = 3) -> Flask:
    app = Flask(__name__)
    GeventContext(app)
    pool = geventctx.Pool(pool_size)

    @app.get("/product/<int:product_id>")
    def product(product_id: int) -> object:
        request_id.set(request.headers.get("X-Request-Id", "-"))
        return jsonify(product=product_id, parts=pool.map(call_backend, BACKENDS))

    return app


if __name__ == "__main__":
    from gevent.pywsgi import WSGIServer

    logging.basicConfig(level=logging.INFO, format="[%(request_id)s] %(message)s")
    WSGIServer(("127.0.0.1", 8000), create_app()).serve_forever()
