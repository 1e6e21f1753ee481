"""G4 wherever Flask runs code for a request: streams, teardown functions.

Over a real gevent.pywsgi server (and Flask's own test client where the
promise is about it): a hand-off from a ``stream_with_context`` generator
or from a ``teardown_request`` function holds the request — the teardown
steps after it wait for it — and teardown runs once, in Flask's order, in
the request's own Context. Children that must outlive the response wait on
an Event the test sets after reading the response: order, never timing.
"""

from __future__ import annotations

import time
import typing as t
import warnings

import flask
import gevent
import pytest
from flask import Flask, Response, g, stream_with_context
from gevent.event import Event
from httpkit import request as http_request
from httpkit import settle, wait_for

import geventctx
from geventctx.flask import GeventContext


class Resource:
    """What ``g`` holds for the request; teardown_appcontext closes it."""

    def __init__(self) -> None:
        self.closed = False


class App:
    def __init__(self) -> None:
        self.app = Flask(f"lifetime_{id(self)}")
        self.app.secret_key = "test"
        GeventContext(self.app)
        self.events: list[str] = []
        self.seen: dict[str, t.Any] = {}
        self.gate = Event()
        events = self.events

        @self.app.before_request
        def open_resource() -> None:
            g.resource = Resource()

        @self.app.teardown_request
        def teardown_request(exc: BaseException | None) -> None:
            events.append("teardown_request")

        @flask.appcontext_pushed.connect_via(self.app)
        def pushed(sender: t.Any, **_: t.Any) -> None:
            g._lifetime_pushed = True  # a child's own app context is never pushed

        self._pushed = pushed  # blinker holds receivers weakly

        @self.app.teardown_appcontext
        def teardown_appcontext(exc: BaseException | None) -> None:
            if g.pop("_lifetime_pushed", None) is None:
                events.append("child teardown_appcontext")  # G4: apart from the request's
                return
            events.append("teardown_appcontext")
            resource = g.get("resource")  # None in an app context of Flask's own
            if resource is not None:
                resource.closed = True

    def child(self, name: str) -> None:
        """Wait for the gate, then use the request's resource."""
        self.seen[f"{name}:scope"] = geventctx.current_scope() is not None
        self.gate.wait(5)
        self.seen[name] = "closed" if g.resource.closed else "open"
        self.events.append(f"{name}-end")

    def teardowns(self) -> int:
        return self.events.count("teardown_appcontext")


def test_child_spawned_in_a_stream_with_context_generator_holds_the_request(serve: t.Any) -> None:
    life = App()

    @life.app.get("/stream")
    def stream() -> Response:
        @stream_with_context
        def generate() -> t.Iterator[str]:
            yield "a"
            life.seen["stream:scope"] = geventctx.current_scope() is not None
            geventctx.spawn(life.child, "streamed")
            yield "b"

        return Response(generate())

    response = http_request(serve(life.app).port, "GET", "/stream")
    assert response is not None and response.body == b"ab"
    settle()
    assert life.seen["stream:scope"] and life.seen["streamed:scope"]
    assert life.teardowns() == 0  # the child still runs: teardown waits
    life.gate.set()
    wait_for(lambda: life.teardowns() == 1, 5, "teardown after the streamed child")
    settle()
    assert life.seen["streamed"] == "open"
    assert life.events == ["streamed-end", "child teardown_appcontext", "teardown_request", "teardown_appcontext"]


def test_stream_with_context_without_children_tears_down_once(serve: t.Any) -> None:
    life = App()

    @life.app.get("/stream")
    def stream() -> Response:
        @stream_with_context
        def generate() -> t.Iterator[str]:
            yield flask.request.path
            yield "!"

        return Response(generate())

    server = serve(life.app)
    for _ in range(2):
        response = http_request(server.port, "GET", "/stream")
        assert response is not None and response.body == b"/stream!"
    wait_for(lambda: life.teardowns() == 2, 5, f"both teardowns {life.events}")
    settle()
    assert life.events == ["teardown_request", "teardown_appcontext"] * 2


