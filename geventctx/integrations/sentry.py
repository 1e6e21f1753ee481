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
* **A child's error is one event.** A child's uncaught exception, which
  geventctx logs once per request (G11), is captured in the child's context
  (mechanism ``geventctx``, unhandled), like Sentry's threading integration
  captures a thread's; the logging integration's event for that log line is
  dropped. When the view re-raises the same exception (``Pool.map``,
  ``Greenlet.get()``, ``ThreadPool.apply``) the later capture in the same
  request is dropped — only if the child's event was really sent (not
  dropped by ``before_send`` or sampling). The rule: one event per request
  and child exception object. Other exceptions keep Sentry's own rules.

Cost, per hand-off: with a client that has this integration, one
``Scope.fork`` of each scope that is set — Sentry copies a scope's tags,
contexts, breadcrumbs and processors — 13–19 µs on a 2-core VM
(``benchmarks/observability.py``), what Sentry's threading integration pays
per thread; a spawner with no Sentry scope set forks nothing. The hooks are
armed by the integration's constructor (each ``sentry_sdk.init`` with it)
and the first hand-off that finds no client with it disarms them: then a
hand-off pays ``geventctx.forks``' empty-list test only.

.. versionadded:: 0.2
"""

from __future__ import annotations

import typing as t

try:
    import sentry_sdk
    from sentry_sdk.integrations import Integration

    # The scopes' context variables, read without creating a scope
    # (Scope.get_*_scope() makes one when unset); sentry-sdk 1.x has neither.
    from sentry_sdk.scope import _current_scope, _isolation_scope, add_global_event_processor
    from sentry_sdk.utils import event_from_exception
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "geventctx.integrations.sentry needs sentry-sdk 2.x: pip install 'geventctx[sentry]'", name=exc.name
    ) from exc

from .. import errorlog, forks
from ..scope import _SCOPE

__all__ = ["GeventctxIntegration"]

#: The ``extras`` key of a request scope's errors that Sentry sent, by id.
_SENT = "sentry.sent"


class GeventctxIntegration(Integration):
    """Fork Sentry's scopes for every geventctx child and send each child's
    error once. Pass an instance to ``sentry_sdk.init(integrations=[...])``."""

    identifier = "geventctx"

    def __init__(self) -> None:
        # Made per sentry_sdk.init call: (re)arm the hooks, which disarm
        # themselves once no current client has this integration, so that a
        # process without it pays nothing per hand-off.
        forks.register(_fork_scopes)
        errorlog.add_reporter(_capture_child_error)

    @staticmethod
    def setup_once() -> None:
        add_global_event_processor(_send_child_error_once)


def _client() -> t.Any:
    """The current Sentry client if it has this integration, else ``None``."""
    client = sentry_sdk.get_client()
    return client if client.get_integration(GeventctxIntegration) is not None else None


def _fork_scopes() -> None:
    """A geventctx fork: runs in each child's snapshot before it starts."""
    if _client() is None:
        forks.unregister(_fork_scopes)
        errorlog.remove_reporter(_capture_child_error)
        return
    # A scope that is not set is not shared: the child makes its own.
    isolation = _isolation_scope.get()
    if isolation is not None:
        _isolation_scope.set(isolation.fork())
    current = _current_scope.get()
    if current is not None:
        _current_scope.set(current.fork())


def _capture_child_error(scope: t.Any, exc_info: t.Any) -> None:
    """An errorlog reporter: capture a child's error, in the child's context
    (errorlog calls it once per request and exception object)."""
    client = _client()
    if client is None:
        return
    event, hint = event_from_exception(
        exc_info, client_options=client.options, mechanism={"type": "geventctx", "handled": False}
    )
    if sentry_sdk.capture_event(event, hint=hint) is not None:  # sent, not dropped
        scope.extras.setdefault(_SENT, {})[id(exc_info[1])] = exc_info[1]


def _send_child_error_once(event: t.Any, hint: t.Any) -> t.Any:
    """Drop the logging integration's event for a child's error (it is
    captured directly), and a later event of the same request for a child
    error that was sent."""
    exc_info = hint.get("exc_info") if hint else None
    if not exc_info or _client() is None:
        return event
    scope = _SCOPE.get()
    if scope is None:
        return event
    error = exc_info[1]
    record = hint.get("log_record")
    if record is not None and record.name == errorlog.log.name and errorlog.reported(scope, error):
        return None
    sent = scope.extras.get(_SENT)
    if sent is not None and sent.get(id(error)) is error:
        return None
    return event
