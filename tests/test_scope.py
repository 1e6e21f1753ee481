"""The request scope: children hold it, the last one out closes it once."""

from __future__ import annotations

import gevent
import pytest
from gevent.event import Event

import geventctx
from geventctx import Scope, current_scope


@pytest.fixture
def scope():
    s = Scope("GET /test")
    token = s.enter()
    yield s
    Scope.exit(token)
    s.finish()  # the request ends with the test (the leak check wants it closed)


def test_current_scope_is_none_outside_and_inherited_inside(scope):
    assert gevent.spawn(current_scope).get() is None  # plain spawn: empty context
    assert geventctx.spawn(current_scope).get() is scope


def test_close_waits_for_every_child(scope):
    closed = []
    scope.on_close(closed.append, "teardown")
    release = Event()
    children = [geventctx.spawn(release.wait) for _ in range(3)]
    assert scope.holders == 4
    scope.finish()  # the request is done; children still run
    gevent.sleep(0.01)
    assert closed == [] and not scope.closed
    release.set()
    gevent.joinall(children)
    assert scope.wait_closed(timeout=5)
    assert closed == ["teardown"]


def test_close_runs_once_after_finish_when_children_done_first(scope):
    closed = []
    scope.on_close(closed.append, 1)
    geventctx.spawn(lambda: None).join()
    gevent.sleep(0)
    assert closed == []  # the request itself still holds it
    scope.finish()
    scope.finish()  # idempotent
    assert closed == [1]
    assert scope.holders == 0


@pytest.mark.parametrize("ending", ["return", "raise", "kill", "kill_before_start"])
def test_every_ending_releases_exactly_once(scope, ending):
    closed = []
    scope.on_close(closed.append, ending)
    started = Event()

    def work():
        started.set()
        if ending == "raise":
            raise KeyError("child failed")
        gevent.sleep(0 if ending == "return" else 10)

    child = geventctx.spawn(work)
    if ending == "kill_before_start":
        child.kill()
        assert not started.is_set()
    elif ending == "kill":
        started.wait()
        child.kill()
    else:
        child.join()
    gevent.sleep(0)
    assert scope.holders == 1
    scope.finish()
    assert closed == [ending]
    assert scope.holders == 0


def test_release_more_than_acquired_is_an_error():
    s = Scope()
    s.finish()
    with pytest.raises(RuntimeError, match="released more often"):
        s.release()


def test_handoff_from_closed_scope_warns_and_does_not_pin(scope):
    scope.finish()
    assert scope.closed
    with pytest.warns(geventctx.LateEffectWarning, match="already ended"):
        child = geventctx.spawn(current_scope)
    assert child.get() is scope
    assert scope.holders == 0


def test_close_callbacks_run_outside_the_hub(scope):
    # The last release happens in a link callback in the hub; callbacks that
    # block (closing a database session) must still be allowed to.
    seen = []

    def blocking_teardown():
        gevent.sleep(0.001)
        seen.append("done")

    scope.on_close(blocking_teardown)
    child = geventctx.spawn(gevent.sleep, 0.01)
    scope.finish()
    child.join()
    assert scope.wait_closed(timeout=5)
    assert seen == ["done"]


def test_failing_close_callback_run_by_finish_raises_there_after_the_others_ran(scope, caplog):
    # Inside the request's own finish() (teardown as the framework would run
    # it) a step's error reaches the request, once every step ran.
    seen = []
    scope.on_close(lambda: 1 / 0)
    scope.on_close(seen.append, "second")
    with pytest.raises(ZeroDivisionError):
        scope.finish()
    assert seen == ["second"] and scope.done
    assert "close callback" not in caplog.text


def test_failing_close_callback_run_after_the_last_child_is_logged_and_others_still_run(scope, caplog):
    seen = []
    scope.on_close(lambda: 1 / 0)
    scope.on_close(seen.append, "second")
    token = scope.enter()
    try:
        child = geventctx.spawn(gevent.sleep, 0.01)
    finally:
        Scope.exit(token)
    scope.finish()  # the child holds the scope: the steps run at its end
    child.join()
    assert scope.wait_closed(timeout=5)
    assert seen == ["second"]
    assert "close callback" in caplog.text and "ZeroDivisionError" in caplog.text


def test_each_close_step_runs_once_even_after_one_raised_a_base_exception():
    # G4: a deferred step interrupted by a gevent.Timeout (not an Exception)
    # must not cost the steps after it (the body's release comes last).
    scope = Scope("GET /steps")
    ran = []

    def interrupted() -> None:
        ran.append("first")
        raise gevent.Timeout()

    scope.defer(interrupted)
    scope.defer(ran.append, "second")
    with pytest.raises(gevent.Timeout):
        scope.finish()
    assert ran == ["first", "second"]
    assert scope.done
