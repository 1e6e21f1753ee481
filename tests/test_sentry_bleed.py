"""geventctx.integrations.sentry (written as an attack by a reviewer who did
not write it): scope state (tags, user, extras,
contexts, breadcrumbs, level, fingerprint) between parent, children,
grandchildren and siblings, for nested hand-offs of every kind, with the real
sentry-sdk over a real gevent.pywsgi server."""

from __future__ import annotations

import socket as _stdsocket  # noqa: F401
import typing as t

import flask
import gevent
import pytest
from gevent import socket
from gevent.monkey import get_original

import geventctx
from geventctx.flask import GeventContext

pytest.importorskip("sentry_sdk")
import sentry_sdk  # noqa: E402
from test_sentry import sentry  # noqa: E402,F401

native_sleep = get_original("time", "sleep")

LEVEL1 = ("spawn", "pool", "imap", "threadpool", "executor", "patched", "group_map")
LEVEL2 = ("spawn", "pool", "executor", "patched")  # from a ThreadPool task: handed over / thread hub


class Tools:
    def __init__(self) -> None:
        self.pool = geventctx.Pool(1000)
        self.group = geventctx.Group()
        self.threads = geventctx.ThreadPool(4)
        self.executor = geventctx.Executor(max_workers=1000)

    def close(self) -> None:
        self.executor.shutdown(wait=True)
        self.threads.kill()


def own(path: str) -> None:
    """What a node sets as its own, before handing off."""
    sentry_sdk.set_tag(f"t.{path}", "1")
    sentry_sdk.set_extra(f"x.{path}", 1)
    sentry_sdk.set_context(f"c.{path}", {"v": path})
    sentry_sdk.set_user({"id": path})
    sentry_sdk.add_breadcrumb(message=f"crumb {path}")


def late(path: str) -> None:
    """What a node sets after handing off: must not reach its children."""
    sentry_sdk.set_tag(f"late.{path}", "1")
    sentry_sdk.add_breadcrumb(message=f"late {path}")
    scope = sentry_sdk.get_isolation_scope()
    scope.set_level("warning")
    scope.fingerprint = [f"fp {path}"]
    with sentry_sdk.new_scope() as inner:
        inner.set_tag(f"new_scope.{path}", "1")
    with sentry_sdk.isolation_scope() as inner:
        inner.set_tag(f"isolation_scope.{path}", "1")
        sentry_sdk.add_breadcrumb(message=f"iso {path}")
    sentry_sdk.get_current_scope().set_tag(f"current.{path}", "1")


def pause(in_thread: bool) -> None:
    (native_sleep if in_thread else gevent.sleep)(0.01)


def start(tools: Tools, kind: str, fn: t.Callable[..., t.Any], *args: t.Any) -> t.Callable[[], t.Any]:
    """Start fn(*args) as a child of ``kind``; returns its joiner."""
    if kind == "spawn":
        g = geventctx.spawn(fn, *args)
        return g.get
    if kind == "pool":
        g = tools.pool.spawn(fn, *args)
        return g.get
    if kind == "imap":
        it = tools.pool.imap_unordered(lambda a: fn(*a), [args])
        return lambda: list(it)
    if kind == "group_map":
        g = tools.group.map_async(lambda a: fn(*a), [args])
        return g.get
    if kind == "threadpool":
        r = tools.threads.spawn(fn, *args)
        return r.get
    if kind == "executor":
        f = tools.executor.submit(fn, *args)
        # A timeout: from a ThreadPool task, result() without one hits
        # LoopExit (a ThreadPool task waiting for a Future: see the closing note of issue 16).
        return lambda: f.result(timeout=30)
    if kind == "patched":
        g = gevent.spawn(fn, *args)
        return g.get
    raise AssertionError(kind)


def node(tools: Tools, path: str, depth: int, in_thread: bool) -> None:
    own(path)
    joiners = []
    if depth:
        for kind in LEVEL2 if in_thread else LEVEL1:
            joiners.append(start(tools, kind, node, tools, f"{path}.{kind}", depth - 1, kind == "threadpool"))
    late(path)
    pause(in_thread)  # siblings and other requests set theirs
    sentry_sdk.capture_message(path)
    for join in joiners:
        join()


def expected(path: str) -> dict[str, t.Any]:
    parts = path.split(".")
    prefixes = [".".join(parts[: i + 1]) for i in range(len(parts))]
    return {
        "tags": {f"t.{p}": "1" for p in prefixes} | {f"late.{path}": "1", f"current.{path}": "1"},
        "extra": {f"x.{p}" for p in prefixes},
        "contexts": {f"c.{p}" for p in prefixes},
        "user": path,
        "crumbs": [f"crumb {p}" for p in prefixes] + [f"late {path}"],
        "level": "warning",
        "fingerprint": [f"fp {path}"],
    }


