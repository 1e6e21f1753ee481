"""The deployment recipes in examples/, each run as a real server process (G9, G12).

Every test starts a server as a subprocess on a free port of 127.0.0.1, drives
it with a fixed handful of requests over stdlib ``http.client`` (this process
is not monkey-patched; it only talks to another process), and stops it,
whatever happens. The server's output goes to a temporary file that failing
assertions include.

The Flask recipes (pywsgi, gunicorn, uWSGI) and the Werkzeug one expose
``POST /work``, whose children (``geventctx.spawn``) wait until
``POST /release/<id>``, so they run after the response was sent, and
``GET /report/<id>``: what the children saw and when teardown ran. The
release requests carry an id, a user and a body of their own, so a child
that saw another request's data would report it.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import random
import subprocess
import sys
import time
import typing as t
from pathlib import Path

import pytest
from processkit import HOST, ServerProcess, executable

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX process groups and signals")

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
HTTP_TIMEOUT = 10.0
CHILDREN = 3


# -- client --------------------------------------------------------------------------


class Client:
    """Stdlib HTTP/1.1 client; ``keepalive`` reuses one connection."""

    def __init__(self, srv: ServerProcess, keepalive: bool = True) -> None:
        self.srv = srv
        self.keepalive = keepalive
        self.conn: http.client.HTTPConnection | None = None

    def request(
        self, method: str, path: str, headers: dict[str, str] | None = None, body: bytes | None = None
    ) -> tuple[int, bytes]:
        if self.conn is None or not self.keepalive:
            if self.conn is not None:
                self.conn.close()
            self.conn = http.client.HTTPConnection(HOST, self.srv.port, timeout=HTTP_TIMEOUT)
        try:
            self.conn.request(method, path, body=body, headers=headers or {})
            response = self.conn.getresponse()
            return response.status, response.read()
        except OSError as exc:
            pytest.fail(f"{method} {path}: {exc!r}{self.srv.context()}")

    def json(self, method: str, path: str, **kwargs: t.Any) -> t.Any:
        status, body = self.request(method, path, **kwargs)
        assert status == 200, f"{method} {path}: {status} {body[:500]!r}{self.srv.context()}"
        return json.loads(body)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_requests(tag: str, count: int = 3) -> list[tuple[str, str, bytes]]:
    """(request id, user, body): distinct bodies, larger than one socket read."""
    rng = random.Random(tag)
    return [(f"{tag}-{i}", f"user-{tag}-{i}", rng.randbytes(150_000 + 1000 * i)) for i in range(count)]


Result = t.Tuple[str, str, bytes, t.Dict[str, t.Any]]  # request id, user, body, final report


def drive_work(client: Client, tag: str, teardown_keys: tuple[str, ...]) -> list[Result]:
    """POST /work for a few requests, check the deferral, release, return the final reports."""
    srv = client.srv
    requests = make_requests(tag)
    for rid, user, body in requests:
        answer = client.json("POST", "/work", headers={"X-Request-Id": rid, "X-User": user}, body=body)
        assert answer["request_id"] == rid, srv.context()

    # Every response came back while its children still wait: the response
    # is not delayed by them, and teardown has not run yet.
    for rid, _user, _body in requests:
        report = client.json("GET", f"/report/{rid}")
        assert report["children"] == [], f"{report}{srv.context()}"
        for key in teardown_keys:
            assert report[key] == [], f"teardown ran before the children ended: {report}{srv.context()}"

    # Release each request's children from a request of its own, with an id,
    # a user and a body that no child of /work may ever see.
    for rid, _user, _body in requests:
        client.json(
            "POST", f"/release/{rid}", headers={"X-Request-Id": f"intruder-{rid}", "X-User": "mallory"},
            body=b"not your body" * 1000,
        )

    results = []
    deadline = time.monotonic() + 10  # for all of them together
    for rid, user, body in requests:
        while True:
            report = client.json("GET", f"/report/{rid}")
            if all(report[key] for key in teardown_keys) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        results.append((rid, user, body, report))
    return results


def check_reports(
    srv: ServerProcess, results: list[Result], child_keys: dict[str, t.Any], teardown_keys: tuple[str, ...]
) -> None:
    """Each child saw its own request, complete body; each teardown ran once, after them."""
    for rid, user, body, report in results:
        context = f"\nreport of {rid}: {json.dumps(report, indent=1)}{srv.context()}"
        assert len(report["children"]) == CHILDREN, context
        for seen in report["children"]:
            assert "error" not in seen, context
            expected = {"user": user, "request_id": rid, "sha256": sha256(body), "length": len(body)}
            expected.update({key: value(rid) for key, value in child_keys.items()})
            assert {key: seen[key] for key in expected} == expected, context
        for key in teardown_keys:
            # once, and only after all the children had ended
            assert report[key] == [CHILDREN], context


FLASK_TEARDOWN = ("teardown_request", "teardown_appcontext")


def check_flask_recipe(srv: ServerProcess, keepalive: bool = True) -> None:
    client = Client(srv, keepalive=keepalive)
    try:
        results = drive_work(client, f"p{srv.port}", FLASK_TEARDOWN)
        check_reports(srv, results, {"header": lambda rid: rid}, FLASK_TEARDOWN)
        hows = sorted(seen["how"] for seen in results[0][3]["children"])
        assert hows == ["get_data", "get_data", "stream"], srv.context()
        # Still exactly once, now that everything is quiet.
        for rid, _user, _body, report in results:
            assert client.json("GET", f"/report/{rid}") == report, srv.context()
    finally:
        client.close()


# -- the recipes ------------------------------------------------------------------------


def uwsgi() -> str:
    path = executable("uwsgi")
    try:
        usage = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"uwsgi does not run here: {exc!r}")
    if "--gevent " not in usage:
        pytest.skip("this uwsgi was built without the gevent loop engine (no --gevent option)")
    return path


def test_pywsgi_server_recipe(server: t.Callable[..., ServerProcess]) -> None:
    """examples/pywsgi_server.py: patch_all + WSGIServer; children after the response, teardown once after them."""
    srv = server([sys.executable, "-m", "examples.pywsgi_server", "{port}"])
    check_flask_recipe(srv)


def test_gunicorn_gevent_worker_recipe(server: t.Callable[..., ServerProcess]) -> None:
    """examples/gunicorn_app.py under gunicorn's gevent worker, configured by examples/gunicorn.conf.py."""
    srv = server([executable("gunicorn"), "-c", "examples/gunicorn.conf.py", "examples.gunicorn_app:app"])
    check_flask_recipe(srv)


