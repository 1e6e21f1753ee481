"""Reliability: volume, randomness and faults, over a real gevent.pywsgi server.

Every case runs Flask apps with ``GeventContext`` (some also inside the WSGI
``ContextMiddleware``) behind a real ``gevent.pywsgi.WSGIServer`` on
127.0.0.1, driven by raw-socket clients: many at once, each on its own
connection, with random sleeps, random bodies, random transfers and random
faults. Randomness is seeded (``GEVENTCTX_SEED`` overrides the seed; every
failure message names it). Each case has a short version in the normal suite
and a long one marked ``slow`` (``make soak``).

1. Isolation under load (G2, G3): thousands of concurrent requests with
   distinct users, four children each; no child, teardown or response ever
   sees another request's user, ``g``, session, contextvar or scope.
2. Body integrity (G5): slow Content-Length and chunked uploads of JSON,
   multipart and urlencoded bodies, four concurrent readers mixing every
   consumer; every digest equals the client's, the socket is read once.
3. Fault matrix (G4): child raises, child killed, reader killed mid-read,
   view raises, client gone mid-upload, stragglers (kill and wait), server
   stopped with children (and a view) alive: teardown runs exactly once,
   after every child, and nothing hangs.

   Server stopped: ``server.stop()`` stops accepting and (with a pool)
   waits for, then kills, the server's own handler greenlets. The children
   a request handed its context to are the request's, not the server's:
   they are not killed, and the request's teardown keeps waiting for them
   and runs once when the last one ends (the view's exception, here the
   handler's ``GreenletExit``, reaches it). Killing them is the
   application's decision (what ``geventctx.registry`` lists); if it does,
   the teardown runs once too. Exiting the process without either is
   outside what a library can promise.
4. Bad input (G5): malformed chunking, truncated bodies, bodies over
   ``MAX_CONTENT_LENGTH``, invalid JSON: a clear 4xx for the client and the
   same error for every reader; plus fuzzed chunked bodies.

No assertion depends on timing: waits are bounded and events are ordered by
gates the test opens itself.
"""

from __future__ import annotations

import collections
import contextvars
import hashlib
import json
import logging
import os
import random
import resource
import socket as stdlib_socket
import string
import typing as t
from dataclasses import dataclass, field
from urllib.parse import urlencode

import gevent
import gevent.monkey
import gevent.pool
import pytest
from flask import Flask, Request, g, jsonify, request, session
from gevent import socket
from gevent.event import Event
from httpkit import CountingInput, Response, _read_response, multipart, settle, wait_for
from httpkit import request as http_request
from werkzeug.exceptions import BadRequest, ClientDisconnected, HTTPException, RequestEntityTooLarge

import geventctx
from geventctx import registry
from geventctx.flask import GeventContext
from geventctx.scope import ENVIRON_SCOPE
from geventctx.wsgi import ContextMiddleware

SEED = int(os.environ.get("GEVENTCTX_SEED", "20261121"))
JOIN_TIMEOUT = 10  # every wait inside a view or a child is bounded

USER: contextvars.ContextVar[str | None] = contextvars.ContextVar("reliability.user", default=None)


def sha(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def canonical(value: t.Any) -> str:
    """A digest of a JSON-able value, independent of dict order."""
    return sha(json.dumps(value, sort_keys=True, ensure_ascii=False))


def seeded(name: str) -> random.Random:
    return random.Random(f"{SEED}:{name}")


def ensure_fds(wanted: int) -> int:
    """Raise the soft fd limit towards ``wanted``; return the limit we got."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return soft


def need_connections(n: int) -> None:
    """Make sure ``n`` connections fit (two descriptors each, both ends here)."""
    wanted = 2 * n + 512
    limit = ensure_fds(wanted)
    assert limit >= wanted, f"RLIMIT_NOFILE {limit} < {wanted} for {n} connections: raise `ulimit -n`"


def session_of(app: Flask, response: Response) -> t.Any:
    """The session the response's cookie carries (verified with the app's key)."""
    for cookie in response.headers.get("set-cookie", []):
        name, _, rest = cookie.partition("=")
        if name.strip() == app.config["SESSION_COOKIE_NAME"]:
            value = rest.split(";", 1)[0]
            return app.session_interface.get_signing_serializer(app).loads(value)
    return None


def keepalive_requests(port: int, requests: list[tuple[str, str, dict[str, str]]], timeout: float) -> list[Response]:
    """Send several requests one after the other over ONE keep-alive connection."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    responses = []
    buf = b""
    try:
        with gevent.Timeout(timeout, TimeoutError(f"keep-alive client: no response in {timeout}s")):
            for method, path, headers in requests:
                lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: keep-alive"]
                lines += [f"{k}: {v}" for k, v in headers.items()]
                sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
                while b"\r\n\r\n" not in buf:
                    data = sock.recv(65536)
                    assert data, "the server closed a keep-alive connection"
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                status_line, *header_lines = head.decode("latin-1").split("\r\n")
                parsed: dict[str, list[str]] = {}
                for line in header_lines:
                    name, _, value = line.partition(":")
                    parsed.setdefault(name.strip().lower(), []).append(value.strip())
                length = int(parsed["content-length"][0])
                while len(buf) < length:
                    data = sock.recv(65536)
                    assert data, "the server closed a keep-alive connection mid-body"
                    buf += data
                body, buf = buf[:length], buf[length:]
                responses.append(Response(int(status_line.split()[1]), parsed, body))
    finally:
        sock.close()
    return responses


def raw_exchange(
    port: int,
    head: bytes,
    pieces: t.Sequence[bytes],
    *,
    delay: float = 0.0,
    then: str = "read",
    timeout: float = 15.0,
) -> Response | None:
    """Send ``head`` and ``pieces`` (``delay`` apart), then:

    - ``"read"``: read the response;
    - ``"half-close"``: shut the sending side (the server sees the end of
      the body), then read the response: a client that is still there;
    - ``"close"``: close the connection (the client is gone); returns None.

    Returns None too if the server closed without a response.
    """
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        with gevent.Timeout(timeout, TimeoutError(f"no response in {timeout}s")):
            sock.sendall(head)
            for piece in pieces:
                if delay:
                    gevent.sleep(delay)
                sock.sendall(piece)
            if then == "close":
                return None
            if then == "half-close":
                try:
                    sock.shutdown(stdlib_socket.SHUT_WR)
                except OSError:
                    pass  # the server answered and closed already: read its answer
            try:
                return _read_response(sock)
            except (IndexError, ValueError):
                return None  # closed without a response
    finally:
        sock.close()


