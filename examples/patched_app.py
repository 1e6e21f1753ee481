"""Switch-on without code changes: a Flask app that knows nothing of geventctx.

Run from the repository root::

    GEVENTCTX_PATCH=1 gunicorn -c examples/gunicorn.conf.py examples.patched_app:app

(or ``GEVENTCTX_PATCH=1 gunicorn -k gevent examples.patched_app:app``; under
uWSGI, whose ``--gevent-early-monkey-patch`` calls ``patch_all()`` too:
``GEVENTCTX_PATCH=1 uwsgi --ini examples/uwsgi.ini --module examples.patched_app:app``).
gunicorn's gevent worker calls ``gevent.monkey.patch_all()``; with
``GEVENTCTX_PATCH=1`` geventctx's plugin for gevent's ``did_patch_all``
event then calls ``geventctx.patch()``, and every plain ``gevent.spawn``
inherits its spawner's context: the children of ``POST /work`` see the
request id contextvar (so log lines carry it), ``request`` and ``g``.
Without the variable, they see an empty context: ``request_id`` is ``-`` and
``request`` / ``g`` raise "Working outside of ... context".

``patch()`` is visibility only: it does not pin the request, add a body
lock or defer teardown. So this view reads the body itself before it
spawns, and joins its children before it returns, while the request is
still alive. For children that outlive the response, use
``geventctx.spawn`` with ``GeventContext`` (``workapp.py``).

``POST /work`` (headers ``X-Request-Id``, ``X-User``) answers with what each
child saw; each child also logs a line prefixed with the request id it sees.
"""

from __future__ import annotations

import contextvars
import hashlib
import logging
import typing as t

import gevent
from flask import Flask, g, jsonify, request

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


class RequestIdFilter(logging.Filter):
    """Puts the current request id on every log record."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


log = logging.getLogger("patched_app")
_handler = logging.StreamHandler()
_handler.addFilter(RequestIdFilter())
_handler.setFormatter(logging.Formatter("[%(request_id)s] %(message)s"))
log.addHandler(_handler)
log.setLevel(logging.INFO)

app = Flask(__name__)


@app.before_request
def identify() -> None:
    request_id.set(request.headers.get("X-Request-Id", "-"))
    g.user = request.headers.get("X-User", "anonymous")


def child(n: int) -> dict[str, t.Any]:
    seen: dict[str, t.Any] = {"request_id": request_id.get()}
    try:
        seen["user"] = g.user
        seen["header"] = request.headers.get("X-Request-Id")
        seen["sha256"] = hashlib.sha256(request.get_data()).hexdigest()
    except RuntimeError as exc:  # no request context in this greenlet
        seen["error"] = str(exc).splitlines()[0]
    log.info("child %d saw user %s", n, seen.get("user", "?"))
    return seen


@app.post("/work")
def work() -> t.Any:
    request.get_data()  # read the body before sharing the request
    children = [gevent.spawn(child, n) for n in range(3)]
    gevent.joinall(children, timeout=10)
    return jsonify(children=[c.value for c in children])
