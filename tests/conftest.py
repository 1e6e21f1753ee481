"""Suite-wide fixtures: every test must leave nothing running behind.

The autouse leak check fails a test that leaves, once it has let things end
for a bounded moment: a live hand-off in the registry, ``patch()`` switched
on, a request scope that never finished (its teardown never ran), or a
started greenlet of this thread's hub that is still running (a stuck
handler, a body reader, a teardown runner, a plain ``gevent.spawn``).
"""

from __future__ import annotations

import functools
import gc
import typing as t
import weakref

import gevent
import pytest
from greenlet import greenlet

import geventctx
from geventctx import registry

#: How long the check lets children, scopes and greenlets end by themselves.
GRACE_SECONDS = 1.0

#: Greenlets alive after the previous test's check (normally none: the check
#: kills what a test leaves). Keeping this instead of scanning before every
#: test halves the cost of the greenlet check.
_survivors: weakref.WeakSet[greenlet] = weakref.WeakSet()


def live_greenlets() -> list[greenlet]:
    """Started, unfinished greenlets of this thread's hub, gevent's and raw ones.

    Every greenlet of the hub has the hub as its parent, so asking the
    collector who refers to the hub finds them all without building a list
    of the whole heap (about 6 ms for this suite's heap).
    """
    hub = gevent.get_hub()
    return [
        g
        for g in gc.get_referrers(hub)
        if isinstance(g, greenlet) and g is not hub and g.parent is hub and g
    ]


@pytest.fixture(autouse=True)
def no_leaked_handoffs() -> t.Iterator[None]:
    """Fail a test that leaves hand-offs, patch(), open scopes or greenlets behind."""
    was_patched = geventctx.is_patched()
    scopes_before = weakref.WeakSet(geventctx.Scope.all_open())
    yield

    def new_scopes() -> list[geventctx.Scope]:
        return [s for s in geventctx.Scope.all_open() if s not in scopes_before]

    def new_greenlets() -> list[greenlet]:
        return [g for g in live_greenlets() if g not in _survivors]

    loop = gevent.get_hub().loop
    deadline = loop.now() + GRACE_SECONDS
    gevent.sleep(0)  # raw greenlets only count as started once they ran
    stray = new_greenlets()
    while (registry.live() or new_scopes() or stray) and loop.now() < deadline:
        gevent.sleep(0.01)
        stray = new_greenlets()
    leaked = registry.live()
    scopes = new_scopes()
    patched = geventctx.is_patched() and not was_patched
    if patched:
        geventctx.unpatch()
    # Do not let one test's leak break the next test.
    for record in leaked:
        child = record.greenlet
        if child is not None:
            child.kill(block=True, timeout=1)
    stray_report = [repr(g) for g in stray]
    if stray:
        for g in stray:
            gevent.kill(g)  # gevent's and raw greenlets alike, thrown from the hub
        deadline = loop.now() + GRACE_SECONDS
        while any(stray) and loop.now() < deadline:
            gevent.sleep(0.01)
        _survivors.update(live_greenlets())  # the unkillable: report them once
    problems = []
    if leaked:
        problems.append("test leaked hand-offs:\n" + "\n".join(map(repr, leaked)))
    if patched:
        problems.append("test left geventctx.patch() on")
    if scopes:
        problems.append("test left request scopes that never finished:\n" + "\n".join(map(repr, scopes)))
    if stray:
        problems.append("test left greenlets running:\n" + "\n".join(stray_report))
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


@pytest.fixture
def collect() -> t.Callable[[], None]:
    """Run the hub until idle callbacks fired, then collect garbage."""

    def run() -> None:
        gevent.sleep(0)
        gevent.sleep(0)
        gc.collect()

    return run


@pytest.fixture
def serve(gevent_server: t.Callable[..., t.Any]) -> t.Callable[..., t.Any]:
    """``serve(app)``: geventctx's own ``gevent_server`` fixture (a real
    gevent.pywsgi server on 127.0.0.1, stopped after the test), plus
    ``server.request(...)``, the raw-socket client of httpkit."""
    from httpkit import request

    def start(app: t.Any, **kwargs: t.Any) -> t.Any:
        server = gevent_server(app, **kwargs)
        server.request = functools.partial(request, server.port)
        return server

    return start


@pytest.fixture
def gates() -> t.Iterator[t.Callable[[], t.Any]]:
    """``gates()`` makes a gevent Event the test opens; every one is opened at
    the end, so that no child is left waiting on it."""
    from gevent.event import Event

    made: list[Event] = []

    def make() -> Event:
        event = Event()
        made.append(event)
        return event

    yield make
    for event in made:
        event.set()
