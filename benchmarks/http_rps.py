"""P4: HTTP requests/s of a view that spawns 4 children reading the request.

(Named ``http_rps`` rather than ``http``: a ``benchmarks/http.py`` would shadow
the standard library's ``http`` package for everything run from this folder,
Werkzeug and Flask included.)

A separate server process (this file, ``serve``; ``gevent.monkey.patch_all()``
first) runs ``gevent.pywsgi`` on 127.0.0.1 with two Flask apps, each on its
own free port:

- a plain Flask app (no geventctx) with the ways to do it without
  geventctx: ``/args`` (the parent reads ``g``, a header and the body and
  passes them as arguments to ``gevent.spawn`` children, joined),
  ``/args-ff`` (the same, fire-and-forget: the view returns without
  joining, the children outlive it), ``/ccrc``
  (``gevent.spawn(copy_current_request_context(child))``; the child gets a
  fresh ``g``, so it reads ``g.get``) and ``/none`` (no children at all);
- the same app with :class:`GeventContext`: ``/geventctx`` and
  ``/geventctx-ff`` (``geventctx.spawn`` children read ``g``, the header
  and ``request.get_data()`` themselves, through the shared body; joined,
  and fire-and-forget) and ``/none`` again (what the extension costs a
  view that hands nothing off).

The server sets ``TCP_NODELAY`` on its connections (see :func:`serve`).
Every request is a keep-alive ``POST`` with a 64-byte body and an
``X-User`` header; the view spawns 4 children, joins them and answers with
the sum of what they read (a fire-and-forget view answers at once, with
the sum the children will compute; they count what they read). Children
that see a ``g.user`` different from the header are counted and must be
zero.

The load comes from another process over loopback: ``wrk`` (Debian package
``wrk``) if it is on ``PATH``, else this file's pure-gevent client (``load``);
``GEVENTCTX_BENCH_LOADGEN=python`` forces the latter. Each round runs every
variant for a fixed time, in an order rotated by the round; a variant's
figure is the median of its rounds' requests/s (the note also gives the
median of the per-round ratios, which drift between rounds moves less).
Every process is ended in a ``finally``; the server also exits when its
stdin closes or after :data:`SERVER_LIFETIME` seconds.
"""

from __future__ import annotations

import sys

if __name__ == "__main__" and sys.argv[1:2] == ["serve"]:
    from gevent import monkey

    monkey.patch_all()

import json
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import time
import typing as t

from common import Row, read_response, serve_until_stdin_closes, stop_server
from common import start_server as common_start_server

TITLE = "HTTP req/s, view spawning 4 children, gevent.pywsgi in its own process (P4)"

#: (timed rounds, seconds per variant and round, concurrent connections).
SIZES = {False: (7, 2, 16), True: (2, 1, 16)}

#: Requests per variant checked (and warming up) before the timed rounds.
CHECK_REQUESTS = 200

#: The server process exits by itself after this many seconds.
SERVER_LIFETIME = 900

CHILDREN = 4
BODY = b'{"order": 1234, "items": ["apple", "pear"], "note": "deliver at noon"}'[:64].ljust(64)
USER = "user-42"
#: What every view answers: the sum of what its children read.
EXPECTED = sum(len(BODY) + i for i in range(CHILDREN))

#: (row name, server app, path)
VARIANTS = [
    ("args to gevent.spawn, joined (plain Flask)", "plain", "/args"),
    ("copy_current_request_context + gevent.spawn", "plain", "/ccrc"),
    ("geventctx.spawn, joined (GeventContext)", "ctx", "/geventctx"),
    ("args to gevent.spawn, fire-and-forget (plain)", "plain", "/args-ff"),
    ("geventctx.spawn, fire-and-forget (GeventContext)", "ctx", "/geventctx-ff"),
    ("no children (plain Flask)", "plain", "/none"),
    ("no children (GeventContext)", "ctx", "/none"),
]
BASE = VARIANTS[0][0]

