"""P3: parsing a 20 MB upload through the body tee vs Werkzeug's own reading.

Two Flask apps, identical but for ``GEVENTCTX_BODY``: ``"tee"`` (the
default: once a request hands off, a :class:`geventctx.body.SharedBody`
reads the socket once, as readers ask, into a spool — 1 MiB in memory, the
rest in an unnamed temporary file — which keeps only what somebody may
still read: a form parse that alone reads the body takes it straight off
the socket; a request that never hands off is Werkzeug's alone) and
``"off"`` (Werkzeug streams and parses the socket itself). Both have
:class:`GeventContext`, so the only difference is the tee. Each is served by
its own ``gevent.pywsgi`` server on 127.0.0.1 in this process; a
gevent-socket client greenlet sends each request as fast as the socket takes
it (one ``sendall``, Content-Length).

Two uploads, each 20 MB: a multipart form (one 20 MB file field and two text
fields; the view reads ``request.files`` and ``request.form``) and a JSON
array of records (the view calls ``request.get_json()``). The multipart
upload runs against apps with and without ``MAX_CONTENT_LENGTH``: with a
limit, Werkzeug's ``get_input_stream`` wraps pywsgi's input in a
``LimitedStream(is_max=True)`` (without one its parser reads pywsgi's input
directly). These three views do not hand off, so in the tee app too the
request reads its body through Werkzeug alone: the rows show what a request
that never hands off pays for geventctx's body (G5). The figure is the server's time from
the view's first line to the end of parsing: it includes taking the body off
the socket, which the client is still writing when the view starts. The
client's whole-request latency is reported alongside.

Two more cases are views that hand off: a child reads the same form (its
file) or the same JSON at the same time as the view. With the shared body
one of them parses and the other waits for its result (G5: cached consumers
make no copy); the floor is the "off" app's view parsing once and passing
what it parsed to a plain ``gevent.spawn`` child (the figure: view entry
to both having the result).

Rounds are interleaved (every round runs each app/upload once: the cases
in a new seeded-random order, each case's two modes back to back, which
one first alternating by round), garbage is collected before every request outside the
timing, and a variant's figure is the median over rounds. One extra,
untimed request per variant runs under :mod:`tracemalloc` for the peak of
Python allocations during the request (note column).
"""

from __future__ import annotations

import gc
import json
import random
import statistics
import tracemalloc
import typing as t
from time import perf_counter_ns

import flask
import gevent
from common import Row
from gevent import socket
from gevent.pywsgi import WSGIServer

import geventctx
from geventctx.flask import GeventContext

TITLE = "parsing a 20 MB upload, body tee vs Werkzeug (P3)"

#: Timed rounds, after one discarded warm-up round.
ROUNDS = {False: 21, True: 3}

SIZE = 20 * 1024 * 1024
BOUNDARY = "----geventctxbench7MA4YWxkTrZu0gW"
LIMIT = 40 * 1024 * 1024
MODES = ("tee", "off")

#: Per-request socket timeout of the client, seconds.
TIMEOUT = 60.0


