"""G14: what carrying declared context costs a Celery publish and a task run.

- Publish: ``task.apply_async()`` x 400 over kombu's in-memory transport,
  from an app with ``geventctx.celery.install()`` and three declared
  variables set (one through a codec) vs the same app config without
  install (plain Celery publish). The memory transport is the cheapest
  publish there is, so the ratio is the worst case (budget <= 1.05x).
- Worker side: Celery's own tracer (``build_tracer``, what a worker runs for
  each message, minus the pool) over a trivial task x 2000, with the header
  in the request, installed vs not; the difference per task in µs (budget
  <= 20 µs).

Interleaved rounds: the two publish sides alternate in chunks of 20 within
a round (the publish ratio is the median of the rounds' ratios), the tracer
sides swap order each round; garbage collected before every batch; a
side's figure is its median over rounds.
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
PUBLISHES = 400
CHUNK = 20
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


def publish_pair(plain: tuple[celery.Celery, t.Any], installed: tuple[celery.Celery, t.Any]) -> tuple[int, int]:
    """PUBLISHES publishes on each side, in alternating chunks of CHUNK (the
    machine's noise falls on both alike); the two sides' total times."""
    times = [0, 0]
    sides = [plain[1].apply_async, installed[1].apply_async]
    for chunk in range(PUBLISHES // CHUNK):
        for k in (chunk % 2, 1 - chunk % 2):
            apply_async = sides[k]
            start = perf_counter_ns()
            for _ in range(CHUNK):
                apply_async()
            times[k] += perf_counter_ns() - start
    _purge(plain[0])
    _purge(installed[0])
    return times[0], times[1]


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

    names = [
        "plain Celery apply_async",
        "apply_async with install(), 3 vars set",
        "plain Celery tracer, per task",
        "tracer with install(), 3 vars carried",
    ]
    times: dict[str, list[int]] = {name: [] for name in names}
    # Publishes first: once a task ran from a message in a process, it is a
    # worker, and its publishes also look for the task the tracer runs.
    for i in range(rounds + 1):  # round 0 warms up
        gc.collect()
        pair = context.run(publish_pair, plain, installed)
        if i:
            times[names[0]].append(pair[0])
            times[names[1]].append(pair[1])
    tracers = [tracer(plain), tracer(installed)]
    for i in range(rounds + 1):
        traced = {}
        for k in (0, 1) if i % 2 else (1, 0):
            gc.collect()
            traced[k] = context.run(trace_batch, tracers[k])
        if i:
            times[names[2]].append(traced[0])
            times[names[3]].append(traced[1])
    median = {name: statistics.median(values) for name, values in times.items()}

    # The ratio of each round's two sides, then their median: noise from the
    # rest of the machine falls on both sides of a round alike.
    publish_ratio = statistics.median(b / a for a, b in zip(times[names[0]], times[names[1]], strict=True))
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
