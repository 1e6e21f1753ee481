"""What the observability integrations cost per hand-off (and per record).

Inside one Flask request (GeventContext, sentry-sdk initialised with
FlaskIntegration and an in-memory transport), ``geventctx.spawn(f).join()``
is timed with and without geventctx.integrations.sentry's fork registered,
rounds interleaved as in ``spawn``. OpenTelemetry's context is a context
variable: a hand-off copies it with the rest, so it has no row of its own.
The logging filter costs per record, not per hand-off: its row times
``RequestFilter.filter`` in a child. No budgets: these rows inform.
"""

from __future__ import annotations

import gc
import logging
import statistics
import typing as t
from time import perf_counter_ns

import flask
import gevent
from common import Row

import geventctx
from geventctx import forks
from geventctx.flask import GeventContext
from geventctx.logging import RequestFilter

TITLE = "observability integrations: cost per hand-off"

#: (rounds, operations per batch), after one discarded warm-up round.
SIZES = {False: (31, 3000), True: (5, 300)}


def _child() -> None:
    return None


def _spawn_join(n: int) -> int:
    spawn = geventctx.spawn
    start = perf_counter_ns()
    for _ in range(n):
        spawn(_child).join()
    return perf_counter_ns() - start


def _filter_records(n: int) -> int:
    record = logging.LogRecord("bench", logging.INFO, __file__, 1, "m", (), None)
    filter_ = RequestFilter().filter

    def child() -> int:
        start = perf_counter_ns()
        for _ in range(n):
            filter_(record)
        return perf_counter_ns() - start

    return t.cast(int, geventctx.spawn(child).get())


def run(quick: bool) -> list[Row]:
    try:
        import sentry_sdk
        from sentry_sdk.transport import Transport

        from geventctx.integrations.sentry import GeventctxIntegration, _fork_scopes
    except ImportError:
        return [Row("sentry-sdk not installed", 0.0, "-", note="pip install geventctx[sentry]")]

    class Discard(Transport):
        def capture_envelope(self, envelope: t.Any) -> None:
            pass

    rounds, n = SIZES[quick]
    sentry_sdk.init(dsn="http://public@127.0.0.1:9/1", transport=Discard(), traces_sample_rate=1.0,
                    integrations=[GeventctxIntegration()])
    saved = forks.registered()

    def without_fork(n: int) -> int:
        forks.unregister(_fork_scopes)
        try:
            return _spawn_join(n)
        finally:
            forks.register(_fork_scopes)

    variants: dict[str, t.Callable[[int], int]] = {
        "spawn+join, Sentry on, no fork registered": without_fork,
        "spawn+join, Sentry on, GeventctxIntegration": _spawn_join,
        "RequestFilter.filter, per record in a child": _filter_records,
    }
    samples: dict[str, list[float]] = {name: [] for name in variants}
    app = flask.Flask(__name__)
    GeventContext(app)

    @app.route("/bench")
    def bench() -> str:
        sentry_sdk.set_tag("bench", "1")
        names = list(variants)
        for i in range(rounds + 1):
            k = i % len(names)
            for name in names[k:] + names[:k]:
                gevent.sleep(0)
                gc.collect()
                elapsed = variants[name](n)
                if i:
                    samples[name].append(elapsed / n / 1000)
        return "done"

    try:
        assert app.test_client().get("/bench").status_code == 200
    finally:
        sentry_sdk.get_client().close()
        sentry_sdk.get_global_scope().set_client(None)
        for fork in forks.registered():
            if fork not in saved:
                forks.unregister(fork)
    med = {name: statistics.median(s) for name, s in samples.items()}
    base = med["spawn+join, Sentry on, no fork registered"]
    rows = [Row(name, value, "µs", value / base if "spawn" in name else None) for name, value in med.items()]
    with_fork = med["spawn+join, Sentry on, GeventctxIntegration"]
    rows[1] = rows[1]._replace(note=f"{with_fork - base:+.2f} µs per hand-off: one fork of each Sentry scope")
    rows[0] = rows[0]._replace(note=f"{rounds} rounds x {n}")
    return rows
