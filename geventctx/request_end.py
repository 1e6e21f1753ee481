"""The end of a request: the one path both adapters call.

The rule: a request ends in two moments, each one call here, made by the
Flask extension and the WSGI middleware alike, in the request's own Context:

1. :func:`owner_ended` — the request itself is done (Flask: its last
   teardown call, or its ``stream_with_context`` stream's end; WSGI: the
   response's ``close()``). Its hold on the scope is released: with no
   child left the scope's steps (deferred teardown) run now, and what they
   raise is raised here; else the last holder runs them when it leaves
   (:class:`~geventctx.scope.Scope`, one queue). Children still running
   are watched as stragglers; the scope stops being current.
2. :func:`response_closed` — the server closes the response: its
   ``close()`` becomes the last step, and the body children may still read
   is captured now, never before the response (:mod:`geventctx.body`).

A Flask request that never handed off has no scope and does neither: its
teardown was Flask's own, in place.

.. versionadded:: 0.2
"""

from __future__ import annotations

import typing as t
from contextvars import Token

from . import stragglers
from .body import end_of_response
from .scope import Scope

__all__ = ["owner_ended", "response_closed"]


def owner_ended(
    scope: Scope,
    token: Token[Scope | None] | None,
    straggler_timeout: float | None,
    straggler_policy: str,
    error: BaseException | None = None,
) -> None:
    """The request itself is done: release its hold, watch what outlives
    it, leave the scope (``token``: what entered it). ``error``, the first
    error of the request's own teardown calls run in place, is raised after
    the steps ran (before what they raised)."""
    try:
        try:
            scope.finish()
        except BaseException:
            if error is None:
                raise
        if error is not None:
            raise error
    finally:
        # After the finish: a child spawned by a teardown step counts.
        stragglers.outliving_response(scope, straggler_timeout, straggler_policy)
        if token is not None:
            Scope.exit(token)


def response_closed(scope: Scope, environ: dict[str, t.Any], close: t.Callable[[], t.Any] | None) -> None:
    """The response was written and is being closed (or the app call
    raised): ``close`` is the last step; the body is settled for the
    children that still hold the scope."""
    if close is not None:
        scope.defer(close)
    end_of_response(environ, scope)
