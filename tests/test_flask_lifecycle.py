"""G3, G4, G11 over a real gevent.pywsgi server: Flask's objects and lifecycle.

Every request goes through ``serve(app)`` (a real ``gevent.pywsgi`` server on
127.0.0.1) and the raw-socket client of ``httpkit``. Children that must
outlive the response wait on a gevent ``Event`` that the test sets only after
it has read the whole response, so "the response is not delayed" and "the
teardown waits for the child" are checked by order of events, never by
timing.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import logging
import random

import flask
import gevent
import gevent.pool
import pytest
from flask import (
    Flask,
    Request,
    appcontext_popped,
    appcontext_pushed,
    current_app,
    g,
    request,
    request_finished,
    request_started,
    request_tearing_down,
    session,
    url_for,
)
from gevent.event import Event
from httpkit import settle, wait_for

import geventctx
from geventctx import _flask_compat as compat
from geventctx import registry
from geventctx.flask import GeventContext

tag = contextvars.ContextVar("test_flask_lifecycle.tag", default=None)

HERE = __file__


def line_of(marker: str) -> int:
    """The line of this file that contains ``marker`` (a spawn site)."""
    with open(HERE, encoding="utf-8") as f:
        found = [n for n, text in enumerate(f, 1) if text.rstrip().endswith(f"# {marker}")]
    assert len(found) == 1, (marker, found)
    return found[0]


class Lifecycle:
    """An app whose teardown functions and ``request.close()`` record what they see."""

    def __init__(self, app: Flask) -> None:
        self.app = app
        self.events: list[str] = []
        self.teardown_request: list[dict] = []
        self.teardown_appcontext: list[dict] = []
        #: The teardowns of the children's own app contexts (G4), apart.
        self.child_teardowns: list[dict] = []
        self.closed: list[dict] = []
        events = self.events
        closed = self.closed

        class RecordingRequest(Request):
            def close(self) -> None:
                events.append("request.close")
                closed.append(
                    {
                        "path": request.path if flask.has_request_context() else None,
                        "g": g.get("marker") if flask.has_app_context() else None,
                    }
                )
                super().close()

        app.request_class = RecordingRequest

        @app.teardown_request
        def _teardown_request(exc):
            events.append("teardown_request")
            self.teardown_request.append({"exc": exc, "path": request.path, "g": g.get("marker")})

        @flask.appcontext_pushed.connect_via(app)
        def _pushed(sender, **_):
            g._lifecycle_pushed = True  # a child's own context is never pushed

        self._pushed = _pushed  # blinker holds receivers weakly

        @app.teardown_appcontext
        def _teardown_appcontext(exc):
            if g.pop("_lifecycle_pushed", None) is None:
                events.append("child teardown_appcontext")
                self.child_teardowns.append({"exc": exc, "g": g.get("marker")})
                return
            events.append("teardown_appcontext")
            self.teardown_appcontext.append({"exc": exc, "g": g.get("marker")})

    def torn_down(self) -> bool:
        return "teardown_appcontext" in self.events

    def wait_torn_down(self, timeout: float = 5.0) -> None:
        wait_for(self.torn_down, timeout, "teardown_appcontext")
        settle()

    def assert_once_in_flask_order(self) -> None:
        teardown = [e for e in self.events if e in ("teardown_request", "request.close", "teardown_appcontext")]
        assert teardown == ["teardown_request", "request.close", "teardown_appcontext"], self.events


def make_app(*, extension: bool = True, **config) -> Flask:
    app = Flask(__name__)
    app.secret_key = "geventctx-tests"
    app.config.update(config)
    if extension:
        GeventContext(app)
    return app


# -- G3: same objects, no push/pop in the child -----------------------------------


def test_child_sees_the_parents_very_objects_and_url_for(serve, gates):
    app = make_app()
    after_response = gates()
    seen: dict[str, dict] = {}
    children: list[gevent.Greenlet] = []

    @app.route("/items/<int:item>")
    def item(item):
        g.marker = object()
        session["user"] = "alice"

        def objects():
            return {
                "request": request._get_current_object(),
                "session": session._get_current_object(),
                "g": g._get_current_object(),
                "app": current_app._get_current_object(),
                "request_ctx": compat.request_ctx(),
                "app_ctx": compat.app_ctx(),
                "marker": g.marker,
                "url": url_for("item", item=item + 1),
                "external": url_for("item", item=item + 1, _external=True),
                "user": session["user"],
            }

        def late_child():
            after_response.wait()
            seen["late"] = objects()

        seen["view"] = objects()
        seen["early"] = geventctx.spawn(objects).get()
        children.append(geventctx.spawn(late_child))
        return "ok"

    server = serve(app)
    response = server.request("GET", "/items/6")
    assert response.status == 200 and response.body == b"ok"
    after_response.set()
    gevent.joinall(children, timeout=5)
    assert all(c.successful() for c in children), [c.exception for c in children]

    view = seen["view"]
    assert view["url"] == "/items/7"
    for name in ("early", "late"):
        child = seen[name]
        for key in ("request", "session", "app", "marker"):
            assert child[key] is view[key], (name, key)
        if not compat.MERGED:
            assert child["request_ctx"] is view["request_ctx"], name
        # An app context and a g of its own (G3), reading through to the view's.
        assert child["app_ctx"] is not view["app_ctx"] and child["g"] is not view["g"], name
        assert child["app_ctx"].app is app and child["app_ctx"].url_adapter is view["app_ctx"].url_adapter
        assert child["app"] is app
        assert child["url"] == view["url"] and child["external"] == view["external"]
        assert child["user"] == "alice"


def test_children_do_not_push_or_pop_flask_contexts(serve, gates):
    app = make_app()
    life = Lifecycle(app)
    after_response = gates()
    sent: collections.Counter[str] = collections.Counter()

    def counter(name):
        def receiver(sender, **kwargs):
            sent[name] += 1

        return receiver

    @app.route("/")
    def index():
        g.marker = "m"
        for _ in range(3):
            geventctx.spawn(lambda: (after_response.wait(), g.marker, request.path))
        geventctx.spawn(lambda: request.path).join()
        return "ok"

    signals = {
        "appcontext_pushed": appcontext_pushed,
        "appcontext_popped": appcontext_popped,
        "request_started": request_started,
        "request_finished": request_finished,
        "request_tearing_down": request_tearing_down,
    }
    receivers = {name: counter(name) for name in signals}
    server = serve(app)
    with contextlib.ExitStack() as stack:
        for name, signal in signals.items():
            stack.enter_context(signal.connected_to(receivers[name], app))
        for done in (1, 2):
            after_response.clear()
            assert server.request("GET", "/").status == 200
            settle()
            assert life.events.count("teardown_appcontext") == done - 1  # children still hold it
            after_response.set()
            wait_for(lambda done=done: life.events.count("teardown_appcontext") == done, 5, "teardown")
        settle()
    # Two requests, four children each: every signal fired once per request.
    assert dict(sent) == {name: 2 for name in signals}
    assert life.events.count("teardown_request") == 2


def test_copy_current_request_context_control_gives_a_fresh_g_and_a_second_teardown(serve):
    # Documents the defect G3/G4 fix: Flask's own recipe, on an app without
    # the extension, pushes a copied context in the child: a new app context
    # (so a fresh, empty g) and a second teardown_request.
    app = make_app(extension=False)
    torn_down = []
    seen = {}

    @app.teardown_request
    def count(exc):
        torn_down.append(exc)

    @app.route("/")
    def index():
        g.marker = "parent"

        @flask.copy_current_request_context
        def child():
            return g._get_current_object(), g.get("marker"), request._get_current_object()

        seen["parent"] = g._get_current_object(), request._get_current_object()
        seen["child"] = gevent.spawn(child).get()
        return "ok"

    server = serve(app)
    assert server.request("GET", "/").status == 200
    child_g, child_marker, child_request = seen["child"]
    assert child_g is not seen["parent"][0]
    assert child_marker is None
    assert child_request is seen["parent"][1]  # only the request is shared
    assert len(torn_down) == 2


# -- G4: lifetime -----------------------------------------------------------------

ENDINGS = [
    "returned",
    "raised",
    "killed_by_view",
    "killed_by_other_greenlet",
    "killed_before_start",
    "spawn_later_killed_before_start",
]


@pytest.mark.parametrize("ending", ENDINGS)
def test_teardown_runs_once_in_flask_order_after_the_child(serve, gates, caplog, ending):
    app = make_app()
    life = Lifecycle(app)
    after_response = gates()
    children: list[gevent.Greenlet] = []
    ran = []

    def child():
        ran.append("child")
        try:
            after_response.wait()
            if ending == "raised":
                raise ValueError("child failed on purpose")
        finally:
            life.events.append("child-end")

    @app.route("/work")
    def work():
        g.marker = "view-g"
        if ending == "spawn_later_killed_before_start":
            child_greenlet = geventctx.spawn_later(30, child)
        else:
            child_greenlet = geventctx.spawn(child)
        children.append(child_greenlet)
        if ending == "killed_by_view":
            gevent.sleep(0)  # let it start and block
            child_greenlet.kill()
        elif ending in ("killed_before_start", "spawn_later_killed_before_start"):
            child_greenlet.kill()
        life.events.append("view-end")
        return "done"

    server = serve(app)
    response = server.request("GET", "/work")
    # The response is complete while the child may still be blocked.
    assert response.status == 200 and response.body == b"done"
    (child_greenlet,) = children
    if ending in ("returned", "raised", "killed_by_other_greenlet"):
        assert not child_greenlet.dead
        settle()
        assert not life.torn_down() and life.events == ["view-end"]
        if ending == "killed_by_other_greenlet":
            gevent.spawn(child_greenlet.kill).join()
        else:
            after_response.set()
    life.wait_torn_down()

    life.assert_once_in_flask_order()
    if ending.endswith("killed_before_start"):
        assert ran == [] and life.events[0] == "view-end"
    else:
        assert ran == ["child"]
        # The view and the child both ended before the first teardown step.
        assert life.events.index("teardown_request") > max(
            life.events.index("view-end"), life.events.index("child-end")
        )
    # Teardown functions ran in the request's context, request.close() too.
    assert life.teardown_request == [{"exc": None, "path": "/work", "g": "view-g"}]
    assert life.teardown_appcontext == [{"exc": None, "g": "view-g"}]
    assert life.closed == [{"path": "/work", "g": "view-g"}]
    failures = [r for r in caplog.records if r.name == "geventctx" and r.levelno >= logging.ERROR]
    assert len(failures) == (1 if ending == "raised" else 0)


def test_teardown_without_children_is_flasks_own(serve):
    app = make_app()
    life = Lifecycle(app)

    @app.route("/plain")
    def plain():
        g.marker = "m"
        return "ok"

    server = serve(app)
    assert server.request("GET", "/plain").status == 200
    # No child: nothing to wait for, teardown already ran when the response came.
    assert life.torn_down()
    settle()
    life.assert_once_in_flask_order()
    assert life.teardown_request == [{"exc": None, "path": "/plain", "g": "m"}]
    assert life.closed == [{"path": "/plain", "g": "m"}]


def test_view_exception_reaches_deferred_teardown(serve, gates, caplog):
    app = make_app()
    life = Lifecycle(app)
    after_response = gates()
    raised = []

    @app.route("/broken")
    def broken():
        g.marker = "broken-g"
        geventctx.spawn(after_response.wait)
        error = KeyError("view failed on purpose")
        raised.append(error)
        raise error

    server = serve(app)
    with caplog.at_level(logging.CRITICAL, logger=app.logger.name):  # Flask logs the 500
        response = server.request("GET", "/broken")
    assert response.status == 500
    settle()
    assert not life.torn_down() and "teardown_request" not in life.events
    after_response.set()
    life.wait_torn_down()
    life.assert_once_in_flask_order()
    (error,) = raised
    assert life.teardown_request == [{"exc": error, "path": "/broken", "g": "broken-g"}]
    assert life.teardown_appcontext == [{"exc": error, "g": "broken-g"}]


def test_grandchild_started_after_the_response_also_holds_the_request(serve, gates):
    app = make_app()
    life = Lifecycle(app)
    first, second = gates(), gates()

    def grandchild():
        second.wait()
        life.events.append("grandchild-end")

    def child():
        first.wait()
        geventctx.spawn(grandchild)  # after the response, from a live child
        life.events.append("child-end")

    @app.route("/")
    def index():
        geventctx.spawn(child)
        return "ok"

    server = serve(app)
    assert server.request("GET", "/").status == 200
    first.set()
    wait_for(lambda: "child-end" in life.events, 5, "child end")
    settle()
    assert not life.torn_down()
    second.set()
    life.wait_torn_down()
    life.assert_once_in_flask_order()
    assert life.events.index("grandchild-end") < life.events.index("teardown_request")


@pytest.mark.parametrize("method", ["map_async", "imap", "imap_unordered", "map"])
def test_pool_children_pin_the_request(serve, gates, method):
    app = make_app()
    life = Lifecycle(app)
    release = gates()
    results: list = []

    def work(n):
        if method != "map":
            release.wait()
        g.calls.append(n)  # the parent's g
        return f"{request.path}:{n}:{tag.get()}"

    @app.route("/pool")
    def pool_view():
        g.marker = "pool-g"
        g.calls = []
        tag.set("view-tag")
        pool = geventctx.Pool(2)
        if method == "map":
            results.extend(pool.map(work, range(3)))
        elif method == "map_async":
            results.append(pool.map_async(work, range(3)))
        else:
            results.append(getattr(pool, method)(work, range(3)))
        return "ok"

    server = serve(app)
    assert server.request("GET", "/pool").status == 200
    if method != "map":
        settle()
        assert not life.torn_down()
        release.set()
    life.wait_torn_down()
    life.assert_once_in_flask_order()
    if method == "map_async":
        values = results[0].get(timeout=5)
    elif method in ("imap", "imap_unordered"):
        values = list(results[0])
    else:
        values = results
    assert sorted(values) == [f"/pool:{n}:view-tag" for n in range(3)]
    assert life.teardown_request == [{"exc": None, "path": "/pool", "g": "pool-g"}]


# -- stragglers -------------------------------------------------------------------


def straggler_records(caplog):
    return [r for r in caplog.records if r.name == "geventctx" and "straggler" in r.getMessage()]


def test_straggler_is_logged_and_teardown_keeps_waiting(serve, gates, caplog):
    caplog.set_level(logging.WARNING, logger="geventctx")
    app = make_app(GEVENTCTX_STRAGGLER_TIMEOUT=0.2, GEVENTCTX_STRAGGLER_POLICY="wait")
    life = Lifecycle(app)
    release = gates()
    children = []

    def slow_report():
        release.wait()
        life.events.append("child-end")

    @app.route("/slow")
    def slow():
        children.append(geventctx.spawn(slow_report))  # SITE:straggler-wait
        return "ok"

    server = serve(app)
    assert server.request("GET", "/slow").status == 200
    wait_for(lambda: straggler_records(caplog), 5, "straggler warning")
    (record,) = straggler_records(caplog)
    message = record.getMessage()
    assert record.levelno == logging.WARNING
    assert "slow_report" in message and "GET /slow" in message
    assert f"{HERE}:{line_of('SITE:straggler-wait')}" in message
    # "wait": logged, but the child runs on and teardown waits for it.
    settle(30)
    assert not children[0].dead and not life.torn_down()
    release.set()
    life.wait_torn_down()
    life.assert_once_in_flask_order()
    assert life.events.index("child-end") < life.events.index("teardown_request")
    assert len(straggler_records(caplog)) == 1


def test_straggler_policy_kill_kills_it_then_teardown_runs_once(serve, caplog):
    caplog.set_level(logging.WARNING, logger="geventctx")
    app = make_app(GEVENTCTX_STRAGGLER_TIMEOUT=0.2, GEVENTCTX_STRAGGLER_POLICY="kill")
    life = Lifecycle(app)
    never = Event()  # nobody sets it: only the kill policy ends the child
    children = []

    def hangs_forever():
        try:
            never.wait()
        except gevent.GreenletExit:
            life.events.append("child-killed")
            raise

    @app.route("/hang")
    def hang():
        children.append(geventctx.spawn(hangs_forever))  # SITE:straggler-kill
        return "ok"

    server = serve(app)
    assert server.request("GET", "/hang").status == 200
    life.wait_torn_down()
    (record,) = straggler_records(caplog)
    assert "hangs_forever" in record.getMessage()
    assert f"{HERE}:{line_of('SITE:straggler-kill')}" in record.getMessage()
    assert children[0].dead and isinstance(children[0].value, gevent.GreenletExit)
    assert life.events.index("child-killed") < life.events.index("teardown_request")
    life.assert_once_in_flask_order()


def test_no_straggler_warning_for_a_child_that_ends_in_time(serve, gates, caplog):
    caplog.set_level(logging.WARNING, logger="geventctx")
    app = make_app(GEVENTCTX_STRAGGLER_TIMEOUT=0.2)
    life = Lifecycle(app)
    release = gates()

    @app.route("/")
    def index():
        geventctx.spawn(release.wait)
        return "ok"

    server = serve(app)
    assert server.request("GET", "/").status == 200
    release.set()
    life.wait_torn_down()
    settle(40)  # past the limit: the watcher was cancelled with the scope
    assert straggler_records(caplog) == []


# -- G11: errors ------------------------------------------------------------------


def test_child_exception_is_logged_once_with_request_and_site_not_printed(serve, capfd, caplog):
    caplog.set_level(logging.ERROR, logger="geventctx")
    app = make_app()
    life = Lifecycle(app)

    def explode():
        raise ValueError("boom-in-child")

    @app.route("/explode", methods=["POST"])
    def explode_view():
        child = geventctx.spawn(explode)  # SITE:explode
        child.join()
        return type(child.exception).__name__

    server = serve(app)
    response = server.request("POST", "/explode?x=1", body=b"")
    assert response.status == 200 and response.body == b"ValueError"
    life.wait_torn_down()
    records = [r for r in caplog.records if r.name == "geventctx"]
    assert len(records) == 1, [r.getMessage() for r in records]
    (record,) = records
    message = record.getMessage()
    assert record.levelno == logging.ERROR
    assert "POST /explode" in message and "explode" in message
    assert f"{HERE}:{line_of('SITE:explode')}" in message
    assert record.exc_info[0] is ValueError and str(record.exc_info[1]) == "boom-in-child"
    err = capfd.readouterr().err
    assert "boom-in-child" not in err and "failed with" not in err


def test_child_outside_any_request_behaves_like_gevent(serve, capfd, caplog):
    caplog.set_level(logging.DEBUG, logger="geventctx")
    app = make_app()

    @app.route("/")
    def index():
        geventctx.spawn(lambda: None).join()  # installs the error hook
        return "ok"

    server = serve(app)
    assert server.request("GET", "/").status == 200
    caplog.clear()
    capfd.readouterr()

    def fail():
        assert tag.get() == "outside"  # still a context-inheriting spawn
        raise ValueError("boom-outside")

    token = tag.set("outside")
    try:
        child = geventctx.spawn(fail)
        child.join(timeout=5)
    finally:
        tag.reset(token)
    assert isinstance(child.exception, ValueError)
    settle()
    assert [r for r in caplog.records if r.name == "geventctx"] == []
    err = capfd.readouterr().err
    assert "boom-outside" in err and "failed with ValueError" in err


def test_spawn_in_app_without_extension_warns_once_per_app(serve):
    first, second = make_app(extension=False), make_app(extension=False)
    for app in (first, second):

        @app.route("/who/<name>")
        def who(name):
            return geventctx.spawn(lambda: f"{request.path}|{current_app.name}").get()  # SITE:misuse

    server_a, server_b = serve(first), serve(second)
    with pytest.warns(geventctx.MisuseWarning) as caught:
        a1 = server_a.request("GET", "/who/a1")
        a2 = server_a.request("GET", "/who/a2")
        b1 = server_b.request("GET", "/who/b1")
    # The children still saw their request.
    assert (a1.status, a1.body) == (200, f"/who/a1|{first.name}".encode())
    assert (a2.status, a2.body) == (200, f"/who/a2|{first.name}".encode())
    assert (b1.status, b1.body) == (200, f"/who/b1|{second.name}".encode())
    misuse = [w for w in caught if issubclass(w.category, geventctx.MisuseWarning)]
    assert len(misuse) == 2  # one per app, not per request
    for w in misuse:
        assert "GeventContext" in str(w.message)
        assert (w.filename, w.lineno) == (HERE, line_of("SITE:misuse"))


# -- Flask's own greenlet context-copying tests, with geventctx.spawn ----------------
# Flask's tests/test_reqctx.py (TestGreenletContextCopying) copies the request
# context by hand (`request_ctx.copy()` / `copy_current_request_context`) and
# runs the greenlet after the test client got the response. Here the same
# checks run in a geventctx.spawn child, over a real server, with no copying.


def test_greenlet_context_copying(serve, gates):
    app = make_app()
    life = Lifecycle(app)
    after_response = gates()
    greenlets = []

    @app.route("/")
    def index():
        flask.session["fizz"] = "buzz"

        def g_():
            after_response.wait()  # Flask runs it after the response too
            assert flask.request
            assert flask.current_app == app
            assert flask.request.path == "/"
            assert flask.request.args["foo"] == "bar"
            assert flask.session.get("fizz") == "buzz"
            return 42

        # A plain gevent greenlet starts without the request ...
        assert gevent.spawn(lambda: bool(flask.request)).get() is False
        # ... a geventctx child has it, without copying or pushing anything.
        greenlets.append(geventctx.spawn(g_))
        return "Hello World!"

    server = serve(app)
    rv = server.request("GET", "/?foo=bar")
    assert rv.body == b"Hello World!"
    assert not life.torn_down()
    after_response.set()
    assert greenlets[0].get(timeout=5) == 42
    life.wait_torn_down()
    life.assert_once_in_flask_order()


def test_greenlet_context_copying_api(serve):
    app = make_app()
    results = []

    @app.route("/")
    def index():
        flask.session["fizz"] = "buzz"

        def g_():  # no copy_current_request_context decorator needed
            assert flask.request
            assert flask.current_app == app
            assert flask.request.path == "/"
            assert flask.request.args["foo"] == "bar"
            assert flask.session.get("fizz") == "buzz"
            return 42

        results.append(geventctx.spawn(g_).get())
        return "Hello World!"

    server = serve(app)
    rv = server.request("GET", "/?foo=bar")
    assert rv.body == b"Hello World!"
    assert results == [42]
    assert "session=" in (rv.header("set-cookie") or "")  # session kept working


# -- G2 under load: many concurrent requests, several children each ---------------


def test_concurrent_requests_children_see_only_their_own_request(serve):
    app = make_app()
    requests_n, children_n = 200, 3
    observations: list[tuple] = []
    teardowns: collections.Counter[str] = collections.Counter()
    teardown_mismatches: list[tuple] = []
    rng = random.Random(1234)

    @app.teardown_request
    def count(exc):
        user = request.headers["X-User"]
        teardowns[user] += 1
        if (g.user, session.get("user"), exc) != (user, user, None):
            teardown_mismatches.append((user, g.user, session.get("user"), exc))

    def child(expected, index, pause):
        try:
            observe(expected, index, pause)
        except BaseException as error:  # fail fast instead of waiting for it
            observations.append((expected, "error", repr(error)))
            raise

    def observe(expected, index, pause):
        gevent.sleep(pause)
        seen_before_write = tag.get()
        tag.set(f"{expected}#{index}")  # never reaches the parent or siblings
        gevent.sleep(pause / 2)
        observations.append(
            (
                expected,
                request.headers["X-User"],
                g.user,
                session["user"],
                seen_before_write,
                tag.get(),
                f"{expected}#{index}",
                geventctx.current_scope().label,
            )
        )

    @app.route("/me")
    def me():
        user = request.headers["X-User"]
        session["user"] = user
        g.user = user
        tag.set(user)
        for index in range(children_n):
            geventctx.spawn(child, user, index, rng.uniform(0, 0.02))
        gevent.sleep(rng.uniform(0, 0.01))
        # The children's writes did not reach the view.
        return f"{user}|{tag.get()}|{g.user}"

    server = serve(app)
    users = [f"user-{n:03d}" for n in range(requests_n)]
    clients = gevent.pool.Pool(requests_n)
    with gevent.Timeout(20, AssertionError("concurrency test took too long")):
        responses = clients.map(lambda u: server.request("GET", "/me", headers={"X-User": u}), users)
        wait_for(lambda: sum(teardowns.values()) >= requests_n, 10, "every teardown")
        wait_for(lambda: len(observations) >= requests_n * children_n, 10, "every child")
    settle()

    for user, response in zip(users, responses, strict=True):
        assert response.status == 200 and response.body == f"{user}|{user}|{user}".encode()
    mismatches = [
        o for o in observations if o[1:4] != (o[0],) * 3 or o[4] != o[0] or o[5] != o[6] or o[7] != "GET /me"
    ]
    assert mismatches == []
    assert collections.Counter(o[0] for o in observations) == {u: children_n for u in users}
    assert teardowns == {u: 1 for u in users}
    assert teardown_mismatches == []
    assert not [r for r in registry.live() if r.scope is not None and r.scope.label == "GET /me"]


def test_log_child_errors_off_leaves_them_to_gevent_even_after_another_app_logged(serve, capfd, caplog):
    caplog.set_level(logging.DEBUG, logger="geventctx")
    logging_app = make_app()
    quiet_app = make_app(GEVENTCTX_LOG_CHILD_ERRORS=False)

    def fail():
        raise ValueError(f"boom-{request.path}")

    for app in (logging_app, quiet_app):

        @app.route("/<name>")
        def view(name):
            geventctx.spawn(fail).join()
            return "ok"

    assert serve(logging_app).request("GET", "/logged").status == 200  # installs the hub hook
    assert serve(quiet_app).request("GET", "/printed").status == 200
    settle()
    logged = [r.getMessage() for r in caplog.records if r.name == "geventctx"]
    assert len(logged) == 1 and "GET /logged" in logged[0]
    err = capfd.readouterr().err
    assert "boom-/printed" in err and "boom-/logged" not in err


@pytest.mark.parametrize("method", ["map", "map_async", "imap", "spawn"])
def test_pool_child_exception_is_logged_once(serve, capfd, caplog, method):
    # Pool.map runs its workers from a helper greenlet that re-raises the
    # worker's error: still one failure, so one log record, nothing printed.
    caplog.set_level(logging.ERROR, logger="geventctx")
    app = make_app()

    def fail(n):
        raise ValueError(f"boom-pool-{n}")

    @app.route("/pool-fail")
    def pool_fail():
        pool = geventctx.Pool(2)
        try:
            if method == "map":
                pool.map(fail, [7])  # SITE:pool-fail-map
            elif method == "map_async":
                pool.map_async(fail, [7]).get()  # SITE:pool-fail-map_async
            elif method == "imap":
                list(pool.imap(fail, [7]))  # SITE:pool-fail-imap
            else:
                pool.spawn(fail, 7).get()  # SITE:pool-fail-spawn
        except ValueError as error:
            return f"caught {error}"
        return "not raised"

    server = serve(app)
    response = server.request("GET", "/pool-fail")
    assert (response.status, response.body) == (200, b"caught boom-pool-7")
    settle()
    records = [r for r in caplog.records if r.name == "geventctx"]
    assert len(records) == 1, [r.getMessage() for r in records]
    message = records[0].getMessage()
    assert "GET /pool-fail" in message and f"{HERE}:{line_of(f'SITE:pool-fail-{method}')}" in message
    assert "boom-pool" not in capfd.readouterr().err


def test_copy_current_request_context_inside_the_extension_closes_the_request_once(serve):
    # Every copy's pop calls request.close() on the shared request; the
    # extension defers the close to the end of the request, once.
    closes = []

    class CountingRequest(Request):
        def close(self):
            closes.append(self.path)
            super().close()

    app = Flask(__name__)
    app.request_class = CountingRequest
    GeventContext(app)

    @app.route("/copies")
    def copies():
        for _ in range(5):
            gevent.spawn(flask.copy_current_request_context(lambda: request.path)).join()
        return "ok"

    server = serve(app)
    assert server.request("GET", "/copies").status == 200
    wait_for(lambda: closes, message="request.close")
    gevent.sleep(0.05)
    assert closes == ["/copies"]


def test_response_close_hooks_run_once_after_the_children_and_teardown(serve, gates):
    # Werkzeug's call_on_close hooks run when the server closes the response
    # iterable: the WSGI end of the request, the last step of teardown (G4).
    app = Flask(__name__)
    GeventContext(app)
    events = []
    release = gates()

    @app.teardown_request
    def teardown(exc):
        events.append("teardown_request")

    @app.route("/")
    def index():
        def child():
            release.wait()
            events.append("child")

        geventctx.spawn(child)
        response = flask.make_response("ok")
        response.call_on_close(lambda: events.append("response closed"))
        return response

    response = serve(app).request("GET", "/")
    assert response.status == 200 and response.body == b"ok"
    settle()
    assert events == []  # the child still runs: nothing closed yet
    release.set()
    wait_for(lambda: "response closed" in events, message="the response's close")
    settle()
    assert events == ["child", "teardown_request", "response closed"]


@pytest.mark.parametrize("case", ["plain-flask", "no-child", "live-child"])
def test_response_close_hooks_run_in_the_requests_own_context(serve, gates, case):
    # The Context rule for call_on_close hooks (Werkzeug's, run by the
    # response's close(): the last step of teardown), with or without a
    # child the close waited for: the Context object the request ran in —
    # what the request set is there, nothing a child set (G2) — and, as in
    # plain Flask (the control), after Flask popped its own contexts.
    app = make_app(extension=case != "plain-flask")
    release = gates()
    seen: dict = {}

    @app.route("/")
    def index():
        tag.set("request-tag")
        seen["view_context"] = gevent.getcurrent().gr_context
        if case == "live-child":

            def child():
                tag.set("child-tag")
                release.wait()

            geventctx.spawn(child)
        response = flask.make_response("ok")

        def hook():
            seen["hook"] = {
                "tag": tag.get(),
                "same_context": gevent.getcurrent().gr_context is seen["view_context"],
                "flask_request_context": flask.has_request_context(),
            }

        response.call_on_close(hook)
        return response

    assert serve(app).request("GET", "/").status == 200
    if case == "live-child":
        settle()
        assert "hook" not in seen  # the child still runs: not closed yet
        release.set()
    wait_for(lambda: "hook" in seen, message="the response's close hook")
    assert seen["hook"] == {"tag": "request-tag", "same_context": True, "flask_request_context": False}
