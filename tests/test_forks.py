"""Per-child state (geventctx.forks): what a hand-off forks instead of sharing.

A context variable holding a shared mutable object (as Sentry keeps its
scopes) is the same object in every child of a snapshot: a registered fork
gives each child its own copy, before the child starts, for every hand-off
kind and for plain greenlets under patch().
"""

from __future__ import annotations

import contextvars
import logging
import typing as t

import gevent
import pytest

import geventctx
from geventctx import forks

tags: contextvars.ContextVar[dict[str, str]] = contextvars.ContextVar("test_forks.tags")


def fork_tags() -> None:
    tags.set(dict(tags.get()))


@pytest.fixture
def forked() -> t.Iterator[None]:
    forks.register(fork_tags)
    yield
    forks.unregister(fork_tags)


def tag(name: str) -> dict[str, str]:
    mine = tags.get()
    mine[name] = "set"
    return dict(mine)


def hand_off_two(kind: str) -> list[dict[str, str]]:
    """Two children of one parent each set a tag: what each saw, then the parent."""
    if kind == "spawn":
        children = [geventctx.spawn(tag, n) for n in ("a", "b")]
        seen = [c.get() for c in children]
    elif kind == "pool":
        seen = geventctx.Pool(2).map(tag, ["a", "b"])
    elif kind == "executor":
        with geventctx.Executor() as executor:
            seen = [executor.submit(tag, n).result() for n in ("a", "b")]
    elif kind == "threadpool":
        pool = geventctx.ThreadPool(2)
        try:
            seen = [pool.spawn(tag, n).get() for n in ("a", "b")]
        finally:
            pool.kill()
    elif kind == "patch":
        geventctx.patch()
        try:
            seen = [gevent.spawn(tag, n).get() for n in ("a", "b")]
        finally:
            geventctx.unpatch()
    else:
        raise AssertionError(kind)
    return [*seen, dict(tags.get())]


KINDS = ["spawn", "pool", "executor", "threadpool", "patch"]


@pytest.mark.parametrize("kind", KINDS)
def test_a_registered_fork_gives_each_child_its_own_copy(forked, kind):
    def parent() -> list[dict[str, str]]:
        tags.set({"request": "r1"})
        return hand_off_two(kind)

    a, b, after = contextvars.Context().run(parent)
    assert a == {"request": "r1", "a": "set"}
    assert b == {"request": "r1", "b": "set"}  # not a's tag
    assert after == {"request": "r1"}  # the parent's own object is untouched


@pytest.mark.parametrize("kind", ["spawn", "threadpool"])
def test_without_a_fork_the_shared_object_bleeds(kind):
    # The control: what the fork prevents (so the test above can fail).
    def parent() -> list[dict[str, str]]:
        tags.set({"request": "r1"})
        return hand_off_two(kind)

    _a, b, after = contextvars.Context().run(parent)
    assert b == {"request": "r1", "a": "set", "b": "set"}
    assert after == b


def hand_off_one(kind: str, function: t.Callable[[], t.Any]) -> t.Any:
    """``function()``'s result, run as one child of the given kind."""
    if kind == "spawn":
        return geventctx.spawn(function).get()
    if kind == "pool":
        return geventctx.Pool(1).map(lambda _: function(), [0])[0]
    if kind == "executor":
        with geventctx.Executor() as executor:
            return executor.submit(function).result()
    if kind == "threadpool":
        pool = geventctx.ThreadPool(1)
        try:
            return pool.spawn(function).get()
        finally:
            pool.kill()
    geventctx.patch()
    try:
        return gevent.spawn(function).get()
    finally:
        geventctx.unpatch()


@pytest.mark.parametrize("kind", KINDS)
def test_a_fork_runs_in_the_childs_snapshot_before_it_starts(kind):
    # It runs in the spawner (before the child's first line), in the child's
    # Context: what it sets is the child's, never the parent's.
    ran_in: list[t.Any] = []

    def record() -> None:
        ran_in.append(gevent.getcurrent())
        tags.set({**tags.get(), "forked": "yes"})

    forks.register(record)
    try:

        def parent() -> tuple[dict[str, str], dict[str, str], t.Any]:
            tags.set({})
            seen = hand_off_one(kind, lambda: dict(tags.get()))
            return seen, dict(tags.get()), gevent.getcurrent()

        seen, after, spawner = contextvars.Context().run(parent)
    finally:
        forks.unregister(record)
    assert seen == {"forked": "yes"}
    assert after == {}
    assert ran_in[0] is spawner  # (Pool.map's workers fork again in its helper)


def test_a_failing_fork_is_logged_and_the_child_starts(caplog):
    def broken() -> None:
        raise RuntimeError("fork broke")

    forks.register(broken)
    try:
        with caplog.at_level(logging.ERROR, logger="geventctx"):
            assert geventctx.spawn(lambda: 42).get() == 42
    finally:
        forks.unregister(broken)
    assert any("fork broke" in (r.exc_text or str(r.exc_info)) for r in caplog.records)


def test_a_failing_fork_does_not_keep_the_later_forks_from_running(caplog):
    def broken() -> None:
        raise RuntimeError("fork broke")

    forks.register(broken)
    forks.register(fork_tags)
    try:

        def parent() -> tuple[dict[str, str], dict[str, str]]:
            tags.set({})
            return geventctx.spawn(tag, "child").get(), dict(tags.get())

        with caplog.at_level(logging.ERROR, logger="geventctx"):
            seen, after = contextvars.Context().run(parent)
    finally:
        forks.unregister(broken)
        forks.unregister(fork_tags)
    assert seen == {"child": "set"} and after == {}  # fork_tags ran after the broken one


def test_register_is_idempotent_and_unregister_stops_it():
    calls: list[int] = []

    def count() -> None:
        calls.append(1)

    forks.register(count)
    forks.register(count)
    try:
        assert forks.registered().count(count) == 1
        geventctx.spawn(lambda: None).join()
        assert calls == [1]
    finally:
        forks.unregister(count)
    geventctx.spawn(lambda: None).join()
    assert calls == [1] and count not in forks.registered()
