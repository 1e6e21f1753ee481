"""G10: every live hand-off is inspectable; the registry keeps nothing alive."""

from __future__ import annotations

import contextvars
import gc
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
    try:
        child = geventctx.spawn(work, release)  # SITE-A
        site_line = test_live_records_describe_each_running_child.__code__.co_firstlineno + 5
    finally:
        Scope.exit(token)
    outside = geventctx.spawn(work, release)
    records = {r.greenlet: r for r in registry.live()}
    assert set(records) == {child, outside}
    rec = records[child]
    assert rec.parent is gevent.getcurrent()
    assert rec.scope is scope
    assert rec.function is work
    assert rec.spawn_site == f"{__file__}:{site_line}"
    assert rec.age >= 0
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


def test_registry_holds_no_strong_reference_to_a_running_child(collect):
    # Neither the registry's index of hand-offs outside a request nor a
    # record made from it refers to the child or its context: they point
    # weakly (gc sees no referrer). The child keeps its record itself.
    release = Event()
    child = geventctx.spawn(work, release)
    record = registry.record_of(child)
    assert record is not None and record.greenlet is child
    assert id(child) in registry._unscoped, "the running child is indexed"
    referrers = gc.get_referrers(child)
    assert not any(r is registry._unscoped or r is registry._live for r in referrers)
    assert not any(r is record for r in referrers)
    del referrers
    release.set()
    child.join()
    del child
    collect()
    assert record.greenlet is None
