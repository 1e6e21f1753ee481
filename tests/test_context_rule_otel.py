"""The Context rule next to OpenTelemetry (real SDK, real Flask instrumentation).

opentelemetry-instrumentation-flask attaches its context in a
``before_request`` function and detaches the token in a
``teardown_request`` function. ``ContextVar.reset`` refuses a token made in
another Context object, so a teardown deferred until the children ended
must run in the request's own Context: otherwise the instrumentation logs
"Failed to detach context" at ERROR, twice per request. Every hand-off kind
below defers teardown (a child still alive when the view returns), over a
real gevent.pywsgi server, with the instrumentation applied before and
after GeventContext; child spans must be parented to the request's span.
"""

from __future__ import annotations

import logging
import typing as t

import flask
import gevent
import pytest
from gevent.event import Event
from gevent.monkey import get_original
from httpkit import request as http_request
from httpkit import wait_for

import geventctx
from geventctx.flask import GeventContext

otel_sdk = pytest.importorskip("opentelemetry.sdk.trace", reason="opentelemetry-sdk is a test dependency")
from opentelemetry.instrumentation.flask import FlaskInstrumentor  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402
from opentelemetry.trace import SpanKind  # noqa: E402

native_sleep = get_original("time", "sleep")

#: The children's records (the trace-id recipe: see the last test).
children_log = logging.getLogger("test_context_rule_otel.children")

KINDS = ["spawn", "pool_map", "threadpool", "executor", "after_response", "patched_gevent_spawn"]


class Traced:
    def __init__(self, order: str) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = otel_sdk.TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.tracer = self.provider.get_tracer("geventctx-test")
        self.app = flask.Flask(f"otel_{order}")
        self.release = Event()
        self.teardowns: list[str] = []
        self.instrumentor = FlaskInstrumentor()
        self.threadpool = geventctx.ThreadPool(1)
        self.executor = geventctx.Executor(max_workers=2)
        if order == "instrument_first":
            self.instrumentor.instrument_app(self.app, tracer_provider=self.provider)
            GeventContext(self.app)
        else:
            GeventContext(self.app)
            self.instrumentor.instrument_app(self.app, tracer_provider=self.provider)
        self.app.teardown_request(lambda exc: self.teardowns.append(flask.request.path))
        self._views()

    def work(self, label: str = "child") -> str:
        with self.tracer.start_as_current_span(f"work:{label}"):
            gevent.sleep(0.01)
            children_log.info("child of %s", flask.request.path)
            return flask.request.path

    def work_in_thread(self) -> str:
        with self.tracer.start_as_current_span("work:thread"):
            native_sleep(0.05)
            children_log.info("child of %s", flask.request.path)
            return flask.request.path

    def outliving(self) -> str:
        with self.tracer.start_as_current_span("work:outliving"):
            children_log.info("child of %s", flask.request.path)
            self.release.wait(5)
            return flask.request.path

    def _views(self) -> None:
        app = self.app

        @app.get("/spawn")
        def spawn_view() -> str:
            geventctx.spawn(self.outliving)
            return "ok"

        @app.get("/pool_map")
        def pool_map_view() -> str:
            pool = geventctx.Pool(2)
            results = pool.map(self.work, ["a", "b", "c"])
            pool.spawn(self.outliving)
            return ",".join(results)

        @app.get("/threadpool")
        def threadpool_view() -> str:
            # The task still runs (in its thread) when the view returns.
            self.threadpool.spawn(self.work_in_thread)
            return "ok"

        @app.get("/executor")
        def executor_view() -> str:
            # result() returns while the task's greenlet is still alive.
            return t.cast(str, self.executor.submit(self.work, "task").result())

        @app.get("/after_response")
        def after_response_view() -> str:
            geventctx.spawn(self.work, "late")
            return "ok"

        @app.get("/patched_gevent_spawn")
        def patched_view() -> str:
            gevent.spawn(self.outliving)
            return "ok"

    def close(self) -> None:
        self.executor.shutdown(wait=True)
        self.threadpool.kill()
        self.instrumentor.uninstrument_app(self.app)
        self.provider.shutdown()