#: subject row -> (the row it is measured against, the budget: at least this ratio)
VARIANTS_PATH = {name: f"{app} {path}" for name, app, path in VARIANTS}
BUDGETS = {
    "geventctx.spawn, joined (GeventContext)": (BASE, 0.95),
    "geventctx.spawn, fire-and-forget (GeventContext)": ("args to gevent.spawn, fire-and-forget (plain)", 0.95),
    "no children (GeventContext)": ("no children (plain Flask)", 0.97),
}

HERE = os.path.dirname(os.path.abspath(__file__))


# -- the server process ----------------------------------------------------------


def make_apps() -> dict[str, t.Any]:
    """The plain Flask app and the GeventContext one, with the views."""
    import flask
    import gevent

    import geventctx
    from geventctx.flask import GeventContext

    stats = {"requests": 0, "mismatch": 0, "ff_sum": 0, "ff_expected": 0}  # shared by both apps

    def check(user: t.Any, header: str) -> None:
        if user != header:
            stats["mismatch"] += 1

    def child_args(i: int, user: str, header: str, body: bytes) -> int:
        check(user, header)
        return len(body) + i

    def child_ctx(i: int) -> int:
        request = flask.request
        header = request.headers["X-User"]
        check(flask.g.user, header)
        return len(request.get_data()) + i

    def child_ccrc(i: int) -> int:
        request = flask.request
        request.headers["X-User"]  # read, like the other variants
        flask.g.get("user")  # a fresh g: the parent's user is not there
        return len(request.get_data()) + i

    def answer(children: list[t.Any]) -> str:
        gevent.joinall(children, raise_error=True)
        stats["requests"] += 1
        return str(sum(child.value for child in children))

    def counted(child: t.Callable[..., int]) -> t.Callable[..., None]:
        # A fire-and-forget child: nobody joins it, so it checks its own sum.
        def run(*args: t.Any) -> None:
            value = child(*args)  # it may switch: add only once it returned
            stats["ff_sum"] += value
        return run

    ff_args, ff_ctx = counted(child_args), counted(child_ctx)

    def answer_now() -> str:
        stats["requests"] += 1
        stats["ff_expected"] += EXPECTED
        return str(EXPECTED)

    def build(name: str, extension: bool) -> flask.Flask:
        app = flask.Flask(f"bench_http_{name}")
        if extension:
            GeventContext(app)

        @app.post("/args")
        def args() -> str:
            flask.g.user = flask.request.headers["X-User"]
            request = flask.request
            user, header, body = flask.g.user, request.headers["X-User"], request.get_data()
            return answer([gevent.spawn(child_args, i, user, header, body) for i in range(CHILDREN)])

        @app.post("/none")
        def none() -> str:
            flask.g.user = flask.request.headers["X-User"]
            request = flask.request
            check(flask.g.user, request.headers["X-User"])
            stats["requests"] += 1
            return str(sum(len(request.get_data()) + i for i in range(CHILDREN)))

        if extension:

            @app.post("/geventctx")
            def handed() -> str:
                flask.g.user = flask.request.headers["X-User"]
                return answer([geventctx.spawn(child_ctx, i) for i in range(CHILDREN)])

            @app.post("/geventctx-ff")
            def handed_ff() -> str:
                flask.g.user = flask.request.headers["X-User"]
                for i in range(CHILDREN):
                    geventctx.spawn(ff_ctx, i)
                return answer_now()

        else:

            @app.post("/args-ff")
            def args_ff() -> str:
                flask.g.user = flask.request.headers["X-User"]
                request = flask.request
                user, header, body = flask.g.user, request.headers["X-User"], request.get_data()
                for i in range(CHILDREN):
                    gevent.spawn(ff_args, i, user, header, body)
                return answer_now()


            @app.post("/ccrc")
            def ccrc() -> str:
                flask.g.user = flask.request.headers["X-User"]
                wrap = flask.copy_current_request_context
                return answer([gevent.spawn(wrap(child_ccrc), i) for i in range(CHILDREN)])

        @app.get("/_stats")
        def stats_view() -> t.Any:
            return {
                **stats,
                "live": len(geventctx.registry.live()),
                # every scope but this request's own
                "open_scopes": len([s for s in geventctx.Scope.all_open() if s is not geventctx.current_scope()]),
            }

        return app

    return {"plain": build("plain", False), "ctx": build("ctx", True)}


