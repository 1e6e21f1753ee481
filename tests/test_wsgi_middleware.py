"""G4, G5, G11, G12 for ``geventctx.wsgi.ContextMiddleware`` over a real server.

Every request goes through ``serve(app)`` (a real ``gevent.pywsgi`` server on
127.0.0.1) and the raw-socket client of ``httpkit``, which trickles
Content-Length bodies, sends chunked ones, or vanishes mid-upload. The apps
are plain WSGI: Werkzeug's ``Request.application`` style and raw WSGI
callables whose response iterable records its ``close()`` (WSGI's
end-of-request hook); and a Flask app that also has ``GeventContext``, to
check that the two adapters stacked on one request manage it once.

Bytes taken from the server's real ``wsgi.input`` are counted by a small
middleware placed *outside* ``ContextMiddleware``. Children that must outlive
the response wait on a gevent ``Event`` that the test sets only after it has
read the whole response, so "the response is not delayed" and "close waits
for the children" are checked by order of events, never by timing.
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import logging
import os
import typing as t
from dataclasses import dataclass, field

import gevent
import pytest
from flask import Flask, g
from flask import request as flask_request
from gevent import socket
from gevent.event import Event
from httpkit import CountingInput, _dechunk, multipart, pieces, settle, upload, wait_for
from werkzeug.exceptions import ClientDisconnected, RequestEntityTooLarge
from werkzeug.wrappers import Request, Response

import geventctx
from geventctx import errorlog
from geventctx.body import ENVIRON_BODY, SharedBody
from geventctx.flask import GeventContext
from geventctx.request import RequestStream
from geventctx.scope import ENVIRON_SCOPE, Scope
from geventctx.wsgi import ContextMiddleware

JOIN_TIMEOUT = 5  # every wait in an app is bounded
CLIENT_TIMEOUT = 5  # and so is every wait of the client
HERE = __file__

tag = contextvars.ContextVar("test_wsgi_middleware.tag", default=None)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def line_of(marker: str) -> int:
    """The line of this file that ends with ``# marker`` (a spawn site)."""
    with open(HERE, encoding="utf-8") as f:
        found = [n for n, text in enumerate(f, 1) if text.rstrip().endswith(f"# {marker}")]
    assert len(found) == 1, (marker, found)
    return found[0]


# -- WSGI pieces ------------------------------------------------------------------------


def counting(app: t.Any) -> tuple[t.Any, list[list[int]]]:
    """Wrap ``app`` (outermost): one counter of bytes read off the socket per request."""
    counters: list[list[int]] = []

    def middleware(environ: dict[str, t.Any], start_response: t.Any) -> t.Any:
        counter = [0]
        counters.append(counter)
        environ["wsgi.input"] = CountingInput(environ["wsgi.input"], counter)
        return app(environ, start_response)

    return middleware, counters


class RecordingIterable:
    """A raw WSGI response iterable whose ``close()`` records each call."""

    def __init__(self, chunks: t.Iterable[bytes], events: list[t.Any]) -> None:
        self.chunks = chunks
        self.events = events

    def __iter__(self) -> t.Iterator[bytes]:
        return iter(self.chunks)

    def close(self) -> None:
        self.events.append("close")


def recording_close(app: t.Any, events: list[t.Any]) -> t.Any:
    """A raw WSGI app around ``app`` whose response iterable records ``close()``."""

    class Closing:
        def __init__(self, result: t.Iterable[bytes]) -> None:
            self.result = result

        def __iter__(self) -> t.Iterator[bytes]:
            return iter(self.result)

        def close(self) -> None:
            events.append("close")
            close = getattr(self.result, "close", None)
            if close is not None:
                close()

    def wrapper(environ: dict[str, t.Any], start_response: t.Any) -> t.Any:
        return Closing(app(environ, start_response))

    return wrapper


def closes(events: list[t.Any]) -> int:
    return events.count("close")


# -- 1. the request scope --------------------------------------------------------------


def test_raw_app_gets_a_request_scope_its_children_see(serve, gates):
    after_response = gates()
    events: list[t.Any] = []
    seen: dict[str, t.Any] = {}
    kids: list[gevent.Greenlet] = []

    def look() -> dict[str, t.Any]:
        scope = geventctx.current_scope()
        return {"tag": tag.get(), "scope": scope, "started": scope.response_started if scope else None}

    def late_child() -> None:
        after_response.wait(JOIN_TIMEOUT)
        seen["late"] = look()
        events.append("child-end")

    def app(environ: dict[str, t.Any], start_response: t.Any) -> t.Any:
        tag.set("app-tag")
        scope = geventctx.current_scope()
        seen["scope"] = scope
        seen["environ_scope"] = environ.get(ENVIRON_SCOPE)
        seen["before_start"] = scope.response_started
        seen["early"] = geventctx.spawn(look).get(timeout=JOIN_TIMEOUT)  # before start_response
        kids.append(geventctx.spawn(late_child))
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
        seen["after_start"] = scope.response_started
        return RecordingIterable([b"ok"], events)

    server = serve(ContextMiddleware(app))
    response = server.request("POST", "/items/7?x=1", body=b"")
    assert response.status == 200 and response.body == b"ok"
    assert events == []  # the child still holds the request: close waits
    after_response.set()
    wait_for(lambda: "close" in events, JOIN_TIMEOUT, "close")
    settle()

    scope = seen["scope"]
    assert isinstance(scope, Scope) and scope.label == "POST /items/7"
    assert seen["environ_scope"] is scope
    assert seen["before_start"] is False and seen["after_start"] is True
    assert seen["early"] == {"tag": "app-tag", "scope": scope, "started": False}
    assert seen["late"] == {"tag": "app-tag", "scope": scope, "started": True}
    assert events == ["child-end", "close"]
    assert scope.closed


