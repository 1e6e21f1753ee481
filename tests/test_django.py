"""The Django adapter with real parts (issue 28; DESIGN G16).

tests/djangoapp.py runs as a real server process on 127.0.0.1 — under
gevent.pywsgi after ``patch_all()`` (tests/djangoserver.py) and under
``gunicorn -k gevent`` — over a database of the private PostgreSQL cluster
(the ``postgres`` fixture) through psycopg 3, with ``CONN_MAX_AGE = 0``.
The clients are this process's greenlets on raw sockets (httpkit).

What goes wrong without the adapter (the "before" figures these tests
print): children's connections are never closed, Django's state does not
reach children (asgiref 3.12+) or leaks back from them (3.8), and body
consumers racing above the stream get ``RawPostDataException`` or an
empty ``POST``.
"""

from __future__ import annotations

import sys
import time
import typing as t

import gevent.pool
import pytest
from httpkit import Response, multipart, wait_for
from httpkit import request as http_request
from pgkit import Cluster, backends
from processkit import ServerProcess, executable

pytest.importorskip("django")

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX server processes")

REQUESTS = 20
CHILDREN = 4
SETTLE = 10.0


def argv_for(kind: str) -> list[str]:
    if kind == "pywsgi":
        return [sys.executable, "tests/djangoserver.py"]
    return [executable("gunicorn"), "-k", "gevent", "-w", "1", "-b", "127.0.0.1:{port}",
            "--pythonpath", "tests", "djangoapp:application"]


def start(server: t.Callable[..., ServerProcess], kind: str, db: str = "", adapter: bool = True,
          **env: str) -> ServerProcess:
    return t.cast(ServerProcess, server(argv_for(kind), DJANGOAPP_DB=db, DJANGOAPP_ADAPTER="1" if adapter else "0",
                                        PYTHONPATH="tests:.", **env))


def call(proc: ServerProcess, method: str, path: str, **kwargs: t.Any) -> Response:
    response = http_request(proc.port, method, path, **kwargs)
    assert response is not None, proc.context()
    assert response.status == 200, f"{method} {path}: {response.status} {response.body[:600]!r}{proc.context()}"
    return response


def database(postgres: Cluster) -> str:
    name = postgres.create_database("django")
    return f"{name}:{postgres.port}"


def run_load(proc: ServerProcess, path: str, concurrency: int = 10) -> None:
    pool = gevent.pool.Pool(concurrency)
    responses = pool.map(lambda _: call(proc, "GET", path), range(REQUESTS))
    assert len(responses) == REQUESTS


def open_backends(postgres: Cluster, db: str) -> int:
    return backends(postgres, db.rsplit(":", 1)[0]).total


# -- connections: each greenlet closes its own --------------------------------------------


@pytest.mark.parametrize("kind", ["pywsgi", "gunicorn"])
def test_no_connection_is_left_open_after_requests_whose_children_queried(
    kind: str, server: t.Any, postgres: Cluster
) -> None:
    db = database(postgres)
    proc = start(server, kind, db)
    run_load(proc, f"/db?children={CHILDREN}&thread=1")
    try:
        wait_for(lambda: open_backends(postgres, db) == 0, SETTLE, "every backend closed")
    except AssertionError:
        pass
    left = open_backends(postgres, db)
    print(f"{kind}, geventctx.django: {left} backends open after {REQUESTS} requests x {CHILDREN} children")
    assert left == 0, f"{backends(postgres, db.rsplit(':', 1)[0]).states}{proc.context()}"
    assert "Traceback" not in proc.output(), proc.context()


def test_without_the_adapter_children_leave_their_connections_open(server: t.Any, postgres: Cluster) -> None:
    # The "before" figure: Django's own handler closes only the view's
    # connections (request_finished runs in the view's greenlet).
    db = database(postgres)
    proc = start(server, "pywsgi", db, adapter=False)
    run_load(proc, f"/db?children={CHILDREN}")
    time.sleep(1.0)  # the fire-and-forget children ended long since (0.2 s)
    left = open_backends(postgres, db)
    print(f"pywsgi, Django's own handler: {left} backends open after {REQUESTS} requests x {CHILDREN} children")
    assert left > 0


def needs_djangos_pool() -> None:
    import django

    pytest.importorskip("psycopg_pool")
    if django.VERSION < (5, 1):
        pytest.skip("Django's connection pool is new in Django 5.1")


