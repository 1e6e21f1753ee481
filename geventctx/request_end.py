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
   ``close()`` becomes the last step; then :func:`after_response`, the
   adapter's ``after`` hook of :class:`~geventctx.isolation.IsolatedApp`,
   outside the request's Context (it may wait): the body children may still
   read is captured now, never before the response (:mod:`geventctx.body`).

And one moment of each child that held the request:

3. :func:`child_ended` — a child ended, in its own greenlet (its result is
   recorded: whoever joins it does not wait for what follows). Its hold
   goes back; if it was the last holder (the request ended before it), the
   request's end steps run right there, in the request's Context: no hub
   callback and no extra greenlet per request. While they run, a kill
   aimed at that child (``GreenletExit``, what ``kill()`` throws) is held
   back, then dropped (its result stands; a ``gevent.Timeout`` a step sets
   for itself fires as usual), and
   a step's failure is logged, never the child's. (A child that never ran,
   or a greenlet of another class, is released from its link in the hub:
   its steps then run in a greenlet of their own, see
   :class:`~geventctx.scope.Scope`.)

A Flask request that never handed off has no scope and does neither: its
teardown was Flask's own, in place.

.. versionadded:: 0.2
"""

from __future__ import annotations

import logging
import typing as t
from contextvars import Token

from . import stragglers
from .body import ENVIRON_BODY, SharedBody, end_of_response
from .scope import Scope

__all__ = ["owner_ended", "response_closed", "after_response", "child_ended"]

log = logging.getLogger("geventctx")

#: Children running their request's end (its last holders), with the kills
#: that reached them meanwhile (held back by ``handoff.Greenlet.throw``).
_shielded: dict[t.Any, list[tuple[t.Any, ...]]] = {}


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


def after_response(environ: dict[str, t.Any]) -> None:
    """After the response's ``close()``, outside the request's Context: the
    body's end that :func:`response_closed` made due (the capture for the
    children, or settling the server's input), which may wait for the client."""
    body = environ.get(ENVIRON_BODY)
    if isinstance(body, SharedBody) and body.end_due is not None:
        children, body.end_due = body.end_due, None
        body.end_response(children=children)


def child_ended(child: t.Any, scope: Scope) -> None:
    """``child`` (running, in its own greenlet) gives its hold on ``scope``
    back; the last holder runs the request's end steps here, shielded."""
    if scope.holders > 1:
        scope.release()
        return
    _shielded[child] = []
    try:
        scope.release()
    except BaseException:
        log.exception("the end of request %r, run by its last child, failed", scope.label)
    finally:
        held = _shielded.pop(child, ())
    if held:
        log.debug("kill of %r while it ran its request's end: dropped (its function had ended)", child)
