"""G3/G4 revised: each child runs in an app context of its own.

Children used to share the view's app context, so whatever Flask or an
extension keys on it (Flask-SQLAlchemy's ``db.session``) was used by several
greenlets at once. Every test here fails on the shared-context contract.
The real-database and real-extension cases are in ``test_databases.py``.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import traceback
import typing as t

import flask
import gevent
import gevent.event
import pytest
from flask import Flask, copy_current_request_context, g
from httpkit import settle, wait_for

import geventctx
from geventctx import _flask_compat as compat
from geventctx.flask import GeventContext, fork_g, forked_g, unfork_g

WAIT = 5.0


def app_with_teardown() -> tuple[Flask, list[tuple[t.Any, ...]]]:
    app = Flask(f"child_ctx_{id(object())}")
    app.secret_key = "test"
    GeventContext(app)
    torn: list[tuple[t.Any, ...]] = []

    @app.teardown_appcontext
    def teardown(exc: BaseException | None) -> None:
        ctx = compat.app_ctx()
        torn.append((id(ctx), gevent.getcurrent(), exc, sorted(g), g.get("view")))

    return app, torn


def each_kind(function: t.Callable[[], t.Any]) -> dict[str, t.Any]:
    """``function``'s result as a child of every hand-off kind, from here."""
    pool = geventctx.Pool(2)
    threads = geventctx.ThreadPool(1)
    executor = geventctx.Executor()
    results = {
        "spawn": geventctx.spawn(function).get(timeout=WAIT),
        "spawn_later": geventctx.spawn_later(0, function).get(timeout=WAIT),
        "pool.spawn": pool.spawn(function).get(timeout=WAIT),
        "pool.map": pool.map(lambda _: function(), [0])[0],
        "pool.apply": pool.apply(function),
        "executor": executor.submit(function).result(timeout=WAIT),
        "threadpool": threads.apply(function),
    }
    geventctx.patch()
    try:
        results["patched gevent.spawn"] = gevent.spawn(function).get(timeout=WAIT)
    finally:
        geventctx.unpatch()
    threads.kill()
    return results


def test_every_hand_off_kind_runs_in_an_app_context_of_its_own_in_a_request(serve):
    app, _ = app_with_teardown()
    seen: dict[str, t.Any] = {}

    @app.route("/")
    def view() -> str:
        view_ctx = compat.app_ctx()
        g.view = "set by the view"

        def child() -> tuple[t.Any, ...]:
            ctx = compat.app_ctx()
            return (ctx is view_ctx, ctx.app is flask.current_app._get_current_object(), g.view,
                    flask.request.path, flask.session.get("user"))

        flask.session["user"] = "alice"
        seen.update(each_kind(child))
        return "ok"

    assert serve(app).request("GET", "/").body == b"ok"
    assert seen and all(result == (False, True, "set by the view", "/", "alice") for result in seen.values()), seen


def test_every_hand_off_kind_runs_in_an_app_context_of_its_own_without_a_request():
    # A CLI command, `with app.app_context():`, a Celery task in the app's context.
    app, torn = app_with_teardown()
    with app.app_context():
        view_ctx = compat.app_ctx()
        g.view = "outer"
        contexts = each_kind(lambda: (compat.app_ctx(), g.view))
        assert all(ctx is not view_ctx and value == "outer" for ctx, value in contexts.values()), contexts
        assert len({id(ctx) for ctx, _ in contexts.values()}) == len(contexts)
        settle()
        # Each torn down once (Pool.map's helper has a context of its own too).
        assert {entry[0] for entry in torn} >= {id(ctx) for ctx, _ in contexts.values()}
    assert torn[-1][4] == "outer"  # the outer context's own, last


def test_a_childs_g_reads_through_and_keeps_its_own_names():
    app, _ = app_with_teardown()
    with app.app_context():
        g.view = "v"
        g.shared = ["list"]

        def child() -> dict[str, t.Any]:
            out: dict[str, t.Any] = {"read": g.view, "same object": g.shared is flask.g.shared}
            g.shared.append("child")  # objects are shared
            g.view = "child's"  # names are the child's own
            g.mine = 1
            out["in"] = ("view" in g, "mine" in g, "nothing" in g)
            out["names"] = sorted(g)
            out["get"] = (g.get("view"), g.get("nothing", "default"))
            out["setdefault"] = (g.setdefault("shared", None) is not None, g.setdefault("new", 5))
            return out

        result = geventctx.spawn(child).get(timeout=WAIT)
        assert result["read"] == "v" and result["same object"] is True
        assert result["in"] == (True, True, False)
        assert result["names"] == ["mine", "shared", "view"]
        assert result["get"] == ("child's", "default") and result["setdefault"] == (True, 5)
        assert g.view == "v" and g.shared == ["list", "child"] and "mine" not in g and "new" not in g


