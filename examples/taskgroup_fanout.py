"""Example: a view fans out to three slow backends with a TaskGroup.

The backends are a real HTTP server of their own (``create_backends``):
``inventory``, ``pricing`` and ``reviews``, each taking its time. Pricing
fails for product 13; reviews take far longer than the view's deadline for
product 7. The view (``create_app``) asks all three at once in a
``geventctx.TaskGroup(timeout=DEADLINE)`` and answers with what it got:

- ``/product/1``: all three answered: 200.
- ``/product/13``: pricing failed; the group stopped the others at once
  (reviews never answered) and raised the failure: 502.
- ``/product/7``: reviews were still running at the deadline; the group
  stopped them and raised ``TimeoutError`` naming them: 504.

Either way the view returns only once every call has ended, each call sends
the request's id (a context variable the view set, seen in each task), and
nothing is left running after the response.

Run: ``python -m examples.taskgroup_fanout`` (backends on 127.0.0.1:8001,
the app on 127.0.0.1:8000).
"""

from __future__ import annotations

import contextvars
import http.client
import json
import sys
import typing as t

import gevent
import gevent.socket
from flask import Flask, jsonify, request

import geventctx
from geventctx.flask import GeventContext

if sys.version_info < (3, 11):
    from exceptiongroup import ExceptionGroup

BACKENDS = ["inventory", "pricing", "reviews"]
#: Seconds the view gives its backends, all together.
DEADLINE = 0.5
#: Seconds each backend takes; the reviews of product 7 take SLOW.
DELAYS = {"inventory": 0.05, "pricing": 0.1, "reviews": 0.15}
SLOW = 30.0

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


class BackendError(Exception):
    """A backend answered with an error."""


def create_backends() -> Flask:
    """The three slow backends, as one small app of their own."""
    backends = Flask("backends")

    @backends.get("/<name>/<int:product>")
    def backend(name: str, product: int) -> t.Any:
        gevent.sleep(SLOW if (name, product) == ("reviews", 7) else DELAYS[name])
        if (name, product) == ("pricing", 13):
            return {"error": f"no price for product {product}"}, 503
        return {"backend": name, "product": product, "request_id": request.headers.get("X-Request-Id")}

    return backends


class _Connection(http.client.HTTPConnection):
    """http.client over gevent's socket: waits cooperatively (no monkey-patching)."""

    def connect(self) -> None:
        self.sock = gevent.socket.create_connection((self.host, self.port), self.timeout)


def call_backend(base: tuple[str, int], name: str, product: int) -> dict[str, t.Any]:
    """GET one backend; raise BackendError for an error answer."""
    connection = _Connection(*base, timeout=60)
    try:
        connection.request("GET", f"/{name}/{product}", headers={"X-Request-Id": request_id.get()})
        response = connection.getresponse()
        body = response.read()
    finally:
        connection.close()  # also when the group kills the call
    if response.status != 200:
        raise BackendError(f"{name} answered {response.status}: {body.decode()}")
    return t.cast("dict[str, t.Any]", json.loads(body))


def _outcome(task: geventctx.Greenlet) -> dict[str, t.Any]:
    try:
        return {"ok": task.get()}
    except geventctx.TaskCancelled:
        return {"stopped": True}  # the group stopped it
    except BackendError as exc:
        return {"failed": str(exc)}


def create_app(backends: tuple[str, int]) -> Flask:
    """The app whose view fans out to ``backends`` (host, port)."""
    app = Flask(__name__)
    GeventContext(app)

    @app.get("/product/<int:product>")
    def product_page(product: int) -> t.Any:
        request_id.set(request.headers.get("X-Request-Id", "-"))
        tasks: dict[str, geventctx.Greenlet] = {}
        status, error = 200, None
        try:
            with geventctx.TaskGroup(timeout=DEADLINE) as tg:
                for name in BACKENDS:
                    tasks[name] = tg.spawn(call_backend, backends, name, product)
        except ExceptionGroup as group:  # a backend failed (and maybe the deadline passed too)
            status, error = 502, [str(e) for e in group.exceptions]
        except TimeoutError as exc:  # the deadline alone
            status, error = 504, [str(exc)]
        parts = {name: _outcome(task) for name, task in tasks.items()}
        return jsonify(product=product, parts=parts, errors=error), status

    return app


if __name__ == "__main__":
    from gevent.pywsgi import WSGIServer

    backend_server = WSGIServer(("127.0.0.1", 8001), create_backends(), log=None)
    backend_server.start()
    WSGIServer(("127.0.0.1", 8000), create_app(("127.0.0.1", 8001))).serve_forever()
