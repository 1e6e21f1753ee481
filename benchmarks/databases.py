"""P10: req/s of a dashboard fanning out Flask-SQLAlchemy reads over PostgreSQL.

The load case of issue 24 as a benchmark: 200 requests, 20 at once, each
fanning out 4 Flask-SQLAlchemy reads (``db.session``) over PostgreSQL
through pg8000 and writing one audit row in the background; against the
same app done the way Flask alone allows it, passing data to plain
``gevent`` greenlets that push their own app context (``with
app.app_context():``). Budget: >= 0.95x the baseline's req/s, 0 errors.

A private PostgreSQL cluster (tests/pgkit.py: the Debian ``postgresql``
package's ``initdb``, a free port on 127.0.0.1, fsync off) holds a new
database with 20 users and 4 sections each; it is stopped at the end.
A separate server process (this file, ``serve``; ``gevent.monkey.patch_all()``
first) runs ``gevent.pywsgi`` on 127.0.0.1 with two Flask apps, each on its
own free port and with its own engine (``pool_size`` 40, the size
docs/databases.rst gives for a session per running child):

- ``ctx`` (:class:`GeventContext`): ``GET /dash/<uid>`` sets ``g.uid``;
  ``geventctx.Pool(4).map`` children read ``g.uid`` and their section
  through ``db.session`` (their own Session: their own app context);
  ``geventctx.spawn`` writes the audit row after the response;
- ``plain`` (no geventctx): the view reads ``uid`` and passes it, with the
  app, to ``gevent.pool.Pool(4).map`` children and to a ``gevent.spawn``
  writer, each doing ``with app.app_context():`` around its
  ``db.session`` work.

Each answer is ``user<uid>|<4 section titles>`` and is checked by the load
generator (another process, this file's ``load``: 20 keep-alive gevent
connections sharing 200 requests); a wrong answer or a non-200 is an
error. Each round runs both variants, in alternating order; a variant's
figure is the median of its rounds (the note adds the median of the
per-round ratios, and the server's CPU time per request, which the
database's own CPU use on a shared machine does not blur). After the rounds: every audit row is
in the database with its own user (0 lost writes), and no connection is
checked out of either pool (0 connections left).
"""

from __future__ import annotations

import sys

if __name__ == "__main__" and sys.argv[1:2] == ["serve"]:
    from gevent import monkey

    monkey.patch_all()

import json
import os
import statistics
import subprocess
import time
import typing as t

from common import Row, read_response, serve_until_stdin_closes, stop_server
from common import start_server as common_start_server

TITLE = "HTTP req/s, 4 Flask-SQLAlchemy reads + 1 background write per request, PostgreSQL/pg8000 (P10)"

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))  # pgkit

#: (timed rounds, requests per round and variant, concurrent connections).
SIZES = {False: (9, 200, 20), True: (2, 200, 20)}
USERS = 20
SECTIONS = 4
POOL = {"pool_size": 40, "max_overflow": 10, "pool_timeout": 30}
SERVER_LIFETIME = 900
#: How long the background writes of the last round may take to land.
SETTLE = 15.0

VARIANTS = [
    ("plain greenlets, own app_context (plain Flask)", "plain"),
    ("geventctx.Pool(4).map + geventctx.spawn (GeventContext)", "ctx"),
]
BASE, SUBJECT = VARIANTS[0][0], VARIANTS[1][0]
LEAST = 0.95


def title_of(uid: int, position: int) -> str:
    return f"user{uid}: section {position}"


def expected(uid: int) -> bytes:
    return "|".join([f"user{uid}", *(title_of(uid, k) for k in range(SECTIONS))]).encode()


# -- the server process ----------------------------------------------------------------


