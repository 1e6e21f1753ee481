"""The call trace: how many geventctx functions one Flask request enters.

DESIGN, "Pay for what you use": a request that never hands off — whether it
reads its body or not — makes at most :data:`BUDGET` calls into geventctx
functions, from the request's start to its end. Counted with
``sys.setprofile`` (every ``call`` event whose code lives in the geventctx
package; a generator's resume counts as a call too), over one in-process
WSGI call of the app's ``wsgi_app``, its iteration, its ``close()`` and a
short sleep for what runs after it. Each request runs once untraced first
(first-use work, such as installing the error hook per hub, is not per
request).

Rows: the no-hand-off request (GET, and POST reading its body: the budget),
one fire-and-forget child, and ``Pool(4).map`` (reported: the modules each
enters and how often the trace crosses between geventctx modules).
(2026-12-05, before issue 25: 89 calls in 8 modules; 164 with a body read;
112 with one child; 190 with ``Pool(4).map``.)
"""

from __future__ import annotations

import collections
import sys
import typing as t

from common import Row

TITLE = "geventctx calls per Flask request, sys.setprofile trace (Pay for what you use)"

#: Calls into geventctx functions a request that never hands off may make.
BUDGET = 12


def _app() -> t.Any:
    import flask

    import geventctx
    from geventctx.flask import GeventContext

    app = flask.Flask("bench_call_trace")
    GeventContext(app)

    @app.route("/none", methods=["GET", "POST"])
    def none() -> str:
        flask.g.user = "a"
        return "ok"

    @app.route("/body", methods=["POST"])
    def body() -> str:
        return str(len(flask.request.get_data()))

    @app.route("/one")
    def one() -> str:
        geventctx.spawn(lambda: flask.request.args.get("x"))
        return "ok"

    @app.route("/map")
    def map_() -> str:
        geventctx.Pool(4).map(lambda i: i, range(4))
        return "ok"

    return app


def trace(app: t.Any, path: str, method: str = "GET", body: bytes = b"") -> tuple[int, list[str], int]:
    """(calls, modules entered, crossings between modules) of one request."""
    import gevent
    from werkzeug.test import EnvironBuilder

    import geventctx

    package = geventctx.__file__.rsplit("/", 1)[0] + "/"
    calls: collections.Counter[str] = collections.Counter()
    last: list[str | None] = [None]
    crossings = [0]

    def profile(frame: t.Any, event: str, arg: t.Any) -> None:
        filename = frame.f_code.co_filename
        if event == "call" and filename.startswith(package):
            module = filename[len(package):]
            calls[module] += 1
            if last[0] is not None and last[0] != module:
                crossings[0] += 1
            last[0] = module

    environ = EnvironBuilder(path=path, method=method, data=body).get_environ()
    sys.setprofile(profile)
    try:
        result = app.wsgi_app(environ, lambda status, headers, exc_info=None: None)
        for _chunk in result:
            pass
        getattr(result, "close", lambda: None)()
        gevent.sleep(0.01)
    finally:
        sys.setprofile(None)
    return sum(calls.values()), sorted(calls), crossings[0]


REQUESTS = [
    ("no hand-off (GET)", "/none", "GET", b"", True),
    ("no hand-off, body read (POST get_data)", "/body", "POST", b"x" * 100, True),
    ("one fire-and-forget child", "/one", "GET", b"", False),
    ("Pool(4).map", "/map", "GET", b"", False),
]


def run(quick: bool) -> list[Row]:
    app = _app()
    rows = []
    for name, path, method, body, budgeted in REQUESTS:
        trace(app, path, method, body)  # first use: not per request
        calls, modules, crossings = trace(app, path, method, body)
        note = f"{len(modules)} modules ({', '.join(m[:-3] for m in modules)}); {crossings} crossings"
        rows.append(
            Row(
                name,
                calls,
                "calls",
                budget=f"<= {BUDGET} calls" if budgeted else "",
                ok=(calls <= BUDGET) if budgeted else None,
                note=note,
            )
        )
    return rows


if __name__ == "__main__":
    from common import format_table

    print(format_table(run(False)))