def seen(event: dict[str, t.Any]) -> dict[str, t.Any]:
    return {
        "tags": event.get("tags", {}),
        "extra": {k for k in event.get("extra", {}) if k.startswith("x.")},
        "contexts": {k for k in event.get("contexts", {}) if k.startswith("c.")},
        "user": event.get("user", {}).get("id"),
        "crumbs": [b["message"] for b in event.get("breadcrumbs", {}).get("values", [])
                   if str(b.get("message", "")).split(" ")[0] in ("crumb", "late", "iso")],
        "level": event.get("level"),
        "fingerprint": event.get("fingerprint"),
    }


def test_nested_hand_offs_of_every_kind_keep_every_scope_field_their_own(
    sentry: t.Any, serve: t.Any  # noqa: F811
) -> None:
    transport = sentry()
    tools = Tools()
    app = flask.Flask(__name__)
    GeventContext(app)

    @app.get("/n/<int:n>")
    def view(n: int) -> str:
        node(tools, f"r{n}", 2, False)
        return "ok"

    geventctx.patch()
    try:
        server = serve(app)
        clients = [gevent.spawn(server.request, "GET", f"/n/{n}") for n in range(6)]
        gevent.joinall(clients, raise_error=True, timeout=60)
        assert [c.value.status for c in clients] == [200] * 6
    finally:
        geventctx.unpatch()
        tools.close()
    events = [e for e in transport.events() if e.get("message")]
    per_request = 1 + len(LEVEL1) + len(LEVEL1) * len(LEVEL1) - len(LEVEL1) + len(LEVEL2)
    assert len(events) == 6 * per_request
    bad = [(e["message"], seen(e), expected(e["message"])) for e in events if seen(e) != expected(e["message"])]
    assert bad == [], bad[:3]


def _keepalive(port: int, paths: list[str]) -> list[bytes]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    bodies = []
    try:
        for path in paths:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
            buf = b""
            while b"\r\n\r\n" not in buf:
                buf += sock.recv(65536)
            head, _, rest = buf.partition(b"\r\n\r\n")
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length")))
            while len(rest) < length:
                rest += sock.recv(65536)
            bodies.append(rest)
    finally:
        sock.close()
    return bodies


def test_children_of_one_keepalive_request_do_not_reach_the_next(sentry: t.Any, serve: t.Any, gates: t.Any) -> None:  # noqa: F811
    transport = sentry()
    app = flask.Flask(__name__)
    GeventContext(app)
    go = gates()
    done = []

    def straggler(n: int) -> None:
        go.wait(5)  # outlives its request, while the next one runs
        sentry_sdk.set_tag("straggler", str(n))
        sentry_sdk.set_user({"id": f"straggler {n}"})
        sentry_sdk.add_breadcrumb(message=f"crumb straggler {n}")
        sentry_sdk.capture_message(f"straggler {n}")
        done.append(n)

    @app.get("/k/<int:n>")
    def view(n: int) -> str:
        if n == 2:
            go.set()
            gevent.sleep(0.05)  # the straggler of request 1 runs now
        sentry_sdk.set_tag("request", str(n))
        geventctx.spawn(straggler, n)
        gevent.spawn(straggler, n + 100)  # patched: visibility only
        sentry_sdk.capture_message(f"request {n}")
        return "ok"

    geventctx.patch()
    try:
        server = serve(app)
        _keepalive(server.port, ["/k/1", "/k/2", "/k/3"])
        go.set()
        for _ in range(50):
            if len(done) == 6:
                break
            gevent.sleep(0.02)
    finally:
        geventctx.unpatch()
    events = {e["message"]: e for e in transport.events() if e.get("message")}
    for n in (1, 2, 3):
        assert events[f"request {n}"]["tags"] == {"request": str(n)}
        user = events[f"request {n}"].get("user")
        assert user in (None, {}) or "straggler" not in str(user)
        for s in (n, n + 100):
            assert events[f"straggler {s}"]["tags"] == {"request": str(n), "straggler": str(s)}
            crumbs = [b["message"] for b in events[f"straggler {s}"].get("breadcrumbs", {}).get("values", [])
                      if "straggler" in str(b.get("message"))]
            assert crumbs == [f"crumb straggler {s}"]