@pytest.mark.parametrize("view_child", [False, True], ids=["no_view_child", "view_child_outlives"])
def test_child_spawned_by_a_teardown_function_holds_the_later_teardown_steps(
    serve: t.Any, view_child: bool
) -> None:
    life = App()
    late: list[warnings.WarningMessage] = []

    @life.app.teardown_request
    def spawn_cleanup(exc: BaseException | None) -> None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            geventctx.spawn(life.child, "cleanup")
        late.extend(caught)

    @life.app.get("/work")
    def work() -> str:
        if view_child:
            geventctx.spawn(life.child, "view")
        return "done"

    response = http_request(serve(life.app).port, "GET", "/work")
    assert response is not None and response.body == b"done"
    settle()
    assert life.teardowns() == 0  # teardown_appcontext waits for the cleanup child
    life.gate.set()
    wait_for(lambda: life.teardowns() == 1, 5, "teardown_appcontext after the cleanup child")
    settle()
    assert late == []
    assert life.seen["cleanup:scope"] and life.seen["cleanup"] == "open"
    assert life.events.index("cleanup-end") < life.events.index("teardown_appcontext")
    assert life.events.count("teardown_request") == 1


@pytest.mark.parametrize("children", [1, 0], ids=["with a child", "without children"])
def test_gevent_timeout_in_a_teardown_function_still_runs_every_later_step(serve: t.Any, children: int) -> None:
    # Deferred behind a child, or run in place (no child holds the request):
    # a BaseException from teardown_request stops no later step.
    life = App()
    closed: list[str] = []

    @life.app.teardown_request
    def slow_teardown(exc: BaseException | None) -> None:
        with gevent.Timeout(0.05):  # expires inside the teardown function
            gevent.sleep(5)

    class ClosingRequest(flask.Request):
        def close(self) -> None:
            closed.append("request.close")
            super().close()

    life.app.request_class = ClosingRequest

    @life.app.get("/work")
    def work() -> Response:
        for _ in range(children):
            geventctx.spawn(life.child, "view")
        response = Response("done")
        response.call_on_close(lambda: closed.append("response.close"))
        return response

    response = http_request(serve(life.app).port, "GET", "/work")
    assert response is not None
    if not children:
        # Run in place, inside the app call: the Timeout escapes it after
        # every later step ran, as it would without geventctx (a 500).
        assert response.status == 500
        wait_for(lambda: life.teardowns() == 1, 5, "teardown_appcontext")
        assert closed[0] == "request.close" and g_closed(life)
        return
    assert response.body == b"done"
    life.gate.set()
    wait_for(lambda: "response.close" in closed, 5, "the response's close")
    assert life.teardowns() == 1 and g_closed(life)
    assert closed == ["request.close", "response.close"]


def g_closed(life: App) -> bool:
    return "teardown_appcontext" in life.events


def _flask_version() -> tuple[int, ...]:
    from importlib.metadata import version

    return tuple(int(part) for part in version("flask").split(".")[:3] if part.isdigit())


def _streaming_session_app(async_view: bool) -> Flask:
    app = Flask(f"stream_session_{async_view}")
    app.secret_key = "test"
    GeventContext(app)

    def body() -> Response:
        flask.session["test"] = "flask"

        @stream_with_context
        def gen() -> t.Iterator[str]:
            yield flask.session["test"]

        return Response(gen())

    if async_view:

        async def index() -> Response:
            return body()

        app.add_url_rule("/", view_func=index)
    else:
        app.add_url_rule("/", view_func=body, endpoint="index")
    return app


@pytest.mark.parametrize("async_view", [False, True], ids=["sync", "async"])
def test_streamed_response_under_a_preserving_test_client_leaves_no_context(async_view: bool) -> None:
    # Flask's own tests/test_helpers.py::TestStreaming::test_async_view, and
    # its synchronous twin: the test client pushes the preserved contexts in
    # the test's Context, so the request runs there too.
    if async_view:
        pytest.importorskip("asgiref", reason="async views need flask[async]")
        if _flask_version() < (3, 1, 2):
            pytest.skip("stream_with_context in an async view fails in plain Flask before 3.1.2 (pallets/flask#5774)")
    app = _streaming_session_app(async_view)
    client = app.test_client()
    client.get().close()
    assert client.get().text == "flask"
    with client:
        client.get().close()
    assert not flask.has_request_context() and not flask.has_app_context()
    with client:
        assert client.get().text == "flask"
    assert not flask.has_request_context() and not flask.has_app_context()