def test_werkzeug_app_scope_and_response_started_seen_by_a_late_child(serve, gates):
    after_response = gates()
    events: list[t.Any] = []
    seen: dict[str, t.Any] = {}

    @Request.application
    def app(request: Request) -> Response:
        tag.set(request.args["who"])
        scope = geventctx.current_scope()
        seen["scope"] = scope
        seen["in_view"] = scope.response_started  # Werkzeug calls start_response after the view

        def late_child() -> None:
            after_response.wait(JOIN_TIMEOUT)
            now = geventctx.current_scope()
            seen["late"] = (tag.get(), now, now.response_started, request.args["who"])
            events.append("child-end")

        geventctx.spawn(late_child)
        response = Response("hello")
        response.call_on_close(lambda: events.append("close"))  # Werkzeug's end-of-request hook
        return response

    server = serve(ContextMiddleware(app))
    response = server.request("GET", "/hello/there?who=ada")
    assert response.status == 200 and response.body == b"hello"
    settle()
    assert events == []
    after_response.set()
    wait_for(lambda: "close" in events, JOIN_TIMEOUT, "close")
    settle()

    scope = seen["scope"]
    assert scope.label == "GET /hello/there"
    assert seen["in_view"] is False
    assert seen["late"] == ("ada", scope, True, "ada")
    assert events == ["child-end", "close"]


# -- 2. the body, shared --------------------------------------------------------------

JSON_DOC = {"items": list(range(1500)), "text": "caf\u00e9 " * 300}
JSON_BODY = json.dumps(JSON_DOC).encode()
FIELDS = {"name": "ada", "note": "n" * 3000}
FILE_CONTENT = os.urandom(7000)
FORM_BODY, FORM_TYPE = multipart(FIELDS, {"f": ("a.bin", FILE_CONTENT)})


def _pieces_of_input(request: Request) -> str:
    stream = request.environ["wsgi.input"]
    return sha(b"".join(iter(lambda: stream.read(777), b"")))


def _lines_of_input(request: Request) -> str:
    return sha(b"".join(iter(request.environ["wsgi.input"].readline, b"")))


#: Body consumers of a plain Werkzeug app, reduced to something comparable.
CONSUMERS: dict[str, t.Callable[[Request], t.Any]] = {
    "get_data": lambda r: sha(r.get_data()),
    "stream": lambda r: sha(r.stream.read()),
    "input": lambda r: sha(r.environ["wsgi.input"].read()),
    "input_pieces": _pieces_of_input,  # 777-byte reads: partial reads must not interleave
    "readline": _lines_of_input,
    "form": lambda r: r.form.to_dict(flat=False),
    "files": lambda r: {name: sha(upload.read()) for name, upload in r.files.items()},
    "own_request": lambda r: sha(Request(r.environ).get_data()),  # a second Request on the environ
}


def expected(name: str, body: bytes) -> t.Any:
    if name == "form":
        return {k: [v] for k, v in FIELDS.items()}
    if name == "files":
        return {"f": sha(FILE_CONTENT)}
    return sha(body)


@dataclass
class Outcome:
    who: str
    consumer: str
    value: t.Any = None
    error: BaseException | None = None
    body_was_in: bool | None = None  # had the body been read when this reader started?


@dataclass
class Probe:
    outcomes: list[Outcome] = field(default_factory=list)
    counters: list[list[int]] = field(default_factory=list)
    events: list[t.Any] = field(default_factory=list)
    scopes: list[Scope] = field(default_factory=list)
    inputs: list[t.Any] = field(default_factory=list)


def read_everywhere(request: Request, parent: str, children: t.Sequence[str], outcomes: list[Outcome]) -> None:
    """The children are spawned first and the parent reads right after, so all
    of them ask for the body while it is still arriving."""

    def consume(who: str, name: str) -> None:
        body = request.environ.get(ENVIRON_BODY)
        outcome = Outcome(who, name, body_was_in=body.loaded if isinstance(body, SharedBody) else None)
        try:
            outcome.value = CONSUMERS[name](request)
        except Exception as exc:
            outcome.error = exc
        outcomes.append(outcome)

    kids = [geventctx.spawn(consume, f"child{i}", name) for i, name in enumerate(children)]
    consume("parent", parent)
    gevent.joinall(kids, timeout=JOIN_TIMEOUT)
    for kid in kids:
        if not kid.dead:
            kid.kill(block=True, timeout=1)
            outcomes.append(Outcome("hung", "?", error=AssertionError("a reader hung")))