@pytest.fixture(params=["instrument_first", "geventctx_first"])
def traced(request: pytest.FixtureRequest) -> t.Iterator[Traced]:
    traced = Traced(request.param)
    yield traced
    traced.release.set()
    traced.close()


@pytest.mark.parametrize("kind", KINDS)
def test_deferred_teardown_detaches_opentelemetry_context_in_the_request_context(
    kind: str, traced: Traced, serve: t.Any, caplog: pytest.LogCaptureFixture
) -> None:
    if kind == "patched_gevent_spawn":
        geventctx.patch()
    try:
        server = serve(traced.app)
        with caplog.at_level(logging.DEBUG):
            for n in (1, 2):  # the second on a fresh connection of the same server
                response = http_request(server.port, "GET", f"/{kind}")
                assert response is not None and response.status == 200
                traced.release.set()
                wait_for(lambda n=n: len(traced.teardowns) >= n, 5, "this request's deferred teardown")
                traced.release.clear()
            wait_for(lambda: len(traced.teardowns) == 2, 5, "both teardowns")
    finally:
        if kind == "patched_gevent_spawn":
            geventctx.unpatch()
    failures = [r for r in caplog.records if "detach" in r.getMessage().lower()]
    assert failures == []
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    spans = traced.exporter.get_finished_spans()
    servers = [s for s in spans if s.kind is SpanKind.SERVER]
    assert len(servers) == 2
    server_ids = {s.context.span_id for s in servers}
    children = [s for s in spans if s.name.startswith("work:")]
    assert children, [s.name for s in spans]
    for child in children:
        assert child.parent is not None and child.parent.span_id in server_ids, child.name
    # Each request's children belong to that request's trace, not the other's.
    by_trace = {s.context.trace_id for s in servers}
    assert {c.context.trace_id for c in children} <= by_trace


@pytest.mark.parametrize("kind", KINDS)
def test_a_childs_log_records_carry_its_requests_trace_id(kind: str, serve: t.Any) -> None:
    # docs/observability.rst's OpenTelemetry recipe: opentelemetry-instrumentation-logging
    # with inject_trace_context=True reads the current span when a record is
    # made, in the emitting child: the child's span, in its request's trace.
    from opentelemetry.instrumentation.logging import LoggingInstrumentor

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    children_log.addHandler(handler)
    children_log.setLevel(logging.INFO)
    LoggingInstrumentor().instrument(inject_trace_context=True, enable_log_auto_instrumentation=False)
    traced = Traced("geventctx_first")
    if kind == "patched_gevent_spawn":
        geventctx.patch()
    try:
        server = serve(traced.app)
        traced.release.set()  # the outliving children end when they like
        for _ in range(2):
            response = http_request(server.port, "GET", f"/{kind}")
            assert response is not None and response.status == 200

        def ended() -> set[int]:
            return {s.context.span_id for s in traced.exporter.get_finished_spans()}

        wait_for(lambda: len(traced.teardowns) == 2 and {int(r.otelSpanID, 16) for r in records} <= ended(),
                 5, "both requests' ends and every logging child's span")
    finally:
        if kind == "patched_gevent_spawn":
            geventctx.unpatch()
        LoggingInstrumentor().uninstrument()
        children_log.removeHandler(handler)
        traced.release.set()
        traced.close()
    spans = traced.exporter.get_finished_spans()
    traces = sorted(f"{s.context.trace_id:032x}" for s in spans if s.kind is SpanKind.SERVER)
    children = {f"{s.context.span_id:016x}": f"{s.context.trace_id:032x}" for s in spans if s.name.startswith("work:")}
    assert len(traces) == 2 and records
    for record in records:
        assert record.otelSpanID in children, (record.getMessage(), record.otelSpanID)
        assert record.otelTraceID == children[record.otelSpanID], record.getMessage()
    assert sorted({r.otelTraceID for r in records}) == traces
