"""`make demo`: geventctx in action, printed as a short report.

Each section runs real code and prints what the children saw. The script
exits non-zero if anything it shows did not happen as claimed.
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import os
import sys
import time

import gevent
import gevent.pool
from gevent import socket
from gevent.pywsgi import WSGIServer

import geventctx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import app as example  # noqa: E402  (examples/app.py)

request_id = contextvars.ContextVar("request_id", default="<none>")
failures: list[str] = []


def check(label: str, got: object, want: object) -> None:
    ok = got == want
    print(f"  {'ok ' if ok else 'BAD'} {label}: {got!r}")
    if not ok:
        failures.append(f"{label}: got {got!r}, want {want!r}")


def section_handoff() -> None:
    print("\n1. A child sees its spawner's contextvars (a snapshot at spawn)")
    request_id.set("req-42")
    check("plain gevent.spawn sees", gevent.spawn(request_id.get).get(), "<none>")
    check("geventctx.spawn sees", geventctx.spawn(request_id.get).get(), "req-42")

    def child_writes() -> str:
        request_id.set("child's own")
        return request_id.get()

    check("child's write, in the child", geventctx.spawn(child_writes).get(), "child's own")
    check("child's write, in the parent", request_id.get(), "req-42")


def section_pool() -> None:
    print("\n2. Pools: every worker of Pool.map runs in the caller's context")
    request_id.set("req-43")
    pool = geventctx.Pool(2)
    check("geventctx.Pool(2).map sees", pool.map(lambda i: f"{i}:{request_id.get()}", range(3)),
          ["0:req-43", "1:req-43", "2:req-43"])
    check("gevent.pool.Pool(2).map sees", gevent.pool.Pool(2).map(lambda i: request_id.get(), range(2)),
          ["<none>", "<none>"])


def section_patch() -> None:
    print("\n3. patch(): plain gevent.spawn inherits too (visibility only)")
    request_id.set("req-44")
    geventctx.patch()
    try:
        check("patched gevent.spawn sees", gevent.spawn(request_id.get).get(), "req-44")
    finally:
        geventctx.unpatch()
    check("after unpatch(), gevent.spawn sees", gevent.spawn(request_id.get).get(), "<none>")


def http(
    port: int, method: str, path: str, headers: dict[str, str], body: bytes = b"", piece: int = 0
) -> tuple[int, dict[str, str], bytes]:
    """A tiny raw-socket HTTP/1.1 client that can trickle the body."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        head = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close", f"Content-Length: {len(body)}"]
        head += [f"{k}: {v}" for k, v in headers.items()]
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        step = piece or max(len(body), 1)
        for i in range(0, len(body), step):
            sock.sendall(body[i : i + step])
            if piece:
                gevent.sleep(0.002)
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    finally:
        sock.close()
    head_bytes, _, payload = raw.partition(b"\r\n\r\n")
    lines = head_bytes.decode("latin-1").split("\r\n")
    found = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), found, payload


def wait_idle(timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while geventctx.registry.live() and time.monotonic() < deadline:
        gevent.sleep(0.01)
    gevent.sleep(0.05)


def section_flask() -> None:
    print("\n4. Flask under gevent.pywsgi on 127.0.0.1: background work sees the request")
    server = WSGIServer(("127.0.0.1", 0), example.create_app(), log=None)
    server.start()
    try:
        port = server.server_port
        payload = json.dumps({"order": 7, "items": ["tea"] * 2000}).encode()
        sent = hashlib.sha256(payload).hexdigest()[:12]
        print(f"  client: POST /upload, {len(payload)} bytes trickled in 4 KiB pieces, sha256 {sent}")
        status, _, body = http(port, "POST", "/upload",
                               {"Content-Type": "application/json", "X-User": "alice", "X-Request-Id": "req-7"},
                               payload, piece=4096)
        answered = time.monotonic() - example.START
        print(f"  response {status} at {answered:.3f}s: {body.decode().strip()}")
        wait_idle()
        events = [e for e in example.EVENTS if e[1] == "req-7"]
        for when, _, what, detail in events:
            print(f"    {when:7.3f}s  {what:20s} {detail if detail is not None else ''}")
        children = [d for _, _, what, d in events if what == "child"]
        check("children that ran", len(children), 3)
        check("children that saw user alice and request req-7",
              sum(c["user"] == "alice" and c["request_id"] == "req-7" for c in children), 3)
        check("distinct body digests (parent, 3 children, client)",
              sorted({c["sha256"] for c in children} | {json.loads(body)["sha256"], sent}), [sent])
        check("children's own app contexts torn down",
              sum(what == "child's teardown_appcontext" for _, _, what, _ in events), 3)
        order = [what for _, _, what, _ in events if what not in ("child", "child's teardown_appcontext")]
        check("teardown order", order, ["view returns", "teardown_request", "teardown_appcontext"])
        last_child = max(when for when, _, what, _ in events if what == "child")
        teardown = next(when for when, _, what, _ in events if what == "teardown_request")
        check("teardown ran after the last child, response before it",
              (answered < last_child <= teardown), True)

        print("\n5. A child writes the session after the response was saved")
        status, headers, _ = http(port, "GET", "/late-session", {"X-Request-Id": "req-8"})
        wait_idle()
        warned = [d for _, rid, what, d in example.EVENTS if rid == "req-8" and what == "warning"]
        print(f"  response {status}, Set-Cookie: {headers.get('set-cookie', '(none)')}")
        for text in warned:
            print(f"    {text[:150]}")
        check("late session write warned", len(warned), 1)
    finally:
        server.stop(timeout=2)


def section_cost() -> None:
    print("\n6. What it costs: spawn+join, interleaved rounds (make bench for the full table)")

    def fn() -> str:  # the smallest realistic child: a Python function
        return request_id.get()

    def bare(n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            gevent.spawn(fn).join()
        return time.perf_counter() - t0

    def handoff(n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            geventctx.spawn(fn).join()
        return time.perf_counter() - t0

    bare(2000), handoff(2000)  # warm up
    rounds = []
    for _ in range(9):
        b = bare(3000)
        rounds.append((handoff(3000) / b, b))
    rounds.sort()
    ratio, b = rounds[len(rounds) // 2]
    extra = (ratio - 1) * b / 3000 * 1e6
    print(f"  geventctx.spawn / gevent.spawn: {ratio:.2f}x, +{extra:.1f} µs per spawn "
          "(median of 9 rounds; budget 1.2x)")


def main() -> int:
    print("geventctx demo")
    for section in (section_handoff, section_pool, section_patch, section_flask, section_cost):
        contextvars.Context().run(section)
    print()
    if failures:
        print("FAILED:\n  " + "\n  ".join(failures))
        return 1
    print("All demonstrated behaviour checked.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
