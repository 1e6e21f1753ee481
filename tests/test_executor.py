"""G8 for ``geventctx.Executor``: ``concurrent.futures`` semantics on greenlets, in context.

The test process is not monkey-patched: everything runs in one gevent hub, so
waits that are not cooperative would block the very greenlets that complete
the futures (every such wait here is bounded, so a regression fails instead
of hanging). Tasks that must stay running wait on gevent Events that the test
opens; nothing is asserted about timing, only about order of events.

Request tests run a Flask app with ``GeventContext`` behind a real
``gevent.pywsgi`` server on 127.0.0.1 (``serve``) and the raw-socket client of
``httpkit``; a client whose request must stay open while the test acts runs
in a plain greenlet of its own.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextvars
import hashlib
import json
import logging
import typing as t

import flask
import gevent
import pytest
from flask import Flask, g, request, session
from gevent.event import Event
from httpkit import settle, wait_for

import geventctx
from geventctx import registry
from geventctx.flask import GeventContext

user = contextvars.ContextVar("test_executor.user", default=None)
other = contextvars.ContextVar("test_executor.other", default=None)

WAIT = 5  # every wait is bounded


def who(_=None):
    return user.get()


def in_context(value, fn):
    """Run ``fn()`` in a fresh context where ``user`` is ``value``."""

    def run():
        user.set(value)
        return fn()

    return contextvars.Context().run(run)


@pytest.fixture
def executors():
    """Executors made by a test; shut down (queued tasks cancelled) at the end."""
    made: list[geventctx.Executor] = []

    def make(*args, **kwargs) -> geventctx.Executor:
        executor = geventctx.Executor(*args, **kwargs)
        made.append(executor)
        return executor

    yield make
    for executor in made:
        executor.shutdown(wait=False, cancel_futures=True)


class Teardowns:
    """A Flask app with the extension whose teardown records what happened, in order."""

    def __init__(self) -> None:
        self.app = Flask(__name__)
        self.app.secret_key = "geventctx-tests"
        GeventContext(self.app)
        self.events: list[str] = []
        self.teardown: list[dict] = []

        @self.app.teardown_request
        def record(exc):
            self.events.append("teardown_request")
            self.teardown.append({"exc": exc, "path": request.path, "g": g.get("marker")})

    def count(self) -> int:
        return self.events.count("teardown_request")

    def wait_torn_down(self) -> None:
        wait_for(lambda: self.count() >= 1, WAIT, "teardown_request")
        settle()


# -- concurrent.futures semantics ------------------------------------------------------


def test_submit_returns_a_real_future_whose_result_waits_cooperatively(executors):
    executor = executors()
    opened = Event()

    def needs_another_greenlet():
        # Completes only if the hub keeps running while the caller waits.
        opened.wait(WAIT)
        return opened.is_set()

    future = executor.submit(needs_another_greenlet)
    assert isinstance(future, cf.Future)
    gevent.spawn(opened.set)
    assert future.result(timeout=WAIT) is True
    assert executor.submit(pow, 2, 10).result(timeout=WAIT) == 1024
    assert executor.submit(dict, a=1).result(timeout=WAIT) == {"a": 1}
    assert executor.submit(needs_another_greenlet).exception(timeout=WAIT) is None


def test_result_timeout_raises_timeout_error(executors, gates):
    gate = gates()
    future = executors().submit(gate.wait)
    with pytest.raises(cf.TimeoutError):  # concurrent.futures' own class before 3.11
        future.result(timeout=0.01)
    with pytest.raises(cf.TimeoutError):
        future.exception(timeout=0.01)
    gate.set()
    assert future.result(timeout=WAIT) is True


def test_map_gives_results_in_order_each_in_the_callers_context(executors):
    executor = executors(max_workers=2)

    def task(i, j):
        gevent.sleep(0.001 * (4 - i))  # later calls finish first
        return i + j, user.get()

    results = in_context("alice", lambda: list(executor.map(task, range(4), [10] * 4, timeout=WAIT)))
    assert results == [(10, "alice"), (11, "alice"), (12, "alice"), (13, "alice")]


def test_map_timeout_raises_and_cancels_the_calls_not_yet_running(executors, gates):
    executor = executors(max_workers=1)
    gate = gates()
    ran = []

    def task(i):
        ran.append(i)
        if i == 0:
            gate.wait()
        return i

    results = executor.map(task, range(4), timeout=0.05)
    with pytest.raises(cf.TimeoutError):
        next(results)  # call 0 is running, blocked
    gate.set()
    executor.shutdown(wait=True)
    assert ran == [0]  # calls 1-3 were cancelled while queued


def test_map_timeout_also_cancels_the_call_it_was_waiting_for(executors, gates):
    # As in concurrent.futures: the call whose result timed out is cancelled
    # too when it had not started (here every call waits behind a busy worker).
    executor = executors(max_workers=1)
    gate = gates()
    busy = executor.submit(gate.wait)
    ran = []
    results = executor.map(ran.append, range(3), timeout=0.05)
    with pytest.raises(cf.TimeoutError):
        next(results)
    gate.set()
    executor.shutdown(wait=True)
    assert busy.result() is True
    assert ran == []


def test_shutdown_cancel_futures_cancels_the_queued_and_waits_for_the_running(executors, gates):
    executor = executors(max_workers=1)
    gate = gates()
    ran = []
    running = executor.submit(gate.wait)
    queued = [executor.submit(ran.append, i) for i in range(3)]
    gevent.spawn(gate.set)  # runs once shutdown waits
    executor.shutdown(wait=True, cancel_futures=True)
    assert running.done() and running.result() is True
    assert all(f.cancelled() for f in queued)
    assert ran == []
    with pytest.raises(RuntimeError, match="after shutdown"):
        executor.submit(ran.append, 9)


def test_shutdown_without_wait_returns_and_queued_tasks_still_run(executors, gates):
    executor = executors(max_workers=1)
    gate = gates()
    running = executor.submit(gate.wait)
    queued = executor.submit(who)
    gevent.sleep(0)
    executor.shutdown(wait=False)
    assert running.running() and not queued.done()
    gate.set()
    assert queued.result(timeout=WAIT) is None
    assert running.result(timeout=WAIT) is True


def test_shutdown_wait_leaves_no_live_handoffs(executors):
    executor = executors(max_workers=2)

    def task(i):
        for _ in range(3):
            gevent.sleep(0)
        return i

    futures = [executor.submit(task, i) for i in range(5)]
    executor.shutdown(wait=True)
    # No sleep: when shutdown returns, every worker greenlet has ended.
    assert registry.live() == []
    assert [f.result(timeout=0) for f in futures] == [0, 1, 2, 3, 4]


def test_as_completed_over_fast_slow_raising_and_already_done_futures(executors, gates):
    executor = executors()
    gate = gates()

    def slow():
        gate.wait()
        return "slow"

    def fails():
        raise ValueError("task failed")

    done_before: cf.Future = cf.Future()
    done_before.set_result("pre")
    slow_f = executor.submit(slow)
    fast_f = executor.submit(lambda: "fast")
    fail_f = executor.submit(fails)
    order = []
    for future in cf.as_completed([slow_f, fast_f, fail_f, done_before], timeout=WAIT):
        order.append(future)
        if len(order) == 3:
            gate.set()  # only now can the slow one finish
    assert order[0] is done_before  # finished futures come first
    assert set(order[1:3]) == {fast_f, fail_f}
    assert order[3] is slow_f
    assert isinstance(fail_f.exception(), ValueError)
    assert (fast_f.result(), slow_f.result(), done_before.result()) == ("fast", "slow", "pre")


def test_wait_first_completed_then_all_completed(executors, gates):
    executor = executors()
    gate = gates()
    slow_f = executor.submit(gate.wait)
    fast_f = executor.submit(lambda: "fast")
    done, not_done = cf.wait([slow_f, fast_f], timeout=WAIT, return_when=cf.FIRST_COMPLETED)
    assert done == {fast_f} and not_done == {slow_f}
    gevent.spawn(gate.set)
    done, not_done = cf.wait([slow_f, fast_f], timeout=WAIT, return_when=cf.ALL_COMPLETED)
    assert done == {slow_f, fast_f} and not_done == set()


def test_done_callbacks_run_once_when_the_task_ends(executors, gates):
    executor = executors()
    gate = gates()
    calls = []
    future = executor.submit(lambda: gate.wait() and "value")
    future.add_done_callback(lambda f: calls.append(("pending", f.result())))
    settle(1)
    assert calls == []
    gate.set()
    future.result(timeout=WAIT)
    future.add_done_callback(lambda f: calls.append(("late", f.result())))  # runs at once
    assert calls == [("pending", "value"), ("late", "value")]


# -- context ---------------------------------------------------------------------------


def test_each_task_runs_in_a_snapshot_of_its_submit_call(executors, gates):
    executor = executors(max_workers=1)
    gate = gates()

    def task(name):
        seen = user.get()
        user.set(f"set by {name}")
        other.set(name)
        return seen, other.get()

    def body():
        blocker = executor.submit(gate.wait)  # the next tasks start after the parent moved on
        user.set("first")
        first = executor.submit(task, "t1")
        user.set("second")  # after submit: not seen by t1
        second = executor.submit(task, "t2")
        user.set("third")
        gate.set()
        results = first.result(timeout=WAIT), second.result(timeout=WAIT)
        blocker.result(timeout=WAIT)
        return results, user.get(), other.get()

    (first, second), parent_user, parent_other = in_context("alice", body)
    assert first == ("first", "t1")
    assert second == ("second", "t2")  # not t1's write: tasks are isolated
    assert (parent_user, parent_other) == ("third", None)  # task writes stay in the task


def test_task_exception_goes_to_the_future_and_is_not_printed(executors, capsys):
    executor = executors()
    future = executor.submit(int, "not a number")
    assert isinstance(future.exception(timeout=WAIT), ValueError)
    with pytest.raises(ValueError):
        future.result()
    settle(1)
    assert "ValueError" not in capsys.readouterr().err


# -- over a real server: request scope, body, session ----------------------------------


def test_flask_executor_style_submit_and_result_in_the_view(serve, executors):
    executor = executors(max_workers=2)
    app = Flask(__name__)
    GeventContext(app)

    def build_report(item):
        return {"item": item, "path": request.path, "q": request.args["q"], "marker": g.marker}

    @app.route("/report/<int:item>")
    def report(item):
        g.marker = "view-g"
        future = executor.submit(build_report, item)
        return future.result(timeout=WAIT)

    response = serve(app).request("GET", "/report/7?q=x")
    assert response.status == 200, response.body
    assert response.json() == {"item": 7, "path": "/report/7", "q": "x", "marker": "view-g"}


def test_control_stdlib_thread_pool_executor_task_does_not_see_the_request(serve):
    # The problem the Executor solves: a concurrent.futures task submitted
    # from a view runs without the request (and without any contextvar).
    app = Flask(__name__)
    GeventContext(app)
    seen = {}

    @app.route("/")
    def index():
        user.set("alice")
        with cf.ThreadPoolExecutor(max_workers=1) as pool:
            seen["stdlib"] = pool.submit(lambda: (flask.has_request_context(), user.get())).result(timeout=WAIT)
        seen["geventctx"] = geventctx.Executor().submit(lambda: (flask.has_request_context(), user.get())).result(
            timeout=WAIT
        )
        return "ok"

    assert serve(app).request("GET", "/").status == 200
    assert seen == {"stdlib": (False, None), "geventctx": (True, "alice")}


@pytest.mark.parametrize("where", ["running", "queued"])
def test_task_submitted_in_a_view_delays_teardown_until_it_ends(serve, executors, gates, where):
    executor = executors(max_workers=1)
    life = Teardowns()
    app = life.app
    busy, release = gates(), gates()
    seen = []
    futures = []
    if where == "queued":
        # Submitted outside any request: holds nothing, keeps the worker busy.
        futures.append(executor.submit(busy.wait))
    else:
        busy.set()

    def task():
        release.wait()
        seen.append((request.path, g.marker, user.get()))
        life.events.append("task-end")

    @app.route("/work")
    def work():
        g.marker = "view-g"
        user.set("view")
        futures.append(executor.submit(task))
        life.events.append("view-end")
        return "done"

    response = serve(app).request("GET", "/work")
    assert response.status == 200 and response.body == b"done"  # not delayed by the task
    settle()
    assert life.events == ["view-end"]  # teardown waits, also for a queued task
    busy.set()
    settle()
    assert life.events == ["view-end"]
    release.set()
    life.wait_torn_down()
    assert life.events == ["view-end", "task-end", "teardown_request"]  # once, after the task
    assert life.teardown == [{"exc": None, "path": "/work", "g": "view-g"}]
    assert seen == [("/work", "view-g", "view")]
    assert all(f.done() for f in futures)


def test_cancelled_queued_tasks_never_run_and_do_not_hold_the_request(serve, executors, gates):
    executor = executors(max_workers=1)
    life = Teardowns()
    app = life.app
    busy = gates()
    blocker = executor.submit(busy.wait)  # outside any request: holds nothing
    ran = []
    queued = []

    @app.route("/queue")
    def queue():
        queued.extend(executor.submit(ran.append, i) for i in range(3))
        return "queued"

    response = serve(app).request("GET", "/queue")
    assert response.status == 200
    settle()
    assert life.count() == 0  # three queued tasks hold the request
    assert [f.cancel() for f in queued] == [True, True, True]
    # Teardown no longer waits, although the worker is still busy.
    life.wait_torn_down()
    assert not blocker.done() and life.count() == 1
    busy.set()
    executor.shutdown(wait=True)
    assert ran == [] and all(f.cancelled() for f in queued)
    assert life.count() == 1


def test_task_exception_in_a_request_goes_to_the_future_not_to_the_log(serve, executors, caplog):
    executor = executors()
    life = Teardowns()
    app = life.app
    caught = []

    def fails():
        raise ValueError("task failed on purpose")

    @app.route("/fail")
    def fail():
        caught.append(executor.submit(fails).exception(timeout=WAIT))
        return "ok"

    with caplog.at_level(logging.ERROR):
        assert serve(app).request("GET", "/fail").status == 200
        life.wait_torn_down()
    assert isinstance(caught[0], ValueError)
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert life.teardown[0]["exc"] is None  # not the view's exception either


JSON_DOC = {"items": list(range(800)), "text": "caf\u00e9 " * 100}
JSON_BODY = json.dumps(JSON_DOC).encode()


def test_task_reads_the_request_body_and_g(serve, executors):
    executor = executors()
    life = Teardowns()
    app = life.app
    counter = count_socket_reads(app)
    outcome = {}

    def task():
        body = request.shared_body()
        loaded_at_start = body.loaded
        return loaded_at_start, hashlib.sha256(request.get_data()).hexdigest(), request.json, g.marker

    @app.route("/upload", methods=["POST"])
    def upload():
        g.marker = "view-g"
        future = executor.submit(task)  # reads while the body still arrives
        outcome["parent"] = request.get_json()
        outcome["task"] = future.result(timeout=WAIT)
        return "ok"

    response = serve(app).request(
        "POST", "/upload", headers={"Content-Type": "application/json"}, body=JSON_BODY,
        piece=len(JSON_BODY) // 6, delay=0.01, timeout=WAIT,
    )
    assert response.status == 200, response.body
    loaded_at_start, digest, doc, marker = outcome["task"]
    assert loaded_at_start is False
    assert digest == hashlib.sha256(JSON_BODY).hexdigest()
    assert doc == JSON_DOC == outcome["parent"] and marker == "view-g"
    assert counter == [len(JSON_BODY)]  # the socket was read once


def test_session_mutation_from_a_task_after_the_response_warns(serve, executors, gates):
    executor = executors()
    app = Flask(__name__)
    app.secret_key = "geventctx-tests"
    GeventContext(app)
    release = gates()
    futures = []

    def task():
        release.wait()
        session["late"] = 1  # LATE-TASK-WRITE

    @app.route("/late")
    def late():
        futures.append(executor.submit(task))
        return "ok"

    with pytest.warns(geventctx.SessionMutationWarning, match="GET /late.*after it was saved") as record:
        response = serve(app).request("GET", "/late")
        assert response.status == 200 and "set-cookie" not in response.headers
        release.set()
        futures[0].result(timeout=WAIT)
    (warning,) = [w for w in record if issubclass(w.category, geventctx.SessionMutationWarning)]
    assert warning.filename == __file__
    with open(__file__, encoding="utf-8") as source:
        assert "LATE-TASK-WRITE" in source.read().splitlines()[warning.lineno - 1]


# -- backpressure: a full executor or pool makes the view wait, in context --------------


def test_full_executor_submit_from_a_view_waits_for_room_and_keeps_its_context(serve, executors, gates):
    executor = executors(max_workers=1, max_pending=1)
    life = Teardowns()
    app = life.app
    release = gates()
    steps = []
    futures = []

    def task(name):
        if name == "first":
            release.wait()
        return name, user.get(), request.path

    @app.route("/fanout")
    def fanout():
        user.set("v1")
        futures.append(executor.submit(task, "first"))  # runs, blocked
        user.set("v2")
        futures.append(executor.submit(task, "second"))  # queued: the queue is now full
        user.set("v3")
        steps.append("third-submit")
        futures.append(executor.submit(task, "third"))  # waits for room
        steps.append("third-submitted")
        user.set("v4")  # after the call: not seen by the third task
        return {"results": [list(f.result(timeout=WAIT)) for f in futures]}

    server = serve(app)
    client = gevent.spawn(server.request, "GET", "/fanout")
    wait_for(lambda: steps == ["third-submit"], WAIT, "the third submit")
    settle()
    assert steps == ["third-submit"]  # still waiting: backpressure
    assert len(registry.live()) == 1  # only the running task is a live hand-off
    release.set()
    response = client.get(timeout=WAIT)
    assert response.status == 200, response.body
    assert response.json()["results"] == [
        ["first", "v1", "/fanout"],
        ["second", "v2", "/fanout"],
        ["third", "v3", "/fanout"],
    ]
    life.wait_torn_down()
    assert life.count() == 1
    assert registry.live() == []


def test_full_pool_spawn_from_a_view_waits_and_keeps_its_context(serve, gates):
    pool = geventctx.Pool(1)
    life = Teardowns()
    app = life.app
    release = gates()
    steps = []

    @app.route("/pool")
    def spawn_in_pool():
        user.set("v1")
        first = pool.spawn(lambda: (release.wait(), user.get())[1])
        user.set("v2")
        steps.append("second-spawn")
        second = pool.spawn(lambda: (user.get(), request.path))  # waits for the slot
        steps.append("second-spawned")
        user.set("v3")
        return {"first": first.get(timeout=WAIT), "second": list(second.get(timeout=WAIT))}

    server = serve(app)
    client = gevent.spawn(server.request, "GET", "/pool")
    wait_for(lambda: steps == ["second-spawn"], WAIT, "the second spawn")
    settle()
    assert steps == ["second-spawn"]  # the pool is full: the view waits
    release.set()
    response = client.get(timeout=WAIT)
    assert response.status == 200, response.body
    assert response.json() == {"first": "v1", "second": ["v2", "/pool"]}
    life.wait_torn_down()
    assert life.count() == 1


# -- helpers ---------------------------------------------------------------------------


def count_socket_reads(app: Flask) -> list[int]:
    """Count the bytes the app takes from the server's wsgi.input (wrap after init_app)."""
    counter = [0]
    inner = app.wsgi_app

    class Counting:
        def __init__(self, stream: t.Any) -> None:
            self.stream = stream

        def read(self, *args: t.Any) -> bytes:
            data = self.stream.read(*args)
            counter[0] += len(data)
            return data

        def readline(self, *args: t.Any) -> bytes:
            data = self.stream.readline(*args)
            counter[0] += len(data)
            return data

    def middleware(environ: dict[str, t.Any], start_response: t.Any) -> t.Any:
        environ["wsgi.input"] = Counting(environ["wsgi.input"])
        return inner(environ, start_response)

    app.wsgi_app = middleware  # type: ignore[method-assign]
    return counter

