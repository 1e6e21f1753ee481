"""P1 and P2: the cost of one spawn+join, in one Flask request context.

Every variant runs the same trivial child (it reads a context variable with a
default) ``n`` times per batch. Rounds are interleaved: round ``i`` runs one
batch of every variant, in an order rotated by ``i``, so drift (CPU frequency,
other load) hits all variants alike. A variant's figure is the median over
rounds of its per-round mean. Garbage is collected and the hub drained before
every batch, outside the timed loop.
"""

from __future__ import annotations

import gc
import statistics
import typing as t
from contextvars import ContextVar, copy_context
from time import perf_counter_ns

import flask
import gevent
import gevent.threadpool
from common import Row

import geventctx
from geventctx import _flask_compat
from geventctx.flask import GeventContext

_cv_app = _flask_compat._cv_app

TITLE = "spawn+join inside a Flask request (P1, P2)"

#: (rounds, spawns per batch), after one discarded warm-up round.
SIZES = {False: (51, 4000), True: (7, 500)}

_VAR: ContextVar[str] = ContextVar("bench.request_id")
_SPAN: ContextVar[str] = ContextVar("bench.span")

Batch = t.Callable[[int], int]


def _child() -> str:
    """The child's work: read a context variable (default when unset)."""
    return _VAR.get("-")


def bare(n: int) -> int:
    """``gevent.spawn(f).join()``: the baseline (child context is empty)."""
    spawn, f = gevent.spawn, _child
    start = perf_counter_ns()
    for _ in range(n):
        spawn(f).join()
    return perf_counter_ns() - start


def raw_context(n: int) -> int:
    """A plain Greenlet given ``copy_context()`` as ``gr_context`` by hand."""
    greenlet, copy, f = gevent.Greenlet, copy_context, _child
    start = perf_counter_ns()
    for _ in range(n):
        g = greenlet(f)
        g.gr_context = copy()
        g.start()
        g.join()
    return perf_counter_ns() - start


def flask_copy(n: int) -> int:
    """Flask's recipe: ``gevent.spawn(copy_current_request_context(f))``."""
    spawn, wrap, f = gevent.spawn, flask.copy_current_request_context, _child
    start = perf_counter_ns()
    for _ in range(n):
        spawn(wrap(f)).join()
    return perf_counter_ns() - start


def _spawn_join(n: int) -> int:
    spawn, f = geventctx.spawn, _child
    start = perf_counter_ns()
    for _ in range(n):
        spawn(f).join()
    return perf_counter_ns() - start


def geventctx_no_scope(n: int) -> int:
    """``geventctx.spawn(f).join()`` with the request scope hidden."""
    token = geventctx.scope._SCOPE.set(None)
    try:
        return _spawn_join(n)
    finally:
        geventctx.scope._SCOPE.reset(token)


def geventctx_in_scope(n: int) -> int:
    """``geventctx.spawn(f).join()`` in the request GeventContext manages,
    the hand-off alone: Flask's app context hidden, so no child gets one of
    its own (that is the next two rows)."""
    token = _cv_app.set(None)
    try:
        return _app_context_spawn_join(n)
    finally:
        _cv_app.reset(token)


def _app_context_spawn_join(n: int) -> int:
    scope = geventctx.current_scope()
    assert scope is not None and scope.holders == 1, scope
    elapsed = _spawn_join(n)
    assert scope.holders == 1, scope  # every child released the scope
    return elapsed


def own_app_context(n: int) -> int:
    """The same, each child in an app context of its own (G3); the app has
    no teardown function, so none runs at the child's end."""
    return _app_context_spawn_join(n)


def own_app_context_torn_down(n: int) -> int:
    """The same, with one ``teardown_appcontext`` function (as
    Flask-SQLAlchemy registers): each child's context is torn down at its end."""
    app = flask.current_app._get_current_object()
    app.teardown_appcontext_funcs.append(_teardown)
    try:
        return _app_context_spawn_join(n)
    finally:
        app.teardown_appcontext_funcs.remove(_teardown)


def _teardown(exc: BaseException | None) -> None:
    """A teardown function that does as little as Flask-SQLAlchemy's when
    the child used no session."""


def patched_bare(n: int) -> int:
    """``gevent.spawn(f).join()`` under ``geventctx.patch()``, patch's own
    cost: Flask's app context hidden, as in P1's hand-off row (each child's
    own app context, G3, is the next row's)."""
    token = _cv_app.set(None)
    try:
        return _patched(n)
    finally:
        _cv_app.reset(token)


def patched_own_app_context(n: int) -> int:
    """The same with the request's app context: each plain child gets one of its own."""
    return _patched(n)


def _patched(n: int) -> int:
    geventctx.patch()
    try:
        return bare(n)
    finally:
        geventctx.unpatch()


_EXECUTOR = geventctx.Executor()
_THREADS = geventctx.ThreadPool(1)
_PLAIN_THREADS = gevent.threadpool.ThreadPool(1)


def executor(n: int) -> int:
    """``geventctx.Executor().submit(f).result()`` in the request."""
    submit, f = _EXECUTOR.submit, _child
    start = perf_counter_ns()
    for _ in range(n):
        submit(f).result()
    return perf_counter_ns() - start