def serve() -> None:
    """Serve both apps on free loopback ports; print them; exit on stdin EOF."""
    import socket

    from gevent.pywsgi import WSGIServer

    class Server(WSGIServer):
        # pywsgi sends a response's headers and body in two send() calls; on a
        # keep-alive connection Nagle's algorithm then holds the body until
        # the client's delayed ACK (40 ms on Linux): every variant would
        # measure that timer (~360 req/s at 16 connections), not the view.
        def handle(self, sock: t.Any, address: t.Any) -> None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            super().handle(sock, address)

    servers = {name: Server(("127.0.0.1", 0), app, log=None) for name, app in make_apps().items()}
    for server in servers.values():
        server.start()
    print(json.dumps({name: server.server_port for name, server in servers.items()}), flush=True)

    serve_until_stdin_closes(servers.values(), SERVER_LIFETIME, 2)


# -- the pure-gevent load generator (its own process) -----------------------------


def request_bytes(path: str) -> bytes:
    """The request every client sends: keep-alive POST, 64-byte body."""
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-User: {USER}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(BODY)}\r\n\r\n"
    ).encode() + BODY


def load(port: int, path: str, seconds: float, connections: int) -> dict[str, t.Any]:
    """Keep ``connections`` keep-alive connections busy for ``seconds``."""
    import gevent
    from gevent import socket

    payload = request_bytes(path)
    counts = {"ok": 0, "bad": 0, "errors": 0}
    deadline = time.monotonic() + seconds

    def one_connection() -> None:
        sock: t.Any = None
        buf = b""
        while time.monotonic() < deadline:
            try:
                if sock is None:
                    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
                    buf = b""
                sock.sendall(payload)
                head, _, buf = read_response(sock, buf)
                counts["ok" if head.startswith(b"HTTP/1.1 200") else "bad"] += 1
            except (OSError, ValueError):
                counts["errors"] += 1
                if sock is not None:
                    sock.close()
                sock = None
        if sock is not None:
            sock.close()

    start = time.monotonic()
    gevent.joinall([gevent.spawn(one_connection) for _ in range(connections)], timeout=seconds + 30)
    elapsed = time.monotonic() - start
    return {**counts, "rps": counts["ok"] / elapsed}


# -- the driver (in the benchmark process) ---------------------------------------


WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = {body}
wrk.headers["Content-Type"] = "application/json"
wrk.headers["X-User"] = "{user}"
"""


class Loadgen:
    """Runs one timed load against one URL, with wrk or the gevent client."""

    def __init__(self) -> None:
        forced = os.environ.get("GEVENTCTX_BENCH_LOADGEN", "")
        self.wrk = shutil.which("wrk") if forced != "python" else None
        if forced == "wrk" and self.wrk is None:
            raise RuntimeError("GEVENTCTX_BENCH_LOADGEN=wrk but wrk is not on PATH")
        self.name = "wrk" if self.wrk else "gevent client"
        self._script: str | None = None
        if self.wrk:
            fd, self._script = tempfile.mkstemp(suffix=".lua", prefix="geventctx-bench-")
            with os.fdopen(fd, "w") as f:
                f.write(WRK_SCRIPT.format(body=json.dumps(BODY.decode()), user=USER))

    def close(self) -> None:
        if self._script:
            os.unlink(self._script)
            self._script = None

    def run(self, port: int, path: str, seconds: int, connections: int) -> float:
        """Requests/s; raises if any request failed."""
        if self.wrk:
            assert self._script is not None
            cmd = [self.wrk, "-t1", f"-c{connections}", f"-d{seconds}s", "-s", self._script,
                   f"http://127.0.0.1:{port}{path}"]
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30, check=True).stdout
            bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
            errors = re.search(r"Socket errors: (.*)", out)
            if bad or errors:
                raise RuntimeError(f"wrk {path}: {out}")
            return float(re.search(r"Requests/sec:\s*([\d.]+)", out).group(1))  # type: ignore[union-attr]
        script = os.path.join(HERE, "http_rps.py")
        cmd = [sys.executable, script, "load", str(port), path, str(seconds), str(connections)]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, check=True).stdout
        result = json.loads(out)
        if result["bad"] or result["errors"]:
            raise RuntimeError(f"gevent client {path}: {result}")
        return float(result["rps"])


def _get(port: int, path: str, method: str = "GET") -> bytes:
    """One request on a fresh (blocking) connection; the response body."""
    import socket as stdsocket

    with stdsocket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        if method == "POST":
            sock.sendall(request_bytes(path).replace(b"\r\nHost:", b"\r\nConnection: close\r\nHost:", 1))
        else:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"{method} {path}: {head!r} {body[:300]!r}")
    return body


def start_server() -> tuple[subprocess.Popen[str], dict[str, int]]:
    """The server process and its ports; killed if it does not come up."""
    return common_start_server("http_rps.py", "serve")




def run(quick: bool) -> list[Row]:
    """Load every variant in turn, interleaved over rounds; P4 row."""
    rounds, seconds, connections = SIZES[quick]
    samples: dict[str, list[float]] = {name: [] for name, _, _ in VARIANTS}
    loadgen = Loadgen()
    try:
        proc, ports = start_server()
    except BaseException:
        loadgen.close()
        raise
    try:
        expected = str(EXPECTED).encode()
        for _, app, path in VARIANTS:  # correctness and warm-up
            for _ in range(CHECK_REQUESTS):
                body = _get(ports[app], path, "POST")
                if body != expected:
                    raise RuntimeError(f"{path} answered {body!r}, not {expected!r}")
        for i in range(rounds):
            k = i % len(VARIANTS)
            for name, app, path in VARIANTS[k:] + VARIANTS[:k]:
                samples[name].append(loadgen.run(ports[app], path, seconds, connections))
        time.sleep(0.2)  # let the last children of the last request end
        stats = json.loads(_get(ports["ctx"], "/_stats"))
        plain_stats = json.loads(_get(ports["plain"], "/_stats"))
    finally:
        stderr = stop_server(proc)
        loadgen.close()
    if (
        stats["mismatch"] or stats["live"] or stats["open_scopes"]
        or stats["ff_sum"] != stats["ff_expected"]
    ):
        raise RuntimeError(f"server state after the load: {stats} {plain_stats}\n{stderr[-3000:]}")

    med = {name: statistics.median(s) for name, s in samples.items()}
    base = med[BASE]
    rows = []
    for name, value in med.items():
        row = Row(name, value, "req/s", value / base, note=_spread(samples[name]))
        if name in BUDGETS:
            against, least = BUDGETS[name]
            ratio = value / med[against]
            # Drift between rounds hits both alike: the per-round ratio is steadier.
            paired = statistics.median(a / b for a, b in zip(samples[name], samples[against], strict=True))
            row = row._replace(
                budget=f"P4 >={least}x {VARIANTS_PATH[against]}: {ratio:.3f}x",
                ok=ratio >= least,
                note=f"{row.note}; per-round ratio median {paired:.3f}x",
            )
        elif name == "copy_current_request_context + gevent.spawn":
            row = row._replace(note=f"{row.note}; geventctx joined: {med[VARIANTS[2][0]] / value:.3f}x this")
        rows.append(row)
    total = stats["requests"]  # one counter for both apps
    rows[0] = rows[0]._replace(
        note=f"{rows[0].note}; {loadgen.name}, {connections} conns, {rounds} rounds x {seconds} s; "
        f"{total} requests, 0 wrong-user children, fire-and-forget sums complete, registry empty"
    )
    return rows


def _spread(samples: list[float]) -> str:
    """Half the range as a percentage of the median (few rounds: no quartiles)."""
    return f"±{(max(samples) - min(samples)) / 2 / statistics.median(samples) * 100:.1f}%"


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        serve()
    elif sys.argv[1:2] == ["load"]:
        port, path, seconds, connections = sys.argv[2:6]
        print(json.dumps(load(int(port), path, float(seconds), int(connections))))
    else:
        sys.exit("usage: http_rps.py serve | load PORT PATH SECONDS CONNECTIONS (run.py drives both)")
