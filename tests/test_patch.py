"""G9: patch() makes every gevent greenlet inherit its spawner's context."""

from __future__ import annotations

import contextvars
import threading

import gevent
import gevent.pool
import pytest

import geventctx
from geventctx import Scope

user = contextvars.ContextVar("user", default=None)


@pytest.fixture
def patched():
    geventctx.patch()
    yield
    geventctx.unpatch()


def in_context(value, fn):
    def run():
        user.set(value)
        return fn()

    return contextvars.Context().run(run)


def test_unpatched_plain_spawn_sees_nothing():
    assert not geventctx.is_patched()
    assert in_context("alice", lambda: gevent.spawn(user.get).get()) is None


def test_patched_plain_spawn_inherits(patched):
    assert geventctx.is_patched()
    assert in_context("alice", lambda: gevent.spawn(user.get).get()) == "alice"
    assert in_context("bob", lambda: gevent.spawn_later(0, user.get).get()) == "bob"


def test_patched_gevent_pool_map_inherits(patched):
    assert in_context("alice", lambda: gevent.pool.Pool(2).map(lambda _: user.get(), range(3))) == ["alice"] * 3


def test_patched_child_writes_stay_in_child(patched):
    def body():
        def child():
            user.set("child")

        gevent.spawn(child).join()
        return user.get()

    assert in_context("alice", body) == "alice"


def test_explicit_context_is_kept(patched):
    own = contextvars.Context()
    own.run(user.set, "own")

    def body():
        g = gevent.Greenlet(user.get)
        g.gr_context = own
        g.start()
        return g.get()

    assert in_context("alice", body) == "own"


def test_patch_is_visibility_only_it_does_not_pin_the_scope(patched):
    scope = Scope("GET /patched")
    token = scope.enter()
    try:
        g = gevent.spawn(gevent.sleep, 0.01)
        assert scope.holders == 1
    finally:
        Scope.exit(token)
    g.join()
    scope.finish()
    assert scope.closed


def test_idempotent_and_unpatch_restores():
    geventctx.patch()
    geventctx.patch()
    # A second patch() is the first one again, not an undo or a second layer.
    assert geventctx.is_patched()
    assert in_context("alice", lambda: gevent.spawn(user.get).get()) == "alice"
    geventctx.unpatch()
    assert not geventctx.is_patched()
    assert in_context("alice", lambda: gevent.spawn(user.get).get()) is None
    geventctx.unpatch()  # harmless when not patched


@pytest.fixture
def unregistered():
    """This process as if patch() never ran: geventctx's spawn callback out
    of gevent's set. Afterwards as it was (the callback stays registered
    once any patch() ran: see geventctx.patch)."""
    import geventctx.patch as module

    was = module._registered
    gevent.Greenlet.remove_spawn_callback(module._inherit)
    module._registered = False
    try:
        yield module
    finally:
        module._patched = False
        if was or module._registered:
            gevent.Greenlet.add_spawn_callback(module._inherit)
        module._registered = was or module._registered


def test_patch_from_many_threads_at_once(unregistered):
    start = threading.Barrier(8)

    def racer():
        start.wait()
        geventctx.patch()

    threads = [threading.Thread(target=racer) for _ in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert geventctx.is_patched()
    assert in_context("alice", lambda: gevent.spawn(user.get).get()) == "alice"
    # The callback was added once: gevent holds that one function and no
    # second one of geventctx's (without it, patched or not, nothing inherits).
    gevent.Greenlet.remove_spawn_callback(unregistered._inherit)
    try:
        assert geventctx.is_patched()
        assert in_context("alice", lambda: gevent.spawn(user.get).get()) is None
    finally:
        gevent.Greenlet.add_spawn_callback(unregistered._inherit)
    geventctx.unpatch()  # one unpatch undoes the eight patches
    assert not geventctx.is_patched()
    assert in_context("alice", lambda: gevent.spawn(user.get).get()) is None


def test_a_greenlet_started_from_the_hub_never_gets_the_hubs_context(patched, serve):
    # A context variable set while the hub runs (a callback, a timer, a link)
    # must not reach a connection handler the server starts from the hub.
    from flask import Flask
    from httpkit import request as http_request

    app = Flask("hub_bleed")

    @app.get("/who")
    def who() -> str:
        return str(user.get())

    server = serve(app)
    hub = gevent.get_hub()
    hub.loop.run_callback(user.set, "alice")  # runs in the hub, in its context
    gevent.sleep(0)
    assert hub.gr_context is not None and hub.gr_context.get(user) == "alice"
    response = http_request(server.port, "GET", "/who")  # a fresh connection
    assert response is not None and response.body == b"None"
    hub.gr_context.run(user.set, None)


def test_patch_and_unpatch_from_a_thread_never_break_spawns_elsewhere():
    # gevent iterates its spawn callbacks without a lock: toggling them from
    # another thread once raised "set changed size during iteration".
    stop = threading.Event()
    errors: list[BaseException] = []

    def toggler() -> None:
        while not stop.is_set():
            geventctx.patch()
            geventctx.unpatch()

    thread = threading.Thread(target=toggler)
    thread.start()
    try:
        for _ in range(400):
            try:
                gevent.joinall([gevent.spawn(int) for _ in range(100)])
            except RuntimeError as exc:  # pragma: no cover - the bug
                errors.append(exc)
    finally:
        stop.set()
        thread.join(5)
        geventctx.unpatch()
    assert errors == []


def test_the_patch_module_imports_as_a_module_and_still_patches_when_called():
    import geventctx.patch as module

    assert module.unpatch is geventctx.unpatch and callable(module.patch)
    geventctx.patch()
    try:
        assert geventctx.is_patched()
    finally:
        module.unpatch()


# -- G11 under patch(): a plain greenlet of a request that raises ---------------------


def test_a_patched_plain_greenlet_of_a_request_that_raises_is_logged_once_with_the_request(
    patched, serve, capfd, caplog
):
    # gevent.spawn under patch() hands the request's context on without the
    # request's lifetime: its error is still the request's, logged once
    # through geventctx's logger with the request and the spawn line, and
    # not printed by gevent a second time.
    import logging
    import sys

    import flask

    from geventctx.flask import GeventContext

    caplog.set_level(logging.ERROR, logger="geventctx")
    app = flask.Flask(__name__)
    GeventContext(app)

    def explode() -> None:
        raise ValueError("boom-in-plain-greenlet")

    @app.post("/explode")
    def view() -> str:
        line = sys._getframe().f_lineno + 1
        child = gevent.spawn(explode)
        child.join()
        return f"{type(child.exception).__name__} {line}"

    response = serve(app).request("POST", "/explode", body=b"")
    name, line = response.body.decode().split()
    assert response.status == 200 and name == "ValueError"
    records = [r for r in caplog.records if r.name == "geventctx"]
    assert len(records) == 1, [r.getMessage() for r in records]
    message = records[0].getMessage()
    assert "POST /explode" in message and "explode" in message
    assert f"{__file__}:{line}" in message
    assert records[0].exc_info[1].args == ("boom-in-plain-greenlet",)
    assert "boom-in-plain-greenlet" not in capfd.readouterr().err


def test_a_plain_greenlet_outside_any_request_is_still_gevent_s_to_print(patched, capfd, caplog):
    import logging

    from geventctx import errorlog

    errorlog.install()
    caplog.set_level(logging.ERROR, logger="geventctx")

    def explode() -> None:
        raise ValueError("boom-outside")

    gevent.spawn(explode).join()
    assert not [r for r in caplog.records if r.name == "geventctx"]
    assert "boom-outside" in capfd.readouterr().err