def reader_app(parent: str, children: t.Sequence[str], reraise: bool = False, **options: t.Any) -> tuple[t.Any, Probe]:
    """counting -> ContextMiddleware(**options) -> recording close -> Werkzeug app."""
    probe = Probe()

    @Request.application
    def read(request: Request) -> Response:
        probe.scopes.append(geventctx.current_scope())
        probe.inputs.append(request.environ["wsgi.input"])
        read_everywhere(request, parent, children, probe.outcomes)
        mine = next(o for o in probe.outcomes if o.who == "parent")
        if reraise and mine.error is not None:
            raise mine.error  # Request.application turns an HTTPException into its response
        return Response("read")

    app, probe.counters = counting(ContextMiddleware(recording_close(read, probe.events), **options))
    return app, probe


def send(server: t.Any, body: bytes, content_type: str, transfer: str, **kwargs: t.Any) -> t.Any:
    return upload(server, "/read", body, content_type, transfer, CLIENT_TIMEOUT, **kwargs)


MIXES = [  # (body, content type, the parent's consumer, the children's consumers)
    pytest.param(JSON_BODY, "application/json", "get_data", ["stream", "input", "input_pieces"], id="json-get_data"),
    pytest.param(FORM_BODY, FORM_TYPE, "form", ["files", "get_data", "input_pieces"], id="form-form"),
    pytest.param(FORM_BODY, FORM_TYPE, "input", ["form", "readline", "own_request"], id="form-input"),
]


@pytest.mark.parametrize("transfer", ["trickled", "chunked"])
@pytest.mark.parametrize("body, content_type, parent, children", MIXES)
def test_concurrent_readers_get_the_whole_body_read_once(serve, transfer, body, content_type, parent, children):
    app, probe = reader_app(parent, children)
    response = send(serve(app), body, content_type, transfer)

    assert response.status == 200, response.body
    assert len(probe.outcomes) == 1 + len(children)
    for outcome in probe.outcomes:
        assert outcome.error is None, f"{outcome.who} {outcome.consumer}: {outcome.error!r}"
        assert outcome.value == expected(outcome.consumer, body), f"{outcome.who} {outcome.consumer} got other data"
    # They really contended: every child asked while the body was still arriving.
    assert [o.body_was_in for o in probe.outcomes if o.who != "parent"] == [False] * len(children)
    assert isinstance(probe.inputs[0], SharedBody)
    # The socket was read once: exactly the body.
    assert probe.counters == [[len(body)]]
    assert closes(probe.events) == 1


@pytest.mark.parametrize("transfer", ["trickled", "chunked"])
def test_control_body_off_concurrent_readers_lose_data(serve, transfer):
    # body="off" leaves wsgi.input alone: the same readers step on each other.
    app, probe = reader_app("get_data", ["stream", "input", "input_pieces"], body="off")
    response = send(serve(app), JSON_BODY, "application/json", transfer)

    assert response.status == 200
    assert len(probe.outcomes) == 4
    assert not isinstance(probe.inputs[0], SharedBody)
    full = sha(JSON_BODY)
    cheated = [o for o in probe.outcomes if o.error is not None or o.value != full]
    assert cheated, "without the shared body every reader got the whole body: the control proves nothing"


def test_child_reading_only_after_the_response_gets_the_whole_body(serve, gates):
    # Nobody read the body before the response: close() must take it off the
    # socket before the server discards it, or the late child gets nothing.
    go = gates()
    events: list[t.Any] = []

    @Request.application
    def app(request: Request) -> Response:
        def late_reader(name: str) -> None:
            go.wait(JOIN_TIMEOUT)
            events.append((name, CONSUMERS[name](request)))

        geventctx.spawn(late_reader, "input")
        geventctx.spawn(late_reader, "get_data")
        return Response("sent")

    wsgi, counters = counting(ContextMiddleware(recording_close(app, events)))
    data = os.urandom(50_000)
    response = serve(wsgi).request(
        "POST", "/late", headers={"Content-Type": "application/octet-stream"}, body=data, timeout=CLIENT_TIMEOUT
    )
    assert response.status == 200 and response.body == b"sent"
    assert events == []
    go.set()
    wait_for(lambda: "close" in events, JOIN_TIMEOUT, "close after the late reader")
    settle()
    assert events == [("input", sha(data)), ("get_data", sha(data)), "close"]
    assert counters == [[len(data)]]


# -- 3. close(): once, after every child, without delaying the response -------------------

ENDINGS = [
    "returned",
    "raised",
    "killed_by_app",
    "killed_by_other_greenlet",
    "killed_before_start",
    "spawn_later_killed_before_start",
]


def _werkzeug_app(work: t.Callable[[], None], events: list[t.Any]) -> t.Any:
    @Request.application
    def app(request: Request) -> Response:
        work()
        response = Response("done")
        response.call_on_close(lambda: events.append("close"))
        return response

    return app


