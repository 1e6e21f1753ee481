"""P6 and the curl check of issue 10: large uploads through the streaming tee.

P6, peak resident memory of one large upload. Each variant runs in a fresh
server process (this file, ``serve``; ``gevent.monkey.patch_all()`` first):
a Flask app with :class:`GeventContext` whose ``GEVENTCTX_BODY`` is ``"off"``
(plain Werkzeug reading: the baseline) or ``"tee"`` (the default: a pump
greenlet reads the socket into a spool, 1 MiB in memory and the rest in an
unnamed temporary file, each consumer through its own cursor), served by
``gevent.pywsgi`` on a free 127.0.0.1 port. The process takes exactly one
upload; when its stdin closes it stops the server and reports its peak
resident set size (``VmHWM`` of ``/proc/self/status``, read just before it
exits), which is therefore the upload's peak (plus the imports', given as
"idle" in the note: ``VmHWM`` when the server came up). Two uploads:

- (a) a chunked upload (``Transfer-Encoding: chunked``, no length) that the
  view reads through ``request.stream.read(65536)`` until it ends, hashing
  what it gets; the view spawns nothing;
- (b) a multipart form: two text fields, a 150 MiB file part, a second file
  part filling the body up to 200 MiB, and a 4 KiB text field; the view reads
  ``request.files`` and ``request.form`` and hashes every file.

The client (this process, a blocking socket) makes the body on the fly from
a 1 MiB random block, at shifting offsets, in pieces of 16-64 KiB sent as
they are made, so it never holds more than the block; it hashes what it
sends and compares the server's answer (byte counts and SHA-256 of the
stream or of every file, the text fields). Variants run one after the
other, "off" and "tee" side by side for each upload; the ratio column is
the tee's peak over off's, the budget is on the difference (note; MiB, as
"MB" is used throughout these benchmarks). The note also gives the upload's
throughput: its size over the client's time from the first byte sent to
the end of the answer.

The curl check: ``/usr/bin/curl --data-binary @file -H 'Expect:
100-continue'`` posts a 2 MiB file (``-w '%{time_total}'``, a new curl
process and connection per request) to one server process (``serve curl``,
``TCP_NODELAY`` on its connections) with two apps on their own ports: a
plain Flask app whose view reads ``request.get_data()`` and hands the bytes
to one ``gevent.spawn`` child (joined), and the same app with
:class:`GeventContext`, whose view reads ``request.get_data()`` and spawns
one ``geventctx.spawn`` child that reads ``request.get_data()`` itself
(joined). gevent.pywsgi sends ``100 Continue`` at the view's first read, so
the figure includes the tee's first read. Rounds alternate the two apps (in
an order rotated by the round) after untimed warm-ups and a checked request
per app (curl saw ``100 Continue``; both parent and child got the file:
SHA-256); the figure is the median of curl's ``time_total``.
"""

from __future__ import annotations

import sys

if __name__ == "__main__" and sys.argv[1:2] == ["serve"]:
    from gevent import monkey

    monkey.patch_all()

import hashlib
import json
import os
import random
import resource
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
import typing as t

from common import Row, serve_until_stdin_closes
from common import start_server as common_start_server

TITLE = "large uploads through the tee: peak RSS (P6), curl Expect: 100-continue"

MiB = 1024 * 1024

#: (chunked upload, multipart upload, multipart file part) sizes in bytes.
SIZES = {False: (300 * MiB, 200 * MiB, 150 * MiB), True: (30 * MiB, 20 * MiB, 15 * MiB)}
#: P6 budget: the tee's peak RSS at most this much above "off".
RSS_BUDGET = 64 * MiB

#: Timed curl requests per app, after CURL_WARMUP untimed ones.
CURL_ROUNDS = {False: 41, True: 5}
CURL_WARMUP = 5
CURL_SIZE = 2 * MiB
CURL_BUDGET = 1.1
CURL = "/usr/bin/curl"

BOUNDARY = "----geventctxbenchP6uploadQz81LxW"
#: The multipart form's text fields (the last one is 4 KiB).
FIELDS = {"title": "quarterly archive", "tags": "finance,q3,raw", "comment": "x" * 4096}

#: The server process exits by itself after this many seconds.
SERVER_LIFETIME = 600
#: Client socket timeout, seconds.
TIMEOUT = 120.0

HERE = os.path.dirname(os.path.abspath(__file__))


# -- the server process ----------------------------------------------------------