def multipart_body() -> bytes:
    """A multipart/form-data body of ``SIZE`` bytes: 2 text fields, 1 file."""
    head = (
        f"--{BOUNDARY}\r\n"
        'Content-Disposition: form-data; name="title"\r\n\r\n'
        "quarterly report\r\n"
        f"--{BOUNDARY}\r\n"
        'Content-Disposition: form-data; name="tags"\r\n\r\n'
        "finance,q3,draft\r\n"
        f"--{BOUNDARY}\r\n"
        'Content-Disposition: form-data; name="upload"; filename="data.bin"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    tail = f"\r\n--{BOUNDARY}--\r\n".encode()
    payload = random.Random(3).randbytes(SIZE - len(head) - len(tail))
    return head + payload + tail


def json_body() -> bytes:
    """A JSON array of records with a short text each, about ``SIZE`` bytes."""
    rng = random.Random(4)
    words = "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor".split()
    records: list[dict[str, t.Any]] = []
    size = 2
    while size < SIZE:
        i = len(records)
        record = {
            "id": i,
            "user": f"user-{i:06d}",
            "tags": ["a", "bb"],
            "score": round(rng.random() * 100, 3),
            "note": " ".join(rng.choice(words) for _ in range(30)),
        }
        records.append(record)
        size += len(json.dumps(record)) + 2
    return json.dumps(records).encode()


def make_app(mode: str, limit: int | None, timings: dict[str, list[int]]) -> flask.Flask:
    """A Flask app with GeventContext in body ``mode``; views time their parse."""
    app = flask.Flask(f"bench_body_{mode}_{limit}")
    app.config["GEVENTCTX_BODY"] = mode
    app.config["MAX_CONTENT_LENGTH"] = limit
    GeventContext(app)

    @app.post("/multipart")
    def multipart() -> str:
        start = perf_counter_ns()
        files = flask.request.files
        form = flask.request.form
        timings["multipart"].append(perf_counter_ns() - start)
        size = files["upload"].stream.seek(0, 2)
        return f"{form['title']}|{form['tags']}|{size}"

    @app.post("/json")
    def json_view() -> str:
        start = perf_counter_ns()
        data = flask.request.get_json()
        timings["json"].append(perf_counter_ns() - start)
        return f"{len(data)}|{data[-1]['id']}|{data[-1]['note'][:20]}"

    # A view that hands off, its child reading the same form or JSON at the
    # same time (shared body: one parse, the other waits for its result);
    # with the body "off", the fair floor: the view parses once and passes
    # what it parsed to a plain child.
    @app.post("/multipart-child")
    def multipart_child() -> str:
        start = perf_counter_ns()
        if mode == "off":
            form = flask.request.form
            size = gevent.spawn(lambda f: f["upload"].stream.seek(0, 2), flask.request.files).get()
        else:
            child = geventctx.spawn(lambda: flask.request.files["upload"].stream.seek(0, 2))
            form = flask.request.form
            size = child.get()
        timings["multipart-child"].append(perf_counter_ns() - start)
        return f"{form['title']}|{form['tags']}|{size}"

    @app.post("/json-child")
    def json_child() -> str:
        start = perf_counter_ns()
        if mode == "off":
            data = flask.request.get_json()
            last = gevent.spawn(lambda d: d[-1], data).get()
        else:
            child = geventctx.spawn(lambda: flask.request.get_json()[-1])
            data = flask.request.get_json()
            last = child.get()
        timings["json-child"].append(perf_counter_ns() - start)
        return f"{len(data)}|{last['id']}|{last['note'][:20]}"

    return app


def post(port: int, path: str, content_type: str, body: bytes) -> tuple[int, bytes]:
    """Send one request on a fresh connection; (nanoseconds, response body)."""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    try:
        start = perf_counter_ns()
        sock.sendall(head)
        sock.sendall(body)
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
        elapsed = perf_counter_ns() - start
    finally:
        sock.close()
    response = b"".join(chunks)
    status_line, _, rest = response.partition(b"\r\n")
    if b" 200 " not in status_line:
        raise RuntimeError(f"{path}: {response[:300]!r}")
    return elapsed, rest.partition(b"\r\n\r\n")[2]


#: The cases: (label, upload, MAX_CONTENT_LENGTH). Werkzeug and geventctx
#: read the body through a different stream when a limit is configured.
CASES = [
    ("multipart 20 MB, MAX_CONTENT_LENGTH=40 MiB", "multipart", LIMIT),
    ("multipart 20 MB, no MAX_CONTENT_LENGTH", "multipart", None),
    ("json 20 MB, MAX_CONTENT_LENGTH=40 MiB", "json", LIMIT),
    ("multipart 20 MB, view + child read the form at once", "multipart-child", LIMIT),
    ("json 20 MB, view + child read the JSON at once", "json-child", LIMIT),
]


def run(quick: bool) -> list[Row]:
    """Serve every app in this hub and time every upload, interleaved."""
    rounds = ROUNDS[quick]
    bodies = {
        "multipart": (f"multipart/form-data; boundary={BOUNDARY}", multipart_body()),
        "json": ("application/json", json_body()),
    }
    bodies["multipart-child"], bodies["json-child"] = bodies["multipart"], bodies["json"]
    limits = sorted({case[2] for case in CASES}, key=str)
    timings = {(m, lim): {u: [] for u in bodies} for m in MODES for lim in limits}
    servers = {key: WSGIServer(("127.0.0.1", 0), make_app(*key, timings[key]), log=None) for key in timings}
    for server in servers.values():
        server.start()
    # variant: (mode, case index)
    variants = [(m, c) for c in range(len(CASES)) for m in MODES]
    latency: dict[tuple[str, int], list[float]] = {v: [] for v in variants}
    parse: dict[tuple[str, int], list[float]] = {v: [] for v in variants}
    answers: dict[str, set[bytes]] = {u: set() for u in bodies}
    peaks: dict[tuple[str, int], int] = {}

    def one(mode: str, case: int) -> tuple[int, int]:
        _, upload, limit = CASES[case]
        content_type, body = bodies[upload]
        times = timings[(mode, limit)][upload]
        gc.collect()
        before = len(times)
        port = servers[(mode, limit)].server_port
        elapsed, answer = gevent.spawn(post, port, f"/{upload}", content_type, body).get(timeout=TIMEOUT)
        answers[upload].add(answer)
        assert len(times) == before + 1
        return elapsed, times[-1]

    try:
        order = random.Random(1)
        for i in range(rounds + 1):  # round 0 is a discarded warm-up
            # The cases in a new order every round, and a case's two modes
            # back to back, first one then the other: what runs before a
            # variant (a 20 MB JSON parse leaves garbage) is the same for both.
            cases = order.sample(range(len(CASES)), len(CASES))
            modes = MODES if i % 2 else MODES[::-1]
            for variant in [(mode, case) for case in cases for mode in modes]:
                total, server_side = one(*variant)
                if i:
                    latency[variant].append(total / 1e6)
                    parse[variant].append(server_side / 1e6)
        for variant in variants:  # untimed: peak of Python allocations
            gc.collect()
            tracemalloc.start()
            try:
                one(*variant)
                peaks[variant] = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
    finally:
        for server in servers.values():
            server.stop(timeout=5)
    gevent.sleep(0)
    gc.collect()
    assert not geventctx.registry.live(), "hand-offs left in the registry"
    for upload, seen in answers.items():  # every app parsed the same thing
        assert len(seen) == 1, (upload, seen)
    assert answers["multipart"] == answers["multipart-child"] and answers["json"] == answers["json-child"]

    rows: list[Row] = []
    for c, (label, _, _) in enumerate(CASES):
        off_parse = statistics.median(parse[("off", c)])
        off_total = statistics.median(latency[("off", c)])
        for mode in ("off", "tee"):
            v = (mode, c)
            p, lat = statistics.median(parse[v]), statistics.median(latency[v])
            note = (
                f"{_spread(parse[v])}; request {lat:.1f} ms ({lat / off_total:.3f}x); "
                f"peak traced {peaks[v] / 2**20:.1f} MiB"
            )
            if mode == "tee":
                ok = p <= 1.03 * off_parse
                rows.append(Row(f"{label}: tee", p, "ms", p / off_parse, "P3 <=1.03x off", ok, note))
            else:
                rows.append(Row(f"{label}: off (base)", p, "ms", 1.0, note=note))
    rows[0] = rows[0]._replace(note=f"{rows[0].note}; {rounds} rounds, view entry -> parsed")
    return rows


def _spread(samples: list[float]) -> str:
    """Interquartile range as a percentage of the median."""
    if len(samples) < 2:
        return "IQR n/a"
    q1, _, q3 = statistics.quantiles(samples, n=4)
    return f"IQR ±{(q3 - q1) / 2 / statistics.median(samples) * 100:.1f}%"
