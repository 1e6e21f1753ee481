"""A ``concurrent.futures.Executor`` that runs tasks on greenlets, in context.

.. code-block:: python

    executor = geventctx.Executor(max_workers=8)

    @app.route("/report")
    def report():
        future = executor.submit(build_report, request.args["id"])
        return {"queued": True}      # build_report sees request, g, session

It is what Flask-Executor's ``executor.submit(fn)`` is for gevent apps: each
task runs in a snapshot of the context of its ``submit``/``map`` call, and
a task submitted during a request holds the request (teardown waits for it,
also while it waits in the queue) and shares its body and session guard.
Futures are real :class:`concurrent.futures.Future` objects, so
``as_completed``, ``wait`` and done-callbacks work; their ``result()`` and
``exception()`` wait cooperatively. (``concurrent.futures.wait`` and
``as_completed`` block on threading primitives: they cooperate with gevent in
a monkey-patched process, as under gunicorn ``-k gevent``.)

.. versionadded:: 0.1
"""

from __future__ import annotations

import collections
import concurrent.futures
import sys
import time
import typing as t
from contextvars import Context

import gevent
from gevent.event import Event

from . import _threads, handoff
from ._site import Site, site_of
from .forks import End
from .scope import Scope

__all__ = ["Executor", "Future"]

_getframe = sys._getframe
T = t.TypeVar("T")


class Future(concurrent.futures.Future):  # type: ignore[type-arg]
    """A :class:`concurrent.futures.Future` whose waits yield to other greenlets.

    The rule: a wait in the thread of the hub that made the future yields to
    that hub's greenlets (a gevent Event); a wait in any other thread — a
    ThreadPool task that submitted it, handed over to the request's hub — is
    ``concurrent.futures``' own native wait (a gevent Event there would wait
    in that thread's idle hub, and fail with ``LoopExit``).

    .. versionadded:: 0.1

    .. versionchanged:: 0.2
        Waitable from another thread.
    """

    def __init__(self) -> None:
        super().__init__()
        self._hub_thread = _threads.get_ident()
        self._done_event = Event()
        self.add_done_callback(_set_done_event)
        self._waiters = _CooperativeWaiters()

    def result(self, timeout: float | None = None) -> t.Any:
        if not self.done():
            if _threads.get_ident() != self._hub_thread:
                return super().result(timeout)
            self._done_event.wait(timeout)
        return super().result(timeout=0)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if not self.done():
            if _threads.get_ident() != self._hub_thread:
                return super().exception(timeout)
            self._done_event.wait(timeout)
        return super().exception(timeout=0)


def _set_done_event(future: concurrent.futures.Future[t.Any]) -> None:
    t.cast(Future, future)._done_event.set()


class _CooperativeWaiters(list):  # type: ignore[type-arg]
    """``Future._waiters`` that makes ``wait()``/``as_completed()`` cooperative.

    ``concurrent.futures.wait`` and ``as_completed`` install a waiter on each
    future and block on its ``threading.Event``; in a process that is not
    monkey-patched that blocks the hub, and so the very greenlets that would
    complete the futures. The waiter's event becomes a gevent Event instead
    (under monkey-patching it already is one).
    """

    def append(self, waiter: t.Any) -> None:
        if not isinstance(getattr(waiter, "event", None), Event):
            waiter.event = Event()
        super().append(waiter)


class _Task:
    __slots__ = ("future", "fn", "args", "kwargs", "context", "scope", "site", "started", "ends")

    def __init__(
        self,
        future: Future,
        fn: t.Callable[..., t.Any],
        args: tuple[t.Any, ...],
        kwargs: dict[str, t.Any],
        context: Context,
        scope: Scope | None,
        site: Site | None,
        ends: End | None = None,
    ) -> None:
        self.future = future
        #: What the forks gave the task to run at its end (its own app
        #: context): run in its worker, or where a cancelled task is dropped.
        self.ends = ends
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self.context = context
        self.scope = scope
        self.site = site
        self.started = False


