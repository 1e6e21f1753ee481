"""G5 against real clients: the shared body under clients that wait, stall or vanish.

Each test runs a real server — gevent.pywsgi on 127.0.0.1 in this process,
or ``gunicorn -k gevent`` as a subprocess (tests/bodyapp.py) — and a real
client: a raw socket (httpkit.RawClient) that waits for ``100 Continue``,
trickles, stalls mid-body or hangs up, or real curl (curlkit). Every one of
them broke the body before it became a streaming tee:

- a client waiting for ``100 Continue`` hung (the server peeked at the
  socket before pywsgi sent it);
- a stalled body held back the response, and teardown, for as long as the
  client stayed (the body was read before the response, with no limit);
- a request greenlet killed while that read waited never tore down;
- a reader killed mid-read lost the body for everyone;
- the whole body sat in memory, twice at peak.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import typing as t

import gevent
import gevent.pool
import pytest
from curlkit import curl
from flask import Flask, request
from gevent.event import Event
from httpkit import RawClient, multipart, pieces, settle, wait_for
from processkit import executable, open_files_in
from werkzeug.exceptions import ClientDisconnected, RequestEntityTooLarge
from werkzeug.wrappers import Request as WerkzeugRequest

import geventctx
from geventctx import BodyReadError, BodyTimeout
from geventctx.body import SharedBody
from geventctx.flask import GeventContext
from geventctx.wsgi import ContextMiddleware

WAIT = 5.0  # every wait of a view, a child or a client is bounded by this


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Notes:
    """What an app saw: teardowns, readers' results, the request's body."""

    def __init__(self) -> None:
        self.teardowns: list[BaseException | None] = []
        self.results: dict[str, t.Any] = {}
        self.body: SharedBody | None = None


def flask_app(**config: t.Any) -> tuple[Flask, Notes]:
    app = Flask(__name__)
    app.config.update(config)
    GeventContext(app)
    notes = Notes()

    @app.teardown_request
    def count_teardown(exc: BaseException | None) -> None:
        notes.teardowns.append(exc)

    return app, notes


def digest_or_error(how: str = "get_data") -> t.Any:
    try:
        if how == "get_data":
            return sha(request.get_data())
        seen = hashlib.sha256()  # "stream": in pieces, as they arrive
        while piece := request.stream.read(4096):
            seen.update(piece)
        return seen.hexdigest()
    except Exception as exc:
        return exc


def upload_view(app: Flask, notes: Notes) -> None:
    """``POST /upload?children=N&how=get_data|stream``: the view and N
    children read the body (the view with get_data(), the children so)."""

    @app.post("/upload")
    def upload() -> str:
        notes.body = request.shared_body()
        how = request.args.get("how", "get_data")
        children = [geventctx.spawn(digest_or_error, how) for _ in range(int(request.args.get("children", 0)))]
        if how == "stream":
            gevent.joinall(children, timeout=WAIT)  # streamed through the spool first
        mine = digest_or_error()
        gevent.joinall(children, timeout=WAIT)
        notes.results["digests"] = [mine] + [child.value for child in children]
        notes.results["on_disk"] = notes.body is not None and notes.body.spool.on_disk
        for value in notes.results["digests"]:
            if isinstance(value, Exception):
                raise value
        return ",".join(notes.results["digests"])


def werkzeug_app_in_middleware() -> tuple[t.Any, Notes]:
    notes = Notes()

    @WerkzeugRequest.application
    def app(req: WerkzeugRequest) -> t.Any:
        from werkzeug.wrappers import Response

        child = geventctx.spawn(lambda: sha(req.environ["wsgi.input"].read()))
        mine = sha(req.environ["wsgi.input"].read())
        child.join(WAIT)
        notes.results["digests"] = [mine, child.value]
        return Response(",".join(notes.results["digests"]))

    return ContextMiddleware(app), notes


# -- 1. nothing reads before a consumer asks: Expect: 100-continue ---------------------


def app_variant(variant: str) -> tuple[t.Any, Notes, str]:
    if variant == "middleware":
        app, notes = werkzeug_app_in_middleware()
        return app, notes, "/upload"
    mode = "buffer" if variant == "flask-buffer" else "tee"
    app, notes = flask_app(GEVENTCTX_BODY=mode)
    upload_view(app, notes)
    return app, notes, "/upload?children=0" if variant == "flask-alone" else "/upload?children=2"


@pytest.mark.parametrize("variant", ["flask-alone", "flask-children", "flask-buffer", "middleware"])
def test_client_waiting_for_100_continue_gets_it_at_the_first_read(serve, variant):
    app, notes, path = app_variant(variant)
    server = serve(app)
    body = os.urandom(300_000)
    client = RawClient(server.port)
    try:
        headers = {"Content-Length": str(len(body)), "Content-Type": "application/octet-stream"}
        client.send_head("POST", path, {**headers, "Expect": "100-continue", "Connection": "close"})
        # A client that waits for the 100, as RFC 9110 allows: nothing was
        # sent yet, so the server must ask for the body before it gets any.
        assert client.read_until(b"\r\n\r\n", WAIT).startswith(b"HTTP/1.1 100 Continue")
        client.send(body)
        response = client.read_response(WAIT)
    finally:
        client.close()
    assert response.status == 200, response.body
    assert set(response.body.decode().split(",")) == {sha(body)}
    wait_for(lambda: variant == "middleware" or len(notes.teardowns) == 1, WAIT, "teardown")


@pytest.mark.parametrize("children", [0, 2])
def test_curl_upload_with_expect_100_continue_is_answered_at_once(serve, tmp_path, children):
    # curl sends "Expect: 100-continue" for bodies over 1 MB and waits
    # --expect100-timeout for the 100 before sending anyway; it waited its
    # full second on every upload when the server peeked at the socket.
    app, notes = flask_app()
    upload_view(app, notes)
    server = serve(app)
    data = os.urandom(2 * 1024 * 1024)
    path = tmp_path / "upload.bin"
    path.write_bytes(data)
    result = curl(
        "--verbose", "--expect100-timeout", "30", "--data-binary", f"@{path}",
        "-H", "Content-Type: application/octet-stream",
        f"{server.url}/upload?children={children}",
        timeout=20,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Expect: 100-continue" in result.stderr  # curl really asked
    assert "< HTTP/1.1 100 Continue" in result.stderr  # and the server answered it
    assert result.stdout.split(",") == [sha(data)] * (1 + children)
    wait_for(lambda: len(notes.teardowns) == 1, WAIT, "teardown")


# -- 2. the response never waits for the body ------------------------------------------


def stall(server: t.Any, path: str, announced: int = 100_000, sent: int = 10) -> RawClient:
    """A client that announces ``announced`` body bytes, sends ``sent``, then stalls."""
    client = RawClient(server.port)
    client.send_head("POST", path, {"Content-Length": str(announced), "Content-Type": "application/octet-stream"})
    client.send(b"x" * sent)
    return client


def test_stalled_body_does_not_hold_back_the_response(serve):
    # The view spawns a child that never reads the body and returns at once.
    # The body timeout is off: only the client leaving ends the body.
    app, notes = flask_app(GEVENTCTX_BODY_TIMEOUT=None)

    @app.post("/fire")
    def fire() -> str:
        geventctx.spawn(gevent.sleep, 0.1)
        notes.body = request.shared_body()
        return "sent"

    server = serve(app)
    client = stall(server, "/fire")
    try:
        response = client.read_response(WAIT)
        assert response.status == 200 and response.body == b"sent"
        # Teardown ran once the child ended, with the client still stalled,
        # and the capture for the child stopped: nobody can read any more.
        wait_for(lambda: len(notes.teardowns) == 1, WAIT, "teardown while the client stalls")
        wait_for(lambda: not notes.body.reading, WAIT, "the capture to stop once no child is left")
    finally:
        client.close()
    settle()
    assert notes.teardowns == [None]


def test_stalled_body_with_a_straggler_is_logged_and_killed(serve, gates, caplog):
    never = gates()  # nobody opens it: only the kill policy ends the child
    app, notes = flask_app(
        GEVENTCTX_BODY_TIMEOUT=None, GEVENTCTX_STRAGGLER_TIMEOUT=0.3, GEVENTCTX_STRAGGLER_POLICY="kill"
    )

    @app.post("/fire")
    def fire() -> str:
        geventctx.spawn(never.wait)
        return "sent"

    server = serve(app)
    client = stall(server, "/fire")
    try:
        with caplog.at_level(logging.WARNING, logger="geventctx"):
            assert client.read_response(WAIT).body == b"sent"
            wait_for(lambda: len(notes.teardowns) == 1, WAIT, "teardown after the straggler was killed")
        stragglers = [r.getMessage() for r in caplog.records if "straggler" in r.getMessage()]
        assert len(stragglers) == 1 and "killing it" in stragglers[0], stragglers
    finally:
        client.close()


def test_stalled_body_times_out_for_every_reader_as_a_408_and_the_connection_closes(serve):
    app, notes = flask_app(GEVENTCTX_BODY_TIMEOUT=0.5)
    upload_view(app, notes)
    server = serve(app)
    client = stall(server, "/upload?children=2")
    try:
        response = client.read_response(WAIT)
        assert response.status == 408, response.body
        # Nobody may read the rest of this body as the next request.
        assert client.closed_by_server(WAIT)
    finally:
        client.close()
    errors = notes.results["digests"]
    assert isinstance(errors[0], BodyTimeout) and all(error is errors[0] for error in errors)
    wait_for(lambda: len(notes.teardowns) == 1, WAIT, "teardown")


def test_slow_but_steady_client_is_not_timed_out(serve):
    # The timeout counts the wait for bytes, not the whole upload: 12 pieces
    # 0.15 s apart take far longer than the 0.5 s timeout, and all arrive.
    app, notes = flask_app(GEVENTCTX_BODY_TIMEOUT=0.5)
    upload_view(app, notes)
    server = serve(app)
    body = os.urandom(12_000)
    client = RawClient(server.port)
    try:
        client.send_head("POST", "/upload?children=1", {"Content-Length": str(len(body)), "Connection": "close"})
        for piece in pieces(body, 12):
            client.send(piece)
            gevent.sleep(0.15)
        response = client.read_response(WAIT)
    finally:
        client.close()
    assert response.status == 200, response.body
    assert response.body.decode().split(",") == [sha(body)] * 2


def test_child_reading_a_stalled_body_after_the_response_times_out_and_teardown_runs(serve):
    app, notes = flask_app(GEVENTCTX_BODY_TIMEOUT=0.5)

    @app.post("/later")
    def later() -> str:
        def child() -> None:
            notes.results["child"] = digest_or_error()

        geventctx.spawn(child)
        return "sent"

    server = serve(app)
    client = stall(server, "/later")
    try:
        assert client.read_response(WAIT).body == b"sent"  # the child's wait is not the response's
        wait_for(lambda: len(notes.teardowns) == 1, WAIT, "teardown after the child timed out")
        assert isinstance(notes.results["child"], BodyTimeout)
        assert client.closed_by_server(WAIT)
    finally:
        client.close()


def test_children_get_the_rest_of_the_body_captured_after_the_response(serve, gates):
    # The view answers before the body is complete; a child reads it later.
    release = gates()
    app, notes = flask_app()

    @app.post("/later")
    def later() -> str:
        def child() -> None:
            release.wait(WAIT)
            notes.results["child"] = digest_or_error()

        geventctx.spawn(child)
        return "sent"

    server = serve(app)
    body = os.urandom(200_000)
    client = stall(server, "/later", announced=len(body), sent=0)
    try:
        client.send(body[:1000])
        assert client.read_response(WAIT).body == b"sent"  # before the rest was sent
        for piece in pieces(body[1000:], 10):
            client.send(piece)
            gevent.sleep(0.005)
        release.set()
        wait_for(lambda: len(notes.teardowns) == 1, WAIT, "teardown")
        assert notes.results["child"] == sha(body)
    finally:
        client.close()


# -- 3. a streaming reader gets bytes as they arrive -----------------------------------

JSON_DOC = {"items": list(range(3000)), "text": "caf\u00e9 " * 500}
JSON_BODY = json.dumps(JSON_DOC).encode()
FILE_CONTENT = os.urandom(40_000)
FORM_BODY, FORM_TYPE = multipart({"name": "ada"}, {"f": ("a.bin", FILE_CONTENT)})

WHOLE_READERS: dict[str, t.Callable[[], t.Any]] = {
    "get_data": lambda: sha(request.get_data()),
    "json": lambda: request.json,
    "form": lambda: request.form.to_dict(),
    "files": lambda: sha(request.files["f"].read()),
}


@pytest.mark.parametrize(
    "body, content_type, readers, expected",
    [
        (JSON_BODY, "application/json", ["get_data", "json", "get_data"], [sha(JSON_BODY), JSON_DOC, sha(JSON_BODY)]),
        (FORM_BODY, FORM_TYPE, ["get_data", "form", "files"], [sha(FORM_BODY), {"name": "ada"}, sha(FILE_CONTENT)]),
    ],
    ids=["json", "multipart"],
)
def test_trickled_body_streams_to_the_view_while_children_read_it_whole(serve, body, content_type, readers, expected):
    app, notes = flask_app()

    @app.post("/stream")
    def stream() -> str:
        shared = request.shared_body()
        children = [geventctx.spawn(WHOLE_READERS[name]) for name in readers]
        seen = hashlib.sha256()
        first_piece_at = None
        while True:
            piece = request.stream.read(1000)
            if not piece:
                break
            if first_piece_at is None:
                first_piece_at = (shared.received, shared.loaded)
            seen.update(piece)
        gevent.joinall(children, timeout=WAIT)
        notes.results.update(first=first_piece_at, view=seen.hexdigest(), children=[c.value for c in children])
        return "ok"

    server = serve(app)
    client = RawClient(server.port)
    try:
        client.send_head(
            "POST", "/stream", {"Content-Length": str(len(body)), "Content-Type": content_type, "Connection": "close"}
        )
        client.trickle(body, 20, 0.01)
        assert client.read_response(WAIT).status == 200
    finally:
        client.close()
    received, loaded = notes.results["first"]
    assert not loaded and received < len(body)  # the view's first piece came long before the end
    assert notes.results["view"] == sha(body)
    assert notes.results["children"] == expected


# -- 4. killed anywhere: teardown once, nobody keeps reading ---------------------------


def pooled_server(serve: t.Any, app: t.Any) -> t.Any:
    return serve(app, spawn=gevent.pool.Pool(10))


def test_request_killed_while_its_view_waits_for_the_body_tears_down_once(serve, capfd):
    app, notes = flask_app()
    upload_view(app, notes)
    server = pooled_server(serve, app)
    client = stall(server, "/upload?children=1")
    try:
        wait_for(lambda: notes.body is not None and notes.body.waiting == 2, WAIT, "both readers to wait")
        server.stop(timeout=0.2)  # kills the request greenlet where it waits
        wait_for(lambda: len(notes.teardowns) == 1, WAIT, "teardown")
    finally:
        client.close()
    settle()
    assert len(notes.teardowns) == 1
    assert not notes.body.reading  # the pump was stopped too
    assert "reentrant call" not in capfd.readouterr().err


def test_request_killed_while_it_captures_the_body_for_a_child_tears_down_once(serve, gates):
    release = gates()
    app, notes = flask_app()

    @app.post("/later")
    def later() -> str:
        notes.body = request.shared_body()

        def child() -> None:
            release.wait(WAIT)
            notes.results["child"] = digest_or_error()

        geventctx.spawn(child)
        return "sent"

    server = pooled_server(serve, app)
    client = stall(server, "/later")
    try:
        assert client.read_response(WAIT).body == b"sent"
        wait_for(lambda: notes.body.reading, WAIT, "the capture after the response")
        server.stop(timeout=0.2)  # kills the request greenlet mid-capture
        assert client.closed_by_server(WAIT)  # its input is out of step now
        release.set()
        wait_for(lambda: len(notes.teardowns) == 1, WAIT, "teardown after the child")
    finally:
        client.close()
    assert isinstance(notes.results["child"], BodyReadError)  # a clear error, not a short body
    assert not notes.body.reading


def test_request_killed_during_teardown_still_frees_the_spool(serve, tmp_path):
    app, notes = flask_app(GEVENTCTX_BODY_MEMORY_LIMIT=1024, GEVENTCTX_BODY_SPOOL_DIR=str(tmp_path))
    upload_view(app, notes)
    in_teardown = Event()

    @app.teardown_request
    def slow_teardown(exc: BaseException | None) -> None:
        in_teardown.set()
        gevent.sleep(WAIT * 2)  # killed here

    server = pooled_server(serve, app)
    body = os.urandom(20_000)
    client = RawClient(server.port)
    try:
        client.send_head(
            "POST", "/upload?children=1&how=stream", {"Content-Length": str(len(body)), "Connection": "close"}
        )
        client.send(body)
        assert in_teardown.wait(WAIT)
        assert len(open_files_in(str(tmp_path))) == 1  # on disk while the request runs
        server.stop(timeout=0.2)
        wait_for(lambda: not open_files_in(str(tmp_path)), WAIT, "the spool file to be freed")
    finally:
        client.close()


# -- 5. spool files are gone in every path ---------------------------------------------


@pytest.mark.parametrize("ending", ["complete", "client-gone", "timeout"])
def test_spool_files_are_removed_at_teardown(serve, tmp_path, ending):
    app, notes = flask_app(
        GEVENTCTX_BODY_MEMORY_LIMIT=1024, GEVENTCTX_BODY_SPOOL_DIR=str(tmp_path), GEVENTCTX_BODY_TIMEOUT=0.5
    )
    upload_view(app, notes)
    server = serve(app)
    body = os.urandom(50_000)
    client = RawClient(server.port)
    try:
        client.send_head(
            "POST", "/upload?children=2&how=stream", {"Content-Length": str(len(body)), "Connection": "close"}
        )
        if ending == "complete":
            client.send(body)
            assert client.read_response(WAIT).status == 200
        else:
            client.send(body[:20_000])
            wait_for(lambda: notes.body is not None and notes.body.spool.on_disk, WAIT, "the spool to reach disk")
            if ending == "client-gone":
                client.close()
        wait_for(lambda: len(notes.teardowns) == 1, WAIT, "teardown")
        wait_for(lambda: not open_files_in(str(tmp_path)), WAIT, "the spool file to be freed")
    finally:
        client.close()
    assert os.listdir(tmp_path) == []
    assert notes.body is not None and notes.body.spool.closed


def test_memory_holds_only_the_memory_limit_of_a_large_streamed_body(serve):
    app, notes = flask_app(GEVENTCTX_BODY_MEMORY_LIMIT=64 * 1024)
    upload_view(app, notes)
    server = serve(app)
    body = os.urandom(3 * 1024 * 1024)
    client = RawClient(server.port)
    try:
        client.send_head(
            "POST", "/upload?children=1&how=stream", {"Content-Length": str(len(body)), "Connection": "close"}
        )
        client.send(body)
        # The child streamed the whole body (through the spool, to disk); the
        # view reads only after that read to the end, so it gets what
        # Werkzeug's stream gives then: b"" (G5, revised 2026-12-05).
        assert client.read_response(WAIT).body.decode().split(",") == [sha(b""), sha(body)]
    finally:
        client.close()
    assert notes.results["on_disk"]


def test_whole_body_read_shares_its_bytes_with_the_spool(serve):
    # get_data() holds the whole body in memory anyway: the spool keeps that
    # same object instead of a second copy on disk.
    app, notes = flask_app(GEVENTCTX_BODY_MEMORY_LIMIT=64 * 1024)

    @app.post("/whole")
    def whole() -> str:
        child = geventctx.spawn(request.get_data)
        data = request.get_data()
        child.join(WAIT)
        shared = request.shared_body()
        notes.results.update(same=child.value is data, kept=shared.spool.whole() is data, disk=shared.spool.on_disk)
        return sha(data)

    server = serve(app)
    body = os.urandom(1024 * 1024)
    client = RawClient(server.port)
    try:
        client.send_head("POST", "/whole", {"Content-Length": str(len(body)), "Connection": "close"})
        for piece in pieces(body, 8):
            client.send(piece)
            gevent.sleep(0.005)
        assert client.read_response(WAIT).body.decode() == sha(body)
    finally:
        client.close()
    assert notes.results == {"same": True, "kept": True, "disk": False}


def test_keep_alive_connection_is_in_step_after_a_partly_read_body(serve):
    # The view reads 100 bytes of 10000; the server discards the rest and
    # serves the next request on the same connection.
    app, notes = flask_app()

    @app.post("/peek")
    def peek() -> str:
        return sha(request.stream.read(100))

    server = serve(app)
    client = RawClient(server.port)
    body = os.urandom(10_000)
    try:
        for _ in range(2):
            client.send_head("POST", "/peek", {"Content-Length": str(len(body))})
            client.send(body)
            assert client.read_response(WAIT).body.decode() == sha(body[:100])
    finally:
        client.close()


# -- 6. what an attack on the tee found ------------------------------------------------


def test_no_100_continue_is_sent_after_the_final_response(serve):
    # The view hands off and answers without reading; the client waits for
    # the 100 as RFC 9110 allows. A capture for the child must not send a 100
    # after the final response: the client never sends the body, the body
    # times out for the child, and the connection closes.
    app, notes = flask_app(GEVENTCTX_BODY_TIMEOUT=0.5)

    @app.post("/later")
    def later() -> str:
        geventctx.spawn(lambda: notes.results.setdefault("child", digest_or_error()))
        return "sent"

    server = serve(app)
    client = RawClient(server.port)
    try:
        client.send_head("POST", "/later", {"Content-Length": "5000", "Expect": "100-continue"})
        response = client.read_response(WAIT)
        assert response.status == 200 and response.body == b"sent"
        assert client.closed_by_server(WAIT)
        assert client.received == b""  # nothing after the final response
    finally:
        client.close()
    wait_for(lambda: len(notes.teardowns) == 1, WAIT, "teardown")
    assert isinstance(notes.results["child"], BodyTimeout)


def test_reader_not_holding_the_request_after_it_ended_gets_a_clear_error(serve):
    # A plain gevent.spawn under patch() sees the request but does not hold
    # it: reading a body nobody read before the response must not race the
    # server for the socket.
    app, notes = flask_app()
    done = Event()

    @app.post("/late")
    def late() -> str:
        def child() -> None:
            gevent.sleep(0.2)
            notes.results["child"] = digest_or_error()
            done.set()

        gevent.spawn(child)
        return "ok"

    server = serve(app)
    geventctx.patch()
    try:
        client = RawClient(server.port)
        try:
            body = os.urandom(3000)
            client.send_head("POST", "/late", {"Content-Length": str(len(body))})
            client.send(body)
            assert client.read_response(WAIT).body == b"ok"
            assert done.wait(WAIT)
            client.send_head("GET", "/nothing", {"Connection": "close"})  # the connection is in step
            assert client.read_response(WAIT).status == 404
        finally:
            client.close()
    finally:
        geventctx.unpatch()
    error = notes.results["child"]
    assert isinstance(error, BodyReadError) and "has ended" in str(error)


def test_uploaded_file_is_complete_for_thread_tasks_and_the_parent(serve):
    pool = geventctx.ThreadPool(4)
    app, notes = flask_app()
    content = os.urandom(1_500_000)  # Werkzeug spools it to a file
    body, content_type = multipart({}, {"f": ("big.bin", content)})

    def read_upload() -> str:
        seen = hashlib.sha256()
        upload = request.files["f"]
        while piece := upload.read(4096):
            seen.update(piece)
        return seen.hexdigest()

    @app.post("/files")
    def files() -> str:
        request.files  # parsed once, before the readers start
        tasks = [pool.spawn(read_upload) for _ in range(4)]
        mine = read_upload()
        notes.results["digests"] = [mine] + [task.get(timeout=WAIT) for task in tasks]
        return "ok"

    try:
        response = serve(app).request("POST", "/files", headers={"Content-Type": content_type}, body=body)
    finally:
        pool.kill()
    assert response.status == 200
    assert notes.results["digests"] == [sha(content)] * 5


def test_an_upload_closed_by_one_reader_stays_readable_for_the_others(serve):
    app, notes = flask_app()

    @app.post("/files")
    def files() -> str:
        def child() -> str:
            upload = request.files["f"]
            data = upload.read()
            upload.close()  # done with it, as a child would be
            return sha(data)

        mine = geventctx.spawn(child).get(timeout=WAIT)
        notes.results["digests"] = [mine, sha(request.files["f"].read())]
        return "ok"

    content = os.urandom(5000)
    body, content_type = multipart({}, {"f": ("a.bin", content)})
    response = serve(app).request("POST", "/files", headers={"Content-Type": content_type}, body=body)
    assert response.status == 200
    assert notes.results["digests"] == [sha(content)] * 2


def test_an_uploads_relative_seek_moves_from_the_callers_own_position(serve):
    # G5, per-greenlet positions: seek(n, SEEK_CUR) counts from the caller's
    # position, not from where another reader left the shared file.
    app, notes = flask_app()
    content = os.urandom(5000)

    @app.post("/files")
    def files() -> str:
        upload = request.files["f"]
        assert upload.read(1000) == content[:1000]  # the parent is at 1000

        def child() -> tuple[int, bytes, int]:
            moved_to = upload.seek(10, io.SEEK_CUR)  # from the child's own 0
            return moved_to, upload.read(5), upload.tell()

        notes.results["child"] = geventctx.spawn(child).get(timeout=WAIT)
        moved_to = upload.seek(-500, io.SEEK_CUR)  # from the parent's own 1000
        notes.results["parent"] = (moved_to, upload.read(5), upload.tell())
        return "ok"

    body, content_type = multipart({}, {"f": ("a.bin", content)})
    response = serve(app).request("POST", "/files", headers={"Content-Type": content_type}, body=body)
    assert response.status == 200
    assert notes.results["child"] == (10, content[10:15], 15)
    assert notes.results["parent"] == (500, content[500:505], 505)


def test_chunked_bytes_that_arrived_reach_a_streaming_reader_at_once(serve):
    # One 100-byte chunk arrives, then the client waits until the child has
    # its 5 bytes: the read must not wait for the next chunk.
    app, notes = flask_app()

    @app.post("/peek")
    def peek() -> str:
        child = geventctx.spawn(lambda: notes.results.setdefault("child", request.stream.read(5)))
        notes.results["parent"] = len(request.get_data())
        child.join(WAIT)
        return "ok"

    server = serve(app)
    client = RawClient(server.port)
    try:
        client.send_head("POST", "/peek", {"Transfer-Encoding": "chunked", "Connection": "close"})
        client.send(b"64\r\n" + b"c" * 100 + b"\r\n")
        wait_for(lambda: "child" in notes.results, WAIT, "the child's 5 bytes before the next chunk")
        client.send(b"64\r\n" + b"d" * 100 + b"\r\n0\r\n\r\n")
        assert client.read_response(WAIT).status == 200
    finally:
        client.close()
    assert notes.results == {"child": b"ccccc", "parent": 200}


def test_iterating_the_stream_by_line_reads_the_socket_in_pieces_not_bytes(serve, monkeypatch):
    from geventctx import _servers

    reads = [0]
    read = _servers._PywsgiLength.read

    def counted(self: t.Any, wanted: int) -> bytes:
        reads[0] += 1
        return read(self, wanted)

    monkeypatch.setattr(_servers._PywsgiLength, "read", counted)
    app, notes = flask_app()

    @app.post("/lines")
    def lines() -> str:
        notes.results["lines"] = sum(1 for _line in request.stream)
        return "ok"

    body = b"".join(b"%05d %s\n" % (i, b"x" * 90) for i in range(3000))  # 300 KB of lines
    server = serve(app)
    client = RawClient(server.port)
    try:
        client.send_head("POST", "/lines", {"Content-Length": str(len(body)), "Connection": "close"})
        for piece in pieces(body, 30):
            client.send(piece)
            gevent.sleep(0.002)
        assert client.read_response(WAIT).status == 200
    finally:
        client.close()
    assert notes.results["lines"] == 3000
    assert reads[0] < 200  # one read per piece that arrived, not one per byte


def test_request_killed_while_a_streaming_response_reads_the_body_leaves_nothing_running(serve):
    from flask import stream_with_context

    app, notes = flask_app()

    @app.post("/stream")
    def stream() -> t.Any:
        notes.body = request.shared_body()

        def generate() -> t.Iterator[bytes]:
            yield b"start "
            yield request.stream.read(50)  # the client stalls: waits here

        return app.response_class(stream_with_context(generate()))

    server = pooled_server(serve, app)
    client = stall(server, "/stream")
    try:
        client.read_until(b"start ", WAIT)
        wait_for(lambda: notes.body.waiting == 1, WAIT, "the generator to wait for the body")
        server.stop(timeout=0.2)
        wait_for(lambda: not notes.body.reading, WAIT, "the pump to stop")
    finally:
        client.close()


def test_views_that_read_part_of_a_steady_upload_leave_no_error_in_the_hub(serve, capfd):
    # The pump reads ahead; when the view returns it is stopped without loss.
    # That stop is a hub callback that must find the pump still reading.
    app, notes = flask_app()

    @app.post("/part/<int:n>")
    def part(n: int) -> str:
        return str(len(request.stream.read(n)))

    server = serve(app)
    body = os.urandom(1 << 20)

    def upload(n: int) -> bytes:
        client = RawClient(server.port)
        try:
            client.send_head("POST", f"/part/{n}", {"Content-Length": str(len(body)), "Connection": "close"})
            for start in range(0, len(body), 65536):
                client.send(body[start : start + 65536])
                gevent.sleep(0.001)
            return client.read_response(WAIT).body
        except OSError:
            return b"gone"
        finally:
            client.close()

    sizes = [1000, 70_000, 300_000, 900_000] * 3
    jobs = [gevent.spawn(upload, n) for n in sizes]
    gevent.joinall(jobs, timeout=WAIT * 2)
    assert [job.value for job in jobs] == [str(n).encode() for n in sizes]
    wait_for(lambda: len(notes.teardowns) == len(sizes), WAIT, "every teardown")
    settle()
    err = capfd.readouterr().err
    assert "_QuietStop" not in err and "Traceback" not in err, err[-2000:]


@pytest.mark.parametrize("child_reads", [True, False], ids=["child-reads-later", "child-never-reads"])
def test_capture_after_the_response_obeys_max_content_length(serve, child_reads):
    app, notes = flask_app(MAX_CONTENT_LENGTH=100_000)

    @app.post("/later")
    def later() -> str:
        notes.body = request.shared_body()

        def child() -> None:
            gevent.sleep(0.2)
            if child_reads:
                notes.results["child"] = digest_or_error()

        geventctx.spawn(child)
        return "sent"

    server = serve(app)
    client = RawClient(server.port)
    try:
        client.send_head("POST", "/later", {"Transfer-Encoding": "chunked", "Connection": "close"})
        assert client.read_response(WAIT).body == b"sent"
        for _ in range(40):  # 320 KB, more than the limit
            client.send(b"2000\r\n" + b"z" * 0x2000 + b"\r\n")
        wait_for(lambda: len(notes.teardowns) == 1, WAIT, "teardown")
    except OSError:
        pass  # the server may stop reading us: that is the point
    finally:
        client.close()
    assert notes.body.received <= 100_001  # never more than one byte past the limit
    if child_reads:
        assert isinstance(notes.results["child"], RequestEntityTooLarge)


def test_read_of_the_whole_length_is_never_silently_short(serve):
    # request.stream.read(request.content_length): the client sends 300 of
    # 1000 bytes and leaves. An error, as pywsgi alone gives, not 300 bytes
    # (a request that never hands off reads as plain Werkzeug: pywsgi's own
    # OSError; through the shared body, ClientDisconnected).
    app, notes = flask_app()

    @app.post("/exact")
    def exact() -> str:
        try:
            notes.results["read"] = len(request.stream.read(request.content_length))
        except Exception as exc:
            notes.results["read"] = exc
        return "ok"

    server = serve(app)
    client = stall(server, "/exact", announced=1000, sent=300)
    gevent.sleep(0.1)
    client.close()
    wait_for(lambda: len(notes.teardowns) == 1, WAIT, "teardown")
    assert isinstance(notes.results["read"], (ClientDisconnected, OSError)), notes.results


def test_child_of_a_request_killed_before_it_read_the_body_gets_an_error_not_a_short_body(serve, gates):
    from flask import stream_with_context

    release = gates()
    app, notes = flask_app()

    @app.post("/stream")
    def stream() -> t.Any:
        def child() -> None:
            release.wait(WAIT)
            notes.results["child"] = digest_or_error()

        geventctx.spawn(child)

        def generate() -> t.Iterator[bytes]:
            yield b"start "
            Event().wait(WAIT)  # the server kills the handler here

        return app.response_class(stream_with_context(generate()))

    server = pooled_server(serve, app)
    client = RawClient(server.port)
    try:
        client.send_head("POST", "/stream", {"Transfer-Encoding": "chunked"})
        client.send(b"5\r\nabcde\r\n0\r\n\r\n")
        client.read_until(b"start ", WAIT)
        server.stop(timeout=0.2)
        release.set()
        wait_for(lambda: "child" in notes.results, WAIT, "the child's read")
    finally:
        client.close()
    assert isinstance(notes.results["child"], BodyReadError), notes.results


def test_body_timeout_escaping_a_plain_wsgi_app_gets_an_error_response(serve):
    def app(environ: dict[str, t.Any], start_response: t.Any) -> list[bytes]:
        data = environ["wsgi.input"].read()  # the client stalls: BodyTimeout escapes
        start_response("200 OK", [("Content-Length", str(len(data)))])
        return [data]

    server = serve(ContextMiddleware(app, body_timeout=0.3), log=None)
    client = stall(server, "/")
    try:
        response = client.read_response(WAIT)
        assert response.status == 500  # gevent.pywsgi's own page for an app error
        assert client.closed_by_server(WAIT)
    finally:
        client.close()


def test_first_read_in_a_thread_not_handed_the_request_reads_through_the_request_hub(serve):
    # gevent's own hub threadpool (not geventctx.ThreadPool): the thread gets
    # the request object by hand and is the first to read its body.
    app, notes = flask_app()

    @app.post("/foreign")
    def foreign() -> str:
        req = request._get_current_object()  # type: ignore[attr-defined]
        notes.results["thread"] = gevent.get_hub().threadpool.apply(lambda: sha(req.get_data()))
        return "ok"

    body = os.urandom(5000)
    response = serve(app).request("POST", "/foreign", body=body, piece=1000, delay=0.01)
    assert response.status == 200
    assert notes.results["thread"] == sha(body)


def test_bytes_after_a_malformed_chunk_are_never_run_as_a_request(serve):
    # Without geventctx pywsgi runs the buffered rest as the next request;
    # the shared body closes the connection and drops what was buffered.
    app, notes = flask_app()
    upload_view(app, notes)
    smuggled: list[str] = []

    @app.get("/smuggled")
    def smuggled_view() -> str:
        smuggled.append(request.path)
        return "ran"

    server = serve(app)
    client = RawClient(server.port)
    try:
        client.send_head("POST", "/upload", {"Transfer-Encoding": "chunked"})
        client.send(b"Q" + b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n")
        assert client.read_response(WAIT).status == 400
        assert client.closed_by_server(WAIT)
    finally:
        client.close()
    settle()
    assert smuggled == []


# -- 7. the same under gunicorn -k gevent ------------------------------------------------


def gunicorn_body_app(server: t.Callable[..., t.Any], **env: str) -> t.Any:
    argv = [
        executable("gunicorn"), "-k", "gevent", "-w", "1", "-b", "127.0.0.1:{port}",
        "--pythonpath", "tests", "--log-level", "warning", "bodyapp:app",
    ]
    return server(argv, **env)


def gunicorn_events(port: int) -> dict[str, t.Any]:
    client = RawClient(port)
    try:
        client.send_head("GET", "/events", {"Connection": "close"})
        return t.cast(dict[str, t.Any], json.loads(client.read_response(WAIT).body))
    finally:
        client.close()


def test_gunicorn_stalled_body_does_not_hold_back_the_response_and_closes_at_the_timeout(server):
    srv = gunicorn_body_app(server, GEVENTCTX_BODY_TIMEOUT="1")
    client = RawClient(srv.port)
    try:
        client.send_head("POST", "/fire", {"Content-Length": "100000", "Content-Type": "application/octet-stream"})
        client.send(b"x" * 10)
        response = client.read_response(WAIT)
        assert response.status == 200 and response.body == b"sent", srv.context()
        wait_for(lambda: gunicorn_events(srv.port)["teardown_request"], WAIT, "teardown in gunicorn")
        assert client.closed_by_server(WAIT), srv.context()
    finally:
        client.close()
    assert gunicorn_events(srv.port)["teardown_request"] == ["None"], srv.context()


def test_gunicorn_slow_but_steady_client_is_not_timed_out(server):
    # gunicorn's input blocks until it has what it was asked for: geventctx
    # asks it for what it buffered, or for its next 1 KiB.
    srv = gunicorn_body_app(server, GEVENTCTX_BODY_TIMEOUT="1")
    body = os.urandom(4000)
    client = RawClient(srv.port)
    try:
        client.send_head("POST", "/upload?children=1", {"Content-Length": str(len(body)), "Connection": "close"})
        for piece in pieces(body, 20):  # 200 bytes every 0.1 s: 2 s in all
            client.send(piece)
            gevent.sleep(0.1)
        response = client.read_response(WAIT)
    finally:
        client.close()
    assert response.status == 200, response.body + srv.context().encode()
    assert response.body.decode().split(",") == [sha(body)] * 2, srv.context()


def test_gunicorn_client_gone_mid_body_is_the_same_client_disconnected_for_every_reader(server):
    # gunicorn's input answers b"" when the client hangs up before the
    # announced length: never a short body, one error for everyone.
    srv = gunicorn_body_app(server)
    client = RawClient(srv.port)
    try:
        client.send_head("POST", "/readers?children=3", {"Content-Length": "100000"})
        client.send(os.urandom(3000))
    finally:
        client.close()
    wait_for(lambda: gunicorn_events(srv.port)["readers"], WAIT, "the readers in gunicorn")
    (outcomes,) = gunicorn_events(srv.port)["readers"]
    assert len(outcomes) == 4 and len(set(outcomes)) == 1, outcomes + [srv.context()]
    assert outcomes[0].startswith("ClientDisconnected "), outcomes + [srv.context()]


def test_gunicorn_client_waiting_for_100_continue_and_curl(server, tmp_path):
    srv = gunicorn_body_app(server)
    body = os.urandom(300_000)
    client = RawClient(srv.port)
    try:
        client.send_head(
            "POST", "/upload?children=2",
            {"Content-Length": str(len(body)), "Expect": "100-continue", "Connection": "close"},
        )
        assert client.read_until(b"\r\n\r\n", WAIT).startswith(b"HTTP/1.1 100 Continue"), srv.context()
        client.send(body)
        assert client.read_response(WAIT).body.decode().split(",") == [sha(body)] * 3, srv.context()
    finally:
        client.close()
    data = os.urandom(2 * 1024 * 1024)
    path = tmp_path / "upload.bin"
    path.write_bytes(data)
    result = curl(
        "--verbose", "--expect100-timeout", "30", "--data-binary", f"@{path}",
        f"http://127.0.0.1:{srv.port}/upload?children=2", timeout=20,
    )
    assert "< HTTP/1.1 100 Continue" in result.stderr, result.stderr[-2000:] + srv.context()
    assert result.stdout.split(",") == [sha(data)] * 3, srv.context()


# -- a reader alone reads the socket itself (no pump greenlet, no switch) ----------


def test_a_body_that_arrived_with_its_headers_is_read_without_a_switch(serve):
    # A small body comes with its headers: the view's get_data() takes it
    # from the server's buffer at once instead of waking a pump greenlet and
    # waiting in the hub (what made every request with a body ~2 switches
    # slower). A greenlet scheduled before the read has not run after it.
    app, notes = flask_app()
    ran: list[str] = []

    @app.post("/read")
    def read() -> str:
        gevent.spawn(ran.append, "other greenlet")
        data = request.get_data()
        notes.results["ran_before_read_returned"] = list(ran)
        children = [geventctx.spawn(lambda: request.get_data()) for _ in range(2)]
        gevent.joinall(children, timeout=WAIT)
        assert all(child.value == data for child in children)
        return sha(data)

    server = serve(app)
    body = os.urandom(3000)
    response = RawClient(server.port)
    response.send_head("POST", "/read", {"Content-Length": str(len(body)), "Connection": "close"})
    response.send(body)
    assert response.read_response(WAIT).body == sha(body).encode()
    assert notes.results["ran_before_read_returned"] == []
    assert notes.teardowns == [None]


@pytest.mark.parametrize("interrupt", ["own timeout", "killed"])
def test_a_reader_interrupted_while_it_reads_the_socket_itself_loses_nothing(serve, gates, interrupt):
    # The view reads the stalled body itself and is interrupted while it
    # waits for the socket (its own gevent.Timeout, or a kill of the child
    # reading): nothing read is lost, the body is not failed, and the next
    # reader — waiting meanwhile — gets the complete body once the client
    # sends the rest.
    app, notes = flask_app(GEVENTCTX_BODY_TIMEOUT=WAIT)
    rest_sent = gates()
    body = os.urandom(20_000)

    @app.post("/read")
    def read() -> str:
        notes.body = request.shared_body()
        if interrupt == "own timeout":
            try:
                with gevent.Timeout(0.2):
                    request.get_data()
            except gevent.Timeout:
                notes.results["interrupted"] = True
            waiter = geventctx.spawn(request.get_data)
        else:
            first = geventctx.spawn(request.get_data)
            wait_for(lambda: notes.body.reading, WAIT, "the first child reading")
            waiter = geventctx.spawn(request.get_data)
            gevent.sleep(0.05)  # the second child waits on the first one's read
            first.kill(block=True, timeout=WAIT)
            notes.results["interrupted"] = first.dead and first.exception is None
        notes.results["error_after_interrupt"] = notes.body.error
        rest_sent.wait(WAIT)
        waiter.join(WAIT)
        return sha(waiter.get(block=False)) + "," + sha(request.get_data())

    server = serve(app)
    client = RawClient(server.port)
    client.send_head("POST", "/read", {"Content-Length": str(len(body)), "Connection": "close"})
    client.send(body[:5000])
    try:
        wait_for(lambda: notes.results.get("interrupted"), WAIT, "the reader interrupted")
        client.send(body[5000:])
        rest_sent.set()
        response = client.read_response(WAIT)
    finally:
        client.close()
    assert notes.results["error_after_interrupt"] is None
    assert response.status == 200 and response.body == f"{sha(body)},{sha(body)}".encode()
    assert not notes.body.broken


def test_a_view_whose_own_timeout_escapes_its_inline_read_gets_a_500_and_the_connection_closes(serve):
    # The view's gevent.Timeout interrupts its own read of a stalled body and
    # escapes: the request is killed after its teardown released the body.
    # The input is out of step: the connection is shut at once (not drained
    # by pywsgi for as long as the client stalls).
    app, notes = flask_app(GEVENTCTX_BODY_TIMEOUT=None)

    @app.post("/read")
    def read() -> str:
        notes.body = request.shared_body()
        with gevent.Timeout(0.2):
            request.get_data()
        return "never"

    server = serve(app)
    client = stall(server, "/read", announced=10_000, sent=1000)
    try:
        response = client.read_response(WAIT)
        assert response.status == 500
        assert client.closed_by_server(WAIT)
    finally:
        client.close()
    assert notes.teardowns and isinstance(notes.teardowns[0], gevent.Timeout)
    assert notes.body.broken


def test_a_request_killed_while_a_child_reads_inline_fails_the_childs_read_at_once(serve, capfd, monkeypatch):
    # The child reads the stalled body itself when the request is killed
    # (the view's own Timeout escapes): the connection's reading side is
    # shut, so the child's read ends now with an error — never a short body,
    # no second reader inside the server's buffered reader, and nothing
    # thrown at the inline reader from the hub (it is not a pump greenlet).
    app, notes = flask_app(GEVENTCTX_BODY_TIMEOUT=None)
    hub = gevent.get_hub()
    reported: list[t.Any] = []
    handle_error = hub.handle_error

    def recording(context: t.Any, *exc_info: t.Any) -> None:
        reported.append((context, exc_info[1]))
        handle_error(context, *exc_info)

    monkeypatch.setattr(hub, "handle_error", recording)

    @app.post("/read")
    def read() -> str:
        notes.body = request.shared_body()
        child = geventctx.spawn(digest_or_error)
        notes.results["child"] = child
        wait_for(lambda: notes.body.reading, WAIT, "the child reading inline")
        raise gevent.Timeout(0.01)

    server = serve(app)
    client = stall(server, "/read", announced=10_000, sent=1000)
    try:
        assert client.read_response(WAIT).status == 500
        assert client.closed_by_server(WAIT)
        wait_for(lambda: len(notes.teardowns) == 1, WAIT, "teardown after the child")
    finally:
        client.close()
    child = notes.results["child"]
    assert isinstance(child.value, Exception), child.value
    assert "reentrant call" not in capfd.readouterr().err
    # The hub saw the view's error (pywsgi reports it with the environ) and
    # nothing else: no error of geventctx's own in a hub callback.
    assert [error for context, error in reported if not isinstance(context, dict)] == []
    assert any(isinstance(error, gevent.Timeout) for _, error in reported)


def test_the_pop_of_a_copied_request_context_does_not_close_the_request_under_the_view(serve):
    # copy_current_request_context's copy pops and calls request.close() on
    # the shared request: with no child holding the request, that must not
    # run in place — the view still reads its uploaded file afterwards.
    from flask import copy_current_request_context

    app, notes = flask_app()

    @app.post("/upload")
    def upload() -> str:
        upload = request.files["f"]

        @copy_current_request_context
        def work() -> int:
            return len(request.files["f"].read())

        read_in_copy = work()
        upload.seek(0)
        return f"{read_in_copy},{len(upload.read())}"

    server = serve(app)
    body, content_type = multipart({}, {"f": ("f.txt", b"F" * 3000)})
    client = RawClient(server.port)
    client.send_head("POST", "/upload", {"Content-Length": str(len(body)), "Content-Type": content_type})
    client.send(body)
    try:
        assert client.read_response(WAIT).body == b"3000,3000"
    finally:
        client.close()


def test_a_thread_task_waiting_for_more_than_an_inline_reader_gets_the_pump(serve):
    # A greenlet reads 10 bytes itself while a ThreadPool task waits for the
    # whole body: when the greenlet has its bytes, the pump takes over for
    # the task (which re-checks only now and then) instead of nobody reading.
    app, notes = flask_app()
    pool = geventctx.ThreadPool(1)

    @app.post("/read")
    def read() -> str:
        notes.body = request.shared_body()
        reader = geventctx.spawn(request.stream.read, 10)
        wait_for(lambda: notes.body.reading, WAIT, "the greenlet reading inline")
        task = pool.spawn(lambda: sha(request.get_data()))
        first = reader.get(timeout=WAIT)
        notes.results["reading_after_the_greenlet"] = notes.body.reading
        return f"{len(first)},{task.get(timeout=WAIT)}"

    server = serve(app)
    body = os.urandom(20_000)
    client = RawClient(server.port)
    client.send_head("POST", "/read", {"Content-Length": str(len(body)), "Connection": "close"})
    try:
        wait_for(lambda: notes.body is not None and notes.body.waiting == 2, WAIT, "both readers")
        client.send(body[:10])
        wait_for(lambda: "reading_after_the_greenlet" in notes.results, WAIT, "the greenlet's read")
        client.send(body[10:])
        assert client.read_response(WAIT).body == f"10,{sha(body)}".encode()
    finally:
        client.close()
        pool.kill()
    assert notes.results["reading_after_the_greenlet"] is True


# -- G5: one consumer keeps no copy --------------------------------------------------

UPLOAD = os.urandom(3 * 1024 * 1024)  # three times the spool's memory limit


def form_app(notes: Notes, **config: t.Any) -> Flask:
    """``POST /form``: the view hands off, and a child reads the same form at
    the same time (``?raw=1``: the child first reads the raw stream, part of
    it before the view parses, the rest after)."""
    app, _ = flask_app(**config)
    app.teardown_request(lambda exc: notes.teardowns.append(exc))

    @app.post("/form")
    def form() -> str:
        notes.body = None
        started = Event()

        def child() -> t.Any:
            try:
                if request.args.get("raw"):
                    seen = hashlib.sha256(request.stream.read(4096))
                    started.set()
                    while piece := request.stream.read(65536):
                        seen.update(piece)
                    return seen.hexdigest()
                started.set()
                return (request.form, sha(request.files["upload"].read()))
            except Exception as exc:
                return exc

        kid = geventctx.spawn(child)
        notes.body = request.shared_body()
        started.wait(WAIT)
        try:
            mine = (request.form, sha(request.files["upload"].read()))
        except Exception as exc:
            mine = exc
        kid.join(WAIT)
        notes.results.update(mine=mine, child=kid.value, spool=notes.body.spool)
        if isinstance(mine, Exception):
            raise mine
        return "ok"

    return app


@pytest.mark.parametrize("slow", [False, True], ids=["fast-client", "trickling-client"])
def test_a_form_read_by_the_view_and_a_child_at_once_is_parsed_once_and_never_spooled(serve, slow):
    # The common case of a view that hands off: one greenlet parses, the
    # other waits for its result. The parser reads the socket itself and
    # the spool keeps none of the 3 MiB (before: all of it, 2 MiB on disk).
    notes = Notes()
    server = serve(form_app(notes))
    body, content_type = multipart({"title": "report"}, {"upload": ("a.bin", UPLOAD)})
    response = server.request(
        "POST", "/form", headers={"Content-Type": content_type}, body=body,
        piece=256 * 1024 if slow else 0, delay=0.01 if slow else 0.0, timeout=WAIT * 2,
    )
    assert response is not None and response.status == 200, response
    mine, child = notes.results["mine"], notes.results["child"]
    assert mine[1] == child[1] == sha(UPLOAD)
    assert child[0] is mine[0] and mine[0]["title"] == "report"  # the same parsed form
    spool = notes.results["spool"]
    assert spool.size == len(body)  # every byte went by, counted
    assert spool.written == 0 and spool.most_kept == 0  # and none was kept


def test_a_raw_reader_that_began_before_a_form_parse_still_gets_every_byte(serve):
    # The bytes behind a reader that has a position are kept for it: the
    # child read 4 KiB of the raw stream, then the view parsed the form.
    notes = Notes()
    server = serve(form_app(notes))
    body, content_type = multipart({"title": "report"}, {"upload": ("a.bin", UPLOAD)})
    response = server.request(
        "POST", "/form?raw=1", headers={"Content-Type": content_type}, body=body, timeout=WAIT * 2
    )
    assert response is not None and response.status == 200, response
    assert notes.results["mine"][1] == sha(UPLOAD)
    assert notes.results["child"] == sha(body)  # whole, though the view's parse ran ahead
    assert notes.results["spool"].most_kept > 0


def test_a_form_parse_killed_midway_gives_every_later_consumer_a_clear_error(serve):
    # The parse read the bytes alone and kept none; killed midway, it leaves
    # no body to parse again: the next consumer gets BodyReadError (400) and
    # the connection closes, never a form made of the rest of the body.
    notes = Notes()
    app, _ = flask_app()
    app.teardown_request(lambda exc: notes.teardowns.append(exc))

    @app.post("/kill")
    def kill() -> str:
        body = request.shared_body()
        kid = geventctx.spawn(lambda: request.form)
        wait_for(lambda: body.received > 100_000, WAIT, "the child's parse to read part of the body")
        kid.kill(block=True, timeout=WAIT)
        outcomes = []
        for consume in (lambda: request.form, lambda: request.stream.read(10), request.get_data):
            try:
                outcomes.append(consume())
            except BodyReadError as exc:
                outcomes.append(exc)
        notes.results["outcomes"] = outcomes
        return "answered"

    server = serve(app)
    body, content_type = multipart({"title": "report"}, {"upload": ("a.bin", UPLOAD)})
    client = RawClient(server.port)
    try:
        client.send_head("POST", "/kill", {"Content-Length": str(len(body)), "Content-Type": content_type})
        client.send(body[:200_000])  # then stalls: the child's parse waits for more
        response = client.read_response(WAIT)
        assert response.status == 200 and response.body == b"answered"
        assert client.closed_by_server(WAIT)  # the input is out of step
    finally:
        client.close()
    outcomes = notes.results["outcomes"]
    assert all(isinstance(outcome, BodyReadError) for outcome in outcomes), outcomes
    assert "interrupted" in str(outcomes[0])
    wait_for(lambda: len(notes.teardowns) == 1, WAIT, "teardown")


def test_a_stalled_client_times_out_a_form_parse_read_straight_off_the_socket(serve):
    # The parse's own read is bounded by the body timeout per wait, as the
    # pump's are: both consumers get the same 408 and the connection closes.
    notes = Notes()
    server = serve(form_app(notes, GEVENTCTX_BODY_TIMEOUT=0.5))
    body, content_type = multipart({"title": "report"}, {"upload": ("a.bin", UPLOAD)})
    client = RawClient(server.port)
    try:
        client.send_head("POST", "/form", {"Content-Length": str(len(body)), "Content-Type": content_type})
        client.send(body[:300_000])
        response = client.read_response(WAIT)
        assert response.status == 408, response.body
        assert client.closed_by_server(WAIT)
    finally:
        client.close()
    mine, child = notes.results["mine"], notes.results["child"]
    assert isinstance(mine, BodyTimeout) and child is mine


def test_a_form_parsed_alone_in_a_thread_task_is_read_by_the_request_hub(serve):
    # A ThreadPool task that alone parses the form must not read the
    # connection's socket from its thread (it belongs to the request's hub):
    # its bytes come through the pump, as any thread task's do.
    pool = geventctx.ThreadPool(2)
    notes = Notes()
    app, _ = flask_app()

    def parse() -> t.Any:
        try:
            return (request.form["title"], sha(request.files["upload"].read()))
        except Exception as exc:
            return exc

    @app.post("/thread")
    def thread() -> str:
        notes.results["task"] = pool.spawn(parse).get(timeout=WAIT)
        return "ok"

    body, content_type = multipart({"title": "report"}, {"upload": ("a.bin", UPLOAD)})
    try:
        response = serve(app).request(
            "POST", "/thread", headers={"Content-Type": content_type}, body=body, piece=512 * 1024, delay=0.01,
            timeout=WAIT * 2,
        )
    finally:
        pool.kill()
    assert response is not None and response.status == 200, response
    assert notes.results["task"] == ("report", sha(UPLOAD))


def test_a_read_through_parse_leaves_no_file_descriptor_behind(serve):
    # The parse reads through a duplicate of the connection's socket (its
    # timeout bounds the parse's waits, not the response's writes): it is
    # closed with the body, so requests leave no descriptor open.
    notes = Notes()
    server = serve(form_app(notes, GEVENTCTX_BODY_TIMEOUT=5.0))
    body, content_type = multipart({"title": "report"}, {"upload": ("a.bin", UPLOAD)})

    def post() -> None:
        response = server.request("POST", "/form", headers={"Content-Type": content_type}, body=body, timeout=WAIT * 2)
        assert response is not None and response.status == 200, response

    post()  # warm: the server's own descriptors
    wait_for(lambda: notes.results.get("spool") is not None and notes.results["spool"].closed, WAIT, "teardown")
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(5):
        post()
        wait_for(lambda: notes.results["spool"].closed, WAIT, "teardown")
    settle()
    assert notes.results["spool"].written == 0  # it did read through
    assert len(os.listdir("/proc/self/fd")) <= before


def test_a_slow_but_steady_client_does_not_time_out_a_form_parse_read_straight_off_the_socket(serve):
    # The body timeout bounds each wait for a byte, not a parser's read of
    # 64 KiB: 12 pieces 0.15 s apart take far longer than the 0.5 s timeout.
    notes = Notes()
    server = serve(form_app(notes, GEVENTCTX_BODY_TIMEOUT=0.5))
    content = os.urandom(30_000)
    body, content_type = multipart({"title": "report"}, {"upload": ("a.bin", content)})
    client = RawClient(server.port)
    try:
        client.send_head(
            "POST", "/form", {"Content-Length": str(len(body)), "Content-Type": content_type, "Connection": "close"}
        )
        client.trickle(body, 12, 0.15)
        response = client.read_response(WAIT)
    finally:
        client.close()
    assert response.status == 200, response.body
    assert notes.results["mine"][1] == notes.results["child"][1] == sha(content)
    assert notes.results["spool"].written == 0 and notes.results["spool"].most_kept == 0