def test_deleting_or_popping_a_name_the_view_set_hides_it_in_the_child_only():
    app, _ = app_with_teardown()
    with app.app_context():
        g.a, g.b, g.c = "a", "b", "c"

        def child() -> tuple[t.Any, ...]:
            popped = g.pop("a")
            del g.b
            missing = g.pop("a", "gone")
            with pytest.raises(AttributeError):
                g.b  # noqa: B018
            with pytest.raises(KeyError):
                g.pop("nothing")
            g.c = "own c"
            return popped, missing, "a" in g, "b" in g, sorted(g), g.pop("c"), g.get("c")

        assert geventctx.spawn(child).get(timeout=WAIT) == ("a", "gone", False, False, ["c"], "own c", None)
        assert (g.a, g.b, g.c) == ("a", "b", "c")  # the view keeps all three


def test_an_apps_own_globals_class_keeps_working_in_children():
    class Globals(flask.ctx._AppCtxGlobals):
        def greeting(self) -> str:
            return f"hello {self.get('user', 'nobody')}"

    app, _ = app_with_teardown()
    app.app_ctx_globals_class = Globals
    with app.app_context():
        g.user = "alice"
        child_g = geventctx.spawn(lambda: (isinstance(g._get_current_object(), Globals), g.greeting())).get()
        assert child_g == (True, "hello alice")


def test_a_childs_teardown_runs_once_in_the_child_with_its_result_and_only_its_names(serve):
    app, torn = app_with_teardown()
    kids: dict[str, gevent.Greenlet] = {}
    stop = gevent.event.Event()

    def returns() -> str:
        g.own = 1
        return "ok"

    def raises() -> None:
        g.own = 2
        raise KeyError("on purpose")

    def waits() -> None:
        g.own = 3
        stop.wait(WAIT)

    @app.route("/")
    def view() -> str:
        g.view = "view"
        kids["killer"] = gevent.getcurrent()  # the view kills two of them
        kids["returns"] = geventctx.spawn(returns)
        kids["raises"] = geventctx.spawn(raises)
        kids["killed"] = geventctx.spawn(waits)
        kids["never ran"] = geventctx.spawn(waits)
        kids["never ran"].kill(block=False)
        gevent.joinall([kids["returns"], kids["raises"]])
        gevent.sleep(0)
        kids["killed"].kill()
        return "ok"

    logging.getLogger("geventctx").disabled = True
    try:
        assert serve(app).request("GET", "/").body == b"ok"
        wait_for(lambda: len(torn) == 5, WAIT, "four children and the request torn down")
    finally:
        logging.getLogger("geventctx").disabled = False
    settle()
    assert len(torn) == 5
    by_greenlet = {id(entry[1]): entry for entry in torn}
    returned = by_greenlet[id(kids["returns"])]
    assert returned[2] is None and returned[3] == ["own"] and returned[4] is None
    raised = by_greenlet[id(kids["raises"])]
    assert isinstance(raised[2], KeyError) and raised[3] == ["own"]
    killed = by_greenlet[id(kids["killed"])]
    assert isinstance(killed[2], gevent.GreenletExit) and killed[3] == ["own"]
    # The one killed before it ran: in a greenlet of its own, with the kill.
    (never,) = [e for e in torn if e[1] not in kids.values() and e[4] is None]
    assert isinstance(never[2], gevent.GreenletExit) and never[3] == []
    # Neither in the greenlet that killed it nor in the hub.
    assert never[1] is not kids["killer"] and never[1] is not gevent.get_hub()
    assert torn[-1][4] == "view"  # the request's own, after every child


def test_a_childs_teardown_ends_before_whoever_joins_it_wakes():
    app, torn = app_with_teardown()
    with app.app_context():
        child = geventctx.spawn(lambda: "done")
        assert child.get(timeout=WAIT) == "done"
        assert [entry[1] for entry in torn] == [child]


def test_a_failing_child_teardown_is_logged_with_the_spawn_site_and_keeps_the_result(caplog):
    app = Flask("failing_teardown")
    GeventContext(app)

    @app.teardown_appcontext
    def broken(exc: BaseException | None) -> None:
        if "child" in g:
            raise RuntimeError("teardown failed on purpose")

    def child() -> str:
        g.child = True
        return "result"

    with caplog.at_level(logging.ERROR, logger="geventctx"), app.app_context():
        assert geventctx.spawn(child).get(timeout=WAIT) == "result"  # SPAWN-SITE
    # Flask 3.2 gathers teardown errors into an ExceptionGroup: look at the whole traceback.
    (record,) = [r for r in caplog.records if r.exc_info and "teardown failed" in "".join(
        traceback.format_exception(*r.exc_info))]
    assert "test_child_appcontext.py" in record.getMessage() and "the child's result stands" in record.getMessage()


