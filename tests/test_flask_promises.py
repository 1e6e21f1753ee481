"""The extension changes nothing Flask promises (issue: Flask's suite as judge).

Each test states a promise of plain Flask and checks it holds with
:class:`GeventContext` on the app: an app is freed at zero refcount, the
extension leaves nothing behind in blinker, teardown's exception argument
keeps Flask's meaning, the app's session interface stays the app's own
(and keeps its guard when replaced after ``init_app``), and the core works
on a Flask without the private names of 2.3-3.1.
"""

from __future__ import annotations

import gc
import weakref

import flask
import gevent
import pytest
from flask import Flask, request_finished, request_started, request_tearing_down, session
from flask.sessions import SecureCookieSessionInterface
from gevent.event import Event

import geventctx
from geventctx import _flask_compat as compat
from geventctx.flask import GeventContext


def make_app(name: str = "promises") -> Flask:
    app = Flask(name)
    app.secret_key = "test-secret"
    GeventContext(app)
    return app


@pytest.fixture
def no_gc():
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def test_app_is_freed_at_zero_refcount(no_gc):
    # Flask's own tests/test_basic.py::test_app_freed_on_zero_refcount.
    app = make_app()
    app.view_functions["static"]
    weak = weakref.ref(app)
    del app
    assert weak() is None


def test_app_that_served_requests_is_freed_at_zero_refcount(no_gc):
    from gevent.pywsgi import WSGIServer
    from httpkit import request as http_request

    app = make_app()

    @app.get("/work")
    def work() -> str:
        geventctx.spawn(lambda: flask.g.get("x")).join()
        return "ok"

    assert app.test_client().get("/work").text == "ok"
    server = WSGIServer(("127.0.0.1", 0), app, log=None)
    server.start()
    try:
        response = http_request(server.server_port, "GET", "/work")
        assert response is not None and response.body == b"ok"
    finally:
        server.stop(timeout=5)
    del server, response
    weak = weakref.ref(app)
    del app
    gevent.sleep(0)
    assert weak() is None, [type(r) for r in gc.get_referrers(weak())]


def test_apps_created_and_dropped_leave_no_signal_receivers():
    make_app("first")
    before = {signal: len(signal.receivers) for signal in (request_started, request_finished)}
    for i in range(50):
        app = make_app(f"factory_{i}")
        app.test_client().get("/")
        del app
    gc.collect()
    after = {signal: len(signal.receivers) for signal in (request_started, request_finished)}
    assert after == before


def test_teardown_called_without_an_argument_outside_a_managed_request_gets_flasks_none():
    app = make_app()
    seen: list[object] = []
    signalled: list[object] = []
    app.teardown_request(seen.append)
    app.teardown_appcontext(seen.append)

    def on_tearing_down(sender: object, exc: object = "missing", **_: object) -> None:
        signalled.append(exc)

    request_tearing_down.connect(on_tearing_down, app)
    try:
        with app.test_request_context("/"):
            # Flask 3.2 takes the context first; the exception still defaults.
            args = (compat.request_ctx(),) if compat.MERGED else ()
            app.do_teardown_request(*args)
            app.do_teardown_appcontext(*args)
    finally:
        request_tearing_down.disconnect(on_tearing_down, app)
    # Flask: no argument means "the exception in flight", here none. The
    # context's own pop at the end of the with block calls them again.
    assert seen[:2] == [None, None]
    assert signalled[0] is None


class TenantSessions(SecureCookieSessionInterface):
    """A session interface of the app's own, as extensions write them."""

    def get_cookie_name(self, app: Flask) -> str:
        return "tenant_session"

    def should_set_cookie(self, app: Flask, session: object) -> bool:
        return True

    def tenant_of(self) -> str:
        return "acme"


def test_the_apps_session_interface_stays_its_own():
    app = Flask("tenant")
    app.secret_key = "test-secret"
    app.session_interface = TenantSessions()
    GeventContext(app)
    interface = app.session_interface
    assert isinstance(interface, TenantSessions)
    assert interface.get_cookie_name(app) == "tenant_session"
    assert interface.should_set_cookie(app, None) is True
    assert interface.tenant_of() == "acme"

    @app.get("/login")
    def login() -> str:
        session["user"] = "ann"
        return "ok"

    response = app.test_client().get("/login")
    assert "tenant_session=" in response.headers["Set-Cookie"]


def test_a_session_interface_replaced_after_init_app_keeps_the_guard(serve):
    app = make_app("replaced")
    app.session_interface = TenantSessions()  # what a server-side session extension does
    release, done = Event(), Event()

    @app.get("/late")
    def late() -> str:
        def child() -> None:
            release.wait()
            try:
                session["late"] = 1
            finally:
                done.set()

        geventctx.spawn(child)
        return "ok"

    server = serve(app)
    with pytest.warns(geventctx.SessionMutationWarning, match="after it was saved"):
        response = server.request("GET", "/late")
        assert response.status == 200
        release.set()
        done.wait(5)


def test_spawn_outside_a_request_needs_no_flask_private_names(monkeypatch):
    # Flask 3.2 removes flask.globals._cv_request: the core must not read it.
    import flask.globals

    monkeypatch.delattr(flask.globals, "_cv_request", raising=False)
    assert geventctx.spawn(lambda: 41 + 1).get(timeout=5) == 42
