"""G5 over a real gevent.pywsgi server: one request body, read once, for everyone.

Every test runs a Flask app with ``GeventContext`` behind a real
``gevent.pywsgi.WSGIServer`` on 127.0.0.1 and talks to it with the raw-socket
client of ``httpkit``: Content-Length bodies trickled in pieces, chunked
bodies, malformed chunking, clients that vanish mid-upload. The parent
(the view) and children handed its context (``geventctx.spawn``) consume the
body concurrently through every Werkzeug consumer; a small WSGI middleware
counts the bytes the app takes from the server's real ``wsgi.input``.
"""

from __future__ import annotations

import hashlib
import json
import os
import typing as t
from dataclasses import dataclass, field

import gevent
import pytest
from flask import Flask, request
from gevent.event import Event
from httpkit import CountingInput, multipart, pieces, upload, wait_for
from werkzeug.exceptions import BadRequest, ClientDisconnected, RequestEntityTooLarge

import geventctx
from geventctx import BodyReadError
from geventctx.body import SharedBody
from geventctx.flask import GeventContext

JOIN_TIMEOUT = 5  # every wait in a view is bounded
CLIENT_TIMEOUT = 5  # and so is every wait of the client


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- what the client sends -----------------------------------------------------------

JSON_DOC = {"items": list(range(1200)), "text": "caf\u00e9 " * 200}
JSON_BODY = json.dumps(JSON_DOC).encode()
FIELDS = {"name": "ada", "note": "n" * 3000}
FILE_CONTENT = os.urandom(6000)
FORM_BODY, FORM_TYPE = multipart(FIELDS, {"f": ("a.bin", FILE_CONTENT)})
QUERY = {"q": ["1"]}  # every request goes to /read?q=1, so `values` has args + form

#: Each body consumer, reduced to something comparable.
CONSUMERS: dict[str, t.Callable[[], t.Any]] = {
    "get_data": lambda: sha(request.get_data()),
    "data": lambda: sha(request.data),
    "json": lambda: request.json,
    "get_json": lambda: request.get_json(),
    "stream": lambda: sha(request.stream.read()),
    "input_stream": lambda: sha(request.input_stream.read()),
    "form": lambda: request.form.to_dict(flat=False),
    "files": lambda: {name: sha(upload.read()) for name, upload in request.files.items()},
    "values": lambda: request.values.to_dict(flat=False),
}


#: The consumers that parse a form body (Werkzeug does not cache it as raw data).
PARSERS = ("form", "files", "values", "data")
#: The consumers that read the raw body.
RAW = ("get_data", "stream", "input_stream")


def expected(name: str, body: bytes, after_parse: bool = False) -> t.Any:
    """What consumer ``name`` must return for ``body`` (JSON_BODY or FORM_BODY),
    ``after_parse``: when a form parse started before it (G5: a raw read then
    returns what Werkzeug returns after a form parse, ``b""``)."""
    if name == "data" and body is FORM_BODY:
        return sha(b"")  # as Werkzeug documents: empty for form data
    if name in RAW and body is FORM_BODY and after_parse:
        return sha(b"")  # the form parse consumed the body, as Werkzeug's stream
    if name in ("get_data", "data", "stream", "input_stream"):
        return sha(body)
    if name in ("json", "get_json"):
        return JSON_DOC
    if name == "form":
        return {k: [v] for k, v in FIELDS.items()}
    if name == "files":
        return {"f": sha(FILE_CONTENT)}
    if name == "values":
        return {**QUERY, **{k: [v] for k, v in FIELDS.items()}}
    raise AssertionError(name)


# -- the app side --------------------------------------------------------------------


@dataclass
class Outcome:
    who: str
    consumer: str
    value: t.Any = None
    error: BaseException | None = None
    body_was_in: bool | None = None  # had the body been read when this reader started?


def shared_body() -> SharedBody | None:
    return request.shared_body()


