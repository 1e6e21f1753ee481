"""G5's "one consumer, no copy" under attack: a form parse reading straight off
the socket against everything else that may read or write the connection.

A red-team session wrote these against the first version of the read-through
parse; four of them found bugs it had (a raw reader level with the parse, or
whose first read was still waiting, lost its bytes; the body timeout, set on
the socket, cut the response's writes short; a parse stopped before any byte
arrived failed the body). The rest are attacks it held: pipelined requests,
413 mid-parse, 100-continue, clients that vanish, thread tasks, the
middleware. Real gevent.pywsgi servers on 127.0.0.1 and raw socket clients;
every wait is bounded.
"""

from __future__ import annotations

import hashlib
import os
import re
import typing as t

import gevent
import pytest
from flask import Flask, request
from gevent.event import Event
from httpkit import RawClient, multipart, wait_for

import geventctx
from geventctx import BodyReadError
from geventctx.flask import GeventContext

WAIT = 5.0


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def app_with(**config: t.Any) -> tuple[Flask, dict[str, t.Any]]:
    app = Flask(__name__)
    app.config.update(config)
    GeventContext(app)
    notes: dict[str, t.Any] = {"teardowns": []}
    app.teardown_request(lambda exc: notes["teardowns"].append(exc))
    return app, notes


def stream_rest(seen: t.Any) -> str:
    while piece := request.stream.read(65536):
        seen.update(piece)
    return seen.hexdigest()


BIG = os.urandom(600_000)


# -- A: a raw reader exactly at the parse's position ----------------------------------


@pytest.mark.parametrize("middleware", [False, True], ids=["flask", "flask-in-middleware"])
def test_raw_reader_positioned_where_the_parse_reads_through_still_gets_every_byte(serve, gates, middleware):
    # The child read exactly 128 KiB of the raw stream (two of the parser's
    # 64 KiB reads); the view's parse catches up with it at size == 128 KiB
    # and may_read_through() allows reading straight off the socket, though
    # the child still needs those bytes (its position is not *behind*, it
    # is *equal*).
    app, notes = app_with()
    go_on = gates()

    @app.post("/f")
    def view() -> str:
        started = Event()

        def child() -> t.Any:
            try:
                seen = hashlib.sha256(request.stream.read(131072))
                started.set()
                go_on.wait(WAIT)
                return stream_rest(seen)
            except Exception as exc:
                started.set()
                return exc

        kid = geventctx.spawn(child)
        started.wait(WAIT)
        form = request.form["title"], sha(request.files["upload"].read())
        go_on.set()
        kid.join(WAIT)
        notes["child"] = kid.value
        notes["form"] = form
        return "ok"

    if middleware:  # the body shared before the app runs, Flask's request inside
        from geventctx.wsgi import ContextMiddleware

        app.wsgi_app = ContextMiddleware(app.wsgi_app)  # type: ignore[method-assign]
    server = serve(app)
    body, ctype = multipart({"title": "t"}, {"upload": ("a.bin", BIG)})
    response = server.request("POST", "/f", headers={"Content-Type": ctype}, body=body, timeout=WAIT * 2)
    assert response is not None and response.status == 200, response
    assert notes["form"] == ("t", sha(BIG))
    assert notes["child"] == sha(body), notes["child"]


