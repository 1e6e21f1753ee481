"""Sentry next to geventctx: each child its own scopes, each child error one event.

sentry-sdk 2.x keeps its *current* and *isolation* scopes as mutable objects
in context variables. A hand-off copies the context, so without help a child
shares the request's scope objects: a tag, user or breadcrumb the child sets
reaches its siblings and the request's later events, and a span the child
starts becomes the parent of the request's later spans. Sentry's own
threading integration forks both scopes for each thread; this integration
does the same for every geventctx hand-off.

.. code-block:: python

    import sentry_sdk
    from geventctx.integrations.sentry import GeventctxIntegration

    sentry_sdk.init(dsn=..., integrations=[GeventctxIntegration()])

What it does, per hand-off (``spawn``, the pools, the executor, the thread
pool, and plain greenlets under :func:`geventctx.patch`):

* **Scopes are forked.** In the child's snapshot, before the child starts,
  the current and the isolation scope are replaced by forks
  (:meth:`sentry_sdk.Scope.fork`). The child starts with everything the
  request had set — tags, user, request data, transaction name, breadcrumbs,
  the active span — and what it changes stays its own.
* **Spans join the request's transaction while it is open.** The forked
  current scope keeps the span that was active at the hand-off, so
  ``sentry_sdk.start_span()`` in a child makes a child of it. Sentry sends a
  transaction when it finishes — for a Flask or WSGI request when the
  application call returns — and a span finished after that is not sent:
  a child that outlives the response (fire-and-forget, after the response)
  should start a transaction of its own to be traced.
* **A child's error is one event.** geventctx logs a child's uncaught
  exception at ERROR (G11), which Sentry's logging integration reports; if
  the view then re-raises the same exception (``Pool.map``,
  ``Future.result()``, ``Greenlet.get()``) and Flask's integration captures
  it, that second event is dropped. The rule: an exception geventctx logged
  as a child's error is sent at most once. Other exceptions are untouched.

Cost, per hand-off: nothing measurable unless Sentry's client has this
integration (one test of the client); with it, one ``Scope.fork`` of each
scope — Sentry copies a scope's tags, contexts, breadcrumbs and processors —
13–19 µs on a 2-core VM (``benchmarks/observability.py``), what Sentry's
threading integration pays per thread.

.. versionadded:: 0.2
"""

from __future__ import annotations

import typing as t

import sentry_sdk
from sentry_sdk.integrations import Integration
from sentry_sdk.scope import Scope, add_global_event_processor

from .. import forks
from ..errorlog import _LOGGED

__all__ = ["GeventctxIntegration"]

#: Attribute marking a child's exception that Sentry sent already.
_SENT = "_geventctx_sentry_sent"


class GeventctxIntegration(Integration):
    """Fork Sentry's scopes for every geventctx child and send each child's
    error once. Pass an instance to ``sentry_sdk.init(integrations=[...])``."""

    identifier = "geventctx"

    @staticmethod
    def setup_once() -> None:
        # Sentry calls this once per process; the hooks below act only while
        # the current client has this integration.
        forks.register(_fork_scopes)
        add_global_event_processor(_send_child_error_once)


def _enabled() -> bool:
    return sentry_sdk.get_client().get_integration(GeventctxIntegration) is not None


def _fork_scopes() -> None:
    """A geventctx fork: runs in each child's snapshot before it starts."""
    if not _enabled():
        return
    Scope.set_isolation_scope(Scope.get_isolation_scope().fork())
    Scope.set_current_scope(Scope.get_current_scope().fork())


def _send_child_error_once(event: t.Any, hint: t.Any) -> t.Any:
    """Drop an event for a child's exception that was sent already."""
    exc_info = hint.get("exc_info") if hint else None
    if not exc_info or not _enabled():
        return event
    error = exc_info[1]
    if not getattr(error, _LOGGED, False):
        return event  # not a child's error: Sentry's own rules apply
    if getattr(error, _SENT, False):
        return None
    try:
        setattr(error, _SENT, True)
    except Exception:  # an exception type without attributes
        pass
    return event
