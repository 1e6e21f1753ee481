"""Make every gevent greenlet inherit its spawner's context.

After :func:`patch`, any :class:`gevent.Greenlet` started afterwards (plain
``gevent.spawn``, gevent's own pools and servers, third-party code) runs in a
snapshot of the context of the greenlet that started it, unless it already
has a context. It works through gevent's documented
:meth:`gevent.Greenlet.add_spawn_callback` hook.

This is visibility only: a patched plain spawn does not hold the request
scope, so the request may be torn down while it still runs. What the
registered forks give a child is given to it too — in a Flask app context,
an app context of its own, torn down at its end (G3, G4) — so code written
for ``copy_current_request_context`` behaves the same with the patch on. Use
:func:`geventctx.spawn` (or the pools) for work that uses the request.

The rule for the hub: a greenlet started from the hub itself — a server's
accept callback starting a connection handler, a timer, a link callback —
gets an empty context, never the hub's: a context variable set while
running in the hub would otherwise reach every later, unrelated
connection.

Threads: gevent iterates its set of spawn callbacks without a lock, so the
callback is added once, on the first :func:`patch`, and never removed;
:func:`patch` and :func:`unpatch` only flip a flag it reads. They are safe
against spawns in other threads.

``geventctx.patch`` is this module, callable: ``geventctx.patch()`` patches,
and ``import geventctx.patch as m`` gives the module.

.. versionchanged:: 0.2
    Greenlets started from the hub get an empty context; patch/unpatch
    flip a flag instead of changing gevent's callback set.

.. versionadded:: 0.1
"""

from __future__ import annotations

import os
import sys
import types
from contextvars import Context

import gevent
from gevent.hub import Hub
from gevent.monkey import get_original
from greenlet import getcurrent

from .forks import handoff_context
from .handoff import Ending
from .scope import _PENDING, _SCOPE, scope_for_handoff

__all__ = ["patch", "unpatch", "is_patched", "ENV_VAR"]

#: Set to ``1`` to call :func:`patch` when ``gevent.monkey.patch_all()`` runs.
ENV_VAR = "GEVENTCTX_PATCH"

_lock = get_original("_thread", "allocate_lock")()
#: On while patched: the one permanent spawn callback reads it.
_patched = False
_registered = False


def _inherit(child: gevent.Greenlet) -> None:
    if _patched and child.gr_context is None:
        if isinstance(getcurrent(), Hub):
            # From the hub: an empty context, never the hub's own.
            child.gr_context = Context()
            return
        if _PENDING.get() is not None and _SCOPE.get() is None:
            # A request that has not handed off yet: the child sees its
            # scope as it would have before (and errorlog finds it there).
            scope_for_handoff()
        context, ends = handoff_context()
        child.gr_context = context
        if ends is not None:
            # What a fork gave the child (its own Flask app context) ends
            # with it, as for any hand-off (geventctx.forks).
            ending = child._run = Ending(child._run, ends, context, None)
            child.rawlink(ending.never_ran)


def patch() -> None:
    """Start giving every new gevent greenlet its spawner's context.

    Idempotent and thread-safe; safe to call at import time.
    """
    global _patched, _registered
    with _lock:
        if not _registered:
            gevent.Greenlet.add_spawn_callback(_inherit)
            _registered = True
        _patched = True


def unpatch() -> None:
    """Undo :func:`patch`; greenlets already started keep their context."""
    global _patched
    with _lock:
        _patched = False


def is_patched() -> bool:
    """True while :func:`patch` is in effect."""
    return _patched


def _on_patch_all(event: object = None) -> None:
    """gevent plugin hook: patch when :data:`ENV_VAR` asks for it."""
    if os.environ.get(ENV_VAR, "").strip().lower() in ("1", "true", "yes", "on"):
        patch()


class _CallableModule(types.ModuleType):
    """This module, callable as :func:`patch` (``geventctx.patch()``)."""

    def __call__(self) -> None:
        patch()


sys.modules[__name__].__class__ = _CallableModule
