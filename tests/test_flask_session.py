"""G6 and G7 over a real server: the session and other late effects."""

from __future__ import annotations

import logging
import warnings

import gevent
import pytest
from flask import Flask, after_this_request, session
from flask.sessions import SecureCookieSessionInterface, SessionInterface, SessionMixin
from gevent.event import Event
from httpkit import wait_for

import geventctx
from geventctx import _flask_compat as compat
from geventctx.flask import GeventContext


def _late_after_this_request(release: Event, done: Event) -> None:
    """A child's after_this_request, once ``release`` is set (late, by then)."""
    release.wait()
    try:
        after_this_request(lambda response: response)
    finally:
        done.set()


def make_app(**config):
    app = Flask(__name__)
    app.secret_key = "test-secret"
    app.config.update(config)
    GeventContext(app)
    return app


def cookie_of(response):
    values = response.headers.get("set-cookie", [])
    return values[0].split(";")[0] if values else None


def test_child_mutation_before_response_is_persisted(serve):
    app = make_app()

    @app.route("/set")
    def set_():
        def child():
            session["cart"] = ["apple"]

        geventctx.spawn(child).join()
        return "ok"

    @app.route("/get")
    def get():
        return {"cart": session.get("cart")}

    server = serve(app)
    first = server.request("GET", "/set")
    cookie = cookie_of(first)
    assert cookie is not None
    second = server.request("GET", "/get", headers={"Cookie": cookie})
    assert second.json() == {"cart": ["apple"]}


def test_child_mutation_after_save_warns_at_the_users_line(serve):
    app = make_app()
    release, done = Event(), Event()

    @app.route("/late")
    def late():
        def child():
            release.wait()
            try:
                session["late"] = 1  # LATE-WRITE
            finally:
                done.set()

        geventctx.spawn(child)
        return "ok"

    server = serve(app)
    with pytest.warns(geventctx.SessionMutationWarning, match="GET /late.*after it was saved") as record:
        response = server.request("GET", "/late")
        assert response.status == 200
        assert cookie_of(response) is None  # nothing to save at response time
        release.set()
        done.wait(5)
    (warning,) = [w for w in record if issubclass(w.category, geventctx.SessionMutationWarning)]
    assert warning.filename == __file__
    with open(__file__) as source:
        assert "LATE-WRITE" in source.read().splitlines()[warning.lineno - 1]


def test_strict_mode_raises_in_the_child(serve, caplog):
    app = make_app(GEVENTCTX_SESSION_AFTER_RESPONSE="error")
    release = Event()
    outcome = []

    @app.route("/late")
    def late():
        def child():
            release.wait()
            try:
                session["late"] = 1
            except geventctx.SessionMutationError as exc:
                outcome.append(exc)
                raise

        geventctx.spawn(child)
        return "ok"

    server = serve(app)
    with caplog.at_level(logging.ERROR, logger="geventctx"):
        assert server.request("GET", "/late").status == 200
        release.set()
        wait_for(lambda: outcome and not geventctx.registry.live(), message="child to fail")
    assert isinstance(outcome[0], geventctx.SessionMutationError)
    assert "SessionMutationError" in caplog.text


def test_ignore_mode_stays_silent(serve):
    app = make_app(GEVENTCTX_SESSION_AFTER_RESPONSE="ignore")
    release, done = Event(), Event()

    @app.route("/late")
    def late():
        def child():
            release.wait()
            session["late"] = 1
            done.set()

        geventctx.spawn(child)
        return "ok"

    server = serve(app)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        server.request("GET", "/late")
        release.set()
        assert done.wait(5)
    assert not [w for w in record if issubclass(w.category, geventctx.GeventctxWarning)]


def test_teardown_mutation_is_late_too(serve):
    app = make_app()

    @app.teardown_request
    def touch(exc):
        session["from_teardown"] = True

    @app.route("/")
    def index():
        return "ok"

    server = serve(app)
    with pytest.warns(geventctx.SessionMutationWarning):
        server.request("GET", "/")