def read_everywhere(parent: str, children: t.Sequence[str], outcomes: list[Outcome]) -> None:
    """Consume the body with ``parent`` here and each of ``children`` in a child.

    The children are spawned first and the parent reads right after, so they
    all ask for the body while it is still arriving. Children are joined with
    a bound; one still running is killed and reported.
    """

    def consume(who: str, name: str) -> None:
        body = shared_body()
        outcome = Outcome(who, name, body_was_in=None if body is None else body.loaded)
        try:
            outcome.value = CONSUMERS[name]()
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


def count_socket_reads(app: Flask) -> list[list[int]]:
    """Wrap ``app.wsgi_app``: one counter of bytes read per request."""
    counters: list[list[int]] = []
    inner = app.wsgi_app

    def middleware(environ: dict[str, t.Any], start_response: t.Any) -> t.Any:
        counter = [0]
        counters.append(counter)
        environ["wsgi.input"] = CountingInput(environ["wsgi.input"], counter)
        return inner(environ, start_response)

    app.wsgi_app = middleware  # type: ignore[method-assign]
    return counters


def make_app(mode: str = "tee", **config: t.Any) -> Flask:
    app = Flask(__name__)
    app.config["GEVENTCTX_BODY"] = mode
    app.config.update(config)
    GeventContext(app)
    return app


@dataclass
class Probe:
    """What a reader app saw: readers' outcomes, bytes read, teardowns, scopes."""

    outcomes: list[Outcome] = field(default_factory=list)
    counters: list[list[int]] = field(default_factory=list)
    teardowns: list[BaseException | None] = field(default_factory=list)
    scopes: list[geventctx.Scope] = field(default_factory=list)


def reader_app(
    parent: str, children: t.Sequence[str], mode: str = "tee", reraise: bool = False, **config: t.Any
) -> tuple[Flask, Probe]:
    """An app whose view ``/read`` runs :func:`read_everywhere`.

    With ``reraise``, the view re-raises the parent's error after every
    reader finished, so the client sees the status Flask gives that error.
    """
    app = make_app(mode, **config)
    probe = Probe(counters=count_socket_reads(app))

    @app.teardown_request
    def count_teardown(exc: BaseException | None) -> None:
        probe.teardowns.append(exc)

    @app.route("/read", methods=["POST"])
    def read() -> str:
        probe.scopes.append(geventctx.current_scope())
        read_everywhere(parent, children, probe.outcomes)
        mine = next(o for o in probe.outcomes if o.who == "parent")
        if reraise and mine.error is not None:
            raise mine.error
        return "read"

    return app, probe


def post_octets(server: t.Any, data: bytes) -> t.Any:
    """POST ``data`` to /read as application/octet-stream, in one piece."""
    return server.request(
        "POST", "/read", headers={"Content-Type": "application/octet-stream"}, body=data, timeout=CLIENT_TIMEOUT
    )


def send(server: t.Any, body: bytes, content_type: str, transfer: str, **kwargs: t.Any) -> t.Any:
    return upload(server, "/read?q=1", body, content_type, transfer, CLIENT_TIMEOUT, **kwargs)


# -- 1. any mix of consumers: complete, identical, read once ---------------------------

JSON = (JSON_BODY, "application/json")
FORM = (FORM_BODY, FORM_TYPE)
MIXES = [  # (body, content type, the parent's consumer, the children's consumers)
    pytest.param(*JSON, "json", ["get_data", "stream", "input_stream", "get_json"], id="json-parent-json"),
    pytest.param(*JSON, "stream", ["json", "data", "get_data"], id="json-parent-stream"),
    pytest.param(*FORM, "form", ["files", "get_data", "values", "input_stream"], id="form-parent-form"),
    pytest.param(*FORM, "get_data", ["files", "form", "stream"], id="form-parent-get_data"),
    pytest.param(*FORM, "files", ["values", "data", "form", "files"], id="form-parent-files"),
]


