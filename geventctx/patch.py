"""Make every gevent greenlet inherit its spawner's context.

After :func:`patch`, any :class:`gevent.Greenlet` started afterwards (plain
``gevent.spawn``, gevent's own pools and servers, third-party code) runs in a
snapshot of the context of the greenlet that started it, unless it already
has a context. It works through gevent's documented
:meth:`gevent.Greenlet.add_spawn_callback` hook.

This is visibility only: a patched plain spawn does not hold the request
scope, so the request may be torn down while it still runs. Use
:func:`geventctx.spawn` (or the pools) for work that uses the request.

.. versionadded:: 0.1
"""

from __future__ import annotations

import os
from contextvars import copy_context

import gevent
from gevent.monkey import get_original

__all__ = ["patch", "unpatch", "is_patched", "ENV_VAR"]

#: Set to ``1`` to call :func:`patch` when ``gevent.monkey.patch_all()`` runs.
ENV_VAR = "GEVENTCTX_PATCH"

_lock = get_original("_thread", "allocate_lock")()
_patched = False


def _inherit(child: gevent.Greenlet) -> None:
    if child.gr_context is None:
        child.gr_context = copy_context()


def patch() -> None:
    """Start giving every new gevent greenlet its spawner's context.

    Idempotent and thread-safe; safe to call at import time.
    """
    global _patched
    with _lock:
        if not _patched:
            gevent.Greenlet.add_spawn_callback(_inherit)
            _patched = True


def unpatch() -> None:
    """Undo :func:`patch`; greenlets already started keep their context."""
    global _patched
    with _lock:
        if _patched:
            gevent.Greenlet.remove_spawn_callback(_inherit)
            _patched = False


def is_patched() -> bool:
    """True while :func:`patch` is in effect."""
    return _patched


def _on_patch_all(event: object = None) -> None:
    """gevent plugin hook: patch when :data:`ENV_VAR` asks for it."""
    if os.environ.get(ENV_VAR, "").strip().lower() in ("1", "true", "yes", "on"):
        patch()
