"""pytest plugin for projects that use geventctx (registered as ``pytest11``).

Fixtures:

``geventctx_leakcheck``
    Fails the test if it leaves running hand-offs (children still alive,
    stragglers), request scopes that never finished, other greenlets it
    started, or ``patch()`` on, naming each leaked child's function and
    spawn site. Turn it on for a whole suite with the
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

import gc
import typing as t
import weakref

import gevent
import pytest
from gevent.pywsgi import WSGIServer
from greenlet import greenlet

from . import registry
from .patch import is_patched, unpatch
from .scope import Scope

__all__ = ["live_greenlets"]

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


def live_greenlets() -> list[greenlet]:
    """Started, unfinished greenlets of this thread's hub, gevent's and raw ones.

    Every greenlet of the hub has the hub as its parent, so asking the
    collector who refers to the hub finds them all without walking the
    whole heap.
    """
    hub = gevent.get_hub()
    return [g for g in gc.get_referrers(hub) if isinstance(g, greenlet) and g is not hub and g.parent is hub and g]


@pytest.fixture
def geventctx_leakcheck() -> t.Iterator[None]:
    """Fail the test if it leaves behind running hand-offs (children,
    stragglers), request scopes that never finished, other greenlets it
    started, or :func:`geventctx.patch` switched on.

    Waits up to :data:`GRACE_SECONDS` for things to end by themselves, then
    kills what is left, so that one test's leak does not break the next.
    """
    was_patched = is_patched()
    scopes_before = weakref.WeakSet(Scope.all_open())
    greenlets_before = weakref.WeakSet(live_greenlets())
    yield

    def new_scopes() -> list[Scope]:
        return [s for s in Scope.all_open() if s not in scopes_before and not registry.for_scope(s)]

    def new_greenlets() -> list[greenlet]:
        return [g for g in live_greenlets() if g not in greenlets_before]

    loop = gevent.get_hub().loop
    deadline = loop.now() + GRACE_SECONDS
    gevent.sleep(0)  # raw greenlets only count as started once they ran
    while (registry.live() or new_scopes() or new_greenlets()) and loop.now() < deadline:
        gevent.sleep(0.01)
    leaked, scopes, stray = registry.live(), new_scopes(), new_greenlets()
    problems = [
        f"  child {getattr(r.function, '__qualname__', r.function)} spawned at {r.spawn_site}"
        f" (request {r.scope.label if r.scope else '-'}, alive {r.age:.2f}s)"
        for r in leaked
    ]
    problems += [f"  request scope {scope!r} never finished" for scope in scopes]
    leaked_greenlets = {id(r.greenlet) for r in leaked}
    problems += [f"  greenlet {g!r} still running" for g in stray if id(g) not in leaked_greenlets]
    if is_patched() and not was_patched:
        unpatch()
        problems.append("  geventctx.patch() left on")
    for record in leaked:
        child = record.greenlet
        if child is not None and hasattr(child, "kill"):
            child.kill(block=True, timeout=1)
    for g in stray:
        gevent.kill(g)  # gevent's and raw greenlets alike, thrown from the hub
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