@pytest.mark.parametrize("transfer", ["trickled", "chunked"])
@pytest.mark.parametrize("body, content_type, parent, children", MIXES)
def test_every_consumer_gets_the_whole_body_read_once(serve, transfer, body, content_type, parent, children):
    app, probe = reader_app(parent, children)
    response = send(serve(app), body, content_type, transfer)

    assert response.status == 200, response.body
    outcomes = probe.outcomes
    assert len(outcomes) == 1 + len(children)
    # The readers start in this order (the parent first, then each child up
    # to its first wait): a raw read that starts after a form parse began
    # gets what Werkzeug gives after one, b"".
    order = [parent, *children]
    for outcome in outcomes:
        assert outcome.error is None, f"{outcome.who} {outcome.consumer}: {outcome.error!r}"
        index = 0 if outcome.who == "parent" else 1 + int(outcome.who.removeprefix("child"))
        after_parse = any(name in PARSERS for name in order[:index])
        assert outcome.value == expected(outcome.consumer, body, after_parse), (
            f"{outcome.who} {outcome.consumer} got other data"
        )
    # The readers really contended: the children asked while the body was arriving.
    assert [o.body_was_in for o in outcomes if o.who != "parent"] == [False] * len(children)
    # The socket was read once: exactly the body, not once per consumer, not less.
    assert probe.counters == [[len(body)]]
    assert len(probe.teardowns) == 1


@pytest.mark.parametrize("transfer", ["trickled", "chunked"])
def test_control_without_the_shared_body_concurrent_readers_lose_data(serve, transfer):
    # GEVENTCTX_BODY="off" is plain Werkzeug: the same concurrent readers step
    # on each other (interleaved, empty or failed reads) -- what the shared body fixes.
    app, probe = reader_app("get_data", ["get_data", "stream", "input_stream"], mode="off")
    response = send(serve(app), JSON_BODY, "application/json", transfer)

    assert response.status == 200
    assert len(probe.outcomes) == 4
    full = expected("get_data", JSON_BODY)
    cheated = [o for o in probe.outcomes if o.error is not None or o.value != full]
    assert cheated, "without the shared body every reader got the whole body: the control proves nothing"


# -- 2. failures reach every consumer as the same error; nobody hangs ------------------


def assert_same_error(outcomes: list[Outcome], n: int, kind: type[BaseException]) -> BaseException:
    assert len(outcomes) == n, outcomes
    first = outcomes[0].error
    assert isinstance(first, kind), f"{outcomes[0].who} {outcomes[0].consumer}: {first!r}"
    for outcome in outcomes:
        assert outcome.value is None, f"{outcome.who} {outcome.consumer} got data"
        assert outcome.error is first, f"{outcome.who} {outcome.consumer}: {outcome.error!r} is not {first!r}"
    return first


def test_client_disconnect_mid_upload_reaches_every_reader(serve):
    children = ["form", "files", "stream", "input_stream"]
    app, probe = reader_app("get_data", children)
    server = serve(app)

    gone = server.request(
        "POST", "/read?q=1", headers={"Content-Type": FORM_TYPE}, body=FORM_BODY,
        piece=1000, delay=0.01, disconnect_after=4000, timeout=CLIENT_TIMEOUT,
    )
    assert gone is None  # the client vanished
    wait_for(lambda: len(probe.outcomes) == 5 and probe.teardowns, timeout=JOIN_TIMEOUT, message="readers, teardown")

    # pywsgi's "unexpected end of file" (an OSError), as a 400 for Flask,
    # with the real cause chained.
    error = assert_same_error(probe.outcomes, 5, ClientDisconnected)
    assert isinstance(error.__cause__, OSError)
    assert not isinstance(error, BodyReadError)
    assert probe.scopes[0].wait_closed(timeout=JOIN_TIMEOUT)
    assert len(probe.teardowns) == 1
    assert probe.counters[0][0] < len(FORM_BODY)  # nobody pretended to have the rest


