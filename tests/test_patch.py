"""G9: patch() makes every gevent greenlet inherit its spawner's context."""

from __future__ import annotations

import contextvars
import threading

import gevent
import gevent.pool
import pytest

import geventctx
from geventctx import Scope

user = contextvars.ContextVar("user", default=None)


@pytest.fixture
def patched():
    geventctx.patch()
    yield
    geventctx.unpatch()


def in_context(value, fn):
    def run():
        user.set(value)
        return fn()

    return contextvars.Context().run(run)


def test_unpatched_plain_spawn_sees_nothing():
    assert not geventctx.is_patched()
    assert in_context("alice", lambda: gevent.spawn(user.get).get()) is None


def test_patched_plain_spawn_inherits(patched):
    assert geventctx.is_patched()
    assert in_context("alice", lambda: gevent.spawn(user.get).get()) == "alice"
    assert in_context("bob", lambda: gevent.spawn_later(0, user.get).get()) == "bob"


def test_patched_gevent_pool_map_inherits(patched):
    assert in_context("alice", lambda: gevent.pool.Pool(2).map(lambda _: user.get(), range(3))) == ["alice"] * 3


def test_patched_child_writes_stay_in_child(patched):
    def body():
        def child():
            user.set("child")

        gevent.spawn(child).join()
        return user.get()

    assert in_context("alice", body) == "alice"


def test_explicit_context_is_kept(patched):
    own = contextvars.Context()
    own.run(user.set, "own")

    def body():
        g = gevent.Greenlet(user.get)
        g.gr_context = own
        g.start()
        return g.get()

    assert in_context("alice", body) == "own"


def test_patch_is_visibility_only_it_does_not_pin_the_scope(patched):
    scope = Scope("GET /patched")
    token = scope.enter()
    try:
        g = gevent.spawn(gevent.sleep, 0.01)
        assert scope.holders == 1
    finally:
        Scope.exit(token)
    g.join()
    scope.finish()
    assert scope.closed


def test_idempotent_and_unpatch_restores():
    geventctx.patch()
    geventctx.patch()
    geventctx.unpatch()
    assert not geventctx.is_patched()
    assert in_context("alice", lambda: gevent.spawn(user.get).get()) is None
    geventctx.unpatch()  # harmless when not patched


def test_patch_from_many_threads_at_once():
    start = threading.Barrier(8)

    def racer():
        start.wait()
        geventctx.patch()

    threads = [threading.Thread(target=racer) for _ in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert geventctx.is_patched()
    geventctx.unpatch()  # one unpatch undoes it: the callback was added once
    assert in_context("alice", lambda: gevent.spawn(user.get).get()) is None