class Executor(concurrent.futures.Executor):
    """Run callables on greenlets, each in the context it was submitted in.

    :param max_workers: how many tasks run at once; ``None`` for no limit.
    :param max_pending: how many tasks may wait for a worker; ``None`` for
        no limit. When the workers are busy and this many tasks wait,
        ``submit`` waits for room (backpressure) and keeps its context.

    .. versionadded:: 0.1
    """

    def __init__(self, max_workers: int | None = None, max_pending: int | None = None) -> None:
        if max_workers is not None and max_workers <= 0:
            raise ValueError("max_workers must be greater than 0")
        if max_pending is not None and max_pending < 0:
            raise ValueError("max_pending must be 0 or more")
        self._max_workers = max_workers
        self._max_pending = max_pending
        self._pending: collections.deque[_Task] = collections.deque()
        self._running: set[gevent.Greenlet] = set()
        #: Workers not yet dead (a worker leaves _running just before it ends).
        self._alive: set[gevent.Greenlet] = set()
        self._room = Event()
        self._idle = Event()
        self._idle.set()
        self._shutdown = False
        self._thread = _threads.get_ident()

    def submit(self, fn: t.Callable[..., T], /, *args: t.Any, **kwargs: t.Any) -> Future:
        """Schedule ``fn(*args, **kwargs)``; returns its :class:`Future`."""
        site = site_of(_getframe(1))
        if self._thread != _threads.get_ident():
            # In a ThreadPool task of the request: submitted on its hub.
            hub = _threads.request_hub_of(self._thread, _OTHER_THREAD.format(what="submit"))
            return _threads.on_owner_hub(hub, self._submit, site, fn, args, kwargs)
        return self._submit(site, fn, args, kwargs)

    def _submit(
        self, site: Site | None, fn: t.Callable[..., t.Any], args: tuple[t.Any, ...], kwargs: dict[str, t.Any]
    ) -> Future:
        self._wait_for_room()
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        future = Future()
        scope, context, ends = handoff.take(site)
        task = _Task(future, fn, args, kwargs, context, scope, site, ends)
        self._idle.clear()
        if self._max_workers is None or len(self._running) < self._max_workers:
            self._start(task)
        else:
            self._pending.append(task)
            future.add_done_callback(lambda _f: self._forget(task))
        return future

    def _wait_for_room(self) -> None:
        if self._max_pending is None or self._max_workers is None:
            return
        while len(self._running) >= self._max_workers and len(self._pending) >= self._max_pending:
            if self._shutdown:
                return
            self._room.clear()
            self._room.wait()

    def _start(self, task: _Task) -> None:
        task.started = True
        worker = gevent.Greenlet(_run, self, task)
        # The task's scope hold (taken at submit) passes to the greenlet,
        # which releases it when it ends, however it ends.
        handoff.bind(worker, task.context, task.scope, task.site, task.fn)
        self._running.add(worker)
        self._alive.add(worker)
        worker.rawlink(self._alive.discard)
        worker.start()

    def _forget(self, task: _Task) -> None:
        # A queued task's future was cancelled: drop it and its scope hold.
        if task.started or not task.future.cancelled():
            return
        try:
            self._pending.remove(task)
        except ValueError:
            return
        _drop(task)
        self._room.set()
        self._maybe_idle()

    def _worker_done(self, worker: gevent.Greenlet) -> None:
        self._running.discard(worker)
        while self._pending and (self._max_workers is None or len(self._running) < self._max_workers):
            task = self._pending.popleft()
            if task.future.cancelled():
                _drop(task)
                continue
            self._start(task)
        self._room.set()
        self._maybe_idle()

    def _maybe_idle(self) -> None:
        if not self._running and not self._pending:
            self._idle.set()

    def map(
        self, fn: t.Callable[..., T], *iterables: t.Iterable[t.Any], timeout: float | None = None, chunksize: int = 1
    ) -> t.Iterator[T]:
        """Like :meth:`concurrent.futures.Executor.map`, in the caller's context.

        Every call is submitted now; results come in order. With ``timeout``,
        ``TimeoutError`` is raised if a result is not ready that many seconds
        after this call, and the tasks not yet done are cancelled.
        """
        if self._thread != _threads.get_ident():
            raise RuntimeError(_OTHER_THREAD.format(what="map"))
        site = site_of(_getframe(1))
        end = None if timeout is None else time.monotonic() + timeout
        futures = [self._submit(site, fn, args, {}) for args in zip(*iterables, strict=False)]

        def results() -> t.Iterator[T]:
            try:
                futures.reverse()
                while futures:
                    if end is None:
                        yield _result_or_cancel(futures.pop())
                    else:
                        yield _result_or_cancel(futures.pop(), end - time.monotonic())
            finally:
                for future in futures:
                    future.cancel()

        return results()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """No new tasks; optionally cancel queued ones and wait for the rest."""
        self._shutdown = True
        self._room.set()
        if cancel_futures:
            for task in list(self._pending):
                task.future.cancel()
        if wait:
            self._idle.wait()
            gevent.joinall(list(self._alive))


_OTHER_THREAD = (
    "geventctx.Executor.{what}() called from another thread than the one that made the executor: its "
    "workers belong to that thread's hub. In a ThreadPool task of a request, submit() is handed over to "
    "the request's hub; for the rest, make an executor in the task."
)


def _result_or_cancel(future: Future, timeout: float | None = None) -> t.Any:
    # As concurrent.futures: a call whose result did not come in time is
    # cancelled too (a no-op if it already runs), not only those after it.
    try:
        return future.result(timeout)
    finally:
        future.cancel()


def _drop(task: _Task) -> None:
    # A task cancelled while queued never runs: its ends run in a greenlet
    # of their own, then its scope hold goes.
    ends, task.ends = task.ends, None
    release = task.scope.release if task.scope is not None else None
    if ends is not None:
        handoff.end_elsewhere(ends, concurrent.futures.CancelledError(), task.context, task.site, release)
    elif release is not None:
        release()


def _run(executor: Executor, task: _Task) -> None:
    # The task's ends (its own app context) run here, in its worker, before
    # its future is settled: whoever waits for it finds them done.
    future = task.future
    ends, task.ends = task.ends, None
    try:
        if future.set_running_or_notify_cancel():
            fn = task.fn if ends is None else handoff.Ending(task.fn, ends, task.context, task.site)
            try:
                result = fn(*task.args, **task.kwargs)
            except BaseException as exc:  # the future's, as in concurrent.futures
                future.set_exception(exc)
            else:
                future.set_result(result)
        elif ends is not None:
            handoff.run_ends(ends, concurrent.futures.CancelledError(), task.site)
    finally:
        task.args = task.kwargs = None  # type: ignore[assignment]
        executor._worker_done(gevent.getcurrent())
