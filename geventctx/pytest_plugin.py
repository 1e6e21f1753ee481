"""pytest plugin for projects that use geventctx (registered as ``pytest11``).

Fixtures:

``geventctx_leakcheck``
    Fails the test if it leaves running hand-offs (children still alive,
    stragglers) or request scopes that never finished, naming each leaked
    child's function and spawn site. Turn it on for a whole suite with the
    ini option ``geventctx_leakcheck = true``, or per test with
    ``@pytest.mark.geventctx_leakcheck``.
``gevent_server``
    ``gevent_server(app)`` serves a WSGI app with ``gevent.pywsgi`` on
    127.0.0.1 (a free port) for the test; returns the server, with ``.url``.

Options:

``geventctx_strict = true`` (ini) or ``--geventctx-strict``
    Turn :class:`geventctx.SessionMutationWarning`, :class:`LateEffectWarning`
    and every other :class:`geventctx.GeventctxWarning` into errors.

.. versionadded:: 0.1
"""

from __future__ import annotations

import typing as t

import gevent
import pytest
from gevent.pywsgi import WSGIServer

from . import registry
from .scope import Scope

__all__ = ["leaked_handoffs", "unfinished_scopes"]

#: How long the leak check lets children finish before it calls them leaked.
GRACE_SECONDS = 1.0


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("geventctx")
    group.addoption("--geventctx-strict", action="store_true", help="turn geventctx warnings into errors")
    parser.addini("geventctx_strict", "turn geventctx warnings into errors", type="bool", default=False)
    parser.addini("geventctx_leakcheck", "fail tests that leak hand-offs or request scopes", type="bool", default=False)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "geventctx_leakcheck: fail the test if it leaks hand-offs or request scopes")
    if config.getoption("--geventctx-strict") or config.getini("geventctx_strict"):
        config.addinivalue_line("filterwarnings", "error::geventctx.GeventctxWarning")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    whole_suite = config.getini("geventctx_leakcheck")
    for item in items:
        if whole_suite or item.get_closest_marker("geventctx_leakcheck"):
            item.fixturenames.insert(0, "geventctx_leakcheck")  # type: ignore[attr-defined]


def leaked_handoffs(grace: float = GRACE_SECONDS) -> list[registry.HandOff]:
    """Live hand-offs still running after ``grace`` seconds of letting them end."""
    deadline = gevent.get_hub().loop.now() + grace
    while registry.live() and gevent.get_hub().loop.now() < deadline:
        gevent.sleep(0.01)
    return registry.live()


def unfinished_scopes(since: set[int]) -> list[Scope]:
    """Request scopes created since ``since`` (ids) that never closed."""
    return [scope for scope in Scope.all_open() if id(scope) not in since]


@pytest.fixture
def geventctx_leakcheck() -> t.Iterator[None]:
    """Fail the test if it leaves running hand-offs or unfinished request scopes."""
    before = {id(scope) for scope in Scope.all_open()}
    yield
    leaked = leaked_handoffs()
    scopes = [scope for scope in unfinished_scopes(before) if not registry.for_scope(scope)]
    problems = [
        f"  child {getattr(r.function, '__qualname__', r.function)} spawned at {r.spawn_site}"
        f" (request {r.scope.label if r.scope else '-'}, alive {r.age:.2f}s)"
        for r in leaked
    ]
    problems += [f"  request scope {scope!r} never finished" for scope in scopes]
    for record in leaked:  # do not let one test's leak break the next test
        child = record.greenlet
        if child is not None and hasattr(child, "kill"):
            child.kill(block=True, timeout=1)
    if problems:
        pytest.fail("geventctx: the test leaked\n" + "\n".join(problems), pytrace=False)


class _Server:
    def __init__(self, app: t.Any, **kwargs: t.Any) -> None:
        kwargs.setdefault("log", None)
        self.server = WSGIServer(("127.0.0.1", 0), app, **kwargs)
        self.server.start()
        self.port: int = self.server.server_port
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self, timeout: float = 5) -> None:
        self.server.stop(timeout=timeout)


@pytest.fixture
def gevent_server() -> t.Iterator[t.Callable[..., _Server]]:
    """``gevent_server(app)``: serve ``app`` on 127.0.0.1 until the test ends."""
    servers: list[_Server] = []

    def start(app: t.Any, **kwargs: t.Any) -> _Server:
        server = _Server(app, **kwargs)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