@pytest.mark.parametrize("transfer", ["announced", "chunked"])
def test_body_over_max_content_length_is_413_for_everyone(serve, transfer):
    children = ["stream", "input_stream", "data"]
    app, probe = reader_app("get_data", children, reraise=True, MAX_CONTENT_LENGTH=1000)
    body = os.urandom(5000)
    server = serve(app)
    headers = {"Content-Type": "application/octet-stream"}
    if transfer == "announced":
        response = server.request("POST", "/read", headers=headers, body=body, timeout=CLIENT_TIMEOUT)
    else:
        # Unknown length: the only way to know it is too large is to read past the limit.
        response = server.request("POST", "/read", headers=headers, chunks=pieces(body, 10), timeout=CLIENT_TIMEOUT)

    assert response.status == 413
    assert_same_error(probe.outcomes, 4, RequestEntityTooLarge)
    assert len(probe.teardowns) == 1
    assert probe.counters[0][0] <= 1001  # never more than one byte past the limit


@pytest.mark.parametrize("max_length", [None, 10_000])
def test_malformed_chunked_body_reaches_every_reader(serve, max_length):
    children = ["stream", "input_stream", "form"]
    app, probe = reader_app("get_data", children, reraise=True, MAX_CONTENT_LENGTH=max_length)
    server = serve(app)
    response = server.request(
        "POST", "/read",
        headers={"Transfer-Encoding": "chunked", "Content-Type": "application/x-www-form-urlencoded"},
        raw_body=b"5\r\na=bcd\r\nzz\r\nnot hex\r\n0\r\n\r\n",
        timeout=CLIENT_TIMEOUT,
    )

    # pywsgi rejects the chunk size with its _InvalidClientInput (an
    # OSError); the shared body turns it into one BadRequest for every
    # reader, with or without MAX_CONTENT_LENGTH, and the client gets a 400.
    error = assert_same_error(probe.outcomes, 4, BadRequest)
    assert "malformed request body" in str(error) or isinstance(error, ClientDisconnected)
    assert response.status == 400
    assert len(probe.teardowns) == 1


def test_invalid_json_is_400_for_every_reader(serve):
    app, probe = reader_app("json", ["get_json", "json", "get_json", "get_data"], reraise=True)
    body = b'{"items": [1, 2,'
    response = serve(app).request(
        "POST", "/read", headers={"Content-Type": "application/json"}, body=body, piece=4, delay=0.01,
        timeout=CLIENT_TIMEOUT,
    )

    assert response.status == 400
    assert len(probe.outcomes) == 5
    for outcome in probe.outcomes:
        if outcome.consumer == "get_data":
            assert outcome.value == sha(body)  # the body itself was fine and complete
        else:
            assert isinstance(outcome.error, BadRequest), f"{outcome.who}: {outcome.error!r}"
    assert probe.counters == [[len(body)]]
    assert len(probe.teardowns) == 1


# -- 3. a reader killed mid-read -----------------------------------------------------