def test_grandchild_spawned_by_a_killed_straggler_is_logged_and_killed_too(
    serve: t.Any, caplog: pytest.LogCaptureFixture
) -> None:
    life = App()
    life.app.config.update(GEVENTCTX_STRAGGLER_TIMEOUT=0.2, GEVENTCTX_STRAGGLER_POLICY="kill")
    never = Event()

    def grandchild() -> None:
        never.wait()

    def straggler() -> None:
        try:
            never.wait()
        finally:
            geventctx.spawn(grandchild)  # while being killed

    @life.app.get("/work")
    def work() -> str:
        geventctx.spawn(straggler)
        return "done"

    with caplog.at_level("WARNING", logger="geventctx"):
        response = http_request(serve(life.app).port, "GET", "/work")
        assert response is not None and response.body == b"done"
        wait_for(lambda: life.teardowns() == 1, 5, "teardown once both were killed")
    logged = [r.getMessage() for r in caplog.records if "straggler" in r.getMessage()]
    assert len(logged) == 2, logged
    assert "straggler" in logged[0] and "grandchild" in logged[1] and "killing it" in logged[1]


# -- found by an attack on the lifetime rules (each failed before its fix) ---------


def test_preserving_test_client_runs_teardown_after_the_child_then_flasks_repeat() -> None:
    life = App()

    @life.app.get("/spawn")
    def spawn_view() -> str:
        geventctx.spawn(life.child, "kid")
        return "ok"

    with life.app.test_client() as client:
        assert client.get("/spawn").text == "ok"
    # The test client popped the preserved contexts at the end of the block:
    # Flask's repeat of teardown, which must come after the request's own,
    # and that waits for the child. (Flask 2.3 also pushes and pops an app
    # context of its own there, torn down at once as without geventctx.)
    assert "teardown_request" not in life.events
    life.gate.set()
    wait_for(lambda: life.events.count("teardown_request") == 2, 5, "the teardown, then its repeat")
    kid = life.events.index("kid-end")
    assert "teardown_request" not in life.events[:kid]
    # The kid's own app context right at its end (G4), then the request's own.
    assert life.events[kid + 1 : kid + 4] == ["child teardown_appcontext", "teardown_request", "teardown_appcontext"]


def test_child_spawned_by_teardown_appcontext_holds_the_response_close(serve: t.Any) -> None:
    life = App()
    closed: list[str] = []

    @life.app.teardown_appcontext
    def spawn_late(exc: BaseException | None) -> None:
        life.seen["teardown:scope"] = geventctx.current_scope() is not None
        geventctx.spawn(life.child, "late")

    @life.app.get("/work")
    def work() -> Response:
        response = Response("done")
        response.call_on_close(lambda: closed.append("response.close"))
        return response

    response = http_request(serve(life.app).port, "GET", "/work")
    assert response is not None and response.body == b"done"
    settle()
    assert life.seen["teardown:scope"] and closed == []  # the response's close waits
    life.gate.set()
    wait_for(lambda: closed == ["response.close"], 5, "the response's close after the child")
    assert "late-end" in life.events


def test_straggler_spawned_by_a_teardown_function_is_logged_and_killed(
    serve: t.Any, caplog: pytest.LogCaptureFixture
) -> None:
    life = App()
    life.app.config.update(GEVENTCTX_STRAGGLER_TIMEOUT=0.2, GEVENTCTX_STRAGGLER_POLICY="kill")
    never = Event()

    @life.app.teardown_request
    def spawn_forever(exc: BaseException | None) -> None:
        geventctx.spawn(never.wait)

    @life.app.get("/work")
    def work() -> str:
        return "done"

    with caplog.at_level("WARNING", logger="geventctx"):
        response = http_request(serve(life.app).port, "GET", "/work")
        assert response is not None and response.body == b"done"
        wait_for(lambda: life.teardowns() == 1, 5, "teardown once the straggler was killed")
    assert any("straggler" in r.getMessage() and "killing it" in r.getMessage() for r in caplog.records)
    assert geventctx.Scope.all_open() == []


def test_the_streams_exception_reaches_teardown(serve: t.Any) -> None:
    life = App()
    seen: list[object] = []
    life.app.teardown_request(lambda exc: seen.append(type(exc).__name__))

    @life.app.get("/stream")
    def stream() -> Response:
        @stream_with_context
        def generate() -> t.Iterator[str]:
            yield "a"
            raise ValueError("the stream failed")

        return Response(generate())

    http_request(serve(life.app).port, "GET", "/stream")
    wait_for(lambda: seen, 5, "teardown")
    assert seen == ["ValueError"]


