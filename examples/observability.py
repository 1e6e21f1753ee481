"""Example: Sentry, OpenTelemetry and logging, wired next to geventctx.

A shop prices each order's items in parallel (``geventctx.Pool.map``). Each
child makes an OpenTelemetry span, logs a line and tags its Sentry scope;
one item fails. The three neighbours see the work the way it was done:

* OpenTelemetry: each child's span is a child of its request's span (the
  context travels with the hand-off; nothing to configure);
* logging: every line names its request and the child's spawn line
  (:class:`geventctx.logging.RequestFilter`) and carries its trace id
  (opentelemetry-instrumentation-logging, ``inject_trace_context=True``);
* Sentry: each child's tags stay its own (``GeventctxIntegration`` forks the
  scopes per child), and the failed item is one event, although the view
  re-raises it.

Run: ``python -m examples.observability`` — it serves on 127.0.0.1 (a free
port), sends three orders, prints what each neighbour recorded and exits.
Sentry's transport and OpenTelemetry's exporter keep everything in memory.
"""

from __future__ import annotations

import logging
import typing as t

import gevent
import sentry_sdk
from flask import Flask, request
from gevent import socket
from opentelemetry.instrumentation.flask import FlaskInstrumentor
from opentelemetry.instrumentation.logging import LoggingInstrumentor
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sentry_sdk.transport import Transport

import geventctx
from geventctx.flask import GeventContext
from geventctx.integrations.sentry import GeventctxIntegration
from geventctx.logging import RequestFilter

log = logging.getLogger("examples.shop")
FORMAT = "%(geventctx_request)s | %(geventctx_site)s | trace %(otelTraceID).8s | %(message)s"

ITEMS = {"1": ["apple", "pear"], "2": ["plum", "broken"], "3": ["fig"]}


class Events(Transport):
    """A Sentry transport that keeps events in memory (no network)."""

    def __init__(self, options: t.Any = None) -> None:
        super().__init__(options)
        self.events: list[dict[str, t.Any]] = []

    def capture_envelope(self, envelope: t.Any) -> None:
        event = envelope.get_event()
        if event is not None:
            self.events.append(event)


def price(item: str) -> int:
    with tracer.start_as_current_span(f"price {item}"):
        sentry_sdk.set_tag("item", item)  # this child's own scope
        if item == "broken":
            raise ValueError(f"no price for {item!r}")
        gevent.sleep(0.01)  # the price service
        log.info("priced %s for order %s", item, request.view_args["order"])  # type: ignore[index]
        return len(item)


def create_app() -> Flask:
    app = Flask(__name__)
    GeventContext(app)
    pool = geventctx.Pool(10)

    @app.get("/orders/<order>")
    def order(order: str) -> str:
        sentry_sdk.set_tag("order", order)
        log.info("pricing %d items", len(ITEMS[order]))
        return str(sum(pool.map(price, ITEMS[order])))  # a child's error is re-raised here

    return app


tracer = TracerProvider().get_tracer(__name__)


def get(port: int, path: str) -> int:
    """A minimal HTTP/1.0 GET over a gevent socket; the response's status."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return int(data.split(b" ", 2)[1])


def main() -> dict[str, t.Any]:
    """Serve, send the orders, print what was recorded; returns it (for the test)."""
    global tracer
    from gevent.pywsgi import WSGIServer

    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    tracer = provider.get_tracer(__name__)
    events = Events()
    sentry_sdk.init(dsn="http://public@127.0.0.1:9/1", transport=events, integrations=[GeventctxIntegration()])
    LoggingInstrumentor().instrument(inject_trace_context=True, enable_log_auto_instrumentation=False)
    lines: list[str] = []
    handler = logging.Handler()
    handler.addFilter(RequestFilter())
    handler.setFormatter(logging.Formatter(FORMAT))
    # One line a record (a failed child's traceback goes to Sentry).
    handler.emit = lambda record: lines.append(handler.format(record).splitlines()[0])  # type: ignore[method-assign]
    for logger in (log, logging.getLogger("geventctx")):
        logger.addHandler(handler)
    log.setLevel(logging.INFO)
    app = create_app()
    FlaskInstrumentor().instrument_app(app, tracer_provider=provider)
    server = WSGIServer(("127.0.0.1", 0), app, log=None, error_log=None)
    server.start()
    try:
        clients = {order: gevent.spawn(get, server.server_port, f"/orders/{order}") for order in ITEMS}
        gevent.joinall(list(clients.values()), raise_error=True, timeout=30)
        statuses = {order: client.value for order, client in clients.items()}
    finally:
        server.stop()
        for logger in (log, logging.getLogger("geventctx")):
            logger.removeHandler(handler)
        LoggingInstrumentor().uninstrument()
        FlaskInstrumentor().uninstrument_app(app)
        sentry_sdk.get_client().close()
        sentry_sdk.get_global_scope().set_client(None)
    finished = spans.get_finished_spans()
    report = {"statuses": statuses, "spans": finished, "lines": lines, "events": events.events}
    print("responses:", statuses)
    print("\nOpenTelemetry: each child's span is a child of its request's span")
    for root in (s for s in finished if s.parent is None):
        print(f"  {root.name}  trace {root.context.trace_id:032x}"[: len(root.name) + 16])
        for child in (s for s in finished if s.parent is not None and s.parent.span_id == root.context.span_id):
            print(f"    {child.name}")
    print("\nlogging: request | child's spawn line | trace id | message")
    for line in lines:
        print("  " + line)
    print("\nSentry: one event per failed item, with that child's tags only")
    for event in events.events:
        value = event.get("exception", {}).get("values", [{}])[-1].get("value", event.get("message"))
        print(f"  {value}  tags={event.get('tags')}  url={event['request']['url']}")
    return report


if __name__ == "__main__":
    main()