def test_reader_killed_mid_read_leaves_the_body_whole_for_every_later_reader(serve):
    # G5: a reader killed while it waits for the body just stops waiting; the
    # pump that reads the socket is never interrupted, so nothing is lost.
    app = make_app()
    counters = count_socket_reads(app)
    seen: dict[str, t.Any] = {}
    teardowns: list[int] = []

    @app.teardown_request
    def count_teardown(exc: BaseException | None) -> None:
        teardowns.append(1)

    @app.route("/read", methods=["POST"])
    def read() -> str:
        body = shared_body()
        reading = Event()

        def first_reader() -> None:
            reading.set()
            seen["first"] = request.get_data()  # blocks: the client trickles

        first = geventctx.spawn(first_reader)
        reading.wait(JOIN_TIMEOUT)
        wait_for(lambda: body.waiting == 1, JOIN_TIMEOUT, "the first reader to wait for the body")
        seen["loaded_at_kill"] = body.loaded
        first.kill(block=True, timeout=JOIN_TIMEOUT)
        seen["first_dead"] = first.dead
        seen["waiting_after_kill"] = body.waiting

        def later_reader(consume: t.Callable[[], t.Any]) -> t.Any:
            try:
                return ("data", consume())
            except Exception as exc:
                return ("error", exc)

        later = [
            geventctx.spawn(later_reader, CONSUMERS["input_stream"]),
            geventctx.spawn(later_reader, CONSUMERS["get_data"]),
            geventctx.spawn(later_reader, CONSUMERS["form"]),
        ]
        mine = [later_reader(CONSUMERS["stream"])]
        gevent.joinall(later, timeout=JOIN_TIMEOUT)
        seen["later"] = mine + [child.value for child in later]
        return "done"

    body = FORM_BODY
    response = serve(app).request(
        "POST", "/read", headers={"Content-Type": FORM_TYPE}, body=body, piece=1000, delay=0.01,
        timeout=CLIENT_TIMEOUT,
    )

    assert response is not None and response.status == 200  # nobody hung, not even the server
    assert not seen["loaded_at_kill"]  # it was killed mid-read
    assert seen["first_dead"] and "first" not in seen
    assert seen["waiting_after_kill"] == 0  # the kill left nothing registered
    assert seen["later"] == [
        ("data", sha(body)),
        ("data", sha(body)),
        ("data", sha(body)),
        ("data", expected("form", body)),
    ]
    # The socket was read once, in step: exactly the body.
    assert counters == [[len(body)]]
    assert teardowns == [1]


# -- 4. modes ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mode, transfer, size, loaded_at_spawn",
    [
        ("buffer", "trickled", 500, True),  # small enough: read by the parent at the hand-off
        ("buffer", "trickled", 1000, True),  # exactly GEVENTCTX_BODY_BUFFER_LIMIT: still read
        ("buffer", "trickled", 1001, False),  # one byte past it: left to the readers
        ("buffer", "trickled", 5000, False),  # over GEVENTCTX_BODY_BUFFER_LIMIT: left to the readers
        ("buffer", "chunked", 500, False),  # unknown length: left to the readers
        ("tee", "trickled", 500, False),  # control: the default mode reads on first use only
    ],
)
def test_buffer_mode_reads_the_body_at_the_first_handoff(serve, mode, transfer, size, loaded_at_spawn):
    app = make_app(mode, GEVENTCTX_BODY_BUFFER_LIMIT=1000)
    seen: dict[str, t.Any] = {}

    @app.route("/read", methods=["POST"])
    def read() -> str:
        body = shared_body()
        seen["before"] = body.loaded
        child = geventctx.spawn(CONSUMERS["get_data"])
        seen["after_spawn"] = body.loaded
        seen["child"] = child.get(timeout=JOIN_TIMEOUT)
        seen["parent"] = CONSUMERS["get_data"]()
        return "done"

    data = os.urandom(size)
    response = send(serve(app), data, "application/octet-stream", transfer)

    assert response.status == 200
    assert seen["before"] is False
    assert seen["after_spawn"] is loaded_at_spawn
    assert seen["child"] == seen["parent"] == sha(data)


def test_off_mode_leaves_werkzeug_alone(serve):
    app = make_app("off")
    seen: dict[str, t.Any] = {}

    @app.route("/read", methods=["POST"])
    def read() -> str:
        seen["input"] = request.environ["wsgi.input"]
        seen["stream"] = request.stream
        seen["extras"] = dict(geventctx.current_scope().extras)
        seen["data"] = request.get_data()
        return "done"

    data = os.urandom(3000)
    response = post_octets(serve(app), data)

    assert response.status == 200
    assert not isinstance(seen["input"], SharedBody)
    assert not isinstance(seen["stream"], SharedBody)
    assert "body" not in seen["extras"]
    assert seen["data"] == data