def test_session_read_only_in_a_child_still_varies_on_cookie(serve):
    app = make_app()

    @app.route("/child-reads")
    def child_reads():
        geventctx.spawn(lambda: session.get("user")).join()
        return "ok"

    @app.route("/nobody-reads")
    def nobody_reads():
        geventctx.spawn(lambda: None).join()
        return "ok"

    server = serve(app)
    assert "Cookie" in (server.request("GET", "/child-reads").header("vary") or "")
    assert "Cookie" not in (server.request("GET", "/nobody-reads").header("vary") or "")


class PlainSession(dict, SessionMixin):
    """A session that is not a CallbackDict: no change notifications."""


class PlainSessionInterface(SessionInterface):
    store: dict[str, dict] = {}

    def open_session(self, app, request):
        return PlainSession(self.store.get("only", {}))

    def save_session(self, app, session, response):
        self.store["only"] = dict(session)


def test_other_session_types_warn_at_teardown(serve):
    app = Flask(__name__)
    app.session_interface = PlainSessionInterface()
    GeventContext(app)
    release = Event()

    @app.route("/late")
    def late():
        def child():
            release.wait()
            session["late"] = 1

        geventctx.spawn(child)
        return "ok"

    server = serve(app)
    with pytest.warns(geventctx.SessionMutationWarning, match="noticed at teardown"):
        server.request("GET", "/late")
        release.set()
        wait_for(lambda: not geventctx.registry.live(), message="child to end")
        gevent.sleep(0.05)
    assert "late" not in PlainSessionInterface.store["only"]


def test_after_this_request_from_child_before_response_runs(serve):
    app = make_app()

    @app.route("/")
    def index():
        def child():
            @after_this_request
            def add_header(response):
                response.headers["X-From-Child"] = "yes"
                return response

        geventctx.spawn(child).join()
        return "ok"

    assert serve(app).request("GET", "/").header("x-from-child") == "yes"


def test_after_this_request_added_while_flask_runs_the_list_still_runs(serve):
    # The seal comes where Flask's loop stops reading the list: a function an
    # after-request function adds while the loop runs is read by it, as with
    # a plain list, and gets no warning.
    app = make_app()

    @app.route("/")
    def index():
        def child():
            @after_this_request
            def first(response):
                @after_this_request
                def second(response):
                    response.headers["X-Second"] = "ran"
                    return response

                return response

        geventctx.spawn(child).join()
        return "ok"

    assert serve(app).request("GET", "/").header("x-second") == "ran"


def test_after_this_request_from_child_after_response_warns(serve):
    app = make_app()
    release, done = Event(), Event()

    @app.route("/")
    def index():
        geventctx.spawn(_late_after_this_request, release, done)
        return "ok"

    server = serve(app)
    with pytest.warns(geventctx.LateEffectWarning, match="after_this_request.*never run"):
        server.request("GET", "/")
        release.set()
        assert done.wait(5)


class YieldingSessions(SecureCookieSessionInterface):
    """A session store doing I/O in ``save_session`` (it yields), as
    server-side session extensions do: the hub runs other greenlets after
    Flask ran the request's after-request functions, before request_finished."""

    def __init__(self, saving: Event, resume: Event) -> None:
        self.saving = saving
        self.resume = resume

    def save_session(self, app, session, response):
        self.saving.set()
        self.resume.wait(5)
        super().save_session(app, session, response)


def test_after_this_request_while_the_session_is_saved_warns(serve):
    # G7: Flask took the after-request functions already; one added now
    # never runs, so it must warn, not vanish.
    saving, resume = Event(), Event()
    app = make_app()
    app.session_interface = YieldingSessions(saving, resume)
    ran = []

    @app.route("/")
    def index():
        def child():
            saving.wait()
            try:
                after_this_request(lambda response: ran.append(response) or response)  # IN-THE-WINDOW
            finally:
                resume.set()

        geventctx.spawn(child)
        return "ok"

    server = serve(app)
    with pytest.warns(geventctx.LateEffectWarning, match="after_this_request.*GET /.*never run") as record:
        response = server.request("GET", "/")
    assert response.status == 200 and resume.is_set()
    assert ran == []
    (warning,) = [w for w in record if issubclass(w.category, geventctx.LateEffectWarning)]
    assert warning.filename == __file__
    with open(__file__) as source:
        assert "IN-THE-WINDOW" in source.read().splitlines()[warning.lineno - 1]


