"""G15 with G11: a TaskGroup task's error reaches Sentry once — in the
group the view raises, or, when a kill cut the group short, through the
error log. The real sentry-sdk (in-memory transport) over a real
gevent.pywsgi server on 127.0.0.1."""

from __future__ import annotations

import typing as t

import flask
import gevent
import pytest

from geventctx import TaskGroup
from geventctx.flask import GeventContext

pytest.importorskip("sentry_sdk")
import sentry_sdk  # noqa: E402
from test_sentry import sentry  # noqa: E402,F401  (the real SDK, in-memory transport)


def _crash(message: str) -> None:
    raise ValueError(message)


def _crash_when_killed() -> None:
    try:
        gevent.sleep(5)
    finally:
        raise LookupError("cut short")


def test_a_task_error_reaches_sentry_once_raised_in_the_group_or_logged_after_a_kill(
    sentry: t.Any, serve: t.Any  # noqa: F811
) -> None:
    transport = sentry()
    app = flask.Flask(__name__)
    GeventContext(app)

    @app.get("/raised")
    def raised() -> str:
        with TaskGroup() as tg:
            tg.spawn(_crash, "raised")
        return "not reached"

    @app.get("/killed")
    def killed() -> str:
        with gevent.Timeout(0.02, False):  # the kill is the Timeout's own: caught
            with TaskGroup() as tg:
                tg.spawn(_crash_when_killed)
        return "timed out"

    server = serve(app)
    assert server.request("GET", "/raised").status == 500
    assert server.request("GET", "/killed").status == 200
    sentry_sdk.flush()
    events = [e for e in transport.events() if e.get("exception")]
    values = [[(v["type"], v.get("value")) for v in e["exception"]["values"]] for e in events]
    assert len(events) == 2, values
    assert ("ValueError", "raised") in values[0]  # inside Flask's event of the unhandled group
    assert any(kind == "ExceptionGroup" for kind, _ in values[0])
    assert values[1][-1] == ("LookupError", "cut short")  # (after the kill it was raised in)
    assert events[1]["exception"]["values"][-1]["mechanism"]["type"] == "geventctx"
