"""The hand-off: start a greenlet in a snapshot of its spawner's context.

gevent greenlets start with an empty :mod:`contextvars` context. A hand-off
takes :func:`contextvars.copy_context` (O(1)) in the spawner when the child
is started and sets it as the child's ``gr_context`` before it first runs, so
the child sees every context variable of its spawner as of that moment and
nothing it sets reaches anyone else. No wrapper function, no extra frame, no
Flask context pushed or popped in the child.

Inside a request scope the child also *holds* the scope until it ends, so the
request's teardown waits for it; and it is listed in :mod:`geventctx.registry`
while it runs.

.. versionadded:: 0.1
"""

from __future__ import annotations

import sys
import typing as t
import warnings
from contextvars import copy_context

import gevent
from greenlet import getcurrent

from . import registry
from ._site import Site, format_site, site_of
from .errors import LateEffectWarning
from .scope import _SCOPE

__all__ = ["Greenlet", "spawn", "spawn_later", "attach"]

_getframe = sys._getframe
_base_start = gevent.Greenlet.start
_base_start_later = gevent.Greenlet.start_later
_HandOff = registry.HandOff
_live = registry._live


def attach(child: gevent.Greenlet, site: Site | None, function: t.Any = None) -> None:
    """Hand the running context to the unstarted gevent greenlet ``child``.

    Sets its ``gr_context`` to a snapshot of the current context, records it
    in the registry and makes it hold the current request scope (if any)
    until it ends. Call it in the spawner, just before starting ``child``.
    """
    ctx = copy_context()
    child.gr_context = ctx
    if site is None:
        # The user's call is not on this greenlet's stack: the spawner is a
        # helper (Pool.map, imap) that was itself handed off; use its site.
        helper = _live.get(id(getcurrent()))
        site = helper.site if helper is not None else None
    scope = _SCOPE.get()
    if scope is not None and not scope.acquire():
        warnings.warn_explicit(
            f"{scope.label or 'the request'} has already ended; the child "
            f"started at {format_site(site)} sees its context but does not "
            "delay its teardown",
            LateEffectWarning,
            site[0] if site else "<unknown>",
            site[1] if site else 0,
        )
        scope = None
    _live[id(child)] = _HandOff(child, getcurrent(), scope, function, site)
    child.rawlink(_finished)


def _finished(child: gevent.Greenlet) -> None:
    # Runs once per child, from the hub, however the child ended (returned,
    # raised, was killed, or was killed before it ever ran).
    record = _live.pop(id(child), None)
    if record is not None and record.scope is not None:
        record.scope.release()


class Greenlet(gevent.Greenlet):
    """A :class:`gevent.Greenlet` that runs in its spawner's context.

    The snapshot is taken when the greenlet is started (``start``,
    ``start_later``, or through :meth:`spawn`), in the greenlet that starts it.
    Everything else is :class:`gevent.Greenlet`: ``get()``, ``join()``,
    ``kill()``, links, ``exception``.

    .. versionadded:: 0.1
    """

    _geventctx_attached = False

    def start(self) -> None:
        if not self._geventctx_attached:
            self._geventctx_attached = True
            attach(self, site_of(_getframe(1)), getattr(self, "_run", None))
        _base_start(self)

    def start_later(self, seconds: float) -> None:
        if not self._geventctx_attached:
            self._geventctx_attached = True
            attach(self, site_of(_getframe(1)), getattr(self, "_run", None))
        _base_start_later(self, seconds)


def spawn(function: t.Callable[..., t.Any], *args: t.Any, **kwargs: t.Any) -> Greenlet:
    """Like :func:`gevent.spawn`, but the child runs in this greenlet's context.

    The child sees every context variable (Flask's request, ``g``, session,
    app, your own) as of this call; its own writes stay its own. Inside a
    request scope, the request's teardown waits until the child ends.

    .. versionadded:: 0.1
    """
    child = Greenlet(function, *args, **kwargs)
    child._geventctx_attached = True
    attach(child, site_of(_getframe(1)), function)
    _base_start(child)
    return child


def spawn_later(
    seconds: float, function: t.Callable[..., t.Any], *args: t.Any, **kwargs: t.Any
) -> Greenlet:
    """Like :func:`gevent.spawn_later`, with the context of this call.

    The snapshot is taken now, not when the child starts running; inside a
    request scope the request's teardown waits for the delayed child too.

    .. versionadded:: 0.1
    """
    child = Greenlet(function, *args, **kwargs)
    child._geventctx_attached = True
    attach(child, site_of(_getframe(1)), function)
    _base_start_later(child, seconds)
    return child