def _raw_app(work: t.Callable[[], None], events: list[t.Any]) -> t.Any:
    def app(environ: dict[str, t.Any], start_response: t.Any) -> t.Any:
        work()
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "4")])
        return RecordingIterable([b"done"], events)

    return app


@pytest.mark.parametrize("kind", [_raw_app, _werkzeug_app], ids=["raw", "werkzeug"])
@pytest.mark.parametrize("ending", ENDINGS)
def test_close_runs_once_after_every_child_however_it_ended(serve, gates, caplog, kind, ending):
    caplog.set_level(logging.ERROR, logger="geventctx")
    after_response = gates()
    events: list[t.Any] = []
    children: list[gevent.Greenlet] = []
    ran: list[str] = []

    def child() -> None:
        ran.append("child")
        try:
            after_response.wait()
            if ending == "raised":
                raise ValueError("child failed on purpose")
        finally:
            events.append("child-end")

    def work() -> None:
        if ending == "spawn_later_killed_before_start":
            kid = geventctx.spawn_later(30, child)
        else:
            kid = geventctx.spawn(child)
        children.append(kid)
        if ending == "killed_by_app":
            gevent.sleep(0)  # let it start and block
            kid.kill()
        elif ending.endswith("killed_before_start"):
            kid.kill()
        events.append("app-end")

    server = serve(ContextMiddleware(kind(work, events)))
    response = server.request("GET", "/work")
    # The response is complete while the child may still be blocked.
    assert response.status == 200 and response.body == b"done"
    (kid,) = children
    if ending in ("returned", "raised", "killed_by_other_greenlet"):
        settle()
        assert not kid.dead and events == ["app-end"]  # close waits for the child
        if ending == "killed_by_other_greenlet":
            gevent.spawn(kid.kill).join()
        else:
            after_response.set()
    wait_for(lambda: "close" in events, JOIN_TIMEOUT, "close")
    settle()

    if ending.endswith("killed_before_start"):
        assert ran == [] and events == ["app-end", "close"]
    else:
        assert ran == ["child"]
        if ending == "killed_by_app":
            assert events == ["child-end", "app-end", "close"]
        else:
            assert events == ["app-end", "child-end", "close"]
    failures = [r for r in caplog.records if r.name == "geventctx" and r.levelno >= logging.ERROR]
    assert len(failures) == (1 if ending == "raised" else 0), [r.getMessage() for r in failures]


def test_close_waits_for_grandchildren_and_several_children(serve, gates):
    first, second = gates(), gates()
    events: list[t.Any] = []

    def grandchild() -> None:
        second.wait(JOIN_TIMEOUT)
        events.append("grandchild-end")

    def child(n: int) -> None:
        first.wait(JOIN_TIMEOUT)
        if n == 0:
            geventctx.spawn(grandchild)  # after the response, from a live child
        events.append(f"child{n}-end")

    def app(environ: dict[str, t.Any], start_response: t.Any) -> t.Any:
        for n in range(3):
            geventctx.spawn(child, n)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return RecordingIterable([b"ok"], events)

    server = serve(ContextMiddleware(app))
    assert server.request("GET", "/").status == 200
    first.set()
    wait_for(lambda: len(events) == 3, JOIN_TIMEOUT, "children end")
    settle()
    assert "close" not in events
    second.set()
    wait_for(lambda: "close" in events, JOIN_TIMEOUT, "close")
    settle()
    assert events[-2:] == ["grandchild-end", "close"] and closes(events) == 1


@pytest.mark.parametrize("children", [0, 1])
def test_app_raising_still_finishes_the_scope(serve, gates, caplog, children):
    release = gates()
    events: list[t.Any] = []
    scopes: list[Scope] = []

    def child() -> None:
        release.wait(JOIN_TIMEOUT)
        events.append("child-end")

    def app(environ: dict[str, t.Any], start_response: t.Any) -> t.Any:
        scope = geventctx.current_scope()
        scopes.append(scope)
        scope.on_close(events.append, "scope-closed")
        for _ in range(children):
            geventctx.spawn(child)
        raise KeyError("app failed on purpose")

    server = serve(ContextMiddleware(app))
    response = server.request("GET", "/broken")
    assert response.status == 500  # pywsgi's own error response, not delayed
    (scope,) = scopes
    if children:
        settle()
        assert events == [] and not scope.closed
        release.set()
    assert scope.wait_closed(timeout=JOIN_TIMEOUT)
    settle()
    assert events == ["child-end"] * children + ["scope-closed"]
    assert [r for r in caplog.records if r.name == "geventctx"] == []


# -- 4. streaming responses ------------------------------------------------------------