# -- B: a raw reader that began before the parse, still waiting for its bytes -----------


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_raw_reader_waiting_for_bytes_when_the_parse_starts_keeps_its_bytes(serve, chunked):
    # The child's first read (200 000 bytes) began before the parse and
    # waits for bytes: a reader has a position from the moment its read
    # begins, so the parse neither reads past it straight off the socket
    # (Content-Length) nor frees the bytes it waits for (chunked: no
    # read-through, the spool's forget() alone). The first version lost them.
    app, notes = app_with()

    @app.post("/f")
    def view() -> str:
        waiting = Event()

        def child() -> t.Any:
            try:
                waiting.set()
                seen = hashlib.sha256(request.stream.read(200_000))
                return stream_rest(seen)
            except Exception as exc:
                return exc

        kid = geventctx.spawn(child)
        waiting.wait(WAIT)
        gevent.sleep(0.05)  # the child now waits inside its read
        notes["parsing"] = True
        form = request.form["title"], sha(request.files["upload"].read())
        kid.join(WAIT)
        notes["child"] = kid.value
        notes["form"] = form
        return "ok"

    server = serve(app)
    body, ctype = multipart({"title": "t"}, {"upload": ("a.bin", BIG)})
    client = RawClient(server.port)

    def frame(data: bytes) -> bytes:
        return b"%x\r\n%s\r\n" % (len(data), data) if chunked else data

    framing = {"Transfer-Encoding": "chunked"} if chunked else {"Content-Length": str(len(body))}
    try:
        client.send_head("POST", "/f", {**framing, "Content-Type": ctype, "Connection": "close"})
        client.send(frame(body[:10]))
        wait_for(lambda: notes.get("parsing"), WAIT, "the parse to start")
        gevent.sleep(0.05)
        client.send(frame(body[10:100_000]))  # the parse's first 64 KiB arrive, the child's 200 000 not yet
        gevent.sleep(0.1)
        client.send(frame(body[100_000:]) + (b"0\r\n\r\n" if chunked else b""))
        response = client.read_response(WAIT)
    finally:
        client.close()
    assert response.status == 200, response.body
    assert notes["form"] == ("t", sha(BIG))
    assert notes["child"] == sha(body), notes["child"]


# -- C: the body timeout set on the socket bounds the response's write -----------------


def test_response_write_is_not_cut_by_the_body_timeout_while_a_child_parses(serve):
    # A child parses the form straight off the socket: read_exactly() sets the
    # socket's timeout to GEVENTCTX_BODY_TIMEOUT meanwhile. The view's large
    # response is written on the same socket at the same time, by a client
    # that reads its response only after it sent its whole body.
    app, notes = app_with(GEVENTCTX_BODY_TIMEOUT=0.5)
    big_response = b"r" * (48 * 1024 * 1024)

    @app.post("/f")
    def view() -> t.Any:
        def child() -> t.Any:
            try:
                return request.form["title"], sha(request.files["upload"].read())
            except Exception as exc:
                return exc

        notes["kid"] = geventctx.spawn(child)
        gevent.sleep(0.05)
        return big_response

    server = serve(app)
    body, ctype = multipart({"title": "t"}, {"upload": ("a.bin", BIG)})
    client = RawClient(server.port, timeout=20)
    try:
        client.send_head("POST", "/f", {"Content-Length": str(len(body)), "Content-Type": ctype, "Connection": "close"})
        step = len(body) // 12
        for i in range(0, len(body), step):  # ~2.4 s of trickling, 0.2 s apart (< the 0.5 s timeout)
            client.send(body[i : i + step])
            gevent.sleep(0.2)
        try:
            response = client.read_response(15)
        except AssertionError as exc:
            raise AssertionError(f"response cut short: {str(exc)[:80]}... ({len(client.received)} bytes)") from None
    finally:
        client.close()
    assert response.status == 200
    assert len(response.body) == len(big_response)
    notes["kid"].join(WAIT)
    assert notes["kid"].value == ("t", sha(BIG))


# -- D: keep-alive after a read-through parse -----------------------------------------