@pytest.mark.parametrize(
    "server_kind, switched_on",
    [("gunicorn", True), ("gunicorn", False), ("uwsgi", True)],
    ids=["gunicorn-GEVENTCTX_PATCH=1", "gunicorn-unset", "uwsgi-GEVENTCTX_PATCH=1"],
)
def test_patch_switch_on_without_code_changes(
    server: t.Callable[..., ServerProcess], server_kind: str, switched_on: bool
) -> None:
    """examples/patched_app.py (no geventctx code, plain gevent.spawn) under gunicorn -k gevent
    (and uWSGI with --gevent-early-monkey-patch): GEVENTCTX_PATCH=1 alone makes the children
    see the request, g, the request-id contextvar and log with it; unset, they see nothing."""
    env = {"GEVENTCTX_PATCH": "1"} if switched_on else {}
    if server_kind == "gunicorn":
        argv = [executable("gunicorn"), "-c", "examples/gunicorn.conf.py", "examples.patched_app:app"]
    else:
        argv = [uwsgi(), "--ini", "examples/uwsgi.ini", "--module", "examples.patched_app:app"]
    srv = server(argv, **env)
    client = Client(srv, keepalive=server_kind == "gunicorn")
    try:
        answers = []
        for rid, user, body in make_requests(f"patch{int(switched_on)}", count=2):
            answer = client.json("POST", "/work", headers={"X-Request-Id": rid, "X-User": user}, body=body)
            answers.append((rid, user, body, answer))
    finally:
        client.close()
    srv.stop()  # flush the worker's log lines
    log = srv.output()
    for rid, user, body, answer in answers:
        context = f"\nanswer for {rid}: {answer}{srv.context()}"
        assert len(answer["children"]) == CHILDREN, context
        for n, seen in enumerate(answer["children"]):
            if switched_on:
                assert seen == {"request_id": rid, "user": user, "header": rid, "sha256": sha256(body)}, context
                assert f"[{rid}] child {n} saw user {user}" in log, context
            else:
                assert seen["request_id"] == "-", context
                assert "outside of" in seen["error"], context
    if not switched_on:
        assert "[-] child 0 saw user ?" in log, srv.context()
        assert not any(f"[{rid}]" in log for rid, *_ in answers), srv.context()


def test_uwsgi_gevent_mode_recipe(server: t.Callable[..., ServerProcess]) -> None:
    """examples/uwsgi_app.py with examples/uwsgi.ini: uWSGI's gevent loop, one worker under a master."""
    srv = server([uwsgi(), "--ini", "examples/uwsgi.ini"])
    check_flask_recipe(srv, keepalive=False)  # uWSGI's http-socket closes after each response


def test_uwsgi_default_env_behavior_is_safe_too(server: t.Callable[..., ServerProcess]) -> None:
    """By default ("cheat") uWSGI reuses one environ dict per async core for the next
    request: a child reading request.headers after the response would read a later
    request's headers. geventctx gives the app a private copy of the environ under
    uWSGI, so children see only their own request even without wsgi-env-behavior=holy."""
    srv = server([uwsgi(), "--ini", "examples/uwsgi.ini", "--wsgi-env-behavior", "cheat"])
    check_flask_recipe(srv, keepalive=False)


def test_werkzeug_app_in_context_middleware(server: t.Callable[..., ServerProcess]) -> None:
    """examples/werkzeug_app.py: Request.application in ContextMiddleware on pywsgi; the
    response's close() (call_on_close) runs once, after every child."""
    srv = server([sys.executable, "-m", "examples.werkzeug_app", "{port}"])
    client = Client(srv)
    try:
        results = drive_work(client, f"w{srv.port}", ("teardown",))
        check_reports(srv, results, {}, ("teardown",))
        assert sorted(seen["how"] for seen in results[0][3]["children"]) == ["get_data", "get_data", "stream"]
    finally:
        client.close()
