"""A gevent ThreadPool whose tasks run in their caller's context.

The rule: a task runs exactly as under gevent's own ThreadPool — in the
worker thread's gevent worker greenlet, the callable itself handed to
gevent's per-task hooks (profile, trace), unless a fork gave the task an
end (in a Flask app context: its own app context, torn down in the worker
thread before the result is reported), then inside :class:`~geventctx.handoff.Ending`
— except that for the task's
duration the worker greenlet runs in a fresh copy of the context of the call
that submitted it (``copy_context()`` at ``spawn``), restored afterwards. So
the task sees the request (``request``, ``g``, ``session``) and every
contextvar, and the worker keeps nothing of one task's context for the next;
what gevent keys on the worker greenlet (monkey-patched ``threading.local``,
``threading.current_thread()``, logging's thread name) stays the worker's,
as with gevent. A position in the request's shared body is kept per task
(the worker gets a fresh reader key per task). A task submitted during a
request holds the request until it ends, like any hand-off, and reads the
request's shared body: a thread that asks for a body not yet read has the
request's own hub read it, and waits. ``apply_cb`` runs its callback
synchronously in the caller, as gevent's does. A task's exception is logged
once, by its hand-off, with its request and spawn site (G11).

.. versionchanged:: 0.2
    Tasks run in gevent's worker greenlet, not in a greenlet of their own.

.. versionadded:: 0.1
"""

from __future__ import annotations

import logging
import sys
import typing as t
import weakref

import gevent.threadpool
from gevent.event import AsyncResult
from greenlet import getcurrent, greenlet

from . import registry
from .handoff import Ending, _finished, caller_site, end_now_if_never_ran, take
from .pool import _ContextMappingMixin
from .registry import _live

__all__ = ["ThreadPool"]

log = logging.getLogger("geventctx")

_getframe = sys._getframe
_ref = weakref.ref
#: gevent's classes, kept: a test harness may replace the module's attribute
#: with this subclass.
_GeventThreadPool = gevent.threadpool.ThreadPool
_GeventWorker = _GeventThreadPool._WorkerGreenlet

#: The keyword that carries a task's context through gevent's task queue to
#: its worker (taken out again before the callable is called).
_CONTEXT = "__geventctx_context__"


class TaskReader:
    """The key of one task's readers (positions in a shared body)."""

    __slots__ = ("__weakref__",)


class _Worker(_GeventWorker):  # type: ignore[misc,valid-type]
    """gevent's worker greenlet, entering each task's context for its run."""

    #: Marks the worker for the error log (see geventctx.errorlog).
    geventctx_worker = True
    _geventctx_saved: t.Any = None
    #: This task's reader key, or None between tasks.
    geventctx_reader: TaskReader | None = None
    #: Children geventctx.spawn started in this task outside a request.
    geventctx_children: list[t.Any] | None = None

    def _before_run_task(self, func: t.Any, args: t.Any, kwargs: t.Any, thread_result: t.Any, *more: t.Any,
                         **options: t.Any) -> None:
        context = kwargs.pop(_CONTEXT, None) if type(kwargs) is dict else None
        if context is not None:
            self._geventctx_saved = self.gr_context  # type: ignore[has-type]
            self.geventctx_reader = TaskReader()
            self.geventctx_children = []
            self.gr_context = context  # the running greenlet: takes effect now
        _GeventWorker._before_run_task(self, func, args, kwargs, thread_result, *more, **options)

    def _after_run_task(self, func: t.Any, args: t.Any, kwargs: t.Any, thread_result: t.Any, *more: t.Any,
                        **options: t.Any) -> None:
        try:
            _GeventWorker._after_run_task(self, func, args, kwargs, thread_result, *more, **options)
        finally:
            children, self.geventctx_children = self.geventctx_children, None
            if children:
                _stranded(func, children)
            if self.geventctx_reader is not None:
                self.gr_context = self._geventctx_saved
                self._geventctx_saved = None
                self.geventctx_reader = None


def _stranded(func: t.Any, children: list[t.Any]) -> None:
    """Children a task spawned outside a request that had not ended when it
    returned: the worker thread's hub runs only while a task waits on it, so
    they cannot run. Say so, cancel those that never started (and drop
    their registry records, which their links, in this hub, cannot)."""
    left = [child for child in children if not child.dead]
    if not left:
        return
    name = getattr(func, "__qualname__", None) or repr(func)
    for child in left:
        record = registry.record_of(child)
        log.error(
            "the hand-off at %s in ThreadPool task %s runs in the worker thread's hub, and the task returned "
            "before it ended: that hub runs only while a task waits on it (join it in the task; in a request, "
            "geventctx.spawn, Pool.spawn and Executor.submit are handed over to the request's hub); %s",
            record.spawn_site if record is not None else "?",
            name,
            "it is stuck" if greenlet.__bool__(child) else "cancelled before it ran",
        )
        if not greenlet.__bool__(child):  # never switched to: cancel its start
            child.kill(block=False)
            # Its ends (its own app context) run here and now: this hub does not run.
            end_now_if_never_ran(child)
        # Its end link would run in this thread's hub, which does not run:
        # the record goes now (it was reported).
        _finished(child)


class ThreadPool(_ContextMappingMixin, _GeventThreadPool):  # type: ignore[misc,valid-type]
    """A :class:`gevent.threadpool.ThreadPool` that carries the caller's context.

    ``spawn``, ``apply``, ``apply_async``, ``apply_cb``, ``map``,
    ``map_async``, ``imap`` and ``imap_unordered`` all run their function in
    a copy of the calling greenlet's context.

    .. versionadded:: 0.1
    """

    _WorkerGreenlet = _Worker
    # gevent's ThreadPool calls apply_cb's callback synchronously, in the
    # caller (the pool mixin's would spawn it).
    _apply_async_cb_spawn = _GeventThreadPool._apply_async_cb_spawn

    def spawn(self, func: t.Callable[..., t.Any], *args: t.Any, **kwargs: t.Any) -> AsyncResult:
        # f_back, not _getframe(1): imap's helper (compiled) calls spawn with
        # no Python frame above it; the helper's own site is used then.
        site = caller_site(_getframe(0).f_back)
        scope, context, ends = take(site)
        function = func
        if ends is not None:
            # Its own app context (geventctx.forks), torn down in the worker
            # thread before the task's result is reported.
            func = Ending(func, ends, context, site)
        task_kwargs = dict(kwargs)
        task_kwargs[_CONTEXT] = context
        # The record is made before the task is queued: Python work between
        # queueing and waiting makes the worker wait for the GIL (a handoff
        # of ~10 µs per task on a 2-core VM); after, only the two inserts
        # and the link remain.
        record = registry.record(None, getcurrent(), scope, function, site, context)
        try:
            result = _GeventThreadPool.spawn(self, func, *args, **task_kwargs)
        except BaseException:
            if scope is not None:
                scope.release()
            raise
        key = id(result)
        # The task's context rides in its record: its error is logged in it
        # (errorlog.report_task), where the request's logging and Sentry state live.
        record._greenlet = _ref(result)
        _live[key] = record
        if scope is not None:
            scope.children[key] = result
        result.rawlink(_finished)
        return result