def test_grandchildren_read_through_a_childs_g_after_its_teardown():
    app, torn = app_with_teardown()
    release = gevent.event.Event()
    with app.app_context():
        g.view = "view"

        def grandchild() -> tuple[t.Any, ...]:
            release.wait(WAIT)
            return g.view, g.child

        def child() -> gevent.Greenlet:
            g.child = "child"
            return geventctx.spawn(grandchild)

        grand = geventctx.spawn(child).get(timeout=WAIT)
        settle()
        assert len(torn) == 1  # the child's teardown ran; the grandchild still waits
        release.set()
        assert grand.get(timeout=WAIT) == ("view", "child")


def test_an_executor_task_cancelled_while_queued_tears_down_once_elsewhere():
    app, torn = app_with_teardown()
    executor = geventctx.Executor(max_workers=1)
    with app.app_context():
        g.view = "view"
        first = executor.submit(gevent.sleep, 0.05)
        queued = executor.submit(lambda: "never")
        assert queued.cancel()
        canceller = gevent.getcurrent()
        wait_for(lambda: len(torn) == 1, WAIT, "the cancelled task's teardown")
        first.result(timeout=WAIT)
        wait_for(lambda: len(torn) == 2, WAIT, "the first task's teardown")
    (cancelled,) = [e for e in torn if isinstance(e[2], concurrent.futures.CancelledError)]
    assert cancelled[1] is not canceller and cancelled[4] is None


def test_a_thread_pool_task_tears_its_app_context_down_in_its_worker_thread():
    app = Flask("thread_teardown")
    GeventContext(app)
    threads: list[int] = []
    app.teardown_appcontext(lambda exc: threads.append(threading.get_ident()))
    pool = geventctx.ThreadPool(1)
    try:
        with app.app_context():
            worker = pool.apply(threading.get_ident)
            assert threads == [worker] and worker != threading.get_ident()
    finally:
        pool.kill()


def test_copy_current_request_context_children_under_patch_get_their_own_app_context(serve):
    app, torn = app_with_teardown()
    seen: list[tuple[t.Any, ...]] = []

    @app.route("/")
    def view() -> str:
        view_ctx = compat.app_ctx()
        g.view = "view"

        @copy_current_request_context
        def work() -> None:
            seen.append((compat.app_ctx() is view_ctx, g.get("view"), flask.request.path))

        geventctx.patch()
        try:
            gevent.spawn(work).join(WAIT)
        finally:
            geventctx.unpatch()
        return "ok"

    assert serve(app).request("GET", "/").body == b"ok"
    # Flask 3.2's copy is a whole new context with a g of its own (Flask's
    # rule); on 2.3-3.1 the copied request context uses the child's own.
    assert seen == [(False, None if compat.MERGED else "view", "/")]
    # Flask 3.2's copy is a context of its own, which Flask tears down too.
    expected = 3 if compat.MERGED else 2
    wait_for(lambda: len(torn) == expected, WAIT, "the child's and the request's teardown")
    settle()
    assert len(torn) == expected


def test_a_name_registered_for_forking_is_a_copy_in_each_child():
    app, _ = app_with_teardown()
    assert "_flask_babel" in forked_g()
    fork_g("tracker", lambda value: dict(value))
    try:
        with app.app_context():
            g.tracker = {"who": "view"}
            g._flask_babel = type("State", (), {})()
            g._flask_babel.babel_locale = "en"

            def child(locale: str) -> tuple[t.Any, ...]:
                g.tracker["who"] = locale
                g._flask_babel.babel_locale = locale
                gevent.sleep(0.01)
                return g.tracker["who"], g._flask_babel.babel_locale

            kids = [geventctx.spawn(child, locale) for locale in ("de", "ja", "fr")]
            assert [k.get(timeout=WAIT) for k in kids] == [("de", "de"), ("ja", "ja"), ("fr", "fr")]
            assert g.tracker == {"who": "view"} and g._flask_babel.babel_locale == "en"
    finally:
        unfork_g("tracker")
    assert "tracker" not in forked_g()


def test_an_app_without_teardown_functions_runs_children_with_no_wrapper():
    app = Flask("no_teardown")
    GeventContext(app)

    def child() -> str:
        return "plain"

    with app.app_context():
        kid = geventctx.spawn(child)
        assert kid._run is child
        assert kid.get(timeout=WAIT) == "plain"


def test_a_teardown_function_that_spawns_does_not_spawn_again_at_each_childs_end():
    app = Flask("spawning_teardown")
    GeventContext(app)
    spawned: list[int] = []

    @app.teardown_appcontext
    def flush(exc: BaseException | None) -> None:
        spawned.append(1)
        geventctx.spawn(lambda: None)

    with app.app_context():
        geventctx.spawn(lambda: None).join(WAIT)
    gevent.sleep(0.05)
    # The child's teardown spawned a hand-off with no teardown of its own;
    # the outer context's teardown spawned one more, whose teardown ran once
    # and spawned a last one, again with none.
    settle()
    assert len(spawned) == 3
