"""Structured fan-out: what ``asyncio.TaskGroup`` and trio's nursery give their worlds.

The rule: the ``with TaskGroup() as tg:`` block does not exit until every
task spawned in it — by the block or by its tasks — has ended; the group
stops (kills every task still running or queued, and the block's body if it
still runs) when the first of these happens: a task fails, the body fails,
the deadline passes, ``tg.cancel()`` is called, or the greenlet running the
block is killed. Then the block raises what the stop leaves to say, in this
order of precedence:

1. A kill of the greenlet that runs the block (``GreenletExit``,
   ``gevent.Timeout``, ``KeyboardInterrupt``, ``SystemExit``, arriving in
   the body or while the block waits) is re-raised as it is, never grouped,
   after the tasks have ended; the tasks' failures it cut short are logged
   as any child's (G11), since nobody will see them raised.
2. Otherwise the failures — tasks' and the body's own, in the order they
   happened, and a ``TimeoutError`` naming what the deadline stopped — are
   raised as one ``ExceptionGroup`` (``BaseExceptionGroup`` when a
   ``BaseException`` is among them); a deadline alone raises its
   ``TimeoutError`` alone; a ``cancel()`` alone raises nothing.

A task is a hand-off exactly like :func:`geventctx.spawn`'s (context
snapshot taken at ``tg.spawn``, the request held, listed in the registry);
its failure is the group's to raise, so the error log (G11) reports it only
when the group cannot raise it (rule 1). A task the group killed saw a
plain ``GreenletExit``, as from any gevent kill; its ``get()`` raises
:class:`~geventctx.TaskCancelled`. The body is stopped by a
``GreenletExit`` thrown into it, which the block swallows.

Cost: ``tg.spawn`` is :func:`~geventctx.handoff.attach` plus a link per
task; the block's exit is one wait (P9: <= 1.15x four ``spawn`` and a
``joinall``).

.. versionadded:: 0.2
"""

from __future__ import annotations

import sys
import typing as t
from collections import deque

import gevent
from gevent import GreenletExit
from gevent.hub import Hub, Waiter, get_hub
from greenlet import getcurrent

from . import errorlog, registry
from ._site import site_of
from .errors import TaskCancelled
from .handoff import Greenlet, attach

if sys.version_info >= (3, 11):
    import builtins

    _BaseExceptionGroup = builtins.BaseExceptionGroup
else:  # pragma: no cover - Python 3.10
    from exceptiongroup import BaseExceptionGroup as _BaseExceptionGroup

__all__ = ["TaskGroup", "Task"]

_getframe = sys._getframe

#: What kills the greenlet running the block: re-raised as it is (rule 1).
_KILLS = (GreenletExit, gevent.Timeout, KeyboardInterrupt, SystemExit)

# The block's states.
_NEW, _BODY, _EXITING, _DONE = "new", "in its body", "exiting", "finished"


class _Stop(GreenletExit):
    """Thrown into the block's body when its group stops: a kill, as gevent's."""


class Task(Greenlet):
    """A task of a :class:`TaskGroup`: a :class:`geventctx.Greenlet` whose
    ``get()`` raises :class:`~geventctx.TaskCancelled` if its group killed it.

    .. versionadded:: 0.2
    """

    # _geventctx_claimed: its failure is its group's to raise (errorlog
    # skips it); _cancelled: its group killed it.
    __slots__ = ("_geventctx_claimed", "_cancelled")

    def get(self, block: bool = True, timeout: float | None = None) -> t.Any:
        """The task's result, or its exception raised; :class:`~geventctx.TaskCancelled`
        if its group killed it (its value is then the ``GreenletExit``)."""
        value = Greenlet.get(self, block, timeout)
        if self._cancelled and isinstance(value, GreenletExit):
            function = getattr(self._geventctx_function, "__qualname__", None) or repr(self._geventctx_function)
            raise TaskCancelled(f"the task {function} was killed by its TaskGroup") from value
        return value