def request_head(method: str, path: str, headers: dict[str, str]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def chunked(data: bytes, sizes: t.Iterable[int]) -> list[bytes]:
    """``data`` as chunked-encoding pieces (one chunk each), with the last chunk."""
    out, pos = [], 0
    for size in sizes:
        if pos >= len(data):
            break
        part = data[pos : pos + size]
        out.append(b"%x\r\n%s\r\n" % (len(part), part))
        pos += size
    if pos < len(data):
        rest = data[pos:]
        out.append(b"%x\r\n%s\r\n" % (len(rest), rest))
    out.append(b"0\r\n\r\n")
    return out


def split(data: bytes, rng: random.Random, smallest: int, largest: int) -> list[bytes]:
    out, pos = [], 0
    while pos < len(data):
        size = rng.randint(smallest, largest)
        out.append(data[pos : pos + size])
        pos += size
    return out


def geventctx_errors(caplog: pytest.LogCaptureFixture, needle: str) -> list[logging.LogRecord]:
    return [
        r for r in caplog.records if r.name == "geventctx" and r.levelno >= logging.ERROR and needle in r.getMessage()
    ]


# =====================================================================================
# 1. Isolation under load
# =====================================================================================


@dataclass
class IsolationProbe:
    target: int  # how many requests must be in their views at once
    all_in: Event = field(default_factory=Event)
    in_view: int = 0
    peak: int = 0
    barrier_timeouts: int = 0
    looks: collections.Counter = field(default_factory=collections.Counter)
    mismatches: list = field(default_factory=list)
    teardown_request: collections.Counter = field(default_factory=collections.Counter)
    teardown_appcontext: collections.Counter = field(default_factory=collections.Counter)
    children: dict = field(default_factory=dict)
    ended_after_response: int = 0
    child_teardowns: int = 0


def isolation_app(probe: IsolationProbe, rng: random.Random) -> Flask:
    app = Flask(__name__)
    app.secret_key = "geventctx-reliability"
    GeventContext(app)

    def look(user: str, index: int, step: str, own: str | None, req: t.Any, g_obj: t.Any, scope: t.Any) -> None:
        """What a child sees must be its own request's, every time it looks."""
        probe.looks[user] += 1
        seen = {
            "header": request.headers.get("X-User"),
            "g.user": g.get("user"),
            "session": session.get("user"),
            "contextvar": USER.get(),
            "request": request._get_current_object() is req,
            # Its own g (G3), reading through to the view's: g.user above.
            "g": g._get_current_object() is not g_obj,
            "scope": geventctx.current_scope() is scope,
        }
        wanted = {
            "header": user,
            "g.user": user,
            "session": user,
            "contextvar": own or user,
            "request": True,
            "g": True,
            "scope": True,
        }
        if seen != wanted:
            probe.mismatches.append((user, f"child{index}", step, seen))

    def child(user: str, index: int, pauses: list[float], req: t.Any, g_obj: t.Any, scope: t.Any) -> None:
        look(user, index, "start", None, req, g_obj, scope)
        for n, pause in enumerate(pauses):
            gevent.sleep(pause)
            look(user, index, f"after sleep {n}", None, req, g_obj, scope)
        if index == 3:
            # The last child outlives the response: the request's teardown
            # waits for it while thousands of other requests run.
            probe.all_in.wait(JOIN_TIMEOUT * 6)
            gevent.sleep(pauses[0])
            if scope.response_started:
                probe.ended_after_response += 1
            look(user, index, "after the response", None, req, g_obj, scope)
        own = f"{user}#{index}"
        USER.set(own)  # never reaches the parent, the siblings or anyone else
        gevent.sleep(0)
        look(user, index, "after its own write", own, req, g_obj, scope)

    @app.teardown_request
    def teardown_request(exc: BaseException | None) -> None:
        user = request.headers["X-User"]
        probe.teardown_request[user] += 1
        # Every child finished: its result recorded (the last one runs this
        # teardown at its own end, so it is not dead yet: issue 25).
        alive = [c for c in probe.children.get(user, []) if not c.ready()]
        seen = (exc, g.get("user"), session.get("user"), USER.get(), len(alive))
        if seen != (None, user, user, user, 0):
            probe.mismatches.append((user, "teardown_request", seen))

    @app.teardown_appcontext
    def teardown_appcontext(exc: BaseException | None) -> None:
        # A child's own app context is torn down too, with only its own
        # names in g (G4): counted apart from the request's.
        user = g.get("user")
        if user is None:
            probe.child_teardowns += 1
        else:
            probe.teardown_appcontext[user] += 1

    @app.route("/me")
    def me() -> str:
        user = request.headers["X-User"]
        if USER.get() is not None or "user" in g:
            # A previous request on this keep-alive connection (and handler
            # greenlet) bled into this one.
            probe.mismatches.append((user, "view start", USER.get(), g.get("user")))
        session["user"] = user
        g.user = user
        USER.set(user)
        req, g_obj, scope = request._get_current_object(), g._get_current_object(), geventctx.current_scope()
        probe.children[user] = [
            geventctx.spawn(child, user, index, [rng.uniform(0, 0.02) for _ in range(3)], req, g_obj, scope)
            for index in range(4)
        ]
        probe.in_view += 1
        probe.peak = max(probe.peak, probe.in_view)
        if probe.in_view >= probe.target:
            probe.all_in.set()
        try:
            # Hold every request open until all of them are in flight at once.
            if not probe.all_in.wait(JOIN_TIMEOUT * 6):
                probe.barrier_timeouts += 1
        finally:
            probe.in_view -= 1
        gevent.sleep(rng.uniform(0, 0.01))
        # The children's writes did not reach the view.
        return f"{user}|{USER.get()}|{g.user}|{session['user']}"

    return app


def run_isolation(serve: t.Any, connections: int, keepalive_share: float, name: str, required: int) -> None:
    """``connections`` clients at once (at least ``required`` of them truly
    concurrent: the file-descriptor limit may bound the rest with a pool)."""
    rng = seeded(name)
    # Each connection costs two descriptors here (client and server side).
    limit = ensure_fds(2 * connections + 512)
    concurrent = min(connections, (limit - 512) // 2)
    assert concurrent >= required, (
        f"RLIMIT_NOFILE {limit} allows only {concurrent} concurrent connections, "
        f"{required} needed: raise `ulimit -n`"
    )
    probe = IsolationProbe(target=concurrent)
    app = isolation_app(probe, rng)
    server = serve(app, backlog=min(concurrent + 64, 4096))

    # Distinct users; some connections carry three requests one after the
    # other (keep-alive: the same connection and the same handler greenlet).
    plans = []
    for n in range(connections):
        count = 3 if rng.random() < keepalive_share else 1
        plans.append([f"user-{n:05d}-{k}" for k in range(count)])
    users = [u for plan in plans for u in plan]

    def client(plan: list[str]) -> list[Response]:
        if len(plan) == 1:
            return [http_request(server.port, "GET", "/me", headers={"X-User": plan[0]}, timeout=JOIN_TIMEOUT * 9)]
        return keepalive_requests(
            server.port, [("GET", "/me", {"X-User": u}) for u in plan], timeout=JOIN_TIMEOUT * 9
        )

    pool = gevent.pool.Pool(concurrent)
    with gevent.Timeout(JOIN_TIMEOUT * 12, AssertionError(f"isolation run did not end (seed {SEED})")):
        results = pool.map(client, plans)
        wait_for(
            lambda: sum(probe.teardown_appcontext.values()) >= len(users),
            JOIN_TIMEOUT * 3,
            "every request's teardown",
        )
    settle()

    responses = dict(zip(users, (r for rs in results for r in rs), strict=True))
    bad = [
        (u, r.status, r.body[:80])
        for u, r in responses.items()
        if r.status != 200 or r.body != f"{u}|{u}|{u}|{u}".encode() or session_of(app, r) != {"user": u}
    ]
    assert bad == [], f"responses of another request (seed {SEED}): {bad[:5]}"
    sightings = probe.mismatches
    assert sightings == [], f"{len(sightings)} cross-request sightings (seed {SEED}): {sightings[:5]}"
    assert probe.barrier_timeouts == 0 and probe.peak >= concurrent, (probe.peak, concurrent)
    # Every child looked 5 times (the last one 6), and saw its own request each time.
    assert set(probe.looks) == set(users) and set(probe.looks.values()) == {3 * 5 + 6}
    assert probe.teardown_request == {u: 1 for u in users}
    assert probe.teardown_appcontext == {u: 1 for u in users}
    assert probe.child_teardowns == 4 * len(users)  # each child's own app context, once
    assert probe.ended_after_response > 0  # teardown really had to wait for children
    assert not registry.live()


def test_isolation_under_load(serve):
    run_isolation(serve, connections=300, keepalive_share=0.1, name="isolation-short", required=100)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("round_", range(3))
def test_isolation_under_load_soak(serve, round_):
    run_isolation(serve, connections=2000, keepalive_share=0.1, name=f"isolation-soak-{round_}", required=2000)


# =====================================================================================
# 2. Body integrity
# =====================================================================================

QUERY = "?q=1"

#: Body consumers, each reduced to a digest that the client can compute too.
CONSUMERS: dict[str, t.Callable[[], str]] = {
    "get_data": lambda: sha(request.get_data()),
    "data": lambda: sha(request.data),
    "stream": lambda: sha(request.stream.read()),
    "input_stream": lambda: sha(request.input_stream.read()),
    "json": lambda: canonical(request.json),
    "get_json": lambda: canonical(request.get_json()),
    "form": lambda: canonical(sorted(request.form.items(multi=True))),
    "files": lambda: canonical({name: sha(f.read()) for name, f in request.files.items(multi=True)}),
    "values": lambda: canonical(sorted(request.values.items(multi=True))),
}
RAW = ("get_data", "data", "stream", "input_stream")
READERS_FOR = {
    "json": RAW + ("json", "get_json", "form", "files", "values"),
    "multipart": RAW + ("form", "files", "values"),
    "urlencoded": RAW + ("form", "files", "values"),
}


def text(rng: random.Random, n: int) -> str:
    alphabet = string.ascii_letters + string.digits + " -_.~é€😀\u00e9\u4e2d"
    return "".join(rng.choice(alphabet) for _ in range(n))


@dataclass
class Upload:
    rid: str
    kind: str
    transfer: str
    body: bytes
    content_type: str
    readers: list[str]
    expected: dict[str, str]


TRANSFERS = ("length-at-once", "length-trickled", "chunked-trickled")


def make_upload(rng: random.Random, n: int, largest: int) -> Upload:
    rid = f"r{n:04d}"
    # Every kind with every transfer first, then at random.
    kinds = sorted(READERS_FOR)
    if n < len(kinds) * len(TRANSFERS):
        kind, transfer = kinds[n % len(kinds)], TRANSFERS[n // len(kinds)]
    else:
        kind, transfer = rng.choice(kinds), rng.choice(TRANSFERS)
    size = rng.randint(1, largest)
    args = [("q", "1")]
    if kind == "json":
        doc = {"rid": rid, "items": [rng.randint(-1 << 40, 1 << 40) for _ in range(size // 24)], "text": text(rng, 50)}
        body, content_type = json.dumps(doc).encode(), "application/json"
        form: list[tuple[str, str]] = []
        files: dict[str, str] = {}
        expected = {"json": canonical(doc), "get_json": canonical(doc)}
    elif kind == "multipart":
        fields = {"rid": rid, "note": text(rng, rng.randint(0, 2000))}
        blob = rng.randbytes(size)
        body, content_type = multipart(fields, {"upload": ("blob.bin", blob)}, boundary=f"b{rng.getrandbits(64):x}")
        form = sorted(fields.items())
        files = {"upload": sha(blob)}
        expected = {}
    else:
        fields_list = [("rid", rid)] + [(f"k{i}", text(rng, rng.randint(0, 60))) for i in range(max(1, size // 80))]
        body, content_type = urlencode(fields_list).encode(), "application/x-www-form-urlencoded"
        form = sorted(fields_list)
        files = {}
        expected = {}
    expected.update({name: sha(body) for name in RAW})
    if kind != "json":
        expected["data"] = sha(b"")  # as Werkzeug documents: empty for form data
    expected["form"] = canonical(form)
    expected["files"] = canonical(files)
    expected["values"] = canonical(sorted(args + form))
    readers = [rng.choice(READERS_FOR[kind]) for _ in range(4)]
    return Upload(rid, kind, transfer, body, content_type, readers, expected)


def counting(app: t.Any, counters: dict[str, list[int]]) -> t.Any:
    """The outermost WSGI layer: counts what is read from the real socket input."""

    def wsgi(environ: dict[str, t.Any], start_response: t.Any) -> t.Any:
        counter = counters.setdefault(environ.get("HTTP_X_REQ", "?"), [0])
        environ["wsgi.input"] = CountingInput(environ["wsgi.input"], counter)
        return app(environ, start_response)

    return wsgi


def body_app(adapter: str, teardowns: collections.Counter) -> t.Any:
    app = Flask(__name__)
    app.config["GEVENTCTX_BODY"] = "buffer" if adapter == "flask-buffer" else "lock"
    GeventContext(app)

    def consume(name: str) -> list[str]:
        try:
            return [name, CONSUMERS[name]()]
        except Exception as exc:  # reported to the client as a mismatch
            return [name, f"error: {exc!r}"]

    @app.teardown_request
    def count(exc: BaseException | None) -> None:
        teardowns[request.headers["X-Req"]] += 1

    @app.route("/upload", methods=["POST"])
    def upload() -> t.Any:
        names = request.headers["X-Readers"].split(",")
        kids = [geventctx.spawn(consume, name) for name in names[1:]]  # ask while the body arrives
        mine = consume(names[0])
        # The view's own reader may read nothing (form of a JSON body), so the
        # children may wait for the whole trickled upload: the client's bound.
        gevent.joinall(kids, timeout=JOIN_TIMEOUT * 5)
        return jsonify([mine] + [kid.value if kid.successful() else [None, "hung or died"] for kid in kids])

    if adapter == "middleware+flask":
        return ContextMiddleware(app)
    return app


def send_upload(port: int, up: Upload, rng: random.Random, timeout: float) -> Response | None:
    headers = {"Content-Type": up.content_type, "X-Req": up.rid, "X-Readers": ",".join(up.readers)}
    delay = rng.uniform(0.001, 0.01)
    if up.transfer == "chunked-trickled":
        headers["Transfer-Encoding"] = "chunked"
        sizes = iter(lambda: rng.randint(1, 16384), None)  # endless
        return raw_exchange(port, request_head("POST", "/upload" + QUERY, headers), chunked(up.body, sizes),
                            delay=delay, timeout=timeout)
    headers["Content-Length"] = str(len(up.body))
    if up.transfer == "length-at-once":
        return raw_exchange(port, request_head("POST", "/upload" + QUERY, headers) + up.body, [], timeout=timeout)
    return raw_exchange(port, request_head("POST", "/upload" + QUERY, headers), split(up.body, rng, 1, 16384),
                        delay=delay, timeout=timeout)


#: Readers that consume the raw body as Werkzeug does without caching it:
#: the stream read to its end (any body), a form parse (form bodies).
DRAINERS = ("stream", "input_stream")
FORM_PARSERS = ("form", "files", "values", "data")
BAD_JSON = "error: <BadRequest '400: Bad Request'>"


def allowed(up: Upload, index: int, reader: str) -> set[str]:
    """What reader ``index`` of ``up`` may get (G5, revised 2026-12-05): the
    whole answer; or, for a raw read (``get_data``, ``data``, ``stream``,
    ``input_stream``; ``json`` parses ``get_data()``) that may have started
    after another reader consumed the body without caching it, what Werkzeug
    gives then: ``b""`` (and a 400 for JSON). Never a torn body. The view's
    own reader starts first, so it always gets the whole answer; parsed
    forms always do. ``data`` of a form body is ``b""``, or the raw body
    when another reader's get_data() cached it first (as Werkzeug's)."""
    exact = up.expected[reader]
    others = up.readers[:index] + up.readers[index + 1:]
    if reader == "data" and up.kind != "json" and "get_data" in others:
        # As Werkzeug's: ``data`` after get_data() cached the raw body is it.
        return {exact, up.expected["get_data"]}
    drained = any(r in DRAINERS or (up.kind != "json" and r in FORM_PARSERS) for r in others)
    if index == 0 or not drained:
        return {exact}
    if reader in RAW:
        return {exact, sha(b"")}
    if reader in ("json", "get_json"):
        return {exact, BAD_JSON}
    return {exact}


def reads_the_body(up: Upload) -> bool:
    """Some reader of ``up`` reads its body (as Werkzeug does, form, files and
    values read nothing of a body that is not form data)."""
    return up.kind != "json" or any(reader not in ("form", "files", "values") for reader in up.readers)


def run_body_integrity(serve: t.Any, adapter: str, requests_n: int, largest: int, name: str) -> None:
    rng = seeded(f"{name}:{adapter}")
    need_connections(requests_n)
    counters: dict[str, list[int]] = {}
    teardowns: collections.Counter = collections.Counter()
    server = serve(counting(body_app(adapter, teardowns), counters), backlog=min(requests_n + 64, 4096))
    uploads = [make_upload(rng, n, largest) for n in range(requests_n)]
    client_rngs = [random.Random(rng.random()) for _ in uploads]

    with gevent.Timeout(JOIN_TIMEOUT * 12, AssertionError(f"uploads did not end (seed {SEED})")):
        jobs = [
            gevent.spawn(send_upload, server.port, up, r, JOIN_TIMEOUT * 6)
            for up, r in zip(uploads, client_rngs, strict=True)
        ]
        gevent.joinall(jobs, raise_error=True)
        wait_for(lambda: sum(teardowns.values()) >= requests_n, JOIN_TIMEOUT, "every teardown")
    settle()

    wrong = []
    for up, job in zip(uploads, jobs, strict=True):
        response = job.value
        if response is None or response.status != 200:
            wrong.append((up.rid, up.kind, up.transfer, response and response.status, response and response.body[:200]))
            continue
        got = response.json()
        diff = [
            (reader, outcome[1][:40])
            for index, (reader, outcome) in enumerate(zip(up.readers, got, strict=False))
            if outcome[0] != reader or outcome[1] not in allowed(up, index, reader)
        ]
        if diff or len(got) != len(up.readers):
            wrong.append((up.rid, up.kind, up.transfer, diff))
        elif counters.get(up.rid) != [len(up.body) if reads_the_body(up) else 0]:
            wrong.append((up.rid, up.kind, up.transfer, "socket bytes", counters.get(up.rid), len(up.body)))
    assert wrong == [], f"{len(wrong)} of {requests_n} uploads went wrong (seed {SEED}): {wrong[:5]}"
    assert teardowns == {up.rid: 1 for up in uploads}
    # The mix really was mixed.
    assert {up.kind for up in uploads} == set(READERS_FOR)
    assert {up.transfer for up in uploads} == set(TRANSFERS)


@pytest.mark.parametrize("adapter", ["flask", "flask-buffer", "middleware+flask"])
def test_body_integrity_under_load(serve, adapter):
    run_body_integrity(serve, adapter, requests_n=30, largest=60_000, name="body-short")


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("adapter", ["flask", "flask-buffer", "middleware+flask"])
def test_body_integrity_under_load_soak(serve, adapter):
    run_body_integrity(serve, adapter, requests_n=400, largest=1_500_000, name="body-soak")


# =====================================================================================
# 3. Fault matrix
# =====================================================================================

#: How long a gated child waits for its gate at most (then it ends anyway).
GATE_TIMEOUT = 60


@dataclass
class Req:
    """One request of the fault harness, as the server and the test saw it."""

    rid: str
    fault: str
    gate: Event = field(default_factory=Event)  # gated children wait on it
    entered: Event = field(default_factory=Event)  # the view started
    children: list = field(default_factory=list)
    scope: geventctx.Scope | None = None
    view_ended: bool = False
    view_error: BaseException | None = None
    raised: BaseException | None = None
    teardown_request: list = field(default_factory=list)  # the exc of each call
    teardown_appcontext: list = field(default_factory=list)
    request_close: int = 0
    middleware_close: int = 0  # the middleware's request scope closed
    iterable_close: int = 0  # the app's response iterable was closed
    readers: list = field(default_factory=list)  # (who, outcome)
    violations: list = field(default_factory=list)
    notes: dict = field(default_factory=dict)


class _Closing:
    """A response iterable whose close() is counted (the middleware defers it)."""

    def __init__(self, result: t.Any, on_close: t.Callable[[], None]) -> None:
        self._result = result
        self._on_close = on_close

    def __iter__(self) -> t.Iterator[bytes]:
        return iter(self._result)

    def close(self) -> None:
        try:
            close = getattr(self._result, "close", None)
            if close is not None:
                close()
        finally:
            self._on_close()


class FaultHarness:
    """A Flask app (optionally inside ContextMiddleware) whose views commit faults.

    Every teardown step counts itself per request, and checks at the moment
    it runs that the view ended and no child of the request is alive or
    listed in the registry.
    """

    def __init__(self, stacked: bool, **config: t.Any) -> None:
        self.reqs: dict[str, Req] = {}
        self.stacked = stacked
        app = self.app = Flask(__name__)
        app.config.update(config)
        GeventContext(app)
        harness = self

        class CountingRequest(Request):
            def close(self) -> None:
                req = harness.reqs[self.headers["X-Req"]]
                req.request_close += 1
                harness.check_children_done(req, "request.close")
                super().close()

        app.request_class = CountingRequest

        @app.before_request
        def remember() -> None:
            g.rid = request.headers["X-Req"]

        @app.teardown_request
        def teardown_request(exc: BaseException | None) -> None:
            req = self.reqs[request.headers["X-Req"]]
            req.teardown_request.append(exc)
            self.check_children_done(req, "teardown_request")

        @app.teardown_appcontext
        def teardown_appcontext(exc: BaseException | None) -> None:
            rid = g.get("rid")
            if rid is None:
                return  # a child's own app context (G4): only its own names in g
            req = self.reqs[rid]
            req.teardown_appcontext.append(exc)
            self.check_children_done(req, "teardown_appcontext")

        @app.route("/f/<fault>", methods=["GET", "POST"])
        def view(fault: str) -> t.Any:
            req = self.reqs[request.headers["X-Req"]]
            req.scope = geventctx.current_scope()
            req.entered.set()
            try:
                return getattr(self, f"view_{fault}")(req)
            except BaseException as exc:
                req.view_error = exc
                raise
            finally:
                req.view_ended = True

        if stacked:

            def counted(environ: dict[str, t.Any], start_response: t.Any) -> t.Any:
                rid = environ["HTTP_X_REQ"]
                environ[ENVIRON_SCOPE].on_close(self.middleware_closed, rid)
                return _Closing(app(environ, start_response), lambda: self.iterable_closed(rid))

            self.wsgi: t.Any = ContextMiddleware(counted)
        else:
            self.wsgi = app

    # -- bookkeeping --------------------------------------------------------------

    def new(self, rid: str, fault: str) -> Req:
        req = self.reqs[rid] = Req(rid, fault)
        return req

    def check_children_done(self, req: Req, step: str) -> None:
        if not req.view_ended:
            req.violations.append(f"{step} ran before the view ended")
        alive = [c for c in req.children if not c.ready()]  # the last one runs the steps at its end
        if alive:
            req.violations.append(f"{step} ran while {len(alive)} children were alive")
        if req.scope is not None and registry.for_scope(req.scope):
            req.violations.append(f"{step} ran while the registry listed children of the request")

    def middleware_closed(self, rid: str) -> None:
        req = self.reqs[rid]
        req.middleware_close += 1
        self.check_children_done(req, "middleware scope close")
        if not req.teardown_appcontext:
            req.violations.append("the middleware's scope closed before Flask's teardown")

    def iterable_closed(self, rid: str) -> None:
        req = self.reqs[rid]
        req.iterable_close += 1
        self.check_children_done(req, "response iterable close")
        if not req.teardown_appcontext:
            req.violations.append("the response iterable was closed before Flask's teardown")

    def spawn(self, req: Req, function: t.Callable[..., t.Any], *args: t.Any) -> gevent.Greenlet:
        child = geventctx.spawn(function, *args)
        req.children.append(child)
        return child

    def torn_down(self, req: Req) -> bool:
        return bool(req.teardown_appcontext) and (not self.stacked or req.middleware_close > 0)

    # -- what children do ------------------------------------------------------------

    @staticmethod
    def gated(req: Req, ending: str = "return") -> str:
        req.gate.wait(GATE_TIMEOUT)
        if ending == "raise":
            raise ValueError(f"child of {req.rid} failed on purpose")
        return ending

    @staticmethod
    def read(req: Req, who: str, consumer: str) -> None:
        try:
            outcome: t.Any = ("data", CONSUMERS[consumer]())
        except Exception as exc:
            outcome = ("error", exc)
        req.readers.append((who, outcome))

    def read_everywhere(self, req: Req, consumers: t.Sequence[str]) -> None:
        kids = [self.spawn(req, self.read, req, f"child{i}", c) for i, c in enumerate(consumers[1:])]
        self.read(req, "parent", consumers[0])
        gevent.joinall(kids, timeout=JOIN_TIMEOUT)

    # -- the faults, as views ---------------------------------------------------------

    def view_child_raises(self, req: Req) -> str:
        for ending in ("raise", "return", "raise"):
            self.spawn(req, self.gated, req, ending)
        return "ok"

    def view_child_killed(self, req: Req) -> str:
        before_start = self.spawn(req, self.gated, req)
        before_start.kill()  # killed before it ever ran
        running = self.spawn(req, self.gated, req)
        gevent.sleep(0)
        running.kill()  # killed by the view while it waits
        self.spawn(req, self.gated, req)  # killed by the test after the response
        return "ok"

    def view_child_killed_mid_body_read(self, req: Req) -> str:
        body = request.shared_body()
        first = self.spawn(req, self.read, req, "killed", "get_data")
        # (Under heavy load the whole body may be in before we look.)
        wait_for(lambda: body.waiting or body.loaded, JOIN_TIMEOUT, "the first reader to wait for the body")
        req.notes["loaded_at_kill"] = body.loaded
        first.kill(block=True, timeout=JOIN_TIMEOUT)
        req.notes["waiting_after_kill"] = body.waiting
        self.read_everywhere(req, ["get_data", "form", "stream"])
        return "ok"

    def view_view_raises(self, req: Req) -> str:
        self.spawn(req, self.gated, req)
        self.spawn(req, self.gated, req)
        req.raised = KeyError(f"view of {req.rid} failed on purpose")
        raise req.raised

    def view_client_disconnects_mid_upload(self, req: Req) -> str:
        self.read_everywhere(req, ["get_data", "form", "files", "stream"])
        mine = next(outcome for who, outcome in req.readers if who == "parent")
        if mine[0] == "error":
            raise mine[1]  # a 400 for a client that is gone
        return "read"

    def view_straggler_kill(self, req: Req) -> str:
        self.spawn(req, self.gated, req)  # nobody opens the gate
        return "ok"

    view_straggler_wait = view_straggler_kill
    view_server_stopped_children_alive = view_child_raises

    def view_server_stopped_view_alive(self, req: Req) -> str:
        self.spawn(req, self.gated, req)
        self.spawn(req, self.gated, req)
        Event().wait(GATE_TIMEOUT)  # the view hangs until the server kills it
        return "too late"


@dataclass
class Fault:
    method: str = "GET"
    config: dict = field(default_factory=dict)
    server: dict = field(default_factory=dict)
    status: int | None = 200  # what the client gets (None: no response)
    child_errors: int = 0  # children whose failure geventctx logs


FAULTS: dict[str, Fault] = {
    "child_raises": Fault(child_errors=2),
    "child_killed": Fault(),
    "child_killed_mid_body_read": Fault(method="POST"),
    "view_raises": Fault(status=500),
    "client_disconnects_mid_upload": Fault(method="POST", status=None),
    "straggler_kill": Fault(config={"GEVENTCTX_STRAGGLER_TIMEOUT": 0.2, "GEVENTCTX_STRAGGLER_POLICY": "kill"}),
    "straggler_wait": Fault(config={"GEVENTCTX_STRAGGLER_TIMEOUT": 0.2, "GEVENTCTX_STRAGGLER_POLICY": "wait"}),
    "server_stopped_children_alive": Fault(server={"spawn": 50}, child_errors=2),
    "server_stopped_view_alive": Fault(server={"spawn": 50}, status=500),  # pywsgi's own 500 for a killed handler
}

UPLOAD_BODY, UPLOAD_TYPE = multipart({"name": "ada"}, {"f": ("a.bin", random.Random(SEED).randbytes(20_000))})
#: What each consumer gives for UPLOAD_BODY.
CONSUMERS_EXPECTED = {
    "get_data": sha(UPLOAD_BODY),
    "stream": sha(UPLOAD_BODY),
    "form": canonical([("name", "ada")]),
}


def fault_client(harness: FaultHarness, port: int, req: Req) -> Response | None:
    headers = {"X-Req": req.rid}
    path = f"/f/{req.fault}"
    if req.fault == "child_killed_mid_body_read":
        headers.update({"Content-Type": UPLOAD_TYPE, "Content-Length": str(len(UPLOAD_BODY))})
        return raw_exchange(port, request_head("POST", path, headers), split_even(UPLOAD_BODY, 10), delay=0.02)
    if req.fault == "client_disconnects_mid_upload":
        headers.update({"Content-Type": UPLOAD_TYPE, "Content-Length": str(len(UPLOAD_BODY))})
        sent = split_even(UPLOAD_BODY[: len(UPLOAD_BODY) * 2 // 5], 4)
        return raw_exchange(port, request_head("POST", path, headers), sent, delay=0.01, then="close")
    return raw_exchange(port, request_head("GET", path, headers), [])


def split_even(data: bytes, n: int) -> list[bytes]:
    size = -(-len(data) // n)
    return [data[i : i + size] for i in range(0, len(data), size)]


def assert_torn_down_once(harness: FaultHarness, req: Req, expected_exc: t.Any = None, settled: bool = False) -> None:
    if not settled:
        wait_for(lambda: harness.torn_down(req), JOIN_TIMEOUT, f"teardown of {req.rid} ({req.fault})")
        settle()  # a second teardown would show now
    assert req.violations == [], (req.fault, req.violations)
    assert len(req.teardown_request) == 1, (req.fault, req.teardown_request)
    assert len(req.teardown_appcontext) == 1, (req.fault, req.teardown_appcontext)
    assert req.request_close == 1, (req.fault, req.request_close)
    assert req.middleware_close == (1 if harness.stacked else 0), (req.fault, req.middleware_close)
    # No response iterable to close when the server killed the view.
    returned = req.fault != "server_stopped_view_alive"
    assert req.iterable_close == (1 if harness.stacked and returned else 0), (req.fault, req.iterable_close)
    assert req.teardown_request[0] is expected_exc or (
        isinstance(expected_exc, type) and isinstance(req.teardown_request[0], expected_exc)
    ), (req.fault, req.teardown_request[0], expected_exc)
    assert req.teardown_appcontext[0] is req.teardown_request[0]
    assert req.scope is not None and req.scope.closed and req.scope.wait_closed(0)
    assert all(child.dead for child in req.children)
    assert not registry.for_scope(req.scope)


@pytest.mark.parametrize("stacked", [False, True], ids=["flask", "middleware+flask"])
@pytest.mark.parametrize("fault", list(FAULTS))
def test_fault_matrix_teardown_runs_exactly_once(serve, caplog, fault, stacked):
    caplog.set_level(logging.WARNING, logger="geventctx")
    spec = FAULTS[fault]
    harness = FaultHarness(stacked, **spec.config)
    server = serve(harness.wsgi, **spec.server)
    req = harness.new("r1", fault)
    expected_exc: t.Any = None

    with gevent.Timeout(JOIN_TIMEOUT * 3, AssertionError(f"{fault}: something hung")):
        if fault == "server_stopped_view_alive":
            client = gevent.spawn(fault_client, harness, server.port, req)
            assert req.entered.wait(JOIN_TIMEOUT)
            wait_for(lambda: len(req.children) == 2, JOIN_TIMEOUT, "the view's children")
            # Graceful stop: the server waits for its handlers, then kills
            # the one still in the view. The children are the request's,
            # not the server's: they live on, and the teardown waits.
            server.stop(timeout=0.2)
            response = client.get(timeout=JOIN_TIMEOUT)
            assert req.view_ended and isinstance(req.view_error, gevent.GreenletExit)
            expected_exc = gevent.GreenletExit
        else:
            response = fault_client(harness, server.port, req)
        assert (response.status if response is not None else None) == spec.status, response

        # After the response: the fault's own next step.
        if fault in ("child_raises", "view_raises"):
            settle()
            assert not harness.torn_down(req) and any(not c.dead for c in req.children)
            req.gate.set()
        elif fault == "child_killed":
            settle()
            assert not harness.torn_down(req)
            (last,) = [c for c in req.children if not c.dead]
            gevent.spawn(last.kill).join()  # killed by someone else than the request
        elif fault == "straggler_wait":
            wait_for(lambda: "straggler" in caplog.text, JOIN_TIMEOUT, "the straggler warning")
            settle()
            assert not harness.torn_down(req) and not req.children[0].dead  # "wait" keeps waiting
            req.gate.set()
        elif fault == "server_stopped_children_alive":
            server.stop(timeout=0.2)
            settle()
            # Stopping the server stops accepting; it does not end the
            # request's children, and the teardown keeps waiting for them.
            assert all(not c.dead for c in req.children) and not harness.torn_down(req)
            req.gate.set()
        elif fault == "server_stopped_view_alive":
            settle()
            assert all(not c.dead for c in req.children) and not harness.torn_down(req)
            # What an app does at shutdown if it will not wait for them:
            # kill what the registry lists; the teardown then runs once.
            gevent.killall([r.greenlet for r in registry.for_scope(req.scope)], block=True, timeout=JOIN_TIMEOUT)
        if fault == "view_raises":
            expected_exc = req.raised
        assert_torn_down_once(harness, req, expected_exc)

    # What each fault did to its readers and children.
    if fault == "child_killed_mid_body_read":
        # The killed reader only stopped waiting: the body is whole for the rest.
        assert req.notes == {"loaded_at_kill": False, "waiting_after_kill": 0}
        outcomes = dict((who, outcome) for who, outcome in req.readers if who != "killed")
        assert outcomes == {
            "parent": ("data", CONSUMERS_EXPECTED["get_data"]),
            "child0": ("data", CONSUMERS_EXPECTED["form"]),
            # G5: a raw read that starts while a form parse runs waits for
            # it, and gets what Werkzeug gives after a parse.
            "child1": ("data", sha(b"")),
        }, outcomes
        assert not [who for who, _ in req.readers if who == "killed"]  # it never got data
    elif fault == "client_disconnects_mid_upload":
        assert len(req.readers) == 4
        first = req.readers[0][1][1]
        assert isinstance(first, ClientDisconnected)
        assert all(outcome == ("error", first) for _, outcome in req.readers)
    elif fault == "straggler_kill":
        assert isinstance(req.children[0].value, gevent.GreenletExit)
    straggler_logs = [r for r in caplog.records if "straggler" in r.getMessage()]
    assert len(straggler_logs) == (1 if fault.startswith("straggler") else 0)
    assert len(geventctx_errors(caplog, "failed")) == spec.child_errors


# -- stragglers across layers and kinds of children ------------------------------------


def test_middleware_straggler_policy_reaches_the_children_of_the_flask_request_inside(serve, caplog):
    # The children hold Flask's request scope, which holds the middleware's:
    # the middleware's "kill" policy must see them too (it used to find no
    # hand-off of its own scope: no log, no kill, teardown waited for Flask's
    # 30 s default). Flask's own watcher, with a shorter limit and "wait",
    # logs each straggler first; the middleware's log says it kills them.
    caplog.set_level(logging.WARNING, logger="geventctx")
    harness = FaultHarness(stacked=True, GEVENTCTX_STRAGGLER_TIMEOUT=0.1, GEVENTCTX_STRAGGLER_POLICY="wait")
    harness.wsgi = ContextMiddleware(harness.wsgi.app, straggler_timeout=0.3, straggler_policy="kill")
    server = serve(harness.wsgi)
    req = harness.new("r1", "straggler_kill")

    response = fault_client(harness, server.port, req)
    assert response is not None and response.status == 200
    with gevent.Timeout(JOIN_TIMEOUT, AssertionError("the middleware never killed the straggler")):
        assert_torn_down_once(harness, req)
    assert isinstance(req.children[0].value, gevent.GreenletExit)  # killed, not ended by its gate
    logs = [r.getMessage() for r in caplog.records if "straggler" in r.getMessage()]
    assert len(logs) == 2 and "teardown keeps waiting" in logs[0] and "killing it" in logs[1], logs


def test_straggler_kill_policy_kills_greenlets_next_to_a_thread_task(serve, caplog, capfd):
    # A ThreadPool task cannot be killed; the watcher used to stop at it with
    # an AttributeError (its registry entry is an AsyncResult), so greenlet
    # stragglers listed after it were never killed.
    caplog.set_level(logging.WARNING, logger="geventctx")
    app = Flask(__name__)
    app.config.update(GEVENTCTX_STRAGGLER_TIMEOUT=0.1, GEVENTCTX_STRAGGLER_POLICY="kill")
    GeventContext(app)
    pool = geventctx.ThreadPool(1)
    thread_may_end = gevent.monkey.get_original("threading", "Event")()
    teardowns: list[BaseException | None] = []
    children: list[t.Any] = []

    @app.teardown_request
    def count(exc: BaseException | None) -> None:
        teardowns.append(exc)

    @app.route("/")
    def index() -> str:
        children.append(pool.spawn(thread_may_end.wait, JOIN_TIMEOUT))  # the thread task first
        children.append(geventctx.spawn(Event().wait, GATE_TIMEOUT))
        return "ok"

    try:
        assert serve(app).request("GET", "/").status == 200
        task, straggler = children
        wait_for(lambda: straggler.dead, JOIN_TIMEOUT, "the greenlet straggler to be killed")
        assert isinstance(straggler.value, gevent.GreenletExit)
        settle()
        assert teardowns == []  # the thread task still holds the request
    finally:
        thread_may_end.set()
    wait_for(lambda: teardowns, JOIN_TIMEOUT, "teardown after the thread task")
    settle()
    assert teardowns == [None] and task.get(timeout=JOIN_TIMEOUT) is True
    pool.kill()
    logs = [r.getMessage() for r in caplog.records if "straggler" in r.getMessage()]
    assert len(logs) == 2 and "teardown keeps waiting" in logs[0] and "killing it" in logs[1], logs
    assert "AttributeError" not in capfd.readouterr().err


# -- a hand-off interrupted before it started -----------------------------------------

HANDOFFS: dict[str, t.Callable[[t.Callable[[], t.Any]], t.Any]] = {
    "spawn": lambda fn: geventctx.spawn(fn),
    "spawn_later": lambda fn: geventctx.spawn_later(0, fn),
    "Greenlet.start": lambda fn: geventctx.Greenlet(fn).start(),
    "Pool.spawn": lambda fn: geventctx.Pool(2).spawn(fn),
}


@pytest.mark.parametrize(
    "handoff",
    [
        "spawn",
        "spawn_later",
        "Greenlet.start",
        "Pool.spawn",
    ],
)
def test_first_handoff_interrupted_in_its_buffer_read_still_tears_down_once(serve, handoff):
    # GEVENTCTX_BODY="buffer" reads the body in the parent at the first
    # hand-off. A view that bounds that with gevent.Timeout (or a server
    # killing the view) interrupts the read inside the hand-off: no child
    # starts, so the hold the hand-off took must be given back, or the
    # request's teardown never runs.
    app = Flask(__name__)
    app.config["GEVENTCTX_BODY"] = "buffer"
    GeventContext(app)
    teardowns: list[BaseException | None] = []
    seen: dict[str, t.Any] = {}

    @app.teardown_request
    def count(exc: BaseException | None) -> None:
        teardowns.append(exc)

    @app.route("/up", methods=["POST"])
    def up() -> str:
        seen["scope"] = geventctx.current_scope()
        ran: list[bool] = []
        try:
            with gevent.Timeout(0.05):
                HANDOFFS[handoff](lambda: ran.append(True))
        except gevent.Timeout:
            seen["ran"] = ran
            return "gave up"
        return "handed off"

    body = b"x" * 4000
    server = serve(app)
    head = request_head("POST", "/up", {"Content-Type": "application/octet-stream", "Content-Length": str(len(body))})
    # The body trickles in after the view started: the read at the hand-off blocks.
    response = raw_exchange(server.port, head, split_even(body, 8), delay=0.05, timeout=JOIN_TIMEOUT)
    assert response is not None and response.status == 200 and response.body == b"gave up"
    wait_for(lambda: teardowns, 2, "the request's teardown")
    settle()
    assert teardowns == [None] and seen["ran"] == []
    assert seen["scope"].closed


# -- the soak: random faults, many at once, then the server stops with children alive --

#: On an app whose stragglers are killed: faults without gated children.
KILLER_FAULTS = ["straggler_kill", "child_killed_mid_body_read", "client_disconnects_mid_upload"]
#: On an app (inside the middleware) that lets stragglers run: everything else.
WAITER_FAULTS = [
    "child_raises",
    "child_killed",
    "child_killed_mid_body_read",
    "view_raises",
    "client_disconnects_mid_upload",
    "straggler_wait",
    "server_stopped_children_alive",
]


def run_mixed_faults(serve: t.Any, caplog: t.Any, requests_n: int, name: str) -> None:
    """Random faults at once on two apps; the server stops with children alive."""
    caplog.set_level(logging.WARNING, logger="geventctx")
    rng = seeded(name)
    need_connections(requests_n)
    killer = FaultHarness(stacked=False, GEVENTCTX_STRAGGLER_TIMEOUT=0.3, GEVENTCTX_STRAGGLER_POLICY="kill")
    waiter = FaultHarness(stacked=True, GEVENTCTX_STRAGGLER_TIMEOUT=0.3, GEVENTCTX_STRAGGLER_POLICY="wait")
    servers = {
        id(killer): serve(killer.wsgi, spawn=gevent.pool.Pool(requests_n + 10), backlog=min(requests_n + 64, 4096)),
        id(waiter): serve(waiter.wsgi, spawn=gevent.pool.Pool(requests_n + 10), backlog=min(requests_n + 64, 4096)),
    }
    # Every fault at least once, the rest at random, in a random order.
    choices = [(killer, f) for f in KILLER_FAULTS] + [(waiter, f) for f in WAITER_FAULTS]
    while len(choices) < requests_n:
        if rng.random() < 0.3:
            choices.append((killer, rng.choice(KILLER_FAULTS)))
        else:
            choices.append((waiter, rng.choice(WAITER_FAULTS)))
    rng.shuffle(choices)
    plan = [(harness, harness.new(f"r{n:04d}", fault)) for n, (harness, fault) in enumerate(choices)]
    held_for_stop: list[Req] = []

    def one(harness: FaultHarness, req: Req, pause: float) -> Response | None:
        gevent.sleep(pause)
        response = fault_client(harness, servers[id(harness)].port, req)
        if req.fault in ("child_raises", "view_raises", "straggler_wait"):
            gevent.sleep(pause)
            req.gate.set()
        elif req.fault == "child_killed":
            gevent.sleep(pause)
            gevent.killall([c for c in req.children if not c.dead])
        elif req.fault == "server_stopped_children_alive":
            held_for_stop.append(req)  # released only after the server stopped
        return response

    with gevent.Timeout(JOIN_TIMEOUT * 20, AssertionError(f"mixed faults did not end (seed {SEED})")):
        jobs = [gevent.spawn(one, h, r, rng.uniform(0, 0.3)) for h, r in plan]
        gevent.joinall(jobs, raise_error=True)
        for server in servers.values():
            server.stop(timeout=1)
        for req in held_for_stop:
            assert all(not c.dead for c in req.children) and not req.teardown_request
            req.gate.set()
        wait_for(lambda: all(h.torn_down(r) for h, r in plan), JOIN_TIMEOUT * 3, "every teardown")
    settle()  # a second teardown would show now
    for harness, req in plan:
        expected: t.Any = req.raised if req.fault == "view_raises" else None
        assert_torn_down_once(harness, req, expected, settled=True)

    statuses = collections.Counter(
        (req.fault, job.value and job.value.status) for (_, req), job in zip(plan, jobs, strict=True)
    )
    for (fault, status), count in statuses.items():
        spec = FAULTS[fault]
        assert status == spec.status, (fault, status, count, SEED)
    assert {req.fault for _, req in plan} == set(WAITER_FAULTS) | set(KILLER_FAULTS)
    raisers = sum(FAULTS[req.fault].child_errors for _, req in plan)
    assert len(geventctx_errors(caplog, "failed")) == raisers


def test_mixed_faults_at_once(serve, caplog):
    run_mixed_faults(serve, caplog, requests_n=40, name="faults-short")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_mixed_faults_at_once_soak(serve, caplog):
    run_mixed_faults(serve, caplog, requests_n=2000, name="faults-soak")


# =====================================================================================
# 4. Bad input
# =====================================================================================

TE = {"Transfer-Encoding": "chunked", "Content-Type": "application/x-www-form-urlencoded"}


@dataclass
class BadInput:
    headers: dict
    pieces: list
    then: str = "read"  # or "half-close" / "close"
    status: int | None = 400
    error: type = BadRequest
    max_length: int | None = None


BAD_INPUTS: dict[str, BadInput] = {
    # Malformed chunk sizes and chunk framing: pywsgi's _InvalidClientInput.
    "chunk-size-not-hex": BadInput(TE, [b"zz\r\nabc\r\n0\r\n\r\n"]),
    "chunk-size-negative": BadInput(TE, [b"-5\r\nabcde\r\n0\r\n\r\n"]),
    "chunk-size-0x-prefix": BadInput(TE, [b"0x5\r\nabcde\r\n0\r\n\r\n"]),
    "chunk-size-too-many-digits": BadInput(TE, [b"5\r\nabcde\r\n", b"f" * 17 + b"\r\n"]),
    "chunk-size-cr-without-lf": BadInput(TE, [b"5\rabcde\r\n0\r\n\r\n"]),
    "chunk-data-longer-than-size": BadInput(TE, [b"5\r\nabcdeXX\r\n0\r\n\r\n"]),
    "chunk-extension-too-long": BadInput(TE, [b"5;" + b"x" * 9000 + b"\r\nabcde\r\n0\r\n\r\n"]),
    "chunk-trailer-invalid": BadInput(TE, [b"5\r\nabcde\r\n0\r\nbad trailer\r\n\r\n"]),
    "chunked-then-eof-before-last-chunk": BadInput(TE, [b"5\r\na=1&b\r\n"], then="half-close"),
    # Truncated bodies: the client announced more than it sent, then stopped.
    "chunked-truncated-mid-chunk": BadInput(
        TE, [b"400\r\n", b"a" * 300], then="half-close", error=ClientDisconnected
    ),
    "length-truncated-client-still-there": BadInput(
        {"Content-Length": "10000", "Content-Type": "application/octet-stream"},
        [b"x" * 1000] * 3,
        then="half-close",
        error=ClientDisconnected,
    ),
    "length-truncated-client-gone": BadInput(
        {"Content-Length": "10000", "Content-Type": "application/octet-stream"},
        [b"x" * 1000] * 3,
        then="close",
        status=None,
        error=ClientDisconnected,
    ),
    # Too large: announced, or found out while reading a chunked body.
    "length-over-max-content-length": BadInput(
        {"Content-Length": "5000", "Content-Type": "application/octet-stream"},
        [b"y" * 1000] * 5,
        status=413,
        error=RequestEntityTooLarge,
        max_length=1000,
    ),
    "chunked-over-max-content-length": BadInput(
        TE, chunked(b"z" * 5000, [700] * 8), status=413, error=RequestEntityTooLarge, max_length=1000
    ),
}


@dataclass
class ReaderProbe:
    outcomes: dict = field(default_factory=lambda: collections.defaultdict(list))
    teardowns: collections.Counter = field(default_factory=collections.Counter)


def bad_input_app(probe: ReaderProbe, max_length: int | None) -> Flask:
    """Parent + 3 children read the body with the consumers the client names;
    the view re-raises the parent's error, so the client sees Flask's status."""
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = max_length
    GeventContext(app)

    def read(rid: str, who: str, consumer: str) -> tuple[str, t.Any]:
        try:
            outcome: tuple[str, t.Any] = ("data", CONSUMERS[consumer]())
        except Exception as exc:
            outcome = ("error", exc)
        probe.outcomes[rid].append((who, consumer, outcome))
        return outcome

    @app.teardown_request
    def count(exc: BaseException | None) -> None:
        probe.teardowns[request.headers["X-Req"]] += 1

    @app.route("/read", methods=["POST"])
    def view() -> str:
        rid = request.headers["X-Req"]
        consumers = request.headers["X-Readers"].split(",")
        kids = [geventctx.spawn(read, rid, f"child{i}", c) for i, c in enumerate(consumers[1:])]
        kind, value = read(rid, "parent", consumers[0])
        gevent.joinall(kids, timeout=JOIN_TIMEOUT)
        if kind == "error":
            raise value
        return "read"

    return app


def run_bad_input(serve: t.Any, case: BadInput, copies: int, name: str) -> None:
    rng = seeded(name)
    need_connections(copies)
    probe = ReaderProbe()
    server = serve(bad_input_app(probe, case.max_length))
    consumers = ["get_data", "data", "stream", "input_stream", "form", "files", "values"]
    if "form" not in case.headers.get("Content-Type", ""):
        # Werkzeug parses no form from other content types: form, files and
        # values then read nothing (and so meet no error), as without geventctx.
        consumers = consumers[:4]
    readers = {f"r{n}": [rng.choice(consumers) for _ in range(4)] for n in range(copies)}

    def send(rid: str) -> Response | None:
        headers = dict(case.headers, **{"X-Req": rid, "X-Readers": ",".join(readers[rid])})
        return raw_exchange(server.port, request_head("POST", "/read", headers), case.pieces, delay=0.005,
                            then=case.then, timeout=JOIN_TIMEOUT)

    with gevent.Timeout(JOIN_TIMEOUT * 3, AssertionError(f"{name}: something hung")):
        jobs = [gevent.spawn(send, rid) for rid in readers]
        gevent.joinall(jobs, raise_error=True)
        wait_for(lambda: sum(probe.teardowns.values()) >= copies, JOIN_TIMEOUT, "every teardown")
    settle()

    for rid, job in zip(readers, jobs, strict=True):
        response = job.value
        assert (response.status if response is not None else None) == case.status, (rid, response)
        if response is not None:
            assert b"<title>" in response.body  # Flask's own clear error page, not a dropped connection
        outcomes = probe.outcomes[rid]
        assert len(outcomes) == 4, outcomes
        first = outcomes[0][2][1]
        assert isinstance(first, case.error), (rid, outcomes)
        assert all(outcome == ("error", first) for _, _, outcome in outcomes), (rid, outcomes)
    assert probe.teardowns == {rid: 1 for rid in readers}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_a_clear_4xx_and_the_same_error_for_every_reader(serve, case):
    run_bad_input(serve, BAD_INPUTS[case], copies=3, name=f"bad-{case}")


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_a_clear_4xx_and_the_same_error_for_every_reader_soak(serve, case):
    run_bad_input(serve, BAD_INPUTS[case], copies=150, name=f"bad-soak-{case}")


def run_invalid_json(serve: t.Any, copies: int, name: str) -> None:
    rng = seeded(name)
    need_connections(copies)
    probe = ReaderProbe()
    server = serve(bad_input_app(probe, None))
    json_readers = ["json", "get_json"]
    others = json_readers + ["get_data", "stream"]
    readers = {f"r{n}": ["json"] + [rng.choice(others) for _ in range(3)] for n in range(copies)}
    bodies = {rid: b'{"rid": "%s", "items": [1, 2,' % rid.encode() for rid in readers}

    def send(rid: str) -> Response | None:
        body = bodies[rid]
        headers = {"Content-Type": "application/json", "Content-Length": str(len(body)), "X-Req": rid,
                   "X-Readers": ",".join(readers[rid])}
        return raw_exchange(server.port, request_head("POST", "/read", headers), split(body, rng, 1, 7), delay=0.005,
                            timeout=JOIN_TIMEOUT)

    with gevent.Timeout(JOIN_TIMEOUT * 3, AssertionError(f"{name}: something hung")):
        jobs = [gevent.spawn(send, rid) for rid in readers]
        gevent.joinall(jobs, raise_error=True)
        wait_for(lambda: sum(probe.teardowns.values()) >= copies, JOIN_TIMEOUT, "every teardown")
    settle()

    for rid, job in zip(readers, jobs, strict=True):
        assert job.value.status == 400 and b"<title>" in job.value.body
        outcomes = probe.outcomes[rid]
        assert len(outcomes) == 4
        errors = [o for _, consumer, o in outcomes if consumer in json_readers]
        # Each JSON reader parses the (complete, identical) body and fails
        # the same way: same class, status and description.
        assert all(kind == "error" for kind, _ in errors), outcomes
        assert len({(type(e), e.code, e.description) for _, e in errors}) == 1, outcomes
        assert isinstance(errors[0][1], BadRequest)
        raw = [o for _, consumer, o in outcomes if consumer not in json_readers]
        assert all(o == ("data", sha(bodies[rid])) for o in raw), outcomes
    assert probe.teardowns == {rid: 1 for rid in readers}


def test_invalid_json_read_by_several_readers(serve):
    run_invalid_json(serve, copies=10, name="json-short")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_invalid_json_read_by_several_readers_soak(serve):
    run_invalid_json(serve, copies=500, name="json-soak")


# -- fuzzed chunked bodies --------------------------------------------------------------


def mutate(rng: random.Random, pieces: list[bytes]) -> bytes:
    """A valid chunked body with one random defect (or, rarely, none)."""
    data = b"".join(pieces)
    how = rng.choice(["flip", "insert", "delete", "truncate", "size-digit", "drop-crlf", "none"])
    pos = rng.randrange(len(data))
    if how == "flip":
        return data[:pos] + bytes([rng.randrange(256)]) + data[pos + 1 :]
    if how == "insert":
        return data[:pos] + rng.choice([b"\r\n", b";", b"g", b"0\r\n", b"\x00", b" "]) + data[pos:]
    if how == "delete":
        return data[:pos] + data[pos + rng.randint(1, 4) :]
    if how == "truncate":
        return data[:pos]
    if how == "size-digit":
        size_lines = [i for i, piece in enumerate(pieces) if piece != b"0\r\n\r\n"]
        i = rng.choice(size_lines)
        size, _, rest = pieces[i].partition(b"\r\n")
        pieces = list(pieces)
        pieces[i] = b"%x\r\n" % (int(size, 16) + rng.choice([-3, -1, 1, 7, 4096])) + rest
        return b"".join(pieces)
    if how == "drop-crlf":
        return data.replace(b"\r\n", b"", 1) if rng.random() < 0.5 else data[:-2]
    return data


def run_fuzzed_chunked(serve: t.Any, copies: int, name: str) -> None:
    """Whatever the defect: every reader gets the same outcome, the client a
    matching status, the request one teardown, and nothing hangs."""
    rng = seeded(name)
    need_connections(copies)
    probe = ReaderProbe()
    server = serve(bad_input_app(probe, 100_000), backlog=min(copies + 64, 4096))
    consumers = ["get_data", "data", "stream", "input_stream", "form", "values"]
    cases = {}
    for n in range(copies):
        data = urlencode([(f"k{i}", text(rng, rng.randint(0, 40))) for i in range(rng.randint(1, 30))]).encode()
        pieces = chunked(data, [rng.randint(1, 300) for _ in range(len(data))])
        cases[f"r{n}"] = (mutate(rng, pieces), [rng.choice(consumers) for _ in range(4)])

    def send(rid: str) -> Response | None:
        raw, readers = cases[rid]
        headers = dict(TE, **{"X-Req": rid, "X-Readers": ",".join(readers)})
        # All at once, then half-close: the server sees where the body ends,
        # whatever the defect announced; and the client is done sending
        # before the server may answer early and close (pywsgi does not
        # linger: bytes still arriving then would reset the connection).
        return raw_exchange(server.port, request_head("POST", "/read", headers) + raw, [],
                            then="half-close", timeout=JOIN_TIMEOUT)

    with gevent.Timeout(JOIN_TIMEOUT * 6, AssertionError(f"fuzzed bodies hung (seed {SEED})")):
        jobs = [gevent.spawn(send, rid) for rid in cases]
        gevent.joinall(jobs, raise_error=True)
        wait_for(lambda: len(probe.teardowns) >= copies, JOIN_TIMEOUT, "every teardown")
    settle()

    seen = collections.Counter()
    for rid, job in zip(cases, jobs, strict=True):
        response = job.value
        outcomes = probe.outcomes[rid]
        assert len(outcomes) == 4, (rid, cases[rid], outcomes)
        # request.data parses a form body first: it belongs with the parsers.
        raw = ("get_data", "stream", "input_stream")
        EMPTY = sha(b"")  # noqa: N806
        raw_outcomes = {o for _, c, o in outcomes if c in raw}
        read_failed = any(o[0] == "error" for o in raw_outcomes)
        errors = [o[1] for _, _, o in outcomes if o[0] == "error"]
        if read_failed:
            # Reading the body failed: one failure, the same object for every
            # reader; a 4xx for the client.
            first = errors[0]
            assert all(o == ("error", first) for _, _, o in outcomes), (rid, cases[rid], outcomes)
            assert isinstance(first, HTTPException) and 400 <= first.code < 500, (rid, first)
            assert response is not None and response.status == first.code, (rid, cases[rid], response)
            seen[type(first).__name__] += 1
        elif errors:
            # The body was read, but did not parse as a form (Werkzeug 2.3
            # turns parse_qsl's ValueError into a 413): raw readers all got
            # the same bytes, form readers all the same kind of 4xx.
            # (G5: a raw read after another reader consumed the body gets b"".)
            assert len(raw_outcomes - {("data", EMPTY)}) <= 1, (rid, outcomes)
            assert all(o[0] == "error" for _, c, o in outcomes if c in ("form", "values")), (rid, outcomes)
            datas = {o for _, _, o in outcomes if o[0] == "data"} - {("data", EMPTY)}
            assert len(datas) <= 1, (rid, outcomes)  # request.data: the raw bytes, cached
            assert len({(type(e), e.code) for e in errors}) == 1, (rid, outcomes)
            assert all(isinstance(e, HTTPException) and 400 <= e.code < 500 for e in errors), (rid, errors)
            seen["unparsable"] += 1
        else:
            # The defect still parsed: every raw reader saw the same bytes
            # (or b"" after another reader consumed the body, G5).
            datas = {o for _, c, o in outcomes if c in raw} - {("data", EMPTY)}
            assert len(datas) <= 1 and all(o[0] == "data" for _, _, o in outcomes), (rid, outcomes)
            assert response is not None and response.status == 200, (rid, response)
            seen["parsed"] += 1
    assert probe.teardowns == {rid: 1 for rid in cases}
    assert seen["BadRequest"] + seen["ClientDisconnected"] > copies // 3, seen  # mostly defects


def test_fuzzed_chunked_bodies(serve):
    run_fuzzed_chunked(serve, copies=60, name="fuzz-short")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_fuzzed_chunked_bodies_soak(serve):
    run_fuzzed_chunked(serve, copies=2000, name="fuzz-soak")
