"""A gevent ThreadPool whose tasks run in their caller's context.

``gevent.threadpool.ThreadPool`` runs functions in native threads. This
subclass runs each task in a fresh copy of the context of the call that
submitted it, in a greenlet of its own in the worker thread, so the task sees
the request (``request``, ``g``, ``session``) and every contextvar, and a
worker thread never keeps a previous task's context or state: the thread's
own context is never touched, and what is kept per greenlet (a reader's
position in the shared body or in an upload) is the task's. A task
submitted during a request holds the request until it ends, like any
hand-off, and reads the request's shared body: a thread that asks for a body
not yet read has the request's own hub read it, and waits.

.. versionadded:: 0.1
"""

from __future__ import annotations

import sys
import typing as t
from contextvars import Context, copy_context

import gevent.threadpool
from gevent._hub_local import get_hub_if_exists
from gevent.event import AsyncResult
from greenlet import getcurrent, greenlet

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
        # f_back, not _getframe(1): imap's helper (compiled) calls spawn with
        # no Python frame above it; the helper's own site is used then.
        site = caller_site(_getframe(0).f_back)
        context = copy_context()
        scope = pin_current_scope(site)
        task = _ThreadTask()
        try:
            result = gevent.threadpool.ThreadPool.spawn(self, task, context, func, args, kwargs)
        except BaseException:
            if scope is not None:
                scope.release()
            raise
        # gevent reports a failed task to the hub as (worker, task): this is
        # how geventctx's error log finds the hand-off, its request and site.
        task.handoff = result
        bind(result, context, scope, site, func)
        return result


class _ThreadTask:
    """What a worker thread runs for one task (one object per task)."""

    __slots__ = ("handoff",)

    def __init__(self) -> None:
        self.handoff: AsyncResult | None = None

    def __call__(self, context: Context, func: t.Callable[..., t.Any], args: t.Any, kwargs: t.Any) -> t.Any:
        return _run_task(context, func, args, kwargs)


def _run_task(context: Context, func: t.Callable[..., t.Any], args: t.Any, kwargs: t.Any) -> t.Any:
    # In the worker thread. The task runs in a greenlet of its own, in its
    # context: what is kept per greenlet (a reader's position in the shared
    # body or in an uploaded file, a lock's owner) then belongs to this task,
    # not to the worker thread that runs one task after another, and the
    # worker's own context is never touched.
    task = greenlet(func)
    task.gr_context = context
    worker = getcurrent()
    hub = get_hub_if_exists()  # a thread's hub exists if a task made one
    if hub is not None:
        hub.parent = task  # its errors (LoopExit) go to the running task
    try:
        return task.switch(*args, **kwargs)
    finally:
        hub = get_hub_if_exists()
        if hub is not None and hub.parent is not worker:
            hub.parent = worker