@pytest.mark.parametrize("where", ["view", "child"])
def test_pipelined_second_request_after_a_read_through_parse(serve, where):
    app, notes = app_with()
    seen: list[t.Any] = []

    @app.post("/f")
    def view() -> str:
        def parse() -> t.Any:
            return request.form["title"], sha(request.files["upload"].read())

        if where == "view":
            geventctx.spawn(gevent.sleep, 0.01)  # hands off: the body is shared
            result = parse()
        else:
            kid = geventctx.spawn(parse)
            kid.join(WAIT)
            result = kid.value if kid.successful() else kid.exception
        seen.append(result)
        return result[0]

    server = serve(app)
    b1, ctype = multipart({"title": "one"}, {"upload": ("a.bin", BIG)})
    b2, _ = multipart({"title": "two"}, {"upload": ("b.bin", BIG[::-1])})
    client = RawClient(server.port)
    try:
        head = "POST /f HTTP/1.1\r\nHost: x\r\nContent-Type: {}\r\nContent-Length: {}\r\n\r\n"
        client.send(head.format(ctype, len(b1)).encode() + b1 + head.format(ctype, len(b2)).encode() + b2)
        r1 = client.read_response(WAIT)
        r2 = client.read_response(WAIT)
    finally:
        client.close()
    assert (r1.status, r1.body, r2.status, r2.body) == (200, b"one", 200, b"two")
    assert seen == [("one", sha(BIG)), ("two", sha(BIG[::-1]))]