def test_invalid_body_mode_is_refused_at_init_app():
    app = Flask(__name__)
    app.config["GEVENTCTX_BODY"] = "stream"
    with pytest.raises(ValueError, match="GEVENTCTX_BODY"):
        GeventContext(app)
    assert "geventctx" not in app.extensions


# -- 5. a child that reads only after the response -------------------------------------


def test_child_reading_after_the_response_still_gets_the_whole_body(serve):
    app = make_app()
    counters = count_socket_reads(app)
    go = Event()
    events: list[t.Any] = []

    @app.teardown_request
    def teardown(exc: BaseException | None) -> None:
        events.append("teardown")

    @app.route("/read", methods=["POST"])
    def read() -> str:
        def late_reader() -> None:
            go.wait(JOIN_TIMEOUT)
            events.append(("get_data", sha(request.get_data())))
            events.append(("stream", sha(request.stream.read())))

        geventctx.spawn(late_reader)
        return "sent"  # nobody read the body before the response

    data = os.urandom(50_000)
    try:
        response = post_octets(serve(app), data)
        before = list(events)
    finally:
        go.set()  # the response is in: let the child read now
    assert response.status == 200 and response.body == b"sent"
    assert before == []  # the child had not read yet, and teardown waited for it
    wait_for(lambda: "teardown" in events, timeout=JOIN_TIMEOUT, message="teardown after the late child")

    assert events == [("get_data", sha(data)), ("stream", sha(data)), "teardown"]
    assert counters == [[len(data)]]


# -- 6. uploaded files -----------------------------------------------------------------


@pytest.mark.parametrize("size", [64 * 1024, 600 * 1024], ids=["in-memory", "spooled-to-disk"])
def test_uploaded_file_is_complete_for_parent_and_every_child(serve, size):
    app = make_app()
    content = os.urandom(size)
    got: list[tuple[str, t.Any]] = []

    def read_file(who: str) -> None:
        try:
            got.append((who, sha(request.files["f"].read())))
        except Exception as exc:
            got.append((who, exc))

    @app.route("/upload", methods=["POST"])
    def upload() -> str:
        early = [geventctx.spawn(read_file, f"early{i}") for i in range(2)]  # racing the parent
        read_file("parent")
        late = [geventctx.spawn(read_file, f"late{i}") for i in range(2)]  # after the parent read it
        gevent.joinall(early + late, timeout=JOIN_TIMEOUT)
        read_file("parent-again")  # the parent's own cursor is at the end, like a file
        return "ok"

    body, content_type = multipart({"title": "t"}, {"f": ("big.bin", content)})
    response = serve(app).request(
        "POST", "/upload", headers={"Content-Type": content_type}, body=body, piece=len(body) // 4, delay=0.01,
        timeout=CLIENT_TIMEOUT,
    )

    assert response.status == 200
    results = dict(got)
    assert len(results) == 6, got
    assert results.pop("parent-again") == sha(b"")
    assert results == {who: sha(content) for who in ("parent", "early0", "early1", "late0", "late1")}


def test_body_never_read_stays_readable_after_a_test_client_response():
    # Flask's test client keeps the request after the response (``with
    # client:``); its input is in memory, so reading the body later works
    # as without geventctx. (Over a real server's socket it is an error.)
    app = make_app()

    @app.route("/form", methods=["POST"])
    def form() -> str:
        return "ok"

    with app.test_client() as client:
        response = client.post("/form", data={"a": "b"}, buffered=True)
        assert response.status_code == 200
        assert request.form["a"] == "b"
        assert request.data == b""  # form data: as Werkzeug documents


# -- 6. a raw stream the view began to read before its first hand-off ----------------


