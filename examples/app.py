"""An example Flask app that hands its request context to background work.

Run it under gevent's own WSGI server::

    python examples/app.py            # serves on 127.0.0.1:8000

``examples/demo.py`` starts it on a free port and drives it with a client.
Every route records what happened in ``EVENTS`` so the demo can report it.
"""

from __future__ import annotations

import contextvars
import hashlib
import logging
import time
import typing as t
import warnings

import gevent
from flask import Flask, g, jsonify, request, session

import geventctx
from geventctx.flask import GeventContext

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

#: What happened, in order: (seconds since start, request id, what, detail).
EVENTS: list[tuple[float, str, str, t.Any]] = []
START = time.monotonic()


def record(what: str, detail: t.Any = None) -> None:
    EVENTS.append((round(time.monotonic() - START, 4), request_id.get(), what, detail))


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:12]


def create_app() -> Flask:
    app = Flask(__name__)
    app.secret_key = "demo only"
    app.config["GEVENTCTX_STRAGGLER_TIMEOUT"] = 5.0
    GeventContext(app)

    @app.before_request
    def identify() -> None:
        request_id.set(request.headers.get("X-Request-Id", "-"))
        g.user = request.headers.get("X-User", "anonymous")

    @app.teardown_request
    def teardown_request(exc: BaseException | None) -> None:
        record("teardown_request", {"path": request.path, "g.user": g.user})

    @app.teardown_appcontext
    def teardown_appcontext(exc: BaseException | None) -> None:
        # Also for each child's own app context, at the child's end, with
        # only what that child set in g (a child never closes the view's).
        record("teardown_appcontext" if "user" in g else "child's teardown_appcontext", None)

    @app.post("/upload")
    def upload() -> t.Any:
        """Parent and three children consume the same trickled body."""

        def consumer(kind: str) -> None:
            gevent.sleep(0.05)  # still running after the response was sent
            readers = {
                "get_data": request.get_data,
                "stream": request.stream.read,
                "data": lambda: request.data,
            }
            data = readers[kind]()
            record(
                "child",
                {
                    "via": kind,
                    "user": g.user,
                    "path": request.path,
                    "request_id": request_id.get(),
                    "sha256": digest(data),
                },
            )

        # One raw stream reader: a raw read that starts after another read
        # the stream to its end gets b"", as Werkzeug's (G5); get_data() and
        # data are the bytes the view's get_data() cached, shared.
        for kind in ("get_data", "data", "stream"):
            geventctx.spawn(consumer, kind)
        parent = digest(request.get_data())
        record("view returns", {"sha256": parent})
        return jsonify(sha256=parent, user=g.user)

    @app.get("/late-session")
    def late_session() -> t.Any:
        """A child that writes the session after the response was saved."""

        def remember_visit() -> None:
            gevent.sleep(0.05)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                session["visited"] = True  # too late: the cookie was sent
            for warning in caught:
                record("warning", f"{warning.category.__name__} at line {warning.lineno}: {warning.message}")

        geventctx.spawn(remember_visit)
        return "ok"

    return app


if __name__ == "__main__":
    from gevent.pywsgi import WSGIServer

    logging.basicConfig(level=logging.INFO)
    print("serving on http://127.0.0.1:8000")
    WSGIServer(("127.0.0.1", 8000), create_app()).serve_forever()
