"""G2 across requests: nothing one request sets reaches the next one.

A keep-alive connection is served by one greenlet, request after request.
Without isolation, a contextvar a view sets and never resets is still set in
the next request on that connection, and that request's children inherit it.
"""

from __future__ import annotations

import contextvars

import pytest
from flask import Flask
from gevent import socket

import geventctx
from geventctx.flask import GeventContext
from geventctx.wsgi import ContextMiddleware

secret = contextvars.ContextVar("secret", default="-")


def keep_alive_requests(port, paths):
    """Send ``paths`` as GETs over ONE connection; return each body."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    reader = sock.makefile("rb")
    bodies = []
    try:
        for path in paths:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
            assert reader.readline().split()[1] == b"200"
            length = 0
            while (line := reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode().partition(":")
                if name.lower() == "content-length":
                    length = int(value)
            bodies.append(reader.read(length).decode())
    finally:
        reader.close()
        sock.close()
    return bodies


def flask_app(with_extension):
    app = Flask(__name__)
    if with_extension:
        GeventContext(app)

    @app.route("/set")
    def set_():
        secret.set("alice's secret")  # never reset: the view just returns
        return "set"

    @app.route("/get")
    def get():
        child = geventctx.spawn(secret.get).get()
        return f"{secret.get()}|{child}"

    return app


def plain_wsgi_app(environ, start_response):
    if environ["PATH_INFO"] == "/set":
        secret.set("alice's secret")
        body = b"set"
    else:
        child = geventctx.spawn(secret.get).get()
        body = f"{secret.get()}|{child}".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


@pytest.mark.filterwarnings("ignore::geventctx.MisuseWarning")
def test_without_isolation_a_keep_alive_connection_bleeds_control(serve):
    server = serve(flask_app(with_extension=False))
    assert keep_alive_requests(server.port, ["/set", "/get"]) == ["set", "alice's secret|alice's secret"]


def test_flask_extension_isolates_requests_on_one_connection(serve):
    server = serve(flask_app(with_extension=True))
    assert keep_alive_requests(server.port, ["/set", "/get", "/get"]) == ["set", "-|-", "-|-"]


def test_middleware_isolates_requests_on_one_connection(serve):
    server = serve(ContextMiddleware(plain_wsgi_app))
    assert keep_alive_requests(server.port, ["/set", "/get"]) == ["set", "-|-"]


def test_streaming_iteration_runs_in_the_requests_own_context(serve):
    # A generator that sets a contextvar while it is iterated by the server.
    def streaming_app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "3")])

        def body():
            if environ["PATH_INFO"] == "/set":
                secret.set("streamed secret")
                yield b"set"
            else:
                yield secret.get().encode()[:3].ljust(3, b".")

        return body()

    server = serve(ContextMiddleware(streaming_app))
    assert keep_alive_requests(server.port, ["/set", "/get"]) == ["set", "-.."]


# -- the Context rule: one request, one Context object ---------------------------

tokened = contextvars.ContextVar("tokened", default=None)


def test_a_teardown_step_due_while_the_request_streams_runs_in_its_context_between_chunks(serve):
    # A plain (context-less) stream: the request itself ended at the view's
    # pop, the child holds teardown, and ends while the request's greenlet
    # is inside its Context (blocked in the generator). The step is queued
    # and runs in that Context when the chunk is done: a token set in
    # before_request is reset without error, before the stream ends.
    import gevent
    from flask import Response

    app = Flask("busy_context")
    GeventContext(app)
    events = []
    errors = []

    @app.before_request
    def set_token():
        from flask import g

        g.token = tokened.set("request")

    @app.teardown_request
    def reset_token(exc):
        from flask import g

        try:
            tokened.reset(g.token)
            events.append("teardown")
        except ValueError as error:
            errors.append(error)

    @app.get("/stream")
    def stream():
        geventctx.spawn(gevent.sleep, 0.05)

        def generate():
            yield "a"
            gevent.sleep(0.2)  # the child ends meanwhile: the Context is busy
            events.append("chunk b")
            yield "b"
            events.append("chunk c")
            yield "c"

        return Response(generate())

    from httpkit import request as http_request
    from httpkit import wait_for

    response = http_request(serve(app).port, "GET", "/stream")
    assert response is not None and response.body == b"abc"
    wait_for(lambda: "teardown" in events or errors, 5, "the teardown")
    assert errors == []
    assert events == ["chunk b", "teardown", "chunk c"]


def test_request_context_queues_a_call_while_another_greenlet_is_inside():
    import gevent
    from gevent.event import Event

    from geventctx.isolation import RequestContext

    home = RequestContext.fresh()
    inside, leave, order = Event(), Event(), []

    def request_greenlet():
        def body():
            inside.set()
            leave.wait()
            order.append("left")

        home.enter(body)

    worker = gevent.spawn(request_greenlet)
    inside.wait()
    ran_in = []
    home.call(lambda: ran_in.append(contextvars.copy_context().get(secret)) or order.append("step"))
    assert order == [] and home.busy  # queued: the Context is entered by the request's greenlet
    leave.set()
    worker.join()
    assert order == ["left", "step"] and not home.busy
    # Free again: a call runs at once, in that same Context object.
    home.context.run(secret.set, "kept")
    home.call(lambda: ran_in.append(secret.get()))
    assert ran_in[-1] == "kept"