def test_streaming_response_streams_and_close_waits_for_a_child_spawned_mid_stream(serve, gates):
    after_response = gates()
    client_got_first = Event()
    events: list[t.Any] = []
    seen: dict[str, t.Any] = {}

    def child() -> None:
        after_response.wait(JOIN_TIMEOUT)
        scope = geventctx.current_scope()
        seen["child"] = (scope, scope.response_started, tag.get())
        events.append("child-end")

    def stream() -> t.Iterator[bytes]:
        yield b"chunk0;"
        # Only a response that really streams lets the client see chunk0 now.
        seen["streamed"] = client_got_first.wait(JOIN_TIMEOUT)
        for n in range(1, 5):
            gevent.sleep(0.005)
            if n == 2:
                tag.set("mid-stream")
                geventctx.spawn(child)  # the scope is still current while iterating
            yield b"chunk%d;" % n

    def app(environ: dict[str, t.Any], start_response: t.Any) -> t.Any:
        seen["scope"] = geventctx.current_scope()
        start_response("200 OK", [("Content-Type", "text/plain")])
        return RecordingIterable(stream(), events)

    server = serve(ContextMiddleware(app))
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=CLIENT_TIMEOUT)
    try:
        with gevent.Timeout(CLIENT_TIMEOUT):
            sock.sendall(b"GET /stream HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            received = b""
            while b"chunk0;" not in received:
                data = sock.recv(65536)
                assert data, "connection closed before the first chunk"
                received += data
            client_got_first.set()
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                received += data
    finally:
        sock.close()
    head, _, rest = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"chunked" in head.lower()
    assert _dechunk(rest) == b"chunk0;chunk1;chunk2;chunk3;chunk4;"
    assert seen["streamed"] is True
    settle()
    assert events == []  # close waits for the child spawned mid-stream
    after_response.set()
    wait_for(lambda: "close" in events, JOIN_TIMEOUT, "close")
    settle()
    assert events == ["child-end", "close"]
    assert seen["child"] == (seen["scope"], True, "mid-stream")


# -- 5. stacking -------------------------------------------------------------------------


def stacked_flask(**config: t.Any) -> tuple[Flask, list[t.Any], list[list[int]]]:
    """A Flask app with GeventContext and, around its wsgi_app, ContextMiddleware
    (and outside it, the socket counter)."""
    middleware_options = config.pop("MIDDLEWARE", {})
    app = Flask(__name__)
    app.config.update(config)
    GeventContext(app)
    events: list[t.Any] = []

    @app.teardown_request
    def teardown(exc: BaseException | None) -> None:
        events.append("teardown_request")

    @app.before_request
    def mark_request_app_context() -> None:
        g.request_app_context = True

    @app.teardown_appcontext
    def teardown_app(exc: BaseException | None) -> None:
        # Each child's own app context is torn down too (G4): only what it set is in g.
        events.append("teardown_appcontext" if g.pop("request_app_context", None) else "child teardown_appcontext")

    @app.after_request
    def hook_close(response: t.Any) -> t.Any:
        response.call_on_close(lambda: events.append("close"))  # the iterable's close()
        return response

    app.wsgi_app, counters = counting(ContextMiddleware(app.wsgi_app, **middleware_options))  # type: ignore[method-assign]
    return app, events, counters


def test_stacked_adapters_both_waiting_log_each_straggler_once(serve, gates, caplog):
    # Flask's request inside the middleware's: two watchers see the same
    # children (the middleware's through the nested scope), each checking
    # again every period. Each straggler is one line in the log, not one per
    # watcher or per check.
    caplog.set_level(logging.WARNING, logger="geventctx")
    app, events, counters = stacked_flask(
        GEVENTCTX_STRAGGLER_TIMEOUT=0.05,
        GEVENTCTX_STRAGGLER_POLICY="wait",
        MIDDLEWARE={"straggler_timeout": 0.05, "straggler_policy": "wait"},
    )
    release = gates()

    def first_straggler() -> None:
        release.wait()

    def second_straggler() -> None:
        release.wait()

    @app.get("/slow")
    def slow() -> str:
        geventctx.spawn(first_straggler)
        geventctx.spawn(second_straggler)
        return "ok"

    def logged() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "geventctx" and "straggler" in r.getMessage()]

    assert serve(app).request("GET", "/slow").status == 200
    wait_for(lambda: len(logged()) >= 2, JOIN_TIMEOUT, "both stragglers logged")
    settle(30)  # many periods of both watchers
    lines = logged()
    names = sorted(line.split()[2].rpartition(".")[2] for line in lines)
    assert names == ["first_straggler", "second_straggler"], lines
    assert all("teardown keeps waiting" in line for line in lines)
    assert "close" not in events  # "wait": both layers wait on
    release.set()
    wait_for(lambda: "close" in events, JOIN_TIMEOUT, "teardown after the stragglers")
    assert len(logged()) == 2


FLASK_CONSUMERS: dict[str, t.Callable[[], t.Any]] = {
    "get_data": lambda: sha(flask_request.get_data()),
    "json": lambda: sha(json.dumps(flask_request.json).encode()),
    "stream": lambda: sha(flask_request.stream.read()),
    "input": lambda: sha(flask_request.environ["wsgi.input"].read()),
}