@pytest.mark.parametrize("kind", ["pywsgi", "gunicorn"])
def test_djangos_connection_pool_stays_healthy_when_children_query(
    kind: str, server: t.Any, postgres: Cluster
) -> None:
    needs_djangos_pool()
    db = database(postgres)
    proc = start(server, kind, db, DJANGOAPP_POOL="1")
    # Sized so the pool suffices when each greenlet gives its connection
    # back: 2 requests at once, each the view and 4 children. (No ThreadPool
    # task here: on gevent 23.9, the floor, a connection given back from a
    # ThreadPool thread did not wake a greenlet waiting for the pool, and
    # the wait timed out; thread tasks' connections are counted above.)
    run_load(proc, f"/db?children={CHILDREN}&linger=0.05", concurrency=2)

    def healthy() -> bool:
        stats = call(proc, "GET", "/pool").json()
        return bool(stats["pool_available"] == stats["pool_size"] and not stats.get("requests_waiting"))

    try:
        wait_for(healthy, SETTLE, "every pooled connection back")
    except AssertionError:
        pass
    stats = call(proc, "GET", "/pool").json()
    assert stats["pool_available"] == stats["pool_size"], f"{stats}{proc.context()}"
    assert not stats.get("requests_errors"), f"{stats}{proc.context()}"
    assert "couldn't get a connection" not in proc.output(), proc.context()
    assert open_backends(postgres, db) <= 16
    call(proc, "GET", f"/db?children={CHILDREN}")  # and it serves on


def test_without_the_adapter_djangos_pool_runs_dry(server: t.Any, postgres: Cluster) -> None:
    # The "before" figure: children never give their pooled connection back.
    needs_djangos_pool()
    db = database(postgres)
    proc = start(server, "pywsgi", db, adapter=False, DJANGOAPP_POOL="1")
    pool = gevent.pool.Pool(2)
    path = f"/db?children={CHILDREN}&linger=0.05"
    statuses = pool.map(lambda _: t.cast(Response, http_request(proc.port, "GET", path)).status, range(REQUESTS))
    failed_children = proc.output().count("couldn't get a connection")
    print(f"pywsgi, Django's own handler, pool of 16: {sum(s != 200 for s in statuses)} of {REQUESTS} views failed, "
          f"{failed_children} pool timeouts logged")
    assert any(status != 200 for status in statuses) or failed_children


@pytest.mark.parametrize("adapter", [True, False], ids=["geventctx.django", "django"])
def test_each_child_closes_the_cache_clients_it_opened(adapter: bool, server: t.Any) -> None:
    proc = start(server, "pywsgi", adapter=adapter)
    for _ in range(10):
        assert call(proc, "GET", "/cache?children=3").json() == {"seen": [1, 1, 1]}
    stats = call(proc, "GET", "/cache-stats").json()
    label = "geventctx.django" if adapter else "Django"
    print(f"{label}: cache clients made {stats['made']}, closed {stats['closed']}")
    if adapter:
        # The view's and each child's own: one made and closed per greenlet.
        assert stats["made"] == stats["closed"] == 10 * 4, stats
    else:
        import asgiref

        if tuple(int(part) for part in asgiref.__version__.split(".")[:2]) >= (3, 12):
            assert stats["closed"] < stats["made"], stats  # children's own, never closed
        else:
            assert stats["made"] == 10, stats  # children used the view's client


# -- Django's state follows the view --------------------------------------------------------


@pytest.mark.parametrize("kind", ["pywsgi", "gunicorn"])
def test_a_child_sees_the_views_language_timezone_prefix_and_urlconf_and_keeps_its_changes(
    kind: str, server: t.Any
) -> None:
    proc = start(server, kind)
    got = call(proc, "GET", "/state").json()
    view = got["view"]
    assert view["language"] == "de" and view["timezone"] == "Europe/Berlin"
    assert view["prefix"] == "/mount/" and view["reverse"] == "/mount/state"
    child = got["child"]
    for seen in (child["seen"], got["sibling"], got["thread"]):
        assert {k: seen[k] for k in ("language", "timezone", "prefix", "reverse", "urlconf")} == {
            k: view[k] for k in ("language", "timezone", "prefix", "reverse", "urlconf")
        }, got
    # What the child changed is its own (and its grandchild's) ...
    assert child["after"]["language"] == "fr" and child["after"]["timezone"] == "Asia/Tokyo"
    assert child["after"]["prefix"] == "/child/"
    assert child["grandchild"]["language"] == "fr" and child["grandchild"]["prefix"] == "/child/"
    # ... never the view's, nor a later sibling's.
    assert got["view_after"] == view
    assert got["alt_urlconf"] == "alt"
    # Cache clients are never shared with the view.
    assert child["seen"]["cache"] != view["cache"] and got["sibling"]["cache"] != view["cache"]


