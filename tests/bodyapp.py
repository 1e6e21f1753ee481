"""A Flask app for the body tests that run under a real server process
(``gunicorn -k gevent``, one worker), configured by ``GEVENTCTX_*``
environment variables.

- ``POST /upload?children=N``: the view and N children read
  ``request.get_data()``; answers their sha256 digests, comma-separated.
- ``POST /fire``: spawns a child that sleeps 0.1 s and never reads the
  body, and answers at once.
- ``POST /readers?children=N``: the view and N children read
  ``request.get_data()``; what each got (``"<error type> <id>"`` or
  ``"data <length>"``) is kept in the events as ``readers`` (for clients
  that hang up before the response).
- ``GET /events``: how often ``teardown_request`` ran, straggler log
  lines and the readers' outcomes, as JSON.
"""

from __future__ import annotations

import hashlib
import logging
import os
import typing as t

import gevent
from flask import Flask, jsonify, request

import geventctx
from geventctx.flask import GeventContext

app = Flask(__name__)
for key, value in os.environ.items():
    if key.startswith("GEVENTCTX_") and key != "GEVENTCTX_PATCH":
        app.config[key] = float(value) if key.endswith("TIMEOUT") else value
GeventContext(app)

events: dict[str, list[t.Any]] = {"teardown_request": [], "log": [], "readers": []}


class _Remember(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        events["log"].append(record.getMessage())


logging.getLogger("geventctx").addHandler(_Remember())


@app.teardown_request
def count_teardown(exc: BaseException | None) -> None:
    if request.method == "POST":  # not the test's GET /events
        events["teardown_request"].append(repr(exc))


def digest() -> str:
    try:
        return hashlib.sha256(request.get_data()).hexdigest()
    except Exception as exc:  # reported, not raised: the test compares
        return f"error: {exc!r}"


def everyone(read: t.Callable[[], str]) -> list[str]:
    """``read()`` in the view and in ``?children=N`` children at once: the
    view's result first, then each child's."""
    children = [geventctx.spawn(read) for _ in range(int(request.args.get("children", 0)))]
    mine = read()
    gevent.joinall(children, timeout=10)
    return [mine] + [child.value for child in children]


@app.post("/upload")
def upload() -> str:
    return ",".join(everyone(digest))


def outcome() -> str:
    try:
        return f"data {len(request.get_data())}"
    except Exception as exc:  # the same instance for every reader: its id says so
        return f"{type(exc).__name__} {id(exc)}"


@app.post("/readers")
def readers() -> str:
    events["readers"].append(everyone(outcome))
    return "read"


@app.post("/fire")
def fire() -> str:
    geventctx.spawn(gevent.sleep, 0.1)
    return "sent"


@app.get("/events")
def report() -> object:
    return jsonify(events)