@pytest.mark.parametrize("counted", [False, True], ids=["pywsgi-input", "wrapped-input"])
@pytest.mark.parametrize("consumer", ["stream", "get_data", "input_stream"])
def test_child_raw_read_after_a_partial_read_before_the_handoff_is_a_clear_error(serve, consumer, counted):
    # G5: the view read 100 bytes of the raw stream straight from Werkzeug (no
    # hand-off yet, so nothing kept them); a child cannot get the whole body,
    # and must not get its tail as if it were the body: BodyReadError. The
    # view itself goes on reading where it stopped, as with Werkzeug alone:
    # on pywsgi's own input (which says how far it was read) and on an input
    # a middleware wrapped (which does not).
    app = make_app()
    counters = count_socket_reads(app) if counted else None
    seen: dict[str, t.Any] = {}

    @app.route("/read", methods=["POST"])
    def read() -> str:
        head = request.stream.read(100)
        child = geventctx.spawn(lambda: CONSUMERS[consumer]())
        child.join(JOIN_TIMEOUT)
        seen["child"] = child.exception if child.dead else "hung"
        seen["child_value"] = child.value
        seen["view"] = head + request.stream.read()
        return "read"

    data = os.urandom(5000)
    response = post_octets(serve(app), data)

    assert response.status == 200
    assert isinstance(seen["child"], BodyReadError), seen
    assert "before" in str(seen["child"]) and "hand-off" in str(seen["child"])
    assert seen["view"] == data  # the view's own reads are Werkzeug's: whole, in order
    if counters is not None:
        assert counters[0][0] == len(data)  # read from the socket once


def test_child_reads_the_whole_body_when_the_view_only_looked_at_the_stream(serve):
    # request.stream looked at (nothing read) before the hand-off: the body
    # is whole for everyone, not an error and not empty.
    app = make_app()
    seen: dict[str, t.Any] = {}

    @app.route("/read", methods=["POST"])
    def read() -> str:
        seen["stream"] = request.stream
        child = geventctx.spawn(request.get_data)
        seen["child"] = child.get(timeout=JOIN_TIMEOUT)
        seen["view"] = request.get_data()
        return "read"

    data = os.urandom(5000)
    response = post_octets(serve(app), data)

    assert response.status == 200
    assert seen["child"] == data and seen["view"] == data


def test_a_body_the_view_read_whole_before_the_handoff_is_shared_as_it_is(serve):
    # get_data() before the first hand-off: the shared body keeps Werkzeug's
    # bytes object itself (no copy, nothing read again, no pump), and a
    # child's raw read still gets the whole body.
    app = make_app()
    seen: dict[str, t.Any] = {}

    @app.route("/read", methods=["POST"])
    def read() -> str:
        data = request.get_data()
        child = geventctx.spawn(lambda: (request.stream.read(), request.shared_body().read_whole()))
        seen["loaded"] = request.shared_body().loaded  # before anyone read it again
        seen["stream"], seen["whole"] = child.get(timeout=JOIN_TIMEOUT)
        seen["same"] = seen["whole"] is data
        return "read"

    data = os.urandom(5000)
    response = post_octets(serve(app), data)

    assert response.status == 200
    assert seen["loaded"] and seen["stream"] == data and seen["same"]


# -- 7. after a consumer Werkzeug does not cache (revised G5) ----------------------