def make_apps(url: str) -> dict[str, t.Any]:
    """The GeventContext app and the plain one, on one database."""
    import flask
    import gevent
    import gevent.pool
    import sqlalchemy as sa
    from flask_sqlalchemy import SQLAlchemy

    import geventctx
    from geventctx.flask import GeventContext

    db = SQLAlchemy()

    class Section(db.Model):  # type: ignore[name-defined,misc]
        __tablename__ = "sections"
        id = db.Column(db.Integer, primary_key=True)
        user_id = db.Column(db.Integer, nullable=False)
        position = db.Column(db.Integer, nullable=False)
        title = db.Column(db.String(80), nullable=False)

    class User(db.Model):  # type: ignore[name-defined,misc]
        __tablename__ = "users"
        id = db.Column(db.Integer, primary_key=True)
        name = db.Column(db.String(40), nullable=False)

    class Audit(db.Model):  # type: ignore[name-defined,misc]
        __tablename__ = "audits"
        id = db.Column(db.Integer, primary_key=True)
        tag = db.Column(db.String(80), nullable=False)
        user_name = db.Column(db.String(40), nullable=False)

    def section(uid: int, position: int) -> str:
        query = sa.select(Section.title).where(Section.user_id == uid, Section.position == position)
        return str(db.session.execute(query).scalar_one())

    def build(name: str, extension: bool) -> flask.Flask:
        app = flask.Flask(f"bench_db_{name}")
        app.config.update(SQLALCHEMY_DATABASE_URI=url, SQLALCHEMY_ENGINE_OPTIONS=POOL)
        db.init_app(app)
        if extension:
            GeventContext(app)

            def read_ctx(position: int) -> str:
                return section(flask.g.uid, position)

            def audit_ctx(tag: str) -> None:
                db.session.add(Audit(tag=tag, user_name=flask.g.user_name))
                db.session.commit()

            @app.get("/dash/<int:uid>")
            def dash(uid: int) -> str:
                user = db.session.get(User, uid)
                flask.g.uid, flask.g.user_name = uid, user.name
                titles = geventctx.Pool(4).map(read_ctx, range(SECTIONS))
                geventctx.spawn(audit_ctx, flask.request.args["tag"])
                return "|".join([user.name, *titles])

        else:

            def read_plain(app: flask.Flask, uid: int, position: int) -> str:
                with app.app_context():
                    return section(uid, position)

            def audit_plain(app: flask.Flask, tag: str, user_name: str) -> None:
                with app.app_context():
                    db.session.add(Audit(tag=tag, user_name=user_name))
                    db.session.commit()

            @app.get("/dash/<int:uid>")
            def dash(uid: int) -> str:
                user = db.session.get(User, uid)
                me = flask.current_app._get_current_object()  # type: ignore[attr-defined]
                titles = gevent.pool.Pool(4).map(lambda k: read_plain(me, uid, k), range(SECTIONS))
                gevent.spawn(audit_plain, me, flask.request.args["tag"], user.name)
                return "|".join([user.name, *titles])

        @app.get("/_stats")
        def stats() -> t.Any:
            return {
                "checked_out": db.engine.pool.checkedout(), "live": len(geventctx.registry.live()),
                "cpu": time.process_time(),  # the server process's CPU seconds, both apps together
            }

        return app

    apps = {"plain": build("plain", False), "ctx": build("ctx", True)}
    with apps["plain"].app_context():
        db.create_all()
        for n in range(1, USERS + 1):
            db.session.add(User(id=n, name=f"user{n}"))
            for k in range(SECTIONS):
                db.session.add(Section(user_id=n, position=k, title=title_of(n, k)))
        db.session.commit()
    return apps


def serve(url: str) -> None:
    """Serve both apps on free loopback ports; print them; exit on stdin EOF."""
    import socket

    from gevent.pywsgi import WSGIServer

    class Server(WSGIServer):
        # Nagle off, as in http_rps.py: otherwise the delayed ACK is measured.
        def handle(self, sock: t.Any, address: t.Any) -> None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            super().handle(sock, address)

    servers = {name: Server(("127.0.0.1", 0), app, log=None) for name, app in make_apps(url).items()}
    for server in servers.values():
        server.start()
    print(json.dumps({name: server.server_port for name, server in servers.items()}), flush=True)
    serve_until_stdin_closes(servers.values(), SERVER_LIFETIME, 5)


# -- the load generator (its own process) ----------------------------------------------


def load(port: int, tag: str, requests: int, connections: int) -> dict[str, t.Any]:
    """``requests`` dashboards over ``connections`` keep-alive connections."""
    import gevent
    from gevent import socket

    counts: dict[str, t.Any] = {"ok": 0, "errors": 0, "first_error": ""}
    todo = list(range(requests))

    def one_connection() -> None:
        sock: t.Any = None
        buf = b""
        while todo:
            n = todo.pop()
            uid = 1 + n % USERS
            try:
                if sock is None:
                    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    buf = b""
                sock.sendall(f"GET /dash/{uid}?tag={tag}-{n} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
                head, body, buf = read_response(sock, buf)
                if head.startswith(b"HTTP/1.1 200") and body == expected(uid):
                    counts["ok"] += 1
                    continue
                error = f"{head[:40]!r} {body[:200]!r}"
            except (OSError, ValueError) as exc:
                error = repr(exc)
                if sock is not None:
                    sock.close()
                sock = None
            counts["errors"] += 1
            counts["first_error"] = counts["first_error"] or error
        if sock is not None:
            sock.close()

    start = time.monotonic()
    gevent.joinall([gevent.spawn(one_connection) for _ in range(connections)], timeout=300)
    elapsed = time.monotonic() - start
    return {**counts, "rps": counts["ok"] / elapsed}


# -- the driver (in the benchmark process) ---------------------------------------------


def _get(port: int, path: str) -> t.Any:
    import socket as stdsocket

    with stdsocket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"GET {path}: {head!r} {body[:300]!r}")
    return json.loads(body)


