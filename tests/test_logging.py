"""geventctx.logging: each record says its request and its spawn line.

Real parts: a gevent.pywsgi server on 127.0.0.1 serving a GeventContext app
to concurrent raw-socket clients; stdlib logging with RequestFilter on a
handler, and structlog with add_request among its processors.
"""

from __future__ import annotations

import logging
import sys
import typing as t

import flask
import gevent
import structlog

import geventctx
from geventctx.flask import GeventContext
from geventctx.logging import RequestFilter, add_request

REQUESTS = 20


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _app(log: t.Callable[[str], None]) -> tuple[flask.Flask, dict[str, int]]:
    app = flask.Flask(__name__)
    GeventContext(app)
    lines: dict[str, int] = {}

    @app.get("/work/<int:n>")
    def work(n: int) -> str:
        log(f"parent {n}")
        lines["spawn"] = sys._getframe().f_lineno + 1
        children = [geventctx.spawn(log, f"spawn {n}")]
        lines["pool"] = sys._getframe().f_lineno + 1
        geventctx.Pool(2).map(log, [f"pool {n}"])
        gevent.joinall(children, raise_error=True)
        return "ok"

    return app, lines


def _load(serve: t.Any, app: flask.Flask) -> None:
    server = serve(app)
    clients = [gevent.spawn(server.request, "GET", f"/work/{n}") for n in range(REQUESTS)]
    gevent.joinall(clients, raise_error=True, timeout=30)
    assert all(c.value.status == 200 for c in clients)


def _check(seen: list[tuple[str, str, str]], lines: dict[str, int]) -> None:
    # Every record: the request it was emitted for, and the child's spawn line.
    assert len(seen) == REQUESTS * 3, len(seen)
    for message, request, site in seen:
        kind, n = message.split()
        assert request == f"GET /work/{n}", (message, request)
        expected = "-" if kind == "parent" else f"{__file__}:{lines[kind]}"
        assert site == expected, (message, site)


def test_request_filter_names_the_request_and_spawn_site_of_every_record(serve):
    logger = logging.getLogger("test_logging.stdlib")
    handler = Collect()
    handler.addFilter(RequestFilter())
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        app, lines = _app(logger.info)
        _load(serve, app)
    finally:
        logger.removeHandler(handler)
    _check([(r.getMessage(), r.geventctx_request, r.geventctx_site) for r in handler.records], lines)


def test_outside_a_request_the_filter_says_so():
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", (), None)
    assert RequestFilter().filter(record) is True
    assert (record.geventctx_request, record.geventctx_site) == ("-", "-")


def test_structlog_processor_adds_the_request_and_spawn_site(serve):
    seen: list[tuple[str, str, str]] = []

    def collect(logger: t.Any, method_name: str, event_dict: dict[str, t.Any]) -> t.Any:
        seen.append((event_dict["event"], event_dict["request"], event_dict["spawn_site"]))
        raise structlog.DropEvent

    structlog.configure(processors=[add_request, collect], cache_logger_on_first_use=False)
    try:
        log = structlog.get_logger()
        app, lines = _app(log.info)
        _load(serve, app)
    finally:
        structlog.reset_defaults()
    _check(seen, lines)


def test_a_threadpool_tasks_error_is_logged_in_the_tasks_context(serve):
    # gevent reports a thread's error from the hub, after the worker moved
    # on; geventctx logs it in the task's context, so the filter (like any
    # handler) sees the request the task ran for.
    handler = Collect()
    handler.addFilter(RequestFilter())
    logger = logging.getLogger("geventctx")
    logger.addHandler(handler)
    threads = geventctx.ThreadPool(2)
    app = flask.Flask(__name__)
    GeventContext(app)

    def fail(n: int) -> None:
        raise LookupError(n)

    @app.get("/fail/<int:n>")
    def view(n: int) -> str:
        threads.spawn(fail, n).wait()
        return "ok"

    try:
        server = serve(app)
        assert [server.request("GET", f"/fail/{n}").status for n in range(3)] == [200] * 3
    finally:
        logger.removeHandler(handler)
        threads.kill()
    failed = [r for r in handler.records if r.exc_info]
    assert [(r.exc_info[1].args[0], r.geventctx_request) for r in failed] == [(n, f"GET /fail/{n}") for n in range(3)]


def test_add_request_keeps_what_the_call_set():
    # structlog's convention: a key the log call passes wins over a processor's.
    event = add_request(None, "info", {"event": "e", "request": "batch 7", "spawn_site": "cli.py:3"})
    assert (event["request"], event["spawn_site"]) == ("batch 7", "cli.py:3")
    assert add_request(None, "info", {"event": "e"})["request"] == "-"


def test_a_failing_error_reporter_is_logged_and_the_others_still_run(serve):
    from geventctx import errorlog

    handler = Collect()
    logger = logging.getLogger("geventctx")
    logger.addHandler(handler)
    seen: list[str] = []

    def broken(scope: t.Any, exc_info: t.Any) -> None:
        raise RuntimeError("reporter broke")

    def working(scope: t.Any, exc_info: t.Any) -> None:
        seen.append(f"{scope.label}: {exc_info[1]}")

    app = flask.Flask(__name__)
    GeventContext(app)

    @app.get("/fail")
    def view() -> str:
        geventctx.spawn(lambda: 1 / 0).join()
        return "ok"

    errorlog.add_reporter(broken)
    errorlog.add_reporter(working)
    try:
        assert serve(app).request("GET", "/fail").status == 200
    finally:
        errorlog.remove_reporter(broken)
        errorlog.remove_reporter(working)
        logger.removeHandler(handler)
    assert seen == ["GET /fail: division by zero"]
    messages = [r.getMessage() for r in handler.records]
    assert any("failed" in m and "GET /fail" in m for m in messages)  # the child's own report
    assert any("error reporter" in m and "broken" in m for m in messages)
