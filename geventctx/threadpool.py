"""A gevent ThreadPool whose tasks run in their caller's context.

``gevent.threadpool.ThreadPool`` runs functions in native threads. This
subclass runs each task in a fresh copy of the context of the call that
submitted it (``Context.run`` in the worker thread), so the task sees the
request (``request``, ``g``, ``session``) and every contextvar, and a worker
thread never keeps a previous task's context: ``Context.run`` leaves the
thread's own context as it found it. A task submitted during a request holds
the request until it ends, like any hand-off, and reads the request's
shared body: a thread that asks for a body not yet read has the request's
own hub read it, and waits.

.. versionadded:: 0.1
"""

from __future__ import annotations

import sys
import typing as t
from contextvars import copy_context

import gevent.threadpool
from gevent.event import AsyncResult

from .handoff import bind, caller_site, pin_current_scope
from .pool import _ContextMappingMixin

__all__ = ["ThreadPool"]

_getframe = sys._getframe


class ThreadPool(_ContextMappingMixin, gevent.threadpool.ThreadPool):
    """A :class:`gevent.threadpool.ThreadPool` that carries the caller's context.

    ``spawn``, ``apply``, ``apply_async``, ``apply_cb``, ``map``,
    ``map_async``, ``imap`` and ``imap_unordered`` all run their function in
    a copy of the calling greenlet's context.

    .. versionadded:: 0.1
    """

    def spawn(self, func: t.Callable[..., t.Any], *args: t.Any, **kwargs: t.Any) -> AsyncResult:
        site = caller_site(_getframe(1))
        context = copy_context()
        scope = pin_current_scope(site)
        try:
            result = gevent.threadpool.ThreadPool.spawn(self, context.run, func, *args, **kwargs)
        except BaseException:
            if scope is not None:
                scope.release()
            raise
        bind(result, context, scope, site, func)
        return result
