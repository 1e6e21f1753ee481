"""P9: a TaskGroup of 4 tasks (spawn and exit) vs 4 ``geventctx.spawn`` + ``joinall``.

Both sides run the same trivial child (it reads a context variable) four
times per fan-out, ``n`` fan-outs per batch, inside one Flask request that
:class:`~geventctx.flask.GeventContext` manages (so every task holds the
request scope, as in a view). Rounds are interleaved, the order rotated by
the round; garbage is collected and the hub drained before every batch. A
side's figure is the median over rounds of its per-fan-out mean.
"""

from __future__ import annotations

import gc
import statistics
import typing as t
from contextvars import ContextVar
from time import perf_counter_ns

import flask
import gevent
from common import Row

import geventctx
from geventctx.flask import GeventContext

TITLE = "TaskGroup fan-out vs spawn + joinall (P9)"

#: (rounds, fan-outs per batch), after one discarded warm-up round.
SIZES = {False: (31, 2000), True: (5, 200)}
BUDGET = 1.15

_VAR: ContextVar[str] = ContextVar("bench.request_id")


def _child() -> str:
    return _VAR.get("-")


def spawn_joinall(n: int) -> int:
    """``gevent.joinall([geventctx.spawn(f) x 4])``: the baseline."""
    spawn, joinall, f = geventctx.spawn, gevent.joinall, _child
    start = perf_counter_ns()
    for _ in range(n):
        joinall([spawn(f), spawn(f), spawn(f), spawn(f)])
    return perf_counter_ns() - start


def task_group(n: int) -> int:
    """``with TaskGroup() as tg: tg.spawn(f) x 4``."""
    group, f = geventctx.TaskGroup, _child
    start = perf_counter_ns()
    for _ in range(n):
        with group() as tg:
            tg.spawn(f)
            tg.spawn(f)
            tg.spawn(f)
            tg.spawn(f)
    return perf_counter_ns() - start


BASE = "4 x geventctx.spawn + joinall"
VARIANTS: dict[str, t.Callable[[int], int]] = {BASE: spawn_joinall, "TaskGroup, 4 x tg.spawn": task_group}


def measure(rounds: int, n: int) -> dict[str, list[float]]:
    """Per-round mean microseconds per fan-out, by variant."""
    names = list(VARIANTS)
    results: dict[str, list[float]] = {name: [] for name in names}
    for i in range(rounds + 1):  # round 0 warms up
        k = i % len(names)
        for name in names[k:] + names[:k]:
            gevent.sleep(0)
            gc.collect()
            elapsed = VARIANTS[name](n)
            if i:
                results[name].append(elapsed / n / 1000)
    gevent.sleep(0)
    assert not geventctx.registry.live(), "hand-offs left in the registry"
    return results


def run(quick: bool) -> list[Row]:
    """Both sides in one Flask request; the P9 row."""
    rounds, n = SIZES[quick]
    app = flask.Flask(__name__)
    GeventContext(app)
    samples: dict[str, list[float]] = {}

    @app.route("/bench")
    def bench() -> str:
        _VAR.set("req-1234")
        samples.update(measure(rounds, n))
        return "done"

    assert app.test_client().get("/bench").status_code == 200
    med = {name: statistics.median(values) for name, values in samples.items()}
    base = med[BASE]
    rows = []
    for name, value in med.items():
        ratio = value / base
        q1, _, q3 = statistics.quantiles(samples[name], n=4)
        note = f"IQR ±{(q3 - q1) / 2 / value * 100:.1f}%"
        if name == BASE:
            rows.append(Row(name, value, "µs", 1.0, note=f"{note}; {rounds} rounds x {n} fan-outs of 4"))
        else:
            rows.append(Row(name, value, "µs", ratio, f"P9 <={BUDGET:g}x spawn+joinall", ratio <= BUDGET, note))
    return rows