def test_pipelined_request_after_a_parse_stopped_by_max_form_memory_size(serve):
    # Werkzeug raises 413 midway through a read-through parse (a field over
    # max_form_memory_size): the input must stay in step (or the connection
    # close), never the rest read as the next request. (Set on the request
    # class: Flask < 3.1 has no MAX_FORM_MEMORY_SIZE.)
    import importlib.metadata

    werkzeug = tuple(int(part) for part in re.findall(r"\d+", importlib.metadata.version("werkzeug"))[:3])
    if werkzeug < (3, 0, 6):
        pytest.skip("Werkzeug < 3.0.6 applies max_form_memory_size to urlencoded forms only")
    app = Flask(__name__)
    app.request_class = type("LimitedRequest", (app.request_class,), {"max_form_memory_size": 100_000})
    GeventContext(app)

    @app.post("/f")
    def view() -> str:
        kid = geventctx.spawn(lambda: request.form["title"])
        kid.join(WAIT)
        if kid.exception is not None:
            raise kid.exception
        return kid.value

    @app.get("/next")
    def nxt() -> str:
        return "next"

    server = serve(app)
    body, ctype = multipart({"title": "x" * 400_000, "other": "y"}, {"upload": ("a.bin", BIG)})
    client = RawClient(server.port)
    try:
        head = f"POST /f HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n\r\n"
        client.send(head.encode() + body + b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n")
        r1 = client.read_response(WAIT)
        assert r1.status == 413
        try:
            r2 = client.read_response(WAIT)
        except AssertionError:
            r2 = None  # connection closed: acceptable
    finally:
        client.close()
    assert r2 is None or (r2.status, r2.body) == (200, b"next"), r2


# -- E: a parse after the response ---------------------------------------------------------


def test_child_parses_the_form_after_the_response_then_keep_alive_goes_on(serve, gates):
    app, notes = app_with()
    release = gates()

    @app.post("/f")
    def view() -> str:
        def child() -> None:
            release.wait(WAIT)
            try:
                notes["child"] = request.form["title"], sha(request.files["upload"].read())
            except Exception as exc:
                notes["child"] = exc

        geventctx.spawn(child)
        return "sent"

    @app.get("/next")
    def nxt() -> str:
        return "next"

    server = serve(app)
    body, ctype = multipart({"title": "t"}, {"upload": ("a.bin", BIG * 3)})
    client = RawClient(server.port)
    try:
        client.send_head("POST", "/f", {"Content-Length": str(len(body)), "Content-Type": ctype})
        client.send(body[:1000])
        assert client.read_response(WAIT).body == b"sent"
        client.send(body[1000:])
        gevent.sleep(0.05)
        release.set()
        wait_for(lambda: "child" in notes, WAIT, "the child's parse")
        client.send(b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n")
        r2 = client.read_response(WAIT)
    finally:
        client.close()
    assert notes["child"] == ("t", sha(BIG * 3))
    assert (r2.status, r2.body) == (200, b"next")


# -- F: errors the same for every reader ---------------------------------------------------


def failing_parse_app(**config: t.Any) -> tuple[Flask, dict[str, t.Any]]:
    """``POST /f``: the view and a child parse the form at once; what each
    got (an error, expected) is noted and the view raises its own."""
    app, notes = app_with(**config)

    @app.post("/f")
    def view() -> str:
        kid = geventctx.spawn(lambda: request.form)
        gevent.sleep(0.01)
        try:
            request.form
        except Exception as exc:
            notes["mine"] = exc
        kid.join(WAIT)
        notes["child"] = kid.exception
        raise notes["mine"]

    return app, notes


def test_client_vanishing_mid_read_through_gives_400_to_both(serve):
    app, notes = failing_parse_app()

    server = serve(app)
    body, ctype = multipart({"title": "t"}, {"upload": ("a.bin", BIG)})
    client = RawClient(server.port)
    try:
        client.send_head("POST", "/f", {"Content-Length": str(len(body)), "Content-Type": ctype})
        client.send(body[:300_000])
        gevent.sleep(0.1)
    finally:
        client.close()
    wait_for(lambda: "child" in notes, WAIT, "both readers")
    from werkzeug.exceptions import ClientDisconnected

    assert isinstance(notes["mine"], ClientDisconnected), notes
    assert notes["child"] is notes["mine"]
    wait_for(lambda: len(notes["teardowns"]) == 1, WAIT, "teardown")


def test_too_large_form_with_a_child_is_413_for_both_and_connection_not_reused(serve):
    app, notes = failing_parse_app(MAX_CONTENT_LENGTH=200_000)

    server = serve(app)
    body, ctype = multipart({"title": "t"}, {"upload": ("a.bin", BIG)})
    client = RawClient(server.port)
    try:
        client.send_head("POST", "/f", {"Content-Length": str(len(body)), "Content-Type": ctype})
        client.send(body)
        r = client.read_response(WAIT)
    finally:
        client.close()
    assert r.status == 413
    assert notes["child"] is notes["mine"]


def test_expect_100_continue_with_a_child_parsing_read_through(serve):
    app, notes = app_with()

    @app.post("/f")
    def view() -> str:
        kid = geventctx.spawn(lambda: (request.form["title"], sha(request.files["upload"].read())))
        kid.join(WAIT)
        notes["child"] = kid.value if kid.successful() else kid.exception
        return "ok"

    server = serve(app)
    body, ctype = multipart({"title": "t"}, {"upload": ("a.bin", BIG)})
    client = RawClient(server.port)
    try:
        client.send_head(
            "POST", "/f", {"Content-Length": str(len(body)), "Content-Type": ctype, "Expect": "100-continue"}
        )
        assert client.read_until(b"\r\n\r\n", WAIT).startswith(b"HTTP/1.1 100 Continue")
        client.send(body)
        r = client.read_response(WAIT)
    finally:
        client.close()
    assert r.status == 200
    assert notes["child"] == ("t", sha(BIG))


# -- G: a parse interrupted before it read a byte ------------------------------------------


def test_child_parse_timed_out_before_any_byte_leaves_the_body_whole(serve):
    # Borderline: the docs say a parse interrupted *midway* fails the body.
    # Here the child's own gevent.Timeout fires while the client has sent no
    # body byte at all: nothing was read, yet every later consumer fails.
    app, notes = app_with()

    @app.post("/f")
    def view() -> str:
        def child() -> t.Any:
            try:
                with gevent.Timeout(0.2):
                    return request.form
            except BaseException as exc:
                return exc

        kid = geventctx.spawn(child)
        kid.join(WAIT)
        notes["child"] = kid.value
        notes["mine"] = request.form["title"]
        return "ok"

    server = serve(app)
    body, ctype = multipart({"title": "t"}, {"upload": ("a.bin", BIG)})
    client = RawClient(server.port)
    try:
        client.send_head("POST", "/f", {"Content-Length": str(len(body)), "Content-Type": ctype})
        gevent.sleep(0.4)
        client.send(body)
        r = client.read_response(WAIT)
    finally:
        client.close()
    assert isinstance(notes["child"], gevent.Timeout)
    assert r.status == 200, r.body[:300]


# -- H: ThreadPool task parsing while the view streams -------------------------------------


def test_thread_task_parses_while_the_view_streams_the_raw_body(serve):
    pool = geventctx.ThreadPool(2)
    app, notes = app_with()

    def parse() -> t.Any:
        try:
            return request.form["title"], sha(request.files["upload"].read())
        except Exception as exc:
            return exc

    @app.post("/f")
    def view() -> str:
        task = pool.spawn(parse)  # the hand-off first, then the view's raw reads
        seen = hashlib.sha256(request.stream.read(4096))
        notes["raw"] = stream_rest(seen)
        notes["task"] = task.get(timeout=WAIT)
        return "ok"

    body, ctype = multipart({"title": "t"}, {"upload": ("a.bin", BIG)})
    try:
        r = serve(app).request(
            "POST", "/f", headers={"Content-Type": ctype}, body=body, piece=100_000, delay=0.01, timeout=WAIT * 2
        )
    finally:
        pool.kill()
    assert r is not None and r.status == 200, r
    assert notes["raw"] == sha(body)
    assert notes["task"] == ("t", sha(BIG))


def test_thread_task_stream_reader_waiting_when_the_view_parses(serve):
    # As B, with the waiting raw reader a ThreadPool task.
    pool = geventctx.ThreadPool(2)
    app, notes = app_with()

    def raw() -> t.Any:
        try:
            seen = hashlib.sha256(request.stream.read(200_000))
            return stream_rest(seen)
        except Exception as exc:
            return exc

    @app.post("/f")
    def view() -> str:
        task = pool.spawn(raw)
        wait_for(lambda: request.shared_body() is not None and request.shared_body().waiting, WAIT, "task waits")
        notes["parsing"] = True
        notes["form"] = request.form["title"], sha(request.files["upload"].read())
        notes["task"] = task.get(timeout=WAIT)
        return "ok"

    server = serve(app)
    body, ctype = multipart({"title": "t"}, {"upload": ("a.bin", BIG)})
    client = RawClient(server.port)
    try:
        client.send_head("POST", "/f", {"Content-Length": str(len(body)), "Content-Type": ctype, "Connection": "close"})
        client.send(body[:10])
        wait_for(lambda: notes.get("parsing"), WAIT, "the parse to start")
        gevent.sleep(0.05)
        client.send(body[10:100_000])
        gevent.sleep(0.2)
        client.send(body[100_000:])
        response = client.read_response(WAIT)
    finally:
        client.close()
        pool.kill()
    assert response.status == 200, response.body
    assert notes["form"] == ("t", sha(BIG))
    assert notes["task"] == sha(body), notes["task"]


# -- a parse killed midway, with a pipelined request behind the body ----------------------


def test_parse_killed_midway_with_a_pipelined_request_never_reads_the_rest_as_a_request(serve):
    app, notes = app_with()
    hits: list[str] = []

    @app.post("/kill")
    def kill() -> str:
        body = request.shared_body()
        kid = geventctx.spawn(lambda: request.form)
        wait_for(lambda: body.received > 100_000, WAIT, "the child's parse to read part of the body")
        kid.kill(block=True, timeout=WAIT)
        try:
            request.form
        except BodyReadError as exc:
            notes["mine"] = exc
        return "answered"

    @app.route("/<path:rest>", methods=["GET", "POST"])
    def other(rest: str) -> str:
        hits.append(rest)
        return "other"

    server = serve(app)
    # the body's rest looks like a request: it must never be answered
    evil = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
    body = b"x" * 200_000 + evil + b"y" * 1000
    client = RawClient(server.port)
    try:
        client.send_head(
            "POST", "/kill", {"Content-Length": str(len(body)), "Content-Type": "multipart/form-data; boundary=b"}
        )
        client.send(body[:150_000])
        response = client.read_response(WAIT)
        client.send(body[150_000:] + b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n")
        closed = client.closed_by_server(WAIT)
    finally:
        client.close()
    assert response.status == 200 and isinstance(notes.get("mine"), BodyReadError), notes
    assert closed
    assert b"other" not in client.received and hits == [], (hits, client.received[:200])