def test_without_the_adapter_a_childs_django_state_is_wrong_on_this_asgiref(server: t.Any) -> None:
    # The "before" figure, for the asgiref installed: 3.12+ hides the view's
    # state from its children; 3.8 lets a child's activate() change the
    # view's; 3.9-3.11 hand the view's cache clients to its children.
    import asgiref

    proc = start(server, "pywsgi", adapter=False)
    got = call(proc, "GET", "/state").json()
    version = tuple(int(part) for part in asgiref.__version__.split(".")[:2])
    print(f"asgiref {asgiref.__version__}, Django's own handler: view {got['view']}, child saw {got['child']['seen']}")
    if version >= (3, 12):
        assert got["child"]["seen"]["language"] != "de" and got["child"]["seen"]["prefix"] != "/mount/"
    elif version <= (3, 8):
        assert got["view_after"]["language"] == "fr"
    else:
        assert got["child"]["seen"]["cache"] == got["view"]["cache"]


# -- the body: one consumer at a time -------------------------------------------------------

FORM = b"name=ada&city=london"
FIELDS = {"name": "ada", "city": "london"}


def _trickled(proc: ServerProcess, order: str, body: bytes, content_type: str) -> t.Any:
    # In 10 pieces over 0.2 s: each consumer starts while the body arrives.
    return call(proc, "POST", f"/body?order={order}", body=body,
                headers={"Content-Type": content_type}, piece=max(1, len(body) // 10), delay=0.02).json()


@pytest.mark.parametrize("kind", ["pywsgi", "gunicorn"])
def test_body_consumers_racing_get_what_django_gives_them_one_after_another(kind: str, server: t.Any) -> None:
    proc = start(server, kind)
    form = "application/x-www-form-urlencoded"
    # View reads body while a child parses POST: never RawPostDataException.
    got = _trickled(proc, "body-post", FORM, form)
    assert got == {"view": {"body": len(FORM)}, "child": {"post": FIELDS, "files": []}}
    # View parses POST while a child reads body: never an empty POST.
    got = _trickled(proc, "post-body", FORM, form)
    assert got == {"view": {"post": FIELDS, "files": []}, "child": {"body": len(FORM)}}
    # Multipart: the child parsing first, the view reading body: what Django
    # gives body after a multipart parse (RawPostDataException), never a torn parse.
    data, content_type = multipart({"name": "ada"}, {"upload": ("a.txt", b"x" * 5000)})
    got = _trickled(proc, "body-post", data, content_type)
    assert got["child"] == {"post": {"name": "ada"}, "files": ["upload"]} or got["view"] == {"body": len(data)}, got
    assert "error" not in got["child"], got


# -- warnings where the trap is visible -----------------------------------------------------


def test_django_imported_before_patch_all_is_warned_about(server: t.Any) -> None:
    proc = start(server, "pywsgi", DJANGOAPP_EARLY="1")
    call(proc, "GET", "/ping")
    wait_for(lambda: "MisuseWarning" in proc.output(), 5.0, "the warning")
    assert "imported before gevent.monkey.patch_all()" in proc.output(), proc.context()


def test_an_asyncio_loop_visible_from_a_request_is_warned_about(server: t.Any) -> None:
    proc = start(server, "pywsgi")
    call(proc, "GET", "/ping")
    assert "MisuseWarning" not in proc.output(), proc.context()
    call(proc, "GET", "/asyncio?seconds=1.5")
    time.sleep(0.2)
    call(proc, "GET", "/ping")
    wait_for(lambda: "MisuseWarning" in proc.output(), 5.0, "the warning")
    assert "asyncio event loop is running" in proc.output(), proc.context()
