"""Recipe: a plain Werkzeug app (no Flask) in ``ContextMiddleware``, on pywsgi.

Run from the repository root::

    python -m examples.werkzeug_app 8000      # or PORT=8000; default 8000

Werkzeug has no request context of its own, so this app keeps the request in
a contextvar of its own; ``geventctx.spawn`` hands it to children with every
other contextvar. ``ContextMiddleware`` gives each request a scope: the
children share one copy of the body (read off the socket once, even after
the response was sent) and the response's ``close()`` — where a Werkzeug
app tears down, through ``Response.call_on_close`` — waits until they end.

Same routes as ``workapp.py``: ``POST /work`` (children run after the
response, when released), ``POST /release/<id>``, ``GET /report/<id>``
(what the children saw; ``teardown``: how many children had finished each
time the response's close ran).
"""

from gevent import monkey

monkey.patch_all()

import contextvars  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import typing as t  # noqa: E402

import gevent  # noqa: E402
from gevent.event import Event  # noqa: E402
from gevent.pywsgi import WSGIServer  # noqa: E402
from werkzeug.wrappers import Request, Response  # noqa: E402

import geventctx  # noqa: E402
from geventctx.wsgi import ContextMiddleware  # noqa: E402

current_request: contextvars.ContextVar[Request] = contextvars.ContextVar("current_request")
request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

REPORTS: dict[str, dict[str, list[t.Any]]] = {}
GO: dict[str, Event] = {}


def child(record: dict[str, list[t.Any]], go: Event, how: str) -> None:
    go.wait(timeout=10)
    try:
        request = current_request.get()
        data = request.get_data() if how == "get_data" else request.stream.read()
        seen = {
            "how": how,
            "user": request.headers.get("X-User"),
            "request_id": request_id.get(),
            "sha256": hashlib.sha256(data).hexdigest(),
            "length": len(data),
        }
    except Exception as exc:  # noqa: BLE001 - report it to the client
        seen = {"how": how, "error": repr(exc)}
    record["children"].append(seen)


def work(request: Request) -> Response:
    rid = request_id.get()
    record = REPORTS[rid] = {"children": [], "teardown": []}
    GO[rid] = Event()
    for how in ("get_data", "stream", "get_data"):
        geventctx.spawn(child, record, GO[rid], how)
    response = Response(json.dumps({"request_id": rid}), content_type="application/json")
    # Teardown: with the middleware, after every child has ended, once.
    response.call_on_close(lambda: record["teardown"].append(len(record["children"])))
    return response


def route(request: Request) -> Response:
    parts = request.path.strip("/").split("/")
    if request.method == "POST" and parts == ["work"]:
        return work(request)
    if request.method == "POST" and parts[0] == "release" and len(parts) == 2 and parts[1] in GO:
        GO.pop(parts[1]).set()
        return Response(json.dumps({"released": parts[1]}), content_type="application/json")
    if request.method == "GET" and parts[0] == "report" and len(parts) == 2 and parts[1] in REPORTS:
        return Response(json.dumps(REPORTS[parts[1]]), content_type="application/json")
    return Response("not found", status=404)


@Request.application
def app(request: Request) -> Response:
    # The server may run several requests in one greenlet (keep-alive):
    # reset what this request set, its children keep their snapshot.
    tokens = current_request.set(request), request_id.set(request.headers.get("X-Request-Id", "-"))
    try:
        return route(request)
    finally:
        current_request.reset(tokens[0])
        request_id.reset(tokens[1])


application = ContextMiddleware(app)


def main() -> None:
    port = int(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("PORT", "8000"))
    server = WSGIServer(("127.0.0.1", port), application)
    gevent.signal_handler(signal.SIGTERM, server.stop)
    print(f"serving on http://127.0.0.1:{port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
