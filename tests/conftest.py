"""Suite-wide fixtures: every test must leave no live hand-off and no patch."""

from __future__ import annotations

import gc
import typing as t

import gevent
import pytest

import geventctx
from geventctx import registry


@pytest.fixture(autouse=True)
def no_leaked_handoffs() -> t.Iterator[None]:
    """Fail a test that leaves running hand-offs or patch() behind."""
    was_patched = geventctx.is_patched()
    yield
    for _ in range(50):
        if not registry.live():
            break
        gevent.sleep(0.01)
    leaked = registry.live()
    patched = geventctx.is_patched() and not was_patched
    if patched:
        geventctx.unpatch()
    for record in leaked:
        child = record.greenlet
        if child is not None:
            child.kill(block=True, timeout=1)
    assert not leaked, "test leaked hand-offs:\n" + "\n".join(map(repr, leaked))
    assert not patched, "test left geventctx.patch() on"


@pytest.fixture
def collect() -> t.Callable[[], None]:
    """Run the hub until idle callbacks fired, then collect garbage."""

    def run() -> None:
        gevent.sleep(0)
        gevent.sleep(0)
        gc.collect()

    return run


@pytest.fixture
def serve() -> t.Iterator[t.Callable[..., t.Any]]:
    """``serve(app)`` starts a real gevent.pywsgi server on 127.0.0.1."""
    from httpkit import Server

    servers: list[Server] = []

    def start(app: t.Any, **kwargs: t.Any) -> Server:
        server = Server(app, **kwargs)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