def _load(port: int, tag: str, requests: int, connections: int) -> float:
    cmd = [sys.executable, os.path.join(HERE, "databases.py"), "load", str(port), tag, str(requests), str(connections)]
    result = json.loads(subprocess.run(cmd, capture_output=True, text=True, timeout=360, check=True).stdout)
    if result["errors"]:
        raise RuntimeError(f"{tag}: {result['errors']} of {requests} requests failed, first: {result['first_error']}")
    return float(result["rps"])


def run(quick: bool) -> list[Row]:
    """Both variants, interleaved over rounds; the P10 row."""
    import pgkit

    rounds, requests, connections = SIZES[quick]
    bin_dir = pgkit.find_bin_dir()
    if bin_dir is None:
        return [Row(SUBJECT, 0.0, "req/s", budget=f"P10 >={LEAST}x", ok=False,
                    note="PostgreSQL's initdb is not installed (apt-get install postgresql)")]
    cluster = pgkit.Cluster(bin_dir).start()
    try:
        database = cluster.create_database("bench")
        proc, ports = common_start_server("databases.py", "serve", cluster.url(database, "pg8000"))
        try:
            samples: dict[str, list[float]] = {name: [] for name, _ in VARIANTS}
            for _name, app in VARIANTS:  # correctness and warm-up
                _load(ports[app], f"warm-{app}", requests, connections)
            cpu: dict[str, list[float]] = {name: [] for name, _ in VARIANTS}
            for i in range(rounds):
                order = VARIANTS if i % 2 == 0 else VARIANTS[::-1]
                for name, app in order:
                    before = _get(ports[app], "/_stats")["cpu"]
                    samples[name].append(_load(ports[app], f"r{i}-{app}", requests, connections))
                    cpu[name].append((_get(ports[app], "/_stats")["cpu"] - before) / requests * 1e3)
            total = (rounds + 1) * requests
            audits = _audits_settled(cluster, database, 2 * total)
            stats = {app: _get(ports[app], "/_stats") for _, app in VARIANTS}
        finally:
            stderr = stop_server(proc)
        if audits != {"ctx": total, "plain": total, "wrong user": 0}:
            raise RuntimeError(f"audit rows after the load: {audits} (expected {total} each)\n{stderr[-3000:]}")
        if any(s["checked_out"] or s["live"] for s in stats.values()):
            raise RuntimeError(f"connections or children left after the load: {stats}\n{stderr[-3000:]}")
    finally:
        cluster.stop()

    med = {name: statistics.median(s) for name, s in samples.items()}
    ratio = med[SUBJECT] / med[BASE]
    paired = statistics.median(a / b for a, b in zip(samples[SUBJECT], samples[BASE], strict=True))
    return [
        Row(BASE, med[BASE], "req/s", 1.0, note=f"{_spread(samples[BASE])}; {rounds} rounds x {requests} requests, "
            f"{connections} at once; {total} audit rows each, 0 lost, 0 wrong user, 0 connections left"),
        Row(SUBJECT, med[SUBJECT], "req/s", ratio, budget=f"P10 >={LEAST}x plain: {ratio:.3f}x", ok=ratio >= LEAST,
            note=f"{_spread(samples[SUBJECT])}; per-round ratio median {paired:.3f}x; server CPU per request"
            f" {statistics.median(cpu[SUBJECT]):.2f} ms vs {statistics.median(cpu[BASE]):.2f} ms"),
    ]


def _audits_settled(cluster: t.Any, database: str, total: int) -> dict[str, int]:
    """Audit rows per variant, once the background writes landed (or SETTLE passed)."""
    deadline = time.monotonic() + SETTLE
    while True:
        conn = cluster.connect(database)
        try:
            rows = conn.run("SELECT tag, user_name FROM audits")
        finally:
            conn.close()
        if len(rows) >= total or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    counts = {"ctx": 0, "plain": 0, "wrong user": 0}
    for tag, user_name in rows:
        counts["ctx" if "-ctx-" in tag else "plain"] += 1
        uid = 1 + int(tag.rsplit("-", 1)[1]) % USERS
        counts["wrong user"] += user_name != f"user{uid}"
    return counts


def _spread(samples: list[float]) -> str:
    return f"±{(max(samples) - min(samples)) / 2 / statistics.median(samples) * 100:.1f}%"


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        serve(sys.argv[2])
    elif sys.argv[1:2] == ["load"]:
        port, tag, requests, connections = sys.argv[2:6]
        print(json.dumps(load(int(port), tag, int(requests), int(connections))))
    else:
        sys.exit("usage: databases.py serve URL | load PORT TAG REQUESTS CONNECTIONS (run.py drives both)")
