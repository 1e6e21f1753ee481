"""What a greenlet keeps in ``threading.local`` storage, under gevent's monkey patch.

The rule: the only private name of gevent's used here is
``gevent.local.all_local_dicts_for_greenlet`` (a debug helper since gevent
1.3a2, "subject to change or removal"; read from gevent 26.9). Where it is
missing, :func:`left_sessions` finds nothing: the warning it feeds is not
given, nothing else changes.

.. versionadded:: 0.2
"""

from __future__ import annotations

import sys
import typing as t

try:
    from gevent.local import all_local_dicts_for_greenlet as _local_dicts
except ImportError:  # pragma: no cover - a gevent without the helper
    _local_dicts = None

__all__ = ["left_sessions"]


def left_sessions(greenlet: t.Any) -> list[t.Any]:
    """SQLAlchemy sessions ``greenlet`` holds in greenlet-local storage: what
    a ``scoped_session`` with its default scope keeps for that greenlet
    (``ThreadLocalRegistry`` stores it as ``value`` of a ``threading.local``,
    a greenlet-local under ``gevent.monkey``). Empty without SQLAlchemy."""
    orm = sys.modules.get("sqlalchemy.orm")
    if orm is None or _local_dicts is None:
        return []
    session_class = getattr(orm, "Session", None)
    if session_class is None:
        return []
    found = []
    for _, values in _local_dicts(greenlet):
        value = values.get("value")
        if isinstance(value, session_class):
            found.append(value)
    return found