@pytest.mark.parametrize("transfer", ["trickled", "chunked"])
def test_stacked_flask_body_is_wrapped_once_and_read_once(serve, gates, transfer):
    app, events, counters = stacked_flask()
    late = gates()
    seen: dict[str, t.Any] = {}
    results: list[tuple[str, t.Any]] = []

    def consume(name: str) -> None:
        try:
            results.append((name, FLASK_CONSUMERS[name]()))
        except Exception as exc:
            results.append((name, exc))

    def late_child() -> None:
        late.wait(JOIN_TIMEOUT)
        events.append("child-end")

    @app.route("/read", methods=["POST"])
    def read() -> str:
        environ = flask_request.environ
        inner = geventctx.current_scope()
        seen.update(inner=inner, outer=environ.get(ENVIRON_SCOPE), input=environ["wsgi.input"])
        seen.update(environ_body=environ.get(ENVIRON_BODY), stream=flask_request.stream)
        seen.update(flask_body=flask_request.shared_body())
        kids = [geventctx.spawn(consume, name) for name in ("json", "stream", "input")]
        consume("get_data")
        gevent.joinall(kids, timeout=JOIN_TIMEOUT)
        geventctx.spawn(late_child)
        events.append("view-end")
        return "read"

    response = send(serve(app), JSON_BODY, "application/json", transfer)
    assert response.status == 200 and response.body == b"read"
    settle()
    # the child pins Flask's teardown and the middleware's close
    assert [e for e in events if e != "child teardown_appcontext"] == ["view-end"]
    late.set()
    wait_for(lambda: "close" in events, JOIN_TIMEOUT, "close")
    settle()

    inner, outer = seen["inner"], seen["outer"]
    assert isinstance(outer, Scope) and inner is not outer and inner.label == outer.label == "POST /read"
    body = seen["input"]
    assert isinstance(body, SharedBody)
    # One SharedBody for both layers, not a SharedBody around a SharedBody.
    assert body is seen["environ_body"] is seen["flask_body"]
    # Flask's request.stream reads that one body (a view of it with Werkzeug's stream semantics).
    assert isinstance(seen["stream"], RequestStream) and seen["stream"].body is body
    assert sorted(results) == sorted((name, sha(JSON_BODY)) for name in FLASK_CONSUMERS)
    assert counters == [[len(JSON_BODY)]]
    # Flask's teardown once, in its order, after the child; the iterable's close once, after it.
    assert events.count("child teardown_appcontext") == 4  # three readers and the late child, once each
    assert [e for e in events if e != "child teardown_appcontext"] == [
        "view-end", "child-end", "teardown_request", "teardown_appcontext", "close"
    ]
    assert inner.closed and outer.closed


@pytest.mark.parametrize("transfer", ["announced", "chunked"])
def test_stacked_flask_max_content_length_is_413_for_every_reader(serve, transfer):
    app, events, counters = stacked_flask(MAX_CONTENT_LENGTH=1000)
    errors: list[t.Any] = []

    def consume(name: str) -> None:
        try:
            errors.append(FLASK_CONSUMERS[name]())
        except Exception as exc:
            errors.append(exc)

    @app.route("/read", methods=["POST"])
    def read() -> str:
        kids = [geventctx.spawn(consume, name) for name in ("stream", "input")]
        consume("get_data")
        gevent.joinall(kids, timeout=JOIN_TIMEOUT)
        if isinstance(errors[0], Exception):
            raise errors[0]
        return "read everything"

    body = os.urandom(5000)
    headers = {"Content-Type": "application/octet-stream"}
    server = serve(app)
    if transfer == "announced":
        response = server.request("POST", "/read", headers=headers, body=body, timeout=CLIENT_TIMEOUT)
    else:
        response = server.request("POST", "/read", headers=headers, chunks=pieces(body, 10), timeout=CLIENT_TIMEOUT)
    assert response.status == 413
    wait_for(lambda: "close" in events, JOIN_TIMEOUT, "close")
    assert len(errors) == 3 and isinstance(errors[0], RequestEntityTooLarge)
    assert all(error is errors[0] for error in errors)
    assert counters[0][0] <= 1001
    assert events.count("teardown_request") == 1 and closes(events) == 1


def test_stacked_middleware_limit_still_counts_when_flask_sets_none(serve):
    # The middleware's max_content_length is a server-wide cap: a Flask app
    # without MAX_CONTENT_LENGTH inside it must not lift it.
    app, events, counters = stacked_flask(MIDDLEWARE={"max_content_length": 1000})

    @app.route("/read", methods=["POST"])
    def read() -> str:
        return str(len(flask_request.get_data()))

    body = os.urandom(5000)
    response = serve(app).request(
        "POST", "/read", headers={"Content-Type": "application/octet-stream"}, chunks=pieces(body, 10),
        timeout=CLIENT_TIMEOUT,
    )
    assert response.status == 413, response.body
    assert counters[0][0] <= 1001


