"""Suite-wide fixtures.

Every test is checked for leaks by geventctx's own pytest plugin
(``geventctx_leakcheck = true`` in setup.cfg): a live hand-off, a request
scope that never finished, a greenlet still running, ``patch()`` left on.
"""

from __future__ import annotations

import functools
import gc
import typing as t

import gevent
import pytest


@pytest.fixture
def collect() -> t.Callable[[], None]:
    """Run the hub until idle callbacks fired, then collect garbage."""

    def run() -> None:
        gevent.sleep(0)
        gevent.sleep(0)
        gc.collect()

    return run


@pytest.fixture
def serve(gevent_server: t.Callable[..., t.Any]) -> t.Callable[..., t.Any]:
    """``serve(app)``: geventctx's own ``gevent_server`` fixture (a real
    gevent.pywsgi server on 127.0.0.1, stopped after the test), plus
    ``server.request(...)``, the raw-socket client of httpkit."""
    from httpkit import request

    def start(app: t.Any, **kwargs: t.Any) -> t.Any:
        server = gevent_server(app, **kwargs)
        server.request = functools.partial(request, server.port)
        return server

    return start


@pytest.fixture
def gates() -> t.Iterator[t.Callable[[], t.Any]]:
    """``gates()`` makes a gevent Event the test opens; every one is opened at
    the end, so that no child is left waiting on it."""
    from gevent.event import Event

    made: list[Event] = []

    def make() -> Event:
        event = Event()
        made.append(event)
        return event

    yield make
    for event in made:
        event.set()


@pytest.fixture
def server() -> t.Iterator[t.Callable[..., t.Any]]:
    """``server(argv, **env)``: a real server process (processkit), stopped
    after the test."""
    from processkit import servers

    yield from servers()


@pytest.fixture(scope="session")
def postgres() -> t.Iterator[t.Any]:
    """A private PostgreSQL cluster (pgkit: the Debian ``postgresql``
    package's initdb/pg_ctl, a free port on 127.0.0.1, fsync off), started
    once for the session and stopped after it; skips where initdb is missing.
    Ask it for a database of your own: ``postgres.create_database()``."""
    from pgkit import cluster

    running = cluster()
    try:
        yield running
    finally:
        running.stop()