class IndexedAfterRequestApp(Flask):
    """An app whose ``process_response`` runs the request's after-request
    functions itself, newest first by index: it never iterates Flask's list,
    so only a later seal can notice a late ``after_this_request``."""

    def process_response(self, *args):  # (response) on 2.3-3.1, (ctx, response) on 3.2
        response = args[-1]
        functions = compat.after_request_functions(compat.request_ctx())
        for index in range(len(functions) - 1, -1, -1):
            response = functions[index](response)
        return response


class YieldingStartResponse:
    """A WSGI middleware whose ``start_response`` does I/O (it yields): the
    window between ``request_finished`` and Flask's teardown."""

    def __init__(self, app, in_start_response: Event, resume: Event) -> None:
        self.app = app
        self.in_start_response = in_start_response
        self.resume = resume

    def __call__(self, environ, start_response):
        def yielding_start_response(*args):
            self.in_start_response.set()
            self.resume.wait(5)
            return start_response(*args)

        return self.app(environ, yielding_start_response)


def test_after_this_request_between_request_finished_and_teardown_warns(serve):
    # The request_finished seal on its own: process_response never iterated
    # the list, and teardown comes after the child's call.
    in_start_response, resume = Event(), Event()
    app = IndexedAfterRequestApp(__name__)
    GeventContext(app)
    app.wsgi_app = YieldingStartResponse(app.wsgi_app, in_start_response, resume)
    ran = []

    @app.route("/")
    def index():
        def child():
            in_start_response.wait()
            try:
                after_this_request(lambda response: ran.append(response) or response)
            finally:
                resume.set()

        geventctx.spawn(child)
        return "ok"

    server = serve(app)
    with pytest.warns(geventctx.LateEffectWarning, match="after_this_request.*never run"):
        assert server.request("GET", "/").status == 200
    assert resume.is_set() and ran == []


def test_after_this_request_after_a_propagated_view_error_warns(serve):
    # The teardown seal on its own: with PROPAGATE_EXCEPTIONS the view's
    # error goes to the server, Flask neither runs process_response nor
    # sends request_finished.
    app = make_app(PROPAGATE_EXCEPTIONS=True)
    release, done = Event(), Event()

    @app.route("/broken")
    def broken():
        geventctx.spawn(_late_after_this_request, release, done)
        raise KeyError("view failed on purpose")

    server = serve(app, error_log=None)
    with pytest.warns(geventctx.LateEffectWarning, match="after_this_request.*never run"):
        assert server.request("GET", "/broken").status == 500
        release.set()
        assert done.wait(5)


def test_late_effects_error_raises_at_the_late_after_this_request(serve):
    app = make_app(GEVENTCTX_LATE_EFFECTS="error")
    release = Event()
    outcome = []

    @app.route("/")
    def index():
        def child():
            release.wait()
            try:
                after_this_request(lambda response: response)
            except RuntimeError as exc:
                outcome.append(exc)
            else:
                outcome.append("returned")

        geventctx.spawn(child)
        return "ok"

    server = serve(app)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert server.request("GET", "/").status == 200
        release.set()
        wait_for(lambda: outcome, message="the child's late after_this_request")
    (error,) = outcome
    assert isinstance(error, RuntimeError) and "never run" in str(error)
    assert not [w for w in record if issubclass(w.category, geventctx.GeventctxWarning)]


def test_late_effects_ignore_stays_silent(serve):
    app = make_app(GEVENTCTX_LATE_EFFECTS="ignore")
    release, done = Event(), Event()

    @app.route("/")
    def index():
        def child():
            release.wait()
            after_this_request(lambda response: response)
            done.set()

        geventctx.spawn(child)
        return "ok"

    server = serve(app)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert server.request("GET", "/").status == 200
        release.set()
        assert done.wait(5)
    assert not [w for w in record if issubclass(w.category, geventctx.GeventctxWarning)]