def test_middleware_inside_middleware_manages_the_request_once(serve, gates):
    after_response = gates()
    events: list[t.Any] = []
    seen: dict[str, t.Any] = {}

    def child() -> None:
        after_response.wait(JOIN_TIMEOUT)
        events.append("child-end")

    def app(environ: dict[str, t.Any], start_response: t.Any) -> t.Any:
        seen["scope"] = geventctx.current_scope()
        seen["environ_scope"] = environ[ENVIRON_SCOPE]
        seen["data"] = environ["wsgi.input"].read()
        geventctx.spawn(child)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return RecordingIterable([b"ok"], events)

    def between(environ: dict[str, t.Any], start_response: t.Any) -> t.Any:
        # What the outer middleware set up, as the inner one receives it.
        seen["outer_scope"] = environ[ENVIRON_SCOPE]
        seen["outer_input"] = environ["wsgi.input"]
        return inner(environ, start_response)

    inner = ContextMiddleware(app)
    wsgi, counters = counting(ContextMiddleware(between))
    response = serve(wsgi).request("POST", "/twice", body=b"x" * 3000, piece=500, delay=0.005)
    assert response.status == 200 and response.body == b"ok"
    settle()
    assert events == []
    after_response.set()
    wait_for(lambda: "close" in events, JOIN_TIMEOUT, "close")
    settle()

    assert seen["scope"] is seen["environ_scope"] is seen["outer_scope"]  # no second scope
    assert seen["outer_input"].__class__ is SharedBody and seen["data"] == b"x" * 3000
    assert counters == [[3000]]
    assert events == ["child-end", "close"]


# -- 6. failures -------------------------------------------------------------------------


def assert_same_error(outcomes: list[Outcome], n: int, kind: type[BaseException]) -> BaseException:
    assert len(outcomes) == n, outcomes
    first = outcomes[0].error
    assert isinstance(first, kind), f"{outcomes[0].who} {outcomes[0].consumer}: {first!r}"
    for outcome in outcomes:
        assert outcome.value is None, f"{outcome.who} {outcome.consumer} got data"
        assert outcome.error is first, f"{outcome.who} {outcome.consumer}: {outcome.error!r} is not {first!r}"
    return first


def test_client_disconnect_mid_upload_reaches_every_reader(serve):
    app, probe = reader_app("get_data", ["form", "input", "input_pieces"])
    server = serve(app)
    gone = server.request(
        "POST", "/read", headers={"Content-Type": FORM_TYPE}, body=FORM_BODY,
        piece=1000, delay=0.01, disconnect_after=4000, timeout=CLIENT_TIMEOUT,
    )
    assert gone is None
    wait_for(lambda: "close" in probe.events, JOIN_TIMEOUT, "readers and close")
    settle()

    error = assert_same_error(probe.outcomes, 4, ClientDisconnected)
    assert isinstance(error.__cause__, OSError)
    assert probe.scopes[0].closed
    assert closes(probe.events) == 1
    assert probe.counters[0][0] < len(FORM_BODY)


@pytest.mark.parametrize("transfer", ["announced", "chunked"])
def test_body_over_max_content_length_is_413_for_every_reader(serve, transfer):
    app, probe = reader_app("get_data", ["stream", "input", "form"], reraise=True, max_content_length=1000)
    body, content_type = multipart({"a": "b" * 4000}, {})
    server = serve(app)
    headers = {"Content-Type": content_type}
    if transfer == "announced":
        response = server.request("POST", "/read", headers=headers, body=body, timeout=CLIENT_TIMEOUT)
    else:
        response = server.request("POST", "/read", headers=headers, chunks=pieces(body, 10), timeout=CLIENT_TIMEOUT)

    assert response.status == 413
    assert_same_error(probe.outcomes, 4, RequestEntityTooLarge)
    assert probe.counters[0][0] <= 1001  # never more than one byte past the limit
    wait_for(lambda: "close" in probe.events, JOIN_TIMEOUT, "close")
    assert closes(probe.events) == 1


def test_body_within_max_content_length_is_read(serve):
    app, probe = reader_app("get_data", ["input"], max_content_length=len(JSON_BODY))
    response = send(serve(app), JSON_BODY, "application/json", "chunked")
    assert response.status == 200
    assert [o.value for o in probe.outcomes] == [sha(JSON_BODY)] * 2


# -- 7. children's errors, options -------------------------------------------------------


def _exploding_app(events: list[t.Any]) -> t.Any:
    def explode() -> None:
        raise ValueError("boom-in-child")

    @Request.application
    def app(request: Request) -> Response:
        kid = geventctx.spawn(explode)  # SITE:wsgi-explode
        kid.join(timeout=JOIN_TIMEOUT)
        response = Response(type(kid.exception).__name__)
        response.call_on_close(lambda: events.append("close"))
        return response

    return app


@pytest.fixture
def fresh_hub_error_handling(monkeypatch: pytest.MonkeyPatch) -> None:
    """gevent's own handle_error on this hub for the test, as in a fresh process,
    so that the middleware itself must install the logging hook."""
    hub = gevent.get_hub()
    monkeypatch.setattr(hub, "handle_error", type(hub).handle_error.__get__(hub))
    monkeypatch.setattr(hub, errorlog._MARK, False, raising=False)


