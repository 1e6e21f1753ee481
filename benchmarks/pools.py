"""P7: geventctx's pools and executor against gevent's own, side by side.

Three pairs, each timed in interleaved rounds (every round runs both sides
of every pair once, in an order rotated by the round), outside any request
(the pools' own cost, not a request's), with garbage collected before every
batch:

- ``ThreadPool(4).apply(f)`` x 500, geventctx's vs gevent's (budget 1.2x);
- ``Pool(100).map(f, range(10_000))``, geventctx's vs gevent's (1.1x);
- ``Executor().submit(f).result()`` x 2000 vs ``gevent.spawn(f).get()``
  (the bare spawn is the floor: 1.3x).

A side's figure is the median over rounds of its batch time.
"""

from __future__ import annotations

import gc
import statistics
import typing as t
from time import perf_counter_ns

import gevent
import gevent.pool
import gevent.threadpool
from common import Row

import geventctx

TITLE = "pools and executor vs gevent's own (P7)"

ROUNDS = {False: 15, True: 3}
APPLIES = 500
MAP_ITEMS = 10_000
SUBMITS = 2000


def _f(x: int = 0) -> int:
    return x


def thread_apply(pool: t.Any) -> int:
    apply = pool.apply
    start = perf_counter_ns()
    for _ in range(APPLIES):
        apply(_f)
    return perf_counter_ns() - start


def pool_map(pool: t.Any) -> int:
    start = perf_counter_ns()
    pool.map(_f, range(MAP_ITEMS))
    return perf_counter_ns() - start


def executor_submit(executor: t.Any) -> int:
    submit = executor.submit
    start = perf_counter_ns()
    for _ in range(SUBMITS):
        submit(_f).result()
    return perf_counter_ns() - start


def bare_spawn(_: t.Any) -> int:
    spawn = gevent.spawn
    start = perf_counter_ns()
    for _ in range(SUBMITS):
        spawn(_f).get()
    return perf_counter_ns() - start


def run(quick: bool) -> list[Row]:
    rounds = ROUNDS[quick]
    thread_ours, thread_theirs = geventctx.ThreadPool(4), gevent.threadpool.ThreadPool(4)
    executor = geventctx.Executor()
    variants: list[tuple[str, t.Callable[[t.Any], int], t.Any]] = [
        ("gevent ThreadPool(4).apply", thread_apply, thread_theirs),
        ("geventctx ThreadPool(4).apply", thread_apply, thread_ours),
        ("gevent Pool(100).map, 10k items", pool_map, gevent.pool.Pool(100)),
        ("geventctx Pool(100).map, 10k items", pool_map, geventctx.Pool(100)),
        ("bare gevent.spawn(f).get()", bare_spawn, None),
        ("geventctx Executor submit+result", executor_submit, executor),
    ]
    times: dict[str, list[int]] = {name: [] for name, _, _ in variants}
    try:
        for i in range(rounds + 1):  # round 0 warms up
            k = i % len(variants)
            for name, batch, target in variants[k:] + variants[:k]:
                gc.collect()
                gevent.sleep(0)
                took = batch(target)
                if i:
                    times[name].append(took)
    finally:
        thread_ours.kill()
        thread_theirs.kill()
        executor.shutdown(wait=True)
    median = {name: statistics.median(values) for name, values in times.items()}

    def per(name: str, count: int) -> float:
        return median[name] / count / 1000  # µs per operation

    def pair(base: str, ours: str, count: int, budget: float, label: str) -> list[Row]:
        ratio = median[ours] / median[base]
        return [
            Row(base, per(base, count), "µs", 1.0, note=f"{rounds} rounds"),
            Row(ours, per(ours, count), "µs", ratio, f"P7 <={budget:g}x {label}", ratio <= budget),
        ]

    return (
        pair("gevent ThreadPool(4).apply", "geventctx ThreadPool(4).apply", APPLIES, 1.2, "gevent's")
        + pair("gevent Pool(100).map, 10k items", "geventctx Pool(100).map, 10k items", MAP_ITEMS, 1.1, "gevent's")
        + pair("bare gevent.spawn(f).get()", "geventctx Executor submit+result", SUBMITS, 1.3, "bare spawn")
    )
