"""pytest plugin for Flask's own test suite (``make test-flask-suite``).

Loaded in both runs of the suite, so that they differ in one thing only:

- every test function runs in a fresh ``contextvars`` copy (nothing one
  test leaves in the context reaches the next), in both runs;
- with ``GEVENTCTX_FLASK_SUITE_PATCH=1``, ``gevent.monkey.patch_all()`` runs
  first;
- with ``GEVENTCTX_FLASK_SUITE=1``, :class:`geventctx.flask.GeventContext`
  is applied at the end of every ``Flask.__init__`` (once per app, also for
  subclasses), so every app the suite builds has the extension.
"""

from __future__ import annotations

import contextvars
import os
import typing as t

import pytest

APPLY = os.environ.get("GEVENTCTX_FLASK_SUITE") == "1"
#: ``GEVENTCTX_FLASK_SUITE_PATCH=1``: ``gevent.monkey.patch_all()`` first, as
#: a gevent application runs.
PATCH = os.environ.get("GEVENTCTX_FLASK_SUITE_PATCH") == "1"
_applied = [0]

if PATCH:
    from gevent import monkey

    monkey.patch_all()

if APPLY:
    import flask

    from geventctx.flask import GeventContext

    _original_init = flask.Flask.__init__

    def _init_with_geventctx(self: flask.Flask, *args: t.Any, **kwargs: t.Any) -> None:
        _original_init(self, *args, **kwargs)
        if "geventctx" not in self.extensions:  # the outermost __init__ only
            GeventContext(self)
            _applied[0] += 1

    flask.Flask.__init__ = _init_with_geventctx  # type: ignore[method-assign]


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool:
    function = pyfuncitem.obj
    arguments = {name: pyfuncitem.funcargs[name] for name in pyfuncitem._fixtureinfo.argnames}
    contextvars.copy_context().run(function, **arguments)
    return True


def pytest_report_header(config: pytest.Config) -> str:
    return f"geventctx flask-suite plugin: GeventContext on every app = {APPLY}, patch_all = {PATCH}"


def pytest_terminal_summary(terminalreporter: t.Any) -> None:
    if APPLY:
        terminalreporter.write_line(f"geventctx: GeventContext applied to {_applied[0]} apps")