@pytest.mark.usefixtures("fresh_hub_error_handling")
def test_child_exception_is_logged_once_with_request_and_site(serve, capfd, caplog):
    caplog.set_level(logging.DEBUG, logger="geventctx")
    events: list[t.Any] = []
    server = serve(ContextMiddleware(_exploding_app(events)))
    response = server.request("POST", "/explode?x=1", body=b"")
    assert response.status == 200 and response.body == b"ValueError"
    wait_for(lambda: "close" in events, JOIN_TIMEOUT, "close")
    settle()

    records = [r for r in caplog.records if r.name == "geventctx"]
    assert len(records) == 1, [r.getMessage() for r in records]
    (record,) = records
    message = record.getMessage()
    assert record.levelno == logging.ERROR
    assert "POST /explode" in message and "explode" in message
    assert f"{HERE}:{line_of('SITE:wsgi-explode')}" in message
    assert record.exc_info[0] is ValueError and str(record.exc_info[1]) == "boom-in-child"
    err = capfd.readouterr().err
    assert "boom-in-child" not in err  # logged, not also printed by gevent


@pytest.mark.usefixtures("fresh_hub_error_handling")
def test_log_child_errors_false_leaves_them_to_gevent(serve, capfd, caplog):
    caplog.set_level(logging.DEBUG, logger="geventctx")
    events: list[t.Any] = []
    # A first request through a logging middleware installs the hub's hook ...
    logging_server = serve(ContextMiddleware(_exploding_app(events)))
    assert logging_server.request("GET", "/logged").status == 200
    wait_for(lambda: "close" in events, JOIN_TIMEOUT, "close")
    assert len([r for r in caplog.records if r.name == "geventctx"]) == 1
    caplog.clear()
    capfd.readouterr()
    # ... which a middleware with log_child_errors=False must not use.
    server = serve(ContextMiddleware(_exploding_app(events), log_child_errors=False))
    response = server.request("GET", "/printed")
    assert response.status == 200 and response.body == b"ValueError"
    wait_for(lambda: closes(events) == 2, JOIN_TIMEOUT, "close")
    settle()
    assert [r for r in caplog.records if r.name == "geventctx"] == []
    err = capfd.readouterr().err
    assert "boom-in-child" in err and "failed with ValueError" in err


def test_straggler_is_logged_with_its_site_and_killed_by_policy(serve, caplog):
    caplog.set_level(logging.WARNING, logger="geventctx")
    never = Event()  # nobody sets it: only the kill policy ends the child
    events: list[t.Any] = []

    def hangs_forever() -> None:
        try:
            never.wait()
        except gevent.GreenletExit:
            events.append("child-killed")
            raise

    def app(environ: dict[str, t.Any], start_response: t.Any) -> t.Any:
        geventctx.spawn(hangs_forever)  # SITE:wsgi-straggler
        start_response("200 OK", [("Content-Type", "text/plain")])
        return RecordingIterable([b"ok"], events)

    server = serve(ContextMiddleware(app, straggler_timeout=0.1, straggler_policy="kill"))
    assert server.request("GET", "/hang").status == 200
    wait_for(lambda: "close" in events, JOIN_TIMEOUT, "close after the kill")
    records = [r for r in caplog.records if r.name == "geventctx" and "straggler" in r.getMessage()]
    assert len(records) == 1
    message = records[0].getMessage()
    assert "hangs_forever" in message and "GET /hang" in message
    assert f"{HERE}:{line_of('SITE:wsgi-straggler')}" in message
    assert events == ["child-killed", "close"]


@pytest.mark.parametrize(
    "options, match",
    [
        ({"body": "buffer"}, "body"),
        ({"body": "x"}, "body"),
        ({"straggler_policy": "x"}, "straggler_policy"),
    ],
)
def test_invalid_options_are_refused(options, match):
    def app(environ: dict[str, t.Any], start_response: t.Any) -> t.Any:
        raise AssertionError("never called")

    with pytest.raises(ValueError, match=match):
        ContextMiddleware(app, **options)


@pytest.mark.parametrize("body, shared", [("tee", True), ("lock", True), ("off", False)])
def test_valid_options_are_accepted_and_take_effect(serve, body, shared):
    # Accepted, and each one does what it names: "lock" is the old name of
    # "tee", "off" leaves the server's input alone; the straggler options
    # reach the watcher ("kill" and no limit: nobody is logged or killed).
    seen: dict[str, t.Any] = {}

    def app(environ: dict[str, t.Any], start_response: t.Any) -> t.Any:
        seen["input"] = environ["wsgi.input"]
        seen["data"] = environ["wsgi.input"].read(int(environ["CONTENT_LENGTH"]))
        seen["child"] = geventctx.spawn(gevent.sleep, 0.1)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    middleware = ContextMiddleware(app, body=body, straggler_policy="kill", straggler_timeout=None)
    server = serve(middleware)
    assert server.request("POST", "/", body=b"0123456789").status == 200
    assert isinstance(seen["input"], SharedBody) is shared
    assert seen["data"] == b"0123456789"
    seen["child"].join(JOIN_TIMEOUT)
    assert seen["child"].dead and seen["child"].value is None  # ended by itself, not a GreenletExit
