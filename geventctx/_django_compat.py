"""Every private name of Django and asgiref the Django adapter touches.

The rule: :mod:`geventctx.django` never reads a private name of Django or
asgiref itself; it asks this module. Each name says the versions it was
read from and what happens when it is missing (the adapter then does less,
never fails a request).

Django keeps its per-request state in asgiref ``Local`` objects that are not
thread-critical (a ``contextvars.ContextVar`` under ``local._storage._data``,
asgiref 3.8 to 3.13 alike):

- ``django.utils.translation.trans_real._active``: the active language;
- ``django.utils.timezone._active``: the active time zone;
- ``django.urls.base._prefixes``: the script prefix;
- ``django.urls.base._urlconfs``: the urlconf of the request;
- ``django.core.cache.caches._connections``: the cache clients opened.

(Django 4.2 to 5.2 read; a missing one is skipped.) Database connections
are in a thread-critical ``Local`` (``connections._connections._storage``,
a ``threading.local``: greenlet-local once gevent patched ``threading``).

The adapter's ``WSGIRequest`` overrides Django's body internals (read from
Django 4.2 and 5.2, where they are the same): ``_load_post_and_files()``,
the ``_post``/``_files`` attributes it sets, the ``_set_post`` setter of
``POST``, and ``_stream`` (a ``LimitedStream`` over ``wsgi.input``, made
again over the shared body's cursor). Its handler adds the first of the
response's ``_resource_closers`` (:func:`close_first`).

What the ``ContextVar`` holds depends on asgiref:

- 3.8 and earlier: a ``dict`` changed *in place* by every write — a
  child's ``translation.activate()`` changed its spawner's language;
- 3.9 to 3.11: a ``dict`` replaced by a changed copy at every write
  (children already write their own; they read the spawner's);
- 3.12 and later: ``asgiref.local._Storage(thread_id, data)``, visible only
  where ``threading.get_ident()`` equals ``thread_id`` — under gevent the
  greenlet, so a child saw none of its spawner's state. asgiref re-homes it
  itself where it moves work on purpose (``asgiref.sync._restore_context``
  with ``asgiref.local._rehome``).

.. versionadded:: 0.2
"""

from __future__ import annotations

import sys
import threading
import typing as t
from contextvars import ContextVar

import asgiref.local

#: ``asgiref.local._Storage`` (3.12+, read from 3.12.0 and 3.13.0); ``None``
#: on 3.11 and earlier, whose storage is a dict.
_Storage: t.Any = getattr(asgiref.local, "_Storage", None)

__all__ = [
    "state_vars", "cache_var", "connection_storage", "close_first", "for_child", "empty_like", "rehomed", "HOMED",
]

#: True where asgiref keys its storage on the thread (3.12+).
HOMED = _Storage is not None


def _var_of(local: t.Any) -> ContextVar[t.Any] | None:
    """The ContextVar behind a non-thread-critical asgiref ``Local``."""
    try:
        storage = object.__getattribute__(local, "_storage")
        var = object.__getattribute__(storage, "_data")
    except AttributeError:
        return None
    return var if isinstance(var, ContextVar) else None


def state_vars() -> list[ContextVar[t.Any]]:
    """The ContextVars of Django's per-request state that exist here
    (language, time zone, script prefix, urlconf)."""
    found: list[ContextVar[t.Any]] = []
    for module, name in (
        ("django.utils.translation.trans_real", "_active"),
        ("django.utils.timezone", "_active"),
        ("django.urls.base", "_prefixes"),
        ("django.urls.base", "_urlconfs"),
    ):
        if module not in sys.modules:
            __import__(module)
        var = _var_of(getattr(sys.modules[module], name, None))
        if var is not None:
            found.append(var)
    return found


def cache_var() -> ContextVar[t.Any] | None:
    """The ContextVar of the cache clients Django opened (``caches``)."""
    from django.core.cache import caches

    return _var_of(getattr(caches, "_connections", None))


def connection_storage() -> t.Any:
    """Where Django keeps its database connections (a ``threading.local``
    made when ``django.db`` was imported), or ``None``."""
    from django.db import connections

    local = getattr(connections, "_connections", None)
    try:
        return object.__getattribute__(local, "_storage")
    except AttributeError:
        return None


class _FirstUser:
    """A ``thread_id`` for a child's storage: it becomes the id of the first
    thread or greenlet that compares it with its own (asgiref compares
    ``storage.thread_id != threading.get_ident()`` at each read) — the child
    itself, since only the child runs in the child's Context."""

    __slots__ = ("ident",)

    def __init__(self) -> None:
        self.ident: int | None = None

    def _owner(self, other: object) -> object:
        if self.ident is None and isinstance(other, int):
            self.ident = other
        return self.ident

    def __eq__(self, other: object) -> bool:
        return self._owner(other) == other

    def __ne__(self, other: object) -> bool:
        return self._owner(other) != other

    def __hash__(self) -> int:
        return id(self)


def for_child(value: t.Any) -> t.Any:
    """The value a child's snapshot gets for a state ContextVar holding
    ``value`` (run in the spawner): the spawner's state, the child's own to
    change; ``value`` itself where nothing needs doing."""
    if type(value) is dict:
        return dict(value)  # asgiref <= 3.11: 3.8 writes the dict in place
    if _Storage is not None and isinstance(value, _Storage):
        if value.thread_id != threading.get_ident():
            return value  # not the spawner's own either: stays unseen
        return _Storage(t.cast(t.Any, _FirstUser()), value.data)
    return value


def empty_like(value: t.Any) -> t.Any:
    """An empty storage for a child (its own cache clients), or ``value``
    where the child cannot see the spawner's anyway (asgiref 3.12+)."""
    if type(value) is dict:
        return {}
    return value


def close_first(response: t.Any, function: t.Callable[[], None]) -> None:
    """Run ``function()`` first when ``response`` is closed: the first of
    its ``_resource_closers`` (Django 3.0 to 5.2; a response without them,
    a file wrapper's, is left alone)."""
    closers = getattr(response, "_resource_closers", None)
    if isinstance(closers, list):
        closers.insert(0, function)


def rehomed(value: t.Any) -> t.Any:
    """``value`` owned by the running thread or greenlet, as asgiref's own
    ``_restore_context`` does (3.12+); ``value`` itself before 3.12."""
    if _Storage is not None and isinstance(value, _Storage) and value.thread_id != threading.get_ident():
        return _Storage(threading.get_ident(), value.data)
    return value
