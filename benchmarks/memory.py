"""P5: memory retained after many completed hand-offs and requests.

Two workloads, each measured twice, after a warm-up and with garbage
collected and the hub drained before every reading:

- hand-offs: ``geventctx.spawn(child).join()`` repeated inside one Flask
  request of an app with :class:`GeventContext` (run through Flask's test
  client); the child reads a context variable, ``g`` and ``request``. The
  reading is taken inside the request, after the last join: what the
  request's scope, the registry or the hand-off path keep per hand-off.
- requests: requests through the same kind of app served by an in-process
  ``gevent.pywsgi`` server on 127.0.0.1 over real keep-alive sockets (a
  client greenlet per connection in the same hub); each request is a ``POST``
  with a small body whose view hands its context to 4 children that read
  ``g``, a header and the body. Real sockets rather than the test client so
  that the server's greenlet and connection reuse, the context isolation of
  every request and the shared body are in the loop.

Readings: the net bytes of Python allocations still alive afterwards
(:mod:`tracemalloc`, started after the warm-up, its own pass) and the
resident set size growth (``/proc/self/statm``, in a pass without
tracemalloc). Afterwards the registry holds no hand-off and no request scope
is open. If a reading misses its budget, the note names the source line that
retained the most (tracemalloc snapshot difference).
"""

from __future__ import annotations

import gc
import os
import tracemalloc
import typing as t
from contextvars import ContextVar

import flask
import gevent
from common import Row, read_response
from gevent import socket
from gevent.pywsgi import WSGIServer

import geventctx
from geventctx import _flask_compat
from geventctx.flask import GeventContext

TITLE = "memory retained (P5)"

#: (hand-offs, requests); the budget is stated for the full-run counts.
COUNTS = {False: (100_000, 20_000), True: (100_000, 4_000)}
WARMUP = (2_000, 500)
CONNECTIONS = 4
BUDGET = 1024 * 1024
CHILDREN = 4
BODY = b'{"order": 1234, "items": ["apple", "pear"]}'

_VAR: ContextVar[str] = ContextVar("bench.memory")

