"""G10: every live hand-off is inspectable; the registry keeps nothing alive."""

from __future__ import annotations

import contextvars
import gc
import time
import types
import weakref

import gevent
from gevent.event import Event

import geventctx
from geventctx import Scope, registry

payload = contextvars.ContextVar("payload", default=None)


class Payload:
    pass


def work(release):
    release.wait()


def test_live_records_describe_each_running_child():
    scope = Scope("GET /records")
    token = scope.enter()
    release = Event()
    started_from = time.monotonic()
    try:
        child = geventctx.spawn(work, release)  # SITE-A
        site_line = test_live_records_describe_each_running_child.__code__.co_firstlineno + 6
    finally:
        Scope.exit(token)
    outside = geventctx.spawn(work, release)
    spawned_by = time.monotonic()
    records = {r.greenlet: r for r in registry.live()}
    assert set(records) == {child, outside}
    rec = records[child]
    assert rec.parent is gevent.getcurrent()
    assert rec.scope is scope
    assert rec.function is work
    assert rec.spawn_site == f"{__file__}:{site_line}"
    # The start time is the spawn's, on the clock age counts on.
    assert started_from <= rec.started_at <= spawned_by
    before = time.monotonic()
    age = rec.age
    assert before - rec.started_at <= age <= time.monotonic() - rec.started_at
    assert registry.record_of(child) == rec
    assert registry.for_scope(scope) == [rec]
    assert records[outside].scope is None
    assert "GET /records" in registry.dump() and "work" in registry.dump()
    release.set()
    gevent.joinall([child, outside])
    gevent.sleep(0)
    assert registry.live() == []
    assert registry.record_of(child) is None
    assert registry.dump() == "geventctx: no live hand-offs"
    scope.finish()


def test_finished_child_and_its_context_are_collectable(collect):
    def body():
        obj = Payload()
        payload.set(obj)
        child = geventctx.spawn(payload.get)
        child.join()
        return weakref.ref(child), weakref.ref(obj)

    child_ref, obj_ref = contextvars.Context().run(body)
    collect()
    assert child_ref() is None
    assert obj_ref() is None


def strongly_reaches(roots, target) -> bool:
    """True if ``target`` is reachable from ``roots`` through strong
    references: containers, closures and defaults of functions, bound
    methods, objects' slots — not through weak references, modules, classes
    or a function's globals (those reach everything)."""
    stack, seen = list(roots), set()
    while stack:
        obj = stack.pop()
        if obj is target:
            return True
        if id(obj) in seen or isinstance(obj, (types.ModuleType, type, weakref.ref)):
            continue
        seen.add(id(obj))
        if isinstance(obj, types.FunctionType):
            stack += list(obj.__closure__ or ()) + list(obj.__defaults__ or ())
            stack += list((obj.__kwdefaults__ or {}).values())
        else:
            stack += gc.get_referents(obj)
    return False


def closure_over(obj):
    return lambda: obj


def test_registry_holds_no_strong_reference_to_a_running_child(collect):
    # Neither the registry's index of hand-offs outside a request nor a
    # record made from it refers to the child or its context: they point
    # weakly, directly or through anything (a closure, a tuple, a bound
    # method). The child keeps its record itself.
    release = Event()
    child = geventctx.spawn(work, release)
    record = registry.record_of(child)
    assert record is not None and record.greenlet is child
    assert id(child) in registry._unscoped, "the running child is indexed"
    try:
        roots = [registry._unscoped, registry._live, record, registry.live()]
        assert not strongly_reaches(roots, child)
        assert not strongly_reaches(roots, child.gr_context)
        assert strongly_reaches([closure_over(child)], child)  # the walk does see through one
    finally:
        release.set()
        child.join()
    del child
    collect()
    assert record.greenlet is None


def test_live_lists_hand_offs_oldest_first_across_requests_and_none():
    # live() gathers the scopes' own indexes and the index of hand-offs
    # outside a request (in that order): its promise is the start order.
    release = Event()
    first = geventctx.spawn(work, release)  # outside any request
    tick = time.monotonic()
    while time.monotonic() == tick:
        pass  # the next start time differs
    scope = Scope("GET /order")
    token = scope.enter()
    try:
        second = geventctx.spawn(work, release)  # in the request
    finally:
        Scope.exit(token)
    tick = time.monotonic()
    while time.monotonic() == tick:
        pass
    third = geventctx.spawn(work, release)
    try:
        assert [r.greenlet for r in registry.live()] == [first, second, third]
    finally:
        release.set()
        gevent.joinall([first, second, third])
        scope.finish()