def test_a_raw_read_after_a_form_parse_is_empty_in_the_child_too(serve):
    # G5 (revised 2026-12-05): the view parses the form after its first
    # hand-off; a child's raw reads then return what Werkzeug returns after a
    # form parse (b""), and the form the view parsed is the very object the
    # child sees (the request is shared, the body parsed once).
    app = make_app()
    seen: dict[str, t.Any] = {}
    go = Event()

    @app.route("/read", methods=["POST"])
    def read() -> str:
        def child() -> None:
            go.wait(JOIN_TIMEOUT)
            seen["child_form"] = request.form
            seen["child_get_data"] = request.get_data()
            seen["child_stream"] = request.stream.read()

        kid = geventctx.spawn(child)
        seen["view_form"] = request.form
        seen["view_get_data"] = request.get_data()
        go.set()
        kid.join(JOIN_TIMEOUT)
        return "read"

    response = send(serve(app), FORM_BODY, FORM_TYPE, "trickled")

    assert response.status == 200
    assert seen["child_form"] is seen["view_form"]
    assert seen["view_form"].to_dict(flat=False) == expected("form", FORM_BODY)
    assert seen["view_get_data"] == b"" and seen["child_get_data"] == b""
    assert seen["child_stream"] == b""


def test_get_data_after_get_json_without_cache_is_empty_in_the_child(serve):
    # get_json(cache=False) reads the stream to its end and caches nothing:
    # a later get_data() anywhere gets b"", as with Werkzeug alone.
    app = make_app()
    seen: dict[str, t.Any] = {}
    go = Event()

    @app.route("/read", methods=["POST"])
    def read() -> str:
        kid = geventctx.spawn(lambda: (go.wait(JOIN_TIMEOUT), request.get_data())[1])
        seen["json"] = request.get_json(cache=False)
        go.set()
        seen["child"] = kid.get(timeout=JOIN_TIMEOUT)
        seen["view"] = request.get_data()
        return "read"

    response = send(serve(app), JSON_BODY, "application/json", "trickled")

    assert response.status == 200
    assert seen["json"] == JSON_DOC
    assert seen["child"] == b"" and seen["view"] == b""


def test_an_assigned_stream_is_what_every_consumer_reads(serve):
    # As Werkzeug's cached_property: request.stream can be assigned (a
    # wrapper of the request's stream), and the form is parsed through it.
    app = make_app()
    seen: dict[str, t.Any] = {}

    class Upper:
        def __init__(self, stream: t.Any) -> None:
            self._stream = stream

        def read(self, size: int = -1) -> bytes:
            return bytes(self._stream.read(size)).upper()

        def readline(self, size: int = -1) -> bytes:
            return bytes(self._stream.readline(size)).upper()

    @app.route("/read", methods=["POST"])
    def read() -> str:
        geventctx.spawn(lambda: None).join(JOIN_TIMEOUT)  # a hand-off first: the shared body
        request.stream = Upper(request.stream)
        seen["assigned"] = isinstance(request.stream, Upper)
        seen["form"] = geventctx.spawn(lambda: request.form.to_dict()).get(timeout=JOIN_TIMEOUT)
        return "read"

    response = send(serve(app), b"name=ada", "application/x-www-form-urlencoded", "trickled")

    assert response.status == 200
    assert seen["assigned"] and seen["form"] == {"NAME": "ADA"}


def test_json_read_by_the_view_and_a_child_at_once_is_parsed_once(serve):
    # G5 (revised): cached consumers never make a copy: while the body still
    # arrives, the view and a child both call get_json(); one parses, the
    # other waits for its result — one json.loads, the same object for both.
    from flask.json.provider import DefaultJSONProvider

    loads: list[int] = []

    class CountingProvider(DefaultJSONProvider):
        def loads(self, s: t.Any, **kwargs: t.Any) -> t.Any:
            loads.append(len(s))
            return super().loads(s, **kwargs)

    app = make_app()
    app.json = CountingProvider(app)
    seen: dict[str, t.Any] = {}

    @app.route("/read", methods=["POST"])
    def read() -> str:
        child = geventctx.spawn(lambda: request.get_json())
        seen["view"] = request.get_json()
        seen["child"] = child.get(timeout=JOIN_TIMEOUT)
        return "read"

    response = send(serve(app), JSON_BODY, "application/json", "trickled")

    assert response.status == 200
    assert seen["view"] == JSON_DOC and seen["child"] is seen["view"]
    assert loads == [len(JSON_BODY)]