_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    """Resident set size in bytes (second field of /proc/self/statm)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def settle() -> None:
    """Drain the hub and collect garbage, twice (callbacks may free more)."""
    for _ in range(2):
        gevent.sleep(0)
        gc.collect()


def measure(work: t.Callable[[], None], trace: bool) -> tuple[int, tracemalloc.Snapshot | None, t.Any]:
    """(bytes retained by ``work``, snapshot diff source). RSS unless ``trace``."""
    settle()
    if not trace:
        before = rss()
        work()
        settle()
        return rss() - before, None, None
    tracemalloc.start(1)
    try:
        settle()
        start, _ = tracemalloc.get_traced_memory()
        first = tracemalloc.take_snapshot()
        work()
        settle()
        end, _ = tracemalloc.get_traced_memory()
        last = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    return end - start, first, last


def top_growth(first: tracemalloc.Snapshot, last: tracemalloc.Snapshot) -> str:
    """The source line whose live allocations grew most, for a missed budget."""
    ignore = [tracemalloc.Filter(False, tracemalloc.__file__)]
    stats = last.filter_traces(ignore).compare_to(first.filter_traces(ignore), "lineno")
    if not stats:
        return ""
    top = stats[0]
    frame = top.traceback[0]
    return f"; most retained by {os.path.basename(frame.filename)}:{frame.lineno} (+{top.size_diff} B)"


def _row(name: str, value: int, count: int, what: str, extra: str = "", diff: str = "") -> Row:
    ok = value <= BUDGET
    note = f"{value / count:+.2f} B per {what}{extra}" + ("" if ok else diff)
    return Row(name, value / 1024, "KiB", None, budget="P5 <=1 MiB retained", ok=ok, note=note)


# -- hand-offs inside one request ------------------------------------------------


def _child() -> int:
    return len(_VAR.get()) + len(flask.g.user) + len(flask.request.path)


def handoffs(quick: bool) -> list[Row]:
    """Net memory after n spawn+join inside one GeventContext request."""
    n = COUNTS[quick][0]
    app = flask.Flask("bench_memory_handoffs")
    GeventContext(app)
    readings: dict[str, t.Any] = {}

    def spawn_join(count: int) -> None:
        spawn, child = geventctx.spawn, _child
        for _ in range(count):
            spawn(child).join()

    @app.route("/handoffs")
    def view() -> str:
        _VAR.set("req-1")
        flask.g.user = "alice"
        scope = geventctx.current_scope()
        assert scope is not None
        spawn_join(WARMUP[0])
        readings["rss"] = measure(lambda: spawn_join(n), trace=False)
        readings["traced"] = measure(lambda: spawn_join(n), trace=True)
        assert scope.holders == 1, scope
        return "ok"

    assert app.test_client().get("/handoffs").status_code == 200
    settle()
    leftovers = _leftovers()
    traced, first, last = readings["traced"]
    diff = top_growth(first, last)
    return [
        _row(f"{n // 1000}k geventctx.spawn+join, tracemalloc", traced, n, "hand-off", leftovers, diff),
        _row(f"{n // 1000}k geventctx.spawn+join, RSS", readings["rss"][0], n, "hand-off"),
    ]


# -- GC-tracked objects per live hand-off ---------------------------------------------

#: Live children per reading; the budget: geventctx's per child <= gevent's + 2.
LIVE_CHILDREN = 2_000
GC_OBJECTS_OVER = 2


_cv_app = _flask_compat._cv_app


def _tracked_per_live_child(spawn: t.Callable[..., t.Any]) -> float:
    """GC-tracked objects per child while LIVE_CHILDREN wait on one event."""
    from gevent.event import Event

    release = Event()
    settle()
    before = len(gc.get_objects())
    children = [spawn(release.wait) for _ in range(LIVE_CHILDREN)]
    gevent.sleep(0)  # every child runs and waits
    gc.collect()
    during = len(gc.get_objects()) - 1  # the list of children itself
    release.set()
    gevent.joinall(children)
    del children
    settle()
    return (during - before) / LIVE_CHILDREN


def gc_objects(quick: bool) -> list[Row]:
    """GC-tracked objects a live hand-off holds, against gevent.spawn's."""
    app = flask.Flask("bench_memory_gc_objects")
    GeventContext(app)
    readings: dict[str, float] = {}

    @app.route("/live")
    def view() -> str:
        _VAR.set("req-1")
        flask.g.user = "alice"
        for _ in range(2):  # the second reading counts (warm caches)
            readings["gevent"] = _tracked_per_live_child(gevent.spawn)
            # The hand-off alone: Flask's app context hidden, so no child
            # makes one of its own (the next rows).
            token = _cv_app.set(None)
            try:
                readings["geventctx"] = _tracked_per_live_child(geventctx.spawn)
            finally:
                _cv_app.reset(token)
            readings["app context"] = _tracked_per_live_child(geventctx.spawn)
            app.teardown_appcontext_funcs.append(_no_teardown)
            try:
                readings["torn down"] = _tracked_per_live_child(geventctx.spawn)
            finally:
                app.teardown_appcontext_funcs.remove(_no_teardown)
        return "ok"

    assert app.test_client().get("/live").status_code == 200
    base, ours = readings["gevent"], readings["geventctx"]
    own, torn = readings["app context"] - ours, readings["torn down"] - ours
    return [
        Row(
            "GC-tracked objects per live gevent.spawn child", base, "objects", note=f"{LIVE_CHILDREN} children waiting"
        ),
        Row(
            "GC-tracked objects per live geventctx.spawn child",
            ours,
            "objects",
            budget=f"P5 <= gevent's + {GC_OBJECTS_OVER}: {ours - base:+.1f}",
            ok=ours <= base + GC_OBJECTS_OVER,
            note="in a GeventContext request, the hand-off alone",
        ),
        Row(
            "+ the child's own app context (G3)",
            readings["app context"],
            "objects",
            budget=f"P5 app context <= {APP_CONTEXT_OBJECTS} more: {own:+.1f}",
            ok=own <= APP_CONTEXT_OBJECTS,
            note="the context, and the 2 HAMT objects contextvars makes for a variable set in a copy",
        ),
        Row(
            "+ own app context, torn down at the end",
            readings["torn down"],
            "objects",
            note=f"{torn:+.1f} over the hand-off: and the wrapper that runs the teardown in the child",
        ),
    ]