def _status(field: str) -> int:
    """A ``kB`` field of /proc/self/status, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _hash_file(stream: t.Any) -> list[t.Any]:
    digest = hashlib.sha256()
    size = 0
    while chunk := stream.read(MiB):
        digest.update(chunk)
        size += len(chunk)
    return [size, digest.hexdigest()]


def make_apps(kind: str) -> dict[str, t.Any]:
    """``kind`` "tee"/"off": the P6 app in that body mode; "curl": both curl apps."""
    import flask
    import gevent

    import geventctx
    from geventctx.flask import GeventContext

    def p6_app(mode: str) -> flask.Flask:
        app = flask.Flask(f"bench_upload_{mode}")
        app.config["GEVENTCTX_BODY"] = mode
        GeventContext(app)

        @app.post("/stream")
        def stream() -> t.Any:
            read = flask.request.stream.read
            digest = hashlib.sha256()
            size = 0
            while chunk := read(65536):
                digest.update(chunk)
                size += len(chunk)
            return {"size": size, "sha256": digest.hexdigest()}

        @app.post("/multipart")
        def multipart() -> t.Any:
            files = flask.request.files
            form = flask.request.form
            return {
                "fields": form.to_dict(),
                "files": {name: _hash_file(upload.stream) for name, upload in files.items()},
            }

        return app

    def curl_app(extension: bool) -> flask.Flask:
        app = flask.Flask(f"bench_upload_curl_{extension}")
        if extension:
            GeventContext(app)

        def measure(data: bytes) -> str:
            check = flask.request.args.get("check")  # parent's and child's request
            return hashlib.sha256(data).hexdigest() if check else str(len(data))

        def child_args(data: bytes, check: bool) -> str:
            return hashlib.sha256(data).hexdigest() if check else str(len(data))

        def child_ctx() -> str:
            return measure(flask.request.get_data())

        @app.post("/curl")
        def curl_view() -> str:
            data = flask.request.get_data()
            mine = measure(data)
            if extension:
                child = geventctx.spawn(child_ctx)
            else:
                child = gevent.spawn(child_args, data, bool(flask.request.args.get("check")))
            return f"{mine} {child.get()}"

        return app

    if kind == "curl":
        return {"plain": curl_app(False), "ctx": curl_app(True)}
    return {kind: p6_app(kind)}


def serve(kind: str) -> None:
    """Serve the ``kind`` apps on free loopback ports; print them and the idle
    peak RSS; on stdin EOF stop and print the peak RSS."""
    from gevent.pywsgi import WSGIServer

    class Server(WSGIServer):
        # As in http_rps: no Nagle delay between the response's two sends.
        def handle(self, sock: t.Any, address: t.Any) -> None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            super().handle(sock, address)

    servers = {name: Server(("127.0.0.1", 0), app, log=None) for name, app in make_apps(kind).items()}
    for server in servers.values():
        server.start()
    ports = {name: server.server_port for name, server in servers.items()}
    print(json.dumps({"ports": ports, "idle_hwm": _status("VmHWM")}), flush=True)

    serve_until_stdin_closes(servers.values(), SERVER_LIFETIME, 5)
    print(
        json.dumps(
            {
                "hwm": _status("VmHWM"),
                "rss": _status("VmRSS"),
                "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            }
        ),
        flush=True,
    )


def start_server(kind: str) -> tuple[subprocess.Popen[str], dict[str, t.Any]]:
    """A fresh server process and its first line (ports, idle peak RSS)."""
    return common_start_server("upload.py", "serve", kind)


def stop_server(proc: subprocess.Popen[str]) -> tuple[dict[str, t.Any] | None, str]:
    """End the server (stdin EOF, then terminate, then kill): its last report and stderr."""
    try:
        out, err = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            out, err = proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
    lines = out.strip().splitlines()
    report = json.loads(lines[-1]) if lines and proc.returncode == 0 else None
    return report, err


# -- the P6 client: bodies made on the fly ------------------------------------------

_BLOCK = random.Random(6).randbytes(MiB + 64 * 1024)
_PIECES = (65536, 65536, 49999, 16384, 65521)


def pieces(size: int, seed: int) -> t.Iterator[memoryview]:
    """``size`` pseudo-random bytes in pieces of 16-64 KiB (views of _BLOCK)."""
    block = memoryview(_BLOCK)
    offset = seed * 7919 % MiB
    i = 0
    while size > 0:
        n = min(_PIECES[i % len(_PIECES)], size)
        yield block[offset : offset + n]
        offset = (offset + 104729) % MiB
        size -= n
        i += 1


class Upload(t.NamedTuple):
    """One P6 request: its head, its body as it is made, the answer it expects.

    ``expected`` is filled in by ``body`` as it hashes what it yields.
    """

    path: str
    head: dict[str, str]
    chunked: bool
    body: t.Iterator[bytes | memoryview]
    expected: dict[str, t.Any]


def _hashed(data: t.Iterator[memoryview], expected: dict[str, t.Any], key: str) -> t.Iterator[memoryview]:
    """Yield ``data``; then ``expected[key] = [size, sha256]`` of it."""
    digest = hashlib.sha256()
    size = 0
    for piece in data:
        digest.update(piece)
        size += len(piece)
        yield piece
    expected[key] = [size, digest.hexdigest()]


def chunked_upload(size: int) -> Upload:
    """``size`` bytes, sent chunked: the view answers {"size", "sha256"}."""
    hashed: dict[str, t.Any] = {}
    expected: dict[str, t.Any] = {}

    def body() -> t.Iterator[memoryview]:
        yield from _hashed(pieces(size, 1), hashed, "stream")
        expected.update(size=hashed["stream"][0], sha256=hashed["stream"][1])

    return Upload("/stream", {"Transfer-Encoding": "chunked"}, True, body(), expected)


def multipart_upload(size: int, file_size: int) -> Upload:
    """Text fields, the big file part, an attachment filling up to ``size``, a 4 KiB field."""

    def part(name: str, filename: str | None = None) -> bytes:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        extra = "Content-Type: application/octet-stream\r\n" if filename else ""
        return f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n{extra}\r\n".encode()

    first = b"".join(part(k) + FIELDS[k].encode() + b"\r\n" for k in ("title", "tags")) + part("archive", "a.bin")
    second = b"\r\n" + part("attachment", "b.bin")
    last = b"\r\n" + part("comment") + FIELDS["comment"].encode() + f"\r\n--{BOUNDARY}--\r\n".encode()
    rest = size - len(first) - file_size - len(second) - len(last)
    assert rest > 0, "the multipart body is too small for its file part"
    files: dict[str, t.Any] = {}
    expected = {"fields": dict(FIELDS), "files": files}

    def body() -> t.Iterator[bytes | memoryview]:
        yield first
        yield from _hashed(pieces(file_size, 2), files, "archive")
        yield second
        yield from _hashed(pieces(rest, 3), files, "attachment")
        yield last

    head = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}", "Content-Length": str(size)}
    return Upload("/multipart", head, False, body(), expected)


def send(port: int, upload: Upload) -> tuple[float, dict[str, t.Any]]:
    """Stream ``upload`` on a fresh connection; (seconds, the JSON answer)."""
    head = f"POST {upload.path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in upload.head.items()) + "\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        start = time.perf_counter()
        sock.sendall(head.encode())
        for piece in upload.body:
            if upload.chunked:
                sock.sendall(b"%x\r\n" % len(piece))
                sock.sendall(piece)
                sock.sendall(b"\r\n")
            else:
                sock.sendall(piece)
        if upload.chunked:
            sock.sendall(b"0\r\n\r\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        elapsed = time.perf_counter() - start
    status, _, rest = b"".join(chunks).partition(b"\r\n")
    body = rest.partition(b"\r\n\r\n")[2]
    if b" 200 " not in status:
        raise RuntimeError(f"{upload.path}: {status!r} {body[:500]!r}")
    return elapsed, json.loads(body)


def one_upload(mode: str, upload: Upload) -> dict[str, t.Any]:
    """One upload in a fresh server process: peaks and timing."""
    proc, first = start_server(mode)
    try:
        elapsed, answer = send(first["ports"][mode], upload)
    finally:
        report, err = stop_server(proc)
    if report is None:
        raise RuntimeError(f"server {mode} ended badly ({proc.returncode}): {err[-3000:]}")
    if answer != upload.expected:
        raise RuntimeError(f"{mode} {upload.path}: the server saw {answer}, not {upload.expected}")
    return {"idle": first["idle_hwm"], "seconds": elapsed, **report}


def p6(quick: bool) -> list[Row]:
    chunked, multipart, file_size = SIZES[quick]
    cases = [
        (f"P6a chunked {chunked // MiB} MiB, stream.read(64 KiB)", chunked, lambda: chunked_upload(chunked)),
        (
            f"P6b multipart {multipart // MiB} MiB, {file_size // MiB} MiB file part",
            multipart,
            lambda: multipart_upload(multipart, file_size),
        ),
    ]
    rows = []
    for label, size, make in cases:
        off, tee = (one_upload(mode, make()) for mode in ("off", "tee"))
        diff = tee["hwm"] - off["hwm"]
        for mode, result in (("off", off), ("tee", tee)):
            note = (
                f"idle {result['idle'] / MiB:.1f} MiB, upload +{(result['hwm'] - result['idle']) / MiB:.1f} MiB; "
                f"{size / MiB / result['seconds']:.0f} MiB/s"
            )
            if mode == "off":
                rows.append(Row(f"{label}: off (base)", result["hwm"] / MiB, "MiB", 1.0, note=note))
            else:
                note = f"{diff / MiB:+.1f} MiB vs off; {note}"
                rows.append(
                    Row(f"{label}: tee", result["hwm"] / MiB, "MiB", result["hwm"] / off["hwm"],
                        "P6 <=+64 MiB over off", diff <= RSS_BUDGET, note)
                )
    rows[0] = rows[0]._replace(note=f"{rows[0].note}; peak RSS (VmHWM), one upload per fresh process")
    return rows


# -- curl with Expect: 100-continue ---------------------------------------------------


def _curl(curl: str, port: int, path: str, data: str, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [curl, "-s", *extra, "--data-binary", f"@{data}", "-H", "Expect: 100-continue",
           "-H", "Content-Type: application/octet-stream", f"http://127.0.0.1:{port}{path}"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True)


def curl_time(curl: str, port: int, data: str) -> float:
    """One timed curl request: seconds (curl's time_total)."""
    out = _curl(curl, port, "/curl", data, "-o", "/dev/null", "-w", "%{http_code} %{time_total}").stdout
    code, seconds = out.split()
    if code != "200":
        raise RuntimeError(f"curl got {code}")
    return float(seconds)


def curl_rows(quick: bool) -> list[Row]:
    name = "curl 2 MiB POST, Expect: 100-continue"
    budget = f"<={CURL_BUDGET}x plain Flask"
    curl = CURL if os.access(CURL, os.X_OK) else shutil.which("curl")
    if curl is None:
        return [Row(f"{name}: geventctx", 0.0, "ms", None, budget, None, f"skipped: no {CURL} (nor curl on PATH)")]
    rounds = CURL_ROUNDS[quick]
    payload = random.Random(7).randbytes(CURL_SIZE)
    expected = hashlib.sha256(payload).hexdigest()
    fd, data = tempfile.mkstemp(prefix="geventctx-bench-", suffix=".bin")
    samples: dict[str, list[float]] = {"plain": [], "ctx": []}
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        proc, first = start_server("curl")
        try:
            ports = first["ports"]
            for app in samples:  # checked: 100 Continue seen, parent and child got the file
                checked = _curl(curl, ports[app], "/curl?check=1", data, "-v")
                if checked.stdout != f"{expected} {expected}" or "HTTP/1.1 100 Continue" not in checked.stderr:
                    raise RuntimeError(f"curl check of {app}: {checked.stdout!r} {checked.stderr[-2000:]}")
                for _ in range(CURL_WARMUP):
                    curl_time(curl, ports[app], data)
            apps = list(samples)
            for i in range(rounds):
                for app in apps[i % 2 :] + apps[: i % 2]:
                    samples[app].append(curl_time(curl, ports[app], data) * 1000)
        finally:
            report, err = stop_server(proc)
    finally:
        os.unlink(data)
    if report is None:
        raise RuntimeError(f"the curl server ended badly ({proc.returncode}): {err[-3000:]}")
    plain, ctx = statistics.median(samples["plain"]), statistics.median(samples["ctx"])
    paired = statistics.median(a / b for a, b in zip(samples["ctx"], samples["plain"], strict=True))
    return [
        Row(f"{name}: plain Flask (base)", plain, "ms", 1.0,
            note=f"{_spread(samples['plain'])}; {rounds} rounds, curl time_total"),
        Row(f"{name}: geventctx", ctx, "ms", ctx / plain, budget, ctx <= CURL_BUDGET * plain,
            f"{_spread(samples['ctx'])}; per-round ratio median {paired:.3f}x"),
    ]


def _spread(samples: list[float]) -> str:
    """Interquartile range as a percentage of the median."""
    if len(samples) < 2:
        return "IQR n/a"
    q1, _, q3 = statistics.quantiles(samples, n=4)
    return f"IQR ±{(q3 - q1) / 2 / statistics.median(samples) * 100:.1f}%"


def run(quick: bool) -> list[Row]:
    """P6 (four server processes, one upload each), then the curl rows."""
    return p6(quick) + curl_rows(quick)


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"] and len(sys.argv) == 3:
        serve(sys.argv[2])
    else:
        sys.exit("usage: upload.py serve tee|off|curl (run.py drives it)")
