"""G8 for Group and Pool: every method carries the caller's context."""

from __future__ import annotations

import contextvars

import gevent
import gevent.pool
import pytest
from gevent.event import Event

import geventctx
from geventctx import Scope, registry

user = contextvars.ContextVar("user", default=None)


def who(_=None):
    return user.get()


def in_context(value, fn):
    def run():
        user.set(value)
        return fn()

    return contextvars.Context().run(run)


POOLS = [geventctx.Group, lambda: geventctx.Pool(2), lambda: geventctx.Pool(1)]
IDS = ["Group", "Pool2", "Pool1"]


def test_gevent_pool_map_loses_context_control():
    # Why the overrides exist: gevent's own pool drops the caller's context.
    assert in_context("alice", lambda: gevent.pool.Pool(2).map(who, range(2))) == [None, None]


@pytest.mark.parametrize("make", POOLS, ids=IDS)
class TestEveryMethod:
    def test_spawn(self, make):
        pool = make()
        assert in_context("alice", lambda: pool.spawn(who).get()) == "alice"

    def test_apply(self, make):
        pool = make()
        assert in_context("alice", lambda: pool.apply(who)) == "alice"

    def test_apply_inside_pool_runs_inline_in_worker_context(self, make):
        pool = make()
        assert in_context("alice", lambda: pool.spawn(lambda: pool.apply(who)).get()) == "alice"

    def test_apply_async_with_callback(self, make):
        pool = make()
        seen = []
        result = in_context(
            "alice", lambda: pool.apply_async(who, callback=lambda v: seen.append((v, user.get()))).get()
        )
        pool.join()
        gevent.sleep(0.01)
        assert result == "alice"
        assert seen == [("alice", "alice")]

    def test_apply_async_when_full(self, make):
        pool = make()
        release = Event()

        def body():
            blockers = [pool.spawn(release.wait) for _ in range(getattr(pool, "size", None) or 0)]
            task = pool.apply_async(who)
            release.set()
            gevent.joinall(blockers)
            return task.get()

        assert in_context("alice", body) == "alice"

    def test_apply_cb(self, make):
        pool = make()
        seen = []
        assert in_context("alice", lambda: pool.apply_cb(who, callback=lambda v: seen.append(user.get()))) == "alice"
        gevent.sleep(0.01)
        assert seen == ["alice"]

    def test_map(self, make):
        pool = make()
        assert in_context("alice", lambda: pool.map(who, range(4))) == ["alice"] * 4

    def test_map_async_and_callback(self, make):
        pool = make()
        seen = []
        result = in_context(
            "alice", lambda: pool.map_async(who, range(3), callback=lambda r: seen.append(user.get())).get()
        )
        assert result == ["alice"] * 3
        assert seen == ["alice"]

    def test_map_cb(self, make):
        pool = make()
        seen = []
        assert in_context("alice", lambda: pool.map_cb(who, range(2), callback=lambda r: seen.append(user.get()))) == [
            "alice",
            "alice",
        ]
        assert seen == ["alice"]

    def test_imap(self, make):
        pool = make()
        assert in_context("alice", lambda: list(pool.imap(who, range(4)))) == ["alice"] * 4

    def test_imap_maxsize(self, make):
        pool = make()
        assert in_context("alice", lambda: list(pool.imap(who, range(4), maxsize=1))) == ["alice"] * 4

    def test_imap_unordered(self, make):
        pool = make()
        assert in_context("alice", lambda: list(pool.imap_unordered(who, range(4)))) == ["alice"] * 4

    def test_workers_are_isolated_from_caller(self, make):
        pool = make()

        def writer(i):
            user.set(f"worker{i}")
            return user.get()

        def body():
            out = pool.map(writer, range(3))
            return out, user.get()

        assert in_context("alice", body) == (["worker0", "worker1", "worker2"], "alice")


def test_map_holds_the_request_scope_until_every_worker_finished():
    scope = Scope("GET /map")
    token = scope.enter()
    closed = []
    scope.on_close(closed.append, "teardown")
    release = Event()
    pool = geventctx.Pool(2)
    try:
        it = pool.imap(lambda i: (release.wait(), i)[1], range(5))
    finally:
        Scope.exit(token)
    scope.finish()
    gevent.sleep(0.01)
    assert closed == [] and scope.holders > 1
    release.set()
    assert list(it) == [0, 1, 2, 3, 4]
    assert scope.wait_closed(timeout=5)
    assert closed == ["teardown"]


def test_map_workers_report_the_map_call_as_spawn_site():
    release = Event()
    pool = geventctx.Pool(3)
    it = pool.imap(lambda i: release.wait(), range(3))
    line = test_map_workers_report_the_map_call_as_spawn_site.__code__.co_firstlineno + 3
    gevent.sleep(0.01)
    sites = {r.spawn_site for r in registry.live()}
    assert sites == {f"{__file__}:{line}"}
    release.set()
    list(it)


def test_full_pool_spawn_waits_and_keeps_context():
    pool = geventctx.Pool(1)
    release = Event()

    def body():
        first = pool.spawn(release.wait)
        gevent.spawn_later(0.01, release.set)
        user.set("at-spawn")
        second = pool.spawn(who)  # blocks until `first` is done
        assert first.ready()
        return second.get()

    assert in_context("alice", body) == "at-spawn"


def test_full_pool_with_timeout_raises_and_pins_nothing():
    scope = Scope("GET /full")
    token = scope.enter()
    pool = geventctx.Pool(1)
    release = Event()
    try:
        first = pool.spawn(release.wait)
        with pytest.raises(gevent.pool.PoolFull):
            pool.start(geventctx.Greenlet(who), blocking=False)
        assert scope.holders == 2  # only `first`
    finally:
        Scope.exit(token)
        release.set()
        first.join()
    scope.finish()


class Boom(Exception):
    """What a task raises on purpose."""


def fail():
    raise Boom("task failed on purpose")


@pytest.mark.parametrize(
    "make, full",
    [
        (lambda: gevent.pool.Pool(1), False),  # the promise: gevent's own
        (lambda: gevent.pool.Pool(1), True),
        (lambda: geventctx.Pool(1), False),
        (lambda: geventctx.Pool(1), True),
        (geventctx.Group, False),
    ],
    ids=["gevent-Pool-free", "gevent-Pool-full", "Pool-free", "Pool-full", "Group"],
)
def test_apply_async_of_a_failing_task_never_calls_its_callback_like_gevents(make, full):
    pool = make()
    called = []
    release = Event()
    scope = Scope("GET /apply")
    token = scope.enter()
    try:
        blockers = [pool.spawn(release.wait)] if full else []
        task = pool.apply_async(fail, callback=called.append)
    finally:
        Scope.exit(token)
    release.set()
    with pytest.raises(Boom):
        task.get(timeout=5)
    gevent.joinall(blockers, timeout=5)
    assert pool.join(timeout=5)
    scope.finish()
    # Every hand-off of the call (the task, a callback made for it) ended:
    # a callback that was going to run has run.
    assert scope.wait_closed(5)
    assert called == []