#: P5's budget for the child's own app context (G3), over the hand-off.
APP_CONTEXT_OBJECTS = 2


def _no_teardown(exc: BaseException | None) -> None:
    """A teardown function (as Flask-SQLAlchemy registers one)."""


# -- requests through a real server ---------------------------------------------------


def make_app() -> flask.Flask:
    """A GeventContext app whose view hands its context to 4 readers."""
    app = flask.Flask("bench_memory_requests")
    GeventContext(app)

    def child(i: int) -> int:
        request = flask.request
        assert flask.g.user == request.headers["X-User"]
        return len(request.get_data()) + len(_VAR.get()) + i

    @app.post("/work")
    def work() -> str:
        flask.g.user = flask.request.headers["X-User"]
        _VAR.set(flask.request.headers["X-User"])
        children = [geventctx.spawn(child, i) for i in range(CHILDREN)]
        gevent.joinall(children, raise_error=True)
        return str(sum(c.value for c in children))

    return app


class NoDelayServer(WSGIServer):
    """pywsgi with TCP_NODELAY: it sends headers and body in two writes, and
    on a keep-alive connection Nagle's algorithm would hold every response
    for the client's delayed ACK (40 ms)."""

    def handle(self, sock: t.Any, address: t.Any) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().handle(sock, address)


def _client(port: int, count: int, user: str, expected: bytes) -> None:
    """``count`` keep-alive requests on one connection, each checked."""
    payload = (
        f"POST /work HTTP/1.1\r\nHost: 127.0.0.1\r\nX-User: {user}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(BODY)}\r\n\r\n"
    ).encode() + BODY
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    buf = b""
    try:
        for _ in range(count):
            sock.sendall(payload)
            head, body, buf = read_response(sock, buf)
            assert head.startswith(b"HTTP/1.1 200"), head
            assert body == expected, body
    finally:
        sock.close()


def requests(quick: bool) -> list[Row]:
    """Net memory after n requests through an in-process pywsgi server."""
    n = COUNTS[quick][1]
    server = NoDelayServer(("127.0.0.1", 0), make_app(), log=None)
    server.start()
    port = server.server_port

    def load(count: int) -> None:
        per = count // CONNECTIONS
        clients = []
        for k in range(CONNECTIONS):
            user = f"user-{k}"
            expected = str(sum(len(BODY) + len(user) + i for i in range(CHILDREN))).encode()
            clients.append(gevent.spawn(_client, port, per, user, expected))
        gevent.joinall(clients, raise_error=True, timeout=300)
        assert all(c.successful() for c in clients), "a client did not finish"
        gevent.sleep(0.05)  # the server notices the closed connections

    try:
        load(WARMUP[1])
        rss_growth = measure(lambda: load(n), trace=False)[0]
        traced, first, last = measure(lambda: load(n), trace=True)
    finally:
        server.stop(timeout=5)
    settle()
    leftovers = _leftovers()
    diff = top_growth(first, last)
    return [
        _row(f"{n // 1000}k requests x 4 children (pywsgi), tracemalloc", traced, n, "request", leftovers, diff),
        _row(f"{n // 1000}k requests x 4 children (pywsgi), RSS", rss_growth, n, "request"),
    ]


def _leftovers() -> str:
    """Assert nothing of geventctx outlived the work; a note saying so."""
    live = geventctx.registry.live()
    open_scopes = geventctx.Scope.all_open()
    handed = [o for o in gc.get_objects() if isinstance(o, geventctx.Greenlet)]
    assert not live, geventctx.registry.dump()
    assert not open_scopes, open_scopes
    assert not handed, handed[:5]
    return "; registry empty, 0 open scopes, 0 hand-off greenlets alive"


def run(quick: bool) -> list[Row]:
    """Both workloads; P5 rows."""
    return handoffs(quick) + gc_objects(quick) + requests(quick)
