"""G1/G2 and the hand-off mechanics of geventctx.spawn and friends."""

from __future__ import annotations

import contextvars
import inspect

import gevent
import pytest
from gevent.event import Event

import geventctx

user = contextvars.ContextVar("user", default=None)
trace = contextvars.ContextVar("trace", default=None)


def _line_of(marker: str) -> int:
    src, start = inspect.getsourcelines(inspect.currentframe().f_back.f_code)  # type: ignore[union-attr]
    for offset, line in enumerate(src):
        if marker in line:
            return start + offset
    raise AssertionError(marker)


def in_fresh_context(fn, *args):
    return contextvars.Context().run(fn, *args)


def test_plain_gevent_spawn_loses_context_control():
    # The problem geventctx exists for: without it a child sees nothing.
    def body():
        user.set("alice")
        return gevent.spawn(user.get).get()

    assert in_fresh_context(body) is None


def test_child_sees_every_contextvar_of_spawner():
    def body():
        user.set("alice")
        trace.set("span-1")
        return geventctx.spawn(lambda: (user.get(), trace.get())).get()

    assert in_fresh_context(body) == ("alice", "span-1")


def test_snapshot_is_taken_at_spawn_not_at_run():
    def body():
        user.set("before")
        child = geventctx.spawn(user.get)
        user.set("after")  # the child has not run yet
        return child.get()

    assert in_fresh_context(body) == "before"


def test_child_writes_never_reach_parent_or_siblings():
    def body():
        user.set("parent")
        go = Event()

        def writer():
            user.set("writer")
            go.wait()
            return user.get()

        def reader():
            go.wait()
            return user.get()

        w = geventctx.spawn(writer)
        r = geventctx.spawn(reader)
        gevent.sleep(0)
        go.set()
        return w.get(), r.get(), user.get()

    assert in_fresh_context(body) == ("writer", "parent", "parent")


def test_grandchild_sees_child_context_at_its_spawn():
    def body():
        user.set("parent")

        def child():
            user.set("child")
            return geventctx.spawn(user.get).get()

        return geventctx.spawn(child).get()

    assert in_fresh_context(body) == "child"


def test_spawn_later_snapshots_at_call_and_runs_later():
    def body():
        user.set("at-call")
        child = geventctx.spawn_later(0.01, user.get)
        user.set("changed")
        assert not child.ready()
        return child.get(timeout=5)

    assert in_fresh_context(body) == "at-call"


def test_args_kwargs_and_errors_behave_as_gevent():
    child = geventctx.spawn(lambda a, b=0: a + b, 1, b=2)
    assert child.get() == 3
    assert isinstance(child, gevent.Greenlet)

    def boom():
        raise ValueError("bad")

    failing = geventctx.spawn(boom)
    failing.join()
    assert isinstance(failing.exception, ValueError)
    with pytest.raises(ValueError, match="bad"):
        failing.get()


def test_greenlet_class_captures_at_start():
    def body():
        user.set("created")
        child = geventctx.Greenlet(user.get)
        user.set("started")
        child.start()
        via_classmethod = geventctx.Greenlet.spawn(user.get)
        return child.get(), via_classmethod.get()

    assert in_fresh_context(body) == ("started", "started")


def test_starting_twice_attaches_once():
    scope = geventctx.Scope("GET /")
    token = scope.enter()
    try:
        child = geventctx.Greenlet(gevent.sleep, 0.01)
        child.start()
        child.start()
        assert scope.holders == 2
    finally:
        geventctx.Scope.exit(token)
    child.join()
    gevent.sleep(0)
    assert scope.holders == 1


def test_greenlet_start_later_hands_off_context_scope_and_record():
    # G1 for Greenlet(fn).start_later(s): the snapshot is taken at the call,
    # the child holds the request until it ends, and it is listed meanwhile.
    scope = geventctx.Scope("GET /later")
    release = Event()

    def fn():
        release.wait(5)
        return user.get(), geventctx.current_scope()

    def body():
        user.set("at-start_later")
        token = scope.enter()
        try:
            child = geventctx.Greenlet(fn)
            child.start_later(0.01)
            user.set("changed")
        finally:
            geventctx.Scope.exit(token)
        return child

    child = in_fresh_context(body)
    try:
        record = geventctx.registry.record_of(child)
        assert record is not None and record.scope is scope and record.function is fn
        assert geventctx.registry.for_scope(scope) == [record]
        assert scope.holders == 2
        scope.finish()
        assert not scope.closed  # the delayed child holds the request
    finally:
        release.set()
        scope.finish()  # (once: it is idempotent)
    assert child.get(timeout=5) == ("at-start_later", scope)
    assert scope.wait_closed(5)
    assert geventctx.registry.record_of(child) is None