def plain_threadpool(n: int) -> int:
    """``gevent.threadpool.ThreadPool(1).spawn(f).get()``: a native thread."""
    spawn, f = _PLAIN_THREADS.spawn, _child
    start = perf_counter_ns()
    for _ in range(n):
        spawn(f).get()
    return perf_counter_ns() - start


def context_threadpool(n: int) -> int:
    """``geventctx.ThreadPool(1).spawn(f).get()`` in the request."""
    spawn, f = _THREADS.spawn, _child
    start = perf_counter_ns()
    for _ in range(n):
        spawn(f).get()
    return perf_counter_ns() - start


#: P1's fair floor: what a hand-off must do at the least (a greenlet given
#: the spawner's context), running the same child.
FLOOR = "Greenlet + gr_context=copy_context()"

VARIANTS: dict[str, Batch] = {
    "gevent.spawn (bare)": bare,
    "Greenlet + gr_context=copy_context()": raw_context,
    "copy_current_request_context + spawn": flask_copy,
    "geventctx.spawn (GeventContext request)": geventctx_in_scope,
    "+ child's own app context": own_app_context,
    "+ own app context, torn down": own_app_context_torn_down,
    "geventctx.spawn (no scope)": geventctx_no_scope,
    "gevent.spawn under patch()": patched_bare,
    "+ patched child's own app context": patched_own_app_context,
    "geventctx.Executor submit+result": executor,
    "gevent ThreadPool(1) spawn+get": plain_threadpool,
    "geventctx.ThreadPool(1) spawn+get": context_threadpool,
}


def _settle() -> None:
    """Let the hub run pending callbacks, then collect garbage."""
    gevent.sleep(0)
    gc.collect()


def measure(rounds: int, n: int) -> dict[str, list[float]]:
    """Per-round mean microseconds per spawn+join, by variant name."""
    names = list(VARIANTS)
    results: dict[str, list[float]] = {name: [] for name in names}
    for i in range(rounds + 1):  # round 0 is a discarded warm-up
        k = i % len(names)
        for name in names[k:] + names[:k]:
            _settle()
            elapsed = VARIANTS[name](n)
            if i:
                results[name].append(elapsed / n / 1000)
    _settle()
    assert not geventctx.registry.live(), "hand-offs left in the registry"
    return results


def _spread(samples: list[float]) -> str:
    """Interquartile range as a percentage of the median."""
    q1, _, q3 = statistics.quantiles(samples, n=4)
    return f"IQR ±{(q3 - q1) / 2 / statistics.median(samples) * 100:.1f}%"


def run(quick: bool) -> list[Row]:
    """Measure every variant inside one Flask request context; P1/P2 rows."""
    rounds, n = SIZES[quick]
    app = flask.Flask(__name__)
    GeventContext(app)
    samples: dict[str, list[float]] = {}

    @app.route("/bench")
    def bench() -> str:
        _VAR.set("req-1234")
        _SPAN.set("span-5678")
        samples.update(measure(rounds, n))
        return "done"

    # A real request through Flask's WSGI app, so the extension is active.
    assert app.test_client().get("/bench").status_code == 200

    med = {name: statistics.median(s) for name, s in samples.items()}
    base = med["gevent.spawn (bare)"]
    floor = med[FLOOR]
    ccrc = med["copy_current_request_context + spawn"]
    rows = [
        Row(name, value, "µs", value / base, note=_spread(samples[name]))
        for name, value in med.items()
    ]
    for i, row in enumerate(rows):
        if row.name == "geventctx.spawn (GeventContext request)":
            vs_floor, over, vs_ccrc = row.value / floor, row.value - floor, row.value / ccrc
            rows[i] = row._replace(
                budget=f"P1 <=1.10x floor: {vs_floor:.3f}x, <=1 µs over: {over:+.2f}, <=0.4x ccrc: {vs_ccrc:.3f}x",
                ok=vs_floor <= 1.10 and over <= 1.0 and vs_ccrc <= 0.4,
            )
        elif row.name == "+ patched child's own app context":
            patched = med["gevent.spawn under patch()"]
            rows[i] = row._replace(
                budget=f"P1 app context <=2 µs over patch(): {row.value - patched:+.2f}",
                ok=row.value - patched <= 2.0,
            )
        elif row.name in ("+ child's own app context", "+ own app context, torn down"):
            hand_off = med["geventctx.spawn (GeventContext request)"]
            rows[i] = row._replace(
                budget=f"P1 app context <=2 µs over the hand-off: {row.value - hand_off:+.2f}",
                ok=row.value - hand_off <= 2.0,
            )
        elif row.name == "gevent.spawn under patch()":
            rows[i] = row._replace(budget="P2 <=1.05x bare", ok=row.value <= 1.05 * base)
        elif row.name == FLOOR:
            rows[i] = row._replace(note=f"{row.note}; P1's floor: the same child, given the context by hand")
        elif row.name == "geventctx.ThreadPool(1) spawn+get":
            plain = med["gevent ThreadPool(1) spawn+get"]
            rows[i] = row._replace(note=f"{row.note}; {row.value / plain:.3f}x gevent's ThreadPool")
    rows[0] = rows[0]._replace(note=f"{rows[0].note}; {rounds} rounds x {n} spawns")
    return rows
