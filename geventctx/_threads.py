"""Hand-offs made in another thread than their request's: done on its hub.

The rule: a request scope is only ever changed on its own hub (the thread
that created it). A hand-off made in another thread — ``geventctx.spawn``,
a geventctx ``Pool``/``Group`` of the request's thread, ``Executor.submit``
inside a ThreadPool task — is handed over to the request's hub: the thread
asks the hub to make it (in a greenlet there, in a copy of the thread's
context, so the child sees what the task sees) and waits until it is made,
so the child holds the request before the task that made it can end. The
child then runs on the request's hub, where its greenlet belongs.

The thread waits on a native lock; a hub that does not answer within
:data:`HANDOVER_TIMEOUT` seconds (it is stopped, or blocked) gets a clear
:class:`RuntimeError` instead of a child that never runs.

.. versionadded:: 0.2
"""

from __future__ import annotations

import typing as t
from contextvars import copy_context

import gevent
from gevent.monkey import get_original

__all__ = ["request_hub_of", "on_owner_hub", "HANDOVER_TIMEOUT"]

get_ident = get_original("_thread", "get_ident")
allocate_lock = _allocate_lock = get_original("_thread", "allocate_lock")

#: Seconds a thread waits for the request's hub to take its hand-off.
HANDOVER_TIMEOUT = 30.0

T = t.TypeVar("T")


def request_hub_of(made_in: int, refusal: str) -> t.Any:
    """Where a pool or executor made in thread ``made_in`` is used from another
    thread: the hub of the current request if that request belongs to
    ``made_in`` (hand the call over there), else ``RuntimeError(refusal)``."""
    from .scope import scope_for_handoff

    scope = scope_for_handoff()
    if scope is None or scope.thread != made_in:
        raise RuntimeError(refusal)
    return scope.hub


def on_owner_hub(hub: t.Any, function: t.Callable[..., T], *args: t.Any) -> T:
    """``function(*args)`` run on ``hub`` (in a greenlet of its own there, in
    a copy of this thread's context); its result, or its exception."""
    context = copy_context()
    done = _allocate_lock()
    done.acquire()
    outcome: list[t.Any] = []

    def run() -> None:
        try:
            outcome.append((True, function(*args)))
        except BaseException as exc:  # handed to the waiting thread
            outcome.append((False, exc))
        finally:
            done.release()

    def start() -> None:
        # In the hub (a loop callback must not block): a greenlet does it.
        runner = gevent.Greenlet(run)
        runner.gr_context = context
        runner.start()

    hub.loop.run_callback_threadsafe(start)
    if not done.acquire(True, HANDOVER_TIMEOUT):
        raise RuntimeError(
            f"the request's hub did not take a hand-off from this thread within {HANDOVER_TIMEOUT:g}s "
            "(is it stopped or blocked?)"
        )
    ok, value = outcome[0]
    if not ok:
        raise value
    return t.cast(T, value)