def _describe(task: Task) -> str:
    record = registry.record_of(task)
    if record is None:
        return repr(task)
    function = getattr(record.function, "__qualname__", None) or repr(record.function)
    return f"{function} (spawned at {record.spawn_site})"


class TaskGroup:
    """Spawn tasks in a ``with`` block that does not exit until all of them ended.

    .. code-block:: python

        with geventctx.TaskGroup(timeout=2.0) as tg:
            users = tg.spawn(fetch_users, ids)
            prices = tg.spawn(fetch_prices, ids)
        return render(users.get(), prices.get())

    The rule: the block does not exit until every task spawned in it has
    ended. The first failure (a task's, or the body's own) kills the rest
    and the block raises one ``ExceptionGroup`` of every failure, in the
    order they happened. When ``timeout`` seconds have passed since the
    block was entered, what still runs (tasks, body) is killed and the block
    raises ``TimeoutError`` naming it — inside the group when tasks also
    failed. :meth:`cancel` kills the tasks on purpose: no error for it. A
    kill of the greenlet running the block kills the tasks first and is
    re-raised as it is (so ``with gevent.Timeout(...)`` still catches its
    own); the task failures it cut short are logged.

    ``limit`` bounds how many tasks run at once; the others wait their turn,
    in order, without blocking :meth:`spawn` (each task's context is
    still taken at :meth:`spawn`).

    .. versionadded:: 0.2
    """

    __slots__ = (
        "timeout",
        "limit",
        "_state",
        "_owner",
        "_running",
        "_queue",
        "_failures",
        "_stop",
        "_stopping_body",
        "_timer",
        "_waiter",
    )

    def __init__(self, timeout: float | None = None, limit: int | None = None) -> None:
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be at least 1, not {limit!r}")
        #: Seconds from entering the block to its deadline (``None``: none).
        self.timeout = timeout
        #: How many tasks run at once (``None``: all).
        self.limit = limit
        self._state = _NEW
        self._owner: t.Any = None
        # Tasks started (or killed before they could start) and not ended,
        # in spawn order; and tasks waiting for a free place under limit.
        self._running: dict[Task, None] = {}
        self._queue: deque[Task] = deque()
        # (task, or None for the body and the deadline, error) in the order
        # they happened.
        self._failures: list[tuple[Task | None, BaseException]] = []
        #: Why the group stopped, once it did.
        self._stop: str | None = None
        self._stopping_body: _Stop | None = None
        self._timer: t.Any = None
        self._waiter: t.Any = None

    def __repr__(self) -> str:
        state = self._stop and f"stopped: {self._stop}" or self._state
        return f"<TaskGroup {state}, {len(self._running)} running, {len(self._queue)} queued>"

    def __enter__(self) -> TaskGroup:
        if self._state is not _NEW:
            raise RuntimeError(f"{self!r} has already been entered")
        owner = getcurrent()
        if isinstance(owner, Hub):
            raise RuntimeError("a TaskGroup cannot run in the hub: its block waits for its tasks")
        errorlog.install()  # so that a task's failure is the group's to raise
        self._owner = owner
        self._state = _BODY
        if self.timeout is not None:
            self._timer = get_hub().loop.timer(max(self.timeout, 0.0))
            self._timer.start(self._on_deadline)
        return self

    def spawn(self, function: t.Callable[..., t.Any], *args: t.Any, **kwargs: t.Any) -> Task:
        """Start ``function(*args, **kwargs)`` as a task of this group.

        The task is a hand-off like :func:`geventctx.spawn`'s, in a snapshot
        of this call's context; under ``limit`` it may start later. Raises
        ``RuntimeError`` before the block, once it ended, and once the group
        stopped.
        """
        if self._state is _NEW:
            raise RuntimeError(f"{self!r} has not been entered")
        if self._state is _DONE:
            raise RuntimeError(f"{self!r} is finished")
        if self._stop is not None:
            raise RuntimeError(f"{self!r} is shutting down")
        task = Task(function, *args, **kwargs)
        attach(task, site_of(_getframe(1)), function)
        task._geventctx_claimed = True
        task._cancelled = False
        task.rawlink(self._on_done)
        if self.limit is None or len(self._running) < self.limit:
            self._running[task] = None
            task.start()
        else:
            self._queue.append(task)
        return task

    def cancel(self) -> None:
        """Kill every task (and the block's body, when another greenlet calls
        this); the block then exits without an error for it. Nothing once
        the block ended."""
        if self._state is _BODY or self._state is _EXITING:
            self._halt("cancelled")

    def __exit__(self, type_: t.Any, error: BaseException | None, tb: t.Any) -> bool:
        self._state = _EXITING
        kill: BaseException | None = None
        if error is None or error is self._stopping_body:
            pass  # (a body that caught a kill and went on has taken it on)
        elif isinstance(error, _KILLS):
            kill = error
            self._halt("the block was killed")
        else:
            if not any(error is seen for _, seen in self._failures):  # a task's, re-raised by get()
                self._failures.append((None, error))
            self._halt("the block failed")
        while self._running or self._queue:
            self._waiter = waiter = Waiter()
            try:
                waiter.get()
            except BaseException as exc:  # killed while waiting: wait still
                self._waiter = None
                kill = kill or exc
                self._halt("the block was killed")
        self._state = _DONE
        if self._timer is not None:
            self._timer.close()
            self._timer = None
        failures, self._failures = self._failures, []
        self._owner = self._stopping_body = None
        if kill is not None and not (isinstance(kill, _Stop) and failures):
            # Rule 1 (an enclosing group's stop yields to failures, as a
            # cancellation does in asyncio).
            for task, failure in failures:
                if task is not None:
                    errorlog.report_claimed(task, failure)
            if kill is error:
                return False
            raise kill
        if not failures:
            return error is not None  # our own stop: swallowed
        if len(failures) == 1 and failures[0][0] is None and isinstance(failures[0][1], TimeoutError):
            raise failures[0][1] from None  # the deadline alone
        try:
            raise _BaseExceptionGroup("unhandled errors in a TaskGroup", [f for _, f in failures]) from None
        finally:
            del failures, error  # no cycle through the frames

    # Hub callbacks and the stop.

    def _on_done(self, task: Task) -> None:
        if self._running.pop(task, self) is self:  # killed while queued, by someone else
            try:
                self._queue.remove(task)
            except ValueError:
                pass
        elif self._queue and self._stop is None:
            queued = self._queue.popleft()
            self._running[queued] = None
            queued.start()
        failure = task.exception
        if failure is not None:
            self._failures.append((task, failure))
            self._halt("a task failed")
        if not self._running and not self._queue and self._waiter is not None:
            # After the links already due (a sibling group's task may have
            # failed in the same turn), not in the middle of them.
            waiter, self._waiter = self._waiter, None
            get_hub().loop.run_callback(waiter.switch, None)

    def _on_deadline(self) -> None:
        if self._state is _DONE or self._stop is not None:
            return
        stopped = [_describe(task) for task in (*self._running, *self._queue)]
        if self._state is _BODY:
            stopped.append("the block's body")
        message = f"TaskGroup deadline of {self.timeout:g} s passed; stopped: {', '.join(stopped)}"
        self._failures.append((None, TimeoutError(message)))
        self._halt("deadline")

    def _halt(self, why: str) -> None:
        if self._stop is not None:
            return
        self._stop = why
        for queued in self._queue:
            self._running[queued] = None  # ends now, its link to come
        self._queue.clear()
        for task in self._running:
            task._cancelled = True
            task.kill(block=False)
        if self._state is _BODY and getcurrent() is not self._owner:
            get_hub().loop.run_callback(self._stop_body)

    def _stop_body(self) -> None:
        owner = self._owner
        if self._state is _BODY and self._stopping_body is None and owner is not None and not owner.dead:
            self._stopping_body = _Stop(f"stopped by its TaskGroup ({self._stop})")
            owner.throw(self._stopping_body)