def test_a_request_whose_body_was_read_is_freed_without_the_garbage_collector(serve: t.Any) -> None:
    import gc
    import weakref

    from geventctx import _flask_compat as compat
    from geventctx.body import ENVIRON_BODY

    if compat.MERGED:
        pytest.skip("Flask 3.2 keeps each request in a reference cycle of its own (plain Flask too)")
    life = App()
    bodies: list[t.Any] = []

    @life.app.post("/form")
    def form() -> str:
        # The shared body is made at the first hand-off, or when asked for:
        # a request that never hands off reads as plain Werkzeug.
        flask.request.shared_body()
        name = flask.request.form["name"]
        bodies.append(weakref.ref(flask.request.environ[ENVIRON_BODY]))
        return name

    server = serve(life.app)
    gc.collect()
    gc.disable()
    try:
        response = http_request(
            server.port, "POST", "/form", body=b"name=ann",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert response is not None and response.body == b"ann"
        wait_for(lambda: life.teardowns() == 1, 5, "teardown")
        settle()
        assert bodies and bodies[0]() is None
    finally:
        gc.enable()


def test_the_last_child_runs_the_requests_end_in_its_own_greenlet_and_a_kill_does_not_cut_it(serve: t.Any) -> None:
    # The request ended before its only child: the child, as the last holder,
    # runs the deferred teardown at its own end, in its own greenlet (no
    # greenlet more per request), after its result was recorded. A kill aimed
    # at the child meanwhile neither cuts the teardown short nor changes the
    # child's result.
    life = App()
    in_teardown, finish_teardown = Event(), Event()
    where: dict[str, t.Any] = {}

    @life.app.teardown_request
    def slow_teardown(exc: BaseException | None) -> None:
        where["greenlet"] = gevent.getcurrent()
        in_teardown.set()
        finish_teardown.wait(5)
        where["finished"] = True

    def work() -> str:
        life.gate.wait(5)
        return "the child's result"

    @life.app.get("/fire")
    def fire() -> str:
        life.seen["child"] = geventctx.spawn(work)
        return "sent"

    response = http_request(serve(life.app).port, "GET", "/fire")
    assert response is not None and response.body == b"sent"
    assert life.teardowns() == 0  # the child still runs: teardown waits
    life.gate.set()
    assert in_teardown.wait(5)
    child = life.seen["child"]
    assert where["greenlet"] is child
    # Its result was recorded before the request's end began: joiners do not wait for it.
    assert child.ready() and child.value == "the child's result"
    child.kill(block=True, timeout=0.2)  # the kill reached it; the teardown goes on
    assert not child.dead and "finished" not in where
    finish_teardown.set()
    wait_for(lambda: child.dead, 5, "the child's end")
    assert where["finished"] and life.teardowns() == 1
    assert child.successful() and child.value == "the child's result"


def test_a_timeout_set_by_a_teardown_function_fires_in_the_last_child(serve: t.Any) -> None:
    # The last child holds back a kill while it runs the request's end, but
    # a gevent.Timeout the teardown function set for itself is its own: it
    # fires on time (it was swallowed once, and the sleep ran its 3 s).
    life = App()
    seen: dict[str, t.Any] = {}

    @life.app.teardown_request
    def bounded(exc: BaseException | None) -> None:
        seen["greenlet"] = gevent.getcurrent()
        start = time.monotonic()
        try:
            with gevent.Timeout(0.05):
                gevent.sleep(3)
        except gevent.Timeout:
            seen["fired_after"] = time.monotonic() - start
        seen["done"] = True

    @life.app.get("/fire")
    def fire() -> str:
        seen["child"] = geventctx.spawn(life.child, "fired")
        return "sent"

    response = http_request(serve(life.app).port, "GET", "/fire")
    assert response is not None and response.body == b"sent"
    life.gate.set()
    wait_for(lambda: "done" in seen, 5, "the teardown function")
    assert seen["greenlet"] is seen["child"]  # run by the last child
    assert seen.get("fired_after", 99.0) < 1.0
