"""G14: what carrying declared context costs a Celery publish and a task run.

- Publish: ``task.apply_async()`` x 500 over kombu's in-memory transport,
  from an app with ``geventctx.celery.install()`` and three declared
  variables set (one through a codec) vs the same app config without
  install (plain Celery publish). The memory transport is the cheapest
  publish there is, so the ratio is the worst case (budget <= 1.05x).
- Worker side: Celery's own tracer (``build_tracer``, what a worker runs for
  each message, minus the pool) over a trivial task x 2000, with the header
  in the request, installed vs not; the difference per task in µs (budget
  <= 20 µs).

Interleaved rounds (the order rotates each round), garbage collected before
every batch; a side's figure is its median batch time.
"""

from __future__ import annotations

import gc
import statistics
import typing as t
import uuid
from contextvars import ContextVar, copy_context
from time import perf_counter_ns

import celery
from celery.app.trace import build_tracer
from common import Row

from geventctx.celery import HEADER, carry, encode_current, install

TITLE = "Celery: publish with install() vs plain, worker-side cost per task (G14)"

ROUNDS = {False: 40, True: 5}
PUBLISHES = 200
TRACES = 1000

request_id: ContextVar[str] = carry(ContextVar("bench_request_id"))
tenant: ContextVar[str] = carry(ContextVar("bench_tenant"))
user: ContextVar[tuple[int, str]] = carry(
    ContextVar("bench_user"), dumps=lambda u: list(u), loads=lambda v: (v[0], v[1])
)


def _app(installed: bool) -> tuple[celery.Celery, t.Any]:
    app = celery.Celery(f"bench-{installed}", set_as_current=False)
    app.conf.update(broker_url="memory://", result_backend="disabled://", task_ignore_result=True)
    if installed:
        install(app)

    @app.task(name="bench.noop", shared=False, ignore_result=True)
    def noop() -> None:
        return None

    app.finalize()
    return app, app.tasks["bench.noop"]


def _set_context() -> None:
    request_id.set(str(uuid.uuid4()))
    tenant.set("tenant-42")
    user.set((42, "ada"))


def _purge(app: celery.Celery) -> None:
    with app.connection_for_write() as conn:
        conn.default_channel.queue_purge("celery")


def publish_batch(target: tuple[celery.Celery, t.Any]) -> int:
    app, task = target
    apply_async = task.apply_async
    start = perf_counter_ns()
    for _ in range(PUBLISHES):
        apply_async()
    took = perf_counter_ns() - start
    _purge(app)
    return took


def trace_batch(target: tuple[t.Any, dict[str, t.Any]]) -> int:
    trace, request = target
    ids = [str(uuid.uuid4()) for _ in range(TRACES)]
    start = perf_counter_ns()
    for task_id in ids:
        trace(task_id, (), {}, dict(request, id=task_id))
    return perf_counter_ns() - start


def run(quick: bool) -> list[Row]:
    rounds = ROUNDS[quick]
    context = copy_context()
    context.run(_set_context)
    plain, installed = _app(False), _app(True)
    header = context.run(encode_current)
    request = {"delivery_info": {}, "parent_id": None, "root_id": None, HEADER: header}

    def tracer(target: tuple[celery.Celery, t.Any]) -> tuple[t.Any, dict[str, t.Any]]:
        app, task = target
        return build_tracer(task.name, task, app=app, eager=False, propagate=False), request

    variants: list[tuple[str, t.Callable[[t.Any], int], t.Any]] = [
        ("plain Celery apply_async", publish_batch, plain),
        ("apply_async with install(), 3 vars set", publish_batch, installed),
        ("plain Celery tracer, per task", trace_batch, tracer(plain)),
        ("tracer with install(), 3 vars carried", trace_batch, tracer(installed)),
    ]
    times: dict[str, list[int]] = {name: [] for name, _, _ in variants}
    for i in range(rounds + 1):  # round 0 warms up
        k = i % len(variants)
        for name, batch, target in variants[k:] + variants[:k]:
            gc.collect()
            took = context.run(batch, target)
            if i:
                times[name].append(took)
    median = {name: statistics.median(values) for name, values in times.items()}
    names = [name for name, _, _ in variants]

    publish_ratio = median[names[1]] / median[names[0]]
    plain_trace, carried_trace = median[names[2]] / TRACES / 1000, median[names[3]] / TRACES / 1000
    overhead = carried_trace - plain_trace
    return [
        Row(names[0], median[names[0]] / PUBLISHES / 1000, "µs", 1.0, note=f"{rounds} rounds, memory transport"),
        Row(names[1], median[names[1]] / PUBLISHES / 1000, "µs", publish_ratio, "G14 <=1.05x plain",
            publish_ratio <= 1.05, note=f"header {len(header or '')} bytes"),
        Row(names[2], plain_trace, "µs", 1.0),
        Row(names[3], carried_trace, "µs", carried_trace / plain_trace),
        Row("worker-side overhead per task", overhead, "µs", None, "G14 <=20 µs", overhead <= 20),
    ]
