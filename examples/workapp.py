"""The Flask app of the deployment recipes, served unmodified by each server.

``pywsgi_server.py``, ``gunicorn_app.py`` and ``uwsgi_app.py`` only differ in
how they serve this app. Its routes let a client check from the outside what
geventctx guarantees (``tests/test_deploy.py`` does):

``POST /work`` (headers ``X-Request-Id``, ``X-User``; any body)
    Answers at once, without reading the body, after handing the request to
    three children with ``geventctx.spawn``. The children wait until the
    client says go, so they run *after the response was sent*; then each
    reads the body (``get_data()`` twice, then ``request.stream``: G5 gives a
    raw read that starts after another greenlet read the stream to its end
    ``b""``, as Werkzeug's stream), ``g.user``, a header and a contextvar,
    and records what it saw.
``POST /release/<id>``
    Go: lets the children of request ``<id>`` run.
``GET /report/<id>``
    What the children of ``<id>`` saw, and how many children had finished
    each time ``teardown_request`` / ``teardown_appcontext`` ran for it:
    ``[3]`` is "once, after all three".

Reports live in this process's memory: serve it with one worker process.
"""

from __future__ import annotations

import contextvars
import hashlib
import typing as t

from flask import Flask, abort, g, jsonify, request
from gevent.event import Event

import geventctx
from geventctx.flask import GeventContext

#: A contextvar of your own, such as a log correlation id.
request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

REPORTS: dict[str, dict[str, list[t.Any]]] = {}
GO: dict[str, Event] = {}
CHILDREN = 3


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def child(record: dict[str, list[t.Any]], go: Event, how: str) -> None:
    """Runs after the response: uses the request as if it were the view."""
    go.wait(timeout=10)
    try:
        if how == "get_data":
            data = request.get_data()
        elif how == "stream":
            data = request.stream.read()
        else:
            data = request.input_stream.read()
        seen = {
            "how": how,
            "user": g.user,
            "request_id": request_id.get(),
            "header": request.headers.get("X-Request-Id"),
            "sha256": sha256(data),
            "length": len(data),
        }
    except Exception as exc:  # noqa: BLE001 - report it to the client
        seen = {"how": how, "error": repr(exc)}
    record["children"].append(seen)


def create_app() -> Flask:
    app = Flask(__name__)
    GeventContext(app)

    @app.before_request
    def identify() -> None:
        request_id.set(request.headers.get("X-Request-Id", "-"))
        g.user = request.headers.get("X-User", "anonymous")

    @app.post("/work")
    def work() -> t.Any:
        rid = request_id.get()
        g.record = REPORTS[rid] = {"children": [], "teardown_request": [], "teardown_appcontext": []}
        GO[rid] = Event()
        for how in ("get_data", "get_data", "stream"):  # they run in this order
            geventctx.spawn(child, g.record, GO[rid], how)
        return jsonify(request_id=rid, children=CHILDREN)

    @app.post("/release/<rid>")
    def release(rid: str) -> t.Any:
        if rid not in GO:
            abort(404)
        GO.pop(rid).set()
        return jsonify(released=rid)

    @app.get("/report/<rid>")
    def report(rid: str) -> t.Any:
        if rid not in REPORTS:
            abort(404)
        return jsonify(REPORTS[rid])

    # With GeventContext, teardown waits for the children and runs once; it
    # still sees the request's g. Each records how many children had finished.
    @app.teardown_request
    def teardown_request(exc: BaseException | None) -> None:
        if "record" in g:
            g.record["teardown_request"].append(len(g.record["children"]))

    @app.teardown_appcontext
    def teardown_appcontext(exc: BaseException | None) -> None:
        if "record" in g:
            g.record["teardown_appcontext"].append(len(g.record["children"]))

    return app
